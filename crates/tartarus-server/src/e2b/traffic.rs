//! The SDK's in-sandbox calls: requests under [`super::PREFIX`] that carry `E2b-Sandbox-Id` (set by the
//! SDK when `E2B_SANDBOX_URL` is), forwarded to the port named by `E2b-Sandbox-Port` (the daemon's,
//! [`super::ENVD_PORT`], when absent) inside that sandbox.
//!
//! The credential is the sandbox's access token (`X-Access-Token`, from the create or connect answer),
//! not an API key: the SDK sends no API key on these calls. A missing sandbox, one that has ended, one not
//! made through the E2B API and a wrong token all answer the same `502` the SDK reads as "not running",
//! so the answer tells nothing about other tenants' sandboxes.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::control::TEMPLATE_LABEL;
use super::{E2bError, ENVD_PORT};
use crate::AppState;

/// The middleware in front of the control routes: a request naming a sandbox goes into it.
pub async fn route_sandbox_traffic(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(id) = header(&request, "e2b-sandbox-id") else {
        return next.run(request).await;
    };
    match forward(&state, id, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

fn header(request: &Request, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
}

async fn forward(state: &AppState, id: String, request: Request) -> Result<Response, E2bError> {
    let port = match header(&request, "e2b-sandbox-port") {
        None => ENVD_PORT,
        Some(port) => port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
            E2bError::new(
                StatusCode::BAD_REQUEST,
                format!("E2b-Sandbox-Port '{port}' is not a port number"),
            )
        })?,
    };
    let not_running = || E2bError::new(StatusCode::BAD_GATEWAY, format!("sandbox {id} is not running"));
    let token = header(&request, "x-access-token").unwrap_or_default();
    if !state.e2b.tokens.verify(&id, &token) {
        return Err(not_running());
    }
    let record = state
        .store
        .sandbox(&id, None)
        .await
        .map_err(|e| E2bError::from(crate::error::ApiError::from(e)))?
        .filter(|r| r.status.is_live() && r.labels.contains_key(TEMPLATE_LABEL))
        .ok_or_else(not_running)?;
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    crate::sandbox_ports::forward(state, &record, port, &path_and_query, request)
        .await
        .map_err(|e| match e.code {
            // Paused: E2B's proxy answers a paused sandbox like a stopped one.
            "conflict" => not_running(),
            _ => E2bError::from(e),
        })
}
