//! Stopping gracefully: when a process begins to stop, readiness answers 503 while requests
//! are still served, and websocket sessions are closed with 1012 (Service Restart) telling
//! clients to resume elsewhere; `pcf serve` does this on SIGTERM as on Ctrl-C, then lets open
//! requests finish and exits cleanly.

use crate::support::*;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EVENTS_SUB: &str = "subscription($after: String) { events(after: $after) { eventId } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_process_is_not_ready_and_closes_websockets_with_1012_but_still_serves() {
    let api = TestApp::start().await;
    let (id, _) = api.create_user("stopping@example.com", "Stopping").await;
    let server = Server::start(api.router()).await;
    let mut ws = WsClient::authenticated(&server, &auditor()).await;
    ws.subscribe("s1", EVENTS_SUB, json!({ "after": START }))
        .await;
    assert!(matches!(
        ws.next(Duration::from_secs(10)).await,
        WsIn::Msg(_)
    ));
    assert_eq!(get(&api.router(), "/health/ready").await.status, 200);

    api.app().begin_shutdown();
    let ready = get(&api.router(), "/health/ready").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body["status"], "shutting down");
    // The subscriber is told to reconnect and resume.
    let closed = loop {
        match ws.next(Duration::from_secs(10)).await {
            WsIn::Msg(_) => continue,
            other => break other,
        }
    };
    expect_close(closed, 1012, "a session of a stopping process");
    // A new session is closed at once the same way.
    let mut late = WsClient::connect(&server).await;
    late.try_send(json!({ "type": "connection_init", "payload": {} }))
        .await;
    expect_close(
        late.next(Duration::from_secs(10)).await,
        1012,
        "a session opened while stopping",
    );
    // Requests are still answered until the server stops accepting them.
    assert_eq!(user(&api.router(), id, Some(1)).await["version"], 1);
    drop(server);
    api.stop().await;
}

/// The real binary on SIGTERM: not ready during the shutdown delay, then a clean exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcf_serve_stops_gracefully_on_sigterm() {
    let files = tempfile::tempdir().unwrap();
    let config = files.path().join("pcf.toml");
    std::fs::write(&config, "shutdown_delay_ms = 2000\n").unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_pcf"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PCF_CONFIG", &config)
        .env("PCF_DATA_DIR", files.path().join("data"))
        .env("PCF_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting pcf");
    let ready = |port: u16| async move {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /health/ready HTTP/1.1\r\nHost: pcf\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.ok()?;
        answer.split_whitespace().nth(1).map(str::to_owned)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready(port).await.as_deref() != Some("200") {
        assert!(Instant::now() < deadline, "pcf did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    // Within the delay: still listening, not ready.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut saw_503 = false;
    while Instant::now() < deadline && !saw_503 {
        saw_503 = ready(port).await.as_deref() == Some("503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        saw_503,
        "readiness did not answer 503 during the shutdown delay"
    );
    // Then it exits, successfully.
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "pcf did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "{exit:?}");
}
