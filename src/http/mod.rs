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
    router.with_state(state)
}
