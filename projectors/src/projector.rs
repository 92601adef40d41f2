//! The user projection, written once against a view writer; each read model is an adapter.

use async_trait::async_trait;
use pcf_domain::ports::{EventLog, LogQuery, PortError};
use pcf_domain::{EventEnvelope, Position, UserView};
use std::collections::{HashMap, HashSet};
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

    /// The current views of several users (missing ones left out). Adapters override this
    /// to read them in one round trip.
    async fn current_many(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, UserView>, PortError> {
        let mut found = HashMap::with_capacity(ids.len());
        for id in ids {
            if let Some(view) = self.current(*id).await? {
                found.insert(*id, view);
            }
        }
        Ok(found)
    }

    /// Writes whole states (one per user, distinct ids) in one round trip where the store
    /// can decide by version by itself; answers, for each in order, whether it is settled:
    /// written, or the stored view already at or past it. The unsettled ones go the
    /// guarded way (`current_many`, then `replace_many`). By default none is settled.
    async fn write_newer(&self, states: &[UserView]) -> Result<Vec<bool>, PortError> {
        Ok(vec![false; states.len()])
    }

    /// `replace` for several users (distinct ids), answering for each in order. Adapters
    /// override this to write them in one round trip.
    async fn replace_many(
        &self,
        changes: &[(Option<UserView>, UserView)],
    ) -> Result<Vec<bool>, PortError> {
        let mut written = Vec::with_capacity(changes.len());
        for (previous, next) in changes {
            written.push(self.replace(previous.as_ref(), next).await?);
        }
        Ok(written)
    }
}

/// A log with nothing in it, for writers that need none (whole states are written).
struct NoLog;

#[async_trait]
impl EventLog for NoLog {
    async fn read(&self, _: &LogQuery) -> Result<Vec<EventEnvelope>, PortError> {
        Ok(Vec::new())
    }

    async fn user_events(&self, _: Uuid, _: u64) -> Result<Vec<EventEnvelope>, PortError> {
        Ok(Vec::new())
    }
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

    /// A projector for writing whole states (`apply_states`), which needs no log.
    pub(crate) fn without_log(writer: Arc<dyn UserViewWriter>) -> Self {
        Self::new(writer, Arc::new(NoLog))
    }

    /// Writes `changes` (each guarded by its previous state); returns the users whose
    /// write was refused because another writer moved their view first.
    async fn refused(
        &self,
        changes: &[(Option<UserView>, UserView)],
    ) -> Result<HashSet<Uuid>, ProjectionError> {
        let written = self
            .writer
            .replace_many(changes)
            .await
            .map_err(ProjectionError::View)?;
        Ok(changes
            .iter()
            .zip(written)
            .filter(|(_, ok)| !ok)
            .map(|((_, next), _)| next.id)
            .collect())
    }

    /// Applies a batch, in order. Safe to repeat: events at or below a user's version are
    /// skipped. The users of the batch are read at once, folded in memory and written at
    /// once (each write guarded by the version it was folded from); a user with a gap, or
    /// whose view another writer moved meanwhile, goes through the event-by-event path.
    pub async fn apply_batch(&self, events: &[EventEnvelope]) -> Result<(), ProjectionError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<Uuid> = Vec::new();
        let mut seen = HashSet::new();
        for e in events {
            if seen.insert(e.aggregate_id) {
                ids.push(e.aggregate_id);
            }
        }
        let stored = self
            .writer
            .current_many(&ids)
            .await
            .map_err(ProjectionError::View)?;
        let mut working: HashMap<Uuid, Option<UserView>> = ids
            .iter()
            .map(|id| (*id, stored.get(id).cloned()))
            .collect();
        let mut slow: HashSet<Uuid> = HashSet::new();
        for e in events {
            let id = e.aggregate_id;
            if slow.contains(&id) {
                continue;
            }
            let current = working.get(&id).cloned().flatten();
            let last = current.as_ref().map_or(0, |v| v.version);
            if e.sequence <= last {
                continue;
            }
            if e.sequence == last + 1 {
                let next = fold(current, e)?;
                working.insert(id, Some(next));
            } else {
                slow.insert(id);
            }
        }
        let changes: Vec<(Option<UserView>, UserView)> = ids
            .iter()
            .filter(|id| !slow.contains(id))
            .filter_map(|id| {
                let folded = working.get(id).cloned().flatten()?;
                let original = stored.get(id).cloned();
                (original.as_ref().map(|o| o.version) != Some(folded.version))
                    .then_some((original, folded))
            })
            .collect();
        slow.extend(self.refused(&changes).await?);
        for e in events.iter().filter(|e| slow.contains(&e.aggregate_id)) {
            self.apply(e).await?;
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

    /// Writes users' states folded elsewhere (one per user) where the view is behind them;
    /// a view already at or past a state keeps its own. What the writer cannot settle at
    /// once (`write_newer`) is written guarded by the version read just before, and read
    /// again when another writer got there first.
    pub async fn apply_states(&self, states: &[UserView]) -> Result<(), ProjectionError> {
        let settled = self
            .writer
            .write_newer(states)
            .await
            .map_err(ProjectionError::View)?;
        let mut todo: Vec<&UserView> = states
            .iter()
            .zip(settled)
            .filter(|(_, settled)| !settled)
            .map(|(state, _)| state)
            .collect();
        for _ in 0..MAX_RACES {
            if todo.is_empty() {
                return Ok(());
            }
            let ids: Vec<Uuid> = todo.iter().map(|s| s.id).collect();
            let stored = self
                .writer
                .current_many(&ids)
                .await
                .map_err(ProjectionError::View)?;
            let changes: Vec<(Option<UserView>, UserView)> = todo
                .iter()
                .filter_map(|state| {
                    let previous = stored.get(&state.id).cloned();
                    (previous.as_ref().map_or(0, |p| p.version) < state.version)
                        .then(|| (previous, (*state).clone()))
                })
                .collect();
            let lost = self.refused(&changes).await?;
            todo.retain(|state| lost.contains(&state.id));
        }
        Err(ProjectionError::View(PortError::Unavailable(format!(
            "{} users kept changing while their folded states were written",
            todo.len()
        ))))
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

pub(crate) fn fold(
    current: Option<UserView>,
    envelope: &EventEnvelope,
) -> Result<UserView, ProjectionError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryUserViews;
    use chrono::{TimeZone, Utc};
    use pcf_domain::ports::LogQuery;
    use pcf_domain::{EventMetadata, UserEvent};

    /// A log of fixed events.
    struct FixedLog(Vec<EventEnvelope>);

    #[async_trait]
    impl EventLog for FixedLog {
        async fn read(&self, _: &LogQuery) -> Result<Vec<EventEnvelope>, PortError> {
            Ok(self.0.clone())
        }

        async fn user_events(
            &self,
            user: Uuid,
            after: u64,
        ) -> Result<Vec<EventEnvelope>, PortError> {
            Ok(self
                .0
                .iter()
                .filter(|e| e.aggregate_id == user && e.sequence > after)
                .cloned()
                .collect())
        }
    }

    fn envelope(user: Uuid, sequence: u64, event: UserEvent) -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::now_v7(),
            aggregate_type: "User".into(),
            aggregate_id: user,
            sequence,
            position: Position::new(sequence, sequence),
            event_type: type_name(&event),
            event_version: "1".into(),
            recorded_at: Utc.timestamp_opt(0, 0).unwrap(),
            metadata: EventMetadata::default(),
            payload: event.payload(),
        }
    }

    fn type_name(event: &UserEvent) -> String {
        match event {
            UserEvent::UserCreated { .. } => "UserCreated",
            UserEvent::ProfileUpdated { .. } => "ProfileUpdated",
            UserEvent::EmailChanged { .. } => "EmailChanged",
            UserEvent::AccountDeleted { .. } => "AccountDeleted",
        }
        .into()
    }

    fn history(user: Uuid, n: u64) -> Vec<EventEnvelope> {
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

    #[tokio::test]
    async fn a_batch_with_duplicates_and_a_gap_ends_at_the_log() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let (log_a, log_b) = (history(a, 4), history(b, 3));
        let mut all = log_a.clone();
        all.extend(log_b.clone());
        let views = Arc::new(MemoryUserViews::new());
        let projector = UserProjector::new(views.clone(), Arc::new(FixedLog(all)));
        // a: 1, 2, 2 (duplicate), 4 (gap: 3 missing); b: 1, 2, 3, 1 (duplicate).
        let batch = vec![
            log_a[0].clone(),
            log_b[0].clone(),
            log_a[1].clone(),
            log_a[1].clone(),
            log_b[1].clone(),
            log_a[3].clone(),
            log_b[2].clone(),
            log_b[0].clone(),
        ];
        projector.apply_batch(&batch).await.unwrap();
        let va = views.current(a).await.unwrap().unwrap();
        let vb = views.current(b).await.unwrap().unwrap();
        assert_eq!((va.version, va.display_name.as_str()), (4, "v4"));
        assert_eq!((vb.version, vb.display_name.as_str()), (3, "v3"));
        // Applying the same batch again changes nothing.
        projector.apply_batch(&batch).await.unwrap();
        assert_eq!(views.current(a).await.unwrap().unwrap(), va);
    }

    #[tokio::test]
    async fn folded_states_replace_older_views_and_leave_newer_ones() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let views = Arc::new(MemoryUserViews::new());
        let projector = UserProjector::new(views.clone(), Arc::new(FixedLog(Vec::new())));
        // a is at version 4 in the view already; b is not there.
        projector.apply_batch(&history(a, 4)).await.unwrap();
        let fold_all = |events: Vec<EventEnvelope>| {
            events
                .iter()
                .try_fold(None, |view, e| fold(view, e).map(Some))
                .unwrap()
                .unwrap()
        };
        let a2 = fold_all(history(a, 2));
        let b3 = fold_all(history(b, 3));
        projector.apply_states(&[a2, b3.clone()]).await.unwrap();
        let va = views.current(a).await.unwrap().unwrap();
        assert_eq!((va.version, va.display_name.as_str()), (4, "v4"));
        assert_eq!(views.current(b).await.unwrap().unwrap(), b3);
    }

    #[tokio::test]
    async fn an_event_that_cannot_be_applied_is_named_and_nothing_of_the_batch_is_written() {
        let a = Uuid::now_v7();
        let mut events = history(a, 2);
        events[1].payload = serde_json::json!({"nonsense": true});
        let views = Arc::new(MemoryUserViews::new());
        let projector = UserProjector::new(views.clone(), Arc::new(FixedLog(events.clone())));
        match projector.apply_batch(&events).await {
            Err(ProjectionError::Poison { event_id, .. }) => {
                assert_eq!(event_id, events[1].event_id)
            }
            other => panic!("expected poison, got {other:?}"),
        }
        assert!(views.current(a).await.unwrap().is_none());
    }
}
