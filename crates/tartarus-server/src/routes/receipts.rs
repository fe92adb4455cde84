//! `/v1/receipts`: the signed receipts of tool calls.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use tartarus_effects::{Receipt, Signed};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/receipts", get(list_receipts))
        .route("/v1/receipts/{id}", get(get_receipt))
}

/// A receipt as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReceiptView {
    /// The receipt's id: CID of the envelope bytes.
    pub id: String,
    pub tool: String,
    pub sandbox: String,
    pub tenant: String,
    pub status: String,
    pub code: Option<i64>,
    pub idempotency_key: Option<String>,
    pub request_hash: String,
    pub response_hash: Option<String>,
    pub started_at: u64,
    pub finished_at: u64,
    /// The key that signed it.
    pub kid: String,
    /// The signed envelope (DAG-CBOR), base64: what `tartarus receipts verify` checks.
    pub envelope: String,
}

fn receipt_view(state: &AppState, id: &str, envelope_bytes: &[u8]) -> Result<ReceiptView, ApiError> {
    let (envelope, receipt) = state
        .effects
        .with_keyring(|keys| Receipt::verify(keys, envelope_bytes))
        .map_err(|e| ApiError::internal(format!("stored receipt {id} does not verify: {e}")))?;
    Ok(ReceiptView {
        id: id.to_string(),
        tool: receipt.tool,
        sandbox: receipt.sandbox,
        tenant: receipt.tenant,
        status: receipt.status,
        code: receipt.code,
        idempotency_key: receipt.idempotency_key,
        request_hash: receipt.request_hash.to_string(),
        response_hash: receipt.response_hash.map(|c| c.to_string()),
        started_at: receipt.started_at,
        finished_at: receipt.finished_at,
        kid: envelope.kid,
        envelope: base64::engine::general_purpose::STANDARD.encode(envelope_bytes),
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReceiptQuery {
    sandbox: Option<String>,
    /// Admins only: one tenant's receipts.
    tenant: Option<String>,
}

/// Receipts of tool calls, oldest first.
#[utoipa::path(get, path = "/v1/receipts", tag = "records", params(ReceiptQuery), security(("api_key" = [])),
    responses((status = 200, body = [ReceiptView]), (status = 403, description = "a user key naming another tenant")))]
pub async fn list_receipts(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ReceiptQuery>, QueryRejection>,
) -> Result<Json<Vec<ReceiptView>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let tenant = caller.scope_for(query.tenant.as_deref(), "receipts")?;
    let records = state.store.receipts(tenant, query.sandbox.as_deref()).await?;
    records
        .iter()
        .map(|r| receipt_view(&state, &r.id, &r.envelope))
        .collect::<Result<_, _>>()
        .map(Json)
}

/// One receipt; `Accept: application/cbor` gives the signed envelope's bytes.
#[utoipa::path(get, path = "/v1/receipts/{id}", tag = "records", security(("api_key" = [])),
    responses((status = 200, body = ReceiptView), (status = 404)))]
pub async fn get_receipt(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let record = state
        .store
        .receipt(&id, caller.scope())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no receipt '{id}'")))?;
    if wants_cbor(&headers) {
        return Ok(([(header::CONTENT_TYPE, "application/cbor")], record.envelope).into_response());
    }
    Ok(Json(receipt_view(&state, &record.id, &record.envelope)?).into_response())
}

fn wants_cbor(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/cbor"))
}
