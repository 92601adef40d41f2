//! `pcf events protect` seals the personal data of older events in place (`pcf events
//! republish` is in `republish`). `pcf events show`
//! and `pcf events tail`: the log as JSON envelopes, one per line, with the
//! personal data opened (this tool holds the key-encryption keys): erased where the user's key
//! is destroyed. An event whose personal data does not open stops the command, naming it.

use pcf_adapters::keys::Keys;
use pcf_domain::ports::{EventLog, LogPages};
use pcf_domain::{EventEnvelope, Position};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use super::args::EventsCommand;
use crate::app::Storage;
use crate::config::Config;
use pcf_command::EventStore;

/// Prints one user's events, or the log from a position on (following it).
pub async fn events(config: Config, command: EventsCommand) -> anyhow::Result<()> {
    let command = match command {
        // It opens the store itself, once it knows Kafka is configured: without Kafka
        // nothing is opened or written.
        EventsCommand::Republish(args) => return super::republish::command(&config, args).await,
        other => other,
    };
    let Storage { store, keys, .. } = crate::app::open_store(&config).await?;
    let mut out = std::io::stdout().lock();
    match command {
        EventsCommand::Protect => protect(&*store).await?,
        EventsCommand::Republish(args) => super::republish::command(&config, args).await?,
        EventsCommand::Show { user_id } => {
            let mut events = store.user_events(user_id, 0).await?;
            open(&keys, &mut events).await?;
            for e in &events {
                writeln!(out, "{}", serde_json::to_string(e)?)?;
            }
        }
        EventsCommand::Tail { from } => {
            let after = match from {
                Some(p) => p.parse::<Position>().map_err(|_| {
                    anyhow::anyhow!("--from: {p:?} is not a position printed by PCF")
                })?,
                None => Position::START,
            };
            let log: Arc<dyn EventLog> = store;
            let mut pages = LogPages::new(log, after, 1000);
            loop {
                let mut page = pages.next_page().await?;
                open(&keys, &mut page).await?;
                for e in &page {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                }
                out.flush()?;
                if page.is_empty() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    Ok(())
}

/// Opens the personal data of `events`; one that does not open is an error naming it.
async fn open(keys: &Keys, events: &mut [EventEnvelope]) -> anyhow::Result<()> {
    if let Some(bad) = keys.open(events).await?.into_iter().next() {
        anyhow::bail!(
            "the personal data of event {} does not open: {}",
            bad.event_id,
            bad.reason
        );
    }
    Ok(())
}

/// Events rewritten per step of `pcf events protect`.
const PROTECT_BATCH: u32 = 500;

/// `pcf events protect`: seals (or, for deleted accounts, erases) the personal data of the
/// events written before it was sealed, in place; resumable, while traffic goes on.
async fn protect(store: &dyn EventStore) -> anyhow::Result<()> {
    let bar = super::progress_bar("protect", "events");
    bar.set_length(store.count_plain().await?);
    let mut total = pcf_command::Protected::default();
    loop {
        let done = store.protect_some(PROTECT_BATCH).await?;
        if done.total() == 0 && store.count_plain().await? == 0 {
            break;
        }
        bar.inc(done.total());
        total.sealed += done.sealed;
        total.erased += done.erased;
        total.restamped += done.restamped;
    }
    let stray = store.destroy_keys_of_deleted().await?;
    bar.finish();
    println!(
        "{} events sealed, {} events of deleted accounts erased, {} without personal data moved to version 2; no event holds personal data in plain text{}",
        total.sealed,
        total.erased,
        total.restamped,
        if stray > 0 {
            format!(" ({stray} keys of deleted accounts destroyed)")
        } else {
            String::new()
        }
    );
    Ok(())
}
