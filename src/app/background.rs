//! The settings and background tasks every mode shares: the relay's name and settings, the
//! Kafka settings, the removal of expired command ids, and the shutdown signal.

use pcf_command::kafka::KafkaConfig;
use pcf_command::{EventStore, RelayConfig};
use std::sync::Arc;
use tokio::sync::watch;

use crate::config::Config;

/// The Kafka settings of a configuration.
pub fn kafka_config(config: &Config) -> Option<KafkaConfig> {
    let brokers = config.kafka_brokers.as_ref()?;
    let mut kafka = KafkaConfig::new(brokers.clone(), config.kafka_topic.clone());
    kafka.partitions = config.kafka_partitions;
    Some(kafka)
}

/// The relay's checkpoint name for a configuration.
pub fn relay_name(config: &Config) -> String {
    match &config.kafka_brokers {
        Some(_) => kafka_relay_name(&config.kafka_topic),
        None => "bus".to_owned(),
    }
}

/// The checkpoint name of the relay that publishes to the Kafka topic `topic`, whether the
/// topic is the event topic or an extra one.
pub fn kafka_relay_name(topic: &str) -> String {
    format!("kafka:{topic}")
}

/// How often the command ids past their retention are removed.
const COMMAND_ID_PRUNING: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes the command ids past their retention (`pcf_command::COMMAND_ID_RETENTION`) now and
/// then, so that their table stays small; any number of instances may do it at once.
pub async fn prune_command_ids(store: Arc<dyn EventStore>, mut shutdown: watch::Receiver<bool>) {
    let mut failures = pcf_adapters::Repeats::new(pcf_adapters::repeats::DEFAULT_EVERY);
    loop {
        match store.prune_expired_commands().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "expired command ids removed"),
            Err(e) => {
                if let Some(repeats) = failures.admit() {
                    tracing::warn!(error = %e, repeats, "could not remove expired command ids");
                }
            }
        }
        if stopped_during(&mut shutdown, COMMAND_ID_PRUNING).await {
            return;
        }
    }
}

/// The relay's settings for a configuration.
pub fn relay_config(config: &Config) -> RelayConfig {
    RelayConfig {
        name: relay_name(config),
        ..RelayConfig::default()
    }
}

/// Completes when the shutdown flag is raised (or its sender is gone).
pub async fn wait_for(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Waits `pause`, or less if shutdown is signalled meanwhile; true when it was.
pub async fn stopped_during(
    shutdown: &mut watch::Receiver<bool>,
    pause: std::time::Duration,
) -> bool {
    tokio::select! {
        _ = shutdown.changed() => true,
        _ = tokio::time::sleep(pause) => false,
    }
}
