//! A small Prometheus registry: counters and latency histograms by label, rendered in the
//! text exposition format at `/metrics`.

use pcf_adapters::keys::KeyStats;
use pcf_command::{EventStore, RelayConfig};
use pcf_domain::ports::CommandObserver;
use pcf_projectors::ProjectorStats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// Label names and values; every value is one of a few known words, so none is allocated.
type Labels = Vec<(&'static str, &'static str)>;

/// Each histogram's count is also its counter (`…_total`).
#[derive(Default)]
struct Registry {
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
}

/// brokers, topic, consumer group.
type LagSource = (String, String, String);

/// A Kafka projection whose lag is reported.
struct WatchedProjector {
    name: String,
    stats: Arc<ProjectorStats>,
    /// brokers, topic, consumer group
    lag_source: Option<LagSource>,
}

/// Process-wide metrics.
#[derive(Default)]
pub struct Metrics {
    registry: Mutex<Registry>,
    relays: Mutex<Vec<(RelayConfig, Arc<dyn EventStore>)>>,
    projectors: Mutex<Vec<WatchedProjector>>,
    keys: Mutex<Option<Arc<KeyStats>>>,
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
    pub fn http_request(&self, path: &'static str, outcome: &'static str, elapsed: Duration) {
        self.observe(
            "pcf_http_requests",
            vec![("path", path), ("outcome", outcome)],
            elapsed,
        );
    }

    /// Reports the backlog of a relay of this process.
    /// Reports the personal-data keys' counters: the cache of unwrapped data keys (its hit
    /// rate is hits / (hits + misses)) and the events whose personal data did not open.
    pub fn watch_keys(&self, stats: Arc<KeyStats>) {
        *self.keys.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
    }

    pub fn watch_relay(&self, relay: RelayConfig, store: Arc<dyn EventStore>) {
        self.relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((relay, store));
    }

    /// Reports a projector's counters, and its consumer lag when `lag_source` names
    /// (brokers, topic, group).
    pub fn watch_projector(
        &self,
        name: &str,
        stats: Arc<ProjectorStats>,
        lag_source: Option<LagSource>,
    ) {
        self.projectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(WatchedProjector {
                name: name.to_owned(),
                stats,
                lag_source,
            });
    }

    /// Gauges read at scrape time: relay backlog, projector counters and lag.
    /// The key counters (`watch_keys`).
    fn render_keys(&self, out: &mut String) {
        let Some(stats) = self.keys.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        let counters = [
            ("pcf_data_key_cache_hits_total", &stats.cache_hits),
            ("pcf_data_key_cache_misses_total", &stats.cache_misses),
            (
                "pcf_personal_data_integrity_errors_total",
                &stats.integrity_errors,
            ),
        ];
        for (metric, counter) in counters {
            let n = counter.load(Ordering::Relaxed);
            let _ = writeln!(out, "# TYPE {metric} counter\n{metric} {n}");
        }
    }

    async fn render_gauges(&self, out: &mut String) {
        self.render_keys(out);
        let relays: Vec<(RelayConfig, Arc<dyn EventStore>)> = self
            .relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !relays.is_empty() {
            let _ = writeln!(out, "# TYPE pcf_relay_backlog_events gauge");
        }
        for (relay, store) in relays {
            let backlog = match store.load_checkpoint(&relay.name).await {
                Ok(cp) => store.count_after(cp).await.ok(),
                Err(_) => None,
            };
            if let Some(n) = backlog {
                let _ = writeln!(
                    out,
                    "pcf_relay_backlog_events{{relay=\"{}\"}} {n}",
                    relay.name
                );
            }
        }
        let projectors: Vec<(String, Arc<ProjectorStats>, Option<LagSource>)> = self
            .projectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|p| (p.name.clone(), p.stats.clone(), p.lag_source.clone()))
            .collect();
        if projectors.is_empty() {
            return;
        }
        type Counter = fn(&ProjectorStats) -> &AtomicU64;
        let counters: [(&str, Counter); 2] = [
            ("pcf_projector_applied_events_total", |s| &s.applied),
            ("pcf_projector_dead_letters_total", |s| &s.dead_lettered),
        ];
        for (metric, counter) in counters {
            let _ = writeln!(out, "# TYPE {metric} counter");
            for (name, stats, _) in &projectors {
                let n = counter(stats).load(Ordering::Relaxed);
                let _ = writeln!(out, "{metric}{{projection=\"{name}\"}} {n}");
            }
        }
        let _ = writeln!(out, "# TYPE pcf_projector_lag_messages gauge");
        for (name, _, source) in &projectors {
            let Some((brokers, topic, group)) = source else {
                continue;
            };
            let lag = tokio::time::timeout(
                Duration::from_secs(3),
                pcf_projectors::consumer_lag(brokers, topic, group),
            )
            .await;
            if let Ok(Ok(partitions)) = lag {
                for p in partitions {
                    let _ = writeln!(
                        out,
                        "pcf_projector_lag_messages{{projection=\"{name}\",partition=\"{}\"}} {}",
                        p.partition, p.lag
                    );
                }
            }
        }
    }

    /// Everything in Prometheus text format.
    pub async fn render(&self) -> String {
        let mut out = self.render_registry();
        self.render_gauges(&mut out).await;
        out
    }

    /// The counters and histograms.
    pub fn render_registry(&self) -> String {
        let r = self.lock();
        let mut out = String::new();
        let mut last = "";
        for ((name, labels), h) in &r.histograms {
            if *name != last {
                let _ = writeln!(out, "# TYPE {name}_total counter");
                last = name;
            }
            let _ = writeln!(out, "{name}_total{} {}", fmt_labels(labels, None), h.count);
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
            vec![("command", command), ("outcome", outcome)],
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
        let text = m.render_registry();
        assert!(text.contains("pcf_commands_total{command=\"createUser\",outcome=\"OK\"} 2"));
        assert!(text.contains(
            "pcf_commands_duration_seconds_bucket{command=\"createUser\",outcome=\"OK\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "pcf_commands_duration_seconds_count{command=\"createUser\",outcome=\"EMAIL_TAKEN\"} 1"
        ));
    }
}
