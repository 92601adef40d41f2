//! Projectors of PCF: they consume the event stream and write the read models, applying each
//! user's events exactly once and in sequence (a duplicate is skipped, a gap is filled from
//! the event store first).
#![forbid(unsafe_code)]

pub mod memory;
pub mod projector;

pub use memory::MemoryUserViews;
pub use projector::{ProjectionError, UserProjector, UserViewWriter};
