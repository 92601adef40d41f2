//! The Prometheus metrics at `/metrics`, kept with `prometheus-client` and rendered in the
//! Prometheus text format (version 0.0.4).
//!
//! What requests and commands count is recorded as it happens, in counters and histograms
//! whose labels take a few known values each (`operation` is one of PCF's root fields or
//! `other`: [`operation`]). What the other parts of the process keep (projector, key and
//! rate-limit counters, pools) and what must be asked for (the relay backlog, the projectors'
//! lag, the dependencies) is read at each scrape ([`scraped`]).

pub mod operation;
mod scraped;

use pcf_adapters::keys::KeyStats;
use pcf_command::{EventStore, RelayConfig};
use pcf_domain::ports::CommandObserver;
use pcf_projectors::{ProjectorStats, ViewStore};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use super::health::Dependencies;
use super::ratelimit::Refusals;
use scraped::Sources;
pub use scraped::{pool_gauge, LagSource, PoolGauge};

/// The upper bounds (seconds) of every latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathOutcome {
    path: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandOutcome {
    command: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationOutcome {
    operation: &'static str,
    outcome: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new(BUCKETS)
}

/// A count and a latency histogram of the same label set: `<name>_total` and
/// `<name>_duration_seconds`.
struct Timed<L> {
    count: Family<L, Counter>,
    latency: Histograms<L>,
}

impl<L> Timed<L>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    fn register(registry: &mut Registry, name: &str, help: &str) -> Self {
        let count = Family::<L, Counter>::default();
        let latency = Histograms::<L>::new_with_constructor(latency as fn() -> Histogram);
        registry.register(name, help.to_owned(), count.clone());
        registry.register(
            format!("{name}_duration_seconds"),
            format!("{help}, by duration in seconds"),
            latency.clone(),
        );
        Self { count, latency }
    }

    fn record(&self, labels: &L, elapsed: Duration) {
        self.count.get_or_create(labels).inc();
        self.latency
            .get_or_create(labels)
            .observe(elapsed.as_secs_f64());
    }
}

/// Process-wide metrics.
pub struct Metrics {
    registry: Registry,
    http: Timed<PathOutcome>,
    commands: Timed<CommandOutcome>,
    operations: Timed<OperationOutcome>,
    sources: Arc<Sources>,
    /// One scrape at a time: each asks the event store and Kafka.
    scrape: tokio::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http = Timed::register(
            &mut registry,
            "pcf_http_requests",
            "HTTP requests, by path and outcome",
        );
        let commands = Timed::register(
            &mut registry,
            "pcf_commands",
            "Commands, by command and outcome (OK or the error code)",
        );
        let operations = Timed::register(
            &mut registry,
            "pcf_graphql_operations",
            "GraphQL operations over HTTP, by root field (other for any other) and outcome",
        );
        let sources = Arc::new(Sources::default());
        registry.register_collector(Box::new(sources.clone()));
        Self {
            registry,
            http,
            commands,
            operations,
            sources,
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    /// Records one finished HTTP request.
    pub fn http_request(&self, path: &'static str, outcome: &'static str, elapsed: Duration) {
        self.http.record(&PathOutcome { path, outcome }, elapsed);
    }

    /// Records one GraphQL request whose document was admitted (within PCF's document
    /// limits), whether it ran or the schema refused it, by its label from [`operation`].
    pub fn graphql_operation(
        &self,
        operation: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        self.operations
            .record(&OperationOutcome { operation, outcome }, elapsed);
    }

    /// Reports the personal-data keys' counters: the cache of unwrapped data keys (its hit
    /// rate is hits / (hits + misses)) and the events whose personal data did not open.
    pub fn watch_keys(&self, stats: Arc<KeyStats>) {
        *scraped::lock(&self.sources.keys) = Some(stats);
    }

    /// Reports the backlog of a relay of this process, and the age of its oldest event.
    pub fn watch_relay(&self, relay: RelayConfig, store: Arc<dyn EventStore>) {
        scraped::lock(&self.sources.relays).push((relay, store));
    }

    /// Reports a projector's counters, and its lag (in messages, and the age of the oldest
    /// message it has not applied) by generation of `view` when `lag_source` names
    /// (brokers, topic, group).
    pub fn watch_projector(
        &self,
        view: Arc<dyn ViewStore>,
        stats: Arc<ProjectorStats>,
        lag_source: Option<LagSource>,
    ) {
        scraped::lock(&self.sources.projectors).push(scraped::WatchedProjector {
            view,
            stats,
            lag_source,
            generations: Default::default(),
        });
    }

    /// Reports a connection pool's size, idle connections and maximum under `name`.
    pub fn watch_pool(&self, name: &str, pool: PoolGauge) {
        scraped::lock(&self.sources.pools).push((name.to_owned(), pool));
    }

    /// Reports how many point reads fell back from Redis to the read replicas.
    pub fn watch_redis_fallbacks(&self, count: Arc<AtomicU64>) {
        *scraped::lock(&self.sources.fallbacks) = Some(count);
    }

    /// Reports the requests the rate limits refused.
    pub fn watch_rate_limits(&self, refusals: Arc<Refusals>) {
        *scraped::lock(&self.sources.refusals) = Some(refusals);
    }

    /// Everything in the Prometheus text format, with what is asked for at each scrape
    /// measured now, `dependencies` among it.
    pub async fn render(&self, dependencies: &Dependencies) -> String {
        let _one = self.scrape.lock().await;
        self.sources.measure(dependencies).await;
        self.encode()
    }

    /// The registry as it stands, without measuring anything.
    fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

impl CommandObserver for Metrics {
    fn command_finished(&self, command: &'static str, outcome: &'static str, elapsed: Duration) {
        self.commands
            .record(&CommandOutcome { command, outcome }, elapsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn renders_counters_and_histograms_by_label() {
        let m = Metrics::new();
        m.command_finished("createUser", "OK", Duration::from_millis(3));
        m.command_finished("createUser", "EMAIL_TAKEN", Duration::from_millis(1));
        m.command_finished("createUser", "OK", Duration::from_millis(30));
        let text = m.encode();
        assert!(text.contains("# TYPE pcf_commands_total counter"), "{text}");
        assert!(
            text.contains("pcf_commands_total{command=\"createUser\",outcome=\"OK\"} 2"),
            "{text}"
        );
        assert!(text.contains("# TYPE pcf_commands_duration_seconds histogram"));
        assert!(text.contains(
            "pcf_commands_duration_seconds_bucket{command=\"createUser\",outcome=\"OK\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "pcf_commands_duration_seconds_bucket{command=\"createUser\",outcome=\"OK\",le=\"+Inf\"} 2"
        ));
        assert!(text.contains(
            "pcf_commands_duration_seconds_count{command=\"createUser\",outcome=\"EMAIL_TAKEN\"} 1"
        ));
    }

    #[test]
    fn graphql_operations_are_counted_and_timed_by_operation_and_outcome() {
        let m = Metrics::new();
        m.graphql_operation("user", "ok", Duration::from_millis(2));
        m.graphql_operation(operation::OTHER, "error", Duration::from_millis(700));
        let text = m.encode();
        assert!(
            text.contains("pcf_graphql_operations_total{operation=\"user\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains(
            "pcf_graphql_operations_duration_seconds_bucket{operation=\"other\",outcome=\"error\",le=\"0.5\"} 0"
        ));
        assert!(text.contains(
            "pcf_graphql_operations_duration_seconds_bucket{operation=\"other\",outcome=\"error\",le=\"1\"} 1"
        ));
    }

    #[tokio::test]
    async fn counters_kept_elsewhere_are_read_at_each_scrape() {
        let m = Metrics::new();
        let keys = Arc::new(KeyStats::default());
        let fallbacks = Arc::new(AtomicU64::new(0));
        let refusals = Arc::new(Refusals::default());
        m.watch_keys(keys.clone());
        m.watch_redis_fallbacks(fallbacks.clone());
        m.watch_rate_limits(refusals.clone());
        keys.cache_hits.fetch_add(5, Ordering::Relaxed);
        fallbacks.fetch_add(2, Ordering::Relaxed);
        refusals.premium.fetch_add(3, Ordering::Relaxed);
        let text = m.render(&Dependencies::default()).await;
        for line in [
            "pcf_data_key_cache_hits_total 5",
            "pcf_data_key_cache_misses_total 0",
            "pcf_redis_fallback_reads_total 2",
            "pcf_rate_limit_refusals_total{limit=\"premium\"} 3",
            "pcf_rate_limit_refusals_total{limit=\"anonymous\"} 0",
            "pcf_ready 1",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
        // What is not watched is not reported.
        assert!(!text.contains("pcf_relay_backlog_events"), "{text}");
        assert!(!text.contains("pcf_db_pool"), "{text}");
    }
}
