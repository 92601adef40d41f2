//! The live tail of the log for subscriptions: one task per process follows the event store's
//! commit order (the same gap-free read the relay uses), woken by commits, and broadcasts
//! each batch. A subscriber replays from the store up to the tail, then follows the
//! broadcast, skipping what it has seen, so the seam loses and repeats nothing.

use futures::stream::{self, BoxStream, StreamExt};
use pcf_domain::ports::{EventLog, LogQuery};
use pcf_domain::{EventEnvelope, Position};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

type Batch = Arc<Vec<EventEnvelope>>;

/// The process's live tail of the log.
pub struct LiveLog {
    batches: broadcast::Sender<Batch>,
    head: watch::Receiver<Position>,
    log: Arc<dyn EventLog>,
}

/// Which events a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct LiveFilter {
    pub aggregate_id: Option<Uuid>,
    pub types: Vec<String>,
}

impl LiveFilter {
    fn matches(&self, e: &EventEnvelope) -> bool {
        self.aggregate_id.is_none_or(|id| id == e.aggregate_id)
            && (self.types.is_empty() || self.types.contains(&e.event_type))
    }
}

const BATCH: usize = 500;

impl LiveLog {
    /// Starts following the log from its current end. `commits` moves whenever events may
    /// have been committed; `poll` is the fallback interval.
    pub async fn spawn(
        log: Arc<dyn EventLog>,
        mut commits: watch::Receiver<u64>,
        poll: Duration,
    ) -> Arc<Self> {
        let start = match log.last_position().await {
            Ok(p) => p.unwrap_or(Position::START),
            Err(e) => {
                tracing::warn!(error = %e, "live tail starts from the beginning of the log");
                Position::START
            }
        };
        let (batches, _) = broadcast::channel(1024);
        let (head_tx, head) = watch::channel(start);
        let live = Arc::new(Self {
            batches: batches.clone(),
            head,
            log: log.clone(),
        });
        let alive = Arc::downgrade(&live);
        tokio::spawn(async move {
            let mut after = start;
            loop {
                let query = LogQuery {
                    after: Some(after),
                    limit: BATCH,
                    ..LogQuery::default()
                };
                match log.read(&query).await {
                    Ok(events) if !events.is_empty() => {
                        after = events.last().map_or(after, |e| e.position);
                        let full = events.len() == BATCH;
                        // No receivers is fine: nobody is subscribed right now.
                        let _ = batches.send(Arc::new(events));
                        let _ = head_tx.send(after);
                        if full {
                            continue;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "live tail read failed"),
                }
                if alive.strong_count() == 0 {
                    // Nobody can subscribe any more.
                    return;
                }
                tokio::select! {
                    changed = commits.changed() => {
                        if changed.is_err() {
                            // The store is gone; keep polling.
                            tokio::time::sleep(poll).await;
                        }
                    }
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        });
        live
    }

    /// The position the tail has reached.
    pub fn head(&self) -> Position {
        *self.head.borrow()
    }

    /// Events after `after` (or from now on), matching `filter`, in commit order: first
    /// from the store, then live.
    pub fn stream(
        self: &Arc<Self>,
        after: Option<Position>,
        filter: LiveFilter,
    ) -> BoxStream<'static, EventEnvelope> {
        // Subscribe before reading the store, so nothing falls between the two.
        let rx = self.batches.subscribe();
        let last = after.unwrap_or_else(|| self.head());
        let state = Subscriber {
            live: self.clone(),
            rx,
            last,
            replaying: after.is_some(),
            filter,
        };
        stream::unfold(state, |mut s| async move {
            let batch = s.next_batch().await?;
            Some((stream::iter(batch), s))
        })
        .flatten()
        .boxed()
    }
}

struct Subscriber {
    live: Arc<LiveLog>,
    rx: broadcast::Receiver<Batch>,
    /// The last position delivered (or skipped as not matching).
    last: Position,
    replaying: bool,
    filter: LiveFilter,
}

impl Subscriber {
    /// The next events to deliver (possibly none); `None` ends the stream.
    async fn next_batch(&mut self) -> Option<Vec<EventEnvelope>> {
        if self.replaying {
            let query = LogQuery {
                after: Some(self.last),
                aggregate_id: self.filter.aggregate_id,
                types: self.filter.types.clone(),
                limit: BATCH,
            };
            match self.live.log.read(&query).await {
                Ok(events) => {
                    if events.len() < BATCH {
                        // Caught up: what commits from here on arrives through the
                        // broadcast, which this subscriber joined before reading the store.
                        self.replaying = false;
                    }
                    if let Some(e) = events.last() {
                        self.last = self.last.max(e.position);
                    }
                    return Some(events);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "subscription replay failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return Some(Vec::new());
                }
            }
        }
        match self.rx.recv().await {
            Ok(batch) => {
                let out: Vec<EventEnvelope> = batch
                    .iter()
                    .filter(|e| e.position > self.last && self.filter.matches(e))
                    .cloned()
                    .collect();
                if let Some(e) = batch.last() {
                    self.last = self.last.max(e.position);
                }
                Some(out)
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Too slow for the broadcast: catch up from the store.
                self.replaying = true;
                Some(Vec::new())
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}
