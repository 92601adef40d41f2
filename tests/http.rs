//! The HTTP surface, on SQLite and PostgreSQL: bad requests are 400 with a code, the body
//! limit is 413, health, metrics and GraphiQL answer.

mod common;

use axum::http::{header, StatusCode};
use common::*;
use serde_json::{json, Value};

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
    graphiql_serves_html_in_development,
    responses_carry_a_correlation_id,
);

fn parse(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Asserts a 400 whose only error has `extensions.code` BAD_REQUEST.
fn expect_bad_request(status: StatusCode, body: &Value) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(body), Some("BAD_REQUEST"), "{body}");
    assert!(body["errors"][0]["message"].is_string(), "{body}");
}

async fn malformed_json_is_a_bad_request(app: &TestApp) {
    for raw in [
        "{\"query\": ",
        "not json at all",
        "",
        "{\"query\": \"{ __typename }\"",
    ] {
        let (status, body) = app.post_graphql_raw(raw).await;
        let body = parse(&body);
        expect_bad_request(status, &body);
        assert_eq!(body["errors"].as_array().map(Vec::len), Some(1), "{raw}");
    }
    assert_eq!(app.count_events(None).await, 0);
}

async fn a_batch_is_refused_with_bad_request(app: &TestApp) {
    let batch = json!([
        { "query": "{ __typename }" },
        { "query": "mutation { createUser(input: {email: \"batch@example.com\", displayName: \"B\"}) { version } }" },
    ]);
    let (status, body) = app.post_graphql_raw(batch.to_string()).await;
    expect_bad_request(status, &parse(&body));
    // Nothing in the batch ran.
    assert_eq!(app.count_events(None).await, 0);
    let (status, body) = app.post_graphql_raw("[]").await;
    expect_bad_request(status, &parse(&body));
}

async fn a_graphql_syntax_error_is_a_bad_request(app: &TestApp) {
    for query in ["{ user(", "mutation {", "query { user(id: \"1\") { id }"] {
        let (status, body) = app.gql(query, json!({})).await;
        expect_bad_request(status, &body);
        assert!(body.get("data").is_none_or(Value::is_null), "{body}");
    }
}

async fn an_unknown_field_is_a_bad_request(app: &TestApp) {
    let (status, body) = app.gql("{ noSuchField }", json!({})).await;
    expect_bad_request(status, &body);
    let (status, body) = app
        .gql(
            "mutation { createUser(input: {email: \"u@example.com\", displayName: \"U\", nope: 1}) { version } }",
            json!({}),
        )
        .await;
    expect_bad_request(status, &body);
    assert_eq!(app.count_events(None).await, 0);
}

async fn a_missing_required_variable_is_a_bad_request(app: &TestApp) {
    let (status, body) = app.gql(USER, json!({})).await;
    expect_bad_request(status, &body);
    let (status, body) = app.gql(CREATE_USER, json!({ "commandId": "x" })).await;
    expect_bad_request(status, &body);
    assert_eq!(app.count_events(None).await, 0);
}

async fn a_body_that_is_not_a_graphql_request_is_a_bad_request(app: &TestApp) {
    for raw in ["{\"foo\": 1}", "42", "\"{ __typename }\"", "{\"query\": 7}"] {
        let (status, body) = app.post_graphql_raw(raw).await;
        expect_bad_request(status, &parse(&body));
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
    let (status, _) = app.post_graphql_raw(big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = app.post_graphql_raw(padded(1024 * 1024)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Just under the limit is served.
    let fits = padded(64 * 1024);
    let (status, body) = app.post_graphql_raw(fits).await;
    let body = parse(&body);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["__typename"], "Query");
}

async fn liveness_and_readiness_answer_ok(app: &TestApp) {
    let (status, _, _) = app.get("/health/live").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = app.get("/health/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let body: Value = serde_json::from_str(&body).expect("readiness is JSON");
    assert_eq!(body["status"], "ready", "{body}");
    let (status, _, _) = app.get("/health/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn metrics_count_commands_and_http_requests(app: &TestApp) {
    app.create_user("metered@example.com", "Metered").await;
    let (status, body) = app
        .gql(
            CREATE_USER,
            json!({ "input": { "email": "METERED@example.com", "displayName": "Again" } }),
        )
        .await;
    expect_error(status, &body, "EMAIL_TAKEN");
    let (status, headers, text) = app.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(content_type.starts_with("text/plain"), "{content_type}");
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

async fn graphiql_serves_html_in_development(app: &TestApp) {
    let (status, headers, body) = app.get("/graphiql").await;
    assert_eq!(status, StatusCode::OK);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(body.to_lowercase().contains("graphiql"), "{body}");
    assert!(body.contains("/graphql"), "{body}");
}

async fn responses_carry_a_correlation_id(app: &TestApp) {
    let request = axum::http::Request::post("/graphql")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-correlation-id", "test-correlation-1")
        .header(header::AUTHORIZATION, format!("Bearer {}", admin_token()))
        .body(axum::body::Body::from(
            json!({ "query": CREATE_USER, "variables": {
                "input": { "email": "corr@example.com", "displayName": "Corr" } } })
            .to_string(),
        ))
        .expect("a request");
    let (status, headers, body) = app.send(request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some("test-correlation-1")
    );
    let body = parse(&body);
    let id = id_of(&body["data"]["createUser"]);
    let events = app.user_events(id).await;
    assert_eq!(
        events[0].metadata.correlation_id.as_deref(),
        Some("test-correlation-1")
    );
    // Without one, the server makes one up.
    let request = axum::http::Request::post("/graphql")
        .header(header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(
            json!({ "query": "{ __typename }" }).to_string(),
        ))
        .expect("a request");
    let (_, headers, _) = app.send(request).await;
    let generated = headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(!generated.is_empty());
}
