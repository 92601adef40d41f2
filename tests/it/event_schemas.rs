//! The published events against their JSON Schemas (`docs/schemas/`, described in
//! `docs/events.md`).
//!
//! Envelopes come from the real code path: GraphQL mutations through the app's router, then the
//! event log as the relay reads it (`store.read`), serialised with serde_json — exactly the bytes
//! the relay publishes, personal data sealed (`envelope.schema.json`). What readers get is checked
//! against `reader-envelope.schema.json`: the log opened with the app's keys (as `pcf events`
//! prints it) and the GraphQL `events` query as admin and analytics, while an account lives
//! (opened, redacted) and once it is deleted (erased). In cluster mode the test also reads the
//! real Kafka topic and validates the message values, keys and headers. Tampered envelopes must
//! fail, so the schemas are not vacuous, and the JSON examples in `docs/events.md` must pass.
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
/// An event as readers get it (personal data opened, erased or left out).
const READER_ENVELOPE_SCHEMA: &str = "reader-envelope.schema.json";
/// Each event type and the schema of its payload.
const PAYLOAD_SCHEMAS: [(&str, &str); 4] = [
    ("UserCreated", "user-created.schema.json"),
    ("ProfileUpdated", "profile-updated.schema.json"),
    ("EmailChanged", "email-changed.schema.json"),
    ("AccountDeleted", "account-deleted.schema.json"),
];

// ---------------------------------------------------------------------------------------------
// The schemas

/// The six schemas, compiled from `docs/schemas/`.
struct EventSchemas {
    schemas: Schemas,
    envelope: SchemaIndex,
    reader: SchemaIndex,
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
        let files = [ENVELOPE_SCHEMA, READER_ENVELOPE_SCHEMA]
            .into_iter()
            .chain(PAYLOAD_SCHEMAS.iter().map(|p| p.1));
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
        let reader = compile(READER_ENVELOPE_SCHEMA);
        let payloads = PAYLOAD_SCHEMAS
            .iter()
            .map(|&(event_type, file)| (event_type, compile(file)))
            .collect();
        Self {
            schemas,
            envelope,
            reader,
            payloads,
        }
    }

    /// Validates a whole envelope (which checks the payload of a known event type too).
    fn check_envelope(&self, envelope: &Value) -> Result<(), String> {
        self.schemas
            .validate(envelope, self.envelope)
            .map_err(|e| format!("{e:#}"))
    }

    /// Validates an event as a reader gets it.
    fn check_reader(&self, envelope: &Value) -> Result<(), String> {
        self.schemas
            .validate(envelope, self.reader)
            .map_err(|e| format!("{e:#}"))
    }

    /// Panics unless the event is valid as a reader gets it, naming what `source` was.
    fn assert_valid_reader(&self, envelope: &Value, source: &str) {
        if let Err(e) = self.check_reader(envelope) {
            panic!(
                "{source}: the event does not match {READER_ENVELOPE_SCHEMA}:\n{e}\n{envelope:#}"
            );
        }
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
    /// Zoë's first three events, opened with the app's keys while her account existed.
    opened_while_live: Vec<EventEnvelope>,
    /// Personal values the mutations wrote, none of which may be in plain text where events
    /// are stored or published.
    plain: Vec<String>,
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
/// id. Emails are non-ASCII and use `+` and `_`, as the profile rules allow. Zoë's events are
/// read, opened with the app's keys, just before her account is deleted.
async fn run_scenario(app: &pcf::App) -> Scenario {
    let router = &app.router;
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
    let stored = app.store.user_events(zoe, 0).await.expect("Zoë's events");
    let opened_while_live = opened(&app.keys, stored).await;
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
    let plain = [
        &format!("zoë+news.{tag}"),
        "Ångström",
        "Line one",
        "Zoë Q.",
        "avatars/zoe.png",
        &format!("zoe_q.{tag}"),
        &format!("max.o'neil.{tag}"),
        "img.example.net/max",
    ]
    .map(str::to_owned)
    .to_vec();
    Scenario {
        zoe,
        max,
        actor,
        correlation: sent.correlation,
        command: sent.command,
        opened_while_live,
        plain,
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

/// The scenario's events on an embedded (SQLite) app, in each form PCF gives them out.
struct Forms {
    /// As stored, serialised as the relay publishes them: personal data sealed.
    published: Vec<Value>,
    /// Zoë's first three events, opened while her account existed.
    opened_while_live: Vec<Value>,
    /// The whole log opened with the app's keys once Zoë is deleted, as `pcf events show`
    /// prints it: Zoë's events erased, Max's opened.
    opened: Vec<Value>,
    /// The `events` query as an admin, in envelope notation.
    admin: Vec<Value>,
    /// The `events` query as analytics, in envelope notation.
    analytics: Vec<Value>,
}

/// An `events` node of GraphQL in the notation of envelopes: `recordedAt` with `Z` for
/// `+00:00`, and metadata keys without a value left out instead of null (the two differences
/// docs/events.md names).
fn envelope_notation(mut node: Value) -> Value {
    let recorded = node["recordedAt"].as_str().unwrap_or_default().to_owned();
    let utc = recorded
        .strip_suffix("+00:00")
        .unwrap_or_else(|| panic!("GraphQL writes recordedAt with +00:00: {node}"));
    node["recordedAt"] = json!(format!("{utc}Z"));
    node["metadata"]
        .as_object_mut()
        .expect("metadata")
        .retain(|_, v| !v.is_null());
    node
}

/// Every event through the `events` query as the bearer of `token`, in envelope notation.
async fn events_via_graphql(router: &axum::Router, token: &str) -> Vec<Value> {
    let data = Gql::vars(EVENTS, json!({ "first": 100 }))
        .bearer(token)
        .send(router)
        .await
        .ok()
        .clone();
    data["events"]["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| envelope_notation(e["node"].clone()))
        .collect()
}

fn to_values(events: &[EventEnvelope]) -> Vec<Value> {
    events
        .iter()
        .map(|e| serde_json::to_value(e).expect("an envelope serialises"))
        .collect()
}

/// Runs the scenario on an embedded (SQLite) app and gathers its events in every form.
async fn embedded_forms() -> (Scenario, Forms) {
    let dir = tempfile::tempdir().expect("a temporary data directory");
    let app = pcf::build(&base_config(dir.path()))
        .await
        .expect("building the app");
    let scenario = run_scenario(&app).await;
    let events = read_log(&app, 5).await;
    check_scenario(&scenario, &events);
    assert_sealed(
        &events,
        &scenario
            .plain
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let forms = Forms {
        published: to_values(&events),
        opened_while_live: to_values(&scenario.opened_while_live),
        opened: to_values(&opened(&app.keys, events).await),
        admin: events_via_graphql(&app.router, &admin()).await,
        analytics: events_via_graphql(&app.router, &analytics()).await,
    };
    app.shutdown().await;
    (scenario, forms)
}

/// Whether a payload holds any personal field in plain text.
fn has_personal_fields(payload: &Value) -> bool {
    pcf_domain::auth::PERSONAL_FIELDS
        .iter()
        .any(|f| payload.get(*f).is_some())
}

// ---------------------------------------------------------------------------------------------
// Embedded mode and tampering

#[tokio::test]
async fn every_envelope_of_the_real_code_path_matches_the_schemas() {
    let schemas = EventSchemas::load();
    let (_, forms) = embedded_forms().await;
    let envelopes = &forms.published;
    let mut types = BTreeSet::new();
    for envelope in envelopes {
        schemas.assert_valid(envelope, "the event log");
        types.insert(envelope["eventType"].as_str().unwrap().to_owned());
        // Written now: version 2, personal fields sealed.
        assert_eq!(envelope["eventVersion"], "2", "{envelope}");
        let payload = &envelope["payload"];
        assert!(!has_personal_fields(payload), "{envelope}");
        if envelope["eventType"] == "AccountDeleted" {
            assert!(payload["keyDestroyedAt"].is_string(), "{envelope}");
            assert!(payload.get("sealed").is_none(), "{envelope}");
        } else {
            assert!(payload["sealed"].is_string(), "{envelope}");
        }
    }
    let all: BTreeSet<String> = PAYLOAD_SCHEMAS.iter().map(|p| p.0.to_owned()).collect();
    assert_eq!(types, all, "every event type was checked");

    // What the producer normalised is what readers allowed personal data get.
    let opened = &forms.opened_while_live;
    for (envelope, event_type) in
        opened
            .iter()
            .zip(["UserCreated", "ProfileUpdated", "EmailChanged"])
    {
        assert_eq!(envelope["eventType"], event_type);
        schemas.assert_valid_reader(envelope, "an event opened while its account lived");
        assert_eq!(envelope["eventVersion"], "2", "opened, the version stays");
    }
    let created = &opened[0]["payload"];
    assert!(created["email"].as_str().unwrap().starts_with("zoë+news."));
    assert_eq!(created["displayName"], "Zoë Ångström");
    assert_eq!(created["avatarUrl"], Value::Null, "absent values are null");
    let updated = &opened[1]["payload"];
    assert_eq!(
        updated["bio"],
        Value::Null,
        "a cleared bio is null, not absent"
    );
    assert!(opened[2]["payload"]["newEmail"]
        .as_str()
        .unwrap()
        .starts_with("zoe_q."));
}

#[tokio::test]
async fn what_readers_get_matches_the_reader_envelope_schema() {
    let schemas = EventSchemas::load();
    let (scenario, forms) = embedded_forms().await;
    let (zoe, max) = (scenario.zoe.to_string(), scenario.max.to_string());
    for (what, events) in [
        ("the log opened with the keys", &forms.opened),
        ("the events query as admin", &forms.admin),
        ("the events query as analytics", &forms.analytics),
    ] {
        assert_eq!(events.len(), 5, "{what}");
        let mut seen = Vec::new();
        for (event, published) in events.iter().zip(&forms.published) {
            schemas.assert_valid_reader(event, what);
            assert_eq!(
                event["eventId"], published["eventId"],
                "{what}: in log order"
            );
            // Only the payload differs from what is published (and analytics' command ids).
            for field in [
                "aggregateId",
                "sequence",
                "position",
                "eventType",
                "eventVersion",
            ] {
                assert_eq!(event[field], published[field], "{what}: {field}");
            }
            let payload = &event["payload"];
            assert!(payload.get("sealed").is_none(), "{what}: {event}");
            let form = match (event["aggregateId"].as_str(), event["eventType"].as_str()) {
                (_, Some("AccountDeleted")) => {
                    assert_eq!(payload, &published["payload"], "{what}: as stored");
                    "as stored"
                }
                // Zoë's account is deleted: erased for every reader.
                (Some(id), _) if id == zoe => {
                    assert_eq!(payload["erased"], true, "{what}: {event}");
                    assert!(!has_personal_fields(payload), "{what}: {event}");
                    "erased"
                }
                (Some(id), _) if id == max => {
                    assert!(payload.get("erased").is_none(), "{what}: {event}");
                    if has_personal_fields(payload) {
                        "opened"
                    } else {
                        "redacted"
                    }
                }
                _ => panic!("{what}: an event of neither user: {event}"),
            };
            seen.push(form);
        }
        let max_form = if what.contains("analytics") {
            "redacted"
        } else {
            "opened"
        };
        assert_eq!(
            seen,
            ["erased", "erased", "erased", "as stored", max_form],
            "{what}"
        );
    }
    // The API shows admins what `pcf events` prints.
    for (api, printed) in forms.admin.iter().zip(&forms.opened) {
        assert_eq!(api["payload"], printed["payload"]);
        assert_eq!(api["metadata"], printed["metadata"]);
    }
    let max_created = &forms.opened[4]["payload"];
    assert_eq!(max_created["displayName"], "Max");
    assert_eq!(max_created["bio"], Value::Null);
    assert_eq!(max_created["avatarUrl"], "HTTPS://img.example.net/max.jpg");
}

#[tokio::test]
async fn tampered_envelopes_fail_validation() {
    let schemas = EventSchemas::load();
    let (_, forms) = embedded_forms().await;
    let envelopes = &forms.published;
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
    // The same events as version 1 would have published them: the opened layout.
    let as_version_1 = |i: usize| {
        let mut e = forms.opened_while_live[i].clone();
        e["eventVersion"] = json!("1");
        e
    };
    let created_v1 = as_version_1(0);
    let updated_v1 = as_version_1(1);
    let changed_v1 = as_version_1(2);
    let mut deleted_v1 = deleted.clone();
    deleted_v1["eventVersion"] = json!("1");
    deleted_v1["payload"]
        .as_object_mut()
        .unwrap()
        .remove("keyDestroyedAt");
    for e in [
        &created,
        &updated,
        &changed,
        &deleted,
        &created_v1,
        &updated_v1,
        &changed_v1,
        &deleted_v1,
    ] {
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
            e["eventVersion"] = json!(2);
        }),
        ("eventVersion 3, which no schema describes", &created, |e| {
            e["eventVersion"] = json!("3");
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
        // Version 2: personal data only sealed.
        (
            "UserCreated v2 with an email in plain text",
            &created,
            |e| {
                e["payload"]["email"] = json!("zoe@example.com");
            },
        ),
        ("UserCreated v2 without sealed", &created, |e| {
            e["payload"].as_object_mut().unwrap().remove("sealed");
        }),
        ("UserCreated v2 with sealed not base64", &created, |e| {
            e["payload"]["sealed"] = json!("not base64, but long enough to pass the minimum");
        }),
        ("UserCreated v2 with sealed too short", &created, |e| {
            e["payload"]["sealed"] = json!("QUJD");
        }),
        ("UserCreated v2 with userId not a UUID", &created, |e| {
            e["payload"]["userId"] = json!("42");
        }),
        ("UserCreated v2 with an extra field", &created, |e| {
            e["payload"]["password"] = json!("hunter2");
        }),
        ("UserCreated v2 both sealed and erased", &created, |e| {
            e["payload"]["erased"] = json!(true);
        }),
        ("UserCreated v2 in the opened layout", &created_v1, |e| {
            e["eventVersion"] = json!("2");
        }),
        ("UserCreated v1 sealed", &created, |e| {
            e["eventVersion"] = json!("1");
        }),
        (
            "ProfileUpdated v2 with a bio in plain text",
            &updated,
            |e| {
                e["payload"]["bio"] = json!("Line one");
            },
        ),
        ("ProfileUpdated v2 erased as false", &updated, |e| {
            let payload = e["payload"].as_object_mut().unwrap();
            payload.remove("sealed");
            payload.insert("erased".into(), json!(false));
        }),
        (
            "EmailChanged v2 with newEmail beside sealed",
            &changed,
            |e| {
                e["payload"]["newEmail"] = json!("zoe@example.com");
            },
        ),
        ("EmailChanged v2, occurredAt no date-time", &changed, |e| {
            e["payload"]["occurredAt"] = json!("2024-05-01 12:00");
        }),
        ("AccountDeleted carrying personal data", &deleted, |e| {
            e["payload"]["email"] = json!("zoe@example.com");
        }),
        ("AccountDeleted sealed", &deleted, |e| {
            e["payload"]["sealed"] = json!("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlq");
        }),
        ("AccountDeleted without occurredAt", &deleted, |e| {
            e["payload"] = json!({});
        }),
        (
            "AccountDeleted, keyDestroyedAt no date-time",
            &deleted,
            |e| {
                e["payload"]["keyDestroyedAt"] = json!("now");
            },
        ),
        ("AccountDeleted v1 with keyDestroyedAt", &deleted_v1, |e| {
            e["payload"]["keyDestroyedAt"] = json!("2024-05-01T12:00:00Z");
        }),
        // Version 1: personal data in plain text, each field as the profile rules allow.
        (
            "UserCreated v1 with a non-address email",
            &created_v1,
            |e| {
                e["payload"]["email"] = json!("zoë at example");
            },
        ),
        (
            "UserCreated v1 with an empty displayName",
            &created_v1,
            |e| {
                e["payload"]["displayName"] = json!("");
            },
        ),
        ("UserCreated v1 without email", &created_v1, |e| {
            e["payload"].as_object_mut().unwrap().remove("email");
        }),
        (
            "UserCreated v1 without bio, not even null",
            &created_v1,
            |e| {
                e["payload"].as_object_mut().unwrap().remove("bio");
            },
        ),
        ("UserCreated v1 with an extra field", &created_v1, |e| {
            e["payload"]["password"] = json!("hunter2");
        }),
        (
            "ProfileUpdated v1 with a control character",
            &updated_v1,
            |e| {
                e["payload"]["displayName"] = json!("Zoë\u{7}");
            },
        ),
        ("ProfileUpdated v1 with a numeric bio", &updated_v1, |e| {
            e["payload"]["bio"] = json!(5);
        }),
        (
            "ProfileUpdated v1 with a plain http avatar",
            &updated_v1,
            |e| {
                e["payload"]["avatarUrl"] = json!("http://cdn.example.com/a.png");
            },
        ),
        (
            "ProfileUpdated v1, displayName too long",
            &updated_v1,
            |e| {
                e["payload"]["displayName"] = json!("x".repeat(101));
            },
        ),
        ("EmailChanged v1 without newEmail", &changed_v1, |e| {
            e["payload"].as_object_mut().unwrap().remove("newEmail");
        }),
        ("EmailChanged v1 sealed as well", &changed_v1, |e| {
            e["payload"]["sealed"] = json!("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlq");
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

    // What readers get: the forms of the real code path pass, tampered ones fail.
    let opened = forms.opened_while_live[0].clone();
    let erased = forms.opened[0].clone();
    let redacted = forms.analytics[4].clone();
    for (what, e) in [
        ("opened", &opened),
        ("erased", &erased),
        ("redacted", &redacted),
    ] {
        schemas.assert_valid_reader(e, what);
    }
    let reader_cases: Vec<(&str, &Value, Tamper)> = vec![
        ("a sealed payload shown to a reader", &created, |_| {}),
        ("an opened payload without its bio", &opened, |e| {
            e["payload"].as_object_mut().unwrap().remove("bio");
        }),
        ("an opened payload still sealed too", &opened, |e| {
            e["payload"]["sealed"] = json!("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlq");
        }),
        ("an opened payload marked erased", &opened, |e| {
            e["payload"]["erased"] = json!(true);
        }),
        ("an erased payload keeping an email", &erased, |e| {
            e["payload"]["email"] = json!("zoe@example.com");
        }),
        ("erased as false", &erased, |e| {
            e["payload"]["erased"] = json!(false);
        }),
        (
            "a redacted payload keeping the sealed value",
            &redacted,
            |e| {
                e["payload"]["sealed"] = json!("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlq");
            },
        ),
        (
            "a redacted payload keeping a display name",
            &redacted,
            |e| {
                e["payload"]["displayName"] = json!("Max");
            },
        ),
        (
            "a reader's envelope with an unknown field",
            &redacted,
            |e| {
                e["partition"] = json!(0);
            },
        ),
    ];
    let mut accepted = Vec::new();
    for (what, original, tamper) in &reader_cases {
        let mut envelope = (*original).clone();
        tamper(&mut envelope);
        if schemas.check_reader(&envelope).is_ok() {
            accepted.push(*what);
        }
    }
    assert!(
        accepted.is_empty(),
        "tampered reader envelopes that passed validation: {accepted:?}"
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
    // (block, whether it is marked as a reader's envelope)
    let mut blocks: Vec<(String, bool)> = Vec::new();
    let mut current: Option<(String, bool)> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```json") => current = Some((String::new(), false)),
            (None, "```json reader") => current = Some((String::new(), true)),
            (Some(_), l) if l.starts_with("```") => {
                blocks.extend(current.take());
            }
            (Some((block, _)), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    let mut published = BTreeSet::new();
    let mut reader_forms = BTreeSet::new();
    for (block, reader) in &blocks {
        let value: Value = serde_json::from_str(block).unwrap_or_else(|e| {
            panic!("a json block of docs/events.md is not JSON ({e}):\n{block}")
        });
        if value.get("eventId").is_none() {
            assert!(!reader, "a json reader block that is no envelope:\n{block}");
            continue;
        }
        let event_type = value["eventType"].as_str().unwrap_or_default().to_owned();
        if *reader {
            schemas.assert_valid_reader(&value, "a reader's example in docs/events.md");
            let payload = &value["payload"];
            let form = if payload.get("erased").is_some() {
                "erased"
            } else if has_personal_fields(payload) {
                "opened"
            } else {
                "redacted"
            };
            reader_forms.insert(form);
        } else {
            schemas.assert_valid(&value, "an example in docs/events.md");
            let version = value["eventVersion"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            published.insert((event_type, version));
        }
    }
    let every: BTreeSet<(String, String)> = PAYLOAD_SCHEMAS
        .iter()
        .flat_map(|p| ["1", "2"].map(|v| (p.0.to_owned(), v.to_owned())))
        .collect();
    assert_eq!(
        published, every,
        "docs/events.md shows a published envelope of every event type in both versions"
    );
    assert_eq!(
        reader_forms,
        BTreeSet::from(["erased", "opened", "redacted"]),
        "docs/events.md shows every form readers get"
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

/// A fresh database and Kafka topic, named after one id, and the consumer group the test
/// reads the topic with (deleted with the topic). Panics when Kafka cannot be reached.
async fn kafka_fixture() -> ((TestDb, KafkaTopic), String) {
    let id = Uuid::new_v4().simple().to_string();
    let mut kafka = KafkaTopic::new(&id);
    require_kafka(&kafka.brokers);
    let consumer_group = format!("{}schema-check", kafka.group_prefix);
    kafka.extra_groups.push(consumer_group.clone());
    let db = TestDb::create_named(&id, ServerUse::Shared).await;
    ((db, kafka), consumer_group)
}

/// The app in cluster mode on the fixture's database and topic (two partitions).
async fn cluster_app(db: &TestDb, kafka: &KafkaTopic, dir: &std::path::Path) -> pcf::App {
    let config = pcf::Config {
        database_url: Some(db.url.clone()),
        read_database_urls: vec![db.url.clone()],
        kafka_brokers: Some(kafka.brokers.clone()),
        kafka_topic: kafka.topic.clone(),
        kafka_partitions: 2,
        kafka_group_prefix: kafka.group_prefix.clone(),
        ..base_config(dir)
    };
    pcf::build(&config)
        .await
        .expect("building the cluster-mode app")
}

/// Shuts the app down, giving up (with a note) after 15 s.
async fn shut_down(app: pcf::App) {
    let stopped = tokio::time::timeout(Duration::from_secs(15), app.shutdown()).await;
    if stopped.is_err() {
        eprintln!("the app did not shut down within 15 s");
    }
}

#[tokio::test]
async fn kafka_messages_match_the_schemas_with_user_keys_and_headers() {
    let schemas = EventSchemas::load();
    let (fixture, consumer_group) = kafka_fixture().await;
    run(fixture, async |(db, kafka)| {
        let dir = tempfile::tempdir().expect("a temporary data directory");
        let app = cluster_app(db, kafka, dir.path()).await;
        let scenario = run_scenario(&app).await;
        let events = read_log(&app, 5).await;
        check_scenario(&scenario, &events);
        // The messages are these envelopes (`check_messages`): no personal data in plain text.
        let plain: Vec<&str> = scenario.plain.iter().map(String::as_str).collect();
        assert_sealed(&events, &plain);
        let ids: BTreeSet<String> = events.iter().map(|e| e.event_id.to_string()).collect();
        let received = consume(&kafka.brokers, &kafka.topic, &consumer_group, &ids).await;
        shut_down(app).await;
        check_messages(&schemas, &scenario, &events, &received);
    })
    .await;
}

/// Version-1 events, as older PCF wrote them, in a database upgraded since: the relay
/// publishes them as they are, so real Kafka messages of version 1 must match the envelope
/// schema; readers of the API get them erased, since the account is deleted.
#[tokio::test]
async fn version_1_events_of_older_pcf_reach_kafka_valid_and_readers_get_them_erased() {
    let schemas = EventSchemas::load();
    let (fixture, consumer_group) = kafka_fixture().await;
    run(fixture, async |(db, kafka)| {
        let dir = tempfile::tempdir().expect("a temporary data directory");
        let app = cluster_app(db, kafka, dir.path()).await;
        let user = Uuid::now_v7();
        let tag = user.simple().to_string()[24..].to_owned();
        let first_email = format!("ann.lee+{tag}@example.com");
        let new_email = format!("ann_{tag}@example.org");
        // A complete history as older PCF wrote it: payloads externally tagged, personal
        // fields in plain text, metadata as the HTTP API recorded it (no actor on sign-up).
        let history = [
            (
                "UserCreated",
                json!({ "UserCreated": {
                    "userId": user, "email": first_email, "displayName": "Ann Lee",
                    "bio": "Plain bio of version one", "avatarUrl": null,
                    "occurredAt": "2024-03-01T09:00:00.123Z",
                }}),
            ),
            (
                "ProfileUpdated",
                json!({ "ProfileUpdated": {
                    "displayName": "Ann L.", "bio": null,
                    "avatarUrl": "https://cdn.example.com/ann-v1.png",
                    "occurredAt": "2024-03-02T10:30:00Z",
                }}),
            ),
            (
                "EmailChanged",
                json!({ "EmailChanged": {
                    "oldEmail": first_email, "newEmail": new_email,
                    "occurredAt": "2024-03-03T11:45:00.5Z",
                }}),
            ),
            (
                "AccountDeleted",
                json!({ "AccountDeleted": { "occurredAt": "2024-03-04T12:00:00Z" } }),
            ),
        ];
        let plain = [
            first_email.as_str(),
            new_email.as_str(),
            "Ann Lee",
            "Plain bio of version one",
            "Ann L.",
            "ann-v1.png",
        ];
        let mut ids = BTreeSet::new();
        for (sequence, (event_type, payload)) in (1_i64..).zip(&history) {
            let command_id = format!("cmd-{}", Uuid::new_v4().simple());
            let mut metadata = json!({
                "correlationId": Uuid::new_v4(),
                "causationId": command_id,
                "commandId": command_id,
            });
            if sequence > 1 {
                metadata["actor"] = json!(user);
            }
            let (event_id,): (String,) = sqlx::query_as(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                 event_version, payload, metadata) VALUES ('User', $1, $2, $3, '1', $4, $5) \
                 RETURNING event_id::text",
            )
            .bind(user.to_string())
            .bind(sequence)
            .bind(event_type)
            .bind(payload)
            .bind(&metadata)
            .fetch_one(&db.pool)
            .await
            .expect("inserting a version-1 event");
            ids.insert(event_id);
        }

        // The relay publishes them; consume fails unless all four arrive.
        let received = consume(&kafka.brokers, &kafka.topic, &consumer_group, &ids).await;
        let admin_view = events_via_graphql(&app.router, &admin()).await;
        shut_down(app).await;

        let mut types = BTreeSet::new();
        let mut sequences = BTreeSet::new();
        for m in &received {
            let source = format!("message {}@{}", m.partition, m.offset);
            schemas.assert_valid(&m.value, &source);
            assert_eq!(m.value["aggregateId"], json!(user), "{source}");
            assert_eq!(m.value["eventVersion"], "1", "{source}: {}", m.value);
            assert_eq!(
                m.headers.get("eventVersion").map(String::as_str),
                Some("1"),
                "{source}: the eventVersion header"
            );
            assert_eq!(m.key, Some(user.to_string()), "{source}: key = user id");
            let event_type = m.value["eventType"].as_str().unwrap().to_owned();
            let sequence = m.value["sequence"].as_u64().unwrap();
            // Published as stored: the payload is the stored one, untagged.
            let stored = &history[sequence as usize - 1];
            assert_eq!(event_type, stored.0, "{source}");
            assert_eq!(m.value["payload"], stored.1[stored.0], "{source}");
            types.insert(event_type);
            sequences.insert(sequence);
        }
        let all: BTreeSet<String> = PAYLOAD_SCHEMAS.iter().map(|p| p.0.to_owned()).collect();
        assert_eq!(types, all, "a version-1 message of every event type");
        assert_eq!(sequences, BTreeSet::from([1, 2, 3, 4]));

        // Readers never see the deleted account's plain data, even from version 1.
        let read: Vec<&Value> = admin_view
            .iter()
            .filter(|e| e["aggregateId"] == json!(user))
            .collect();
        assert_eq!(read.len(), 4, "the events query as admin: {admin_view:#?}");
        for (event, (event_type, stored)) in read.iter().zip(&history) {
            schemas.assert_valid_reader(event, "the events query as admin");
            assert_eq!(event["eventType"], *event_type, "{event}");
            assert_eq!(event["eventVersion"], "1", "{event}");
            let payload = &event["payload"];
            assert!(!has_personal_fields(payload), "{event}");
            if *event_type == "AccountDeleted" {
                assert_eq!(payload, &stored[*event_type], "as stored: {event}");
            } else {
                assert_eq!(payload["erased"], true, "{event}");
            }
        }
        let text = serde_json::to_string(&read).unwrap();
        for value in plain {
            assert!(!text.contains(value), "{value:?} is readable: {text}");
        }
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
