//! Rate limits per minute (fixed one-minute windows): per client address when anonymous,
//! per subject when authenticated. Counted in Redis when configured, so that every instance
//! shares the count; in process otherwise (and while Redis is unreachable).
//!
//! An instance does not ask Redis on every request: it takes a share of the window's
//! budget at once (`INCRBY`), a sixteenth of what was left in Redis at its last look (one
//! request when it has not looked yet in this window), and spends it locally. Near the
//! limit the shares shrink to one request, so the limit itself is never exceeded; far from
//! it, one round trip serves many requests. Tokens taken and not spent count as used: when
//! a client's requests stick to some instances, the tokens other instances hold (at most a
//! sixteenth of what was left, per instance) are lost to it for the window, so instances
//! together may refuse somewhat early, never late.

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest,
};
use async_graphql::ServerResult;
use pcf_adapters::redis::RedisConnection;
use pcf_domain::auth::{Principal, Tier};
use redis::Script;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::RateLimits;

/// Takes up to `ARGV[1]` tokens of a window whose limit is `ARGV[2]`; returns how many were
/// granted and how many are left in the window. The key (the count taken so far) expires
/// with the window.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local want = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local n = redis.call('INCRBY', KEYS[1], want)
if n == want then redis.call('EXPIRE', KEYS[1], 61) end
local before = n - want
local granted = 0
if before < limit then granted = math.min(want, limit - before) end
return {granted, math.max(0, limit - n)}
"#,
    )
});

/// The most tokens taken in one round trip.
const MAX_SHARE: u64 = 1000;

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Over the limit; retry after this many seconds (the rest of the window).
    Limited {
        retry_after: u64,
    },
}

/// What this instance holds of one key's window.
#[derive(Debug, Clone, Copy)]
struct Budget {
    window: u64,
    /// Requests counted in process (without Redis) in this window.
    counted: u64,
    /// Tokens taken from the shared count and not spent yet.
    tokens: u64,
    /// Whether the shared count of this window has been used up.
    exhausted: bool,
    /// What was left of the shared count at the last look, for the size of the next share.
    left: Option<u64>,
}

impl Budget {
    fn new(window: u64) -> Self {
        Self {
            window,
            counted: 0,
            tokens: 0,
            exhausted: false,
            left: None,
        }
    }
}

/// Requests refused, by the limit that refused them (for metrics).
#[derive(Debug, Default)]
pub struct Refusals {
    /// Anonymous requests, per client address.
    pub anonymous: AtomicU64,
    /// Authenticated requests of the standard tier, per subject.
    pub authenticated: AtomicU64,
    /// Requests of the premium tier, per subject.
    pub premium: AtomicU64,
    /// Requests with refused credentials, per client address.
    pub failed_auth: AtomicU64,
}

/// Counts requests.
pub struct RateLimiter {
    limits: RateLimits,
    refusals: Arc<Refusals>,
    redis: Option<(RedisConnection, String)>,
    budgets: Mutex<HashMap<String, Budget>>,
    /// After Redis fails, count locally until then instead of waiting on it per request.
    redis_down_until: Mutex<Option<std::time::Instant>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How many tokens to ask for when `left` remained of the shared count at the last look:
/// a sixteenth of it, at least one; one when this window has not been looked at yet.
fn share(left: Option<u64>) -> u64 {
    left.map_or(1, |left| (left / 16).clamp(1, MAX_SHARE))
}

impl RateLimiter {
    /// `redis`: a connection and the key prefix to count under.
    pub fn new(limits: RateLimits, redis: Option<(RedisConnection, String)>) -> Self {
        Self {
            limits,
            refusals: Arc::default(),
            redis,
            budgets: Mutex::new(HashMap::new()),
            redis_down_until: Mutex::new(None),
        }
    }

    /// The requests refused so far, by limit.
    pub fn refusals(&self) -> Arc<Refusals> {
        self.refusals.clone()
    }

    /// The limit that applies to a caller, the key it is counted under, and the counter of
    /// its refusals.
    fn bucket(&self, principal: &Principal, client: &str) -> (u32, String, &AtomicU64) {
        let r = &self.refusals;
        match (&principal.subject, principal.tier) {
            (Some(sub), Tier::Premium) => (self.limits.premium, format!("sub:{sub}"), &r.premium),
            (Some(sub), Tier::Standard) => (
                self.limits.authenticated,
                format!("sub:{sub}"),
                &r.authenticated,
            ),
            (None, _) => (
                self.limits.anonymous,
                format!("addr:{client}"),
                &r.anonymous,
            ),
        }
    }

    /// Counts one request of `principal` from address `client`.
    pub async fn check(&self, principal: &Principal, client: &str) -> Decision {
        let (limit, key, refused) = self.bucket(principal, client);
        let decision = self.count(limit, &key).await;
        if decision != Decision::Allowed {
            refused.fetch_add(1, Ordering::Relaxed);
        }
        decision
    }

    /// Counts a request whose credentials were refused: as an anonymous request of its
    /// address, and against the stricter limit of refused credentials per address, so
    /// that guessing credentials is slow and flooding with bad ones is answered 429.
    pub async fn refused_credentials(&self, client: &str) -> Decision {
        let anonymous = self.check(&Principal::anonymous(), client).await;
        let failed = self
            .count(self.limits.failed_auth, &format!("authfail:{client}"))
            .await;
        if anonymous == Decision::Allowed && failed != Decision::Allowed {
            self.refusals.failed_auth.fetch_add(1, Ordering::Relaxed);
        }
        match (anonymous, failed) {
            (Decision::Allowed, Decision::Allowed) => Decision::Allowed,
            (Decision::Limited { retry_after }, _) | (_, Decision::Limited { retry_after }) => {
                Decision::Limited { retry_after }
            }
        }
    }

    async fn count(&self, limit: u32, key: &str) -> Decision {
        let limit = u64::from(limit);
        let now = unix_now();
        let window = now / 60;
        let allowed = match self.spend_token(key, window) {
            Some(allowed) => allowed,
            None => match self.take_shared(key, window, limit).await {
                Some(allowed) => allowed,
                None => self.count_local(key, window) <= limit,
            },
        };
        if allowed {
            Decision::Allowed
        } else {
            Decision::Limited {
                retry_after: 60 - now % 60,
            }
        }
    }

    fn budgets(&self) -> std::sync::MutexGuard<'_, HashMap<String, Budget>> {
        self.budgets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers from what this instance already holds of the shared count: `Some(true)` spends
    /// a token, `Some(false)` when the window's count is used up, `None` to ask Redis.
    fn spend_token(&self, key: &str, window: u64) -> Option<bool> {
        self.redis.as_ref()?;
        let mut budgets = self.budgets();
        let budget = budgets.get_mut(key).filter(|b| b.window == window)?;
        if budget.tokens > 0 {
            budget.tokens -= 1;
            return Some(true);
        }
        budget.exhausted.then_some(false)
    }

    /// Takes a share of the shared count and spends one token of it; `None` when Redis is
    /// not configured or unreachable.
    async fn take_shared(&self, key: &str, window: u64, limit: u64) -> Option<bool> {
        let (conn, prefix) = self.redis.as_ref()?;
        let now = std::time::Instant::now();
        {
            let mut down = self
                .redis_down_until
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match *down {
                Some(until) if now < until => return None,
                Some(_) => *down = None,
                None => {}
            }
        }
        let left = self
            .budgets()
            .get(key)
            .filter(|b| b.window == window)
            .and_then(|b| b.left);
        let want = share(left);
        let result: Result<(u64, u64), _> = TAKE
            .key(format!("{prefix}:ratelimit:{window}:{key}"))
            .arg(want)
            .arg(limit)
            .invoke_async(&mut conn.clone())
            .await;
        match result {
            Ok((granted, left)) => {
                let mut budgets = self.budgets();
                Self::forget_old(&mut budgets, window);
                let budget = budgets
                    .entry(key.to_owned())
                    .or_insert_with(|| Budget::new(window));
                if budget.window < window {
                    *budget = Budget::new(window);
                }
                if budget.window != window {
                    // A later window began while this answer was on its way; it belongs to
                    // a window that is over, and so does this request.
                    return Some(granted > 0);
                }
                budget.left = Some(left);
                if granted == 0 {
                    budget.exhausted = true;
                    return Some(false);
                }
                // One token is this request's.
                budget.tokens += granted - 1;
                Some(true)
            }
            Err(e) => {
                tracing::warn!(error = %e, "rate limit counting in Redis failed; counting locally for 5 s");
                *self
                    .redis_down_until
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) =
                    Some(now + std::time::Duration::from_secs(5));
                None
            }
        }
    }

    /// Old windows are worthless; drop them rather than grow without bound.
    fn forget_old(budgets: &mut HashMap<String, Budget>, window: u64) {
        if budgets.len() > 100_000 {
            budgets.retain(|_, b| b.window == window);
        }
    }

    fn count_local(&self, key: &str, window: u64) -> u64 {
        let mut budgets = self.budgets();
        Self::forget_old(&mut budgets, window);
        let budget = budgets
            .entry(key.to_owned())
            .or_insert_with(|| Budget::new(window));
        if budget.window != window {
            *budget = Budget::new(window);
        }
        budget.counted = budget.counted.saturating_add(1);
        budget.counted
    }
}

/// Marks a websocket connection: who opened it and from where.
#[derive(Debug, Clone)]
pub struct WebSocketClient {
    pub principal: Principal,
    pub address: String,
}

/// Counts every operation sent over a websocket against the connection's limit (HTTP
/// requests are counted before they reach the schema).
pub struct WebSocketLimit(pub std::sync::Arc<RateLimiter>);

impl ExtensionFactory for WebSocketLimit {
    fn create(&self) -> std::sync::Arc<dyn Extension> {
        std::sync::Arc::new(WebSocketLimitExtension(self.0.clone()))
    }
}

struct WebSocketLimitExtension(std::sync::Arc<RateLimiter>);

#[async_trait::async_trait]
impl Extension for WebSocketLimitExtension {
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        request: async_graphql::Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<async_graphql::Request> {
        if let Some(client) = ctx.data_opt::<WebSocketClient>() {
            if let Decision::Limited { retry_after } =
                self.0.check(&client.principal, &client.address).await
            {
                let mut error = pcf_adapters::errors::server_error(
                    pcf_domain::ErrorCode::RateLimited,
                    format!("too many requests; retry in {retry_after} s"),
                    None,
                );
                if let Some(ext) = error.extensions.as_mut() {
                    ext.set("retryAfter", retry_after);
                }
                return Err(error);
            }
        }
        next.run(ctx, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A limiter with these per-minute limits: anonymous, authenticated, premium, failed auth.
    fn limiter(anonymous: u32, authenticated: u32, premium: u32, failed_auth: u32) -> RateLimiter {
        let limits = RateLimits {
            anonymous,
            authenticated,
            premium,
            failed_auth,
        };
        RateLimiter::new(limits, None)
    }

    #[test]
    fn a_share_is_a_sixteenth_of_what_was_left_and_one_before_the_first_look() {
        assert_eq!(share(None), 1);
        assert_eq!(share(Some(0)), 1);
        assert_eq!(share(Some(15)), 1);
        assert_eq!(share(Some(160)), 10);
        assert_eq!(share(Some(u64::from(u32::MAX))), MAX_SHARE);
    }

    #[tokio::test]
    async fn the_request_over_the_limit_is_refused_with_a_retry_time() {
        let limiter = limiter(3, 5, 10, 60);
        let anon = Principal::anonymous();
        for _ in 0..3 {
            assert_eq!(limiter.check(&anon, "10.0.0.1").await, Decision::Allowed);
        }
        match limiter.check(&anon, "10.0.0.1").await {
            Decision::Limited { retry_after } => assert!((1..=60).contains(&retry_after)),
            Decision::Allowed => panic!("the 4th request must be limited"),
        }
        // Another address has its own count.
        assert_eq!(limiter.check(&anon, "10.0.0.2").await, Decision::Allowed);
    }

    #[tokio::test]
    async fn refused_credentials_count_as_anonymous_and_against_their_own_limit() {
        let limiter = limiter(100, 100, 100, 3);
        for _ in 0..3 {
            assert_eq!(
                limiter.refused_credentials("10.0.0.1").await,
                Decision::Allowed
            );
        }
        assert!(matches!(
            limiter.refused_credentials("10.0.0.1").await,
            Decision::Limited { .. }
        ));
        // Each refusal also spent one of the address's anonymous requests.
        let anon = Principal::anonymous();
        for _ in 0..96 {
            assert_eq!(limiter.check(&anon, "10.0.0.1").await, Decision::Allowed);
        }
        assert!(matches!(
            limiter.check(&anon, "10.0.0.1").await,
            Decision::Limited { .. }
        ));
    }

    #[tokio::test]
    async fn premium_subjects_get_the_higher_limit() {
        let limiter = limiter(1, 2, 4, 60);
        let premium = Principal {
            subject: Some("p".into()),
            tier: Tier::Premium,
            ..Principal::default()
        };
        for _ in 0..4 {
            assert_eq!(limiter.check(&premium, "x").await, Decision::Allowed);
        }
        assert!(matches!(
            limiter.check(&premium, "x").await,
            Decision::Limited { .. }
        ));
    }

    #[tokio::test]
    async fn refusals_are_counted_by_the_limit_that_refused() {
        let limiter = limiter(1, 1, 1, 1);
        let standard = Principal {
            subject: Some("s".into()),
            tier: Tier::Standard,
            ..Principal::default()
        };
        let anon = Principal::anonymous();
        for _ in 0..3 {
            limiter.check(&standard, "a").await;
        }
        limiter.check(&anon, "b").await;
        limiter.check(&anon, "b").await;
        // Refused credentials over the anonymous limit count there (c's second), those
        // over the credentials' limit only count as such (d's second, anonymous allowed).
        limiter.refused_credentials("c").await;
        limiter.refused_credentials("c").await;
        let counts = |limiter: &RateLimiter| {
            let r = limiter.refusals();
            [&r.anonymous, &r.authenticated, &r.premium, &r.failed_auth]
                .map(|n| n.load(Ordering::Relaxed))
        };
        assert_eq!(counts(&limiter), [2, 2, 0, 0]);
        let lenient = self::limiter(10, 1, 1, 1);
        lenient.refused_credentials("d").await;
        lenient.refused_credentials("d").await;
        assert_eq!(counts(&lenient), [0, 0, 0, 1]);
    }
}
