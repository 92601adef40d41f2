//! The user projection: what applying the log to a user view means, written once over any
//! view store. Opening events' personal data, folding events into documents, skipping what
//! a document already has, filling a gap from the log, retrying a write another writer
//! raced, and setting aside what can never apply all live here; the stores
//! (`crate::store`) only load and write.
//!
//! Events come sealed (event version "2": their personal fields in `sealed`) from Kafka,
//! the in-process bus and the log alike. Every batch is opened with the projection's
//! `Opener` before it is folded, in one call: a live batch, a gap filled from the log, a
//! rebuild's page. An opened event folds as a plain one; an erased one (its user's key was
//! destroyed with the account) folds into the user's tombstone, whatever its type; one that
//! does not open can never be applied, as an event that does not decode; and the opener
//! failing is a dependency down, as the view store or the log failing.

use pcf_adapters::keys::{Opener, PlainOnly, Unopened};
use pcf_adapters::personal;
use pcf_domain::ports::{Change, EventLog, PortError};
use pcf_domain::{EventEnvelope, UserEvent, UserView};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use crate::retry::Retry;
use crate::store::{Offsets, Scope, ViewBatch, ViewStore, Written};

/// How often one event is retried after losing a race to another writer.
const MAX_RACES: usize = 8;

/// How often a live batch is written again after the generation state moved under it.
const MAX_STATE_MOVES: usize = 8;

/// Why a batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The view store failed (it may answer later).
    #[error("view store: {0}")]
    View(PortError),
    /// The event store failed (it may answer later).
    #[error("event store: {0}")]
    Log(PortError),
    /// The keys that open events' personal data could not be read (they may answer later).
    #[error("personal data keys: {0}")]
    Keys(PortError),
    /// The event can never be applied.
    #[error("event {event_id} cannot be applied: {reason}")]
    Poison {
        /// The event of the batch that cannot be applied.
        event_id: Uuid,
        /// Why, for logs and dead letters.
        reason: String,
    },
}

impl ProjectionError {
    /// Whether retrying later may succeed (a dependency is down), as opposed to an event
    /// that can never be applied.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Poison { .. })
    }
}

/// An event as the projection folds it: an envelope whose personal data is open (or erased),
/// or a reference to one.
pub trait Foldable: Sync {
    /// The event's id.
    fn event_id(&self) -> Uuid;
    /// The user it belongs to.
    fn aggregate_id(&self) -> Uuid;
    /// Its number among the user's events, from 1.
    fn sequence(&self) -> u64;
    /// What to call it in an error: its type, where known.
    fn kind(&self) -> &str;
    /// The event, or why its payload does not decode.
    fn event(&self) -> Result<Cow<'_, UserEvent>, String>;
    /// Whether its personal fields are erased: its user's key was destroyed with the
    /// account.
    fn erased(&self) -> bool;
}

/// A `Change` (`EventLog::read_changes`, the rebuild's read) folds once opened
/// (`Opener::open_changes`): while sealed, its event's personal fields are empty.
impl Foldable for Change {
    fn event_id(&self) -> Uuid {
        self.event_id
    }
    fn aggregate_id(&self) -> Uuid {
        self.aggregate_id
    }
    fn sequence(&self) -> u64 {
        self.sequence
    }
    fn kind(&self) -> &str {
        self.event.as_ref().map_or("event", UserEvent::type_name)
    }
    fn event(&self) -> Result<Cow<'_, UserEvent>, String> {
        if self.sealed.is_some() {
            // Never folded with its personal fields missing.
            return Err("its personal data is sealed (not opened)".into());
        }
        self.event.as_ref().map(Cow::Borrowed).map_err(Clone::clone)
    }
    fn erased(&self) -> bool {
        self.erased
    }
}

impl Foldable for EventEnvelope {
    fn event_id(&self) -> Uuid {
        self.event_id
    }
    fn aggregate_id(&self) -> Uuid {
        self.aggregate_id
    }
    fn sequence(&self) -> u64 {
        self.sequence
    }
    fn kind(&self) -> &str {
        &self.event_type
    }
    fn event(&self) -> Result<Cow<'_, UserEvent>, String> {
        if personal::is_sealed(&self.payload) {
            // Never folded with its personal fields missing.
            return Err("its personal data is sealed (not opened)".into());
        }
        EventEnvelope::event(self)
            .map(Cow::Owned)
            .map_err(|e| e.to_string())
    }
    fn erased(&self) -> bool {
        self.is_erased()
    }
}

impl<E: Foldable + ?Sized> Foldable for &E {
    fn event_id(&self) -> Uuid {
        (**self).event_id()
    }
    fn aggregate_id(&self) -> Uuid {
        (**self).aggregate_id()
    }
    fn sequence(&self) -> u64 {
        (**self).sequence()
    }
    fn kind(&self) -> &str {
        (**self).kind()
    }
    fn event(&self) -> Result<Cow<'_, UserEvent>, String> {
        (**self).event()
    }
    fn erased(&self) -> bool {
        (**self).erased()
    }
}

/// The user after `event`; an event that does not decode, or that needs a view the user
/// does not have, can never be applied. An erased event makes the user's tombstone at its
/// sequence, whatever its type (`UserView::fold_erased`).
pub fn fold<E: Foldable + ?Sized>(
    current: Option<UserView>,
    event: &E,
) -> Result<UserView, ProjectionError> {
    let poison = |reason: String| ProjectionError::Poison {
        event_id: event.event_id(),
        reason,
    };
    let decoded = event.event().map_err(poison)?;
    if event.erased() {
        return Ok(UserView::fold_erased(
            current,
            event.aggregate_id(),
            event.sequence(),
            decoded.occurred_at(),
        ));
    }
    UserView::fold(current, event.aggregate_id(), event.sequence(), &decoded).ok_or_else(|| {
        poison(format!(
            "{} at sequence {} for a user that has no view",
            event.kind(),
            event.sequence()
        ))
    })
}

/// What folding a run of events onto users' states came to.
pub(crate) struct Folded<'e, E> {
    /// Users whose state moved, in the order of their first change.
    pub(crate) changed: Vec<Uuid>,
    /// Users with a gap: an event that does not follow on from their state.
    pub(crate) gapped: HashSet<Uuid>,
    /// The events of gapped users from their gap on, unapplied, in order.
    pub(crate) rest: Vec<&'e E>,
}

/// Folds `events`, in order, onto `states` (a user absent has no view yet): an event at or
/// below a user's version is skipped, the next one folded in place; from an event past the
/// next (a gap) on, that user's events are left in `rest` for the caller to fill from the
/// log. Fails on the first event that can never be applied.
pub(crate) fn fold_run<'e, E: Foldable>(
    states: &mut HashMap<Uuid, UserView>,
    events: &'e [E],
) -> Result<Folded<'e, E>, ProjectionError> {
    let mut folded = Folded {
        changed: Vec::new(),
        gapped: HashSet::new(),
        rest: Vec::new(),
    };
    let mut touched = HashSet::new();
    for e in events {
        let id = e.aggregate_id();
        if !folded.gapped.is_empty() && folded.gapped.contains(&id) {
            folded.rest.push(e);
            continue;
        }
        let last = states.get(&id).map_or(0, |v| v.version);
        if e.sequence() <= last {
            continue;
        }
        if e.sequence() != last + 1 {
            folded.gapped.insert(id);
            folded.rest.push(e);
            continue;
        }
        // Folded in place: the state is taken out of the map, not copied.
        let next = fold(states.remove(&id), e)?;
        states.insert(id, next);
        if touched.insert(id) {
            folded.changed.push(id);
        }
    }
    Ok(folded)
}

/// Whether a batch's writes landed, or must be made again for a new generation state.
#[derive(Debug, PartialEq, Eq)]
enum Landed {
    Yes,
    GenerationsMoved,
}

/// An event that can never be applied, set aside from a live batch (or from a rebuild).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside<T> {
    /// What the caller knows the event by (its Kafka message, say).
    pub source: T,
    /// The event's id.
    pub event_id: Uuid,
    /// Why it cannot be applied.
    pub reason: String,
}

/// A batch of live events on its way into a view, each with what its source knows it by.
/// It is opened once (`Projection::apply_live_batch`), in place. Events that can never be
/// applied, those whose personal data does not open among them, are taken out of it as they
/// are found, to be dead-lettered by the caller (`take_set_aside`).
pub struct LiveBatch<T> {
    events: Vec<EventEnvelope>,
    sources: Vec<T>,
    set_aside: Vec<SetAside<T>>,
    /// Whether `events` are open (nothing pushed since they were opened).
    opened: bool,
}

impl<T> Default for LiveBatch<T> {
    fn default() -> Self {
        Self {
            events: Vec::new(),
            sources: Vec::new(),
            set_aside: Vec::new(),
            opened: false,
        }
    }
}

impl<T> LiveBatch<T> {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an event, in order.
    pub fn push(&mut self, event: EventEnvelope, source: T) {
        self.events.push(event);
        self.sources.push(source);
        self.opened = false;
    }

    /// The events still to apply (opened, once the batch was applied).
    pub fn events(&self) -> &[EventEnvelope] {
        &self.events
    }

    /// How many events are still to apply.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no event is left to apply.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The events set aside since the last call, in the order they were found.
    pub fn take_set_aside(&mut self) -> Vec<SetAside<T>> {
        std::mem::take(&mut self.set_aside)
    }

    /// Sets aside the events the opener could not open (their indexes in `events`), in
    /// order.
    fn set_aside_unopened(&mut self, unopened: Vec<Unopened>) {
        if unopened.is_empty() {
            return;
        }
        let mut reasons: HashMap<usize, Unopened> =
            unopened.into_iter().map(|u| (u.index, u)).collect();
        let events = std::mem::take(&mut self.events);
        let sources = std::mem::take(&mut self.sources);
        for (index, (event, source)) in events.into_iter().zip(sources).enumerate() {
            match reasons.remove(&index) {
                Some(unopened) => self.set_aside.push(SetAside {
                    source,
                    event_id: event.event_id,
                    reason: unopened.reason,
                }),
                None => {
                    self.events.push(event);
                    self.sources.push(source);
                }
            }
        }
    }

    /// Sets the event `event_id` aside; every event when it is not one of the batch (then
    /// nothing of the batch can be trusted to apply). Returns whether events are left.
    fn set_aside(&mut self, event_id: Uuid, reason: String) -> bool {
        match self.events.iter().position(|e| e.event_id == event_id) {
            Some(i) => {
                self.events.remove(i);
                let source = self.sources.remove(i);
                self.set_aside.push(SetAside {
                    source,
                    event_id,
                    reason,
                });
                true
            }
            None => {
                tracing::error!(%event_id, %reason, "unappliable event outside the batch");
                for (event, source) in self.events.drain(..).zip(self.sources.drain(..)) {
                    self.set_aside.push(SetAside {
                        source,
                        event_id: event.event_id,
                        reason: reason.clone(),
                    });
                }
                false
            }
        }
    }
}

/// Opens `events` in place with `opener`, in one call (none when no event is sealed);
/// the events that did not open. The opener failing is a dependency down.
pub(crate) async fn open_events(
    opener: &dyn Opener,
    events: &mut [EventEnvelope],
) -> Result<Vec<Unopened>, ProjectionError> {
    if !events.iter().any(|e| personal::is_sealed(&e.payload)) {
        return Ok(Vec::new());
    }
    opener.open(events).await.map_err(ProjectionError::Keys)
}

/// The user projection over one view store, reading the log where the stream has a gap and
/// opening events' personal data with its opener.
#[derive(Clone)]
pub struct Projection {
    store: Arc<dyn ViewStore>,
    log: Arc<dyn EventLog>,
    opener: Arc<dyn Opener>,
}

impl Projection {
    /// The projection of the log `log` into `store`. It opens no sealed event (`PlainOnly`:
    /// each one is set aside as unappliable) until given an opener (`with_opener`).
    pub fn new(store: Arc<dyn ViewStore>, log: Arc<dyn EventLog>) -> Self {
        Self {
            store,
            log,
            opener: Arc::new(PlainOnly),
        }
    }

    /// This projection opening events' personal data with `opener` (the user keys).
    pub fn with_opener(mut self, opener: Arc<dyn Opener>) -> Self {
        self.opener = opener;
        self
    }

    /// What opens events' personal data.
    pub fn opener(&self) -> &Arc<dyn Opener> {
        &self.opener
    }

    /// The projection's name (its store's, also its Kafka consumer group).
    pub fn name(&self) -> &str {
        self.store.name()
    }

    /// The view store written.
    pub fn store(&self) -> &Arc<dyn ViewStore> {
        &self.store
    }

    /// The log gaps are filled from.
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    /// Opens `events` in place, in one call; the events that did not open.
    async fn open(&self, events: &mut [EventEnvelope]) -> Result<Vec<Unopened>, ProjectionError> {
        open_events(&*self.opener, events).await
    }

    /// `events` opened (a copy, where any is sealed); an event that does not open can never
    /// be applied: the first one is named.
    async fn opened<'e>(
        &self,
        events: &'e [EventEnvelope],
    ) -> Result<Cow<'e, [EventEnvelope]>, ProjectionError> {
        if !events.iter().any(|e| personal::is_sealed(&e.payload)) {
            return Ok(Cow::Borrowed(events));
        }
        let mut events = events.to_vec();
        match self.open(&mut events).await?.into_iter().next() {
            Some(unopened) => Err(ProjectionError::Poison {
                event_id: unopened.event_id,
                reason: unopened.reason,
            }),
            None => Ok(Cow::Owned(events)),
        }
    }

    /// Applies a batch of the live stream to every generation that must have it, recording
    /// `offsets` with it; the batch is opened first. Safe to repeat: what a view has is
    /// skipped.
    pub async fn apply_live(
        &self,
        events: &[EventEnvelope],
        offsets: &Offsets,
    ) -> Result<(), ProjectionError> {
        let events = self.opened(events).await?;
        self.apply_scoped(Scope::Live, &events, offsets).await
    }

    /// `apply_live`, setting aside each event that can never be applied (taken out of
    /// `batch`, see `LiveBatch::take_set_aside`) and applying the rest without it: first
    /// those whose personal data does not open, then those that do not fold. What is left
    /// to apply is left in `batch` when a dependency fails (the opener among them), to be
    /// retried; the batch is opened once.
    pub async fn apply_live_batch<T: Send>(
        &self,
        batch: &mut LiveBatch<T>,
        offsets: &Offsets,
    ) -> Result<(), ProjectionError> {
        if !batch.opened {
            let unopened = self.open(&mut batch.events).await?;
            batch.opened = true;
            batch.set_aside_unopened(unopened);
        }
        loop {
            match self.apply_scoped(Scope::Live, &batch.events, offsets).await {
                Err(ProjectionError::Poison { event_id, reason }) => {
                    if !batch.set_aside(event_id, reason) {
                        return Ok(());
                    }
                }
                other => return other,
            }
        }
    }

    /// Applies events to one generation, recording `offsets` with them; they are opened
    /// first.
    pub async fn apply_to(
        &self,
        generation: u64,
        events: &[EventEnvelope],
        offsets: &Offsets,
    ) -> Result<(), ProjectionError> {
        let events = self.opened(events).await?;
        self.apply_scoped(Scope::Generation(generation), &events, offsets)
            .await
    }

    /// Writes users' states folded elsewhere (a rebuild's; one per user) to one generation
    /// where it is behind them; a view already at or past a state keeps its own.
    pub async fn write_states(
        &self,
        generation: u64,
        states: &[UserView],
    ) -> Result<(), ProjectionError> {
        write_states(&*self.store, generation, states).await
    }

    /// Applies batches from an in-process channel until it closes. An event that can never
    /// be applied is logged and set aside (there is no dead-letter topic in process), the
    /// rest of its batch applied. A batch whose dependency is down (the opener, the log) is
    /// tried again a few times, then logged and left: the next event of one of its users
    /// finds the gap and fills it from the log.
    pub async fn run(self, mut batches: mpsc::UnboundedReceiver<Arc<Vec<EventEnvelope>>>) {
        while let Some(events) = batches.recv().await {
            let span = tracing::debug_span!("projection_batch", size = events.len());
            let mut batch = LiveBatch::new();
            for event in Arc::try_unwrap(events).unwrap_or_else(|shared| (*shared).clone()) {
                batch.push(event, ());
            }
            let mut retry = Retry::new();
            loop {
                let written = self
                    .apply_live_batch(&mut batch, &[])
                    .instrument(span.clone())
                    .await;
                for aside in batch.take_set_aside() {
                    tracing::error!(event_id = %aside.event_id, reason = %aside.reason, "event set aside: it cannot be applied");
                }
                let Err(e) = written else { break };
                if let Err(e) = retry.after("applying a live batch", e).await {
                    tracing::error!(error = %e, "projection batch failed");
                    break;
                }
            }
        }
    }
}

impl Projection {
    /// Applies opened `events` to every generation of `scope` in one batch of the store,
    /// with `offsets`; opens it again while the generation state moves under it.
    pub(crate) async fn apply_scoped<E: Foldable>(
        &self,
        scope: Scope,
        events: &[E],
        offsets: &Offsets,
    ) -> Result<(), ProjectionError> {
        'attempts: for _ in 0..MAX_STATE_MOVES {
            let mut batch = self
                .store
                .open(scope)
                .await
                .map_err(ProjectionError::View)?;
            for generation in batch.generations().to_vec() {
                if self.apply_in(&mut *batch, generation, events).await? == Landed::GenerationsMoved
                {
                    continue 'attempts;
                }
            }
            return batch.commit(offsets).await.map_err(ProjectionError::View);
        }
        Err(ProjectionError::View(PortError::Unavailable(
            "the view's generations kept changing".into(),
        )))
    }

    /// Applies events to one generation in order. The batch's users are loaded at once,
    /// folded in memory and written at once (each guarded by the version it was folded
    /// from); a user with a gap, or whose document another writer moved meanwhile, goes
    /// event by event (`apply_one`).
    async fn apply_in<E: Foldable>(
        &self,
        batch: &mut dyn ViewBatch,
        generation: u64,
        events: &[E],
    ) -> Result<Landed, ProjectionError> {
        if events.is_empty() {
            return Ok(Landed::Yes);
        }
        let mut ids: Vec<Uuid> = Vec::new();
        let mut seen = HashSet::new();
        for e in events {
            if seen.insert(e.aggregate_id()) {
                ids.push(e.aggregate_id());
            }
        }
        let stored = batch
            .load(generation, &ids)
            .await
            .map_err(ProjectionError::View)?;
        let mut working = stored.clone();
        let folded = fold_run(&mut working, events)?;
        let mut slow = folded.gapped;
        let changes: Vec<(Option<UserView>, UserView)> = folded
            .changed
            .iter()
            .filter(|id| !slow.contains(id))
            .filter_map(|id| Some((stored.get(id).cloned(), working.remove(id)?)))
            .collect();
        match replace(batch, generation, &changes).await? {
            None => return Ok(Landed::GenerationsMoved),
            Some(refused) => slow.extend(refused),
        }
        for e in events.iter().filter(|e| slow.contains(&e.aggregate_id())) {
            if self.apply_one(batch, generation, e).await? == Landed::GenerationsMoved {
                return Ok(Landed::GenerationsMoved);
            }
        }
        Ok(Landed::Yes)
    }

    /// One event, read again while another writer (a rebuild, another consumer after a
    /// rebalance) moves the user on between the read and the write.
    async fn apply_one<E: Foldable>(
        &self,
        batch: &mut dyn ViewBatch,
        generation: u64,
        event: &E,
    ) -> Result<Landed, ProjectionError> {
        for _ in 0..MAX_RACES {
            if let Some(landed) = self.try_apply(batch, generation, event).await? {
                return Ok(landed);
            }
        }
        Err(ProjectionError::View(PortError::Unavailable(format!(
            "user {} kept changing while applying sequence {}",
            event.aggregate_id(),
            event.sequence()
        ))))
    }

    /// `None` when a concurrent writer changed the document first.
    async fn try_apply<E: Foldable>(
        &self,
        batch: &mut dyn ViewBatch,
        generation: u64,
        event: &E,
    ) -> Result<Option<Landed>, ProjectionError> {
        let id = event.aggregate_id();
        let current = batch
            .load(generation, &[id])
            .await
            .map_err(ProjectionError::View)?
            .remove(&id);
        let last = current.as_ref().map_or(0, |v| v.version);
        if event.sequence() <= last {
            return Ok(Some(Landed::Yes));
        }
        if event.sequence() == last + 1 {
            let next = fold(current.clone(), event)?;
            return self.write_one(batch, generation, current, next).await;
        }
        // A gap: earlier events of this user have not reached us (yet). Take them, and this
        // one, from the event store, and open them; one that does not open cannot be applied.
        let mut missing = self
            .log
            .user_events(id, last)
            .await
            .map_err(ProjectionError::Log)?;
        missing.retain(|e| e.sequence <= event.sequence());
        let mut unopened: HashMap<usize, String> = self
            .open(&mut missing)
            .await?
            .into_iter()
            .map(|u| (u.index, u.reason))
            .collect();
        let mut view = current.clone();
        for (index, earlier) in missing.iter().enumerate() {
            let folded = match unopened.remove(&index) {
                Some(reason) => Err(ProjectionError::Poison {
                    event_id: earlier.event_id,
                    reason,
                }),
                None => fold(view.clone(), earlier),
            };
            match folded {
                Ok(next) => view = Some(next),
                // An earlier event that cannot be applied makes this one unappliable too;
                // the error names this one, the event the caller holds. What was folded
                // before it is written first.
                Err(ProjectionError::Poison { reason, .. }) => {
                    let poison = if earlier.event_id == event.event_id() {
                        ProjectionError::Poison {
                            event_id: event.event_id(),
                            reason,
                        }
                    } else {
                        ProjectionError::Poison {
                            event_id: event.event_id(),
                            reason: format!(
                                "earlier event {} (sequence {}) cannot be applied: {reason}",
                                earlier.event_id, earlier.sequence
                            ),
                        }
                    };
                    if let Some(next) = view.filter(|v| v.version > last) {
                        match self.write_one(batch, generation, current, next).await? {
                            Some(Landed::Yes) => {}
                            other => return Ok(other),
                        }
                    }
                    return Err(poison);
                }
                Err(other) => return Err(other),
            }
        }
        match view.filter(|v| v.version > last) {
            Some(next) => self.write_one(batch, generation, current, next).await,
            None => Ok(Some(Landed::Yes)),
        }
    }

    /// Writes one user's document guarded by `previous`; `None` when refused.
    async fn write_one(
        &self,
        batch: &mut dyn ViewBatch,
        generation: u64,
        previous: Option<UserView>,
        next: UserView,
    ) -> Result<Option<Landed>, ProjectionError> {
        Ok(
            match replace(batch, generation, &[(previous, next)]).await? {
                None => Some(Landed::GenerationsMoved),
                Some(refused) if refused.is_empty() => Some(Landed::Yes),
                Some(_) => None,
            },
        )
    }
}

/// Writes guarded changes; the users whose write was refused because another writer
/// moved their document first, or `None` when the generation state moved.
async fn replace(
    batch: &mut dyn ViewBatch,
    generation: u64,
    changes: &[(Option<UserView>, UserView)],
) -> Result<Option<HashSet<Uuid>>, ProjectionError> {
    if changes.is_empty() {
        return Ok(Some(HashSet::new()));
    }
    match batch
        .replace(generation, changes)
        .await
        .map_err(ProjectionError::View)?
    {
        Written::GenerationsMoved => Ok(None),
        Written::Users(written) => Ok(Some(
            changes
                .iter()
                .zip(written)
                .filter(|(_, ok)| !ok)
                .map(|((_, next), _)| next.id)
                .collect(),
        )),
    }
}

/// Writes whole states to one generation of `store` where it is behind them: what the store
/// cannot settle at once (`write_newer`) is written guarded by the version read just
/// before, and read again when another writer got there first.
async fn write_states(
    store: &dyn ViewStore,
    generation: u64,
    states: &[UserView],
) -> Result<(), ProjectionError> {
    let mut batch = store
        .open(Scope::Generation(generation))
        .await
        .map_err(ProjectionError::View)?;
    let settled = batch
        .write_newer(generation, states)
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
            return batch.commit(&[]).await.map_err(ProjectionError::View);
        }
        let ids: Vec<Uuid> = todo.iter().map(|s| s.id).collect();
        let stored = batch
            .load(generation, &ids)
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
        let Some(lost) = replace(&mut *batch, generation, &changes).await? else {
            return Err(ProjectionError::View(PortError::Unavailable(
                "the view's generations changed during the write".into(),
            )));
        };
        todo.retain(|state| lost.contains(&state.id));
    }
    Err(ProjectionError::View(PortError::Unavailable(format!(
        "{} users kept changing while their folded states were written",
        todo.len()
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryUserViews;
    use crate::store::GenerationState;
    use crate::testing::{
        history, lifetime, poisoned, tamper, FakeKeys, InterferingViews, MemoryLog,
    };
    use pcf_domain::ports::UserReader;
    use pcf_domain::Email;
    use std::sync::atomic::Ordering;

    fn projection(log: Vec<EventEnvelope>) -> (Arc<MemoryUserViews>, Arc<MemoryLog>, Projection) {
        let views = Arc::new(MemoryUserViews::new());
        let log = Arc::new(MemoryLog::of(log));
        let projection = Projection::new(views.clone(), log.clone());
        (views, log, projection)
    }

    /// `projection`, for tests whose local `projection` hides it.
    fn projection_of(
        log: Vec<EventEnvelope>,
    ) -> (Arc<MemoryUserViews>, Arc<MemoryLog>, Projection) {
        projection(log)
    }

    async fn user(views: &MemoryUserViews, id: Uuid) -> Option<(u64, String)> {
        let view = views.user(id).await.unwrap()?;
        Some((view.version, view.display_name))
    }

    /// The event `result` names as one that can never be applied; panics on any other.
    fn poison_named(result: Result<(), ProjectionError>) -> Uuid {
        match result {
            Err(ProjectionError::Poison { event_id, .. }) => event_id,
            other => panic!("expected poison, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn events_fold_into_the_document_in_sequence() {
        let a = Uuid::now_v7();
        let (views, _, projection) = projection(Vec::new());
        projection.apply_live(&history(a, 3), &[]).await.unwrap();
        assert_eq!(user(&views, a).await, Some((3, "v3".into())));
        let folded = history(a, 3)
            .iter()
            .try_fold(None, |view, e| fold(view, e).map(Some))
            .unwrap();
        assert_eq!(views.user(a).await.unwrap(), folded);
    }

    #[tokio::test]
    async fn an_event_at_or_below_the_documents_version_is_skipped() {
        let a = Uuid::now_v7();
        let events = history(a, 3);
        let (views, log, projection) = projection(Vec::new());
        projection.apply_live(&events, &[]).await.unwrap();
        let before = views.user(a).await.unwrap();
        // Sequence 2 again, then 3 again, changed: neither is applied.
        let mut again = vec![events[1].clone(), events[2].clone()];
        again[1].payload = history(a, 4)[3].payload.clone();
        projection.apply_live(&again, &[]).await.unwrap();
        assert_eq!(views.user(a).await.unwrap(), before);
        assert_eq!(log.user_reads.load(Ordering::SeqCst), 0, "no gap, no read");
    }

    #[tokio::test]
    async fn a_gap_is_filled_from_the_log_before_the_event_is_applied() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let (log_a, log_b) = (history(a, 4), history(b, 3));
        let mut all = log_a.clone();
        all.extend(log_b.clone());
        let (views, log, projection) = projection(all);
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
        projection.apply_live(&batch, &[]).await.unwrap();
        assert_eq!(user(&views, a).await, Some((4, "v4".into())));
        assert_eq!(user(&views, b).await, Some((3, "v3".into())));
        assert_eq!(log.user_reads.load(Ordering::SeqCst), 1, "a's gap only");
        // Applying the same batch again changes nothing.
        let va = views.user(a).await.unwrap();
        projection.apply_live(&batch, &[]).await.unwrap();
        assert_eq!(views.user(a).await.unwrap(), va);
        // A user met first at a later event is read from the log from its start.
        let c = Uuid::now_v7();
        log.append(history(c, 5));
        projection
            .apply_live(&history(c, 5)[4..], &[])
            .await
            .unwrap();
        assert_eq!(user(&views, c).await, Some((5, "v5".into())));
    }

    #[tokio::test]
    async fn an_event_that_cannot_be_applied_is_named_and_nothing_of_the_batch_is_written() {
        let a = Uuid::now_v7();
        let mut events = history(a, 2);
        events[1] = poisoned(events[1].clone());
        let (views, _, projection) = projection(events.clone());
        let named = poison_named(projection.apply_live(&events, &[]).await);
        assert_eq!(named, events[1].event_id);
        assert!(views.user(a).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn what_can_never_apply_is_set_aside_and_the_rest_applied() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut log_a = history(a, 3);
        log_a[1] = poisoned(log_a[1].clone());
        let log_b = history(b, 2);
        let log_c = history(c, 2);
        let mut all = log_a.clone();
        all.extend(log_b.clone());
        all.extend(log_c.clone());
        let (views, _, projection) = projection(all);
        // a's 2 does not decode; c arrives from its 2: its gap is filled from the log.
        let mut batch = LiveBatch::new();
        for (i, e) in [&log_a[0], &log_b[0], &log_a[1], &log_b[1], &log_c[1]]
            .into_iter()
            .enumerate()
        {
            batch.push(e.clone(), i);
        }
        projection.apply_live_batch(&mut batch, &[]).await.unwrap();
        let aside = batch.take_set_aside();
        assert_eq!(
            aside
                .iter()
                .map(|s| (s.source, s.event_id))
                .collect::<Vec<_>>(),
            [(2, log_a[1].event_id)]
        );
        assert_eq!(batch.len(), 4);
        assert_eq!(user(&views, a).await, Some((1, "v1".into())));
        assert_eq!(user(&views, b).await, Some((2, "v2".into())));
        assert_eq!(user(&views, c).await, Some((2, "v2".into())));

        // a's 3 needs the 2 that cannot apply: it is set aside, named after itself.
        let mut batch = LiveBatch::new();
        batch.push(log_a[2].clone(), "a3");
        projection.apply_live_batch(&mut batch, &[]).await.unwrap();
        let aside = batch.take_set_aside();
        assert_eq!(aside.len(), 1);
        assert_eq!(
            (aside[0].source, aside[0].event_id),
            ("a3", log_a[2].event_id)
        );
        assert!(
            aside[0].reason.starts_with(&format!(
                "earlier event {} (sequence 2) cannot be applied",
                log_a[1].event_id
            )),
            "{}",
            aside[0].reason
        );
        assert!(batch.is_empty());
        assert_eq!(user(&views, a).await, Some((1, "v1".into())));
    }

    #[tokio::test]
    async fn a_gap_fill_writes_what_folds_before_an_event_that_cannot_apply() {
        let a = Uuid::now_v7();
        let mut log_a = history(a, 4);
        log_a[2] = poisoned(log_a[2].clone());
        let (views, _, projection) = projection(log_a.clone());
        projection.apply_live(&log_a[..1], &[]).await.unwrap();
        let named = poison_named(projection.apply_live(&log_a[3..], &[]).await);
        assert_eq!(named, log_a[3].event_id);
        assert_eq!(user(&views, a).await, Some((2, "v2".into())));
    }

    #[tokio::test]
    async fn folded_states_replace_older_views_and_leave_newer_ones() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let (views, _, projection) = projection(Vec::new());
        // a is at version 4 in the view already; b is not there.
        projection.apply_live(&history(a, 4), &[]).await.unwrap();
        let fold_all = |events: Vec<EventEnvelope>| {
            events
                .iter()
                .try_fold(None, |view, e| fold(view, e).map(Some))
                .unwrap()
                .unwrap()
        };
        let a2 = fold_all(history(a, 2));
        let b3 = fold_all(history(b, 3));
        projection.write_states(1, &[a2, b3.clone()]).await.unwrap();
        assert_eq!(user(&views, a).await, Some((4, "v4".into())));
        assert_eq!(views.user(b).await.unwrap(), Some(b3));
    }

    #[tokio::test]
    async fn a_live_batch_whose_generations_moved_is_written_again_for_the_new_state() {
        let a = Uuid::now_v7();
        // Generation 2 begins right after the first live batch opens.
        let store = Arc::new(InterferingViews::beginning_after_open(2));
        let projection = Projection::new(store.clone(), Arc::new(MemoryLog::default()));
        projection.apply_live(&history(a, 2), &[]).await.unwrap();
        assert_eq!(
            store.views.state().await.unwrap(),
            GenerationState {
                active: 1,
                building: Some(2)
            }
        );
        for generation in [1, 2] {
            let mut batch = store
                .views
                .open(Scope::Generation(generation))
                .await
                .unwrap();
            let stored = batch.load(generation, &[a]).await.unwrap();
            assert_eq!(stored[&a].version, 2, "generation {generation}");
        }
    }

    /// A projection over checkpointing views of `log`, opening with `keys`.
    fn opened_projection(
        log: Vec<EventEnvelope>,
        keys: &Arc<FakeKeys>,
    ) -> (Arc<InterferingViews>, Arc<MemoryLog>, Projection) {
        let views = Arc::new(InterferingViews::failing_to_open(0));
        let log = Arc::new(MemoryLog::of(log));
        let projection = Projection::new(views.clone(), log.clone()).with_opener(keys.clone());
        (views, log, projection)
    }

    fn live_batch(events: &[EventEnvelope]) -> LiveBatch<usize> {
        let mut batch = LiveBatch::new();
        for (i, e) in events.iter().enumerate() {
            batch.push(e.clone(), i);
        }
        batch
    }

    async fn by_email(views: &MemoryUserViews, email: &str) -> Option<Uuid> {
        let email = Email::parse(email).unwrap();
        views.user_by_email(&email).await.unwrap().map(|v| v.id)
    }

    #[tokio::test]
    async fn a_sealed_batch_is_opened_in_one_call_and_folds_as_the_plain_one() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut plain = lifetime(a)[..3].to_vec();
        plain.extend(history(b, 2));
        let keys = Arc::new(FakeKeys::default());
        let sealed = keys.seal_all(plain.clone());
        assert!(sealed.iter().all(|e| personal::is_sealed(&e.payload)));
        let (views, _, projection) = opened_projection(sealed.clone(), &keys);
        projection.apply_live(&sealed, &[(0, 5)]).await.unwrap();
        assert_eq!(keys.calls(), [5], "one call for the batch");
        let (plain_views, _, plain_projection) = projection_of(plain.clone());
        plain_projection.apply_live(&plain, &[]).await.unwrap();
        for user in [a, b] {
            let view = views.views.user(user).await.unwrap();
            assert!(view.is_some());
            assert_eq!(view, plain_views.user(user).await.unwrap());
        }
        assert_eq!(
            views.views.user(a).await.unwrap().unwrap().display_name,
            "v2"
        );
        assert_eq!(
            by_email(&views.views, &format!("{a}@example.org")).await,
            Some(a)
        );
        assert_eq!(*views.checkpoints.lock().unwrap(), [vec![(0, 5)]]);

        // Without keys (`PlainOnly`) nothing sealed is folded: every event is set aside.
        let (bare, _, bare_projection) = projection_of(sealed.clone());
        let mut batch = live_batch(&sealed);
        bare_projection
            .apply_live_batch(&mut batch, &[])
            .await
            .unwrap();
        assert_eq!(batch.take_set_aside().len(), 5);
        assert!(bare.is_empty());
        // Nor is a sealed event folded by itself, its personal fields missing.
        assert!(matches!(
            fold(None, &sealed[0]),
            Err(ProjectionError::Poison { .. })
        ));
    }

    #[tokio::test]
    async fn an_erased_event_folds_into_the_tombstone_whatever_its_type() {
        let a = Uuid::now_v7();
        let keys = Arc::new(FakeKeys::default());
        let sealed = keys.seal_all(lifetime(a));
        let (views, _, projection) = opened_projection(sealed.clone(), &keys);
        // Created while the key was there; the rest arrives after the account's deletion.
        projection.apply_live(&sealed[..1], &[]).await.unwrap();
        assert_eq!(
            by_email(&views.views, &format!("{a}@example.com")).await,
            Some(a)
        );
        keys.delete_account(a);
        // A profile update, erased: the user is deleted, the view its tombstone.
        projection.apply_live(&sealed[1..2], &[]).await.unwrap();
        let tombstone = views.views.user(a).await.unwrap().unwrap();
        let created = match lifetime(a)[0].event().unwrap() {
            UserEvent::UserCreated { occurred_at, .. } => occurred_at,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            tombstone,
            UserView {
                id: a,
                email: String::new(),
                display_name: String::new(),
                bio: None,
                avatar_url: None,
                created_at: created,
                updated_at: lifetime(a)[1].event().unwrap().occurred_at(),
                version: 2,
                deleted: true,
            }
        );
        assert_eq!(
            by_email(&views.views, &format!("{a}@example.com")).await,
            None
        );
        // An erased email change and the deletion keep it a tombstone, with no email.
        projection.apply_live(&sealed[2..], &[]).await.unwrap();
        let end = views.views.user(a).await.unwrap().unwrap();
        assert_eq!(
            (end.version, end.deleted, end.email.as_str()),
            (4, true, "")
        );
        assert_eq!(
            by_email(&views.views, &format!("{a}@example.org")).await,
            None
        );
        // The same as the plain history projected live, deletion included.
        let (plain_views, _, plain_projection) = projection_of(lifetime(a));
        plain_projection
            .apply_live(&lifetime(a), &[])
            .await
            .unwrap();
        assert_eq!(Some(end), plain_views.user(a).await.unwrap());
        // An erased creation, met first, is a tombstone at once.
        let mut created = sealed[0].clone();
        keys.open(std::slice::from_mut(&mut created)).await.unwrap();
        assert!(created.is_erased());
        let folded = fold(None, &created).unwrap();
        assert_eq!((folded.version, folded.deleted), (1, true));
        assert_eq!(
            (folded.email.as_str(), folded.display_name.as_str()),
            ("", "")
        );
    }

    #[tokio::test]
    async fn events_that_do_not_open_are_set_aside_and_the_rest_of_the_batch_applied() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let keys = Arc::new(FakeKeys::default());
        let log_a = keys.seal_all(history(a, 3));
        let log_b = keys.seal_all(history(b, 2));
        let log_c = keys.seal_all(history(c, 1));
        let tampered = tamper(log_a[1].clone());
        let mut log = vec![log_a[0].clone(), tampered.clone(), log_a[2].clone()];
        log.extend(log_b.clone());
        log.extend(log_c.clone());
        // c is live, its key gone.
        keys.lose_key(c);
        let (views, _, projection) = opened_projection(log, &keys);
        let events = [
            log_a[0].clone(),
            tampered.clone(),
            log_b[0].clone(),
            log_c[0].clone(),
            log_a[2].clone(),
            log_b[1].clone(),
        ];
        let mut batch = live_batch(&events);
        projection
            .apply_live_batch(&mut batch, &[(0, 6)])
            .await
            .unwrap();
        let aside = batch.take_set_aside();
        assert_eq!(
            aside
                .iter()
                .map(|s| (s.source, s.event_id))
                .collect::<Vec<_>>(),
            [
                (1, tampered.event_id),
                (3, log_c[0].event_id),
                (4, log_a[2].event_id)
            ]
        );
        assert!(
            aside[0].reason.contains("does not open"),
            "{}",
            aside[0].reason
        );
        assert!(
            aside[1].reason.contains("no data key"),
            "{}",
            aside[1].reason
        );
        assert!(
            aside[2].reason.starts_with(&format!(
                "earlier event {} (sequence 2) cannot be applied",
                tampered.event_id
            )),
            "{}",
            aside[2].reason
        );
        // One call for the batch, one for a's gap filled from the log (a2, a3).
        assert_eq!(keys.calls(), [6, 2]);
        assert_eq!(user(&views.views, a).await, Some((1, "v1".into())));
        assert_eq!(user(&views.views, b).await, Some((2, "v2".into())));
        assert_eq!(user(&views.views, c).await, None);
        assert_eq!(*views.checkpoints.lock().unwrap(), [vec![(0, 6)]]);

        // A batch applied whole names the event that does not open, and writes nothing.
        let (views, _, projection) = opened_projection(Vec::new(), &keys);
        let named = poison_named(projection.apply_live(&events[..3], &[(0, 3)]).await);
        assert_eq!(named, tampered.event_id);
        assert!(views.views.is_empty());
        assert!(views.checkpoints.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_opener_outage_is_retried_skipping_nothing_and_moving_no_checkpoint() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let keys = Arc::new(FakeKeys::default());
        let log_a = keys.seal_all(history(a, 3));
        let log_b = keys.seal_all(history(b, 2));
        let mut log = log_a.clone();
        log.extend(log_b.clone());
        let (views, _, projection) = opened_projection(log, &keys);
        let events = [log_a[0].clone(), log_b[0].clone(), log_b[1].clone()];
        let mut batch = live_batch(&events);
        keys.fail(0, 1);
        let failed = projection.apply_live_batch(&mut batch, &[(0, 3)]).await;
        assert!(
            matches!(&failed, Err(e @ ProjectionError::Keys(_)) if e.is_transient()),
            "{failed:?}"
        );
        assert!(batch.take_set_aside().is_empty(), "nothing dead-lettered");
        assert_eq!(batch.len(), 3, "nothing skipped");
        assert!(views.views.is_empty());
        assert!(views.checkpoints.lock().unwrap().is_empty());
        // Tried again once the keys answer: the whole batch, and its checkpoint.
        projection
            .apply_live_batch(&mut batch, &[(0, 3)])
            .await
            .unwrap();
        assert_eq!(user(&views.views, a).await, Some((1, "v1".into())));
        assert_eq!(user(&views.views, b).await, Some((2, "v2".into())));
        assert_eq!(*views.checkpoints.lock().unwrap(), [vec![(0, 3)]]);

        // The keys down while a gap is filled from the log: the same.
        let mut batch = live_batch(&log_a[2..]);
        keys.fail(1, 1);
        let failed = projection.apply_live_batch(&mut batch, &[(0, 9)]).await;
        assert!(
            matches!(failed, Err(ProjectionError::Keys(_))),
            "{failed:?}"
        );
        assert_eq!((batch.len(), batch.take_set_aside().len()), (1, 0));
        assert_eq!(user(&views.views, a).await, Some((1, "v1".into())));
        assert_eq!(views.checkpoints.lock().unwrap().len(), 1);
        projection
            .apply_live_batch(&mut batch, &[(0, 9)])
            .await
            .unwrap();
        assert_eq!(user(&views.views, a).await, Some((3, "v3".into())));
        assert_eq!(
            views.checkpoints.lock().unwrap().last(),
            Some(&vec![(0, 9)])
        );
    }

    #[tokio::test]
    async fn the_in_process_projection_sets_aside_what_does_not_open_and_waits_out_the_keys() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let keys = Arc::new(FakeKeys::default());
        let log_a = keys.seal_all(history(a, 2));
        let log_b = keys.seal_all(history(b, 2));
        let tampered = tamper(log_a[0].clone());
        let mut log = vec![tampered.clone(), log_a[1].clone()];
        log.extend(log_b.clone());
        let (views, _, projection) = opened_projection(log, &keys);
        let (send, batches) = mpsc::unbounded_channel();
        // The first batch meets the keys down twice; the second has an event that does not
        // open.
        keys.fail(0, 2);
        send.send(Arc::new(log_b.clone())).unwrap();
        send.send(Arc::new(vec![tampered, log_a[1].clone()]))
            .unwrap();
        drop(send);
        projection.run(batches).await;
        assert_eq!(user(&views.views, b).await, Some((2, "v2".into())));
        assert_eq!(user(&views.views, a).await, None);
        // b's batch three times; a's batch, then a's gap filled from the log.
        assert_eq!(keys.calls(), [2, 2, 2, 2, 2]);
    }
}
