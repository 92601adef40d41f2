//! Pauses between the attempts of a step that failed on a dependency that may answer later
//! (a database that restarts, the key table, a deadlock with another writer).

use std::time::Duration;

use crate::projection::ProjectionError;

/// How often a step is tried before it gives up.
const ATTEMPTS: u32 = 6;

/// Up to `ATTEMPTS` tries with growing pauses (0.1 s to 1.6 s), so that a dependency that
/// restarts costs a pause, not the work done so far. An event that cannot be applied is not
/// tried again.
pub(crate) struct Retry {
    tries: u32,
    pause: Duration,
}

impl Retry {
    pub(crate) fn new() -> Self {
        Self {
            tries: 1,
            pause: Duration::from_millis(100),
        }
    }

    /// After a failed attempt: waits and returns `Ok` when another attempt is due, else the
    /// error.
    pub(crate) async fn after(
        &mut self,
        what: &str,
        e: ProjectionError,
    ) -> Result<(), ProjectionError> {
        if self.tries >= ATTEMPTS || !e.is_transient() {
            return Err(e);
        }
        tracing::warn!(error = %e, what, tries = self.tries, "projection step failed; trying again");
        tokio::time::sleep(self.pause).await;
        self.pause *= 2;
        self.tries += 1;
        Ok(())
    }
}

/// Runs `attempt` until it succeeds, as `Retry` allows.
pub(crate) async fn patiently<T, F, Fut>(what: &str, mut attempt: F) -> Result<T, ProjectionError>
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
