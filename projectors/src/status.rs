//! Where a Kafka projection stands: committed offset, end of the partition, and the lag
//! (in messages, and in time: when the oldest message the group has not applied was
//! recorded).

use chrono::{DateTime, Utc};
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
    let (brokers, topic, group) = (brokers.to_owned(), topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer = lag_reader(&brokers, &group)?;
        read_lag(&consumer, &topic)
    })
    .await
    .map_err(|_| rdkafka::error::KafkaError::Canceled)?
}

/// `consumer_lag`, and for each partition with messages waiting, when the oldest of them
/// was recorded in the event store (its envelope's `recordedAt`; `None` when it could not
/// be read within `patience`).
pub async fn consumer_lag_with_age(
    brokers: &str,
    topic: &str,
    group: &str,
    patience: Duration,
) -> Result<Vec<(PartitionLag, Option<DateTime<Utc>>)>, rdkafka::error::KafkaError> {
    let (brokers, topic, group) = (brokers.to_owned(), topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer = lag_reader(&brokers, &group)?;
        let lag = read_lag(&consumer, &topic)?;
        let oldest = oldest_waiting(&consumer, &topic, &lag, patience)?;
        Ok(lag
            .into_iter()
            .map(|p| {
                let at = oldest.get(&p.partition).copied();
                (p, at)
            })
            .collect())
    })
    .await
    .map_err(|_| rdkafka::error::KafkaError::Canceled)?
}

/// A consumer that only looks: it never joins the group nor commits for it.
fn lag_reader(
    brokers: &str,
    group: &str,
) -> Result<BaseConsumer<QuietContext>, rdkafka::error::KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create_with_context(QuietContext::default())
}

/// Reads the first message the group has not applied on each partition that has one, and
/// the time its event was recorded.
fn oldest_waiting(
    consumer: &BaseConsumer<QuietContext>,
    topic: &str,
    lag: &[PartitionLag],
    patience: Duration,
) -> Result<std::collections::HashMap<i32, DateTime<Utc>>, rdkafka::error::KafkaError> {
    use rdkafka::Message as _;
    let mut found = std::collections::HashMap::new();
    let waiting: Vec<&PartitionLag> = lag.iter().filter(|p| p.lag > 0).collect();
    if waiting.is_empty() {
        return Ok(found);
    }
    let mut tpl = TopicPartitionList::new();
    for p in &waiting {
        tpl.add_partition_offset(topic, p.partition, Offset::Offset(p.high - p.lag))?;
    }
    // Assigned, not subscribed: no group membership, so the projectors' group is left alone.
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + patience;
    while found.len() < waiting.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match consumer.poll(left) {
            Some(Ok(m)) => {
                let recorded = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<RecordedAt>(p).ok())
                    .map(|r| r.recorded_at);
                if let Some(at) = recorded {
                    found.entry(m.partition()).or_insert(at);
                } else {
                    // Not an envelope (a projector dead-letters it): the message's own
                    // timestamp says when it was published.
                    if let Some(ms) = m.timestamp().to_millis() {
                        if let Some(at) = DateTime::from_timestamp_millis(ms) {
                            found.entry(m.partition()).or_insert(at);
                        }
                    }
                }
            }
            // What was found stands; the rest of the ages are unknown this time.
            Some(Err(_)) | None => break,
        }
    }
    Ok(found)
}

/// The one field of an envelope the age needs.
#[derive(serde::Deserialize)]
struct RecordedAt {
    #[serde(rename = "recordedAt")]
    recorded_at: DateTime<Utc>,
}

/// The group's committed offsets and the partitions' ends.
fn read_lag(
    consumer: &BaseConsumer<QuietContext>,
    topic: &str,
) -> Result<Vec<PartitionLag>, rdkafka::error::KafkaError> {
    let timeout = Duration::from_secs(5);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut out = Vec::with_capacity(partitions.len());
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let committed = committed
            .find_partition(topic, p)
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
}
