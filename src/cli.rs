//! The `pcf` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pcf_domain::ports::LogQuery;
use pcf_domain::Position;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use crate::app::{Role, ALL_ROLES};
use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "pcf",
    version,
    about = "PCF: an event-sourced CQRS backend for user accounts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runs the server (all roles by default).
    Serve {
        /// Comma-separated roles: api, relay, projector.
        #[arg(long, value_delimiter = ',', default_value = "api,relay,projector")]
        role: Vec<Role>,
        /// HTTP address (overrides PCF_LISTEN).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Applies the SQL migrations.
    Migrate,
    /// Prints the GraphQL SDL.
    Schema,
    /// Reads the event log.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Inspects and rebuilds the projections.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Mints a JWT with the configured secret (PCF_JWT_SECRET), for development and tests.
    Token {
        #[arg(long)]
        sub: String,
        /// admin, auditor or analytics; repeat for several. None for a plain user.
        #[arg(long)]
        role: Vec<String>,
        #[arg(long)]
        tier: Option<String>,
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Benchmarks against the cluster services, each scenario beside its baseline.
    Bench {
        /// Seconds of warm-up before each measurement.
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        /// Seconds each measurement lasts.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Throughput scenarios alternate with their baselines in this many rounds.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Users for the updateProfile and query scenarios.
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        /// Events in the log for the rebuild scenario.
        #[arg(long, default_value_t = 1_000_000)]
        rebuild_events: u64,
        /// The loads commit -> visible runs at, as fractions of the maximum command rate;
        /// its target applies at 0.5. More than one measures how latency grows with load.
        #[arg(long, value_delimiter = ',', default_value = "0.5", value_parser = load_fraction)]
        visible_load: Vec<f64>,
        /// Only scenarios whose name starts with one of these (createUser, updateProfile,
        /// visible, query, rebuild).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Also write the results as JSON here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Keep the run's database, topics, consumer groups and Redis keys afterwards
        /// (they are removed by default).
        #[arg(long)]
        keep: bool,
    },
    /// Inspects the relay.
    Relay {
        #[command(subcommand)]
        command: RelayCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProjectionsCommand {
    /// Generation, checkpoint and lag of every projection.
    Status,
    /// Rebuilds a projection (or `all`) from the event store into a new generation and
    /// switches readers to it when it has caught up, while live traffic goes on.
    Rebuild { name: String },
}

#[derive(Subcommand, Debug)]
pub enum RelayCommand {
    /// The relay's checkpoint and backlog.
    Status,
}

#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// Prints one user's events as JSON envelopes, one per line.
    Show { user_id: uuid::Uuid },
    /// Prints the log from a position on (the start by default) and follows it.
    Tail {
        #[arg(long)]
        from: Option<String>,
    },
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Serve {
        role: ALL_ROLES.to_vec(),
        listen: None,
    });
    match command {
        Command::Serve { role, listen } => serve(Config::load(listen)?, &role).await,
        Command::Migrate => {
            let config = Config::load(None)?;
            crate::app::open_store(&config).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Token {
            sub,
            role,
            tier,
            ttl,
        } => {
            let config = Config::load(None)?;
            let Some(secret) = &config.jwt_secret else {
                anyhow::bail!(
                    "pcf token signs with PCF_JWT_SECRET; set it (the server must use the same)"
                );
            };
            let roles = role
                .iter()
                .map(|r| {
                    pcf_domain::auth::AccessRole::parse(r).ok_or_else(|| {
                        anyhow::anyhow!("--role {r:?}: one of admin, auditor, analytics")
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            if let Some(t) = tier.as_deref().filter(|t| *t != "premium") {
                anyhow::bail!("--tier {t:?}: the only tier is premium");
            }
            let ttl = crate::auth::parse_ttl(&ttl)?;
            println!(
                "{}",
                crate::auth::mint(secret, &sub, &roles, tier.as_deref(), ttl)?
            );
            Ok(())
        }
        Command::Bench {
            warmup,
            duration,
            concurrency,
            rounds,
            users,
            rebuild_events,
            visible_load,
            only,
            out,
            keep,
        } => {
            let options = crate::bench::BenchOptions {
                warmup: Duration::from_secs(warmup),
                duration: Duration::from_secs(duration),
                concurrency: concurrency.max(1),
                rounds: rounds.max(1),
                users: users.max(1),
                rebuild_events,
                visible_loads: visible_load,
                only,
                out,
                keep,
            };
            crate::bench::run(Config::load(None)?, options).await
        }
        Command::Schema => {
            print!("{}", crate::app::sdl());
            Ok(())
        }
        Command::Events { command } => events(Config::load(None)?, command).await,
        Command::Projections { command } => {
            crate::operate::projections(Config::load(None)?, command).await
        }
        Command::Relay {
            command: RelayCommand::Status,
        } => crate::operate::relay_status(Config::load(None)?).await,
    }
}

async fn serve(config: Config, roles: &[Role]) -> anyhow::Result<()> {
    let app = crate::app::build_roles(&config, roles).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let mode = if config.embedded() {
        format!("embedded, data in {}", config.data_dir.display())
    } else if config.uses_kafka() {
        "cluster".to_owned()
    } else {
        "PostgreSQL event store, in-process bus".to_owned()
    };
    tracing::info!(%addr, %mode, "PCF listening");
    println!("PCF listening on http://{addr} ({mode})");
    if config.environment == crate::config::Environment::Development {
        println!("GraphiQL: http://{addr}/graphiql");
    }
    if let Some(token) = &app.dev_token {
        println!("No PCF_JWT_SECRET set: tokens are signed with a random secret until restart.");
        println!("Development admin token (12h): {token}");
    }
    let router = app.router.clone();
    crate::server::serve(
        listener,
        router,
        crate::server::ConnectionLimits::from_config(&config),
        async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        },
    )
    .await?;
    app.shutdown().await;
    Ok(())
}

async fn events(config: Config, command: EventsCommand) -> anyhow::Result<()> {
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

/// A load for `pcf bench --visible-load`: a fraction of the maximum command rate, above 0
/// and at most 1.
fn load_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!(
            "{s:?} is not a fraction of the maximum command rate (above 0, at most 1)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{Cli, Command};
    use clap::Parser;

    fn visible_loads(args: &[&str]) -> Result<Vec<f64>, clap::Error> {
        let cli = Cli::try_parse_from([&["pcf", "bench"], args].concat())?;
        match cli.command {
            Some(Command::Bench { visible_load, .. }) => Ok(visible_load),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn commit_to_visible_runs_at_half_the_command_rate_unless_told() {
        assert_eq!(visible_loads(&[]).unwrap(), vec![0.5]);
        assert_eq!(
            visible_loads(&["--visible-load", "0.1,0.25,0.5"]).unwrap(),
            vec![0.1, 0.25, 0.5]
        );
        assert_eq!(visible_loads(&["--visible-load", "1"]).unwrap(), vec![1.0]);
    }

    #[test]
    fn a_load_outside_the_command_rate_is_refused_with_its_value() {
        for bad in ["0", "-0.5", "1.5", "half", "NaN"] {
            let e = visible_loads(&[&format!("--visible-load={bad}")]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }
}
