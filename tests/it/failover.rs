//! The event store's PostgreSQL primary lost and its synchronous standby promoted, with PCF
//! running: writes resume without a restart, every acknowledged mutation is in the new
//! primary's log and reaches the views, and the mutations refused meanwhile carry a retryable
//! code. On the HA topology of scripts/pg-ha.sh (`PCF_TEST_HA_DATABASE_URL`, skipped when
//! unset), which the test breaks and repairs: tests on it take `HA_TOPOLOGY`.
//!
//! And, on the shared primary and replica: a standby is never taken for the primary.

use crate::support::*;
use futures::FutureExt as _;
use pcf::app::primary::{parse_hosts, PrimaryLocator};
use pcf::app::ALL_ROLES;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::panic::{resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Held by each test on the HA topology, one at a time: the failover breaks it.
static HA_TOPOLOGY: LazyLock<tokio::sync::Mutex<()>> =
    LazyLock::new(|| tokio::sync::Mutex::new(()));

/// Runs `scripts/pg-ha.sh ARGS`; its standard output, or why it failed.
async fn pg_ha(args: &[&str]) -> Result<String, String> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-ha.sh");
        let out = std::process::Command::new(&script)
            .args(&args)
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "scripts/pg-ha.sh {args:?}: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    })
    .await
    .expect("the script's thread")
}

/// One mutation sent: what it was, when it ended, and its answer: the user and version it
/// acknowledged, or the error codes.
struct Attempt {
    ended: Instant,
    outcome: Result<(Uuid, u64), Vec<String>>,
}

/// Sends createUser and updateProfile mutations one after another until `stop`, each retried
/// with its command id until acknowledged (as a client would), and records every attempt.
async fn write_steadily(
    router: axum::Router,
    tag: String,
    writer: usize,
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
) {
    let mut users: Vec<Uuid> = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let command_id = Uuid::new_v4().to_string();
        let (query, field, vars) = if users.is_empty() || i.is_multiple_of(3) {
            (
                CREATE_USER,
                "createUser",
                json!({ "input": { "email": format!("w{writer}-{i}@{tag}.example.com"), "displayName": format!("Writer {writer} {i}") }, "commandId": command_id }),
            )
        } else {
            let id = users[i % users.len()];
            (
                UPDATE_PROFILE,
                "updateProfile",
                json!({ "id": id, "input": { "displayName": format!("Writer {writer} update {i}") }, "commandId": command_id }),
            )
        };
        loop {
            let r = admin_gql(&router, query, vars.clone()).await;
            let ended = Instant::now();
            let outcome = if r.status == 200 && !r.has_errors() {
                let payload: &Value = &r.data()[field];
                Ok((id_of(payload), version_of(payload) as u64))
            } else {
                Err(if r.has_errors() {
                    let codes = r.codes();
                    if codes.iter().any(|c| c != "UNAVAILABLE") {
                        eprintln!("failover: a refusal other than UNAVAILABLE: {}", r.body);
                    }
                    codes
                } else {
                    vec![format!("HTTP {}", r.status)]
                })
            };
            let acknowledged = outcome.as_ref().ok().copied();
            attempts.lock().unwrap().push(Attempt { ended, outcome });
            if let Some((id, _)) = acknowledged {
                if field == "createUser" {
                    users.push(id);
                }
                break;
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready(router: &axum::Router) -> (u16, Value) {
    let r = get(router, "/health/ready").await;
    (r.status.as_u16(), r.body)
}

/// The primary killed (-9) and its synchronous standby promoted while two clients write.
async fn failover(c: &mut Cluster) {
    let app = c.start_default(&ALL_ROLES).await;
    let first = pg_ha(&["primary"]).await.expect("the primary's port");
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..2)
        .map(|k| {
            tokio::spawn(write_steadily(
                app.router.clone(),
                c.tag().to_owned(),
                k,
                stop.clone(),
                attempts.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let killed_at = Instant::now();
    let killed = pg_ha(&["kill-primary"]).await.expect("killing the primary");
    // The script finds the primary before it kills it: writes acknowledged until it returns
    // may have come before the kill.
    let dead_at = Instant::now();
    assert_eq!(killed, first);
    // Without a primary, readiness names the event store.
    let (status, body) = ready(&app.router).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["down"]
            .as_array()
            .is_some_and(|down| down.contains(&json!("event_store"))),
        "{body}"
    );
    // An operator (or an orchestrator) takes a moment to promote the standby.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(killed_at.elapsed())).await;
    let promoted = pg_ha(&["promote"]).await.expect("promoting the standby");
    let promoted_at = Instant::now();
    let promoted: u16 = promoted
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("a port from promote: {promoted:?}"));
    assert_ne!(promoted.to_string(), first);

    // Writes resume on the new primary, PCF untouched.
    let acknowledged_after = |at: Instant| {
        attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.ended > at && a.outcome.is_ok())
            .count()
    };
    wait_until(
        Duration::from_secs(60),
        "writes to resume after the promotion",
        || async {
            if acknowledged_after(promoted_at) >= 20 {
                Ok(())
            } else {
                Err("fewer than 20 writes acknowledged since the promotion".to_owned())
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("a writer");
    }

    let attempts = std::mem::take(&mut *attempts.lock().unwrap());
    let acked: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome.is_ok()).collect();
    let mut ends: Vec<Instant> = acked.iter().map(|a| a.ended).collect();
    ends.sort();
    let longest = ends
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let first_after_kill = ends.iter().find(|e| **e > dead_at).copied();
    let refused: Vec<&Vec<String>> = attempts
        .iter()
        .filter_map(|a| a.outcome.as_ref().err())
        .collect();
    let codes: BTreeSet<&str> = refused
        .iter()
        .flat_map(|c| c.iter().map(String::as_str))
        .collect();
    eprintln!(
        "failover: {} mutations acknowledged, {} attempts refused (codes {codes:?}); longest \
         window without an acknowledged write {longest:?}; first write acknowledged {:?} after \
         the kill, {:?} after the promotion (promoted {:?} after the kill)",
        acked.len(),
        refused.len(),
        first_after_kill.map(|e| e - dead_at),
        first_after_kill.map(|e| e.saturating_duration_since(promoted_at)),
        promoted_at - dead_at,
    );
    // The mutations refused meanwhile said to try again; none failed otherwise.
    assert!(
        codes.iter().all(|c| *c == "UNAVAILABLE"),
        "refusals with codes other than UNAVAILABLE: {codes:?}"
    );
    // Writes stopped no longer than the promotion took, plus the time to notice it (the
    // probe interval) and a command's wait for a connection (5 s).
    assert!(
        longest < (promoted_at - killed_at) + Duration::from_secs(10),
        "writes stopped for {longest:?}"
    );

    // Every acknowledged mutation is in the new primary's log.
    let new_primary = super::support::with_database(
        &format!("postgres://postgres@127.0.0.1:{promoted}/postgres"),
        &c.db.name,
    );
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&new_primary)
        .await
        .expect("connecting to the new primary");
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT aggregate_id, max(sequence) FROM events GROUP BY aggregate_id")
            .fetch_all(&mut conn)
            .await
            .expect("reading the new primary's log");
    let logged: BTreeMap<Uuid, u64> = rows
        .into_iter()
        .map(|(id, seq)| (Uuid::parse_str(&id).expect("a user id"), seq as u64))
        .collect();
    for a in &acked {
        let (id, version) = a.outcome.as_ref().copied().expect("acknowledged");
        let at = logged.get(&id).copied().unwrap_or(0);
        assert!(
            at >= version,
            "user {id}: version {version} was acknowledged, the new primary's log ends at {at}"
        );
    }

    // And their events reach the views; the process is ready again.
    let redis = c.redis_view(&shared_redis_url()).await;
    c.wait_views_match_log(CONVERGE, app.log(), Some(&redis))
        .await;
    wait_until(
        Duration::from_secs(30),
        "readiness after the failover",
        || async {
            let (status, body) = ready(&app.router).await;
            if status == 200 {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_follow_a_promoted_standby_without_a_restart() {
    let Some(admin) = ha_admin_url() else {
        eprintln!(
            "skipped: PCF_TEST_HA_DATABASE_URL is unset (the HA topology: scripts/pg-ha.sh repair)"
        );
        return;
    };
    let _topology = HA_TOPOLOGY.lock().await;
    if pg_ha(&["status"]).await.is_err() {
        pg_ha(&["repair"]).await.expect("repairing the HA topology");
    }
    // Reads go to the configured replicas that are standbys now (after an earlier failover,
    // one of them may be the primary).
    let mut replicas = Vec::new();
    for url in ha_read_admin_urls() {
        if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await {
            let recovery: Result<(bool,), _> = sqlx::query_as("SELECT pg_is_in_recovery()")
                .fetch_one(&mut conn)
                .await;
            if matches!(recovery, Ok((true,))) {
                replicas.push(url);
            }
        }
    }
    assert!(
        !replicas.is_empty(),
        "no standby among {:?}",
        ha_read_admin_urls()
    );
    let mut c = Cluster::create_at(ServerUse::Shared, &admin, &replicas).await;
    let outcome = AssertUnwindSafe(failover(&mut c)).catch_unwind().await;
    // The next run finds the topology healthy: the old primary a standby again.
    let repaired = pg_ha(&["repair"]).await;
    c.cleanup().await;
    if let Err(panic) = outcome {
        resume_unwind(panic);
    }
    let status = repaired.expect("repairing the HA topology");
    eprintln!("{status}");
}

/// A URL listing the hosts of `urls`, in order, with the first one's user and database.
fn host_list(urls: &[String]) -> String {
    let labels: Vec<String> = urls
        .iter()
        .map(|u| parse_hosts(u).expect("a PostgreSQL URL")[0].label.clone())
        .collect();
    let first = &parse_hosts(&urls[0]).expect("a PostgreSQL URL")[0].options;
    format!(
        "postgres://{}@{}/{}",
        first.get_username(),
        labels.join(","),
        first.get_database().unwrap_or("postgres")
    )
}

/// The shared replica is a standby: alone in the URL it is refused (when looking for the
/// primary, and by a pool's new connections); listed before the primary, the primary is
/// chosen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_never_taken_for_the_primary() {
    let standby = replica_admin_url();
    let primary = primary_admin_url();
    let e = PrimaryLocator::connect(&standby, "the standby")
        .await
        .err()
        .expect("a standby alone is not a primary");
    assert!(format!("{e:#}").contains("standby"), "{e:#}");

    let both = host_list(&[standby.clone(), primary.clone()]);
    let locator = PrimaryLocator::connect(&both, "both")
        .await
        .unwrap_or_else(|e| panic!("{both}: {e:#}"));
    assert_eq!(locator.current(), locator.hosts()[1].label);
    let pool = locator
        .pool(2, "both", None)
        .await
        .expect("a pool on the primary");
    let (recovery,): (bool,) = sqlx::query_as("SELECT pg_is_in_recovery()")
        .fetch_one(&pool)
        .await
        .expect("asking the primary");
    assert!(!recovery);

    // A pool pointed at the standby without asking: its connections are refused, and the
    // error is one that means "unavailable, try again".
    let blind = PrimaryLocator::at_first_host(&standby).expect("a URL");
    let pool = blind.lazy_pool(1, None);
    let e = sqlx::query("SELECT 1")
        .execute(&pool)
        .await
        .expect_err("no connection to a standby");
    assert!(pcf_adapters::sql::is_unavailable(&e), "{e}");
}
