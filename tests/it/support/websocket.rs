//! The app over a real socket: the router served on a loopback port by PCF's own server loop
//! (`pcf::http::server::serve`), and a graphql-transport-ws client for `GET /graphql/ws`.

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

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
    /// The connection ended without a close frame, or failed (why, for panic messages).
    Gone(#[allow(dead_code)] String),
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
        Self::connect_speaking(server, "graphql-transport-ws").await
    }

    /// Opens `GET /graphql/ws` with `protocol` (`graphql-ws` is the older
    /// subscriptions-transport-ws).
    pub async fn connect_speaking(server: &Server, protocol: &str) -> Self {
        let mut request = server
            .ws_url()
            .into_client_request()
            .expect("a websocket request");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            protocol.parse().expect("a header value"),
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
            Some(protocol)
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

/// Expects a close with `code` as the next thing the connection delivers.
#[track_caller]
pub fn expect_close(answer: WsIn, code: u16, what: &str) {
    match answer {
        WsIn::Closed(c, _) if c == code => {}
        other => panic!("{what}: expected a close with {code}, got {other:?}"),
    }
}
