//! Fakes for the unit tests of this crate: a log in memory, users' event histories, memory
//! views that fail or race as batches open and keep the checkpoints committed, and user keys
//! in memory that seal events and open, erase or fail them.

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use pcf_adapters::keys::{Opener, Unopened};
use pcf_adapters::personal::{self, DataKey};
use pcf_domain::ports::{EventLog, LogQuery, PortError};
use pcf_domain::{EventEnvelope, EventMetadata, Position, UserEvent, UserView};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use uuid::Uuid;

use crate::memory::MemoryUserViews;
use crate::store::{GenerationState, Offsets, Scope, ViewBatch, ViewStore, Written};

/// A log in memory, in position order; counts the reads of one user's events.
#[derive(Default)]
pub struct MemoryLog {
    events: Mutex<Vec<EventEnvelope>>,
    pub user_reads: AtomicUsize,
}

impl MemoryLog {
    /// A log of `events`, given in commit order.
    pub fn of(events: Vec<EventEnvelope>) -> Self {
        let log = Self::default();
        log.append(events);
        log
    }

    /// Appends events, in commit order: each gets the next position.
    pub fn append(&self, events: Vec<EventEnvelope>) {
        let mut log = self.events.lock().unwrap();
        for mut e in events {
            let n = log.len() as u64 + 1;
            e.position = Position::new(n, n);
            log.push(e);
        }
    }

    /// The events as stored (with their positions).
    pub fn events(&self) -> Vec<EventEnvelope> {
        self.events.lock().unwrap().clone()
    }
}

#[async_trait]
impl EventLog for MemoryLog {
    async fn read(&self, q: &LogQuery) -> Result<Vec<EventEnvelope>, PortError> {
        let after = q.after.unwrap_or(Position::START);
        let mut page = self.events();
        page.retain(|e| e.position > after);
        page.truncate(q.limit);
        Ok(page)
    }

    async fn user_events(&self, user: Uuid, after: u64) -> Result<Vec<EventEnvelope>, PortError> {
        self.user_reads.fetch_add(1, Ordering::SeqCst);
        let mut events = self.events();
        events.retain(|e| e.aggregate_id == user && e.sequence > after);
        Ok(events)
    }

    async fn event_count(&self) -> Result<Option<u64>, PortError> {
        Ok(Some(self.events.lock().unwrap().len() as u64))
    }
}

/// Event `sequence` of `user`, at a position made of its sequence (`MemoryLog` sets its own).
pub fn envelope(user: Uuid, sequence: u64, event: UserEvent) -> EventEnvelope {
    let event_type = match &event {
        UserEvent::UserCreated { .. } => "UserCreated",
        UserEvent::ProfileUpdated { .. } => "ProfileUpdated",
        UserEvent::EmailChanged { .. } => "EmailChanged",
        UserEvent::AccountDeleted { .. } => "AccountDeleted",
    };
    EventEnvelope {
        event_id: Uuid::now_v7(),
        aggregate_type: "User".into(),
        aggregate_id: user,
        sequence,
        position: Position::new(sequence, sequence),
        event_type: event_type.into(),
        event_version: "1".into(),
        recorded_at: Utc.timestamp_opt(0, 0).unwrap(),
        metadata: EventMetadata::default(),
        payload: event.payload(),
    }
}

/// A user created with display name "v1", then renamed "v2", ... up to "v`n`".
pub fn history(user: Uuid, n: u64) -> Vec<EventEnvelope> {
    let at = Utc.timestamp_opt(0, 0).unwrap();
    let mut events = vec![envelope(
        user,
        1,
        UserEvent::UserCreated {
            user_id: user,
            email: format!("{user}@example.com"),
            display_name: "v1".into(),
            bio: None,
            avatar_url: None,
            occurred_at: at,
        },
    )];
    for seq in 2..=n {
        events.push(envelope(
            user,
            seq,
            UserEvent::ProfileUpdated {
                display_name: format!("v{seq}"),
                bio: None,
                avatar_url: None,
                occurred_at: at,
            },
        ));
    }
    events
}

/// A user's whole life: created (at 1 s) with email `<id>@example.com` and display name
/// "v1", renamed "v2" (2 s), moved to `<id>@example.org` (3 s), deleted (4 s).
pub fn lifetime(user: Uuid) -> Vec<EventEnvelope> {
    let at = |s| Utc.timestamp_opt(s, 0).unwrap();
    vec![
        envelope(
            user,
            1,
            UserEvent::UserCreated {
                user_id: user,
                email: format!("{user}@example.com"),
                display_name: "v1".into(),
                bio: Some("bio".into()),
                avatar_url: None,
                occurred_at: at(1),
            },
        ),
        envelope(
            user,
            2,
            UserEvent::ProfileUpdated {
                display_name: "v2".into(),
                bio: Some("bio 2".into()),
                avatar_url: Some("https://example.com/a.png".into()),
                occurred_at: at(2),
            },
        ),
        envelope(
            user,
            3,
            UserEvent::EmailChanged {
                old_email: format!("{user}@example.com"),
                new_email: format!("{user}@example.org"),
                occurred_at: at(3),
            },
        ),
        envelope(user, 4, UserEvent::AccountDeleted { occurred_at: at(4) }),
    ]
}

/// A payload no event decodes from.
pub fn poisoned(mut event: EventEnvelope) -> EventEnvelope {
    event.payload = serde_json::json!({"nonsense": true});
    event
}

/// The memory views, troubled as batches open: the first `failures` opens fail (as when a
/// database restarts), and a generation can be begun right after the next batch opens (a
/// rebuild beginning under a live batch). They keep the offsets each committed batch
/// recorded (the checkpoint a SQL view commits with its rows).
pub struct InterferingViews {
    /// The views batches are opened on.
    pub views: MemoryUserViews,
    /// How many more batches fail to open.
    pub failures: AtomicU64,
    /// The generation to begin right after the next batch opens, once.
    begin_after_open: Mutex<Option<u64>>,
    /// The offsets of each batch committed, in order.
    pub checkpoints: Mutex<Vec<Vec<(i32, i64)>>>,
}

impl InterferingViews {
    /// Empty views whose first `failures` batches fail to open.
    pub fn failing_to_open(failures: u64) -> Self {
        Self {
            views: MemoryUserViews::new(),
            failures: AtomicU64::new(failures),
            begin_after_open: Mutex::new(None),
            checkpoints: Mutex::new(Vec::new()),
        }
    }

    /// Empty views that begin `generation` right after the first batch opens.
    pub fn beginning_after_open(generation: u64) -> Self {
        Self {
            begin_after_open: Mutex::new(Some(generation)),
            ..Self::failing_to_open(0)
        }
    }
}

#[async_trait]
impl ViewStore for InterferingViews {
    fn name(&self) -> &str {
        "interfering"
    }

    async fn state(&self) -> Result<GenerationState, PortError> {
        self.views.state().await
    }

    async fn begin(&self, generation: u64) -> Result<(), PortError> {
        self.views.begin(generation).await
    }

    async fn switch(&self, generation: u64) -> Result<(), PortError> {
        self.views.switch(generation).await
    }

    async fn drop_generation(&self, generation: u64) -> Result<(), PortError> {
        self.views.drop_generation(generation).await
    }

    async fn open(&self, scope: Scope) -> Result<Box<dyn ViewBatch + '_>, PortError> {
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(PortError::Unavailable("restarting".into()));
        }
        let batch = self.views.open(scope).await?;
        let begin = self.begin_after_open.lock().unwrap().take();
        if let Some(generation) = begin {
            self.views.begin(generation).await?;
        }
        Ok(Box::new(Checkpointing {
            batch,
            checkpoints: &self.checkpoints,
        }))
    }
}

/// A batch of the memory views that records the offsets it commits.
struct Checkpointing<'a> {
    batch: Box<dyn ViewBatch + 'a>,
    checkpoints: &'a Mutex<Vec<Vec<(i32, i64)>>>,
}

#[async_trait]
impl ViewBatch for Checkpointing<'_> {
    fn generations(&self) -> &[u64] {
        self.batch.generations()
    }

    async fn load(
        &mut self,
        generation: u64,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, UserView>, PortError> {
        self.batch.load(generation, ids).await
    }

    async fn replace(
        &mut self,
        generation: u64,
        changes: &[(Option<UserView>, UserView)],
    ) -> Result<Written, PortError> {
        self.batch.replace(generation, changes).await
    }

    async fn write_newer(
        &mut self,
        generation: u64,
        states: &[UserView],
    ) -> Result<Vec<bool>, PortError> {
        self.batch.write_newer(generation, states).await
    }

    async fn commit(self: Box<Self>, offsets: &Offsets) -> Result<(), PortError> {
        self.batch.commit(offsets).await?;
        self.checkpoints.lock().unwrap().push(offsets.to_vec());
        Ok(())
    }
}

/// Users' data keys in memory, an `Opener` as `pcf_adapters::keys::Keys` is one: it seals
/// events with real keys (`seal`), opens them with the user's key, erases those of a user
/// whose key was destroyed with the account (`delete_account`), and leaves unopened those
/// altered (`tamper`) or of a live user whose key is missing (`lose_key`). Calls fail as a
/// key table that is down when told (`fail`). Every call's size is kept.
#[derive(Default)]
pub struct FakeKeys {
    keys: Mutex<HashMap<Uuid, DataKey>>,
    deleted: Mutex<HashSet<Uuid>>,
    /// From which call on (counted from the first) calls fail, and how many more.
    outage: Mutex<(usize, u64)>,
    /// How many events each call was given, in order (failed calls included).
    pub calls: Mutex<Vec<usize>>,
}

impl FakeKeys {
    /// `event` sealed with its user's key (made at the user's first event): version "2",
    /// its personal fields in `sealed`.
    pub fn seal(&self, mut event: EventEnvelope) -> EventEnvelope {
        let mut keys = self.keys.lock().unwrap();
        let key = keys
            .entry(event.aggregate_id)
            .or_insert_with(DataKey::generate);
        let aad = personal::event_aad(event.aggregate_id, event.sequence, &event.event_type);
        personal::seal_payload(&mut event.payload, key, &aad);
        event.event_version = personal::SEALED_VERSION.into();
        event
    }

    /// `events`, each sealed.
    pub fn seal_all(&self, events: Vec<EventEnvelope>) -> Vec<EventEnvelope> {
        events.into_iter().map(|e| self.seal(e)).collect()
    }

    /// The user's account is deleted: its key is destroyed.
    pub fn delete_account(&self, user: Uuid) {
        self.keys.lock().unwrap().remove(&user);
        self.deleted.lock().unwrap().insert(user);
    }

    /// A live user's key is missing (the key table lost it).
    pub fn lose_key(&self, user: Uuid) {
        self.keys.lock().unwrap().remove(&user);
    }

    /// After the next `after` calls, `times` calls fail (the key table is down).
    pub fn fail(&self, after: usize, times: u64) {
        *self.outage.lock().unwrap() = (self.calls().len() + after, times);
    }

    /// How many events each call was given, in order (failed calls included).
    pub fn calls(&self) -> Vec<usize> {
        self.calls.lock().unwrap().clone()
    }
}

/// `event` with its sealed personal data altered: it no longer opens.
pub fn tamper(mut event: EventEnvelope) -> EventEnvelope {
    let sealed = event.payload[personal::SEALED]
        .as_str()
        .expect("a sealed event")
        .to_owned();
    let mut bytes = sealed.into_bytes();
    // A character of the ciphertext changed (past the nonce), still base64.
    bytes[30] = if bytes[30] == b'A' { b'B' } else { b'A' };
    event.payload[personal::SEALED] = String::from_utf8(bytes).unwrap().into();
    event
}

#[async_trait]
impl Opener for FakeKeys {
    async fn open(&self, events: &mut [EventEnvelope]) -> Result<Vec<Unopened>, PortError> {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(events.len());
            calls.len() - 1
        };
        {
            let mut outage = self.outage.lock().unwrap();
            if call >= outage.0 && outage.1 > 0 {
                outage.1 -= 1;
                return Err(PortError::Unavailable("the key table is down".into()));
            }
        }
        let keys = self.keys.lock().unwrap().clone();
        let deleted = self.deleted.lock().unwrap().clone();
        let mut unopened = Vec::new();
        for (index, event) in events.iter_mut().enumerate() {
            if !personal::is_sealed(&event.payload) {
                continue;
            }
            let user = event.aggregate_id;
            let aad = personal::event_aad(user, event.sequence, &event.event_type);
            let outcome = match keys.get(&user) {
                Some(key) => personal::open_payload(&mut event.payload, Some(key), &aad)
                    .map_err(|e| e.to_string()),
                None if deleted.contains(&user) => {
                    personal::erase_payload(&mut event.payload);
                    Ok(())
                }
                None => Err(format!("no data key for the live user {user}")),
            };
            if let Err(reason) = outcome {
                unopened.push(Unopened {
                    index,
                    event_id: event.event_id,
                    reason,
                });
            }
        }
        Ok(unopened)
    }
}
