//! GraphiQL (development only), liveness, readiness and the Prometheus metrics.

use async_graphql::http::GraphiQLSource;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::state::HttpState;

pub async fn graphiql() -> Html<String> {
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .title("PCF")
            .finish(),
    )
}

pub async fn live() -> &'static str {
    "ok"
}

/// Ready (200) unless a dependency the process cannot serve without is down: then 503 naming
/// it. A dependency it serves without (Redis, some of several read replicas) is named as
/// `degraded`, with 200. From the moment the process begins to stop, 503 `shutting down`.
pub async fn ready(State(state): State<HttpState>) -> Response {
    if *state.stopping.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "shutting down" })),
        )
            .into_response();
    }
    let health = state.dependencies.health().await;
    let mut body = json!({ "status": "ready" });
    if !health.degraded.is_empty() {
        body = json!({ "status": "degraded", "degraded": health.degraded });
    }
    if health.down.is_empty() {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        body["status"] = json!("unavailable");
        body["down"] = json!(health.down);
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

pub async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        state.metrics.render(&state.dependencies).await,
    )
        .into_response()
}
