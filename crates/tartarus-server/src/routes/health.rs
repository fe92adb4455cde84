//! `/healthz` and `/metrics`.

use axum::extract::State;
use axum::Json;
use serde_json::json;

use crate::error::ApiError;
use crate::{metrics, AppState};

/// Liveness, and whether the event bus takes events (its last error is in the server's log).
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "ok")))]
pub(crate) async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    let bus = state.events.health();
    Json(json!({
        "status": "ok",
        "event_bus": {
            "provider": bus.provider,
            "healthy": bus.healthy,
            "pending": bus.pending,
            "dropped": bus.dropped,
        },
    }))
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
