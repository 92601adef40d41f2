//! The relay: publishes committed events to the bus in commit order, from a durable
//! checkpoint that advances only after the bus acknowledged the batch (at-least-once).

use pcf_domain::ports::{Acknowledgements, EventPublisher, LogQuery};
use pcf_domain::Position;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::store::{RelayStore, StoreError};

/// The first pause before looking again at rows that are committed but not readable yet.
const PENDING_PAUSE_MIN: Duration = Duration::from_millis(2);

/// How often a leading relay saves its checkpoint while it publishes. What the bus has
/// acknowledged is remembered at once; the store hears of it at most this often (and when
/// the relay stops), so a steady stream costs the store one checkpoint write per interval
/// instead of one per batch. After a crash at most this much is published again, which
/// the consumers skip by version (at least once, as always).
const SAVE_EVERY: Duration = Duration::from_millis(100);

/// How the relay reads and waits.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The checkpoint's name; one per destination.
    pub name: String,
    pub batch_size: usize,
    /// How long to wait for a commit signal before looking anyway.
    pub poll_interval: Duration,
    /// The longest pause after a failure.
    pub max_backoff: Duration,
    /// How often a standby relay tries to take over, and a leader checks it still leads.
    pub standby_interval: Duration,
    /// `Some(start)`: a relay of this process only (no leadership), keeping its checkpoint
    /// in memory from `start` on. For an in-process bus feeding in-memory views, which are
    /// rebuilt at every start, so that every process's views get every event.
    pub local_from: Option<Position>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            name: "bus".to_owned(),
            batch_size: 500,
            poll_interval: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            standby_interval: Duration::from_secs(2),
            local_from: None,
        }
    }
}

/// Why a relay step failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the log: {0}")]
    Read(pcf_domain::ports::PortError),
    #[error("publishing: {0}")]
    Publish(pcf_domain::ports::PortError),
}

/// Moves events from the store (its relay role: `RelayStore`) to a publisher.
pub struct Relay {
    store: Arc<dyn RelayStore>,
    publisher: Arc<dyn EventPublisher>,
    config: RelayConfig,
    /// The checkpoint of a local relay.
    local: std::sync::Mutex<Option<Position>>,
}

impl Relay {
    pub fn new(
        store: Arc<dyn RelayStore>,
        publisher: Arc<dyn EventPublisher>,
        config: RelayConfig,
    ) -> Self {
        let local = std::sync::Mutex::new(config.local_from);
        Self {
            store,
            publisher,
            config,
            local,
        }
    }

    /// Publishes one batch after the checkpoint and advances it. Returns how many events
    /// were published (0 when caught up).
    pub async fn step(&self) -> Result<usize, RelayError> {
        let mut pipeline = Pipeline::default();
        let published = match self.advance(&mut pipeline).await? {
            Advance::HandedOver(n) => n,
            Advance::CaughtUp(_) => 0,
        };
        self.settle_all(&mut pipeline).await?;
        self.flush(&mut pipeline, true).await?;
        Ok(published)
    }

    /// Whether rows lie after `checkpoint` (readable or not yet).
    async fn pending(&self, checkpoint: Position) -> bool {
        self.store
            .count_after(checkpoint)
            .await
            .is_ok_and(|n| n > 0)
    }

    /// Events committed but not yet published.
    pub async fn backlog(&self) -> Result<u64, StoreError> {
        let checkpoint = self.checkpoint().await?;
        self.store.count_after(checkpoint).await
    }

    /// The checkpoint: everything at or before it has been published.
    pub async fn checkpoint(&self) -> Result<Position, StoreError> {
        if let Some(local) = *self.local.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(local);
        }
        self.store.load_checkpoint(&self.config.name).await
    }

    /// Relays until `shutdown` completes, while this process leads: one relay is active
    /// across instances, the others wait to take over.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        if let Err(e) = self.store.watch_commits().await {
            tracing::warn!(error = %e, "commit notifications unavailable; polling only");
        }
        if self.config.local_from.is_some() {
            self.lead(Box::new(crate::store::SoleLease), &mut shutdown)
                .await;
            return;
        }
        loop {
            let lease = match self.store.try_lead(&self.config.name).await {
                Ok(Some(lease)) => Some(lease),
                Ok(None) => {
                    tracing::debug!("another relay is active; standing by");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay leadership check failed");
                    None
                }
            };
            match lease {
                Some(lease) => {
                    tracing::info!(relay = %self.config.name, "relay active");
                    if self.lead(lease, &mut shutdown).await {
                        return;
                    }
                    tracing::warn!("relay leadership lost");
                }
                None => {
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(self.config.standby_interval) => {}
                    }
                }
            }
        }
    }

    /// Relays while `lease` holds: drains the backlog, then waits for a commit signal (or
    /// the poll interval), backing off after failures. Returns true on shutdown.
    async fn lead(
        &self,
        mut lease: Box<dyn crate::store::Lease>,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        let committed = self.store.committed();
        let mut failures = 0u32;
        let mut pending_pause = PENDING_PAUSE_MIN;
        let mut checked = std::time::Instant::now();
        let mut pipeline = Pipeline::default();
        loop {
            if checked.elapsed() >= self.config.standby_interval {
                if !lease.alive().await {
                    return false;
                }
                checked = std::time::Instant::now();
            }
            let advanced = match self.flush(&mut pipeline, false).await {
                Ok(()) => self.advance(&mut pipeline).await,
                Err(e) => Err(e.into()),
            };
            let pause = match advanced {
                Ok(Advance::HandedOver(_)) => {
                    failures = 0;
                    pending_pause = PENDING_PAUSE_MIN;
                    // While draining a backlog the relay does not wait, so shutdown is
                    // looked for here too: it does not wait for the backlog to drain.
                    if futures::FutureExt::now_or_never(shutdown.as_mut()).is_some() {
                        // Save what the bus has by now, so that less comes again after a
                        // restart.
                        self.stop(&mut pipeline).await;
                        return true;
                    }
                    continue;
                }
                Ok(Advance::CaughtUp(checkpoint)) => {
                    failures = 0;
                    // Committed rows that are not readable yet wait only for an earlier
                    // transaction to end, and nothing signals that: look again soon (less
                    // often the longer it takes) rather than at the next poll.
                    if self.pending(checkpoint).await {
                        let pause = pending_pause;
                        pending_pause = (pending_pause * 2).min(self.config.poll_interval);
                        pause
                    } else {
                        pending_pause = PENDING_PAUSE_MIN;
                        self.config.poll_interval
                    }
                }
                Err(e) => {
                    // Start again from the checkpoint in the store; batches in flight may
                    // still arrive, and come again (at least once).
                    pipeline = Pipeline::default();
                    failures += 1;
                    tracing::warn!(error = %e, failures, "relay step failed; backing off");
                    let exp = Duration::from_millis(100 * 2u64.saturating_pow(failures.min(10)));
                    exp.min(self.config.max_backoff)
                }
            };
            // A checkpoint waiting to be saved is saved by the end of this pause.
            let pause = match pipeline.unsaved() {
                true => pause.min(SAVE_EVERY.saturating_sub(pipeline.stored_at.elapsed())),
                false => pause,
            };
            tokio::select! {
                _ = shutdown.as_mut() => {
                    self.stop(&mut pipeline).await;
                    return true;
                }
                _ = committed.notified(), if failures == 0 => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// On shutdown: waits (a bounded time) for the batches in flight and saves what the
    /// bus has by then, so that less comes again after a restart.
    async fn stop(&self, pipeline: &mut Pipeline) {
        let settled = async {
            // What is acknowledged already is saved first, in case the rest takes too long.
            self.flush(pipeline, true).await?;
            self.settle_all(pipeline).await?;
            self.flush(pipeline, true).await?;
            Ok::<_, RelayError>(())
        };
        if let Ok(Err(e)) = tokio::time::timeout(SHUTDOWN_SETTLE, settled).await {
            tracing::warn!(error = %e, "relay could not save its checkpoint on shutdown");
        }
    }

    /// Saves the acknowledged position if it moved since the last save, and (unless
    /// `now`) `SAVE_EVERY` has passed since.
    async fn flush(&self, pipeline: &mut Pipeline, now: bool) -> Result<(), StoreError> {
        let Some(acked) = pipeline.acked else {
            return Ok(());
        };
        // A local relay's checkpoint is in memory: saving it costs nothing.
        let due =
            now || self.config.local_from.is_some() || pipeline.stored_at.elapsed() >= SAVE_EVERY;
        if !pipeline.unsaved() || !due {
            return Ok(());
        }
        self.save(acked).await?;
        pipeline.stored = Some(acked);
        pipeline.stored_at = std::time::Instant::now();
        Ok(())
    }

    /// One move of the pipeline: hands the next batch to the publisher (read while the
    /// batch before is being acknowledged), and settles the oldest batch in flight when
    /// the pipeline is full, or all of them when the log is caught up.
    async fn advance(&self, pipeline: &mut Pipeline) -> Result<Advance, RelayError> {
        let checkpoint = match pipeline.acked {
            Some(checkpoint) => checkpoint,
            None => {
                let checkpoint = self.checkpoint().await?;
                pipeline.acked = Some(checkpoint);
                pipeline.stored = Some(checkpoint);
                checkpoint
            }
        };
        let query = LogQuery {
            after: Some(pipeline.handed.unwrap_or(checkpoint)),
            limit: self.config.batch_size,
            ..LogQuery::default()
        };
        let events = self.store.read(&query).await.map_err(RelayError::Read)?;
        if let Some(last) = events.last().map(|e| e.position) {
            let acknowledged = self
                .publisher
                .enqueue(&events)
                .await
                .map_err(RelayError::Publish)?;
            tracing::debug!(count = events.len(), position = %last, "handed events to the bus");
            pipeline.handed = Some(last);
            pipeline.in_flight.push_back((last, acknowledged));
            if pipeline.in_flight.len() >= MAX_IN_FLIGHT {
                self.settle_oldest(pipeline).await?;
            }
            return Ok(Advance::HandedOver(events.len()));
        }
        self.settle_all(pipeline).await?;
        pipeline.handed = None;
        Ok(Advance::CaughtUp(pipeline.acked.unwrap_or(checkpoint)))
    }

    /// Settles every batch in flight, oldest first.
    async fn settle_all(&self, pipeline: &mut Pipeline) -> Result<(), RelayError> {
        while !pipeline.in_flight.is_empty() {
            self.settle_oldest(pipeline).await?;
        }
        Ok(())
    }

    /// Waits for the oldest batch in flight to be acknowledged, and remembers its last
    /// position as acknowledged (saved by `flush`).
    async fn settle_oldest(&self, pipeline: &mut Pipeline) -> Result<(), RelayError> {
        let Some((last, acknowledged)) = pipeline.in_flight.pop_front() else {
            return Ok(());
        };
        acknowledged.await.map_err(RelayError::Publish)?;
        pipeline.acked = Some(last);
        Ok(())
    }

    async fn save(&self, position: Position) -> Result<(), StoreError> {
        match self.config.local_from {
            Some(_) => {
                *self.local.lock().unwrap_or_else(|e| e.into_inner()) = Some(position);
                Ok(())
            }
            None => {
                self.store
                    .save_checkpoint(&self.config.name, position)
                    .await
            }
        }
    }
}

/// How long a relay that is shutting down waits for the batches in flight.
const SHUTDOWN_SETTLE: Duration = Duration::from_secs(2);

/// Batches handed to the publisher and not acknowledged yet, at most this many.
const MAX_IN_FLIGHT: usize = 2;

/// A leading relay's progress.
struct Pipeline {
    /// Everything up to here is acknowledged by the bus. While a relay leads nobody else
    /// moves the checkpoint, so it is read from the store only when leading starts and
    /// after a failure.
    acked: Option<Position>,
    /// The checkpoint as this leader last saved it, and when.
    stored: Option<Position>,
    stored_at: std::time::Instant,
    /// The last position handed to the publisher (after `acked` while batches are in
    /// flight).
    handed: Option<Position>,
    in_flight: std::collections::VecDeque<(Position, Acknowledgements)>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self {
            acked: None,
            stored: None,
            stored_at: std::time::Instant::now(),
            handed: None,
            in_flight: Default::default(),
        }
    }
}

impl Pipeline {
    /// Whether an acknowledged position waits to be saved.
    fn unsaved(&self) -> bool {
        self.acked.is_some() && self.acked != self.stored
    }
}

enum Advance {
    /// This many events handed to the publisher.
    HandedOver(usize),
    CaughtUp(Position),
}
