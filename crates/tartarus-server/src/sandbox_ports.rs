//! HTTP and WebSocket forwarded to a port inside a sandbox: preview URLs
//! (`/v1/sandboxes/{id}/ports/{port}/…`) and the E2B daemons (`crate::e2b`).
//!
//! The connection is made by the sandbox's shim inside the sandbox's own network namespace
//! (`ServiceSandbox::connect_port`) and handed to the server, so a sandbox is reachable without ever being
//! put on the host's network, `network: none` sandboxes included. One HTTP/1.1 exchange runs over each
//! connection; a `101 Switching Protocols` answer (WebSocket) is then spliced both ways until either side
//! closes. Each sandbox has at most [`crate::limits::PORT_CONNECTIONS_PER_SANDBOX`] forwarded connections
//! at once (429 beyond), the sandbox's answer head must come within [`HEAD_TIMEOUT`], and the caller's
//! credentials (API key, access token) never reach the sandbox.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderName, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tartarus_store::SandboxRecord;

use crate::error::ApiError;
use crate::{sandboxes, AppState};

/// How long the program in the sandbox may take to start answering a forwarded request.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers that carry the caller's credentials for Tartarus; the program in the sandbox never sees them.
const CREDENTIAL_HEADERS: [&str; 3] = ["x-api-key", "x-access-token", "x-tartarus-access-token"];

/// Forwards `request` to `port` inside the sandbox, as `path_and_query` (an absolute path), and returns
/// the sandbox's answer. The request's Host header is kept (preview servers and WebSocket handshakes
/// read it).
pub async fn forward(
    state: &AppState,
    record: &SandboxRecord,
    port: u16,
    path_and_query: &str,
    mut request: Request,
) -> Result<Response, ApiError> {
    crate::local_only(record, "forwarding to a sandbox port")?;
    if !record.status.is_live() {
        return Err(ApiError::conflict(format!(
            "sandbox {} is {}",
            record.id,
            record.status.as_str()
        )));
    }
    if record.paused {
        return Err(ApiError::conflict(format!(
            "sandbox {} is paused; resume it first",
            record.id
        )));
    }
    let Some(slot) = state.manager.port_connections.try_hold(&record.id) else {
        return Ok(crate::limits::too_many_requests(format!(
            "sandbox {} already has {} forwarded connections open; retry when one has closed",
            record.id,
            crate::limits::PORT_CONNECTIONS_PER_SANDBOX
        )));
    };
    let uri: Uri = path_and_query
        .parse()
        .map_err(|_| ApiError::invalid(format!("'{path_and_query}' is not a valid request path")))?;
    let connection = state.manager.shim(record).connect_port(port).await.map_err(|e| {
        match sandboxes::call_error(&record.id, e) {
            e if e.code == "port_closed" => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "port_closed",
                format!("nothing listens on port {port} inside sandbox {}", record.id),
            ),
            e => e,
        }
    })?;
    // Small writes (a request head, then its body) must not wait for the sandbox's delayed ACK.
    let _ = connection.set_nodelay(true);
    let (mut sender, exchange) = hyper::client::conn::http1::handshake(TokioIo::new(connection))
        .await
        .map_err(|e| unreachable_port(record, port, &e))?;
    tokio::spawn(async move {
        // The slot is held for as long as the connection into the sandbox is open.
        let _slot = slot;
        let _ = exchange.with_upgrades().await;
    });
    let client_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let client = request
        .extensions()
        .get::<crate::connections::ClientConnection>()
        .copied();
    let headers = request.headers_mut();
    for name in CREDENTIAL_HEADERS {
        headers.remove(HeaderName::from_static(name));
    }
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        // A Tartarus key as a bearer token is the caller's credential; other schemes (the E2B daemon's
        // Basic user name) belong to the program in the sandbox.
        if auth.as_bytes().starts_with(b"Bearer ") {
            headers.remove(header::AUTHORIZATION);
        }
    }
    *request.uri_mut() = uri;
    let mut response = match tokio::time::timeout(HEAD_TIMEOUT, sender.send_request(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return Err(unreachable_port(record, port, &e)),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "port_timeout",
                format!(
                    "port {port} inside sandbox {} did not answer within {} s",
                    record.id,
                    HEAD_TIMEOUT.as_secs()
                ),
            ))
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad_upgrade",
                format!(
                    "port {port} inside sandbox {} switched protocols unasked",
                    record.id
                ),
            ));
        };
        let sandbox_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            if let (Ok(client), Ok(sandbox)) = (client_upgrade.await, sandbox_upgrade.await) {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(sandbox))
                    .await;
            }
        });
    }
    let mut response = response
        .map(|body| Body::new(ResetOnError { inner: body, client }))
        .into_response();
    response.extensions_mut().insert(Forwarded);
    Ok(response)
}

/// Marks a response as the sandbox's own answer, which the API's error shaping leaves alone.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded;

/// The sandbox's answer body; if it breaks off (the sandbox died, its program crashed), the client's
/// connection is reset rather than ended, so the client sees a dropped connection, not a short answer.
struct ResetOnError {
    inner: hyper::body::Incoming,
    client: Option<crate::connections::ClientConnection>,
}

impl http_body::Body for ResetOnError {
    type Data = axum::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(_))) = &polled {
            if let Some(client) = self.client.take() {
                client.reset();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn is_upgrade(request: &Request) -> bool {
    request.headers().contains_key(header::UPGRADE)
        && request
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

fn unreachable_port(record: &SandboxRecord, port: u16, e: &hyper::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "port_failed",
        format!(
            "the HTTP exchange with port {port} inside sandbox {} failed: {e}",
            record.id
        ),
    )
}
