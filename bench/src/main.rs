//! `pcf-bench`: PCF's benchmarks against the cluster services, each scenario beside its
//! baseline measured in the same run (`docs/benchmarks.md`). Run it with
//! `cargo run --release -p pcf-bench -- [options]`, configured like `pcf` (`PCF_DATABASE_URL`,
//! `PCF_KAFKA_BROKERS`, `PCF_REDIS_URL`, ...).
#![forbid(unsafe_code)]

use clap::Parser;
use pcf::telemetry::{LogFormat, TraceSettings};
use pcf_bench::BenchOptions;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

// The allocator `pcf` runs with, so that the figures are the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmarks against the cluster services, each scenario beside its baseline.
#[derive(Parser, Debug)]
#[command(name = "pcf-bench", version)]
struct Args {
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
    /// Events published by the republish scenario (the first of the log; seeded if the log
    /// holds fewer).
    #[arg(long, default_value_t = 200_000)]
    republish_events: u64,
    /// The loads commit -> visible runs at, as fractions of the maximum command rate;
    /// its target applies at 0.5. More than one measures how latency grows with load.
    #[arg(long, value_delimiter = ',', default_value = "0.5", value_parser = load_fraction)]
    visible_load: Vec<f64>,
    /// Only scenarios whose name starts with one of these (createUser, updateProfile, deleteAccount,
    /// visible, query, rebuild, republish).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also write the results as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Keep the run's database, topics, consumer groups and Redis keys afterwards
    /// (they are removed by default).
    #[arg(long)]
    keep: bool,
    /// Export every span (sample ratio 1.0) over OTLP to a receiver the bench runs, which
    /// reads and discards them: what tracing costs. Without it, spans are exported only if
    /// PCF_OTLP_ENDPOINT is set.
    #[arg(long)]
    traces: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("PCF_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let traces = if args.traces {
        TraceSettings::parse("pcf-bench", Some(&otlp_sink().await?), Some("1"))?
    } else {
        TraceSettings::from_env("pcf-bench")?
    };
    let (subscriber, telemetry) =
        pcf::telemetry::subscriber(filter, LogFormat::Text, std::io::stderr, &traces)?;
    pcf::telemetry::install(subscriber)?;
    let options = BenchOptions {
        warmup: Duration::from_secs(args.warmup),
        duration: Duration::from_secs(args.duration),
        concurrency: args.concurrency.max(1),
        rounds: args.rounds.max(1),
        users: args.users.max(1),
        rebuild_events: args.rebuild_events,
        republish_events: args.republish_events,
        visible_loads: args.visible_load,
        only: args.only,
        out: args.out,
        keep: args.keep,
    };
    let result = pcf_bench::run(pcf::Config::load(None)?, options).await;
    if telemetry.exporting() {
        telemetry.flush().await;
        let spans = &pcf::telemetry::SPANS;
        eprintln!(
            "bench: spans exported {}, dropped {}",
            spans.exported.load(Ordering::Relaxed),
            spans.dropped.load(Ordering::Relaxed)
        );
    }
    telemetry.shutdown().await;
    result
}

/// An OTLP/HTTP receiver on a loopback port that reads each request whole and accepts it;
/// its address.
async fn otlp_sink() -> anyhow::Result<String> {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(|body: bytes::Bytes| async move {
            std::hint::black_box(body.len());
            (
                [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                Vec::<u8>::new(),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(address)
}

/// A load for `--visible-load`: a fraction of the maximum command rate, above 0 and at
/// most 1.
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
    use super::Args;
    use clap::Parser;

    fn visible_loads(args: &[&str]) -> Result<Vec<f64>, clap::Error> {
        Ok(Args::try_parse_from([&["pcf-bench"], args].concat())?.visible_load)
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
