//! Blue-green rebuilds: replay the event store into a new generation beside the live one,
//! while live projectors keep both up to date, then switch readers over atomically.

use pcf_domain::ports::{EventLog, LogQuery};
use pcf_domain::Position;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::generations::Generational;
use crate::projector::ProjectionError;

/// How far a rebuild has come.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub applied: u64,
    /// Events in the log when the rebuild started, if known.
    pub total: Option<u64>,
    pub elapsed: Duration,
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

/// Knobs of a rebuild.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    pub batch_size: usize,
    /// How long live projectors get to notice the new generation before the final pass
    /// (they look at the generation state once per batch).
    pub grace: Duration,
    /// How long the old generation stays after the switch, for readers still on it.
    pub linger: Duration,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            grace: Duration::from_secs(2),
            linger: Duration::from_secs(2),
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
    let state = view.state().await.map_err(ProjectionError::View)?;
    let generation = state.active.max(state.building.unwrap_or(0)) + 1;
    let span = tracing::info_span!("rebuild", projection = view.name(), generation);
    let _enter = span.enter();
    view.begin(generation)
        .await
        .map_err(ProjectionError::View)?;
    let started = Instant::now();
    let total = log.event_count().await.map_err(ProjectionError::Log)?;
    let mut applied = 0u64;
    let mut after = Position::START;
    // First pass: the log as it is; live projectors write new events to both generations
    // from the moment they see the build.
    loop {
        let n = replay(&*view, &log, generation, &mut after, options.batch_size).await?;
        if n == 0 {
            break;
        }
        applied += n as u64;
        progress(Progress {
            applied,
            total,
            elapsed: started.elapsed(),
        });
    }
    // Anything a live projector handled before it noticed the build reached only the old
    // generation; a last pass after the grace period covers it.
    tokio::time::sleep(options.grace).await;
    loop {
        let n = replay(&*view, &log, generation, &mut after, options.batch_size).await?;
        if n == 0 {
            break;
        }
        applied += n as u64;
    }
    view.switch(generation)
        .await
        .map_err(ProjectionError::View)?;
    progress(Progress {
        applied,
        total: Some(applied.max(total.unwrap_or(0))),
        elapsed: started.elapsed(),
    });
    tracing::info!(applied, "rebuild switched readers to the new generation");
    tokio::time::sleep(options.linger).await;
    if let Err(e) = view.drop_generation(state.active).await {
        tracing::warn!(error = %e, old = state.active, "dropping the old generation failed");
    }
    Ok(generation)
}

async fn replay(
    view: &dyn Generational,
    log: &Arc<dyn EventLog>,
    generation: u64,
    after: &mut Position,
    batch_size: usize,
) -> Result<usize, ProjectionError> {
    let query = LogQuery {
        after: Some(*after),
        limit: batch_size,
        ..LogQuery::default()
    };
    let events = log.read(&query).await.map_err(ProjectionError::Log)?;
    let Some(last) = events.last().map(|e| e.position) else {
        return Ok(0);
    };
    view.apply(generation, &events, None, log.clone()).await?;
    *after = last;
    Ok(events.len())
}
