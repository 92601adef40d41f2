//! Projectors of PCF: they consume the event stream and write the read models, applying each
//! user's events exactly once and in sequence (a duplicate is skipped, a gap is filled from
//! the event store first).
#![forbid(unsafe_code)]

pub mod consumer;
pub mod generations;
pub mod memory;
pub mod projector;
pub mod rebuild;
pub mod redis_view;
pub mod sql_view;
pub mod status;

pub use consumer::{ConsumerConfig, KafkaProjector, ProjectorStats};
pub use generations::{GenerationState, Generational};
pub use memory::MemoryUserViews;
pub use projector::{ProjectionError, UserProjector, UserViewWriter};
pub use rebuild::{rebuild, rebuild_all, Progress, RebuildOptions};
pub use redis_view::{delete_matching, RedisUserViews};
pub use sql_view::SqlUserViews;
pub use status::{consumer_lag, PartitionLag};
