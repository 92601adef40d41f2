//! The `User` aggregate of PCF: its commands, events, value types, domain errors, the event
//! envelope shared by every reader of the log, and the port traits that adapters implement.
//!
//! Nothing here does I/O; adapters for storage, buses and views live in the other crates.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod auth;
pub mod commands;
pub mod envelope;
pub mod errors;
pub mod events;
pub mod ports;
pub mod read_model;
pub mod time;
pub mod values;
pub mod view;

pub use aggregate::{User, UserServices};
pub use commands::{ProfilePatch, UserCommand};
pub use envelope::{EventEnvelope, EventMetadata, Position, PositionParseError};
pub use errors::{ErrorCode, UserError};
pub use events::UserEvent;
pub use values::{AvatarUrl, Bio, DisplayName, Email, ValueError};
pub use view::UserView;

/// The aggregate type name stored with every event and published in the envelope.
pub const AGGREGATE_TYPE: &str = "User";
