//! Cluster mode end to end, against the real services: a mutation travels through the event
//! store, the relay, Kafka and the projectors into the Redis view and the SQL view on the
//! replica; late commits are not skipped; Kafka messages carry their key and headers.

use crate::support::*;
use pcf::app::ALL_ROLES;
use pcf_domain::EventEnvelope;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use uuid::Uuid;

on_cluster! {
    a_mutation_is_visible_from_redis_and_from_the_replica_with_keyset_pages:
        create => end_to_end,
    an_event_committed_after_a_later_position_still_reaches_kafka_and_the_views:
        create_alone => late_commit,
    kafka_messages_carry_the_user_id_as_key_and_the_contract_headers:
        create => message_key_and_headers,
}

/// `users(first, after, filter)` pages through the SQL view until the last page.
async fn all_pages(router: &axum::Router, first: i64, filter: &Value) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let data = gql(
            router,
            USERS,
            json!({ "first": first, "after": after, "filter": filter }),
        )
        .await;
        let page = data["users"].clone();
        let has_next = page["pageInfo"]["hasNextPage"]
            .as_bool()
            .expect("hasNextPage");
        after = page["pageInfo"]["endCursor"].as_str().map(str::to_owned);
        pages.push(page);
        if !has_next {
            return pages;
        }
        assert!(pages.len() < 50, "pagination does not end");
    }
}

async fn end_to_end(c: &mut Cluster) {
    let full = c.start_default(&ALL_ROLES).await;
    let sql = c.start_sql_reader().await;

    let tag = c.tag().to_owned();
    let ids = create_users(&full.router, 7, |i| {
        (
            format!("pager{i}@{tag}.example.com"),
            format!("Pager {tag} {i}"),
        )
    })
    .await;
    let other = create_user(&full.router, &format!("other@{tag}.example.com"), "Someone").await;
    let renamed = format!("Pager {tag} renamed");
    let v = update_profile(
        &full.router,
        ids[0],
        json!({ "displayName": renamed, "bio": "hello", "avatarUrl": "https://example.com/a.png" }),
    )
    .await;
    assert_eq!(v, 2);
    let new_email = format!("moved@{tag}.example.com");
    assert_eq!(change_email(&full.router, ids[1], &new_email).await, 2);

    // Redis: point reads, read-your-writes through minVersion.
    let u0 = user(&full.router, ids[0], Some(2)).await;
    assert_eq!(u0["id"], json!(ids[0].to_string()), "{u0}");
    assert_eq!(u0["displayName"], json!(renamed));
    assert_eq!(u0["bio"], "hello");
    assert_eq!(u0["avatarUrl"], "https://example.com/a.png");
    assert_eq!(u0["email"], json!(format!("pager0@{tag}.example.com")));
    assert_eq!(u0["version"], 2);
    let u1 = user(&full.router, ids[1], Some(2)).await;
    assert_eq!(u1["email"], json!(new_email));
    let by_email = gql(
        &full.router,
        USER_BY_EMAIL,
        json!({ "email": new_email.to_uppercase() }),
    )
    .await;
    assert_eq!(
        by_email["userByEmail"]["id"],
        json!(ids[1].to_string()),
        "{by_email}"
    );
    assert_eq!(by_email["userByEmail"]["version"], 2);
    let old = gql(
        &full.router,
        USER_BY_EMAIL,
        json!({ "email": format!("pager1@{tag}.example.com") }),
    )
    .await;
    assert_eq!(
        old["userByEmail"],
        Value::Null,
        "the old email still finds the user"
    );
    // The answer really is Redis's: the document is there, at the active generation.
    let redis = c.redis_view(&shared_redis_url()).await;
    let docs = redis_docs(&redis).await.expect("reading the Redis view");
    assert_eq!(docs.users[&ids[0]].version, 2);
    assert_eq!(docs.users[&ids[0]].display_name, renamed);
    assert_eq!(docs.emails.get(&new_email), Some(&ids[1]));

    // The SQL reader on the replica serves the same users.
    let r0 = user(&sql.router, ids[0], Some(2)).await;
    assert_same_user(&u0, &r0);
    let r1 = user(&sql.router, ids[1], Some(2)).await;
    assert_same_user(&u1, &r1);
    let by_email = gql(&sql.router, USER_BY_EMAIL, json!({ "email": new_email })).await;
    assert_eq!(by_email["userByEmail"]["id"], json!(ids[1].to_string()));

    // Lists: keyset pages over the replica, filtered by display name.
    let filter = json!({ "displayNameContains": format!("pager {tag}") });
    wait_until(CONVERGE, "all seven users on the replica", || async {
        let data = gql(
            &sql.router,
            USERS,
            json!({ "first": 100, "filter": filter }),
        )
        .await;
        let n = data["users"]["edges"].as_array().map_or(0, Vec::len);
        if n == ids.len() {
            Ok(())
        } else {
            Err(format!("{n} users listed"))
        }
    })
    .await;
    let pages = all_pages(&sql.router, 3, &filter).await;
    let sizes: Vec<usize> = pages
        .iter()
        .map(|p| p["edges"].as_array().expect("edges").len())
        .collect();
    assert_eq!(sizes, vec![3, 3, 1], "{pages:?}");
    let mut listed = Vec::new();
    for page in &pages {
        for edge in page["edges"].as_array().expect("edges") {
            assert_eq!(edge["cursor"], edge["node"]["id"], "{edge}");
            listed.push(uuid_of(&edge["node"]["id"]));
        }
        let last = page["edges"]
            .as_array()
            .and_then(|e| e.last())
            .expect("a last edge");
        assert_eq!(page["pageInfo"]["endCursor"], last["cursor"]);
    }
    let mut sorted = listed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(listed, sorted, "pages are not in id order or repeat a user");
    let mut created = ids.clone();
    created.sort();
    assert_eq!(listed, created, "the pages hold exactly the matching users");
    assert!(!listed.contains(&other));
    // A cursor past the last user gives an empty last page.
    let data = gql(
        &sql.router,
        USERS,
        json!({ "first": 3, "after": listed.last().unwrap().to_string(), "filter": filter }),
    )
    .await;
    assert_eq!(data["users"]["edges"], json!([]));
    assert_eq!(data["users"]["pageInfo"]["hasNextPage"], false);
    // Filter by exact email.
    let data = gql(
        &sql.router,
        USERS,
        json!({ "first": 10, "filter": { "email": new_email } }),
    )
    .await;
    let edges = data["users"]["edges"].as_array().expect("edges");
    assert_eq!(edges.len(), 1, "{data}");
    assert_eq!(edges[0]["node"]["id"], json!(ids[1].to_string()));
    // The renamed user's list entry is current.
    let entry = pages
        .iter()
        .flat_map(|p| p["edges"].as_array().unwrap().clone())
        .find(|e| e["node"]["id"] == json!(ids[0].to_string()))
        .expect("user 0 listed");
    assert_eq!(entry["node"]["displayName"], json!(renamed));
    assert_eq!(entry["node"]["version"], 2);
}

async fn late_commit(c: &mut Cluster) {
    let app = c.start_default(&ALL_ROLES).await;
    let sql = c.start_sql_reader().await;
    let mut tail = TopicTail::new(&c.brokers, &c.topic).await;
    let tag = c.tag().to_owned();

    // X: a valid UserCreated, written by a transaction that stays open.
    let x = Uuid::now_v7();
    let x_email = format!("late@{tag}.example.com");
    let payload = json!({ "UserCreated": {
        "userId": x, "email": x_email, "displayName": "Late Committer",
        "bio": null, "avatarUrl": null, "occurredAt": chrono::Utc::now(),
    }});
    let mut tx = c.pool.begin().await.expect("a transaction");
    let (x_global,): (i64,) = sqlx::query_as(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('User', $1, 1, 'UserCreated', '1', $2, '{}') \
         RETURNING global_position",
    )
    .bind(x.to_string())
    .bind(&payload)
    .fetch_one(&mut *tx)
    .await
    .expect("inserting X's event");
    sqlx::query("INSERT INTO user_emails (email, user_id) VALUES ($1, $2)")
        .bind(&x_email)
        .bind(x.to_string())
        .execute(&mut *tx)
        .await
        .expect("claiming X's email");

    // Y commits first, with a later global position.
    let y = create_user(&app.router, &format!("early@{tag}.example.com"), "Early").await;
    let (y_global,): (i64,) =
        sqlx::query_as("SELECT global_position FROM events WHERE aggregate_id = $1")
            .bind(y.to_string())
            .fetch_one(&c.pool)
            .await
            .expect("Y's position");
    assert!(
        y_global > x_global,
        "Y ({y_global}) must come after X ({x_global})"
    );

    tx.commit().await.expect("committing X");

    tail.wait_for(CONVERGE, "X's and Y's events", |records| {
        let ids: BTreeSet<Uuid> = records
            .iter()
            .filter_map(Record::envelope)
            .map(|e| e.aggregate_id)
            .collect();
        ids.contains(&x) && ids.contains(&y)
    })
    .await;
    let envelopes = tail.envelopes();
    let ex: Vec<&EventEnvelope> = envelopes.iter().filter(|e| e.aggregate_id == x).collect();
    let ey: Vec<&EventEnvelope> = envelopes.iter().filter(|e| e.aggregate_id == y).collect();
    assert_eq!(ex.len(), 1, "X published once: {ex:?}");
    assert_eq!(ey.len(), 1, "Y published once: {ey:?}");
    assert_eq!(ex[0].event_type, "UserCreated");
    // X's event is of version 1, plain, as older events are; Y's is sealed.
    assert_eq!(ex[0].event_version, "1");
    assert_eq!(ex[0].payload["email"], json!(x_email));
    assert_sealed(&[ey[0].clone()], &[&format!("early@{tag}"), "Early"]);
    // Commit order: X's transaction began first, so it comes first in the log's order.
    assert!(ex[0].position < ey[0].position);

    // Both reach both views.
    let vx = user(&app.router, x, Some(1)).await;
    assert_eq!(vx["email"], json!(x_email), "{vx}");
    assert_eq!(vx["displayName"], "Late Committer");
    let vy = user(&app.router, y, Some(1)).await;
    assert_eq!(vy["id"], json!(y.to_string()));
    let sx = user(&sql.router, x, Some(1)).await;
    assert_same_user(&vx, &sx);
    let sy = user(&sql.router, y, Some(1)).await;
    assert_same_user(&vy, &sy);
    let redis = c.redis_view(&shared_redis_url()).await;
    c.wait_views_match_log(CONVERGE, app.log(), Some(&redis))
        .await;
}

/// `00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero (W3C Trace Context).
fn parse_traceparent(v: &str) -> (String, String) {
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {v:?}");
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert_eq!(parts[0], "00", "traceparent version in {v:?}");
    assert!(
        hex(parts[1], 32) && parts[1].bytes().any(|b| b != b'0'),
        "trace id in {v:?}"
    );
    assert!(
        hex(parts[2], 16) && parts[2].bytes().any(|b| b != b'0'),
        "span id in {v:?}"
    );
    assert!(hex(parts[3], 2), "flags in {v:?}");
    (parts[1].to_owned(), parts[2].to_owned())
}

async fn message_key_and_headers(c: &mut Cluster) {
    let app = c.start_default(&ALL_ROLES).await;
    let mut tail = TopicTail::new(&c.brokers, &c.topic).await;
    let tag = c.tag().to_owned();

    let correlation = Uuid::new_v4();
    let data = Gql::vars(
        CREATE_USER,
        json!({ "input": { "email": format!("headers@{tag}.example.com"), "displayName": "Headers" } }),
    )
    .by_admin()
    .header("x-correlation-id", &correlation.to_string())
    .send(&app.router)
    .await
    .ok()
    .clone();
    let id = id_of(&data["createUser"]);
    let request_id = format!("req-{tag}");
    Gql::vars(
        UPDATE_PROFILE,
        json!({ "id": id, "input": { "displayName": "Headers 2" } }),
    )
    .by_admin()
    .header("x-correlation-id", &request_id)
    .send(&app.router)
    .await
    .ok();

    tail.wait_for(CONVERGE, "the user's two events", |records| {
        records
            .iter()
            .filter(|r| r.key.as_deref() == Some(id.to_string().as_str()))
            .count()
            >= 2
    })
    .await;
    let records: Vec<&Record> = tail
        .records
        .iter()
        .filter(|r| r.envelope().is_some_and(|e| e.aggregate_id == id))
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        records[0].partition, records[1].partition,
        "one user, one partition"
    );
    assert!(records[0].offset < records[1].offset);
    let mut traces = Vec::new();
    for (record, (event_type, corr)) in records.iter().zip([
        ("UserCreated", correlation.to_string()),
        ("ProfileUpdated", request_id.clone()),
    ]) {
        let envelope = record.envelope().expect("an envelope");
        assert_eq!(
            record.key.as_deref(),
            Some(id.to_string().as_str()),
            "key = user id"
        );
        let h = &record.headers;
        assert_eq!(
            h.get("eventType").map(String::as_str),
            Some(event_type),
            "{h:?}"
        );
        assert_eq!(
            h.get("eventVersion").map(String::as_str),
            Some("2"),
            "{h:?}"
        );
        assert_eq!(h.get("correlationId"), Some(&corr), "{h:?}");
        let traceparent = h
            .get("traceparent")
            .unwrap_or_else(|| panic!("no traceparent in {h:?}"));
        let (trace, _span) = parse_traceparent(traceparent);
        traces.push(trace);
        // The headers agree with the envelope they travel with.
        assert_eq!(envelope.event_type, event_type);
        assert_eq!(envelope.event_version, "2");
        // The personal data travels sealed.
        assert_sealed(
            std::slice::from_ref(&envelope),
            &[&format!("headers@{tag}"), "Headers"],
        );
        assert_eq!(
            envelope.metadata.correlation_id.as_deref(),
            Some(corr.as_str())
        );
        // The value is the contract's envelope.
        let value: Value = serde_json::from_slice(&record.payload).expect("JSON");
        for field in ENVELOPE_FIELDS.iter().chain(&["metadata", "payload"]) {
            assert!(value.get(field).is_some(), "{field} missing from {value}");
        }
        assert_eq!(value["aggregateType"], "User");
        assert_eq!(value["aggregateId"], json!(id.to_string()));
    }
    // A UUID correlation id is the trace of the request's events.
    assert_eq!(traces[0], correlation.simple().to_string());
    assert_ne!(traces[0], traces[1], "two requests, two traces");
}
