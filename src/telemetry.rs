//! The process's logs and traces: one `tracing` subscriber with a log layer (`PCF_LOG`,
//! `PCF_LOG_FORMAT`) and, when `PCF_OTLP_ENDPOINT` is set, an OpenTelemetry layer whose spans
//! are exported over OTLP/HTTP. Without an endpoint there is no OpenTelemetry layer at all:
//! spans carry no trace context, and the spans created only for traces (at `debug`) are
//! disabled as any other.
//!
//! Exporting never slows a request: ended spans go into a bounded queue, a task sends them in
//! batches, and what the queue cannot take, or the collector refuses, is counted as dropped
//! (`SPANS`, in /metrics).

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Ended spans waiting for export at most; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 16_384;
/// Spans sent in one export request at most.
const BATCH_SIZE: usize = 2048;
/// How long a span waits for others to fill its batch.
const BATCH_DELAY: Duration = Duration::from_millis(200);
/// How long one export may take before it is given up (its spans counted as dropped).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the span export did, for /metrics.
#[derive(Debug, Default)]
pub struct SpanStats {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans lost: the queue was full, or the collector did not take them.
    pub dropped: AtomicU64,
}

/// The process's span export counters (one tracer per process).
pub static SPANS: SpanStats = SpanStats {
    exported: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
};

/// Whether this process exports traces (a subscriber was made with an endpoint): the HTTP
/// layer and the GraphQL extension that make spans only for traces are added then.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process exports traces.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Where and how much to trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// The collector's OTLP/HTTP address (`http://host:4318`); spans go to `/v1/traces` under
    /// it. `None`: no export.
    pub endpoint: Option<String>,
    /// The share of new traces sampled; a request that arrives with a trace context follows
    /// its parent's decision.
    pub sample_ratio: f64,
    /// The service the spans are reported as (`pcf-api`, `pcf-relay`, …).
    pub service: String,
}

impl TraceSettings {
    /// From `PCF_OTLP_ENDPOINT` and `PCF_TRACE_SAMPLE_RATIO` (default 1.0).
    pub fn from_env(service: &str) -> anyhow::Result<Self> {
        Self::parse(
            service,
            std::env::var("PCF_OTLP_ENDPOINT").ok().as_deref(),
            std::env::var("PCF_TRACE_SAMPLE_RATIO").ok().as_deref(),
        )
    }

    /// From the two settings' values, if given.
    pub fn parse(
        service: &str,
        endpoint: Option<&str>,
        ratio: Option<&str>,
    ) -> anyhow::Result<Self> {
        let endpoint = endpoint.map(str::trim).filter(|e| !e.is_empty());
        if let Some(e) = endpoint {
            let uri: hyper::Uri = e.parse().map_err(|err| {
                anyhow::anyhow!(
                    "PCF_OTLP_ENDPOINT {e:?} is not a URL ({err}); give http://host:port"
                )
            })?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                anyhow::bail!(
                    "PCF_OTLP_ENDPOINT {e:?}: give the collector's OTLP/HTTP address as http://host:port"
                );
            }
        }
        let sample_ratio = match ratio {
            None => 1.0,
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    anyhow::anyhow!("PCF_TRACE_SAMPLE_RATIO {v:?}: give a number from 0 to 1")
                })?,
        };
        Ok(Self {
            endpoint: endpoint.map(str::to_owned),
            sample_ratio,
            service: service.to_owned(),
        })
    }

    /// The URL spans are posted to.
    fn traces_url(&self) -> Option<String> {
        let endpoint = self.endpoint.as_deref()?.trim_end_matches('/');
        Some(if endpoint.ends_with("/v1/traces") {
            endpoint.to_owned()
        } else {
            format!("{endpoint}/v1/traces")
        })
    }
}

/// The process's tracer, while it exports. `flush` before the process ends sends what is
/// queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    flush: Option<mpsc::Sender<oneshot::Sender<()>>>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends every span ended so far, waiting at most `EXPORT_TIMEOUT` for the collector.
    pub async fn flush(&self) {
        let Some(flush) = &self.flush else {
            return;
        };
        let (done, flushed) = oneshot::channel();
        if flush.send(done).await.is_ok() {
            let _ = tokio::time::timeout(EXPORT_TIMEOUT * 2, flushed).await;
        }
    }

    /// Flushes, then stops the tracer.
    pub async fn shutdown(self) {
        self.flush().await;
        if let Some(provider) = self.provider {
            EXPORTING.store(false, Ordering::Relaxed);
            let _ = provider.shutdown();
        }
    }
}

/// The log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// One JSON object a line, with the `trace_id` and `span_id` of the span it was logged in.
    Json,
}

impl LogFormat {
    /// `PCF_LOG_FORMAT`: `json`, anything else is text.
    pub fn from_env() -> Self {
        match std::env::var("PCF_LOG_FORMAT") {
            Ok(f) if f == "json" => Self::Json,
            _ => Self::Text,
        }
    }
}

/// The process's subscriber: logs filtered by `log_filter` to `writer` in `format`, and spans
/// exported as `traces` says. Must be called inside a Tokio runtime when exporting (the
/// export runs as a task of it).
pub fn subscriber<W>(
    log_filter: EnvFilter,
    format: LogFormat,
    writer: W,
    traces: &TraceSettings,
) -> anyhow::Result<(impl Subscriber + Send + Sync + 'static, Telemetry)>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let (otel, telemetry) = match traces.traces_url() {
        None => (
            None,
            Telemetry {
                provider: None,
                flush: None,
            },
        ),
        Some(url) => {
            let mut exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url)
                .with_timeout(EXPORT_TIMEOUT)
                .build()?;
            let resource = Resource::builder_empty()
                .with_service_name(traces.service.clone())
                .build();
            // The exporter names the resource in each request (the processor owns it).
            exporter.set_resource(&resource);
            let (processor, flush) = QueueProcessor::start(exporter, &SPANS);
            let provider = SdkTracerProvider::builder()
                .with_span_processor(processor)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    traces.sample_ratio,
                ))))
                .with_resource(resource)
                .build();
            EXPORTING.store(true, Ordering::Relaxed);
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("pcf"))
                .with_filter(traced_spans());
            (
                Some(layer),
                Telemetry {
                    provider: Some(provider),
                    flush: Some(flush),
                },
            )
        }
    };
    let logs = tracing_subscriber::fmt::layer().with_writer(writer);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs
            .json()
            .event_format(WithTraceIds(tracing_subscriber::fmt::format().json()))
            .boxed(),
    };
    let subscriber = tracing_subscriber::registry()
        .with(logs.with_filter(log_filter))
        .with(otel);
    Ok((subscriber, telemetry))
}

/// The spans a trace is made of, whatever the log level: PCF's own (the hops of a request
/// at `debug`), and the GraphQL operation's (request, parse, validation, execution; not one
/// per resolved field, which would be most of the spans of a request). Of events, only
/// warnings and errors are recorded in their span.
fn traced_spans<S: Subscriber>() -> impl tracing_subscriber::layer::Filter<S> + Send + Sync + 'static
{
    use tracing_subscriber::filter::FilterExt;
    let targets = Targets::new()
        .with_target("pcf", LevelFilter::DEBUG)
        .with_target("pcf_command", LevelFilter::DEBUG)
        .with_target("pcf_projectors", LevelFilter::DEBUG)
        .with_target("pcf_query", LevelFilter::DEBUG)
        .with_target("pcf_adapters", LevelFilter::DEBUG)
        .with_target("async_graphql", LevelFilter::INFO);
    targets.and(tracing_subscriber::filter::filter_fn(|m| {
        if m.is_span() {
            !(m.target().starts_with("async_graphql") && m.name() == "field")
        } else {
            *m.level() <= tracing::Level::WARN
        }
    }))
}

/// A JSON log line with the trace and span ids of the span it was logged in, so a line leads
/// to its trace.
struct WithTraceIds<F>(F);

/// The dispatcher the process's subscriber was installed as (`install`), for the log format
/// to find the trace context of a span while an event is being dispatched.
static DISPATCH: OnceLock<tracing::dispatcher::WeakDispatch> = OnceLock::new();

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let ids = ctx
            .lookup_current()
            .zip(DISPATCH.get().and_then(|d| d.upgrade()))
            .and_then(|(span, dispatch)| {
                tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)
            })
            .map(|cx| cx.span().span_context().clone())
            .filter(|sc| sc.is_valid());
        match (ids, line.trim_end().strip_suffix('}')) {
            (Some(sc), Some(object)) => writeln!(
                writer,
                "{object},\"trace_id\":\"{}\",\"span_id\":\"{}\"}}",
                sc.trace_id(),
                sc.span_id()
            ),
            _ => writer.write_str(&line),
        }
    }
}

/// Installs `subscriber` as the process's.
pub fn install(subscriber: impl Subscriber + Send + Sync + 'static) -> anyhow::Result<()> {
    let dispatch = tracing::Dispatch::new(subscriber);
    let _ = DISPATCH.set(dispatch.downgrade());
    tracing::dispatcher::set_global_default(dispatch)?;
    Ok(())
}

/// `subscriber` as a dispatcher of its own (not the process's), for a test's threads.
pub fn dispatch(subscriber: impl Subscriber + Send + Sync + 'static) -> tracing::Dispatch {
    let dispatch = tracing::Dispatch::new(subscriber);
    let _ = DISPATCH.set(dispatch.downgrade());
    dispatch
}

/// The trace id of the current span, if it is traced (for answers that name their trace).
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// A batch span processor on Tokio: `on_end` only offers the span to a bounded queue (never
/// waits), a task exports the queue in batches.
#[derive(Debug)]
struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
    stats: &'static SpanStats,
}

impl QueueProcessor {
    /// The processor, and the channel that asks its task to flush.
    fn start<E: SpanExporter + 'static>(
        exporter: E,
        stats: &'static SpanStats,
    ) -> (Self, mpsc::Sender<oneshot::Sender<()>>) {
        Self::with_capacity(exporter, stats, QUEUE_CAPACITY)
    }

    fn with_capacity<E: SpanExporter + 'static>(
        exporter: E,
        stats: &'static SpanStats,
        capacity: usize,
    ) -> (Self, mpsc::Sender<oneshot::Sender<()>>) {
        let (queue, spans) = mpsc::channel(capacity);
        let (flush, flushes) = mpsc::channel(4);
        tokio::spawn(export_queue(exporter, spans, flushes, stats));
        (Self { queue, stats }, flush)
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(span).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Exports the queue batch by batch until every sender is gone; a flush request is answered
/// once everything queued before it was sent.
async fn export_queue<E: SpanExporter>(
    exporter: E,
    mut spans: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
    stats: &'static SpanStats,
) {
    let mut batch = Vec::with_capacity(BATCH_SIZE);
    loop {
        let flush = tokio::select! {
            span = spans.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    None
                }
                None => return,
            },
            Some(done) = flushes.recv() => Some(done),
        };
        if flush.is_none() {
            // A batch fills for at most `BATCH_DELAY` after its first span.
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            while batch.len() < BATCH_SIZE {
                match tokio::time::timeout_at(deadline, spans.recv()).await {
                    Ok(Some(span)) => batch.push(span),
                    Ok(None) | Err(_) => break,
                }
            }
        } else {
            while let Ok(span) = spans.try_recv() {
                batch.push(span);
            }
        }
        for chunk in std::mem::take(&mut batch).chunks(BATCH_SIZE) {
            let n = chunk.len() as u64;
            match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(chunk.to_vec())).await {
                Ok(Ok(())) => stats.exported.fetch_add(n, Ordering::Relaxed),
                Ok(Err(_)) | Err(_) => stats.dropped.fetch_add(n, Ordering::Relaxed),
            };
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Span as _, Tracer as _};
    use std::sync::{Arc, Mutex};

    /// An exporter that records batches, or never answers.
    #[derive(Debug, Clone, Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<usize>>>,
        hang: bool,
    }

    impl SpanExporter for Recorder {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.hang {
                std::future::pending::<()>().await;
            }
            self.batches.lock().unwrap().push(batch.len());
            Ok(())
        }
    }

    fn provider(processor: QueueProcessor) -> SdkTracerProvider {
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build()
    }

    /// A collector that never answers slows no span's end: the queue fills, what it cannot
    /// take is counted as dropped, and nothing waits.
    #[tokio::test]
    async fn a_collector_that_never_answers_drops_spans_and_blocks_nothing() {
        static STATS: SpanStats = SpanStats {
            exported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        };
        let hanging = Recorder {
            hang: true,
            ..Recorder::default()
        };
        let (processor, _flush) = QueueProcessor::with_capacity(hanging, &STATS, 8);
        let tracer = provider(processor).tracer("test");
        // The first span is taken from the queue and its export never ends.
        tracer.start("first").end();
        tokio::time::sleep(BATCH_DELAY * 2).await;
        let started = std::time::Instant::now();
        for _ in 0..100 {
            tracer.start("work").end();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a span's end waited"
        );
        // The queue holds 8, the other 92 are dropped and counted.
        assert_eq!(STATS.dropped.load(Ordering::Relaxed), 92);
        assert_eq!(STATS.exported.load(Ordering::Relaxed), 0);
    }

    /// Spans are exported in batches; a flush sends what is queued without waiting for the
    /// batch delay.
    #[tokio::test]
    async fn spans_are_exported_in_batches_and_a_flush_sends_them() {
        static STATS: SpanStats = SpanStats {
            exported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        };
        let recorder = Recorder::default();
        let (processor, flush) = QueueProcessor::start(recorder.clone(), &STATS);
        let telemetry = Telemetry {
            provider: Some(provider(processor)),
            flush: Some(flush),
        };
        let tracer = telemetry.provider.as_ref().unwrap().tracer("test");
        for _ in 0..3 {
            tracer.start("work").end();
        }
        telemetry.flush().await;
        assert_eq!(STATS.exported.load(Ordering::Relaxed), 3);
        assert_eq!(STATS.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(recorder.batches.lock().unwrap().iter().sum::<usize>(), 3);
    }

    /// Spans for a collector that refuses connections are counted as dropped; nothing fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_collector_fails_nothing_and_its_spans_are_counted_as_dropped() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let settings = TraceSettings::parse("pcf", Some(&endpoint), None).unwrap();
        let (subscriber, telemetry) = subscriber(
            EnvFilter::new("off"),
            LogFormat::Text,
            std::io::sink,
            &settings,
        )
        .unwrap();
        assert!(exporting());
        let before = SPANS.dropped.load(Ordering::Relaxed);
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..10 {
                tracing::debug_span!(target: "pcf", "work").in_scope(|| {});
            }
        });
        telemetry.shutdown().await;
        assert_eq!(SPANS.dropped.load(Ordering::Relaxed) - before, 10);
        assert_eq!(SPANS.exported.load(Ordering::Relaxed), 0);
        assert!(!exporting());
    }

    #[test]
    fn settings_name_the_traces_url_and_refuse_bad_values() {
        let url = |endpoint: &str| {
            TraceSettings::parse("pcf", Some(endpoint), None)
                .unwrap()
                .traces_url()
        };
        assert_eq!(
            url("http://c:4318").as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            url("http://c:4318/v1/traces/").as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(url(" ").as_deref(), None);
        let unset = TraceSettings::parse("pcf-api", None, None).unwrap();
        assert_eq!((unset.endpoint, unset.sample_ratio), (None, 1.0));
        assert_eq!(
            TraceSettings::parse("pcf", None, Some("0.25"))
                .unwrap()
                .sample_ratio,
            0.25
        );
        for (endpoint, ratio, says) in [
            (Some("collector:4318"), None, "PCF_OTLP_ENDPOINT"),
            (Some("https://c:4318"), None, "http://host:port"),
            (None, Some("1.5"), "PCF_TRACE_SAMPLE_RATIO"),
            (None, Some("most"), "from 0 to 1"),
        ] {
            let e = TraceSettings::parse("pcf", endpoint, ratio).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
    }
}
