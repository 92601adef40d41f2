//! A small Prometheus registry: counters and latency histograms by label, rendered in the
//! text exposition format at `/metrics`.

use pcf_domain::ports::CommandObserver;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Registry {
    counters: BTreeMap<(&'static str, Labels), u64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
}

/// Process-wide metrics.
#[derive(Default)]
pub struct Metrics {
    registry: Mutex<Registry>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one occurrence and records its duration under `name`.
    pub fn observe(&self, name: &'static str, labels: Labels, elapsed: Duration) {
        let mut r = self.lock();
        *r.counters.entry((name, labels.clone())).or_default() += 1;
        let h = r.histograms.entry((name, labels)).or_default();
        let secs = elapsed.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Records one finished HTTP request.
    pub fn http_request(&self, path: &str, outcome: &str, elapsed: Duration) {
        self.observe(
            "pcf_http_requests",
            vec![("path", path.to_owned()), ("outcome", outcome.to_owned())],
            elapsed,
        );
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let r = self.lock();
        let mut out = String::new();
        let mut last = "";
        for ((name, labels), value) in &r.counters {
            if *name != last {
                let _ = writeln!(out, "# TYPE {name}_total counter");
                last = name;
            }
            let _ = writeln!(out, "{name}_total{} {value}", fmt_labels(labels, None));
        }
        last = "";
        for ((name, labels), h) in &r.histograms {
            let metric = format!("{name}_duration_seconds");
            if *name != last {
                let _ = writeln!(out, "# TYPE {metric} histogram");
                last = name;
            }
            for (i, bound) in BUCKETS.iter().enumerate() {
                let le = bound.to_string();
                let _ = writeln!(
                    out,
                    "{metric}_bucket{} {}",
                    fmt_labels(labels, Some(&le)),
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "{metric}_bucket{} {}",
                fmt_labels(labels, Some("+Inf")),
                h.count
            );
            let _ = writeln!(out, "{metric}_sum{} {}", fmt_labels(labels, None), h.sum);
            let _ = writeln!(
                out,
                "{metric}_count{} {}",
                fmt_labels(labels, None),
                h.count
            );
        }
        out
    }
}

fn fmt_labels(labels: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

impl CommandObserver for Metrics {
    fn command_finished(&self, command: &'static str, outcome: &'static str, elapsed: Duration) {
        self.observe(
            "pcf_commands",
            vec![
                ("command", command.to_owned()),
                ("outcome", outcome.to_owned()),
            ],
            elapsed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms_by_label() {
        let m = Metrics::new();
        m.command_finished("createUser", "OK", Duration::from_millis(3));
        m.command_finished("createUser", "EMAIL_TAKEN", Duration::from_millis(1));
        m.command_finished("createUser", "OK", Duration::from_millis(30));
        let text = m.render();
        assert!(text.contains("pcf_commands_total{command=\"createUser\",outcome=\"OK\"} 2"));
        assert!(text.contains(
            "pcf_commands_duration_seconds_bucket{command=\"createUser\",outcome=\"OK\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "pcf_commands_duration_seconds_count{command=\"createUser\",outcome=\"EMAIL_TAKEN\"} 1"
        ));
    }
}
