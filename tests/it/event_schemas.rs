//! The published events against their JSON Schemas (`docs/schemas/`, described in
//! `docs/events.md`).
//!
//! Envelopes come from the real code path: GraphQL mutations through the app's router, then the
//! event log as the relay reads it (`store.read`), serialised with serde_json — exactly the bytes
//! the relay publishes. In cluster mode the test also reads the real Kafka topic and validates the
//! message values, keys and headers. Tampered envelopes must fail, so the schemas are not vacuous,
//! and the JSON examples in `docs/events.md` must pass.
//!
//! Needs nothing for the embedded tests; the Kafka test needs Kafka (`PCF_TEST_KAFKA_BROKERS`,
//! default 127.0.0.1:9092) and PostgreSQL (`PCF_TEST_DATABASE_URL`, default
//! postgres://postgres@127.0.0.1:5432/postgres), as started by `scripts/services.sh up`. It fails,
//! rather than skipping, when Kafka cannot be reached.

use crate::support::*;
use boon::{Compiler, Draft, Format, SchemaIndex, Schemas};
use pcf_domain::ports::LogQuery;
use pcf_domain::EventEnvelope;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Where the schemas say they live (`$id`); their relative `$ref`s resolve against it.
const SCHEMA_BASE: &str = "https://pcf.example/schemas/events/v1/";
const ENVELOPE_SCHEMA: &str = "envelope.schema.json";
/// Each event type and the schema of its payload.
const PAYLOAD_SCHEMAS: [(&str, &str); 4] = [
    ("UserCreated", "user-created.schema.json"),
    ("ProfileUpdated", "profile-updated.schema.json"),
    ("EmailChanged", "email-changed.schema.json"),
    ("AccountDeleted", "account-deleted.schema.json"),
];

// ---------------------------------------------------------------------------------------------
// The schemas

/// The five schemas, compiled from `docs/schemas/`.
struct EventSchemas {
    schemas: Schemas,
    envelope: SchemaIndex,
    payloads: BTreeMap<&'static str, SchemaIndex>,
}

impl EventSchemas {
    fn load() -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/schemas");
        let mut compiler = Compiler::new();
        compiler.set_default_draft(Draft::V2020_12);
        // Draft 2020-12 treats `format` as an annotation unless asked; we assert it, as a
        // strict consumer would.
        compiler.enable_format_assertions();
        compiler.register_format(Format {
            name: "idn-email",
            func: idn_email,
        });
        let files = std::iter::once(ENVELOPE_SCHEMA).chain(PAYLOAD_SCHEMAS.iter().map(|p| p.1));
        for file in files {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let schema: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            assert_eq!(
                schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
                "{file} declares draft 2020-12"
            );
            assert_eq!(
                schema["$id"],
                format!("{SCHEMA_BASE}{file}"),
                "{file}'s $id is its name under the common base"
            );
            compiler
                .add_resource(&format!("{SCHEMA_BASE}{file}"), schema)
                .unwrap_or_else(|e| panic!("adding {file}: {e:#}"));
        }
        let mut schemas = Schemas::new();
        // Compiling also checks each schema against the draft 2020-12 meta-schema.
        let mut compile = |file: &str| {
            compiler
                .compile(&format!("{SCHEMA_BASE}{file}"), &mut schemas)
                .unwrap_or_else(|e| panic!("compiling {file}: {e:#}"))
        };
        let envelope = compile(ENVELOPE_SCHEMA);
        let payloads = PAYLOAD_SCHEMAS
            .iter()
            .map(|&(event_type, file)| (event_type, compile(file)))
            .collect();
        Self {
            schemas,
            envelope,
            payloads,
        }
    }

    /// Validates a whole envelope (which checks the payload of a known event type too).
    fn check_envelope(&self, envelope: &Value) -> Result<(), String> {
        self.schemas
            .validate(envelope, self.envelope)
            .map_err(|e| format!("{e:#}"))
    }

    /// Validates a payload against the schema of its event type.
    fn check_payload(&self, event_type: &str, payload: &Value) -> Result<(), String> {
        let Some(&index) = self.payloads.get(event_type) else {
            return Err(format!("no payload schema for event type {event_type:?}"));
        };
        self.schemas
            .validate(payload, index)
            .map_err(|e| format!("{e:#}"))
    }

    /// Panics unless the envelope and its payload are valid, naming what `source` was.
    fn assert_valid(&self, envelope: &Value, source: &str) {
        if let Err(e) = self.check_envelope(envelope) {
            panic!("{source}: the envelope does not match {ENVELOPE_SCHEMA}:\n{e}\n{envelope:#}");
        }
        let event_type = envelope["eventType"].as_str().unwrap_or_default();
        if let Err(e) = self.check_payload(event_type, &envelope["payload"]) {
            panic!(
                "{source}: the {event_type} payload does not match its schema:\n{e}\n{envelope:#}"
            );
        }
    }
}

/// `idn-email` (RFC 6531): RFC 5321 syntax — a dot-atom local part and a host name — in which
/// any non-ASCII character may stand where a letter may. Registered because boon's own check
/// applies IDNA to the local part and so refuses `+`, `_` and `'`, which RFC 6531 allows.
fn idn_email(value: &Value) -> Result<(), Box<dyn std::error::Error>> {
    let Value::String(s) = value else {
        return Ok(());
    };
    let ascii: String = s
        .chars()
        .map(|c| if c.is_ascii() { c } else { 'a' })
        .collect();
    let (local, domain) = ascii.rsplit_once('@').ok_or("missing @")?;
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    if local.is_empty()
        || local.len() > 64
        || local
            .split('.')
            .any(|atom| atom.is_empty() || !atom.chars().all(atext))
    {
        return Err("the local part is not a dot-atom".into());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if domain.len() > 253 || !domain.split('.').all(label_ok) {
        return Err("the domain is not a host name".into());
    }
    Ok(())
}

#[test]
fn the_custom_idn_email_check_accepts_what_rfc_6531_allows_and_refuses_the_rest() {
    for ok in [
        "ann+tag@example.com",
        "o'neil_x@example.co.uk",
        "zoë@exämple.com",
        "ünïcode@ドメイン.jp",
    ] {
        assert!(idn_email(&json!(ok)).is_ok(), "{ok} is an idn-email");
    }
    for bad in [
        "plain",
        "a@b@c.com",
        "a..b@example.com",
        ".a@example.com",
        "a b@example.com",
        "a@-example.com",
        "a@example..com",
        "@example.com",
    ] {
        assert!(idn_email(&json!(bad)).is_err(), "{bad} is not an idn-email");
    }
}

// ---------------------------------------------------------------------------------------------
// Driving the app

/// `POST /graphql` through the router, as the bearer of `token` if any, with its own
/// correlation id; panics unless the mutation succeeded.
async fn graphql(
    router: &axum::Router,
    token: Option<&str>,
    correlation_id: &str,
    query: &str,
    variables: Value,
) -> Value {
    Gql::vars(query, variables)
        .bearer_opt(token)
        .header("x-correlation-id", correlation_id)
        .send(router)
        .await
        .ok()
        .clone()
}

/// What the scenario did, to check the envelopes against.
struct Scenario {
    /// Zoë: created, updated, changed email, deleted (sequences 1 to 4).
    zoe: Uuid,
    /// Max: created only, with an avatar and no bio.
    max: Uuid,
    /// The caller of each mutation (`metadata.actor`): none for sign-ups, else Zoë herself.
    actor: BTreeMap<(Uuid, u64), String>,
    /// The X-Correlation-Id sent with each mutation, by the user and sequence it produced.
    correlation: BTreeMap<(Uuid, u64), String>,
    /// The commandId sent with each mutation, likewise.
    command: BTreeMap<(Uuid, u64), String>,
}

/// The scenario's mutations as they are sent, each with a fresh correlation id and command
/// id, remembered under the user and the sequence (version) the mutation produced.
struct Mutations<'a> {
    router: &'a axum::Router,
    correlation: BTreeMap<(Uuid, u64), String>,
    command: BTreeMap<(Uuid, u64), String>,
}

impl Mutations<'_> {
    /// Sends `mutation`, whose payload is `data[field]`, as the bearer of `token` (anonymously
    /// when `None`) with fresh ids; returns the user and the version it produced.
    async fn send(
        &mut self,
        token: Option<&str>,
        mutation: &str,
        field: &str,
        mut variables: Value,
    ) -> (Uuid, u64) {
        let correlation_id = Uuid::new_v4().to_string();
        let command_id = format!("cmd-{}", Uuid::new_v4().simple());
        variables["commandId"] = json!(command_id);
        let data = graphql(self.router, token, &correlation_id, mutation, variables).await;
        let payload = &data[field];
        let id = payload["user"]["id"]
            .as_str()
            .or(payload["id"].as_str())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{field} returns the user's id: {data}"));
        let version = payload["version"]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} returns the version: {data}"));
        self.correlation.insert((id, version), correlation_id);
        self.command.insert((id, version), command_id);
        (id, version)
    }

    /// Sends a sign-up with `input`; returns the new user, at version 1.
    async fn sign_up(&mut self, input: Value) -> Uuid {
        let variables = json!({ "input": input });
        let (id, version) = self.send(None, CREATE_USER, "createUser", variables).await;
        assert_eq!(version, 1, "a sign-up makes version 1");
        id
    }
}

/// Runs the four mutations (and one more sign-up), each with its own correlation and command
/// id. Emails are non-ASCII and use `+` and `_`, as the profile rules allow.
async fn run_scenario(router: &axum::Router) -> Scenario {
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut sent = Mutations {
        router,
        correlation: BTreeMap::new(),
        command: BTreeMap::new(),
    };

    let zoe = sent
        .sign_up(json!({
            "email": format!("  Zoë+News.{tag}@Exämple.com "), "displayName": "  Zoë Ångström ",
            "bio": "Line one\nLine two\twith a tab",
        }))
        .await;
    let token = owner(zoe);
    let profile = json!({ "id": zoe, "input": {
        "displayName": "Zoë Q.",
        "bio": null,
        "avatarUrl": "https://cdn.example.com/avatars/zoe.png?size=128",
    } });
    let updated = sent.send(Some(&token), UPDATE_PROFILE, "updateProfile", profile);
    assert_eq!(updated.await, (zoe, 2));
    let email = json!({ "id": zoe, "email": format!("zoe_q.{tag}@example.org") });
    let changed = sent.send(Some(&token), CHANGE_EMAIL, "changeEmail", email);
    assert_eq!(changed.await, (zoe, 3));
    let deleted = sent.send(
        Some(&token),
        DELETE_ACCOUNT,
        "deleteAccount",
        json!({ "id": zoe }),
    );
    assert_eq!(deleted.await, (zoe, 4));

    let max = sent
        .sign_up(json!({
            "email": format!("max.o'neil.{tag}@example.net"), "displayName": "Max",
            "avatarUrl": "HTTPS://img.example.net/max.jpg",
        }))
        .await;

    let actor = (2..=4).map(|n| ((zoe, n), zoe.to_string())).collect();
    Scenario {
        zoe,
        max,
        actor,
        correlation: sent.correlation,
        command: sent.command,
    }
}

/// The log as the relay reads it; waits (bounded) until it holds `count` events, since on
/// PostgreSQL a commit may take a moment to become readable.
async fn read_log(app: &pcf::App, count: usize) -> Vec<EventEnvelope> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events = app
            .store
            .read(&LogQuery {
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("reading the event log");
        if events.len() >= count || Instant::now() >= deadline {
            assert_eq!(events.len(), count, "the log holds the scenario's events");
            return events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks what the scenario must have produced, beyond what a schema can say.
fn check_scenario(scenario: &Scenario, events: &[EventEnvelope]) {
    let mut seen = BTreeMap::new();
    for e in events {
        seen.insert((e.aggregate_id, e.sequence), e.event_type.as_str());
        let key = (e.aggregate_id, e.sequence);
        assert_eq!(
            e.metadata.correlation_id.as_ref(),
            scenario.correlation.get(&key),
            "correlationId is the request's X-Correlation-Id"
        );
        assert_eq!(
            e.metadata.command_id.as_ref(),
            scenario.command.get(&key),
            "commandId"
        );
        assert_eq!(
            e.metadata.causation_id.as_ref(),
            scenario.command.get(&key),
            "causationId"
        );
        assert_eq!(e.metadata.actor.as_ref(), scenario.actor.get(&key), "actor");
    }
    let expected: BTreeMap<_, _> = [
        ((scenario.zoe, 1), "UserCreated"),
        ((scenario.zoe, 2), "ProfileUpdated"),
        ((scenario.zoe, 3), "EmailChanged"),
        ((scenario.zoe, 4), "AccountDeleted"),
        ((scenario.max, 1), "UserCreated"),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        seen, expected,
        "the log holds exactly the scenario's events"
    );
    for pair in events.windows(2) {
        assert!(
            pair[0].position < pair[1].position
                && pair[0].position.to_string() < pair[1].position.to_string(),
            "positions rise in log order, as strings too"
        );
    }
}

/// The envelopes of the scenario on an embedded (SQLite) app, serialised as the relay
/// publishes them.
async fn embedded_envelopes() -> Vec<Value> {
    let dir = tempfile::tempdir().expect("a temporary data directory");
    let app = pcf::build(&base_config(dir.path()))
        .await
        .expect("building the app");
    let scenario = run_scenario(&app.router).await;
    let events = read_log(&app, 5).await;
    check_scenario(&scenario, &events);
    app.shutdown().await;
    events
        .iter()
        .map(|e| serde_json::to_value(e).expect("an envelope serialises"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Embedded mode and tampering

#[tokio::test]
async fn every_envelope_of_the_real_code_path_matches_the_schemas() {
    let schemas = EventSchemas::load();
    let envelopes = embedded_envelopes().await;
    let mut types = BTreeSet::new();
    for envelope in &envelopes {
        schemas.assert_valid(envelope, "the event log");
        types.insert(envelope["eventType"].as_str().unwrap().to_owned());
    }
    let all: BTreeSet<String> = PAYLOAD_SCHEMAS.iter().map(|p| p.0.to_owned()).collect();
    assert_eq!(types, all, "every event type was checked");

    // What the producer normalised is what consumers get.
    let created = &envelopes[0]["payload"];
    assert!(created["email"].as_str().unwrap().starts_with("zoë+news."));
    assert_eq!(created["displayName"], "Zoë Ångström");
    assert_eq!(created["avatarUrl"], Value::Null, "absent values are null");
    let updated = &envelopes[1]["payload"];
    assert_eq!(
        updated["bio"],
        Value::Null,
        "a cleared bio is null, not absent"
    );
}

#[tokio::test]
async fn tampered_envelopes_fail_validation() {
    let schemas = EventSchemas::load();
    let envelopes = embedded_envelopes().await;
    let by_type = |t: &str| {
        envelopes
            .iter()
            .find(|e| e["eventType"] == t)
            .cloned()
            .unwrap_or_else(|| panic!("a {t} envelope"))
    };
    let created = by_type("UserCreated");
    let updated = by_type("ProfileUpdated");
    let changed = by_type("EmailChanged");
    let deleted = by_type("AccountDeleted");
    for e in [&created, &updated, &changed, &deleted] {
        schemas.assert_valid(e, "the untampered envelope");
    }

    type Tamper = fn(&mut Value);
    let cases: Vec<(&str, &Value, Tamper)> = vec![
        ("eventId missing", &created, |e| {
            e.as_object_mut().unwrap().remove("eventId");
        }),
        ("eventId not a UUID", &created, |e| {
            e["eventId"] = json!("not-a-uuid");
        }),
        ("eventId in upper case", &created, |e| {
            e["eventId"] = json!("0196ABCD-2B22-7E51-8A0B-3C4D5E6F7A8B");
        }),
        ("payload missing", &deleted, |e| {
            e.as_object_mut().unwrap().remove("payload");
        }),
        ("metadata missing", &deleted, |e| {
            e.as_object_mut().unwrap().remove("metadata");
        }),
        ("position in upper case", &created, |e| {
            e["position"] = json!("000000000000001A000000000000002B");
        }),
        ("position of 31 characters", &created, |e| {
            e["position"] = json!(&e["position"].as_str().unwrap()[1..]);
        }),
        ("position not hex", &created, |e| {
            e["position"] = json!("z".repeat(32));
        }),
        ("position a number", &created, |e| {
            e["position"] = json!(42);
        }),
        ("sequence 0", &created, |e| {
            e["sequence"] = json!(0);
        }),
        ("sequence a string", &created, |e| {
            e["sequence"] = json!("1");
        }),
        ("sequence a fraction", &created, |e| {
            e["sequence"] = json!(1.5);
        }),
        ("aggregateType other than User", &created, |e| {
            e["aggregateType"] = json!("Account");
        }),
        ("eventVersion a number", &created, |e| {
            e["eventVersion"] = json!(1);
        }),
        ("eventVersion 2, which no schema describes", &created, |e| {
            e["eventVersion"] = json!("2");
        }),
        ("recordedAt not a date-time", &created, |e| {
            e["recordedAt"] = json!("yesterday");
        }),
        ("recordedAt an impossible date", &created, |e| {
            e["recordedAt"] = json!("2024-13-01T00:00:00Z");
        }),
        ("recordedAt not in UTC", &created, |e| {
            e["recordedAt"] = json!("2024-05-01T12:00:00+02:00");
        }),
        ("an unknown envelope field", &created, |e| {
            e["partition"] = json!(0);
        }),
        ("an unknown metadata key", &created, |e| {
            e["metadata"]["tenant"] = json!("acme");
        }),
        ("a metadata value that is not a string", &created, |e| {
            e["metadata"]["correlationId"] = json!(7);
        }),
        ("a null metadata value", &created, |e| {
            e["metadata"]["actor"] = Value::Null;
        }),
        ("UserCreated with a non-address email", &created, |e| {
            e["payload"]["email"] = json!("zoë at example");
        }),
        ("UserCreated with an extra field", &created, |e| {
            e["payload"]["password"] = json!("hunter2");
        }),
        ("UserCreated with userId not a UUID", &created, |e| {
            e["payload"]["userId"] = json!("42");
        }),
        ("UserCreated with an empty displayName", &created, |e| {
            e["payload"]["displayName"] = json!("");
        }),
        ("UserCreated without email", &created, |e| {
            e["payload"].as_object_mut().unwrap().remove("email");
        }),
        ("UserCreated without bio, not even null", &created, |e| {
            e["payload"].as_object_mut().unwrap().remove("bio");
        }),
        ("ProfileUpdated with a control character", &updated, |e| {
            e["payload"]["displayName"] = json!("Zoë\u{7}");
        }),
        ("ProfileUpdated with a numeric bio", &updated, |e| {
            e["payload"]["bio"] = json!(5);
        }),
        ("ProfileUpdated with a plain http avatar", &updated, |e| {
            e["payload"]["avatarUrl"] = json!("http://cdn.example.com/a.png");
        }),
        ("ProfileUpdated, displayName too long", &updated, |e| {
            e["payload"]["displayName"] = json!("x".repeat(101));
        }),
        ("EmailChanged without newEmail", &changed, |e| {
            e["payload"].as_object_mut().unwrap().remove("newEmail");
        }),
        ("EmailChanged, occurredAt no date-time", &changed, |e| {
            e["payload"]["occurredAt"] = json!("2024-05-01 12:00");
        }),
        ("AccountDeleted carrying personal data", &deleted, |e| {
            e["payload"]["email"] = json!("zoe@example.com");
        }),
        ("AccountDeleted without occurredAt", &deleted, |e| {
            e["payload"] = json!({});
        }),
        ("a payload of the wrong event type", &deleted, |e| {
            e["eventType"] = json!("EmailChanged");
        }),
        ("an event type that is not a name", &deleted, |e| {
            e["eventType"] = json!("account deleted");
        }),
    ];
    let mut accepted = Vec::new();
    for (what, original, tamper) in &cases {
        let mut envelope = (*original).clone();
        tamper(&mut envelope);
        if schemas.check_envelope(&envelope).is_ok() {
            accepted.push(*what);
        }
    }
    assert!(
        accepted.is_empty(),
        "tampered envelopes that passed validation: {accepted:?}"
    );

    // The payload schemas alone refuse what they must, too.
    let mut payload = created["payload"].clone();
    payload.as_object_mut().unwrap().remove("occurredAt");
    assert!(schemas.check_payload("UserCreated", &payload).is_err());

    // Forward compatibility: an event type added later passes the envelope schema (consumers
    // skip it), but its envelope fields are still checked.
    let mut future = deleted.clone();
    future["eventType"] = json!("PasswordChanged");
    future["payload"] = json!({ "anything": [1, 2, 3] });
    schemas
        .check_envelope(&future)
        .expect("an unknown event type passes the envelope schema");
    future.as_object_mut().unwrap().remove("position");
    assert!(schemas.check_envelope(&future).is_err());
}

#[test]
fn the_examples_in_the_consumer_guide_match_the_schemas() {
    let schemas = EventSchemas::load();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/events.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```json") => current = Some(String::new()),
            (Some(block), l) if l.starts_with("```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    let mut envelopes = 0;
    for block in &blocks {
        let value: Value = serde_json::from_str(block).unwrap_or_else(|e| {
            panic!("a json block of docs/events.md is not JSON ({e}):\n{block}")
        });
        if value.get("eventId").is_some() {
            schemas.assert_valid(&value, "an example in docs/events.md");
            envelopes += 1;
        }
    }
    assert!(
        envelopes >= PAYLOAD_SCHEMAS.len(),
        "docs/events.md shows an envelope of every event type ({envelopes} found)"
    );
}

// ---------------------------------------------------------------------------------------------
// Cluster mode: the real Kafka topic

/// A message as read from the topic.
struct Received {
    partition: i32,
    offset: i64,
    key: Option<String>,
    headers: BTreeMap<String, String>,
    value: Value,
}

/// Reads the topic from the beginning until every one of `event_ids` has arrived (duplicates,
/// which at-least-once delivery allows, are kept).
async fn consume(
    brokers: &str,
    topic: &str,
    group: &str,
    event_ids: &BTreeSet<String>,
) -> Vec<Received> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("a Kafka consumer");
    consumer.subscribe(&[topic]).expect("subscribing");
    let mut received = Vec::new();
    let mut missing = event_ids.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => panic!("consuming {topic}: {e}"),
            Err(_) => panic!("{topic}: events never arrived: {missing:?}"),
        };
        let value: Value = serde_json::from_slice(message.payload().unwrap_or_default())
            .unwrap_or_else(|e| {
                panic!(
                    "a message value on {topic} is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(message.payload().unwrap_or_default())
                )
            });
        let mut headers = BTreeMap::new();
        if let Some(h) = message.headers() {
            for header in h.iter() {
                let value = header
                    .value
                    .map(|v| String::from_utf8(v.to_vec()).expect("a UTF-8 header value"))
                    .unwrap_or_default();
                assert!(
                    headers.insert(header.key.to_owned(), value).is_none(),
                    "header {} appears once",
                    header.key
                );
            }
        }
        if let Some(id) = value["eventId"].as_str() {
            missing.remove(id);
        }
        received.push(Received {
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .map(|k| String::from_utf8(k.to_vec()).expect("a UTF-8 key")),
            headers,
            value,
        });
    }
    received
}

#[tokio::test]
async fn kafka_messages_match_the_schemas_with_user_keys_and_headers() {
    let schemas = EventSchemas::load();
    let id = Uuid::new_v4().simple().to_string();
    let mut kafka = KafkaTopic::new(&id);
    require_kafka(&kafka.brokers);
    let consumer_group = format!("{}schema-check", kafka.group_prefix);
    kafka.extra_groups.push(consumer_group.clone());
    let fixture = (TestDb::create_named(&id, ServerUse::Shared).await, kafka);
    run(fixture, async |(db, kafka)| {
        let dir = tempfile::tempdir().expect("a temporary data directory");
        let config = pcf::Config {
            database_url: Some(db.url.clone()),
            read_database_urls: vec![db.url.clone()],
            kafka_brokers: Some(kafka.brokers.clone()),
            kafka_topic: kafka.topic.clone(),
            kafka_partitions: 2,
            kafka_group_prefix: kafka.group_prefix.clone(),
            ..base_config(dir.path())
        };
        let app = pcf::build(&config)
            .await
            .expect("building the cluster-mode app");
        let scenario = run_scenario(&app.router).await;
        let events = read_log(&app, 5).await;
        check_scenario(&scenario, &events);
        let ids: BTreeSet<String> = events.iter().map(|e| e.event_id.to_string()).collect();
        let received = consume(&kafka.brokers, &kafka.topic, &consumer_group, &ids).await;
        let stopped = tokio::time::timeout(Duration::from_secs(15), app.shutdown()).await;
        if stopped.is_err() {
            eprintln!("the app did not shut down within 15 s");
        }
        check_messages(&schemas, &scenario, &events, &received);
    })
    .await;
}

/// Every message value is a valid envelope equal to the logged event; the key is the user id;
/// the headers repeat type, version and correlation id and carry a W3C traceparent; each
/// user's events sit in one partition in sequence order.
fn check_messages(
    schemas: &EventSchemas,
    scenario: &Scenario,
    events: &[EventEnvelope],
    received: &[Received],
) {
    let logged: BTreeMap<String, Value> = events
        .iter()
        .map(|e| {
            (
                e.event_id.to_string(),
                serde_json::to_value(e).expect("an envelope serialises"),
            )
        })
        .collect();
    let mut partitions: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    let mut order: BTreeMap<String, Vec<(i32, i64, u64)>> = BTreeMap::new();
    for m in received {
        let source = format!("message {}@{}", m.partition, m.offset);
        schemas.assert_valid(&m.value, &source);
        let id = m.value["eventId"].as_str().unwrap();
        assert_eq!(
            Some(&m.value),
            logged.get(id),
            "{source}: the value is the logged envelope"
        );
        let user = m.value["aggregateId"].as_str().unwrap().to_owned();
        assert_eq!(
            m.key.as_deref(),
            Some(user.as_str()),
            "{source}: key = user id"
        );
        let header = |k: &str| m.headers.get(k).map(String::as_str);
        assert_eq!(
            header("eventType"),
            m.value["eventType"].as_str(),
            "{source}"
        );
        assert_eq!(
            header("eventVersion"),
            m.value["eventVersion"].as_str(),
            "{source}"
        );
        let correlation = m.value["metadata"]["correlationId"].as_str();
        assert!(
            correlation.is_some(),
            "{source}: HTTP commands carry a correlation id"
        );
        assert_eq!(header("correlationId"), correlation, "{source}");
        // The trace is the correlation id (a UUID here), the span the event id's second half.
        let trace = Uuid::parse_str(correlation.unwrap())
            .unwrap()
            .simple()
            .to_string();
        let span = Uuid::parse_str(id).unwrap().simple().to_string()[16..].to_owned();
        assert_eq!(
            header("traceparent"),
            Some(format!("00-{trace}-{span}-01").as_str()),
            "{source}: traceparent"
        );
        let names: BTreeSet<&str> = m.headers.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            BTreeSet::from(["correlationId", "eventType", "eventVersion", "traceparent"]),
            "{source}: the headers"
        );
        partitions
            .entry(user.clone())
            .or_default()
            .insert(m.partition);
        order.entry(user).or_default().push((
            m.partition,
            m.offset,
            m.value["sequence"].as_u64().unwrap(),
        ));
    }
    for (user, parts) in &partitions {
        assert_eq!(parts.len(), 1, "user {user}'s events are in one partition");
    }
    let first_pass = |user: Uuid| -> Vec<u64> {
        let mut messages = order.get(&user.to_string()).cloned().unwrap_or_default();
        messages.sort();
        // Skip redeliveries the way the guide tells consumers to: by sequence.
        let mut applied = Vec::new();
        for (_, _, sequence) in messages {
            if sequence > applied.last().copied().unwrap_or(0) {
                applied.push(sequence);
            }
        }
        applied
    };
    assert_eq!(
        first_pass(scenario.zoe),
        vec![1, 2, 3, 4],
        "in sequence order"
    );
    assert_eq!(first_pass(scenario.max), vec![1]);
}
