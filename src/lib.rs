//! PCF, the binary's library: configuration, wiring of the two modes, the HTTP server, the
//! in-process bus, metrics and the CLI. `main.rs` only calls into here.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod bench;
pub mod bus;
pub mod cli;
pub mod config;
pub mod health;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod monitor;
pub mod operate;
pub mod ratelimit;
pub mod server;
pub mod websocket;

pub use app::{build, App};
pub use config::Config;
