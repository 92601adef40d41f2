//! Wiring: the event store, bus, projectors, relay, views and GraphQL schema of one process,
//! in embedded mode (SQLite or PostgreSQL, in-process bus, in-memory views) or in cluster
//! mode (PostgreSQL, Kafka, Redis, read replicas).

use anyhow::Context;
use async_graphql::dataloader::DataLoader;
use async_graphql::Schema;
use pcf_command::kafka::{KafkaConfig, KafkaPublisher};
use pcf_command::{
    CommandService, EventStore, MutationRoot, PostgresStore, Relay, RelayConfig, SqliteStore,
};
use pcf_domain::ports::{EventLog, EventPublisher, ProjectionMonitor, UserReader};
use pcf_projectors::{
    ConsumerConfig, KafkaProjector, MemoryUserViews, ProjectorStats, RedisUserViews, SqlUserViews,
    UserProjector,
};
use pcf_query::{
    FallbackReader, LiveLog, QueryRoot, ReadModels, RedisUserReader, SqlUserReader,
    SubscriptionRoot, UserObject,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bus::InProcessBus;
use crate::config::{Config, Environment};
use crate::health::{Dependencies, Dependency};
use crate::metrics::Metrics;

/// The GraphQL schema PCF serves.
pub type PcfSchema = Schema<QueryRoot, MutationRoot<UserObject>, SubscriptionRoot>;

/// What a process does.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Serves GraphQL and HTTP.
    Api,
    /// Publishes the event store to the bus (one active across processes).
    Relay,
    /// Builds the views from the bus.
    Projector,
}

/// Every role.
pub const ALL_ROLES: [Role; 3] = [Role::Api, Role::Relay, Role::Projector];

/// Names of the Kafka projections, for status and rebuild.
pub const PROJECTIONS: [&str; 2] = ["users-redis", "users-sql"];

/// A running PCF: its HTTP router and background tasks.
pub struct App {
    pub router: axum::Router,
    /// A development admin token, when no secret was configured.
    pub dev_token: Option<String>,
    pub store: Arc<dyn EventStore>,
    pub schema: PcfSchema,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl App {
    /// Stops the background tasks and waits for them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Connects a PostgreSQL pool.
pub async fn pg_pool(url: &str, max: u32, what: &str) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url).with_context(|| format!("reading {what}"))?;
    pg_pool_with(options, max, what).await
}

pub(crate) async fn pg_pool_with(
    options: PgConnectOptions,
    max: u32,
    what: &str,
) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to {what}"))
}

/// Connections for appends only, which keep one generic plan per prepared statement (see
/// `PostgresStore::with_append_pool`).
async fn append_pool(url: &str, max: u32) -> anyhow::Result<PgPool> {
    let what = "the event store (PCF_DATABASE_URL)";
    let options = PgConnectOptions::from_str(url)
        .with_context(|| format!("reading {what}"))?
        .options([("plan_cache_mode", "force_generic_plan")]);
    pg_pool_with(options, max, what).await
}

/// Opens the event store the configuration names and applies the migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn EventStore>> {
    match &config.database_url {
        Some(url) => {
            let pool = pg_pool(url, 32, "the event store (PCF_DATABASE_URL)").await?;
            let appends = append_pool(url, 32).await?;
            pcf_migrations::run_postgres(&pool)
                .await
                .context("applying PostgreSQL migrations")?;
            Ok(Arc::new(PostgresStore::new(pool).with_append_pool(appends)))
        }
        None => {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!("creating the data directory {}", config.data_dir.display())
            })?;
            let path = config.data_dir.join("events.db");
            let store = SqliteStore::open(&path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            pcf_migrations::run_sqlite(store.writer())
                .await
                .context("applying SQLite migrations")?;
            Ok(Arc::new(store))
        }
    }
}

/// The schemas of a server, with the configured limits.
pub struct Schemas {
    /// For websockets (and in-process callers): rate limits and document limits run as
    /// extensions.
    pub full: PcfSchema,
    /// For HTTP, where the handler has rate-limited the request and runs `documents`
    /// itself: no extensions, so that fields resolve without the extension chain.
    pub http: PcfSchema,
    /// As `http`, with async-graphql's fast validation: for requests whose document passed
    /// the full validation before and whose variables certainly fit it
    /// ([`crate::limits::Known`]).
    pub http_fast: PcfSchema,
    pub documents: crate::limits::DocumentLimits,
}

/// Builds the schemas with the configured limits.
pub fn schemas(
    config: &Config,
    commands: Arc<CommandService>,
    models: ReadModels,
    live: Arc<LiveLog>,
    monitor: Arc<dyn ProjectionMonitor>,
    limiter: Arc<crate::ratelimit::RateLimiter>,
) -> Schemas {
    let documents = crate::limits::DocumentLimits::new(config.max_aliases, config.max_complexity);
    let build = |extended: bool, mode: async_graphql::ValidationMode| {
        let mut builder = Schema::build(
            QueryRoot::default(),
            MutationRoot::<UserObject>::default(),
            SubscriptionRoot,
        )
        .data(commands.clone())
        .data(DataLoader::new(
            pcf_query::events::UserLoader(models.users.clone()),
            tokio::spawn,
        ))
        .data(models.clone())
        .data(live.clone())
        .data(monitor.clone())
        .limit_depth(config.max_depth)
        .limit_complexity(config.max_complexity)
        .validation_mode(mode);
        if extended {
            builder = builder
                .extension(crate::ratelimit::WebSocketLimit(limiter.clone()))
                .extension(documents.clone());
        }
        if config.environment == Environment::Production {
            builder = builder.disable_introspection().disable_suggestions();
        }
        builder.finish()
    };
    Schemas {
        full: build(true, async_graphql::ValidationMode::Strict),
        http: build(false, async_graphql::ValidationMode::Strict),
        http_fast: build(false, async_graphql::ValidationMode::Fast),
        documents: documents.clone(),
    }
}

/// The schema with nothing behind it, for printing the SDL.
pub fn sdl() -> String {
    Schema::build(
        QueryRoot::default(),
        MutationRoot::<UserObject>::default(),
        SubscriptionRoot,
    )
    .finish()
    .sdl()
}

/// The Kafka settings of a configuration.
pub fn kafka_config(config: &Config) -> Option<KafkaConfig> {
    let brokers = config.kafka_brokers.as_ref()?;
    let mut kafka = KafkaConfig::new(brokers.clone(), config.kafka_topic.clone());
    kafka.partitions = config.kafka_partitions;
    Some(kafka)
}

/// The relay's checkpoint name for a configuration.
pub fn relay_name(config: &Config) -> String {
    match &config.kafka_brokers {
        Some(_) => format!("kafka:{}", config.kafka_topic),
        None => "bus".to_owned(),
    }
}

/// Builds every part of a process with all roles.
pub async fn build(config: &Config) -> anyhow::Result<App> {
    build_roles(config, &ALL_ROLES).await
}

/// Builds the parts of a process that `roles` need and starts their background tasks.
pub async fn build_roles(config: &Config, roles: &[Role]) -> anyhow::Result<App> {
    let auth = crate::auth::AuthSetup::from_config(config)?;
    let store = open_store(config).await?;
    let log: Arc<dyn EventLog> = store.clone();
    let metrics = Arc::new(Metrics::new());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut dependencies = Dependencies::default();
    dependencies.add(Dependency::EventStore(store.clone()));

    let (users, monitor): (Arc<dyn UserReader>, Arc<dyn ProjectionMonitor>) = match kafka_config(
        config,
    ) {
        None => {
            if roles.len() < ALL_ROLES.len() {
                anyhow::bail!(
                    "without Kafka every role runs in one process (the bus and views are in memory); drop --role or set PCF_KAFKA_BROKERS"
                );
            }
            let bus = Arc::new(InProcessBus::new());
            let views = Arc::new(MemoryUserViews::new());
            let projector = UserProjector::new(views.clone(), log.clone());
            // Subscribe first, then rebuild from the log, so nothing falls between the two
            // (anything seen twice is skipped by sequence).
            let batches = bus.subscribe();
            let caught_up = projector
                .catch_up(1000)
                .await
                .context("rebuilding the views from the log")?;
            tracing::info!(users = views.len(), "views rebuilt from the log");
            tasks.push(tokio::spawn(projector.run(batches)));
            let mut relay_settings = relay_config(config);
            if config.database_url.is_some() {
                // Several processes may share this event store, each with in-memory views:
                // each relays to its own bus, from where its rebuild ended.
                relay_settings.local_from = Some(caught_up);
            }
            let relay = Relay::new(store.clone(), bus, relay_settings);
            metrics.watch_relay(relay_config(config), store.clone());
            tasks.push(tokio::spawn(
                relay.run(crate::app::wait_for(shutdown_rx.clone())),
            ));
            let monitor = Arc::new(crate::monitor::MemoryMonitor {
                store: store.clone(),
                relay: relay_name(config),
            });
            (
                views as Arc<dyn UserReader>,
                monitor as Arc<dyn ProjectionMonitor>,
            )
        }
        Some(kafka) => {
            let Some(database_url) = &config.database_url else {
                anyhow::bail!("Kafka needs the PostgreSQL event store: set PCF_DATABASE_URL");
            };
            let publisher = Arc::new(
                KafkaPublisher::new(kafka.clone()).context("creating the Kafka producer")?,
            );
            dependencies.add(Dependency::Kafka(publisher.clone()));
            // The topics are created in the background, retried until Kafka answers, so a
            // process starts promptly while Kafka is down; projectors subscribe once the
            // topics exist (the relay backs off on its own until then).
            let (topics_ready_tx, topics_ready) = watch::channel(false);
            if roles.contains(&Role::Relay) || roles.contains(&Role::Projector) {
                let topics = kafka.clone();
                let mut stop = shutdown_rx.clone();
                tasks.push(tokio::spawn(async move {
                    let mut pause = std::time::Duration::from_millis(200);
                    loop {
                        match pcf_command::kafka::ensure_topics(&topics).await {
                            Ok(()) => {
                                let _ = topics_ready_tx.send(true);
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "could not create the Kafka topics yet; retrying")
                            }
                        }
                        tokio::select! {
                            _ = stop.changed() => return,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(std::time::Duration::from_secs(5));
                    }
                }));
            }
            if roles.contains(&Role::Relay) {
                let relay_publisher: Arc<dyn EventPublisher> = publisher.clone();
                let relay = Relay::new(store.clone(), relay_publisher, relay_config(config));
                metrics.watch_relay(relay_config(config), store.clone());
                tasks.push(tokio::spawn(relay.run(wait_for(shutdown_rx.clone()))));
            }
            // Redis is connected to on first use, not here: a process starts while Redis is
            // down (the Redis projector waits for it; reads fall back to the replicas).
            let redis_views = match &config.redis_url {
                Some(url) => Some(
                    RedisUserViews::connect_lazily(url, config.redis_prefix.clone())
                        .context("PCF_REDIS_URL")?,
                ),
                None => None,
            };
            let pool_size = if roles.contains(&Role::Projector) {
                16
            } else {
                2
            };
            let primary =
                pg_pool(database_url, pool_size, "the SQL view (PCF_DATABASE_URL)").await?;
            let mut views: Vec<Arc<dyn pcf_projectors::Generational>> =
                vec![Arc::new(SqlUserViews::new(primary))];
            // Per view, the Redis server its projector waits for before it consumes.
            let mut waits_for_redis = vec![None];
            if let Some(redis) = &redis_views {
                views.push(Arc::new(redis.clone()));
                waits_for_redis.push(Some(redis.clone()));
            }
            let monitor: Arc<dyn ProjectionMonitor> = Arc::new(crate::monitor::KafkaMonitor {
                views: views.clone(),
                brokers: kafka.brokers.clone(),
                topic: kafka.topic.clone(),
                group_prefix: config.kafka_group_prefix.clone(),
            });
            if roles.contains(&Role::Projector) {
                for (view, redis) in views.into_iter().zip(waits_for_redis) {
                    let mut consumer =
                        ConsumerConfig::new(kafka.brokers.clone(), kafka.topic.clone());
                    consumer.group_prefix = config.kafka_group_prefix.clone();
                    if let Some(wait) = view.batch_wait() {
                        consumer.batch_wait = wait;
                    }
                    let stats = Arc::new(ProjectorStats::default());
                    metrics.watch_projector(
                        view.name(),
                        stats.clone(),
                        Some((
                            kafka.brokers.clone(),
                            kafka.topic.clone(),
                            format!("{}{}", config.kafka_group_prefix, view.name()),
                        )),
                    );
                    let projector = KafkaProjector::new(consumer, view, log.clone(), stats)
                        .context("creating a Kafka consumer")?;
                    let stop = wait_for(shutdown_rx.clone());
                    let mut ready = topics_ready.clone();
                    tasks.push(tokio::spawn(async move {
                        tokio::pin!(stop);
                        tokio::select! {
                            _ = &mut stop => return,
                            ok = ready.wait_for(|r| *r) => if ok.is_err() { return },
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
                    }));
                }
            }
            let mut replicas = Vec::new();
            for url in &config.read_database_urls {
                replicas.push(pg_pool(url, 16, "a read replica (PCF_READ_DATABASE_URL)").await?);
            }
            let sql = Arc::new(SqlUserReader::new(replicas));
            dependencies.add(Dependency::ReadReplica(sql.clone()));
            match &config.redis_url {
                Some(url) => {
                    // Until Redis answers, readiness names it and point reads fall back.
                    let redis = Arc::new(
                        RedisUserReader::connect_lazily(url, config.redis_prefix.clone())
                            .context("PCF_REDIS_URL")?,
                    );
                    dependencies.add(Dependency::Redis(redis.clone()));
                    (
                        Arc::new(FallbackReader::new(redis, sql)) as Arc<dyn UserReader>,
                        monitor,
                    )
                }
                None => (sql as Arc<dyn UserReader>, monitor),
            }
        }
    };

    if !roles.contains(&Role::Relay) {
        // The relay forwards other processes' commits to `commits`; without it, listen here
        // so that live subscriptions wake promptly.
        if let Err(e) = store.watch_commits().await {
            tracing::warn!(error = %e, "commit notifications unavailable; subscriptions poll");
        }
    }
    let commands = Arc::new(CommandService::new(store.clone(), metrics.clone()));
    if roles.contains(&Role::Api) {
        tasks.push(tokio::spawn(prune_command_ids(
            store.clone(),
            shutdown_rx.clone(),
        )));
    }
    let live = LiveLog::spawn(
        log.clone(),
        store.commits(),
        std::time::Duration::from_millis(500),
    );
    let models = ReadModels {
        users,
        log,
        consistency_timeout: config.consistency_timeout,
    };
    let shared_counts = match &config.redis_url {
        Some(url) => {
            let client = redis::Client::open(url.as_str()).context("PCF_REDIS_URL")?;
            // Fail fast: a request never waits long on the rate limiter's Redis.
            let settings = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(std::time::Duration::from_millis(300)))
                .set_response_timeout(Some(std::time::Duration::from_millis(300)))
                .set_number_of_retries(1);
            // Connected on first use: while Redis is down (at start too) the limiter counts
            // locally, and a later request's failure has the manager connect again.
            let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, settings)
                .context("PCF_REDIS_URL")?;
            Some((conn, config.redis_prefix.clone()))
        }
        None => None,
    };
    let limiter = Arc::new(crate::ratelimit::RateLimiter::new(
        config.rate_limits,
        shared_counts,
    ));
    let schemas = schemas(config, commands, models, live, monitor, limiter.clone());
    let schema = schemas.full.clone();
    let authenticator = Arc::new(auth.authenticator);
    let websocket = Arc::new(crate::websocket::Shared {
        schema: schema.clone(),
        authenticator: authenticator.clone(),
        limiter: limiter.clone(),
        limits: crate::websocket::WsLimits::from_config(config),
        open: Default::default(),
    });
    let router = crate::http::router(crate::http::HttpState {
        schemas: Arc::new(schemas),
        dependencies: Arc::new(dependencies),
        metrics: metrics.clone(),
        authenticator,
        limiter,
        trusted_proxies: Arc::new(config.trusted_proxies.clone()),
        graphiql: config.environment == Environment::Development,
        body_limit: config.body_limit,
        body_timeout: config.body_timeout,
        request_timeout: config.request_timeout,
        websocket,
    });
    Ok(App {
        router,
        dev_token: auth.dev_token,
        store,
        schema,
        metrics,
        shutdown,
        tasks,
    })
}

/// How often the command ids past their retention are removed.
const COMMAND_ID_PRUNING: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes the command ids past their retention (`pcf_command::COMMAND_ID_RETENTION`) now and
/// then, so that their table stays small; any number of instances may do it at once.
async fn prune_command_ids(store: Arc<dyn EventStore>, mut shutdown: watch::Receiver<bool>) {
    let mut failures = pcf_adapters::Repeats::new(pcf_adapters::repeats::DEFAULT_EVERY);
    loop {
        match store.prune_expired_commands().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "expired command ids removed"),
            Err(e) => {
                if let Some(repeats) = failures.admit() {
                    tracing::warn!(error = %e, repeats, "could not remove expired command ids");
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(COMMAND_ID_PRUNING) => {}
        }
    }
}

fn relay_config(config: &Config) -> RelayConfig {
    RelayConfig {
        name: relay_name(config),
        ..RelayConfig::default()
    }
}

/// Completes once Redis answers, asking again after growing pauses (at most 5 s apart).
/// The Redis projector waits here before it joins its consumer group, rather than take
/// partitions it cannot write (its offsets are committed only after a write anyway).
async fn wait_for_redis(redis: &RedisUserViews) {
    let mut pause = std::time::Duration::from_millis(200);
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
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
}

/// Completes when the shutdown flag is raised (or its sender is gone).
pub async fn wait_for(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
