//! The relay on PostgreSQL: commit order across transactions that commit late, a durable
//! checkpoint to resume from, and prompt wake-up on commits made by another process.
//!
//! These tests hold transactions open on purpose, and assert what the log shows. PostgreSQL's
//! transaction ids are cluster-wide, so an open transaction holds back the relay's horizon in
//! every database: each test has the server to itself (`TestDb::create_alone`), so that they
//! neither stall other tests nor are stalled by them, and they poll (bounded) wherever other
//! clients of the server could delay visibility.

use crate::support::{assert_sealed, eventually, opened, run, TestDb};
use async_trait::async_trait;
use chrono::Utc;
use pcf_adapters::keys::{KeyDb, Keys, Opener};
use pcf_adapters::personal::{is_sealed, Kek, Keyring};
use pcf_command::{
    CommandService, CommandStore, CommitFeed, PostgresStore, Relay, RelayConfig, RelayStore,
};
use pcf_domain::ports::{EventLog, EventPublisher, LogQuery, NoopObserver, PortError};
use pcf_domain::{EventEnvelope, EventMetadata, Position, ProfilePatch, UserCommand, UserEvent};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// Runs `$scenario(&db)` on a fresh database, alone on the server, and drops it afterwards,
/// even on panic.
macro_rules! on_fresh_database {
    ($scenario:path) => {{
        run(TestDb::create_alone().await, async |db| $scenario(db).await).await;
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_publishes_in_commit_order_and_never_past_an_open_transaction() {
    on_fresh_database!(commit_order);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_resumes_from_its_durable_checkpoint() {
    on_fresh_database!(resume);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_through_another_store_wakes_a_watching_store_promptly() {
    on_fresh_database!(wake_up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_read_as_changes_agrees_with_the_log_read_as_envelopes() {
    on_fresh_database!(changes_match_envelopes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_draining_a_backlog_stops_when_asked_and_resumes_where_it_stopped() {
    on_fresh_database!(stop_while_draining);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_reads_keep_to_the_commit_order_index_before_the_log_was_ever_analyzed() {
    on_fresh_database!(reads_before_analyze);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn analyzing_the_log_keeps_statistics_only_for_the_columns_it_is_read_by() {
    on_fresh_database!(statistics_of_the_log);
}

/// Collects everything published, in order.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<EventEnvelope>>,
}

impl Recorder {
    fn published(&self) -> Vec<EventEnvelope> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// (user, sequence) of everything published, in order.
    fn keys(&self) -> Vec<(Uuid, u64)> {
        self.published()
            .iter()
            .map(|e| (e.aggregate_id, e.sequence))
            .collect()
    }
}

#[async_trait]
impl EventPublisher for Recorder {
    async fn publish(&self, events: &[EventEnvelope]) -> Result<(), PortError> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(events);
        Ok(())
    }
}

/// The key-encryption key of every store here (each test has a database of its own).
static KEYRING: LazyLock<Arc<Keyring>> = LazyLock::new(|| {
    Arc::new(Keyring::new(vec![Kek::generate("test")]).expect("a keyring of one KEK"))
});

/// The key table of the database `pool` is on, under the tests' KEK.
fn keys(pool: &PgPool) -> Arc<Keys> {
    Arc::new(Keys::new(KeyDb::Postgres(pool.clone()), KEYRING.clone()))
}

/// A store of its own on the test database (a separate pool: another process, in effect),
/// sealing personal data with the tests' KEK.
async fn open_store(db: &TestDb) -> (Arc<PostgresStore>, PgPool) {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&db.url)
        .await
        .expect("connecting to the test database");
    pcf_migrations::run_postgres(&pool)
        .await
        .expect("applying the migrations");
    let store = PostgresStore::new(pool.clone()).with_keys(keys(&pool));
    (Arc::new(store), pool)
}

fn relay(store: Arc<PostgresStore>, recorder: &Arc<Recorder>, name: &str) -> Relay {
    Relay::new(
        store,
        recorder.clone(),
        RelayConfig {
            name: name.to_owned(),
            batch_size: 2,
            ..RelayConfig::default()
        },
    )
}

fn commands(store: &Arc<PostgresStore>) -> CommandService {
    CommandService::new(store.clone(), Arc::new(NoopObserver))
}

async fn create(service: &CommandService, id: Uuid, email: &str) {
    let command = UserCommand::CreateUser {
        user_id: id,
        email: email.to_owned(),
        display_name: "Relayed".to_owned(),
        bio: None,
        avatar_url: None,
        at: Utc::now(),
    };
    assert_eq!(execute(service, id, command).await, 1);
}

/// Runs `command` on the user `id`, without metadata, and returns the user's new version;
/// panics if it fails.
async fn execute(service: &CommandService, id: Uuid, command: UserCommand) -> u64 {
    let name = command.name();
    service
        .execute(id, command, EventMetadata::default())
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .version
}

async fn rename(service: &CommandService, id: Uuid, name: &str) {
    let command = UserCommand::UpdateProfile {
        display_name: Some(name.to_owned()),
        bio: ProfilePatch::Keep,
        avatar_url: ProfilePatch::Keep,
        expected_version: None,
        at: Utc::now(),
    };
    execute(service, id, command).await;
}

/// Steps the relay until the recorder holds `count` events (other clients of the server
/// may hold the horizon back for a moment).
async fn step_until(relay: &Relay, recorder: &Recorder, count: usize) {
    eventually(
        Duration::from_secs(15),
        "the relay to publish",
        || async move {
            relay.step().await.expect("relay step");
            (recorder.published().len() >= count).then_some(())
        },
    )
    .await;
}

async fn commit_order(db: &TestDb) {
    let (store, pool) = open_store(db).await;
    let recorder = Arc::new(Recorder::default());
    let relay = relay(store.clone(), &recorder, "commit-order");
    let service = commands(&store);
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());

    // X's transaction writes first (so it has the lower transaction id) and stays open
    // while Y's events commit; it writes its second event after them, so global positions
    // alone (X1, Y1, Y2, X2) are not the commit order (X1, X2, Y1, Y2).
    let mut tx = pool.begin().await.expect("begin");
    let at = "2024-05-01T12:00:00Z";
    let insert_x = |sequence: i64, event_type: &'static str, payload: serde_json::Value| {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata, event_id) \
             VALUES ('User', $1, $2, $3, '1', $4, '{}'::jsonb, $5)",
        )
        .bind(x.to_string())
        .bind(sequence)
        .bind(event_type)
        .bind(payload)
        .bind(Uuid::now_v7())
    };
    insert_x(
        1,
        "UserCreated",
        json!({ "UserCreated": {
            "userId": x, "email": "x@example.com", "displayName": "X",
            "bio": null, "avatarUrl": null, "occurredAt": at,
        } }),
    )
    .execute(&mut *tx)
    .await
    .expect("inserting X's first event");

    create(&service, y, "y@example.com").await;
    rename(&service, y, "Y two").await;
    assert_eq!(
        store.user_events(y, 0).await.expect("Y's events").len(),
        2,
        "Y's events are committed"
    );

    insert_x(
        2,
        "ProfileUpdated",
        json!({ "ProfileUpdated": {
            "displayName": "X two", "bio": null, "avatarUrl": null, "occurredAt": at,
        } }),
    )
    .execute(&mut *tx)
    .await
    .expect("inserting X's second event");

    for _ in 0..3 {
        let published = relay.step().await.expect("relay step");
        assert_eq!(published, 0, "nothing past the open transaction");
    }
    assert!(recorder.published().is_empty(), "Y is not published yet");
    assert_eq!(
        relay.checkpoint().await.expect("checkpoint"),
        Position::START
    );

    tx.commit().await.expect("committing X");
    step_until(&relay, &recorder, 4).await;
    assert_eq!(
        recorder.keys(),
        [(x, 1), (x, 2), (y, 1), (y, 2)],
        "X's transaction began first, so it comes first although it committed last"
    );
    let published = recorder.published();
    assert!(
        published.windows(2).all(|w| w[0].position < w[1].position),
        "positions increase in publication order"
    );
    let x_created = published[0].event().expect("X's event decodes");
    assert!(
        matches!(&x_created, UserEvent::UserCreated { email, .. } if email == "x@example.com"),
        "{x_created:?}"
    );
    assert_eq!(published[2].event_type, "UserCreated");
    // Y's events are published as stored, sealed; opened, they hold what was written.
    assert_sealed(&published[2..], &["y@example.com", "Y two", "Relayed"]);
    let y_events = opened(&keys(&pool), published[2..].to_vec()).await;
    assert_eq!(y_events[0].payload["email"], "y@example.com");
    assert_eq!(y_events[1].payload["displayName"], "Y two");
    assert!(
        published[1].position.global > published[3].position.global,
        "X's second event was inserted after Y's events"
    );

    let checkpoint = relay.checkpoint().await.expect("checkpoint");
    assert_eq!(checkpoint, published[3].position, "the checkpoint advanced");
    assert_eq!(
        checkpoint,
        store
            .position_of(y, 2)
            .await
            .expect("position of Y's last event")
    );
    assert_eq!(relay.step().await.expect("relay step"), 0);
    assert_eq!(recorder.published().len(), 4, "nothing published twice");
    pool.close().await;
}

async fn resume(db: &TestDb) {
    let (store, pool) = open_store(db).await;
    let service = commands(&store);
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    create(&service, a, "a@example.com").await;
    create(&service, b, "b@example.com").await;

    let first = Arc::new(Recorder::default());
    let relay_one = relay(store.clone(), &first, "resume");
    step_until(&relay_one, &first, 2).await;
    assert_eq!(first.keys(), [(a, 1), (b, 1)]);
    let checkpoint = relay_one.checkpoint().await.expect("checkpoint");
    assert_eq!(checkpoint, first.published()[1].position);
    drop(relay_one);

    // A new relay, on a new store (a restarted process), with the same checkpoint name.
    let (store_two, pool_two) = open_store(db).await;
    let second = Arc::new(Recorder::default());
    let relay_two = relay(store_two.clone(), &second, "resume");
    assert_eq!(
        relay_two.checkpoint().await.expect("checkpoint"),
        checkpoint
    );
    assert_eq!(relay_two.step().await.expect("relay step"), 0);
    assert!(second.published().is_empty(), "nothing is published again");

    create(&service, c, "c@example.com").await;
    rename(&service, a, "A two").await;
    step_until(&relay_two, &second, 2).await;
    assert_eq!(second.keys(), [(c, 1), (a, 2)], "only the new events");
    assert_eq!(relay_two.step().await.expect("relay step"), 0);
    assert_eq!(second.published().len(), 2);

    // Checkpoints are per name: another destination starts from the beginning.
    let other = Arc::new(Recorder::default());
    let relay_other = relay(store_two, &other, "another-destination");
    step_until(&relay_other, &other, 4).await;
    assert_eq!(other.keys(), [(a, 1), (b, 1), (c, 1), (a, 2)]);
    pool.close().await;
    pool_two.close().await;
}

/// `read_changes` (PostgreSQL decodes the stored payload straight into the event) reads what
/// `read` does, decoded: for every event type, after a position and with a limit; a payload
/// that does not decode is the change's error, not the read's.
///
/// A change is decoded from the payload as stored, and holds no keys: for a sealed event
/// (version 2) its personal fields are empty and the sealed text is kept beside them, for a
/// plain one (version 1) they are there. This checks that the changes show no personal data
/// of sealed events until opened, and that opening the changes (`Opener::open_changes`, the
/// rebuild's way) gives what opening the envelopes gives, a tampered change included.
async fn changes_match_envelopes(db: &TestDb) {
    let (store, pool) = open_store(db).await;
    let service = commands(&store);
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    create(&service, a, "a@example.com").await;
    create(&service, b, "b@example.com").await;
    rename(&service, a, "A two").await;
    let change_email = UserCommand::ChangeEmail {
        email: "a2@example.com".to_owned(),
        expected_version: None,
        at: Utc::now(),
    };
    execute(&service, a, change_email).await;
    let delete = UserCommand::DeleteAccount {
        expected_version: None,
        at: Utc::now(),
    };
    execute(&service, b, delete).await;
    // An older event, written before personal data was sealed: plain text, version 1.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('User', $1, 1, 'UserCreated', '1', $2, '{}')",
    )
    .bind(c.to_string())
    .bind(json!({ "UserCreated": {
        "userId": c, "email": "c@example.com", "displayName": "Plain C",
        "bio": null, "avatarUrl": null, "occurredAt": "2024-05-01T12:00:00Z",
    } }))
    .execute(&pool)
    .await
    .expect("a version 1 row");
    // A row written by another tool, whose payload is not a `UserEvent`.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('User', $1, 3, 'ProfileUpdated', '1', '{\"Nonsense\": 1}', '{}')",
    )
    .bind(b.to_string())
    .execute(&pool)
    .await
    .expect("a foreign row");

    let everything = pcf_domain::ports::LogQuery {
        after: Some(Position::START),
        limit: 100,
        ..Default::default()
    };
    let envelopes = eventually(Duration::from_secs(15), "all seven rows readable", || {
        let store = store.clone();
        let q = everything.clone();
        async move {
            let read = store.read(&q).await.expect("read");
            (read.len() == 7).then_some(read)
        }
    })
    .await;
    let types: Vec<&str> = envelopes.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "UserCreated",
            "UserCreated",
            "ProfileUpdated",
            "EmailChanged",
            "AccountDeleted",
            "UserCreated",
            "ProfileUpdated"
        ]
    );
    let changes = store.read_changes(&everything).await.expect("read_changes");
    assert_eq!(changes.len(), envelopes.len());
    for (change, envelope) in changes.iter().zip(&envelopes) {
        assert_eq!(change.event_id, envelope.event_id);
        assert_eq!(change.aggregate_id, envelope.aggregate_id);
        assert_eq!(change.sequence, envelope.sequence);
        assert_eq!(change.position, envelope.position);
        match envelope.event() {
            Ok(event) => assert_eq!(change.event.as_ref().ok(), Some(&event)),
            Err(_) => assert!(change.event.is_err(), "{change:?}"),
        }
    }
    assert!(changes[6].event.is_err(), "the foreign row does not decode");

    // The sealed events' changes show none of their personal data; the plain one's does.
    assert_sealed(
        &envelopes[..5],
        &[
            "a@example.com",
            "b@example.com",
            "a2@example.com",
            "A two",
            "Relayed",
        ],
    );
    for change in &changes[..5] {
        let shown = format!("{:?}", change.event);
        for personal in ["example.com", "A two", "Relayed"] {
            assert!(!shown.contains(personal), "{personal} in {shown}");
        }
    }
    assert!(matches!(
        &changes[5].event,
        Ok(UserEvent::UserCreated { email, display_name, .. })
            if email == "c@example.com" && display_name == "Plain C"
    ));
    // Opened, the envelopes hold it: a's events in full, b's erased with its key.
    assert!(envelopes[..5].iter().all(|e| e.event_version == "2"));
    let opened = opened(&keys(&pool), envelopes[..6].to_vec()).await;
    let events: Vec<UserEvent> = opened
        .iter()
        .map(|e| e.event().expect("an opened event decodes"))
        .collect();
    assert!(matches!(
        &events[0],
        UserEvent::UserCreated { email, display_name, .. }
            if email == "a@example.com" && display_name == "Relayed"
    ));
    assert!(opened[1].is_erased(), "{:?}", opened[1].payload);
    assert!(matches!(
        &events[2],
        UserEvent::ProfileUpdated { display_name, .. } if display_name == "A two"
    ));
    assert!(matches!(
        &events[3],
        UserEvent::EmailChanged { old_email, new_email, .. }
            if old_email == "a@example.com" && new_email == "a2@example.com"
    ));
    assert_eq!(
        events[5],
        changes[5].event.clone().expect("the plain event")
    );
    assert!(!is_sealed(&opened[5].payload));

    // The changes opened in place equal the envelopes opened, then read as changes.
    for (change, envelope) in changes.iter().zip(&envelopes) {
        let of = pcf_domain::ports::Change::of(envelope);
        assert_eq!((&change.sealed, change.erased), (&of.sealed, of.erased));
    }
    assert!(changes[..4].iter().all(|c| c.sealed.is_some()));
    let mut opened_changes = changes[..6].to_vec();
    let mut tampered = changes[2].sealed.clone().expect("sealed").into_bytes();
    tampered[30] = if tampered[30] == b'A' { b'B' } else { b'A' };
    opened_changes[2].sealed = Some(String::from_utf8(tampered).expect("base64"));
    let unopened = keys(&pool)
        .open_changes(&mut opened_changes)
        .await
        .expect("the key table answers");
    assert_eq!(unopened.len(), 1, "{unopened:?}");
    assert_eq!(
        (unopened[0].index, unopened[0].event_id),
        (2, envelopes[2].event_id)
    );
    for (i, (change, envelope)) in opened_changes.iter().zip(&opened).enumerate() {
        if i == 2 {
            assert!(change.sealed.is_some(), "left sealed");
            continue;
        }
        let expected = pcf_domain::ports::Change::of(envelope);
        assert_eq!(change.event, expected.event, "event {i}");
        assert_eq!((&change.sealed, change.erased), (&None, expected.erased));
    }
    assert!(opened_changes[1].erased && opened_changes[4].sealed.is_none());

    // After a position, with a limit: the same window as `read`.
    let window = pcf_domain::ports::LogQuery {
        after: Some(envelopes[1].position),
        limit: 2,
        ..Default::default()
    };
    let changes = store.read_changes(&window).await.expect("read_changes");
    let ids: Vec<Uuid> = changes.iter().map(|c| c.event_id).collect();
    assert_eq!(ids, [envelopes[2].event_id, envelopes[3].event_id]);
    pool.close().await;
}

/// A publisher that takes 50 ms a batch.
struct Slow(Recorder);

#[async_trait]
impl EventPublisher for Slow {
    async fn publish(&self, events: &[EventEnvelope]) -> Result<(), PortError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.0.publish(events).await
    }
}

/// Draining 200 events a batch of one at a time takes at least 10 s; shutdown asked for
/// after 0.5 s ends the run long before, with the checkpoint at what was published, and
/// a relay started again publishes the rest, once each.
async fn stop_while_draining(db: &TestDb) {
    let (store, pool) = open_store(db).await;
    let service = commands(&store);
    for i in 0..200 {
        create(&service, Uuid::now_v7(), &format!("drain{i}@example.com")).await;
    }
    let config = RelayConfig {
        name: "drain".to_owned(),
        batch_size: 1,
        ..RelayConfig::default()
    };
    let slow = Arc::new(Slow(Recorder::default()));
    let relay = Relay::new(store.clone(), slow.clone(), config.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the relay stops within 5 s of being asked, not after the backlog")
        .expect("relay task");
    let first = slow.0.keys();
    assert!(
        !first.is_empty() && first.len() < 200,
        "{} of 200 published before the stop",
        first.len()
    );
    let checkpoint = Relay::new(store.clone(), slow.clone(), config.clone())
        .checkpoint()
        .await
        .expect("checkpoint");
    assert_eq!(
        Some(checkpoint),
        slow.0.published().last().map(|e| e.position),
        "the checkpoint is at the last event published"
    );

    let rest = Arc::new(Recorder::default());
    let again = Relay::new(store.clone(), rest.clone(), config);
    step_until(&again, &rest, 200 - first.len()).await;
    let mut all = first;
    all.extend(rest.keys());
    let distinct: std::collections::BTreeSet<_> = all.iter().collect();
    assert_eq!(all.len(), 200, "every event once");
    assert_eq!(distinct.len(), 200);
    pool.close().await;
}

async fn wake_up(db: &TestDb) {
    let (watcher, pool_a) = open_store(db).await;
    let (writer, pool_b) = open_store(db).await;
    watcher.watch_commits().await.expect("LISTEN");
    let committed = watcher.committed();

    let idle = tokio::time::timeout(Duration::from_millis(300), committed.notified()).await;
    assert!(idle.is_err(), "no signal without a commit");

    let service = commands(&writer);
    create(&service, Uuid::now_v7(), "wake@example.com").await;
    let woke = tokio::time::timeout(Duration::from_secs(5), committed.notified()).await;
    assert!(
        woke.is_ok(),
        "a commit through another store signals the watcher within 5 s"
    );

    // And again: the listener keeps listening.
    create(&service, Uuid::now_v7(), "wake2@example.com").await;
    let woke = tokio::time::timeout(Duration::from_secs(5), committed.notified()).await;
    assert!(woke.is_ok(), "a second commit signals the watcher too");
    // The watcher's listener keeps a connection of `pool_a` for good; dropping the database
    // ends it.
    drop(pool_a);
    pool_b.close().await;
}

/// Index scans of `index` as the statistics collector has them.
async fn index_scans(pool: &PgPool, index: &str) -> i64 {
    sqlx::query_scalar("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = $1")
        .bind(index)
        .fetch_one(pool)
        .await
        .expect("reading index statistics")
}

/// Scans of the log, sequential and by index, as the statistics collector has them.
async fn table_scans(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'events'",
    )
    .fetch_one(pool)
    .await
    .expect("reading table statistics")
}

/// A new deployment's log has no statistics until autovacuum first analyzes it; the
/// planner then takes any equality as selective. A read of the log (the relay reads it
/// hundreds of times a second) must still walk `events_commit_order` from the position,
/// and never read the whole primary key into a bitmap.
async fn reads_before_analyze(db: &TestDb) {
    let (store, pool) = open_store(db).await;
    sqlx::query("ALTER TABLE events SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .expect("keeping autovacuum away");
    let service = commands(&store);
    for i in 0..400 {
        create(&service, Uuid::now_v7(), &format!("u{i}@example.com")).await;
    }
    let everything = LogQuery {
        limit: 1000,
        ..LogQuery::default()
    };
    let all = store.read(&everything).await.expect("reading the log");
    assert_eq!(all.len(), 400);
    // Statistics reach the collector when a backend ends: these are the appends'.
    pool.close().await;
    drop((service, store));
    let before = eventually(
        Duration::from_secs(15),
        "the appends' statistics",
        || async {
            let scans = table_scans(&db.pool).await;
            (scans >= 1).then_some(scans)
        },
    )
    .await;
    let pkey_before = index_scans(&db.pool, "events_pkey").await;

    let (store, pool) = open_store(db).await;
    let last_nine = LogQuery {
        after: Some(all[all.len() - 10].position),
        limit: 500,
        ..LogQuery::default()
    };
    // More than five executions: the prepared statement's generic plan is in use by then.
    let reads = 12;
    for _ in 0..reads {
        let page = store.read(&last_nine).await.expect("reading the log");
        assert_eq!(page.len(), 9);
    }
    pool.close().await;
    drop(store);
    eventually(Duration::from_secs(15), "the reads' statistics", || async {
        let scans = table_scans(&db.pool).await;
        (scans >= before + reads).then_some(())
    })
    .await;
    assert_eq!(
        index_scans(&db.pool, "events_pkey").await,
        pkey_before,
        "a log read scanned the primary key"
    );
}

/// ANALYZE of the log (autovacuum's, after every tenth of it is new) takes CPU from the
/// appends, the relay and the projectors while it runs; statistics on the jsonb payload and
/// metadata were three quarters of it, and no statement filters by them. The columns the
/// log is read by keep theirs.
async fn statistics_of_the_log(db: &TestDb) {
    let (store, pool) = open_store(db).await;
    let service = commands(&store);
    for i in 0..50 {
        create(&service, Uuid::now_v7(), &format!("s{i}@example.com")).await;
    }
    sqlx::query("ANALYZE events")
        .execute(&pool)
        .await
        .expect("analyzing the log");
    let mut with_statistics: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_stats WHERE schemaname = current_schema() AND tablename = 'events'",
    )
    .fetch_all(&pool)
    .await
    .expect("reading the log's statistics");
    with_statistics.sort();
    assert_eq!(
        with_statistics,
        [
            "aggregate_id",
            "aggregate_type",
            "event_type",
            "global_position",
            "sequence",
            "transaction_id"
        ]
    );
    // The other tables' large columns, which hold too few rows here to show in `pg_stats`.
    let mut without: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname || '.' || a.attname FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid \
         WHERE c.relname IN ('snapshots', 'processed_commands') \
           AND c.relnamespace = current_schema()::regnamespace \
           AND a.attnum > 0 AND a.attstattarget = 0",
    )
    .fetch_all(&pool)
    .await
    .expect("reading the statistics targets");
    without.sort();
    assert_eq!(without, ["processed_commands.result", "snapshots.payload"]);
}
