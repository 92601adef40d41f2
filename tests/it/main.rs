//! The integration tests of PCF, in one binary: linking a test binary against the whole
//! product takes far longer than compiling a test module, so every test module that can share
//! a process lives here, beside the one harness (`support`).
//!
//! One test binary stands apart, `tests/process/` ("tests that measure or configure the whole
//! process"): a test there installs the process's global tracing subscriber (librdkafka logs
//! from its own threads, which only a global subscriber sees, and only one can exist per
//! process), and another measures the process's resident memory, which tests running beside it
//! would disturb.

#[macro_use]
mod support;

mod api_access;
mod api_hardening;
mod api_injection;
mod api_ratelimit;
mod api_tokens;
mod api_websocket;
mod cluster_flow;
mod cluster_outages;
mod cluster_projectors;
mod cluster_relay;
mod commands;
mod deploy;
mod embedded;
mod erasure;
mod event_schemas;
mod failover;
mod http;
mod prometheus;
mod queries;
mod readme;
mod redis_cluster;
mod relay;
mod republish;
mod schema;
mod shutdown;
