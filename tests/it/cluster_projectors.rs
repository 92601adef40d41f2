//! The Kafka projectors against the real services: a projector killed between its view write
//! and its offset commit, duplicated and poison messages, and a blue-green rebuild while writes
//! and reads continue. Each ends by comparing both views with a fresh fold of the event log.

use crate::support::*;
use pcf::app::{Role, ALL_ROLES};
use pcf_domain::ports::{EventLog, LogQuery, PortError};
use pcf_domain::EventEnvelope;
use pcf_projectors::{
    consumer_lag, GenerationState, Progress, Projection, RebuildOptions, Scope, SqlUserViews,
    ViewBatch, ViewStore,
};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

on_cluster! {
    a_projector_killed_after_its_view_write_and_before_its_offset_commit_applies_nothing_twice:
        create => killed_mid_batch,
    duplicates_change_nothing_and_poison_messages_go_to_the_dead_letter_topic:
        create => duplicates_and_poison,
    a_rebuild_while_writes_and_reads_continue_switches_readers_without_a_partial_view:
        create => rebuild_under_load,
    an_event_in_the_log_that_cannot_be_applied_dead_letters_only_its_own_user:
        create => poison_in_the_log,
    a_live_batch_after_a_rebuild_began_reaches_the_new_generation_too:
        create => live_batch_after_begin,
    live_redis_writes_fold_on_what_they_wrote_and_recover_when_it_moved:
        create => remembered_documents,
    folded_states_fill_new_users_and_replace_only_older_views: create => states_over_existing_views,
    the_migration_drops_the_email_index_that_earlier_rebuilds_kept_twice:
        create => duplicate_email_index,
    a_rebuild_rides_out_failed_writes_and_ends_equal_to_the_log: create => rebuild_through_failures,
}

/// Waits until the log reads exactly `n` events (the first 100); returns them.
async fn readable_events(log: &Arc<dyn EventLog>, n: usize) -> Vec<EventEnvelope> {
    wait_until(CONVERGE, &format!("{n} readable events"), || {
        let log = log.clone();
        async move {
            let query = LogQuery {
                limit: 100,
                ..LogQuery::default()
            };
            let events = log.read(&query).await.map_err(|e| e.to_string())?;
            if events.len() == n {
                Ok(events)
            } else {
                Err(format!("{} events readable", events.len()))
            }
        }
    })
    .await
}

/// `(partition, next offset)` of a batch, as the projector records them.
fn next_offsets(records: &[Record]) -> Vec<(i32, i64)> {
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for r in records {
        let e = next.entry(r.partition).or_insert(r.offset + 1);
        *e = (*e).max(r.offset + 1);
    }
    next.into_iter().collect()
}

/// The offsets of a projection's consumer group: `(partition, committed, end)`.
async fn committed(c: &Cluster, projection: &str) -> Vec<(i32, Option<i64>, i64)> {
    let group = format!("{}{projection}", c.group_prefix);
    consumer_lag(&c.brokers, &c.topic, &group)
        .await
        .unwrap_or_else(|e| panic!("reading the offsets of {group}: {e}"))
        .into_iter()
        .map(|p| (p.partition, p.committed, p.high))
        .collect()
}

/// Waits until a projection's group has committed everything up to the partitions' ends.
async fn wait_committed_to_end(c: &Cluster, projection: &str) {
    wait_until(
        CONVERGE,
        &format!("{projection} to commit its offsets"),
        || async {
            let offsets = committed(c, projection).await;
            if offsets
                .iter()
                .all(|(_, committed, high)| *high == 0 || *committed == Some(*high))
            {
                Ok(())
            } else {
                Err(format!("{offsets:?}"))
            }
        },
    )
    .await;
}

async fn killed_mid_batch(c: &mut Cluster) {
    // Commands and the relay only: no projector consumes yet.
    let writer = c.start_default(&[Role::Api, Role::Relay]).await;
    let tag = c.tag().to_owned();
    let users = create_users(&writer.router, 6, |i| {
        (format!("crash{i}@{tag}.example.com"), format!("Crash {i}"))
    })
    .await;
    for (i, id) in users.iter().enumerate() {
        update_profile(
            &writer.router,
            *id,
            json!({ "displayName": format!("Crash {i} b"), "bio": "b" }),
        )
        .await;
        update_profile(
            &writer.router,
            *id,
            json!({ "displayName": format!("Crash {i} c") }),
        )
        .await;
    }
    change_email(
        &writer.router,
        users[1],
        &format!("crash1-new@{tag}.example.com"),
    )
    .await;
    delete_account(&writer.router, users[2]).await;
    let total = stored_event_ids(&c.pool).await.len();
    assert_eq!(total, 6 * 3 + 2);
    let mut tail = TopicTail::new(&c.brokers, &c.topic).await;
    tail.wait_for(CONVERGE, "every event in Kafka", |r| r.len() >= total)
        .await;

    // The crash: a member of each projector's group reads a batch, writes it to the view, and
    // dies before committing its offsets.
    let log = writer.log();
    let sql_views = SqlUserViews::new(c.pool.clone());
    let redis = c.redis_view(&shared_redis_url()).await;
    let views: [(&str, Arc<dyn ViewStore>); 2] = [
        ("users-sql", Arc::new(sql_views.clone())),
        ("users-redis", Arc::new(redis.views.clone())),
    ];
    const BATCH: usize = 11;
    for (projection, view) in &views {
        assert_eq!(view.name(), *projection);
        let group = format!("{}{projection}", c.group_prefix);
        let consumer = group_consumer(&c.brokers, &group, &c.topic);
        let mut batch = Vec::new();
        let deadline = Instant::now() + CONVERGE;
        while batch.len() < BATCH {
            assert!(
                Instant::now() < deadline,
                "the crash consumer read only {} messages",
                batch.len()
            );
            if let Ok(Ok(m)) =
                tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
            {
                batch.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: None,
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers: BTreeMap::new(),
                });
            }
        }
        let events: Vec<EventEnvelope> = batch
            .iter()
            .map(|r| r.envelope().expect("an envelope"))
            .collect();
        let active = view.state().await.expect("the view's state").active;
        Projection::new(view.clone(), log.clone())
            .with_opener(c.keys())
            .apply_to(active, &events, &next_offsets(&batch))
            .await
            .unwrap_or_else(|e| panic!("applying the batch to {projection}: {e}"));
        drop(consumer);
        let offsets = committed(c, projection).await;
        assert!(
            offsets.iter().all(|(_, committed, _)| committed.is_none()),
            "the crashed member committed offsets of {projection}: {offsets:?}"
        );
    }
    // The views hold the batch's effects and not yet the rest.
    let partial = c.sql_view().await;
    let applied: u64 = partial.values().map(|v| v.version).sum();
    assert_eq!(
        applied as usize, BATCH,
        "the SQL view holds exactly the crashed batch"
    );
    let docs = redis_docs(&redis).await.expect("the Redis view");
    assert_eq!(
        docs.users.values().map(|v| v.version).sum::<u64>() as usize,
        BATCH,
        "the Redis view holds exactly the crashed batch"
    );
    assert!(c.views_match_log(log.clone(), Some(&redis)).await.is_err());

    // One more change while no projector runs.
    update_profile(
        &writer.router,
        users[0],
        json!({ "bio": "after the crash" }),
    )
    .await;

    // The projector restarts: it reads the batch again from the last commit (none) and must
    // skip what the crashed member applied.
    let projector = c.start_default(&[Role::Api, Role::Projector]).await;
    c.wait_views_match_log(CONVERGE, projector.log(), Some(&redis))
        .await;
    let counts = c.event_counts().await;
    for (id, view) in c.sql_view().await {
        assert_eq!(view.version, counts[&id], "SQL version of {id}");
    }
    for (id, view) in redis_docs(&redis).await.expect("the Redis view").users {
        assert_eq!(view.version, counts[&id], "Redis version of {id}");
    }
    let u0 = user(&projector.router, users[0], Some(4)).await;
    assert_eq!(u0["bio"], "after the crash");
    assert_eq!(
        user(&projector.router, users[2], None).await,
        serde_json::Value::Null
    );
    // Offsets are committed after the writes.
    wait_committed_to_end(c, "users-sql").await;
    wait_committed_to_end(c, "users-redis").await;
}

async fn duplicates_and_poison(c: &mut Cluster) {
    let app = c.start_default(&ALL_ROLES).await;
    let tag = c.tag().to_owned();
    let u = create_user(&app.router, &format!("dup@{tag}.example.com"), "Dup").await;
    update_profile(
        &app.router,
        u,
        json!({ "displayName": "Dup 2", "bio": "two" }),
    )
    .await;
    let before = user(&app.router, u, Some(2)).await;
    let redis = c.redis_view(&shared_redis_url()).await;
    let log = app.log();
    c.wait_views_match_log(CONVERGE, log.clone(), Some(&redis))
        .await;
    let sql_before = c.sql_view().await[&u].clone();
    let redis_before = redis_docs(&redis).await.expect("Redis").users[&u].clone();

    let mut tail = TopicTail::new(&c.brokers, &c.topic).await;
    tail.wait_for(CONVERGE, "the user's events", |r| r.len() >= 2)
        .await;
    let first = tail
        .records
        .iter()
        .find(|r| r.envelope().is_some_and(|e| e.sequence == 1))
        .expect("the UserCreated message")
        .clone();
    let producer = producer(&c.brokers);
    let key = u.to_string();

    // A duplicate of an event already applied.
    let mut headers = OwnedHeaders::new();
    for (k, v) in &first.headers {
        headers = headers.insert(Header {
            key: k.as_str(),
            value: Some(v.as_bytes()),
        });
    }
    let dup = producer
        .send(
            FutureRecord::to(&c.topic)
                .key(&key)
                .payload(&first.payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .expect("producing the duplicate");
    assert_eq!(dup.partition, first.partition, "same key, same partition");
    for projection in pcf::app::PROJECTIONS {
        wait_until(
            CONVERGE,
            "the duplicate to be consumed and committed",
            || async {
                let offsets = committed(c, projection).await;
                match offsets.iter().find(|(p, _, _)| *p == dup.partition) {
                    Some((_, Some(o), _)) if *o > dup.offset => Ok(()),
                    other => Err(format!("{projection}: {other:?}")),
                }
            },
        )
        .await;
    }
    assert_eq!(
        c.sql_view().await[&u],
        sql_before,
        "the duplicate changed the SQL view"
    );
    assert_eq!(
        redis_docs(&redis).await.expect("Redis").users[&u],
        redis_before,
        "the duplicate changed the Redis view"
    );
    let after = user(&app.router, u, None).await;
    assert_eq!(after, before);

    // Poison: bytes that are not JSON, and an envelope whose payload is not the event's.
    let garbage: &[u8] = b"\x00\xffthis is not an event envelope";
    let mut bad: serde_json::Value = serde_json::from_slice(&first.payload).expect("JSON");
    bad["eventId"] = json!(Uuid::new_v4());
    bad["sequence"] = json!(3);
    bad["eventType"] = json!("ProfileUpdated");
    bad["payload"] = json!({ "displayName": 42, "occurredAt": "yesterday" });
    let bad = serde_json::to_vec(&bad).expect("JSON");
    assert!(
        serde_json::from_slice::<EventEnvelope>(&bad).is_ok_and(|e| e.event().is_err()),
        "the second poison must be an envelope whose payload does not decode"
    );
    for payload in [garbage, bad.as_slice()] {
        producer
            .send(
                FutureRecord::to(&c.topic).key(&key).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .expect("producing a poison message");
    }
    // A later valid event of the same user, in the same partition after the poison.
    let v = update_profile(&app.router, u, json!({ "displayName": "Dup 3" })).await;
    assert_eq!(v, 3);
    let later = user(&app.router, u, Some(3)).await;
    assert_eq!(later["displayName"], "Dup 3");
    c.wait_views_match_log(CONVERGE, log.clone(), Some(&redis))
        .await;

    // Each projection dead-lettered both poison messages, with the error, and nothing else.
    let mut dlq = TopicTail::new(&c.brokers, &format!("{}.dlq", c.topic)).await;
    dlq.wait_for(CONVERGE, "four dead letters", |r| r.len() >= 4)
        .await;
    dlq.drain_for(Duration::from_millis(500)).await;
    let mut seen: BTreeSet<(String, Vec<u8>)> = BTreeSet::new();
    for r in &dlq.records {
        let error = r
            .headers
            .get("error")
            .unwrap_or_else(|| panic!("no error header: {r:?}"));
        assert!(!error.is_empty(), "{r:?}");
        assert_eq!(r.key.as_deref(), Some(key.as_str()));
        let group = r.headers.get("consumerGroup").cloned().unwrap_or_default();
        assert!(
            r.payload == garbage || r.payload == bad,
            "an unexpected dead letter: {r:?}"
        );
        assert!(
            seen.insert((group, r.payload.clone())),
            "dead-lettered twice: {r:?}"
        );
    }
    let expected: BTreeSet<(String, Vec<u8>)> = pcf::app::PROJECTIONS
        .iter()
        .flat_map(|p| {
            let group = format!("{}{p}", c.group_prefix);
            [(group.clone(), garbage.to_vec()), (group, bad.clone())]
        })
        .collect();
    assert_eq!(seen, expected);
    let metrics = get(&app.router, "/metrics").await.text;
    for p in pcf::app::PROJECTIONS {
        let line = format!("pcf_projector_dead_letters_total{{projection=\"{p}\"}} 2");
        assert!(metrics.contains(&line), "{line} not in metrics:\n{metrics}");
    }
}

/// What the readers saw during the rebuild.
#[derive(Default)]
struct Reads {
    ok: AtomicU64,
    bad: Mutex<Vec<String>>,
}

async fn rebuild_under_load(c: &mut Cluster) {
    let app = c.start_default(&ALL_ROLES).await;
    let sql = c.start_sql_reader().await;
    let tag = c.tag().to_owned();

    // Users that exist before the rebuild, at known versions.
    let ids = create_users(&app.router, 24, |i| {
        (format!("seed{i}@{tag}.example.com"), format!("Seed {i}"))
    })
    .await;
    let mut seeded: Vec<(Uuid, i64)> = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        let mut version = 1;
        if i % 2 == 0 {
            version = update_profile(&app.router, id, json!({ "bio": format!("seed {i}") })).await;
        }
        seeded.push((id, version));
    }
    for (id, version) in &seeded {
        user(&app.router, *id, Some(*version)).await;
        user(&sql.router, *id, Some(*version)).await;
    }
    let seeded = Arc::new(seeded);
    let stop = Arc::new(AtomicBool::new(false));

    // Writers: new users and profile updates, all the time.
    let writes = Arc::new(AtomicU64::new(0));
    let write_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (router, seeded, stop, writes, errors) = (
            app.router.clone(),
            seeded.clone(),
            stop.clone(),
            writes.clone(),
            write_errors.clone(),
        );
        let tag = tag.clone();
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let result = if i.is_multiple_of(3) {
                    try_gql(
                        &router,
                        CREATE_USER,
                        json!({ "input": { "email": format!("during{i}@{tag}.example.com"), "displayName": format!("During {i}") } }),
                    )
                    .await
                } else {
                    let (id, _) = seeded[i % seeded.len()];
                    try_gql(
                        &router,
                        UPDATE_PROFILE,
                        json!({ "id": id, "input": { "displayName": format!("Seed write {i}") } }),
                    )
                    .await
                };
                match result {
                    Ok(_) => {
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(body) => errors.lock().unwrap().push(body.to_string()),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Readers: point reads of the seeded users from Redis and from the replica.
    let mut readers = Vec::new();
    for (label, router) in [
        ("redis", app.router.clone()),
        ("replica", sql.router.clone()),
    ] {
        let reads = Arc::new(Reads::default());
        let (seeded, stop, r) = (seeded.clone(), stop.clone(), reads.clone());
        readers.push((
            label,
            reads,
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let (id, version) = seeded[i % seeded.len()];
                    match try_gql(&router, USER, json!({ "id": id })).await {
                        Ok(data) if data["user"]["version"].as_i64().is_some_and(|v| v >= version) => {
                            r.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(data) => r.bad.lock().unwrap().push(format!(
                            "{label}: user {id} (at version {version} before the rebuild) read as {}",
                            data["user"]
                        )),
                        Err(body) => r.bad.lock().unwrap().push(format!("{label}: {body}")),
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }),
        ));
    }

    // An index a later migration might add to the first generation, the template of the others.
    sqlx::query("CREATE INDEX read_users_g1_updated ON read_users_g1 (updated_at)")
        .execute(&c.pool)
        .await
        .expect("an index on the first generation");
    let log = app.log();
    let options = RebuildOptions {
        batch_size: 7,
        linger: Duration::from_secs(1),
    };
    let sql_views: Arc<dyn ViewStore> = Arc::new(SqlUserViews::new(c.pool.clone()));
    let redis = c.redis_view(&shared_redis_url()).await;
    let redis_views: Arc<dyn ViewStore> = Arc::new(redis.views.clone());
    let sql_projection = Projection::new(sql_views.clone(), log.clone()).with_opener(c.keys());
    let redis_projection = Projection::new(redis_views.clone(), log.clone()).with_opener(c.keys());
    let writes_before = writes.load(Ordering::Relaxed);
    let reads_before: Vec<u64> = readers
        .iter()
        .map(|(_, r, _)| r.ok.load(Ordering::Relaxed))
        .collect();
    let progress = |_: Progress| {};
    let started = Instant::now();
    let (g_sql, g_redis) = tokio::join!(
        sql_projection.rebuild(&options, &progress),
        redis_projection.rebuild(&options, &progress),
    );
    let took = started.elapsed();
    let (g_sql, g_redis) = (
        g_sql.expect("the SQL rebuild"),
        g_redis.expect("the Redis rebuild"),
    );
    assert_eq!(g_sql.set_aside, [], "the SQL rebuild set events aside");
    assert_eq!(g_redis.set_aside, [], "the Redis rebuild set events aside");
    assert_eq!((g_sql.generations[0], g_redis.generations[0]), (2, 2));
    let writes_during = writes.load(Ordering::Relaxed) - writes_before;
    // Writes go on a little after the switch too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("the writer task");
    let mut reads_during = Vec::new();
    for ((label, reads, task), before) in readers.into_iter().zip(reads_before) {
        task.await.expect("a reader task");
        let bad = reads.bad.lock().unwrap().clone();
        assert!(
            bad.is_empty(),
            "{label} readers saw a partial view: {bad:#?}"
        );
        reads_during.push((label, reads.ok.load(Ordering::Relaxed) - before));
    }
    let errors = write_errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "writes failed during the rebuild: {errors:#?}"
    );
    eprintln!("rebuild took {took:?}; {writes_during} writes and reads {reads_during:?} meanwhile");
    assert!(
        writes_during > 10,
        "too few writes overlapped the rebuild: {writes_during}"
    );
    for (label, n) in &reads_during {
        assert!(*n > 10, "too few {label} reads overlapped the rebuild: {n}");
    }

    for view in [&sql_views, &redis_views] {
        let state = view.state().await.expect("state");
        assert_eq!((state.active, state.building), (2, None), "{}", view.name());
    }
    // The new generation has the first one's indexes, each once, and all usable.
    let indexes: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, i.indisvalid FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = $1::regclass ORDER BY 1",
    )
    .bind("read_users_g2")
    .fetch_all(&c.pool)
    .await
    .expect("the new generation's indexes");
    assert_eq!(
        indexes,
        vec![
            ("read_users_g2_email".to_owned(), true),
            ("read_users_g2_pkey".to_owned(), true),
            ("read_users_g2_updated".to_owned(), true),
        ]
    );
    c.wait_views_match_log(CONVERGE, log, Some(&redis)).await;
}

/// Appends one event row directly, in a transaction of its own.
async fn insert_event(
    c: &Cluster,
    user: Uuid,
    sequence: i64,
    event_type: &str,
    payload: serde_json::Value,
) -> Uuid {
    let (event_id,): (Uuid,) = sqlx::query_as(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('User', $1, $2, $3, '1', $4, '{}') RETURNING event_id",
    )
    .bind(user.to_string())
    .bind(sequence)
    .bind(event_type)
    .bind(payload)
    .fetch_one(&c.pool)
    .await
    .expect("inserting an event");
    event_id
}

async fn poison_in_the_log(c: &mut Cluster) {
    // One partition, so the batch order is the log's order.
    let mut config = c.config();
    config.kafka_partitions = 1;
    let writer = c.start(&config, &[Role::Api, Role::Relay]).await;
    let tag = c.tag().to_owned();
    let now = chrono::Utc::now();

    // P: created normally; its second event is in the log but cannot be read as a
    // ProfileUpdated (a corrupt row, or one written by a newer version); a third follows.
    let p = create_user(&writer.router, &format!("p@{tag}.example.com"), "P").await;
    let p2 = insert_event(
        c,
        p,
        2,
        "ProfileUpdated",
        json!({ "ProfileUpdated": { "displayName": 42, "occurredAt": now } }),
    )
    .await;
    // Q: a valid user of its own, in the same batch.
    let q = create_user(&writer.router, &format!("q@{tag}.example.com"), "Q").await;
    let p3 = insert_event(
        c,
        p,
        3,
        "ProfileUpdated",
        json!({ "ProfileUpdated": { "displayName": "P three", "bio": null, "avatarUrl": null, "occurredAt": now } }),
    )
    .await;
    let mut tail = TopicTail::new(&c.brokers, &c.topic).await;
    tail.wait_for(CONVERGE, "the four events in Kafka", |r| r.len() >= 4)
        .await;

    // The projectors start on the whole topic.
    let projector = c.start(&config, &[Role::Api, Role::Projector]).await;
    let mut dlq = TopicTail::new(&c.brokers, &format!("{}.dlq", c.topic)).await;
    wait_committed_to_end(c, "users-sql").await;
    wait_committed_to_end(c, "users-redis").await;
    dlq.drain_for(Duration::from_secs(1)).await;

    let dead: BTreeSet<(String, Uuid)> = dlq
        .records
        .iter()
        .map(|r| {
            let e = r
                .envelope()
                .unwrap_or_else(|| panic!("a dead letter that is not an envelope: {r:?}"));
            (
                r.headers.get("consumerGroup").cloned().unwrap_or_default(),
                e.event_id,
            )
        })
        .collect();
    let sql = c.sql_view().await;
    let redis = c.redis_view(&shared_redis_url()).await;
    let docs = redis_docs(&redis).await.expect("the Redis view").users;
    let versions = |v: &BTreeMap<Uuid, pcf_domain::UserView>| {
        [("P", p), ("Q", q)].map(|(n, id)| (n, v.get(&id).map(|u| u.version)))
    };
    eprintln!(
        "dead letters {:?}; SQL view {:?}; Redis view {:?}",
        dead.iter()
            .map(|(g, e)| (g.rsplit('-').next().unwrap_or_default().to_owned(), *e))
            .collect::<Vec<_>>(),
        versions(&sql),
        versions(&docs)
    );
    for (what, view) in [("SQL", &sql), ("Redis", &docs)] {
        assert_eq!(
            view.get(&q).map(|v| v.version),
            Some(1),
            "{what} view of Q: {view:?}"
        );
        assert_eq!(
            view.get(&p).map(|v| v.version),
            Some(1),
            "{what} view of P: {view:?}"
        );
    }
    // Only P's unreadable event and the one after it (which needs it) are set aside, by
    // each projection; P's first event and Q's are applied.
    let expected: BTreeSet<(String, Uuid)> = pcf::app::PROJECTIONS
        .iter()
        .flat_map(|proj| {
            let group = format!("{}{proj}", c.group_prefix);
            [(group.clone(), p2), (group, p3)]
        })
        .collect();
    assert_eq!(dead, expected, "dead letters (consumer group, event id)");
    assert_eq!(
        user(&projector.router, q, Some(1)).await["displayName"],
        "Q"
    );
}

/// Live batches and `begin` are a handshake: a batch written after a build began reaches
/// the new generation as well, even from a projector that last saw the state before it
/// (the Redis writer keeps the state it last found; the script refuses the stale one).
async fn live_batch_after_begin(c: &mut Cluster) {
    let node = c.start_default(&[Role::Api]).await;
    let tag = c.tag().to_owned();
    let a = create_user(&node.router, &format!("a-{tag}@example.com"), "A").await;
    let b = create_user(&node.router, &format!("b-{tag}@example.com"), "B").await;
    update_profile(&node.router, a, json!({ "displayName": "A2" })).await;
    update_profile(&node.router, b, json!({ "displayName": "B2" })).await;
    let log = node.log();
    let events = readable_events(&log, 4).await;
    // Created a, created b | updated a, updated b.
    let (before, after) = events.split_at(2);
    let redis = c.redis_view(&shared_redis_url()).await.views;
    let sql = SqlUserViews::new(c.pool.clone());
    let views: [Arc<dyn ViewStore>; 2] = [Arc::new(redis.clone()), Arc::new(sql)];
    for view in &views {
        let projection = Projection::new(view.clone(), log.clone()).with_opener(c.keys());
        projection
            .apply_live(before, &[(0, 2)])
            .await
            .unwrap_or_else(|e| panic!("{}: the first batch: {e}", view.name()));
        view.begin(2)
            .await
            .unwrap_or_else(|e| panic!("{}: begin: {e}", view.name()));
        projection
            .apply_live(after, &[(0, 4)])
            .await
            .unwrap_or_else(|e| panic!("{}: the batch after begin: {e}", view.name()));
    }
    let expected = [(a, "A2"), (b, "B2")];
    for generation in [1, 2] {
        for (id, name) in expected {
            let doc = redis
                .document(generation, id)
                .await
                .expect("reading Redis")
                .unwrap_or_else(|| panic!("Redis generation {generation} lacks user {id}"));
            assert_eq!(
                (doc.version, doc.display_name.as_str()),
                (2, name),
                "Redis generation {generation}"
            );
        }
        let rows = sql_rows(&c.pool, &format!("read_users_g{generation}")).await;
        for (id, name) in expected {
            let row = rows
                .get(&id)
                .unwrap_or_else(|| panic!("SQL generation {generation} lacks user {id}"));
            assert_eq!(
                (row.version, row.display_name.as_str()),
                (2, name),
                "SQL generation {generation}"
            );
        }
    }
}

/// The Redis projector folds a batch on the documents it wrote last instead of reading
/// them back; a document another writer moved meanwhile (another consumer, a generation
/// dropped behind it) is refused by the version guard and read again.
async fn remembered_documents(c: &mut Cluster) {
    let node = c.start_default(&[Role::Api]).await;
    let tag = c.tag().to_owned();
    let email = format!("m-{tag}@example.com");
    let moved_to = format!("m2-{tag}@example.com");
    let a = create_user(&node.router, &email, "M").await;
    update_profile(&node.router, a, json!({ "bio": "first" })).await;
    update_profile(&node.router, a, json!({ "displayName": "M3" })).await;
    update_profile(&node.router, a, json!({ "displayName": "M4" })).await;
    change_email(&node.router, a, &moved_to).await;
    let log = node.log();
    let events = readable_events(&log, 5).await;
    let redis_view = c.redis_view(&shared_redis_url()).await;
    let redis = redis_view.views.clone();
    let offsets = [(0, 5)];
    // The projector under test, and another consumer's (another process) below.
    let projection = Projection::new(Arc::new(redis.clone()), log.clone()).with_opener(c.keys());
    let stored = |redis: pcf_projectors::RedisUserViews| async move {
        redis
            .document(1, a)
            .await
            .expect("reading Redis")
            .expect("a document")
    };
    // Applies `events[range]` as one live batch of the projector under test.
    let apply = async |range: Range<usize>, what: &str| {
        projection
            .apply_live(&events[range], &offsets)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    };
    apply(0..1, "v1").await;
    // Changed behind the projector's back at the same version (no writer does that): the
    // next batch folds on what the projector wrote, so the change stays unseen. This is
    // how the test sees that the document was not read back.
    let key = pcf_domain::read_model::redis_user_key(&redis_view.prefix, 1, a);
    let mut tampered = stored(redis.clone()).await;
    tampered.email = format!("tampered-{tag}@example.com");
    let mut conn = redis_conn(&redis_view.url).await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(serde_json::to_string(&tampered).unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    apply(1..2, "v2").await;
    let doc = stored(redis.clone()).await;
    assert_eq!(
        (doc.version, doc.email.as_str(), doc.bio.as_deref()),
        (2, email.as_str(), Some("first")),
        "v2 folded on the document the projector wrote"
    );
    // Another consumer (another process) moves the user on to v3; this projector then gets
    // v3 again with v4: its remembered v2 is refused, and it reads what is stored.
    let other = c.redis_view(&shared_redis_url()).await.views;
    Projection::new(Arc::new(other.clone()), log.clone())
        .with_opener(node.keys.clone())
        .apply_live(&events[2..3], &offsets)
        .await
        .expect("v3 elsewhere");
    apply(2..4, "v3, v4").await;
    let doc = stored(redis.clone()).await;
    assert_eq!((doc.version, doc.display_name.as_str()), (4, "M4"));
    // The generation is dropped behind its back: the remembered v4 is refused again, and
    // the user is folded from the log.
    other
        .drop_generation(1)
        .await
        .expect("dropping generation 1");
    apply(4..5, "v5").await;
    let docs = redis_docs(&redis_view)
        .await
        .expect("reading the Redis view");
    let doc = &docs.users[&a];
    assert_eq!(
        (
            doc.version,
            doc.display_name.as_str(),
            doc.email.as_str(),
            doc.bio.as_deref()
        ),
        (5, "M4", moved_to.as_str(), Some("first"))
    );
    assert_eq!(docs.emails, BTreeMap::from([(moved_to, a)]));
}

/// A rebuild's writes of folded states: users without a view get theirs at once, an
/// existing view is replaced only by a newer state (its email entry moved, a tombstone's
/// removed), and an older state changes nothing. A new user whose email's entry still
/// names the user who had it before gets the entry. Thousands of users at once are written
/// in several pipelines, each user's outcome kept with its user.
async fn states_over_existing_views(c: &mut Cluster) {
    // A node without projectors: it migrates the database, and only this test writes.
    let node = c.start_default(&[Role::Api]).await;
    let tag = c.tag().to_owned();
    let now = micros(chrono::Utc::now());
    let state = |id: Uuid, email: &str, version: u64, deleted: bool| pcf_domain::UserView {
        id,
        email: format!("{email}@{tag}.example.com"),
        display_name: format!("{email} at {version}"),
        bio: None,
        avatar_url: None,
        created_at: now,
        updated_at: now,
        version,
        deleted,
    };
    let (a, b, d, e) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    let first = [
        state(a, "a1", 2, false),
        state(b, "b1", 3, false),
        state(d, "d1", 1, false),
    ];
    let second = [
        state(a, "a0", 1, false),
        state(e, "b1", 1, false),
        state(b, "b2", 5, false),
        state(d, "d1", 2, true),
    ];
    // More users than one pipeline of a rebuild's fill carries, the last one deleted; in
    // later pipelines, two users stored already: one folded to an older version than the
    // view's (it stays), one to a newer (it replaces the view's, email entry and all).
    let mut many: Vec<pcf_domain::UserView> = (0..4_500)
        .map(|i| state(Uuid::now_v7(), &format!("m{i}"), 1, i == 4_499))
        .collect();
    many[2_500] = state(b, "b0", 4, false);
    many[4_100] = state(a, "a9", 9, false);
    // Then all of them again, a version later, b's still older than its view's: every one
    // is stored, so all go the guarded way, in several pipelines.
    let again: Vec<pcf_domain::UserView> = many
        .iter()
        .map(|m| pcf_domain::UserView {
            display_name: format!("{} again", m.display_name),
            version: m.version + 1,
            ..m.clone()
        })
        .collect();
    let expected: BTreeMap<Uuid, pcf_domain::UserView> =
        [second[1].clone(), second[2].clone(), second[3].clone()]
            .into_iter()
            .chain(again.iter().filter(|m| m.id != b).cloned())
            .map(|v| (v.id, v))
            .collect();
    let sql: Arc<dyn ViewStore> = Arc::new(SqlUserViews::new(c.pool.clone()));
    let redis = c.redis_view(&shared_redis_url()).await;
    let redis_views: Arc<dyn ViewStore> = Arc::new(redis.views.clone());
    for view in [sql, redis_views] {
        let projection = Projection::new(view, node.log());
        for (states, what) in [
            (&first[..], "the first states"),
            (&second[..], "the second states"),
            (&many[..], "many new users"),
            (&again[..], "many users again"),
        ] {
            projection.write_states(1, states).await.expect(what);
        }
    }
    assert_eq!(sql_rows(&c.pool, "read_users_g1").await, expected);
    let docs = redis_docs(&redis).await.expect("the Redis view");
    assert_eq!(docs.users, expected);
    let emails: BTreeMap<String, Uuid> = [
        (format!("b2@{tag}.example.com"), b),
        (format!("b1@{tag}.example.com"), e),
    ]
    .into_iter()
    .chain(
        many.iter()
            .filter(|m| !m.deleted && m.id != b)
            .map(|m| (m.email.clone(), m.id)),
    )
    .collect();
    assert_eq!(docs.emails, emails);
}

/// A generation as rebuilds made it before: the email index copied from the first
/// generation and made again by name. Migration 0004 leaves one, and leaves a table that
/// has only the copy as it is.
async fn duplicate_email_index(c: &mut Cluster) {
    let _node = c.start_default(&[Role::Api]).await;
    for sql in [
        "CREATE TABLE read_users_g7 (LIKE read_users_g1 INCLUDING ALL)",
        "CREATE INDEX read_users_g7_email ON read_users_g7 (email) WHERE NOT deleted",
        "CREATE TABLE read_users_g8 (LIKE read_users_g1 INCLUDING ALL)",
    ] {
        sqlx::query(sql).execute(&c.pool).await.expect(sql);
    }
    let indexes = |table: &'static str| {
        let pool = c.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT indexrelid::regclass::text FROM pg_index \
                 WHERE indrelid = $1::regclass ORDER BY 1",
            )
            .bind(table)
            .fetch_all(&pool)
            .await
            .expect("a table's indexes")
        }
    };
    assert_eq!(
        indexes("read_users_g7").await,
        [
            "read_users_g7_email",
            "read_users_g7_email_idx",
            "read_users_g7_pkey"
        ]
    );
    sqlx::raw_sql(include_str!(
        "../../migrations/postgres/0004_one_email_index_per_generation.sql"
    ))
    .execute(&c.pool)
    .await
    .expect("migration 0004");
    assert_eq!(
        indexes("read_users_g7").await,
        ["read_users_g7_email", "read_users_g7_pkey"]
    );
    assert_eq!(
        indexes("read_users_g8").await,
        ["read_users_g8_email_idx", "read_users_g8_pkey"]
    );
}

/// The SQL view whose first `failures` batches of one generation fail to open (a rebuild
/// opens one per page), as when its database restarts or a live projector's transaction
/// deadlocks with the rebuild's.
struct Flaky {
    inner: SqlUserViews,
    failures: AtomicU64,
}

#[async_trait::async_trait]
impl ViewStore for Flaky {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn batch_wait(&self) -> Option<Duration> {
        self.inner.batch_wait()
    }
    async fn state(&self) -> Result<GenerationState, PortError> {
        self.inner.state().await
    }
    async fn begin(&self, generation: u64) -> Result<(), PortError> {
        self.inner.begin(generation).await
    }
    async fn switch(&self, generation: u64) -> Result<(), PortError> {
        self.inner.switch(generation).await
    }
    async fn drop_generation(&self, generation: u64) -> Result<(), PortError> {
        self.inner.drop_generation(generation).await
    }
    async fn open(&self, scope: Scope) -> Result<Box<dyn ViewBatch + '_>, PortError> {
        if let Scope::Generation(_) = scope {
            let left = self.failures.load(Ordering::SeqCst);
            if left > 0 {
                self.failures.store(left - 1, Ordering::SeqCst);
                return Err(PortError::Unavailable(
                    "the view's database restarts".into(),
                ));
            }
        }
        self.inner.open(scope).await
    }
}

/// A rebuild whose page writes fail twice finishes, and its generation holds every user
/// as a fold of the log gives it.
async fn rebuild_through_failures(c: &mut Cluster) {
    let node = c.start_default(&[Role::Api]).await;
    let tag = c.tag().to_owned();
    let mut ids = Vec::new();
    for i in 0..6 {
        let id = create_user(&node.router, &format!("f{i}-{tag}@example.com"), "F").await;
        update_profile(&node.router, id, json!({ "displayName": format!("F{i}") })).await;
        ids.push(id);
    }
    let log = node.log();
    readable_events(&log, 12).await;
    let flaky = Arc::new(Flaky {
        inner: SqlUserViews::new(c.pool.clone()),
        failures: AtomicU64::new(2),
    });
    let options = RebuildOptions {
        batch_size: 4,
        linger: Duration::from_millis(10),
    };
    let rebuilt = Projection::new(flaky.clone(), log.clone())
        .with_opener(c.keys())
        .rebuild(&options, &|_| {})
        .await
        .expect("the rebuild rides out two failed writes");
    assert_eq!(rebuilt.set_aside, [], "the rebuild set events aside");
    let generation = rebuilt.generations[0];
    assert_eq!(
        flaky.failures.load(Ordering::SeqCst),
        0,
        "both failures happened"
    );
    let rows = sql_rows(&c.pool, &format!("read_users_g{generation}")).await;
    for (i, id) in ids.iter().enumerate() {
        let row = rows
            .get(id)
            .unwrap_or_else(|| panic!("the rebuilt generation lacks user {id}"));
        assert_eq!(
            (row.version, row.display_name.as_str()),
            (2, format!("F{i}").as_str())
        );
    }
}
