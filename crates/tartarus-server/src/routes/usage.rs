//! `/v1/sandboxes/{id}/usage` and `/v1/usage`: what sandboxes used and, with a price table, what it
//! costs (`crate::usage`). `/v1/whoami`: the caller's tenant and role (what the web dashboard mirrors).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::usage::{self, SandboxUsage, UsageReport};
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/sandboxes/{id}/usage", get(sandbox_usage))
        .route("/v1/usage", get(usage_report))
        .route("/v1/whoami", get(whoami))
}

/// What one sandbox used: CPU-seconds, memory GiB-seconds, egress, tool calls, snapshot bytes (and cost
/// with a price table); growing while it runs, kept after it ended.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/usage", tag = "usage", security(("api_key" = [])),
    responses((status = 200, body = SandboxUsage), (status = 404, body = ErrorBody)))]
pub async fn sandbox_usage(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxUsage>, ApiError> {
    // Another tenant's sandbox is reported exactly like a missing one.
    let record = state
        .store
        .sandbox_usage(&id, caller.scope())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no sandbox '{id}'")))?;
    let now = tartarus_store::now_ms();
    Ok(Json(usage::view(&record, now, state.prices.as_deref())))
}

/// `GET /v1/usage` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Admins only: one tenant (default: every tenant); other keys always get their own tenant's.
    pub tenant: Option<String>,
    /// Count sandboxes live at some time at or after this, in milliseconds since the Unix epoch
    /// (default 0: all).
    pub since: Option<i64>,
    /// At most this many sandboxes in `sandboxes`, newest first (default 1000, at most 10000); the
    /// tenants' totals count them all.
    pub limit: Option<usize>,
}

const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;

/// Usage per tenant and per sandbox (newest first), with cost when the server has a price table.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", params(UsageQuery), security(("api_key" = [])),
    responses((status = 200, body = UsageReport),
               (status = 403, body = ErrorBody, description = "a non-admin key naming another tenant")))]
pub async fn usage_report(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<UsageReport>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let tenant = caller.scope_for(query.tenant.as_deref(), "usage")?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit > MAX_LIMIT {
        return Err(ApiError::invalid(format!(
            "limit {limit} is more than {MAX_LIMIT}"
        )));
    }
    let since_ms = query.since.unwrap_or(0);
    if since_ms < 0 {
        return Err(ApiError::invalid(
            "since must be milliseconds since the Unix epoch, not negative",
        ));
    }
    let records = state.store.usage_of(tenant, since_ms).await?;
    let now = tartarus_store::now_ms();
    let prices = state.prices.as_deref();
    let mut sandboxes: Vec<SandboxUsage> = records.iter().map(|r| usage::view(r, now, prices)).collect();
    let tenants = usage::per_tenant(&sandboxes, prices);
    sandboxes.truncate(limit);
    Ok(Json(UsageReport {
        since_ms,
        tenants,
        sandboxes,
    }))
}

/// Who the caller is.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    pub key_id: String,
    pub tenant: String,
    /// `admin`, `user` or `viewer` (viewers cannot change anything).
    pub role: String,
    /// Whether this key may create, change or end things.
    pub can_mutate: bool,
}

/// The calling key's tenant and role.
#[utoipa::path(get, path = "/v1/whoami", tag = "usage", security(("api_key" = [])),
    responses((status = 200, body = Whoami)))]
pub async fn whoami(caller: Caller) -> Json<Whoami> {
    Json(Whoami {
        key_id: caller.key_id.clone(),
        tenant: caller.tenant.clone(),
        role: caller.role.as_str().to_string(),
        can_mutate: caller.role.can_mutate(),
    })
}
