//! The load generator: closed loop (N workers back to back) for throughput, open loop (a
//! fixed arrival rate, latency counted from the planned start, so a slow server cannot hide
//! its queue) for latency. Latencies go into an HDR histogram.

use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One operation; its argument counts up from 0 across all workers.
pub type Op = Arc<dyn Fn(u64) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The share of the machine's CPU time left idle over the measured seconds, where it
    /// was measured (Linux).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_idle_percent: Option<f64>,
}

impl Measurement {
    pub fn from_histogram(h: &Histogram<u64>, errors: u64, elapsed: Duration) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        let seconds = elapsed.as_secs_f64();
        Self {
            ops: h.len(),
            errors,
            seconds,
            throughput: if seconds > 0.0 {
                h.len() as f64 / seconds
            } else {
                0.0
            },
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            machine_idle_percent: None,
        }
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Settles one operation's result: a failure counts as an error when it falls in the measured
/// window (the run's first failure is logged); true when it succeeded there and its latency is
/// to be recorded.
fn settle(result: &anyhow::Result<()>, errors: &AtomicU64, measured: bool) -> bool {
    match result {
        Ok(()) => measured,
        Err(e) => {
            if errors.load(Ordering::Relaxed) == 0 {
                tracing::warn!(error = %e, "first failed operation");
            }
            if measured {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            false
        }
    }
}

/// Microseconds since `since`, at least 1 (the histogram's lowest value).
fn micros_since(since: Instant) -> u64 {
    since.elapsed().as_micros().max(1) as u64
}

/// What the workers recorded, together.
fn merged_histogram(merged: &Mutex<Histogram<u64>>) -> Histogram<u64> {
    merged
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram())
}

/// Runs `op` from `concurrency` workers for `warmup` (not recorded) then `duration`.
pub async fn closed_loop(
    op: Op,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Measurement {
    let counter = Arc::new(AtomicU64::new(0));
    let (h, errors) = closed_loop_histogram(op, &counter, concurrency, warmup, duration).await;
    Measurement::from_histogram(&h, errors, duration)
}

/// A subject and its baseline measured in alternating rounds, each `duration / rounds`
/// long after a warm-up (the full `warmup` before the first round of each, a short one
/// after): whatever drifts on a shared machine during the run (the database's background
/// work, the other processes) falls on both alike. Returns (subject, baseline).
pub async fn interleaved(
    subject: Op,
    baseline: Op,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    rounds: u32,
) -> (Measurement, Measurement) {
    let rounds = rounds.max(1);
    let slice = duration / rounds;
    let mut merged = [histogram(), histogram()];
    let mut errors = [0u64, 0u64];
    // Each op's argument keeps counting across rounds (ops derive unique values from it).
    let counters = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    for round in 0..rounds {
        let warm = if round == 0 {
            warmup
        } else {
            warmup.min(Duration::from_millis(500))
        };
        for (i, op) in [&subject, &baseline].into_iter().enumerate() {
            let (h, e) =
                closed_loop_histogram(op.clone(), &counters[i], concurrency, warm, slice).await;
            let _ = merged[i].add(&h);
            errors[i] += e;
        }
    }
    let elapsed = slice * rounds;
    (
        Measurement::from_histogram(&merged[0], errors[0], elapsed),
        Measurement::from_histogram(&merged[1], errors[1], elapsed),
    )
}

async fn closed_loop_histogram(
    op: Op,
    counter: &Arc<AtomicU64>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> (Histogram<u64>, u64) {
    let errors = Arc::new(AtomicU64::new(0));
    let merged = Arc::new(Mutex::new(histogram()));
    let start = Instant::now();
    let record_from = start + warmup;
    let end = record_from + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let op = op.clone();
        let counter = counter.clone();
        let errors = errors.clone();
        let merged = merged.clone();
        workers.push(tokio::spawn(async move {
            let mut h = histogram();
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let result = op(n).await;
                if settle(&result, &errors, began >= record_from) {
                    let _ = h.record(micros_since(began));
                }
            }
            let _ = merged.lock().map(|mut m| m.add(&h));
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let h = merged_histogram(&merged);
    (h, errors.load(Ordering::Relaxed))
}

/// The time between two planned operations of `open_loop` at `rate`: operation n is
/// planned at n intervals after the start.
pub fn interval(rate: f64) -> Duration {
    Duration::from_secs_f64(1.0 / rate.max(1.0))
}

/// Starts `op` at a fixed `rate` per second for `warmup` then `duration`; each latency
/// runs from the planned start time. The measurement also says how much of the machine's
/// CPU was idle over the measured seconds.
pub async fn open_loop(op: Op, rate: f64, warmup: Duration, duration: Duration) -> Measurement {
    let idle = tokio::spawn(machine_idle(warmup, duration));
    let interval = interval(rate);
    let errors = Arc::new(AtomicU64::new(0));
    let merged = Arc::new(Mutex::new(histogram()));
    let start = Instant::now();
    let record_from = start + warmup;
    let end = record_from + duration;
    let mut tasks = Vec::new();
    let mut n = 0u64;
    loop {
        let planned = start + interval * n as u32;
        if planned >= end {
            break;
        }
        tokio::time::sleep_until(planned.into()).await;
        let op = op.clone();
        let errors = errors.clone();
        let merged = merged.clone();
        let i = n;
        tasks.push(tokio::spawn(async move {
            let result = op(i).await;
            if settle(&result, &errors, planned >= record_from) {
                let us = micros_since(planned);
                let _ = merged.lock().map(|mut h| h.record(us));
            }
        }));
        n += 1;
    }
    for t in tasks {
        let _ = t.await;
    }
    let h = merged_histogram(&merged);
    let mut measured = Measurement::from_histogram(&h, errors.load(Ordering::Relaxed), duration);
    measured.machine_idle_percent = idle.await.ok().flatten();
    measured
}

/// The machine's idle share of CPU time (idle and I/O wait, all CPUs) from `after` on, for
/// `during`: how much room the machine had left while a measurement ran. None where there
/// is no `/proc/stat`.
async fn machine_idle(after: Duration, during: Duration) -> Option<f64> {
    tokio::time::sleep(after).await;
    let (idle0, total0) = cpu_times()?;
    tokio::time::sleep(during).await;
    let (idle1, total1) = cpu_times()?;
    idle_percent(idle1.saturating_sub(idle0), total1.saturating_sub(total0))
}

/// `idle` CPU time as a share of `total`, in percent; none for no time at all.
pub fn idle_percent(idle: u64, total: u64) -> Option<f64> {
    (total > 0).then(|| 100.0 * idle as f64 / total as f64)
}

/// The machine's idle and total CPU time so far (`/proc/stat`), to take the idle share of
/// a stretch that is timed elsewhere. None where there is no `/proc/stat`.
pub fn cpu_times() -> Option<(u64, u64)> {
    idle_and_total(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Idle and total CPU time from `/proc/stat`'s first line (`cpu user nice system idle
/// iowait irq softirq steal guest guest_nice`). Guest time is part of user time already, so
/// the total stops at steal, which counts as busy: the machine was not ours then.
fn idle_and_total(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let times: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let idle = times.get(3)? + times.get(4).copied().unwrap_or(0);
    Some((idle, times.iter().sum()))
}

/// A histogram of latencies measured elsewhere (for scenarios that time themselves).
#[derive(Clone)]
pub struct Recorder(Arc<Mutex<Histogram<u64>>>);

impl Default for Recorder {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(histogram())))
    }
}

impl Recorder {
    pub fn record(&self, latency: Duration) {
        let _ = self
            .0
            .lock()
            .map(|mut h| h.record(latency.as_micros().max(1) as u64));
    }

    pub fn measurement(&self, elapsed: Duration) -> Measurement {
        let h = self
            .0
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| histogram());
        Measurement::from_histogram(&h, 0, elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::idle_and_total;

    #[test]
    fn idle_time_is_idle_and_io_wait_out_of_all_but_guest_time() {
        let stat = "cpu  100 5 50 800 20 3 7 15 40 0\ncpu0 50 2 25 400 10 1 3 8 20 0\n";
        assert_eq!(idle_and_total(stat), Some((820, 1000)));
        assert_eq!(idle_and_total("intr 1 2 3\n"), None);
        assert_eq!(idle_and_total("cpu  1 2 x 4\n"), None);
    }
}
