//! Embedded mode (no Kafka): an in-process bus, in-memory views rebuilt from the log at start,
//! and a relay from the event store to the bus, all in this one process.

use anyhow::Context;
use pcf_command::Relay;
use pcf_projectors::{MemoryUserViews, Projection, RebuildOptions};
use std::sync::Arc;

use super::background::{relay_config, relay_name};
use super::bus::InProcessBus;
use super::monitor::MemoryMonitor;
use super::process::{Process, ReadSide};
use super::roles::ALL_ROLES;

/// Builds the views from the log and starts the projector and the relay.
pub async fn read_side(p: &mut Process<'_>) -> anyhow::Result<ReadSide> {
    if p.roles.len() < ALL_ROLES.len() {
        anyhow::bail!(
            "without Kafka every role runs in one process (the bus and views are in memory); drop --role or set PCF_KAFKA_BROKERS"
        );
    }
    let bus = Arc::new(InProcessBus::new());
    let views = Arc::new(MemoryUserViews::new());
    let projection = Projection::new(views.clone(), p.log.clone()).with_opener(p.keys.clone());
    // Subscribe first, then rebuild from the log, so nothing falls between the two (anything
    // seen twice is skipped by sequence). The views are built as any rebuild builds them.
    let batches = bus.subscribe();
    let options = RebuildOptions {
        batch_size: 1000,
        linger: std::time::Duration::ZERO,
    };
    let caught_up = projection
        .rebuild(&options, &|_| {})
        .await
        .context("rebuilding the views from the log")?
        .position;
    tracing::info!(users = views.len(), "views rebuilt from the log");
    p.spawn(projection.run(batches));
    let mut relay_settings = relay_config(p.config);
    if p.config.database_url.is_some() {
        // Several processes may share this event store, each with in-memory views: each
        // relays to its own bus, from where its rebuild ended.
        relay_settings.local_from = Some(caught_up);
    }
    let relay = Relay::new(p.store.clone(), bus, relay_settings);
    p.metrics
        .watch_relay(relay_config(p.config), p.store.clone());
    let stopped = p.stopped();
    p.spawn(relay.run(stopped));
    let monitor = Arc::new(MemoryMonitor {
        store: p.store.clone(),
        relay: relay_name(p.config),
    });
    Ok(ReadSide {
        users: views,
        monitor,
    })
}
