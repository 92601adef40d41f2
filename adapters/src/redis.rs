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
use std::time::Duration;

/// The error as a port's.
pub fn port_error(e: redis::RedisError) -> PortError {
    PortError::Unavailable(format!("redis: {e}"))
}

/// How a connection waits and retries; `None` leaves the client's default.
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
    Cluster(ClusterConnection),
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

    fn cluster_client(
        seeds: &[&str],
        settings: RedisSettings,
    ) -> RedisResult<(redis::cluster::ClusterClient, ClusterConfig)> {
        let mut builder = ClusterClientBuilder::new(seeds.to_vec());
        let mut config = ClusterConfig::new();
        if let Some(t) = settings.connection_timeout {
            builder = builder.connection_timeout(t);
            config = config.set_connection_timeout(t);
        }
        if let Some(t) = settings.response_timeout {
            builder = builder.response_timeout(t);
            config = config.set_response_timeout(t);
        }
        if let Some(retries) = settings.retries {
            builder = builder.retries(u32::try_from(retries).unwrap_or(u32::MAX));
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
            return Ok(Self::Cluster(conn));
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
            return Ok(Self::Cluster(
                client.get_pending_async_connection_with_config(config),
            ));
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
            .clone()
            .route_command(
                redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let text: String = redis::from_redis_value(nodes)?;
        Ok(parse_primaries(&text))
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
                    .clone()
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
            Self::Cluster(c) => c.req_packed_command(cmd),
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
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
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
        .clone()
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
