//! Tests that measure or configure the whole process, in a binary of their own (see
//! `tests/it/main.rs` for all the others):
//!
//! * `kafka_logging` installs the process's global tracing subscriber: librdkafka logs from its
//!   own threads, which only a global subscriber sees, and only one can exist per process.
//! * `traces` exports spans from every thread of the runtime PCF runs on, and turns on the
//!   process-wide switch that adds the spans made only for traces.
//! * `fleet` runs PCF as several processes behind HAProxy (scripts/fleet.sh) and takes one of
//!   them, or an engine's node, down under load; one fleet at a time (its ports are fixed).
//! * `websocket_memory` measures the process's resident memory, which other tests running in
//!   the same process would disturb.
//!
//! Each test but the fleet's holds [`WHOLE_PROCESS`] while it runs, so neither disturbs the
//! other (the fleet's work in processes of their own).

#[macro_use]
#[allow(dead_code, unused_imports, unused_macros)]
#[path = "../it/support/mod.rs"]
mod support;

mod fleet;
mod kafka_logging;
mod traces;
mod websocket_memory;

/// Held by each test of this binary for as long as it runs: the tests here must have the
/// process to themselves.
static WHOLE_PROCESS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
