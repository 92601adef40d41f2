//! Operator commands: projection status and rebuilds, relay status.

use anyhow::Context;
use pcf_domain::ports::EventLog;
use pcf_projectors::{
    consumer_lag, rebuild_views_with, Progress, RebuildOptions, RedisUserViews, SqlUserViews,
    ViewStore,
};
use std::sync::Arc;

use super::args::ProjectionsCommand;
use crate::app::{open_store, pg_pool, relay_name, PROJECTIONS};
use crate::config::Config;

/// The projections of a cluster configuration, by name.
async fn projections_of(config: &Config) -> anyhow::Result<Vec<Arc<dyn ViewStore>>> {
    let Some(url) = &config.database_url else {
        anyhow::bail!("embedded mode keeps its views in memory and rebuilds them at every start");
    };
    if !config.uses_kafka() {
        anyhow::bail!("without Kafka the views are in memory and rebuilt at every start");
    }
    let primary = pg_pool(url, 8, "the SQL view (PCF_DATABASE_URL)").await?;
    let mut views: Vec<Arc<dyn ViewStore>> = vec![Arc::new(SqlUserViews::new(primary))];
    if let Some(redis) = &config.redis_url {
        views.push(Arc::new(
            RedisUserViews::connect(redis, config.redis_prefix.clone())
                .await
                .context("connecting to Redis (PCF_REDIS_URL)")?,
        ));
    }
    Ok(views)
}

/// `pcf projections status|rebuild`.
pub async fn projections(config: Config, command: ProjectionsCommand) -> anyhow::Result<()> {
    let views = projections_of(&config).await?;
    match command {
        ProjectionsCommand::Status => {
            let brokers = config.kafka_brokers.clone().unwrap_or_default();
            for view in views {
                let state = view.state().await?;
                let group = format!("{}{}", config.kafka_group_prefix, view.name());
                println!(
                    "{}  generation {}{}  (consumer group {group})",
                    view.name(),
                    state.active,
                    state
                        .building
                        .map(|b| format!(", building {b}"))
                        .unwrap_or_default()
                );
                match consumer_lag(&brokers, &config.kafka_topic, &group).await {
                    Ok(partitions) => {
                        let total: i64 = partitions.iter().map(|p| p.lag).sum();
                        for p in partitions {
                            let committed = p
                                .committed
                                .map_or_else(|| "-".to_owned(), |c| c.to_string());
                            println!(
                                "  partition {:>3}  checkpoint {committed:>10}  end {:>10}  lag {:>8}",
                                p.partition, p.high, p.lag
                            );
                        }
                        println!("  total lag {total}");
                    }
                    Err(e) => println!("  lag unknown: {e}"),
                }
            }
            Ok(())
        }
        ProjectionsCommand::Rebuild { name } => {
            let chosen: Vec<Arc<dyn ViewStore>> = if name == "all" {
                views
            } else {
                let found: Vec<_> = views.into_iter().filter(|v| v.name() == name).collect();
                if found.is_empty() {
                    anyhow::bail!(
                        "no projection named {name:?}; choose one of {} or all",
                        PROJECTIONS.join(", ")
                    );
                }
                found
            };
            let storage = open_store(&config).await?;
            let log: Arc<dyn EventLog> = storage.store;
            // All chosen views are built from one reading of the log.
            let label = chosen
                .iter()
                .map(|v| v.name().to_owned())
                .collect::<Vec<_>>()
                .join("+");
            let bar = super::progress_bar(&label, "events");
            let report = |p: Progress| {
                if let Some(total) = p.total {
                    bar.set_length(total);
                }
                bar.set_position(p.applied);
            };
            let rebuilt = rebuild_views_with(
                &chosen,
                log,
                storage.keys,
                &RebuildOptions::default(),
                &report,
            )
            .await
            .with_context(|| format!("rebuilding {name}"))?;
            bar.finish();
            for (view, generation) in chosen.iter().zip(rebuilt.generations) {
                println!(
                    "{}: readers switched to generation {generation}",
                    view.name()
                );
            }
            // What a live projector would have dead-lettered: the views hold each of these
            // users as folded up to the event before.
            if !rebuilt.set_aside.is_empty() {
                println!(
                    "{} events cannot be applied and were set aside:",
                    rebuilt.set_aside.len()
                );
                for aside in &rebuilt.set_aside {
                    println!(
                        "  event {} at position {}: {}",
                        aside.event_id, aside.source, aside.reason
                    );
                }
            }
            Ok(())
        }
    }
}

/// `pcf relay status`.
pub async fn relay_status(config: Config) -> anyhow::Result<()> {
    let store = open_store(&config).await?.store;
    let name = relay_name(&config);
    let checkpoint = store.load_checkpoint(&name).await?;
    let backlog = store.count_after(checkpoint).await?;
    println!("relay {name}");
    println!("  checkpoint {checkpoint}");
    println!("  backlog    {backlog} events");
    Ok(())
}
