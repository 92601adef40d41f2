//! A whole PCF (`pcf::build`) of one test, on a fresh SQLite data directory (embedded mode)
//! or on a fresh PostgreSQL database (PostgreSQL event store, in-process bus and views),
//! driven through its router without a socket.

use super::auth::JWT_SECRET;
use super::cleanup::Teardown;
use super::database::TestDb;
use super::graphql::{
    send, Gql, Resp, CHANGE_EMAIL, CREATE_USER, DELETE_ACCOUNT, EVENTS, UPDATE_PROFILE, USER,
    USER_BY_EMAIL,
};
use super::wait::wait_until;
use axum::body::Body;
use axum::http::Request;
use pcf_adapters::keys::Keys;
use pcf_adapters::personal::{SEALED, SEALED_VERSION};
use pcf_domain::auth::{AccessRole, Principal, Tier};
use pcf_domain::ports::LogQuery;
use pcf_domain::EventEnvelope;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tempfile::TempDir;
use uuid::Uuid;

/// How long `minVersion` waits in these tests: short, so `STALE_READ` answers come quickly.
pub const CONSISTENCY_TIMEOUT: Duration = Duration::from_secs(3);

/// The configuration every test app starts from: SQLite under `data_dir`, the tests' secret,
/// short consistency waits.
pub fn base_config(data_dir: &Path) -> pcf::Config {
    pcf::Config {
        data_dir: data_dir.to_path_buf(),
        jwt_secret: Some(JWT_SECRET.to_owned()),
        consistency_timeout: CONSISTENCY_TIMEOUT,
        ..Default::default()
    }
}

/// Where an app keeps its events.
pub enum Storage {
    Sqlite(TempDir),
    Postgres(TestDb),
}

/// A running PCF and the storage it owns.
pub struct TestApp {
    /// `None` only while restarting.
    app: Option<pcf::App>,
    pub config: pcf::Config,
    storage: Storage,
    /// A directory for the test's own files (keys files, PEMs), kept while the app runs.
    _files: TempDir,
}

impl TestApp {
    /// Embedded mode on a fresh data directory, with the default limits.
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    /// Embedded mode; `tune` adjusts the configuration (limits, keys, ...).
    pub async fn with(tune: impl FnOnce(&mut pcf::Config)) -> Self {
        Self::with_files(|config, _| tune(config)).await
    }

    /// Embedded mode; `tune` also gets the files directory, for keys files.
    pub async fn with_files(tune: impl FnOnce(&mut pcf::Config, &Path)) -> Self {
        let dir = tempfile::tempdir().expect("a data directory");
        let files = tempfile::tempdir().expect("a files directory");
        let mut config = base_config(dir.path());
        tune(&mut config, files.path());
        let app = pcf::build(&config).await.expect("building the app");
        Self {
            app: Some(app),
            config,
            storage: Storage::Sqlite(dir),
            _files: files,
        }
    }

    /// The PostgreSQL event store on a fresh database.
    pub async fn postgres() -> Self {
        Self::postgres_with(|_| {}).await
    }

    /// The PostgreSQL event store on a fresh database; `tune` adjusts the configuration.
    pub async fn postgres_with(tune: impl FnOnce(&mut pcf::Config)) -> Self {
        let db = TestDb::create().await;
        let files = tempfile::tempdir().expect("a files directory");
        let mut config = pcf::Config {
            database_url: Some(db.url.clone()),
            read_database_urls: vec![db.url.clone()],
            ..base_config(files.path())
        };
        tune(&mut config);
        let app = match pcf::build(&config).await {
            Ok(app) => app,
            Err(e) => {
                db.drop_db().await;
                panic!("building the app on PostgreSQL: {e:#}");
            }
        };
        Self {
            app: Some(app),
            config,
            storage: Storage::Postgres(db),
            _files: files,
        }
    }

    pub fn app(&self) -> &pcf::App {
        self.app.as_ref().expect("the app is running")
    }

    pub fn router(&self) -> axum::Router {
        self.app().router.clone()
    }

    /// The test database, on PostgreSQL.
    pub fn db(&self) -> Option<&TestDb> {
        match &self.storage {
            Storage::Postgres(db) => Some(db),
            Storage::Sqlite(_) => None,
        }
    }

    /// A second, independent PCF process on the same storage (another API instance).
    pub async fn another_instance(&self) -> pcf::App {
        pcf::build(&self.config)
            .await
            .expect("building another instance")
    }

    /// Stops the app and starts a new one on the same storage, as after a restart.
    pub async fn restart(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
        self.app = Some(pcf::build(&self.config).await.expect("rebuilding the app"));
    }

    /// Stops the app and removes its storage.
    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            if tokio::time::timeout(Duration::from_secs(10), app.shutdown())
                .await
                .is_err()
            {
                eprintln!("the app did not stop within 10 s");
            }
        }
        match self.storage {
            Storage::Sqlite(dir) => drop(dir),
            Storage::Postgres(db) => db.drop_db().await,
        }
    }

    /// Sends one `POST /graphql`.
    pub async fn send(&self, gql: Gql) -> Resp {
        gql.send(&self.app().router).await
    }

    /// Sends any request through the router.
    pub async fn send_request(&self, request: Request<Body>) -> Resp {
        send(&self.app().router, request).await
    }

    /// `GET path`, without credentials.
    pub async fn get(&self, path: &str) -> Resp {
        let request = Request::get(path).body(Body::empty()).expect("a request");
        self.send_request(request).await
    }

    /// One operation with a token (anonymous when `None`).
    pub async fn gql(&self, token: Option<&str>, query: &str, variables: Value) -> Resp {
        self.send(Gql::vars(query, variables).bearer_opt(token))
            .await
    }

    /// One operation as an admin.
    pub async fn admin_gql(&self, query: &str, variables: Value) -> Resp {
        self.send(Gql::vars(query, variables).by_admin()).await
    }

    /// `createUser(input, commandId)` as the bearer of `token` (anonymously when `None`).
    pub async fn sign_up(
        &self,
        token: Option<&str>,
        input: Value,
        command_id: Option<&str>,
    ) -> Resp {
        let variables = json!({ "input": input, "commandId": command_id });
        self.gql(token, CREATE_USER, variables).await
    }

    /// `user(id)` as the bearer of `token`.
    pub async fn user_as(&self, token: &str, id: Uuid) -> Resp {
        self.gql(Some(token), USER, json!({ "id": id })).await
    }

    /// `userByEmail(email)` as the bearer of `token`.
    pub async fn user_by_email_as(&self, token: &str, email: &str) -> Resp {
        self.gql(Some(token), USER_BY_EMAIL, json!({ "email": email }))
            .await
    }

    /// `updateProfile(id, input)` as the bearer of `token`.
    pub async fn update_profile_as(&self, token: &str, id: Uuid, input: Value) -> Resp {
        let variables = json!({ "id": id, "input": input });
        self.gql(Some(token), UPDATE_PROFILE, variables).await
    }

    /// `changeEmail(id, email)` as the bearer of `token`.
    pub async fn change_email_as(&self, token: &str, id: Uuid, email: &str) -> Resp {
        let variables = json!({ "id": id, "email": email });
        self.gql(Some(token), CHANGE_EMAIL, variables).await
    }

    /// `deleteAccount(id)` as the bearer of `token`.
    pub async fn delete_account_as(&self, token: &str, id: Uuid) -> Resp {
        self.gql(Some(token), DELETE_ACCOUNT, json!({ "id": id }))
            .await
    }

    /// Signs up (anonymously, as anyone may), waits until the views have the new user, and
    /// returns its id and the mutation's payload.
    pub async fn create_user(&self, email: &str, display_name: &str) -> (Uuid, Value) {
        let (id, payload) = self.create_user_unsettled(email, display_name).await;
        let version = payload["version"].as_i64().expect("a version");
        self.settle(id, version).await;
        (id, payload)
    }

    /// Signs up without waiting for the views.
    pub async fn create_user_unsettled(&self, email: &str, display_name: &str) -> (Uuid, Value) {
        let input = json!({ "email": email, "displayName": display_name });
        let r = self.sign_up(None, input, None).await;
        let payload = r.ok()["createUser"].clone();
        let id = payload["user"]["id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_else(|| panic!("no user id in {}", r.text));
        (id, payload)
    }

    /// Waits until the views have `id` at `version`: `user(minVersion)` run as an admin on
    /// the schema itself, so that it passes no credentials check and counts against no rate
    /// limit.
    pub async fn settle(&self, id: Uuid, version: i64) {
        let response = self
            .as_admin(USER, json!({ "id": id, "minVersion": version }))
            .await;
        assert!(
            response["user"]["version"].as_i64() >= Some(version),
            "{response}"
        );
    }

    /// Runs an operation on the schema as an admin, beside HTTP (no authentication, no rate
    /// limit); panics on errors and returns `data`.
    pub async fn as_admin(&self, query: &str, variables: Value) -> Value {
        let principal = Principal {
            subject: Some("harness-admin".into()),
            roles: [AccessRole::Admin].into_iter().collect(),
            tier: Tier::Standard,
        };
        let request = async_graphql::Request::new(query)
            .variables(async_graphql::Variables::from_json(variables))
            .data(principal);
        let response = self.app().schema.execute(request).await;
        assert!(response.errors.is_empty(), "{:?}", response.errors);
        response.data.into_json().expect("data as JSON")
    }

    /// The user's events, in sequence order, from the event store, opened with the app's
    /// keys as a reader allowed personal data reads them (a deleted user's erased); panics
    /// if any does not open.
    pub async fn user_events(&self, id: Uuid) -> Vec<EventEnvelope> {
        opened(&self.app().keys, self.stored_user_events(id).await).await
    }

    /// The user's events, in sequence order, as the event store holds them: personal fields
    /// sealed.
    pub async fn stored_user_events(&self, id: Uuid) -> Vec<EventEnvelope> {
        self.app()
            .store
            .user_events(id, 0)
            .await
            .expect("reading the user's events")
    }

    /// Every committed event, as the relay reads the log, opened with the app's keys (see
    /// `user_events`).
    pub async fn all_events(&self) -> Vec<EventEnvelope> {
        opened(&self.app().keys, self.stored_events().await).await
    }

    /// Every committed event, as the relay reads the log: personal fields sealed. On
    /// PostgreSQL the log is readable up to the oldest transaction still running anywhere on
    /// the server (other tests' too), so this waits, bounded, until the readable log holds
    /// every committed event.
    pub async fn stored_events(&self) -> Vec<EventEnvelope> {
        let committed = self.count_events(None).await;
        wait_until(
            Duration::from_secs(20),
            "the log to show every committed event",
            || async move {
                let events = self.read_log(None).await;
                if events.len() >= committed {
                    Ok(events)
                } else {
                    Err(format!("{} of {committed} readable", events.len()))
                }
            },
        )
        .await
    }

    async fn read_log(&self, event_type: Option<&str>) -> Vec<EventEnvelope> {
        let query = LogQuery {
            types: event_type.map(|t| vec![t.to_owned()]).unwrap_or_default(),
            limit: 1_000_000,
            ..LogQuery::default()
        };
        self.app()
            .store
            .read(&query)
            .await
            .expect("reading the log")
    }

    /// How many events of this type (all types when `None`) the log holds, committed ones
    /// only, counted without waiting for the relay's visibility horizon.
    pub async fn count_events(&self, event_type: Option<&str>) -> usize {
        match &self.storage {
            Storage::Postgres(db) => {
                let (n,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM events WHERE $1::text IS NULL OR event_type = $1",
                )
                .bind(event_type)
                .fetch_one(&db.pool)
                .await
                .expect("counting events");
                n as usize
            }
            // SQLite has one writer: everything committed is readable.
            Storage::Sqlite(_) => self.read_log(event_type).await.len(),
        }
    }

    /// How many events the log shows its readers, once it shows every committed one.
    pub async fn event_count(&self) -> usize {
        self.stored_events().await.len()
    }

    /// Every event through the `events` query (paging with `after`), as `token` sees them.
    pub async fn events_via_api(&self, token: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let r = self
                .gql(Some(token), EVENTS, json!({ "first": 500, "after": after }))
                .await;
            let data = r.ok();
            let edges = data["events"]["edges"].as_array().expect("edges").clone();
            for e in &edges {
                out.push(e["node"].clone());
            }
            if !data["events"]["pageInfo"]["hasNextPage"]
                .as_bool()
                .unwrap_or(false)
            {
                return out;
            }
            after = edges
                .last()
                .and_then(|e| e["cursor"].as_str())
                .map(str::to_owned);
        }
    }
}

impl Teardown for TestApp {
    async fn teardown(self) {
        self.stop().await;
    }
}

/// `events` with their personal data opened by `keys`, as a reader allowed it sees them: the
/// fields of version 1 back in the payload, or `"erased": true` for a deleted user. Panics if
/// any does not open.
pub async fn opened(keys: &Keys, mut events: Vec<EventEnvelope>) -> Vec<EventEnvelope> {
    let unopened = keys
        .open(&mut events)
        .await
        .expect("opening the events' personal data");
    assert!(
        unopened.is_empty(),
        "events that did not open: {unopened:?}"
    );
    events
}

/// The payload fields that carry no personal data, by event type, in the stored (sealed)
/// form of version 2.
fn sealed_fields(event_type: &str) -> &'static [&'static str] {
    match event_type {
        "UserCreated" => &["userId", "occurredAt", SEALED],
        "ProfileUpdated" | "EmailChanged" => &["occurredAt", SEALED],
        "AccountDeleted" => &["occurredAt", "keyDestroyedAt"],
        other => panic!("an unknown event type {other}"),
    }
}

/// Asserts that `events`, as stored or published, hold no personal data in plain text: each
/// is of event version 2, its payload has exactly the fields of the sealed form (personal
/// fields only inside `sealed`, a non-empty string), and none of `plain` (the personal values
/// the test wrote, compared without letter case) appears anywhere in the envelope.
pub fn assert_sealed(events: &[EventEnvelope], plain: &[&str]) {
    assert!(!events.is_empty(), "no events to check");
    for e in events {
        let envelope = serde_json::to_string(e).expect("an envelope as JSON");
        assert_eq!(e.event_version, SEALED_VERSION, "{envelope}");
        let mut fields: Vec<&str> = e
            .payload
            .as_object()
            .unwrap_or_else(|| panic!("a payload that is no object: {envelope}"))
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        let mut want = sealed_fields(&e.event_type).to_vec();
        want.sort_unstable();
        assert_eq!(fields, want, "{envelope}");
        if let Some(sealed) = e.payload.get(SEALED) {
            assert!(sealed.as_str().is_some_and(|s| !s.is_empty()), "{envelope}");
        }
        let lower = envelope.to_lowercase();
        for value in plain {
            assert!(
                !lower.contains(&value.to_lowercase()),
                "{value:?} in plain text in {envelope}"
            );
        }
    }
}
