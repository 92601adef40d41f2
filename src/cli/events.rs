//! `pcf events show` and `pcf events tail`: the log as JSON envelopes, one per line.

use pcf_domain::ports::LogQuery;
use pcf_domain::Position;
use std::io::Write;
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
            let mut after = match from {
                Some(p) => p.parse::<Position>().map_err(|_| {
                    anyhow::anyhow!("--from: {p:?} is not a position printed by PCF")
                })?,
                None => Position::START,
            };
            loop {
                let query = LogQuery {
                    after: Some(after),
                    limit: 1000,
                    ..LogQuery::default()
                };
                let batch = store.read(&query).await?;
                for e in &batch {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                }
                out.flush()?;
                match batch.last() {
                    Some(last) => after = last.position,
                    None => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
    }
    Ok(())
}
