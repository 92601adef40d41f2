//! A PostgreSQL database of one test: created fresh on the primary, dropped (with whoever is
//! still connected) by [`TestDb::drop_db`], which the panic-safe runner calls.
//!
//! What the relay may read is bounded by the oldest transaction still running anywhere on the
//! server, in every database. So a test that holds a transaction open, or asserts exactly what
//! the log shows, has the server to itself ([`ServerUse::Alone`]); the others share it.

use super::cleanup::Teardown;
use super::services::{primary_admin_url, replica_admin_url};
use pcf::app::primary::{locate, parse_hosts, PrimaryLocator};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use std::sync::{Arc, LazyLock};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use uuid::Uuid;

/// How a test uses the PostgreSQL server.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ServerUse {
    /// Beside other tests, whose transactions may hold back what its relay publishes.
    Shared,
    /// With no other PostgreSQL test running: it holds transactions open, or asserts exactly
    /// what the log shows.
    Alone,
}

/// Held shared by each test on the server, and exclusively by a test that must be alone.
static SERVER: LazyLock<Arc<RwLock<()>>> = LazyLock::new(|| Arc::new(RwLock::new(())));

/// A test's hold on the server, for as long as its database exists.
enum ServerHold {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Alone(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
}

impl ServerHold {
    async fn take(server: ServerUse) -> Self {
        match server {
            ServerUse::Shared => Self::Shared(SERVER.clone().read_owned().await),
            ServerUse::Alone => Self::Alone(SERVER.clone().write_owned().await),
        }
    }
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// A PostgreSQL database of its own, created for one test.
pub struct TestDb {
    pub name: String,
    /// The database on the primary.
    pub url: String,
    /// The same database on the streaming replica.
    pub replica_url: String,
    /// A small pool of the test's own, for looking at the tables directly.
    pub pool: PgPool,
    /// The server's URL (any database), where the database is dropped.
    admin_url: String,
    /// With several hosts in `admin_url`: the primary `pool` follows.
    _primary: Option<Arc<PrimaryLocator>>,
    _server: ServerHold,
}

/// A connection to the primary of `url`, which may list several hosts (the one that accepts
/// writes).
pub async fn connect_primary(url: &str) -> Result<PgConnection, String> {
    let hosts = parse_hosts(url).map_err(|e| format!("{e:#}"))?;
    if hosts.len() == 1 {
        return PgConnection::connect(url).await.map_err(|e| e.to_string());
    }
    locate(&hosts, 0)
        .await
        .map(|(_, conn)| conn)
        .map_err(|e| format!("{e:#}"))
}

impl TestDb {
    /// A fresh database named `pcf_test_<id>`, on the shared server.
    pub async fn create() -> Self {
        Self::create_named(&Uuid::new_v4().simple().to_string(), ServerUse::Shared).await
    }

    /// A fresh database, once no other test uses the server, which then waits for this one.
    pub async fn create_alone() -> Self {
        Self::create_named(&Uuid::new_v4().simple().to_string(), ServerUse::Alone).await
    }

    /// A fresh database named `pcf_test_<id>`, for a test that names its other resources
    /// after `id` too.
    pub async fn create_named(id: &str, server: ServerUse) -> Self {
        Self::create_at(id, server, &primary_admin_url(), &replica_admin_url()).await
    }

    /// A fresh database named `pcf_test_<id>` on the server at `admin` (a URL that may list
    /// several hosts: then on the one that accepts writes, with a pool that follows it), read
    /// from the replica at `replica_admin`.
    pub async fn create_at(id: &str, server: ServerUse, admin: &str, replica_admin: &str) -> Self {
        let hold = ServerHold::take(server).await;
        let name = format!("pcf_test_{id}");
        let admin = admin.to_owned();
        let mut conn = connect_primary(&admin).await.unwrap_or_else(|e| {
            panic!("connecting to {admin} (start scripts/services.sh up): {e}")
        });
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        let _ = conn.close().await;
        let url = with_database(&admin, &name);
        let replica_url = with_database(replica_admin, &name);
        let (pool, primary) = if parse_hosts(&url).map_or(1, |h| h.len()) > 1 {
            let primary = PrimaryLocator::connect(&url, "the test database")
                .await
                .unwrap_or_else(|e| panic!("connecting to {url}: {e:#}"));
            tokio::spawn(PrimaryLocator::follow(
                Arc::downgrade(&primary),
                std::future::pending(),
            ));
            let pool = primary.lazy_pool(8, None);
            (pool, Some(primary))
        } else {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .connect(&url)
                .await
                .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
            (pool, None)
        };
        Self {
            name,
            url,
            replica_url,
            pool,
            admin_url: admin,
            _primary: primary,
            _server: hold,
        }
    }

    /// Drops the database, disconnecting whoever is still connected (the apps' pools and
    /// listeners).
    pub async fn drop_db(self) {
        self.pool.close().await;
        match connect_primary(&self.admin_url).await {
            Ok(mut conn) => {
                let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
                if let Err(e) = sqlx::query(&sql).execute(&mut conn).await {
                    eprintln!("could not drop test database {}: {e}", self.name);
                }
                let _ = conn.close().await;
            }
            Err(e) => eprintln!("could not drop test database {}: {e}", self.name),
        }
    }
}

impl Teardown for TestDb {
    async fn teardown(self) {
        self.drop_db().await;
    }
}
