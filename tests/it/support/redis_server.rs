//! Redis for the tests: connections, the keys under a test's prefix (listed and deleted),
//! and redis-server processes of a test's own for the tests that take Redis down.

use super::cleanup::Teardown;
use super::services::{port_open, shared_redis_url, ChildServer};
use super::wait::wait_until;
use futures::StreamExt as _;
use pcf_domain::read_model::redis_prefix_pattern;
use pcf_projectors::delete_matching;
use redis::{AsyncCommands as _, ScanOptions};
use std::process::Command;
use std::time::Duration;
use uuid::Uuid;

/// A connection of the test's own to a Redis server.
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connecting to Redis at {url}: {e}"))
}

/// Every key matching `pattern` (`SCAN`, a thousand keys a step).
pub async fn scan_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Result<Vec<String>, redis::RedisError> {
    let options = ScanOptions::default()
        .with_pattern(pattern)
        .with_count(1000);
    let keys: Vec<redis::RedisResult<String>> = conn.scan_options(options).await?.collect().await;
    keys.into_iter().collect()
}

/// A key prefix of one test on the shared Redis; its keys are deleted at teardown.
pub struct RedisPrefix {
    pub url: String,
    pub prefix: String,
}

impl RedisPrefix {
    /// `pcf:test:<id>` on the shared server.
    pub fn new(id: &str) -> Self {
        Self {
            url: shared_redis_url(),
            prefix: format!("pcf:test:{id}"),
        }
    }

    /// A prefix of its own for a test that names nothing else.
    pub fn fresh() -> Self {
        Self::new(&Uuid::new_v4().simple().to_string())
    }

    /// Deletes every key under the prefix (best effort).
    pub async fn delete_keys(&self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(conn) = redis::aio::ConnectionManager::new(client).await else {
            return;
        };
        let conn = pcf_adapters::redis::RedisConnection::Single(conn);
        let _ = delete_matching(&conn, &format!("{}:*", self.prefix)).await;
        let _ = delete_matching(&conn, &redis_prefix_pattern(&self.prefix)).await;
    }
}

impl Teardown for RedisPrefix {
    async fn teardown(self) {
        self.delete_keys().await;
    }
}

/// A redis-server of the test's own, on a free port, without persistence except an
/// explicit `SAVE`.
pub struct PrivateRedis {
    pub server: ChildServer,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let mut redis = Self {
            server: ChildServer::new(),
        };
        redis.spawn().await;
        redis
    }

    /// A server of the test's own that is not running yet: its port is chosen and stays
    /// closed until [`PrivateRedis::launch`], for a process that starts while Redis is down.
    pub fn reserve() -> Self {
        let redis = Self {
            server: ChildServer::new(),
        };
        assert!(
            !port_open(redis.server.port),
            "the reserved port already answers"
        );
        redis
    }

    /// Starts a reserved server for the first time.
    pub async fn launch(&mut self) {
        self.spawn().await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.server.port)
    }

    async fn spawn(&mut self) {
        let dir = self.server.dir.path().to_owned();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.server.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(["--dbfilename", "dump.rdb"]);
        self.server
            .spawn(&mut command, &dir.join("redis.log"), "redis-server");
        let url = self.url();
        wait_until(Duration::from_secs(20), "the private Redis", || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                let _: String = redis::cmd("PING")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        })
        .await;
    }

    /// Writes the data set to disk (so a restart finds it), then kills the server.
    pub async fn save_and_kill(&mut self) {
        let mut conn = redis_conn(&self.url()).await;
        let _: () = redis::cmd("SAVE")
            .query_async(&mut conn)
            .await
            .expect("SAVE");
        drop(conn);
        self.kill();
    }

    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts the server again on the same port and directory.
    pub async fn restart(&mut self) {
        assert!(!self.server.is_running(), "kill it first");
        self.spawn().await;
    }
}
