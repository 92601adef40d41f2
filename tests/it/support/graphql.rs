//! The GraphQL client of the tests, in process: requests go through the app's router with
//! `tower::ServiceExt::oneshot` (the client's address set as axum's `ConnectInfo`), and come
//! back as a [`Resp`]. The operations the tests send are here too, written once.

use super::auth::admin;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use tower::ServiceExt;
use uuid::Uuid;

/// The client address requests come from unless a test says otherwise.
pub const DEFAULT_PEER: &str = "192.0.2.10:40000";

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

pub const USERS: &str = "query($first: Int! = 20, $after: String, $filter: UserFilter) {
  users(first: $first, after: $after, filter: $filter) {
    edges { cursor node { id email displayName bio avatarUrl version } }
    pageInfo { hasNextPage endCursor }
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

/// The fields of an event's envelope besides `metadata` and `payload` (CONTRACT.md).
pub const ENVELOPE_FIELDS: [&str; 8] = [
    "eventId",
    "aggregateType",
    "aggregateId",
    "sequence",
    "position",
    "eventType",
    "eventVersion",
    "recordedAt",
];

/// Each command on the account `id`, with valid input: a new display name, a new email, the
/// deletion.
pub fn changes_of(
    id: impl Serialize + Copy,
    display_name: &str,
    email: &str,
) -> [(&'static str, Value); 3] {
    [
        (
            UPDATE_PROFILE,
            json!({ "id": id, "input": { "displayName": display_name } }),
        ),
        (CHANGE_EMAIL, json!({ "id": id, "email": email })),
        (DELETE_ACCOUNT, json!({ "id": id })),
    ]
}

/// The position before every event (a valid `after` for "from the start").
pub const START: &str = "00000000000000000000000000000000";

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

/// A request body: a GraphQL request or raw bytes.
#[derive(Clone, Debug)]
pub enum Payload {
    Json(Value),
    Raw(Vec<u8>),
}

/// One `POST /graphql`.
#[derive(Clone, Debug)]
pub struct Gql {
    pub body: Payload,
    pub auth: Auth,
    pub peer: Option<SocketAddr>,
    pub headers: Vec<(String, String)>,
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

    /// As the bearer of `token`, or anonymously when `None`.
    pub fn bearer_opt(self, token: Option<&str>) -> Self {
        match token {
            Some(t) => self.bearer(t),
            None => self,
        }
    }

    /// As an admin, who may run every command and query.
    pub fn by_admin(self) -> Self {
        self.bearer(&admin())
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

    /// Sends the request through `router`.
    pub async fn send(&self, router: &axum::Router) -> Resp {
        send(router, self.request()).await
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

/// `extensions.code` of the first error in a GraphQL response body.
pub fn error_code(body: &Value) -> Option<&str> {
    body["errors"][0]["extensions"]["code"].as_str()
}

/// `extensions.field` of the first error in a GraphQL response body.
pub fn error_field(body: &Value) -> Option<&str> {
    body["errors"][0]["extensions"]["field"].as_str()
}

/// Every error's `extensions.code` in a GraphQL response body.
pub fn error_codes(body: &Value) -> Vec<String> {
    body["errors"]
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

/// Asserts HTTP 200 and exactly one error, with `code`.
#[track_caller]
pub fn expect_error(status: StatusCode, body: &Value, code: &str) {
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(error_codes(body), vec![code.to_owned()], "{body}");
}

impl Resp {
    /// Every error's `extensions.code`.
    pub fn codes(&self) -> Vec<String> {
        error_codes(&self.body)
    }

    pub fn has_errors(&self) -> bool {
        self.body
            .get("errors")
            .and_then(Value::as_array)
            .is_some_and(|e| !e.is_empty())
    }

    /// The value of the header `name`, or `""` when it is absent or not text.
    pub fn header(&self, name: impl header::AsHeaderName) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn data(&self) -> &Value {
        &self.body["data"]
    }

    /// The body, which must be JSON.
    #[track_caller]
    pub fn json(&self) -> &Value {
        if self.body.is_null() && self.text.trim() != "null" {
            panic!("the response is not JSON: {}", self.text);
        }
        &self.body
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
        expect_error(self.status, &self.body, code);
    }

    /// Asserts HTTP 200 and exactly one error with `code`; a failure names `case`.
    #[track_caller]
    pub fn expect_error_in(&self, case: impl std::fmt::Display, code: &str) {
        assert_eq!(self.status, StatusCode::OK, "{case}: {}", self.text);
        assert_eq!(self.codes(), vec![code.to_owned()], "{case}: {}", self.text);
    }

    /// Asserts an HTTP error status with one error of `code`.
    #[track_caller]
    pub fn expect_refused(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.codes(), vec![code.to_owned()], "{}", self.text);
    }

    /// Asserts an HTTP error status with one error of `code`; a failure names `case`.
    #[track_caller]
    pub fn expect_refused_in(&self, case: impl std::fmt::Display, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{case}: {}", self.text);
        assert_eq!(self.codes(), vec![code.to_owned()], "{case}: {}", self.text);
    }
}

/// Sends a request through `router` (the one place a test request reaches a router).
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

/// `GET path` as an admin.
pub async fn get(router: &axum::Router, path: &str) -> Resp {
    let request = Request::get(path)
        .header(header::AUTHORIZATION, format!("Bearer {}", admin()))
        .body(Body::empty())
        .expect("a request");
    send(router, request).await
}

/// One operation as an admin.
pub async fn admin_gql(router: &axum::Router, query: &str, variables: Value) -> Resp {
    Gql::vars(query, variables).by_admin().send(router).await
}

/// One operation as an admin that must succeed; its `data`.
pub async fn gql(router: &axum::Router, query: &str, variables: Value) -> Value {
    admin_gql(router, query, variables).await.ok().clone()
}

/// One operation as an admin; `Ok(data)`, or `Err(body)` when it answered errors.
pub async fn try_gql(router: &axum::Router, query: &str, variables: Value) -> Result<Value, Value> {
    let r = admin_gql(router, query, variables).await;
    if r.status == StatusCode::OK && !r.has_errors() {
        Ok(r.data().clone())
    } else {
        Err(r.body)
    }
}

/// The user ids on a page of `users` (its `data`), in order.
pub fn listed_ids(data: &Value) -> Vec<Uuid> {
    let edges = data["users"]["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("no users page in {data}"));
    edges.iter().map(|e| uuid_of(&e["node"]["id"])).collect()
}

/// The user id in a mutation's payload.
pub fn id_of(payload: &Value) -> Uuid {
    uuid_of(&payload["user"]["id"])
}

/// The version in a mutation's payload.
pub fn version_of(payload: &Value) -> i64 {
    payload["version"]
        .as_i64()
        .unwrap_or_else(|| panic!("no version in {payload}"))
}

pub fn uuid_of(v: &Value) -> Uuid {
    Uuid::parse_str(v.as_str().unwrap_or_else(|| panic!("{v} is not a string")))
        .unwrap_or_else(|e| panic!("{v} is not a UUID: {e}"))
}

/// Sends `n` operations as an admin all at once, the `i`th with `variables(i)` through
/// `routers[i % routers.len()]`; returns the responses in that order.
pub async fn admin_gql_at_once(
    routers: &[axum::Router],
    n: usize,
    query: &'static str,
    variables: impl Fn(usize) -> Value,
) -> Vec<Resp> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let router = routers[i % routers.len()].clone();
            let vars = variables(i);
            tokio::spawn(async move { admin_gql(&router, query, vars).await })
        })
        .collect();
    let mut responses = Vec::with_capacity(n);
    for task in tasks {
        responses.push(task.await.expect("request task"));
    }
    responses
}

/// Creates a user as an admin; returns its id.
pub async fn create_user(router: &axum::Router, email: &str, display_name: &str) -> Uuid {
    let data = gql(
        router,
        CREATE_USER,
        json!({ "input": { "email": email, "displayName": display_name } }),
    )
    .await;
    assert_eq!(data["createUser"]["version"], 1, "{data}");
    id_of(&data["createUser"])
}

/// Creates `n` users as an admin, the `i`th with the email and display name `person(i)`;
/// returns their ids in order.
pub async fn create_users(
    router: &axum::Router,
    n: usize,
    person: impl Fn(usize) -> (String, String),
) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let (email, display_name) = person(i);
        ids.push(create_user(router, &email, &display_name).await);
    }
    ids
}

/// Updates a profile as an admin; returns the new version.
pub async fn update_profile(router: &axum::Router, id: Uuid, input: Value) -> i64 {
    let data = gql(router, UPDATE_PROFILE, json!({ "id": id, "input": input })).await;
    version_of(&data["updateProfile"])
}

/// Changes an email as an admin; returns the new version.
pub async fn change_email(router: &axum::Router, id: Uuid, email: &str) -> i64 {
    let data = gql(router, CHANGE_EMAIL, json!({ "id": id, "email": email })).await;
    version_of(&data["changeEmail"])
}

/// Deletes an account as an admin; returns the new version.
pub async fn delete_account(router: &axum::Router, id: Uuid) -> i64 {
    let data = gql(router, DELETE_ACCOUNT, json!({ "id": id })).await;
    version_of(&data["deleteAccount"])
}

/// `user(id, minVersion)` as an admin: the user object, or null.
pub async fn user(router: &axum::Router, id: Uuid, min_version: Option<i64>) -> Value {
    gql(router, USER, json!({ "id": id, "minVersion": min_version })).await["user"].clone()
}
