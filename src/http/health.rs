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

    /// The names of the dependencies that do not answer (within a few seconds each),
    /// checked concurrently.
    pub async fn down(&self) -> Vec<&'static str> {
        let checks = self.0.iter().map(|d| async move {
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(3), d.check()).await,
                Ok(Ok(()))
            );
            if !ok {
                tracing::warn!(dependency = d.name(), "readiness check failed");
            }
            (!ok).then_some(d.name())
        });
        futures::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}
