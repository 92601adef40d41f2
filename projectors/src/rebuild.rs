//! Blue-green rebuilds: replay the event store into a new generation beside the live one,
//! while live projectors keep both up to date, then switch readers over atomically.

use pcf_domain::ports::{Change, EventLog, LogQuery, PortError};
use pcf_domain::{EventEnvelope, Position, UserView};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::generations::Generational;
use crate::projector::ProjectionError;

/// How far a rebuild has come.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub applied: u64,
    /// Events in the log when the rebuild started, if known.
    pub total: Option<u64>,
    pub elapsed: Duration,
    /// Readers use the new generations (the old ones are dropped after the linger).
    pub switched: bool,
}

impl Progress {
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

/// The user after `change`, as `projector::fold` gives it for an envelope.
fn fold_change(current: Option<UserView>, change: &Change) -> Result<UserView, ProjectionError> {
    let poison = |reason: String| ProjectionError::Poison {
        event_id: change.event_id,
        reason,
    };
    let event = change.event.as_ref().map_err(|e| poison(e.clone()))?;
    UserView::fold(current, change.aggregate_id, change.sequence, event).ok_or_else(|| {
        poison(format!(
            "an event at sequence {} for a user that has no view",
            change.sequence
        ))
    })
}

/// How often a rebuild tries a read or a page's write before it gives up.
const ATTEMPTS: u32 = 6;

/// Runs `attempt` until it succeeds, up to `ATTEMPTS` times with growing pauses (0.1 s to
/// 1.6 s): a database that restarts or a deadlock with a live projector costs a rebuild a
/// pause, not its progress. An event that cannot be applied is not tried again.
async fn patiently<T, F, Fut>(what: &str, mut attempt: F) -> Result<T, ProjectionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ProjectionError>>,
{
    let mut pause = Duration::from_millis(100);
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(e) if tries < ATTEMPTS && e.is_transient() => {
                tracing::warn!(error = %e, what, tries, "rebuild step failed; trying again");
                tokio::time::sleep(pause).await;
                pause *= 2;
                tries += 1;
            }
            other => return other,
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

/// Rebuilds `view` from `log`; returns the new active generation.
pub async fn rebuild(
    view: Arc<dyn Generational>,
    log: Arc<dyn EventLog>,
    options: &RebuildOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<u64, ProjectionError> {
    let generations = rebuild_all(&[view], log, options, progress).await?;
    Ok(generations[0])
}

/// Rebuilds every view of `views` from one reading of `log`, each into a new generation
/// beside its live one, then switches readers over; returns the new generations, in order.
///
/// Live projectors write both generations from the moment a build begins: `begin` and
/// their writes are a handshake (`Generational::apply_live`), so an event is either in the
/// log when this reads it, or written to the new generation by a live projector (or both:
/// every write is guarded by version). No pause is needed for them to notice.
pub async fn rebuild_all(
    views: &[Arc<dyn Generational>],
    log: Arc<dyn EventLog>,
    options: &RebuildOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Vec<u64>, ProjectionError> {
    let mut builds = Vec::with_capacity(views.len());
    for view in views {
        let state = view.state().await.map_err(ProjectionError::View)?;
        let generation = state.active.max(state.building.unwrap_or(0)) + 1;
        view.begin(generation)
            .await
            .map_err(ProjectionError::View)?;
        tracing::info!(projection = view.name(), generation, "rebuild began");
        builds.push((view.clone(), state.active, generation));
    }
    let started = Instant::now();
    let total = log.event_count().await.map_err(ProjectionError::Log)?;
    // One task reads the log page after page, a page ahead of the views, as changes (what
    // a fold needs); each page comes with the query that read it.
    let (pages, mut next_page) = tokio::sync::mpsc::channel::<(LogQuery, Vec<Change>)>(2);
    let reader = {
        let log = log.clone();
        let batch_size = options.batch_size.max(1);
        tokio::spawn(async move {
            let mut after = Position::START;
            loop {
                let query = LogQuery {
                    after: Some(after),
                    limit: batch_size,
                    ..LogQuery::default()
                };
                let changes = patiently("reading the log", || async {
                    log.read_changes(&query).await.map_err(ProjectionError::Log)
                })
                .await?;
                let Some(last) = changes.last().map(|e| e.position) else {
                    return Ok(());
                };
                after = last;
                if pages.send((query, changes)).await.is_err() {
                    return Ok(());
                }
            }
        })
    };
    let mut applied = 0u64;
    // Users folded from the log so far, from their first event: each page is folded once
    // here and the users it changed are written to every view. Bounded: when full it is
    // forgotten, and a user met again after that goes through the views' own event path
    // (which reads the user back, or fills from the log).
    let mut folded: HashMap<Uuid, UserView> = HashMap::new();
    while let Some((query, page)) = next_page.recv().await {
        let mut changed: Vec<Uuid> = Vec::new();
        let mut touched: HashSet<Uuid> = HashSet::new();
        let mut irregular: HashSet<Uuid> = HashSet::new();
        for change in &page {
            let id = change.aggregate_id;
            let last = folded.get(&id).map_or(0, |v| v.version);
            if change.sequence <= last {
                continue;
            }
            if change.sequence != last + 1 {
                irregular.insert(change.event_id);
                continue;
            }
            // Folded in place: the state is taken out of the map, not copied.
            let current = folded.remove(&id);
            let next = fold_change(current, change)?;
            folded.insert(id, next);
            if touched.insert(id) {
                changed.push(id);
            }
        }
        let states: Vec<UserView> = changed
            .iter()
            .filter_map(|id| folded.get(id).cloned())
            .collect();
        // Each view's writes are guarded by version, so writing a page again is harmless.
        let writes = builds.iter().map(|(view, _, generation)| {
            patiently(view.name(), || view.write_states(*generation, &states))
        });
        for result in futures::future::join_all(writes).await {
            result?;
        }
        if !irregular.is_empty() {
            // Rare (a user met after the folded users were forgotten): these go through
            // the views' own event path, which takes whole envelopes; the page is read
            // again for them.
            let irregular: Vec<EventEnvelope> = patiently("reading the log", || async {
                log.read(&query).await.map_err(ProjectionError::Log)
            })
            .await?
            .into_iter()
            .filter(|e| irregular.contains(&e.event_id))
            .collect();
            let writes = builds.iter().map(|(view, _, generation)| {
                patiently(view.name(), || {
                    view.apply(*generation, &irregular, None, log.clone())
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
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => {
            return Err(ProjectionError::Log(PortError::Internal(format!(
                "the log reader failed: {e}"
            ))))
        }
    }
    for (view, _, generation) in &builds {
        // A switch may first build indexes (the SQL view's), long enough to meet a restart.
        patiently(view.name(), || async {
            view.switch(*generation)
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
    for (view, old, _) in &builds {
        if let Err(e) = view.drop_generation(*old).await {
            tracing::warn!(error = %e, projection = view.name(), old, "dropping the old generation failed");
        }
    }
    Ok(builds.iter().map(|(_, _, g)| *g).collect())
}
