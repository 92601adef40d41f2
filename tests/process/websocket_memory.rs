//! A websocket message over the size limit closes the connection with 1009, and messages far
//! over it are refused as they arrive, without the server taking their size in memory.

use crate::support::*;
use crate::WHOLE_PROCESS;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// This process's resident memory, in bytes.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages in /proc/self/statm");
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_message_over_the_limit_closes_with_1009_and_memory_stays_bounded() {
    let _alone = WHOLE_PROCESS.lock().await;
    let api = TestApp::start().await;
    let limit = api.config.body_limit;
    let server = Server::start(api.router()).await;

    // Just over the limit, before any login: refused with the protocol's code.
    let mut ws = WsClient::connect(&server).await;
    let over = "A".repeat(limit + 1024);
    ws.send(json!({ "type": "connection_init", "payload": { "authorization": over } }))
        .await;
    expect_close(ws.next(WAIT).await, 1009, "connection_init over the limit");

    // And after it: a subscribe whose query is over the limit.
    let mut ws = WsClient::authenticated(&server, &auditor()).await;
    let query = format!(
        "subscription {{ events {{ eventId }} }} # {}",
        "x".repeat(limit)
    );
    ws.subscribe("1", &query, json!({})).await;
    expect_close(ws.next(WAIT).await, 1009, "subscribe over the limit");

    // 15 MB messages on four connections at once are refused as their header arrives: the
    // server does not take their size in memory (it took 941 MB before the limit).
    let before = resident_bytes();
    let mut sends = Vec::new();
    for _ in 0..4 {
        let server_addr = server.ws_url();
        sends.push(tokio::spawn(async move {
            let mut request =
                tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                    server_addr,
                )
                .unwrap();
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                "graphql-transport-ws".parse().unwrap(),
            );
            let (mut stream, _) = tokio_tungstenite::connect_async(request).await.unwrap();
            let huge =
                json!({ "type": "connection_init", "payload": { "x": "A".repeat(15 << 20) } });
            let sent = futures::SinkExt::send(
                &mut stream,
                tokio_tungstenite::tungstenite::Message::text(huge.to_string()),
            );
            // The server ends the connection long before 15 MB are through.
            let _ = tokio::time::timeout(WAIT, sent).await;
        }));
    }
    for send in sends {
        send.await.unwrap();
    }
    let grown = resident_bytes().saturating_sub(before);
    // The test's own four 15 MB messages (and their JSON) account for most of what grows.
    assert!(
        grown < 200 << 20,
        "resident memory grew by {} MiB",
        grown >> 20
    );
    // The server still serves.
    WsClient::authenticated(&server, &auditor())
        .await
        .close()
        .await;
    drop(server);
    api.stop().await;
}
