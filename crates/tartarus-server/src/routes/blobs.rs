//! The blob store over HTTP: `PUT /v1/blobs` (streamed, any size up to the tenant's quota),
//! `GET /v1/blobs/{cid}` (verified while it streams; `Range: bytes=…` for a plain part, or
//! `?offset=&len=` for a range *proof* the client verifies against the id alone), `DELETE` (drop the
//! tenant's reference) and `POST /v1/blobs/gc` (admins: remove what nobody references).
//!
//! A tenant reads only blobs it holds a reference to: knowing an id is not enough, so ids do not leak
//! content across tenants.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use tartarus_effects::{BlobError, Cid};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

/// The media type of a range proof (effects-v1 §9.4).
pub const PROOF_TYPE: &str = "application/vnd.tartarus.range-proof";

/// What a put stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BlobPut {
    /// The blob's id (raw CID, BLAKE3).
    pub cid: String,
    pub size: u64,
    /// False when this tenant already held the content (whatever other tenants hold: the answer never
    /// depends on them).
    pub stored: bool,
    /// The tenant's usage after the put, in bytes.
    pub usage: u64,
}

pub(crate) fn blob_error(e: BlobError) -> ApiError {
    let message = tartarus_runtime::error_chain(&e);
    match e.kind() {
        "quota_exceeded" => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "quota_exceeded", message),
        "not_found" => ApiError::not_found(message),
        "invalid_tenant" | "not_a_blob" | "input" | "range_out_of_bounds" => ApiError::invalid(message),
        _ => ApiError::internal(message),
    }
}

fn parse_cid(text: &str) -> Result<Cid, ApiError> {
    text.parse::<Cid>()
        .map_err(|e| ApiError::invalid(format!("'{text}' is not a blob id: {e}")))
}

/// Store the request body as a blob of the caller's tenant.
#[utoipa::path(put, path = "/v1/blobs", security(("api_key" = [])),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = BlobPut), (status = 507, description = "over the tenant's quota")))]
pub async fn put_blob(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<(StatusCode, Json<BlobPut>), ApiError> {
    caller.require_mutate()?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    // Large reads: each read of the bridge blocks on the runtime once.
    let reader = std::io::BufReader::with_capacity(
        1 << 20,
        tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream)),
    );
    let blobs = Arc::clone(&state.effects.blobs);
    let tenant = caller.tenant.clone();
    let put = tokio::task::spawn_blocking(move || {
        let put = blobs.put(&tenant, reader)?;
        Ok::<_, BlobError>((put, blobs.usage(&tenant)?))
    })
    .await
    .map_err(|e| ApiError::internal(format!("blob put: {e}")))?;
    let (put, usage) = put.map_err(blob_error)?;
    crate::audit(&state, &caller, "blob.put", Some(&put.cid.to_string()), "ok").await;
    Ok((
        StatusCode::CREATED,
        Json(BlobPut {
            cid: put.cid.to_string(),
            size: put.size,
            stored: put.added,
            usage,
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ProofQuery {
    /// With `len`: answer with a range proof of these bytes instead of the blob.
    offset: Option<u64>,
    len: Option<u64>,
}

/// Read a blob (verified against its id while streaming), a `Range` of it, or a range proof.
#[utoipa::path(get, path = "/v1/blobs/{cid}", security(("api_key" = [])),
    params(ProofQuery, ("Range" = Option<String>, Header, description = "one range: bytes=A-B, bytes=A- or bytes=-N")),
    responses((status = 200, description = "the blob, or with `offset` and `len` the range proof",
               content((String = "application/octet-stream"), (String = "application/vnd.tartarus.range-proof"))),
               (status = 206, description = "the requested Range", content_type = "application/octet-stream"),
               (status = 404), (status = 416)))]
pub async fn get_blob(
    State(state): State<AppState>,
    caller: Caller,
    Path(cid): Path<String>,
    query: Result<Query<ProofQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let cid = parse_cid(&cid)?;
    let blobs = Arc::clone(&state.effects.blobs);
    let size = {
        let (blobs, tenant, cid) = (Arc::clone(&blobs), caller.tenant.clone(), cid);
        tokio::task::spawn_blocking(move || blobs.referenced_size(&tenant, &cid))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(blob_error)?
            .ok_or_else(|| ApiError::not_found(format!("no blob {cid} for tenant '{}'", caller.tenant)))?
    };
    let range = match (query.offset, query.len) {
        (Some(offset), Some(len)) => Some((offset, len, true)),
        (None, None) => match headers.get(header::RANGE) {
            Some(value) => Some(parse_range(value, size)?).map(|(o, l)| (o, l, false)),
            None => None,
        },
        _ => {
            return Err(ApiError::invalid(
                "give both 'offset' and 'len' for a range proof",
            ))
        }
    };
    if let Some((offset, len, proof)) = range {
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_out_of_bounds",
                format!(
                    "bytes {offset}..{} are outside the blob's {size} bytes",
                    offset.saturating_add(len)
                ),
            ));
        }
        let read = tokio::task::spawn_blocking(move || blobs.get_range(&cid, offset, len))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(blob_error)?;
        if proof {
            return Ok(([(header::CONTENT_TYPE, PROOF_TYPE)], read.proof).into_response());
        }
        let mut response = (StatusCode::PARTIAL_CONTENT, read.data).into_response();
        let content_range = format!("bytes {offset}-{}/{size}", offset + len - 1);
        if let Ok(value) = HeaderValue::from_str(&content_range) {
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
        return Ok(response);
    }
    // Stream: a blocking reader verifies each 16 KiB group before it is written into the pipe. If a group
    // fails, the pipe closes early and the response is shorter than its Content-Length: the client sees
    // an error, never unverified bytes.
    let (writer, reader) = tokio::io::duplex(256 * 1024);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = blobs.get(&cid, tokio_util::io::SyncIoBridge::new(writer)) {
            tracing::error!("serving blob {cid}: {}", tartarus_runtime::error_chain(&e));
        }
    });
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(reader));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
            (header::ACCEPT_RANGES, "bytes".to_string()),
        ],
        body,
    )
        .into_response())
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N` (one range) → (offset, len).
fn parse_range(value: &HeaderValue, size: u64) -> Result<(u64, u64), ApiError> {
    let bad = || ApiError::invalid("Range must be one range: bytes=A-B, bytes=A- or bytes=-N");
    let text = value.to_str().map_err(|_| bad())?;
    let spec = text.strip_prefix("bytes=").ok_or_else(bad)?;
    let (start, end) = spec.split_once('-').ok_or_else(bad)?;
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
    let (offset, last) = match (start.trim().is_empty(), end.trim().is_empty()) {
        (false, false) => (num(start)?, num(end)?),
        (false, true) => (num(start)?, size.saturating_sub(1)),
        (true, false) => {
            let n = num(end)?.min(size);
            (size - n, size.saturating_sub(1))
        }
        (true, true) => return Err(bad()),
    };
    if last < offset || size == 0 {
        return Err(ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_out_of_bounds",
            format!("range {text} is empty or outside the blob's {size} bytes"),
        ));
    }
    Ok((offset, last - offset + 1))
}

/// Drop the caller's tenant's reference to a blob (collected later if nobody else holds it).
#[utoipa::path(delete, path = "/v1/blobs/{cid}", security(("api_key" = [])), responses((status = 204), (status = 404)))]
pub async fn delete_blob(
    State(state): State<AppState>,
    caller: Caller,
    Path(cid): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_mutate()?;
    let cid = parse_cid(&cid)?;
    let blobs = Arc::clone(&state.effects.blobs);
    let tenant = caller.tenant.clone();
    let released = tokio::task::spawn_blocking(move || blobs.release(&tenant, &cid))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(blob_error)?;
    if !released {
        return Err(ApiError::not_found(format!(
            "no blob {cid} for tenant '{}'",
            caller.tenant
        )));
    }
    crate::audit(&state, &caller, "blob.delete", Some(&cid.to_string()), "ok").await;
    Ok(StatusCode::NO_CONTENT)
}

/// What a collection removed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GcView {
    pub blobs_removed: u64,
    pub bytes_freed: u64,
}

/// Remove every blob no tenant references. Admin only.
#[utoipa::path(post, path = "/v1/blobs/gc", security(("api_key" = [])), responses((status = 200, body = GcView), (status = 403)))]
pub async fn gc_blobs(State(state): State<AppState>, caller: Caller) -> Result<Json<GcView>, ApiError> {
    if caller.role != tartarus_store::Role::Admin {
        return Err(ApiError::forbidden("only admin keys may collect blobs"));
    }
    let blobs = Arc::clone(&state.effects.blobs);
    let report = tokio::task::spawn_blocking(move || blobs.gc())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(blob_error)?;
    crate::audit(&state, &caller, "blob.gc", None, "ok").await;
    Ok(Json(GcView {
        blobs_removed: report.blobs_removed,
        bytes_freed: report.bytes_freed,
    }))
}
