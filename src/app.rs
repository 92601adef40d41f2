//! Wiring: the event store, views, projector, relay and GraphQL schema for one process.

use anyhow::Context;
use async_graphql::{EmptySubscription, Schema};
use pcf_command::{
    CommandService, EventStore, MutationRoot, PostgresStore, Relay, RelayConfig, SqliteStore,
};
use pcf_domain::ports::{EventLog, UserReader};
use pcf_projectors::{MemoryUserViews, UserProjector};
use pcf_query::{QueryRoot, ReadModels, UserObject};
use sqlx::postgres::PgPoolOptions;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bus::InProcessBus;
use crate::config::{Config, Environment};
use crate::metrics::Metrics;

/// The GraphQL schema PCF serves.
pub type PcfSchema = Schema<QueryRoot, MutationRoot<UserObject>, EmptySubscription>;

/// A running PCF: its HTTP router and background tasks.
pub struct App {
    pub router: axum::Router,
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

/// Opens the event store the configuration names and applies the migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn EventStore>> {
    match &config.database_url {
        Some(url) => {
            let pool = PgPoolOptions::new()
                .max_connections(32)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect(url)
                .await
                .context("connecting to the event store (PCF_DATABASE_URL)")?;
            pcf_migrations::run_postgres(&pool)
                .await
                .context("applying PostgreSQL migrations")?;
            Ok(Arc::new(PostgresStore::new(pool)))
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

/// Builds the schema with the configured limits.
pub fn schema(config: &Config, commands: Arc<CommandService>, models: ReadModels) -> PcfSchema {
    let mut builder = Schema::build(
        QueryRoot::default(),
        MutationRoot::<UserObject>::default(),
        EmptySubscription,
    )
    .data(commands)
    .data(models)
    .limit_depth(config.max_depth)
    .limit_complexity(config.max_complexity);
    if config.environment == Environment::Production {
        builder = builder.disable_introspection().disable_suggestions();
    }
    builder.finish()
}

/// The schema with nothing behind it, for printing the SDL.
pub fn sdl() -> String {
    Schema::build(
        QueryRoot::default(),
        MutationRoot::<UserObject>::default(),
        EmptySubscription,
    )
    .finish()
    .sdl()
}

/// Builds every part of a process and starts its background tasks. The views are rebuilt
/// from the log before this returns.
pub async fn build(config: &Config) -> anyhow::Result<App> {
    let store = open_store(config).await?;
    let log: Arc<dyn EventLog> = upcast_log(store.clone());
    let metrics = Arc::new(Metrics::new());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    // Views: subscribe first, then rebuild from the log, so nothing falls between the two
    // (anything seen twice is skipped by sequence).
    let bus = Arc::new(InProcessBus::new());
    let views = Arc::new(MemoryUserViews::new());
    let projector = UserProjector::new(views.clone(), log.clone());
    let batches = bus.subscribe();
    projector
        .catch_up(1000)
        .await
        .context("rebuilding the views from the log")?;
    tracing::info!(users = views.len(), "views rebuilt from the log");
    tasks.push(tokio::spawn(projector.run(batches)));

    let relay = Relay::new(store.clone(), bus.clone(), RelayConfig::default());
    tasks.push(tokio::spawn(relay.run(wait_for(shutdown_rx.clone()))));

    let commands = Arc::new(CommandService::new(store.clone(), metrics.clone()));
    let users: Arc<dyn UserReader> = views;
    let models = ReadModels {
        users,
        log,
        consistency_timeout: config.consistency_timeout,
    };
    let schema = schema(config, commands, models);
    let router = crate::http::router(crate::http::HttpState {
        schema: schema.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        graphiql: config.environment == Environment::Development,
        body_limit: config.body_limit,
    });
    Ok(App {
        router,
        store,
        schema,
        metrics,
        shutdown,
        tasks,
    })
}

fn upcast_log(store: Arc<dyn EventStore>) -> Arc<dyn EventLog> {
    Arc::new(StoreLog(store))
}

/// The store seen only as an event log.
struct StoreLog(Arc<dyn EventStore>);

#[async_trait::async_trait]
impl EventLog for StoreLog {
    async fn read(
        &self,
        q: &pcf_domain::ports::LogQuery,
    ) -> Result<Vec<pcf_domain::EventEnvelope>, pcf_domain::ports::PortError> {
        self.0.read(q).await
    }

    async fn user_events(
        &self,
        user: uuid::Uuid,
        after_sequence: u64,
    ) -> Result<Vec<pcf_domain::EventEnvelope>, pcf_domain::ports::PortError> {
        self.0.user_events(user, after_sequence).await
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
