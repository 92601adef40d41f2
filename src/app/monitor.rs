//! What `projections` reports, per mode.

use async_trait::async_trait;
use pcf_command::EventStore;
use pcf_domain::ports::{PortError, ProjectionMonitor, ProjectionState};
use pcf_projectors::{consumer_lag, ViewStore};
use std::sync::Arc;
use std::time::Duration;

/// Embedded: the in-memory view follows the in-process bus; its lag is the relay's backlog.
pub struct MemoryMonitor {
    pub store: Arc<dyn EventStore>,
    pub relay: String,
}

#[async_trait]
impl ProjectionMonitor for MemoryMonitor {
    async fn projections(&self) -> Result<Vec<ProjectionState>, PortError> {
        let checkpoint = self.store.load_checkpoint(&self.relay).await?;
        let backlog = self.store.count_after(checkpoint).await?;
        Ok(vec![ProjectionState {
            name: "users-memory".to_owned(),
            generation: 1,
            building: None,
            lag: Some(backlog as i64),
        }])
    }
}

/// Cluster: the Kafka projections, their generations and consumer lag.
pub struct KafkaMonitor {
    pub views: Vec<Arc<dyn ViewStore>>,
    pub brokers: String,
    pub topic: String,
    pub group_prefix: String,
}

#[async_trait]
impl ProjectionMonitor for KafkaMonitor {
    async fn projections(&self) -> Result<Vec<ProjectionState>, PortError> {
        let mut out = Vec::with_capacity(self.views.len());
        for view in &self.views {
            let state = view.state().await?;
            let group = format!("{}{}", self.group_prefix, view.name());
            let lag = tokio::time::timeout(
                Duration::from_secs(3),
                consumer_lag(&self.brokers, &self.topic, &group),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|parts| parts.iter().map(|p| p.lag).sum());
            out.push(ProjectionState {
                name: view.name().to_owned(),
                generation: state.active,
                building: state.building,
                lag,
            });
        }
        Ok(out)
    }
}
