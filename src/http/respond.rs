//! What the handlers answer with and know of a request: GraphQL-shaped error responses, the
//! client's address (behind trusted proxies) and correlation ids.

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pcf_domain::ErrorCode;
use std::net::{IpAddr, SocketAddr};

/// A correlation id for a request that brought none: a random UUID of this process with a
/// counter in its last 48 bits, so unique without asking the kernel for randomness each
/// time.
pub fn new_correlation_id() -> String {
    static BASE: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    const NODE: u128 = (1 << 48) - 1;
    let base = *BASE.get_or_init(|| uuid::Uuid::new_v4().as_u128());
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u128;
    uuid::Uuid::from_u128((base & !NODE) | ((base + n) & NODE)).to_string()
}

/// A response carrying one GraphQL-shaped error.
pub fn request_error(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    let body = pcf_adapters::errors::refusal_body(code, message);
    (status, Json(body)).into_response()
}

/// 429 with `Retry-After`.
pub fn rate_limited(retry_after: u64) -> Response {
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
pub fn client_address(req: &Request, trusted: &[IpAddr]) -> String {
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
