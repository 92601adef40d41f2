//! Dependencies going down and coming back, on private servers of each test (the shared
//! services are never stopped): Kafka during writes, Redis during reads and writes, and
//! Kafka or Redis down when a process starts.

use crate::support::*;
use pcf::app::ALL_ROLES;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

on_cluster! {
    requests_stay_prompt_while_redis_is_down: create => prompt_without_redis,
    writes_succeed_while_kafka_is_down_and_reach_the_views_when_it_returns: create => kafka_outage,
    reads_fall_back_to_the_replica_while_redis_is_down_and_redis_converges_after:
        create => redis_outage,
    a_process_started_while_kafka_is_down_publishes_and_projects_once_kafka_is_up:
        create => kafka_down_at_start,
    a_process_started_while_redis_is_down_serves_from_the_replica_then_uses_redis_once_up:
        create => redis_down_at_start,
    reads_skip_a_read_replica_that_is_down_and_readiness_names_it: create => replica_down,
    a_redis_view_in_an_earlier_layout_is_read_from_the_sql_view_until_rebuilt:
        create => earlier_layout,
}

/// A Redis view an earlier version wrote (its generation state in `<prefix>:active`, no
/// buckets) is not read: reads fall back to the SQL view, never answering "no such user",
/// until a rebuild writes the view in buckets; then Redis answers again.
async fn earlier_layout(c: &mut Cluster) {
    let writer = c.start_default(&ALL_ROLES).await;
    let tag = c.tag().to_owned();
    let id = create_user(&writer.router, &format!("old@{tag}.example.com"), "Old").await;
    wait_for_replica_row(c, id).await;
    let redis = c.redis_view(&shared_redis_url()).await;
    wait_until(CONVERGE, "the user in the Redis view", || async {
        match redis_user(&redis, id).await {
            Ok(Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let client = redis::Client::open(shared_redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // What an earlier version leaves: its state key, and none of the buckets'.
    let _: () = redis::cmd("SET")
        .arg(format!("{}:active", c.redis_prefix))
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    // A document this version would read, made to differ from the SQL view's row.
    let key = pcf_domain::read_model::redis_user_key(&c.redis_prefix, 1, id);
    let doc: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let tampered = doc.replace("\"Old\"", "\"Not from SQL\"");
    assert_ne!(doc, tampered);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&tampered)
        .query_async(&mut conn)
        .await
        .unwrap();

    let reader = c.start(&c.config(), &[pcf::app::Role::Api]).await;
    assert_eq!(user(&reader.router, id, None).await["displayName"], "Old");

    // A rebuild writes the buckets' state; the reader looks again within 5 s and reads Redis.
    let log = writer.log();
    let views: std::sync::Arc<dyn pcf_projectors::ViewStore> =
        std::sync::Arc::new(redis.views.clone());
    let projection = pcf_projectors::Projection::new(views, log).with_opener(c.keys());
    let options = pcf_projectors::RebuildOptions {
        batch_size: 100,
        linger: Duration::from_millis(100),
    };
    let rebuilt = projection
        .rebuild(&options, &|_| {})
        .await
        .expect("the rebuild");
    let generation = rebuilt.generations[0];
    let key = pcf_domain::read_model::redis_user_key(&c.redis_prefix, generation, id);
    let doc: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(doc.replace("\"Old\"", "\"From Redis\""))
        .query_async(&mut conn)
        .await
        .unwrap();
    wait_until(CONVERGE, "reads from the rebuilt Redis view", || async {
        match user(&reader.router, id, None).await["displayName"].as_str() {
            Some("From Redis") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Two read replicas, one of them down (nothing listens): point reads and lists, taken by
/// the replicas in turn, are all answered by the other; readiness names `read_replica`.
async fn replica_down(c: &mut Cluster) {
    let writer = c.start_default(&ALL_ROLES).await;
    let id = create_user(
        &writer.router,
        &format!("replica@{}.example.com", c.tag()),
        "Replica",
    )
    .await;
    wait_for_replica_row(c, id).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!(
        "postgres://postgres@{}/postgres",
        closed.local_addr().unwrap()
    );
    drop(closed);
    let config = pcf::Config {
        redis_url: None,
        read_database_urls: vec![down, c.replica_url.clone()],
        ..c.config()
    };
    let reader = c.start(&config, &[pcf::app::Role::Api]).await;
    for _ in 0..4 {
        let view = user(&reader.router, id, None).await;
        assert_eq!(view["id"], id.to_string(), "{view}");
        let listed = gql(&reader.router, USERS, json!({ "first": 5 })).await;
        assert!(listed_ids(&listed).contains(&id), "{listed}");
    }
    // It serves from the other replica: ready, naming the one down as degraded.
    let (status, body) = ready(&reader.router).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["degraded"], json!(["read_replica"]), "{body}");
    assert!(body.get("down").is_none(), "{body}");
}

async fn kafka_outage(c: &mut Cluster) {
    let mut kafka = PrivateKafka::start().await;
    c.use_private_kafka(kafka.brokers());
    let app = c.start_default(&ALL_ROLES).await;
    let tag = c.tag().to_owned();

    let before = create_user(&app.router, &format!("before@{tag}.example.com"), "Before").await;
    assert_eq!(
        user(&app.router, before, Some(1)).await["id"],
        json!(before.to_string())
    );

    kafka.kill();
    let down_at = Instant::now();
    // Commands do not need Kafka: every one of them succeeds while it is down.
    let mut created = Vec::new();
    for i in 0..5 {
        let Resp { status, body, .. } = admin_gql(
            &app.router,
            CREATE_USER,
            json!({ "input": { "email": format!("down{i}@{tag}.example.com"), "displayName": format!("Down {i}") } }),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.get("errors").is_none(),
            "createUser failed while Kafka was down: {body}"
        );
        created.push(uuid_of(&body["data"]["createUser"]["user"]["id"]));
    }
    for v in 2..=3 {
        let version = update_profile(
            &app.router,
            before,
            json!({ "displayName": format!("Before v{v}") }),
        )
        .await;
        assert_eq!(version, v);
    }
    // Stay down longer than the producer's delivery timeout (10 s), so that publishing
    // really fails and has to be retried, not merely delayed.
    let outage = Duration::from_secs(12);
    if let Some(left) = outage.checked_sub(down_at.elapsed()) {
        tokio::time::sleep(left).await;
    }
    // Nothing of the outage is visible yet (Kafka is the only way into the views).
    assert_eq!(user(&app.router, created[0], None).await, Value::Null);

    kafka.restart().await;
    let back_at = Instant::now();
    // Everything reaches the topic (the relay retried what failed) ...
    let mut tail = TopicTail::new(&c.brokers, &c.topic).await;
    let stored = stored_event_ids(&c.pool).await;
    tail.wait_for(
        Duration::from_secs(120),
        "every stored event in Kafka",
        |records| stored.is_subset(&event_ids(records)),
    )
    .await;
    eprintln!(
        "all events in the topic {:?} after Kafka returned",
        back_at.elapsed()
    );
    // ... and the views.
    wait_views_converged(c, &app, Duration::from_secs(120), back_at).await;
    for id in &created {
        assert_eq!(
            user(&app.router, *id, Some(1)).await["id"],
            json!(id.to_string())
        );
    }
    assert_eq!(
        user(&app.router, before, Some(3)).await["displayName"],
        "Before v3"
    );
}

async fn kafka_down_at_start(c: &mut Cluster) {
    // The broker is formatted but not running when PCF starts.
    let mut kafka = PrivateKafka::format();
    c.use_private_kafka(kafka.brokers());
    let started = Instant::now();
    let app = c.start_default(&ALL_ROLES).await;
    eprintln!(
        "PCF started in {:?} while Kafka was down",
        started.elapsed()
    );
    let tag = c.tag().to_owned();
    let id = create_user(&app.router, &format!("early@{tag}.example.com"), "Early").await;

    kafka.launch().await;
    let back_at = Instant::now();
    wait_views_converged(c, &app, Duration::from_secs(90), back_at).await;
    assert_eq!(
        user(&app.router, id, Some(1)).await["id"],
        json!(id.to_string())
    );
    // The topics are PCF's, as configured.
    let lag = pcf_projectors::consumer_lag(&c.brokers, &c.topic, "probe")
        .await
        .expect("the topic's partitions");
    assert_eq!(lag.len(), PARTITIONS as usize, "partitions of {}", c.topic);
    let dlq = pcf_projectors::consumer_lag(&c.brokers, &format!("{}.dlq", c.topic), "probe")
        .await
        .expect("the dead-letter topic's partitions");
    assert_eq!(dlq.len(), 1, "the dead-letter topic {}.dlq", c.topic);
}

async fn ready(router: &axum::Router) -> (u16, Value) {
    let r = get(router, "/health/ready").await;
    let body = if r.body.is_null() {
        Value::String(r.text)
    } else {
        r.body
    };
    (r.status.as_u16(), body)
}

/// Waits, up to `timeout`, until both views (Redis: the shared server) equal the fold of
/// `node`'s log, and reports how long after Kafka's return (`back_at`) that was.
async fn wait_views_converged(c: &Cluster, node: &Node, timeout: Duration, back_at: Instant) {
    let redis = c.redis_view(&shared_redis_url()).await;
    c.wait_views_match_log(timeout, node.log(), Some(&redis))
        .await;
    eprintln!(
        "views converged {:?} after Kafka returned",
        back_at.elapsed()
    );
}

/// The test's configuration with the private Redis `redis` instead of the shared one.
fn on_private_redis(c: &Cluster, redis: &PrivateRedis) -> pcf::Config {
    pcf::Config {
        redis_url: Some(redis.url()),
        ..c.config()
    }
}

/// Waits until the SQL view on the replica has the user `id`.
async fn wait_for_replica_row(c: &Cluster, id: Uuid) {
    let replica = c.replica_pool().await;
    wait_until(CONVERGE, "the user on the replica", || async {
        let rows = sql_rows(&replica, "read_users").await;
        rows.get(&id)
            .map(|_| ())
            .ok_or_else(|| "not yet".to_owned())
    })
    .await;
}

/// Asserts readiness names Redis, and only Redis, as degraded: the process still serves (its
/// reads fall back to the replicas), so it stays ready.
async fn assert_only_redis_down(router: &axum::Router) {
    let (status, body) = ready(router).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["degraded"], json!(["redis"]), "{body}");
}

/// Waits until readiness answers 200 with nothing down or degraded.
async fn wait_until_ready(router: &axum::Router, what: &str) {
    wait_until(CONVERGE, what, || async {
        match ready(router).await {
            (200, body) if body["status"] == "ready" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Asserts, while Redis is down, that `user(id)` answers the user as `view` shows it and
/// that `userByEmail(email)` finds the user.
async fn assert_point_reads_answer(router: &axum::Router, id: Uuid, view: &Value, email: &str) {
    let Resp { status, body, .. } = admin_gql(router, USER, json!({ "id": id })).await;
    assert_eq!(status, 200);
    assert!(
        body.get("errors").is_none(),
        "user(id) failed while Redis was down: {body}"
    );
    assert_same_user(&body["data"]["user"], view);
    let by_email = gql(router, USER_BY_EMAIL, json!({ "email": email })).await;
    assert_eq!(by_email["userByEmail"]["id"], json!(id.to_string()));
}

async fn redis_user(redis: &RedisView, id: Uuid) -> Result<Option<pcf_domain::UserView>, String> {
    Ok(redis_docs(redis).await?.users.get(&id).cloned())
}

async fn redis_outage(c: &mut Cluster) {
    let mut private = PrivateRedis::start().await;
    let app = c.start(&on_private_redis(c, &private), &ALL_ROLES).await;
    let tag = c.tag().to_owned();
    let redis = c.redis_view(&private.url()).await;

    let a = create_user(&app.router, &format!("a@{tag}.example.com"), "Alice").await;
    let a_view = user(&app.router, a, Some(1)).await;
    assert_eq!(
        redis_user(&redis, a).await.unwrap().map(|v| v.version),
        Some(1)
    );
    // The replica has A too, before Redis goes away.
    wait_for_replica_row(c, a).await;
    assert_eq!(ready(&app.router).await.0, 200);

    private.save_and_kill().await;

    // Point reads answer from the replica.
    assert_point_reads_answer(&app.router, a, &a_view, &format!("a@{tag}.example.com")).await;
    assert_only_redis_down(&app.router).await;

    // Writes go on; the SQL view keeps up and serves them through the fallback.
    let b = create_user(&app.router, &format!("b@{tag}.example.com"), "Bob").await;
    assert_eq!(
        update_profile(&app.router, a, json!({ "displayName": "Alice 2" })).await,
        2
    );
    let b_fallback = user(&app.router, b, Some(1)).await;
    assert_eq!(b_fallback["displayName"], "Bob");
    let a_fallback = user(&app.router, a, Some(2)).await;
    assert_eq!(a_fallback["displayName"], "Alice 2");

    private.restart().await;

    // Redis converges: B, created while it was down, and A's change are in the Redis view.
    wait_until(CONVERGE, "the Redis view to catch up", || async {
        let got_b = redis_user(&redis, b).await?.map(|v| v.version);
        let got_a = redis_user(&redis, a).await?.map(|v| v.version);
        if got_a == Some(2) && got_b == Some(1) {
            Ok(())
        } else {
            Err(format!("A at {got_a:?}, B at {got_b:?}"))
        }
    })
    .await;
    c.wait_views_match_log(CONVERGE, app.log(), Some(&redis))
        .await;
    let b_redis = user(&app.router, b, Some(1)).await;
    assert_same_user(&b_redis, &b_fallback);
    assert_eq!(
        user(&app.router, a, Some(2)).await["displayName"],
        "Alice 2"
    );
    wait_until_ready(&app.router, "readiness after Redis returned").await;
}

async fn prompt_without_redis(c: &mut Cluster) {
    let mut private = PrivateRedis::start().await;
    let app = c.start(&on_private_redis(c, &private), &ALL_ROLES).await;
    let tag = c.tag().to_owned();
    let a = create_user(&app.router, &format!("a@{tag}.example.com"), "Alice").await;
    user(&app.router, a, Some(1)).await;
    wait_for_replica_row(c, a).await;

    private.kill();
    // Each request answers within a bound a client would wait; none hangs on Redis.
    let mut slow = Vec::new();
    for i in 0..6 {
        let (what, started) = (
            if i % 2 == 0 { "user(id)" } else { "createUser" },
            Instant::now(),
        );
        let Resp { status, body, .. } = if i % 2 == 0 {
            admin_gql(&app.router, USER, json!({ "id": a })).await
        } else {
            admin_gql(
                &app.router,
                CREATE_USER,
                json!({ "input": { "email": format!("p{i}@{tag}.example.com"), "displayName": "P" } }),
            )
            .await
        };
        let took = started.elapsed();
        eprintln!("{what} #{i} with Redis down: {took:?}");
        assert_eq!(status, 200, "{body}");
        assert!(
            body.get("errors").is_none(),
            "{what} failed with Redis down: {body}"
        );
        if took > Duration::from_secs(2) {
            slow.push(format!("{what} #{i} took {took:?}"));
        }
    }
    assert!(
        slow.is_empty(),
        "requests stalled while Redis was down: {slow:?}"
    );
}

async fn redis_down_at_start(c: &mut Cluster) {
    // Nothing listens on the private Redis's port when PCF starts.
    let mut private = PrivateRedis::reserve();
    let config = on_private_redis(c, &private);
    let started = Instant::now();
    let app = c.start(&config, &ALL_ROLES).await;
    eprintln!(
        "PCF started in {:?} while Redis was down",
        started.elapsed()
    );
    let tag = c.tag().to_owned();

    assert_only_redis_down(&app.router).await;

    // Commands work (the rate limiter counts locally); point reads answer from the replica.
    let email = format!("a@{tag}.example.com");
    let a = create_user(&app.router, &email, "Alice").await;
    let a_view = user(&app.router, a, Some(1)).await;
    assert_eq!(a_view["id"], json!(a.to_string()), "{a_view}");
    assert_point_reads_answer(&app.router, a, &a_view, &email).await;

    private.launch().await;
    let back_at = Instant::now();

    // The Redis projector, which waited for Redis, catches up with what it missed.
    let redis = c.redis_view(&private.url()).await;
    c.wait_views_match_log(CONVERGE, app.log(), Some(&redis))
        .await;
    eprintln!(
        "the Redis view converged {:?} after Redis came up",
        back_at.elapsed()
    );
    wait_until_ready(&app.router, "readiness after Redis came up").await;

    // Point reads come from Redis again: a document that only this Redis has (no such user
    // is in the log or on the replica) is served.
    let docs = redis_docs(&redis).await.expect("the Redis view");
    let mut only_in_redis = docs.users.get(&a).expect("A in the Redis view").clone();
    only_in_redis.id = Uuid::new_v4();
    only_in_redis.email = format!("only-in-redis@{tag}.example.com");
    only_in_redis.display_name = "Only in Redis".to_owned();
    let mut conn = redis_conn(&private.url()).await;
    let _: () = redis::cmd("SET")
        .arg(pcf_domain::read_model::redis_user_key(
            &c.redis_prefix,
            docs.generation,
            only_in_redis.id,
        ))
        .arg(serde_json::to_string(&only_in_redis).expect("a document"))
        .query_async(&mut conn)
        .await
        .expect("SET");
    wait_until(CONVERGE, "user(id) served from Redis", || async {
        let got = user(&app.router, only_in_redis.id, None).await;
        if got["displayName"] == "Only in Redis" {
            Ok(())
        } else {
            Err(format!("got {got}"))
        }
    })
    .await;

    // The rate limiter counts in Redis again.
    let pattern = format!("{}:ratelimit:*", c.redis_prefix);
    wait_until(CONVERGE, "rate limit counts in Redis", || {
        let (router, pattern, mut conn) = (app.router.clone(), pattern.clone(), conn.clone());
        async move {
            user(&router, a, None).await;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            if keys.is_empty() {
                Err("no rate limit count in Redis yet".to_owned())
            } else {
                Ok(())
            }
        }
    })
    .await;
}
