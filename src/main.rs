//! `pcf`: configuration → logs and traces → the chosen command.
#![forbid(unsafe_code)]

use clap::Parser;
use pcf::telemetry::{LogFormat, TraceSettings};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = pcf::cli::Cli::parse();
    let filter = EnvFilter::try_from_env("PCF_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let traces = TraceSettings::from_env(&cli.service_name())?;
    let (subscriber, telemetry) =
        pcf::telemetry::subscriber(filter, LogFormat::from_env(), std::io::stderr, &traces)?;
    pcf::telemetry::install(subscriber)?;
    let result = pcf::cli::run(cli).await;
    telemetry.shutdown().await;
    result
}
