//! What PCF's crates share about the storage clients, apart from the domain: how a
//! dependency's failures are logged (once, then at a bounded rate with the count of
//! repeats) and the Kafka client context that does so for librdkafka.
#![forbid(unsafe_code)]

pub mod kafka;
pub mod repeats;

pub use repeats::{Repeats, RepeatsByKey};
