//! What `/metrics` reads at each scrape: counters the other parts of the process keep
//! (projectors, data keys, rate limits, Redis fallbacks), the connection pools, and what
//! must be asked for (the relay backlog from the event store, the projectors' lag from
//! Kafka, the dependencies' readiness). The asking is done first (`Sources::measure`,
//! async); the encoding then reads what it found.

use chrono::Utc;
use pcf_adapters::keys::KeyStats;
use pcf_command::{Backlog, EventStore, RelayConfig};
use pcf_projectors::{ProjectorStats, ViewStore};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::http::health::Dependencies;
use crate::http::ratelimit::Refusals;

/// brokers, topic, consumer group.
pub type LagSource = (String, String, String);

/// Reads a connection pool: (connections open, of which idle, the most it opens).
pub type PoolGauge = Box<dyn Fn() -> (u32, u32, u32) + Send + Sync>;

/// The reading of a sqlx pool.
pub fn pool_gauge<DB: sqlx::Database>(pool: sqlx::Pool<DB>) -> PoolGauge {
    Box::new(move || {
        let size = pool.size();
        let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX).min(size);
        (size, idle, pool.options().get_max_connections())
    })
}

/// How long a scrape waits for the lag of one projection, and for the first message it
/// has not applied on each partition.
const LAG_TIMEOUT: Duration = Duration::from_secs(4);
const OLDEST_PATIENCE: Duration = Duration::from_secs(2);
/// How long a scrape waits for a view's store to say which generations it has.
const STATE_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Kafka projection whose counters and lag are reported.
pub(super) struct WatchedProjector {
    pub view: Arc<dyn ViewStore>,
    pub stats: Arc<ProjectorStats>,
    pub lag_source: Option<LagSource>,
    /// The generations the live stream wrote at the last look (kept while the view's store
    /// does not answer).
    pub generations: Arc<Mutex<Vec<u64>>>,
}

/// What a scrape needs of a watched projector: its view, where its lag is read, the
/// generations last seen.
type Watched = (Arc<dyn ViewStore>, Option<LagSource>, Arc<Mutex<Vec<u64>>>);

/// One partition's lag of one projection, as measured.
struct PartitionLag {
    projection: String,
    partition: i32,
    messages: i64,
    /// Seconds since the oldest waiting message's event was recorded; 0 with none
    /// waiting, `None` when it could not be read.
    age: Option<f64>,
}

/// What the last scrape asked for.
#[derive(Default)]
struct Measured {
    relays: Vec<(String, Backlog)>,
    lag: Vec<PartitionLag>,
    /// Each projection's generations, for the lag's `generation` label.
    generations: BTreeMap<String, Vec<u64>>,
    dependencies: Vec<(&'static str, bool)>,
    /// Whether `GET /health/ready` would answer 200: no dependency down (one degraded, such
    /// as Redis with its fallback, leaves it ready).
    ready: bool,
}

/// Everything watched; registered as the registry's collector.
#[derive(Default)]
pub(super) struct Sources {
    pub keys: Mutex<Option<Arc<KeyStats>>>,
    pub relays: Mutex<Vec<(RelayConfig, Arc<dyn EventStore>)>>,
    pub projectors: Mutex<Vec<WatchedProjector>>,
    pub pools: Mutex<Vec<(String, PoolGauge)>>,
    pub fallbacks: Mutex<Option<Arc<AtomicU64>>>,
    pub refusals: Mutex<Option<Arc<Refusals>>>,
    measured: Mutex<Measured>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

impl Sources {
    /// Asks the event store, Kafka and the dependencies, concurrently.
    pub async fn measure(&self, dependencies: &Dependencies) {
        let relays: Vec<(RelayConfig, Arc<dyn EventStore>)> = lock(&self.relays).clone();
        let projectors: Vec<Watched> = lock(&self.projectors)
            .iter()
            .map(|p| (p.view.clone(), p.lag_source.clone(), p.generations.clone()))
            .collect();
        let relays =
            futures::future::join_all(relays.into_iter().map(|(relay, store)| async move {
                let backlog = match store.load_checkpoint(&relay.name).await {
                    Ok(checkpoint) => store.backlog_after(checkpoint).await.ok(),
                    Err(_) => None,
                };
                backlog.map(|b| (relay.name, b))
            }));
        let lags = futures::future::join_all(
            projectors
                .into_iter()
                .map(|(view, source, generations)| projector_lag(view, source, generations)),
        );
        let names = dependencies.names();
        let ready = async {
            let health = dependencies.health().await;
            let up = names
                .iter()
                .map(|name| {
                    (
                        *name,
                        !health.down.contains(name) && !health.degraded.contains(name),
                    )
                })
                .collect::<Vec<_>>();
            (up, health.down.is_empty())
        };
        let (relays, lags, (dependencies, ready)) = futures::join!(relays, lags, ready);
        let mut measured = Measured {
            relays: relays.into_iter().flatten().collect(),
            dependencies,
            ready,
            ..Measured::default()
        };
        for (projection, generations, partitions) in lags {
            measured.generations.insert(projection, generations);
            measured.lag.extend(partitions);
        }
        *lock(&self.measured) = measured;
    }
}

/// A projection's generations and its lag on each partition.
async fn projector_lag(
    view: Arc<dyn ViewStore>,
    source: Option<LagSource>,
    generations: Arc<Mutex<Vec<u64>>>,
) -> (String, Vec<u64>, Vec<PartitionLag>) {
    let name = view.name().to_owned();
    let read_lag = async {
        let (brokers, topic, group) = source?;
        let read = pcf_projectors::consumer_lag_with_age(&brokers, &topic, &group, OLDEST_PATIENCE);
        tokio::time::timeout(LAG_TIMEOUT, read).await.ok()?.ok()
    };
    // Both at once: the view's store and Kafka may each be slow to answer.
    let (state, partitions) =
        futures::join!(tokio::time::timeout(STATE_TIMEOUT, view.state()), read_lag);
    // The live stream writes every target generation: the active one, and the one a
    // rebuild is writing.
    if let Ok(Ok(state)) = state {
        *lock(&generations) = state.targets();
    }
    let generations = lock(&generations).clone();
    let Some(partitions) = partitions else {
        return (name, generations, Vec::new());
    };
    let now = Utc::now();
    let lag = partitions
        .into_iter()
        .map(|(p, oldest)| PartitionLag {
            projection: name.clone(),
            partition: p.partition,
            messages: p.lag,
            age: if p.lag <= 0 {
                Some(0.0)
            } else {
                oldest.map(|at| ((now - at).num_milliseconds().max(0) as f64) / 1000.0)
            },
        })
        .collect();
    (name, generations, lag)
}

/// Encodes one metric family from its samples; nothing when there are none.
fn family<S: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (S, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn count(n: &AtomicU64) -> ConstCounter<u64> {
    ConstCounter::new(n.load(Ordering::Relaxed))
}

type NoLabels = [(&'static str, &'static str); 0];

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        use MetricType::{Counter, Gauge};
        if let Some(keys) = lock(&self.keys).clone() {
            for (name, help, n) in [
                (
                    "pcf_data_key_cache_hits",
                    "Data-key lookups answered from the cache of unwrapped keys.",
                    &keys.cache_hits,
                ),
                (
                    "pcf_data_key_cache_misses",
                    "Data-key lookups that unwrapped the key with the KEK.",
                    &keys.cache_misses,
                ),
                (
                    "pcf_personal_data_integrity_errors",
                    "Events whose sealed personal data did not open.",
                    &keys.integrity_errors,
                ),
            ] {
                family(e, name, help, Counter, [(NoLabels::default(), count(n))])?;
            }
        }
        let spans = &crate::telemetry::SPANS;
        for (name, help, n) in [
            (
                "pcf_trace_spans_exported",
                "Spans the OTLP collector accepted (PCF_OTLP_ENDPOINT).",
                &spans.exported,
            ),
            (
                "pcf_trace_spans_dropped",
                "Spans lost: the export queue was full, or the collector refused them or did not answer.",
                &spans.dropped,
            ),
        ] {
            family(e, name, help, Counter, [(NoLabels::default(), count(n))])?;
        }
        if let Some(n) = lock(&self.fallbacks).clone() {
            family(
                e,
                "pcf_redis_fallback_reads",
                "Point reads answered by the read replicas because Redis did not answer.",
                Counter,
                [(NoLabels::default(), count(&n))],
            )?;
        }
        if let Some(r) = lock(&self.refusals).clone() {
            let by_limit = [
                ("anonymous", &r.anonymous),
                ("authenticated", &r.authenticated),
                ("premium", &r.premium),
                ("failed_auth", &r.failed_auth),
            ];
            family(
                e,
                "pcf_rate_limit_refusals",
                "Requests refused by a rate limit (HTTP 429 or a RATE_LIMITED error), by limit.",
                Counter,
                by_limit.map(|(limit, n)| ([("limit", limit)], count(n))),
            )?;
        }
        self.encode_pools(e)?;
        self.encode_projectors(e)?;
        let measured = lock(&self.measured);
        family(
            e,
            "pcf_relay_backlog_events",
            "Committed events the relay has not published yet.",
            Gauge,
            measured.relays.iter().map(|(relay, b)| {
                (
                    [("relay", relay.as_str())],
                    ConstGauge::new(b.events as i64),
                )
            }),
        )?;
        family(
            e,
            "pcf_relay_oldest_unpublished_age_seconds",
            "Seconds since the oldest event the relay has not published was recorded (0 with none).",
            Gauge,
            measured.relays.iter().map(|(relay, b)| {
                ([("relay", relay.as_str())], ConstGauge::new(b.oldest_age_seconds))
            }),
        )?;
        encode_lag(e, &measured)?;
        {
            family(
                e,
                "pcf_dependency_up",
                "Whether a dependency answers its readiness check (1) or not (0).",
                Gauge,
                measured
                    .dependencies
                    .iter()
                    .map(|(name, up)| ([("dependency", *name)], ConstGauge::new(i64::from(*up)))),
            )?;
            let ready = measured.ready;
            family(
                e,
                "pcf_ready",
                "Whether GET /health/ready answers 200 (no dependency the process cannot serve without is down).",
                Gauge,
                [(NoLabels::default(), ConstGauge::new(i64::from(ready)))],
            )?;
        }
        Ok(())
    }
}

impl Sources {
    fn encode_pools(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pools = lock(&self.pools);
        let read: Vec<(&str, (u32, u32, u32))> = pools
            .iter()
            .map(|(name, gauge)| (name.as_str(), gauge()))
            .collect();
        family(
            e,
            "pcf_db_pool_connections",
            "Open database connections of a pool, in use or idle.",
            MetricType::Gauge,
            read.iter().flat_map(|(pool, (size, idle, _))| {
                [
                    (
                        [("pool", *pool), ("state", "in_use")],
                        ConstGauge::new(i64::from(size - idle)),
                    ),
                    (
                        [("pool", *pool), ("state", "idle")],
                        ConstGauge::new(i64::from(*idle)),
                    ),
                ]
            }),
        )?;
        family(
            e,
            "pcf_db_pool_max_connections",
            "The most connections a pool opens.",
            MetricType::Gauge,
            read.iter()
                .map(|(pool, (_, _, max))| ([("pool", *pool)], ConstGauge::new(i64::from(*max)))),
        )
    }

    fn encode_projectors(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let projectors = lock(&self.projectors);
        type Field = fn(&ProjectorStats) -> &AtomicU64;
        let counters: [(&str, &str, Field); 2] = [
            (
                "pcf_projector_applied_events",
                "Events a projector wrote to its view.",
                |s| &s.applied,
            ),
            (
                "pcf_projector_dead_letters",
                "Messages a projector sent to the dead-letter topic.",
                |s| &s.dead_lettered,
            ),
        ];
        for (name, help, field) in counters {
            family(
                e,
                name,
                help,
                MetricType::Counter,
                projectors
                    .iter()
                    .map(|p| ([("projection", p.view.name())], count(field(&p.stats)))),
            )?;
        }
        Ok(())
    }
}

/// The projectors' lag by projection, generation (each one the live stream writes) and
/// partition, in messages; and by projection and generation in seconds (the oldest waiting
/// message's, over the partitions).
fn encode_lag(e: &mut DescriptorEncoder, measured: &Measured) -> Result<(), std::fmt::Error> {
    let generations = |projection: &str| -> Vec<String> {
        match measured.generations.get(projection) {
            Some(g) if !g.is_empty() => g.iter().map(u64::to_string).collect(),
            _ => vec!["unknown".to_owned()],
        }
    };
    let mut messages = Vec::new();
    let mut seconds: BTreeMap<&str, Option<f64>> = BTreeMap::new();
    for p in &measured.lag {
        for generation in generations(&p.projection) {
            messages.push((
                vec![
                    ("projection", p.projection.clone()),
                    ("generation", generation),
                    ("partition", p.partition.to_string()),
                ],
                ConstGauge::new(p.messages),
            ));
        }
        // Unknown on any partition with messages waiting: the projection's age is unknown.
        let age = seconds.entry(p.projection.as_str()).or_insert(Some(0.0));
        *age = match (*age, p.age) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    family(
        e,
        "pcf_projector_lag_messages",
        "Messages on the topic a projection's consumer group has not applied, by partition.",
        MetricType::Gauge,
        messages,
    )?;
    let mut ages = Vec::new();
    for (projection, age) in seconds {
        let Some(age) = age else { continue };
        for generation in generations(projection) {
            ages.push((
                vec![
                    ("projection", projection.to_owned()),
                    ("generation", generation),
                ],
                ConstGauge::new(age),
            ));
        }
    }
    family(
        e,
        "pcf_projector_lag_seconds",
        "Seconds since the oldest event a projection has not applied was recorded (0 when it has applied all).",
        MetricType::Gauge,
        ages,
    )
}
