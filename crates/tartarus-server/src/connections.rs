//! Serving HTTP/1 on a listener with every per-connection resource bounded: the API's TCP listener and each
//! sandbox's gateway socket.
//!
//! `axum::serve` takes every connection the kernel offers and waits on each forever, so a client that opens
//! thousands of connections and sends half a request line holds as many of the server's descriptors until
//! it hits its limit, and then nobody is served. Here:
//!
//! - at most [`ConnectionLimits::max_connections`] connections are served at once: the next one is not
//!   accepted until one closes, so it waits in the listen backlog (the kernel's, bounded) and holds none of
//!   the server's descriptors;
//! - a request's head must arrive within [`ConnectionLimits::header_timeout`] of the connection's start or
//!   of the end of the previous response, which is also the idle timeout of a kept-alive connection;
//!   hyper runs this timer only while it waits for a head, so a response that streams (an exec's events,
//!   `logs?follow`, a forwarded stream) is never cut by it;
//! - a request body may pause at most [`ConnectionLimits::body_idle_timeout`] between two pieces.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use std::os::fd::{AsRawFd, RawFd};

use axum::serve::Listener;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{watch, Semaphore};

/// How many connections a listener serves at once and how long each may keep the server waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Time for a request's head to arrive; also how long a kept-alive connection may stay idle.
    pub header_timeout: Duration,
    /// Longest pause inside a request body.
    pub body_idle_timeout: Duration,
}

impl ConnectionLimits {
    /// The API listener's defaults.
    pub const API: ConnectionLimits = ConnectionLimits {
        max_connections: 1024,
        header_timeout: Duration::from_secs(10),
        body_idle_timeout: Duration::from_secs(30),
    };

    /// A sandbox's gateway socket: its own code is the only client, and a handful of calls at once is
    /// plenty (calls beyond the per-sandbox call limit are refused anyway).
    pub const GATEWAY: ConnectionLimits = ConnectionLimits {
        max_connections: 32,
        header_timeout: Duration::from_secs(10),
        body_idle_timeout: Duration::from_secs(30),
    };
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves; then stops accepting, lets
/// every open connection finish its request in flight, and returns once all are closed. Dropping the
/// returned future closes connections too (each after its request in flight).
pub async fn serve<L: Listener<Io: AsRawFd>>(
    mut listener: L,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    // `true` (or the sender gone): connections finish what they are doing and close.
    let (stop, stopping) = watch::channel(false);
    let idle = limits.body_idle_timeout;
    let router = router.layer(axum::middleware::map_request(
        move |request: Request| async move { request.map(|body| Body::new(IdleBody::new(body, idle))) },
    ));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // The slot first: a connection over the limit is not accepted, so it holds none of our descriptors.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot,
            () = &mut shutdown => break,
        };
        let Ok(slot) = slot else { break };
        let (io, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Each request knows its connection's socket, so a forwarded stream cut off by its source can
        // reset the connection ([`ClientConnection::reset`]).
        let client = ClientConnection(io.as_raw_fd());
        let service = TowerToHyperService::new(WithClient {
            router: router.clone(),
            client,
        });
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            // With upgrades: WebSocket connections forwarded into sandboxes (`sandbox_ports`).
            let connection = builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                // Timeouts and clients that go away end here; nothing to report.
                _ = connection.as_mut() => {}
                _ = async { stopping.wait_for(|stop| *stop).await.map(drop) } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every slot back: every connection closed.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// The client connection a request arrived on (its socket, valid while the request is being answered).
#[derive(Debug, Clone, Copy)]
pub struct ClientConnection(RawFd);

impl ClientConnection {
    /// Makes the connection's close a reset (`SO_LINGER` 0) instead of an orderly end: a response whose
    /// source died mid-stream must not look, to the client, like one the server chose to end. Called
    /// while the response is still being written, so the descriptor is still this connection's.
    pub fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads `linger` for its size; an fd that is no longer a socket just fails.
        unsafe {
            libc::setsockopt(
                self.0,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
}

/// The router with each request tagged with its connection (an extension), without rebuilding the
/// router per connection.
#[derive(Clone)]
struct WithClient {
    router: Router,
    client: ClientConnection,
}

impl<B> tower_service::Service<axum::http::Request<B>> for WithClient
where
    Router: tower_service::Service<axum::http::Request<B>>,
{
    type Response = <Router as tower_service::Service<axum::http::Request<B>>>::Response;
    type Error = <Router as tower_service::Service<axum::http::Request<B>>>::Error;
    type Future = <Router as tower_service::Service<axum::http::Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<axum::http::Request<B>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut request: axum::http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.client);
        self.router.call(request)
    }
}

/// A request body that fails when no piece of it arrives within `timeout` while the handler waits for one.
struct IdleBody {
    inner: Body,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleBody {
    fn new(inner: Body, timeout: Duration) -> Self {
        IdleBody {
            inner,
            timeout,
            sleep: None,
        }
    }
}

/// The error of a request body that stalled.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for {} s", .0.as_secs())]
pub struct BodyStalled(Duration);

impl http_body::Body for IdleBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.sleep = None;
            return Poll::Ready(frame);
        }
        let timeout = this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyStalled(timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: ConnectionLimits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/", axum::routing::get(|| async { "hello" }))
            .route("/echo", axum::routing::post(|body: Bytes| async move { body }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, router, limits, async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    const SHORT: ConnectionLimits = ConnectionLimits {
        max_connections: 2,
        header_timeout: Duration::from_millis(300),
        body_idle_timeout: Duration::from_millis(300),
    };

    async fn get(addr: std::net::SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn a_half_sent_head_is_closed_after_the_header_timeout() {
        let (addr, _stop) = start(SHORT).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the connection was not closed");
    }

    #[tokio::test]
    async fn connections_over_the_limit_wait_until_one_closes() {
        let (addr, _stop) = start(SHORT).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            held.push(s);
        }
        // Served once the two held connections time out.
        let answer = tokio::time::timeout(Duration::from_secs(5), get(addr))
            .await
            .unwrap();
        assert!(answer.ends_with("hello"), "{answer}");
    }

    #[tokio::test]
    async fn a_stalled_body_fails_and_a_flowing_one_is_read() {
        let (addr, _stop) = start(SHORT).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }

    #[tokio::test]
    async fn shutdown_waits_for_the_request_in_flight() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let entered = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let (inside, go) = (Arc::clone(&entered), Arc::clone(&release));
        let router = Router::new().route(
            "/",
            axum::routing::get(move || async move {
                inside.notify_one();
                go.notified().await;
                "done"
            }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router, SHORT, async {
            let _ = stopped.await;
        }));
        let client = tokio::spawn(get(addr));
        entered.notified().await;
        stop.send(()).unwrap();
        // Not accepting any more, but the request in flight is answered.
        release.notify_one();
        let answer = client.await.unwrap();
        assert!(answer.ends_with("done"), "{answer}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
