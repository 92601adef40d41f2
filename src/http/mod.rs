//! The HTTP surface and what guards it: the router (`POST /graphql`, `GET /graphql/ws`
//! (graphql-transport-ws), `/graphiql`, health and metrics), the server loop with its
//! connection limits, authentication, rate limits, document limits, the GraphQL schema and
//! websocket sessions. Every GraphQL request is authenticated and rate limited first; a
//! refused request runs no resolver.

pub mod auth;
pub mod graphql;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod probes;
pub mod ratelimit;
pub mod respond;
pub mod schema;
pub mod server;
pub mod state;
pub mod subscribe;
pub mod websocket;

use axum::routing::{get, post};
use axum::Router;

pub use state::HttpState;

/// The router, testable without a socket.
pub fn router(state: HttpState) -> Router {
    let mut router = Router::new()
        .route("/graphql", post(graphql::graphql))
        .route("/graphql/ws", get(subscribe::websocket))
        .route("/health/live", get(probes::live))
        .route("/health/ready", get(probes::ready))
        .route("/metrics", get(probes::metrics));
    if state.graphiql {
        router = router.route("/graphiql", get(probes::graphiql));
    }
    if crate::telemetry::exporting() {
        router = router.layer(axum::middleware::from_fn(traced));
    }
    router.with_state(state)
}

/// Each request in a span of its own (only while traces are exported), the child of the
/// caller's span when the request carries a W3C `traceparent` (a malformed one is ignored).
async fn traced(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let span = tracing::debug_span!(
        "http.request",
        otel.kind = "server",
        otel.name = %format_args!("{method} {path}"),
        http.request.method = %method,
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
    );
    if let Some(parent) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        pcf_adapters::trace::set_parent(&span, parent);
    }
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}
