//! Cluster mode: PostgreSQL event store, Kafka, the SQL view on the primary read from the
//! replicas, and the Redis view when configured. Each role starts only what it needs: the
//! relay publishes to Kafka, the projectors consume it, the API reads the views.

use anyhow::Context;
use pcf_command::kafka::{ensure_topics, KafkaConfig, KafkaPublisher};
use pcf_command::Relay;
use pcf_domain::ports::{EventPublisher, ProjectionMonitor, UserReader};
use pcf_projectors::{
    ConsumerConfig, KafkaProjector, Projection, ProjectorStats, RedisUserViews, SqlUserViews,
    ViewStore,
};
use pcf_query::{FallbackReader, RedisUserReader, SqlUserReader};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use super::background::relay_config;
use super::monitor::KafkaMonitor;
use super::primary::split_hosts;
use super::process::{Process, ReadSide};
use super::roles::Role;
use super::store::{lazy_pg_pool, pg_pool};
use crate::http::health::Dependency;
use crate::http::metrics::pool_gauge;

/// Starts the relay and the projectors the roles ask for, and opens the readers.
pub async fn read_side(p: &mut Process<'_>, kafka: KafkaConfig) -> anyhow::Result<ReadSide> {
    let Some(primary) = p.primary.clone() else {
        anyhow::bail!("Kafka needs the PostgreSQL event store: set PCF_DATABASE_URL");
    };
    let publisher =
        Arc::new(KafkaPublisher::new(kafka.clone()).context("creating the Kafka producer")?);
    p.dependencies.add(Dependency::Kafka(publisher.clone()));
    let topics_ready = create_topics(p, &kafka);
    if p.has(Role::Relay) {
        let relay_publisher: Arc<dyn EventPublisher> = publisher;
        let relay = Relay::new(p.store.clone(), relay_publisher, relay_config(p.config));
        p.metrics
            .watch_relay(relay_config(p.config), p.store.clone());
        let stopped = p.stopped();
        p.spawn(relay.run(stopped));
        // During a topic switch: the same events to the extra topics.
        super::extra_topics::start_relays(p, &kafka)?;
    }
    // Redis is connected to on first use, not here: a process starts while Redis is down
    // (the Redis projector waits for it; reads fall back to the replicas).
    let redis_views = match &p.config.redis_url {
        Some(url) => Some(
            RedisUserViews::connect_lazily(url, p.config.redis_prefix.clone())
                .context("PCF_REDIS_URL")?,
        ),
        None => None,
    };
    let pool_size = if p.has(Role::Projector) { 16 } else { 2 };
    let primary = primary
        .pool(pool_size, "the SQL view (PCF_DATABASE_URL)", None)
        .await?;
    p.metrics
        .watch_pool("sql_view", pool_gauge(primary.clone()));
    let mut views: Vec<(Arc<dyn ViewStore>, Option<RedisUserViews>)> =
        vec![(Arc::new(SqlUserViews::new(primary)), None)];
    if let Some(redis) = redis_views {
        // The Redis projector waits for its server before it consumes.
        views.push((Arc::new(redis.clone()), Some(redis)));
    }
    let monitor: Arc<dyn ProjectionMonitor> = Arc::new(KafkaMonitor {
        views: views.iter().map(|(v, _)| v.clone()).collect(),
        brokers: kafka.brokers.clone(),
        topic: kafka.topic.clone(),
        group_prefix: p.config.kafka_group_prefix.clone(),
    });
    if p.has(Role::Projector) {
        for (view, redis) in views {
            start_projector(p, &kafka, view, redis, topics_ready.clone())?;
        }
    }
    let users = readers(p).await?;
    Ok(ReadSide { users, monitor })
}

/// Creates the topics in the background, retried until Kafka answers, so a process starts
/// promptly while Kafka is down; projectors subscribe once the topics exist (the relay backs
/// off on its own until then). The flag turns true when they exist.
fn create_topics(p: &mut Process<'_>, kafka: &KafkaConfig) -> watch::Receiver<bool> {
    let (ready_tx, ready) = watch::channel(false);
    if !(p.has(Role::Relay) || p.has(Role::Projector)) {
        return ready;
    }
    let topics = kafka.clone();
    let mut stop = p.shutdown.clone();
    p.spawn(async move {
        let mut pause = Duration::from_millis(200);
        let mut failures = pcf_adapters::Repeats::new(pcf_adapters::repeats::DEFAULT_EVERY);
        loop {
            match ensure_topics(&topics).await {
                Ok(()) => {
                    let _ = ready_tx.send(true);
                    return;
                }
                Err(e) => {
                    if let Some(repeats) = failures.admit() {
                        tracing::warn!(error = %e, repeats, "could not create the Kafka topics yet; retrying");
                    }
                }
            }
            if super::background::stopped_during(&mut stop, pause).await {
                return;
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    });
    ready
}

/// Starts the projector of `view` once the topics exist (and, for the Redis view, once Redis
/// answers).
fn start_projector(
    p: &mut Process<'_>,
    kafka: &KafkaConfig,
    view: Arc<dyn ViewStore>,
    redis: Option<RedisUserViews>,
    mut topics_ready: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut consumer = ConsumerConfig::new(kafka.brokers.clone(), kafka.topic.clone());
    consumer.group_prefix = p.config.kafka_group_prefix.clone();
    if let Some(wait) = view.batch_wait() {
        consumer.batch_wait = wait;
    }
    let stats = Arc::new(ProjectorStats::default());
    p.metrics.watch_projector(
        view.clone(),
        stats.clone(),
        Some((
            kafka.brokers.clone(),
            kafka.topic.clone(),
            format!("{}{}", p.config.kafka_group_prefix, view.name()),
        )),
    );
    let projection = Arc::new(Projection::new(view, p.log.clone()).with_opener(p.keys.clone()));
    let projector =
        KafkaProjector::new(consumer, projection, stats).context("creating a Kafka consumer")?;
    let stop = p.stopped();
    p.spawn(async move {
        tokio::pin!(stop);
        tokio::select! {
            _ = &mut stop => return,
            ok = topics_ready.wait_for(|r| *r) => if ok.is_err() { return },
        }
        if let Some(redis) = redis {
            tokio::select! {
                _ = &mut stop => return,
                () = wait_for_redis(&redis) => {}
            }
        }
        if let Err(e) = projector.run(stop).await {
            tracing::error!(error = %e, "projector stopped");
        }
    });
    Ok(())
}

/// The readers of the views: the read replicas, behind Redis when it is configured.
async fn readers(p: &mut Process<'_>) -> anyhow::Result<Arc<dyn UserReader>> {
    let mut replicas = Vec::new();
    // A URL listing several hosts (PCF_DATABASE_URL's, when no replica is configured) stands
    // for one replica per host.
    let mut urls = Vec::new();
    for url in &p.config.read_database_urls {
        urls.extend(split_hosts(url).context("reading PCF_READ_DATABASE_URL")?);
    }
    let several = urls.len() > 1;
    let mut unreachable = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let what = "a read replica (PCF_READ_DATABASE_URL)";
        let pool = match pg_pool(url, 16, what).await {
            Ok(pool) => pool,
            // One of several may be down: the others serve, and it joins when it answers.
            Err(e) if several => {
                tracing::warn!(replica = i, error = %format!("{e:#}"), "a read replica is down at start; reads go to the others");
                unreachable.push(e);
                lazy_pg_pool(url, 16, what)?
            }
            Err(e) => return Err(e),
        };
        // Numbered in the order configured: a bounded label.
        p.metrics
            .watch_pool(&format!("read_replica_{i}"), pool_gauge(pool.clone()));
        replicas.push(pool);
    }
    if unreachable.len() == replicas.len() {
        if let Some(e) = unreachable.pop() {
            return Err(e.context("no read replica answers"));
        }
    }
    let sql = Arc::new(SqlUserReader::new(replicas));
    p.dependencies.add(Dependency::ReadReplica(sql.clone()));
    let Some(url) = &p.config.redis_url else {
        return Ok(sql);
    };
    // Until Redis answers, readiness names it and point reads fall back.
    let redis = Arc::new(
        RedisUserReader::connect_lazily(url, p.config.redis_prefix.clone())
            .context("PCF_REDIS_URL")?,
    );
    p.dependencies.add(Dependency::Redis(redis.clone()));
    let reader = FallbackReader::new(redis, sql);
    p.metrics.watch_redis_fallbacks(reader.fallbacks());
    Ok(Arc::new(reader))
}

/// Completes once Redis answers, asking again after growing pauses (at most 5 s apart).
/// The Redis projector waits here before it joins its consumer group, rather than take
/// partitions it cannot write (its offsets are committed only after a write anyway).
async fn wait_for_redis(redis: &RedisUserViews) {
    let mut pause = Duration::from_millis(200);
    let mut failures = 0u32;
    loop {
        match redis.ping().await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(failures, "Redis answers; the Redis projector starts");
                }
                return;
            }
            Err(e) => {
                failures += 1;
                // Once, then quietly: the readiness check names Redis meanwhile.
                if failures == 1 {
                    tracing::warn!(error = %e, "Redis does not answer; the Redis projector waits for it");
                } else {
                    tracing::debug!(error = %e, failures, "Redis still does not answer");
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
