//! The command side of PCF: executes commands on the `User` aggregate (cqrs-es), appends
//! their events to the event store (PostgreSQL through postgres-es, or SQLite through
//! sqlite-es when embedded) together with email uniqueness and command idempotency, relays
//! committed events to the bus in commit order, and serves the GraphQL `MutationRoot`.
#![forbid(unsafe_code)]

pub mod graphql;
pub mod kafka;
pub mod relay;
pub mod service;
pub mod store;

pub use graphql::{CommandContext, MutationRoot};
pub use relay::{Relay, RelayConfig};
pub use service::{CommandError, CommandResult, CommandService};
pub use store::{postgres::PostgresStore, sqlite::SqliteStore, EventStore, StoreError};
