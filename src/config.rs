//! Configuration: flags > environment > `pcf.toml` > defaults.

use anyhow::Context;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where PCF runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

/// Everything a process needs to know, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Unset: embedded mode (SQLite under `data_dir`).
    pub database_url: Option<String>,
    pub read_database_urls: Vec<String>,
    pub kafka_brokers: Option<String>,
    pub kafka_topic: String,
    /// Topics the relay publishes every event to besides `kafka_topic`, each from its own
    /// checkpoint: for switching topics (docs/operations.md).
    pub kafka_extra_topics: Vec<String>,
    /// One Redis server's URL, or the comma-separated seed nodes of a Redis Cluster.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key of the user view.
    pub redis_prefix: String,
    /// Prefix of the projectors' consumer group ids.
    pub kafka_group_prefix: String,
    /// Partitions of the event topic when PCF creates it.
    pub kafka_partitions: i32,
    pub environment: Environment,
    /// The key-encryption key (base64 of 32 bytes) that wraps users' data keys, and its id.
    pub kek: Option<String>,
    pub kek_id: String,
    /// A file of several KEKs (`<id> <base64>` a line; the first wraps, all unwrap).
    pub kek_file: Option<PathBuf>,
    /// HS256 secret for bearer tokens.
    pub jwt_secret: Option<String>,
    /// RS256/ES256 public key (PEM text or a file path) for bearer tokens.
    pub jwt_public_key: Option<String>,
    /// Hashed API keys with their roles.
    pub api_keys_file: Option<PathBuf>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Requests per minute: anonymous (per address), authenticated (per subject), premium.
    pub rate_limits: RateLimits,
    pub max_aliases: usize,
    /// The longest a GraphQL request may run.
    pub request_timeout: Duration,
    /// How long a stopping process keeps serving after readiness turns 503, so that load
    /// balancers stop sending it requests first (`shutdown_delay_ms`, 0).
    pub shutdown_delay: Duration,
    pub log: String,
    pub log_json: bool,
    /// How long `minVersion` waits.
    pub consistency_timeout: Duration,
    /// The largest request body accepted.
    pub body_limit: usize,
    pub max_depth: usize,
    pub max_complexity: usize,
    /// Connections served at once.
    pub max_connections: usize,
    /// The longest a client may take to send a request head (from the accept, or from the
    /// first byte of the next request on a kept-alive connection).
    pub header_timeout: Duration,
    /// The longest a client may take to send a request body.
    pub body_timeout: Duration,
    /// The longest a kept-alive connection may sit idle between requests.
    pub idle_timeout: Duration,
    /// The largest websocket message (and frame) accepted; the HTTP body limit by default.
    pub ws_message_limit: Option<usize>,
    /// Subscriptions open at once on one websocket.
    pub ws_subscriptions_per_connection: usize,
    /// Subscriptions open at once by one subject, over all its websockets on this instance.
    pub ws_subscriptions_per_subject: usize,
    /// How long a websocket may take to send `connection_init`.
    pub ws_init_timeout: Duration,
    /// The longest token lifetime accepted (`exp` this far from now at most).
    pub jwt_max_ttl: Duration,
}

/// Requests per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub anonymous: u32,
    pub authenticated: u32,
    pub premium: u32,
    /// Refused credentials per client address, on top of their count as anonymous requests.
    pub failed_auth: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            anonymous: 1000,
            authenticated: 5000,
            premium: 10000,
            failed_auth: 60,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./pcf-data"),
            database_url: None,
            read_database_urls: Vec::new(),
            kafka_brokers: None,
            kafka_topic: "pcf.users.v1".to_owned(),
            kafka_extra_topics: Vec::new(),
            redis_url: None,
            redis_prefix: pcf_domain::read_model::REDIS_PREFIX.to_owned(),
            kafka_group_prefix: String::new(),
            kafka_partitions: 12,
            environment: Environment::Development,
            kek: None,
            kek_id: "default".to_owned(),
            kek_file: None,
            jwt_secret: None,
            jwt_public_key: None,
            api_keys_file: None,
            trusted_proxies: Vec::new(),
            rate_limits: RateLimits::default(),
            max_aliases: 15,
            request_timeout: Duration::from_secs(15),
            shutdown_delay: Duration::ZERO,
            log: "info".to_owned(),
            log_json: false,
            consistency_timeout: Duration::from_secs(5),
            body_limit: 64 * 1024,
            max_depth: 15,
            max_complexity: 1000,
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ws_message_limit: None,
            ws_subscriptions_per_connection: 100,
            ws_subscriptions_per_subject: 500,
            ws_init_timeout: Duration::from_secs(10),
            jwt_max_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// The keys `pcf.toml` may set; all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    read_database_url: Option<String>,
    kafka_brokers: Option<String>,
    kafka_topic: Option<String>,
    kafka_extra_topics: Option<String>,
    redis_url: Option<String>,
    redis_prefix: Option<String>,
    kafka_group_prefix: Option<String>,
    kafka_partitions: Option<i32>,
    env: Option<String>,
    kek: Option<String>,
    kek_id: Option<String>,
    kek_file: Option<String>,
    jwt_secret: Option<String>,
    jwt_public_key: Option<String>,
    api_keys_file: Option<String>,
    trusted_proxies: Option<String>,
    rate_limit_anonymous: Option<u32>,
    rate_limit_authenticated: Option<u32>,
    rate_limit_premium: Option<u32>,
    max_aliases: Option<usize>,
    request_timeout_ms: Option<u64>,
    shutdown_delay_ms: Option<u64>,
    log: Option<String>,
    log_format: Option<String>,
    consistency_timeout_ms: Option<u64>,
    body_limit: Option<usize>,
    max_depth: Option<usize>,
    max_complexity: Option<usize>,
    rate_limit_failed_auth: Option<u32>,
    max_connections: Option<usize>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    ws_message_limit: Option<usize>,
    ws_subscriptions_per_connection: Option<usize>,
    ws_subscriptions_per_subject: Option<usize>,
    ws_init_timeout_ms: Option<u64>,
    jwt_max_ttl_s: Option<u64>,
}

impl FileConfig {
    /// Layers `PCF_*` environment variables over the file's values.
    fn overlay_env(mut self, env: &dyn Fn(&str) -> Option<String>) -> Self {
        let pick = |current: &mut Option<String>, key: &str| {
            if let Some(v) = env(key).filter(|v| !v.is_empty()) {
                *current = Some(v);
            }
        };
        pick(&mut self.listen, "PCF_LISTEN");
        if let Some(v) = env("PCF_DATA_DIR").filter(|v| !v.is_empty()) {
            self.data_dir = Some(PathBuf::from(v));
        }
        pick(&mut self.database_url, "PCF_DATABASE_URL");
        pick(&mut self.read_database_url, "PCF_READ_DATABASE_URL");
        pick(&mut self.kafka_brokers, "PCF_KAFKA_BROKERS");
        pick(&mut self.kafka_topic, "PCF_KAFKA_TOPIC");
        pick(&mut self.kafka_extra_topics, "PCF_KAFKA_EXTRA_TOPICS");
        pick(&mut self.redis_url, "PCF_REDIS_URL");
        pick(&mut self.redis_prefix, "PCF_REDIS_PREFIX");
        pick(&mut self.kafka_group_prefix, "PCF_KAFKA_GROUP_PREFIX");
        pick(&mut self.env, "PCF_ENV");
        pick(&mut self.kek, "PCF_KEK");
        pick(&mut self.kek_id, "PCF_KEK_ID");
        pick(&mut self.kek_file, "PCF_KEK_FILE");
        pick(&mut self.jwt_secret, "PCF_JWT_SECRET");
        pick(&mut self.jwt_public_key, "PCF_JWT_PUBLIC_KEY");
        pick(&mut self.api_keys_file, "PCF_API_KEYS_FILE");
        pick(&mut self.trusted_proxies, "PCF_TRUSTED_PROXIES");
        pick(&mut self.log, "PCF_LOG");
        pick(&mut self.log_format, "PCF_LOG_FORMAT");
        self
    }
}

impl Config {
    /// Reads `pcf.toml` (or the file named by `PCF_CONFIG`) if present, then the process
    /// environment, then applies `listen` from the command line.
    pub fn load(listen_flag: Option<SocketAddr>) -> anyhow::Result<Self> {
        let path = std::env::var("PCF_CONFIG").unwrap_or_else(|_| "pcf.toml".to_owned());
        let file = read_file(Path::new(&path))?;
        let mut config = Self::resolve(file, &|k| std::env::var(k).ok())?;
        if let Some(listen) = listen_flag {
            config.listen = listen;
        }
        Ok(config)
    }

    /// Resolves from a file's contents (if any) and an environment.
    pub fn from_sources(
        toml_text: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let file = match toml_text {
            Some(text) => toml::from_str(text).context("invalid pcf.toml")?,
            None => FileConfig::default(),
        };
        Self::resolve(file, env)
    }

    fn resolve(file: FileConfig, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut f = file.overlay_env(env);
        let mut c = Config::default();
        c.services(&mut f)?;
        c.access(&mut f)?;
        c.limits(&mut f)?;
        Ok(c)
    }

    /// Where PCF listens, keeps its data, and finds its services.
    fn services(&mut self, f: &mut FileConfig) -> anyhow::Result<()> {
        let c = self;
        if let Some(listen) = f.listen.take() {
            c.listen = listen.parse().with_context(|| {
                format!("PCF_LISTEN: {listen:?} is not an address like 127.0.0.1:8080")
            })?;
        }
        set(&mut c.data_dir, f.data_dir.take());
        c.database_url = f.database_url.take();
        c.read_database_urls = match f.read_database_url.take() {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            None => c.database_url.iter().cloned().collect(),
        };
        c.kafka_brokers = f.kafka_brokers.take();
        set(&mut c.kafka_topic, f.kafka_topic.take());
        if let Some(list) = f.kafka_extra_topics.take() {
            for topic in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                anyhow::ensure!(
                    topic != c.kafka_topic,
                    "PCF_KAFKA_EXTRA_TOPICS: {topic:?} is the event topic (PCF_KAFKA_TOPIC) itself"
                );
                if !c.kafka_extra_topics.iter().any(|t| t == topic) {
                    c.kafka_extra_topics.push(topic.to_owned());
                }
            }
        }
        c.redis_url = f.redis_url.take();
        set(&mut c.redis_prefix, f.redis_prefix.take());
        set(&mut c.kafka_group_prefix, f.kafka_group_prefix.take());
        if let Some(partitions) = f.kafka_partitions.take() {
            anyhow::ensure!(partitions > 0, "kafka_partitions must be positive");
            c.kafka_partitions = partitions;
        }
        Ok(())
    }

    /// The environment, credentials, proxies and logging.
    fn access(&mut self, f: &mut FileConfig) -> anyhow::Result<()> {
        let c = self;
        c.environment = match f.env.as_deref() {
            None | Some("development") => Environment::Development,
            Some("production") => Environment::Production,
            Some(other) => {
                anyhow::bail!("PCF_ENV: {other:?} is neither development nor production")
            }
        };
        c.kek = f.kek.take();
        set(&mut c.kek_id, f.kek_id.take());
        c.kek_file = f.kek_file.take().map(PathBuf::from);
        anyhow::ensure!(
            c.kek.is_none() || c.kek_file.is_none(),
            "set PCF_KEK or PCF_KEK_FILE, not both"
        );
        c.jwt_secret = f.jwt_secret.take();
        c.jwt_public_key = f.jwt_public_key.take();
        c.api_keys_file = f.api_keys_file.take().map(PathBuf::from);
        if let Some(list) = f.trusted_proxies.take() {
            c.trusted_proxies = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse()
                        .with_context(|| format!("PCF_TRUSTED_PROXIES: {s:?} is not an IP address"))
                })
                .collect::<anyhow::Result<_>>()?;
        }
        Ok(())
    }

    /// Rate limits, query limits, and the limits of connections, websockets and tokens.
    fn limits(&mut self, f: &mut FileConfig) -> anyhow::Result<()> {
        let c = self;
        set(&mut c.rate_limits.anonymous, f.rate_limit_anonymous.take());
        set(
            &mut c.rate_limits.authenticated,
            f.rate_limit_authenticated.take(),
        );
        set(&mut c.rate_limits.premium, f.rate_limit_premium.take());
        set(&mut c.max_aliases, f.max_aliases.take());
        if let Some(ms) = f.request_timeout_ms.take() {
            c.request_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = f.shutdown_delay_ms.take() {
            c.shutdown_delay = Duration::from_millis(ms);
        }
        set(&mut c.log, f.log.take());
        c.log_json = match f.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => anyhow::bail!("PCF_LOG_FORMAT: {other:?} is neither text nor json"),
        };
        if let Some(ms) = f.consistency_timeout_ms.take() {
            c.consistency_timeout = Duration::from_millis(ms);
        }
        set(&mut c.body_limit, f.body_limit.take());
        set(&mut c.max_depth, f.max_depth.take());
        set(&mut c.max_complexity, f.max_complexity.take());
        set(
            &mut c.rate_limits.failed_auth,
            f.rate_limit_failed_auth.take(),
        );
        if let Some(n) = f.max_connections.take() {
            anyhow::ensure!(n > 0, "max_connections must be positive");
            c.max_connections = n;
        }
        let millis = |v: Option<u64>, key: &str, into: &mut Duration| -> anyhow::Result<()> {
            if let Some(ms) = v {
                anyhow::ensure!(ms > 0, "{key} must be positive");
                *into = Duration::from_millis(ms);
            }
            Ok(())
        };
        millis(
            f.header_timeout_ms,
            "header_timeout_ms",
            &mut c.header_timeout,
        )?;
        millis(f.body_timeout_ms, "body_timeout_ms", &mut c.body_timeout)?;
        millis(f.idle_timeout_ms, "idle_timeout_ms", &mut c.idle_timeout)?;
        millis(
            f.ws_init_timeout_ms,
            "ws_init_timeout_ms",
            &mut c.ws_init_timeout,
        )?;
        if let Some(n) = f.ws_message_limit.take() {
            anyhow::ensure!(n >= 1024, "ws_message_limit must be at least 1024 bytes");
            c.ws_message_limit = Some(n);
        }
        set(
            &mut c.ws_subscriptions_per_connection,
            f.ws_subscriptions_per_connection.take(),
        );
        set(
            &mut c.ws_subscriptions_per_subject,
            f.ws_subscriptions_per_subject.take(),
        );
        if let Some(s) = f.jwt_max_ttl_s.take() {
            anyhow::ensure!(s > 0, "jwt_max_ttl_s must be positive");
            c.jwt_max_ttl = Duration::from_secs(s);
        }
        Ok(())
    }

    /// The event stream goes through Kafka (cluster mode).
    pub fn uses_kafka(&self) -> bool {
        self.kafka_brokers.is_some()
    }

    /// The largest websocket message accepted.
    pub fn ws_message_limit(&self) -> usize {
        self.ws_message_limit.unwrap_or(self.body_limit)
    }

    /// Embedded mode: no event store URL configured.
    pub fn embedded(&self) -> bool {
        self.database_url.is_none()
    }
}

/// Overrides a default with the value the file or the environment set, if any.
fn set<T>(into: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *into = value;
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("invalid {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_configuration_means_embedded_on_the_default_address() {
        let c = Config::from_sources(None, &|_| None).unwrap();
        assert!(c.embedded());
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("./pcf-data"));
        assert_eq!(c.kafka_topic, "pcf.users.v1");
    }

    #[test]
    fn environment_overrides_the_file() {
        let toml = "listen = \"127.0.0.1:9000\"\ndatabase_url = \"postgres://file\"\n";
        let env = |k: &str| (k == "PCF_DATABASE_URL").then(|| "postgres://env".to_owned());
        let c = Config::from_sources(Some(toml), &env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.database_url.as_deref(), Some("postgres://env"));
        assert_eq!(c.read_database_urls, vec!["postgres://env".to_owned()]);
    }

    #[test]
    fn read_replicas_are_a_comma_separated_list() {
        let env = |k: &str| {
            (k == "PCF_READ_DATABASE_URL").then(|| "postgres://a, postgres://b".to_owned())
        };
        let c = Config::from_sources(None, &env).unwrap();
        assert_eq!(c.read_database_urls, vec!["postgres://a", "postgres://b"]);
    }

    #[test]
    fn connection_websocket_and_token_limits_are_read_from_the_file() {
        let toml = "max_connections = 10\nheader_timeout_ms = 500\nbody_timeout_ms = 600\n\
                    idle_timeout_ms = 700\nws_message_limit = 4096\n\
                    ws_subscriptions_per_connection = 3\nws_subscriptions_per_subject = 4\n\
                    ws_init_timeout_ms = 800\njwt_max_ttl_s = 60\nrate_limit_failed_auth = 9\n";
        let c = Config::from_sources(Some(toml), &|_| None).unwrap();
        assert_eq!(c.max_connections, 10);
        assert_eq!(c.header_timeout, Duration::from_millis(500));
        assert_eq!(c.body_timeout, Duration::from_millis(600));
        assert_eq!(c.idle_timeout, Duration::from_millis(700));
        assert_eq!(c.ws_message_limit(), 4096);
        assert_eq!(c.ws_subscriptions_per_connection, 3);
        assert_eq!(c.ws_subscriptions_per_subject, 4);
        assert_eq!(c.ws_init_timeout, Duration::from_millis(800));
        assert_eq!(c.jwt_max_ttl, Duration::from_secs(60));
        assert_eq!(c.rate_limits.failed_auth, 9);
        // Without a websocket limit of its own, a message may be as large as a body.
        let c = Config::from_sources(Some("body_limit = 2048"), &|_| None).unwrap();
        assert_eq!(c.ws_message_limit(), 2048);
        for bad in [
            "max_connections = 0",
            "header_timeout_ms = 0",
            "ws_message_limit = 10",
        ] {
            assert!(Config::from_sources(Some(bad), &|_| None).is_err(), "{bad}");
        }
    }

    #[test]
    fn extra_topics_are_a_comma_separated_list_without_the_event_topic() {
        let env = |k: &str| match k {
            "PCF_KAFKA_EXTRA_TOPICS" => Some("b, c,b,".to_owned()),
            "PCF_KAFKA_TOPIC" => Some("a".to_owned()),
            _ => None,
        };
        let c = Config::from_sources(None, &env).unwrap();
        assert_eq!(c.kafka_extra_topics, ["b", "c"]);
        assert!(Config::from_sources(None, &|_| None)
            .unwrap()
            .kafka_extra_topics
            .is_empty());
        let c = Config::from_sources(Some("kafka_extra_topics = \"x\""), &|_| None).unwrap();
        assert_eq!(c.kafka_extra_topics, ["x"]);
        let err = Config::from_sources(Some("kafka_extra_topics = \"pcf.users.v1\""), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("PCF_KAFKA_EXTRA_TOPICS"), "{err}");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let env = |k: &str| (k == "PCF_LISTEN").then(|| "nowhere".to_owned());
        let err = Config::from_sources(None, &env).unwrap_err().to_string();
        assert!(err.contains("PCF_LISTEN"), "{err}");
        assert!(Config::from_sources(Some("nonsense = 1"), &|_| None).is_err());
    }
}
