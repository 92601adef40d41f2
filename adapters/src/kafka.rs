//! The Kafka client context of every PCF client (producer, consumers, admin): librdkafka's
//! log lines and global errors go to `tracing` like rdkafka's default context sends them
//! to `log`, except that a failure repeated while a broker is unreachable (every reconnect
//! of every client, many times a second) is logged once and then every
//! [`crate::repeats::DEFAULT_EVERY`] with the count of repeats.

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;

use crate::repeats::RepeatsByKey;

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
