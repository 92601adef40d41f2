//! A graphql-transport-ws session, with the limits a connection open to the internet needs
//! around async-graphql's protocol handling:
//!
//! * messages and frames are capped (`ws_message_limit`, the HTTP body limit by default): a
//!   larger one is refused as its header arrives, before its payload is read, and closes
//!   the connection with 1009 (message too big);
//! * `connection_init` must come within `ws_init_timeout` (else 4408), and its credentials
//!   must verify (else 4403); a `subscribe` before it is acknowledged closes with 4401;
//! * the session ends with 4401 when the token it was opened with expires, so a client
//!   reconnects with a fresh token instead of being served on a stale one;
//! * a connection holds at most `ws_subscriptions_per_connection` operations at once, and a
//!   subject at most `ws_subscriptions_per_subject` over all its connections to this
//!   instance; one more is answered with an `error` message (`RATE_LIMITED`) and not run;
//! * a `subscribe` reusing the id of an operation still running closes with 4409, as the
//!   protocol says.

use async_graphql::http::{WebSocket as ProtocolSession, WebSocketProtocols, WsMessage};
use async_graphql::Data;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};
use pcf_command::CommandContext;
use pcf_domain::auth::Principal;
use pcf_domain::ErrorCode;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::Config;
use crate::http::auth::Authenticator;
use crate::http::ratelimit::{RateLimiter, WebSocketClient};
use crate::http::schema::PcfSchema;

/// Close codes of graphql-transport-ws (and RFC 6455's 1009).
pub mod close {
    /// A message or frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// An operation before `connection_ack`, or the session's token expired.
    pub const UNAUTHORIZED: u16 = 4401;
    /// `connection_init` with credentials that do not verify.
    pub const FORBIDDEN: u16 = 4403;
    /// No `connection_init` in time.
    pub const INIT_TIMEOUT: u16 = 4408;
    /// A `subscribe` with the id of an operation still running.
    pub const DUPLICATE_ID: u16 = 4409;
    /// The server is stopping (RFC 6455's Service Restart): reconnect, to another instance,
    /// and resume each subscription from the last position received.
    pub const RESTARTING: u16 = 1012;
}

/// The reason sent with `close::RESTARTING`.
pub const RESTARTING_REASON: &str =
    "the server is restarting; reconnect and resume from the last position received";

/// The websocket limits of a server.
#[derive(Debug, Clone, Copy)]
pub struct WsLimits {
    pub message_limit: usize,
    pub per_connection: usize,
    pub per_subject: usize,
    pub init_timeout: Duration,
}

impl WsLimits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            message_limit: config.ws_message_limit(),
            per_connection: config.ws_subscriptions_per_connection,
            per_subject: config.ws_subscriptions_per_subject,
            init_timeout: config.ws_init_timeout,
        }
    }
}

/// Operations open per subject, over every connection of this instance.
#[derive(Default)]
pub struct OpenOperations {
    by_subject: Mutex<HashMap<String, usize>>,
}

impl OpenOperations {
    fn try_open(&self, subject: &str, limit: usize) -> bool {
        let mut map = self.by_subject.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(subject.to_owned()).or_insert(0);
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }

    fn close(&self, subject: &str, count: usize) {
        let mut map = self.by_subject.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(subject) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                map.remove(subject);
            }
        }
    }

    /// Operations open by `subject` now.
    pub fn open(&self, subject: &str) -> usize {
        let map = self.by_subject.lock().unwrap_or_else(|e| e.into_inner());
        map.get(subject).copied().unwrap_or(0)
    }
}

/// What a session shares with everything serving it.
pub struct Shared {
    pub schema: PcfSchema,
    pub authenticator: Arc<Authenticator>,
    pub limiter: Arc<RateLimiter>,
    pub limits: WsLimits,
    pub open: Arc<OpenOperations>,
    /// Raised when the process begins to stop: every session is closed with
    /// `close::RESTARTING`.
    pub stopping: watch::Receiver<bool>,
}

/// The outcome of `connection_init`.
#[derive(Clone, Debug)]
enum Init {
    Pending,
    Accepted {
        subject: String,
        expires: Option<u64>,
    },
    Refused,
}

/// The operations of one connection, released from the subject's count when they end
/// and, all at once, when the connection does.
struct Operations {
    open: Arc<OpenOperations>,
    subject: Option<String>,
    ids: HashSet<String>,
}

impl Operations {
    fn end(&mut self, id: &str) {
        if self.ids.remove(id) {
            if let Some(subject) = &self.subject {
                self.open.close(subject, 1);
            }
        }
    }
}

impl Drop for Operations {
    fn drop(&mut self) {
        if let Some(subject) = &self.subject {
            self.open.close(subject, self.ids.len());
        }
    }
}

/// What the reader asks of the writer besides async-graphql's own messages.
enum Control {
    Text(String),
    Close(u16, String),
}

/// The fields of a client message the limits look at.
#[derive(Deserialize)]
struct Peek {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
}

/// Serves one upgraded connection until either side ends it.
pub async fn serve(
    socket: WebSocket,
    protocol: WebSocketProtocols,
    shared: Arc<Shared>,
    address: String,
) {
    let (mut sink, stream) = socket.split();
    let (init_tx, init_rx) = watch::channel(Init::Pending);
    let (control_tx, control_rx) = mpsc::unbounded_channel::<Control>();
    let (input_tx, input_rx) = mpsc::channel::<Vec<u8>>(8);
    let operations = Arc::new(Mutex::new(Operations {
        open: shared.open.clone(),
        subject: None,
        ids: HashSet::new(),
    }));
    let session = ProtocolSession::new(
        shared.schema.clone(),
        tokio_stream::wrappers::ReceiverStream::new(input_rx),
        protocol,
    )
    .on_connection_init(on_init(shared.clone(), init_tx.clone(), address));
    let reader = tokio::spawn(read(
        stream,
        shared.clone(),
        init_tx.subscribe(),
        operations.clone(),
        control_tx,
        input_tx,
    ));
    drop(init_tx);
    let ends = Ends {
        init: init_rx,
        control: control_rx,
        operations,
        init_timeout: shared.limits.init_timeout,
        stopping: shared.stopping.clone(),
    };
    let close = write(&mut sink, session, ends).await;
    reader.abort();
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = sink.send(Message::Close(Some(frame))).await;
    }
    let _ = sink.close().await;
}

/// What `connection_init` does: verifies the credentials, tells the session's other halves
/// the outcome, and gives the operations their caller.
fn on_init(
    shared: Arc<Shared>,
    init_tx: watch::Sender<Init>,
    address: String,
) -> impl FnOnce(serde_json::Value) -> futures::future::BoxFuture<'static, async_graphql::Result<Data>>
       + Send
       + 'static {
    move |payload: serde_json::Value| {
        Box::pin(async move {
            match connection_principal(&shared, &payload, &address).await {
                Ok((principal, expires)) => {
                    let _ = init_tx.send(Init::Accepted {
                        subject: principal.subject.clone().unwrap_or_default(),
                        expires,
                    });
                    let mut data = Data::default();
                    data.insert(WebSocketClient {
                        principal: principal.clone(),
                        address,
                    });
                    data.insert(principal);
                    data.insert(CommandContext {
                        correlation_id: Some(crate::http::respond::new_correlation_id()),
                        actor: None,
                    });
                    Ok(data)
                }
                Err(e) => {
                    let _ = init_tx.send(Init::Refused);
                    Err(e)
                }
            }
        })
    }
}

/// What the writer watches besides async-graphql's messages.
struct Ends {
    init: watch::Receiver<Init>,
    control: mpsc::UnboundedReceiver<Control>,
    operations: Arc<Mutex<Operations>>,
    init_timeout: Duration,
    stopping: watch::Receiver<bool>,
}

/// Writes async-graphql's messages and the reader's until the session ends; the close to
/// send, if any.
async fn write<S>(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    session: S,
    ends: Ends,
) -> Option<(u16, String)>
where
    S: futures::Stream<Item = WsMessage>,
{
    let Ends {
        init: mut init_rx,
        control: mut control_rx,
        operations,
        init_timeout,
        mut stopping,
    } = ends;
    tokio::pin!(session);
    let init_deadline = Instant::now() + init_timeout;
    let mut expiry: Option<Instant> = None;
    let mut initialised = false;
    let mut refused = false;
    let mut init_open = true;
    let mut reader_done = false;
    let mut watching_stop = true;
    if *stopping.borrow_and_update() {
        return Some((close::RESTARTING, RESTARTING_REASON.to_owned()));
    }
    loop {
        let deadline = if initialised {
            expiry
        } else {
            Some(init_deadline)
        };
        tokio::select! {
            // The reader's close comes first: it is sent before the reader stops, and its
            // stopping also ends async-graphql's stream.
            biased;
            control = control_rx.recv(), if !reader_done => match control {
                Some(Control::Text(text)) => {
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break None;
                    }
                }
                Some(Control::Close(code, reason)) => break Some((code, reason)),
                None => reader_done = true,
            },
            message = session.next() => match message {
                Some(WsMessage::Text(text)) => {
                    if let Some(id) = ended_operation(&text) {
                        lock(&operations).end(&id);
                    }
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break None;
                    }
                }
                // async-graphql closes a refused `connection_init` with 1002; the protocol
                // says 4403.
                Some(WsMessage::Close(code, reason)) if refused && code == 1002 => {
                    break Some((close::FORBIDDEN, reason))
                }
                Some(WsMessage::Close(code, reason)) => break Some((code, reason)),
                None => match control_rx.try_recv() {
                    Ok(Control::Close(code, reason)) => break Some((code, reason)),
                    _ => break None,
                },
            },
            changed = init_rx.changed(), if init_open => {
                if changed.is_err() {
                    init_open = false;
                    continue;
                }
                let state = init_rx.borrow_and_update().clone();
                match state {
                    Init::Accepted { expires, .. } => {
                        initialised = true;
                        init_open = false;
                        expiry = expires.map(instant_at);
                    }
                    Init::Refused => {
                        initialised = true;
                        init_open = false;
                        refused = true;
                    }
                    Init::Pending => {}
                }
            },
            // A process whose `App` is gone never stops its sessions.
            changed = stopping.changed(), if watching_stop => {
                if changed.is_err() {
                    watching_stop = false;
                } else if *stopping.borrow_and_update() {
                    break Some((close::RESTARTING, RESTARTING_REASON.to_owned()));
                }
            }
            _ = sleep_until(deadline) => {
                break Some(if initialised {
                    (close::UNAUTHORIZED, "the token has expired; reconnect with a fresh one".to_owned())
                } else {
                    (close::INIT_TIMEOUT, "Connection initialisation timeout".to_owned())
                });
            }
        }
    }
}

fn lock(operations: &Mutex<Operations>) -> std::sync::MutexGuard<'_, Operations> {
    operations.lock().unwrap_or_else(|e| e.into_inner())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The instant of a Unix time (seconds), as far from now as it is.
fn instant_at(unix: u64) -> Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let left = (unix as f64 - now).max(0.0);
    Instant::now() + Duration::from_secs_f64(left)
}

/// The id of an operation a server message ends (`complete` or `error`), if it does.
/// async-graphql writes the `type` first, so other messages are told apart without parsing.
fn ended_operation(text: &str) -> Option<String> {
    if !(text.starts_with(r#"{"type":"complete""#) || text.starts_with(r#"{"type":"error""#)) {
        return None;
    }
    serde_json::from_str::<Peek>(text).ok()?.id
}

/// Reads the client's messages, applies the limits and hands what passes to async-graphql.
async fn read(
    mut stream: futures::stream::SplitStream<WebSocket>,
    shared: Arc<Shared>,
    mut init: watch::Receiver<Init>,
    operations: Arc<Mutex<Operations>>,
    control: mpsc::UnboundedSender<Control>,
    input: mpsc::Sender<Vec<u8>>,
) {
    let mut init_sent = false;
    while let Some(message) = stream.next().await {
        let bytes = match message {
            Ok(Message::Text(text)) => text.as_bytes().to_vec(),
            Ok(Message::Binary(bytes)) => bytes.to_vec(),
            Ok(Message::Close(_)) => return,
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Err(e) => {
                if too_big(&e) {
                    let _ = control.send(Control::Close(
                        close::TOO_BIG,
                        format!(
                            "message too big (at most {} bytes)",
                            shared.limits.message_limit
                        ),
                    ));
                }
                return;
            }
        };
        let Ok(peek) = serde_json::from_slice::<Peek>(&bytes) else {
            // async-graphql answers what does not parse (4400).
            let _ = input.send(bytes).await;
            continue;
        };
        match peek.kind.as_str() {
            "connection_init" if !init_sent => {
                init_sent = true;
                if input.send(bytes).await.is_err() {
                    return;
                }
                // Nothing more is looked at until the credentials are decided: the limits
                // below need the subject.
                let decided = init
                    .wait_for(|s| !matches!(s, Init::Pending))
                    .await
                    .map(|s| s.clone());
                match decided {
                    Ok(Init::Accepted { subject, .. }) => lock(&operations).subject = Some(subject),
                    _ => return,
                }
                continue;
            }
            // `start` and `stop` are the older subscriptions-transport-ws protocol's names,
            // which async-graphql also serves: the same limits hold for them.
            "subscribe" | "start" => {
                let subject = lock(&operations).subject.clone();
                let Some(subject) = subject else {
                    let _ =
                        control.send(Control::Close(close::UNAUTHORIZED, "Unauthorized".into()));
                    return;
                };
                let Some(id) = peek.id else {
                    let _ = input.send(bytes).await;
                    continue;
                };
                match admit_operation(&shared, &operations, &subject, &id) {
                    Admission::Open => {}
                    Admission::Duplicate => {
                        let _ = control.send(Control::Close(
                            close::DUPLICATE_ID,
                            format!("Subscriber for {} already exists", excerpt(&id)),
                        ));
                        return;
                    }
                    Admission::Refused(message) => {
                        let _ = control.send(Control::Text(operation_refused(&id, &message)));
                        continue;
                    }
                }
            }
            "complete" | "stop" => {
                if let Some(id) = &peek.id {
                    lock(&operations).end(id);
                }
            }
            _ => {}
        }
        if input.send(bytes).await.is_err() {
            return;
        }
    }
}

enum Admission {
    Open,
    Duplicate,
    Refused(String),
}

fn admit_operation(
    shared: &Shared,
    operations: &Mutex<Operations>,
    subject: &str,
    id: &str,
) -> Admission {
    let mut ops = lock(operations);
    if ops.ids.contains(id) {
        return Admission::Duplicate;
    }
    let limits = &shared.limits;
    if ops.ids.len() >= limits.per_connection {
        return Admission::Refused(format!(
            "too many operations open on this connection (at most {})",
            limits.per_connection
        ));
    }
    if !shared.open.try_open(subject, limits.per_subject) {
        return Admission::Refused(format!(
            "too many operations open for this caller (at most {})",
            limits.per_subject
        ));
    }
    ops.ids.insert(id.to_owned());
    Admission::Open
}

/// graphql-transport-ws's `error` message for an operation that was not run.
fn operation_refused(id: &str, message: &str) -> String {
    let errors = pcf_adapters::errors::refusal_body(ErrorCode::RateLimited, message);
    serde_json::json!({ "id": id, "type": "error", "payload": errors["errors"] }).to_string()
}

/// Whether a read failed on the size limit.
fn too_big(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(_)) = err.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A short, escaped excerpt of client text, for messages and logs.
pub fn excerpt(text: &str) -> String {
    crate::http::auth::excerpt(text)
}

/// The principal of a `connection_init` payload and when its credentials expire. Refused
/// credentials count against the client address's limits like refused HTTP credentials.
async fn connection_principal(
    shared: &Shared,
    payload: &serde_json::Value,
    address: &str,
) -> async_graphql::Result<(Principal, Option<u64>)> {
    let value = payload
        .get("authorization")
        .or_else(|| payload.get("Authorization"))
        .and_then(|v| v.as_str());
    let Some(value) = value else {
        return Err(async_graphql::Error::new(
            "connection_init must carry {\"authorization\": \"Bearer <token>\"}",
        ));
    };
    match shared.authenticator.verify(value) {
        Ok(verified) => Ok((verified.principal, verified.expires)),
        Err(e) => {
            let _ = shared.limiter.refused_credentials(address).await;
            tracing::info!(reason = %e, "websocket credentials refused");
            Err(async_graphql::Error::new("the credentials are not valid"))
        }
    }
}
