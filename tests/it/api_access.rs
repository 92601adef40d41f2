//! Who may do what (CONTRACT.md, "Who may do what"): sign-up is open; a user reads and
//! changes only their own account, and someone else's account reads exactly like one that
//! does not exist, and reads only their own `events`; `admin` may do everything; `auditor`
//! reads `events` with personal data, `analytics` without it, and for both a deleted account's
//! personal data is erased; API keys from the keys file carry their roles.

use crate::support::*;
use axum::http::StatusCode;
use pcf_domain::auth::PERSONAL_FIELDS;
use serde_json::{json, Value};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_callers_may_sign_up_and_nothing_else() {
    let api = TestApp::start().await;
    let (id, created) = api.create_user_unsettled("anon@example.com", "Anon").await;
    assert_eq!(created["user"]["email"], "anon@example.com");
    // The event records no actor for an anonymous sign-up.
    assert_eq!(api.event_count().await, 1);

    let reads = [
        (USER, json!({ "id": id })),
        (USER_BY_EMAIL, json!({ "email": "anon@example.com" })),
        (USERS, json!({})),
        (EVENTS, json!({})),
        (PROJECTIONS, json!({})),
    ];
    for (query, vars) in reads {
        let r = api.gql(None, query, vars).await;
        r.expect_error("UNAUTHENTICATED");
        assert!(
            !r.text.contains("anon@example.com"),
            "an anonymous read leaked data: {}",
            r.text
        );
    }

    for (query, vars) in changes_of(id, "Hijacked", "hijacked@example.com") {
        let r = api.gql(None, query, vars.clone()).await;
        r.expect_error_in(&vars, "UNAUTHENTICATED");
    }
    assert_eq!(api.event_count().await, 1, "a refused command appended");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_reads_and_changes_their_own_account() {
    let api = TestApp::start().await;
    let (a, created) = api.create_user("alice@example.com", "Alice").await;
    let alice = owner(a);

    let r = api.user_as(&alice, a).await;
    assert_eq!(r.ok()["user"], created["user"]);
    let r = api.user_by_email_as(&alice, "ALICE@example.com").await;
    assert_eq!(r.ok()["userByEmail"]["id"], a.to_string());

    let input = json!({ "displayName": "Alice B.", "bio": "hello" });
    let r = api.update_profile_as(&alice, a, input).await;
    let updated = &r.ok()["updateProfile"]["user"];
    assert_eq!(updated["displayName"], "Alice B.");
    assert_eq!(updated["bio"], "hello");

    let r = api.change_email_as(&alice, a, "alice.b@example.com").await;
    assert_eq!(
        r.ok()["changeEmail"]["user"]["email"],
        "alice.b@example.com"
    );

    // The events carry the owner as the actor.
    let events = api.all_events().await;
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[2].metadata.actor.as_deref(),
        Some(a.to_string().as_str())
    );

    let r = api.delete_account_as(&alice, a).await;
    assert_eq!(r.ok()["deleteAccount"]["id"], a.to_string());
    assert_eq!(api.event_count().await, 4);
    api.stop().await;
}

/// Signs Alice and Bob up (`alice@example.com`, `bob@example.com`); their ids.
async fn alice_and_bob(api: &TestApp) -> (Uuid, Uuid) {
    let (a, _) = api.create_user("alice@example.com", "Alice").await;
    let (b, _) = api.create_user("bob@example.com", "Bob").await;
    (a, b)
}

/// Asserts the read of someone else's account answers `{ field: null }` exactly as the read
/// of an account that does not exist (`of_nobody`).
#[track_caller]
fn assert_reads_as_missing(of_other: &Resp, of_nobody: &Resp, field: &str) {
    assert_eq!(of_other.status, StatusCode::OK, "{}", of_other.text);
    let null = json!({ "data": { field: null } });
    assert_eq!(of_other.body, null, "{}", of_other.text);
    assert_eq!(of_other.status, of_nobody.status);
    assert_eq!(of_other.body, of_nobody.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_account_reads_exactly_like_one_that_does_not_exist() {
    let api = TestApp::start().await;
    let (a, b) = alice_and_bob(&api).await;
    let alice = owner(a);

    let of_b = api.user_as(&alice, b).await;
    let of_nobody = api.user_as(&alice, Uuid::new_v4()).await;
    assert_reads_as_missing(&of_b, &of_nobody, "user");

    // Waiting for a version of someone else's account also answers at once, with null.
    let started = std::time::Instant::now();
    for (id, min_version) in [(b, 1), (b, 99), (Uuid::new_v4(), 99)] {
        let vars = json!({ "id": id, "minVersion": min_version });
        let r = api.gql(Some(&alice), USER, vars.clone()).await;
        let null = json!({ "data": { "user": null } });
        assert_eq!(r.body, null, "{vars}: {}", r.text);
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(2));

    let by_email_b = api.user_by_email_as(&alice, "bob@example.com").await;
    let by_email_nobody = api.user_by_email_as(&alice, "nobody@example.com").await;
    assert_reads_as_missing(&by_email_b, &by_email_nobody, "userByEmail");

    // Roles that are not admin do not open other accounts either.
    for t in [auditor(), analytics()] {
        let r = api.user_as(&t, b).await;
        assert_eq!(r.body, json!({ "data": { "user": null } }), "{}", r.text);
    }
    // The subject `b` itself does see it (the test can fail).
    let r = api.user_as(&owner(b), b).await;
    assert_eq!(r.ok()["user"]["email"], "bob@example.com");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_another_users_account_is_forbidden_and_appends_nothing() {
    let api = TestApp::start().await;
    let (a, _) = api.create_user("alice@example.com", "Alice").await;
    let (b, b_created) = api.create_user("bob@example.com", "Bob").await;
    let before = api.all_events().await;

    let callers = [
        ("user A", owner(a)),
        ("auditor", auditor()),
        ("analytics", analytics()),
        ("a service without roles", token("svc", &[])),
    ];
    for (who, t) in &callers {
        for target in [b, Uuid::new_v4()] {
            for (query, vars) in changes_of(target, "Mallory", "mallory@example.com") {
                let r = api.gql(Some(t), query, vars.clone()).await;
                assert_eq!(r.codes(), vec!["FORBIDDEN"], "{who}, {vars}: {}", r.text);
                assert!(r.data().is_null(), "{who}, {vars}: {}", r.text);
            }
        }
    }
    assert_eq!(
        api.all_events().await,
        before,
        "a forbidden command appended"
    );
    // B is unchanged and the email is still B's.
    let r = api.user_as(&owner(b), b).await;
    assert_eq!(r.ok()["user"], b_created["user"]);
    api.create_user_unsettled("mallory@example.com", "M").await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_may_do_everything() {
    let api = TestApp::start().await;
    let (a, b) = alice_and_bob(&api).await;
    let admin = admin();

    let r = api.user_as(&admin, b).await;
    assert_eq!(r.ok()["user"]["email"], "bob@example.com");
    let r = api.user_by_email_as(&admin, "alice@example.com").await;
    assert_eq!(r.ok()["userByEmail"]["id"], a.to_string());

    let r = api.gql(Some(&admin), USERS, json!({ "first": 10 })).await;
    assert_eq!(listed_ids(r.ok()), vec![a, b]);

    let r = api.gql(Some(&admin), PROJECTIONS, json!({})).await;
    assert!(r.ok()["projections"].is_array(), "{}", r.text);

    let r = api.gql(Some(&admin), EVENTS, json!({})).await;
    let edges = r.ok()["events"]["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 2);
    assert_eq!(edges[0]["node"]["payload"]["email"], "alice@example.com");

    let r = api
        .update_profile_as(&admin, b, json!({ "displayName": "Bobby" }))
        .await;
    assert_eq!(r.ok()["updateProfile"]["user"]["displayName"], "Bobby");
    let r = api.change_email_as(&admin, b, "bobby@example.com").await;
    assert_eq!(r.ok()["changeEmail"]["user"]["email"], "bobby@example.com");
    let r = api.delete_account_as(&admin, b).await;
    assert_eq!(r.ok()["deleteAccount"]["id"], b.to_string());
    let events = api.all_events().await;
    assert_eq!(events.len(), 5);
    assert_eq!(events[4].event_type, "AccountDeleted");
    assert_eq!(events[4].metadata.actor.as_deref(), Some("test-admin"));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_users_and_projections_needs_admin() {
    let api = TestApp::start().await;
    let (a, _) = api.create_user("alice@example.com", "Alice").await;
    for (who, t) in [
        ("user", owner(a)),
        ("auditor", auditor()),
        ("analytics", analytics()),
    ] {
        for query in [USERS, PROJECTIONS] {
            let r = api.gql(Some(&t), query, json!({})).await;
            assert_eq!(r.status, StatusCode::OK, "{who}: {}", r.text);
            assert_eq!(r.codes(), vec!["FORBIDDEN"], "{who}: {}", r.text);
            assert!(!r.text.contains("alice@example.com"), "{who}: {}", r.text);
        }
    }
    api.stop().await;
}

/// Carol, who changes every personal field and her email; Erin, who signs up, writes a bio
/// and deletes her account; Dave, who signs up. Returns Carol's and Erin's ids.
async fn users_with_history(api: &TestApp) -> (Uuid, Uuid) {
    let (a, _) = api.create_user("carol@example.com", "Carol").await;
    let carol = owner(a);
    let input = json!({
        "displayName": "Carol C.", "bio": "about me", "avatarUrl": "https://img.example.com/c.png"
    });
    api.update_profile_as(&carol, a, input).await.ok();
    api.change_email_as(&carol, a, "carol.c@example.com")
        .await
        .ok();
    let (e, _) = api.create_user("erin@example.com", "Erin").await;
    let erin = owner(e);
    let input = json!({ "bio": "erased bio", "avatarUrl": "https://img.example.com/e.png" });
    api.update_profile_as(&erin, e, input).await.ok();
    api.delete_account_as(&erin, e).await.ok();
    let (_, _) = api.create_user("dave@example.com", "Dave").await;
    (a, e)
}

/// The event types of `users_with_history`, in log order.
const HISTORY_TYPES: [&str; 7] = [
    "UserCreated",
    "ProfileUpdated",
    "EmailChanged",
    "UserCreated",
    "ProfileUpdated",
    "AccountDeleted",
    "UserCreated",
];

/// What of Erin (deleted) no reader may see any more.
const ERINS_DATA: [&str; 4] = [
    "erin@example.com",
    "Erin",
    "erased bio",
    "img.example.com/e",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditors_read_events_with_personal_data() {
    let api = TestApp::start().await;
    let (carol, erin) = users_with_history(&api).await;
    let events = api.events_via_api(&auditor()).await;
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(types, HISTORY_TYPES);
    assert_eq!(events[0]["payload"]["email"], "carol@example.com");
    assert_eq!(events[0]["payload"]["displayName"], "Carol");
    assert_eq!(events[0]["payload"]["userId"], carol.to_string());
    assert_eq!(events[1]["payload"]["displayName"], "Carol C.");
    assert_eq!(events[1]["payload"]["bio"], "about me");
    assert_eq!(
        events[1]["payload"]["avatarUrl"],
        "https://img.example.com/c.png"
    );
    assert_eq!(events[2]["payload"]["oldEmail"], "carol@example.com");
    assert_eq!(events[2]["payload"]["newEmail"], "carol.c@example.com");
    assert_eq!(events[6]["payload"]["email"], "dave@example.com");
    assert_eq!(events[6]["payload"]["displayName"], "Dave");

    // A deleted account's personal data is erased for auditors too: its events are there,
    // marked erased, with their other fields and none of the personal ones.
    for e in &events[3..5] {
        let payload = e["payload"].as_object().expect("a payload object");
        assert_eq!(payload.get("erased"), Some(&json!(true)), "{e}");
        for field in PERSONAL_FIELDS {
            assert!(
                !payload.contains_key(field),
                "{field} of a deleted account: {e}"
            );
        }
        assert!(payload.contains_key("occurredAt"), "{e}");
        assert!(!payload.contains_key("sealed"), "{e}");
    }
    assert_eq!(events[3]["payload"]["userId"], erin.to_string());
    assert!(
        events[5]["payload"]["keyDestroyedAt"].is_string(),
        "{}",
        events[5]
    );
    let text = serde_json::to_string(&events).unwrap();
    for leak in ERINS_DATA {
        assert!(
            !text.contains(leak),
            "{leak} of a deleted account shown: {text}"
        );
    }

    // The `user` of an event is readable by an auditor (Dave is alive).
    let query = "{ events(types: [\"UserCreated\"]) { edges { node { user { email } } } } }";
    let r = api.gql(Some(&auditor()), query, json!({})).await;
    let edges = r.ok()["events"]["edges"].as_array().unwrap();
    assert_eq!(edges[0]["node"]["user"]["email"], "carol.c@example.com");
    assert!(edges[1]["node"]["user"].is_null(), "{}", r.text);
    assert_eq!(edges[2]["node"]["user"]["email"], "dave@example.com");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_reads_events_without_personal_data() {
    let api = TestApp::start().await;
    let (carol, _) = users_with_history(&api).await;
    let full = api.events_via_api(&auditor()).await;
    let redacted = api.events_via_api(&analytics()).await;
    assert_eq!(redacted.len(), HISTORY_TYPES.len());
    assert_personal_data_left_out(&full, &redacted);
    assert_eq!(redacted[0]["payload"]["userId"], carol.to_string());

    // The event's `user` (personal data too) is not readable by analytics.
    let query = "{ events { edges { node { eventType user { email displayName } } } } }";
    let r = api.gql(Some(&analytics()), query, json!({})).await;
    let text = r.text.clone();
    for e in r.ok()["events"]["edges"].as_array().unwrap() {
        assert!(e["node"]["user"].is_null(), "{text}");
    }
    for leak in [
        "carol",
        "Carol",
        "dave",
        "Dave",
        "about me",
        "img.example.com",
        "erin",
        "Erin",
        "erased bio",
    ] {
        assert!(!text.contains(leak), "{leak} leaked: {text}");
    }
    api.stop().await;
}

/// `redacted` is `full` without the personal fields, everything else equal.
pub fn assert_personal_data_left_out(full: &[Value], redacted: &[Value]) {
    assert_eq!(full.len(), redacted.len());
    for (f, r) in full.iter().zip(redacted) {
        let payload = r["payload"].as_object().expect("a payload object");
        for field in PERSONAL_FIELDS {
            assert!(
                !payload.contains_key(field),
                "{field} in an analytics payload: {r}"
            );
        }
        // Other fields are there, with their values.
        assert!(payload.contains_key("occurredAt"), "{r}");
        let mut expected = f["payload"].as_object().unwrap().clone();
        expected.retain(|k, _| !PERSONAL_FIELDS.contains(&k.as_str()));
        assert_eq!(payload, &expected);
        for key in ENVELOPE_FIELDS {
            assert_eq!(r[key], f[key], "{key}");
        }
        // The metadata too, but for the command id (and the causation id, which is the
        // command id today): a command id would let its holder replay the command.
        let mut expected = f["metadata"].clone();
        expected["commandId"] = Value::Null;
        expected["causationId"] = Value::Null;
        assert_eq!(r["metadata"], expected, "metadata");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_users_read_only_their_own_events() {
    let api = TestApp::start().await;
    let (a, _) = api.create_user("alice@example.com", "Alice").await;
    let (b, _) = api.create_user("bob@example.com", "Bob").await;
    // Her own events, opened.
    let r = api
        .gql(Some(&owner(a)), EVENTS, json!({ "aggregateId": a }))
        .await;
    let edges = r.ok()["events"]["edges"].as_array().expect("edges").clone();
    assert_eq!(edges.len(), 1, "{}", r.text);
    let node = &edges[0]["node"];
    assert_eq!(node["aggregateId"], a.to_string());
    assert_eq!(node["eventType"], "UserCreated");
    assert_eq!(node["payload"]["email"], "alice@example.com");
    assert_eq!(node["payload"]["displayName"], "Alice");
    assert!(!r.text.contains("bob@example.com"), "{}", r.text);
    // Not the whole log, nor someone else's events.
    for vars in [json!({}), json!({ "aggregateId": b })] {
        let r = api.gql(Some(&owner(a)), EVENTS, vars).await;
        r.expect_error("FORBIDDEN");
        assert!(!r.text.contains("bob@example.com"), "{}", r.text);
        assert!(!r.text.contains("alice@example.com"), "{}", r.text);
    }
    // Neither does a service without roles, nor roles this version does not know.
    let r = api.gql(Some(&token("svc", &[])), EVENTS, json!({})).await;
    r.expect_error("FORBIDDEN");
    let unknown_roles = token_with_claims(&json!({
        "sub": "svc", "roles": ["superuser", "Admin", "AUDITOR", "root"], "exp": unix_now() + 600
    }));
    let r = api.gql(Some(&unknown_roles), EVENTS, json!({})).await;
    r.expect_error("FORBIDDEN");
    let r = api.gql(Some(&unknown_roles), USERS, json!({})).await;
    r.expect_error("FORBIDDEN");
    api.stop().await;
}

const AUDIT_KEY: &str = "pcf-test-audit-key-3f9c2a";
const ANALYTICS_KEY: &str = "pcf-test-analytics-key-77b1";
const NO_ROLE_KEY: &str = "pcf-test-plain-key-0d4e";

async fn api_with_keys() -> TestApp {
    TestApp::with_files(|config, files| {
        let path = files.join("api-keys.toml");
        let text = format!(
            "[[keys]]\nname = \"audit-service\"\nsha256 = \"{}\"\nroles = [\"auditor\"]\n\n\
             [[keys]]\nname = \"bi-service\"\nsha256 = \"{}\"\nroles = [\"analytics\"]\n\n\
             [[keys]]\nname = \"plain-service\"\nsha256 = \"{}\"\nroles = []\n",
            sha256_hex(AUDIT_KEY),
            sha256_hex(ANALYTICS_KEY),
            sha256_hex(NO_ROLE_KEY),
        );
        std::fs::write(&path, text).expect("writing the keys file");
        config.api_keys_file = Some(path);
    })
    .await
}

/// The two ways to send an API key: the `x-api-key` header and `Authorization: ApiKey`.
fn both_spellings(key: &str) -> [Auth; 2] {
    [
        Auth::ApiKeyHeader(key.into()),
        Auth::Raw(format!("ApiKey {key}")),
    ]
}

/// The nodes of the first page of `events`, read with `auth`, which must succeed.
async fn event_nodes(api: &TestApp, auth: Auth) -> Vec<Value> {
    let r = api.send(Gql::new(EVENTS).auth(auth)).await;
    let edges = r.ok()["events"]["edges"].as_array().expect("edges");
    edges.iter().map(|e| e["node"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_from_the_keys_file_carry_their_roles() {
    let api = api_with_keys().await;
    let _ = users_with_history(&api).await;
    let full = api.events_via_api(&auditor()).await;

    for auth in both_spellings(AUDIT_KEY) {
        assert_eq!(event_nodes(&api, auth.clone()).await, full, "{auth:?}");
    }
    for auth in both_spellings(ANALYTICS_KEY) {
        assert_personal_data_left_out(&full, &event_nodes(&api, auth).await);
    }
    // A key without roles is a signed-in service that may not read the log or list users.
    let r = api
        .send(Gql::vars(EVENTS, json!({})).auth(Auth::ApiKeyHeader(NO_ROLE_KEY.into())))
        .await;
    r.expect_error("FORBIDDEN");
    let r = api
        .send(Gql::vars(USERS, json!({})).auth(Auth::ApiKeyHeader(AUDIT_KEY.into())))
        .await;
    r.expect_error("FORBIDDEN");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_api_key_is_unauthenticated() {
    let api = api_with_keys().await;
    let unknown = [
        Auth::ApiKeyHeader("not-a-key".into()),
        Auth::Raw("ApiKey not-a-key".into()),
        // The hash itself is not the key.
        Auth::ApiKeyHeader(sha256_hex(AUDIT_KEY)),
        Auth::ApiKeyHeader(String::new()),
        Auth::Raw("ApiKey".into()),
    ];
    for auth in unknown {
        let r = api
            .send(Gql::vars(EVENTS, json!({})).auth(auth.clone()))
            .await;
        r.expect_refused(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
        assert!(r.data().is_null(), "{auth:?}: {}", r.text);
        // Even sign-up is refused with bad credentials: they are not silently anonymous.
        let r = api
            .send(
                Gql::vars(
                    CREATE_USER,
                    json!({ "input": { "email": "k@example.com", "displayName": "K" } }),
                )
                .auth(auth.clone()),
            )
            .await;
        r.expect_refused(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    }
    assert_eq!(api.event_count().await, 0);
    api.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Command ids belong to one caller and one command
// ---------------------------------------------------------------------------------------------

on_both_backends!(
    a_sign_up_command_id_sent_with_other_input_is_refused_and_reveals_nothing,
    a_sign_up_repeated_with_the_identical_input_returns_the_first_result,
    another_callers_command_with_a_used_command_id_is_refused_and_does_not_run,
    one_callers_command_id_answers_only_the_identical_command,
    a_repeat_after_the_account_was_deleted_answers_account_deleted,
);

/// Asserts `r`, the answer to `case`, is the refusal of a reused command id, and that it names
/// none of `secrets`.
#[track_caller]
fn assert_key_reused(r: &Resp, case: impl std::fmt::Display, secrets: &[&str]) {
    r.expect_error_in(&case, "IDEMPOTENCY_KEY_REUSED");
    assert!(r.data().is_null(), "{case}: {}", r.text);
    for secret in secrets {
        assert!(
            !r.text.contains(secret),
            "{case}: {secret} leaked: {}",
            r.text
        );
    }
}

/// Alice's sign-up, with every personal field, under the command id `signup-42`.
fn alices_sign_up() -> Value {
    json!({
        "email": "alice@example.com",
        "displayName": "Alice Liddell",
        "bio": "alice's private bio",
        "avatarUrl": "https://img.example.com/alice.png",
    })
}

async fn a_sign_up_command_id_sent_with_other_input_is_refused_and_reveals_nothing(api: &TestApp) {
    let r = api.sign_up(None, alices_sign_up(), Some("signup-42")).await;
    let a = id_of(&r.ok()["createUser"]).to_string();
    let before = api.all_events().await;
    let secrets = [
        a.as_str(),
        "alice@example.com",
        "Alice Liddell",
        "alice's private bio",
        "img.example.com",
    ];

    // Anyone, without a token, with their own input and Alice's command id.
    let attack = json!({ "email": "attacker@example.com", "displayName": "a" });
    let r = api.sign_up(None, attack.clone(), Some("signup-42")).await;
    assert_key_reused(&r, "another input", &secrets);
    // One field off is other input too.
    let mut almost = alices_sign_up();
    almost["bio"] = json!("another bio");
    let r = api.sign_up(None, almost, Some("signup-42")).await;
    assert_key_reused(&r, "another bio", &secrets);
    // Alice's exact input, but from a signed-in caller: not the anonymous sign-up.
    for t in [token("mallory", &[]), admin()] {
        let r = api
            .sign_up(Some(&t), alices_sign_up(), Some("signup-42"))
            .await;
        assert_key_reused(&r, "a signed-in caller", &secrets);
    }
    assert_eq!(api.all_events().await, before, "a refused command appended");
    // The attacker's email was not claimed either.
    let r = api.sign_up(None, attack, Some("signup-43")).await;
    assert_eq!(
        r.ok()["createUser"]["user"]["email"],
        "attacker@example.com"
    );
}

async fn a_sign_up_repeated_with_the_identical_input_returns_the_first_result(api: &TestApp) {
    let first = api.sign_up(None, alices_sign_up(), Some("signup-42")).await;
    let first = first.ok()["createUser"].clone();
    let before = api.all_events().await;
    assert_eq!(before.len(), 1);
    // A client retrying after a lost answer.
    for _ in 0..2 {
        let again = api.sign_up(None, alices_sign_up(), Some("signup-42")).await;
        assert_eq!(again.ok()["createUser"], first, "{}", again.text);
    }
    assert_eq!(api.all_events().await, before, "the repeat appended");
}

/// `vars` with the command id `command_id`.
fn with_command_id(mut vars: Value, command_id: &str) -> Value {
    vars["commandId"] = json!(command_id);
    vars
}

async fn another_callers_command_with_a_used_command_id_is_refused_and_does_not_run(api: &TestApp) {
    let (a, b) = alice_and_bob(api).await;
    let alice = owner(a);
    let bob = owner(b);
    let alices_command = json!({
        "id": a, "input": { "displayName": "Alice A.", "bio": "alice's bio" },
        "commandId": "shared-1",
    });
    let r = api
        .gql(Some(&alice), UPDATE_PROFILE, alices_command.clone())
        .await;
    let version = r.ok()["updateProfile"]["version"].as_i64().unwrap();
    api.settle(a, version).await;
    let b_before = api.user_as(&bob, b).await.ok()["user"].clone();
    let before = api.all_events().await;
    let secrets = [a.to_string(), "Alice A.".into(), "alice's bio".into()];
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();

    // What B would change under Alice's command id (the update is appended on the first,
    // optimistic attempt; the email change is refused by the aggregate, the email being
    // Alice's), and an update with nothing to change (decided without an append).
    let mut attempts = changes_of(b, "Bobby", "alice@example.com").to_vec();
    attempts.push((
        UPDATE_PROFILE,
        json!({ "id": b, "input": { "displayName": "Bob" } }),
    ));
    for (query, vars) in attempts {
        let r = api
            .gql(Some(&bob), query, with_command_id(vars.clone(), "shared-1"))
            .await;
        assert_key_reused(&r, &vars, &secrets);
    }
    // An admin acting on Alice's account with her exact command is another caller too.
    let r = api
        .gql(Some(&admin()), UPDATE_PROFILE, alices_command)
        .await;
    assert_key_reused(&r, "an admin", &[]);

    assert_eq!(api.all_events().await, before, "a refused command appended");
    // B's commands did not run: B is as before, alive, and can still use its account.
    assert_eq!(api.user_as(&bob, b).await.ok()["user"], b_before);
    let bobs_command =
        json!({ "id": b, "input": { "displayName": "Bobby" }, "commandId": "shared-2" });
    let r = api.gql(Some(&bob), UPDATE_PROFILE, bobs_command).await;
    assert_eq!(r.ok()["updateProfile"]["user"]["displayName"], "Bobby");
    assert_eq!(r.ok()["updateProfile"]["version"], 2);
}

async fn one_callers_command_id_answers_only_the_identical_command(api: &TestApp) {
    let (a, b) = alice_and_bob(api).await;
    let alice = owner(a);
    let command = json!({
        "id": a, "input": { "displayName": "Alice A." }, "expectedVersion": 1,
        "commandId": "mine-1",
    });
    let first = api.gql(Some(&alice), UPDATE_PROFILE, command.clone()).await;
    let first = first.ok()["updateProfile"].clone();
    assert_eq!(first["version"], 2);

    // Other commands of Alice's under the same command id: another display name, another
    // field, another expected version; no expected version, and the other commands.
    let others = [
        json!({ "id": a, "input": { "displayName": "Alice B." }, "expectedVersion": 1 }),
        json!({ "id": a, "input": { "displayName": "Alice A.", "bio": null },
                "expectedVersion": 1 }),
        json!({ "id": a, "input": { "displayName": "Alice A." }, "expectedVersion": 2 }),
    ]
    .map(|vars| (UPDATE_PROFILE, vars))
    .into_iter()
    .chain(changes_of(a, "Alice A.", "alice.a@example.com"));
    for (query, vars) in others {
        let r = api
            .gql(Some(&alice), query, with_command_id(vars.clone(), "mine-1"))
            .await;
        assert_key_reused(&r, &vars, &[]);
    }
    // The same caller (an admin) with the same input on another target.
    let admin = admin();
    let on =
        |id: Uuid| json!({ "id": id, "input": { "bio": "set by an admin" }, "commandId": "ops-1" });
    api.gql(Some(&admin), UPDATE_PROFILE, on(a)).await.ok();
    let before = api.all_events().await;
    let r = api.gql(Some(&admin), UPDATE_PROFILE, on(b)).await;
    assert_key_reused(&r, "another target", &["Alice"]);
    assert_eq!(api.all_events().await, before, "a refused command appended");

    // The identical command answers with the first result (not the user as it is now).
    let again = api.gql(Some(&alice), UPDATE_PROFILE, command).await;
    assert_eq!(again.ok()["updateProfile"], first, "{}", again.text);
    assert_eq!(api.all_events().await, before, "the repeat appended");
}

async fn a_repeat_after_the_account_was_deleted_answers_account_deleted(api: &TestApp) {
    let r = api.sign_up(None, alices_sign_up(), Some("signup-42")).await;
    let a = id_of(&r.ok()["createUser"]);
    let alice = owner(a);
    let update = json!({ "id": a, "input": { "displayName": "Alice A." }, "commandId": "upd-1" });
    api.gql(Some(&alice), UPDATE_PROFILE, update.clone())
        .await
        .ok();
    let delete = json!({ "id": a, "commandId": "del-1" });
    let deleted = api.gql(Some(&alice), DELETE_ACCOUNT, delete.clone()).await;
    let deleted = deleted.ok()["deleteAccount"].clone();
    let before = api.all_events().await;
    assert_eq!(before.len(), 3);
    let secrets = [
        "alice@example.com",
        "Alice Liddell",
        "Alice A.",
        "alice's private bio",
        "img.example.com",
    ];

    // The sign-up, repeated exactly: the account it made is gone, and so is its data.
    let r = api.sign_up(None, alices_sign_up(), Some("signup-42")).await;
    r.expect_error("ACCOUNT_DELETED");
    assert!(r.data().is_null(), "{}", r.text);
    for secret in secrets.iter().chain([&a.to_string().as_str()]) {
        assert!(!r.text.contains(secret), "{secret} leaked: {}", r.text);
    }
    // So is the profile change, repeated by the owner.
    let r = api.gql(Some(&alice), UPDATE_PROFILE, update).await;
    r.expect_error("ACCOUNT_DELETED");
    for secret in secrets {
        assert!(!r.text.contains(secret), "{secret} leaked: {}", r.text);
    }
    // The deletion itself, repeated, answers as it did (it carries no personal data).
    let r = api.gql(Some(&alice), DELETE_ACCOUNT, delete).await;
    assert_eq!(r.ok()["deleteAccount"], deleted);
    // Other input under the sign-up's id is still refused as such.
    let r = api
        .sign_up(
            None,
            json!({ "email": "attacker@example.com", "displayName": "a" }),
            Some("signup-42"),
        )
        .await;
    assert_key_reused(&r, "other input", &secrets);
    assert_eq!(api.all_events().await, before, "a repeat appended");
}

/// Analytics reads events without command ids (a command id would let its holder ask for
/// the command's result), through the query and the subscription; auditors and admins see
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_does_not_see_command_ids_in_events() {
    let api = TestApp::start().await;
    let r = api.sign_up(None, alices_sign_up(), Some("signup-42")).await;
    let a = id_of(&r.ok()["createUser"]);
    api.gql(
        Some(&owner(a)),
        UPDATE_PROFILE,
        json!({ "id": a, "input": { "displayName": "Alice A." }, "commandId": "upd-1" }),
    )
    .await
    .ok();

    for t in [auditor(), admin()] {
        let events = api.events_via_api(&t).await;
        let ids: Vec<&Value> = events.iter().map(|e| &e["metadata"]["commandId"]).collect();
        assert_eq!(ids, [&json!("signup-42"), &json!("upd-1")]);
    }
    let full = api.events_via_api(&auditor()).await;
    let redacted = api.events_via_api(&analytics()).await;
    assert_personal_data_left_out(&full, &redacted);
    let text = serde_json::to_string(&redacted).unwrap();
    for id in ["signup-42", "upd-1"] {
        assert!(!text.contains(id), "{id} shown to analytics: {text}");
    }
    for e in &redacted {
        assert!(e["metadata"]["correlationId"].is_string(), "{e}");
    }

    // The subscription shows the same.
    let server = Server::start(api.router()).await;
    let subscription = "subscription($after: String) {
      events(after: $after) { eventType metadata { correlationId causationId commandId actor } }
    }";
    for (t, shown) in [(analytics(), false), (auditor(), true)] {
        let mut ws = WsClient::authenticated(&server, &t).await;
        ws.subscribe("1", subscription, json!({ "after": START }))
            .await;
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match ws.next(std::time::Duration::from_secs(10)).await {
                WsIn::Msg(m) if m["type"] == "next" && m["id"] == "1" => {
                    assert!(m["payload"]["errors"].is_null(), "{m}");
                    seen.push(m["payload"]["data"]["events"]["metadata"].clone());
                }
                other => panic!("expected an event, got {other:?}"),
            }
        }
        for (m, id) in seen.iter().zip(["signup-42", "upd-1"]) {
            if shown {
                assert_eq!(m["commandId"], id, "{m}");
            } else {
                assert!(m["commandId"].is_null(), "{m}");
                assert!(m["causationId"].is_null(), "{m}");
                assert!(m["correlationId"].is_string(), "{m}");
            }
        }
        ws.close().await;
    }
    drop(server);
    api.stop().await;
}
