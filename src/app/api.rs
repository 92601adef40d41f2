//! The API side of a process: the command service, the live log for subscriptions, the rate
//! limiter, the GraphQL schemas and the HTTP router over them.

use anyhow::Context;
use pcf_command::CommandService;
use pcf_query::{LiveLog, ReadModels};
use std::sync::Arc;
use std::time::Duration;

use super::process::{Process, ReadSide};
use crate::config::{Config, Environment};
use crate::http::auth::Authenticator;
use crate::http::ratelimit::RateLimiter;
use crate::http::schema::{schemas, PcfSchema};
use crate::http::websocket::{Shared, WsLimits};
use crate::http::HttpState;

/// The router of a process and the schema it serves (for in-process callers).
pub fn router(
    p: &mut Process<'_>,
    read: ReadSide,
    authenticator: Authenticator,
) -> anyhow::Result<(axum::Router, PcfSchema)> {
    let config = p.config;
    let commands = Arc::new(CommandService::new(p.store.clone(), p.metrics.clone()));
    let live = LiveLog::spawn(p.log.clone(), p.store.commits(), Duration::from_millis(500));
    let models = ReadModels {
        users: read.users,
        log: p.log.clone(),
        opener: p.keys.clone(),
        consistency_timeout: config.consistency_timeout,
    };
    let limiter = Arc::new(RateLimiter::new(config.rate_limits, shared_counts(config)?));
    p.metrics.watch_rate_limits(limiter.refusals());
    let schemas = schemas(
        config,
        commands,
        models,
        live,
        read.monitor,
        limiter.clone(),
    );
    let schema = schemas.full.clone();
    let authenticator = Arc::new(authenticator);
    let websocket = Arc::new(Shared {
        schema: schema.clone(),
        authenticator: authenticator.clone(),
        limiter: limiter.clone(),
        limits: WsLimits::from_config(config),
        open: Default::default(),
        stopping: p.stopping.clone(),
    });
    let router = crate::http::router(HttpState {
        schemas: Arc::new(schemas),
        dependencies: Arc::new(std::mem::take(&mut p.dependencies)),
        stopping: p.stopping.clone(),
        metrics: p.metrics.clone(),
        authenticator,
        limiter,
        trusted_proxies: Arc::new(config.trusted_proxies.clone()),
        graphiql: config.environment == Environment::Development,
        body_limit: config.body_limit,
        body_timeout: config.body_timeout,
        request_timeout: config.request_timeout,
        websocket,
    });
    Ok((router, schema))
}

/// Where the rate limiter counts when Redis is configured (shared by every instance).
fn shared_counts(
    config: &Config,
) -> anyhow::Result<Option<(pcf_adapters::redis::RedisConnection, String)>> {
    let Some(url) = &config.redis_url else {
        return Ok(None);
    };
    // Fail fast: a request never waits long on the rate limiter's Redis.
    let settings = pcf_adapters::redis::RedisSettings {
        connection_timeout: Some(Duration::from_millis(300)),
        response_timeout: Some(Duration::from_millis(300)),
        retries: Some(1),
    };
    // Connected on first use: while Redis is down (at start too) the limiter counts locally,
    // and a later request's failure has the connection try again.
    let conn = pcf_adapters::redis::RedisConnection::connect_lazily(url, settings)
        .context("PCF_REDIS_URL")?;
    Ok(Some((conn, config.redis_prefix.clone())))
}
