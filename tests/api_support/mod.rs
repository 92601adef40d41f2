//! The harness of the API safety tests (`tests/api_*.rs`): a whole embedded PCF
//! (`pcf::build`) on a fresh SQLite data directory (or a fresh PostgreSQL database), driven
//! through its router without a socket (`tower::ServiceExt::oneshot`, with the client's
//! address set as axum's `ConnectInfo`), or served on a loopback socket for the
//! graphql-transport-ws tests.
#![allow(dead_code)]

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, Request, StatusCode};
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use pcf_domain::auth::AccessRole;
use pcf_domain::ports::LogQuery;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceExt;
use uuid::Uuid;

/// The HS256 secret every test app verifies tokens with.
pub const SECRET: &str = "pcf-api-safety-tests-secret-of-256-bits";

/// The client address requests come from unless a test says otherwise.
pub const DEFAULT_PEER: &str = "192.0.2.10:40000";

/// Every field of `User`.
pub const USER_FIELDS: &str = "id email displayName bio avatarUrl createdAt updatedAt version";

pub const CREATE_USER: &str = "mutation($input: CreateUserInput!, $commandId: ID) {
  createUser(input: $input, commandId: $commandId) {
    version position user { id email displayName bio avatarUrl createdAt updatedAt version }
  }
}";

pub const UPDATE_PROFILE: &str = "mutation($id: ID!, $input: UpdateProfileInput!, $commandId: ID) {
  updateProfile(id: $id, input: $input, commandId: $commandId) {
    version position user { id email displayName bio avatarUrl createdAt updatedAt version }
  }
}";

pub const CHANGE_EMAIL: &str = "mutation($id: ID!, $email: String!, $commandId: ID) {
  changeEmail(id: $id, email: $email, commandId: $commandId) {
    version position user { id email displayName bio avatarUrl createdAt updatedAt version }
  }
}";

pub const DELETE_ACCOUNT: &str = "mutation($id: ID!, $commandId: ID) {
  deleteAccount(id: $id, commandId: $commandId) { id version position }
}";

pub const USER: &str = "query($id: ID!, $minVersion: Int) {
  user(id: $id, minVersion: $minVersion) { id email displayName bio avatarUrl createdAt updatedAt version }
}";

pub const USER_BY_EMAIL: &str = "query($email: String!) {
  userByEmail(email: $email) { id email displayName bio avatarUrl createdAt updatedAt version }
}";

pub const USERS: &str = "query($first: Int! = 20, $after: String, $filter: UserFilter) {
  users(first: $first, after: $after, filter: $filter) {
    edges { cursor node { id email displayName bio avatarUrl version } }
    pageInfo { hasNextPage }
  }
}";

pub const EVENTS: &str =
    "query($aggregateId: ID, $after: String, $first: Int! = 50, $types: [String!]) {
  events(aggregateId: $aggregateId, after: $after, first: $first, types: $types) {
    edges { cursor node {
      eventId aggregateType aggregateId sequence position eventType eventVersion recordedAt
      metadata { correlationId causationId commandId actor }
      payload
    } }
    pageInfo { hasNextPage }
  }
}";

pub const PROJECTIONS: &str = "{ projections { name generation building lag } }";

/// The position before every event (a valid `after` for "from the start").
pub const START: &str = "00000000000000000000000000000000";

// ---------------------------------------------------------------------------------------------
// Tokens and credentials
// ---------------------------------------------------------------------------------------------

fn roles_of(names: &[&str]) -> Vec<AccessRole> {
    names
        .iter()
        .map(|r| AccessRole::parse(r).unwrap_or_else(|| panic!("unknown role {r}")))
        .collect()
}

/// An HS256 token signed with [`SECRET`], valid for an hour.
pub fn token(sub: &str, roles: &[&str]) -> String {
    token_with_tier(sub, roles, None)
}

pub fn token_with_tier(sub: &str, roles: &[&str], tier: Option<&str>) -> String {
    pcf::http::auth::mint(
        SECRET,
        sub,
        &roles_of(roles),
        tier,
        Duration::from_secs(3600),
    )
    .expect("minting a token")
}

/// An HS256 token signed with [`SECRET`] carrying exactly `claims`.
pub fn token_with_claims(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("signing a token")
}

pub fn admin() -> String {
    token("test-admin", &["admin"])
}

pub fn auditor() -> String {
    token("test-auditor", &["auditor"])
}

pub fn analytics() -> String {
    token("test-analytics", &["analytics"])
}

/// The token of the end user `id` (no roles).
pub fn owner(id: Uuid) -> String {
    token(&id.to_string(), &[])
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
}

/// Base64url without padding (RFC 7515), for hand-made tokens.
pub fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = chunk.len() + 1;
        for i in 0..symbols {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Hex SHA-256, as the API keys file holds it.
pub fn sha256_hex(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// How a request authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    Anonymous,
    Bearer(String),
    /// `x-api-key: <key>`.
    ApiKeyHeader(String),
    /// Any `Authorization` value, as is.
    Raw(String),
}

/// One `POST /graphql`.
#[derive(Clone, Debug)]
pub struct Gql {
    pub body: Payload,
    pub auth: Auth,
    pub peer: Option<SocketAddr>,
    pub headers: Vec<(String, String)>,
}

/// A request body: a GraphQL request or raw bytes.
#[derive(Clone, Debug)]
pub enum Payload {
    Json(Value),
    Raw(Vec<u8>),
}

impl Gql {
    pub fn new(query: &str) -> Self {
        Self::vars(query, json!({}))
    }

    pub fn vars(query: &str, variables: Value) -> Self {
        Self {
            body: Payload::Json(json!({ "query": query, "variables": variables })),
            auth: Auth::Anonymous,
            peer: Some(DEFAULT_PEER.parse().expect("an address")),
            headers: Vec::new(),
        }
    }

    pub fn raw(body: impl Into<Vec<u8>>) -> Self {
        Self {
            body: Payload::Raw(body.into()),
            ..Self::new("")
        }
    }

    pub fn bearer(mut self, token: &str) -> Self {
        self.auth = Auth::Bearer(token.to_owned());
        self
    }

    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// The client's address as the server sees the TCP peer.
    pub fn peer(mut self, addr: &str) -> Self {
        self.peer = Some(addr.parse().expect("a socket address"));
        self
    }

    pub fn no_peer(mut self) -> Self {
        self.peer = None;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn request(&self) -> Request<Body> {
        let mut builder =
            Request::post("/graphql").header(header::CONTENT_TYPE, "application/json");
        match &self.auth {
            Auth::Anonymous => {}
            Auth::Bearer(t) => {
                builder = builder.header(header::AUTHORIZATION, format!("Bearer {t}"))
            }
            Auth::ApiKeyHeader(k) => builder = builder.header("x-api-key", k.as_str()),
            Auth::Raw(v) => builder = builder.header(header::AUTHORIZATION, v.as_str()),
        }
        for (k, v) in &self.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let body = match &self.body {
            Payload::Json(v) => Body::from(v.to_string()),
            Payload::Raw(b) => Body::from(b.clone()),
        };
        let mut request = builder.body(body).expect("a request");
        if let Some(peer) = self.peer {
            request.extensions_mut().insert(ConnectInfo(peer));
        }
        request
    }
}

/// A response: status, headers and the body as JSON (`Value::Null` when it is not JSON;
/// the raw text is kept).
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    /// `extensions.code` of the first error.
    pub fn code(&self) -> Option<&str> {
        self.body["errors"][0]["extensions"]["code"].as_str()
    }

    /// Every error's `extensions.code`.
    pub fn codes(&self) -> Vec<String> {
        self.body["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| {
                        e["extensions"]["code"]
                            .as_str()
                            .unwrap_or("<none>")
                            .to_owned()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn has_errors(&self) -> bool {
        self.body
            .get("errors")
            .and_then(Value::as_array)
            .is_some_and(|e| !e.is_empty())
    }

    pub fn data(&self) -> &Value {
        &self.body["data"]
    }

    /// Asserts HTTP 200 without errors; returns `data`.
    #[track_caller]
    pub fn ok(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.text);
        assert!(!self.has_errors(), "unexpected errors: {}", self.text);
        &self.body["data"]
    }

    /// Asserts HTTP 200 and exactly one error with `code`.
    #[track_caller]
    pub fn expect_error(&self, code: &str) {
        assert_eq!(self.status, StatusCode::OK, "{}", self.text);
        assert_eq!(self.codes(), vec![code.to_owned()], "{}", self.text);
    }

    /// Asserts an HTTP error status with one error of `code`.
    #[track_caller]
    pub fn expect_refused(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.codes(), vec![code.to_owned()], "{}", self.text);
    }
}

/// Sends a request through `router`.
pub async fn send(router: &axum::Router, request: Request<Body>) -> Resp {
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("reading the body")
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        body,
        text,
    }
}

// ---------------------------------------------------------------------------------------------
// Apps
// ---------------------------------------------------------------------------------------------

/// Where an app keeps its events.
pub enum Storage {
    Sqlite(TempDir),
    Postgres(PgDb),
}

/// A running embedded PCF and its storage.
pub struct Api {
    app: Option<pcf::App>,
    pub config: pcf::Config,
    storage: Option<Storage>,
    /// A directory for the test's own files (keys files, PEMs).
    pub files: TempDir,
}

/// The configuration every test app starts from: SQLite under `dir`, a known secret.
pub fn base_config(dir: &std::path::Path) -> pcf::Config {
    pcf::Config {
        data_dir: dir.to_path_buf(),
        jwt_secret: Some(SECRET.to_owned()),
        consistency_timeout: Duration::from_secs(3),
        ..Default::default()
    }
}

impl Api {
    /// Embedded mode on SQLite with the default limits.
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    /// Embedded mode on SQLite; `tune` adjusts the configuration (limits, keys, ...). The
    /// closure also gets the files directory, for keys files.
    pub async fn with(tune: impl FnOnce(&mut pcf::Config)) -> Self {
        Self::with_files(|config, _| tune(config)).await
    }

    pub async fn with_files(tune: impl FnOnce(&mut pcf::Config, &std::path::Path)) -> Self {
        let dir = tempfile::tempdir().expect("a data directory");
        let files = tempfile::tempdir().expect("a files directory");
        let mut config = base_config(dir.path());
        tune(&mut config, files.path());
        let app = pcf::build(&config).await.expect("building the app");
        Self {
            app: Some(app),
            config,
            storage: Some(Storage::Sqlite(dir)),
            files,
        }
    }

    /// The PostgreSQL event store on a fresh database (in-process bus and views).
    pub async fn postgres() -> Self {
        let db = PgDb::create().await;
        let files = tempfile::tempdir().expect("a files directory");
        let config = pcf::Config {
            database_url: Some(db.url.clone()),
            read_database_urls: vec![db.url.clone()],
            ..base_config(files.path())
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
            storage: Some(Storage::Postgres(db)),
            files,
        }
    }

    pub fn app(&self) -> &pcf::App {
        self.app.as_ref().expect("the app is running")
    }

    pub fn router(&self) -> axum::Router {
        self.app().router.clone()
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.storage, Some(Storage::Postgres(_)))
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
        if let Some(Storage::Postgres(db)) = self.storage.take() {
            db.drop_db().await;
        }
    }

    pub async fn send(&self, gql: Gql) -> Resp {
        send(&self.app().router, gql.request()).await
    }

    pub async fn send_request(&self, request: Request<Body>) -> Resp {
        send(&self.app().router, request).await
    }

    /// One operation with a token (anonymous when `None`).
    pub async fn gql(&self, token: Option<&str>, query: &str, variables: Value) -> Resp {
        let mut gql = Gql::vars(query, variables);
        if let Some(t) = token {
            gql = gql.bearer(t);
        }
        self.send(gql).await
    }

    /// Signs up (anonymously, as anyone may), waits until the views have the new user, and
    /// returns its id and the mutation's payload.
    pub async fn create_user(&self, email: &str, display_name: &str) -> (Uuid, Value) {
        let (id, payload) = self.create_user_unsettled(email, display_name).await;
        let version = payload["version"].as_i64().expect("a version");
        self.settle(id, version).await;
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
        let principal = pcf_domain::auth::Principal {
            subject: Some("harness-admin".into()),
            roles: [AccessRole::Admin].into_iter().collect(),
            tier: pcf_domain::auth::Tier::Standard,
        };
        let request = async_graphql::Request::new(query)
            .variables(async_graphql::Variables::from_json(variables))
            .data(principal);
        let response = self.app().schema.execute(request).await;
        assert!(response.errors.is_empty(), "{:?}", response.errors);
        response.data.into_json().expect("data as JSON")
    }

    /// Signs up without waiting for the views.
    pub async fn create_user_unsettled(&self, email: &str, display_name: &str) -> (Uuid, Value) {
        let r = self
            .gql(
                None,
                CREATE_USER,
                json!({ "input": { "email": email, "displayName": display_name } }),
            )
            .await;
        let payload = r.ok()["createUser"].clone();
        let id = payload["user"]["id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_else(|| panic!("no user id in {}", r.text));
        (id, payload)
    }

    /// Every event in the log, straight from the event store.
    pub async fn all_events(&self) -> Vec<pcf_domain::EventEnvelope> {
        let query = LogQuery {
            limit: 1_000_000,
            ..LogQuery::default()
        };
        self.app()
            .store
            .read(&query)
            .await
            .expect("reading the log")
    }

    /// How many events the log holds.
    pub async fn event_count(&self) -> usize {
        self.all_events().await.len()
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

/// Waits, if need be, until the current fixed one-minute rate-limit window has at least
/// `needed` seconds left, so that a burst of requests falls into one window.
pub async fn fresh_window(needed: u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970");
    let into = now.as_secs() % 60;
    if 60 - into < needed {
        let to_next =
            Duration::from_secs(60 - into) - Duration::from_nanos(now.subsec_nanos().into());
        tokio::time::sleep(to_next + Duration::from_millis(200)).await;
    }
}

/// Runs `f`, catching its panic, so that a test can clean up before failing.
pub async fn caught<F: std::future::Future<Output = ()>>(f: F) -> std::thread::Result<()> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(f).catch_unwind().await
}

/// Fails with the panic `caught` caught, if any.
pub fn rethrow(outcome: std::thread::Result<()>) {
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// A PostgreSQL database of one test, dropped by [`PgDb::drop_db`].
pub struct PgDb {
    pub name: String,
    pub url: String,
}

/// The server PostgreSQL tests create their databases on.
pub fn pg_admin_url() -> String {
    std::env::var("PCF_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority..].find('/') {
        Some(i) => &base[..authority + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

impl PgDb {
    pub async fn create() -> Self {
        use sqlx::Connection;
        let name = format!("pcf_api_test_{}", Uuid::new_v4().simple());
        let admin = pg_admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!("connecting to {admin} (start scripts/services.sh up): {e}")
            });
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        let _ = conn.close().await;
        let url = with_database(&admin, &name);
        Self { name, url }
    }

    pub async fn drop_db(self) {
        use sqlx::Connection;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&pg_admin_url()).await {
            let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
            if let Err(e) = sqlx::query(&sql).execute(&mut conn).await {
                eprintln!("could not drop {}: {e}", self.name);
            }
            let _ = conn.close().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A real socket and graphql-transport-ws
// ---------------------------------------------------------------------------------------------

/// The router served on a loopback port, with the peer address as `ConnectInfo`.
pub struct Server {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves with the default connection limits.
    pub async fn start(router: axum::Router) -> Self {
        let limits = pcf::http::server::ConnectionLimits::from_config(&pcf::Config::default());
        Self::start_with(router, limits).await
    }

    /// Serves with `limits`, as `pcf serve` does.
    pub async fn start_with(
        router: axum::Router,
        limits: pcf::http::server::ConnectionLimits,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let addr = listener.local_addr().expect("the bound address");
        let task = tokio::spawn(async move {
            let _ =
                pcf::http::server::serve(listener, router, limits, std::future::pending()).await;
        });
        Self { addr, task }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/graphql/ws", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a websocket delivered.
#[derive(Debug)]
pub enum WsIn {
    /// A JSON text message.
    Msg(Value),
    /// A close frame (code, reason).
    Closed(u16, String),
    /// The connection ended without a close frame, or failed.
    Gone(String),
    /// Nothing within the wait.
    Silent,
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A graphql-transport-ws client.
pub struct WsClient {
    stream: WsStream,
}

impl WsClient {
    /// Opens `GET /graphql/ws` with the `graphql-transport-ws` subprotocol.
    pub async fn connect(server: &Server) -> Self {
        let mut request = server
            .ws_url()
            .into_client_request()
            .expect("a websocket request");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "graphql-transport-ws".parse().expect("a header value"),
        );
        let (stream, response) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(request),
        )
        .await
        .expect("the websocket handshake timed out")
        .expect("the websocket handshake");
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some("graphql-transport-ws")
        );
        Self { stream }
    }

    pub async fn send(&mut self, message: Value) {
        self.stream
            .send(Message::text(message.to_string()))
            .await
            .expect("sending a websocket message");
    }

    /// Sends, reporting whether the connection took the message.
    pub async fn try_send(&mut self, message: Value) -> bool {
        self.stream
            .send(Message::text(message.to_string()))
            .await
            .is_ok()
    }

    /// The next message (pings are answered and skipped), waiting at most `wait`.
    pub async fn next(&mut self, wait: Duration) -> WsIn {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return WsIn::Silent,
                Ok(None) => return WsIn::Gone("end of stream".into()),
                Ok(Some(Err(e))) => return WsIn::Gone(e.to_string()),
                Ok(Some(Ok(m))) => m,
            };
            match next {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text.as_str()));
                    if value["type"] == "ping" {
                        self.send(json!({ "type": "pong" })).await;
                        continue;
                    }
                    return WsIn::Msg(value);
                }
                Message::Close(frame) => {
                    return match frame {
                        Some(f) => WsIn::Closed(u16::from(f.code), f.reason.as_str().to_owned()),
                        None => WsIn::Closed(1005, String::new()),
                    }
                }
                Message::Binary(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                    continue
                }
            }
        }
    }

    /// Sends `connection_init` with `payload`; the answer (an ack, a close, ...).
    pub async fn init(&mut self, payload: Value) -> WsIn {
        self.send(json!({ "type": "connection_init", "payload": payload }))
            .await;
        self.next(Duration::from_secs(10)).await
    }

    /// Connects and authenticates with a bearer token; panics unless acknowledged.
    pub async fn authenticated(server: &Server, token: &str) -> Self {
        let mut ws = Self::connect(server).await;
        match ws
            .init(json!({ "authorization": format!("Bearer {token}") }))
            .await
        {
            WsIn::Msg(m) if m["type"] == "connection_ack" => ws,
            other => panic!("expected connection_ack, got {other:?}"),
        }
    }

    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        self.send(json!({
            "id": id,
            "type": "subscribe",
            "payload": { "query": query, "variables": variables },
        }))
        .await;
    }

    /// Closes the connection (a close frame, then the socket).
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}
