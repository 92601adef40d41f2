//! Reading the log with personal data sealed per user: the `events` query and subscription,
//! each reader as the access rules say, with an opener that opens, erases or fails.

use super::*;
use crate::{LiveLog, QueryRoot, SubscriptionRoot};
use async_graphql::{EmptyMutation, Request, Response, Schema};
use async_trait::async_trait;
use futures::StreamExt;
use pcf_adapters::personal::{self, DataKey, PERSONAL_FIELDS, SEALED};
use pcf_domain::auth::AccessRole;
use pcf_domain::ports::{EventLog, UserFilter};
use pcf_domain::Email;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

/// A log in memory.
#[derive(Default)]
struct Log(Mutex<Vec<EventEnvelope>>);

#[async_trait]
impl EventLog for Log {
    async fn read(&self, q: &LogQuery) -> Result<Vec<EventEnvelope>, PortError> {
        Ok(q.select(&self.0.lock().unwrap()))
    }

    async fn user_events(&self, _: Uuid, _: u64) -> Result<Vec<EventEnvelope>, PortError> {
        Ok(Vec::new())
    }

    async fn last_position(&self) -> Result<Option<Position>, PortError> {
        Ok(self.0.lock().unwrap().last().map(|e| e.position))
    }
}

/// No user views (events' `user` is not asked for here).
struct NoUsers;

#[async_trait]
impl UserReader for NoUsers {
    async fn user(&self, _: Uuid) -> Result<Option<UserView>, PortError> {
        Ok(None)
    }
    async fn user_by_email(&self, _: &Email) -> Result<Option<UserView>, PortError> {
        Ok(None)
    }
    async fn list(
        &self,
        _: Option<Uuid>,
        _: usize,
        _: &UserFilter,
    ) -> Result<Vec<UserView>, PortError> {
        Ok(Vec::new())
    }
}

/// An opener as `Keys` opens, with the keys of the live users in memory: the events of a
/// user with a key open, a deleted user's read as erased, and any other sealed event (altered,
/// or a live user without a key) comes back unopened. Records the size of every batch it is
/// given; `down` makes it fail as a key table that cannot be read.
#[derive(Default)]
struct FakeOpener {
    keys: HashMap<Uuid, DataKey>,
    deleted: HashSet<Uuid>,
    down: Mutex<Option<PortError>>,
    batches: Mutex<Vec<usize>>,
}

impl FakeOpener {
    fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }

    fn set_down(&self, down: Option<PortError>) {
        *self.down.lock().unwrap() = down;
    }
}

#[async_trait]
impl Opener for FakeOpener {
    async fn open(&self, events: &mut [EventEnvelope]) -> Result<Vec<Unopened>, PortError> {
        self.batches.lock().unwrap().push(events.len());
        if let Some(e) = self.down.lock().unwrap().clone() {
            return Err(e);
        }
        let mut unopened = Vec::new();
        for (index, e) in events.iter_mut().enumerate() {
            if !personal::is_sealed(&e.payload) {
                continue;
            }
            let user = e.aggregate_id;
            let outcome = match self.keys.get(&user) {
                Some(key) => {
                    let aad = personal::event_aad(user, e.sequence, &e.event_type);
                    personal::open_payload(&mut e.payload, Some(key), &aad)
                        .map_err(|t| t.to_string())
                }
                None if self.deleted.contains(&user) => {
                    personal::erase_payload(&mut e.payload);
                    Ok(())
                }
                None => Err("no key for a live user".to_owned()),
            };
            if let Err(reason) = outcome {
                unopened.push(Unopened {
                    index,
                    event_id: e.event_id,
                    reason,
                });
            }
        }
        Ok(unopened)
    }
}

/// What the users wrote: the plain payloads, as readers with personal data see them.
fn created(user: Uuid, name: &str) -> Value {
    json!({
        "userId": user.to_string(),
        "email": format!("{}@example.com", name.to_lowercase()),
        "displayName": name,
        "bio": null,
        "avatarUrl": "https://example.com/a.png",
        "occurredAt": "2025-01-01T00:00:00Z"
    })
}

fn updated(user: Uuid) -> Value {
    json!({
        "userId": user.to_string(),
        "displayName": "Someone else",
        "bio": "about me",
        "occurredAt": "2025-01-02T00:00:00Z"
    })
}

fn deleted(user: Uuid) -> Value {
    json!({ "userId": user.to_string(), "occurredAt": "2025-01-03T00:00:00Z" })
}

impl Log {
    /// Appends an event of `user` with `payload`, sealed with `key` when given (version 2).
    fn append(
        &self,
        user: Uuid,
        event_type: &str,
        mut payload: Value,
        key: Option<&DataKey>,
    ) -> EventEnvelope {
        let mut events = self.0.lock().unwrap();
        let n = events.len() as u64 + 1;
        let sequence = events.iter().filter(|e| e.aggregate_id == user).count() as u64 + 1;
        if let Some(key) = key {
            let aad = personal::event_aad(user, sequence, event_type);
            personal::seal_payload(&mut payload, key, &aad);
        }
        let event = EventEnvelope {
            event_id: Uuid::now_v7(),
            aggregate_type: pcf_domain::AGGREGATE_TYPE.to_owned(),
            aggregate_id: user,
            sequence,
            position: Position::new(n, n),
            event_type: event_type.to_owned(),
            event_version: if key.is_some() { "2" } else { "1" }.to_owned(),
            recorded_at: Utc::now(),
            metadata: pcf_domain::EventMetadata {
                command_id: Some("command-1".to_owned()),
                actor: Some(user.to_string()),
                ..Default::default()
            },
            payload,
        };
        events.push(event.clone());
        event
    }

    /// Alters the sealed value of the last event (another base64 character in the middle of
    /// its ciphertext).
    fn alter_last(&self) {
        let mut events = self.0.lock().unwrap();
        let payload = &mut events.last_mut().unwrap().payload;
        let mut sealed: Vec<char> = payload[SEALED].as_str().unwrap().chars().collect();
        let i = sealed.len() / 2;
        sealed[i] = if sealed[i] == 'A' { 'B' } else { 'A' };
        payload[SEALED] = Value::String(sealed.into_iter().collect());
    }

    fn last(&self) -> EventEnvelope {
        self.0.lock().unwrap().last().unwrap().clone()
    }
}

/// A log of users whose events read each in its own way, and the opener with their keys.
struct World {
    log: Arc<Log>,
    opener: Arc<FakeOpener>,
    /// Live, with a key: sealed events that open.
    alice: Uuid,
    /// Deleted, its key destroyed: sealed events that read as erased.
    bob: Uuid,
    /// An event of version 1, plain.
    carol: Uuid,
    /// An event erased in place (as `pcf events protect` does for a deleted user).
    dave: Uuid,
    /// Live, with a key; an event whose sealed value was altered.
    mallory: Uuid,
    /// Live, but the key is missing.
    erin: Uuid,
}

impl World {
    /// The log holds six events: alice's 1st, bob's 1st, alice's 2nd, carol's, dave's,
    /// bob's `AccountDeleted`.
    fn new() -> Self {
        let [alice, bob, carol, dave, mallory, erin] = [(); 6].map(|_| Uuid::now_v7());
        let [alice_key, bob_key, mallory_key] = [(); 3].map(|_| DataKey::generate());
        let log = Arc::new(Log::default());
        log.append(
            alice,
            "UserCreated",
            created(alice, "Alice"),
            Some(&alice_key),
        );
        log.append(bob, "UserCreated", created(bob, "Bob"), Some(&bob_key));
        log.append(alice, "ProfileUpdated", updated(alice), Some(&alice_key));
        log.append(carol, "UserCreated", created(carol, "Carol"), None);
        let mut gone = created(dave, "Dave");
        personal::erase_payload(&mut gone);
        log.append(dave, "UserCreated", gone, None);
        log.append(bob, "AccountDeleted", deleted(bob), Some(&bob_key));
        // Bob's key went with his account; Erin's is missing.
        let opener = FakeOpener {
            keys: [(alice, alice_key), (mallory, mallory_key)].into(),
            deleted: [bob].into(),
            ..FakeOpener::default()
        };
        Self {
            log,
            opener: Arc::new(opener),
            alice,
            bob,
            carol,
            dave,
            mallory,
            erin,
        }
    }

    /// Appends an event of alice, sealed with her key.
    fn append_alices(&self) -> EventEnvelope {
        let key = &self.opener.keys[&self.alice];
        self.log
            .append(self.alice, "ProfileUpdated", updated(self.alice), Some(key))
    }

    /// Appends mallory's event, sealed with her key, and alters it.
    fn append_altered(&self) {
        let key = &self.opener.keys[&self.mallory];
        let mallory = self.mallory;
        self.log.append(
            mallory,
            "UserCreated",
            created(mallory, "Mallory"),
            Some(key),
        );
        self.log.alter_last();
    }

    /// Appends erin's event, sealed with a key that is not in the key table.
    fn append_keyless(&self) {
        let erin = self.erin;
        let key = DataKey::generate();
        self.log
            .append(erin, "UserCreated", created(erin, "Erin"), Some(&key));
    }

    fn schema(&self) -> Schema<QueryRoot, EmptyMutation, SubscriptionRoot> {
        let log: Arc<dyn EventLog> = self.log.clone();
        // No commit is announced: the tail polls.
        let (_, rx) = tokio::sync::watch::channel(0);
        let live = LiveLog::spawn(log.clone(), rx, Duration::from_millis(20));
        Schema::build(QueryRoot::default(), EmptyMutation, SubscriptionRoot)
            .data(ReadModels {
                users: Arc::new(NoUsers),
                log,
                opener: self.opener.clone(),
                consistency_timeout: Duration::from_millis(10),
            })
            .data(live)
            .finish()
    }
}

fn with_roles(roles: &[AccessRole]) -> Principal {
    Principal {
        subject: Some("service".to_owned()),
        roles: roles.iter().copied().collect(),
        ..Principal::default()
    }
}

fn auditor() -> Principal {
    with_roles(&[AccessRole::Auditor])
}

fn analytics() -> Principal {
    with_roles(&[AccessRole::Analytics])
}

fn user(id: Uuid) -> Principal {
    Principal {
        subject: Some(id.to_string()),
        ..Principal::default()
    }
}

const EVENTS: &str =
    "query($id: ID, $first: Int = 50) { events(aggregateId: $id, first: $first) { \
     pageInfo { hasNextPage } \
     edges { node { eventId aggregateId eventType payload metadata { commandId } } } } }";

async fn query(
    schema: &Schema<QueryRoot, EmptyMutation, SubscriptionRoot>,
    caller: Principal,
    vars: Value,
) -> Value {
    let request = Request::new(EVENTS)
        .variables(async_graphql::Variables::from_json(vars))
        .data(caller);
    serde_json::to_value(schema.execute(request).await).unwrap()
}

/// The nodes of an `events` answer, which must have no errors.
fn nodes(answer: &Value) -> Vec<Value> {
    assert!(answer.get("errors").is_none(), "{answer}");
    answer["data"]["events"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"].clone())
        .collect()
}

/// The payloads of `user`'s events among `nodes`, in order.
fn payloads_of(nodes: &[Value], user: Uuid) -> Vec<Value> {
    nodes
        .iter()
        .filter(|n| n["aggregateId"] == user.to_string())
        .map(|n| n["payload"].clone())
        .collect()
}

fn codes(answer: &Value) -> Vec<String> {
    answer["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["extensions"]["code"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn erased(of: Value) -> Value {
    let mut payload = of;
    personal::erase_payload(&mut payload);
    payload
}

#[tokio::test]
async fn auditors_and_admins_read_personal_data_opened_and_deleted_users_erased() {
    let w = World::new();
    let schema = w.schema();
    for caller in [auditor(), with_roles(&[AccessRole::Admin])] {
        let answer = query(&schema, caller, json!({})).await;
        let nodes = nodes(&answer);
        assert_eq!(nodes.len(), 6);
        assert_eq!(
            payloads_of(&nodes, w.alice),
            [created(w.alice, "Alice"), updated(w.alice)]
        );
        assert_eq!(
            payloads_of(&nodes, w.bob),
            [erased(created(w.bob, "Bob")), deleted(w.bob)]
        );
        assert_eq!(payloads_of(&nodes, w.carol), [created(w.carol, "Carol")]);
        assert_eq!(
            payloads_of(&nodes, w.dave),
            [erased(created(w.dave, "Dave"))]
        );
        assert_eq!(nodes[1]["payload"]["erased"], true, "bob's first event");
        assert!(!answer.to_string().contains(SEALED), "{answer}");
        assert_eq!(nodes[0]["metadata"]["commandId"], "command-1");
    }
    // One batch of key look-ups per page, each of the page's six events.
    assert_eq!(w.opener.batches(), [6, 6]);
}

#[tokio::test]
async fn analytics_reads_without_personal_data_even_where_events_do_not_open() {
    let w = World::new();
    // Even events that would not open: analytics sees no personal data either way.
    w.append_altered();
    let schema = w.schema();
    let answer = query(&schema, analytics(), json!({})).await;
    let nodes = nodes(&answer);
    assert_eq!(nodes.len(), 7);
    for node in &nodes {
        let payload = node["payload"].as_object().unwrap();
        for field in PERSONAL_FIELDS.iter().chain([&SEALED]) {
            assert!(!payload.contains_key(*field), "{field} in {node}");
        }
        assert_eq!(node["metadata"]["commandId"], Value::Null);
    }
    assert_eq!(
        payloads_of(&nodes, w.alice)[0],
        json!({"userId": w.alice.to_string(), "occurredAt": "2025-01-01T00:00:00Z"})
    );
    // The erased marker of an event erased in place stays.
    assert_eq!(
        payloads_of(&nodes, w.dave),
        [erased(created(w.dave, "Dave"))]
    );
    // Opened (for the erased markers of deleted accounts) in one batch for the page.
    assert_eq!(w.opener.batches(), [7]);
}

#[tokio::test]
async fn a_user_reads_their_own_events_opened_and_nobody_elses() {
    let w = World::new();
    let schema = w.schema();
    let answer = query(&schema, user(w.alice), json!({ "id": w.alice })).await;
    let own = nodes(&answer);
    assert_eq!(
        payloads_of(&own, w.alice),
        [created(w.alice, "Alice"), updated(w.alice)]
    );
    assert_eq!(own.len(), 2);
    assert_eq!(w.opener.batches(), [2]);

    // A deleted user still signed in reads their events erased.
    let answer = query(&schema, user(w.bob), json!({ "id": w.bob })).await;
    assert_eq!(
        payloads_of(&nodes(&answer), w.bob),
        [erased(created(w.bob, "Bob")), deleted(w.bob)]
    );

    for vars in [
        json!({ "id": w.bob }),
        json!({}),
        json!({ "id": "not an id" }),
    ] {
        let answer = query(&schema, user(w.alice), vars.clone()).await;
        assert_eq!(codes(&answer), ["FORBIDDEN"], "{vars}: {answer}");
        assert_eq!(answer["data"], Value::Null);
    }
    let answer = query(&schema, Principal::anonymous(), json!({ "id": w.alice })).await;
    assert_eq!(codes(&answer), ["UNAUTHENTICATED"], "{answer}");
    assert_eq!(w.opener.batches(), [2, 2], "a refused read opened events");
}

#[tokio::test]
async fn an_event_that_does_not_open_fails_the_read_as_internal() {
    for (which, append) in [
        ("altered", World::append_altered as fn(&World)),
        ("keyless", World::append_keyless),
    ] {
        let w = World::new();
        append(&w);
        let schema = w.schema();
        let failing = w.log.last();
        let answer = query(&schema, auditor(), json!({})).await;
        assert_eq!(codes(&answer), ["INTERNAL"], "{which}: {answer}");
        assert_eq!(answer["data"], Value::Null, "{which}");
        let extensions = &answer["errors"][0]["extensions"];
        assert_eq!(extensions["eventId"], failing.event_id.to_string());
        assert_eq!(extensions["position"], failing.position.to_string());
        let text = answer.to_string();
        assert!(!text.contains("@example.com"), "{which}: {text}");
        assert!(!text.contains(failing.payload[SEALED].as_str().unwrap()));
        assert_eq!(w.opener.batches(), [7], "{which}");

        // A page without it reads: only the page's events are opened, not the one read to
        // tell that more follow.
        let answer = query(&schema, auditor(), json!({ "first": 6 })).await;
        assert_eq!(nodes(&answer).len(), 6, "{which}");
        assert_eq!(answer["data"]["events"]["pageInfo"]["hasNextPage"], true);
        assert_eq!(w.opener.batches(), [7, 6], "{which}");
    }
}

#[tokio::test]
async fn data_keys_that_cannot_be_read_fail_the_read_without_details() {
    for (down, code) in [
        (
            PortError::Unavailable("key table down".into()),
            "UNAVAILABLE",
        ),
        (
            PortError::Internal("the data key of user x is damaged".into()),
            "INTERNAL",
        ),
    ] {
        let w = World::new();
        w.opener.set_down(Some(down));
        let answer = query(&w.schema(), auditor(), json!({})).await;
        assert_eq!(codes(&answer), [code], "{answer}");
        assert!(!answer.to_string().contains("key table down"));
        assert!(!answer.to_string().contains("damaged"));
    }
}

const SUBSCRIBE: &str = "subscription($id: ID, $after: String) { \
     events(aggregateId: $id, after: $after) { eventId aggregateId payload } }";

/// The `events` subscription from the start of the log, of `id`'s events (all when `None`).
fn subscribe(
    schema: &Schema<QueryRoot, EmptyMutation, SubscriptionRoot>,
    caller: Principal,
    id: Option<Uuid>,
) -> futures::stream::BoxStream<'static, Response> {
    let vars = json!({ "id": id, "after": Position::START.to_string() });
    let request = Request::new(SUBSCRIBE)
        .variables(async_graphql::Variables::from_json(vars))
        .data(caller);
    schema.execute_stream(request).boxed()
}

/// The next `n` messages of a subscription.
async fn take(stream: &mut futures::stream::BoxStream<'static, Response>, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let response = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a message within 5 s")
            .expect("the stream goes on");
        got.push(serde_json::to_value(response).unwrap());
    }
    got
}

fn payload(message: &Value) -> Value {
    assert!(message.get("errors").is_none(), "{message}");
    message["data"]["events"]["payload"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_opens_a_batch_at_a_time_and_goes_on_past_an_event_that_does_not() {
    let w = World::new();
    w.append_altered();
    let failing = w.log.last();
    let after = w.append_alices();
    let schema = w.schema();
    let mut stream = subscribe(&schema, auditor(), None);
    // Replayed from the store: its eight events, opened in one batch.
    let got = take(&mut stream, 8).await;
    assert_eq!(w.opener.batches(), [8]);
    assert_eq!(payload(&got[0]), created(w.alice, "Alice"));
    assert_eq!(payload(&got[1]), erased(created(w.bob, "Bob")));
    assert_eq!(payload(&got[2]), updated(w.alice));
    assert_eq!(payload(&got[3]), created(w.carol, "Carol"));
    assert_eq!(payload(&got[4]), erased(created(w.dave, "Dave")));
    assert_eq!(payload(&got[5]), deleted(w.bob));
    // Mallory's event: an error in its place, naming it.
    assert_eq!(codes(&got[6]), ["INTERNAL"], "{}", got[6]);
    let extensions = &got[6]["errors"][0]["extensions"];
    assert_eq!(extensions["eventId"], failing.event_id.to_string());
    assert_eq!(extensions["position"], failing.position.to_string());
    assert!(!got[6].to_string().contains("@example.com"), "{}", got[6]);
    // The stream went on past it, and goes on live.
    assert_eq!(
        got[7]["data"]["events"]["eventId"],
        after.event_id.to_string()
    );
    assert_eq!(payload(&got[7]), updated(w.alice));
    let live = w.append_alices();
    let got = take(&mut stream, 1).await;
    assert_eq!(
        got[0]["data"]["events"]["eventId"],
        live.event_id.to_string()
    );
    assert_eq!(payload(&got[0]), updated(w.alice));
    assert_eq!(w.opener.batches(), [8, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_redacts_for_analytics_and_opens_only_a_users_own_events() {
    let w = World::new();
    w.append_altered();
    let schema = w.schema();
    let got = take(&mut subscribe(&schema, analytics(), None), 7).await;
    for message in &got {
        let payload = payload(message);
        for field in PERSONAL_FIELDS.iter().chain([&SEALED]) {
            assert!(payload.get(*field).is_none(), "{field} in {payload}");
        }
    }
    assert_eq!(payload(&got[4]), erased(created(w.dave, "Dave")));
    let analytics_batches = w.opener.batches().len();
    assert!(
        analytics_batches >= 1,
        "opened in batches for the erased markers"
    );

    let got = take(&mut subscribe(&schema, user(w.alice), Some(w.alice)), 2).await;
    assert_eq!(payload(&got[0]), created(w.alice, "Alice"));
    assert_eq!(payload(&got[1]), updated(w.alice));
    assert_eq!(w.opener.batches()[analytics_batches..], [2]);

    for id in [Some(w.bob), None] {
        let got = take(&mut subscribe(&schema, user(w.alice), id), 1).await;
        assert_eq!(codes(&got[0]), ["FORBIDDEN"], "{id:?}: {}", got[0]);
    }
    let got = take(
        &mut subscribe(&schema, Principal::anonymous(), Some(w.alice)),
        1,
    )
    .await;
    assert_eq!(codes(&got[0]), ["UNAUTHENTICATED"], "{}", got[0]);
    assert_eq!(
        w.opener.batches()[analytics_batches..],
        [2],
        "a refused subscription opened events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_waits_while_the_keys_are_unavailable_and_reports_a_damaged_key() {
    let w = World::new();
    let schema = w.schema();
    w.opener
        .set_down(Some(PortError::Unavailable("key table down".into())));
    let mut stream = subscribe(&schema, auditor(), Some(w.alice));
    let waiting = tokio::time::timeout(Duration::from_millis(400), stream.next()).await;
    assert!(waiting.is_err(), "a message while the keys are unavailable");
    assert!(w.opener.batches().len() > 1, "no second try");
    w.opener.set_down(None);
    // The batch it kept trying, opened, once.
    let got = take(&mut stream, 2).await;
    assert_eq!(payload(&got[0]), created(w.alice, "Alice"));
    assert_eq!(payload(&got[1]), updated(w.alice));

    // A failure that trying again does not mend: each event of the batch is an error in its
    // place, and the stream goes on.
    w.opener
        .set_down(Some(PortError::Internal("the data key is damaged".into())));
    let damaged = w.append_alices();
    let got = take(&mut stream, 1).await;
    assert_eq!(codes(&got[0]), ["INTERNAL"], "{}", got[0]);
    assert_eq!(
        got[0]["errors"][0]["extensions"]["eventId"],
        damaged.event_id.to_string()
    );
    assert!(!got[0].to_string().contains("damaged"), "{}", got[0]);
    w.opener.set_down(None);
    let next = w.append_alices();
    let got = take(&mut stream, 1).await;
    assert_eq!(
        got[0]["data"]["events"]["eventId"],
        next.event_id.to_string()
    );
    assert_eq!(payload(&got[0]), updated(w.alice));
}
