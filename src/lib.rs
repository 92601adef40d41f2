//! PCF, the binary's library: configuration (`config`), the HTTP surface and what guards it
//! (`http`), the wiring of the two modes and their background tasks (`app`), and the
//! command line (`cli`). `main.rs` only calls into here.
#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod config;
pub mod http;
pub mod telemetry;

pub use app::{build, App};
pub use config::Config;
