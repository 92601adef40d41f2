//! Redis connections and what a Redis error means, once for the view's writer, its readers
//! and the rate limiter: every failure of a call is the view being unavailable (the callers
//! fall back, or retry), named as Redis's.
//!
//! `PCF_REDIS_URL` names one server (`redis://host:port`) or, comma-separated, the seed
//! nodes of a Redis Cluster (`redis://a:7000,redis://b:7001`). [`RedisConnection`] is either;
//! the callers ask [`RedisConnection::is_cluster`] where a call must stay within one slot.

use pcf_domain::ports::PortError;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The error as a port's.
pub fn port_error(e: redis::RedisError) -> PortError {
    PortError::Unavailable(format!("redis: {e}"))
}

/// A cluster request's retries when not configured.
const CLUSTER_RETRIES: usize = 8;
/// The longest a cluster request takes, retries included, when not configured.
const CLUSTER_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The pauses between a cluster request's retries (growing from the first to the last).
const CLUSTER_MIN_RETRY_WAIT_MS: u64 = 50;
const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 1000;

/// How a connection waits and retries; `None` leaves the default (the client's for one
/// server; for a cluster, see `CLUSTER_*`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RedisSettings {
    pub connection_timeout: Option<Duration>,
    pub response_timeout: Option<Duration>,
    pub retries: Option<usize>,
}

/// A connection to one Redis server (reconnecting) or to a Redis Cluster (following its
/// slots, reconnecting to its nodes). Cheap to clone: clones share the connection.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterHandle),
}

/// A cluster connection that is replaced by a new one after `CLUSTER_FAILURES_TO_RECONNECT`
/// failures in a row of the kind a broken connection gives (timeouts, I/O): the client can
/// stay stuck in a slot refresh begun during a failover, and a new connection learns the
/// topology afresh.
#[derive(Clone)]
pub struct ClusterHandle {
    conn: Arc<Mutex<ClusterConnection>>,
    failures: Arc<AtomicU32>,
    reconnect: Arc<dyn Fn() -> ClusterConnection + Send + Sync>,
}

/// Failures in a row after which a cluster connection is replaced.
const CLUSTER_FAILURES_TO_RECONNECT: u32 = 3;

impl ClusterHandle {
    fn new(
        conn: ClusterConnection,
        reconnect: impl Fn() -> ClusterConnection + Send + Sync + 'static,
    ) -> Self {
        Self {
            conn: Arc::new(Mutex::new(conn)),
            failures: Arc::default(),
            reconnect: Arc::new(reconnect),
        }
    }

    /// The connection in use.
    pub fn current(&self) -> ClusterConnection {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Counts a call's outcome; replaces the connection after too many broken ones.
    fn note<T>(&self, result: &RedisResult<T>) {
        match result {
            Ok(_) => self.failures.store(0, Ordering::Relaxed),
            Err(e)
                if e.is_timeout()
                    || e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal() =>
            {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if failures >= CLUSTER_FAILURES_TO_RECONNECT {
                    self.failures.store(0, Ordering::Relaxed);
                    tracing::warn!(
                        failures,
                        error = %e,
                        "the Redis Cluster connection keeps failing; connecting anew"
                    );
                    *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = (self.reconnect)();
                }
            }
            Err(_) => {}
        }
    }

    async fn route_command(&self, cmd: Cmd, routing: RoutingInfo) -> RedisResult<Value> {
        let result = self.current().route_command(cmd, routing).await;
        self.note(&result);
        result
    }
}

/// The seed URLs of a `PCF_REDIS_URL` (comma-separated, blanks ignored).
pub fn seed_urls(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

impl RedisConnection {
    fn manager_config(settings: RedisSettings) -> ConnectionManagerConfig {
        let mut config = ConnectionManagerConfig::new();
        if settings.connection_timeout.is_some() {
            config = config.set_connection_timeout(settings.connection_timeout);
        }
        if settings.response_timeout.is_some() {
            config = config.set_response_timeout(settings.response_timeout);
        }
        if let Some(retries) = settings.retries {
            config = config.set_number_of_retries(retries);
        }
        config
    }

    /// The per-connection part of a cluster's settings: (response timeout, config).
    fn cluster_config(settings: RedisSettings) -> (Duration, ClusterConfig) {
        let response_timeout = settings
            .response_timeout
            .unwrap_or(CLUSTER_RESPONSE_TIMEOUT);
        let mut config = ClusterConfig::new().set_response_timeout(response_timeout);
        if let Some(t) = settings.connection_timeout {
            config = config.set_connection_timeout(t);
        }
        (response_timeout, config)
    }

    fn cluster_client(
        seeds: &[&str],
        settings: RedisSettings,
    ) -> RedisResult<(redis::cluster::ClusterClient, ClusterConfig)> {
        // The client's own defaults retry 16 times, up to minutes apart, with no bound on a
        // request: a request caught in a failover could wait for many minutes. Here a
        // request (its retries, redirections and reconnections included) ends within the
        // response timeout, and retries come quickly, as a failover takes seconds.
        let retries = settings.retries.unwrap_or(CLUSTER_RETRIES);
        let (response_timeout, config) = Self::cluster_config(settings);
        let mut builder = ClusterClientBuilder::new(seeds.to_vec())
            .retries(u32::try_from(retries).unwrap_or(u32::MAX))
            .min_retry_wait(CLUSTER_MIN_RETRY_WAIT_MS)
            .max_retry_wait(CLUSTER_MAX_RETRY_WAIT_MS)
            .response_timeout(response_timeout);
        if let Some(t) = settings.connection_timeout {
            builder = builder.connection_timeout(t);
        }
        Ok((builder.build()?, config))
    }

    /// Connects to `urls` (one server, or several cluster seeds); fails if Redis does not
    /// answer.
    pub async fn connect(urls: &str, settings: RedisSettings) -> RedisResult<Self> {
        let seeds = seed_urls(urls);
        if seeds.len() > 1 {
            let (client, config) = Self::cluster_client(&seeds, settings)?;
            let conn = client.get_async_connection_with_config(config).await?;
            return Ok(Self::Cluster(ClusterHandle::new(conn, move || {
                let (_, config) = Self::cluster_config(settings);
                client.get_pending_async_connection_with_config(config)
            })));
        }
        let client = redis::Client::open(seeds.first().copied().unwrap_or(urls))?;
        let conn =
            ConnectionManager::new_with_config(client, Self::manager_config(settings)).await?;
        Ok(Self::Single(conn))
    }

    /// A connection to `urls` made on its first use instead of now: until Redis answers,
    /// every call fails (and each failure has the connection try again). Fails only for a
    /// malformed URL.
    pub fn connect_lazily(urls: &str, settings: RedisSettings) -> RedisResult<Self> {
        let seeds = seed_urls(urls);
        if seeds.len() > 1 {
            let (client, config) = Self::cluster_client(&seeds, settings)?;
            let conn = client.get_pending_async_connection_with_config(config);
            return Ok(Self::Cluster(ClusterHandle::new(conn, move || {
                let (_, config) = Self::cluster_config(settings);
                client.get_pending_async_connection_with_config(config)
            })));
        }
        let client = redis::Client::open(seeds.first().copied().unwrap_or(urls))?;
        let conn = ConnectionManager::new_lazy_with_config(client, Self::manager_config(settings))?;
        Ok(Self::Single(conn))
    }

    /// Whether this is a Redis Cluster: each call (a command, a script, a pipeline) must
    /// then keep to the keys of one slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The primaries' addresses (`host:port`): the one server's, unknown (empty) for a
    /// single server, every primary's of a cluster (from `CLUSTER NODES`).
    pub async fn primaries(&self) -> RedisResult<Vec<(String, u16)>> {
        let Self::Cluster(conn) = self else {
            return Ok(Vec::new());
        };
        let nodes = conn
            .route_command(
                redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let text: String = redis::from_redis_value(nodes)?;
        Ok(parse_primaries(&text))
    }

    /// The keys matching `pattern`, a page of `SCAN` at a time (`KeyScan::page`), on each
    /// primary of a cluster (the one server otherwise).
    pub async fn scan(&self, pattern: &str) -> RedisResult<KeyScan<'_>> {
        let nodes: Vec<Option<(String, u16)>> = if self.is_cluster() {
            self.primaries().await?.into_iter().map(Some).collect()
        } else {
            vec![None]
        };
        Ok(KeyScan {
            conn: self,
            pattern: pattern.to_owned(),
            nodes,
            node: 0,
            cursor: 0,
        })
    }

    /// Runs `cmd` on the node at `host:port` (a cluster's); on the one server otherwise.
    pub async fn on_node<T: redis::FromRedisValue>(
        &self,
        node: Option<&(String, u16)>,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match (self, node) {
            (Self::Cluster(conn), Some((host, port))) => {
                let value = conn
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        }),
                    )
                    .await?;
                Ok(redis::from_redis_value(value)?)
            }
            _ => cmd.query_async(&mut self.clone()).await,
        }
    }
}

/// A `SCAN` of every primary, page by page (`RedisConnection::scan`).
pub struct KeyScan<'a> {
    conn: &'a RedisConnection,
    pattern: String,
    nodes: Vec<Option<(String, u16)>>,
    node: usize,
    cursor: u64,
}

impl KeyScan<'_> {
    /// The next page of keys (never empty); `None` once every node is scanned.
    pub async fn page(&mut self) -> RedisResult<Option<Vec<String>>> {
        while let Some(node) = self.nodes.get(self.node) {
            let mut scan = redis::cmd("SCAN");
            scan.arg(self.cursor)
                .arg("MATCH")
                .arg(&self.pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = self.conn.on_node(node.as_ref(), &scan).await?;
            if next == 0 {
                self.node += 1;
            }
            self.cursor = next;
            if !keys.is_empty() {
                return Ok(Some(keys));
            }
        }
        Ok(None)
    }
}

/// The primaries that are not failed in a `CLUSTER NODES` answer.
fn parse_primaries(nodes: &str) -> Vec<(String, u16)> {
    let mut found = Vec::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
            continue;
        }
        // `host:port@cport[,hostname]`
        let addr = addr.split(['@', ',']).next().unwrap_or_default();
        if let Some((host, port)) = addr.rsplit_once(':') {
            if let Ok(port) = port.parse() {
                found.push((host.to_owned(), port));
            }
        }
    }
    found
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => {
                let handle = c.clone();
                Box::pin(async move {
                    let result = handle.current().req_packed_command(cmd).await;
                    handle.note(&result);
                    result
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => {
                let handle = c.clone();
                Box::pin(async move {
                    let result = handle
                        .current()
                        .req_packed_commands(cmd, offset, count)
                        .await;
                    handle.note(&result);
                    result
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.current().get_db(),
        }
    }
}

/// Succeeds when the Redis server behind `conn` answers a PING; for a cluster, when a node
/// answers that the cluster is serving every slot (`cluster_state:ok`), so that one node
/// down while its replica takes over is not Redis down.
pub async fn ping(conn: &RedisConnection) -> Result<(), PortError> {
    let RedisConnection::Cluster(cluster) = conn else {
        let _: String = redis::cmd("PING")
            .query_async(&mut conn.clone())
            .await
            .map_err(port_error)?;
        return Ok(());
    };
    let info = cluster
        .route_command(
            redis::cmd("CLUSTER").arg("INFO").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await
        .map_err(port_error)?;
    let info: String = redis::from_redis_value(info).map_err(|e| port_error(e.into()))?;
    if info.lines().any(|l| l.trim() == "cluster_state:ok") {
        Ok(())
    } else {
        Err(PortError::Unavailable(
            "redis: the cluster is not serving every slot (cluster_state is not ok)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_comma_separated() {
        assert_eq!(seed_urls("redis://a:1"), vec!["redis://a:1"]);
        assert_eq!(
            seed_urls(" redis://a:1, redis://b:2 ,"),
            vec!["redis://a:1", "redis://b:2"]
        );
    }

    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7003@17003 slave a1 0 0 1 connected
c3 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922
d4 127.0.0.1:7002@17002,host.example master,fail - 0 0 3 connected
";
        assert_eq!(
            parse_primaries(nodes),
            vec![
                ("127.0.0.1".to_owned(), 7000),
                ("127.0.0.1".to_owned(), 7001)
            ]
        );
    }
}
