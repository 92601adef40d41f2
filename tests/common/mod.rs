//! The harness of the end-to-end tests: a whole PCF (`pcf::build`) on a fresh SQLite data
//! directory or a fresh PostgreSQL database, driven through its router without a socket.
//!
//! Each scenario is written once as `async fn scenario(app: &TestApp)` and instantiated for
//! both backends with [`on_both_backends!`]; the generated tests clean up (shut the app down,
//! drop the database) even when the scenario panics.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use pcf_domain::ports::LogQuery;
use pcf_domain::EventEnvelope;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use std::future::Future;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tower::ServiceExt;
use uuid::Uuid;

/// How long `minVersion` waits in tests: short, so `STALE_READ` answers come quickly.
pub const CONSISTENCY_TIMEOUT: Duration = Duration::from_secs(2);

/// The JWT secret every test app verifies tokens with.
pub const JWT_SECRET: &str = "pcf-integration-tests-secret";

/// A token with the `admin` role, which may run every command and query.
pub fn admin_token() -> String {
    pcf::http::auth::mint(
        JWT_SECRET,
        "test-admin",
        &[pcf_domain::auth::AccessRole::Admin],
        None,
        Duration::from_secs(3600),
    )
    .expect("minting an admin token")
}

/// The configuration every test app starts from: short consistency waits, a known secret.
pub fn base_config() -> pcf::Config {
    pcf::Config {
        consistency_timeout: CONSISTENCY_TIMEOUT,
        jwt_secret: Some(JWT_SECRET.to_owned()),
        ..Default::default()
    }
}

/// The server PostgreSQL tests create their databases on.
pub fn admin_url() -> String {
    std::env::var("PCF_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// A PostgreSQL database of its own, created for one test and dropped by [`TestDb::drop_db`].
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// A small pool of the test's own, for looking at the tables directly.
    pub pool: PgPool,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("pcf_test_{}", Uuid::new_v4().simple());
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("connecting to {admin}: {e}"));
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        let _ = conn.close().await;
        let url = with_database(&admin, &name);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        Self { name, url, pool }
    }

    /// Drops the database, disconnecting whoever is still connected (the apps' pools and
    /// listeners).
    pub async fn drop_db(self) {
        self.pool.close().await;
        let admin = admin_url();
        match PgConnection::connect(&admin).await {
            Ok(mut conn) => {
                let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
                if let Err(e) = sqlx::query(&sql).execute(&mut conn).await {
                    eprintln!("could not drop test database {}: {e}", self.name);
                }
                let _ = conn.close().await;
            }
            Err(e) => eprintln!("could not drop test database {}: {e}", self.name),
        }
    }
}

/// The storage behind a test app.
pub enum Backend {
    Sqlite(TempDir),
    Postgres(TestDb),
}

/// A running PCF and the storage it owns.
pub struct TestApp {
    /// `None` only while restarting.
    app: Option<pcf::App>,
    pub config: pcf::Config,
    backend: Backend,
}

impl TestApp {
    /// Embedded mode on a fresh data directory.
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temporary data directory");
        let config = pcf::Config {
            data_dir: dir.path().to_path_buf(),
            ..base_config()
        };
        let app = pcf::build(&config)
            .await
            .expect("building the app on SQLite");
        Self {
            app: Some(app),
            config,
            backend: Backend::Sqlite(dir),
        }
    }

    /// The PostgreSQL event store on a fresh database.
    pub async fn postgres() -> Self {
        let db = TestDb::create().await;
        let config = pcf::Config {
            database_url: Some(db.url.clone()),
            read_database_urls: vec![db.url.clone()],
            ..base_config()
        };
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
            backend: Backend::Postgres(db),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The test database, on PostgreSQL.
    pub fn db(&self) -> Option<&TestDb> {
        match &self.backend {
            Backend::Postgres(db) => Some(db),
            Backend::Sqlite(_) => None,
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

    /// The running app.
    pub fn app(&self) -> &pcf::App {
        self.app.as_ref().expect("the app is running")
    }

    /// Stops the app and removes its storage.
    pub async fn cleanup(self) {
        let Self { app, backend, .. } = self;
        if let Some(app) = app {
            let stopped = tokio::time::timeout(Duration::from_secs(10), app.shutdown()).await;
            if stopped.is_err() {
                eprintln!("the app did not shut down within 10 s");
            }
        }
        match backend {
            Backend::Sqlite(dir) => drop(dir),
            Backend::Postgres(db) => db.drop_db().await,
        }
    }

    pub fn router(&self) -> axum::Router {
        self.app().router.clone()
    }

    /// Executes one GraphQL operation through `POST /graphql`, as an admin.
    pub async fn gql(&self, query: &str, variables: Value) -> (StatusCode, Value) {
        gql_on(&self.app().router, query, variables).await
    }

    /// Executes one GraphQL operation with the given bearer token (anonymously if `None`).
    pub async fn gql_as(
        &self,
        token: Option<&str>,
        query: &str,
        variables: Value,
    ) -> (StatusCode, Value) {
        gql_as_on(&self.app().router, token, query, variables).await
    }

    /// Sends any request through the router.
    pub async fn send(&self, request: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
        send_on(&self.app().router, request).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, HeaderMap, String) {
        let request = Request::get(path).body(Body::empty()).expect("a request");
        let (status, headers, body) = self.send(request).await;
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    /// `POST /graphql` with a body taken as is.
    pub async fn post_graphql_raw(&self, body: impl Into<Body>) -> (StatusCode, Vec<u8>) {
        let request = Request::post("/graphql")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {}", admin_token()))
            .body(body.into())
            .expect("a request");
        let (status, _, body) = self.send(request).await;
        (status, body)
    }

    /// Creates a user and returns the mutation's payload; panics unless it succeeded.
    pub async fn create_user(&self, email: &str, display_name: &str) -> Value {
        let (status, body) = self
            .gql(
                CREATE_USER,
                json!({ "input": { "email": email, "displayName": display_name } }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.get("errors").is_none(), "createUser failed: {body}");
        body["data"]["createUser"].clone()
    }

    /// The user's events, in sequence order, straight from the event store.
    pub async fn user_events(&self, id: Uuid) -> Vec<EventEnvelope> {
        self.app()
            .store
            .user_events(id, 0)
            .await
            .expect("reading the user's events")
    }

    /// How many events of this type (all types when `None`) the log holds, committed ones
    /// only, counted without waiting for the relay's visibility horizon.
    pub async fn count_events(&self, event_type: Option<&str>) -> usize {
        match &self.backend {
            Backend::Postgres(db) => {
                let (n,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM events WHERE $1::text IS NULL OR event_type = $1",
                )
                .bind(event_type)
                .fetch_one(&db.pool)
                .await
                .expect("counting events");
                n as usize
            }
            Backend::Sqlite(_) => {
                // SQLite has one writer: everything committed is readable.
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
                    .len()
            }
        }
    }
}

/// Executes one GraphQL operation through `POST /graphql` on `router`, as an admin.
pub async fn gql_on(router: &axum::Router, query: &str, variables: Value) -> (StatusCode, Value) {
    gql_as_on(router, Some(&admin_token()), query, variables).await
}

/// Executes one GraphQL operation on `router` with a bearer token (anonymously if `None`).
pub async fn gql_as_on(
    router: &axum::Router,
    token: Option<&str>,
    query: &str,
    variables: Value,
) -> (StatusCode, Value) {
    let body = json!({ "query": query, "variables": variables }).to_string();
    let mut request = Request::post("/graphql").header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Body::from(body)).expect("a request");
    let (status, _, bytes) = send_on(router, request).await;
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "the response is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, value)
}

pub async fn send_on(
    router: &axum::Router,
    request: Request<Body>,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("reading the body")
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

/// Runs `f` on its own task (so that concurrent requests really run in parallel).
pub fn spawn<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(f)
}

/// The `extensions.code` of the first error, if any.
pub fn error_code(body: &Value) -> Option<&str> {
    body["errors"][0]["extensions"]["code"].as_str()
}

/// The `extensions.field` of the first error, if any.
pub fn error_field(body: &Value) -> Option<&str> {
    body["errors"][0]["extensions"]["field"].as_str()
}

/// Asserts the response is one error with `code` and returns the body.
pub fn expect_error(status: StatusCode, body: &Value, code: &str) {
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(error_code(body), Some(code), "{body}");
    assert_eq!(body["errors"].as_array().map(Vec::len), Some(1), "{body}");
}

pub fn id_of(payload: &Value) -> Uuid {
    let id = payload["user"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no user id in {payload}"));
    Uuid::parse_str(id).expect("a user id is a UUID")
}

pub fn version_of(payload: &Value) -> i64 {
    payload["version"]
        .as_i64()
        .unwrap_or_else(|| panic!("no version in {payload}"))
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const USER_FIELDS: &str = "id email displayName bio avatarUrl createdAt updatedAt version";

pub const CREATE_USER: &str = "mutation($input: CreateUserInput!, $commandId: ID) {
  createUser(input: $input, commandId: $commandId) {
    version position user { id email displayName bio avatarUrl createdAt updatedAt version }
  }
}";

pub const UPDATE_PROFILE: &str =
    "mutation($id: ID!, $input: UpdateProfileInput!, $expectedVersion: Int, $commandId: ID) {
  updateProfile(id: $id, input: $input, expectedVersion: $expectedVersion, commandId: $commandId) {
    version position user { id email displayName bio avatarUrl createdAt updatedAt version }
  }
}";

pub const CHANGE_EMAIL: &str =
    "mutation($id: ID!, $email: String!, $expectedVersion: Int, $commandId: ID) {
  changeEmail(id: $id, email: $email, expectedVersion: $expectedVersion, commandId: $commandId) {
    version position user { id email displayName bio avatarUrl createdAt updatedAt version }
  }
}";

pub const DELETE_ACCOUNT: &str = "mutation($id: ID!, $expectedVersion: Int, $commandId: ID) {
  deleteAccount(id: $id, expectedVersion: $expectedVersion, commandId: $commandId) {
    id version position
  }
}";

pub const USER: &str = "query($id: ID!, $minVersion: Int) {
  user(id: $id, minVersion: $minVersion) { id email displayName bio avatarUrl createdAt updatedAt version }
}";

pub const USER_BY_EMAIL: &str = "query($email: String!) {
  userByEmail(email: $email) { id email displayName bio avatarUrl createdAt updatedAt version }
}";

/// Instantiates each scenario `async fn name(app: &TestApp)` as two tests, `name::sqlite`
/// and `name::postgres`, each on a fresh backend that is cleaned up afterwards. Attributes
/// written before a name (such as `#[ignore = "why"]`) go on both tests.
#[macro_export]
macro_rules! on_both_backends {
    ($($(#[$attr:meta])* $scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            $(#[$attr])*
            async fn sqlite() {
                $crate::run_scenario!($crate::common::TestApp::sqlite().await, super::$scenario);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            $(#[$attr])*
            async fn postgres() {
                $crate::run_scenario!($crate::common::TestApp::postgres().await, super::$scenario);
            }
        }
    )*};
}

/// Like [`on_both_backends!`] for scenarios that take `&mut TestApp` (to restart it).
#[macro_export]
macro_rules! on_both_backends_mut {
    ($($(#[$attr:meta])* $scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            $(#[$attr])*
            async fn sqlite() {
                $crate::run_scenario!(mut $crate::common::TestApp::sqlite().await, super::$scenario);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            $(#[$attr])*
            async fn postgres() {
                $crate::run_scenario!(mut $crate::common::TestApp::postgres().await, super::$scenario);
            }
        }
    )*};
}

/// Instantiates each scenario for PostgreSQL only, as `name::postgres`.
#[macro_export]
macro_rules! on_postgres {
    ($($(#[$attr:meta])* $scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            $(#[$attr])*
            async fn postgres() {
                $crate::run_scenario!($crate::common::TestApp::postgres().await, super::$scenario);
            }
        }
    )*};
}

/// Runs a scenario on `app`, cleans up, then re-raises the scenario's panic if it had one.
#[macro_export]
macro_rules! run_scenario {
    (mut $app:expr, $scenario:path) => {{
        use futures::FutureExt as _;
        let mut app = $app;
        let outcome = std::panic::AssertUnwindSafe($scenario(&mut app))
            .catch_unwind()
            .await;
        app.cleanup().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }};
    ($app:expr, $scenario:path) => {{
        use futures::FutureExt as _;
        let app = $app;
        let outcome = std::panic::AssertUnwindSafe($scenario(&app))
            .catch_unwind()
            .await;
        app.cleanup().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }};
}
