//! `pcf-bench` end to end against the cluster services, at a tiny size: every scenario runs
//! beside its baseline, both measure what they did without errors, and the run removes the
//! database, topics, consumer groups and Redis keys it made. Nothing here is timed.

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// The shared services `scripts/test.sh` starts (`PCF_TEST_*` names others).
fn primary_admin_url() -> String {
    env_or(
        "PCF_TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
}

fn replica_admin_url() -> String {
    env_or(
        "PCF_TEST_READ_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5433/postgres",
    )
}

fn shared_redis_url() -> String {
    env_or("PCF_TEST_REDIS_URL", "redis://127.0.0.1:6379")
}

fn shared_brokers() -> String {
    env_or("PCF_TEST_KAFKA_BROKERS", "127.0.0.1:9092")
}

/// Runs `pcf-bench` with `args` on the shared services; returns its results and what it
/// wrote on standard error.
fn bench(args: &[&str]) -> (Vec<Value>, String) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = dir.path().join("results.json");
    let run = Command::new(env!("CARGO_BIN_EXE_pcf-bench"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .env("PCF_DATABASE_URL", primary_admin_url())
        .env("PCF_READ_DATABASE_URL", replica_admin_url())
        .env("PCF_KAFKA_BROKERS", shared_brokers())
        .env("PCF_REDIS_URL", shared_redis_url())
        .env("PCF_LOG", "warn")
        // A KEK of the test's own: nothing generated into the working directory.
        .env("PCF_KEK", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
        .env("PCF_KEK_ID", "bench-test")
        .env_remove("PCF_CONFIG")
        .output()
        .expect("running pcf-bench");
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(
        run.status.success(),
        "pcf-bench failed ({}):\n{stderr}",
        run.status
    );
    let results = std::fs::read(&out).expect("the results file");
    let results: Vec<Value> = serde_json::from_slice(&results).expect("results as JSON");
    (results, stderr)
}

/// The database and topic a run named on standard error (`bench: database D, topic T, …`).
fn created(stderr: &str) -> (String, String) {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("bench: database "))
        .unwrap_or_else(|| panic!("no database named in:\n{stderr}"));
    let mut parts = line.split(", ");
    let database = parts.next().unwrap_or_default().to_owned();
    let topic = parts
        .next()
        .and_then(|t| t.strip_prefix("topic "))
        .unwrap_or_else(|| panic!("no topic named in {line:?}"))
        .to_owned();
    (database, topic)
}

/// The topics named after `topic` and the consumer groups named with `group_prefix` that
/// the broker still has.
fn kafka_leftovers(brokers: &str, topic: &str, group_prefix: &str) -> Vec<String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("Kafka admin client");
    let client = admin.inner();
    let metadata = client
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("Kafka metadata");
    let groups = client
        .fetch_group_list(None, Duration::from_secs(10))
        .expect("Kafka group list");
    let topics = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|name| name.starts_with(topic));
    let groups = groups
        .groups()
        .iter()
        .map(|g| format!("group {}", g.name()))
        .filter(|name| name["group ".len()..].starts_with(group_prefix));
    topics.chain(groups).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_run_measures_every_scenario_and_leaves_nothing_behind() {
    let args = [
        "--warmup",
        "0",
        "--duration",
        "1",
        "--rounds",
        "2",
        "--concurrency",
        "4",
        "--users",
        "20",
        "--rebuild-events",
        "2000",
        "--republish-events",
        "500",
        "--visible-load",
        "0.1,0.5",
    ];
    let (results, stderr) = tokio::task::spawn_blocking(move || bench(&args))
        .await
        .expect("bench thread");

    let names: Vec<&str> = results
        .iter()
        .map(|r| r["scenario"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        names[..7],
        [
            "createUser over HTTP",
            "updateProfile on 20 users",
            "deleteAccount",
            "commit -> visible in user(id) (Redis) at 0.1 of the max rate",
            "commit -> visible in user(id) (Redis)",
            "user(id) over HTTP",
            "user(id) over HTTP",
        ],
        "{stderr}"
    );
    // The rebuild reads the whole log: the 2,000 events seeded and those of the scenarios
    // before it, every one of them.
    assert_eq!(names.len(), 11, "{names:?}");
    let rebuilt: u64 = names[7]
        .strip_prefix("projections rebuild all (")
        .and_then(|n| n.strip_suffix(" events)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{:?}", names[7]));
    assert!(rebuilt > 2000, "{rebuilt}");
    // Rebuilt in each of the two rounds, as its baseline consumed or wrote them.
    for side in ["subject", "baseline"] {
        assert_eq!(
            results[7][side]["ops"].as_u64(),
            Some(2 * rebuilt),
            "{side}: {}",
            results[7]
        );
    }
    assert!(stderr.contains("bench: round 2: rebuild "), "{stderr}");
    // Beside it, for context and without a target of its own, the log read alone (as the
    // rebuild reads it) against the same baseline: every event, in each round.
    assert_eq!(
        names[8], "  the log read alone (a rebuild's first stage)",
        "{stderr}"
    );
    assert_eq!(results[8]["subject"]["ops"].as_u64(), Some(2 * rebuilt));
    assert_eq!(results[8]["baseline"], results[7]["baseline"]);
    assert_eq!(results[8]["met"], serde_json::Value::Null, "{}", results[8]);
    assert!(results[7]["met"].as_bool().is_some(), "{}", results[7]);
    // The machine's idle share during each side, where /proc/stat tells it.
    if std::path::Path::new("/proc/stat").exists() {
        for row in &results[7..9] {
            for side in ["subject", "baseline"] {
                let idle = row[side]["machine_idle_percent"].as_f64();
                assert!(idle.is_some_and(|i| (0.0..=100.0).contains(&i)), "{row}");
            }
        }
    }
    // The republish of the log's first 500 events, in each round as its baseline produced
    // them; then the live relay's latency during a replay.
    assert_eq!(
        names[9..],
        [
            "events republish (500 events)",
            "relay commit -> publish during a replay at half its max rate",
        ],
        "{stderr}"
    );
    for side in ["subject", "baseline"] {
        assert_eq!(
            results[9][side]["ops"].as_u64(),
            Some(1000),
            "{}",
            results[9]
        );
    }
    assert!(stderr.contains("bench: round 2: republish "), "{stderr}");
    for r in &results {
        let name = &r["scenario"];
        for side in ["subject", "baseline"] {
            let m = &r[side];
            assert!(m["ops"].as_u64().unwrap_or(0) > 0, "{name} {side}: {m}");
            assert_eq!(m["errors"].as_u64(), Some(0), "{name} {side}: {m}");
            assert!(
                m["throughput"].as_f64().unwrap_or(0.0) > 0.0,
                "{name} {side}: {m}"
            );
        }
        assert!(r["ratio"].as_f64().unwrap_or(0.0) > 0.0, "{name}: {r}");
        if r["metric"] == "p99" {
            // Both sides timed every operation: a latency of at least a microsecond each.
            assert!(r["subject"]["p99_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
            assert!(r["baseline"]["p99_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
            // Where /proc/stat exists, how much of the machine each side left idle.
            if std::path::Path::new("/proc/stat").exists() {
                for side in ["subject", "baseline"] {
                    let idle = r[side]["machine_idle_percent"].as_f64();
                    assert!(idle.is_some_and(|i| (0.0..=100.0).contains(&i)), "{r}");
                }
            }
            let target = r["target"].as_str().unwrap_or_default();
            assert!(target.starts_with("p99 <= "), "{name}: target {target:?}");
        }
    }
    // The visibility scenario at a tenth of the rate ran fewer commands than at half.
    let commands = |i: usize| results[i]["subject"]["ops"].as_u64().unwrap_or(0);
    assert!(commands(3) < commands(4), "{results:?}");

    let (database, topic) = created(&stderr);
    assert!(database.starts_with("pcf_bench_"), "{database}");
    let primary = sqlx::PgPool::connect(&primary_admin_url())
        .await
        .expect("primary");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&database)
        .fetch_one(&primary)
        .await
        .expect("pg_database");
    assert_eq!(left, 0, "database {database} is still there");
    // A deleted topic or group leaves the broker's metadata within moments. The groups are
    // the projectors', the Kafka baseline's and one per round of the rebuild's consume.
    let brokers = shared_brokers();
    let run_id = database.trim_start_matches("pcf_bench_").to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (b, t, g) = (brokers.clone(), topic.clone(), format!("bench{run_id}"));
        let left = tokio::task::spawn_blocking(move || kafka_leftovers(&b, &t, &g))
            .await
            .expect("listing topics and groups");
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run's topics and groups are still there after 30 s: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut redis = redis::Client::open(shared_redis_url())
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connecting to Redis");
    // The rate limiter's keys, and the view's (each starts with a bucket's hash tag).
    for pattern in [
        format!("pcf:bench:{run_id}*"),
        format!("{{pcf:bench:{run_id}*"),
    ] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut redis)
            .await
            .expect("KEYS");
        assert!(keys.is_empty(), "Redis keys left ({pattern}): {keys:?}");
    }
}
