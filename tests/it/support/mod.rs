//! The harness of the integration tests, one file per concern:
//!
//! * `services`: where the shared services are; ports and processes of private ones.
//! * `database`: a fresh PostgreSQL database per test.
//! * `cleanup`: the panic-safe runner (`run`) and the scenario macros built on it.
//! * `auth`: tokens and API keys the test apps accept.
//! * `graphql`: the in-process client (router + `oneshot`) and the operations.
//! * `app`: a whole embedded PCF on a temporary directory, or on PostgreSQL.
//! * `cluster`: PCF in cluster mode on the shared services, and its views against the log.
//! * `kafka`, `redis_server`: topics and key prefixes per test, their cleanup, private
//!   servers.
//! * `websocket`: the app on a loopback socket and a graphql-transport-ws client.
//! * `wait`: bounded polling.
//! * `logs`: capturing what the product logs.
//!
//! Everything is re-exported here, so a test module starts with `use crate::support::*;`.

pub mod app;
pub mod auth;
#[macro_use]
pub mod cleanup;
pub mod cluster;
pub mod database;
pub mod graphql;
pub mod kafka;
pub mod logs;
pub mod redis_server;
pub mod services;
pub mod wait;
pub mod websocket;

pub use app::*;
pub use auth::*;
pub use cleanup::*;
pub use cluster::*;
pub use database::*;
pub use graphql::*;
pub use kafka::*;
pub use logs::*;
pub use redis_server::*;
pub use services::*;
pub use wait::*;
pub use websocket::*;
