//! PCF as a fleet (`scripts/fleet.sh`: HAProxy, three API instances, two relays, two
//! projectors) on the engines of `scripts/services.sh up --ha`, under a steady load of mixed
//! mutations and queries through HAProxy while a deploy or a fault happens. Each test reports
//! the failed requests, the longest window without a successful write, and whether the views
//! equal a rebuild from the log afterwards (printed, and appended to `fleet-report.md` in the
//! target's tmp directory, which `scripts/test.sh` prints).
//!
//! They run when `PCF_TEST_FLEET` is set (scripts/test.sh sets it and starts the engines), one
//! at a time: the fleet's ports are fixed. The engines come from `PCF_TEST_FLEET_*`, by default
//! those of `--ha`.

use crate::support::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// Held by each fleet test: one fleet at a time.
static ONE_FLEET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const HAPROXY_PORT: u16 = 8480;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The engines: PostgreSQL (several hosts: the primary is whichever accepts writes), its read
/// replicas, Redis, Kafka.
struct Engines {
    database: String,
    read_databases: String,
    redis: String,
    brokers: String,
}

impl Engines {
    fn from_env() -> Option<Self> {
        std::env::var("PCF_TEST_FLEET")
            .ok()
            .filter(|v| !v.is_empty())?;
        Some(Self {
            database: env_or(
                "PCF_TEST_FLEET_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5442,127.0.0.1:5443/postgres",
            ),
            read_databases: env_or(
                "PCF_TEST_FLEET_READ_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5444/postgres,postgres://postgres@127.0.0.1:5443/postgres",
            ),
            redis: env_or(
                "PCF_TEST_FLEET_REDIS_URL",
                "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002",
            ),
            brokers: env_or(
                "PCF_TEST_FLEET_KAFKA_BROKERS",
                "127.0.0.1:9192,127.0.0.1:9193,127.0.0.1:9194",
            ),
        })
    }
}

/// `url` (`postgres://USER@HOST:PORT[,HOST:PORT...]/DB`) with database `db`, one URL per host.
fn per_host(url: &str, db: &str) -> Vec<String> {
    let (scheme, rest) = url.split_once("://").expect("a database URL");
    let (user, rest) = rest.split_once('@').expect("a user in the database URL");
    let hosts = rest.split('/').next().unwrap_or_default();
    hosts
        .split(',')
        .map(|h| format!("{scheme}://{user}@{h}/{db}"))
        .collect()
}

/// `urls` (comma-separated, each of one or several hosts), each naming database `db`.
fn with_database(urls: &str, db: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    for part in urls.split(',') {
        match out.last_mut() {
            // Another host of the URL before.
            Some(last) if !part.contains("://") => {
                last.push(',');
                last.push_str(part);
            }
            _ => out.push(part.to_owned()),
        }
    }
    out.iter()
        .map(|url| {
            let (scheme, rest) = url.split_once("://").expect("a database URL");
            let authority = rest.split('/').next().unwrap_or_default();
            format!("{scheme}://{authority}/{db}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn a_database_is_named_in_every_url_and_host_list() {
    assert_eq!(
        with_database(
            "postgres://u@a:1,b:2/postgres,postgres://u@c:3/postgres",
            "x"
        ),
        "postgres://u@a:1,b:2/x,postgres://u@c:3/x"
    );
    assert_eq!(with_database("postgres://u@a:1", "x"), "postgres://u@a:1/x");
}

/// A pool on whichever host of `url` accepts writes now.
async fn primary_pool(url: &str, db: &str) -> sqlx::PgPool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for host in per_host(url, db) {
            let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(2))
                .connect(&host)
                .await
            else {
                continue;
            };
            let standby: Result<(bool,), _> = sqlx::query_as("SELECT pg_is_in_recovery()")
                .fetch_one(&pool)
                .await;
            if let Ok((false,)) = standby {
                return pool;
            }
        }
        assert!(Instant::now() < deadline, "no primary among {url}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One fleet of a test, on a database, topic, group prefix and Redis prefix of its own; taken
/// down when dropped.
struct Fleet {
    name: String,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    engines: Engines,
    db: String,
    /// What the fault noted, for the report.
    notes: Mutex<Vec<String>>,
}

impl Fleet {
    async fn up(name: &str, engines: Engines) -> Self {
        let tag = format!("{name}_{}", &Uuid::new_v4().simple().to_string()[..8]);
        let db = format!("fleet_{tag}");
        let admin = primary_pool(&engines.database, "postgres").await;
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&admin)
            .await
            .expect("creating the fleet's database");
        let dir = tempfile::tempdir().expect("a directory for the fleet");
        let env = vec![
            ("PCF_BIN".into(), env!("CARGO_BIN_EXE_pcf").to_owned()),
            ("FLEET_DIR".into(), dir.path().display().to_string()),
            (
                "PCF_DATABASE_URL".into(),
                with_database(&engines.database, &db),
            ),
            (
                "PCF_READ_DATABASE_URL".into(),
                with_database(&engines.read_databases, &db),
            ),
            ("PCF_REDIS_URL".into(), engines.redis.clone()),
            ("PCF_REDIS_PREFIX".into(), format!("fleet-{tag}")),
            ("PCF_KAFKA_BROKERS".into(), engines.brokers.clone()),
            ("PCF_KAFKA_TOPIC".into(), format!("pcf.fleet.{tag}")),
            ("PCF_KAFKA_GROUP_PREFIX".into(), format!("fleet-{tag}")),
            ("PCF_JWT_SECRET".into(), JWT_SECRET.to_owned()),
            ("PCF_LOG".into(), "info,librdkafka=warn".into()),
        ];
        let fleet = Self {
            name: name.to_owned(),
            dir,
            env,
            engines,
            db,
            notes: Mutex::default(),
        };
        fleet.script(&["up"]);
        fleet
    }

    /// Runs `scripts/fleet.sh ARGS` for this fleet; panics with its output if it fails.
    fn script(&self, args: &[&str]) -> String {
        let out = Command::new(repo().join("scripts/fleet.sh"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(repo())
            .output()
            .expect("running scripts/fleet.sh");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "scripts/fleet.sh {args:?} failed:\n{text}"
        );
        text
    }

    /// Runs the `pcf` command line with the fleet's configuration.
    fn pcf(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_pcf"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("PCF_ENV", "production")
            .env("PCF_KEK", self.kek())
            .env("PCF_KEK_ID", "fleet")
            .env("PCF_LOG", "warn")
            .output()
            .expect("running pcf");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pcf {args:?} failed:\n{text}");
        text
    }

    fn kek(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kek"))
            .expect("the fleet's KEK")
            .trim()
            .to_owned()
    }

    /// Notes `what` in the report.
    fn note(&self, what: String) {
        eprintln!("{}: {what}", self.name);
        self.notes.lock().unwrap().push(what);
    }

    /// The pids of the fleet's instances, by name.
    fn pids(&self) -> Vec<(String, String)> {
        let mut pids: Vec<_> = std::fs::read_dir(self.dir.path())
            .expect("the fleet's directory")
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let instance = name.strip_suffix(".pid")?.to_owned();
                let pid = std::fs::read_to_string(self.dir.path().join(&name)).ok()?;
                Some((instance, pid.trim().to_owned()))
            })
            .collect();
        pids.sort();
        pids
    }

    fn log_of(&self, instance: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{instance}.log"))).unwrap_or_default()
    }

    /// How many times `relay` took the lease.
    fn activations(&self, relay: &str) -> usize {
        self.log_of(relay)
            .matches("\"message\":\"relay active\"")
            .count()
    }

    /// The relay instance that holds the lease, of two that run: the one that took it more
    /// often than it lost it.
    fn active_relay(&self) -> &'static str {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for relay in ["relay1", "relay2"] {
                let lost = self.log_of(relay).matches("relay leadership lost").count();
                if self.activations(relay) > lost {
                    return relay;
                }
            }
            assert!(Instant::now() < deadline, "no relay is active");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/fleet.sh"))
            .arg("down")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(repo())
            .output();
        if std::thread::panicking() {
            eprintln!(
                "fleet {}: logs of the failed test kept in {}",
                self.name,
                self.dir.path().display()
            );
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            std::mem::forget(kept);
            return;
        }
        self.clean_up();
    }
}

impl Fleet {
    /// Removes what the fleet made on the engines: its database (on whichever host is the
    /// primary: libpq follows `target_session_attrs`), its topics, its Redis keys.
    fn clean_up(&self) {
        let env = |key: &str| {
            self.env
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let admin = format!(
            "{}?target_session_attrs=read-write",
            with_database(&self.engines.database, "postgres")
        );
        let _ = Command::new("psql")
            .args([
                &admin,
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db),
            ])
            .output();
        let topic = env("PCF_KAFKA_TOPIC");
        let _ = Command::new(repo().join("scripts/kafka-topics.sh"))
            .args([
                "--bootstrap-server",
                &self.engines.brokers,
                "--delete",
                "--topic",
            ])
            .arg(format!("{topic}|{topic}.dlq"))
            .output();
        // Every primary of a cluster is scanned; the keys go to `redis-cli -c`'s input, one
        // UNLINK a line (it follows each to its slot's node).
        let prefix = env("PCF_REDIS_PREFIX");
        let first = self
            .engines
            .redis
            .split(',')
            .next()
            .unwrap_or_default()
            .to_owned();
        let mut nodes = vec![first.clone()];
        if self.engines.redis.contains(',') {
            if let Ok(out) = Command::new("redis-cli")
                .args(["-u", &first, "cluster", "nodes"])
                .output()
            {
                nodes = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains("master"))
                    .filter_map(|l| l.split(' ').nth(1)?.split('@').next())
                    .map(|addr| format!("redis://{addr}"))
                    .collect();
            }
        }
        let mut unlink = String::new();
        for node in &nodes {
            if let Ok(out) = Command::new("redis-cli")
                .args(["-u", node, "--scan", "--pattern", &format!("*{prefix}*")])
                .output()
            {
                for key in String::from_utf8_lossy(&out.stdout).lines() {
                    unlink.push_str(&format!("UNLINK \"{key}\"\n"));
                }
            }
        }
        if let Ok(mut child) = Command::new("redis-cli")
            .args(["-c", "-u", &first])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
        {
            use std::io::Write;
            if let Some(mut input) = child.stdin.take() {
                let _ = input.write_all(unlink.as_bytes());
            }
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP through HAProxy

/// POSTs a GraphQL operation to HAProxy; the status and the JSON body, or what went wrong.
async fn graphql(token: &str, query: &str, variables: Value) -> Result<Value, String> {
    let body = json!({ "query": query, "variables": variables }).to_string();
    let request = format!(
        "POST /graphql HTTP/1.1\r\nHost: pcf\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", HAPROXY_PORT))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .map_err(|_| "no answer within 15 s".to_owned())??;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    if status != "200" {
        return Err(format!("HTTP {status}: {body}"));
    }
    let value: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if let Some(errors) = value.get("errors") {
        return Err(format!("errors: {errors}"));
    }
    Ok(value["data"].clone())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// the load

#[derive(Default)]
struct Tally {
    writes_ok: u64,
    writes_failed: Vec<String>,
    reads_ok: u64,
    reads_failed: Vec<String>,
    last_write: Option<Instant>,
    longest_write_gap: Duration,
    /// The last version acknowledged for each user.
    acked: HashMap<Uuid, i64>,
}

impl Tally {
    fn wrote(&mut self, id: Uuid, version: i64) {
        let now = Instant::now();
        if let Some(last) = self.last_write {
            self.longest_write_gap = self.longest_write_gap.max(now - last);
        }
        self.last_write = Some(now);
        self.writes_ok += 1;
        let acked = self.acked.entry(id).or_default();
        *acked = (*acked).max(version);
    }
}

/// Writers and readers through HAProxy until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

const WRITERS: usize = 4;
const READERS: usize = 2;
/// Each client's pause between requests: a steady load that leaves the two cores room for the
/// fleet and its engines.
const PAUSE: Duration = Duration::from_millis(25);

fn random() -> u128 {
    Uuid::new_v4().as_u128()
}

impl Load {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let mut tasks = Vec::new();
        for _ in 0..WRITERS {
            let (stop, tally) = (stop.clone(), tally.clone());
            tasks.push(tokio::spawn(async move { write(stop, tally).await }));
        }
        for _ in 0..READERS {
            let (stop, tally) = (stop.clone(), tally.clone());
            tasks.push(tokio::spawn(async move { read(stop, tally).await }));
        }
        Self { stop, tally, tasks }
    }

    async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a load task");
        }
        Arc::try_unwrap(self.tally)
            .ok()
            .expect("the tally")
            .into_inner()
            .unwrap()
    }
}

fn email() -> String {
    format!("fleet-{:x}@example.com", random())
}

async fn write(stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let token = admin();
    let mut mine: Vec<Uuid> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let pick = random();
        let (query, variables, field) = if mine.len() < 3 || pick % 10 < 3 {
            let input =
                json!({ "email": email(), "displayName": format!("Fleet {}", pick % 1000) });
            (CREATE_USER, json!({ "input": input }), "createUser")
        } else {
            let id = mine[(pick >> 8) as usize % mine.len()];
            if pick % 10 < 8 {
                let input = json!({ "displayName": format!("Renamed {}", pick % 100_000) });
                (
                    UPDATE_PROFILE,
                    json!({ "id": id, "input": input }),
                    "updateProfile",
                )
            } else {
                (
                    CHANGE_EMAIL,
                    json!({ "id": id, "email": email() }),
                    "changeEmail",
                )
            }
        };
        match graphql(&token, query, variables).await {
            Ok(data) => {
                let payload = &data[field];
                let id = payload["user"]["id"]
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s).ok());
                match (id, payload["version"].as_i64()) {
                    (Some(id), Some(version)) => {
                        if field == "createUser" {
                            mine.push(id);
                        }
                        tally.lock().unwrap().wrote(id, version);
                    }
                    _ => tally
                        .lock()
                        .unwrap()
                        .writes_failed
                        .push(format!("{field}: no user in {data}")),
                }
            }
            Err(e) => tally
                .lock()
                .unwrap()
                .writes_failed
                .push(format!("{field}: {e}")),
        }
        tokio::time::sleep(PAUSE).await;
    }
}

async fn read(stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let token = admin();
    while !stop.load(Ordering::Relaxed) {
        let id = {
            let t = tally.lock().unwrap();
            let n = t.acked.len();
            (n > 0).then(|| *t.acked.keys().nth(random() as usize % n).unwrap())
        };
        if let Some(id) = id {
            // A point read (the Redis view) and a page of users (the SQL view, on the
            // replicas), in turn.
            let (what, outcome) = if random().is_multiple_of(2) {
                ("user", graphql(&token, USER, json!({ "id": id })).await)
            } else {
                ("users", graphql(&token, USERS, json!({ "first": 5 })).await)
            };
            let mut t = tally.lock().unwrap();
            match outcome {
                Ok(_) => t.reads_ok += 1,
                Err(e) => t.reads_failed.push(format!("{what}: {e}")),
            }
        }
        tokio::time::sleep(PAUSE).await;
    }
}

// ---------------------------------------------------------------------------------------------
// after the load: convergence, the log, and the views against a rebuild

/// Waits until the views hold every acknowledged version; the longest wait.
async fn converge(tally: &Tally) {
    let token = admin();
    let deadline = Instant::now() + Duration::from_secs(120);
    for (id, version) in &tally.acked {
        loop {
            let data = graphql(&token, USER, json!({ "id": id, "minVersion": version })).await;
            if matches!(&data, Ok(d) if d["user"]["version"].as_i64() >= Some(*version)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "user {id} never reached version {version} in the views: {data:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The projections' lag, until every one is 0.
async fn caught_up() {
    let token = admin();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let data = graphql(&token, PROJECTIONS, json!({})).await;
        if let Ok(d) = &data {
            if d["projections"]
                .as_array()
                .is_some_and(|ps| ps.iter().all(|p| p["lag"].as_i64() == Some(0)))
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "projections never caught up: {data:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What the views hold for `users`: the Redis view through `user(id)` and the SQL view's rows.
async fn views(fleet: &Fleet, users: &[Uuid]) -> (Vec<Value>, Vec<String>) {
    let token = admin();
    let mut documents = Vec::new();
    for id in users {
        let data = graphql(&token, USER, json!({ "id": id }))
            .await
            .unwrap_or_else(|e| panic!("user {id}: {e}"));
        documents.push(data["user"].clone());
    }
    let pool = primary_pool(&fleet.engines.database, &fleet.db).await;
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT row_to_json(r)::text FROM read_users r WHERE id = ANY($1) ORDER BY id",
    )
    .bind(users)
    .fetch_all(&pool)
    .await
    .expect("reading the SQL view");
    (documents, rows.into_iter().map(|(r,)| r).collect())
}

/// Every acknowledged version is in the log, and each user's events are numbered 1..=n
/// without a gap or a double; the number of events of each user.
async fn the_log_holds_every_acknowledged_write(fleet: &Fleet, tally: &Tally) -> usize {
    let pool = primary_pool(&fleet.engines.database, &fleet.db).await;
    let mut missing = Vec::new();
    for (id, version) in &tally.acked {
        let (count, max): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), max(sequence) FROM events WHERE aggregate_id = $1")
                .bind(id.to_string())
                .fetch_one(&pool)
                .await
                .expect("reading the log");
        if max.unwrap_or(0) < *version || Some(count) != max {
            missing.push(format!(
                "{id}: acknowledged {version}, log {count} events up to {max:?}"
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "the log lacks acknowledged writes: {missing:?}"
    );
    tally.acked.len()
}

struct Report {
    tally: Tally,
    views_equal_a_rebuild: bool,
    notes: Vec<String>,
}

/// Runs `fault` on a fleet under load, then checks the log and the views, and `check` on the
/// report while the fleet still runs (its logs are kept if a check fails).
async fn under_load<F>(name: &str, fault: F, check: impl FnOnce(&Report))
where
    F: AsyncFnOnce(&Fleet),
{
    let Some(engines) = Engines::from_env() else {
        eprintln!("skipped: PCF_TEST_FLEET is not set (scripts/test.sh sets it and starts --ha)");
        return;
    };
    let fleet = Fleet::up(name, engines).await;
    let load = Load::start();
    tokio::time::sleep(Duration::from_secs(4)).await;
    fault(&fleet).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let tally = load.stop().await;
    assert!(tally.writes_ok > 0, "no write succeeded");

    the_log_holds_every_acknowledged_write(&fleet, &tally).await;
    converge(&tally).await;
    caught_up().await;
    let mut users: Vec<Uuid> = tally.acked.keys().copied().collect();
    users.sort();
    let before = views(&fleet, &users).await;
    fleet.pcf(&["projections", "rebuild", "all"]);
    caught_up().await;
    let after = views(&fleet, &users).await;
    let views_equal_a_rebuild = before == after;
    let report = Report {
        tally,
        views_equal_a_rebuild,
        notes: std::mem::take(&mut fleet.notes.lock().unwrap()),
    };
    record(name, &report);
    if !views_equal_a_rebuild {
        let diff: Vec<_> = before
            .0
            .iter()
            .zip(&after.0)
            .filter(|(b, a)| b != a)
            .take(3)
            .collect();
        panic!("{name}: the views differ from a rebuild, e.g. {diff:?}");
    }
    check(&report);
}

/// Prints the report and appends it to the target's `fleet-report.md`.
fn record(name: &str, r: &Report) {
    let t = &r.tally;
    let line = format!(
        "| {name} | {} | {} | {} | {} | {:.2} s | {} | {} |",
        t.writes_ok,
        t.writes_failed.len(),
        t.reads_ok,
        t.reads_failed.len(),
        t.longest_write_gap.as_secs_f64(),
        if r.views_equal_a_rebuild { "yes" } else { "NO" },
        r.notes.join("; "),
    );
    eprintln!("{line}");
    for e in t.writes_failed.iter().chain(&t.reads_failed).take(3) {
        eprintln!("  failed: {}", e.trim());
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-report.md");
    let new = !path.exists();
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        use std::io::Write;
        if new {
            let _ = writeln!(
                f,
                "| event | writes ok | writes failed | reads ok | reads failed | longest write gap | views = rebuild | notes |\n|---|---|---|---|---|---|---|---|"
            );
        }
        let _ = writeln!(f, "{line}");
    }
}

/// At most a few of `failures`, and how many there were.
fn some(failures: &[String]) -> String {
    let shown: Vec<&str> = failures.iter().take(3).map(|f| f.trim()).collect();
    format!("{} failed, e.g. {shown:?}", failures.len())
}

fn no_failures(r: &Report) {
    assert!(
        r.tally.writes_failed.is_empty(),
        "writes: {}",
        some(&r.tally.writes_failed)
    );
    assert!(
        r.tally.reads_failed.is_empty(),
        "reads: {}",
        some(&r.tally.reads_failed)
    );
}

// ---------------------------------------------------------------------------------------------
// the deploys and faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_the_api_instances_fails_no_request() {
    let _one = ONE_FLEET.lock().await;
    under_load(
        "rolling_restart",
        async |fleet: &Fleet| {
            fleet.script(&["rolling-restart"]);
        },
        |r: &Report| {
            no_failures(r);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_switch_fails_no_request() {
    let _one = ONE_FLEET.lock().await;
    under_load(
        "blue_green",
        async |fleet: &Fleet| {
            fleet.script(&["blue-green"]);
        },
        |r: &Report| {
            no_failures(r);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_relay_publishes_within_5_s_of_the_active_one_killed() {
    let _one = ONE_FLEET.lock().await;
    under_load(
        "kill_relay",
        async |fleet: &Fleet| {
            let active = fleet.active_relay();
            let other = if active == "relay1" {
                "relay2"
            } else {
                "relay1"
            };
            let standby_took = fleet.activations(other);
            fleet.script(&["kill", active]);
            let killed = Instant::now();
            // A user created after the kill is in the views once the other relay published it.
            let token = admin();
            let input = json!({ "email": email(), "displayName": "After the relay" });
            let data = graphql(&token, CREATE_USER, json!({ "input": input }))
                .await
                .expect("a write after the relay's kill");
            let id = data["createUser"]["user"]["id"]
                .as_str()
                .unwrap()
                .to_owned();
            loop {
                let seen = graphql(&token, USER, json!({ "id": id })).await;
                if matches!(&seen, Ok(d) if !d["user"].is_null()) {
                    break;
                }
                assert!(
                    killed.elapsed() < Duration::from_secs(30),
                    "nothing published 30 s after the active relay's kill"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let took = killed.elapsed();
            fleet.note(format!(
                "a write after the relay's kill visible in {:.2} s",
                took.as_secs_f64()
            ));
            assert!(
                took < Duration::from_secs(5),
                "the standby relay took {took:?} to publish"
            );
            assert_eq!(
                fleet.activations(other),
                standby_took + 1,
                "the standby took the lease"
            );
            fleet.script(&["start", active]);
        },
        |r: &Report| {
            no_failures(r);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_batch_loses_and_doubles_nothing() {
    let _one = ONE_FLEET.lock().await;
    under_load(
        "kill_projector",
        async |fleet: &Fleet| {
            fleet.script(&["kill", "proj1"]);
            tokio::time::sleep(Duration::from_secs(3)).await;
            fleet.script(&["start", "proj1"]);
        },
        |r: &Report| {
            no_failures(r);
        },
    )
    .await;
}

/// The pid of Kafka node `n` of `--ha`.
fn kafka_node_pid(n: u8) -> Option<i32> {
    std::fs::read_to_string(format!("/var/lib/pcf-kafka-ha/n{n}/kafka.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn services(args: &[&str]) {
    let out = Command::new(repo().join("scripts/services.sh"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("running scripts/services.sh");
    assert!(
        out.status.success(),
        "scripts/services.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_broker_killed_and_back_fails_no_mutation() {
    let _one = ONE_FLEET.lock().await;
    under_load(
        "kill_kafka_broker",
        async |_fleet: &Fleet| {
            let pid = kafka_node_pid(2).expect("Kafka node 2 of --ha runs");
            let status = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .expect("kill");
            assert!(status.success());
            tokio::time::sleep(Duration::from_secs(6)).await;
            services(&["up", "kafka_ha"]);
        },
        |r: &Report| {
            no_failures(r);
        },
    )
    .await;
}

/// The port and pid of a primary of the Redis Cluster of `--ha` that holds slots.
fn a_redis_cluster_primary() -> (u16, i32) {
    let nodes = Command::new("redis-cli")
        .args(["-p", "7000", "cluster", "nodes"])
        .output()
        .expect("redis-cli cluster nodes");
    let nodes = String::from_utf8_lossy(&nodes.stdout).to_string();
    let port: u16 = nodes
        .lines()
        .filter(|l| l.contains("master") && !l.contains("fail") && l.split(' ').count() > 8)
        .filter_map(|l| l.split(' ').nth(1)?.split(['@', ':']).nth(1)?.parse().ok())
        .find(|p| *p != 7000)
        .unwrap_or_else(|| panic!("no primary holding slots besides 7000 in:\n{nodes}"));
    let info = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "server"])
        .output()
        .expect("redis-cli info");
    let pid = String::from_utf8_lossy(&info.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:")?.trim().parse().ok())
        .expect("the primary's pid");
    (port, pid)
}

fn kill9(pid: i32) {
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -9 {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_primary_killed_keeps_reads_answering_and_the_views_converge() {
    let _one = ONE_FLEET.lock().await;
    let Some(engines) = Engines::from_env() else {
        eprintln!("skipped: PCF_TEST_FLEET is not set");
        return;
    };
    if !engines.redis.contains(',') {
        eprintln!(
            "skipped: the fleet's Redis is not a cluster ({})",
            engines.redis
        );
        return;
    }
    under_load(
        "kill_redis_primary",
        async |fleet: &Fleet| {
            let (port, pid) = a_redis_cluster_primary();
            fleet.note(format!("the primary on port {port} killed"));
            kill9(pid);
            // The cluster fails over (cluster-node-timeout); the killed node returns as a replica.
            tokio::time::sleep(Duration::from_secs(8)).await;
            services(&["up", "redis_cluster"]);
        },
        |r: &Report| {
            assert!(
                r.tally.reads_failed.is_empty(),
                "reads failed: {:?}",
                r.tally.reads_failed
            );
            assert!(
                r.tally.writes_failed.is_empty(),
                "{:?}",
                r.tally.writes_failed
            );
        },
    )
    .await;
}

fn pg_ha(args: &[&str]) -> String {
    let out = Command::new(repo().join("scripts/pg-ha.sh"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("running scripts/pg-ha.sh");
    assert!(
        out.status.success(),
        "scripts/pg-ha.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_replica_killed_leaves_queries_answering_from_the_other() {
    let _one = ONE_FLEET.lock().await;
    let Some(engines) = Engines::from_env() else {
        eprintln!("skipped: PCF_TEST_FLEET is not set");
        return;
    };
    if !engines.read_databases.contains("5444") {
        eprintln!("skipped: the fleet's read replicas are not those of --ha");
        return;
    }
    under_load(
        "kill_read_replica",
        async |_fleet: &Fleet| {
            pg_ha(&["kill", "5444"]);
            tokio::time::sleep(Duration::from_secs(6)).await;
            pg_ha(&["repair"]);
        },
        |r: &Report| {
            no_failures(r);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_lost_and_its_standby_promoted_resumes_writes_without_a_restart() {
    let _one = ONE_FLEET.lock().await;
    let Some(engines) = Engines::from_env() else {
        eprintln!("skipped: PCF_TEST_FLEET is not set");
        return;
    };
    if !engines.database.contains(',') {
        eprintln!(
            "skipped: the fleet's database has no standby ({})",
            engines.database
        );
        return;
    }
    under_load(
        "primary_promoted",
        async |fleet: &Fleet| {
            let before = fleet.pids();
            let old = pg_ha(&["primary"]);
            pg_ha(&["kill-primary"]);
            let killed = Instant::now();
            tokio::time::sleep(Duration::from_secs(1)).await;
            pg_ha(&["promote"]);
            let promoted = Instant::now();
            // Writes resume on the new primary, by the same processes.
            let token = admin();
            loop {
                let input = json!({ "email": email(), "displayName": "After the promotion" });
                if graphql(&token, CREATE_USER, json!({ "input": input })).await.is_ok() {
                    break;
                }
                assert!(
                    promoted.elapsed() < Duration::from_secs(60),
                    "no write succeeded within 60 s of the promotion"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            fleet.note(format!(
                "primary {old} killed, {} promoted {:.1} s later; the first write after it {:.2} s after the promotion",
                pg_ha(&["primary"]),
                (promoted - killed).as_secs_f64(),
                promoted.elapsed().as_secs_f64()
            ));
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert_eq!(fleet.pids(), before, "a PCF process restarted");
            pg_ha(&["repair"]);
        },
        |r: &Report| {
            // While no primary answers, every API instance is unready (its event store is down)
            // and HAProxy answers 503 itself; a write in flight when the primary died fails as
            // UNAVAILABLE. Nothing else may fail, and none acknowledged is missing (checked on
            // the log above).
            let retryable = |e: &String| e.contains("UNAVAILABLE") || e.contains("HTTP 503");
            for e in r.tally.writes_failed.iter().chain(&r.tally.reads_failed) {
                assert!(retryable(e), "a request failed otherwise: {e}");
            }
        },
    )
    .await;
}
