//! Bounded waits: poll a check until it holds, or fail the test naming what it waited for.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Polls `check` until it succeeds; panics with its last complaint after `timeout`. The pause
/// between attempts grows from 10 ms to 250 ms.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    poll(
        timeout,
        what,
        Duration::from_millis(10),
        Duration::from_millis(250),
        check,
    )
    .await
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout`; for checks
/// that also make progress (a relay step), which a growing pause would slow down.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let pause = Duration::from_millis(20);
    poll(timeout, what, pause, pause, || {
        let attempt = check();
        async move { attempt.await.ok_or_else(|| "not yet".to_owned()) }
    })
    .await
}

async fn poll<T, F, Fut>(
    timeout: Duration,
    what: &str,
    first_pause: Duration,
    longest_pause: Duration,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let deadline = started + timeout;
    let mut pause = first_pause;
    let mut complaints: Vec<(Duration, String)> = Vec::new();
    loop {
        match check().await {
            Ok(v) => {
                if started.elapsed() > Duration::from_secs(5) {
                    // Slow but in time: say what it was waiting on, for whoever tunes this.
                    eprintln!(
                        "waited {:?} for {what}; complaints seen: {complaints:?}",
                        started.elapsed()
                    );
                }
                return v;
            }
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
                }
                if complaints.last().is_none_or(|(_, c)| *c != last) {
                    complaints.push((started.elapsed(), last));
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(longest_pause);
    }
}

/// Waits, if need be, until the current fixed one-minute rate-limit window has at least
/// `needed` seconds left, so that a burst of requests falls into one window.
pub async fn fresh_window(needed: u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970");
    let into = now.as_secs() % 60;
    if 60 - into < needed {
        let to_next =
            Duration::from_secs(60 - into) - Duration::from_nanos(now.subsec_nanos().into());
        tokio::time::sleep(to_next + Duration::from_millis(200)).await;
    }
}
