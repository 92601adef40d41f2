//! Traces exported over OTLP to a real receiver (an OTLP/HTTP endpoint in the test that decodes
//! the protobuf requests the exporter sends): one `createUser` in cluster mode is one trace
//! from the caller's span through the HTTP request, the command and its append, the relay's
//! publish and the Kafka hop, to each projector's batch and view write; a query has a trace of
//! its own with the reader's spans; a malformed incoming `traceparent` is ignored; JSON logs
//! name the trace and span they were written in.
//!
//! The subscriber is the threads' default dispatcher of the runtime PCF runs on, not the
//! process's global one (which `kafka_logging` installs); the export runs on a runtime of its
//! own.

use crate::support::*;
use crate::WHOLE_PROCESS;
use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use pcf::app::ALL_ROLES;
use pcf::telemetry::{LogFormat, TraceSettings};
use prost::Message;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the receiver was sent: each span with the service that reported it.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    fn services(&self) -> HashSet<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(s, _)| s.clone())
            .collect()
    }
}

/// Starts the receiver on a loopback port; its base URL.
async fn receiver(received: Received) -> String {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let received = received.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut spans = received.0.lock().unwrap();
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref()?.value.as_ref())
                        .map(|v| match v {
                            AnyValue::StringValue(s) => s.clone(),
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            spans.push((service.clone(), span));
                        }
                    }
                }
                // An empty ExportTraceServiceResponse: everything accepted.
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

/// The spans of one trace, by span id.
struct Trace {
    spans: HashMap<String, Span>,
}

impl Trace {
    fn of(spans: &[Span], trace_id: &str) -> Self {
        Self {
            spans: spans
                .iter()
                .filter(|s| hex(&s.trace_id) == trace_id)
                .map(|s| (hex(&s.span_id), s.clone()))
                .collect(),
        }
    }

    fn named(&self, name: &str) -> Vec<&Span> {
        self.spans.values().filter(|s| s.name == name).collect()
    }

    fn one(&self, name: &str, also: impl Fn(&Span) -> bool) -> &Span {
        let found: Vec<&Span> = self.named(name).into_iter().filter(|s| also(s)).collect();
        assert_eq!(found.len(), 1, "one {name} span in {:?}", self.names());
        found[0]
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.spans.values().map(|s| s.name.clone()).collect();
        names.sort();
        names
    }

    /// Whether `ancestor` is `span` or above it.
    fn descends(&self, span: &Span, ancestor: &Span) -> bool {
        let mut current = Some(span);
        while let Some(s) = current {
            if s.span_id == ancestor.span_id {
                return true;
            }
            current = self.spans.get(&hex(&s.parent_span_id));
        }
        false
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const QUERY_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

#[test]
fn one_create_user_is_one_trace_from_the_http_request_to_the_view_writes() {
    let _alone = WHOLE_PROCESS.blocking_lock();
    // The receiver and the span export run on a runtime of their own.
    let export = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let received = Received::default();
    let url = export.block_on(receiver(received.clone()));
    let log = CapturedLog::default();
    let writer = log.clone();
    let settings = TraceSettings::parse("pcf", Some(&url), Some("1")).unwrap();
    let (subscriber, telemetry) = {
        let _in = export.enter();
        pcf::telemetry::subscriber(
            tracing_subscriber::EnvFilter::new("warn,pcf_command=debug"),
            LogFormat::Json,
            move || writer.clone(),
            &settings,
        )
        .expect("the subscriber")
    };
    assert!(telemetry.exporting());
    let dispatch = pcf::telemetry::dispatch(subscriber);
    let runtime = runtime_with(&dispatch, 2);
    tracing::dispatcher::with_default(&dispatch, || {
        runtime.block_on(async {
            run(Cluster::create().await, async |c| {
                traced_cluster(c, &received, &telemetry, &log).await
            })
            .await;
        })
    });
    export.block_on(telemetry.shutdown());
    assert!(!pcf::telemetry::exporting(), "stopped exporting");
}

async fn traced_cluster(
    c: &mut Cluster,
    received: &Received,
    telemetry: &pcf::telemetry::Telemetry,
    log: &CapturedLog,
) {
    let node = c.start_default(&ALL_ROLES).await;
    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let response = Gql::vars(
        CREATE_USER,
        json!({ "input": { "email": format!("traced-{}@example.com", c.tag()), "displayName": "Traced" } }),
    )
    .by_admin()
    .header("traceparent", &caller)
    .send(&node.router)
    .await;
    let id = id_of(&response.ok()["createUser"]);

    // The Kafka message of the event, and its traceparent header.
    let mut tail = TopicTail::new(&c.brokers, &c.topic).await;
    tail.wait_for(CONVERGE, "the UserCreated message", |records| {
        records
            .iter()
            .any(|r| r.envelope().is_some_and(|e| e.aggregate_id == id))
    })
    .await;
    let record = tail
        .records
        .iter()
        .find(|r| r.envelope().is_some_and(|e| e.aggregate_id == id))
        .unwrap()
        .clone();
    let envelope = record.envelope().unwrap();

    // Every hop's span reaches the receiver (the views' writes last).
    let wanted = [
        "POST /graphql",
        "command",
        "append",
        "publish",
        "projection_batch",
        "redis.write",
        "sql.write",
    ];
    let trace = {
        let deadline = Instant::now() + CONVERGE;
        loop {
            telemetry.flush().await;
            let trace = Trace::of(&received.spans(), TRACE);
            let batches = trace.named("projection_batch").len();
            if wanted.iter().all(|n| !trace.named(n).is_empty()) && batches >= 2 {
                break trace;
            }
            assert!(
                Instant::now() < deadline,
                "spans of the trace so far: {:?}",
                trace.names()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    // The HTTP request joined the caller's trace, as the child of the caller's span.
    let http = trace.one("POST /graphql", |_| true);
    assert_eq!(hex(&http.parent_span_id), CALLER_SPAN);
    // Parent links intact: every span's parent is the caller's or another of the trace.
    for span in trace.spans.values() {
        let parent = hex(&span.parent_span_id);
        assert!(
            parent == CALLER_SPAN || trace.spans.contains_key(&parent),
            "{} has a parent {parent} outside the trace: {:?}",
            span.name,
            trace.names()
        );
    }
    let command = trace.one("command", |_| true);
    assert_eq!(
        attribute(command, "user").as_deref(),
        Some(id.to_string().as_str())
    );
    assert!(trace.descends(command, http));
    let append = trace.one("append", |_| true);
    assert!(trace.descends(append, command));
    // The event stores the append's context; the relay's publish is its child, and the
    // Kafka message names the publish span.
    assert_eq!(
        envelope.metadata.traceparent.as_deref(),
        Some(format!("00-{TRACE}-{}-01", hex(&append.span_id)).as_str())
    );
    let publish = trace.one("publish", |s| {
        attribute(s, "event_id").as_deref() == Some(envelope.event_id.to_string().as_str())
    });
    assert_eq!(publish.parent_span_id, append.span_id);
    assert_eq!(
        record.headers.get("traceparent").map(String::as_str),
        Some(format!("00-{TRACE}-{}-01", hex(&publish.span_id)).as_str())
    );
    // Each projector's batch is the publish span's child, and writes its view inside it.
    for (projection, write) in [("users-redis", "redis.write"), ("users-sql", "sql.write")] {
        let batch = trace.one("projection_batch", |s| {
            attribute(s, "projection").as_deref() == Some(projection)
        });
        assert_eq!(batch.parent_span_id, publish.span_id, "{projection}");
        assert!(
            trace.named(write).iter().any(|w| trace.descends(w, batch)),
            "no {write} under the {projection} batch: {:?}",
            trace.names()
        );
    }
    // The relay and projectors ran in this process, reported as the service `pcf`.
    assert_eq!(received.services(), HashSet::from(["pcf".to_owned()]));

    // A query has its own trace, with the reader's spans.
    let query = Gql::vars(USER, json!({ "id": id, "minVersion": 1 }))
        .by_admin()
        .header("traceparent", &format!("00-{QUERY_TRACE}-{CALLER_SPAN}-01"))
        .send(&node.router)
        .await;
    assert_eq!(query.ok()["user"]["version"], 1);
    let reads = wait_for_trace(
        received,
        telemetry,
        QUERY_TRACE,
        &["wait.min_version", "redis.read"],
    )
    .await;
    let wait = reads.one("wait.min_version", |_| true);
    let http = reads.one("POST /graphql", |_| true);
    assert!(reads.descends(wait, http));
    assert!(reads
        .named("redis.read")
        .iter()
        .all(|r| reads.descends(r, wait)));
    assert!(reads.named("command").is_empty());

    // A malformed traceparent is ignored: the request is answered, in a new trace.
    let bad = Gql::vars(
        UPDATE_PROFILE,
        json!({ "id": id, "input": { "displayName": "Traced again" } }),
    )
    .by_admin()
    .header("traceparent", "00-not-a-trace-01")
    .send(&node.router)
    .await;
    assert_eq!(version_of(&bad.ok()["updateProfile"]), 2);
    let deadline = Instant::now() + CONVERGE;
    let untraced_command = loop {
        telemetry.flush().await;
        let found = received.spans().into_iter().find(|s| {
            s.name == "command" && attribute(s, "command").as_deref() == Some("updateProfile")
        });
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no span of the updateProfile command"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let new_trace = Trace::of(&received.spans(), &hex(&untraced_command.trace_id));
    assert_ne!(hex(&untraced_command.trace_id), TRACE);
    let root = new_trace.one("POST /graphql", |_| true);
    assert!(root.parent_span_id.is_empty(), "a root span");

    // /metrics counts the spans the receiver accepted.
    let metrics = get(&node.router, "/metrics").await;
    let exported: u64 = metrics
        .text
        .lines()
        .find_map(|l| l.strip_prefix("pcf_trace_spans_exported_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("pcf_trace_spans_exported_total in /metrics");
    assert!(exported as usize >= trace.spans.len(), "{exported}");

    // JSON log lines name their trace and span.
    let lines: Vec<Value> = log
        .text()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let in_trace: Vec<&Value> = lines.iter().filter(|l| l["trace_id"] == TRACE).collect();
    assert!(
        !in_trace.is_empty(),
        "no log line of the trace in {} lines",
        lines.len()
    );
    for line in in_trace {
        let span = line["span_id"].as_str().expect("a span id");
        assert!(trace.spans.contains_key(span), "{line}");
    }
}

async fn wait_for_trace(
    received: &Received,
    telemetry: &pcf::telemetry::Telemetry,
    trace_id: &str,
    names: &[&str],
) -> Trace {
    let deadline = Instant::now() + CONVERGE;
    loop {
        telemetry.flush().await;
        let trace = Trace::of(&received.spans(), trace_id);
        if names.iter().all(|n| !trace.named(n).is_empty()) {
            return trace;
        }
        assert!(
            Instant::now() < deadline,
            "spans of trace {trace_id} so far: {:?}",
            trace.names()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
