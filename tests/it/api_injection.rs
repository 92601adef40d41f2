//! SQL injection and control characters in every string argument: each value is either
//! stored verbatim (and reads back equal) or refused with `VALIDATION_FAILED` (or, for ids
//! that cannot name a user, answered like a user that does not exist) — never `INTERNAL`,
//! `UNAVAILABLE` or an HTTP 500 — and the store keeps working. Run on the embedded SQLite
//! store and on the PostgreSQL event store.

use crate::support::*;
use axum::http::StatusCode;
use pcf_domain::values::is_format_char;
use serde_json::{json, Value};
use uuid::Uuid;

const SQL_BIO: &str = "'); DROP TABLE events;--";
const SQL_NAME: &str = "Robert'); DROP TABLE users;--";
/// A valid address full of quotes.
const SQL_EMAIL: &str = "robert'or'1'='1@example.com";
const SQL_AVATAR: &str = "https://example.com/a?q=1'%20OR%20'1'='1;--&x=\"y\"";
const SQL_COMMAND_ID: &str = "'; DELETE FROM processed_commands; --";

/// SQL-ish and control-character strings thrown at every argument.
const NASTY: [&str; 12] = [
    "' OR '1'='1",
    "'; DROP TABLE events;--",
    "\"; DROP TABLE users;--",
    "1; SELECT pg_sleep(10);--",
    "%' OR 1=1 --",
    "\\' OR 1=1 #",
    "x\u{0}y",
    "\u{1b}[31mred\u{1b}[0m",
    "\u{7}\u{8}\u{7f}",
    "line\nbreak\r\ttab",
    "$1 $2 ?",
    "🙂'\u{202e}",
];

/// Not a server failure: no 500, no `INTERNAL`/`UNAVAILABLE`.
#[track_caller]
fn sane(r: &Resp, what: &str) {
    assert_ne!(
        r.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{what}: {}",
        r.text
    );
    assert!(
        r.status == StatusCode::OK || r.status == StatusCode::BAD_REQUEST,
        "{what}: {} {}",
        r.status,
        r.text
    );
    for code in r.codes() {
        assert!(
            code != "INTERNAL" && code != "UNAVAILABLE" && code != "<none>",
            "{what}: {}",
            r.text
        );
    }
}

/// Refused as invalid input, naming `field`.
#[track_caller]
fn invalid(r: &Resp, field: &str, what: &str) {
    sane(r, what);
    assert_eq!(r.codes(), vec!["VALIDATION_FAILED"], "{what}: {}", r.text);
    assert_eq!(
        r.body["errors"][0]["extensions"]["field"], field,
        "{what}: {}",
        r.text
    );
}

async fn user_by_id(api: &TestApp, id: Uuid) -> Value {
    api.user_as(&admin(), id).await.ok()["user"].clone()
}

/// `users(filter: { displayNameContains: text })` as an admin.
async fn users_named(api: &TestApp, text: &str) -> Resp {
    let filter = json!({ "filter": { "displayNameContains": text } });
    api.gql(Some(&admin()), USERS, filter).await
}

/// Every string argument with every [`NASTY`] value; `with_nul` includes the strings with a
/// NUL character among the command ids and event types (see the PostgreSQL test below).
async fn injection_scenario(api: &TestApp, with_nul: bool) {
    let admin = admin();
    let wanted = |s: &str| with_nul || !s.contains('\u{0}');

    // 1. Stored verbatim.
    let input = json!({
        "email": SQL_EMAIL, "displayName": SQL_NAME, "bio": SQL_BIO, "avatarUrl": SQL_AVATAR,
    });
    let r = api.sign_up(None, input, Some(SQL_COMMAND_ID)).await;
    sane(&r, "createUser with SQL");
    let robert = id_of(&r.ok()["createUser"]);
    api.settle(robert, 1).await;
    let user = user_by_id(api, robert).await;
    assert_eq!(user["email"], SQL_EMAIL);
    assert_eq!(user["displayName"], SQL_NAME);
    assert_eq!(user["bio"], SQL_BIO);
    assert_eq!(user["avatarUrl"], SQL_AVATAR);
    let r = api.user_by_email_as(&admin, SQL_EMAIL).await;
    assert_eq!(r.ok()["userByEmail"]["id"], robert.to_string());
    let events = api.all_events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].metadata.command_id.as_deref(),
        Some(SQL_COMMAND_ID)
    );
    assert_eq!(events[0].payload["displayName"], SQL_NAME);
    assert_eq!(events[0].payload["bio"], SQL_BIO);
    // A second one that keeps its name.
    let (bobby, _) = api.create_user("bobby@example.com", SQL_NAME).await;
    // The same command id again is the same command: no second user.
    let other = json!({ "email": "other@example.com", "displayName": "Other" });
    let r = api.sign_up(None, other, Some(SQL_COMMAND_ID)).await;
    sane(&r, "createUser with the SQL command id again");
    assert_eq!(api.event_count().await, 2);

    // A profile update with every nasty string in the bio and the display name.
    let mut version = 1;
    let roberts = owner(robert);
    for nasty in NASTY {
        let r = api
            .update_profile_as(&roberts, robert, json!({ "bio": nasty }))
            .await;
        sane(&r, &format!("bio {nasty:?}"));
        // Control characters, and invisible format characters (bidi overrides, zero-width
        // characters: docs/text-policy.md), are refused in every text field.
        let control = nasty
            .chars()
            .any(|c| (c.is_control() && !matches!(c, '\n' | '\r' | '\t')) || is_format_char(c));
        if control {
            invalid(&r, "bio", &format!("bio {nasty:?}"));
        } else {
            assert_eq!(r.ok()["updateProfile"]["user"]["bio"], nasty);
            version += 1;
        }
        let r = api
            .update_profile_as(&roberts, robert, json!({ "displayName": nasty }))
            .await;
        sane(&r, &format!("displayName {nasty:?}"));
        if nasty.chars().any(|c| c.is_control() || is_format_char(c)) {
            invalid(&r, "displayName", &format!("displayName {nasty:?}"));
        } else {
            assert_eq!(r.ok()["updateProfile"]["user"]["displayName"], nasty.trim());
            version += 1;
        }
        // Emails and avatar URLs with these characters are not valid addresses.
        let email = format!("{nasty}@example.com");
        let r = api.change_email_as(&roberts, robert, &email).await;
        invalid(&r, "email", &format!("email {nasty:?}"));
        let avatar = json!({ "avatarUrl": format!("https://example.com/{nasty}") });
        let r = api.update_profile_as(&roberts, robert, avatar).await;
        sane(&r, &format!("avatarUrl {nasty:?}"));
        if nasty
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || is_format_char(c))
        {
            invalid(&r, "avatarUrl", &format!("avatarUrl {nasty:?}"));
        } else {
            assert_eq!(
                r.ok()["updateProfile"]["user"]["avatarUrl"],
                format!("https://example.com/{nasty}")
            );
            version += 1;
        }
    }
    // Display names with control characters, as in the contract.
    for name in [
        "Bob\u{0}",
        "Bo\u{1b}[2Jb",
        "\u{7}Bob",
        "Bob\nSmith",
        "Bo\u{85}b",
    ] {
        let input = json!({ "email": "ctl@example.com", "displayName": name });
        let r = api.sign_up(None, input, None).await;
        invalid(
            &r,
            "displayName",
            &format!("createUser displayName {name:?}"),
        );
    }

    // 2. Command ids: stored verbatim, or refused as invalid.
    for (i, nasty) in NASTY.iter().enumerate() {
        if !wanted(nasty) {
            continue;
        }
        let input =
            json!({ "email": format!("cmd{i}@example.com"), "displayName": format!("Cmd {i}") });
        let r = api.sign_up(None, input, Some(nasty)).await;
        sane(&r, &format!("commandId {nasty:?}"));
        if r.has_errors() {
            invalid(&r, "commandId", &format!("commandId {nasty:?}"));
        } else {
            let id = id_of(&r.data()["createUser"]);
            let events = api.stored_user_events(id).await;
            assert_eq!(events[0].metadata.command_id.as_deref(), Some(*nasty));
        }
    }

    // 3. Ids that cannot name a user: null for reads, NOT_FOUND for commands.
    for nasty in NASTY {
        let r = api.gql(Some(&admin), USER, json!({ "id": nasty })).await;
        sane(&r, &format!("user(id: {nasty:?})"));
        assert_eq!(r.ok()["user"], Value::Null);
        for (query, vars) in changes_of(nasty, "X", "x@example.com") {
            let r = api.gql(Some(&admin), query, vars.clone()).await;
            sane(&r, &format!("command on id {nasty:?}"));
            assert_eq!(r.codes(), vec!["NOT_FOUND"], "{vars}: {}", r.text);
        }
        for email in [nasty.to_owned(), format!("{nasty}@example.com")] {
            let r = api.user_by_email_as(&admin, &email).await;
            sane(&r, &format!("userByEmail {email:?}"));
            assert_eq!(r.ok()["userByEmail"], Value::Null, "{email:?}");
        }
    }

    // 4. The log's arguments.
    let auditor = auditor();
    for nasty in NASTY {
        if !wanted(nasty) {
            continue;
        }
        let r = api
            .gql(Some(&auditor), EVENTS, json!({ "aggregateId": nasty }))
            .await;
        invalid(
            &r,
            "aggregateId",
            &format!("events(aggregateId: {nasty:?})"),
        );
        let r = api
            .gql(Some(&auditor), EVENTS, json!({ "after": nasty }))
            .await;
        invalid(&r, "after", &format!("events(after: {nasty:?})"));
        let r = api
            .gql(
                Some(&auditor),
                EVENTS,
                json!({ "types": [nasty, format!("UserCreated{nasty}")] }),
            )
            .await;
        sane(&r, &format!("events(types: {nasty:?})"));
        if r.has_errors() {
            invalid(&r, "types", &format!("events(types: {nasty:?})"));
        } else {
            assert_eq!(r.data()["events"]["edges"], json!([]), "{}", r.text);
        }
    }
    // A cursor-shaped `after` that is not one (32 characters, not hex).
    let r = api
        .gql(
            Some(&auditor),
            EVENTS,
            json!({ "after": "' OR 1=1 --xxxxxxxxxxxxxxxxxxxxx" }),
        )
        .await;
    invalid(&r, "after", "a cursor-shaped after");

    // 5. The users filter.
    for nasty in NASTY {
        let r = api
            .gql(Some(&admin), USERS, json!({ "filter": { "email": nasty } }))
            .await;
        invalid(
            &r,
            "filter.email",
            &format!("users(filter.email: {nasty:?})"),
        );
        let r = users_named(api, nasty).await;
        sane(&r, &format!("users(displayNameContains: {nasty:?})"));
        if r.has_errors() {
            invalid(
                &r,
                "filter.displayNameContains",
                &format!("users(displayNameContains: {nasty:?})"),
            );
        } else {
            // Only names that really contain the text.
            for edge in r.data()["users"]["edges"].as_array().unwrap() {
                let name = edge["node"]["displayName"].as_str().unwrap().to_lowercase();
                assert!(
                    name.contains(&nasty.to_lowercase()),
                    "{name:?} does not contain {nasty:?}"
                );
            }
        }
        let r = api
            .gql(Some(&admin), USERS, json!({ "after": nasty }))
            .await;
        invalid(&r, "after", &format!("users(after: {nasty:?})"));
    }
    for wildcard in ["%", "_", "%%", "*"] {
        let r = users_named(api, wildcard).await;
        sane(&r, wildcard);
        assert_eq!(
            r.ok()["users"]["edges"],
            json!([]),
            "{wildcard:?} is not a wildcard"
        );
    }
    let r = users_named(api, "'); DROP").await;
    sane(&r, "contains '); DROP");
    assert_eq!(listed_ids(r.ok()), vec![bobby]);

    // 6. The store still works, and holds exactly what was accepted.
    let (after, _) = api.create_user("after@example.com", "After").await;
    let r = api.user_as(&owner(after), after).await;
    assert_eq!(r.ok()["user"]["email"], "after@example.com");
    let events = api.events_via_api(&auditor).await;
    let robert_events: Vec<&Value> = events
        .iter()
        .filter(|e| e["aggregateId"] == robert.to_string())
        .collect();
    assert_eq!(robert_events.len() as i64, version);
    assert_eq!(robert_events[0]["payload"]["bio"], SQL_BIO);
    assert_eq!(events.len(), api.event_count().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_and_control_characters_on_sqlite() {
    let api = TestApp::start().await;
    injection_scenario(&api, true).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_and_control_characters_on_postgres() {
    run(TestApp::postgres().await, async |api| {
        injection_scenario(api, false).await
    })
    .await;
}

/// A NUL character (valid in a GraphQL string and in JSON) in a command id or an event type
/// reaches PostgreSQL, which cannot store or compare it in `text`/`jsonb`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_on_postgres_are_not_internal_errors() {
    run(TestApp::postgres().await, async |api| {
        let input = json!({ "email": "nul@example.com", "displayName": "Nul" });
        let r = api.sign_up(None, input, Some("x\u{0}y")).await;
        sane(&r, "commandId with NUL");
        if r.has_errors() {
            invalid(&r, "commandId", "commandId with NUL");
        }
        let r = api
            .gql(Some(&auditor()), EVENTS, json!({ "types": ["x\u{0}y"] }))
            .await;
        sane(&r, "events(types) with NUL");
        if r.has_errors() {
            invalid(&r, "types", "events(types) with NUL");
        } else {
            assert_eq!(r.data()["events"]["edges"], json!([]), "{}", r.text);
        }
        // The store still works.
        api.create_user("after-nul@example.com", "After").await;
    })
    .await;
}
