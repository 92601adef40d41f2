//! The HTTP surface: `POST /graphql`, `GET /graphql/ws` (graphql-transport-ws), `/graphiql`,
//! health and metrics. Every GraphQL request is authenticated and rate limited first; a
//! refused request runs no resolver.

use async_graphql::http::{GraphiQLSource, WebSocketProtocols, ALL_WEBSOCKET_PROTOCOLS};
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pcf_command::CommandContext;
use pcf_domain::auth::Principal;
use pcf_domain::ErrorCode;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::app::Schemas;
use crate::auth::Authenticator;
use crate::health::Dependencies;
use crate::metrics::Metrics;
use crate::ratelimit::{Decision, RateLimiter};

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub schemas: Arc<Schemas>,
    pub dependencies: Arc<Dependencies>,
    pub metrics: Arc<Metrics>,
    pub authenticator: Arc<Authenticator>,
    pub limiter: Arc<RateLimiter>,
    pub trusted_proxies: Arc<Vec<IpAddr>>,
    pub graphiql: bool,
    pub body_limit: usize,
    /// The longest a client may take to send the request body.
    pub body_timeout: Duration,
    pub request_timeout: Duration,
    /// What websocket sessions share (`crate::websocket`).
    pub websocket: Arc<crate::websocket::Shared>,
}

/// The router, testable without a socket.
pub fn router(state: HttpState) -> Router {
    let mut router = Router::new()
        .route("/graphql", post(graphql))
        .route("/graphql/ws", get(websocket))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics));
    if state.graphiql {
        router = router.route("/graphiql", get(graphiql));
    }
    router.with_state(state)
}

/// A correlation id for a request that brought none: a random UUID of this process with a
/// counter in its last 48 bits, so unique without asking the kernel for randomness each
/// time.
pub(crate) fn new_correlation_id() -> String {
    static BASE: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    const NODE: u128 = (1 << 48) - 1;
    let base = *BASE.get_or_init(|| uuid::Uuid::new_v4().as_u128());
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u128;
    uuid::Uuid::from_u128((base & !NODE) | ((base + n) & NODE)).to_string()
}

/// A response carrying one GraphQL-shaped error.
fn request_error(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    let body =
        json!({ "errors": [{ "message": message, "extensions": { "code": code.as_str() } }] });
    (status, Json(body)).into_response()
}

/// 429 with `Retry-After`.
fn rate_limited(retry_after: u64) -> Response {
    let mut response = request_error(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::RateLimited,
        "too many requests; slow down",
    );
    if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
        response.headers_mut().insert("retry-after", v);
    }
    response
}

/// The client's address: the peer, or what a trusted proxy says in `X-Forwarded-For` (the
/// nearest address that is not itself a trusted proxy).
fn client_address(req: &Request, trusted: &[IpAddr]) -> String {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    forwarded_client(peer, req.headers(), trusted)
}

fn forwarded_client(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpAddr]) -> String {
    let Some(peer) = peer else {
        return "unknown".to_owned();
    };
    if !trusted.contains(&peer) {
        return peer.to_string();
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .collect::<Vec<_>>();
    forwarded
        .into_iter()
        .rev()
        .find(|ip| !trusted.contains(ip))
        .unwrap_or(peer)
        .to_string()
}

/// Authenticates and rate-limits; the error is the response to send.
async fn admit(
    state: &HttpState,
    headers: &HeaderMap,
    client: &str,
) -> Result<Principal, (Response, &'static str)> {
    let principal = match state.authenticator.authenticate(headers) {
        Ok(p) => p,
        Err(e) => {
            // Counted, so that a flood of bad credentials is answered 429 like any other.
            if let Decision::Limited { retry_after } =
                state.limiter.refused_credentials(client).await
            {
                return Err((rate_limited(retry_after), "rate_limited"));
            }
            tracing::info!(reason = %e, "credentials refused");
            let mut response = request_error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthenticated,
                "the credentials are not valid",
            );
            response
                .headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return Err((response, "unauthenticated"));
        }
    };
    if let Decision::Limited { retry_after } = state.limiter.check(&principal, client).await {
        return Err((rate_limited(retry_after), "rate_limited"));
    }
    Ok(principal)
}

/// Whether a request's `Content-Type` is one a GraphQL request over HTTP may have. Only
/// JSON runs: a browser sends a cross-site form or `text/plain` without asking the server
/// first (a "simple request"), so accepting those would let any page sign people up.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("application/graphql-response+json")
}

async fn graphql(State(state): State<HttpState>, req: Request) -> Response {
    let started = Instant::now();
    let client = client_address(&req, &state.trusted_proxies);
    let (parts, body) = req.into_parts();
    let (response, outcome) = if !json_content_type(&parts.headers) {
        (
            request_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::BadRequest,
                "send the request as JSON (content-type: application/json)",
            ),
            "unsupported_media_type",
        )
    } else {
        match admit(&state, &parts.headers, &client).await {
            Ok(principal) => execute(&state, principal, parts.headers, body).await,
            Err(refused) => refused,
        }
    };
    state
        .metrics
        .http_request("/graphql", outcome, started.elapsed());
    response
}

async fn execute(
    state: &HttpState,
    principal: Principal,
    headers: HeaderMap,
    body: Body,
) -> (Response, &'static str) {
    let read = axum::body::to_bytes(body, state.body_limit);
    let body = match tokio::time::timeout(state.body_timeout, read).await {
        Ok(Ok(b)) => b,
        Err(_) => {
            return (
                request_error(
                    StatusCode::REQUEST_TIMEOUT,
                    ErrorCode::BadRequest,
                    "the request body took too long to arrive",
                ),
                "body_timeout",
            )
        }
        Ok(Err(_)) => {
            return (
                request_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::BadRequest,
                    "the request body is too large",
                ),
                "too_large",
            )
        }
    };
    // Decoded straight into the request; only a body that does not decode is looked at
    // again, to say what is wrong with it.
    let batched = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[');
    let decoded = if batched {
        None
    } else {
        serde_json::from_slice::<async_graphql::Request>(&body).ok()
    };
    let Some(request) = decoded else {
        let message = if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            "the body is not valid JSON"
        } else if batched {
            "batched requests are not supported; send one operation per request"
        } else {
            "the body must be a GraphQL request: {\"query\": ..., \"variables\": ...}"
        };
        return (
            request_error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message),
            "bad_request",
        );
    };
    let correlation_id = headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(new_correlation_id);
    let request = request
        .data(CommandContext {
            correlation_id: Some(correlation_id.clone()),
            actor: None,
        })
        .data(principal);
    let mut known = None;
    let mut response = match state.schemas.documents.admit(request) {
        Err(refused) => async_graphql::Response::from_errors(vec![refused]),
        Ok((request, k)) => {
            let schema = match &k {
                Some(k) if k.fast(&request) => &state.schemas.http_fast,
                _ => {
                    known = k;
                    &state.schemas.http
                }
            };
            let executed = schema.execute(request);
            let Ok(response) = tokio::time::timeout(state.request_timeout, executed).await else {
                tracing::warn!("request timed out");
                return (
                    request_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::Unavailable,
                        "the request took too long",
                    ),
                    "timeout",
                );
            };
            response
        }
    };
    // Errors without a code come from GraphQL itself, not from a resolver: syntax,
    // validation, limits, arguments that do not fit their types. They are the client's:
    // they get a code, and when nothing else came back, a 400.
    let from_graphql = |e: &async_graphql::ServerError| {
        e.extensions
            .as_ref()
            .is_none_or(|ext| ext.get("code").is_none())
    };
    let rejected = !response.errors.is_empty()
        && response.data == async_graphql::Value::Null
        && response.errors.iter().all(from_graphql);
    // A document that ran through the full validation without an error from GraphQL
    // itself may skip it from now on, for variables that certainly fit.
    if let Some(known) = known {
        if !response.errors.iter().any(from_graphql) {
            known.validated();
        }
    }
    for e in &mut response.errors {
        if !from_graphql(e) {
            continue;
        }
        let code = if e.message.contains("too complex")
            || e.message.contains("too deep")
            || e.message.contains("too many aliases")
        {
            ErrorCode::QueryTooComplex
        } else {
            ErrorCode::BadRequest
        };
        e.extensions
            .get_or_insert_with(Default::default)
            .set("code", code.as_str());
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

/// graphql-transport-ws: the upgrade is rate limited like a request; the session
/// (`crate::websocket`) is authenticated by `connection_init`
/// (`{"authorization": "Bearer …"}`) and refused without valid credentials.
async fn websocket(State(state): State<HttpState>, req: Request) -> Response {
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
    let shared = state.websocket.clone();
    let limit = shared.limits.message_limit;
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        // A frame over the limit is refused as its header arrives, before its payload is
        // read; a message of many frames, as it grows past the limit.
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| crate::websocket::serve(socket, protocol, shared, client))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_are_version_4_uuids_and_differ() {
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| new_correlation_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
        }
    }
}
