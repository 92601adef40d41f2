//! The scenarios of `pcf bench`, each with the baseline it is divided by.

use anyhow::Context;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use futures::{FutureExt, StreamExt, TryStreamExt};
use pcf_domain::read_model::{redis_active_key, redis_prefix_pattern, redis_user_key, user_bucket};
use pcf_domain::UserView;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

mod republish;

use super::client::HttpClient;
use super::load::{
    closed_loop, cpu_times, idle_percent, interleaved, open_loop, Measurement, Op, Recorder,
};
use super::{BenchOptions, ScenarioResult};
use pcf::app::{build, pg_pool, App};
use pcf::config::{Config, RateLimits};

/// The database URL with another database name.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let cut = base.rfind('/').map_or(base.len(), |i| i + 1);
    let mut out = format!("{}{name}", &base[..cut]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

struct Bench {
    options: BenchOptions,
    config: Config,
    app: App,
    client: HttpClient,
    primary: PgPool,
    redis: ConnectionManager,
    users: Vec<Uuid>,
    run_id: String,
    /// The command rate measured by the updateProfile scenario (or, run without it, by the
    /// first commit -> visible measurement's own closed loop).
    max_command_rate: Option<f64>,
    /// The sequence of the append baseline's next row: one count for every scenario, so
    /// that no two baseline rows of a user clash.
    baseline_sequence: Arc<AtomicU64>,
    /// The run's database, on the server of `base_url`.
    database: String,
    base_url: String,
    /// The HTTP server's task: it holds the router, and through it the store.
    server: tokio::task::JoinHandle<()>,
}

/// Baseline handlers served beside the API, so both go through the same server and client.
#[derive(Clone)]
struct Baselines {
    redis: ConnectionManager,
    prefix: String,
}

async fn noop() -> Json<serde_json::Value> {
    Json(json!({ "data": { "ok": true } }))
}

async fn redis_user(State(b): State<Baselines>, Path(id): Path<Uuid>) -> Json<serde_json::Value> {
    let mut conn = b.redis.clone();
    let generation: u64 = conn
        .get::<_, Option<u64>>(redis_active_key(&b.prefix, user_bucket(id)))
        .await
        .ok()
        .flatten()
        .unwrap_or(1);
    let doc: Option<String> = conn
        .get(redis_user_key(&b.prefix, generation, id))
        .await
        .ok()
        .flatten();
    let view: Option<UserView> = doc.and_then(|d| serde_json::from_str(&d).ok());
    Json(json!({ "data": { "user": view } }))
}

// The run's setup in order (database, topics, app, baselines' server, client), each step a
// few lines; one function so that the order is read at once.
async fn setup(base: Config, options: &BenchOptions) -> anyhow::Result<Bench> {
    let (Some(url), Some(_), Some(redis_url)) =
        (&base.database_url, &base.kafka_brokers, &base.redis_url)
    else {
        anyhow::bail!(
            "pcf bench runs on the cluster services: run scripts/services.sh up and set \
             PCF_DATABASE_URL, PCF_READ_DATABASE_URL, PCF_KAFKA_BROKERS and PCF_REDIS_URL"
        );
    };
    let run_id = format!("{}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
    let database = format!("pcf_bench_{run_id}");
    let admin = pg_pool(url, 2, "PostgreSQL (PCF_DATABASE_URL)").await?;
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&admin)
        .await
        .context("creating the benchmark database")?;
    // Whatever fails from here on, the database just made goes again.
    let built = async {
        let mut config = base.clone();
        config.database_url = Some(with_database(url, &database));
        config.read_database_urls = base
            .read_database_urls
            .iter()
            .map(|u| with_database(u, &database))
            .collect();
        config.kafka_topic = format!("pcf.bench.{run_id}");
        config.kafka_group_prefix = format!("bench{run_id}-");
        config.redis_prefix = format!("pcf:bench:{run_id}");
        let secret = format!("bench-{}", Uuid::new_v4());
        config.jwt_secret = Some(secret.clone());
        config.jwt_public_key = None;
        config.rate_limits = RateLimits {
            anonymous: u32::MAX,
            authenticated: u32::MAX,
            premium: u32::MAX,
            failed_auth: u32::MAX,
        };
        config.consistency_timeout = Duration::from_secs(10);
        for replica in &config.read_database_urls {
            replica_has_database(replica).await?;
        }
        let app = build(&config).await?;
        // The seeding statements write 100,000 rows each: sqlx would log every one of them
        // as a slow statement.
        let primary = pcf::app::store::pg_pool_with(
            PgConnectOptions::from_str(config.database_url.as_deref().unwrap_or_default())?
                .disable_statement_logging(),
            options.concurrency as u32 + 2,
            "the benchmark database",
        )
        .await?;
        sqlx::query("CREATE TABLE bench_events (LIKE events INCLUDING ALL)")
            .execute(&primary)
            .await?;
        let redis = ConnectionManager::new(redis::Client::open(redis_url.as_str())?).await?;
        let baselines = Baselines {
            redis: redis.clone(),
            prefix: config.redis_prefix.clone(),
        };
        let router = app.router.clone().merge(
            Router::new()
                .route("/bench/noop", get(noop))
                .route("/bench/redis-user/{id}", get(redis_user))
                .with_state(baselines),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let limits = pcf::http::server::ConnectionLimits::from_config(&config);
        let server = tokio::spawn(async move {
            let _ =
                pcf::http::server::serve(listener, router, limits, std::future::pending()).await;
        });
        let token = pcf::http::auth::mint(
            &secret,
            "bench",
            &[pcf_domain::auth::AccessRole::Admin],
            None,
            Duration::from_secs(24 * 3600),
        )?;
        let client = HttpClient::new(format!("http://{addr}"), Some(token));
        eprintln!(
            "bench: database {database}, topic {}, server {addr}",
            config.kafka_topic
        );
        Ok(Bench {
            options: options.clone(),
            config,
            app,
            client,
            primary,
            redis,
            users: Vec::new(),
            run_id,
            max_command_rate: None,
            baseline_sequence: Arc::new(AtomicU64::new(0)),
            database: database.clone(),
            base_url: url.clone(),
            server,
        })
    }
    .await;
    if built.is_err() {
        let drop = format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)");
        if let Err(e) = sqlx::query(&drop).execute(&admin).await {
            eprintln!("bench: could not drop database {database}: {e}");
        }
    }
    built
}

/// Waits until the replica at `url` has replayed the database's creation (it may take a
/// moment, longer on a busy machine), for at most 30 s.
async fn replica_has_database(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match sqlx::PgConnection::connect(url).await {
            Ok(conn) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context("the read replica never showed the benchmark database")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn wanted(options: &BenchOptions, name: &str) -> bool {
    options.only.is_empty() || options.only.iter().any(|o| name.starts_with(o.as_str()))
}

/// Runs every selected scenario, then removes what the run created (unless kept).
pub async fn run_all(base: Config, options: &BenchOptions) -> anyhow::Result<Vec<ScenarioResult>> {
    let mut bench = setup(base, options).await?;
    let results = bench.run_selected(options).await;
    let created = Created {
        database: bench.database.clone(),
        base_url: bench.base_url.clone(),
        config: bench.config.clone(),
        primary: bench.primary.clone(),
        redis: bench.redis.clone(),
    };
    bench.app.shutdown().await;
    // Closing the client's connections and stopping the server drop the last handles on
    // the store; the live tail sees that at its next look (within its 500 ms poll), and
    // the store's commit listener ends with the store.
    drop(bench.client);
    bench.server.abort();
    let _ = (&mut bench.server).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    if options.keep {
        eprintln!(
            "bench: kept database {}, topics and groups of {}, Redis keys {}*",
            created.database, created.config.kafka_topic, created.config.redis_prefix
        );
    } else {
        created.remove().await;
    }
    results
}

/// What a run created, to remove afterwards.
struct Created {
    database: String,
    base_url: String,
    config: Config,
    primary: PgPool,
    redis: ConnectionManager,
}

impl Bench {
    async fn run_selected(
        &mut self,
        options: &BenchOptions,
    ) -> anyhow::Result<Vec<ScenarioResult>> {
        let mut results = Vec::new();
        if wanted(options, "createUser") {
            results.push(self.create_user().await?);
        }
        self.fill_users().await?;
        if wanted(options, "updateProfile") {
            results.push(self.update_profile().await?);
        }
        if wanted(options, "deleteAccount") {
            results.push(self.delete_account().await?);
        }
        if wanted(options, "visible") {
            for &load in &options.visible_loads {
                results.push(self.commit_to_visible(load).await?);
            }
        }
        if wanted(options, "query") {
            results.extend(self.user_queries().await?);
        }
        if wanted(options, "rebuild") {
            results.extend(self.rebuild().await?);
        }
        if wanted(options, "republish") {
            results.extend(self.republish().await?);
        }
        Ok(results)
    }
}

impl Created {
    /// Drops the run's database, deletes its topics and consumer groups and its Redis keys.
    /// What cannot be removed is named, and the run's results stand.
    async fn remove(&self) {
        self.primary.close().await;
        let database = self.database.clone();
        let dropped = async {
            let admin = pg_pool(&self.base_url, 1, "PostgreSQL (PCF_DATABASE_URL)").await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                .execute(&admin)
                .await?;
            anyhow::Ok(())
        };
        if let Err(e) = dropped.await {
            eprintln!("bench: could not drop database {database}: {e:#}");
        }
        if let Err(e) = self.remove_kafka().await {
            eprintln!("bench: could not delete the run's topics and groups: {e:#}");
        }
        let redis = pcf_adapters::redis::RedisConnection::Single(self.redis.clone());
        let prefix = &self.config.redis_prefix;
        for pattern in [format!("{prefix}*"), redis_prefix_pattern(prefix)] {
            if let Err(e) = pcf_projectors::delete_matching(&redis, &pattern).await {
                eprintln!("bench: could not delete Redis keys {pattern}: {e:#}");
            }
        }
    }

    /// Deletes every topic named after the run's topic and every group of its prefix.
    async fn remove_kafka(&self) -> anyhow::Result<()> {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let brokers = self.config.kafka_brokers.clone().unwrap_or_default();
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()?;
        // librdkafka's metadata calls block: off the runtime's threads.
        let (topic, group_prefix) = (
            self.config.kafka_topic.clone(),
            self.config.kafka_group_prefix.clone(),
        );
        let (admin, topics, groups) = tokio::task::spawn_blocking(move || {
            let metadata = admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(10))?;
            let topics: Vec<String> = metadata
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .filter(|name| name.starts_with(&topic))
                .collect();
            let groups: Vec<String> = admin
                .inner()
                .fetch_group_list(None, Duration::from_secs(10))?
                .groups()
                .iter()
                .map(|g| g.name().to_owned())
                .filter(|name| name.starts_with(&group_prefix))
                .collect();
            anyhow::Ok((admin, topics, groups))
        })
        .await??;
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        if !groups.is_empty() {
            let names: Vec<&str> = groups.iter().map(String::as_str).collect();
            for result in admin.delete_groups(&names, &options).await? {
                if let Err((group, e)) = result {
                    eprintln!("bench: could not delete consumer group {group}: {e}");
                }
            }
        }
        if !topics.is_empty() {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            for result in admin.delete_topics(&names, &options).await? {
                if let Err((topic, e)) = result {
                    eprintln!("bench: could not delete topic {topic}: {e}");
                }
            }
        }
        Ok(())
    }
}

fn ratio_result(
    scenario: &str,
    subject: Measurement,
    baseline_name: &str,
    baseline: Measurement,
    minimum: f64,
) -> ScenarioResult {
    let ratio = if baseline.throughput > 0.0 {
        subject.throughput / baseline.throughput
    } else {
        0.0
    };
    ScenarioResult {
        scenario: scenario.to_owned(),
        metric: "throughput".to_owned(),
        subject,
        baseline_name: baseline_name.to_owned(),
        baseline,
        ratio,
        target: format!(">= {minimum}"),
        met: Some(ratio >= minimum),
    }
}

impl Bench {
    /// The append-shaped transaction straight on PostgreSQL: read a user's events, insert
    /// one row, commit.
    fn append_baseline(&self, existing: bool) -> Op {
        let pool = self.primary.clone();
        let users = Arc::new(self.users.clone());
        let sequences = self.baseline_sequence.clone();
        Arc::new(move |n| {
            let pool = pool.clone();
            let users = users.clone();
            let sequence = sequences.fetch_add(1, Ordering::Relaxed) + 1;
            async move {
                let id = if existing && !users.is_empty() {
                    users[n as usize % users.len()]
                } else {
                    Uuid::new_v4()
                };
                let mut tx = pool.begin().await?;
                let _rows = sqlx::query(
                    "SELECT sequence, payload FROM events \
                     WHERE aggregate_type = 'User' AND aggregate_id = $1 ORDER BY sequence",
                )
                .bind(id.to_string())
                .fetch_all(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO bench_events (aggregate_type, aggregate_id, sequence, \
                     event_type, event_version, payload, metadata) \
                     VALUES ('User', $1, $2, 'ProfileUpdated', '1', $3, '{}')",
                )
                .bind(id.to_string())
                .bind(sequence as i64)
                .bind(json!({"ProfileUpdated": {"displayName": format!("B{n}")}}))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }
            .boxed()
        })
    }

    /// A command `op` and the append baseline (on existing users, or new ones), measured in
    /// alternating rounds.
    async fn against_append(&self, op: Op, existing: bool) -> (Measurement, Measurement) {
        let o = &self.options;
        interleaved(
            op,
            self.append_baseline(existing),
            o.concurrency,
            o.warmup,
            o.duration,
            o.rounds,
        )
        .await
    }

    async fn create_user(&mut self) -> anyhow::Result<ScenarioResult> {
        eprintln!("bench: createUser");
        let client = self.client.clone();
        let run = self.run_id.clone();
        let op: Op = Arc::new(move |n| {
            let client = client.clone();
            let email = format!("c{n}-{run}@bench.test");
            async move {
                client
                    .graphql(&json!({
                        "query": "mutation($e: String!) { createUser(input: {email: $e, displayName: \"Bench\"}) { version } }",
                        "variables": { "e": email }
                    }))
                    .await
                    .map(|_| ())
            }
            .boxed()
        });
        let (subject, baseline) = self.against_append(op, false).await;
        Ok(ratio_result(
            "createUser over HTTP",
            subject,
            "append transaction on PostgreSQL",
            baseline,
            0.5,
        ))
    }

    /// Creates the users the other scenarios act on.
    async fn fill_users(&mut self) -> anyhow::Result<()> {
        let n = self.options.users;
        eprintln!("bench: creating {n} users");
        self.users = self.create_users(n, "u").await?;
        Ok(())
    }

    /// Creates `n` users (emails starting with `prefix`) from the bench's workers.
    async fn create_users(&self, n: usize, prefix: &str) -> anyhow::Result<Vec<Uuid>> {
        let created = Arc::new(Mutex::new(Vec::with_capacity(n)));
        let next = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for _ in 0..self.options.concurrency {
            let client = self.client.clone();
            let created = created.clone();
            let next = next.clone();
            let run = self.run_id.clone();
            let prefix = prefix.to_owned();
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n as u64 {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let v = client
                        .graphql(&json!({
                            "query": "mutation($e: String!) { createUser(input: {email: $e, displayName: \"User\"}) { user { id } } }",
                            "variables": { "e": format!("{prefix}{i}-{run}@bench.test") }
                        }))
                        .await?;
                    let id = v["data"]["createUser"]["user"]["id"]
                        .as_str()
                        .and_then(|s| Uuid::parse_str(s).ok())
                        .context("createUser returned no id")?;
                    created.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(id);
                }
            }));
        }
        for w in workers {
            w.await??;
        }
        let created = created
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        Ok(created)
    }

    /// deleteAccount (the key destroyed with the event) against the same append baseline,
    /// each operation deleting another user of a pool created beforehand, sized from the
    /// command rate measured so far for the whole measurement with room to spare.
    async fn delete_account(&mut self) -> anyhow::Result<ScenarioResult> {
        let o = self.options.clone();
        let rate = self.max_command_rate.unwrap_or(1000.0);
        let seconds = (o.warmup.as_secs_f64() * f64::from(o.rounds.max(1))
            + o.duration.as_secs_f64())
        .max(1.0);
        let pool = ((rate * seconds * 1.2) as usize).clamp(1000, 200_000);
        eprintln!("bench: deleteAccount, creating {pool} users to delete");
        let doomed = Arc::new(self.create_users(pool, "d").await?);
        // The relay and the projectors have the pool's creations to work off first: measured
        // meanwhile, deleteAccount would share the machine with them and the baseline not.
        self.wait_caught_up().await?;
        self.settle_database().await?;
        let client = self.client.clone();
        let op: Op = Arc::new(move |n| {
            let client = client.clone();
            let doomed = doomed.clone();
            async move {
                let id = doomed
                    .get(n as usize)
                    .context("the pool of users to delete ran out")?;
                let v = client
                    .graphql(&json!({
                        "query": "mutation($id: ID!) { deleteAccount(id: $id) { erasure { keyDestroyedAt } } }",
                        "variables": { "id": id }
                    }))
                    .await?;
                anyhow::ensure!(
                    v["data"]["deleteAccount"]["erasure"]["keyDestroyedAt"].is_string(),
                    "deleteAccount gave no erasure receipt: {v}"
                );
                Ok(())
            }
            .boxed()
        });
        let (subject, baseline) = self.against_append(op, true).await;
        Ok(ratio_result(
            "deleteAccount",
            subject,
            "append transaction on PostgreSQL",
            baseline,
            0.5,
        ))
    }

    fn update_op(&self) -> Op {
        let client = self.client.clone();
        let users = Arc::new(self.users.clone());
        Arc::new(move |n| {
            let client = client.clone();
            let id = users[n as usize % users.len()];
            async move {
                client
                    .graphql(&json!({
                        "query": "mutation($id: ID!, $d: String!) { updateProfile(id: $id, input: {displayName: $d}) { version } }",
                        "variables": { "id": id, "d": format!("B{n}") }
                    }))
                    .await
                    .map(|_| ())
            }
            .boxed()
        })
    }

    async fn update_profile(&mut self) -> anyhow::Result<ScenarioResult> {
        eprintln!("bench: updateProfile on {} users", self.users.len());
        let (subject, baseline) = self.against_append(self.update_op(), true).await;
        self.max_command_rate = Some(subject.throughput);
        Ok(ratio_result(
            &format!("updateProfile on {} users", self.users.len()),
            subject,
            "append transaction on PostgreSQL",
            baseline,
            0.5,
        ))
    }

    /// Waits until the relay and both projectors have nothing left to do.
    async fn wait_caught_up(&self) -> anyhow::Result<()> {
        eprintln!("bench: waiting for the relay and projectors to catch up");
        let relay = pcf::app::relay_name(&self.config);
        let brokers = self.config.kafka_brokers.clone().unwrap_or_default();
        loop {
            let cp = self.app.store.load_checkpoint(&relay).await?;
            let backlog = self.app.store.count_after(cp).await?;
            let mut lag = 0i64;
            for p in pcf::app::PROJECTIONS {
                let group = format!("{}{p}", self.config.kafka_group_prefix);
                lag += pcf_projectors::consumer_lag(&brokers, &self.config.kafka_topic, &group)
                    .await
                    .map(|ps| ps.iter().map(|p| p.lag).sum::<i64>())
                    .unwrap_or(i64::MAX / 4);
            }
            if backlog == 0 && lag == 0 {
                return Ok(());
            }
            eprintln!("bench: relay backlog {backlog}, projector lag {lag}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Does now the database's work that a bulk load leaves to its background processes,
    /// so that it does not land inside a measurement of a few seconds: a vacuum with
    /// statistics (autovacuum's pass over a million new rows), a checkpoint, and the
    /// replicas' replay of everything written so far.
    async fn settle_database(&self) -> anyhow::Result<()> {
        eprintln!("bench: vacuuming, checkpointing, waiting for the replicas");
        sqlx::query("VACUUM (ANALYZE)")
            .execute(&self.primary)
            .await
            .context("vacuuming the benchmark database")?;
        // Only a superuser (or pg_checkpoint) may; without it the run goes on.
        if let Err(e) = sqlx::query("CHECKPOINT").execute(&self.primary).await {
            eprintln!("bench: no checkpoint ({e}); measuring anyway");
        }
        let (lsn,): (String,) = sqlx::query_as("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.primary)
            .await?;
        for url in &self.config.read_database_urls {
            let replica = pg_pool(url, 1, "a read replica").await?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                // NULL on a server that is not replaying (a primary given as a replica).
                let (replayed,): (Option<bool>,) =
                    sqlx::query_as("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                        .bind(&lsn)
                        .fetch_one(&replica)
                        .await?;
                if replayed != Some(false) {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!(
                        "bench: a replica has not replayed to {lsn} in 60 s; measuring anyway"
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            replica.close().await;
        }
        Ok(())
    }

    /// The maximum command rate: measured by the updateProfile scenario, else now by a
    /// closed loop of its own.
    async fn command_rate(&mut self) -> f64 {
        if let Some(rate) = self.max_command_rate {
            return rate;
        }
        let o = &self.options;
        let measured = closed_loop(
            self.update_op(),
            o.concurrency,
            o.warmup,
            Duration::from_secs(3),
        )
        .await
        .throughput;
        self.max_command_rate = Some(measured);
        measured
    }

    /// Commit (the mutation's answer) → the new version readable in Redis, at `load` (the
    /// target's 0.5) of the maximum command rate; against Kafka produce → consume with the
    /// same client settings at the same rate.
    // The subject and its baseline side by side, at the same load and with the same client:
    // kept together so that they stay alike.
    async fn commit_to_visible(&mut self, load: f64) -> anyhow::Result<ScenarioResult> {
        let max = self.command_rate().await;
        let rate = max * load;
        self.wait_caught_up().await?;
        self.settle_database().await?;
        eprintln!("bench: commit to visible at {rate:.0}/s");
        let recorder = Recorder::default();
        let client = self.client.clone();
        let users = Arc::new(self.users.clone());
        let redis = self.redis.clone();
        let prefix = self.config.redis_prefix.clone();
        let mut conn = redis.clone();
        let rec = recorder.clone();
        let generation: u64 = conn
            // Every bucket's copy names the same generation once a rebuild is over.
            .get::<_, Option<u64>>(redis_active_key(&prefix, 0))
            .await?
            .unwrap_or(1);
        // One watcher looks for every commit awaiting visibility with one MGET a
        // millisecond. A poll per operation (tens in flight, each every millisecond) put
        // tens of thousands of reads a second on the two cores the pipeline shares, and so
        // slowed what it measured; the Kafka baseline is pushed its messages. A latency is
        // counted until the answer that showed it arrived, so it is never under-stated,
        // and over-stated by about a millisecond and a read or two.
        let waiting: Arc<Mutex<Vec<Awaited>>> = Arc::default();
        let watcher = tokio::spawn(watch_visibility(redis.clone(), waiting.clone()));
        // Operations planned during the warm-up are waited for but not recorded, as in the
        // baseline (`open_loop` plans operation n at n intervals).
        let (interval, warmup) = (super::load::interval(rate), self.options.warmup);
        let op: Op = Arc::new(move |n| {
            let client = client.clone();
            let id = users[n as usize % users.len()];
            let key = redis_user_key(&prefix, generation, id);
            let rec = rec.clone();
            let waiting = waiting.clone();
            async move {
                let v = client
                    .graphql(&json!({
                        "query": "mutation($id: ID!, $d: String!) { updateProfile(id: $id, input: {displayName: $d}) { version } }",
                        "variables": { "id": id, "d": format!("V{n}") }
                    }))
                    .await?;
                let committed = Instant::now();
                let version = v["data"]["updateProfile"]["version"].as_u64().unwrap_or(0);
                let (seen, visible) = tokio::sync::oneshot::channel();
                waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Awaited { key, version, seen });
                let at = tokio::time::timeout(Duration::from_secs(10), visible)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .context("never visible")?;
                if interval * n as u32 >= warmup {
                    rec.record(at.duration_since(committed));
                }
                Ok(())
            }
            .boxed()
        });
        let o = self.options.clone();
        let paced = open_loop(op, rate, o.warmup, o.duration).await;
        watcher.abort();
        let mut subject = recorder.measurement(o.duration);
        subject.errors = paced.errors;
        subject.machine_idle_percent = paced.machine_idle_percent;
        let baseline = self.kafka_round_trip(rate).await?;
        let limit = 3.0 * baseline.p99_ms + 2.0;
        Ok(ScenarioResult {
            scenario: visible_scenario(load),
            metric: "p99".to_owned(),
            ratio: if baseline.p99_ms > 0.0 {
                subject.p99_ms / baseline.p99_ms
            } else {
                0.0
            },
            met: Some(subject.p99_ms <= limit),
            target: format!("p99 <= {limit:.1} ms"),
            subject,
            baseline_name: "Kafka produce -> consume".to_owned(),
            baseline,
        })
    }

    /// Produce → consume latency at `rate`, with the relay's producer and the projector's
    /// consumer settings.
    async fn kafka_round_trip(&self, rate: f64) -> anyhow::Result<Measurement> {
        let brokers = self.config.kafka_brokers.clone().unwrap_or_default();
        let topic = format!("{}.baseline", self.config.kafka_topic);
        let mut kafka = pcf_command::kafka::KafkaConfig::new(brokers.clone(), topic.clone());
        kafka.partitions = self.config.kafka_partitions;
        pcf_command::kafka::ensure_topics(&kafka).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("compression.type", "lz4")
            .create()?;
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("bench{}-baseline", self.run_id))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .set("enable.partition.eof", "false")
            .create()?;
        consumer.subscribe(&[&topic])?;
        // Let the group settle before measuring.
        let _ = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await;
        let t0 = Instant::now();
        let recorder = Recorder::default();
        let rec = recorder.clone();
        let o = self.options.clone();
        let record_from = o.warmup;
        let consuming = tokio::spawn(async move {
            while let Ok(Ok(m)) =
                tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await
            {
                let sent = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                    .and_then(|v| v["sentMicros"].as_u64());
                if let Some(sent) = sent {
                    let sent = Duration::from_micros(sent);
                    if sent >= record_from {
                        rec.record(t0.elapsed().saturating_sub(sent));
                    }
                }
            }
        });
        let padding = "x".repeat(400);
        let op: Op = Arc::new(move |n| {
            let producer = producer.clone();
            let topic = topic.clone();
            let padding = padding.clone();
            async move {
                let payload =
                    json!({ "sentMicros": t0.elapsed().as_micros() as u64, "pad": padding })
                        .to_string();
                let key = (n % 10_000).to_string();
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&payload),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!(e))?;
                Ok(())
            }
            .boxed()
        });
        let paced = open_loop(op, rate, o.warmup, o.duration).await;
        let _ = consuming.await;
        let mut measured = recorder.measurement(o.duration);
        measured.machine_idle_percent = paced.machine_idle_percent;
        Ok(measured)
    }

    async fn user_queries(&mut self) -> anyhow::Result<Vec<ScenarioResult>> {
        eprintln!("bench: user(id) queries");
        let o = self.options.clone();
        let users = Arc::new(self.users.clone());
        let client = self.client.clone();
        // Encoded once, as the baselines' paths are: the load generator's own work per
        // request should be alike for both.
        let bodies: Arc<Vec<bytes::Bytes>> = Arc::new(
            users
                .iter()
                .map(|id| {
                    bytes::Bytes::from(json!({
                        "query": "query($id: ID!) { user(id: $id) { id email displayName version } }",
                        "variables": { "id": id }
                    })
                    .to_string())
                })
                .collect(),
        );
        let query: Op = Arc::new(move |n| {
            let client = client.clone();
            let body = bodies[n as usize % bodies.len()].clone();
            async move { client.graphql_encoded(body).await }.boxed()
        });
        let client = self.client.clone();
        let noop: Op = Arc::new(move |_| {
            let client = client.clone();
            async move { client.get("/bench/noop").await.map(|_| ()) }.boxed()
        });
        let (subject, bare) = interleaved(
            query.clone(),
            noop,
            o.concurrency,
            o.warmup,
            o.duration,
            o.rounds,
        )
        .await;
        let client = self.client.clone();
        let ids = users.clone();
        let plain: Op = Arc::new(move |n| {
            let client = client.clone();
            let id = ids[n as usize % ids.len()];
            async move {
                client
                    .get(&format!("/bench/redis-user/{id}"))
                    .await
                    .map(|_| ())
            }
            .boxed()
        });
        let (subject_again, redis_get) =
            interleaved(query, plain, o.concurrency, o.warmup, o.duration, o.rounds).await;
        Ok(vec![
            ratio_result(
                "user(id) over HTTP",
                subject,
                "bare HTTP handler",
                bare,
                0.25,
            ),
            ratio_result(
                "user(id) over HTTP",
                subject_again,
                "handler: Redis GET + JSON",
                redis_get,
                0.7,
            ),
        ])
    }

    /// Writes `n` users numbered from `first`, `per_user` events each (a `UserCreated`, then
    /// `ProfileUpdated`s), as the event store writes them: personal fields sealed with each
    /// user's own data key, the keys wrapped in the key table.
    async fn seed_sealed(&self, first: u64, n: u64, per_user: u64) -> anyhow::Result<()> {
        use pcf_adapters::personal::{event_aad, seal_payload, DataKey};
        let keyring = self.app.keys.keyring();
        let events = (n * per_user) as usize;
        let (mut ids, mut sequences, mut types, mut payloads) = (
            Vec::with_capacity(events),
            Vec::with_capacity(events),
            Vec::with_capacity(events),
            Vec::with_capacity(events),
        );
        let (mut key_users, mut kek_ids, mut wrapped) = (Vec::new(), Vec::new(), Vec::new());
        for u in first..first + n {
            let id = Uuid::new_v4().to_string();
            let key = DataKey::generate();
            let wrap = keyring.wrap(&id, &key);
            key_users.push(id.clone());
            kek_ids.push(wrap.kek_id);
            wrapped.push(wrap.bytes);
            for seq in 1..=per_user {
                let (event_type, mut inner) = if seq == 1 {
                    let email = format!("r{u}-{}@bench.test", self.run_id);
                    (
                        "UserCreated",
                        json!({"userId": id, "email": email, "displayName": format!("R{u}"),
                        "bio": null, "avatarUrl": null, "occurredAt": "2026-01-01T00:00:00Z"}),
                    )
                } else {
                    (
                        "ProfileUpdated",
                        json!({"displayName": format!("R{u}-{seq}"), "bio": null,
                        "avatarUrl": null, "occurredAt": "2026-01-01T00:00:00Z"}),
                    )
                };
                seal_payload(&mut inner, &key, &event_aad(&id, seq, event_type));
                ids.push(id.clone());
                sequences.push(seq as i64);
                types.push(event_type);
                payloads.push(json!({ event_type: inner }));
            }
        }
        let mut tx = self.primary.begin().await?;
        sqlx::query(
            "INSERT INTO user_keys (user_id, kek_id, wrapped) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[])",
        )
        .bind(&key_users)
        .bind(&kek_ids)
        .bind(&wrapped)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata) \
             SELECT 'User', e.id, e.seq, e.kind, '2', e.payload, '{}'::jsonb \
             FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::jsonb[]) \
                  AS e (id, seq, kind, payload)",
        )
        .bind(&ids)
        .bind(&sequences)
        .bind(&types)
        .bind(&payloads)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// `rebuild all` over a log of `rebuild_events` events, against the raw Kafka consume
    /// rate of the same topic and a raw pipelined Redis write of the same documents.
    async fn rebuild(&mut self) -> anyhow::Result<Vec<ScenarioResult>> {
        let total = self.options.rebuild_events;
        let per_user = 10u64;
        let users = total.div_ceil(per_user);
        eprintln!("bench: seeding {total} events");
        let chunk = 10_000u64;
        let mut done = 0u64;
        while done < users {
            let n = chunk.min(users - done);
            self.seed_sealed(done, n, per_user).await?;
            done += n;
        }
        // Everything published and projected before measuring, and the database settled
        // after the seeding, so nothing competes.
        self.wait_caught_up().await?;
        self.settle_database().await?;
        let in_log = self
            .app
            .store
            .count_after(pcf_domain::Position::START)
            .await?;
        // Alternating rounds, as in the other throughput scenarios, so that drift on the
        // shared machine (the broker's page cache, the database's background work) falls on
        // the rebuild and its baselines alike; each side's rate is over all its rounds.
        let mut totals = [Totals::default(); 4];
        for round in 0..self.options.rounds.max(1) {
            let rebuilt = self.rebuild_once(in_log).await?;
            let read = Timed::of(self.read_log()).await?;
            let consumed = self.consume_topic(in_log, round).await?;
            let written = Timed::of(self.write_documents(in_log, per_user)).await?;
            eprintln!(
                "bench: round {}: rebuild {}, the log read alone {}, Kafka consume {}, \
                 Redis write {}",
                round + 1,
                rebuilt.rate(in_log),
                read.rate(read.value),
                consumed.rate(consumed.value),
                written.rate(in_log)
            );
            totals[0].add_timed(in_log, &rebuilt);
            totals[1].add_timed(consumed.value, &consumed);
            totals[2].add_timed(in_log, &written);
            totals[3].add_timed(read.value, &read);
        }
        let [subject, consume, redis_write, log_read] = totals.map(Totals::measurement);
        let (name, slower) = if consume.throughput <= redis_write.throughput {
            ("raw Kafka consume (slower baseline)", consume)
        } else {
            ("pipelined Redis write (slower baseline)", redis_write)
        };
        // What the target asks of the rebuild, asked of its first stage alone: reading the
        // log, with no key opened and no view written. Where this falls short of the
        // target on a machine, so does any rebuild that reads the log there.
        let mut floor = ratio_result(
            "  the log read alone (a rebuild's first stage)",
            log_read,
            name,
            slower.clone(),
            0.5,
        );
        floor.target = "-".to_owned();
        floor.met = None;
        Ok(vec![
            ratio_result(
                &format!("projections rebuild all ({in_log} events)"),
                subject,
                name,
                slower,
                0.5,
            ),
            floor,
        ])
    }

    /// Reads the whole log as a rebuild does (pages of changes, a page ahead is not kept),
    /// doing nothing with it: the events read.
    async fn read_log(&self) -> anyhow::Result<u64> {
        let log: Arc<dyn pcf_domain::ports::EventLog> = self.app.store.clone();
        let mut pages = pcf_domain::ports::LogPages::new(
            log,
            pcf_domain::Position::START,
            pcf_projectors::RebuildOptions::default().batch_size,
        );
        let mut read = 0u64;
        loop {
            let page = pages.next_changes().await?;
            if page.is_empty() {
                return Ok(read);
            }
            read += page.len() as u64;
        }
    }

    /// What `pcf projections rebuild all` does, timed until readers use the new
    /// generations (dropping the old ones, after the linger, is cleanup).
    async fn rebuild_once(&self, in_log: u64) -> anyhow::Result<Timed<()>> {
        let log: Arc<dyn pcf_domain::ports::EventLog> = self.app.store.clone();
        let views: Vec<Arc<dyn pcf_projectors::ViewStore>> = vec![
            Arc::new(pcf_projectors::SqlUserViews::new(self.primary.clone())),
            Arc::new(
                pcf_projectors::RedisUserViews::connect(
                    self.config.redis_url.as_deref().unwrap_or_default(),
                    self.config.redis_prefix.clone(),
                )
                .await?,
            ),
        ];
        eprintln!("bench: rebuilding both views from {in_log} events");
        let (started, cpu) = (Instant::now(), cpu_times());
        let switched = Mutex::new(None);
        pcf_projectors::rebuild_views_with(
            &views,
            log,
            self.app.keys.clone(),
            &pcf_projectors::RebuildOptions::default(),
            &|p| {
                if p.switched {
                    *switched.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Timed::since((), started, cpu));
                }
            },
        )
        .await?;
        Ok(switched
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(|| Timed::since((), started, cpu)))
    }

    /// Consumes the whole topic with a no-op handler, in a consumer group of its own for
    /// `round`: how many messages, and the time from the first.
    async fn consume_topic(&self, in_log: u64, round: u32) -> anyhow::Result<Timed<u64>> {
        let brokers = self.config.kafka_brokers.clone().unwrap_or_default();
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("bench{}-raw{round}", self.run_id))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            // As a projector's consumer: the client's default postpones a fetch by a second
            // once 100,000 messages wait, and left this consumer idle most of the time.
            .set(
                "fetch.queue.backoff.ms",
                pcf_projectors::consumer::FETCH_QUEUE_BACKOFF_MS,
            )
            .create()?;
        consumer.subscribe(&[&self.config.kafka_topic])?;
        let mut consumed = 0u64;
        let mut first: Option<(Instant, Option<(u64, u64)>)> = None;
        while consumed < in_log {
            match tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await {
                Ok(Ok(_)) => {
                    first.get_or_insert_with(|| (Instant::now(), cpu_times()));
                    consumed += 1;
                }
                _ => break,
            }
        }
        Ok(match first {
            Some((at, cpu)) => Timed::since(consumed, at, cpu),
            None => Timed::since(consumed, Instant::now(), None),
        })
    }

    /// Writes one document per event to Redis, pipelined a thousand at a time.
    async fn write_documents(&self, in_log: u64, per_user: u64) -> anyhow::Result<()> {
        let conn = self.redis.clone();
        let doc = serde_json::to_string(&UserView {
            id: Uuid::nil(),
            email: "r1@bench.test".into(),
            display_name: "R1-10".into(),
            bio: None,
            avatar_url: None,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            version: 10,
            deleted: false,
        })?;
        let prefix = &self.config.redis_prefix;
        // Several pipelines in flight, as a rebuild's fill has: one at a time, the writer
        // waited for each answer and left the machine a third idle.
        futures::stream::iter((0..in_log).step_by(1000))
            .map(|from| {
                let mut pipe = redis::pipe();
                for i in from..(from + 1000).min(in_log) {
                    pipe.set(format!("{prefix}:baseline:{}", i / per_user), &doc)
                        .ignore();
                }
                let mut conn = conn.clone();
                async move { pipe.query_async::<()>(&mut conn).await }
            })
            .buffered(4)
            .try_collect::<()>()
            .await?;
        Ok(())
    }
}

/// A result with the time it took from a start, and the machine's idle and total CPU time
/// over that time (where `/proc/stat` tells them).
struct Timed<T> {
    value: T,
    elapsed: Duration,
    cpu: Option<(u64, u64)>,
}

impl<T> Timed<T> {
    /// Runs `work`, timing it.
    async fn of(
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<Self> {
        let (started, cpu) = (Instant::now(), cpu_times());
        let value = work.await?;
        Ok(Self::since(value, started, cpu))
    }

    /// `value`, timed from `started`, when the machine's CPU times were `cpu`.
    fn since(value: T, started: Instant, cpu: Option<(u64, u64)>) -> Self {
        let elapsed = started.elapsed();
        let cpu = cpu
            .zip(cpu_times())
            .map(|((idle0, total0), (idle1, total1))| {
                (idle1.saturating_sub(idle0), total1.saturating_sub(total0))
            });
        Self {
            value,
            elapsed,
            cpu,
        }
    }

    /// `count` over the time taken, with the machine's idle share then, for the log.
    fn rate(&self, count: u64) -> String {
        let rate = rate_measurement(count, self.elapsed).throughput;
        match self.cpu.and_then(|(idle, total)| idle_percent(idle, total)) {
            Some(idle) => format!("{rate:.0}/s ({idle:.0} % idle)"),
            None => format!("{rate:.0}/s"),
        }
    }
}

/// Operations, time and the machine's idle and total CPU time, summed over the rounds of a
/// measurement.
#[derive(Clone, Copy, Default)]
struct Totals {
    count: u64,
    elapsed: Duration,
    idle: u64,
    cpu: u64,
}

impl Totals {
    fn add(&mut self, count: u64, elapsed: Duration) {
        self.count += count;
        self.elapsed += elapsed;
    }

    fn add_timed<T>(&mut self, count: u64, timed: &Timed<T>) {
        self.add(count, timed.elapsed);
        if let Some((idle, total)) = timed.cpu {
            self.idle += idle;
            self.cpu += total;
        }
    }

    fn measurement(self) -> Measurement {
        let mut measured = rate_measurement(self.count, self.elapsed);
        measured.machine_idle_percent = idle_percent(self.idle, self.cpu);
        measured
    }
}

/// A commit whose version is awaited in Redis.
struct Awaited {
    key: String,
    version: u64,
    /// Told when the answer that showed the version arrived.
    seen: tokio::sync::oneshot::Sender<Instant>,
}

/// Reads every awaited key once a millisecond (one MGET) and tells those that show their
/// version. Only this task removes entries, and others only push, so the first entries
/// are the ones it asked about.
async fn watch_visibility(mut redis: ConnectionManager, waiting: Arc<Mutex<Vec<Awaited>>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let keys: Vec<String> = {
            let waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.iter().map(|w| w.key.clone()).collect()
        };
        if keys.is_empty() {
            continue;
        }
        // MGET spelled out: the client sends a GET for a single key, whose answer is not a
        // list.
        let asked = redis::cmd("MGET")
            .arg(&keys)
            .query_async::<Vec<Option<String>>>(&mut redis)
            .await;
        let Ok(docs) = asked else {
            continue;
        };
        let at = Instant::now();
        let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
        let asked = docs.len().min(waiting.len());
        let later = waiting.split_off(asked);
        for (awaited, doc) in std::mem::take(&mut *waiting).into_iter().zip(docs) {
            let shown = doc
                .and_then(|d| serde_json::from_str::<UserView>(&d).ok())
                .is_some_and(|u| u.version >= awaited.version);
            if shown {
                let _ = awaited.seen.send(at);
            } else if !awaited.seen.is_closed() {
                waiting.push(awaited);
            }
        }
        waiting.extend(later);
    }
}

/// The scenario's name: the target's load (half the command rate) keeps the plain name.
fn visible_scenario(load: f64) -> String {
    let name = "commit -> visible in user(id) (Redis)";
    if load == 0.5 {
        name.to_owned()
    } else {
        format!("{name} at {load} of the max rate")
    }
}

fn rate_measurement(count: u64, elapsed: Duration) -> Measurement {
    let seconds = elapsed.as_secs_f64();
    Measurement {
        ops: count,
        errors: 0,
        seconds,
        throughput: if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        },
        p50_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        machine_idle_percent: None,
    }
}

#[cfg(test)]
mod tests {
    use super::{visible_scenario, with_database};

    #[test]
    fn commit_to_visible_names_a_load_other_than_the_targets() {
        assert_eq!(
            visible_scenario(0.5),
            "commit -> visible in user(id) (Redis)"
        );
        assert_eq!(
            visible_scenario(0.25),
            "commit -> visible in user(id) (Redis) at 0.25 of the max rate"
        );
    }

    #[test]
    fn the_database_name_is_replaced_keeping_the_options() {
        assert_eq!(
            with_database("postgres://u@h:5432/pcf?sslmode=disable", "b"),
            "postgres://u@h:5432/b?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h/pcf", "b"), "postgres://u@h/b");
    }
}
