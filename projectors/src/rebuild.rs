//! Blue-green rebuilds: replay the event store into a new generation beside the live one,
//! while live projectors keep both up to date, then switch readers over atomically. The
//! log is read with `LogPages` a page ahead as `Change`s (decoded straight into events),
//! each page opened (one call of the opener) and folded with the projection's own fold,
//! and each view written by a writer of its own, up to two windows of pages behind the
//! fold, each user's state once a window. The embedded mode builds its in-memory views at
//! start the same way.

use pcf_adapters::keys::{Opener, PlainOnly, Unopened};
use pcf_domain::ports::{Change, EventLog, LogPages, PortError};
use pcf_domain::{Position, UserView};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::projection::{fold_run, Projection, ProjectionError, SetAside};
use crate::retry::{patiently, Retry};
use crate::store::{Scope, ViewStore};

/// How far a rebuild has come.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Events read from the log and applied so far.
    pub applied: u64,
    /// Events in the log when the rebuild started, if known.
    pub total: Option<u64>,
    /// Time since the log's reading began.
    pub elapsed: Duration,
    /// Readers use the new generations (the old ones are dropped after the linger).
    pub switched: bool,
    /// Events read that can never be applied, set aside so far (`Rebuilt::set_aside`).
    pub set_aside: u64,
}

impl Progress {
    /// Events applied per second so far.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.applied as f64 / secs
        } else {
            0.0
        }
    }

    /// Time left at the current rate.
    pub fn eta(&self) -> Option<Duration> {
        let total = self.total?;
        let rate = self.rate();
        (rate > 0.0)
            .then(|| Duration::from_secs_f64(total.saturating_sub(self.applied) as f64 / rate))
    }
}

/// How many users a rebuild keeps folded in memory at most.
const MAX_FOLDED_USERS: usize = 1_000_000;

/// Knobs of a rebuild.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Events read from the log at a time; the next page is read while one is applied.
    pub batch_size: usize,
    /// How long the old generation stays after the switch, for reads already under way.
    pub linger: Duration,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            batch_size: 10_000,
            linger: Duration::from_secs(1),
        }
    }
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// The new active generation of each view, in the order given.
    pub generations: Vec<u64>,
    /// The position of the last event read: the views hold the log up to here (and live
    /// projectors carry them on from there).
    pub position: Position,
    /// Events read from the log.
    pub applied: u64,
    /// Events read that can never be applied, in log order, each with its position: those
    /// whose personal data does not open (altered, or a live user's key missing), and the
    /// later events of their users. The views hold each such user as folded up to the
    /// event before; live projectors dead-letter the same events.
    pub set_aside: Vec<SetAside<Position>>,
}

/// Rebuilds every store of `stores` from one reading of `log`, each into a new generation
/// beside its live one, then switches readers over. Sealed personal data is not opened
/// (`PlainOnly`): see `rebuild_views_with`.
pub async fn rebuild_views(
    stores: &[Arc<dyn ViewStore>],
    log: Arc<dyn EventLog>,
    options: &RebuildOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Rebuilt, ProjectionError> {
    rebuild_views_with(stores, log, Arc::new(PlainOnly), options, progress).await
}

/// `rebuild_views`, opening the log's sealed personal data with `opener` (the user keys).
pub async fn rebuild_views_with(
    stores: &[Arc<dyn ViewStore>],
    log: Arc<dyn EventLog>,
    opener: Arc<dyn Opener>,
    options: &RebuildOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Rebuilt, ProjectionError> {
    let projections: Vec<Projection> = stores
        .iter()
        .map(|store| Projection::new(store.clone(), log.clone()).with_opener(opener.clone()))
        .collect();
    rebuild_projections(&projections, log, opener, options, progress).await
}

impl Projection {
    /// Rebuilds this projection's store from its log, opened with its opener, into a new
    /// generation, then switches readers over (see `rebuild_views`).
    pub async fn rebuild(
        &self,
        options: &RebuildOptions,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<Rebuilt, ProjectionError> {
        rebuild_projections(
            std::slice::from_ref(self),
            self.log().clone(),
            self.opener().clone(),
            options,
            progress,
        )
        .await
    }
}

/// Pages a rebuild's reader, and its opener, may be ahead of the next stage (a page is at
/// most `RebuildOptions::batch_size` events, a few megabytes).
const PAGES_AHEAD: usize = 4;

/// A page of the log, opened, with the events that did not open.
struct Page {
    events: Vec<Change>,
    unopened: Vec<Unopened>,
}

/// Reads the next page of `log_pages`, tried again while the log is down.
async fn read_page(log_pages: &mut LogPages) -> Result<Vec<Change>, ProjectionError> {
    let mut retry = Retry::new();
    loop {
        match log_pages.next_changes().await {
            Ok(events) => return Ok(events),
            Err(e) => {
                retry
                    .after("reading the log", ProjectionError::Log(e))
                    .await?
            }
        }
    }
}

/// Opens a page read, tried again while the keys are down (a page read is opened again,
/// not read past).
async fn open_page(mut events: Vec<Change>, opener: &dyn Opener) -> Result<Page, ProjectionError> {
    if !events.iter().any(|c| c.sealed.is_some()) {
        return Ok(Page {
            events,
            unopened: Vec::new(),
        });
    }
    let mut retry = Retry::new();
    loop {
        match opener.open_changes(&mut events).await {
            Ok(unopened) => return Ok(Page { events, unopened }),
            Err(e) => {
                retry
                    .after("opening the log's personal data", ProjectionError::Keys(e))
                    .await?
            }
        }
    }
}

/// The users a rebuild met an event of that does not open: their later events cannot be
/// applied either (as a live projector's gap fill finds).
#[derive(Default)]
struct Blocked {
    /// The first event of each such user that did not open: id, sequence, why.
    users: HashMap<Uuid, (Uuid, u64, String)>,
    set_aside: Vec<SetAside<Position>>,
}

impl Blocked {
    /// The events of `page` that may be folded; the others are set aside.
    fn sift<'p>(&mut self, page: &'p Page) -> Vec<&'p Change> {
        let mut unopened: HashMap<usize, &str> = page
            .unopened
            .iter()
            .map(|u| (u.index, u.reason.as_str()))
            .collect();
        let mut applicable = Vec::with_capacity(page.events.len());
        for (index, event) in page.events.iter().enumerate() {
            let reason = match (unopened.remove(&index), self.users.get(&event.aggregate_id)) {
                (Some(reason), first) => {
                    if first.is_none() {
                        self.users.insert(
                            event.aggregate_id,
                            (event.event_id, event.sequence, reason.to_owned()),
                        );
                    }
                    reason.to_owned()
                }
                (None, Some((id, sequence, why))) => {
                    format!("earlier event {id} (sequence {sequence}) cannot be applied: {why}")
                }
                (None, None) => {
                    applicable.push(event);
                    continue;
                }
            };
            tracing::error!(event_id = %event.event_id, %reason, "rebuild: event set aside");
            self.set_aside.push(SetAside {
                source: event.position,
                event_id: event.event_id,
                reason,
            });
        }
        applicable
    }
}

/// Windows of writes a view's writer may be behind the fold.
const WRITES_AHEAD: usize = 2;

/// What folding a window of pages came to, for every view.
struct Writes {
    /// The states of the users the window changed.
    states: Vec<UserView>,
    /// The events of users met after the folded users were forgotten: the writer reads
    /// their users back (and fills gaps from the log).
    rest: Vec<Change>,
    /// Events the window's pages held.
    events: u64,
}

/// Pages of events a window spans at most, and users it holds at most.
const WINDOW_PAGES: u64 = 10;
const WINDOW_USERS: usize = 50_000;

/// The users changed since the last hand-over to the writers, and the events read
/// meanwhile.
#[derive(Default)]
struct Window {
    changed: HashSet<Uuid>,
    events: u64,
}

impl Window {
    fn add(&mut self, changed: &[Uuid], events: u64) {
        self.changed.extend(changed);
        self.events += events;
    }

    fn is_empty(&self) -> bool {
        self.events == 0
    }

    fn is_full(&self, batch_size: usize) -> bool {
        self.events >= WINDOW_PAGES * batch_size.max(1) as u64 || self.changed.len() >= WINDOW_USERS
    }

    /// The window's writes: its users' states as folded now, and `rest`; the window is
    /// empty after.
    fn take(&mut self, folded: &HashMap<Uuid, UserView>, rest: Vec<Change>) -> Writes {
        let writes = Writes {
            states: self
                .changed
                .iter()
                .filter_map(|id| folded.get(id).cloned())
                .collect(),
            rest,
            events: self.events,
        };
        *self = Self::default();
        writes
    }
}

/// A writer task per view, each writing windows in order into its new generation.
struct Writers {
    senders: Vec<tokio::sync::mpsc::Sender<Arc<Writes>>>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), ProjectionError>>>,
    /// Windows each writer has written.
    written: Vec<Arc<AtomicUsize>>,
    /// Events of the windows sent so far, summed: `sent[n]` after the first `n + 1`.
    sent: Vec<u64>,
}

impl Writers {
    fn start(builds: &[(&Projection, u64, u64)]) -> Self {
        let mut writers = Self {
            senders: Vec::new(),
            tasks: Vec::new(),
            written: Vec::new(),
            sent: Vec::new(),
        };
        for (projection, _, generation) in builds {
            let (sender, mut windows) = tokio::sync::mpsc::channel::<Arc<Writes>>(WRITES_AHEAD);
            let (projection, generation) = ((*projection).clone(), *generation);
            let written = Arc::new(AtomicUsize::new(0));
            let counted = written.clone();
            writers.tasks.push(tokio::spawn(async move {
                while let Some(window) = windows.recv().await {
                    // Writes are guarded by version, so writing a window again is harmless.
                    patiently(projection.name(), || {
                        projection.write_states(generation, &window.states)
                    })
                    .await?;
                    if !window.rest.is_empty() {
                        patiently(projection.name(), || {
                            projection.apply_scoped(
                                Scope::Generation(generation),
                                &window.rest,
                                &[],
                            )
                        })
                        .await?;
                    }
                    counted.fetch_add(1, Ordering::Release);
                }
                Ok(())
            }));
            writers.senders.push(sender);
            writers.written.push(written);
        }
        writers
    }

    /// Hands a window to every writer, waiting while one is `WRITES_AHEAD` behind; false
    /// when a writer has stopped (it failed).
    async fn send(&mut self, writes: Writes) -> bool {
        let before = self.sent.last().copied().unwrap_or(0);
        self.sent.push(before + writes.events);
        let writes = Arc::new(writes);
        for sender in &self.senders {
            if sender.send(writes.clone()).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Events of the windows every view has written.
    fn applied(&self) -> u64 {
        let windows = self
            .written
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .min()
            .unwrap_or(self.sent.len());
        windows.checked_sub(1).map_or(0, |last| self.sent[last])
    }

    /// Waits for every writer to write what it was sent; the events written, or the
    /// first writer's error.
    async fn finish(mut self) -> Result<u64, ProjectionError> {
        self.senders.clear();
        let mut outcome = Ok(());
        for task in self.tasks.drain(..) {
            let result = task.await.unwrap_or_else(|e| {
                Err(ProjectionError::View(PortError::Internal(format!(
                    "a view's writer failed: {e}"
                ))))
            });
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome.map(|()| self.sent.last().copied().unwrap_or(0))
    }

    /// Stops every writer where it is.
    fn abort(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The rebuild of `projections` from one reading of `log`.
///
/// Live projectors write both generations from the moment a build begins: `begin` and
/// their writes are a handshake (`Scope::Live`), so an event is either in the log when this
/// reads it, or written to the new generation by a live projector (or both: every write is
/// guarded by version). No pause is needed for them to notice.
// About 120 lines on purpose: begin, the read-ahead of pages, one fold per page for every
// view, the hand-over to the views' writers, the switch and the linger are the rebuild's
// steps in order, sharing the pages in flight; split, the read-ahead's channels and the
// folded state would be passed through every part.
async fn rebuild_projections(
    projections: &[Projection],
    log: Arc<dyn EventLog>,
    opener: Arc<dyn Opener>,
    options: &RebuildOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Rebuilt, ProjectionError> {
    let mut builds = Vec::with_capacity(projections.len());
    for projection in projections {
        let store = projection.store();
        let state = store.state().await.map_err(ProjectionError::View)?;
        let generation = state.active.max(state.building.unwrap_or(0)) + 1;
        store
            .begin(generation)
            .await
            .map_err(ProjectionError::View)?;
        tracing::info!(projection = projection.name(), generation, "rebuild began");
        builds.push((projection, state.active, generation));
    }
    let started = Instant::now();
    let total = log.event_count().await.map_err(ProjectionError::Log)?;
    // One task reads the log page after page and another opens each page, so that reading
    // a page, opening the one before (its keys are read from the key table) and folding and
    // writing the one before that overlap; the reader ends with the position it reached.
    let (read, mut to_open) = tokio::sync::mpsc::channel::<Vec<Change>>(PAGES_AHEAD);
    let reader = {
        let mut log_pages = LogPages::new(log.clone(), Position::START, options.batch_size);
        tokio::spawn(async move {
            loop {
                let page = read_page(&mut log_pages).await?;
                if page.is_empty() || read.send(page).await.is_err() {
                    return Ok::<_, ProjectionError>(log_pages.position());
                }
            }
        })
    };
    let (pages, mut next_page) = tokio::sync::mpsc::channel::<Page>(PAGES_AHEAD);
    let opening = tokio::spawn(async move {
        while let Some(page) = to_open.recv().await {
            let page = open_page(page, &*opener).await?;
            if pages.send(page).await.is_err() {
                break;
            }
        }
        Ok::<_, ProjectionError>(())
    });
    // Each view has a writer of its own, up to `WRITES_AHEAD` windows behind the fold: one
    // view's writes, the other's and the folding of the next page overlap.
    let mut writers = Writers::start(&builds);
    let mut blocked = Blocked::default();
    // Users folded from the log so far, from their first event: each page is folded once
    // here and the users it changed are written to every view. Bounded: when full it is
    // forgotten, and a user met again after that goes through the projection's own event
    // path (which reads the user back, or fills from the log).
    let mut folded: HashMap<Uuid, UserView> = HashMap::new();
    // Users changed since the views were last handed states, and the events read since.
    // Nothing reads a generation before the switch, so a user's state is written once per
    // window, however often the window's pages change it.
    let mut window = Window::default();
    while let Some(page) = next_page.recv().await {
        let applicable = blocked.sift(&page);
        let run = match fold_run(&mut folded, &applicable) {
            Ok(run) => run,
            Err(e) => {
                writers.abort();
                return Err(e);
            }
        };
        window.add(&run.changed, page.events.len() as u64);
        // Rare: users met after the folded users were forgotten.
        let rest: Vec<Change> = run.rest.iter().map(|c| (**c).clone()).collect();
        let forget = folded.len() > MAX_FOLDED_USERS;
        let due = forget || !rest.is_empty() || window.is_full(options.batch_size);
        if due && !writers.send(window.take(&folded, rest)).await {
            // A writer failed: its error is the rebuild's.
            break;
        }
        if forget {
            folded.clear();
        }
        progress(Progress {
            applied: writers.applied(),
            total,
            elapsed: started.elapsed(),
            switched: false,
            set_aside: blocked.set_aside.len() as u64,
        });
    }
    if !window.is_empty() {
        writers.send(window.take(&folded, Vec::new())).await;
    }
    let applied = writers.finish().await?;
    progress(Progress {
        applied,
        total,
        elapsed: started.elapsed(),
        switched: false,
        set_aside: blocked.set_aside.len() as u64,
    });
    let task_failed = |e: tokio::task::JoinError| {
        ProjectionError::Log(PortError::Internal(format!("the log reader failed: {e}")))
    };
    // The opener ends when the reader does, or first, when it failed.
    opening.await.map_err(task_failed)??;
    let position = reader.await.map_err(task_failed)??;
    for (projection, _, generation) in &builds {
        // A switch may first build indexes (the SQL view's), long enough to meet a restart.
        patiently(projection.name(), || async {
            projection
                .store()
                .switch(*generation)
                .await
                .map_err(ProjectionError::View)
        })
        .await?;
    }
    progress(Progress {
        applied,
        total: Some(applied.max(total.unwrap_or(0))),
        elapsed: started.elapsed(),
        switched: true,
        set_aside: blocked.set_aside.len() as u64,
    });
    tracing::info!(
        applied,
        set_aside = blocked.set_aside.len(),
        "rebuild switched readers to the new generations"
    );
    tokio::time::sleep(options.linger).await;
    for (projection, old, _) in &builds {
        if let Err(e) = projection.store().drop_generation(*old).await {
            tracing::warn!(error = %e, projection = projection.name(), old, "dropping the old generation failed");
        }
    }
    Ok(Rebuilt {
        generations: builds.iter().map(|(_, _, g)| *g).collect(),
        position,
        applied,
        set_aside: blocked.set_aside,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryUserViews;
    use crate::store::Scope;
    use crate::testing::{
        history, lifetime, poisoned, tamper, FakeKeys, InterferingViews, MemoryLog,
    };
    use pcf_domain::ports::UserReader;
    use pcf_domain::Email;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;

    /// Users' histories interleaved in the log: a1 b1 c1 a2 b2 c2 ...
    fn interleaved(users: &[Uuid], n: u64) -> Vec<pcf_domain::EventEnvelope> {
        let histories: Vec<_> = users.iter().map(|u| history(*u, n)).collect();
        (0..n as usize)
            .flat_map(|i| histories.iter().map(move |h| h[i].clone()))
            .collect()
    }

    fn options(batch_size: usize) -> RebuildOptions {
        RebuildOptions {
            batch_size,
            linger: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn a_rebuild_folds_the_log_page_by_page_into_a_new_generation_and_switches() {
        let users = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
        let log = Arc::new(MemoryLog::of(interleaved(&users, 5)));
        let views = Arc::new(MemoryUserViews::new());
        let projection = Projection::new(views.clone(), log.clone());
        let seen = Mutex::new(Vec::new());
        // Pages of 4 events: users' histories cross page boundaries.
        let rebuilt = projection
            .rebuild(&options(4), &|p| seen.lock().unwrap().push(p))
            .await
            .unwrap();
        assert_eq!(
            rebuilt,
            Rebuilt {
                generations: vec![2],
                position: log.events().last().unwrap().position,
                applied: 15,
                set_aside: Vec::new(),
            }
        );
        let state = ViewStore::state(&*views).await.unwrap();
        assert_eq!((state.active, state.building), (2, None));
        for user in users {
            let view = views.user(user).await.unwrap().unwrap();
            assert_eq!((view.version, view.display_name.as_str()), (5, "v5"));
        }
        let seen = seen.into_inner().unwrap();
        // A report a page: what every view has written, whole pages of 4, the last of 3;
        // then all of it, before and after the switch.
        let applied: Vec<u64> = seen.iter().map(|p| p.applied).collect();
        assert_eq!(applied.len(), 6, "{applied:?}");
        assert!(applied.is_sorted(), "{applied:?}");
        assert!(
            applied.iter().all(|a| a % 4 == 0 || *a == 15),
            "{applied:?}"
        );
        assert_eq!(applied[4..], [15, 15]);
        let switched: Vec<bool> = seen.iter().map(|p| p.switched).collect();
        assert_eq!(switched, [false, false, false, false, false, true]);
        // The old generation is gone; the next rebuild takes the next number.
        let mut old = views.open(Scope::Generation(1)).await.unwrap();
        assert!(old.load(1, &users).await.unwrap().is_empty());
        drop(old);
        let again = projection.rebuild(&options(100), &|_| {}).await.unwrap();
        assert_eq!(again.generations, [3]);
        assert_eq!(views.len(), 3);
    }

    #[tokio::test]
    async fn a_user_changed_in_many_pages_of_a_window_is_written_once_a_window() {
        let users = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
        // 75 events in 19 pages of 4, every page changing every user: windows of 10 pages.
        let log = Arc::new(MemoryLog::of(interleaved(&users, 25)));
        let views = Arc::new(InterferingViews::failing_to_open(0));
        let projection = Projection::new(views.clone(), log.clone());
        let seen = Mutex::new(Vec::new());
        let rebuilt = projection
            .rebuild(&options(4), &|p| seen.lock().unwrap().push(p.applied))
            .await
            .unwrap();
        assert_eq!(rebuilt.applied, 75);
        // A batch committed a window: two windows, not 19 pages.
        assert_eq!(views.checkpoints.lock().unwrap().len(), 2);
        for user in users {
            let view = views.views.user(user).await.unwrap().unwrap();
            assert_eq!((view.version, view.display_name.as_str()), (25, "v25"));
        }
        let seen = seen.into_inner().unwrap();
        assert!(seen.iter().all(|a| [0, 40, 75].contains(a)), "{seen:?}");
        assert_eq!(seen.last(), Some(&75));
    }

    #[tokio::test]
    async fn several_views_are_rebuilt_from_one_reading_and_an_empty_log_switches_too() {
        let log: Arc<dyn EventLog> = Arc::new(MemoryLog::default());
        let (one, two) = (
            Arc::new(MemoryUserViews::new()),
            Arc::new(MemoryUserViews::new()),
        );
        two.begin(4).await.unwrap();
        let stores: Vec<Arc<dyn ViewStore>> = vec![one.clone(), two.clone()];
        let rebuilt = rebuild_views(&stores, log, &options(10), &|_| {})
            .await
            .unwrap();
        assert_eq!(rebuilt.generations, [2, 5]);
        assert_eq!((rebuilt.position, rebuilt.applied), (Position::START, 0));
    }

    #[tokio::test]
    async fn an_event_in_the_log_that_cannot_be_applied_stops_the_rebuild_before_the_switch() {
        let a = Uuid::now_v7();
        let mut events = history(a, 3);
        events[1] = poisoned(events[1].clone());
        let views = Arc::new(MemoryUserViews::new());
        let projection = Projection::new(views.clone(), Arc::new(MemoryLog::of(events)));
        let result = projection.rebuild(&options(10), &|_| {}).await;
        assert!(matches!(result, Err(ProjectionError::Poison { .. })));
        assert_eq!(ViewStore::state(&*views).await.unwrap().active, 1);
    }

    #[tokio::test]
    async fn a_rebuild_rides_out_failed_page_writes() {
        let a = Uuid::now_v7();
        // The first two batches fail to open, as when a database restarts.
        let store = Arc::new(InterferingViews::failing_to_open(2));
        let projection = Projection::new(store.clone(), Arc::new(MemoryLog::of(history(a, 3))));
        let rebuilt = projection.rebuild(&options(2), &|_| {}).await.unwrap();
        assert_eq!(rebuilt.generations, [2]);
        assert_eq!(store.failures.load(Ordering::SeqCst), 0);
        let view = store.views.user(a).await.unwrap().unwrap();
        assert_eq!(view.version, 3);
    }

    async fn by_email(views: &MemoryUserViews, email: &str) -> Option<Uuid> {
        let email = Email::parse(email).unwrap();
        views.user_by_email(&email).await.unwrap().map(|v| v.id)
    }

    #[tokio::test]
    async fn a_rebuild_of_a_log_with_deleted_users_gives_the_views_live_projection_gave() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let keys = Arc::new(FakeKeys::default());
        // a lives and is deleted; b lives on. Interleaved: a1 b1 a2 b2 a3 b3 a4.
        let (life_a, life_b) = (keys.seal_all(lifetime(a)), keys.seal_all(history(b, 3)));
        let mut sealed = Vec::new();
        for (i, event) in life_a.iter().enumerate() {
            sealed.push(event.clone());
            sealed.extend(life_b.get(i).cloned());
        }
        // Live: each event as it comes; a's key is destroyed with its account, before its
        // deletion event is published.
        let live = Arc::new(MemoryUserViews::new());
        let projection = Projection::new(live.clone(), Arc::new(MemoryLog::of(sealed.clone())))
            .with_opener(keys.clone());
        for event in &sealed {
            if event.event_type == "AccountDeleted" {
                keys.delete_account(a);
            }
            projection
                .apply_live(std::slice::from_ref(event), &[])
                .await
                .unwrap();
        }
        // The rebuild reads a's events erased (its key is gone), in pages of three; the
        // log's readable prefix ends before a's deletion event, still committing.
        let log = Arc::new(MemoryLog::of(sealed[..6].to_vec()));
        let calls = keys.calls().len();
        let rebuilt_views = Arc::new(MemoryUserViews::new());
        let rebuilding =
            Projection::new(rebuilt_views.clone(), log.clone()).with_opener(keys.clone());
        let rebuilt = rebuilding.rebuild(&options(3), &|_| {}).await.unwrap();
        assert_eq!((rebuilt.applied, rebuilt.set_aside.len()), (6, 0));
        assert_eq!(keys.calls()[calls..], [3, 3], "one call a page");
        // a is a tombstone already: no personal data, no email entry.
        let tombstone = rebuilt_views.user(a).await.unwrap().unwrap();
        assert_eq!(
            (
                tombstone.version,
                tombstone.deleted,
                tombstone.email.as_str()
            ),
            (3, true, "")
        );
        assert_eq!(
            (
                tombstone.display_name.as_str(),
                &tombstone.bio,
                &tombstone.avatar_url
            ),
            ("", &None, &None)
        );
        assert_eq!(
            by_email(&rebuilt_views, &format!("{a}@example.com")).await,
            None
        );
        // Its deletion, applied live, ends it as live projection did.
        log.append(sealed[6..].to_vec());
        rebuilding.apply_live(&sealed[6..], &[]).await.unwrap();
        for user in [a, b] {
            let rebuilt = rebuilt_views.user(user).await.unwrap();
            assert!(rebuilt.is_some());
            assert_eq!(rebuilt, live.user(user).await.unwrap(), "{user}");
        }
        assert_eq!(rebuilt_views.user(a).await.unwrap().unwrap().version, 4);
        // And a rebuild of the whole log, as well.
        let whole = Arc::new(MemoryUserViews::new());
        let rebuilt = Projection::new(whole.clone(), log)
            .with_opener(keys.clone())
            .rebuild(&options(3), &|_| {})
            .await
            .unwrap();
        assert_eq!((rebuilt.applied, rebuilt.set_aside.len()), (7, 0));
        for user in [a, b] {
            assert_eq!(
                whole.user(user).await.unwrap(),
                live.user(user).await.unwrap()
            );
        }
        for views in [&live, &rebuilt_views, &whole] {
            assert_eq!(by_email(views, &format!("{a}@example.com")).await, None);
            assert_eq!(by_email(views, &format!("{a}@example.org")).await, None);
            assert_eq!(by_email(views, &format!("{b}@example.com")).await, Some(b));
        }
    }

    #[tokio::test]
    async fn a_rebuild_sets_aside_what_does_not_open_and_goes_on_to_the_switch() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let keys = Arc::new(FakeKeys::default());
        let mut log_a = keys.seal_all(history(a, 3));
        log_a[1] = tamper(log_a[1].clone());
        let log_b = keys.seal_all(history(b, 2));
        let log_c = keys.seal_all(history(c, 2));
        // c is live, its key gone.
        keys.lose_key(c);
        let mut all = log_a.clone();
        all.extend(log_b);
        all.extend(log_c.clone());
        let log = Arc::new(MemoryLog::of(all));
        let positions = log.events();
        let views = Arc::new(MemoryUserViews::new());
        let stores: Vec<Arc<dyn ViewStore>> = vec![views.clone()];
        let last = Mutex::new(None);
        let rebuilt = rebuild_views_with(&stores, log.clone(), keys.clone(), &options(4), &|p| {
            *last.lock().unwrap() = Some(p.set_aside)
        })
        .await
        .unwrap();
        let aside: Vec<(Position, Uuid)> = rebuilt
            .set_aside
            .iter()
            .map(|s| (s.source, s.event_id))
            .collect();
        assert_eq!(
            aside,
            [1, 2, 5, 6].map(|i| (positions[i].position, positions[i].event_id))
        );
        assert!(rebuilt.set_aside[0].reason.contains("does not open"));
        assert!(rebuilt.set_aside[1].reason.starts_with(&format!(
            "earlier event {} (sequence 2) cannot be applied",
            log_a[1].event_id
        )));
        assert!(rebuilt.set_aside[2].reason.contains("no data key"));
        assert_eq!(*last.lock().unwrap(), Some(4));
        assert_eq!(rebuilt.generations, [2]);
        assert_eq!(ViewStore::state(&*views).await.unwrap().active, 2);
        let version = async |user| views.user(user).await.unwrap().map(|v| v.version);
        assert_eq!(version(a).await, Some(1));
        assert_eq!(version(b).await, Some(2));
        assert_eq!(version(c).await, None);
        // Without keys, every sealed event is set aside.
        let bare = rebuild_views(&stores, log, &options(4), &|_| {})
            .await
            .unwrap();
        assert_eq!(bare.set_aside.len(), 7);
        assert_eq!(version(b).await, None);
    }

    #[tokio::test]
    async fn a_rebuild_waits_out_the_keys_and_a_lasting_outage_stops_it_before_the_switch() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let keys = Arc::new(FakeKeys::default());
        let log = Arc::new(MemoryLog::of(keys.seal_all(interleaved(&[a, b], 3))));
        let views = Arc::new(MemoryUserViews::new());
        let projection = Projection::new(views.clone(), log).with_opener(keys.clone());
        // The second page meets the keys down twice: opened again, not read past.
        keys.fail(1, 2);
        let rebuilt = projection.rebuild(&options(4), &|_| {}).await.unwrap();
        assert_eq!(keys.calls(), [4, 2, 2, 2]);
        assert_eq!((rebuilt.applied, rebuilt.set_aside.len()), (6, 0));
        for user in [a, b] {
            assert_eq!(views.user(user).await.unwrap().unwrap().version, 3);
        }
        // Down for longer than the rebuild waits: it fails, readers stay where they were.
        keys.fail(0, u64::MAX);
        let failed = projection.rebuild(&options(4), &|_| {}).await;
        assert!(
            matches!(failed, Err(ProjectionError::Keys(_))),
            "{failed:?}"
        );
        assert_eq!(ViewStore::state(&*views).await.unwrap().active, 2);
        assert_eq!(views.user(a).await.unwrap().unwrap().version, 3);
    }
}
