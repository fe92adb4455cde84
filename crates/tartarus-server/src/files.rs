//! Files in a sandbox: `PUT`/`GET /v1/sandboxes/{id}/files?path=/abs/path` and `?list=1` for a directory.
//!
//! Transfers run as fixed shell scripts *inside* the sandbox (the path is an argument, never part of the
//! script), as the sandbox user, under every wall an exec has: a path cannot reach outside the sandbox's
//! root whatever symlinks it holds. `..` is refused up front; symlinks and device files are refused as
//! targets, so a read cannot stream `/dev/zero` and a write cannot be redirected.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::{audit, find, AppState};

/// Largest file moved in one request (the shim caps captured output at the same size).
pub const MAX_FILE: usize = 4 << 20;

const WRITE: &str = r#"p=$1
if [ -L "$p" ] || { [ -e "$p" ] && [ ! -f "$p" ]; }; then echo "not a regular file: $p" >&2; exit 3; fi
d=${p%/*}; [ -d "${d:-/}" ] || { echo "no such directory: ${d:-/}" >&2; exit 4; }
cat > "$p""#;
const READ: &str = r#"p=$1
if [ -L "$p" ] || { [ -e "$p" ] && [ ! -f "$p" ]; }; then echo "not a regular file: $p" >&2; exit 3; fi
[ -e "$p" ] || { echo "no such file: $p" >&2; exit 4; }
exec cat -- "$p""#;
const LIST: &str = r#"p=$1
[ -d "$p" ] && [ ! -L "$p" ] || { echo "no such directory: $p" >&2; exit 4; }
exec find "$p" -mindepth 1 -maxdepth 1 -printf '%y\t%s\t%f\n'"#;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
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

/// Runs one of the scripts on `path`; maps its refusals to API errors.
async fn run(
    state: &AppState,
    caller: &Caller,
    id: &str,
    script: &str,
    path: &str,
    stdin: Option<&[u8]>,
) -> Result<Value, ApiError> {
    check_path(path)?;
    let record = find(state, caller, id).await?;
    if !record.status.is_live() {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}",
            record.status.as_str()
        )));
    }
    let mut request = json!({
        "op": "exec", "command": ["/bin/sh", "-c", script, "sh", path], "binary_output": true, "timeout_ms": 60_000,
    });
    if let Some(bytes) = stdin {
        request["stdin_base64"] = Value::String(BASE64.encode(bytes));
    }
    let reply = state.manager.request(&record, request).await?;
    if let Some(error) = reply.get("error") {
        return Err(ApiError::internal(
            error["message"]
                .as_str()
                .unwrap_or("file transfer failed")
                .to_string(),
        ));
    }
    let message = reply["stderr"].as_str().unwrap_or_default().trim().to_string();
    match reply["exit_code"].as_i64() {
        Some(0) if reply["truncated"] == true => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "files over 4 MiB cannot be read yet",
        )),
        Some(0) => Ok(reply),
        Some(3) => Err(ApiError::invalid(message)),
        Some(4) => Err(ApiError::not_found(message)),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the sandbox refused: {message}"),
        )),
    }
}

/// Write a file (the request body) inside a sandbox.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", params(FileQuery), request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    security(("api_key" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody), (status = 413, body = ErrorBody)))]
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
    let result = run(&state, &caller, &id, WRITE, &query.path, Some(&body)).await;
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
               (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
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
    let reply = run(
        &state,
        &caller,
        &id,
        if listing { LIST } else { READ },
        &query.path,
        None,
    )
    .await?;
    let bytes = BASE64
        .decode(reply["stdout_base64"].as_str().unwrap_or_default())
        .map_err(|e| ApiError::internal(format!("shim output: {e}")))?;
    if !listing {
        return Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response());
    }
    let entries: Vec<DirEntry> = String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, '\t');
            let kind = match parts.next()? {
                "f" => "file",
                "d" => "dir",
                "l" => "symlink",
                _ => "other",
            };
            let size = parts.next()?.parse().ok()?;
            Some(DirEntry {
                name: parts.next()?.to_string(),
                kind,
                size,
            })
        })
        .collect();
    Ok(Json(entries).into_response())
}
