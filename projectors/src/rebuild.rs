//! Blue-green rebuilds: replay the event store into a new generation beside the live one,
//! while live projectors keep both up to date, then switch readers over atomically. The
//! log is read with `LogPages` a page ahead and folded with the projection's own fold; the
//! embedded mode builds its in-memory views at start the same way.

use pcf_domain::ports::{Change, EventLog, LogPages, PortError};
use pcf_domain::{Position, UserView};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::projection::{fold_run, Projection, ProjectionError};
use crate::store::ViewStore;

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

/// How often a rebuild tries a read or a page's write before it gives up.
const ATTEMPTS: u32 = 6;

/// Pauses between the attempts of one step of a rebuild: up to `ATTEMPTS` tries with growing
/// pauses (0.1 s to 1.6 s), so that a database that restarts or a deadlock with a live
/// projector costs a rebuild a pause, not its progress. An event that cannot be applied is
/// not tried again.
struct Retry {
    tries: u32,
    pause: Duration,
}

impl Retry {
    fn new() -> Self {
        Self {
            tries: 1,
            pause: Duration::from_millis(100),
        }
    }

    /// After a failed attempt: waits and returns `Ok` when another attempt is due, else the
    /// error.
    async fn after(&mut self, what: &str, e: ProjectionError) -> Result<(), ProjectionError> {
        if self.tries >= ATTEMPTS || !e.is_transient() {
            return Err(e);
        }
        tracing::warn!(error = %e, what, tries = self.tries, "rebuild step failed; trying again");
        tokio::time::sleep(self.pause).await;
        self.pause *= 2;
        self.tries += 1;
        Ok(())
    }
}

/// Runs `attempt` until it succeeds, as `Retry` allows.
async fn patiently<T, F, Fut>(what: &str, mut attempt: F) -> Result<T, ProjectionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ProjectionError>>,
{
    let mut retry = Retry::new();
    loop {
        match attempt().await {
            Err(e) => retry.after(what, e).await?,
            ok => return ok,
        }
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
}

/// Rebuilds every store of `stores` from one reading of `log`, each into a new generation
/// beside its live one, then switches readers over.
pub async fn rebuild_views(
    stores: &[Arc<dyn ViewStore>],
    log: Arc<dyn EventLog>,
    options: &RebuildOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Rebuilt, ProjectionError> {
    let projections: Vec<Projection> = stores
        .iter()
        .map(|store| Projection::new(store.clone(), log.clone()))
        .collect();
    rebuild_projections(&projections, log, options, progress).await
}

impl Projection {
    /// Rebuilds this projection's store from its log into a new generation, then switches
    /// readers over (see `rebuild_views`).
    pub async fn rebuild(
        &self,
        options: &RebuildOptions,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<Rebuilt, ProjectionError> {
        rebuild_projections(
            std::slice::from_ref(self),
            self.log().clone(),
            options,
            progress,
        )
        .await
    }
}

/// The rebuild of `projections` from one reading of `log`.
///
/// Live projectors write both generations from the moment a build begins: `begin` and
/// their writes are a handshake (`Scope::Live`), so an event is either in the log when this
/// reads it, or written to the new generation by a live projector (or both: every write is
/// guarded by version). No pause is needed for them to notice.
// About 130 lines on purpose: begin, the read-ahead of pages, one fold per page for every
// view, the writes, the switch and the linger are the rebuild's steps in order, sharing the
// pages in flight; split, the read-ahead's channel and the views' state would be passed
// through every part.
async fn rebuild_projections(
    projections: &[Projection],
    log: Arc<dyn EventLog>,
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
    // One task reads the log page after page, a page ahead of the views, as changes (what
    // a fold needs); it ends with the position it reached.
    let (pages, mut next_page) = tokio::sync::mpsc::channel::<Vec<Change>>(2);
    let reader = {
        let mut log_pages = LogPages::new(log.clone(), Position::START, options.batch_size);
        tokio::spawn(async move {
            loop {
                let mut retry = Retry::new();
                let changes = loop {
                    match log_pages.next_changes().await {
                        Ok(changes) => break changes,
                        Err(e) => {
                            retry
                                .after("reading the log", ProjectionError::Log(e))
                                .await?
                        }
                    }
                };
                if changes.is_empty() || pages.send(changes).await.is_err() {
                    return Ok(log_pages.position());
                }
            }
        })
    };
    let mut applied = 0u64;
    // Users folded from the log so far, from their first event: each page is folded once
    // here and the users it changed are written to every view. Bounded: when full it is
    // forgotten, and a user met again after that goes through the projection's own event
    // path (which reads the user back, or fills from the log).
    let mut folded: HashMap<Uuid, UserView> = HashMap::new();
    while let Some(page) = next_page.recv().await {
        let run = fold_run(&mut folded, &page)?;
        let states: Vec<UserView> = run
            .changed
            .iter()
            .filter_map(|id| folded.get(id).cloned())
            .collect();
        // Each view's writes are guarded by version, so writing a page again is harmless.
        let writes = builds.iter().map(|(projection, _, generation)| {
            patiently(projection.name(), || {
                projection.write_states(*generation, &states)
            })
        });
        for result in futures::future::join_all(writes).await {
            result?;
        }
        if !run.rest.is_empty() {
            // Rare: users met after the folded users were forgotten.
            // Their users are read back, and gaps filled from the log.
            let writes = builds.iter().map(|(projection, _, generation)| {
                patiently(projection.name(), || {
                    projection.apply_to(*generation, &run.rest, &[])
                })
            });
            for result in futures::future::join_all(writes).await {
                result?;
            }
        }
        if folded.len() > MAX_FOLDED_USERS {
            folded.clear();
        }
        applied += page.len() as u64;
        progress(Progress {
            applied,
            total,
            elapsed: started.elapsed(),
            switched: false,
        });
    }
    let position = match reader.await {
        Ok(Ok(position)) => position,
        Ok(Err(e)) => return Err(e),
        Err(e) => {
            return Err(ProjectionError::Log(PortError::Internal(format!(
                "the log reader failed: {e}"
            ))))
        }
    };
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
    });
    tracing::info!(applied, "rebuild switched readers to the new generations");
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryUserViews;
    use crate::store::Scope;
    use crate::testing::{history, poisoned, InterferingViews, MemoryLog};
    use pcf_domain::ports::UserReader;
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
            }
        );
        let state = ViewStore::state(&*views).await.unwrap();
        assert_eq!((state.active, state.building), (2, None));
        for user in users {
            let view = views.user(user).await.unwrap().unwrap();
            assert_eq!((view.version, view.display_name.as_str()), (5, "v5"));
        }
        let seen = seen.into_inner().unwrap();
        let applied: Vec<u64> = seen.iter().map(|p| p.applied).collect();
        assert_eq!(applied, [4, 8, 12, 15, 15]);
        assert!(seen.last().unwrap().switched);
        // The old generation is gone; the next rebuild takes the next number.
        let mut old = views.open(Scope::Generation(1)).await.unwrap();
        assert!(old.load(1, &users).await.unwrap().is_empty());
        drop(old);
        let again = projection.rebuild(&options(100), &|_| {}).await.unwrap();
        assert_eq!(again.generations, [3]);
        assert_eq!(views.len(), 3);
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
}
