//! The `pcf` command line: its arguments (`args`), serving (`serve`), reading the log
//! (`events`), publishing it again onto a Kafka topic (`republish`), and inspecting and
//! rebuilding the projections and the relay (`operate`).

pub mod args;
pub mod events;
pub mod keys;
pub mod operate;
pub mod republish;
pub mod serve;

pub use args::{
    Cli, Command, EventsCommand, KeysCommand, ProjectionsCommand, RelayCommand, RepublishArgs,
};

use crate::app::ALL_ROLES;
use crate::config::Config;

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Serve {
        role: ALL_ROLES.to_vec(),
        listen: None,
    });
    match command {
        Command::Serve { role, listen } => serve::serve(Config::load(listen)?, &role).await,
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
            let ttl = crate::http::auth::parse_ttl(&ttl)?;
            println!(
                "{}",
                crate::http::auth::mint(secret, &sub, &roles, tier.as_deref(), ttl)?
            );
            Ok(())
        }
        Command::Schema => {
            print!("{}", crate::http::schema::sdl());
            Ok(())
        }
        Command::Events { command } => events::events(Config::load(None)?, command).await,
        Command::Keys { command } => keys::keys(Config::load(None)?, command).await,
        Command::Projections { command } => {
            operate::projections(Config::load(None)?, command).await
        }
        Command::Relay {
            command: RelayCommand::Status,
        } => operate::relay_status(Config::load(None)?).await,
    }
}

/// A long operation's progress on standard error: a bar, counts of `unit`, rate and ETA.
fn progress_bar(name: &str, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    let template = format!(
        "{{prefix}} [{{bar:30}}] {{percent:>3}}% {{human_pos}}/{{human_len}} {unit}  {{per_sec}}  ETA {{eta}}"
    );
    let style = indicatif::ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("#>.");
    bar.set_style(style);
    bar.set_prefix(name.to_owned());
    bar
}
