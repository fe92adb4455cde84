//! `/healthz` and `/metrics`.

use axum::extract::State;
use axum::Json;
use serde_json::json;

use crate::error::ApiError;
use crate::{metrics, AppState};

/// Liveness.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "ok")))]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Prometheus text format. Unauthenticated, like /healthz: serve it on an address scrapers can reach.
pub(crate) async fn metrics_text(State(state): State<AppState>) -> Result<String, ApiError> {
    let handle = state
        .metrics
        .as_ref()
        .ok_or_else(|| ApiError::internal("metrics recorder not installed"))?;
    metrics::refresh(&state).await?;
    Ok(handle.render())
}
