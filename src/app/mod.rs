//! Wiring: the event store, bus, projectors, relay, views and GraphQL schema of one process,
//! in embedded mode (SQLite or PostgreSQL, in-process bus, in-memory views: `embedded`) or in
//! cluster mode (PostgreSQL, Kafka, Redis, read replicas: `cluster`), and the API over them
//! (`api`).

pub mod api;
pub mod background;
pub mod bus;
pub mod cluster;
pub mod embedded;
pub mod extra_topics;
pub mod keys;
pub mod monitor;
pub mod primary;
pub mod process;
pub mod roles;
pub mod store;

use pcf_command::EventStore;
use pcf_domain::ports::EventLog;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use background::{kafka_config, kafka_relay_name, relay_name, wait_for};
pub use roles::{Role, ALL_ROLES, PROJECTIONS};
pub use store::{open_store, pg_pool, Storage};

use crate::config::Config;
use crate::http::health::{Dependencies, Dependency};
use crate::http::metrics::Metrics;
use crate::http::schema::PcfSchema;
use process::Process;

/// A running PCF: its HTTP router and background tasks.
pub struct App {
    pub router: axum::Router,
    /// A development admin token, when no secret was configured.
    pub dev_token: Option<String>,
    pub store: Arc<dyn EventStore>,
    /// Opens the personal data of the store's events.
    pub keys: Arc<pcf_adapters::keys::Keys>,
    pub schema: PcfSchema,
    pub metrics: Arc<Metrics>,
    /// The PostgreSQL primary the pools follow, while the app lives.
    pub primary: Option<Arc<primary::PrimaryLocator>>,
    shutdown: watch::Sender<bool>,
    stopping: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl App {
    /// The first step of stopping, while requests are still served: readiness answers 503
    /// (load balancers stop sending new requests) and every websocket session is closed
    /// with 1012, telling its client to reconnect and resume from its last position.
    pub fn begin_shutdown(&self) {
        let _ = self.stopping.send(true);
    }

    /// Stops the background tasks and waits for them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Builds every part of a process with all roles.
pub async fn build(config: &Config) -> anyhow::Result<App> {
    build_roles(config, &ALL_ROLES).await
}

/// Builds the parts of a process that `roles` need and starts their background tasks.
pub async fn build_roles(config: &Config, roles: &[Role]) -> anyhow::Result<App> {
    let auth = crate::http::auth::AuthSetup::from_config(config)?;
    let storage = open_store(config).await?;
    let store = storage.store;
    let log: Arc<dyn EventLog> = store.clone();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (stopping, stopping_rx) = watch::channel(false);
    let mut dependencies = Dependencies::default();
    dependencies.add(Dependency::EventStore(store.clone()));
    let mut p = Process {
        config,
        roles,
        store: store.clone(),
        log,
        keys: storage.keys.clone(),
        metrics: Arc::new(Metrics::new()),
        shutdown: shutdown_rx,
        stopping: stopping_rx,
        tasks: Vec::new(),
        dependencies,
        primary: storage.primary,
    };
    p.metrics.watch_keys(storage.keys.stats());
    for (name, pool) in storage.pools {
        p.metrics.watch_pool(name, pool);
    }
    let read = match kafka_config(config) {
        None => embedded::read_side(&mut p).await?,
        Some(kafka) => cluster::read_side(&mut p, kafka).await?,
    };
    if !p.has(Role::Relay) {
        // The relay forwards other processes' commits to `commits`; without it, listen here
        // so that live subscriptions wake promptly.
        if let Err(e) = store.watch_commits().await {
            tracing::warn!(error = %e, "commit notifications unavailable; subscriptions poll");
        }
    }
    if p.has(Role::Api) {
        let pruning = background::prune_command_ids(store.clone(), p.shutdown.clone());
        p.spawn(pruning);
    }
    let (router, schema) = api::router(&mut p, read, auth.authenticator)?;
    Ok(App {
        router,
        dev_token: auth.dev_token,
        store,
        keys: p.keys,
        schema,
        metrics: p.metrics,
        primary: p.primary,
        shutdown,
        stopping,
        tasks: p.tasks,
    })
}
