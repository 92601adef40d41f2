//! Readiness: every dependency a process uses, checked by name.

use pcf_command::kafka::KafkaPublisher;
use pcf_command::EventStore;
use pcf_query::{RedisUserReader, SqlUserReader};
use std::sync::Arc;
use std::time::Duration;

/// One dependency of this process.
pub enum Dependency {
    EventStore(Arc<dyn EventStore>),
    Kafka(Arc<KafkaPublisher>),
    Redis(Arc<RedisUserReader>),
    ReadReplica(Arc<SqlUserReader>),
}

impl Dependency {
    /// The name `/health/ready` reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::EventStore(_) => "event_store",
            Self::Kafka(_) => "kafka",
            Self::Redis(_) => "redis",
            Self::ReadReplica(_) => "read_replica",
        }
    }

    async fn check(&self) -> Result<(), String> {
        match self {
            Self::EventStore(s) => s.ping().await.map_err(|e| e.to_string()),
            Self::Kafka(k) => k.ping().await.map_err(|e| e.to_string()),
            Self::Redis(r) => r.ping().await.map_err(|e| e.to_string()),
            Self::ReadReplica(r) => r.ping().await.map_err(|e| e.to_string()),
        }
    }
}

/// The dependencies of a process.
#[derive(Default)]
pub struct Dependencies(Vec<Dependency>);

impl Dependencies {
    pub fn add(&mut self, d: Dependency) {
        self.0.push(d);
    }

    /// The names of every dependency, as `/health/ready` reports them.
    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(Dependency::name).collect()
    }

    /// What readiness reports: the dependencies without which the process cannot serve
    /// (`down`), and those it serves without, with less (`degraded`): Redis, whose reads
    /// fall back to the read replicas, and some of several read replicas, whose reads go to
    /// the others. A dependency every instance shares takes every instance out of a load
    /// balancer when it makes them unready, so one with a fallback never does.
    pub async fn health(&self) -> Health {
        let checks = self.0.iter().map(|d| async move {
            let outcome = tokio::time::timeout(Duration::from_secs(3), d.state()).await;
            let state = outcome.unwrap_or(State::Down);
            if state != State::Up {
                tracing::warn!(dependency = d.name(), ?state, "readiness check failed");
            }
            (d.name(), state)
        });
        let mut health = Health::default();
        for (name, state) in futures::future::join_all(checks).await {
            match state {
                State::Up => {}
                State::Degraded => health.degraded.push(name),
                State::Down => health.down.push(name),
            }
        }
        health
    }
}

/// A dependency as readiness sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Up,
    /// Not answering, or not all of it, but the process serves without it.
    Degraded,
    Down,
}

impl Dependency {
    async fn state(&self) -> State {
        match self {
            Self::Redis(r) => match r.ping().await {
                Ok(()) => State::Up,
                Err(_) => State::Degraded,
            },
            Self::ReadReplica(r) => match r.answering().await {
                (up, all) if up == all => State::Up,
                (0, _) => State::Down,
                _ => State::Degraded,
            },
            other => match other.check().await {
                Ok(()) => State::Up,
                Err(_) => State::Down,
            },
        }
    }
}

/// What `/health/ready` answers.
#[derive(Default, Debug)]
pub struct Health {
    pub down: Vec<&'static str>,
    pub degraded: Vec<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcf_query::SqlUserReader;

    /// A pool on a loopback port nothing listens on.
    fn unreachable() -> sqlx::PgPool {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "postgres://postgres@{}/postgres",
            closed.local_addr().unwrap()
        );
        drop(closed);
        sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(&url)
            .unwrap()
    }

    #[tokio::test]
    async fn read_replicas_none_of_which_answers_are_down_not_degraded() {
        let mut dependencies = Dependencies::default();
        let replicas = SqlUserReader::new(vec![unreachable(), unreachable()]);
        dependencies.add(Dependency::ReadReplica(Arc::new(replicas)));
        let health = dependencies.health().await;
        assert_eq!(health.down, ["read_replica"]);
        assert!(health.degraded.is_empty());
    }
}
