//! The HTTP surface, on SQLite and PostgreSQL: bad requests are 400 with a code, the body
//! limit is 413, health, metrics and GraphiQL answer, and the event store counts the relay's
//! backlog with the age of its oldest event.

use crate::support::*;
use axum::http::{header, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

on_both_backends!(
    malformed_json_is_a_bad_request,
    a_batch_is_refused_with_bad_request,
    a_graphql_syntax_error_is_a_bad_request,
    an_unknown_field_is_a_bad_request,
    a_missing_required_variable_is_a_bad_request,
    a_body_that_is_not_a_graphql_request_is_a_bad_request,
    a_body_over_64_kib_is_payload_too_large,
    liveness_and_readiness_answer_ok,
    metrics_count_commands_and_http_requests,
    metrics_report_operations_pools_readiness_and_the_relay_backlog_with_its_age,
    graphiql_serves_html_in_development,
    responses_carry_a_correlation_id,
);

/// Asserts a 400 whose only error has `extensions.code` BAD_REQUEST.
fn expect_bad_request(status: StatusCode, body: &Value) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(body), Some("BAD_REQUEST"), "{body}");
    assert!(body["errors"][0]["message"].is_string(), "{body}");
}

/// `POST /graphql` as an admin, with a body taken as is.
async fn post_raw(app: &TestApp, body: impl Into<Vec<u8>>) -> Resp {
    app.send(Gql::raw(body).by_admin()).await
}

async fn malformed_json_is_a_bad_request(app: &TestApp) {
    for raw in [
        "{\"query\": ",
        "not json at all",
        "",
        "{\"query\": \"{ __typename }\"",
    ] {
        let r = post_raw(app, raw).await;
        expect_bad_request(r.status, r.json());
        assert_eq!(r.body["errors"].as_array().map(Vec::len), Some(1), "{raw}");
    }
    assert_eq!(app.count_events(None).await, 0);
}

async fn a_batch_is_refused_with_bad_request(app: &TestApp) {
    let batch = json!([
        { "query": "{ __typename }" },
        { "query": "mutation { createUser(input: {email: \"batch@example.com\", displayName: \"B\"}) { version } }" },
    ]);
    let r = post_raw(app, batch.to_string()).await;
    expect_bad_request(r.status, r.json());
    // Nothing in the batch ran.
    assert_eq!(app.count_events(None).await, 0);
    let r = post_raw(app, "[]").await;
    expect_bad_request(r.status, r.json());
}

async fn a_graphql_syntax_error_is_a_bad_request(app: &TestApp) {
    for query in ["{ user(", "mutation {", "query { user(id: \"1\") { id }"] {
        let Resp { status, body, .. } = app.admin_gql(query, json!({})).await;
        expect_bad_request(status, &body);
        assert!(body.get("data").is_none_or(Value::is_null), "{body}");
    }
}

async fn an_unknown_field_is_a_bad_request(app: &TestApp) {
    let Resp { status, body, .. } = app.admin_gql("{ noSuchField }", json!({})).await;
    expect_bad_request(status, &body);
    let Resp { status, body, .. } = app
        .admin_gql(
            "mutation { createUser(input: {email: \"u@example.com\", displayName: \"U\", nope: 1}) { version } }",
            json!({}),
        )
        .await;
    expect_bad_request(status, &body);
    assert_eq!(app.count_events(None).await, 0);
}

async fn a_missing_required_variable_is_a_bad_request(app: &TestApp) {
    let Resp { status, body, .. } = app.admin_gql(USER, json!({})).await;
    expect_bad_request(status, &body);
    let Resp { status, body, .. } = app
        .admin_gql(CREATE_USER, json!({ "commandId": "x" }))
        .await;
    expect_bad_request(status, &body);
    assert_eq!(app.count_events(None).await, 0);
}

async fn a_body_that_is_not_a_graphql_request_is_a_bad_request(app: &TestApp) {
    for raw in ["{\"foo\": 1}", "42", "\"{ __typename }\"", "{\"query\": 7}"] {
        let r = post_raw(app, raw).await;
        expect_bad_request(r.status, r.json());
    }
}

async fn a_body_over_64_kib_is_payload_too_large(app: &TestApp) {
    let padded = |size: usize| {
        let skeleton = json!({ "query": "{ __typename }", "variables": { "pad": "" } }).to_string();
        json!({
            "query": "{ __typename }",
            "variables": { "pad": "x".repeat(size - skeleton.len()) },
        })
        .to_string()
    };
    let big = padded(64 * 1024 + 1);
    assert_eq!(big.len(), 64 * 1024 + 1);
    let r = post_raw(app, big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let r = post_raw(app, padded(1024 * 1024)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);

    // Just under the limit is served.
    let fits = padded(64 * 1024);
    let r = post_raw(app, fits).await;
    let body = r.json();
    assert_eq!(r.status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["__typename"], "Query");
}

async fn liveness_and_readiness_answer_ok(app: &TestApp) {
    let r = app.get("/health/live").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.get("/health/ready").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let body = r.json();
    assert_eq!(body["status"], "ready", "{body}");
    let r = app.get("/health/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

async fn metrics_count_commands_and_http_requests(app: &TestApp) {
    app.create_user_unsettled("metered@example.com", "Metered")
        .await;
    let again = json!({ "email": "METERED@example.com", "displayName": "Again" });
    let r = app.sign_up(Some(&admin()), again, None).await;
    r.expect_error("EMAIL_TAKEN");
    let r = app.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    let content_type = r.header(header::CONTENT_TYPE);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = &r.text;
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.contains(&"pcf_commands_total{command=\"createUser\",outcome=\"OK\"} 1"),
        "{text}"
    );
    assert!(
        lines.contains(&"pcf_commands_total{command=\"createUser\",outcome=\"EMAIL_TAKEN\"} 1"),
        "{text}"
    );
    let graphql_requests: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("pcf_http_requests_total{") && l.contains("path=\"/graphql\""))
        .collect();
    let total: u64 = graphql_requests
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(total, 2, "two GraphQL requests so far: {text}");
    assert!(
        lines.iter().any(|l| l.starts_with(
            "pcf_commands_duration_seconds_count{command=\"createUser\",outcome=\"OK\"} 1"
        )),
        "{text}"
    );
}

async fn metrics_report_operations_pools_readiness_and_the_relay_backlog_with_its_age(
    app: &TestApp,
) {
    let (id, _) = app.create_user("aged@example.com", "Aged").await;
    app.create_user_unsettled("aged2@example.com", "Aged").await;
    let r = app
        .admin_gql(
            "query Who($id: ID!) { user(id: $id) { id } }",
            json!({ "id": id }),
        )
        .await;
    assert!(!r.has_errors(), "{:?}", r.body);

    // The store's backlog from the start of the log: every event, the oldest recorded
    // before the wait.
    let store = app.app().store.clone();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let backlog = store
        .backlog_after(pcf_domain::Position::START)
        .await
        .expect("the backlog");
    assert_eq!(backlog.events, 2, "{backlog:?}");
    assert!(
        (1.0..60.0).contains(&backlog.oldest_age_seconds),
        "{backlog:?}"
    );
    // Nothing after the last event: no age.
    let last = store
        .last_position()
        .await
        .expect("the last position")
        .expect("an event");
    let none = store.backlog_after(last).await.expect("the backlog");
    assert_eq!((none.events, none.oldest_age_seconds), (0, 0.0));

    let text = app.get("/metrics").await.text;
    let lines: Vec<&str> = text.lines().collect();
    for line in [
        "pcf_graphql_operations_total{operation=\"createUser\",outcome=\"ok\"} 2",
        "pcf_graphql_operations_total{operation=\"user\",outcome=\"ok\"} 1",
        "pcf_graphql_operations_duration_seconds_count{operation=\"user\",outcome=\"ok\"} 1",
        "pcf_dependency_up{dependency=\"event_store\"} 1",
        "pcf_ready 1",
        "pcf_rate_limit_refusals_total{limit=\"anonymous\"} 0",
    ] {
        assert!(lines.contains(&line), "{line} not in:\n{text}");
    }
    for prefix in [
        "pcf_relay_backlog_events{relay=",
        "pcf_relay_oldest_unpublished_age_seconds{relay=",
        "pcf_db_pool_connections{pool=\"event_store\",state=\"in_use\"}",
        "pcf_db_pool_max_connections{pool=\"event_store\"}",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(prefix)),
            "{prefix} not in:\n{text}"
        );
    }
}

async fn graphiql_serves_html_in_development(app: &TestApp) {
    let r = app.get("/graphiql").await;
    assert_eq!(r.status, StatusCode::OK);
    let content_type = r.header(header::CONTENT_TYPE);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let body = &r.text;
    assert!(body.to_lowercase().contains("graphiql"), "{body}");
    assert!(body.contains("/graphql"), "{body}");
}

async fn responses_carry_a_correlation_id(app: &TestApp) {
    let request = Gql::vars(
        CREATE_USER,
        json!({ "input": { "email": "corr@example.com", "displayName": "Corr" } }),
    )
    .by_admin()
    .header("x-correlation-id", "test-correlation-1");
    let r = app.send(request).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-correlation-id"), "test-correlation-1");
    let id = id_of(&r.json()["data"]["createUser"]);
    let events = app.user_events(id).await;
    assert_eq!(
        events[0].metadata.correlation_id.as_deref(),
        Some("test-correlation-1")
    );
    // Without one, the server makes one up.
    let r = app.send(Gql::new("{ __typename }")).await;
    assert!(!r.header("x-correlation-id").is_empty());
}
