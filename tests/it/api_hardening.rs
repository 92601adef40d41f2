//! Hardening of `POST /graphql`: depth, alias and complexity limits (400
//! `QUERY_TOO_COMPLEX`), batches and malformed JSON (400 `BAD_REQUEST`), the body limit (413),
//! a refused request runs no resolver, variables that do not fit are refused alike before
//! and after their document ran once, and production mode hides the schema (no
//! introspection, no field suggestions, no GraphiQL).

use crate::support::*;
use axum::http::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A query whose deepest path has exactly `depth` fields (`__schema`, `types`, `ofType`…,
/// `name`); introspection types nest without end.
fn deep_query(depth: usize) -> String {
    assert!(depth >= 3);
    let mut q = String::from("{ __schema { types { ");
    for _ in 0..depth - 3 {
        q.push_str("ofType { ");
    }
    q.push_str("name");
    for _ in 0..depth - 3 {
        q.push_str(" }");
    }
    q.push_str(" } } }");
    q
}

/// A query with `n` aliased fields.
fn aliased_query(n: usize) -> String {
    let fields: Vec<String> = (0..n).map(|i| format!("a{i}: __typename")).collect();
    format!("{{ {} }}", fields.join(" "))
}

#[track_caller]
fn too_complex(r: &Resp, what: &str) {
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.text);
    assert!(!r.codes().is_empty(), "{what}: {}", r.text);
    assert!(
        r.codes().iter().all(|c| c == "QUERY_TOO_COMPLEX"),
        "{what}: {}",
        r.text
    );
    assert!(r.data().is_null(), "{what}: {}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_16_deep_is_too_complex_and_15_deep_is_not() {
    let api = TestApp::start().await;
    assert_eq!(api.config.max_depth, 15);
    let r = api.send(Gql::new(&deep_query(16)).bearer(&admin())).await;
    too_complex(&r, "16 deep");
    let r = api.send(Gql::new(&deep_query(15)).bearer(&admin())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(!r.has_errors(), "15 deep was refused: {}", r.text);
    assert!(r.data()["__schema"]["types"].is_array(), "{}", r.text);
    // Depth through fragments counts too.
    let q = format!("{{ ...F }} fragment F on Query {}", deep_query(16));
    let r = api.send(Gql::new(&q).bearer(&admin())).await;
    too_complex(&r, "16 deep through a fragment");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_aliases_are_too_complex_and_fifteen_are_not() {
    let api = TestApp::start().await;
    assert_eq!(api.config.max_aliases, 15);
    let r = api.send(Gql::new(&aliased_query(15))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(!r.has_errors(), "15 aliases were refused: {}", r.text);
    assert_eq!(r.data()["a14"], "Query");
    let r = api.send(Gql::new(&aliased_query(16))).await;
    too_complex(&r, "16 aliases");
    // Aliases hidden in fragments and nested selections count too.
    let q = "{ ...F u: user(id: \"x\") { a: id b: email c: displayName d: bio e: version } } \
             fragment F on Query { f: __typename g: __typename h: __typename i: __typename \
             j: __typename k: __typename l: __typename m: __typename n: __typename \
             o: __typename p: __typename }";
    let r = api.send(Gql::new(q).bearer(&admin())).await;
    too_complex(&r, "16 aliases across a fragment and a nested selection");
    api.stop().await;
}

/// `User` fields spread `width^levels` times through nested fragments.
fn fragment_bomb(levels: usize, width: usize) -> String {
    let mut doc = String::from(
        "query { users(first: 100) { edges { node { ...F0 } } } }\n\
         fragment F1 on User { id email displayName bio avatarUrl createdAt updatedAt version }\n",
    );
    let spreads = |name: String| vec![format!("...{name}"); width].join(" ");
    for level in 2..=levels + 1 {
        doc.push_str(&format!(
            "fragment F{level} on User {{ {} }}\n",
            spreads(format!("F{}", level - 1))
        ));
    }
    doc.push_str(&format!("fragment F0 on User {{ ...F{} }}\n", levels + 1));
    doc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complexity_bomb_is_too_complex() {
    let api = TestApp::start().await;
    assert_eq!(api.config.max_complexity, 1000);
    // Many fields: 1200 selections in a user page.
    let fields =
        vec!["id email displayName bio avatarUrl createdAt updatedAt version"; 150].join(" ");
    let q = format!("{{ users(first: 100) {{ edges {{ node {{ {fields} }} }} }} }}");
    let r = api.send(Gql::new(&q).bearer(&admin())).await;
    too_complex(&r, "1200 fields");
    // A small document that inlines to 8 * 12 * 12 = 1152 fields per node.
    let r = api
        .send(Gql::new(&fragment_bomb(2, 12)).bearer(&admin()))
        .await;
    too_complex(&r, "fragment bomb 8x12x12");
    // Below the limit it runs (the control).
    let r = api
        .send(Gql::new(&fragment_bomb(1, 10)).bearer(&admin()))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(!r.has_errors(), "{}", r.text);
    // Repeated unaliased fields count too.
    let q = format!("{{ {} }}", vec!["projections { name }"; 501].join(" "));
    let r = api.send(Gql::new(&q).bearer(&admin())).await;
    too_complex(&r, "501 x projections { name }");
    api.stop().await;
}

/// An exponential fragment bomb: an anonymous request of under 1 KB whose fragments inline
/// to 8 * 10^8 fields. It must be refused quickly, not validated field by field while a core
/// spins (validation is synchronous: `request_timeout` cannot interrupt it, and the worker
/// thread serves nothing else meanwhile).
#[test]
fn an_exponential_fragment_bomb_is_refused_quickly() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = runtime.block_on(async {
        let api = TestApp::start().await;
        let doc = fragment_bomb(8, 10);
        assert!(doc.len() < 2000, "{}", doc.len());
        let router = api.router();
        let started = Instant::now();
        let call = tokio::spawn(async move { send(&router, Gql::new(&doc).request()).await });
        let outcome = tokio::time::timeout(Duration::from_secs(20), call).await;
        (
            outcome.map(|r| r.expect("the request task")),
            started.elapsed(),
        )
    });
    // Do not wait for a validation that may never end.
    runtime.shutdown_background();
    match outcome {
        (Ok(r), elapsed) => {
            too_complex(&r, "exponential fragment bomb");
            assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        }
        (Err(_), elapsed) => panic!(
            "a {}-byte fragment bomb got no answer within {elapsed:?}",
            fragment_bomb(8, 10).len()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_query_runs_no_resolver() {
    let api = TestApp::start().await;
    let create =
        "createUser(input: {email: \"bomb@example.com\", displayName: \"Bomb\"}) { version }";
    let aliases: Vec<String> = (0..16).map(|i| format!("a{i}: __typename")).collect();
    let over_aliases = format!("mutation {{ {create} {} }}", aliases.join(" "));
    let r = api.send(Gql::new(&over_aliases)).await;
    too_complex(&r, "mutation with 16 aliases");

    let many =
        vec!["id email displayName bio avatarUrl createdAt updatedAt version"; 130].join(" ");
    let over_complexity = format!(
        "mutation {{ createUser(input: {{email: \"bomb@example.com\", displayName: \"Bomb\"}}) \
         {{ version user {{ {many} }} }} }}"
    );
    let r = api.send(Gql::new(&over_complexity)).await;
    too_complex(&r, "mutation over the complexity limit");

    let bomb = format!(
        "mutation {{ createUser(input: {{email: \"bomb@example.com\", displayName: \"Bomb\"}}) \
         {{ user {{ ...F0 }} }} }}\n{}",
        fragment_bomb(2, 12).split_once('\n').unwrap().1
    );
    let r = api.send(Gql::new(&bomb)).await;
    too_complex(&r, "mutation with a fragment bomb");

    // Syntax and validation errors also run nothing.
    for q in [
        format!("mutation {{ {create} nope }}"),
        format!("mutation {{ {create} "),
    ] {
        let r = api.send(Gql::new(&q)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    }
    // A batch whose first operation is a sign-up.
    let batch = json!([
        { "query": format!("mutation {{ {create} }}") },
        { "query": "{ __typename }" }
    ]);
    let r = api.send(Gql::raw(batch.to_string())).await;
    r.expect_refused(StatusCode::BAD_REQUEST, "BAD_REQUEST");

    assert_eq!(api.event_count().await, 0, "a refused request appended");
    // The same sign-up alone works (the control).
    let r = api
        .send(Gql::new(&format!("mutation {{ {create} }}")))
        .await;
    r.ok();
    assert_eq!(api.event_count().await, 1);
    api.stop().await;
}

/// Posts each of `bodies` as it is, and asserts each is refused with 400 `BAD_REQUEST`.
async fn assert_bad_requests<B: Into<Vec<u8>>>(api: &TestApp, bodies: impl IntoIterator<Item = B>) {
    for body in bodies {
        let body = body.into();
        let case = format!("{:?}", String::from_utf8_lossy(&body));
        let r = api.send(Gql::raw(body)).await;
        r.expect_refused_in(case, StatusCode::BAD_REQUEST, "BAD_REQUEST");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_refused() {
    let api = TestApp::start().await;
    let typename = json!({ "query": "{ __typename }" });
    let batches = [json!([typename, typename]), json!([typename]), json!([])];
    assert_bad_requests(&api, batches.map(|b| b.to_string())).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mebibyte_body_is_payload_too_large() {
    let api = TestApp::start().await;
    assert_eq!(api.config.body_limit, 64 * 1024);
    let padding = "x".repeat(1024 * 1024);
    let body = json!({ "query": "{ __typename }", "variables": { "pad": padding } }).to_string();
    let r = api.send(Gql::raw(body)).await;
    r.expect_refused(StatusCode::PAYLOAD_TOO_LARGE, "BAD_REQUEST");
    // Streamed, without a Content-Length.
    let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> = (0..16)
        .map(|_| Ok(axum::body::Bytes::from(vec![b' '; 64 * 1024])))
        .collect();
    let mut request = axum::http::Request::post("/graphql")
        .header("content-type", "application/json")
        .body(axum::body::Body::from_stream(futures::stream::iter(chunks)))
        .unwrap();
    request.extensions_mut().insert(axum::extract::ConnectInfo(
        DEFAULT_PEER.parse::<std::net::SocketAddr>().unwrap(),
    ));
    let r = api.send_request(request).await;
    r.expect_refused(StatusCode::PAYLOAD_TOO_LARGE, "BAD_REQUEST");
    // Not JSON at all, still 413 (the size is checked first).
    let r = api.send(Gql::raw(vec![b'{'; 1024 * 1024])).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    // Just over the limit, and just under it (the control).
    let over = json!({ "query": "{ __typename }", "variables": { "pad": "y".repeat(64 * 1024) } });
    let r = api.send(Gql::raw(over.to_string())).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    let under = json!({ "query": "{ __typename }", "variables": { "pad": "y".repeat(60 * 1024) } });
    let r = api.send(Gql::raw(under.to_string())).await;
    r.ok();
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_a_bad_request() {
    let api = TestApp::start().await;
    assert_bad_requests(
        &api,
        [
            "{\"query\": ",
            "{\"query\": \"{ __typename }\"",
            "not json",
            "",
            "\u{0}\u{1}\u{2}",
            "{\"query\": \"{ __typename }\"}}",
        ],
    )
    .await;
    // Invalid UTF-8.
    assert_bad_requests(&api, [vec![b'{', b'"', 0xff, 0xfe, b'"', b'}']]).await;
    // JSON, but not a GraphQL request.
    assert_bad_requests(&api, ["42", "\"{ __typename }\"", "{\"query\": 5}", "null"]).await;
    api.stop().await;
}

/// A document that ran once skips the validation rules that cannot fail again; variables
/// that do not fit it must still be refused as they were before it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_that_do_not_fit_are_refused_alike_before_and_after_their_document_ran() {
    let api = TestApp::start().await;
    let (id, _) = api.create_user("known@example.com", "Known").await;
    // `first` is `Int! = 20`: a nullable variable may stand there, but not a null.
    let users = "query($first: Int) { users(first: $first) { edges { node { id } } } }";
    let documents = [
        (
            USER,
            json!({ "id": id, "minVersion": 1 }),
            vec![
                json!({}),
                json!({ "id": null }),
                json!({ "id": true }),
                json!({ "id": 1.5 }),
                json!({ "id": [id] }),
                json!({ "id": { "id": id } }),
                json!({ "id": id, "minVersion": "1" }),
                json!({ "id": id, "minVersion": 1.5 }),
                json!({ "id": id, "minVersion": [1] }),
            ],
        ),
        (
            users,
            json!({ "first": 5 }),
            vec![json!({ "first": null }), json!({ "first": "5" })],
        ),
    ];
    for (query, good, bad) in documents {
        let send =
            |variables: &Value| api.send(Gql::vars(query, variables.clone()).bearer(&admin()));
        let mut before = Vec::new();
        for variables in &bad {
            let r = send(variables).await;
            assert!(r.has_errors(), "{variables}: {}", r.text);
            before.push((r.status, r.body));
        }
        for _ in 0..2 {
            let r = send(&good).await;
            assert!(!r.ok().is_null(), "{}", r.text);
        }
        for (variables, (status, body)) in bad.iter().zip(before) {
            let r = send(variables).await;
            assert_eq!((r.status, &r.body), (status, &body), "{variables}");
        }
    }
    // A document that never passed goes on failing as it did.
    let wrong = "query($id: ID!) { user(id: $id) { id nope } }";
    let first = api
        .send(Gql::vars(wrong, json!({ "id": id })).bearer(&admin()))
        .await;
    first.expect_refused(StatusCode::BAD_REQUEST, "BAD_REQUEST");
    let again = api
        .send(Gql::vars(wrong, json!({ "id": id })).bearer(&admin()))
        .await;
    assert_eq!((again.status, again.body), (first.status, first.body));
    api.stop().await;
}

/// The key-encryption key of the production apps here (base64 of 32 bytes).
const PRODUCTION_KEK: &str = "cGNmLWludGVncmF0aW9uLXRlc3RzLWtlay0zMi1ieXQ=";

/// An embedded app in production mode, with the key-encryption key production requires.
async fn production() -> TestApp {
    TestApp::with(|c| {
        c.environment = pcf::config::Environment::Production;
        c.kek = Some(PRODUCTION_KEK.to_owned());
    })
    .await
}

/// Runs `test` on a development app and a production app, to compare, and stops both.
async fn on_dev_and_prod(test: impl AsyncFnOnce(&TestApp, &TestApp)) {
    let apps = (TestApp::start().await, production().await);
    run(apps, async |(dev, prod): &mut (TestApp, TestApp)| {
        test(dev, prod).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_has_no_introspection() {
    on_dev_and_prod(async |dev, prod| {
        for q in [
            "{ __schema { types { name } } }",
            "{ __type(name: \"User\") { fields { name } } }",
            "{ __schema { queryType { fields { name } } } }",
        ] {
            // The control: development answers.
            let r = dev.send(Gql::new(q).bearer(&admin())).await;
            r.ok();
            let r = prod.send(Gql::new(q).bearer(&admin())).await;
            // Either refused, or answered with nothing: no schema information at all.
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let data = r.data();
            assert!(
                data.is_null() || (data["__schema"].is_null() && data["__type"].is_null()),
                "production introspected: {}",
                r.text
            );
            for leak in ["UserConnection", "displayName", "CreateUserInput"] {
                assert!(!r.text.contains(leak), "{leak} leaked: {}", r.text);
            }
        }
        // `__typename` is not introspection and still answers.
        prod.send(Gql::new("{ __typename }")).await.ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_makes_no_field_suggestions() {
    on_dev_and_prod(async |dev, prod| {
        let queries = [
            "{ userz(id: \"x\") { id } }",
            "{ user(id: \"x\") { emails } }",
            "{ events { edges { node { evenType } } } }",
            "mutation { createUsr(input: {email: \"a@b.co\", displayName: \"A\"}) { version } }",
        ];
        for q in queries {
            let r = dev.send(Gql::new(q).bearer(&admin())).await;
            assert!(
                r.text.contains("Did you mean"),
                "the control: development suggests: {}",
                r.text
            );
            let r = prod.send(Gql::new(q).bearer(&admin())).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
            assert!(r.has_errors(), "{}", r.text);
            assert!(
                !r.text.to_lowercase().contains("did you mean"),
                "production suggested: {}",
                r.text
            );
        }
        // Wrong argument names are not suggested either.
        let r = prod
            .send(Gql::new("{ user(idd: \"x\") { id } }").bearer(&admin()))
            .await;
        assert!(r.has_errors());
        assert!(
            !r.text.to_lowercase().contains("did you mean"),
            "{}",
            r.text
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_serves_no_graphiql() {
    on_dev_and_prod(async |dev, prod| {
        let r = dev.get("/graphiql").await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "the control: development serves GraphiQL"
        );
        assert!(r.text.to_lowercase().contains("graphiql"));
        let r = prod.get("/graphiql").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
        assert!(!r.text.to_lowercase().contains("graphiql"), "{}", r.text);
        // GET /graphql is no playground either.
        let r = prod.get("/graphql").await;
        assert_ne!(r.status, StatusCode::OK, "{}", r.text);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_does_not_start_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = pcf::Config {
        data_dir: dir.path().to_path_buf(),
        environment: pcf::config::Environment::Production,
        ..Default::default()
    };
    let Err(e) = pcf::build(&config).await else {
        panic!("production started without a JWT secret or public key");
    };
    assert!(format!("{e:#}").contains("PCF_JWT_SECRET"), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_configurable() {
    let api = TestApp::with(|c| {
        c.max_depth = 5;
        c.max_aliases = 2;
        c.max_complexity = 20;
        c.body_limit = 1024;
    })
    .await;
    too_complex(
        &api.send(Gql::new(&deep_query(6)).bearer(&admin())).await,
        "6 deep",
    );
    api.send(Gql::new(&deep_query(5)).bearer(&admin()))
        .await
        .ok();
    too_complex(&api.send(Gql::new(&aliased_query(3))).await, "3 aliases");
    api.send(Gql::new(&aliased_query(2))).await.ok();
    let q = format!("{{ {} }}", ["projections { name }"; 11].join(" "));
    too_complex(
        &api.send(Gql::new(&q).bearer(&admin())).await,
        "11 x projections { name }",
    );
    let q = format!("{{ {} }}", ["projections { name }"; 10].join(" "));
    api.send(Gql::new(&q).bearer(&admin())).await.ok();
    let body = json!({ "query": "{ __typename }", "variables": { "p": "z".repeat(1100) } });
    let r = api.send(Gql::raw(body.to_string())).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    let _: Value = api.send(Gql::new("{ __typename }")).await.ok().clone();
    api.stop().await;
}

/// `POST /graphql` with `content_type` (none when `None`) and a `createUser` body.
fn sign_up_as(content_type: Option<&str>, email: &str) -> axum::http::Request<axum::body::Body> {
    let mut builder = axum::http::Request::post("/graphql");
    if let Some(ct) = content_type {
        builder = builder.header(axum::http::header::CONTENT_TYPE, ct);
    }
    let body = json!({ "query": CREATE_USER,
        "variables": { "input": { "email": email, "displayName": "Simple" } } });
    let mut request = builder
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    request.extensions_mut().insert(axum::extract::ConnectInfo(
        DEFAULT_PEER.parse::<std::net::SocketAddr>().unwrap(),
    ));
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_json_content_types_run_so_a_cross_site_simple_request_cannot_sign_up() {
    let api = TestApp::start().await;
    let refused = [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonp"),
        None,
    ];
    for (i, ct) in refused.iter().enumerate() {
        let r = api
            .send_request(sign_up_as(*ct, &format!("simple{i}@example.com")))
            .await;
        r.expect_refused(StatusCode::UNSUPPORTED_MEDIA_TYPE, "BAD_REQUEST");
    }
    assert_eq!(
        api.event_count().await,
        0,
        "a refused request signed someone up"
    );
    for (i, ct) in [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/graphql-response+json",
    ]
    .iter()
    .enumerate()
    {
        let r = api
            .send_request(sign_up_as(Some(ct), &format!("json{i}@example.com")))
            .await;
        assert!(!r.has_errors(), "{ct}: {}", r.text);
    }
    assert_eq!(api.event_count().await, 4);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_repeatable_directive_written_twice_is_a_validation_error() {
    let api = TestApp::start().await;
    for q in [
        "{ __typename @include(if: true) @include(if: false) }",
        "{ __typename @skip(if: false) @skip(if: false) }",
        "{ ...F } fragment F on Query { __typename @include(if: true) @include(if: true) }",
    ] {
        let r = api.send(Gql::new(q).bearer(&admin())).await;
        r.expect_refused(StatusCode::BAD_REQUEST, "BAD_REQUEST");
        assert!(r.text.contains("only be used once"), "{q}: {}", r.text);
        assert!(r.data().is_null(), "{q}: {}", r.text);
    }
    // Each once is fine.
    let r = api
        .send(Gql::new("{ __typename @include(if: true) @skip(if: false) }").bearer(&admin()))
        .await;
    assert_eq!(r.ok()["__typename"], "Query");
    api.stop().await;
}

// One thread, so that the test's log subscriber sees the server's events.
#[tokio::test]
async fn refused_credentials_are_rate_limited_and_logged_only_as_a_bounded_excerpt() {
    let log = CapturedLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let api = TestApp::with(|c| c.rate_limits.failed_auth = 5).await;
    let attack = format!("{} x", "A".repeat(60_000));
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let r = api
            .send(Gql::new("{ __typename }").auth(Auth::Raw(attack.clone())))
            .await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
        }
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses[..5], [401; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    // A valid token from another address still gets through.
    let r = api
        .send(
            Gql::new("{ __typename }")
                .bearer(&admin())
                .peer("198.51.100.7:1"),
        )
        .await;
    assert_eq!(r.ok()["__typename"], "Query");
    api.stop().await;

    let text = log.text();
    assert!(text.contains("credentials refused"), "{text}");
    let longest = text.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1000, "a log line of {longest} bytes");
    assert!(
        !text.contains(&"A".repeat(100)),
        "the log quotes the attacker's text"
    );
    assert!(
        text.len() < 64 * 1024,
        "{} bytes of log for 40 requests",
        text.len()
    );
}

mod slow_clients {
    //! Clients that are slow to send, or send nothing, on a real socket.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn limits(max_connections: usize) -> pcf::http::server::ConnectionLimits {
        pcf::http::server::ConnectionLimits {
            max_connections,
            header_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_millis(800),
        }
    }

    /// Reads until the server closes the connection; what it sent, or `None` if it did not
    /// close within `wait`.
    async fn until_closed(stream: &mut TcpStream, wait: Duration) -> Option<String> {
        let mut out = Vec::new();
        let read = async {
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(wait, read).await.ok()?;
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    const REQUEST: &str = "POST /graphql HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 26\r\n\r\n{\"query\":\"{ __typename }\"}";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_and_trickling_clients_are_cut_off_at_the_head_deadline() {
        let api = TestApp::start().await;
        let server = Server::start_with(api.router(), limits(16)).await;

        // Nothing at all.
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let started = Instant::now();
        assert!(
            until_closed(&mut silent, Duration::from_secs(5))
                .await
                .is_some(),
            "a silent connection stayed open"
        );
        assert!(started.elapsed() >= Duration::from_millis(400));

        // A header line every 200 ms, for up to 5 s: still cut at the head deadline.
        let mut trickle = TcpStream::connect(server.addr).await.unwrap();
        trickle
            .write_all(b"POST /graphql HTTP/1.1\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let mut closed = false;
        for i in 0..25 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if trickle
                .write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                closed = true;
                break;
            }
            let mut probe = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1), trickle.read(&mut probe)).await
            {
                closed = true;
                break;
            }
        }
        assert!(closed, "a trickling head kept its connection for 5 s");
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(server);
        api.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_that_does_not_arrive_gets_408_and_idle_connections_are_closed() {
        let api = TestApp::with(|c| c.body_timeout = Duration::from_millis(500)).await;
        let server = Server::start_with(api.router(), limits(16)).await;

        // Content-Length 100, 8 bytes sent.
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"POST /graphql HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"query\"").await.unwrap();
        let answer = until_closed(&mut slow, Duration::from_secs(5))
            .await
            .expect("the slow body's connection stayed open");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

        // A kept-alive connection that goes quiet after its request.
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        idle.write_all(REQUEST.as_bytes()).await.unwrap();
        let answer = until_closed(&mut idle, Duration::from_secs(5))
            .await
            .expect("an idle kept-alive connection stayed open");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\"__typename\":\"Query\""), "{answer}");
        drop(server);
        api.stop().await;
    }

    /// At most `max_connections` at once, with deadlines far longer than a test waits.
    fn patient_limits(max_connections: usize) -> pcf::http::server::ConnectionLimits {
        pcf::http::server::ConnectionLimits {
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            ..limits(max_connections)
        }
    }

    /// Connects and sends [`REQUEST`]; asserts no answer comes within 700 ms (`what` says
    /// which connection was served too early). Returns the connection, still waiting.
    async fn request_left_waiting(server: &Server, what: &str) -> TcpStream {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(REQUEST.as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(700), stream.read(&mut buf)).await;
        assert!(early.is_err(), "{what} was served");
        stream
    }

    /// Asserts the waiting connection `stream` is answered 200 within 5 s.
    async fn assert_served(stream: &mut TcpStream) {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the waiting connection was not served")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_over_the_cap_wait_until_one_ends() {
        let api = TestApp::start().await;
        let server = Server::start_with(api.router(), patient_limits(2)).await;
        let first = TcpStream::connect(server.addr).await.unwrap();
        let _second = TcpStream::connect(server.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The third is not served while two are open...
        let mut third = request_left_waiting(&server, "a connection over the cap").await;
        // ...and is once one of them ends.
        drop(first);
        assert_served(&mut third).await;
        drop(server);
        api.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_websocket_keeps_its_place_under_the_connection_cap() {
        let api = TestApp::start().await;
        let server = Server::start_with(api.router(), patient_limits(1)).await;
        let ws = WsClient::authenticated(&server, &auditor()).await;
        // While the websocket is open, the one place is taken...
        let mut next = request_left_waiting(&server, "a connection beside an open websocket").await;
        // ...and free once it closes.
        ws.close().await;
        assert_served(&mut next).await;
        drop(server);
        api.stop().await;
    }
}
