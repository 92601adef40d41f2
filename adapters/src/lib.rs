//! What PCF's crates must agree on at their edges, written once:
//!
//! * `errors`: the public error vocabulary (`pcf_domain::ErrorCode`) as GraphQL errors with
//!   their `extensions.code`, the one place a code becomes an extension;
//! * `sql` and `redis`: what a storage client's error means (the dependency is unavailable,
//!   or something is wrong), and the `read_users` row codec its writer and readers share;
//! * `personal`: personal data sealed per user (keys, KEKs, the sealed payload shapes);
//! * `kafka`: the topic, dead-letter and header names, and the client context that logs a
//!   repeated failure once, then with its count (`repeats`).
#![forbid(unsafe_code)]

pub mod errors;
pub mod kafka;
pub mod keys;
pub mod personal;
pub mod redis;
pub mod repeats;
pub mod sql;
pub mod trace;

pub use repeats::{Repeats, RepeatsByKey};
