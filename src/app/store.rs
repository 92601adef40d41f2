//! The event store and PostgreSQL pools a process opens, with the migrations applied, and the
//! key table that opens the personal data of its events.

use anyhow::Context;
use pcf_adapters::keys::{KeyDb, Keys};
use pcf_command::{EventStore, PostgresStore, SqliteStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::sync::Arc;

use super::primary::{split_hosts, PrimaryLocator, Shape};
use crate::config::Config;
use crate::http::metrics::{pool_gauge, PoolGauge};

/// Connects a PostgreSQL pool. A URL listing several hosts (`postgres://u@a:5432,b:5432/db`)
/// gives a pool on the one that accepts writes, which stays there (see `PrimaryLocator` for
/// pools that follow the primary).
pub async fn pg_pool(url: &str, max: u32, what: &str) -> anyhow::Result<PgPool> {
    if split_hosts(url)
        .with_context(|| format!("reading {what}"))?
        .len()
        > 1
    {
        let primary = PrimaryLocator::connect(url, what).await?;
        return primary.pool(max, what, None).await;
    }
    let options = PgConnectOptions::from_str(url).with_context(|| format!("reading {what}"))?;
    pg_pool_with(options, max, what).await
}

/// Connects a PostgreSQL pool with these options.
pub async fn pg_pool_with(
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

/// A PostgreSQL pool that connects when first used (a server that is down at start).
pub fn lazy_pg_pool(url: &str, max: u32, what: &str) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url).with_context(|| format!("reading {what}"))?;
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy_with(options))
}

/// Connections for appends only, which keep one generic plan per prepared statement (see
/// `PostgresStore::with_append_pool`).
async fn append_pool(primary: &PrimaryLocator, max: u32) -> anyhow::Result<PgPool> {
    let what = "the event store (PCF_DATABASE_URL)";
    let shape: Shape = Arc::new(|o| o.options([("plan_cache_mode", "force_generic_plan")]));
    primary.pool(max, what, Some(shape)).await
}

/// The event store of a process and the keys to its personal data.
pub struct Storage {
    pub store: Arc<dyn EventStore>,
    pub keys: Arc<Keys>,
    /// The store's connection pools by name, for metrics.
    pub pools: Vec<(&'static str, PoolGauge)>,
    /// The PostgreSQL primary the pools follow (PostgreSQL only). Dropping it stops the
    /// following (`PrimaryLocator::follow`).
    pub primary: Option<Arc<PrimaryLocator>>,
}

/// Opens the event store the configuration names, applies the migrations, and checks the
/// configured key-encryption keys against the key table (a wrong or missing KEK stops the
/// process here, saying which).
pub async fn open_store(config: &Config) -> anyhow::Result<Storage> {
    let keyring = Arc::new(super::keys::keyring(config)?);
    let mut pools: Vec<(&'static str, PoolGauge)> = Vec::new();
    let mut primary = None;
    let (store, keys): (Arc<dyn EventStore>, Arc<Keys>) = match &config.database_url {
        Some(url) => {
            let what = "the event store (PCF_DATABASE_URL)";
            let locator = PrimaryLocator::connect(url, what).await?;
            if locator.hosts().len() > 1 {
                tokio::spawn(PrimaryLocator::follow(
                    Arc::downgrade(&locator),
                    std::future::pending(),
                ));
            }
            let pool = locator.pool(32, what, None).await?;
            let appends = append_pool(&locator, 32).await?;
            primary = Some(locator);
            pools.push(("event_store", pool_gauge(pool.clone())));
            pools.push(("event_store_appends", pool_gauge(appends.clone())));
            pcf_migrations::run_postgres(&pool)
                .await
                .context("applying PostgreSQL migrations")?;
            let keys = Arc::new(Keys::new(KeyDb::Postgres(pool.clone()), keyring));
            let store = PostgresStore::new(pool).with_append_pool(appends);
            (Arc::new(store.with_keys(keys.clone())), keys)
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
            let keys = Arc::new(Keys::new(KeyDb::Sqlite(store.writer().clone()), keyring));
            pools.push(("event_store", pool_gauge(store.writer().clone())));
            (Arc::new(store.with_keys(keys.clone())), keys)
        }
    };
    keys.check_keks()
        .await
        .context("checking the key-encryption keys (PCF_KEK, PCF_KEK_FILE)")?;
    Ok(Storage {
        store,
        keys,
        pools,
        primary,
    })
}
