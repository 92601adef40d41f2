//! The user projection, written once against a view writer; each read model is an adapter.

use async_trait::async_trait;
use pcf_domain::ports::{EventLog, LogQuery, PortError};
use pcf_domain::{EventEnvelope, Position, UserView};
use std::sync::Arc;
use tokio::sync::mpsc;
use uuid::Uuid;

/// How often one event is retried after losing a race to another writer.
const MAX_RACES: usize = 8;

/// Why a batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("view store: {0}")]
    View(PortError),
    #[error("event store: {0}")]
    Log(PortError),
    #[error("event {event_id} cannot be applied: {reason}")]
    Poison { event_id: Uuid, reason: String },
}

impl ProjectionError {
    /// Whether retrying later may succeed (a dependency is down), as opposed to an event
    /// that can never be applied.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Poison { .. })
    }
}

/// Writes one read model of users.
#[async_trait]
pub trait UserViewWriter: Send + Sync {
    /// The user's current view, tombstones included.
    async fn current(&self, id: Uuid) -> Result<Option<UserView>, PortError>;

    /// Replaces the user's view with `next` if the stored one is still at `previous`'s
    /// version, keeping the email index in step. Returns false (and writes nothing) when the
    /// stored view is not at `previous`'s version: another writer got there first.
    async fn replace(
        &self,
        previous: Option<&UserView>,
        next: &UserView,
    ) -> Result<bool, PortError>;
}

/// Applies events to a view: skips what was applied, fills gaps from the log.
pub struct UserProjector {
    writer: Arc<dyn UserViewWriter>,
    log: Arc<dyn EventLog>,
}

impl UserProjector {
    pub fn new(writer: Arc<dyn UserViewWriter>, log: Arc<dyn EventLog>) -> Self {
        Self { writer, log }
    }

    /// Applies a batch, in order. Safe to repeat: events at or below a user's version are
    /// skipped.
    pub async fn apply_batch(&self, events: &[EventEnvelope]) -> Result<(), ProjectionError> {
        for envelope in events {
            self.apply(envelope).await?;
        }
        Ok(())
    }

    async fn apply(&self, envelope: &EventEnvelope) -> Result<(), ProjectionError> {
        // Another writer of the same view (a rebuild, another consumer after a rebalance)
        // may move the user on between our read and our write; then read again.
        for _ in 0..MAX_RACES {
            if self.try_apply(envelope).await? {
                return Ok(());
            }
        }
        Err(ProjectionError::View(PortError::Unavailable(format!(
            "user {} kept changing while applying sequence {}",
            envelope.aggregate_id, envelope.sequence
        ))))
    }

    /// Returns false when a concurrent writer changed the view first.
    async fn try_apply(&self, envelope: &EventEnvelope) -> Result<bool, ProjectionError> {
        let id = envelope.aggregate_id;
        let current = self
            .writer
            .current(id)
            .await
            .map_err(ProjectionError::View)?;
        let last = current.as_ref().map_or(0, |v| v.version);
        if envelope.sequence <= last {
            return Ok(true);
        }
        if envelope.sequence == last + 1 {
            let next = fold(current.clone(), envelope)?;
            return self
                .writer
                .replace(current.as_ref(), &next)
                .await
                .map_err(ProjectionError::View);
        }
        // A gap: earlier events of this user have not reached us (yet). Take them, and this
        // one, from the event store.
        let missing = self
            .log
            .user_events(id, last)
            .await
            .map_err(ProjectionError::Log)?;
        let mut view = current;
        for earlier in missing.iter().filter(|e| e.sequence <= envelope.sequence) {
            // An earlier event that cannot be applied makes this one unappliable too; the
            // error names this one, the event the caller holds.
            let next = fold(view.clone(), earlier).map_err(|e| match e {
                ProjectionError::Poison { reason, .. } if earlier.event_id != envelope.event_id => {
                    ProjectionError::Poison {
                        event_id: envelope.event_id,
                        reason: format!(
                            "earlier event {} (sequence {}) cannot be applied: {reason}",
                            earlier.event_id, earlier.sequence
                        ),
                    }
                }
                other => other,
            })?;
            if !self
                .writer
                .replace(view.as_ref(), &next)
                .await
                .map_err(ProjectionError::View)?
            {
                return Ok(false);
            }
            view = Some(next);
        }
        Ok(true)
    }

    /// Applies the whole log from the start, in commit order.
    pub async fn catch_up(&self, batch_size: usize) -> Result<Position, ProjectionError> {
        let mut after = Position::START;
        loop {
            let query = LogQuery {
                after: Some(after),
                limit: batch_size,
                ..LogQuery::default()
            };
            let events = self.log.read(&query).await.map_err(ProjectionError::Log)?;
            let Some(last) = events.last().map(|e| e.position) else {
                return Ok(after);
            };
            self.apply_batch(&events).await?;
            after = last;
        }
    }

    /// Applies batches from an in-process channel until it closes. A failed batch is logged
    /// and left: the next event of that user finds the gap and fills it from the log.
    pub async fn run(self, mut batches: mpsc::UnboundedReceiver<Arc<Vec<EventEnvelope>>>) {
        while let Some(batch) = batches.recv().await {
            let span = tracing::debug_span!("projection_batch", size = batch.len());
            let _enter = span.enter();
            if let Err(e) = self.apply_batch(&batch).await {
                tracing::error!(error = %e, "projection batch failed");
            }
        }
    }
}

fn fold(current: Option<UserView>, envelope: &EventEnvelope) -> Result<UserView, ProjectionError> {
    let event = envelope.event().map_err(|e| ProjectionError::Poison {
        event_id: envelope.event_id,
        reason: e.to_string(),
    })?;
    UserView::fold(current, envelope.aggregate_id, envelope.sequence, &event).ok_or_else(|| {
        ProjectionError::Poison {
            event_id: envelope.event_id,
            reason: format!(
                "{} at sequence {} for a user that has no view",
                envelope.event_type, envelope.sequence
            ),
        }
    })
}
