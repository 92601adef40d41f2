//! `GET /graphql/ws` (graphql-transport-ws) on a real loopback socket: a connection without
//! valid credentials in `connection_init` is refused (no `connection_ack`); `events` follows
//! the log with the caller's access (auditor: everything; analytics: no personal data; plain
//! users: refused); a client that disconnects and resumes from the last position it saw gets
//! every event exactly once, in order; `userChanged` pushes the owner's new state.

use crate::support::*;
use pcf_domain::auth::PERSONAL_FIELDS;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

const EVENTS_SUB: &str = "subscription($after: String, $aggregateId: ID, $types: [String!]) {
  events(after: $after, aggregateId: $aggregateId, types: $types) {
    eventId aggregateId sequence position eventType payload
  }
}";

const USER_CHANGED: &str = "subscription($id: ID!) {
  userChanged(id: $id) { id email displayName bio version }
}";

const WAIT: Duration = Duration::from_secs(10);

/// An embedded app with one user signed up, served on a loopback socket; the user's id.
async fn served_with_user(email: &str, display_name: &str) -> (TestApp, Server, Uuid) {
    let api = TestApp::start().await;
    let (id, _) = api.create_user(email, display_name).await;
    let server = Server::start(api.router()).await;
    (api, server, id)
}

/// Asserts the server refused the connection: no `connection_ack`, and the connection ends.
async fn assert_refused(server: &Server, payload: Value, what: &str) {
    let mut ws = WsClient::connect(server).await;
    let answer = ws.init(payload).await;
    match &answer {
        WsIn::Closed(code, reason) => {
            assert!(
                (4000..5000).contains(code) || *code == 1002 || *code == 1008,
                "{what}: closed with {code} {reason:?}"
            );
        }
        WsIn::Gone(_) => {}
        WsIn::Msg(m) => panic!("{what}: the server answered {m}"),
        WsIn::Silent => panic!("{what}: the server neither acknowledged nor closed"),
    }
    // Nothing more comes through, subscriptions included.
    let _ = ws
        .try_send(json!({
            "id": "1",
            "type": "subscribe",
            "payload": { "query": EVENTS_SUB, "variables": { "after": START } },
        }))
        .await;
    match ws.next(Duration::from_millis(500)).await {
        WsIn::Msg(m) => panic!("{what}: data after a refused init: {m}"),
        WsIn::Closed(..) | WsIn::Gone(_) | WsIn::Silent => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_without_valid_credentials_is_refused() {
    let (api, server, _) = served_with_user("ws@example.com", "Ws").await;

    let now = unix_now();
    let expired = token_with_claims(
        &json!({ "sub": "a", "roles": ["auditor"], "iat": now - 7200, "exp": now - 3600 }),
    );
    let none_alg = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(
            json!({ "sub": "a", "roles": ["auditor"], "exp": now + 600 })
                .to_string()
                .as_bytes()
        )
    );
    let other_secret = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": "a", "roles": ["auditor"], "exp": now + 600 }),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret"),
    )
    .unwrap();
    let refusals = [
        (json!({}), "no payload fields"),
        (json!(null), "null payload"),
        (json!({ "authorization": "" }), "empty authorization"),
        (json!({ "authorization": "Bearer" }), "Bearer alone"),
        (
            json!({ "authorization": "Bearer garbage" }),
            "garbage token",
        ),
        (
            json!({ "authorization": format!("Bearer {expired}") }),
            "expired",
        ),
        (
            json!({ "authorization": format!("Bearer {none_alg}") }),
            "alg none",
        ),
        (
            json!({ "authorization": format!("Bearer {other_secret}") }),
            "other secret",
        ),
        (json!({ "authorization": "ApiKey nope" }), "unknown API key"),
        (json!({ "authorization": 42 }), "a number"),
        (json!({ "token": auditor() }), "a token under another name"),
        (json!({ "authorization": auditor() }), "no scheme"),
    ];
    for (payload, what) in refusals {
        assert_refused(&server, payload, what).await;
    }

    // Subscribing without connection_init at all gets nothing.
    let mut ws = WsClient::connect(&server).await;
    ws.subscribe("1", EVENTS_SUB, json!({ "after": START }))
        .await;
    match ws.next(Duration::from_secs(5)).await {
        WsIn::Msg(m) => panic!("data without connection_init: {m}"),
        WsIn::Closed(..) | WsIn::Gone(_) | WsIn::Silent => {}
    }

    // The control: a valid token is acknowledged (both spellings of the key).
    WsClient::authenticated(&server, &auditor())
        .await
        .close()
        .await;
    let mut ws = WsClient::connect(&server).await;
    match ws
        .init(json!({ "Authorization": format!("Bearer {}", auditor()) }))
        .await
    {
        WsIn::Msg(m) if m["type"] == "connection_ack" => {}
        other => panic!("expected connection_ack, got {other:?}"),
    }
    drop(server);
    api.stop().await;
}

/// Reads `next` messages of subscription `id` until `n` items arrived (panics on an error,
/// a `complete` or silence).
async fn take(ws: &mut WsClient, id: &str, n: usize, field: &str) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        match ws.next(WAIT).await {
            WsIn::Msg(m) if m["type"] == "next" && m["id"] == id => {
                assert!(
                    m["payload"]["errors"].is_null(),
                    "an error in the stream: {m}"
                );
                out.push(m["payload"]["data"][field].clone());
            }
            other => panic!("expected item {} of {n}, got {other:?}", out.len() + 1),
        }
    }
    out
}

/// The first message of subscription `id`, expected to be an error with `code`.
async fn expect_stream_error(ws: &mut WsClient, id: &str, code: &str) {
    match ws.next(WAIT).await {
        WsIn::Msg(m) if m["id"] == id && (m["type"] == "next" || m["type"] == "error") => {
            let errors = if m["type"] == "error" {
                m["payload"].clone()
            } else {
                m["payload"]["errors"].clone()
            };
            assert_eq!(errors[0]["extensions"]["code"], code, "{m}");
            assert!(m["payload"]["data"].is_null(), "{m}");
        }
        other => panic!("expected a {code} error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_subscription_receives_events_replayed_then_live() {
    let (api, server, a) = served_with_user("first@example.com", "First").await;
    let mut ws = WsClient::authenticated(&server, &auditor()).await;
    ws.subscribe("s1", EVENTS_SUB, json!({ "after": START }))
        .await;
    let replayed = take(&mut ws, "s1", 1, "events").await;
    assert_eq!(replayed[0]["eventType"], "UserCreated");
    assert_eq!(replayed[0]["payload"]["email"], "first@example.com");
    assert_eq!(replayed[0]["payload"]["displayName"], "First");

    // Live: a new user and a change.
    let (b, _) = api.create_user("second@example.com", "Second").await;
    api.gql(
        Some(&owner(a)),
        UPDATE_PROFILE,
        json!({ "id": a, "input": { "bio": "live bio" } }),
    )
    .await
    .ok();
    let live = take(&mut ws, "s1", 2, "events").await;
    assert_eq!(live[0]["aggregateId"], b.to_string());
    assert_eq!(live[0]["payload"]["email"], "second@example.com");
    assert_eq!(live[1]["eventType"], "ProfileUpdated");
    assert_eq!(live[1]["payload"]["bio"], "live bio");

    // Filters: one user's events of one type.
    ws.subscribe(
        "s2",
        EVENTS_SUB,
        json!({ "after": START, "aggregateId": a, "types": ["ProfileUpdated"] }),
    )
    .await;
    let filtered = take(&mut ws, "s2", 1, "events").await;
    assert_eq!(filtered[0]["payload"]["bio"], "live bio");
    ws.close().await;
    drop(server);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_subscriptions_leave_personal_data_out_and_users_are_refused() {
    let api = TestApp::start().await;
    let (a, _) = api
        .create_user("private@example.com", "Private Person")
        .await;
    api.gql(
        Some(&owner(a)),
        CHANGE_EMAIL,
        json!({ "id": a, "email": "private2@example.com" }),
    )
    .await
    .ok();
    let server = Server::start(api.router()).await;

    let mut ws = WsClient::authenticated(&server, &analytics()).await;
    ws.subscribe("a", EVENTS_SUB, json!({ "after": START }))
        .await;
    let events = take(&mut ws, "a", 2, "events").await;
    // No personal value, whatever the field: the emails and the display name.
    let text = serde_json::to_string(&events).expect("JSON");
    assert!(!text.to_lowercase().contains("private"), "{text}");
    for e in &events {
        let payload = e["payload"].as_object().expect("a payload");
        for field in PERSONAL_FIELDS {
            assert!(!payload.contains_key(field), "{field} in {e}");
        }
        assert!(payload.contains_key("occurredAt"), "{e}");
        assert_eq!(e["aggregateId"], a.to_string());
    }
    assert_eq!(events[0]["payload"]["userId"], a.to_string());
    assert_eq!(events[1]["eventType"], "EmailChanged");
    ws.close().await;

    // A plain user may not follow the log; nor follow someone else's account.
    let (b, _) = api.create_user("other@example.com", "Other").await;
    let mut ws = WsClient::authenticated(&server, &owner(b)).await;
    ws.subscribe("e", EVENTS_SUB, json!({ "after": START }))
        .await;
    expect_stream_error(&mut ws, "e", "FORBIDDEN").await;
    ws.subscribe("u", USER_CHANGED, json!({ "id": a })).await;
    loop {
        // The `complete` of "e" may come first.
        match ws.next(WAIT).await {
            WsIn::Msg(m) if m["type"] == "complete" && m["id"] == "e" => continue,
            WsIn::Msg(m) if m["id"] == "u" => {
                let errors = if m["type"] == "error" {
                    m["payload"].clone()
                } else {
                    m["payload"]["errors"].clone()
                };
                assert_eq!(errors[0]["extensions"]["code"], "NOT_FOUND", "{m}");
                break;
            }
            other => panic!("expected NOT_FOUND for userChanged, got {other:?}"),
        }
    }
    ws.close().await;
    drop(server);
    api.stop().await;
}

/// Writes `updates` profile changes to a new user, pausing between them.
async fn writer(router: axum::Router, n: usize, updates: usize) {
    let email = format!("writer{n}@example.com");
    let r = send(
        &router,
        Gql::vars(
            CREATE_USER,
            json!({ "input": { "email": email, "displayName": format!("Writer {n}") } }),
        )
        .request(),
    )
    .await;
    let id = r.ok()["createUser"]["user"]["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let t = token(&id, &[]);
    for i in 0..updates {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let r = send(
            &router,
            Gql::vars(
                UPDATE_PROFILE,
                json!({ "id": id, "input": { "bio": format!("update {i} of writer {n}") } }),
            )
            .bearer(&t)
            .request(),
        )
        .await;
        r.ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_subscription_gets_every_event_exactly_once_in_order() {
    let api = TestApp::start().await;
    for i in 0..3 {
        api.create_user(&format!("seed{i}@example.com"), &format!("Seed {i}"))
            .await;
    }
    let server = Server::start(api.router()).await;
    let mut seen: Vec<Value> = Vec::new();

    let mut ws = WsClient::authenticated(&server, &auditor()).await;
    ws.subscribe("1", EVENTS_SUB, json!({ "after": START }))
        .await;
    seen.extend(take(&mut ws, "1", 3, "events").await);

    // Concurrent writers, while subscribed.
    let writers: Vec<_> = (0..4)
        .map(|n| tokio::spawn(writer(api.router(), n, 12)))
        .collect();
    seen.extend(take(&mut ws, "1", 10, "events").await);
    // Disconnect midway, without a goodbye.
    drop(ws);
    let last = seen.last().unwrap()["position"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let still_writing = writers.iter().any(|w| !w.is_finished());

    let mut ws = WsClient::authenticated(&server, &auditor()).await;
    ws.subscribe("2", EVENTS_SUB, json!({ "after": last }))
        .await;
    for w in writers {
        w.await.expect("a writer");
    }
    let expected = api.events_via_api(&auditor()).await;
    assert_eq!(expected.len(), 3 + 4 * 13);
    let missing = expected.len() - seen.len();
    seen.extend(take(&mut ws, "2", missing, "events").await);
    // Nothing more (no duplicates, nothing extra).
    match ws.next(Duration::from_millis(500)).await {
        WsIn::Silent => {}
        other => panic!("more than every event: {other:?}"),
    }

    let ids = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .map(|e| e["eventId"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&seen), ids(&expected));
    for (got, want) in seen.iter().zip(&expected) {
        assert_eq!(got["position"], want["position"]);
        assert_eq!(got["payload"], want["payload"]);
    }
    let positions: Vec<&str> = seen
        .iter()
        .map(|e| e["position"].as_str().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert!(
        still_writing,
        "the writers were done before the disconnect; the test proved less than it should"
    );
    ws.close().await;
    drop(server);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_changed_pushes_the_owners_new_state() {
    let (api, server, a) = served_with_user("changing@example.com", "Before").await;
    let alice = owner(a);
    let mut ws = WsClient::authenticated(&server, &alice).await;
    ws.subscribe("u", USER_CHANGED, json!({ "id": a })).await;

    // The subscription starts "from now on": update until the first push arrives.
    let mut names = std::collections::HashMap::new();
    let mut first = None;
    for i in 0..20 {
        let name = format!("Name {i}");
        let r = api
            .gql(
                Some(&alice),
                UPDATE_PROFILE,
                json!({ "id": a, "input": { "displayName": name } }),
            )
            .await;
        let version = r.ok()["updateProfile"]["version"].as_i64().unwrap();
        names.insert(version, name);
        match ws.next(Duration::from_millis(500)).await {
            WsIn::Msg(m) if m["type"] == "next" && m["id"] == "u" => {
                first = Some(m["payload"]["data"]["userChanged"].clone());
                break;
            }
            WsIn::Silent => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    let first = first.expect("no push after 20 updates");
    assert_eq!(first["id"], a.to_string());
    let version = first["version"].as_i64().unwrap();
    assert_eq!(first["displayName"], names[&version], "{first}");

    // Now surely subscribed: the next change is pushed with the new state.
    let r = api
        .gql(
            Some(&alice),
            UPDATE_PROFILE,
            json!({ "id": a, "input": { "displayName": "Final", "bio": "pushed" } }),
        )
        .await;
    let final_version = r.ok()["updateProfile"]["version"].as_i64().unwrap();
    loop {
        let pushed = take(&mut ws, "u", 1, "userChanged").await.remove(0);
        let v = pushed["version"].as_i64().unwrap();
        if v < final_version {
            // An earlier update of the loop above, pushed late.
            assert_eq!(pushed["displayName"], names[&v]);
            continue;
        }
        assert_eq!(v, final_version);
        assert_eq!(pushed["displayName"], "Final");
        assert_eq!(pushed["bio"], "pushed");
        assert_eq!(pushed["email"], "changing@example.com");
        break;
    }

    // Deleting the account ends the stream.
    api.gql(Some(&alice), DELETE_ACCOUNT, json!({ "id": a }))
        .await
        .ok();
    match ws.next(WAIT).await {
        WsIn::Msg(m) if m["type"] == "complete" && m["id"] == "u" => {}
        other => panic!("expected complete after deleteAccount, got {other:?}"),
    }
    ws.close().await;
    drop(server);
    api.stop().await;
}

/// Operations sent over an open websocket count against the subject's rate limit like HTTP
/// requests (CONTRACT.md: 5000 per authenticated subject per minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_over_a_websocket_are_rate_limited() {
    let api = TestApp::with(|c| {
        c.rate_limits = pcf::config::RateLimits {
            anonymous: 100,
            authenticated: 3,
            premium: 6,
            failed_auth: 60,
        }
    })
    .await;
    fresh_window(15).await;
    let server = Server::start(api.router()).await;
    let t = token("ws-subject", &[]);
    let mut ws = WsClient::authenticated(&server, &t).await;
    let mut limited = 0;
    for i in 0..10 {
        let id = format!("q{i}");
        ws.subscribe(&id, "{ __typename }", json!({})).await;
        match ws.next(WAIT).await {
            WsIn::Msg(m) if m["type"] == "next" => {
                if m["payload"]["errors"][0]["extensions"]["code"] == "RATE_LIMITED" {
                    limited += 1;
                }
            }
            WsIn::Closed(..) | WsIn::Gone(_) => {
                limited += 1;
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
        // Skip the `complete`.
        let _ = ws.next(Duration::from_millis(200)).await;
    }
    assert!(
        limited > 0,
        "10 operations over one websocket, none limited (limit: 3 per minute)"
    );
    drop(server);
    api.stop().await;
}

/// The document limits apply to operations over a websocket as to HTTP requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_over_the_limits_is_refused_over_a_websocket_too() {
    let api = TestApp::with(|_| {}).await;
    let server = Server::start(api.router()).await;
    let t = token("ws-limits", &[]);
    let mut ws = WsClient::authenticated(&server, &t).await;
    let aliases = |n: usize| {
        let fields: Vec<String> = (0..n).map(|i| format!("a{i}: __typename")).collect();
        format!("{{ {} }}", fields.join(" "))
    };
    ws.subscribe("within", &aliases(15), json!({})).await;
    match ws.next(WAIT).await {
        WsIn::Msg(m) if m["type"] == "next" && m["id"] == "within" => {
            assert!(m["payload"]["errors"].is_null(), "{m}");
        }
        other => panic!("15 aliases: {other:?}"),
    }
    let _ = ws.next(Duration::from_millis(200)).await;
    ws.subscribe("over", &aliases(16), json!({})).await;
    match ws.next(WAIT).await {
        WsIn::Msg(m) if m["id"] == "over" && (m["type"] == "next" || m["type"] == "error") => {
            let text = m.to_string();
            assert!(text.contains("too many aliases"), "{m}");
            assert!(m["payload"]["data"].is_null(), "{m}");
        }
        other => panic!("16 aliases: {other:?}"),
    }
    drop(server);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_ends_with_4401_when_its_token_expires() {
    let (api, server, _) = served_with_user("expiring@example.com", "Expiring").await;
    let now = unix_now();
    let short = token_with_claims(
        &json!({ "sub": "short-lived", "roles": ["auditor"], "iat": now, "exp": now + 3 }),
    );
    let mut ws = WsClient::authenticated(&server, &short).await;
    // While the token is valid, the session serves.
    ws.subscribe("1", EVENTS_SUB, json!({ "after": START }))
        .await;
    take(&mut ws, "1", 1, "events").await;
    // Then the token expires (with the leeway HTTP allows too): the session is closed,
    // telling the client to authenticate again, and HTTP refuses the token as well.
    let answer = ws.next(Duration::from_secs(12)).await;
    expect_close(answer, 4401, "after the token expired");
    let r = api.send(Gql::new("{ __typename }").bearer(&short)).await;
    r.expect_refused(axum::http::StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    drop(server);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_without_connection_init_in_time_closes_with_4408() {
    let api = TestApp::with(|c| c.ws_init_timeout = Duration::from_millis(500)).await;
    let server = Server::start(api.router()).await;
    let mut ws = WsClient::connect(&server).await;
    expect_close(
        ws.next(Duration::from_secs(5)).await,
        4408,
        "no connection_init",
    );
    // A subscribe before connection_init is acknowledged is unauthorised.
    let mut ws = WsClient::connect(&server).await;
    ws.subscribe("1", EVENTS_SUB, json!({ "after": START }))
        .await;
    expect_close(
        ws.next(WAIT).await,
        4401,
        "subscribe before connection_init",
    );
    drop(server);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_capped_per_connection_and_per_subject_and_ids_are_unique() {
    let api = TestApp::with(|c| {
        c.ws_subscriptions_per_connection = 3;
        c.ws_subscriptions_per_subject = 5;
    })
    .await;
    api.create_user("capped@example.com", "Capped").await;
    let server = Server::start(api.router()).await;
    let mut ws = WsClient::authenticated(&server, &auditor()).await;
    for id in ["1", "2", "3"] {
        ws.subscribe(id, EVENTS_SUB, json!({ "after": START }))
            .await;
        take(&mut ws, id, 1, "events").await;
    }
    // The fourth on this connection is refused and not run.
    ws.subscribe("4", EVENTS_SUB, json!({ "after": START }))
        .await;
    expect_stream_error(&mut ws, "4", "RATE_LIMITED").await;
    // Completing one makes room.
    ws.send(json!({ "id": "1", "type": "complete" })).await;
    ws.subscribe("5", EVENTS_SUB, json!({ "after": START }))
        .await;
    loop {
        match ws.next(WAIT).await {
            // The server may confirm the completion of "1" first.
            WsIn::Msg(m) if m["type"] == "complete" && m["id"] == "1" => continue,
            WsIn::Msg(m) if m["type"] == "next" && m["id"] == "5" => break,
            other => panic!("expected the fifth subscription to run, got {other:?}"),
        }
    }

    // The same subject on another connection: 3 open here, 2 more allowed in all.
    let mut other = WsClient::authenticated(&server, &auditor()).await;
    for id in ["a", "b"] {
        other
            .subscribe(id, EVENTS_SUB, json!({ "after": START }))
            .await;
        take(&mut other, id, 1, "events").await;
    }
    other
        .subscribe("c", EVENTS_SUB, json!({ "after": START }))
        .await;
    expect_stream_error(&mut other, "c", "RATE_LIMITED").await;
    // Another subject has its own count.
    let mut admin_ws = WsClient::authenticated(&server, &admin()).await;
    admin_ws
        .subscribe("x", EVENTS_SUB, json!({ "after": START }))
        .await;
    take(&mut admin_ws, "x", 1, "events").await;

    // An id still running, subscribed again: 4409, as graphql-transport-ws says.
    ws.subscribe("2", EVENTS_SUB, json!({ "after": START }))
        .await;
    expect_close(ws.next(WAIT).await, 4409, "a duplicate subscription id");

    // The closed connection's subscriptions no longer count for the subject.
    other
        .subscribe("d", EVENTS_SUB, json!({ "after": START }))
        .await;
    let mut deadline = 20;
    loop {
        match other.next(WAIT).await {
            WsIn::Msg(m) if m["type"] == "next" && m["id"] == "d" => break,
            WsIn::Msg(m) if m["type"] == "error" && m["id"] == "d" && deadline > 0 => {
                // The first connection's end may not have been seen yet.
                deadline -= 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                other
                    .subscribe("d", EVENTS_SUB, json!({ "after": START }))
                    .await;
            }
            other => panic!("expected room once the first connection closed, got {other:?}"),
        }
    }
    drop(server);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_older_subscriptions_protocol_is_held_to_the_same_caps() {
    let api = TestApp::with(|c| c.ws_subscriptions_per_connection = 2).await;
    api.create_user("legacy@example.com", "Legacy").await;
    let server = Server::start(api.router()).await;
    let mut ws = WsClient::connect_speaking(&server, "graphql-ws").await;
    match ws
        .init(json!({ "authorization": format!("Bearer {}", auditor()) }))
        .await
    {
        WsIn::Msg(m) if m["type"] == "connection_ack" => {}
        other => panic!("expected connection_ack, got {other:?}"),
    }
    let start = |id: &str| {
        json!({ "id": id, "type": "start",
                "payload": { "query": EVENTS_SUB, "variables": { "after": START } } })
    };
    for id in ["1", "2"] {
        ws.send(start(id)).await;
        match ws.next(WAIT).await {
            WsIn::Msg(m) if m["type"] == "data" && m["id"] == id => {}
            other => panic!("expected data for {id}, got {other:?}"),
        }
    }
    // A third `start` is refused and not run, as a third `subscribe` would be.
    ws.send(start("3")).await;
    match ws.next(WAIT).await {
        WsIn::Msg(m) if m["type"] == "error" && m["id"] == "3" => {
            assert_eq!(m["payload"][0]["extensions"]["code"], "RATE_LIMITED", "{m}");
        }
        other => panic!("expected the third start refused, got {other:?}"),
    }
    drop(server);
    api.stop().await;
}
