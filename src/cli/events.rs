//! `pcf events show` and `pcf events tail`: the log as JSON envelopes, one per line.

use pcf_domain::ports::{EventLog, LogPages};
use pcf_domain::Position;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use super::args::EventsCommand;
use crate::config::Config;

/// Prints one user's events, or the log from a position on (following it).
pub async fn events(config: Config, command: EventsCommand) -> anyhow::Result<()> {
    let store = crate::app::open_store(&config).await?;
    let mut out = std::io::stdout().lock();
    match command {
        EventsCommand::Show { user_id } => {
            for e in store.user_events(user_id, 0).await? {
                writeln!(out, "{}", serde_json::to_string(&e)?)?;
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
                let page = pages.next_page().await?;
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
