//! The command side of PCF: executes commands on the `User` aggregate (cqrs-es), appends
//! their events to the event store (PostgreSQL through postgres-es, or SQLite through
//! sqlite-es when embedded) together with email uniqueness and command idempotency (per
//! caller and command, for `COMMAND_ID_RETENTION`), relays committed events to the bus in
//! commit order, republishes the log onto a topic (`republish`), and serves the GraphQL
//! `MutationRoot`.
#![forbid(unsafe_code)]

pub mod graphql;
pub mod idempotency;
pub mod kafka;
pub mod relay;
pub mod republish;
pub mod service;
pub mod store;

pub use graphql::{CommandContext, MutationRoot};
pub use idempotency::{Caller, COMMAND_ID_RETENTION};
pub use relay::{Relay, RelayConfig};
pub use republish::{RepublishConfig, RepublishError, Republisher, Selection};
pub use service::{CommandError, CommandResult, CommandService};
pub use store::{
    postgres::PostgresStore, sqlite::SqliteStore, Backlog, CommandStore, CommitFeed, EventStore,
    ProtectHistory, Protected, RelayStore, RepublishCheckpoint, RepublishState, RepublishStore,
    StoreError, StoreHealth,
};
