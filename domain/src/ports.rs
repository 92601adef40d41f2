//! Port traits: what the domain and the read side need from the outside world. The embedded
//! and cluster modes are two sets of adapters behind these.

use async_trait::async_trait;
use std::time::Duration;
use uuid::Uuid;

use crate::envelope::{EventEnvelope, Position};
use crate::events::UserEvent;
use crate::values::Email;
use crate::view::UserView;

/// A dependency could not do what was asked; the message is for logs, not for clients.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PortError {
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// Who owns an email address among live accounts. Consulted by the aggregate for an early,
/// friendly answer; the event store's unique index is what makes it true under concurrency.
#[async_trait]
pub trait EmailDirectory: Send + Sync {
    async fn owner_of(&self, email: &Email) -> Result<Option<Uuid>, PortError>;
}

/// What to read from the log.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// Only events after this position.
    pub after: Option<Position>,
    /// Only this user's events.
    pub aggregate_id: Option<Uuid>,
    /// Only these event types (all when empty).
    pub types: Vec<String>,
    pub limit: usize,
}

/// Reads committed events. `read` returns only the prefix of the log that can no longer
/// change (no earlier transaction is still running), in commit order.
#[async_trait]
pub trait EventLog: Send + Sync {
    async fn read(&self, query: &LogQuery) -> Result<Vec<EventEnvelope>, PortError>;

    /// What `read` returns, as a fold needs it: a store may read less (no metadata, no
    /// payload kept as JSON). Rebuilds read the whole log this way.
    async fn read_changes(&self, query: &LogQuery) -> Result<Vec<Change>, PortError> {
        Ok(self.read(query).await?.iter().map(Change::of).collect())
    }

    /// One user's events with a sequence above `after_sequence`, in sequence order.
    async fn user_events(
        &self,
        user: Uuid,
        after_sequence: u64,
    ) -> Result<Vec<EventEnvelope>, PortError>;

    /// The position of the last event of the safe prefix (what `read` can return), if any.
    async fn last_position(&self) -> Result<Option<Position>, PortError> {
        Ok(None)
    }

    /// How many events the log holds (for progress reports); `None` if unknown.
    async fn event_count(&self) -> Result<Option<u64>, PortError> {
        Ok(None)
    }
}

/// An event of the log as a fold needs it.
#[derive(Debug, Clone)]
pub struct Change {
    pub event_id: Uuid,
    pub aggregate_id: Uuid,
    pub sequence: u64,
    pub position: Position,
    /// The event, or why its payload does not decode.
    pub event: Result<UserEvent, String>,
}

impl Change {
    pub fn of(envelope: &EventEnvelope) -> Self {
        Self {
            event_id: envelope.event_id,
            aggregate_id: envelope.aggregate_id,
            sequence: envelope.sequence,
            position: envelope.position,
            event: envelope.event().map_err(|e| e.to_string()),
        }
    }
}

/// Which users a listing returns.
#[derive(Debug, Clone, Default)]
pub struct UserFilter {
    /// Exactly this (normalised) email.
    pub email: Option<String>,
    /// Display names containing this, case-insensitively.
    pub display_name_contains: Option<String>,
    pub created_after: Option<chrono::DateTime<chrono::Utc>>,
    pub created_before: Option<chrono::DateTime<chrono::Utc>>,
}

/// Where the relay publishes (Kafka, or the in-process bus when embedded).
#[async_trait]
pub trait EventPublisher: Send + Sync {
    /// Returns once every event is acknowledged, in order per user.
    async fn publish(&self, events: &[EventEnvelope]) -> Result<(), PortError>;

    /// Hands the events over for publishing and returns what completes once they are all
    /// acknowledged. Events of a later call go out after these (per user), so a caller may
    /// hand over the next batch before this one is acknowledged. By default this publishes
    /// and waits.
    async fn enqueue(&self, events: &[EventEnvelope]) -> Result<Acknowledgements, PortError> {
        self.publish(events).await?;
        Ok(Box::pin(std::future::ready(Ok(()))))
    }
}

/// Completes once a batch handed to `EventPublisher::enqueue` is acknowledged.
pub type Acknowledgements =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), PortError>> + Send + 'static>>;

/// Reads the user view that the projectors maintain.
#[async_trait]
pub trait UserReader: Send + Sync {
    /// The user's view, including a tombstone (`deleted`) for a deleted account.
    async fn user(&self, id: Uuid) -> Result<Option<UserView>, PortError>;
    async fn user_by_email(&self, email: &Email) -> Result<Option<UserView>, PortError>;

    /// Several users at once (tombstones included; missing ones left out), for batching.
    async fn users(&self, ids: &[Uuid]) -> Result<Vec<UserView>, PortError> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(view) = self.user(*id).await? {
                found.push(view);
            }
        }
        Ok(found)
    }

    /// Live users with an id above `after`, in id order (ids are time-ordered), at most
    /// `limit` of them.
    async fn list(
        &self,
        after: Option<Uuid>,
        limit: usize,
        filter: &UserFilter,
    ) -> Result<Vec<UserView>, PortError>;
}

/// Told about every command that finished, for metrics.
pub trait CommandObserver: Send + Sync {
    fn command_finished(&self, command: &'static str, outcome: &'static str, elapsed: Duration);
}

/// An observer that records nothing.
pub struct NoopObserver;

impl CommandObserver for NoopObserver {
    fn command_finished(&self, _: &'static str, _: &'static str, _: Duration) {}
}

/// Where one projection stands, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionState {
    pub name: String,
    /// The generation readers use.
    pub generation: u64,
    /// The generation a rebuild is writing, if one runs.
    pub building: Option<u64>,
    /// Messages (or events) not yet applied, if known.
    pub lag: Option<i64>,
}

/// Reports the projections of a deployment.
#[async_trait]
pub trait ProjectionMonitor: Send + Sync {
    async fn projections(&self) -> Result<Vec<ProjectionState>, PortError>;
}
