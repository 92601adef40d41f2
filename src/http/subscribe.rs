//! `GET /graphql/ws`: the websocket upgrade, rate limited like a request, handing the
//! connection to a graphql-transport-ws session (`super::websocket`).

use async_graphql::http::{WebSocketProtocols, ALL_WEBSOCKET_PROTOCOLS};
use axum::extract::{FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pcf_domain::auth::Principal;

use super::ratelimit::Decision;
use super::respond::{client_address, rate_limited};
use super::state::HttpState;

/// graphql-transport-ws: the upgrade is rate limited like a request; the session
/// (`super::websocket`) is authenticated by `connection_init`
/// (`{"authorization": "Bearer …"}`) and refused without valid credentials.
pub async fn websocket(State(state): State<HttpState>, req: Request) -> Response {
    let client = client_address(&req, &state.trusted_proxies);
    if let Decision::Limited { retry_after } =
        state.limiter.check(&Principal::anonymous(), &client).await
    {
        return rate_limited(retry_after);
    }
    let (mut parts, _body) = req.into_parts();
    // The first subprotocol offered that async-graphql speaks.
    let protocol = parts
        .headers
        .get(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|offered| {
            offered
                .split(',')
                .find_map(|p| p.trim().parse::<WebSocketProtocols>().ok())
        });
    let Some(protocol) = protocol else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let upgrade = match <WebSocketUpgrade as FromRequestParts<HttpState>>::from_request_parts(
        &mut parts, &state,
    )
    .await
    {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let slot = parts
        .extensions
        .get::<std::sync::Arc<super::server::ConnectionSlot>>()
        .cloned();
    let shared = state.websocket.clone();
    let limit = shared.limits.message_limit;
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        // A frame over the limit is refused as its header arrives, before its payload is
        // read; a message of many frames, as it grows past the limit.
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            // The connection's place under the connection cap, kept while the socket lives.
            let _slot = slot;
            super::websocket::serve(socket, protocol, shared, client).await
        })
}
