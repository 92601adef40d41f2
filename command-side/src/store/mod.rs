//! The event store, with a PostgreSQL and an SQLite adapter, behind one trait per role:
//! `CommandStore` for command handling, `RelayStore` for the relay, `CommitFeed` for live
//! subscriptions, `StoreHealth` for health checks, `ProtectHistory` for `pcf events protect`,
//! `RepublishStore` for `pcf events republish`. `EventStore` is all of them at once, for
//! the wiring, which opens one store and hands each part the role it needs. Both adapters
//! also implement the domain's `EventLog` (reads of the log, for the relay, rebuilds and
//! tools) and `EmailDirectory`.
//!
//! Loading an aggregate goes through postgres-es / sqlite-es (`PersistedEventStore`), so
//! their upcasting and snapshot support apply. Appending does not: an append must also claim
//! or release emails and record the command id *in the same transaction* as the events, and
//! the crates' `persist` opens a transaction of its own. So each adapter writes the crates'
//! table layout itself, in one transaction, and maps unique violations to their meaning.
//!
//! Both adapters are one `SqlStore` (`sql`), over a backend that brings the statements and
//! driver types of its database and its own appends, log reads, leadership and commit
//! notifications.

pub mod postgres;
mod protect;
mod republish;
mod sealing;
mod sql;
pub mod sqlite;

pub use protect::{ProtectHistory, Protected};
pub use republish::{RepublishCheckpoint, RepublishState, RepublishStore};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use pcf_domain::ports::{EmailDirectory, EventLog, PortError};
use pcf_domain::{EventEnvelope, EventMetadata, Position, User, UserEvent, UserView};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::Notify;
use uuid::Uuid;

/// The store failed for a reason that is not the caller's.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    #[error("event store error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if pcf_adapters::sql::is_unavailable(&e) {
            Self::Unavailable(e.to_string())
        } else {
            Self::Internal(e.to_string())
        }
    }
}

impl From<StoreError> for PortError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => PortError::Unavailable(m),
            StoreError::Internal(m) => PortError::Internal(m),
        }
    }
}

/// Why an append did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended to this user first (optimistic concurrency).
    #[error("the user changed concurrently")]
    Conflict,
    /// A live account already holds the email.
    #[error("email already in use")]
    EmailTaken,
    /// A command with this id has already been executed.
    #[error("command already executed")]
    DuplicateCommand,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a command returned; stored with its command id so a repeat returns it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandResult {
    pub user_id: Uuid,
    pub user: Option<UserView>,
    pub version: u64,
    pub position: Position,
    /// An account deletion's erasure receipt: when the user's data key was destroyed (in the
    /// transaction that recorded the deletion, at `position`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_destroyed_at: Option<DateTime<Utc>>,
}

/// A command id's stored record, as `find_command` reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCommand {
    /// What the command returned.
    pub result: CommandResult,
    /// The fingerprint of the caller, command, target and input that used the id
    /// (`idempotency::fingerprint`); none for records written before fingerprints were kept.
    pub fingerprint: Option<String>,
    /// Recorded longer than `COMMAND_ID_RETENTION` ago (by the database's clock): the id
    /// answers nothing any more.
    pub expired: bool,
}

/// Events to append to one user, after `expected_sequence`.
pub struct AppendRequest<'a> {
    pub user_id: Uuid,
    pub expected_sequence: u64,
    pub events: &'a [UserEvent],
    /// Recorded with each event; its command id, if any, is recorded once with the result.
    pub metadata: &'a EventMetadata,
    /// Stored beside the command id, which a repeat must match to get the result.
    pub fingerprint: Option<&'a str>,
    /// The user's state after the events, for the stored command result.
    pub user_after: Option<&'a UserView>,
}

impl AppendRequest<'_> {
    /// What the append returns, once its last event is at `position`.
    pub(crate) fn result(&self, position: Position) -> CommandResult {
        CommandResult {
            user_id: self.user_id,
            user: self.user_after.cloned(),
            version: self.expected_sequence + self.events.len() as u64,
            position,
            key_destroyed_at: None,
        }
    }
}

/// What command handling (`CommandService`) needs: the user's state, the append, the
/// records of executed command ids, and (through `EmailDirectory`) who holds an email.
#[async_trait]
pub trait CommandStore: EmailDirectory + Send + Sync {
    /// The user's current state and the sequence of its last event (0 if none).
    async fn load(&self, user_id: Uuid) -> Result<(User, u64), StoreError>;

    /// Appends the events, claims and releases emails, and records the command id (with its
    /// fingerprint and result), all in one transaction. Returns the position of the last
    /// event appended. A command id recorded before, even expired, refuses the append
    /// (`DuplicateCommand`) until `forget_expired_command` removes it.
    async fn append(&self, request: AppendRequest<'_>) -> Result<CommandResult, AppendError>;

    /// The record of an already executed command, expired or not.
    async fn find_command(&self, command_id: &str) -> Result<Option<StoredCommand>, StoreError>;

    /// Removes the record of `command_id` if it has expired (and only then: a record made
    /// meanwhile by a repeat stays), so that the id can be used again.
    async fn forget_expired_command(&self, command_id: &str) -> Result<(), StoreError>;

    /// Removes every command id record older than `COMMAND_ID_RETENTION`, in batches;
    /// returns how many. Expired records answer nothing either way; this keeps the table
    /// small. Meant to run periodically (any instance, any number at once).
    async fn prune_expired_commands(&self) -> Result<u64, StoreError>;

    /// The position of the user's event with this sequence.
    async fn position_of(&self, user_id: Uuid, sequence: u64) -> Result<Position, StoreError>;
}

/// What the relay (`Relay`) needs: the log's safe prefix after its checkpoint (through
/// `EventLog::read`), the checkpoint itself, the backlog, leadership among relays, and a
/// wake-up on commits. The commit feed is part of it because the relay starts the
/// forwarding of other processes' commits (`CommitFeed::watch_commits`).
#[async_trait]
pub trait RelayStore: EventLog + CommitFeed + Send + Sync {
    /// The relay checkpoint `name` (the start of the log if none is saved).
    async fn load_checkpoint(&self, name: &str) -> Result<Position, StoreError>;

    /// How many events lie after `position` (committed or not yet safe to publish).
    async fn count_after(&self, position: Position) -> Result<u64, StoreError>;

    /// The events after `position` and how long ago the oldest of them was recorded, by
    /// the store's clock (for metrics: what `count_after` counts, and its age).
    async fn backlog_after(&self, position: Position) -> Result<Backlog, StoreError>;

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError>;

    /// Signalled after events are committed (by this process, or by another one where the
    /// backend can tell); waiters fall back to polling for anything missed.
    fn committed(&self) -> Arc<Notify>;

    /// Tries to become the one active relay named `name`. `None`: another process leads.
    async fn try_lead(&self, name: &str) -> Result<Option<Box<dyn Lease>>, StoreError>;
}

/// What waits after a relay checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Backlog {
    /// How many events.
    pub events: u64,
    /// Seconds since the oldest of them was recorded; 0 when there is none.
    pub oldest_age_seconds: f64,
}

/// The commit feed: what live subscriptions (which follow the log in commit order) wait on
/// to look again, and what wakes the relay.
#[async_trait]
pub trait CommitFeed: Send + Sync {
    /// A counter that moves on every commit signal, for any number of watchers (the relay
    /// uses `RelayStore::committed`; live subscriptions use this).
    fn commits(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Starts whatever forwards other processes' commits to `commits` and
    /// `RelayStore::committed` (PostgreSQL's LISTEN). A no-op where the store has a single
    /// writer process.
    async fn watch_commits(&self) -> Result<(), StoreError>;
}

/// Health checks (readiness) of the store.
#[async_trait]
pub trait StoreHealth: Send + Sync {
    /// Succeeds when the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The whole event store, every role at once: what the wiring opens and hands out, each
/// part taking the role it needs (an `Arc<dyn EventStore>` converts to an
/// `Arc<dyn CommandStore>`, `Arc<dyn RelayStore>`, ... where one is expected). Every type
/// with all the roles is one. The methods of every role are callable on a `dyn EventStore`
/// with only `EventStore` imported; on a concrete store, the role's trait must be in scope.
pub trait EventStore:
    CommandStore + RelayStore + CommitFeed + StoreHealth + ProtectHistory + RepublishStore
{
}

impl<
        T: CommandStore
            + RelayStore
            + CommitFeed
            + StoreHealth
            + ProtectHistory
            + RepublishStore
            + ?Sized,
    > EventStore for T
{
}

/// Leadership held while the lease lives; lost when its process or connection dies.
#[async_trait]
pub trait Lease: Send + Sync {
    /// Whether leadership is still held.
    async fn alive(&mut self) -> bool;
}

/// A lease that is always held: a store with a single writer process, or a relay that needs
/// no leadership.
pub struct SoleLease;

#[async_trait]
impl Lease for SoleLease {
    async fn alive(&mut self) -> bool {
        true
    }
}

/// Wakes the relay and every watcher of commits.
#[derive(Clone)]
pub(crate) struct CommitSignal {
    relay: Arc<Notify>,
    watchers: Arc<tokio::sync::watch::Sender<u64>>,
}

impl CommitSignal {
    pub(crate) fn new() -> Self {
        Self {
            relay: Arc::new(Notify::new()),
            watchers: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    pub(crate) fn signal(&self) {
        self.relay.notify_one();
        self.watchers.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn relay(&self) -> Arc<Notify> {
        self.relay.clone()
    }

    pub(crate) fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.watchers.subscribe()
    }
}

/// How the email index changes when events are appended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum EmailChange<'a> {
    Claim(&'a str),
    Release(&'a str),
    ReleaseAll,
}

/// The email claims and releases that `events` imply, in the order to apply them.
pub(crate) fn email_changes(events: &[UserEvent]) -> Vec<EmailChange<'_>> {
    let mut changes = Vec::new();
    for event in events {
        match event {
            UserEvent::UserCreated { email, .. } => changes.push(EmailChange::Claim(email)),
            UserEvent::EmailChanged {
                old_email,
                new_email,
                ..
            } => {
                changes.push(EmailChange::Release(old_email));
                changes.push(EmailChange::Claim(new_email));
            }
            UserEvent::AccountDeleted { .. } => changes.push(EmailChange::ReleaseAll),
            UserEvent::ProfileUpdated { .. } => {}
        }
    }
    changes
}

/// How many expired command records one statement of `prune_expired_commands` removes:
/// bounded, so that pruning a large backlog never holds many row locks (or, on SQLite, the
/// single writer) for long.
pub(crate) const PRUNE_BATCH: i64 = 10_000;

/// `COMMAND_ID_RETENTION` in seconds, as the SQL of the adapters takes it.
pub(crate) fn retention_seconds() -> i64 {
    crate::idempotency::COMMAND_ID_RETENTION.as_secs() as i64
}

/// Decodes a command record's stored result; a record without one (none are written that
/// way) is treated as absent.
pub(crate) fn stored_command(
    result: Option<serde_json::Value>,
    fingerprint: Option<String>,
    expired: bool,
) -> Result<Option<StoredCommand>, StoreError> {
    let Some(result) = result else {
        return Ok(None);
    };
    let result = serde_json::from_value(result).map_err(|e| StoreError::Internal(e.to_string()))?;
    Ok(Some(StoredCommand {
        result,
        fingerprint,
        expired,
    }))
}

/// Metadata as stored by cqrs-es: a flat map of strings.
pub(crate) fn metadata_value(metadata: &EventMetadata) -> serde_json::Value {
    serde_json::to_value(metadata).unwrap_or_else(|_| serde_json::json!({}))
}

pub(crate) fn metadata_from_value(value: serde_json::Value) -> EventMetadata {
    // Events written by other tools may carry other keys, or other shapes; keep the
    // strings under the keys we know.
    let serde_json::Value::Object(mut map) = value else {
        return EventMetadata::default();
    };
    let mut take = |k: &str| match map.remove(k) {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    EventMetadata {
        correlation_id: take("correlationId"),
        causation_id: take("causationId"),
        command_id: take("commandId"),
        actor: take("actor"),
        traceparent: take("traceparent"),
    }
}

/// A stored row, as both adapters read it, before it becomes an envelope.
pub(crate) struct StoredEvent {
    pub event_id: Uuid,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
    pub position: Position,
    pub recorded_at: DateTime<Utc>,
}

impl StoredEvent {
    pub(crate) fn into_envelope(self) -> Result<EventEnvelope, StoreError> {
        let aggregate_id = Uuid::parse_str(&self.aggregate_id).map_err(|e| {
            StoreError::Internal(format!("aggregate id {:?}: {e}", self.aggregate_id))
        })?;
        Ok(EventEnvelope {
            event_id: self.event_id,
            aggregate_type: pcf_domain::AGGREGATE_TYPE.to_owned(),
            aggregate_id,
            sequence: self.sequence as u64,
            position: self.position,
            event_type: self.event_type,
            event_version: self.event_version,
            recorded_at: self.recorded_at,
            metadata: metadata_from_value(self.metadata),
            // Stored payloads are externally tagged by cqrs-es; the envelope carries the inside.
            payload: untag(self.payload),
        })
    }
}

fn untag(payload: serde_json::Value) -> serde_json::Value {
    match payload {
        serde_json::Value::Object(mut map) if map.len() == 1 => {
            let key = map.keys().next().cloned().unwrap_or_default();
            map.remove(&key).unwrap_or(serde_json::Value::Null)
        }
        other => other,
    }
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changing_an_email_releases_the_old_one_before_claiming_the_new() {
        let events = [UserEvent::EmailChanged {
            old_email: "a@x.io".into(),
            new_email: "b@x.io".into(),
            occurred_at: Utc::now(),
        }];
        assert_eq!(
            email_changes(&events),
            vec![EmailChange::Release("a@x.io"), EmailChange::Claim("b@x.io")]
        );
    }

    #[test]
    fn metadata_round_trips_through_the_stored_map() {
        let m = EventMetadata {
            correlation_id: Some("c".into()),
            causation_id: None,
            command_id: Some("k".into()),
            actor: Some("u".into()),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        };
        assert_eq!(metadata_from_value(metadata_value(&m)), m);
    }

    /// Each adapter is the whole store, and the whole store is each role (as the wiring
    /// hands it out); every role is a trait object that can cross threads.
    #[test]
    fn the_whole_store_is_every_role() {
        fn whole<T: EventStore>() {}
        whole::<postgres::PostgresStore>();
        whole::<sqlite::SqliteStore>();

        fn shared<T: Send + Sync + ?Sized>() {}
        shared::<dyn CommandStore>();
        shared::<dyn RelayStore>();
        shared::<dyn CommitFeed>();
        shared::<dyn StoreHealth>();
        shared::<dyn EventStore>();

        // What the wiring does with the store it opened: no conversion written out.
        fn wire(store: Arc<dyn EventStore>, publisher: Arc<dyn pcf_domain::ports::EventPublisher>) {
            let observer = Arc::new(pcf_domain::ports::NoopObserver);
            let _ = crate::CommandService::new(store.clone(), observer);
            let _ = crate::Relay::new(store.clone(), publisher, crate::RelayConfig::default());
            let _: Arc<dyn CommitFeed> = store.clone();
            let _: Arc<dyn StoreHealth> = store.clone();
            let _: Arc<dyn EventLog> = store.clone();
            let _: Arc<dyn EmailDirectory> = store;
        }
        let _ = wire;
    }

    /// Each role, taken from the whole store, reaches the adapter's own methods.
    #[tokio::test]
    async fn each_role_of_the_whole_store_reaches_the_adapter() {
        let path = std::env::temp_dir().join(format!("pcf-roles-{}.db", Uuid::new_v4()));
        let store: Arc<dyn EventStore> =
            Arc::new(sqlite::SqliteStore::open(&path).await.expect("opening"));

        let health: Arc<dyn StoreHealth> = store.clone();
        health.ping().await.expect("ping");
        let feed: Arc<dyn CommitFeed> = store.clone();
        feed.watch_commits().await.expect("watching commits");
        let commits = feed.commits();
        let relay: Arc<dyn RelayStore> = store.clone();
        let mut lease = relay.try_lead("roles").await.expect("leading");
        assert!(lease.as_mut().expect("the sole writer leads").alive().await);
        let commands: Arc<dyn CommandStore> = store.clone();
        assert!(
            commands.find_command("none").await.is_err(),
            "no schema here"
        );
        // The methods of every role are callable on the whole store, as the wiring calls them.
        store.ping().await.expect("ping");
        assert!(!commits.has_changed().expect("the feed is open"));

        drop((health, feed, relay, commands, store));
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
    }
}
