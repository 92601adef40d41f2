//! Reads end to end, on SQLite and PostgreSQL: read your writes with `minVersion`, a bounded
//! wait that ends in `STALE_READ`, and look-ups by email in any letter case.

use crate::support::*;
use axum::http::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

on_both_backends!(
    a_read_with_min_version_sees_the_version_the_mutation_returned,
    a_min_version_the_view_never_reaches_answers_stale_read_after_the_timeout,
    user_by_email_finds_the_user_in_any_letter_case,
    a_deleted_account_is_gone_from_both_look_ups,
    the_events_query_lists_a_users_events_in_order,
);

async fn read_user(app: &TestApp, id: Uuid, min_version: Option<i64>) -> Value {
    let Resp { status, body, .. } = app
        .admin_gql(USER, json!({ "id": id, "minVersion": min_version }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("errors").is_none(), "{body}");
    body["data"]["user"].clone()
}

async fn a_read_with_min_version_sees_the_version_the_mutation_returned(app: &TestApp) {
    let (_, created) = app
        .create_user_unsettled("Reader@Example.com", "Reader")
        .await;
    let id = id_of(&created);
    assert_eq!(version_of(&created), 1);
    let user = read_user(app, id, Some(1)).await;
    assert_eq!(
        user, created["user"],
        "the view holds what the mutation returned"
    );
    assert_eq!(user["email"], "reader@example.com");

    let Resp { body, .. } = app
        .admin_gql(
            UPDATE_PROFILE,
            json!({ "id": id, "input": {
                "displayName": "  Reader Two ", "bio": "Reads.",
                "avatarUrl": "https://cdn.example.com/r.png",
            } }),
        )
        .await;
    let updated = body["data"]["updateProfile"].clone();
    assert_eq!(version_of(&updated), 2, "{body}");
    let user = read_user(app, id, Some(2)).await;
    assert_eq!(user["version"], 2);
    assert_eq!(user["displayName"], "Reader Two");
    assert_eq!(user["bio"], "Reads.");
    assert_eq!(user["avatarUrl"], "https://cdn.example.com/r.png");
    assert_eq!(user["createdAt"], created["user"]["createdAt"]);
    assert_eq!(user, updated["user"]);

    let Resp { body, .. } = app
        .change_email_as(&admin(), id, "reader2@example.com")
        .await;
    let changed = version_of(&body["data"]["changeEmail"]);
    assert_eq!(changed, 3, "{body}");
    let user = read_user(app, id, Some(changed)).await;
    assert_eq!(user["version"], 3);
    assert_eq!(user["email"], "reader2@example.com");
    // Clearing with null.
    let Resp { body, .. } = app
        .admin_gql(
            UPDATE_PROFILE,
            json!({ "id": id, "input": { "bio": null } }),
        )
        .await;
    assert_eq!(version_of(&body["data"]["updateProfile"]), 4, "{body}");
    let user = read_user(app, id, Some(4)).await;
    assert_eq!(user["bio"], Value::Null);
    assert_eq!(user["avatarUrl"], "https://cdn.example.com/r.png");
}

async fn a_min_version_the_view_never_reaches_answers_stale_read_after_the_timeout(app: &TestApp) {
    let (_, created) = app
        .create_user_unsettled("stale@example.com", "Stale")
        .await;
    let id = id_of(&created);
    let v = version_of(&created);
    read_user(app, id, Some(v)).await;

    let started = Instant::now();
    let Resp { status, body, .. } = app
        .admin_gql(USER, json!({ "id": id, "minVersion": v + 5 }))
        .await;
    let waited = started.elapsed();
    expect_error(status, &body, "STALE_READ");
    assert!(
        waited >= CONSISTENCY_TIMEOUT - Duration::from_millis(50),
        "answered STALE_READ after {waited:?}, before the timeout"
    );
    assert!(
        waited < CONSISTENCY_TIMEOUT + Duration::from_secs(3),
        "the wait is bounded: {waited:?}"
    );
    // A user that does not exist is also stale for a positive minVersion, but simply
    // absent without one.
    let Resp { status, body, .. } = app
        .admin_gql(USER, json!({ "id": Uuid::new_v4(), "minVersion": null }))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["user"], Value::Null, "{body}");
}

async fn user_by_email_finds_the_user_in_any_letter_case(app: &TestApp) {
    let (_, created) = app
        .create_user_unsettled("mixed.Case@Example.org", "Mixed")
        .await;
    let id = id_of(&created);
    read_user(app, id, Some(1)).await;
    for email in [
        "mixed.case@example.org",
        "MIXED.CASE@EXAMPLE.ORG",
        "Mixed.Case@example.Org",
        "  mixed.case@example.org ",
    ] {
        let Resp { status, body, .. } = app
            .admin_gql(USER_BY_EMAIL, json!({ "email": email }))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body["data"]["userByEmail"], created["user"],
            "{email}: {body}"
        );
    }
    for email in ["other@example.org", "not an email"] {
        let Resp { body, .. } = app
            .admin_gql(USER_BY_EMAIL, json!({ "email": email }))
            .await;
        assert_eq!(body["data"]["userByEmail"], Value::Null, "{email}: {body}");
        assert!(body.get("errors").is_none(), "{body}");
    }

    // After an email change, the old address finds nobody and the new one finds the user.
    let Resp { body, .. } = app
        .change_email_as(&admin(), id, "New.Case@example.org")
        .await;
    let v = version_of(&body["data"]["changeEmail"]);
    read_user(app, id, Some(v)).await;
    let Resp { body, .. } = app
        .admin_gql(USER_BY_EMAIL, json!({ "email": "MIXED.case@example.org" }))
        .await;
    assert_eq!(body["data"]["userByEmail"], Value::Null, "{body}");
    let Resp { body, .. } = app
        .admin_gql(USER_BY_EMAIL, json!({ "email": "NEW.CASE@EXAMPLE.ORG" }))
        .await;
    assert_eq!(body["data"]["userByEmail"]["id"], id.to_string(), "{body}");
    assert_eq!(body["data"]["userByEmail"]["version"], 2);
}

async fn a_deleted_account_is_gone_from_both_look_ups(app: &TestApp) {
    let id = app
        .create_user_unsettled("gone@example.com", "Gone")
        .await
        .0;
    let Resp { body, .. } = app.admin_gql(DELETE_ACCOUNT, json!({ "id": id })).await;
    let deleted = &body["data"]["deleteAccount"];
    assert_eq!(deleted["id"], id.to_string(), "{body}");
    assert_eq!(deleted["version"], 2);
    // Wait until the view has the deletion (the user query hides tombstones, so poll).
    eventually(
        Duration::from_secs(5),
        "the deletion to reach the view",
        || async move {
            let Resp { body, .. } = app.admin_gql(USER, json!({ "id": id })).await;
            body["data"]["user"].is_null().then_some(())
        },
    )
    .await;
    let Resp { body, .. } = app
        .admin_gql(USER_BY_EMAIL, json!({ "email": "gone@example.com" }))
        .await;
    assert_eq!(body["data"]["userByEmail"], Value::Null, "{body}");
    // The tombstone's version is reached: no STALE_READ wait, just no user.
    let started = Instant::now();
    let Resp { body, .. } = app
        .admin_gql(USER, json!({ "id": id, "minVersion": 2 }))
        .await;
    assert!(body.get("errors").is_none(), "{body}");
    assert_eq!(body["data"]["user"], Value::Null);
    assert!(started.elapsed() < CONSISTENCY_TIMEOUT);
}

const EVENTS: &str = "query($id: ID!) {
  events(aggregateId: $id) {
    edges { cursor node { aggregateId aggregateType sequence eventType eventVersion position
                          payload metadata { commandId } } }
  }
}";

async fn the_events_query_lists_a_users_events_in_order(app: &TestApp) {
    let id = app
        .create_user_unsettled("audit@example.com", "Audit")
        .await
        .0;
    let command_id = Uuid::new_v4().to_string();
    let command = json!({ "id": id, "input": { "bio": "Audited" }, "commandId": command_id });
    let Resp { body, .. } = app.admin_gql(UPDATE_PROFILE, command).await;
    let position = body["data"]["updateProfile"]["position"].clone();
    app.create_user_unsettled("someone.else@example.com", "Else")
        .await;

    // The log may hold back events behind still-running transactions: wait for them all.
    let user_events = |count: usize| async move {
        eventually(
            Duration::from_secs(5),
            &format!("{count} events of the user"),
            || async move {
                let Resp { body, .. } = app.admin_gql(EVENTS, json!({ "id": id })).await;
                assert!(body.get("errors").is_none(), "{body}");
                let edges = body["data"]["events"]["edges"].as_array().cloned()?;
                (edges.len() >= count).then_some(edges)
            },
        )
        .await
    };
    // While the account lives, its personal data reads opened.
    let edges = user_events(2).await;
    assert_eq!(edges[1]["node"]["payload"]["bio"], "Audited");
    assert_eq!(edges[0]["node"]["payload"]["email"], "audit@example.com");

    let Resp { body, .. } = app.admin_gql(DELETE_ACCOUNT, json!({ "id": id })).await;
    assert!(body.get("errors").is_none(), "{body}");
    let edges = user_events(3).await;
    let kinds: Vec<(&str, i64)> = edges
        .iter()
        .map(|e| {
            (
                e["node"]["eventType"].as_str().unwrap_or(""),
                e["node"]["sequence"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("UserCreated", 1),
            ("ProfileUpdated", 2),
            ("AccountDeleted", 3)
        ]
    );
    for e in &edges {
        assert_eq!(e["node"]["aggregateId"], id.to_string());
        assert_eq!(e["node"]["aggregateType"], "User");
        assert_eq!(e["node"]["eventVersion"], "2");
        assert_eq!(e["cursor"], e["node"]["position"]);
    }
    assert_eq!(edges[1]["node"]["position"], position);
    assert_eq!(edges[1]["node"]["metadata"]["commandId"], command_id);
    // Once the account is deleted, its personal data reads erased, even to an admin.
    for e in &edges[..2] {
        assert_eq!(e["node"]["payload"]["erased"], true, "{e}");
    }
    assert_eq!(edges[1]["node"]["payload"].get("bio"), None);
    assert_eq!(edges[0]["node"]["payload"].get("email"), None);
    assert!(edges[2]["node"]["payload"]["keyDestroyedAt"].is_string());
}
