//! Where a Kafka projection stands: committed offset, end of the partition, and the lag.

use pcf_adapters::kafka::QuietContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;

/// One partition of a projection's consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition's number.
    pub partition: i32,
    /// The next offset the group will read (`None`: nothing committed yet).
    pub committed: Option<i64>,
    /// The partition's end.
    pub high: i64,
    /// Messages not yet committed by the group.
    pub lag: i64,
}

/// Reads the group's committed offsets and the partitions' ends.
pub async fn consumer_lag(
    brokers: &str,
    topic: &str,
    group: &str,
) -> Result<Vec<PartitionLag>, rdkafka::error::KafkaError> {
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    let group = group.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer<QuietContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create_with_context(QuietContext::default())?;
        let timeout = Duration::from_secs(5);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(&topic, *p);
        }
        let committed = consumer.committed_offsets(tpl, timeout)?;
        let mut out = Vec::with_capacity(partitions.len());
        for p in partitions {
            let (low, high) = consumer.fetch_watermarks(&topic, p, timeout)?;
            let committed = committed
                .find_partition(&topic, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            let lag = high - committed.unwrap_or(low);
            out.push(PartitionLag {
                partition: p,
                committed,
                high,
                lag,
            });
        }
        Ok(out)
    })
    .await
    .map_err(|_| rdkafka::error::KafkaError::Canceled)?
}
