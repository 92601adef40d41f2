//! Harness of the cluster tests (`tests/cluster_*.rs`): PCF in cluster mode against the real
//! services on loopback (PostgreSQL primary and streaming replica, Redis, Kafka), driven through
//! its router without a socket.
//!
//! Every test gets its own PostgreSQL database, Kafka topic, consumer-group prefix and Redis key
//! prefix, so tests never see each other's data. Tests that take a dependency down start a
//! private one (`PrivateRedis`, `PrivateKafka`) and never touch the shared services.
//!
//! PostgreSQL transaction ids are cluster-wide: a transaction held open anywhere on the server
//! (by this file's late-commit test, or by other test files) holds back what the relay may
//! publish in every database. Waits here are therefore generous and always end in an assertion.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use chrono::{DateTime, Utc};
use http_body_util::BodyExt;
use pcf::app::Role;
use pcf_command::EventStore;
use pcf_domain::ports::EventLog;
use pcf_domain::read_model::{redis_email_key, redis_generation_prefix, redis_user_key};
use pcf_domain::{EventEnvelope, UserView};
use pcf_projectors::{
    Generational, MemoryUserViews, RedisUserViews, UserProjector, UserViewWriter,
};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Row};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tower::ServiceExt;
use uuid::Uuid;

/// How long `user(id, minVersion)` waits in these tests.
pub const CONSISTENCY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a test waits for the pipeline (relay, Kafka, projectors) to converge.
pub const CONVERGE: Duration = Duration::from_secs(60);

/// Partitions of each test topic: few, so consumer groups settle quickly.
pub const PARTITIONS: i32 = 4;

/// The HS256 secret of every test app, so one admin token works on all of them.
pub const JWT_SECRET: &str = "pcf-cluster-tests-0123456789abcdef0123456789abcdef";

/// An admin bearer token for [`JWT_SECRET`]: every request the harness sends carries it
/// unless the request names other credentials (admins may read and change every user).
pub fn admin_token() -> &'static str {
    static TOKEN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        pcf::http::auth::mint(
            JWT_SECRET,
            "cluster-tests",
            &[pcf_domain::auth::AccessRole::Admin],
            None,
            Duration::from_secs(3600),
        )
        .expect("minting the admin token")
    });
    &TOKEN
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// The PostgreSQL primary (any database on it; tests create their own).
pub fn primary_admin_url() -> String {
    env_or(
        "PCF_TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
}

/// The streaming replica of the primary.
pub fn replica_admin_url() -> String {
    env_or(
        "PCF_TEST_READ_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5433/postgres",
    )
}

pub fn shared_redis_url() -> String {
    env_or("PCF_TEST_REDIS_URL", "redis://127.0.0.1:6379")
}

pub fn shared_brokers() -> String {
    env_or("PCF_TEST_KAFKA_BROKERS", "127.0.0.1:9092")
}

/// Logs of the product while a test runs, when `PCF_TEST_LOG` is set (e.g. `pcf=debug`).
pub fn init_tracing() {
    if let Ok(filter) = std::env::var("PCF_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
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

/// One running PCF process of a test.
#[derive(Clone)]
pub struct Node {
    index: usize,
    pub router: axum::Router,
    pub store: Arc<dyn EventStore>,
}

impl Node {
    /// The node's event store as an event log.
    pub fn log(&self) -> Arc<dyn EventLog> {
        self.store.clone()
    }
}

/// The resources of one test: a database, a topic, a group prefix and a Redis prefix, and
/// the PCF processes started on them.
pub struct Cluster {
    pub id: String,
    pub db_name: String,
    /// The test database on the primary.
    pub db_url: String,
    /// The same database on the replica.
    pub replica_url: String,
    /// A small pool of the test's own on the primary.
    pub pool: PgPool,
    pub topic: String,
    pub group_prefix: String,
    pub redis_prefix: String,
    /// The brokers the test's apps use (the shared broker unless a test switches to its own).
    pub brokers: String,
    shared_kafka: bool,
    apps: Vec<Option<pcf::App>>,
    replica_ready: bool,
}

impl Cluster {
    pub async fn create() -> Self {
        init_tracing();
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("pcf_test_{id}");
        let admin = primary_admin_url();
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("connecting to {admin}: {e}"));
        sqlx::query(&format!("CREATE DATABASE \"{db_name}\""))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("creating database {db_name}: {e}"));
        let _ = conn.close().await;
        let db_url = with_database(&admin, &db_name);
        let replica_url = with_database(&replica_admin_url(), &db_name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&db_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {db_url}: {e}"));
        // The replica follows the whole cluster; apps connect to it as soon as they start.
        wait_until(
            Duration::from_secs(30),
            "the replica to have the database",
            || {
                let url = replica_url.clone();
                async move {
                    let conn = PgConnection::connect(&url)
                        .await
                        .map_err(|e| format!("connecting to the replica: {e}"))?;
                    let _ = conn.close().await;
                    Ok(())
                }
            },
        )
        .await;
        Self {
            topic: format!("pcf.test.{id}"),
            group_prefix: format!("t{id}-"),
            redis_prefix: format!("pcf:test:{id}"),
            brokers: shared_brokers(),
            shared_kafka: true,
            db_name,
            db_url,
            replica_url,
            pool,
            id,
            apps: Vec::new(),
            replica_ready: false,
        }
    }

    /// A short tag for names (emails, display names) of this test.
    pub fn tag(&self) -> &str {
        &self.id[..10]
    }

    /// Uses a private broker instead of the shared one (before any app starts).
    pub fn use_private_kafka(&mut self, brokers: String) {
        assert!(self.apps.is_empty(), "switch brokers before starting apps");
        self.brokers = brokers;
        self.shared_kafka = false;
    }

    /// Cluster mode on this test's resources: event store on the primary, reads from the
    /// replica, the test topic with a few partitions, the shared Redis under the test prefix.
    pub fn config(&self) -> pcf::Config {
        pcf::Config {
            database_url: Some(self.db_url.clone()),
            read_database_urls: vec![self.replica_url.clone()],
            kafka_brokers: Some(self.brokers.clone()),
            kafka_topic: self.topic.clone(),
            kafka_group_prefix: self.group_prefix.clone(),
            kafka_partitions: PARTITIONS,
            redis_url: Some(shared_redis_url()),
            redis_prefix: self.redis_prefix.clone(),
            consistency_timeout: CONSISTENCY_TIMEOUT,
            jwt_secret: Some(JWT_SECRET.to_owned()),
            // The load these tests make is not what rate limits are about.
            rate_limits: pcf::config::RateLimits {
                anonymous: 10_000_000,
                authenticated: 10_000_000,
                premium: 10_000_000,
                failed_auth: 10_000_000,
            },
            ..Default::default()
        }
    }

    /// Starts a PCF process with `roles` on `config`.
    pub async fn start(&mut self, config: &pcf::Config, roles: &[Role]) -> Node {
        let app = pcf::app::build_roles(config, roles)
            .await
            .unwrap_or_else(|e| panic!("building PCF with roles {roles:?}: {e:#}"));
        if !self.replica_ready {
            // The migrations ran on the primary; reads go to the replica.
            self.wait_for_replica().await;
            self.replica_ready = true;
        }
        let node = Node {
            index: self.apps.len(),
            router: app.router.clone(),
            store: app.store.clone(),
        };
        self.apps.push(Some(app));
        node
    }

    /// Shuts a process down (its background tasks end; its pools close when dropped).
    pub async fn stop(&mut self, node: &Node) {
        let app = self.apps[node.index]
            .take()
            .expect("the node is still running");
        tokio::time::timeout(Duration::from_secs(20), app.shutdown())
            .await
            .expect("the app shuts down within 20 s");
    }

    /// Waits until the replica has the test database with the read model's tables.
    pub async fn wait_for_replica(&self) {
        let url = self.replica_url.clone();
        wait_until(
            Duration::from_secs(30),
            "the replica to have the schema",
            || {
                let url = url.clone();
                async move {
                    let mut conn = PgConnection::connect(&url)
                        .await
                        .map_err(|e| format!("connecting to the replica: {e}"))?;
                    let (recovering,): (bool,) = sqlx::query_as("SELECT pg_is_in_recovery()")
                        .fetch_one(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    assert!(recovering, "{url} is not a replica (not in recovery)");
                    sqlx::query("SELECT 1 FROM read_users LIMIT 1")
                        .execute(&mut conn)
                        .await
                        .map_err(|e| format!("read_users on the replica: {e}"))?;
                    let _ = conn.close().await;
                    Ok(())
                }
            },
        )
        .await;
    }

    /// A pool on the test database's replica.
    pub async fn replica_pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.replica_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.replica_url))
    }

    /// Shuts every app down and removes the test's database, topics, groups and keys.
    pub async fn cleanup(self) {
        let Self {
            apps,
            pool,
            db_name,
            topic,
            group_prefix,
            redis_prefix,
            brokers,
            shared_kafka,
            ..
        } = self;
        for app in apps.into_iter().flatten() {
            if tokio::time::timeout(Duration::from_secs(20), app.shutdown())
                .await
                .is_err()
            {
                eprintln!("an app did not shut down within 20 s");
            }
        }
        pool.close().await;
        match PgConnection::connect(&primary_admin_url()).await {
            Ok(mut conn) => {
                let sql = format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)");
                if let Err(e) = sqlx::query(&sql).execute(&mut conn).await {
                    eprintln!("could not drop test database {db_name}: {e}");
                }
                let _ = conn.close().await;
            }
            Err(e) => eprintln!("could not drop test database {db_name}: {e}"),
        }
        if shared_kafka {
            delete_topics(&brokers, &topic, &group_prefix).await;
        }
        delete_redis_keys(&shared_redis_url(), &redis_prefix).await;
    }

    /// Every user's view, folded from the whole event log (a fresh rebuild in memory).
    /// Fails while the log's readable prefix does not cover every committed event yet (a
    /// transaction somewhere on the server holds the horizon back).
    pub async fn expected_views(
        &self,
        log: Arc<dyn EventLog>,
    ) -> Result<BTreeMap<Uuid, UserView>, String> {
        let counts = self.event_counts().await;
        let memory = Arc::new(MemoryUserViews::new());
        UserProjector::new(memory.clone(), log)
            .catch_up(100)
            .await
            .map_err(|e| format!("folding the log: {e}"))?;
        let mut views = BTreeMap::new();
        for (id, count) in counts {
            let view = memory.current(id).await.map_err(|e| e.to_string())?;
            match view {
                Some(v) if v.version == count => {
                    views.insert(id, v);
                }
                other => {
                    return Err(format!(
                    "the log's readable prefix does not cover user {id} yet ({} of {count} events)",
                    other.map_or(0, |v| v.version)
                ))
                }
            }
        }
        Ok(views)
    }

    /// How many events each user has, counted in the events table.
    pub async fn event_counts(&self) -> BTreeMap<Uuid, u64> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT aggregate_id, count(*), max(sequence) FROM events GROUP BY aggregate_id",
        )
        .fetch_all(&self.pool)
        .await
        .expect("counting events");
        rows.into_iter()
            .map(|(id, n, max)| {
                assert_eq!(n, max, "user {id}: {n} events but sequence {max}");
                (Uuid::parse_str(&id).expect("a user id"), n as u64)
            })
            .collect()
    }

    /// The rows of the SQL view readers use (`read_users`), on the primary.
    pub async fn sql_view(&self) -> BTreeMap<Uuid, UserView> {
        sql_rows(&self.pool, "read_users").await
    }

    /// Both views equal the fold of the log: every user, every field, and the Redis email
    /// index has exactly the live users' emails.
    pub async fn views_match_log(
        &self,
        log: Arc<dyn EventLog>,
        redis: Option<&RedisView>,
    ) -> Result<(), String> {
        let expected = self.expected_views(log).await?;
        let sql = self.sql_view().await;
        compare_views("SQL view", &expected, &sql, true)?;
        if let Some(redis) = redis {
            let docs = redis_docs(redis).await?;
            compare_views("Redis view", &expected, &docs.users, false)?;
            let live: BTreeMap<String, Uuid> = expected
                .values()
                .filter(|v| !v.deleted)
                .map(|v| (v.email.clone(), v.id))
                .collect();
            if docs.emails != live {
                return Err(format!(
                    "Redis email index {:?} != live users' emails {live:?}",
                    docs.emails
                ));
            }
        }
        Ok(())
    }

    /// Waits until [`Cluster::views_match_log`] holds.
    pub async fn wait_views_match_log(
        &self,
        timeout: Duration,
        log: Arc<dyn EventLog>,
        redis: Option<&RedisView>,
    ) {
        wait_until(timeout, "the views to equal the fold of the log", || {
            self.views_match_log(log.clone(), redis)
        })
        .await;
    }

    /// The Redis view of this test on the server at `url`.
    pub async fn redis_view(&self, url: &str) -> RedisView {
        let views = RedisUserViews::connect(url, self.redis_prefix.clone())
            .await
            .unwrap_or_else(|e| panic!("connecting to Redis at {url}: {e}"));
        RedisView {
            views,
            url: url.to_owned(),
            prefix: self.redis_prefix.clone(),
        }
    }
}

/// Runs `$scenario(&mut cluster)` on fresh resources and cleans up, even after a panic.
#[macro_export]
macro_rules! cluster_scenario {
    ($scenario:path) => {{
        use futures::FutureExt as _;
        let mut cluster = $crate::cluster_support::Cluster::create().await;
        let outcome = std::panic::AssertUnwindSafe($scenario(&mut cluster))
            .catch_unwind()
            .await;
        cluster.cleanup().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }};
}

async fn delete_topics(brokers: &str, topic: &str, group_prefix: &str) {
    let admin: AdminClient<DefaultClientContext> = match ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("no Kafka admin client for cleanup: {e}");
            return;
        }
    };
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    let dlq = format!("{topic}.dlq");
    if let Err(e) = admin.delete_topics(&[topic, &dlq], &options).await {
        eprintln!("could not delete test topics: {e}");
    }
    let groups: Vec<String> = pcf::app::PROJECTIONS
        .iter()
        .map(|p| format!("{group_prefix}{p}"))
        .collect();
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    let _ = admin.delete_groups(&groups, &options).await;
}

async fn delete_redis_keys(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    for key in scan_keys(&mut conn, &format!("{prefix}:*"))
        .await
        .unwrap_or_default()
    {
        let _: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
    }
}

async fn scan_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Result<Vec<String>, redis::RedisError> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// A connection of the test's own to a Redis server.
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connecting to Redis at {url}: {e}"))
}

/// The active generation's documents and email index of a Redis view.
pub struct RedisDocs {
    pub generation: u64,
    pub users: BTreeMap<Uuid, UserView>,
    pub emails: BTreeMap<String, Uuid>,
}

/// A test's Redis view on one server: the product's writer plus the server's URL.
#[derive(Clone)]
pub struct RedisView {
    pub views: RedisUserViews,
    pub url: String,
    pub prefix: String,
}

/// Reads every document and email entry of the Redis view's active generation.
pub async fn redis_docs(redis: &RedisView) -> Result<RedisDocs, String> {
    let (views, prefix) = (&redis.views, redis.prefix.as_str());
    let generation = views.state().await.map_err(|e| e.to_string())?.active;
    let base = redis_generation_prefix(prefix, generation);
    let writer = views.writer(generation);
    let client = redis::Client::open(redis.url.as_str()).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let keys = scan_keys(&mut conn, &format!("{base}*"))
        .await
        .map_err(|e| e.to_string())?;
    let mut users = BTreeMap::new();
    let mut emails = BTreeMap::new();
    for key in keys {
        let rest = &key[base.len()..];
        if let Some(id) = rest.strip_prefix("user:") {
            let id = Uuid::parse_str(id).map_err(|e| format!("key {key}: {e}"))?;
            let doc = writer
                .current(id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{key} vanished"))?;
            assert_eq!(key, redis_user_key(prefix, generation, id));
            users.insert(id, doc);
        } else if let Some(email) = rest.strip_prefix("email:") {
            let id: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            let Some(id) = id else { continue };
            assert_eq!(key, redis_email_key(prefix, generation, email));
            emails.insert(
                email.to_owned(),
                Uuid::parse_str(&id).map_err(|e| format!("{key} -> {id}: {e}"))?,
            );
        } else {
            return Err(format!("unexpected key {key}"));
        }
    }
    Ok(RedisDocs {
        generation,
        users,
        emails,
    })
}

/// Reads every row of a `read_users`-shaped table or view.
pub async fn sql_rows(pool: &PgPool, relation: &str) -> BTreeMap<Uuid, UserView> {
    let rows = sqlx::query(&format!("SELECT * FROM {relation}"))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("reading {relation}: {e}"));
    rows.iter()
        .map(|r| {
            let v = row_to_view(r).expect("a read_users row");
            (v.id, v)
        })
        .collect()
}

fn row_to_view(row: &PgRow) -> Result<UserView, sqlx::Error> {
    Ok(UserView {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        display_name: row.try_get("display_name")?,
        bio: row.try_get("bio")?,
        avatar_url: row.try_get("avatar_url")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get::<i64, _>("version")? as u64,
        deleted: row.try_get("deleted")?,
    })
}

/// `t` at PostgreSQL's precision (microseconds).
pub fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).expect("a representable time")
}

fn at_micros(mut v: UserView) -> UserView {
    v.created_at = micros(v.created_at);
    v.updated_at = micros(v.updated_at);
    v
}

/// Compares a view with the expected one, user by user.
pub fn compare_views(
    what: &str,
    expected: &BTreeMap<Uuid, UserView>,
    actual: &BTreeMap<Uuid, UserView>,
    at_postgres_precision: bool,
) -> Result<(), String> {
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !actual.contains_key(k))
        .collect();
    let extra: Vec<_> = actual
        .keys()
        .filter(|k| !expected.contains_key(k))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(format!(
            "{what}: {} users, expected {}; missing {missing:?}, unexpected {extra:?}",
            actual.len(),
            expected.len()
        ));
    }
    for (id, want) in expected {
        let got = &actual[id];
        let (want, got) = if at_postgres_precision {
            (at_micros(want.clone()), at_micros(got.clone()))
        } else {
            (want.clone(), got.clone())
        };
        if want != got {
            return Err(format!(
                "{what}: user {id} is\n  {got:?}\nexpected (fold of the log)\n  {want:?}"
            ));
        }
    }
    Ok(())
}

/// Polls `check` until it succeeds; panics with its last complaint after `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let deadline = started + timeout;
    let mut pause = Duration::from_millis(10);
    let mut complaints: Vec<(Duration, String)> = Vec::new();
    loop {
        match check().await {
            Ok(v) => {
                if started.elapsed() > Duration::from_secs(5) {
                    // Slow but in time: say what it was waiting on, for whoever tunes this.
                    eprintln!(
                        "waited {:?} for {what}; complaints seen: {complaints:?}",
                        started.elapsed()
                    );
                }
                return v;
            }
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
                }
                if complaints.last().is_none_or(|(_, c)| *c != last) {
                    complaints.push((started.elapsed(), last));
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP and GraphQL

/// Sends a request through the router, as the admin unless it carries credentials.
pub async fn send(
    router: &axum::Router,
    mut request: Request<Body>,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    if !request.headers().contains_key(header::AUTHORIZATION) {
        let value = format!("Bearer {}", admin_token())
            .parse()
            .expect("a header value");
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("reading the body")
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

/// `GET path`: status and the body as JSON (or as a string value when it is not JSON).
pub async fn get(router: &axum::Router, path: &str) -> (StatusCode, Value) {
    let request = Request::get(path).body(Body::empty()).expect("a request");
    let (status, _, body) = send(router, request).await;
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, value)
}

/// One GraphQL operation with extra HTTP headers; the status and the JSON body.
pub async fn gql_with(
    router: &axum::Router,
    query: &str,
    variables: Value,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let body = json!({ "query": query, "variables": variables }).to_string();
    let mut request = Request::post("/graphql").header(header::CONTENT_TYPE, "application/json");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Body::from(body)).expect("a request");
    let (status, _, bytes) = send(router, request).await;
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "the response is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, value)
}

/// One GraphQL operation that must succeed; returns its `data`.
pub async fn gql(router: &axum::Router, query: &str, variables: Value) -> Value {
    let (status, body) = gql_with(router, query, variables, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("errors").is_none(), "GraphQL errors: {body}");
    body["data"].clone()
}

/// One GraphQL operation; `Ok(data)` or `Err(body)` when it answered errors.
pub async fn try_gql(router: &axum::Router, query: &str, variables: Value) -> Result<Value, Value> {
    let (status, body) = gql_with(router, query, variables, &[]).await;
    if status == StatusCode::OK && body.get("errors").is_none() {
        Ok(body["data"].clone())
    } else {
        Err(body)
    }
}

pub const USER_FIELDS: &str = "id email displayName bio avatarUrl createdAt updatedAt version";

pub const CREATE_USER: &str = "mutation($input: CreateUserInput!) {
  createUser(input: $input) { version position user { id email displayName version } }
}";

pub const UPDATE_PROFILE: &str = "mutation($id: ID!, $input: UpdateProfileInput!) {
  updateProfile(id: $id, input: $input) { version position user { id displayName version } }
}";

pub const CHANGE_EMAIL: &str = "mutation($id: ID!, $email: String!) {
  changeEmail(id: $id, email: $email) { version position user { id email version } }
}";

pub const DELETE_ACCOUNT: &str = "mutation($id: ID!) {
  deleteAccount(id: $id) { id version position }
}";

pub const USER: &str = "query($id: ID!, $minVersion: Int) {
  user(id: $id, minVersion: $minVersion) { id email displayName bio avatarUrl createdAt updatedAt version }
}";

pub const USER_BY_EMAIL: &str = "query($email: String!) {
  userByEmail(email: $email) { id email displayName bio avatarUrl createdAt updatedAt version }
}";

pub const USERS: &str = "query($first: Int, $after: String, $filter: UserFilter) {
  users(first: $first, after: $after, filter: $filter) {
    edges { cursor node { id email displayName version } }
    pageInfo { hasNextPage endCursor }
  }
}";

/// Creates a user; returns its id.
pub async fn create_user(router: &axum::Router, email: &str, display_name: &str) -> Uuid {
    let data = gql(
        router,
        CREATE_USER,
        json!({ "input": { "email": email, "displayName": display_name } }),
    )
    .await;
    assert_eq!(data["createUser"]["version"], 1, "{data}");
    uuid_of(&data["createUser"]["user"]["id"])
}

/// Updates a profile; returns the new version.
pub async fn update_profile(router: &axum::Router, id: Uuid, input: Value) -> i64 {
    let data = gql(router, UPDATE_PROFILE, json!({ "id": id, "input": input })).await;
    data["updateProfile"]["version"]
        .as_i64()
        .unwrap_or_else(|| panic!("no version in {data}"))
}

pub async fn change_email(router: &axum::Router, id: Uuid, email: &str) -> i64 {
    let data = gql(router, CHANGE_EMAIL, json!({ "id": id, "email": email })).await;
    data["changeEmail"]["version"]
        .as_i64()
        .unwrap_or_else(|| panic!("no version in {data}"))
}

pub async fn delete_account(router: &axum::Router, id: Uuid) -> i64 {
    let data = gql(router, DELETE_ACCOUNT, json!({ "id": id })).await;
    data["deleteAccount"]["version"]
        .as_i64()
        .unwrap_or_else(|| panic!("no version in {data}"))
}

/// `user(id, minVersion)`: the user object, or null.
pub async fn user(router: &axum::Router, id: Uuid, min_version: Option<i64>) -> Value {
    gql(router, USER, json!({ "id": id, "minVersion": min_version })).await["user"].clone()
}

pub fn uuid_of(v: &Value) -> Uuid {
    Uuid::parse_str(v.as_str().unwrap_or_else(|| panic!("{v} is not a string")))
        .unwrap_or_else(|e| panic!("{v} is not a UUID: {e}"))
}

/// A GraphQL `DateTime` at PostgreSQL's precision.
pub fn time_of(v: &Value) -> DateTime<Utc> {
    let s = v.as_str().unwrap_or_else(|| panic!("{v} is not a string"));
    micros(
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("{s} is not RFC 3339: {e}"))
            .with_timezone(&Utc),
    )
}

/// Asserts two GraphQL users are the same user state (times at PostgreSQL's precision, since
/// one may come from Redis and the other from SQL).
pub fn assert_same_user(a: &Value, b: &Value) {
    for field in ["id", "email", "displayName", "bio", "avatarUrl", "version"] {
        assert_eq!(a[field], b[field], "{field} differs: {a} vs {b}");
    }
    for field in ["createdAt", "updatedAt"] {
        assert_eq!(
            time_of(&a[field]),
            time_of(&b[field]),
            "{field} differs: {a} vs {b}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Kafka

/// A message as read from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl Record {
    fn from_message(m: &BorrowedMessage<'_>) -> Self {
        let mut headers = BTreeMap::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        }
    }

    /// The event envelope carried, if the payload is one.
    pub fn envelope(&self) -> Option<EventEnvelope> {
        serde_json::from_slice(&self.payload).ok()
    }
}

/// Reads a whole topic from the beginning, every partition, without a consumer group.
pub struct TopicTail {
    consumer: StreamConsumer,
    pub topic: String,
    pub records: Vec<Record>,
}

impl TopicTail {
    pub async fn new(brokers: &str, topic: &str) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("tail-{}", Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("a Kafka consumer");
        let partitions = wait_until(Duration::from_secs(30), "the topic's metadata", || async {
            let metadata = tokio::task::block_in_place(|| {
                consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(2))
                    .map_err(|e| e.to_string())
            })?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                Err(format!("topic {topic} has no partitions yet"))
            } else {
                Ok(partitions)
            }
        })
        .await;
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("a partition offset");
        }
        consumer.assign(&tpl).expect("assigning the partitions");
        Self {
            consumer,
            topic: topic.to_owned(),
            records: Vec::new(),
        }
    }

    /// Reads until `done(records)` holds; panics after `timeout`.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[Record]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.records) {
                return;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out after {timeout:?} waiting for {what} on {}; read {} messages",
                self.topic,
                self.records.len()
            );
            let wait = (deadline - now).min(Duration::from_millis(500));
            if let Ok(m) = tokio::time::timeout(wait, self.consumer.recv()).await {
                match m {
                    Ok(m) => self.records.push(Record::from_message(&m)),
                    Err(e) => eprintln!("consume error (retrying): {e}"),
                }
            }
        }
    }

    /// Reads whatever arrives within `period`.
    pub async fn drain_for(&mut self, period: Duration) {
        let deadline = Instant::now() + period;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(Ok(m)) = tokio::time::timeout(left, self.consumer.recv()).await {
                self.records.push(Record::from_message(&m));
            }
        }
    }

    /// The envelopes read so far, in the order read.
    pub fn envelopes(&self) -> Vec<EventEnvelope> {
        self.records.iter().filter_map(Record::envelope).collect()
    }

    /// Event ids read so far.
    pub fn event_ids(&self) -> BTreeSet<Uuid> {
        self.envelopes().iter().map(|e| e.event_id).collect()
    }
}

/// Every event id in the test's events table.
pub async fn stored_event_ids(pool: &PgPool) -> BTreeSet<Uuid> {
    let rows: Vec<(Uuid,)> = sqlx::query_as("SELECT event_id FROM events")
        .fetch_all(pool)
        .await
        .expect("reading event ids");
    rows.into_iter().map(|(id,)| id).collect()
}

/// A plain producer for tests that inject messages.
pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "10000")
        .create()
        .expect("a Kafka producer")
}

/// A consumer in a projector's consumer group (as the projector configures it).
pub fn group_consumer(brokers: &str, group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .expect("a group consumer");
    consumer.subscribe(&[topic]).expect("subscribing");
    consumer
}

// ---------------------------------------------------------------------------------------------
// Private services, for tests that take a dependency down

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A redis-server of the test's own, on a free port, without persistence except an
/// explicit `SAVE`.
pub struct PrivateRedis {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let mut redis = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            child: None,
        };
        redis.spawn().await;
        redis
    }

    /// A server of the test's own that is not running yet: its port is chosen and stays
    /// closed until [`PrivateRedis::launch`], for a process that starts while Redis is down.
    pub fn reserve() -> Self {
        let redis = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            child: None,
        };
        assert!(!port_open(redis.port), "the reserved port already answers");
        redis
    }

    /// Starts a reserved server for the first time.
    pub async fn launch(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.spawn().await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .expect("a log file");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--dbfilename", "dump.rdb"])
            .stdout(Stdio::from(log.try_clone().expect("a log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting redis-server");
        self.child = Some(child);
        let url = self.url();
        wait_until(Duration::from_secs(20), "the private Redis", || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                let _: String = redis::cmd("PING")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        })
        .await;
    }

    /// Writes the data set to disk (so a restart finds it), then kills the server.
    pub async fn save_and_kill(&mut self) {
        let mut conn = redis_conn(&self.url()).await;
        let _: () = redis::cmd("SAVE")
            .query_async(&mut conn)
            .await
            .expect("SAVE");
        drop(conn);
        self.kill();
    }

    pub fn kill(&mut self) {
        kill_child(&mut self.child);
        assert!(!port_open(self.port), "Redis still answers after the kill");
    }

    /// Starts the server again on the same port and directory.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        self.spawn().await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// A single-node KRaft Kafka broker of the test's own, on free ports with a temporary data
/// directory, run like `scripts/services.sh` runs the shared one.
pub struct PrivateKafka {
    pub port: u16,
    pub controller_port: u16,
    dir: TempDir,
    child: Option<Child>,
}

fn kafka_libs() -> PathBuf {
    let cache = std::env::var("PCF_CACHE")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            format!(
                "{}/.cache/pcf",
                std::env::var("HOME").unwrap_or_else(|_| "/root".to_owned())
            )
        });
    let version = env_or("PCF_KAFKA_VERSION", "4.1.1");
    PathBuf::from(cache)
        .join(format!("kafka-{version}"))
        .join("libs")
}

fn kafka_scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka")
}

/// A random Kafka cluster id: 16 bytes, URL-safe base64 without padding.
fn kafka_cluster_id() -> String {
    // As Kafka's own `Uuid.randomUuid()` does: an id starting with '-' would be read by the
    // storage tool as an option (1 in 64 ids).
    loop {
        let id = base64_uuid();
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn base64_uuid() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = Uuid::new_v4().into_bytes();
    let mut bits: u32 = 0;
    let mut n = 0;
    let mut out = String::new();
    for b in bytes {
        bits = (bits << 8) | u32::from(b);
        n += 8;
        while n >= 6 {
            n -= 6;
            out.push(ALPHABET[((bits >> n) & 63) as usize] as char);
        }
    }
    if n > 0 {
        out.push(ALPHABET[((bits << (6 - n)) & 63) as usize] as char);
    }
    out
}

impl PrivateKafka {
    /// Formats the storage and starts the broker; returns when it serves metadata.
    pub async fn start() -> Self {
        let mut kafka = Self::format();
        kafka.spawn().await;
        kafka
    }

    /// Picks the ports and formats the storage, without starting the broker. Like a
    /// production cluster, the broker does not create topics on first use: the application
    /// must create them.
    pub fn format() -> Self {
        let libs = kafka_libs();
        assert!(
            libs.join(".complete").exists(),
            "Kafka's jars are not cached in {} (run scripts/services.sh up)",
            libs.display()
        );
        let kafka = Self {
            port: free_port(),
            controller_port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            child: None,
        };
        let data = kafka.dir.path().join("data");
        let config = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{c}\n\
             listeners=PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}\n\
             inter.broker.listener.name=PLAINTEXT\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
             log.dirs={d}\n\
             auto.create.topics.enable=false\n\
             num.partitions=1\n\
             default.replication.factor=1\n\
             min.insync.replicas=1\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n",
            p = kafka.port,
            c = kafka.controller_port,
            d = data.display()
        );
        std::fs::write(kafka.config_path(), config).expect("writing server.properties");
        let output = Command::new("java")
            .args([
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Xshare:auto",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                kafka_scripts().join("tools-log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .args(["kafka.tools.StorageTool", "format", "--standalone", "-t"])
            .arg(kafka_cluster_id())
            .arg("-c")
            .arg(kafka.config_path())
            .output()
            .expect("running kafka.tools.StorageTool");
        assert!(
            output.status.success(),
            "formatting the private broker's storage failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        kafka
    }

    /// Starts a formatted broker for the first time.
    pub async fn launch(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.spawn().await;
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("server.properties")
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let logs = self.dir.path().join("logs");
        std::fs::create_dir_all(&logs).expect("a log directory");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join("kafka.out"))
            .expect("a log file");
        let child = Command::new("java")
            .args([
                "-Xms128m",
                "-Xmx512m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Xshare:auto",
                "-Djava.awt.headless=true",
            ])
            .arg(format!("-Dkafka.logs.dir={}", logs.display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                kafka_scripts().join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", kafka_libs().display()))
            .arg("kafka.Kafka")
            .arg(self.config_path())
            .stdout(Stdio::from(out.try_clone().expect("a log file")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("starting the private Kafka broker");
        self.child = Some(child);
        let brokers = self.brokers();
        let port = self.port;
        let started = Instant::now();
        let probe: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("a probe client");
        wait_until(Duration::from_secs(90), "the private Kafka broker", || {
            let alive = self
                .child
                .as_mut()
                .map(|c| matches!(c.try_wait(), Ok(None)))
                .unwrap_or(false);
            let probe = &probe;
            async move {
                assert!(alive, "the private Kafka broker exited during start");
                if !port_open(port) {
                    return Err("the port is not open yet".to_owned());
                }
                let metadata = tokio::task::block_in_place(|| {
                    probe
                        .fetch_metadata(None, Duration::from_secs(2))
                        .map_err(|e| e.to_string())
                })?;
                if metadata.brokers().is_empty() {
                    return Err("no broker in the metadata yet".to_owned());
                }
                Ok(())
            }
        })
        .await;
        eprintln!(
            "private Kafka on {brokers} ready after {:?}",
            started.elapsed()
        );
    }

    /// Kills the broker (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
        assert!(!port_open(self.port), "Kafka still answers after the kill");
    }

    /// Starts the broker again on the same ports and data directory.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        self.spawn().await;
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}
