//! Files in a sandbox: `PUT`/`GET /v1/sandboxes/{id}/files?path=/abs/path` and `?list=1` for a directory.
//!
//! The shim performs each transfer *inside* the sandbox, as the sandbox user, under every wall an exec has
//! (no shell needed in the image). A path cannot reach outside the sandbox's root, `..` is refused up front,
//! and a symlink anywhere in the path, or a target that is not a regular file (a device, a FIFO), is
//! refused, so a read cannot stream `/dev/zero` and a write cannot be redirected.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tartarus_shim::protocol::MAX_FILE_BYTES;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::sandboxes::call_error;
use crate::{audit, find, AppState};

/// Largest file moved in one request.
pub const MAX_FILE: usize = MAX_FILE_BYTES;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// `1` to list a directory instead of reading a file.
    pub list: Option<u8>,
}

/// One entry of a directory listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct DirEntry {
    pub name: String,
    /// file, dir, symlink or other
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
}

fn check_path(path: &str) -> Result<(), ApiError> {
    let bad = |why: &str| Err(ApiError::invalid(format!("path '{path}' {why}")));
    if !path.starts_with('/') {
        return bad("must be absolute");
    }
    if path.split('/').any(|c| c == "..") {
        return bad("must not contain '..'");
    }
    if path.contains('\0') || path.len() > 4096 {
        return bad("is not a valid path");
    }
    Ok(())
}

/// The local sandbox `id` that a file operation may use.
async fn live_local(
    state: &AppState,
    caller: &Caller,
    id: &str,
    path: &str,
) -> Result<tartarus_store::SandboxRecord, ApiError> {
    check_path(path)?;
    let record = find(state, caller, id).await?;
    if !record.status.is_live() {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}",
            record.status.as_str()
        )));
    }
    if record.paused {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is paused; resume it first"
        )));
    }
    Ok(record)
}

/// Write a file (the request body) inside a sandbox.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", params(FileQuery), request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    security(("api_key" = [])),
    responses((status = 204), (status = 403, body = ErrorBody, description = "the sandbox refused: a read-only or denied path"),
               (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the sandbox is paused or has ended"),
               (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn put_file(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<FileQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_mutate()?;
    if query.list.is_some() {
        return Err(ApiError::invalid("'list' applies to GET only"));
    }
    if let Some(answer) = on_node(&state, &caller, &id, reqwest::Method::PUT, &query, body.clone()).await? {
        let outcome = if answer.status().is_success() {
            "ok"
        } else {
            "failed"
        };
        audit(&state, &caller, "sandbox.file.write", Some(&id), outcome).await;
        return Ok(answer);
    }
    if body.len() > MAX_FILE {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "files over 4 MiB cannot be written yet",
        ));
    }
    let result = match live_local(&state, &caller, &id, &query.path).await {
        Ok(record) => state
            .manager
            .shim(&record)
            .write_file(&query.path, body.to_vec())
            .await
            .map_err(|e| call_error(&id, e)),
        Err(e) => Err(e),
    };
    audit(
        &state,
        &caller,
        "sandbox.file.write",
        Some(&id),
        if result.is_ok() { "ok" } else { "failed" },
    )
    .await;
    result.map(|_| StatusCode::NO_CONTENT.into_response())
}

/// For a sandbox on a cluster node: the same request forwarded to the node (checked here first).
async fn on_node(
    state: &AppState,
    caller: &Caller,
    id: &str,
    method: reqwest::Method,
    query: &FileQuery,
    body: Bytes,
) -> Result<Option<Response>, ApiError> {
    let record = find(state, caller, id).await?;
    if record.node.is_none() {
        return Ok(None);
    }
    check_path(&query.path)?;
    let list = query.list.map(|l| l.to_string());
    let mut params = vec![("path", query.path.as_str())];
    if let Some(list) = &list {
        params.push(("list", list));
    }
    let content_type = (method == reqwest::Method::PUT).then_some("application/octet-stream");
    crate::cluster::forward(state, &record, method, ("/files", &params), content_type, body)
        .await
        .map(Some)
}

/// Read a file, or list a directory with `list=1`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", params(FileQuery), security(("api_key" = [])),
    responses((status = 200, description = "the file's bytes, or a JSON array of DirEntry with list=1"),
               (status = 403, body = ErrorBody, description = "the sandbox refused: a denied path"),
               (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the sandbox is paused or has ended"),
               (status = 413, body = ErrorBody, description = "the file is over 4 MiB"), (status = 422, body = ErrorBody)))]
pub async fn get_file(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<FileQuery>,
) -> Result<Response, ApiError> {
    if let Some(answer) = on_node(&state, &caller, &id, reqwest::Method::GET, &query, Bytes::new()).await? {
        return Ok(answer);
    }
    let listing = query.list.is_some_and(|l| l != 0);
    let record = live_local(&state, &caller, &id, &query.path).await?;
    let shim = state.manager.shim(&record);
    if !listing {
        let bytes = shim
            .read_file(&query.path)
            .await
            .map_err(|e| call_error(&id, e))?;
        return Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response());
    }
    let entries: Vec<DirEntry> = shim
        .list_dir(&query.path)
        .await
        .map_err(|e| call_error(&id, e))?
        .into_iter()
        .map(|entry| DirEntry {
            name: entry.name,
            kind: entry.kind.as_str(),
            size: entry.size,
        })
        .collect();
    Ok(Json(entries).into_response())
}
