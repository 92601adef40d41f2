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

/// Ready when every dependency answers; otherwise 503 naming the ones that do not. From the
/// moment the process begins to stop, 503 `shutting down`.
pub async fn ready(State(state): State<HttpState>) -> Response {
    if *state.stopping.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "shutting down" })),
        )
            .into_response();
    }
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
