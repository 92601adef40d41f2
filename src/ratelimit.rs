//! Rate limits per minute (fixed one-minute windows): per client address when anonymous,
//! per subject when authenticated. Counted in Redis when configured, so that every instance
//! shares the count; in process otherwise (and while Redis is unreachable).

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest,
};
use async_graphql::{ErrorExtensionValues, ServerError, ServerResult};
use pcf_domain::auth::{Principal, Tier};
use redis::aio::ConnectionManager;
use redis::Script;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::RateLimits;

/// Counts a hit and returns the count in this window; the key expires with the window.
static HIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], 61) end
return n
"#,
    )
});

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Over the limit; retry after this many seconds (the rest of the window).
    Limited {
        retry_after: u64,
    },
}

/// Counts requests.
pub struct RateLimiter {
    limits: RateLimits,
    redis: Option<(ConnectionManager, String)>,
    local: Mutex<HashMap<String, (u64, u32)>>,
    /// After Redis fails, count locally until then instead of waiting on it per request.
    redis_down_until: Mutex<Option<std::time::Instant>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl RateLimiter {
    /// `redis`: a connection and the key prefix to count under.
    pub fn new(limits: RateLimits, redis: Option<(ConnectionManager, String)>) -> Self {
        Self {
            limits,
            redis,
            local: Mutex::new(HashMap::new()),
            redis_down_until: Mutex::new(None),
        }
    }

    /// The limit that applies to a caller, and the key it is counted under.
    fn bucket(&self, principal: &Principal, client: &str) -> (u32, String) {
        match (&principal.subject, principal.tier) {
            (Some(sub), Tier::Premium) => (self.limits.premium, format!("sub:{sub}")),
            (Some(sub), Tier::Standard) => (self.limits.authenticated, format!("sub:{sub}")),
            (None, _) => (self.limits.anonymous, format!("addr:{client}")),
        }
    }

    /// Counts one request of `principal` from address `client`.
    pub async fn check(&self, principal: &Principal, client: &str) -> Decision {
        let (limit, key) = self.bucket(principal, client);
        let now = unix_now();
        let window = now / 60;
        let count = match self.count_shared(&key, window).await {
            Some(n) => n,
            None => self.count_local(&key, window),
        };
        if count > u64::from(limit) {
            Decision::Limited {
                retry_after: 60 - now % 60,
            }
        } else {
            Decision::Allowed
        }
    }

    async fn count_shared(&self, key: &str, window: u64) -> Option<u64> {
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
        let result: Result<u64, _> = HIT
            .key(format!("{prefix}:ratelimit:{window}:{key}"))
            .invoke_async(&mut conn.clone())
            .await;
        match result {
            Ok(n) => Some(n),
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

    fn count_local(&self, key: &str, window: u64) -> u64 {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if local.len() > 100_000 {
            // Old windows are worthless; drop them rather than grow without bound.
            local.retain(|_, (w, _)| *w == window);
        }
        let entry = local.entry(key.to_owned()).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        u64::from(entry.1)
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
                let mut error =
                    ServerError::new(format!("too many requests; retry in {retry_after} s"), None);
                let mut ext = ErrorExtensionValues::default();
                ext.set("code", pcf_domain::ErrorCode::RateLimited.as_str());
                ext.set("retryAfter", retry_after);
                error.extensions = Some(ext);
                return Err(error);
            }
        }
        next.run(ctx, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_request_over_the_limit_is_refused_with_a_retry_time() {
        let limits = RateLimits {
            anonymous: 3,
            authenticated: 5,
            premium: 10,
        };
        let limiter = RateLimiter::new(limits, None);
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
    async fn premium_subjects_get_the_higher_limit() {
        let limits = RateLimits {
            anonymous: 1,
            authenticated: 2,
            premium: 4,
        };
        let limiter = RateLimiter::new(limits, None);
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
}
