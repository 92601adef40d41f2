//! Where the shared services of the tests are (PostgreSQL primary and replica, Redis, Kafka on
//! loopback, overridable with `PCF_TEST_*`), and the plumbing of the private ones a test
//! starts for itself: free ports, probes, killing a child process.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// `key` from the environment, or `default` when it is unset or empty.
pub fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// The PostgreSQL primary (any database on it; tests create their own).
pub fn primary_admin_url() -> String {
    env_or(
        "PCF_TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
}

/// The streaming replica of the primary.
pub fn replica_admin_url() -> String {
    env_or(
        "PCF_TEST_READ_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5433/postgres",
    )
}

/// The PostgreSQL primary with a synchronous standby (scripts/pg-ha.sh), as a URL listing
/// both hosts; `None` (the tests on it are skipped) when `PCF_TEST_HA_DATABASE_URL` is unset.
pub fn ha_admin_url() -> Option<String> {
    std::env::var("PCF_TEST_HA_DATABASE_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// The read replicas of the HA topology (`PCF_TEST_HA_READ_DATABASE_URL`, comma-separated).
pub fn ha_read_admin_urls() -> Vec<String> {
    env_or(
        "PCF_TEST_HA_READ_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5444/postgres,postgres://postgres@127.0.0.1:5443/postgres",
    )
    .split(',')
    .map(|u| u.trim().to_owned())
    .filter(|u| !u.is_empty())
    .collect()
}

/// The Redis server tests share (each under a key prefix of its own).
pub fn shared_redis_url() -> String {
    env_or("PCF_TEST_REDIS_URL", "redis://127.0.0.1:6379")
}

/// The Kafka broker tests share (each with topics and groups of its own).
pub fn shared_brokers() -> String {
    env_or("PCF_TEST_KAFKA_BROKERS", "127.0.0.1:9092")
}

/// Logs of the product while a test runs, when `PCF_TEST_LOG` is set (e.g. `pcf=debug`).
pub fn init_tracing() {
    if let Ok(filter) = std::env::var("PCF_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Whether something accepts connections on the loopback `port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A server process of a test's own on a loopback port, with a directory for its data and
/// logs; killed when dropped.
pub struct ChildServer {
    pub port: u16,
    pub dir: TempDir,
    child: Option<Child>,
}

impl ChildServer {
    /// A free port and an empty directory; nothing runs yet.
    pub fn new() -> Self {
        Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            child: None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts `command` (`what`, for messages) with its output appended to the file `log`,
    /// and takes the process in charge.
    pub fn spawn(&mut self, command: &mut Command, log: &Path, what: &str) {
        assert!(!self.is_running(), "{what} is already running");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        let err = out.try_clone().expect("a log file");
        let child = command
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        self.child = Some(child);
    }

    /// Whether the process has not exited.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the process (SIGKILL), like a crash; its port is closed afterwards.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(
            !port_open(self.port),
            "port {} still answers after the kill",
            self.port
        );
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
