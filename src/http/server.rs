//! The HTTP/1.1 server loop: PCF's router on a TCP listener, with the limits a server facing
//! the internet needs and that `axum::serve` does not offer: at most so many connections at
//! once, and deadlines for a client that is slow to send its request head, slow to send its
//! body (see `crate::http`), or keeps an idle connection open.
//!
//! Each connection is watched by its own task. The watch knows three phases: waiting for a
//! request head (from the accept, or from the first byte after an idle spell), serving a
//! request, and idle between requests. A head not complete within `header_timeout`, or an
//! idle spell longer than `idle_timeout`, ends the connection. A connection upgraded to a
//! websocket leaves the watch: the websocket has limits of its own (`crate::http::websocket`).

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::config::Config;

/// The connection limits of a server.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; further clients wait in the listen backlog until one
    /// ends.
    pub max_connections: usize,
    /// The longest a client may take to send a request head, counted from the accept or
    /// from the first byte of the next request on a kept-alive connection.
    pub header_timeout: Duration,
    /// The longest a kept-alive connection may sit idle between requests.
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_connections: config.max_connections,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for (the rest of) a request head since then.
    Head(Instant),
    /// This many requests are being served.
    Serving(usize),
    /// Idle since then, with no byte of a next request.
    Idle(Instant),
}

/// A connection's phase, shared by its socket, its service and its watch.
#[derive(Clone)]
struct Activity(Arc<Mutex<Phase>>);

impl Activity {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(Phase::Head(Instant::now()))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Phase) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Bytes arrived: an idle connection is now reading a head.
    fn read(&self) {
        self.with(|p| {
            if let Phase::Idle(_) = p {
                *p = Phase::Head(Instant::now());
            }
        })
    }

    fn request_started(&self) {
        self.with(|p| {
            *p = match *p {
                Phase::Serving(n) => Phase::Serving(n + 1),
                _ => Phase::Serving(1),
            }
        })
    }

    fn request_finished(&self) {
        self.with(|p| {
            *p = match *p {
                Phase::Serving(n) if n > 1 => Phase::Serving(n - 1),
                _ => Phase::Idle(Instant::now()),
            }
        })
    }

    /// Why the connection must end now, if it must; else how long until the next look.
    fn overdue(&self, limits: &ConnectionLimits) -> Result<Duration, &'static str> {
        let now = Instant::now();
        let (since, limit, why) = match self.with(|p| *p) {
            Phase::Serving(_) => return Ok(limits.header_timeout.min(limits.idle_timeout)),
            Phase::Head(since) => (since, limits.header_timeout, "request head not complete"),
            Phase::Idle(since) => (since, limits.idle_timeout, "idle"),
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= limit {
            Err(why)
        } else {
            Ok(limit - elapsed)
        }
    }
}

/// A socket that tells its connection's `Activity` when bytes arrive.
struct Watched {
    stream: TcpStream,
    activity: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if buf.filled().len() > before {
                self.activity.read();
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Marks a request finished when dropped: when its response future completed, or was
/// dropped with the connection.
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then lets the connections
/// that are open finish their requests (each gets a graceful shutdown) and returns.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    let mut refused = pcf_adapters::Repeats::new(Duration::from_secs(10));
    loop {
        // Wait for room before accepting, so that a client over the cap waits in the
        // kernel's backlog rather than taking memory here.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept(&listener) => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: pause rather than spin.
                    if let Some(repeats) = refused.admit() {
                        tracing::warn!(error = %e, repeats, "could not accept a connection");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let stop = stop_rx.clone();
        let slot = Arc::new(ConnectionSlot(permit));
        // Finished connections are reaped as new ones come, so the set stays small.
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(stream, peer, router, limits, stop, slot));
    }
    let _ = stop_tx.send(true);
    // The HTTP connections finish their requests; upgraded websockets end on their own.
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// The next connection, set to send at once (`TCP_NODELAY`). A subscription writes small
/// frames one after another, and with Nagle's algorithm every frame written while the one
/// before was unacknowledged waited for the client's delayed acknowledgement: live events
/// reached a subscriber on loopback at p99 23–26 ms (max 39–42 ms), and at p99 2–4 ms
/// without it.
async fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (stream, peer) = listener.accept().await?;
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
    }
    Ok((stream, peer))
}

/// A connection's place under `max_connections`, held until the connection ends. Each of
/// its requests carries it (as a request extension), so that a connection upgraded to a
/// websocket keeps its place for as long as the websocket lives (`super::subscribe`).
pub struct ConnectionSlot(#[allow(dead_code)] OwnedSemaphorePermit);

/// Serves one connection under its deadlines.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: axum::Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
    slot: Arc<ConnectionSlot>,
) {
    let activity = Activity::new();
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(slot.clone());
        service_activity.request_started();
        let in_flight = InFlight(service_activity.clone());
        let mut router = router.clone();
        async move {
            let response = tower::Service::call(&mut router, request).await;
            drop(in_flight);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The watch below keeps the deadlines; hyper's own header timer would also end idle
    // connections at the head deadline.
    builder.timer(TokioTimer::new()).header_read_timeout(None);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let wait = match activity.overdue(&limits) {
            Ok(wait) => wait,
            Err(why) => {
                tracing::debug!(%peer, why, "closing a slow or idle connection");
                return;
            }
        };
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep(wait) => {}
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn served_connections_send_without_nagles_algorithm() {
        // The control: a connection accepted by a plain listener keeps the algorithm.
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(plain.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = plain.accept().await.unwrap();
        assert!(!accepted.nodelay().unwrap());

        let served = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(served.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = accept(&served).await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(
            accepted.nodelay().unwrap(),
            "a served connection waits to fill packets"
        );
    }

    #[test]
    fn a_connection_is_overdue_after_its_head_or_idle_deadline_and_never_while_serving() {
        let limits = ConnectionLimits {
            max_connections: 1,
            header_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
        };
        let activity = Activity::new();
        assert!(activity.overdue(&limits).is_ok());
        activity.with(|p| *p = Phase::Head(Instant::now() - Duration::from_millis(150)));
        assert_eq!(activity.overdue(&limits), Err("request head not complete"));
        activity.request_started();
        activity.request_started();
        activity.request_finished();
        assert!(matches!(activity.with(|p| *p), Phase::Serving(1)));
        assert!(activity.overdue(&limits).is_ok());
        activity.request_finished();
        assert!(matches!(activity.with(|p| *p), Phase::Idle(_)));
        activity.with(|p| *p = Phase::Idle(Instant::now() - Duration::from_millis(200)));
        assert!(
            activity.overdue(&limits).is_ok(),
            "idle has the longer deadline"
        );
        activity.with(|p| *p = Phase::Idle(Instant::now() - Duration::from_millis(350)));
        assert_eq!(activity.overdue(&limits), Err("idle"));
        // A byte of the next request starts the head deadline afresh.
        activity.read();
        assert!(matches!(activity.with(|p| *p), Phase::Head(_)));
        assert!(activity.overdue(&limits).is_ok());
    }
}
