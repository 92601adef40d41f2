//! Restarts: the log is durable and the views are rebuilt from it at start, so a new process
//! on the same storage serves exactly what the old one did. Embedded mode (SQLite under the
//! data directory) is the case users meet first; the same holds on PostgreSQL.

use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

on_both_backends!(
    a_new_process_on_the_same_data_serves_the_same_users,
    a_new_process_continues_versions_and_keeps_emails_claimed,
);

/// The embedded test made explicit: a data directory the test owns, two `pcf::build`s on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_data_dir_survives_a_restart() {
    let dir = tempfile::tempdir().expect("a temporary data directory");
    let config = base_config(&dir.path().join("nested").join("pcf-data"));
    assert!(config.embedded());
    let first = pcf::build(&config).await.expect("first start");
    let Resp { body, .. } = admin_gql(
        &first.router,
        CREATE_USER,
        json!({ "input": { "email": "Disk@Example.com", "displayName": "Disk" } }),
    )
    .await;
    let created = body["data"]["createUser"].clone();
    let id = id_of(&created);
    first.shutdown().await;
    assert!(
        config.data_dir.join("events.db").exists(),
        "the log is a file under the data directory"
    );

    let second = pcf::build(&config).await.expect("second start");
    let Resp { body, .. } = admin_gql(&second.router, USER, json!({ "id": id })).await;
    assert_eq!(body["data"]["user"], created["user"], "{body}");
    second.shutdown().await;
}

async fn user(app: &TestApp, id: Uuid, min_version: Option<i64>) -> Value {
    let Resp { body, .. } = app
        .admin_gql(USER, json!({ "id": id, "minVersion": min_version }))
        .await;
    assert!(body.get("errors").is_none(), "{body}");
    body["data"]["user"].clone()
}

async fn by_email(app: &TestApp, email: &str) -> Value {
    let Resp { body, .. } = app
        .admin_gql(USER_BY_EMAIL, json!({ "email": email }))
        .await;
    assert!(body.get("errors").is_none(), "{body}");
    body["data"]["userByEmail"].clone()
}

async fn a_new_process_on_the_same_data_serves_the_same_users(app: &mut TestApp) {
    let mut ids = Vec::new();
    for (email, name) in [
        ("one@example.com", "One"),
        ("Two@Example.com", "Two"),
        ("three@example.com", "Three"),
    ] {
        ids.push(app.create_user_unsettled(email, name).await.0);
    }
    let Resp { body, .. } = app
        .admin_gql(
            UPDATE_PROFILE,
            json!({ "id": ids[1], "input": {
                "displayName": "Two, updated", "bio": "Second\nline",
                "avatarUrl": "https://cdn.example.com/two.png",
            } }),
        )
        .await;
    assert_eq!(body["data"]["updateProfile"]["version"], 2, "{body}");
    let versions = [1, 2, 1];
    let mut before = Vec::new();
    for (id, v) in ids.iter().zip(versions) {
        before.push(user(app, *id, Some(v)).await);
    }
    assert_eq!(before[1]["displayName"], "Two, updated");
    assert_eq!(before[1]["email"], "two@example.com");

    app.restart().await;

    // No minVersion: the views must be complete when the new process starts serving.
    for ((id, v), expected) in ids.iter().zip(versions).zip(&before) {
        let after = user(app, *id, None).await;
        assert_eq!(&after, expected, "user {id} after the restart");
        assert_eq!(after["version"], v);
    }
    for (email, expected) in [
        ("ONE@example.com", &before[0]),
        ("two@example.com", &before[1]),
        ("Three@Example.COM", &before[2]),
    ] {
        assert_eq!(&by_email(app, email).await, expected, "{email}");
    }
    assert_eq!(before[1]["bio"], "Second\nline");
    assert_eq!(before[1]["avatarUrl"], "https://cdn.example.com/two.png");
    assert_eq!(app.count_events(None).await, 4);
}

async fn a_new_process_continues_versions_and_keeps_emails_claimed(app: &mut TestApp) {
    let kept = app
        .create_user_unsettled("kept@example.com", "Kept")
        .await
        .0;
    let left = app
        .create_user_unsettled("left@example.com", "Left")
        .await
        .0;
    let Resp { body, .. } = app.admin_gql(DELETE_ACCOUNT, json!({ "id": left })).await;
    assert!(body.get("errors").is_none(), "{body}");
    let command_id = Uuid::new_v4().to_string();
    let command = json!({ "id": kept, "input": { "bio": "Before" }, "commandId": command_id });
    let Resp { body, .. } = app.admin_gql(UPDATE_PROFILE, command.clone()).await;
    let first = body["data"]["updateProfile"].clone();
    assert_eq!(first["version"], 2, "{body}");

    app.restart().await;

    // The email index and the command ids are durable.
    let copy = json!({ "email": "KEPT@example.com", "displayName": "Copy" });
    let r = app.sign_up(Some(&admin()), copy, None).await;
    r.expect_error("EMAIL_TAKEN");
    let (reborn, _) = app
        .create_user_unsettled("left@example.com", "Left again")
        .await;
    assert_ne!(reborn, left);
    let Resp { body, .. } = app.admin_gql(UPDATE_PROFILE, command).await;
    assert_eq!(body["data"]["updateProfile"], first, "{body}");
    let Resp { status, body, .. } = app
        .admin_gql(
            UPDATE_PROFILE,
            json!({ "id": left, "input": { "displayName": "Ghost" } }),
        )
        .await;
    expect_error(status, &body, "ACCOUNT_DELETED");

    // Versions continue from the log, and the new process's relay feeds its views.
    let Resp { body, .. } = app
        .admin_gql(
            UPDATE_PROFILE,
            json!({ "id": kept, "input": { "bio": "After" } }),
        )
        .await;
    assert_eq!(body["data"]["updateProfile"]["version"], 3, "{body}");
    let after = user(app, kept, Some(3)).await;
    assert_eq!(after["bio"], "After");
    assert_eq!(after["version"], 3);
    let sequences: Vec<u64> = app
        .user_events(kept)
        .await
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(sequences, [1, 2, 3]);
    // The relay resumed from its checkpoint: nothing published twice made a view go back.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(user(app, kept, None).await["version"], 3);
    assert_eq!(user(app, left, None).await, Value::Null);
}
