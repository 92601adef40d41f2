//! What the HTTP handlers share.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::auth::Authenticator;
use super::health::Dependencies;
use super::metrics::Metrics;
use super::ratelimit::RateLimiter;
use super::schema::Schemas;
use super::websocket;

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub schemas: Arc<Schemas>,
    pub dependencies: Arc<Dependencies>,
    /// Raised when the process begins to stop: readiness answers 503.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    pub authenticator: Arc<Authenticator>,
    pub limiter: Arc<RateLimiter>,
    pub trusted_proxies: Arc<Vec<IpAddr>>,
    pub graphiql: bool,
    pub body_limit: usize,
    /// The longest a client may take to send the request body.
    pub body_timeout: Duration,
    pub request_timeout: Duration,
    /// What websocket sessions share (`super::websocket`).
    pub websocket: Arc<websocket::Shared>,
}
