//! The relay: publishes committed events to the bus in commit order, from a durable
//! checkpoint that advances only after the bus acknowledged the batch (at-least-once).

use pcf_domain::ports::{Acknowledgements, EventPublisher, LogQuery};
use pcf_domain::Position;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::store::{EventStore, StoreError};

/// The first pause before looking again at rows that are committed but not readable yet.
const PENDING_PAUSE_MIN: Duration = Duration::from_millis(2);

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

/// Moves events from the store to a publisher.
pub struct Relay {
    store: Arc<dyn EventStore>,
    publisher: Arc<dyn EventPublisher>,
    config: RelayConfig,
    /// The checkpoint of a local relay.
    local: std::sync::Mutex<Option<Position>>,
}

impl Relay {
    pub fn new(
        store: Arc<dyn EventStore>,
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
            let pause = match self.advance(&mut pipeline).await {
                Ok(Advance::HandedOver(_)) => {
                    failures = 0;
                    pending_pause = PENDING_PAUSE_MIN;
                    // While draining a backlog the relay does not wait, so shutdown is
                    // looked for here too: it does not wait for the backlog to drain.
                    if futures::FutureExt::now_or_never(shutdown.as_mut()).is_some() {
                        // Save what the bus has by now, so that less comes again after a
                        // restart.
                        let settled = self.settle_all(&mut pipeline);
                        let _ = tokio::time::timeout(SHUTDOWN_SETTLE, settled).await;
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
            tokio::select! {
                _ = shutdown.as_mut() => return true,
                _ = committed.notified(), if failures == 0 => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One move of the pipeline: hands the next batch to the publisher (read while the
    /// batch before is being acknowledged), and settles the oldest batch in flight when
    /// the pipeline is full, or all of them when the log is caught up.
    async fn advance(&self, pipeline: &mut Pipeline) -> Result<Advance, RelayError> {
        let checkpoint = match pipeline.saved {
            Some(checkpoint) => checkpoint,
            None => {
                let checkpoint = self.checkpoint().await?;
                pipeline.saved = Some(checkpoint);
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
        Ok(Advance::CaughtUp(pipeline.saved.unwrap_or(checkpoint)))
    }

    /// Settles every batch in flight, oldest first.
    async fn settle_all(&self, pipeline: &mut Pipeline) -> Result<(), RelayError> {
        while !pipeline.in_flight.is_empty() {
            self.settle_oldest(pipeline).await?;
        }
        Ok(())
    }

    /// Waits for the oldest batch in flight to be acknowledged, then saves its checkpoint.
    async fn settle_oldest(&self, pipeline: &mut Pipeline) -> Result<(), RelayError> {
        let Some((last, acknowledged)) = pipeline.in_flight.pop_front() else {
            return Ok(());
        };
        acknowledged.await.map_err(RelayError::Publish)?;
        self.save(last).await?;
        pipeline.saved = Some(last);
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
#[derive(Default)]
struct Pipeline {
    /// The checkpoint as this leader last saved it: while it leads, nobody else moves it,
    /// so it is read from the store only when leading starts and after a failure.
    saved: Option<Position>,
    /// The last position handed to the publisher (after `saved` while batches are in
    /// flight).
    handed: Option<Position>,
    in_flight: std::collections::VecDeque<(Position, Acknowledgements)>,
}

enum Advance {
    /// This many events handed to the publisher.
    HandedOver(usize),
    CaughtUp(Position),
}
