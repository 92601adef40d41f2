//! Port traits: what the domain and the read side need from the outside world. The embedded
//! and cluster modes are two sets of adapters behind these. Also `LogPages`, the one way to
//! page through the log (catch-up, rebuilds, live tails), written against `EventLog` alone.

use async_trait::async_trait;
use std::sync::Arc;
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

impl LogQuery {
    /// What `EventLog::read` answers this query with from `log`, the whole log in position
    /// order (as a log kept in memory holds it): the events after `after`, of the user and
    /// the types asked for, at most `limit` of them.
    pub fn select(&self, log: &[EventEnvelope]) -> Vec<EventEnvelope> {
        let after = self.after.unwrap_or(Position::START);
        log.iter()
            .filter(|e| e.position > after)
            .filter(|e| self.aggregate_id.is_none_or(|id| id == e.aggregate_id))
            .filter(|e| self.types.is_empty() || self.types.contains(&e.event_type))
            .take(self.limit)
            .cloned()
            .collect()
    }
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

/// The log read page after page in commit order, from a position on: each `next_page` reads
/// the next events after the last one read, at most `page_size` of them (only those of one
/// user or of some types, if asked). An empty page means the log holds nothing further for
/// now; calling again later reads on from the same place, so the same pager serves a
/// catch-up (read until a page is empty), a rebuild and a tail that follows the log.
/// A failed read moves nothing: calling again retries the same page.
pub struct LogPages {
    log: Arc<dyn EventLog>,
    query: LogQuery,
}

impl LogPages {
    /// Pages of at most `page_size` events (at least one) after `after`
    /// (`Position::START`: the whole log).
    pub fn new(log: Arc<dyn EventLog>, after: Position, page_size: usize) -> Self {
        Self {
            log,
            query: LogQuery {
                after: Some(after),
                limit: page_size.max(1),
                ..LogQuery::default()
            },
        }
    }

    /// Only this user's events.
    pub fn of_user(mut self, id: Uuid) -> Self {
        self.query.aggregate_id = Some(id);
        self
    }

    /// Only events of these types (all when empty).
    pub fn of_types(mut self, types: Vec<String>) -> Self {
        self.query.types = types;
        self
    }

    /// The position the next page starts after: that of the last event read, or the start
    /// given to `new` while nothing was read.
    pub fn position(&self) -> Position {
        self.query.after.unwrap_or(Position::START)
    }

    /// The most events a page holds. A page shorter than this was the end of the log when it
    /// was read.
    pub fn page_size(&self) -> usize {
        self.query.limit
    }

    /// The next page of whole envelopes (`EventLog::read`).
    pub async fn next_page(&mut self) -> Result<Vec<EventEnvelope>, PortError> {
        let page = self.log.read(&self.query).await?;
        self.advance(page.last().map(|e| e.position));
        Ok(page)
    }

    /// The next page as a fold needs it (`EventLog::read_changes`: a store may read less).
    pub async fn next_changes(&mut self) -> Result<Vec<Change>, PortError> {
        let page = self.log.read_changes(&self.query).await?;
        self.advance(page.last().map(|e| e.position));
        Ok(page)
    }

    fn advance(&mut self, last: Option<Position>) {
        if let Some(last) = last {
            self.query.after = Some(last);
        }
    }
}

/// An event of the log as a fold needs it.
#[derive(Debug, Clone)]
pub struct Change {
    pub event_id: Uuid,
    pub aggregate_id: Uuid,
    pub sequence: u64,
    pub position: Position,
    /// The event, or why its payload does not decode. While `sealed` holds its personal
    /// fields, they are empty here.
    pub event: Result<UserEvent, String>,
    /// Its personal fields, sealed (`envelope::SEALED`), until opened.
    pub sealed: Option<String>,
    /// Its personal fields are erased (`envelope::ERASED`): its user's key is gone.
    pub erased: bool,
}

impl Change {
    pub fn of(envelope: &EventEnvelope) -> Self {
        Self {
            event_id: envelope.event_id,
            aggregate_id: envelope.aggregate_id,
            sequence: envelope.sequence,
            position: envelope.position,
            event: envelope.event().map_err(|e| e.to_string()),
            sealed: envelope
                .payload
                .get(crate::envelope::SEALED)
                .and_then(|s| s.as_str())
                .map(str::to_owned),
            erased: envelope.is_erased(),
        }
    }

    /// The event, its sealed personal fields and whether they are erased, decoded from a
    /// stored payload (`{"UserCreated": {…}}`, the externally tagged form of `UserEvent`)
    /// without a JSON value in between.
    pub fn decode_stored(json: &[u8]) -> (Result<UserEvent, String>, Option<String>, bool) {
        /// What a payload says beside the event's own fields.
        #[derive(serde::Deserialize)]
        struct Marks {
            sealed: Option<String>,
            #[serde(default)]
            erased: bool,
        }
        let event: Result<UserEvent, String> =
            serde_json::from_slice(json).map_err(|e| e.to_string());
        // Only the types with personal fields can have them sealed or erased.
        if !matches!(&event, Ok(e) if e.has_personal_fields()) {
            return (event, None, false);
        }
        match serde_json::from_slice::<FirstValue<Marks>>(json) {
            Ok(FirstValue(Some(marks))) => (event, marks.sealed, marks.erased),
            Ok(FirstValue(None)) => (event, None, false),
            Err(e) => (Err(e.to_string()), None, false),
        }
    }
}

/// The value of a JSON object's first entry, the rest skipped: the body of an externally
/// tagged enum, read without allocating its tag or a map.
struct FirstValue<T>(Option<T>);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for FirstValue<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, Visitor};
        struct First<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> Visitor<'de> for First<T> {
            type Value = FirstValue<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let first = match map.next_key::<IgnoredAny>()? {
                    Some(_) => Some(map.next_value::<T>()?),
                    None => None,
                };
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(FirstValue(first))
            }
        }
        deserializer.deserialize_map(First(std::marker::PhantomData))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::EventMetadata;
    use std::sync::Mutex;

    /// A stored payload decodes into its event (sealed personal fields empty), the sealed
    /// text and the erased mark, and `fill_personal` puts opened fields back.
    #[test]
    fn stored_payloads_decode_with_their_marks() {
        let at = "2026-01-02T03:04:05Z";
        let id = Uuid::nil();
        let sealed = serde_json::json!({"UserCreated": {
            "userId": id, "bio": null, "sealed": "c2VhbGVk", "occurredAt": at}});
        let (event, text, erased) = Change::decode_stored(sealed.to_string().as_bytes());
        let mut event = event.unwrap();
        assert_eq!((text.as_deref(), erased), (Some("c2VhbGVk"), false));
        assert!(matches!(&event, UserEvent::UserCreated { email, .. } if email.is_empty()));
        event.fill_personal(crate::events::PersonalFields {
            email: Some("a@example.com".into()),
            display_name: Some("A".into()),
            bio: Some("hi".into()),
            ..Default::default()
        });
        assert!(
            matches!(&event, UserEvent::UserCreated { email, display_name, bio, avatar_url, .. }
            if email == "a@example.com" && display_name == "A" && bio.as_deref() == Some("hi")
                && avatar_url.is_none())
        );

        let erased = serde_json::json!({"EmailChanged": {"erased": true, "occurredAt": at}});
        let (event, text, is_erased) = Change::decode_stored(erased.to_string().as_bytes());
        assert!(event.is_ok() && text.is_none() && is_erased);

        let deleted = serde_json::json!({"AccountDeleted": {"occurredAt": at}});
        let (event, text, is_erased) = Change::decode_stored(deleted.to_string().as_bytes());
        assert!(event.is_ok() && text.is_none() && !is_erased);

        let (event, text, _) = Change::decode_stored(br#"{"Nonsense": 1}"#);
        assert!(event.is_err() && text.is_none());
        // The same payload read through an envelope gives the same change.
        let envelope = EventEnvelope {
            event_id: id,
            aggregate_type: "User".into(),
            aggregate_id: id,
            sequence: 1,
            position: Position::START,
            event_type: "UserCreated".into(),
            event_version: "2".into(),
            recorded_at: chrono::Utc::now(),
            metadata: EventMetadata::default(),
            payload: sealed["UserCreated"].clone(),
        };
        let of = Change::of(&envelope);
        let (event, text, erased) = Change::decode_stored(sealed.to_string().as_bytes());
        assert_eq!((of.event, of.sealed, of.erased), (event, text, erased));
    }

    /// A log in memory: `read` answers in position order; the next read fails when asked.
    #[derive(Default)]
    struct MemoryLog {
        events: Mutex<Vec<EventEnvelope>>,
        fail_next: Mutex<bool>,
        reads: Mutex<Vec<LogQuery>>,
    }

    impl MemoryLog {
        fn append(&self, user: Uuid, event_type: &str) -> Position {
            let mut events = self.events.lock().unwrap();
            let n = events.len() as u64 + 1;
            // Commit order is not global order: positions compare by commit first.
            let position = Position::new(n, 1000 - n);
            events.push(EventEnvelope {
                event_id: Uuid::now_v7(),
                aggregate_type: crate::AGGREGATE_TYPE.to_owned(),
                aggregate_id: user,
                sequence: n,
                position,
                event_type: event_type.to_owned(),
                event_version: "1".to_owned(),
                recorded_at: chrono::Utc::now(),
                metadata: EventMetadata::default(),
                payload: serde_json::json!({}),
            });
            position
        }
    }

    #[async_trait]
    impl EventLog for MemoryLog {
        async fn read(&self, q: &LogQuery) -> Result<Vec<EventEnvelope>, PortError> {
            self.reads.lock().unwrap().push(q.clone());
            if std::mem::take(&mut *self.fail_next.lock().unwrap()) {
                return Err(PortError::Unavailable("down".into()));
            }
            Ok(q.select(&self.events.lock().unwrap()))
        }

        async fn user_events(&self, _: Uuid, _: u64) -> Result<Vec<EventEnvelope>, PortError> {
            Ok(Vec::new())
        }
    }

    fn positions(page: &[EventEnvelope]) -> Vec<Position> {
        page.iter().map(|e| e.position).collect()
    }

    #[tokio::test]
    async fn pages_cover_the_log_once_in_order_across_page_boundaries() {
        let log = Arc::new(MemoryLog::default());
        let user = Uuid::now_v7();
        let all: Vec<Position> = (0..7).map(|_| log.append(user, "A")).collect();
        let mut pages = LogPages::new(log.clone(), Position::START, 3);
        assert_eq!(pages.page_size(), 3);
        assert_eq!(positions(&pages.next_page().await.unwrap()), all[0..3]);
        assert_eq!(pages.position(), all[2]);
        assert_eq!(positions(&pages.next_page().await.unwrap()), all[3..6]);
        // A short page: the end of the log as it was read.
        assert_eq!(positions(&pages.next_page().await.unwrap()), all[6..7]);
        assert!(pages.next_page().await.unwrap().is_empty());
        assert_eq!(pages.position(), all[6]);
        // The log grows: the same pager reads on from where it stopped.
        let later = log.append(user, "A");
        assert_eq!(positions(&pages.next_page().await.unwrap()), [later]);
        // Every read asked for one page after the last event read.
        let reads = log.reads.lock().unwrap();
        assert!(reads.iter().all(|q| q.limit == 3));
        assert_eq!(reads[1].after, Some(all[2]));
    }

    #[tokio::test]
    async fn pages_start_after_a_position_and_a_failed_read_moves_nothing() {
        let log = Arc::new(MemoryLog::default());
        let user = Uuid::now_v7();
        let all: Vec<Position> = (0..5).map(|_| log.append(user, "A")).collect();
        let mut pages = LogPages::new(log.clone(), all[1], 2);
        assert_eq!(pages.position(), all[1]);
        *log.fail_next.lock().unwrap() = true;
        assert!(pages.next_changes().await.is_err());
        assert_eq!(pages.position(), all[1]);
        let changes = pages.next_changes().await.unwrap();
        let got: Vec<Position> = changes.iter().map(|c| c.position).collect();
        assert_eq!(got, all[2..4]);
        assert_eq!(positions(&pages.next_page().await.unwrap()), all[4..5]);
    }

    #[tokio::test]
    async fn pages_of_one_user_or_some_types_hold_only_those() {
        let log = Arc::new(MemoryLog::default());
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut of_a = Vec::new();
        let mut of_x = Vec::new();
        for i in 0..9 {
            let (user, kind) = if i % 3 == 0 { (a, "X") } else { (b, "Y") };
            let p = log.append(user, kind);
            if user == a {
                of_a.push(p);
            }
            if kind == "X" {
                of_x.push(p);
            }
        }
        let mut pages = LogPages::new(log.clone(), Position::START, 2).of_user(a);
        let mut got = positions(&pages.next_page().await.unwrap());
        got.extend(positions(&pages.next_page().await.unwrap()));
        assert!(pages.next_page().await.unwrap().is_empty());
        assert_eq!(got, of_a);
        let mut pages = LogPages::new(log, Position::START, 10).of_types(vec!["X".into()]);
        assert_eq!(positions(&pages.next_page().await.unwrap()), of_x);
    }
}
