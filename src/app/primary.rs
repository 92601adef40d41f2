//! The PostgreSQL primary among the hosts of `PCF_DATABASE_URL`, and the pools that follow it.
//!
//! The URL may list several hosts, as libpq does: `postgres://user@h1:5432,h2:5432/db`. PCF
//! writes to the one that accepts writes (`pg_is_in_recovery()` false, what libpq's
//! `target_session_attrs=read-write` asks for). Every pool on the primary is made here: a new
//! connection to a server in recovery (a standby) is refused, so nothing is ever written to,
//! or read as the primary from, a standby.
//!
//! When the primary is lost and a standby is promoted, `PrimaryLocator::follow` notices within
//! `PROBE_EVERY` (a probe connection to the primary asks it each time whether it is still
//! one), finds the host that now accepts writes, points every pool at it
//! (`Pool::set_connect_options`) and has the connections made before the switch closed when
//! next acquired. Meanwhile commands fail with `UNAVAILABLE` after the pools' acquire timeout;
//! none waits longer, and none is acknowledged without its events written.

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How often the primary is asked whether it still is one.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long a probe (connecting, then asking) may take before the host counts as lost.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a command waits for a connection to the primary.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a pool changes in the primary's connect options (a setting of its own, say).
pub type Shape = Arc<dyn Fn(PgConnectOptions) -> PgConnectOptions + Send + Sync>;

/// One host of a multi-host URL: `host:port` as written, and the options of a URL naming it
/// alone.
#[derive(Clone, Debug)]
pub struct Host {
    pub label: String,
    pub options: PgConnectOptions,
}

/// The single-host URLs a libpq-style URL stands for, in order: `postgres://u@a:1,b:2/db?x`
/// gives `postgres://u@a:1/db?x` and `postgres://u@b:2/db?x`. `target_session_attrs` is
/// dropped (PCF always wants the primary). A URL with one host gives itself.
pub fn split_hosts(url: &str) -> anyhow::Result<Vec<String>> {
    let (scheme, rest) = url
        .split_once("://")
        .context("a PostgreSQL URL starts with postgres://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (format!("{user}@"), hosts),
        None => (String::new(), authority),
    };
    let tail = without_param(tail, "target_session_attrs");
    let mut urls = Vec::new();
    for host in hosts.split(',') {
        let host = host.trim();
        anyhow::ensure!(!host.is_empty(), "an empty host in the host list {hosts:?}");
        urls.push(format!("{scheme}://{userinfo}{host}{tail}"));
    }
    Ok(urls)
}

/// `tail` (`/db?a=1&b=2`) without the query parameter `name`.
fn without_param(tail: &str, name: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(name))
        .collect();
    if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// The hosts of a (possibly multi-host) URL with their connect options.
pub fn parse_hosts(url: &str) -> anyhow::Result<Vec<Host>> {
    split_hosts(url)?
        .into_iter()
        .map(|single| {
            let options = PgConnectOptions::from_str(&single)?;
            let label = format!("{}:{}", options.get_host(), options.get_port());
            Ok(Host { label, options })
        })
        .collect()
}

/// Why a host is not the primary.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("a standby (in recovery)")]
    Standby,
    #[error("does not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Asks a connection whether its server accepts writes.
async fn accepts_writes(conn: &mut PgConnection) -> Result<(), ProbeError> {
    let (recovery,): (bool,) = tokio::time::timeout(
        PROBE_TIMEOUT,
        sqlx::query_as("SELECT pg_is_in_recovery()").fetch_one(&mut *conn),
    )
    .await
    .map_err(|_| ProbeError::Timeout(PROBE_TIMEOUT))??;
    if recovery {
        Err(ProbeError::Standby)
    } else {
        Ok(())
    }
}

/// Connects to `host` and keeps the connection if its server accepts writes.
async fn probe(host: &Host) -> Result<PgConnection, ProbeError> {
    let options = host.options.clone().disable_statement_logging();
    let mut conn = tokio::time::timeout(PROBE_TIMEOUT, PgConnection::connect_with(&options))
        .await
        .map_err(|_| ProbeError::Timeout(PROBE_TIMEOUT))??;
    match accepts_writes(&mut conn).await {
        Ok(()) => Ok(conn),
        Err(e) => {
            let _ = conn.close().await;
            Err(e)
        }
    }
}

/// The error an `after_connect` gives a connection to a standby: an I/O error, so that the
/// pool tries again until its acquire timeout, and callers see the database unavailable.
fn standby_refused() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "the server is a standby (in recovery), not the primary",
    ))
}

struct State {
    current: usize,
    pools: Vec<(PgPool, Shape)>,
}

/// Which host of `PCF_DATABASE_URL` is the primary, and the pools on it.
pub struct PrimaryLocator {
    hosts: Vec<Host>,
    state: Mutex<State>,
    /// When the pools last moved to another host: connections made before are closed when
    /// next acquired (they may still reach the old primary).
    switched: Arc<Mutex<Option<Instant>>>,
}

impl PrimaryLocator {
    /// Finds the primary among the hosts of `url` (`what` names the setting in errors).
    pub async fn connect(url: &str, what: &str) -> anyhow::Result<Arc<Self>> {
        let hosts = parse_hosts(url).with_context(|| format!("reading {what}"))?;
        let (current, conn) = locate(&hosts, 0)
            .await
            .with_context(|| format!("connecting to {what}"))?;
        let _ = conn.close().await;
        Ok(Arc::new(Self {
            hosts,
            state: Mutex::new(State {
                current,
                pools: Vec::new(),
            }),
            switched: Arc::new(Mutex::new(None)),
        }))
    }

    /// The hosts of `url`, the pools pointed at the first one without asking it whether it
    /// is the primary: their connections refuse a standby all the same, and `follow` moves
    /// them when another host turns out to be the primary.
    pub fn at_first_host(url: &str) -> anyhow::Result<Arc<Self>> {
        let hosts = parse_hosts(url)?;
        Ok(Arc::new(Self {
            hosts,
            state: Mutex::new(State {
                current: 0,
                pools: Vec::new(),
            }),
            switched: Arc::new(Mutex::new(None)),
        }))
    }

    /// The hosts, in the order configured.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The `host:port` the pools connect to.
    pub fn current(&self) -> String {
        self.hosts[self.state().current].label.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pool of at most `max` connections on the primary, connected now, that follows it.
    pub async fn pool(&self, max: u32, what: &str, shape: Option<Shape>) -> anyhow::Result<PgPool> {
        let pool = self.lazy_pool(max, shape);
        // Connect one now, as an eager pool would: a primary that is down stops the start.
        pool.acquire()
            .await
            .with_context(|| format!("connecting to {what}"))?;
        Ok(pool)
    }

    /// A pool on the primary that connects when first used, and follows it.
    pub fn lazy_pool(&self, max: u32, shape: Option<Shape>) -> PgPool {
        let shape: Shape = shape.unwrap_or_else(|| Arc::new(|o| o));
        let switched = self.switched.clone();
        let mut state = self.state();
        let options = shape(self.hosts[state.current].options.clone());
        let pool = PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    let (recovery,): (bool,) = sqlx::query_as("SELECT pg_is_in_recovery()")
                        .fetch_one(&mut *conn)
                        .await?;
                    if recovery {
                        return Err(standby_refused());
                    }
                    Ok(())
                })
            })
            .before_acquire(move |_, meta| {
                let switched = *switched.lock().unwrap_or_else(|e| e.into_inner());
                let current = match switched {
                    Some(at) => Instant::now()
                        .checked_sub(meta.age)
                        .is_none_or(|made| made >= at),
                    None => true,
                };
                Box::pin(async move { Ok(current) })
            })
            .connect_lazy_with(options);
        state.pools.push((pool.clone(), shape));
        pool
    }

    /// Points every pool at host `to`.
    fn switch(&self, to: usize) {
        let mut state = self.state();
        if state.current == to {
            return;
        }
        tracing::warn!(
            from = %self.hosts[state.current].label,
            to = %self.hosts[to].label,
            "the PostgreSQL primary moved; the pools follow it"
        );
        state.current = to;
        *self.switched.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        state.pools.retain(|(pool, _)| !pool.is_closed());
        for (pool, shape) in &state.pools {
            pool.set_connect_options(shape(self.hosts[to].options.clone()));
        }
    }

    /// Watches the primary until the locator is dropped or `stop` completes: asks it every
    /// `PROBE_EVERY` whether it still accepts writes, and when it does not (down, or a
    /// standby now), looks for the host that does and moves the pools there.
    pub async fn follow(this: Weak<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut probe_conn: Option<PgConnection> = None;
        let mut lost_since: Option<Instant> = None;
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(PROBE_EVERY) => {}
            }
            let Some(locator) = this.upgrade() else {
                return;
            };
            let current = locator.state().current;
            let alive = match probe_conn.as_mut() {
                Some(conn) => accepts_writes(conn).await.is_ok(),
                None => match probe(&locator.hosts[current]).await {
                    Ok(conn) => {
                        probe_conn = Some(conn);
                        true
                    }
                    Err(_) => false,
                },
            };
            if alive {
                if let Some(since) = lost_since.take() {
                    tracing::info!(primary = %locator.hosts[current].label, after = ?since.elapsed(), "the PostgreSQL primary answers again");
                }
                continue;
            }
            probe_conn = None;
            if lost_since.is_none() {
                lost_since = Some(Instant::now());
                tracing::warn!(primary = %locator.hosts[current].label, "the PostgreSQL primary does not answer as one; looking for it among the hosts");
            }
            if locator.hosts.len() == 1 {
                continue;
            }
            match locate(&locator.hosts, current).await {
                Ok((found, conn)) => {
                    locator.switch(found);
                    probe_conn = Some(conn);
                    if let Some(since) = lost_since.take() {
                        tracing::info!(primary = %locator.hosts[found].label, after = ?since.elapsed(), "writing to the PostgreSQL primary again");
                    }
                }
                Err(e) => tracing::debug!(error = %format!("{e:#}"), "no PostgreSQL primary yet"),
            }
        }
    }
}

/// The first host, trying them in order from `from`, that accepts writes, with a connection
/// to it; an error naming each host's answer when none does.
pub async fn locate(hosts: &[Host], from: usize) -> anyhow::Result<(usize, PgConnection)> {
    let mut answers = Vec::new();
    for i in (0..hosts.len()).map(|k| (from + k) % hosts.len()) {
        match probe(&hosts[i]).await {
            Ok(conn) => return Ok((i, conn)),
            Err(e) => answers.push(format!("{}: {e}", hosts[i].label)),
        }
    }
    anyhow::bail!("no host accepts writes ({})", answers.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_list_gives_one_url_per_host() {
        let urls = split_hosts("postgres://postgres@127.0.0.1:5442,127.0.0.1:5443/postgres")
            .expect("parsed");
        assert_eq!(
            urls,
            [
                "postgres://postgres@127.0.0.1:5442/postgres",
                "postgres://postgres@127.0.0.1:5443/postgres"
            ]
        );
        let urls = split_hosts(
            "postgresql://u:p%40ss@a:1, b ,[::1]:3/db?sslmode=disable&target_session_attrs=read-write",
        )
        .expect("parsed");
        assert_eq!(
            urls,
            [
                "postgresql://u:p%40ss@a:1/db?sslmode=disable",
                "postgresql://u:p%40ss@b/db?sslmode=disable",
                "postgresql://u:p%40ss@[::1]:3/db?sslmode=disable"
            ]
        );
        assert_eq!(
            split_hosts("postgres://h/db?target_session_attrs=any").expect("parsed"),
            ["postgres://h/db"]
        );
        assert_eq!(
            split_hosts("postgres://h:7").expect("parsed"),
            ["postgres://h:7"]
        );
        assert!(split_hosts("postgres://u@a,,b/db").is_err());
        assert!(split_hosts("h1,h2").is_err());
    }

    #[test]
    fn each_host_keeps_the_rest_of_the_url() {
        let hosts = parse_hosts("postgres://alice@10.0.0.1:6000,10.0.0.2/app").expect("parsed");
        let labels: Vec<&str> = hosts.iter().map(|h| h.label.as_str()).collect();
        assert_eq!(labels, ["10.0.0.1:6000", "10.0.0.2:5432"]);
        for h in &hosts {
            assert_eq!(h.options.get_username(), "alice");
            assert_eq!(h.options.get_database(), Some("app"));
        }
    }
}
