//! Projectors of PCF: they consume the event stream and write the read models, applying each
//! user's events exactly once and in sequence (a duplicate is skipped, a gap is filled from
//! the event store first).
//!
//! `Projection` (in `projection`) is what a projection means, written once; `ViewStore`
//! (in `store`) is what a read model's storage does for it, implemented by the in-memory,
//! Redis and SQL views. The Kafka consumer and the rebuild drive a `Projection`, which opens
//! events' sealed personal data with its `Opener` (`Projection::with_opener`) before folding.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod consumer;
pub mod memory;
pub mod projection;
pub mod rebuild;
pub mod redis_view;
mod retry;
pub mod sql_view;
pub mod status;
pub mod store;
#[cfg(test)]
mod testing;

pub use consumer::{ConsumerConfig, KafkaProjector, ProjectorStats};
pub use memory::MemoryUserViews;
pub use projection::{Foldable, LiveBatch, Projection, ProjectionError, SetAside};
pub use rebuild::{rebuild_views, rebuild_views_with, Progress, RebuildOptions, Rebuilt};
pub use redis_view::{delete_matching, RedisUserViews};
pub use sql_view::SqlUserViews;
pub use status::{consumer_lag, consumer_lag_with_age, PartitionLag};
pub use store::{GenerationState, Offsets, Scope, ViewBatch, ViewStore, Written};
