//! The `pcf` command line's arguments.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;

use crate::app::Role;

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

impl Cli {
    /// The service its traces are reported as: `pcf` for a server of every role, `pcf-api`,
    /// `pcf-relay-projector` and so on for fewer, `pcf-cli` for the other commands.
    pub fn service_name(&self) -> String {
        match &self.command {
            None => "pcf".into(),
            Some(Command::Serve { role, .. }) => {
                if crate::app::ALL_ROLES.iter().all(|r| role.contains(r)) {
                    return "pcf".into();
                }
                let mut names: Vec<&str> = role
                    .iter()
                    .map(|r| match r {
                        Role::Api => "api",
                        Role::Relay => "relay",
                        Role::Projector => "projector",
                    })
                    .collect();
                names.dedup();
                format!("pcf-{}", names.join("-"))
            }
            Some(_) => "pcf-cli".into(),
        }
    }
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
    /// Manages the keys of personal data.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
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
pub enum KeysCommand {
    /// Re-wraps every user's data key under the newest key-encryption key (the first of
    /// PCF_KEK_FILE), while traffic goes on; resumable. Afterwards the older KEKs can be
    /// retired.
    Rotate,
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
    /// Seals the personal data of events written before it was sealed (erasing it for
    /// deleted accounts), in place: the one sanctioned rewrite of history (docs/events.md).
    /// Resumable and idempotent; safe while traffic goes on.
    Protect,
    /// Publishes the log (or part of it) again, in commit order, onto a Kafka topic, with
    /// the live stream's envelope, key and headers plus the header `replay`: for new
    /// consumers and topic switches. Resumable: run it again to go on from its checkpoint.
    Republish(RepublishArgs),
}

/// What `pcf events republish` publishes, where, and how fast.
#[derive(Args, Debug, Clone, Default)]
pub struct RepublishArgs {
    /// The topic, created if it does not exist.
    #[arg(long)]
    pub topic: String,
    /// The first position to publish (an event's position, as PCF prints it); the start of
    /// the log by default.
    #[arg(long)]
    pub from: Option<String>,
    /// The last position to publish (an event's position); the end of the log as it is when
    /// the run starts by default.
    #[arg(long)]
    pub to: Option<String>,
    /// Only these event types, comma-separated (UserCreated, ProfileUpdated, EmailChanged,
    /// AccountDeleted).
    #[arg(long, value_delimiter = ',')]
    pub types: Vec<String>,
    /// At most this many events a second, so that a replay leaves room to the live relay.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: Option<u32>,
    /// Partitions of the topic if it is created (`kafka_partitions` by default); an existing
    /// topic must have this many.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub partitions: Option<i32>,
}
