//! The Redis view, its readers and the rate limiter on a real Redis Cluster (the seeds in
//! `PCF_TEST_REDIS_CLUSTER_URL`, e.g. `scripts/services.sh up --ha`): live projection equals
//! a rebuild, email moves and deletions leave the right lookups, a rebuild switches while
//! live writes go on, the old generation is deleted on every primary, and a write cut off
//! between its document and its email entries is repaired when the user is written again.
//! Skipped (with a note) when `PCF_TEST_REDIS_CLUSTER_URL` is unset.

use crate::support::*;
use pcf::app::{Role, ALL_ROLES};
use pcf::http::ratelimit::{Decision, RateLimiter};
use pcf_adapters::redis::RedisConnection;
use pcf_domain::auth::Principal;
use pcf_domain::ports::{EventLog, LogQuery, UserReader};
use pcf_domain::read_model::{
    redis_active_key, redis_building_key, redis_generation_pattern, redis_prefix_pattern,
    redis_user_key, user_bucket, REDIS_BUCKETS,
};
use pcf_domain::{Email, EventEnvelope, UserView};
use pcf_projectors::{Projection, RebuildOptions, RedisUserViews, ViewStore};
use pcf_query::RedisUserReader;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// The cluster's seeds, or `None` (and a note) when the tests are to be skipped.
fn cluster_url(test: &str) -> Option<String> {
    match std::env::var("PCF_TEST_REDIS_CLUSTER_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            eprintln!(
                "{test}: skipped, PCF_TEST_REDIS_CLUSTER_URL is unset (scripts/services.sh up --ha starts a cluster)"
            );
            None
        }
    }
}

macro_rules! on_redis_cluster {
    ($($test:ident => $scenario:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            let Some(url) = cluster_url(stringify!($test)) else {
                return;
            };
            run(Cluster::create().await, async |c: &mut Cluster| {
                let view = cluster_view(c, &url).await;
                let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
                    $scenario(c, &view, &url),
                ))
                .await;
                delete_cluster_keys(&view).await;
                if let Err(panic) = outcome {
                    std::panic::resume_unwind(panic);
                }
            })
            .await;
        }
    )*};
}

on_redis_cluster! {
    redis_cluster_live_projection_equals_a_rebuild_and_lookups_follow_email_moves => live_equals_rebuild,
    redis_cluster_rebuild_switches_while_live_writes_go_on_and_drops_the_old_generation => rebuild_under_live_writes,
    redis_cluster_a_write_cut_off_before_its_email_step_is_repaired_on_replay => repaired_on_replay,
    redis_cluster_the_product_runs_on_the_cluster_seeds => product_on_the_cluster,
    redis_cluster_the_view_follows_a_failover_of_a_primary => follows_a_failover,
    redis_cluster_a_live_batch_with_a_stale_state_is_refused_in_every_bucket_and_redone => stale_state_redone,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_rate_limiter_counts_in_the_cluster() {
    let Some(url) = cluster_url("redis_cluster_rate_limiter_counts_in_the_cluster") else {
        return;
    };
    let conn = RedisConnection::connect(&url, Default::default())
        .await
        .expect("connecting to the cluster");
    assert!(conn.is_cluster());
    let prefix = format!("pcf:test:{}", Uuid::new_v4().simple());
    let limits = pcf::config::RateLimits {
        anonymous: 5,
        ..Default::default()
    };
    // Two instances share the count.
    let one = RateLimiter::new(limits, Some((conn.clone(), prefix.clone())));
    let two = RateLimiter::new(limits, Some((conn.clone(), prefix.clone())));
    let anonymous = Principal::anonymous();
    let mut allowed = 0;
    for i in 0..12 {
        let limiter = if i % 2 == 0 { &one } else { &two };
        if limiter.check(&anonymous, "192.0.2.7").await == Decision::Allowed {
            allowed += 1;
        }
    }
    let _ = pcf_projectors::delete_matching(&conn, &format!("{prefix}:*")).await;
    assert_eq!(
        allowed, 5,
        "five requests in the window, counted across instances"
    );
}

/// The test's Redis view on the cluster (its prefix is the fixture's).
async fn cluster_view(c: &Cluster, url: &str) -> RedisView {
    let views = RedisUserViews::connect(url, c.redis_prefix.clone())
        .await
        .unwrap_or_else(|e| panic!("connecting to the Redis Cluster at {url}: {e}"));
    assert!(views.connection().is_cluster(), "{url} is not a cluster");
    RedisView {
        views,
        url: url.to_owned(),
        prefix: c.redis_prefix.clone(),
    }
}

async fn delete_cluster_keys(view: &RedisView) {
    let conn = view.views.connection();
    for pattern in [
        redis_prefix_pattern(&view.prefix),
        format!("{}:*", view.prefix),
    ] {
        if let Err(e) = pcf_projectors::delete_matching(conn, &pattern).await {
            eprintln!("could not delete the test's cluster keys {pattern}: {e}");
        }
    }
}

/// Every event of the log once `n` are readable, in log order.
async fn all_events(log: &Arc<dyn EventLog>, n: usize) -> Vec<EventEnvelope> {
    wait_until(CONVERGE, &format!("{n} readable events"), || {
        let log = log.clone();
        async move {
            let query = LogQuery {
                limit: 10_000,
                ..LogQuery::default()
            };
            let events = log.read(&query).await.map_err(|e| e.to_string())?;
            if events.len() == n {
                Ok(events)
            } else {
                Err(format!("{} of {n} events readable", events.len()))
            }
        }
    })
    .await
}

/// The Redis view equals the fold of the log: documents, and the email index as readers see
/// it; and the readers answer every user by id and by email as the fold says.
async fn matches_log(
    c: &Cluster,
    log: Arc<dyn EventLog>,
    view: &RedisView,
    reader: &RedisUserReader,
) -> Result<(), String> {
    let expected = c.expected_views(log).await?;
    compare_redis_view("Redis view on the cluster", &expected, view).await?;
    for v in expected.values() {
        let by_id = reader.user(v.id).await.map_err(|e| e.to_string())?;
        if by_id.as_ref().map(|u| u.version) != Some(v.version) {
            return Err(format!("user({}) read {by_id:?}", v.id));
        }
        if v.deleted {
            // A tombstone has no email; its former address is checked as another's or none.
            continue;
        }
        let email = Email::parse(&v.email).map_err(|e| format!("{}: {e:?}", v.email))?;
        let by_email = reader
            .user_by_email(&email)
            .await
            .map_err(|e| e.to_string())?;
        let want = Some(v.id);
        if by_email.as_ref().map(|u| u.id) != want {
            return Err(format!(
                "userByEmail({}) read {by_email:?}, want {want:?}",
                v.email
            ));
        }
    }
    let ids: Vec<Uuid> = expected.keys().copied().collect();
    let many = reader.users(&ids).await.map_err(|e| e.to_string())?;
    if many.len() != ids.len() || many.iter().zip(&ids).any(|(u, id)| u.id != *id) {
        return Err(format!("users(ids) read {} of {}", many.len(), ids.len()));
    }
    Ok(())
}

/// Commands over many buckets: creations, profile edits, an email swap between two users
/// (through a third address), email changes and deletions. Returns the users and how many
/// events the log holds.
async fn commands(node: &Node, tag: &str, users: usize) -> (Vec<Uuid>, usize) {
    let mut ids = Vec::new();
    let mut events = 0;
    for i in 0..users {
        ids.push(create_user(&node.router, &format!("u{i}-{tag}@example.com"), "U").await);
        events += 1;
    }
    for (i, id) in ids.iter().enumerate().step_by(3) {
        update_profile(&node.router, *id, json!({ "bio": format!("bio {i}") })).await;
        events += 1;
    }
    // A and B swap addresses.
    let (a, b) = (ids[0], ids[1]);
    change_email(&node.router, a, &format!("swap-{tag}@example.com")).await;
    change_email(&node.router, b, &format!("u0-{tag}@example.com")).await;
    change_email(&node.router, a, &format!("u1-{tag}@example.com")).await;
    events += 3;
    for (i, id) in ids.iter().enumerate().skip(2).step_by(5) {
        change_email(&node.router, *id, &format!("moved{i}-{tag}@example.com")).await;
        events += 1;
    }
    for id in ids.iter().skip(4).step_by(7) {
        delete_account(&node.router, *id).await;
        events += 1;
    }
    // A deleted user's address taken by another.
    change_email(&node.router, ids[3], &format!("u4-{tag}@example.com")).await;
    events += 1;
    (ids, events)
}

async fn live_equals_rebuild(c: &mut Cluster, view: &RedisView, url: &str) {
    let node = c.start_default(&[Role::Api]).await;
    let tag = c.tag().to_owned();
    let (ids, n) = commands(&node, &tag, 40).await;
    let buckets: std::collections::BTreeSet<u32> = ids.iter().map(|id| user_bucket(*id)).collect();
    assert!(buckets.len() > 10, "users spread over buckets: {buckets:?}");
    let log = node.log();
    let events = all_events(&log, n).await;
    let projection =
        Projection::new(Arc::new(view.views.clone()), log.clone()).with_opener(c.keys());
    for (i, batch) in events.chunks(9).enumerate() {
        projection
            .apply_live(batch, &[(0, i as i64 + 1)])
            .await
            .unwrap_or_else(|e| panic!("live batch {i}: {e}"));
    }
    // Connected on first use, as the server's reader is.
    let reader =
        RedisUserReader::connect_lazily(url, view.prefix.clone()).expect("a reader of the cluster");
    matches_log(c, log.clone(), view, &reader)
        .await
        .unwrap_or_else(|e| panic!("after live batches: {e}"));
    // Applying everything again (a redelivery) changes nothing.
    projection
        .apply_live(&events, &[(0, 1)])
        .await
        .expect("the whole log again");
    matches_log(c, log, view, &reader)
        .await
        .unwrap_or_else(|e| panic!("after a redelivery: {e}"));
}

async fn rebuild_under_live_writes(c: &mut Cluster, view: &RedisView, url: &str) {
    let node = c.start_default(&[Role::Api]).await;
    let tag = c.tag().to_owned();
    let (_, n) = commands(&node, &tag, 40).await;
    let log = node.log();
    let events = all_events(&log, n).await;
    let live = Projection::new(Arc::new(view.views.clone()), log.clone()).with_opener(c.keys());
    let half = events.len() / 2;
    live.apply_live(&events[..half], &[(0, 1)])
        .await
        .expect("the first half live");
    // More commands while the rebuild runs, applied live as they come.
    let rebuilder = Projection::new(Arc::new(cluster_view(c, url).await.views), log.clone())
        .with_opener(c.keys());
    let options = RebuildOptions {
        batch_size: 7,
        linger: Duration::ZERO,
    };
    let rebuild = async { rebuilder.rebuild(&options, &|_| {}).await };
    let live_writes = async {
        for (i, batch) in events[half..].chunks(3).enumerate() {
            live.apply_live(batch, &[(0, i as i64 + 2)])
                .await
                .unwrap_or_else(|e| panic!("live batch {i} during the rebuild: {e}"));
            tokio::task::yield_now().await;
        }
        let mut more = Vec::new();
        for i in 0..10 {
            more.push(create_user(&node.router, &format!("late{i}-{tag}@example.com"), "L").await);
        }
        more
    };
    let (rebuilt, more) = tokio::join!(rebuild, live_writes);
    let rebuilt = rebuilt.expect("the rebuild");
    assert_eq!(rebuilt.generations, vec![2]);
    let events = all_events(&log, n + more.len()).await;
    live.apply_live(&events[n..], &[(0, 100)])
        .await
        .expect("the late users live");
    let state = view.views.state().await.expect("the state");
    assert_eq!((state.active, state.building), (2, None));
    let reader = RedisUserReader::connect(url, view.prefix.clone())
        .await
        .expect("a reader of the cluster");
    matches_log(c, log, view, &reader)
        .await
        .unwrap_or_else(|e| panic!("after the rebuild: {e}"));
    // The old generation is gone from every primary.
    let left = scan_all(
        view.views.connection(),
        &redis_generation_pattern(&view.prefix, 1),
    )
    .await
    .expect("scanning generation 1");
    assert!(left.is_empty(), "generation 1 keys left: {left:?}");
}

async fn repaired_on_replay(c: &mut Cluster, view: &RedisView, url: &str) {
    let node = c.start_default(&[Role::Api]).await;
    let tag = c.tag().to_owned();
    let first = format!("first-{tag}@example.com");
    let second = format!("second-{tag}@example.com");
    let a = create_user(&node.router, &first, "A").await;
    change_email(&node.router, a, &second).await;
    let log = node.log();
    let events = all_events(&log, 2).await;
    let projection =
        Projection::new(Arc::new(view.views.clone()), log.clone()).with_opener(c.keys());
    projection
        .apply_live(&events[..1], &[(0, 1)])
        .await
        .expect("v1");
    // What a write of v2 cut off after its document step leaves: the document and its
    // pending mark, the email entries as they were.
    let v2: UserView = c.expected_views(log.clone()).await.expect("the fold")[&a].clone();
    assert_eq!((v2.version, v2.email.as_str()), (2, second.as_str()));
    let conn = view.views.connection().clone();
    let key = redis_user_key(&view.prefix, 1, a);
    let mark = key.replace(":user:", ":pending:");
    let _: () = redis::pipe()
        .set(&key, serde_json::to_string(&v2).unwrap())
        .set(&mark, format!("2|{first}"))
        .query_async(&mut conn.clone())
        .await
        .expect("writing v2 without its email step");
    let reader = RedisUserReader::connect(url, view.prefix.clone())
        .await
        .expect("a reader of the cluster");
    let by = async |email: &str| {
        reader
            .user_by_email(&Email::parse(email).unwrap())
            .await
            .expect("userByEmail")
            .map(|u| u.id)
    };
    // The old entry still names A, but A's document has moved on: not found, never wrong.
    assert_eq!(by(&first).await, None);
    assert_eq!(by(&second).await, None, "no entry yet for the new address");
    // The projector restarts and gets v2 again: the document is at v2 already, and the
    // mark has the email step redone.
    let restarted = Projection::new(Arc::new(cluster_view(c, url).await.views), log.clone())
        .with_opener(c.keys());
    restarted
        .apply_live(&events[1..], &[(0, 2)])
        .await
        .expect("v2 again");
    assert_eq!(by(&second).await, Some(a));
    assert_eq!(by(&first).await, None);
    let left: Option<String> = redis::cmd("GET")
        .arg(&mark)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert_eq!(left, None, "the mark is cleared");
    let reader2 = RedisUserReader::connect(url, view.prefix.clone())
        .await
        .unwrap();
    matches_log(c, log, view, &reader2)
        .await
        .unwrap_or_else(|e| panic!("after the repair: {e}"));
}

/// A `begin` or a `switch` cut off halfway leaves the buckets disagreeing; reading the state
/// finishes the step. Buckets that lost their keys are set again by the next rebuild. Also:
/// the lazy connection and PING on the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_a_cut_off_begin_or_switch_is_finished_by_the_next_state_read() {
    let Some(url) =
        cluster_url("redis_cluster_a_cut_off_begin_or_switch_is_finished_by_the_next_state_read")
    else {
        return;
    };
    let prefix = format!("pcf:test:{}", Uuid::new_v4().simple());
    let views = RedisUserViews::connect_lazily(&url, prefix.clone()).expect("a lazy connection");
    views.ping().await.expect("PING on the cluster");
    let view = RedisView {
        views: views.clone(),
        url: url.clone(),
        prefix: prefix.clone(),
    };
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        let state = |s: pcf_projectors::GenerationState| (s.active, s.building);
        assert_eq!(state(views.state().await.unwrap()), (1, None));
        views.begin(2).await.expect("begin");
        assert_eq!(state(views.state().await.unwrap()), (1, Some(2)));
        // A switch to 2 that reached only the first ten buckets.
        let mut conn = views.connection().clone();
        for b in 0..10 {
            let _: () = redis::pipe()
                .set(redis_active_key(&prefix, b), 2)
                .del(redis_building_key(&prefix, b))
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        assert_eq!(state(views.state().await.unwrap()), (2, None));
        // A begin of 3 that reached only buckets 5 and 6.
        for b in 5..7 {
            let _: () = redis::cmd("SET")
                .arg(redis_building_key(&prefix, b))
                .arg(3)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        assert_eq!(state(views.state().await.unwrap()), (2, Some(3)));
        let building: Vec<Option<u64>> = redis::cmd("MGET")
            .arg(
                (0..REDIS_BUCKETS)
                    .map(|b| redis_building_key(&prefix, b))
                    .collect::<Vec<_>>(),
            )
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(building.iter().all(|b| *b == Some(3)), "{building:?}");
        views.switch(3).await.expect("switch 3");
        // Buckets that lost their keys (a shard lost its data): the newest state is
        // answered, and a rebuild's begin and switch set every bucket again.
        for b in 20..30 {
            let _: () = redis::cmd("DEL")
                .arg(redis_active_key(&prefix, b))
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        assert_eq!(state(views.state().await.unwrap()), (3, None));
        views.begin(4).await.expect("begin 4");
        views.switch(4).await.expect("switch 4");
        let active: Vec<Option<u64>> = redis::cmd("MGET")
            .arg(
                (0..REDIS_BUCKETS)
                    .map(|b| redis_active_key(&prefix, b))
                    .collect::<Vec<_>>(),
            )
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(active.iter().all(|a| *a == Some(4)), "{active:?}");
        assert_eq!(state(views.state().await.unwrap()), (4, None));
    }))
    .await;
    delete_cluster_keys(&view).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The whole product with `PCF_REDIS_URL` naming the cluster's seeds: the relay, both
/// projectors and the API; the Redis view on the cluster ends equal to the log, and reads
/// answer.
async fn product_on_the_cluster(c: &mut Cluster, view: &RedisView, url: &str) {
    let config = pcf::Config {
        redis_url: Some(url.to_owned()),
        ..c.config()
    };
    let node = c.start(&config, &ALL_ROLES).await;
    let tag = c.tag().to_owned();
    let (ids, _) = commands(&node, &tag, 20).await;
    c.wait_views_match_log(CONVERGE, node.log(), Some(view))
        .await;
    let read = user(&node.router, ids[1], None).await;
    assert_eq!(read["email"], format!("u0-{tag}@example.com"), "{read}");
    c.stop(&node).await;
}

/// A replica of the cluster takes over its primary (`CLUSTER FAILOVER`, as after a primary
/// is lost, without losing writes): the view's writes and reads follow the new topology
/// (and load their scripts where the new primary lacks them).
async fn follows_a_failover(c: &mut Cluster, view: &RedisView, url: &str) {
    let node = c.start_default(&[Role::Api]).await;
    let tag = c.tag().to_owned();
    let (_, n) = commands(&node, &tag, 30).await;
    let log = node.log();
    let events = all_events(&log, n).await;
    let projection =
        Projection::new(Arc::new(view.views.clone()), log.clone()).with_opener(c.keys());
    let half = events.len() / 2;
    projection
        .apply_live(&events[..half], &[(0, 1)])
        .await
        .expect("the first half");
    let conn = view.views.connection().clone();
    let nodes: String = conn
        .on_node(None, redis::cmd("CLUSTER").arg("NODES"))
        .await
        .expect("CLUSTER NODES");
    let replica = nodes
        .lines()
        .find(|l| {
            l.split_whitespace()
                .nth(2)
                .is_some_and(|f| f.contains("slave"))
        })
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|a| a.split('@').next())
        .and_then(|a| a.rsplit_once(':'))
        .map(|(h, p)| (h.to_owned(), p.parse::<u16>().expect("a port")))
        .expect("a replica in the cluster");
    eprintln!("failing over to {}:{}", replica.0, replica.1);
    let _: String = conn
        .on_node(Some(&replica), redis::cmd("CLUSTER").arg("FAILOVER"))
        .await
        .expect("CLUSTER FAILOVER");
    wait_until(CONVERGE, "the replica to be a primary", || async {
        let role: Vec<redis::Value> = conn
            .on_node(Some(&replica), &redis::cmd("ROLE"))
            .await
            .map_err(|e| e.to_string())?;
        match role.first() {
            Some(redis::Value::BulkString(r)) if r == b"master" => Ok(()),
            other => Err(format!("role {other:?}")),
        }
    })
    .await;
    // The rest, each batch tried again while the cluster settles (as the projector does).
    for (i, batch) in events[half..].chunks(5).enumerate() {
        wait_until(
            CONVERGE,
            &format!("live batch {i} after the failover"),
            || async {
                projection
                    .apply_live(batch, &[(0, i as i64 + 2)])
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await;
    }
    let reader = RedisUserReader::connect(url, view.prefix.clone())
        .await
        .expect("a reader of the cluster");
    wait_until(
        CONVERGE,
        "the view to equal the log after the failover",
        || matches_log(c, log.clone(), view, &reader),
    )
    .await;
}

/// A live projector that knows an old generation state writes after another process began
/// and then switched a rebuild: each bucket's call refuses the stale state and the batch is
/// redone, so every user written after `begin` reaches the new generation, and after the
/// switch only the new one is written.
async fn stale_state_redone(c: &mut Cluster, view: &RedisView, url: &str) {
    let node = c.start_default(&[Role::Api]).await;
    let tag = c.tag().to_owned();
    let (ids, n) = commands(&node, &tag, 30).await;
    let log = node.log();
    let events = all_events(&log, n).await;
    let live = Projection::new(Arc::new(view.views.clone()), log.clone()).with_opener(c.keys());
    let half = events.len() / 2;
    live.apply_live(&events[..half], &[(0, 1)])
        .await
        .expect("the first half");
    // The live projector now knows the state (1, none); another process begins 2.
    let operator = cluster_view(c, url).await.views;
    operator.begin(2).await.expect("begin 2");
    live.apply_live(&events[half..], &[(0, 2)])
        .await
        .expect("the second half, after begin");
    let expected = c.expected_views(log.clone()).await.expect("the fold");
    let touched: std::collections::BTreeSet<Uuid> =
        events[half..].iter().map(|e| e.aggregate_id).collect();
    assert!(touched.len() > 5);
    for id in &touched {
        for generation in [1, 2] {
            let doc = view.views.document(generation, *id).await.unwrap();
            assert_eq!(
                doc.as_ref(),
                Some(&expected[id]),
                "user {id} in generation {generation} after begin"
            );
        }
    }
    // The operator switches (no rebuild ran: generation 2 holds only what live wrote).
    operator.switch(2).await.expect("switch 2");
    change_email(
        &node.router,
        ids[1],
        &format!("after-switch-{tag}@example.com"),
    )
    .await;
    let late = create_user(&node.router, &format!("late-{tag}@example.com"), "L").await;
    let events = all_events(&log, n + 2).await;
    live.apply_live(&events[n..], &[(0, 3)])
        .await
        .expect("after the switch");
    let expected = c.expected_views(log.clone()).await.expect("the fold");
    let reader = RedisUserReader::connect(url, view.prefix.clone())
        .await
        .expect("a reader");
    for id in [ids[1], late] {
        assert_eq!(
            view.views.document(2, id).await.unwrap().as_ref(),
            Some(&expected[&id])
        );
        let by_email = reader
            .user_by_email(&Email::parse(&expected[&id].email).unwrap())
            .await
            .unwrap();
        assert_eq!(by_email.map(|u| u.id), Some(id));
    }
    assert_eq!(
        view.views.document(1, late).await.unwrap(),
        None,
        "after the switch only generation 2 is written"
    );
}
