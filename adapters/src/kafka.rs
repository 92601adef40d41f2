//! Kafka names every PCF client agrees on (the event topic's dead-letter topic, the headers
//! of an event message and of a dead letter), and the Kafka client context of every PCF client (producer, consumers, admin): librdkafka's
//! log lines and global errors go to `tracing` like rdkafka's default context sends them
//! to `log`, except that a failure repeated while a broker is unreachable (every reconnect
//! of every client, many times a second) is logged once and then every
//! [`crate::repeats::DEFAULT_EVERY`] with the count of repeats.

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;

use crate::repeats::RepeatsByKey;

/// The event topic when none is configured.
pub const DEFAULT_TOPIC: &str = "pcf.users.v1";

/// The dead-letter topic of an event topic: where projectors put what they can never apply.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Header names of an event message (the relay writes them, consumers read them) and of a
/// dead letter (the projector writes them).
pub mod headers {
    /// The event's type (`UserCreated`, …).
    pub const EVENT_TYPE: &str = "eventType";
    /// The event's version.
    pub const EVENT_VERSION: &str = "eventVersion";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// The command's correlation id.
    pub const CORRELATION_ID: &str = "correlationId";
    /// Present, with the value [`REPLAY_VALUE`], on the messages of a replay of the log
    /// (`pcf events republish`); absent from the live stream.
    pub const REPLAY: &str = "replay";
    pub const REPLAY_VALUE: &str = "true";
    /// Why a dead letter could not be applied.
    pub const ERROR: &str = "error";
    /// Where a dead letter came from: topic, partition, offset, and the consumer group.
    pub const SOURCE_TOPIC: &str = "sourceTopic";
    pub const SOURCE_PARTITION: &str = "sourcePartition";
    pub const SOURCE_OFFSET: &str = "sourceOffset";
    pub const CONSUMER_GROUP: &str = "consumerGroup";
}

/// A client context whose logging of repeated failures is bounded.
#[derive(Debug, Default)]
pub struct QuietContext {
    repeats: RepeatsByKey,
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // librdkafka's own debug chatter is left out unless asked for, as by default.
        if matches!(level, RDKafkaLogLevel::Debug) {
            tracing::debug!(target: "librdkafka", "{fac} {message}");
            return;
        }
        // The facility (FAIL, REQTMOUT, ...) names the kind; the text varies per attempt.
        let Some(repeats) = self.repeats.admit(&format!("log:{fac}")) else {
            return;
        };
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", repeats, "{fac} {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", repeats, "{fac} {message}")
            }
            _ => tracing::info!(target: "librdkafka", repeats, "{fac} {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // The error's code names the kind ("all brokers down"); the reason varies with
        // counts and timings.
        let key = match error.rdkafka_error_code() {
            Some(code) => format!("error:{code:?}"),
            None => format!("error:{error}"),
        };
        if let Some(repeats) = self.repeats.admit(&key) {
            tracing::error!(target: "librdkafka", repeats, "Kafka client error: {error}: {reason}");
        }
    }
}

impl ConsumerContext for QuietContext {}
