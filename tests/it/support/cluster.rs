//! PCF in cluster mode against the real services on loopback (PostgreSQL primary and
//! streaming replica, Redis, Kafka), driven through its router without a socket, and the
//! comparison of its views (the SQL table and the Redis documents) with the fold of the log.
//!
//! Every test gets its own PostgreSQL database, Kafka topic, consumer-group prefix and Redis key
//! prefix, so tests never see each other's data. Tests that take a dependency down start a
//! private one (`PrivateRedis`, `PrivateKafka`) and never touch the shared services.
//!
//! PostgreSQL transaction ids are cluster-wide: a transaction held open anywhere on the server
//! (by a late-commit test, or by the relay tests) holds back what the relay may publish in
//! every database. Waits here are therefore generous and always end in an assertion.

use super::auth::JWT_SECRET;
use super::cleanup::Teardown;
use super::database::{ServerUse, TestDb};
use super::kafka::KafkaTopic;
use super::redis_server::RedisPrefix;
use super::services::{init_tracing, primary_admin_url, replica_admin_url};
use super::wait::wait_until;
use chrono::{DateTime, Utc};
use pcf::app::Role;
use pcf_adapters::keys::{KeyDb, Keys};
use pcf_adapters::personal::{Kek, Keyring};
use pcf_command::EventStore;
use pcf_domain::ports::{EventLog, UserReader};
use pcf_domain::read_model::{
    parse_redis_key, redis_email_key, redis_generation_pattern, redis_user_key, RedisViewKey,
};
use pcf_domain::UserView;
use pcf_projectors::{MemoryUserViews, Projection, RebuildOptions, RedisUserViews, ViewStore};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// How long `user(id, minVersion)` waits in these tests.
pub const CLUSTER_CONSISTENCY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a test waits for the pipeline (relay, Kafka, projectors) to converge.
pub const CONVERGE: Duration = Duration::from_secs(60);

/// Partitions of each test topic: few, so consumer groups settle quickly.
pub const PARTITIONS: i32 = 4;

/// One running PCF process of a test.
#[derive(Clone)]
pub struct Node {
    index: usize,
    pub router: axum::Router,
    pub store: Arc<dyn EventStore>,
    /// What opens the personal data of the store's events.
    pub keys: Arc<Keys>,
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
    pub db: TestDb,
    /// The test database on the primary.
    pub db_url: String,
    /// The same database on the replica.
    pub replica_url: String,
    /// The replicas the test's apps read from (`replica_url` unless the test says otherwise).
    pub read_urls: Vec<String>,
    /// A small pool of the test's own on the primary.
    pub pool: PgPool,
    pub topic: String,
    pub group_prefix: String,
    pub redis_prefix: String,
    /// The brokers the test's apps use (the shared broker unless a test switches to its own).
    pub brokers: String,
    kafka: KafkaTopic,
    redis: RedisPrefix,
    shared_kafka: bool,
    apps: Vec<Option<pcf::App>>,
    replica_ready: bool,
    /// The key-encryption key of the test's processes (`config`).
    kek: Kek,
    /// The test's key table under `kek`, on the primary.
    keys: Arc<Keys>,
}

impl Cluster {
    /// Fresh resources, on the PostgreSQL server shared with other tests.
    pub async fn create() -> Self {
        Self::create_on(ServerUse::Shared).await
    }

    /// Fresh resources, for a test that holds a transaction open: alone on the server.
    pub async fn create_alone() -> Self {
        Self::create_on(ServerUse::Alone).await
    }

    async fn create_on(server: ServerUse) -> Self {
        Self::create_at(server, &primary_admin_url(), &[replica_admin_url()]).await
    }

    /// Fresh resources on another PostgreSQL server: `admin` (a URL that may list several
    /// hosts: the apps and the test's pool write to the one that accepts writes), read from
    /// the replicas `read_admins` (the first one is `replica_url`).
    pub async fn create_at(server: ServerUse, admin: &str, read_admins: &[String]) -> Self {
        init_tracing();
        let id = Uuid::new_v4().simple().to_string();
        let db = TestDb::create_at(&id, server, admin, &read_admins[0]).await;
        let name = db.name.clone();
        let read_urls: Vec<String> = read_admins
            .iter()
            .map(|url| super::database::with_database(url, &name))
            .collect();
        // The replica follows the whole cluster; apps connect to it as soon as they start.
        let replica_url = db.replica_url.clone();
        for url in &read_urls {
            wait_for(url, Replica::HasDatabase).await;
        }
        let kafka = KafkaTopic::new(&id);
        let redis = RedisPrefix::new(&id);
        let kek = Kek::generate("cluster-test");
        let keyring = Keyring::new(vec![kek.clone()]).expect("a keyring of one KEK");
        let keys = Arc::new(Keys::new(
            KeyDb::Postgres(db.pool.clone()),
            Arc::new(keyring),
        ));
        Self {
            topic: kafka.topic.clone(),
            group_prefix: kafka.group_prefix.clone(),
            brokers: kafka.brokers.clone(),
            redis_prefix: redis.prefix.clone(),
            db_url: db.url.clone(),
            replica_url,
            read_urls,
            pool: db.pool.clone(),
            db,
            kafka,
            redis,
            shared_kafka: true,
            id,
            apps: Vec::new(),
            replica_ready: false,
            kek,
            keys,
        }
    }

    /// The test's key table, as every process of the test opens personal data with it: a
    /// reader allowed personal data.
    pub fn keys(&self) -> Arc<Keys> {
        self.keys.clone()
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
    /// replica, the test topic with a few partitions, the shared Redis under the test prefix,
    /// the test's own key-encryption key.
    pub fn config(&self) -> pcf::Config {
        pcf::Config {
            kek: Some(self.kek.to_base64().to_string()),
            kek_id: self.kek.id().to_owned(),
            database_url: Some(self.db_url.clone()),
            read_database_urls: self.read_urls.clone(),
            kafka_brokers: Some(self.brokers.clone()),
            kafka_topic: self.topic.clone(),
            kafka_group_prefix: self.group_prefix.clone(),
            kafka_partitions: PARTITIONS,
            redis_url: Some(self.redis.url.clone()),
            redis_prefix: self.redis_prefix.clone(),
            consistency_timeout: CLUSTER_CONSISTENCY_TIMEOUT,
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

    /// Starts a PCF process with `roles` on the test's own configuration ([`Cluster::config`]).
    pub async fn start_default(&mut self, roles: &[Role]) -> Node {
        let config = self.config();
        self.start(&config, roles).await
    }

    /// Starts an API process without Redis: its point reads go to the SQL view on the replica.
    pub async fn start_sql_reader(&mut self) -> Node {
        let config = pcf::Config {
            redis_url: None,
            ..self.config()
        };
        self.start(&config, &[Role::Api]).await
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
            keys: app.keys.clone(),
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
        for url in &self.read_urls {
            wait_for(url, Replica::HasSchema).await;
        }
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
        for app in self.apps.into_iter().flatten() {
            if tokio::time::timeout(Duration::from_secs(20), app.shutdown())
                .await
                .is_err()
            {
                eprintln!("an app did not shut down within 20 s");
            }
        }
        self.db.drop_db().await;
        if self.shared_kafka {
            self.kafka.delete().await;
        }
        self.redis.delete_keys().await;
    }

    /// Every user's view, folded from the whole event log (a fresh rebuild in memory, its
    /// personal data opened with the test's keys). Fails while the log's readable prefix does
    /// not cover every committed event yet (a transaction somewhere on the server holds the
    /// horizon back), and if any event of the log could not be applied.
    pub async fn expected_views(
        &self,
        log: Arc<dyn EventLog>,
    ) -> Result<BTreeMap<Uuid, UserView>, String> {
        let counts = self.event_counts().await;
        let memory = Arc::new(MemoryUserViews::new());
        let options = RebuildOptions {
            batch_size: 100,
            linger: Duration::ZERO,
        };
        let rebuilt = Projection::new(memory.clone(), log)
            .with_opener(self.keys())
            .rebuild(&options, &|_| {})
            .await
            .map_err(|e| format!("folding the log: {e}"))?;
        if !rebuilt.set_aside.is_empty() {
            return Err(format!(
                "events of the log that the fold set aside: {:?}",
                rebuilt.set_aside
            ));
        }
        let mut views = BTreeMap::new();
        for (id, count) in counts {
            let view = memory.user(id).await.map_err(|e| e.to_string())?;
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
            compare_redis_view("Redis view", &expected, redis).await?;
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

/// What a test waits for the replica to have.
#[derive(Clone, Copy, PartialEq)]
enum Replica {
    /// The test database (created on the primary).
    HasDatabase,
    /// The read model's tables (migrated on the primary), and it is a replica.
    HasSchema,
}

/// Waits until the replica at `url` has `what`.
async fn wait_for(url: &str, what: Replica) {
    let waiting_for = match what {
        Replica::HasDatabase => "the replica to have the database",
        Replica::HasSchema => "the replica to have the schema",
    };
    wait_until(Duration::from_secs(30), waiting_for, || async move {
        let mut conn = PgConnection::connect(url)
            .await
            .map_err(|e| format!("connecting to the replica: {e}"))?;
        if what == Replica::HasSchema {
            let (recovering,): (bool,) = sqlx::query_as("SELECT pg_is_in_recovery()")
                .fetch_one(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            assert!(recovering, "{url} is not a replica (not in recovery)");
            sqlx::query("SELECT 1 FROM read_users LIMIT 1")
                .execute(&mut conn)
                .await
                .map_err(|e| format!("read_users on the replica: {e}"))?;
        }
        let _ = conn.close().await;
        Ok(())
    })
    .await;
}

impl Teardown for Cluster {
    async fn teardown(self) {
        self.cleanup().await;
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

/// Reads every document and email entry of the Redis view's active generation. The email
/// index is compared as what readers can see of it: entries that name a live document with
/// that email (an entry whose user has moved on, left when the email step of a write was
/// cut off, reads as not found and is left out).
pub async fn redis_docs(redis: &RedisView) -> Result<RedisDocs, String> {
    let (views, prefix) = (&redis.views, redis.prefix.as_str());
    let generation = views.state().await.map_err(|e| e.to_string())?.active;
    let pattern = redis_generation_pattern(prefix, generation);
    let conn = views.connection().clone();
    let keys = scan_all(&conn, &pattern).await?;
    let mut users = BTreeMap::new();
    let mut entries = BTreeMap::new();
    for key in keys {
        match parse_redis_key(prefix, &key) {
            Some(RedisViewKey::User { generation: g, id }) if g == generation => {
                let id = Uuid::parse_str(id).map_err(|e| format!("key {key}: {e}"))?;
                let doc = views
                    .document(generation, id)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{key} vanished"))?;
                assert_eq!(key, redis_user_key(prefix, generation, id));
                users.insert(id, doc);
            }
            Some(RedisViewKey::Email {
                generation: g,
                email,
            }) if g == generation => {
                let id: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                let Some(id) = id else { continue };
                assert_eq!(key, redis_email_key(prefix, generation, email));
                entries.insert(
                    email.to_owned(),
                    Uuid::parse_str(&id).map_err(|e| format!("{key} -> {id}: {e}"))?,
                );
            }
            _ if key.contains(":pending:") => {}
            _ => return Err(format!("unexpected key {key}")),
        }
    }
    let emails = entries
        .into_iter()
        .filter(|(email, id)| {
            users
                .get(id)
                .is_some_and(|u: &UserView| !u.deleted && &u.email == email)
        })
        .collect();
    Ok(RedisDocs {
        generation,
        users,
        emails,
    })
}

/// Every key matching `pattern`, on every primary of a cluster.
pub async fn scan_all(
    conn: &pcf_adapters::redis::RedisConnection,
    pattern: &str,
) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    let mut scan = conn.scan(pattern).await.map_err(|e| e.to_string())?;
    while let Some(page) = scan.page().await.map_err(|e| e.to_string())? {
        keys.extend(page);
    }
    Ok(keys)
}

/// Reads every row of a `read_users`-shaped table or view.
pub async fn sql_rows(pool: &PgPool, relation: &str) -> BTreeMap<Uuid, UserView> {
    let rows = sqlx::query(&format!("SELECT * FROM {relation}"))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("reading {relation}: {e}"));
    rows.iter()
        .map(|r| {
            let v = pcf_adapters::sql::read_user(r).expect("a read_users row");
            (v.id, v)
        })
        .collect()
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
/// The Redis view `redis` against the fold `expected`: its documents, and its email index as
/// readers see it, which must name exactly the live users' emails.
pub async fn compare_redis_view(
    label: &str,
    expected: &BTreeMap<Uuid, UserView>,
    redis: &RedisView,
) -> Result<(), String> {
    let docs = redis_docs(redis).await?;
    compare_views(label, expected, &docs.users, false)?;
    let live: BTreeMap<String, Uuid> = expected
        .values()
        .filter(|v| !v.deleted)
        .map(|v| (v.email.clone(), v.id))
        .collect();
    if docs.emails != live {
        return Err(format!(
            "{label}: email index {:?} != live users' emails {live:?}",
            docs.emails
        ));
    }
    Ok(())
}

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
