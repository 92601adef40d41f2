//! `pcf`: configuration → tracing → the chosen command.
#![forbid(unsafe_code)]

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = pcf::cli::Cli::parse();
    let filter = EnvFilter::try_from_env("PCF_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("PCF_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    pcf::cli::run(cli).await
}
