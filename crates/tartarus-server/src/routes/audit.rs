//! `GET /v1/audit`.

use axum::extract::{Query, State};
use axum::Json;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    /// Admins only: one tenant's records (others always see their own tenant's).
    pub tenant: Option<String>,
    /// Only records at or after this time (milliseconds since the Unix epoch).
    pub since_ms: Option<i64>,
}

/// The audit trail, newest first: every mutating call with its tenant, key, target and outcome.
#[utoipa::path(get, path = "/v1/audit", params(AuditQuery), security(("api_key" = [])),
    responses((status = 200, description = "audit records, newest first"), (status = 401, body = ErrorBody),
               (status = 403, body = ErrorBody, description = "a user key naming another tenant")))]
pub(crate) async fn list_audit(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<tartarus_store::AuditRecord>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let tenant = caller.scope_for(query.tenant.as_deref(), "audit trail")?;
    Ok(Json(state.store.audit(tenant, query.since_ms).await?))
}
