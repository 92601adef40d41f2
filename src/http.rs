//! The HTTP surface: `POST /graphql`, `/graphiql`, health and metrics.

use async_graphql::http::GraphiQLSource;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pcf_command::CommandContext;
use pcf_domain::ErrorCode;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

use crate::app::PcfSchema;
use crate::health::Dependencies;
use crate::metrics::Metrics;

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub schema: PcfSchema,
    pub dependencies: Arc<Dependencies>,
    pub metrics: Arc<Metrics>,
    pub graphiql: bool,
    pub body_limit: usize,
}

/// The router, testable without a socket.
pub fn router(state: HttpState) -> Router {
    let limit = state.body_limit;
    let mut router = Router::new()
        .route("/graphql", post(graphql))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics));
    if state.graphiql {
        router = router.route("/graphiql", get(graphiql));
    }
    router.layer(DefaultBodyLimit::max(limit)).with_state(state)
}

/// A response carrying one GraphQL-shaped error.
fn request_error(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    let body =
        json!({ "errors": [{ "message": message, "extensions": { "code": code.as_str() } }] });
    (status, Json(body)).into_response()
}

async fn graphql(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let (response, outcome) = execute(&state, &headers, body).await;
    state
        .metrics
        .http_request("/graphql", outcome, started.elapsed());
    response
}

async fn execute(state: &HttpState, headers: &HeaderMap, body: Bytes) -> (Response, &'static str) {
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => {
            return (
                request_error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "the body is not valid JSON",
                ),
                "bad_request",
            )
        }
    };
    if value.is_array() {
        return (
            request_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                "batched requests are not supported; send one operation per request",
            ),
            "bad_request",
        );
    }
    let request: async_graphql::Request = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(_) => {
            return (
                request_error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "the body must be a GraphQL request: {\"query\": ..., \"variables\": ...}",
                ),
                "bad_request",
            )
        }
    };
    let correlation_id = headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let request = request.data(CommandContext {
        correlation_id: Some(correlation_id.clone()),
        actor: None,
    });
    let mut response = state.schema.execute(request).await;
    // Errors that stopped the request before any resolver ran (syntax, validation, limits)
    // carry no path; they are the client's fault: 400, with a code.
    let rejected = !response.errors.is_empty()
        && response.data == async_graphql::Value::Null
        && response.errors.iter().all(|e| e.path.is_empty());
    if rejected {
        for e in &mut response.errors {
            let code = if e.message.contains("too complex") || e.message.contains("too deep") {
                ErrorCode::QueryTooComplex
            } else {
                ErrorCode::BadRequest
            };
            let ext = e.extensions.get_or_insert_with(Default::default);
            if ext.get("code").is_none() {
                ext.set("code", code.as_str());
            }
        }
    }
    let status = if rejected {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let outcome = if rejected {
        "bad_request"
    } else if response.errors.is_empty() {
        "ok"
    } else {
        "error"
    };
    let mut http = (status, Json(response)).into_response();
    if let Ok(v) = HeaderValue::from_str(&correlation_id) {
        http.headers_mut().insert("x-correlation-id", v);
    }
    (http, outcome)
}

/// GraphiQL, pointed at `/graphql` and `/graphql/ws`.
async fn graphiql() -> Html<String> {
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .title("PCF")
            .finish(),
    )
}

async fn live() -> &'static str {
    "ok"
}

/// Ready when every dependency answers; otherwise 503 naming the ones that do not.
async fn ready(State(state): State<HttpState>) -> Response {
    let down = state.dependencies.down().await;
    if down.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "down": down })),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render().await,
    )
        .into_response()
}
