//! `pcf bench`: each scenario measured side by side with a baseline in the same run, on the
//! same services, with the same client; the figure that matters is the ratio.

mod client;
mod load;
mod scenarios;

use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

pub use load::Measurement;

use pcf::config::Config;

/// How `pcf bench` runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub warmup: Duration,
    pub duration: Duration,
    pub concurrency: usize,
    /// Throughput scenarios alternate with their baselines in this many rounds.
    pub rounds: u32,
    /// Users created for the `updateProfile` and query scenarios.
    pub users: usize,
    /// Events in the log for the rebuild scenario.
    pub rebuild_events: u64,
    /// Events the republish scenario publishes (the first of the log, seeded if needed).
    pub republish_events: u64,
    /// Commit -> visible runs once at each of these fractions of the maximum command rate.
    pub visible_loads: Vec<f64>,
    /// Only these scenarios (all when empty).
    pub only: Vec<String>,
    pub out: Option<PathBuf>,
    /// Keep what the run created (database, topics, groups, Redis keys).
    pub keep: bool,
}

/// One scenario: the subject, its baseline and how they compare.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub metric: String,
    pub subject: Measurement,
    pub baseline_name: String,
    pub baseline: Measurement,
    /// The figure the target applies to.
    pub ratio: f64,
    pub target: String,
    /// Whether the target is met; none for a row that only gives context (no target).
    pub met: Option<bool>,
}

/// Runs the benchmark and prints the table (and writes JSON when asked).
pub async fn run(config: Config, options: BenchOptions) -> anyhow::Result<()> {
    let results = scenarios::run_all(config, &options).await?;
    let width = results.iter().map(|r| r.scenario.len()).max().unwrap_or(0);
    println!();
    println!(
        "{:<width$} {:>12} {:>12} {:>10} {:>10} {:>10} {:>9}  {:<36} {:>8}  {:<14} met",
        "scenario",
        "subject",
        "baseline",
        "p50 ms",
        "p99 ms",
        "max ms",
        "idle %",
        "baseline",
        "ratio",
        "target"
    );
    for r in &results {
        let (s, b) = match r.metric.as_str() {
            "p99" => (
                format!("{:.2} ms", r.subject.p99_ms),
                format!("{:.2} ms", r.baseline.p99_ms),
            ),
            _ => (
                format!("{:.0}/s", r.subject.throughput),
                format!("{:.0}/s", r.baseline.throughput),
            ),
        };
        // The machine's idle share while the subject and while the baseline ran.
        let idle = match (
            r.subject.machine_idle_percent,
            r.baseline.machine_idle_percent,
        ) {
            (Some(s), Some(b)) => format!("{s:.0} / {b:.0}"),
            _ => "-".to_owned(),
        };
        println!(
            "{:<width$} {:>12} {:>12} {:>10.2} {:>10.2} {:>10.2} {:>9}  {:<36} {:>8.2}  {:<14} {}",
            r.scenario,
            s,
            b,
            r.subject.p50_ms,
            r.subject.p99_ms,
            r.subject.max_ms,
            idle,
            r.baseline_name,
            r.ratio,
            r.target,
            match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
    }
    if let Some(path) = &options.out {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
        println!("\nwritten to {}", path.display());
    }
    Ok(())
}
