//! Preview URLs: `/v1/sandboxes/{id}/ports/{port}/…` forwards HTTP and WebSocket to a port inside the
//! sandbox (`crate::sandbox_ports`), for the ports the sandbox opted in to at create (`ports`).
//!
//! Two ways in: the caller's API key (`Authorization: Bearer`), or a signed, expiring token in the URL
//! (`?tartarus_token=…`, from `POST /v1/sandboxes/{id}/preview-urls`) for a browser or a webhook that
//! cannot send a header. A token names one sandbox, one port and its expiry, and is a keyed BLAKE3 MAC
//! under the server's token key; it is removed from the query before the request reaches the sandbox.

use axum::extract::{Path, Request, State};
use axum::routing::{any, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::CreateSandbox;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::{audit, find, AppState};

/// The label holding a sandbox's opted-in ports.
pub const PORTS_LABEL: &str = "tartarus.ports";
/// The query parameter of a signed preview URL.
pub const TOKEN_PARAM: &str = "tartarus_token";
/// Longest validity of a signed URL.
const MAX_URL_TTL_S: u64 = 7 * 24 * 3600;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/sandboxes/{id}/ports/{port}", any(forward_root))
        .route("/v1/sandboxes/{id}/ports/{port}/", any(forward_root))
        .route("/v1/sandboxes/{id}/ports/{port}/{*path}", any(forward_path))
        .route("/v1/sandboxes/{id}/preview-urls", post(signed_url))
}

/// Moves a create's `ports` into [`PORTS_LABEL`], refusing port 0 and a label set by hand.
pub(crate) fn opt_in(body: &mut CreateSandbox) -> Result<(), ApiError> {
    if body.labels.contains_key(PORTS_LABEL) {
        return Err(ApiError::invalid(format!(
            "label '{PORTS_LABEL}' is set by the server from 'ports'; give the ports there"
        )));
    }
    if body.ports.contains(&0) {
        return Err(ApiError::invalid("ports must be between 1 and 65535"));
    }
    if body.ports.len() > 32 {
        return Err(ApiError::invalid(
            "at most 32 ports may be opened to preview URLs",
        ));
    }
    if !body.ports.is_empty() {
        let mut ports = body.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        body.labels.insert(PORTS_LABEL.to_string(), list.join(","));
    }
    Ok(())
}

fn opted_in(record: &tartarus_store::SandboxRecord, port: u16) -> bool {
    record
        .labels
        .get(PORTS_LABEL)
        .is_some_and(|ports| ports.split(',').any(|p| p.parse() == Ok(port)))
}

/// `POST /v1/sandboxes/{id}/preview-urls`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedUrlRequest {
    /// A port the sandbox opened to preview URLs (`ports` at create).
    pub port: u16,
    /// Seconds the URL works (default 3600, at most a week).
    pub ttl_s: Option<u64>,
}

/// A signed preview URL.
#[derive(Debug, Serialize, ToSchema)]
pub struct SignedUrl {
    /// Path and query of the URL on this server (prefix it with the server's address).
    pub path: String,
    pub expires_ms: i64,
}

fn mac(state: &AppState, id: &str, port: u16, expires_ms: i64) -> String {
    state.e2b.tokens.mac(&format!("preview:{id}:{port}:{expires_ms}"))
}

/// A signed URL for one port of a sandbox, for clients that cannot send an API key.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/preview-urls", request_body = SignedUrlRequest,
    security(("api_key" = [])),
    responses((status = 200, body = SignedUrl), (status = 404, body = ErrorBody),
               (status = 409, body = ErrorBody, description = "the port is not opened to preview URLs"),
               (status = 422, body = ErrorBody)))]
pub(crate) async fn signed_url(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<SignedUrlRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<SignedUrl>, ApiError> {
    let record = find(&state, &caller, &id).await?;
    let Json(body) = body.map_err(crate::error::json_rejection)?;
    let port = body.port;
    if !opted_in(&record, port) {
        return Err(ApiError::conflict(format!(
            "port {port} of sandbox {id} is not opened to preview URLs: create the sandbox with \"ports\": [{port}]"
        )));
    }
    let ttl = body.ttl_s.unwrap_or(3600);
    if !(1..=MAX_URL_TTL_S).contains(&ttl) {
        return Err(ApiError::invalid(format!(
            "ttl_s must be between 1 and {MAX_URL_TTL_S}"
        )));
    }
    let expires_ms = tartarus_store::now_ms() + (ttl as i64) * 1000;
    let token = format!("{expires_ms}.{}", mac(&state, &id, port, expires_ms));
    audit(
        &state,
        &caller,
        "sandbox.preview_url",
        Some(&id),
        &format!("ok (port {port})"),
    )
    .await;
    Ok(Json(SignedUrl {
        path: format!("/v1/sandboxes/{id}/ports/{port}/?{TOKEN_PARAM}={token}"),
        expires_ms,
    }))
}

async fn forward_root(
    state: State<AppState>,
    Path((id, port)): Path<(String, u16)>,
    request: Request,
) -> Result<axum::response::Response, ApiError> {
    forward(state, id, port, String::new(), request).await
}

/// Forward a request to a port inside the sandbox (any method; WebSocket upgrades too).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports/{port}/{path}", security(("api_key" = [])),
    responses((status = 200, description = "the sandbox's own answer"),
               (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
               (status = 409, body = ErrorBody, description = "not opened to preview URLs, not running or paused"),
               (status = 429, body = ErrorBody), (status = 502, body = ErrorBody, description = "nothing listens there")))]
pub(crate) async fn forward_path(
    state: State<AppState>,
    Path((id, port, path)): Path<(String, u16, String)>,
    request: Request,
) -> Result<axum::response::Response, ApiError> {
    forward(state, id, port, path, request).await
}

async fn forward(
    State(state): State<AppState>,
    id: String,
    port: u16,
    path: String,
    request: Request,
) -> Result<axum::response::Response, ApiError> {
    let query = request.uri().query().unwrap_or("").to_string();
    let token = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == TOKEN_PARAM)
        .map(|(_, v)| v.into_owned());
    let record = match token {
        Some(token) => {
            let bad = || ApiError::unauthorized("the preview URL's token is invalid or has expired");
            let (expires, given) = token.split_once('.').ok_or_else(bad)?;
            let expires_ms: i64 = expires.parse().map_err(|_| bad())?;
            let expected = mac(&state, &id, port, expires_ms);
            if expires_ms < tartarus_store::now_ms() || !crate::e2b::constant_time_eq(&expected, given) {
                return Err(bad());
            }
            state
                .store
                .sandbox(&id, None)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("no sandbox '{id}'")))?
        }
        None => {
            let (mut parts, _) = Request::new(()).into_parts();
            parts.headers = request.headers().clone();
            let caller =
                <Caller as axum::extract::FromRequestParts<AppState>>::from_request_parts(&mut parts, &state)
                    .await?;
            find(&state, &caller, &id).await?
        }
    };
    if !opted_in(&record, port) {
        return Err(ApiError::conflict(format!(
            "port {port} of sandbox {id} is not opened to preview URLs: create the sandbox with \"ports\": [{port}]"
        )));
    }
    let kept: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k != TOKEN_PARAM)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut target = format!("/{path}");
    if !kept.is_empty() {
        target.push('?');
        target.push_str(
            &url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(kept)
                .finish(),
        );
    }
    crate::sandbox_ports::forward(&state, &record, port, &target, request).await
}
