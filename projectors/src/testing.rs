//! Fakes for the unit tests of this crate: a log in memory, users' event histories, and
//! memory views that fail or race as batches open.

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use pcf_domain::ports::{EventLog, LogQuery, PortError};
use pcf_domain::{EventEnvelope, EventMetadata, Position, UserEvent};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use uuid::Uuid;

use crate::memory::MemoryUserViews;
use crate::store::{GenerationState, Scope, ViewBatch, ViewStore};

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

/// A payload no event decodes from.
pub fn poisoned(mut event: EventEnvelope) -> EventEnvelope {
    event.payload = serde_json::json!({"nonsense": true});
    event
}

/// The memory views, troubled as batches open: the first `failures` opens fail (as when a
/// database restarts), and a generation can be begun right after the next batch opens (a
/// rebuild beginning under a live batch).
pub struct InterferingViews {
    /// The views batches are opened on.
    pub views: MemoryUserViews,
    /// How many more batches fail to open.
    pub failures: AtomicU64,
    /// The generation to begin right after the next batch opens, once.
    begin_after_open: Mutex<Option<u64>>,
}

impl InterferingViews {
    /// Empty views whose first `failures` batches fail to open.
    pub fn failing_to_open(failures: u64) -> Self {
        Self {
            views: MemoryUserViews::new(),
            failures: AtomicU64::new(failures),
            begin_after_open: Mutex::new(None),
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
        Ok(batch)
    }
}
