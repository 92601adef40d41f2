//! Rate limits (CONTRACT.md): per minute, 1000 anonymous requests per client address, 5000
//! per authenticated subject, 10000 for tier `premium`; over the limit HTTP 429 with
//! `Retry-After` and `RATE_LIMITED`. `X-Forwarded-For` counts only from a trusted proxy. The
//! windows are fixed minutes, so each burst first makes sure enough of the minute is left.

use crate::support::*;
use axum::http::StatusCode;
use pcf::config::RateLimits;
use serde_json::json;

const PING: &str = "{ __typename }";

fn limits(anonymous: u32, authenticated: u32, premium: u32) -> RateLimits {
    RateLimits {
        anonymous,
        authenticated,
        premium,
        failed_auth: 60,
    }
}

/// An embedded app with the limits `anonymous`, `authenticated` and `premium` per minute, in a
/// rate-limit window with at least 5 s left.
async fn app_limited_to(anonymous: u32, authenticated: u32, premium: u32) -> TestApp {
    let app = TestApp::with(|c| c.rate_limits = limits(anonymous, authenticated, premium)).await;
    fresh_window(5).await;
    app
}

#[track_caller]
fn allowed(r: &Resp, what: &str) {
    assert_eq!(r.status, StatusCode::OK, "{what}: {}", r.text);
    assert!(!r.has_errors(), "{what}: {}", r.text);
}

#[track_caller]
fn limited(r: &Resp, what: &str) {
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{what}: {}",
        r.text
    );
    assert_eq!(r.codes(), vec!["RATE_LIMITED"], "{what}: {}", r.text);
    let retry_after: u64 = r
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no numeric Retry-After: {:?}", r.headers));
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
}

/// Sends `n` requests, the `i`th (from 1) made by `request(i)`, and asserts each is allowed;
/// a failure names `who` and the request's number.
async fn assert_allowed(api: &TestApp, who: &str, n: usize, request: impl Fn(usize) -> Gql) {
    for i in 1..=n {
        allowed(&api.send(request(i)).await, &format!("{who} {i}"));
    }
}

/// Uses up a limit of `limit` requests: the first `limit` made by `request` are allowed, the
/// next one is limited.
async fn use_up(api: &TestApp, who: &str, limit: usize, request: impl Fn(usize) -> Gql) {
    assert_allowed(api, who, limit, &request).await;
    let next = limit + 1;
    limited(&api.send(request(next)).await, &format!("{who} {next}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_1001st_anonymous_request_in_a_minute_is_refused() {
    let api = TestApp::start().await;
    assert_eq!(api.config.rate_limits.anonymous, 1000);
    fresh_window(10).await;
    assert_allowed(&api, "request", 1000, |_| {
        Gql::new(PING).peer("198.51.100.7:5000")
    })
    .await;
    let r = api.send(Gql::new(PING).peer("198.51.100.7:5001")).await;
    limited(&r, "request 1001");
    // Another address is counted on its own.
    let r = api.send(Gql::new(PING).peer("198.51.100.8:5000")).await;
    allowed(&r, "another address");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_requests_are_counted_per_address() {
    let api = app_limited_to(5, 100, 100).await;
    assert_allowed(&api, "A", 5, |_| Gql::new(PING).peer("203.0.113.1:1000")).await;
    // A new port of the same host is the same client.
    for (n, peer) in [(6, "203.0.113.1:1001"), (7, "203.0.113.1:1002")] {
        limited(
            &api.send(Gql::new(PING).peer(peer)).await,
            &format!("A {n}"),
        );
    }
    use_up(&api, "B", 5, |_| Gql::new(PING).peer("203.0.113.2:1000")).await;
    // IPv6 clients too.
    use_up(&api, "v6", 5, |_| Gql::new(PING).peer("[2001:db8::1]:443")).await;
    // A signed-in caller from a limited address is counted by subject instead.
    let r = api
        .send(
            Gql::new(PING)
                .peer("203.0.113.1:1000")
                .bearer(&token("someone", &[])),
        )
        .await;
    allowed(&r, "signed in from A");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_request_runs_nothing() {
    let api = app_limited_to(2, 100, 100).await;
    assert_allowed(&api, "ping", 2, |_| Gql::new(PING)).await;
    let r = api
        .send(Gql::vars(
            CREATE_USER,
            json!({ "input": { "email": "late@example.com", "displayName": "Late" } }),
        ))
        .await;
    limited(&r, "createUser over the limit");
    assert!(r.data().is_null());
    assert_eq!(api.event_count().await, 0, "a limited createUser appended");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_from_an_untrusted_peer_does_not_dodge_the_limit() {
    // 10.0.0.9 is a trusted proxy; the client below is not it.
    let api = TestApp::with(|c| {
        c.rate_limits = limits(5, 100, 100);
        c.trusted_proxies = vec!["10.0.0.9".parse().unwrap()];
    })
    .await;
    fresh_window(5).await;
    assert_allowed(&api, "forwarded for", 5, |i| {
        Gql::new(PING)
            .peer("203.0.113.50:4000")
            .header("x-forwarded-for", &format!("198.18.0.{i}"))
    })
    .await;
    for spoof in [
        "198.18.0.99",
        "10.0.0.9",
        "198.18.0.100, 10.0.0.9",
        "unknown",
        "203.0.113.51",
    ] {
        let r = api
            .send(
                Gql::new(PING)
                    .peer("203.0.113.50:4000")
                    .header("x-forwarded-for", spoof)
                    .header("x-real-ip", "198.18.1.1")
                    .header("forwarded", "for=198.18.1.2"),
            )
            .await;
        limited(&r, &format!("spoofed {spoof:?}"));
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_from_a_trusted_proxy_counts_each_client() {
    let api = TestApp::with(|c| {
        c.rate_limits = limits(5, 100, 100);
        c.trusted_proxies = vec!["10.0.0.9".parse().unwrap(), "10.0.0.10".parse().unwrap()];
    })
    .await;
    fresh_window(5).await;
    let via_proxy = |xff: &str| {
        Gql::new(PING)
            .peer("10.0.0.9:50000")
            .header("x-forwarded-for", xff)
    };
    use_up(&api, "client 1,", 5, |_| via_proxy("198.51.100.1")).await;
    // Another client behind the same proxy has its own count.
    use_up(&api, "client 2,", 5, |_| via_proxy("198.51.100.2")).await;
    // What the client itself wrote before the proxy appended its address does not count:
    // the nearest untrusted address is the client.
    assert_allowed(&api, "client 3,", 5, |i| {
        via_proxy(&format!("192.0.2.{i}, 198.51.100.3"))
    })
    .await;
    limited(
        &api.send(via_proxy("192.0.2.77, 198.51.100.3")).await,
        "client 3, 6",
    );
    // Through a chain of two trusted proxies, the client is still the one counted.
    limited(
        &api.send(via_proxy("198.51.100.3, 10.0.0.10")).await,
        "client 3 through two proxies",
    );
    allowed(
        &api.send(via_proxy("198.51.100.4, 10.0.0.10")).await,
        "client 4 through two proxies",
    );
    // The proxy's own requests (no header) are the proxy's: still allowed.
    allowed(
        &api.send(Gql::new(PING).peer("10.0.0.9:50000")).await,
        "the proxy itself",
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn premium_subjects_get_a_higher_limit_than_standard_ones() {
    let api = app_limited_to(2, 3, 6).await;
    let standard = token("standard-subject", &[]);
    let premium = token_with_tier("premium-subject", &[], Some("premium"));
    use_up(&api, "standard", 3, |_| Gql::new(PING).bearer(&standard)).await;
    use_up(&api, "premium", 6, |_| Gql::new(PING).bearer(&premium)).await;
    // An unknown tier is standard.
    let gold = token_with_tier("gold-subject", &[], Some("gold"));
    use_up(&api, "gold", 3, |_| Gql::new(PING).bearer(&gold)).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_requests_are_counted_per_subject_not_per_address() {
    let api = app_limited_to(100, 3, 6).await;
    let t = token("roaming-subject", &[]);
    // Each request from another address: the fourth is limited.
    use_up(&api, "address", 3, |i| {
        Gql::new(PING).bearer(&t).peer(&format!("192.0.2.{i}:1"))
    })
    .await;
    // A fresh token of the same subject shares the count.
    let again = token("roaming-subject", &["auditor"]);
    limited(
        &api.send(Gql::new(PING).bearer(&again)).await,
        "same subject",
    );
    // Another subject from the same address is not limited.
    allowed(
        &api.send(
            Gql::new(PING)
                .bearer(&token("other-subject", &[]))
                .peer("192.0.2.1:1"),
        )
        .await,
        "other subject",
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_limited_per_key_with_their_tier() {
    const KEY: &str = "pcf-ratelimit-test-key";
    const PREMIUM_KEY: &str = "pcf-ratelimit-test-premium-key";
    let api = TestApp::with_files(|c, files| {
        let path = files.join("keys.toml");
        std::fs::write(
            &path,
            format!(
                "[[keys]]\nname = \"svc\"\nsha256 = \"{}\"\nroles = [\"analytics\"]\n\n\
                 [[keys]]\nname = \"svc-premium\"\nsha256 = \"{}\"\nroles = [\"analytics\"]\ntier = \"premium\"\n",
                sha256_hex(KEY),
                sha256_hex(PREMIUM_KEY)
            ),
        )
        .unwrap();
        c.api_keys_file = Some(path);
        c.rate_limits = limits(100, 2, 4);
    })
    .await;
    fresh_window(5).await;
    assert_allowed(&api, "key", 2, |_| {
        Gql::new(PING).auth(Auth::ApiKeyHeader(KEY.into()))
    })
    .await;
    let r = api
        .send(Gql::new(PING).auth(Auth::Raw(format!("ApiKey {KEY}"))))
        .await;
    limited(&r, "key 3");
    use_up(&api, "premium key", 4, |_| {
        Gql::new(PING).auth(Auth::ApiKeyHeader(PREMIUM_KEY.into()))
    })
    .await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_upgrade_is_rate_limited_by_address() {
    let api = app_limited_to(2, 100, 100).await;
    let ws_upgrade = || {
        let mut request = axum::http::Request::get("/graphql/ws")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-protocol", "graphql-transport-ws")
            .body(axum::body::Body::empty())
            .unwrap();
        request.extensions_mut().insert(axum::extract::ConnectInfo(
            "198.51.100.200:1234"
                .parse::<std::net::SocketAddr>()
                .unwrap(),
        ));
        request
    };
    for _ in 0..2 {
        let r = api.send_request(ws_upgrade()).await;
        assert_ne!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    }
    let r = api.send_request(ws_upgrade()).await;
    limited(&r, "third upgrade");
    api.stop().await;
}

/// Shared through Redis: two instances with the same Redis count together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_redis_share_the_count() {
    let redis = RedisPrefix::fresh();
    let tune = |c: &mut pcf::Config| {
        c.rate_limits = limits(5, 100, 100);
        c.redis_url = Some(redis.url.clone());
        c.redis_prefix = redis.prefix.clone();
    };
    let one = TestApp::with(tune).await;
    let two = TestApp::with(tune).await;
    fresh_window(5).await;
    assert_allowed(&one, "one", 3, |_| Gql::new(PING)).await;
    assert_allowed(&two, "two", 2, |_| Gql::new(PING)).await;
    limited(&two.send(Gql::new(PING)).await, "two 6");
    limited(&one.send(Gql::new(PING)).await, "one 7");
    one.stop().await;
    two.stop().await;
    redis.delete_keys().await;
}
