//! Personal data can be erased (invariant 8), searched for where it must not be.
//!
//! Every personal value here carries a random core of its own, fresh at every run, and the
//! search looks for those cores in the raw bytes of every place a copy could hide: `pg_dump`
//! of the primary and of the replica, every message of the event topic and its dead-letter
//! topic, every key and value under the test's Redis prefix, the logs of the process under
//! test, and the raw SQLite files of embedded mode. Each search has a positive control (the
//! same search finds a live user's values, or the deleted user's values before the deletion),
//! so that a search that cannot find anything fails the test instead of passing it.
//!
//! Beside the search: an altered sealed field answers `INTERNAL` and is counted; a deletion
//! racing an update never lets an event follow `AccountDeleted`; production refuses a wrong
//! or missing key-encryption key, and a rotation retires the old one; `pcf events protect`
//! seals or erases older plain events.

use crate::support::*;
use axum::http::StatusCode;
use pcf::app::ALL_ROLES;
use pcf::config::Environment;
use pcf_adapters::personal::Kek;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde_json::{json, Value};
use sqlx::{Connection, PgPool};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Random personal values and the search for them
// ---------------------------------------------------------------------------------------------

/// 16 random hex digits: what the search looks for.
fn core() -> String {
    Uuid::new_v4().simple().to_string()[..16].to_owned()
}

/// One personal value of one user, and the random core the search looks for.
#[derive(Clone, Debug)]
struct Secret {
    owner: String,
    field: &'static str,
    value: String,
    needle: String,
}

/// A complete profile of random personal values.
#[derive(Clone, Debug)]
struct Profile {
    label: String,
    email: Secret,
    display_name: Secret,
    bio: Secret,
    avatar_url: Secret,
}

fn secret(owner: &str, field: &'static str, make: impl FnOnce(&str) -> String) -> Secret {
    let needle = core();
    Secret {
        owner: owner.to_owned(),
        field,
        value: make(&needle),
        needle,
    }
}

fn email_secret(owner: &str) -> Secret {
    secret(owner, "email", |c| format!("p{c}@example.com"))
}

impl Profile {
    fn random(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            email: email_secret(label),
            display_name: secret(label, "displayName", |c| format!("Person {c}")),
            bio: secret(label, "bio", |c| format!("A bio with {c} inside")),
            avatar_url: secret(label, "avatarUrl", |c| {
                format!("https://img.example.com/{c}.png")
            }),
        }
    }

    /// `CreateUserInput`.
    fn create_input(&self) -> Value {
        json!({
            "email": self.email.value,
            "displayName": self.display_name.value,
            "bio": self.bio.value,
            "avatarUrl": self.avatar_url.value,
        })
    }

    /// `UpdateProfileInput`.
    fn profile_input(&self) -> Value {
        json!({
            "displayName": self.display_name.value,
            "bio": self.bio.value,
            "avatarUrl": self.avatar_url.value,
        })
    }

    /// A new display name, bio and avatar (same email).
    fn with_new_profile(&self) -> Self {
        let fresh = Self::random(&self.label);
        Self {
            email: self.email.clone(),
            ..fresh
        }
    }

    fn secrets(&self) -> [Secret; 4] {
        [
            self.email.clone(),
            self.display_name.clone(),
            self.bio.clone(),
            self.avatar_url.clone(),
        ]
    }
}

/// The secrets found in `haystack` (raw bytes, read as text where they are text).
fn found<'a>(haystack: &[u8], secrets: &'a [Secret]) -> Vec<&'a Secret> {
    let text = String::from_utf8_lossy(haystack);
    secrets
        .iter()
        .filter(|s| text.contains(&s.needle))
        .collect()
}

/// The lines (or ~120 bytes around) where `secret` appears, for failure messages.
fn context_of(haystack: &[u8], secret: &Secret) -> String {
    let text = String::from_utf8_lossy(haystack);
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(&secret.needle) {
        let at = from + i;
        let start = text[..at]
            .char_indices()
            .rev()
            .nth(120)
            .map_or(0, |(i, _)| i);
        let end = text[at..]
            .char_indices()
            .nth(120)
            .map_or(text.len(), |(i, _)| at + i);
        out.push(text[start..end].replace('\n', "⏎"));
        from = at + secret.needle.len();
        if out.len() >= 3 {
            break;
        }
    }
    out.join("\n    …")
}

/// Fails naming every secret found in `haystack` (`place`), with where it was found.
#[track_caller]
fn assert_none_in(place: &str, haystack: &[u8], secrets: &[Secret]) {
    let leaks = found(haystack, secrets);
    if leaks.is_empty() {
        return;
    }
    let report: Vec<String> = leaks
        .iter()
        .map(|s| {
            format!(
                "  {} of {} ({:?}):\n    …{}…",
                s.field,
                s.owner,
                s.value,
                context_of(haystack, s)
            )
        })
        .collect();
    panic!(
        "{place} holds {} personal value(s) it must not:\n{}",
        leaks.len(),
        report.join("\n")
    );
}

/// The positive control: fails unless every one of `secrets` is in `haystack`.
#[track_caller]
fn assert_all_in(place: &str, haystack: &[u8], secrets: &[Secret]) {
    let text = String::from_utf8_lossy(haystack);
    let missing: Vec<String> = secrets
        .iter()
        .filter(|s| !text.contains(&s.needle))
        .map(|s| format!("{} of {} ({:?})", s.field, s.owner, s.value))
        .collect();
    assert!(
        missing.is_empty(),
        "the control failed: {place} should hold {missing:?} ({} bytes searched)",
        haystack.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Accounts driven through GraphQL
// ---------------------------------------------------------------------------------------------

const DELETE_WITH_RECEIPT: &str = "mutation($id: ID!, $expectedVersion: Int, $commandId: ID) {
  deleteAccount(id: $id, expectedVersion: $expectedVersion, commandId: $commandId) {
    id version position erasure { position keyDestroyedAt }
  }
}";

/// A user of a test: every personal value it ever held (`history`) and its state now.
struct Account {
    id: Uuid,
    version: i64,
    now: Profile,
    history: Vec<Secret>,
    /// The emails it held before an email change.
    old_emails: Vec<Secret>,
    /// Command ids used, with the operation and variables sent.
    commands: Vec<(String, &'static str, Value)>,
}

/// `query` with `variables` as an admin: its data, or a panic naming the errors.
async fn admin_ok(router: &axum::Router, query: &str, variables: Value) -> Value {
    let r = admin_gql(router, query, variables).await;
    r.ok().clone()
}

impl Account {
    /// Signs up with every field set, with a command id when `command` holds.
    async fn create(router: &axum::Router, label: &str, command: bool) -> Self {
        let now = Profile::random(label);
        let command_id = command.then(|| Uuid::new_v4().to_string());
        let variables = json!({ "input": now.create_input(), "commandId": command_id });
        let data = admin_ok(router, CREATE_USER, variables.clone()).await;
        let payload = &data["createUser"];
        assert_eq!(payload["user"]["email"], json!(now.email.value), "{data}");
        let mut commands = Vec::new();
        if let Some(id) = command_id {
            commands.push((id, CREATE_USER, variables));
        }
        Self {
            id: id_of(payload),
            version: version_of(payload),
            history: now.secrets().to_vec(),
            now,
            old_emails: Vec::new(),
            commands,
        }
    }

    fn command_id(&self, command: bool) -> Option<String> {
        command.then(|| Uuid::new_v4().to_string())
    }

    /// New display name, bio and avatar.
    async fn update_profile(&mut self, router: &axum::Router, command: bool) {
        let next = self.now.with_new_profile();
        let command_id = self.command_id(command);
        let variables = json!({
            "id": self.id, "input": next.profile_input(), "commandId": command_id,
        });
        let data = admin_ok(router, UPDATE_PROFILE, variables.clone()).await;
        self.version = version_of(&data["updateProfile"]);
        assert_eq!(
            data["updateProfile"]["user"]["displayName"],
            json!(next.display_name.value)
        );
        if let Some(id) = command_id {
            self.commands.push((id, UPDATE_PROFILE, variables));
        }
        self.history.extend(next.secrets()[1..].iter().cloned());
        self.now = next;
    }

    /// A new email; the old one is remembered.
    async fn change_email(&mut self, router: &axum::Router, command: bool) {
        let email = email_secret(&self.now.label);
        let command_id = self.command_id(command);
        let variables = json!({ "id": self.id, "email": email.value, "commandId": command_id });
        let data = admin_ok(router, CHANGE_EMAIL, variables.clone()).await;
        self.version = version_of(&data["changeEmail"]);
        if let Some(id) = command_id {
            self.commands.push((id, CHANGE_EMAIL, variables));
        }
        self.old_emails
            .push(std::mem::replace(&mut self.now.email, email.clone()));
        self.history.push(email);
    }

    /// Deletes the account and checks the answer carries its erasure receipt.
    async fn delete(&mut self, router: &axum::Router, command: bool) {
        let command_id = self.command_id(command);
        let variables = json!({ "id": self.id, "commandId": command_id });
        let data = admin_ok(router, DELETE_WITH_RECEIPT, variables.clone()).await;
        let payload = &data["deleteAccount"];
        assert_eq!(version_of(payload), self.version + 1, "{data}");
        self.version = version_of(payload);
        check_receipt(payload);
        if let Some(id) = command_id {
            self.commands.push((id, DELETE_WITH_RECEIPT, variables));
        }
    }
}

/// The deletion's answer has `erasure { position keyDestroyedAt }`: the deletion's own
/// position, and a time within the last minute.
#[track_caller]
fn check_receipt(payload: &Value) {
    let receipt = &payload["erasure"];
    assert!(
        receipt.is_object(),
        "deleteAccount answered no erasure receipt: {payload}"
    );
    assert_eq!(
        receipt["position"], payload["position"],
        "the receipt's position is not the deletion's: {payload}"
    );
    let at = receipt["keyDestroyedAt"]
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .unwrap_or_else(|| panic!("keyDestroyedAt is no RFC 3339 time: {payload}"));
    let age = chrono::Utc::now().signed_duration_since(at);
    assert!(
        age >= chrono::Duration::seconds(-5) && age <= chrono::Duration::seconds(60),
        "keyDestroyedAt {at} is not now: {payload}"
    );
}

/// Every secret of `accounts`.
fn all_secrets<'a>(accounts: impl IntoIterator<Item = &'a Account>) -> Vec<Secret> {
    accounts
        .into_iter()
        .flat_map(|a| a.history.iter().cloned())
        .collect()
}

/// One page of `events` as the bearer of `token`.
async fn events_page(router: &axum::Router, token: &str, variables: Value) -> Resp {
    Gql::vars(EVENTS, variables)
        .bearer(token)
        .send(router)
        .await
}

/// Every event (of `user`, or of everyone) as the bearer of `token`, and the raw answers,
/// once there are at least `expected`: on PostgreSQL the log shows its readers what lies below
/// the oldest transaction still running on the server, other tests' too.
async fn events_as(
    router: &axum::Router,
    token: &str,
    user: Option<Uuid>,
    expected: usize,
) -> (Vec<Value>, Vec<u8>) {
    wait_until(
        Duration::from_secs(30),
        "the events query to show every stored event",
        || async move {
            let (nodes, raw) = read_events_as(router, token, user).await;
            if nodes.len() >= expected {
                Ok((nodes, raw))
            } else {
                Err(format!("{} of {expected} events", nodes.len()))
            }
        },
    )
    .await
}

/// The events stored (of `user`, or of everyone), counted in the table.
async fn stored_count(pool: &PgPool, user: Option<Uuid>) -> usize {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE $1::text IS NULL OR aggregate_id = $1",
    )
    .bind(user.map(|u| u.to_string()))
    .fetch_one(pool)
    .await
    .expect("counting events");
    n as usize
}

async fn read_events_as(
    router: &axum::Router,
    token: &str,
    user: Option<Uuid>,
) -> (Vec<Value>, Vec<u8>) {
    let mut nodes = Vec::new();
    let mut raw = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let r = events_page(
            router,
            token,
            json!({ "aggregateId": user, "first": 500, "after": after }),
        )
        .await;
        raw.extend_from_slice(r.text.as_bytes());
        let data = r.ok();
        let edges = data["events"]["edges"].as_array().expect("edges").clone();
        nodes.extend(edges.iter().map(|e| e["node"].clone()));
        if !data["events"]["pageInfo"]["hasNextPage"]
            .as_bool()
            .unwrap_or(false)
        {
            return (nodes, raw);
        }
        after = edges
            .last()
            .and_then(|e| e["cursor"].as_str())
            .map(str::to_owned);
    }
}

/// Every event of a deleted user whose type has personal fields reads as erased.
#[track_caller]
fn assert_erased(events: &[Value], user: Uuid) {
    let mine: Vec<&Value> = events
        .iter()
        .filter(|e| e["aggregateId"] == json!(user.to_string()))
        .collect();
    assert!(!mine.is_empty(), "no events of {user}");
    for e in mine {
        if e["eventType"] != "AccountDeleted" {
            assert_eq!(
                e["payload"]["erased"],
                json!(true),
                "an event of the deleted user {user} does not read as erased: {e}"
            );
            assert!(
                e["payload"].get("sealed").is_none(),
                "an erased event still shows its ciphertext: {e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The places searched
// ---------------------------------------------------------------------------------------------

/// `pg_dump`, as `scripts/services.sh` installs it (PostgreSQL 15's client), else the one on
/// `PATH`.
fn pg_dump_bin() -> PathBuf {
    let version = env_or("PCF_TEST_PG_VERSION", "15");
    let installed = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin/pg_dump"));
    if installed.exists() {
        installed
    } else {
        PathBuf::from("pg_dump")
    }
}

/// The whole dump (schema and data) of the database at `url`; retried a few times, since a
/// dump on a hot standby may be cancelled by a conflict with recovery.
async fn pg_dump(url: &str) -> Vec<u8> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let bin = pg_dump_bin();
        let mut last = String::new();
        for _ in 0..5 {
            let output = std::process::Command::new(&bin)
                .arg("--no-password")
                .arg("--dbname")
                .arg(&url)
                .output()
                .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
            if output.status.success() {
                assert!(
                    !output.stdout.is_empty(),
                    "pg_dump of {url} printed nothing"
                );
                return output.stdout;
            }
            last = String::from_utf8_lossy(&output.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("pg_dump of {url} failed: {last}");
    })
    .await
    .expect("the pg_dump task")
}

/// Waits until the replica has replayed everything the primary has written so far.
async fn wait_for_replay(primary: &PgPool, replica_url: &str) {
    let (lsn,): (String,) = sqlx::query_as("SELECT pg_current_wal_lsn()::text")
        .fetch_one(primary)
        .await
        .expect("the primary's WAL position");
    wait_until(
        Duration::from_secs(30),
        "the replica to replay the primary's WAL",
        || {
            let lsn = lsn.clone();
            async move {
                let mut conn = sqlx::PgConnection::connect(replica_url)
                    .await
                    .map_err(|e| e.to_string())?;
                let (done, at): (Option<bool>, Option<String>) = sqlx::query_as(
                    "SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn, \
                            pg_last_wal_replay_lsn()::text",
                )
                .bind(&lsn)
                .fetch_one(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
                let _ = conn.close().await;
                if done == Some(true) {
                    Ok(())
                } else {
                    Err(format!("replayed up to {at:?}, primary at {lsn}"))
                }
            }
        },
    )
    .await;
}

/// Appends a Redis reply's bytes to `out`.
fn flatten(value: &redis::Value, out: &mut Vec<u8>) {
    use redis::Value as V;
    match value {
        V::BulkString(b) => out.extend_from_slice(b),
        V::SimpleString(s) => out.extend_from_slice(s.as_bytes()),
        V::VerbatimString { text, .. } => out.extend_from_slice(text.as_bytes()),
        V::Array(items) | V::Set(items) => {
            for item in items {
                flatten(item, out);
                out.push(b'\n');
            }
        }
        V::Map(pairs) => {
            for (k, v) in pairs {
                flatten(k, out);
                out.push(b'=');
                flatten(v, out);
                out.push(b'\n');
            }
        }
        other => out.extend_from_slice(format!("{other:?}").as_bytes()),
    }
}

/// Every key under `prefix` and every value it holds, whatever its type; and how many keys.
async fn redis_dump(url: &str, prefix: &str) -> (Vec<u8>, usize) {
    let mut conn = redis_conn(url).await;
    let mut keys = scan_keys(&mut conn, &format!("{prefix}*"))
        .await
        .expect("scanning the test's keys");
    keys.extend(
        scan_keys(
            &mut conn,
            &pcf_domain::read_model::redis_prefix_pattern(prefix),
        )
        .await
        .expect("scanning the test's view keys"),
    );
    let mut out = Vec::new();
    for key in &keys {
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b" => ");
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("TYPE");
        let mut cmd = match kind.as_str() {
            "string" => redis::cmd("GET"),
            "hash" => redis::cmd("HGETALL"),
            "set" => redis::cmd("SMEMBERS"),
            "list" => {
                let mut c = redis::cmd("LRANGE");
                c.arg(key).arg(0).arg(-1);
                c
            }
            "zset" => {
                let mut c = redis::cmd("ZRANGE");
                c.arg(key).arg(0).arg(-1).arg("WITHSCORES");
                c
            }
            "stream" => {
                let mut c = redis::cmd("XRANGE");
                c.arg(key).arg("-").arg("+");
                c
            }
            "none" => continue,
            other => panic!("key {key} has the unexpected type {other}"),
        };
        if matches!(kind.as_str(), "string" | "hash" | "set") {
            cmd.arg(key);
        }
        let value: redis::Value = cmd.query_async(&mut conn).await.expect("reading a key");
        flatten(&value, &mut out);
        out.push(b'\n');
    }
    (out, keys.len())
}

/// The raw bytes of Kafka records: key, headers and payload of each.
fn record_bytes(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        out.extend_from_slice(r.key.as_deref().unwrap_or("").as_bytes());
        for (k, v) in &r.headers {
            out.extend_from_slice(format!(" {k}={v}").as_bytes());
        }
        out.push(b' ');
        out.extend_from_slice(&r.payload);
        out.push(b'\n');
    }
    out
}

/// A runtime whose every thread logs, at every level of PCF's crates, into `log` (the
/// dispatcher is the threads' default, not the process's global one, so other tests of this
/// binary are not captured and keep theirs). `with_default` covers the thread that runs
/// `block_on`.
fn capturing_runtime(log: &CapturedLog) -> (tokio::runtime::Runtime, tracing::Dispatch) {
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "debug,pcf=trace,pcf_command=trace,pcf_query=trace,pcf_projectors=trace,\
             pcf_adapters=trace,pcf_domain=trace,async_graphql=trace",
        ))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let dispatch = tracing::Dispatch::new(subscriber);
    (runtime_with(&dispatch, 4), dispatch)
}

// ---------------------------------------------------------------------------------------------
// 1–3. Cluster mode: delete, rebuild, vacuum, then search everywhere
// ---------------------------------------------------------------------------------------------

/// Cluster mode end to end: after deletions, a rebuild and a vacuum of the key table, no
/// deleted user's value (nor an email it held before a change) is in `pg_dump` of the primary
/// or the replica, in any message of the event topic or the dead-letter topic, under the test's
/// Redis prefix, or in the process's logs; a live user's values are readable by the auditor,
/// by no analytics reader, and are nowhere in Kafka in plain text.
#[test]
fn cluster_erasure_leaves_no_personal_data_of_deleted_users_anywhere() {
    let log = CapturedLog::default();
    let (runtime, dispatch) = capturing_runtime(&log);
    tracing::dispatcher::with_default(&dispatch, || {
        runtime.block_on(async {
            run(Cluster::create().await, async |c| {
                erasure_in_cluster(c, &log).await
            })
            .await;
        })
    });
}

async fn erasure_in_cluster(c: &mut Cluster, log: &CapturedLog) {
    let node = c.start_default(&ALL_ROLES).await;
    let r = &node.router;

    // Live and doomed users, each with every personal field, profile updates, email changes,
    // some commands with command ids.
    let mut live = vec![
        Account::create(r, "live-1", true).await,
        Account::create(r, "live-2", false).await,
    ];
    let mut gone = vec![
        Account::create(r, "gone-1", true).await,
        Account::create(r, "gone-2", false).await,
        Account::create(r, "gone-3", true).await,
    ];
    for (i, a) in live.iter_mut().chain(gone.iter_mut()).enumerate() {
        a.update_profile(r, i % 2 == 0).await;
        a.change_email(r, i % 2 == 1).await;
    }
    gone[1].change_email(r, true).await;
    gone[1].update_profile(r, false).await;
    live[0].change_email(r, false).await;

    // The views have everyone; the search works: the doomed users' current emails are in
    // `user_emails`, in Redis and in the dump of the primary.
    let everyone: Vec<&Account> = live.iter().chain(gone.iter()).collect();
    wait_for_views(c, &everyone).await;
    for a in &gone {
        let (email,): (String,) =
            sqlx::query_as("SELECT email FROM user_emails WHERE user_id = $1")
                .bind(a.id.to_string())
                .fetch_one(&c.pool)
                .await
                .expect("the user's email row");
        assert_eq!(email, a.now.email.value);
    }
    let (redis_before, _) = redis_dump(&shared_redis_url(), &c.redis_prefix).await;
    let current: Vec<Secret> = gone
        .iter()
        .flat_map(|a| a.now.secrets())
        .collect::<Vec<_>>();
    assert_all_in("Redis before the deletions", &redis_before, &current);
    let dump_before = pg_dump(&c.db_url).await;
    assert_all_in(
        "pg_dump of the primary before the deletions",
        &dump_before,
        &gone.iter().map(|a| a.now.email.clone()).collect::<Vec<_>>(),
    );

    // A dead letter of a doomed user: one of its events, altered, published again. The
    // projectors cannot open it and set it aside on the dead-letter topic.
    let mut topic = TopicTail::new(&c.brokers, &c.topic).await;
    let stored = stored_event_ids(&c.pool).await;
    topic
        .wait_for(CONVERGE, "every stored event on the topic", |records| {
            event_ids(records).is_superset(&stored)
        })
        .await;
    let original = topic
        .records
        .iter()
        .find(|rec| {
            rec.envelope()
                .is_some_and(|e| e.aggregate_id == gone[0].id && e.event_type == "ProfileUpdated")
        })
        .cloned()
        .expect("the ProfileUpdated event of gone-1 on the topic");
    let altered_id = original.envelope().expect("an envelope").event_id;
    let mut altered: Value = serde_json::from_slice(&original.payload).expect("JSON");
    let sealed = altered["payload"]["sealed"]
        .as_str()
        .expect("a sealed ProfileUpdated on the topic")
        .to_owned();
    altered["payload"]["sealed"] = json!(flip_base64(&sealed));
    let mut headers = OwnedHeaders::new();
    for (k, v) in &original.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let body = altered.to_string();
    let key = gone[0].id.to_string();
    producer(&c.brokers)
        .send(
            FutureRecord::to(&c.topic)
                .key(&key)
                .payload(&body)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("publishing the altered event");
    let dlq_topic = format!("{}.dlq", c.topic);
    let mut dlq = TopicTail::new(&c.brokers, &dlq_topic).await;
    dlq.wait_for(
        CONVERGE,
        "the altered event on the dead-letter topic",
        |records| {
            records
                .iter()
                .any(|rec| String::from_utf8_lossy(&rec.payload).contains(&altered_id.to_string()))
        },
    )
    .await;

    // The deletions, with their receipts; then a rebuild of every projection, and a vacuum
    // of the key table.
    for (i, a) in gone.iter_mut().enumerate() {
        a.delete(r, i != 1).await;
    }
    let everyone: Vec<&Account> = live.iter().chain(gone.iter()).collect();
    wait_for_views(c, &everyone).await;
    pcf::cli::operate::projections(
        c.config(),
        pcf::cli::ProjectionsCommand::Rebuild { name: "all".into() },
    )
    .await
    .expect("pcf projections rebuild all");
    // The live projectors go on in the new generation.
    live[1].update_profile(r, true).await;
    let everyone: Vec<&Account> = live.iter().chain(gone.iter()).collect();
    wait_for_views(c, &everyone).await;
    sqlx::raw_sql("VACUUM user_keys")
        .execute(&c.pool)
        .await
        .expect("VACUUM user_keys");
    for a in &gone {
        assert_eq!(
            key_rows(&c.pool, a.id).await,
            0,
            "{} kept its key",
            a.now.label
        );
    }
    for a in &live {
        assert_eq!(
            key_rows(&c.pool, a.id).await,
            1,
            "{} has no key",
            a.now.label
        );
    }
    wait_for_replay(&c.pool, &c.replica_url).await;

    let erased = all_secrets(&gone);
    let live_secrets = all_secrets(&live);
    // What the doomed users held before an email change is searched for too.
    for a in &gone {
        assert!(!a.old_emails.is_empty(), "{} changed no email", a.now.label);
        for old in &a.old_emails {
            assert!(erased.iter().any(|s| s.needle == old.needle));
        }
    }
    let live_now: Vec<Secret> = live.iter().map(|a| a.now.email.clone()).collect();

    // PostgreSQL: the primary and the replica.
    let primary = pg_dump(&c.db_url).await;
    assert_none_in("pg_dump of the primary", &primary, &erased);
    assert_all_in("pg_dump of the primary", &primary, &live_now);
    let replica = pg_dump(&c.replica_url).await;
    assert_none_in("pg_dump of the replica", &replica, &erased);
    assert_all_in("pg_dump of the replica", &replica, &live_now);

    // Kafka: every message of the topic and of the dead-letter topic, from the beginning;
    // not even the live users' values are there in plain text.
    let stored = stored_event_ids(&c.pool).await;
    let mut topic = TopicTail::new(&c.brokers, &c.topic).await;
    topic
        .wait_for(CONVERGE, "every stored event on the topic", |records| {
            event_ids(records).is_superset(&stored)
        })
        .await;
    topic.drain_for(Duration::from_millis(500)).await;
    let topic_bytes = record_bytes(&topic.records);
    assert_none_in("the event topic", &topic_bytes, &erased);
    assert_none_in("the event topic", &topic_bytes, &live_secrets);
    for a in &gone {
        assert!(
            topic
                .records
                .iter()
                .any(|rec| rec.key.as_deref() == Some(&*a.id.to_string())),
            "the control failed: no message of {} on the topic",
            a.now.label
        );
    }
    let mut dlq = TopicTail::new(&c.brokers, &dlq_topic).await;
    dlq.wait_for(CONVERGE, "the dead letter", |records| !records.is_empty())
        .await;
    dlq.drain_for(Duration::from_millis(500)).await;
    let dlq_bytes = record_bytes(&dlq.records);
    assert!(
        String::from_utf8_lossy(&dlq_bytes).contains(&altered_id.to_string()),
        "the control failed: the dead letter of {altered_id} is not on {dlq_topic}"
    );
    assert_none_in("the dead-letter topic", &dlq_bytes, &erased);
    assert_none_in("the dead-letter topic", &dlq_bytes, &live_secrets);

    // Redis: every key and value under the test's prefix.
    let (redis_after, keys) = redis_dump(&shared_redis_url(), &c.redis_prefix).await;
    assert!(keys > 0, "no keys under {}", c.redis_prefix);
    assert_none_in("Redis", &redis_after, &erased);
    let live_profiles: Vec<Secret> = live.iter().flat_map(|a| a.now.secrets()).collect();
    assert_all_in("Redis", &redis_after, &live_profiles);

    // The log as readers see it: the auditor reads every value a live user ever had, and the
    // deleted users' events as erased; the analytics role reads none of them.
    let (audited, audited_raw) =
        events_as(r, &auditor(), None, stored_count(&c.pool, None).await).await;
    assert_all_in("the auditor's events", &audited_raw, &live_secrets);
    assert_none_in("the auditor's events", &audited_raw, &erased);
    for a in &gone {
        assert_erased(&audited, a.id);
    }
    let (analysed, analysed_raw) = events_as(r, &analytics(), None, audited.len()).await;
    assert_eq!(analysed.len(), audited.len(), "analytics sees other events");
    assert_none_in("the analytics role's events", &analysed_raw, &live_secrets);
    assert_none_in("the analytics role's events", &analysed_raw, &erased);
    for a in &gone {
        let (own, _) = events_as(r, &auditor(), Some(a.id), a.version as usize).await;
        assert_erased(&own, a.id);
        let by_email = admin_ok(r, USER_BY_EMAIL, json!({ "email": a.history[0].value })).await;
        assert_eq!(by_email["userByEmail"], Value::Null, "{by_email}");
    }

    // The logs of the process, at every level of PCF's crates. The control: what a task of
    // the runtime logs is captured, and so is what PCF logged.
    let probe = format!("erasure-log-probe-{}", core());
    let logged = probe.clone();
    tokio::spawn(async move { tracing::info!(target: "pcf", "{logged}") })
        .await
        .expect("the probe task");
    let text = log.text();
    assert!(
        text.contains(&probe),
        "the log capture misses its own probe"
    );
    assert!(
        text.lines()
            .any(|l| l.contains(" pcf_projectors") && l.contains(&c.topic)),
        "the capture misses what PCF's projectors logged:\n{text}"
    );
    assert_none_in("the logs of the process", text.as_bytes(), &erased);

    // A command id of a deleted user, sent again: its answer holds no personal data.
    for a in &gone {
        for (_, query, variables) in &a.commands {
            let again = admin_gql(r, query, variables.clone()).await;
            assert_none_in(
                &format!("the repeated answer of a deleted user's command ({query})"),
                again.text.as_bytes(),
                &a.history,
            );
        }
    }
}

/// The number of key rows of `user`.
async fn key_rows(pool: &PgPool, user: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM user_keys WHERE user_id = $1")
        .bind(user.to_string())
        .fetch_one(pool)
        .await
        .expect("counting key rows")
}

/// Waits until the SQL view and the Redis view have every account at its version.
async fn wait_for_views(c: &Cluster, accounts: &[&Account]) {
    let want: BTreeMap<Uuid, u64> = accounts.iter().map(|a| (a.id, a.version as u64)).collect();
    let redis = c.redis_view(&shared_redis_url()).await;
    wait_until(CONVERGE, "both views to have every account", || {
        let (want, redis) = (&want, &redis);
        async move {
            let sql = c.sql_view().await;
            let docs = redis_docs(redis).await?;
            for (id, version) in want {
                let in_sql = sql.get(id).map(|v| v.version);
                let in_redis = docs.users.get(id).map(|v| v.version);
                if in_sql != Some(*version) || in_redis != Some(*version) {
                    return Err(format!(
                        "{id}: SQL {in_sql:?}, Redis {in_redis:?}, want {version}"
                    ));
                }
            }
            Ok(())
        }
    })
    .await;
}

/// `sealed` with one character in its middle changed, still base64.
fn flip_base64(sealed: &str) -> String {
    let mut chars: Vec<char> = sealed.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// 4. Embedded mode: the raw SQLite files
// ---------------------------------------------------------------------------------------------

/// Checkpoints the SQLite database at `path` (through a connection of the test's own) and
/// returns the raw bytes of the file and of its write-ahead log.
async fn sqlite_bytes(path: &Path) -> Vec<u8> {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("connecting to events.db");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (busy, log, done): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&mut conn)
            .await
            .expect("PRAGMA wal_checkpoint(TRUNCATE)");
        if busy == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no complete checkpoint of events.db in 20 s: busy; {done} of {log} frames"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = conn.close().await;
    let mut bytes = std::fs::read(path).expect("reading events.db");
    for suffix in ["-wal", "-journal"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if let Ok(more) = std::fs::read(&side) {
            bytes.extend_from_slice(&more);
        }
    }
    bytes
}

/// Reads the wrapped key of `user` from the SQLite key table.
async fn sqlite_wrapped_key(path: &Path, user: Uuid) -> Vec<u8> {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("connecting to events.db");
    let (wrapped,): (Vec<u8>,) = sqlx::query_as("SELECT wrapped FROM user_keys WHERE user_id = ?")
        .bind(user.to_string())
        .fetch_one(&mut conn)
        .await
        .expect("the user's key row");
    let _ = conn.close().await;
    wrapped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_erasure_leaves_no_personal_data_in_the_sqlite_files() {
    run(TestApp::start().await, async |app| {
        let r = &app.router();
        let path = app.config.data_dir.join("events.db");
        let mut live = Account::create(r, "live", true).await;
        let mut gone = Account::create(r, "gone", true).await;
        for a in [&mut live, &mut gone] {
            a.update_profile(r, true).await;
            a.change_email(r, false).await;
            a.update_profile(r, false).await;
            a.change_email(r, true).await;
        }

        // The control: before the deletion, the file holds the doomed user's email (in
        // `user_emails`) and its key.
        let wrapped = sqlite_wrapped_key(&path, gone.id).await;
        assert!(
            wrapped.len() >= 32,
            "a wrapped key of {} bytes",
            wrapped.len()
        );
        let before = sqlite_bytes(&path).await;
        assert_all_in(
            "events.db before the deletion",
            &before,
            &[gone.now.email.clone()],
        );
        assert!(
            contains_bytes(&before, &wrapped),
            "the control failed: the wrapped key is not found in events.db"
        );

        gone.delete(r, true).await;
        let after = sqlite_bytes(&path).await;
        assert_none_in("events.db and its WAL", &after, &gone.history);
        assert!(
            !contains_bytes(&after, &wrapped),
            "the deleted user's wrapped data key is still in the bytes of events.db or its \
             WAL (the KEK is in the same data directory, so its events can still be opened)"
        );
        assert_all_in("events.db", &after, &[live.now.email.clone()]);
        // The auditor still reads the live user, and the deleted one as erased.
        let (events, raw) = events_as(r, &auditor(), None, app.count_events(None).await).await;
        assert_all_in("the auditor's events", &raw, &live.history);
        assert_none_in("the auditor's events", &raw, &gone.history);
        assert_erased(&events, gone.id);

        // After a restart, which rebuilds the views from the log: the same, and the deleted
        // user is gone from the views.
        app.restart().await;
        let r = &app.router();
        let (events, raw) = events_as(r, &auditor(), None, app.count_events(None).await).await;
        assert_all_in("the auditor's events after a restart", &raw, &live.history);
        assert_none_in("the auditor's events after a restart", &raw, &gone.history);
        assert_erased(&events, gone.id);
        let views = admin_ok(r, USER, json!({ "id": gone.id })).await;
        assert_eq!(views["user"], Value::Null, "{views}");
        let views = admin_ok(r, USER, json!({ "id": live.id })).await;
        assert_eq!(views["user"]["bio"], json!(live.now.bio.value), "{views}");
        let after = sqlite_bytes(&path).await;
        assert_none_in(
            "events.db and its WAL after a restart",
            &after,
            &gone.history,
        );
        assert!(!contains_bytes(&after, &wrapped));
    })
    .await;
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// 5. Bad input and faults
// ---------------------------------------------------------------------------------------------

/// The value of a counter in the Prometheus text of `/metrics`.
async fn counter(router: &axum::Router, name: &str) -> f64 {
    let r = get(router, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.text
        .lines()
        .find_map(|line| {
            let (metric, value) = line.rsplit_once(' ')?;
            (metric == name || metric.starts_with(&format!("{name}{{")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{}", r.text))
}

/// An altered ciphertext in the event store: the auditor gets `INTERNAL` for that event,
/// never a panic nor wrong plain text, and the integrity counter goes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_altered_sealed_field_answers_internal_and_is_counted() {
    run(TestApp::postgres().await, async |app| {
        let r = &app.router();
        let pool = app.db().expect("PostgreSQL").pool.clone();
        let mut a = Account::create(r, "tampered", false).await;
        a.update_profile(r, false).await;
        let updated: Vec<Secret> = a.now.secrets()[1..].to_vec();
        let metric = "pcf_personal_data_integrity_errors_total";
        let errors_before = counter(r, metric).await;

        // The control: the untouched event opens for the auditor.
        let (_, raw) = events_as(r, &auditor(), Some(a.id), 2).await;
        assert_all_in("the auditor's events before the change", &raw, &updated);

        let (event_id, sealed): (Uuid, String) = sqlx::query_as(
            "SELECT event_id, payload #>> '{ProfileUpdated,sealed}' FROM events \
             WHERE aggregate_id = $1 AND sequence = 2",
        )
        .bind(a.id.to_string())
        .fetch_one(&pool)
        .await
        .expect("the sealed ProfileUpdated");
        let changed = sqlx::query(
            "UPDATE events SET payload = jsonb_set(payload, '{ProfileUpdated,sealed}', \
             to_jsonb($1::text)) WHERE aggregate_id = $2 AND sequence = 2",
        )
        .bind(flip_base64(&sealed))
        .bind(a.id.to_string())
        .execute(&pool)
        .await
        .expect("altering the ciphertext");
        assert_eq!(changed.rows_affected(), 1);

        let resp = events_page(r, &auditor(), json!({ "aggregateId": a.id, "first": 50 })).await;
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text);
        assert!(
            resp.codes().iter().any(|c| c == "INTERNAL"),
            "no INTERNAL for the altered event: {}",
            resp.text
        );
        assert!(
            resp.codes().iter().all(|c| c == "INTERNAL"),
            "{}",
            resp.text
        );
        assert!(
            resp.text.contains(&event_id.to_string()),
            "the error does not name the event: {}",
            resp.text
        );
        assert_none_in(
            "the answer for the altered event",
            resp.text.as_bytes(),
            &updated,
        );
        assert!(!resp.text.contains(&sealed), "{}", resp.text);
        let errors_after = counter(r, metric).await;
        assert!(
            errors_after > errors_before,
            "{metric} went from {errors_before} to {errors_after}"
        );
        // The write path too: a process that remembers nothing of the user loads its events
        // to decide a command, answers INTERNAL without the plain text, and counts it.
        let fresh = app.another_instance().await;
        let before_load = counter(&fresh.router, metric).await;
        let next = a.now.with_new_profile();
        let resp = admin_gql(
            &fresh.router,
            UPDATE_PROFILE,
            json!({ "id": a.id, "input": next.profile_input() }),
        )
        .await;
        assert_eq!(resp.codes(), ["INTERNAL"], "{}", resp.text);
        assert_none_in("the refused command", resp.text.as_bytes(), &updated);
        let after_load = counter(&fresh.router, metric).await;
        assert!(
            after_load > before_load,
            "the load's integrity error was not counted: {before_load} -> {after_load}"
        );
        fresh.shutdown().await;
        // The app still serves: another user's events open.
        let other = Account::create(r, "bystander", false).await;
        let (_, raw) = events_as(r, &auditor(), Some(other.id), 1).await;
        assert_all_in("a bystander's events", &raw, &other.history);
    })
    .await;
}

/// `deleteAccount` racing `updateProfile` on one user, through two processes, many times:
/// one order wins each time, no event follows `AccountDeleted`, and the key row is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deletion_racing_an_update_leaves_nothing_after_it() {
    run(TestApp::postgres().await, async |app| {
        let a_router = app.router();
        let other = app.another_instance().await;
        let b_router = other.router.clone();
        let pool = app.db().expect("PostgreSQL").pool.clone();
        const ROUNDS: usize = 40;
        let mut accounts = Vec::new();
        for i in 0..ROUNDS {
            let r = if i % 2 == 0 { &a_router } else { &b_router };
            let mut a = Account::create(r, &format!("race-{i}"), false).await;
            // The updater has the user's key cached from an update of its own.
            a.update_profile(r, false).await;
            accounts.push(a);
        }
        let races = accounts.iter().enumerate().map(|(i, a)| {
            let (updater, deleter) = if i % 2 == 0 {
                (a_router.clone(), b_router.clone())
            } else {
                (b_router.clone(), a_router.clone())
            };
            let next = a.now.with_new_profile();
            let id = a.id;
            async move {
                let update = Gql::vars(
                    UPDATE_PROFILE,
                    json!({ "id": id, "input": next.profile_input() }),
                )
                .by_admin();
                let delete = Gql::vars(DELETE_WITH_RECEIPT, json!({ "id": id })).by_admin();
                let (u, d) = tokio::join!(update.send(&updater), delete.send(&deleter));
                (id, u, d)
            }
        });
        let outcomes = futures::future::join_all(races).await;
        let mut update_first = 0;
        for (id, u, d) in outcomes {
            let deleted = d.ok()["deleteAccount"].clone();
            check_receipt(&deleted);
            let delete_version = version_of(&deleted);
            if u.has_errors() {
                u.expect_error_in(
                    format!("the update racing the deletion of {id}"),
                    "ACCOUNT_DELETED",
                );
                assert_eq!(delete_version, 3, "{id}: {}", d.text);
            } else {
                update_first += 1;
                assert_eq!(version_of(&u.ok()["updateProfile"]), 3, "{}", u.text);
                assert_eq!(delete_version, 4, "{id}: {}", d.text);
            }
            let rows: Vec<(i64, String)> = sqlx::query_as(
                "SELECT sequence, event_type FROM events WHERE aggregate_id = $1 \
                 ORDER BY sequence",
            )
            .bind(id.to_string())
            .fetch_all(&pool)
            .await
            .expect("the user's events");
            let sequences: Vec<i64> = rows.iter().map(|(s, _)| *s).collect();
            assert_eq!(
                sequences,
                (1..=delete_version).collect::<Vec<_>>(),
                "{id}: {rows:?}"
            );
            let deletions: Vec<i64> = rows
                .iter()
                .filter(|(_, t)| t == "AccountDeleted")
                .map(|(s, _)| *s)
                .collect();
            assert_eq!(deletions, vec![delete_version], "{id}: {rows:?}");
            assert_eq!(key_rows(&pool, id).await, 0, "{id} kept its key");
        }
        eprintln!("{update_first} of {ROUNDS} races went to the update");
        // Afterwards no command lands on any of them, through either process.
        for (i, a) in accounts.iter().enumerate() {
            let r = if i % 2 == 0 { &b_router } else { &a_router };
            let late = admin_gql(
                r,
                UPDATE_PROFILE,
                json!({ "id": a.id, "input": a.now.profile_input() }),
            )
            .await;
            late.expect_error("ACCOUNT_DELETED");
        }
        let (after,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM events e WHERE EXISTS (SELECT 1 FROM events d \
             WHERE d.aggregate_id = e.aggregate_id AND d.event_type = 'AccountDeleted' \
             AND d.sequence < e.sequence)",
        )
        .fetch_one(&pool)
        .await
        .expect("events after a deletion");
        assert_eq!(after, 0, "events written after AccountDeleted");
        other.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Key-encryption keys, rotation, and `pcf events protect`
// ---------------------------------------------------------------------------------------------

/// A production configuration on `db`, files (KEK files) in `dir`.
fn production_config(db: &TestDb, dir: &Path) -> pcf::Config {
    pcf::Config {
        database_url: Some(db.url.clone()),
        read_database_urls: vec![db.url.clone()],
        environment: Environment::Production,
        ..base_config(dir)
    }
}

fn with_kek(mut config: pcf::Config, kek: &Kek) -> pcf::Config {
    config.kek = Some(kek.to_base64().as_str().to_owned());
    config.kek_id = kek.id().to_owned();
    config.kek_file = None;
    config
}

/// A KEK file listing `keks`, the first the one that wraps.
fn with_kek_file(mut config: pcf::Config, dir: &Path, keks: &[&Kek]) -> pcf::Config {
    let path = dir.join(format!("keks-{}", core()));
    let text: String = keks
        .iter()
        .map(|k| format!("{} {}\n", k.id(), k.to_base64().as_str()))
        .collect();
    std::fs::write(&path, text).expect("writing the KEK file");
    config.kek = None;
    config.kek_file = Some(path);
    config
}

/// Starting must fail; returns the whole error chain.
async fn refused(config: &pcf::Config, what: &str) -> String {
    match pcf::build(config).await {
        Ok(app) => {
            app.shutdown().await;
            panic!("{what}: production started");
        }
        Err(e) => format!("{e:#}"),
    }
}

/// Production refuses a KEK that is not the one that wrapped the keys (same id) and a
/// configuration without the KEK id that wrapped them, saying which; a rotation re-wraps
/// every key under a new KEK, after which the new KEK alone opens everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn production_refuses_a_wrong_or_missing_kek_and_rotation_retires_the_old_one() {
    run(TestDb::create().await, async |db| {
        let files = tempfile::tempdir().expect("a directory");
        let dir = files.path();
        let base = production_config(db, dir);
        let (old, new) = (Kek::generate("kek-old"), Kek::generate("kek-new"));

        let app = pcf::build(&with_kek(base.clone(), &old))
            .await
            .expect("production with a KEK");
        let mut live = Account::create(&app.router, "live", true).await;
        live.update_profile(&app.router, false).await;
        live.change_email(&app.router, false).await;
        let mut gone = Account::create(&app.router, "gone", false).await;
        gone.delete(&app.router, false).await;
        let (_, raw) = events_as(
            &app.router,
            &auditor(),
            Some(live.id),
            live.version as usize,
        )
        .await;
        assert_all_in("the auditor's events", &raw, &live.history);
        app.shutdown().await;

        let impostor = Kek::generate("kek-old");
        let e = refused(&with_kek(base.clone(), &impostor), "another key as kek-old").await;
        assert!(
            e.contains("\"kek-old\"") && e.contains("not the key-encryption key"),
            "the error does not say the KEK kek-old is wrong: {e}"
        );
        let e = refused(&with_kek(base.clone(), &new), "only kek-new").await;
        assert!(
            e.contains("\"kek-old\"") && e.contains("not configured"),
            "the error does not name the missing KEK kek-old: {e}"
        );

        // Rotation: the new KEK first, the old one second.
        let rotating = with_kek_file(base.clone(), dir, &[&new, &old]);
        pcf::cli::keys::keys(rotating, pcf::cli::KeysCommand::Rotate)
            .await
            .expect("pcf keys rotate");
        let in_use: Vec<String> = sqlx::query_scalar("SELECT DISTINCT kek_id FROM user_keys")
            .fetch_all(&db.pool)
            .await
            .expect("the KEKs in use");
        assert_eq!(in_use, vec!["kek-new".to_owned()]);

        // The new KEK alone: it starts and reads everything.
        let app = pcf::build(&with_kek(base.clone(), &new))
            .await
            .expect("production with the new KEK alone after the rotation");
        let (events, raw) = events_as(
            &app.router,
            &auditor(),
            None,
            stored_count(&db.pool, None).await,
        )
        .await;
        assert_all_in(
            "the auditor's events after the rotation",
            &raw,
            &live.history,
        );
        assert_none_in(
            "the auditor's events after the rotation",
            &raw,
            &gone.history,
        );
        assert_erased(&events, gone.id);
        let now = admin_ok(
            &app.router,
            USER,
            json!({ "id": live.id, "minVersion": live.version }),
        )
        .await;
        assert_eq!(now["user"]["email"], json!(live.now.email.value), "{now}");
        assert_eq!(now["user"]["bio"], json!(live.now.bio.value), "{now}");
        live.update_profile(&app.router, true).await;
        Account::create(&app.router, "after-rotation", false).await;
        app.shutdown().await;

        // And the old KEK alone no longer can.
        let e = refused(
            &with_kek(base.clone(), &old),
            "only kek-old after the rotation",
        )
        .await;
        assert!(
            e.contains("\"kek-new\"") && e.contains("not configured"),
            "the error does not name the missing KEK kek-new: {e}"
        );
    })
    .await;
}

/// A start refused for a missing KEK leaves nothing behind that refuses the next, correct
/// configuration: the refused start's own KEK never wrapped a key, so its check value must
/// not be recorded as the one keys are wrapped with.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_start_does_not_pin_its_kek_for_later_starts() {
    run(TestDb::create().await, async |db| {
        let files = tempfile::tempdir().expect("a directory");
        let dir = files.path();
        let base = production_config(db, dir);
        let old = Kek::generate("kek-old");
        let app = pcf::build(&with_kek(base.clone(), &old))
            .await
            .expect("production with a KEK");
        let live = Account::create(&app.router, "live", false).await;
        app.shutdown().await;

        // An operator deploys a first draft of the next KEK, alone: refused, rightly.
        let draft = Kek::generate("kek-new");
        let e = refused(&with_kek(base.clone(), &draft), "only a draft kek-new").await;
        assert!(e.contains("\"kek-old\""), "{e}");
        let (checks,): (Vec<String>,) = sqlx::query_as(
            "SELECT coalesce(array_agg(kek_id ORDER BY kek_id), '{}') FROM kek_checks",
        )
        .fetch_one(&db.pool)
        .await
        .expect("the KEK checks");

        // Then the real next KEK, with the old one beside it: nothing was ever wrapped by
        // the draft, so nothing may refuse this.
        let real = Kek::generate("kek-new");
        let app = pcf::build(&with_kek_file(base.clone(), dir, &[&real, &old]))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the correct rotation configuration (kek-new first, kek-old second) is \
                     refused after a refused start with a draft kek-new had recorded a check \
                     value (kek_checks held {checks:?}): {e:#}"
                )
            });
        let (_, raw) = events_as(&app.router, &auditor(), Some(live.id), 1).await;
        assert_all_in("the auditor's events", &raw, &live.history);
        app.shutdown().await;
    })
    .await;
}

/// `pcf events protect` on plain version-1 events, as older PCF wrote them, of one live and
/// one deleted user: afterwards no plain value of either is in the events table, the live
/// user's events open for the auditor, the deleted user's read as erased, and a second run
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn protect_seals_a_live_users_plain_history_and_erases_a_deleted_ones() {
    run(TestApp::postgres().await, async |app| {
        let r = &app.router();
        let pool = app.db().expect("PostgreSQL").pool.clone();
        let (live, gone) = (Uuid::new_v4(), Uuid::new_v4());
        let (live_first, live_then) = (Profile::random("live"), Profile::random("live"));
        let live_email = email_secret("live");
        let gone_first = Profile::random("gone");
        let gone_email = email_secret("gone");
        let at = |s: u32| format!("2024-01-0{}T10:00:00Z", s.min(9));
        let created = |id: Uuid, p: &Profile| {
            json!({ "UserCreated": {
                "userId": id, "email": p.email.value, "displayName": p.display_name.value,
                "bio": p.bio.value, "avatarUrl": p.avatar_url.value, "occurredAt": at(1),
            }})
        };
        let v1: Vec<(Uuid, i64, &str, Value)> = vec![
            (live, 1, "UserCreated", created(live, &live_first)),
            (
                live,
                2,
                "ProfileUpdated",
                json!({ "ProfileUpdated": {
                    "displayName": live_then.display_name.value, "bio": live_then.bio.value,
                    "avatarUrl": live_then.avatar_url.value, "occurredAt": at(2),
                }}),
            ),
            (
                live,
                3,
                "EmailChanged",
                json!({ "EmailChanged": {
                    "oldEmail": live_first.email.value, "newEmail": live_email.value,
                    "occurredAt": at(3),
                }}),
            ),
            (gone, 1, "UserCreated", created(gone, &gone_first)),
            (
                gone,
                2,
                "EmailChanged",
                json!({ "EmailChanged": {
                    "oldEmail": gone_first.email.value, "newEmail": gone_email.value,
                    "occurredAt": at(4),
                }}),
            ),
            (
                gone,
                3,
                "AccountDeleted",
                json!({ "AccountDeleted": { "occurredAt": at(5) } }),
            ),
        ];
        for (id, sequence, event_type, payload) in &v1 {
            sqlx::query(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                 event_version, payload, metadata) VALUES ('User', $1, $2, $3, '1', $4, '{}')",
            )
            .bind(id.to_string())
            .bind(sequence)
            .bind(event_type)
            .bind(payload)
            .execute(&pool)
            .await
            .expect("inserting a version-1 event");
        }
        sqlx::query("INSERT INTO user_emails (email, user_id) VALUES ($1, $2)")
            .bind(&live_email.value)
            .bind(live.to_string())
            .execute(&pool)
            .await
            .expect("the live user's email, as older PCF kept it");

        let mut live_secrets = live_first.secrets().to_vec();
        live_secrets.extend(live_then.secrets()[1..].iter().cloned());
        live_secrets.push(live_email.clone());
        let mut gone_secrets = gone_first.secrets().to_vec();
        gone_secrets.push(gone_email.clone());
        let both: Vec<Secret> = live_secrets.iter().chain(&gone_secrets).cloned().collect();

        // The control: the table holds every value in plain text.
        let table = events_table(&pool).await;
        assert_all_in(
            "the events table before protection",
            table.as_bytes(),
            &both,
        );

        let store = app.app().store.clone();
        let (mut sealed, mut erased, mut rewritten) = (0, 0, 0);
        for _ in 0..100 {
            let done = store.protect_some(2).await.expect("protect_some");
            if done.total() == 0 {
                break;
            }
            sealed += done.sealed;
            erased += done.erased;
            rewritten += done.total();
        }
        // The live user's three events sealed; the deleted user's two with personal fields
        // erased, and its `AccountDeleted` moved to version 2 as it is.
        assert_eq!((sealed, erased, rewritten), (3, 2, 6));
        assert_eq!(store.count_plain().await.expect("count_plain"), 0);

        let table = events_table(&pool).await;
        assert_none_in("the events table after protection", table.as_bytes(), &both);
        let versions: Vec<String> = sqlx::query_scalar("SELECT DISTINCT event_version FROM events")
            .fetch_all(&pool)
            .await
            .expect("versions");
        assert_eq!(versions, vec!["2".to_owned()]);
        assert_eq!(key_rows(&pool, live).await, 1, "the live user got no key");
        assert_eq!(key_rows(&pool, gone).await, 0, "the deleted user got a key");

        let (events, raw) = events_as(r, &auditor(), None, 6).await;
        assert_all_in("the auditor's events", &raw, &live_secrets);
        assert_none_in("the auditor's events", &raw, &gone_secrets);
        assert_erased(&events, gone);
        let live_events: Vec<&Value> = events
            .iter()
            .filter(|e| e["aggregateId"] == json!(live.to_string()))
            .collect();
        assert_eq!(live_events.len(), 3);
        assert_eq!(
            live_events[2]["payload"]["oldEmail"],
            json!(live_first.email.value)
        );
        assert_eq!(
            live_events[2]["payload"]["newEmail"],
            json!(live_email.value)
        );

        // Again: nothing to do, nothing changes.
        let again = store.protect_some(100).await.expect("protect_some again");
        assert_eq!(again.total(), 0, "{again:?}");
        assert_eq!(
            events_table(&pool).await,
            table,
            "a second run changed the table"
        );

        // The live user's aggregate loads from its sealed history: a command succeeds.
        let data = admin_ok(
            r,
            UPDATE_PROFILE,
            json!({ "id": live, "input": { "displayName": "After protection" } }),
        )
        .await;
        assert_eq!(version_of(&data["updateProfile"]), 4, "{data}");
        assert_eq!(
            data["updateProfile"]["user"]["email"],
            json!(live_email.value),
            "{data}"
        );
    })
    .await;
}

/// The events table as text, row by row in order.
async fn events_table(pool: &PgPool) -> String {
    let rows: Vec<(String, i64, String, String, String)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, event_type, event_version, payload::text FROM events \
         ORDER BY aggregate_id, sequence",
    )
    .fetch_all(pool)
    .await
    .expect("reading the events table");
    rows.iter()
        .map(|r| format!("{r:?}\n"))
        .collect::<Vec<_>>()
        .concat()
}
