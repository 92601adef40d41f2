//! A real Prometheus (the `prometheus` Debian package, as `scripts/check-deploy.sh` installs
//! it) scrapes a PCF in cluster mode every 5 s and evaluates the project's rules every
//! second. The rules are the files of `deploy/prometheus/rules/` with one change: each
//! alert's `for:` is cut to a few seconds, so that an alert whose condition holds fires
//! within the test. Through Prometheus' HTTP API the test checks that the series the rules,
//! the dashboard and on-call need are scraped, that every query of the dashboard evaluates,
//! and that alerts fire when their condition is made true: this PCF's Redis never answers,
//! so the Redis projector cannot apply anything while commands go on (its lag grows:
//! `PcfProjectorStalled`), point reads fall back to the read replicas, and readiness names
//! Redis as degraded (`PcfDependencyDown`).

use crate::support::*;
use pcf::app::ALL_ROLES;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

on_cluster! {
    a_real_prometheus_scrapes_pcf_and_fires_alerts_when_a_projector_cannot_apply:
        create => prometheus_scrapes_and_alerts,
}

/// How long the test waits for Prometheus to see what it looks for.
const PATIENCE: Duration = Duration::from_secs(90);

/// The `for:` every alert gets here.
const SHORT_FOR: &str = "3s";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The rule files with each alert's `for:` cut to [`SHORT_FOR`], written into `dir`;
/// returns their paths. Fails if a file has an alert without `for:`.
fn rules_with_short_for(dir: &Path) -> Vec<PathBuf> {
    let mut written = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/prometheus/rules"))
        .expect("listing deploy/prometheus/rules")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("reading a rule file");
        let alerts = text.matches("- alert:").count();
        let mut cut = 0;
        let lines: Vec<String> = text
            .lines()
            .map(|line| match line.trim_start().strip_prefix("for:") {
                Some(_) => {
                    cut += 1;
                    let indent = line.len() - line.trim_start().len();
                    format!("{}for: {SHORT_FOR}", " ".repeat(indent))
                }
                None => line.to_owned(),
            })
            .collect();
        assert_eq!(cut, alerts, "{}: an alert without for:", path.display());
        let target = dir.join(path.file_name().expect("a file name"));
        std::fs::write(&target, lines.join("\n") + "\n").expect("writing the rules");
        written.push(target);
    }
    assert!(!written.is_empty(), "no rule files");
    written
}

/// Installs Debian's `prometheus` package when `prometheus` is not on PATH, with the
/// scripts' `ensure_packages`.
fn ensure_prometheus() {
    let script = format!(
        "log() {{ printf 'packages: %s\\n' \"$*\" >&2; }}; \
         die() {{ printf 'packages: error: %s\\n' \"$*\" >&2; exit 1; }}; \
         source '{}'; command -v prometheus >/dev/null || ensure_packages prometheus",
        root().join("scripts/lib/packages.sh").display()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("running bash");
    assert!(
        out.status.success(),
        "installing prometheus failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server of the test's own that scrapes `target` as job "pcf".
struct Prometheus {
    server: ChildServer,
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr) -> Self {
        ensure_prometheus();
        let mut server = ChildServer::new();
        let dir = server.dir.path().to_owned();
        let rules = rules_with_short_for(&dir);
        let rule_files: String = rules
            .iter()
            .map(|p| format!("  - {}\n", p.display()))
            .collect();
        // Rules every second. PCF every 5 s: a scrape runs the readiness checks, which wait
        // up to 3 s for a dependency that does not answer (this PCF's Redis), and asks Kafka
        // for each projection's lag and oldest waiting message (up to 4 s).
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{rule_files}\
             scrape_configs:\n  - job_name: pcf\n    scrape_interval: 5s\n    scrape_timeout: 5s\n\
             \x20   static_configs:\n      - targets: ['{target}']\n"
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("writing prometheus.yml");
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", server.port))
            .arg("--log.level=warn");
        server.spawn(&mut command, &dir.join("prometheus.log"), "prometheus");
        let mut p = Self { server };
        let log = dir.join("prometheus.log");
        wait_until(Duration::from_secs(30), "Prometheus is ready", || {
            let alive = p.server.alive();
            let log = log.clone();
            let port = p.server.port;
            async move {
                if !alive {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    panic!("prometheus exited:\n{text}");
                }
                match http_get(port, "/-/ready").await {
                    Ok((200, _)) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
        p
    }

    /// `GET /api/v1/<path>` answered "success": its `data`.
    async fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.server.port, &format!("/api/v1/{path}")).await?;
        let json: Value =
            serde_json::from_str(&body).map_err(|e| format!("{status} {e}: {body}"))?;
        if json["status"] != "success" {
            return Err(format!("{status}: {body}"));
        }
        Ok(json["data"].clone())
    }

    /// The samples of an instant query.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("query?query={}", encode(promql))).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The alerts in state "firing".
    async fn firing(&self) -> Result<Vec<Value>, String> {
        let data = self.api("alerts").await?;
        Ok(data["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a["state"] == "firing")
            .collect())
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` on a loopback port over HTTP/1.0 (the whole body, then the connection
/// closes): the status and the body.
async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("GET {path}: no answer within 10 s"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: not an HTTP response: {text}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET {path}: no status in {head}"))?;
    Ok((status, body.to_owned()))
}

/// The value of a sample of an instant query.
fn value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

async fn prometheus_scrapes_and_alerts(c: &mut Cluster) {
    // A Redis that never answers: a port nothing listens on.
    let config = pcf::Config {
        redis_url: Some(format!("redis://127.0.0.1:{}", free_port())),
        ..c.config()
    };
    let app = c.start(&config, &ALL_ROLES).await;
    let server = Server::start(app.router.clone()).await;
    let prometheus = Prometheus::start(server.addr).await;

    // Commands, and reads of what they made (from the SQL view on the replicas: Redis
    // does not answer). A command ends in an error too.
    let tag = c.tag().to_owned();
    let mut ids = Vec::new();
    for i in 0..3 {
        let email = format!("scraped{i}@{tag}.example.com");
        ids.push(create_user(&app.router, &email, "Scraped").await);
    }
    for id in &ids {
        let seen = user(&app.router, *id, Some(1)).await;
        assert_eq!(seen["version"], 1, "{seen}");
    }
    let taken = admin_gql(
        &app.router,
        CREATE_USER,
        serde_json::json!({ "input": { "email": format!("scraped0@{tag}.example.com"), "displayName": "Again" } }),
    )
    .await;
    assert_eq!(
        error_code(&taken.body),
        Some("EMAIL_TAKEN"),
        "{:?}",
        taken.body
    );

    // The series on-call needs, as Prometheus scraped them: (query, what must hold of the
    // samples).
    type Check = fn(&[Value]) -> bool;
    let some: Check = |s| !s.is_empty();
    let positive: Check = |s| s.iter().any(|v| value(v) > 0.0);
    let checks: Vec<(&str, Check)> = vec![
        ("up{job=\"pcf\"} == 1", some),
        (
            "pcf_http_requests_total{path=\"/graphql\",outcome=\"ok\"}",
            positive,
        ),
        (
            "pcf_graphql_operations_total{operation=\"createUser\",outcome=\"ok\"}",
            positive,
        ),
        (
            "pcf_graphql_operations_duration_seconds_bucket{operation=\"user\",le=\"+Inf\"}",
            positive,
        ),
        (
            "pcf_commands_total{command=\"createUser\",outcome=\"OK\"}",
            positive,
        ),
        (
            "pcf_commands_total{command=\"createUser\",outcome=\"EMAIL_TAKEN\"}",
            positive,
        ),
        ("pcf_relay_backlog_events", some),
        ("pcf_relay_oldest_unpublished_age_seconds", some),
        (
            "pcf_projector_applied_events_total{projection=\"users-sql\"}",
            positive,
        ),
        (
            "pcf_projector_dead_letters_total{projection=\"users-redis\"}",
            some,
        ),
        (
            "pcf_projector_lag_messages{projection=\"users-redis\"}",
            positive,
        ),
        (
            "pcf_projector_lag_seconds{projection=\"users-redis\"}",
            positive,
        ),
        (
            "pcf_projector_lag_seconds{projection=\"users-sql\"} == 0",
            some,
        ),
        ("pcf_redis_fallback_reads_total", positive),
        ("pcf_rate_limit_refusals_total{limit=\"anonymous\"}", some),
        (
            "pcf_db_pool_max_connections{pool=\"event_store\"}",
            positive,
        ),
        (
            "pcf_db_pool_connections{pool=\"read_replica_0\",state=\"idle\"}",
            some,
        ),
        ("pcf_dependency_up{dependency=\"redis\"} == 0", some),
        ("pcf_dependency_up{dependency=\"event_store\"} == 1", some),
        // Redis down leaves the process ready (degraded): its reads fall back to the replica.
        ("pcf_ready == 1", some),
        ("pcf_data_key_cache_misses_total", some),
        // The recording rules run on them.
        (
            "pcf:projector_lag_messages:sum{projection=\"users-redis\"} >= 3",
            some,
        ),
        (
            "pcf:projector_lag_seconds:max{projection=\"users-redis\"} > 0",
            some,
        ),
        ("pcf:relay_backlog_events:max", some),
    ];
    wait_until(PATIENCE, "Prometheus has every series", || async {
        let mut missing = Vec::new();
        for (promql, holds) in &checks {
            let samples = prometheus.query(promql).await?;
            if !holds(&samples) {
                missing.push(format!("{promql}: {samples:?}"));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("\n"))
        }
    })
    .await;

    // Every query of the dashboard is PromQL that Prometheus evaluates (with Grafana's
    // variables given values as Grafana would).
    for query in crate::deploy::dashboard_queries() {
        let promql = query
            .replace("$__rate_interval", "1m")
            .replace("$__range", "5m")
            .replace("$job", "pcf")
            .replace("$instance", ".*");
        if let Err(e) = prometheus.query(&promql).await {
            panic!("the dashboard's query {query:?} does not evaluate: {e}");
        }
    }

    // The alerts of a projector that cannot apply and of a dependency that is down fire,
    // naming the projection and the dependency; the SQL projection, which keeps up, does
    // not alert.
    let firing = wait_until(PATIENCE, "the alerts fire", || async {
        let firing = prometheus.firing().await?;
        let has = |name: &str, label: &str, value: &str| {
            firing
                .iter()
                .any(|a| a["labels"]["alertname"] == name && a["labels"][label] == value)
        };
        if has("PcfProjectorStalled", "projection", "users-redis")
            && has("PcfDependencyDown", "dependency", "redis")
        {
            Ok(firing)
        } else {
            Err(format!("firing: {firing:?}"))
        }
    })
    .await;
    for alert in &firing {
        let labels = &alert["labels"];
        assert_ne!(labels["projection"], "users-sql", "{alert}");
        assert!(
            alert["annotations"]["runbook_url"]
                .as_str()
                .is_some_and(|u| u.starts_with("docs/operations.md#")),
            "{alert}"
        );
    }
    drop(prometheus);
    drop(server);
}
