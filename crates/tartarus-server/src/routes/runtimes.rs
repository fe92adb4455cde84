//! `/v1/runtimes`: the isolation lanes this server can run sandboxes on.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/runtimes", get(list_runtimes))
}

/// One isolation lane of this server's machine (a node agent reads its own server's).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RuntimeView {
    /// `process` or `gvisor`: what a create's `runtime` names.
    pub name: String,
    /// Whether sandboxes can run on it here.
    pub available: bool,
    /// Why not, with what to install or change.
    pub reason: Option<String>,
    /// The engine's version (the kernel's release for the process lane, runsc's for gVisor).
    pub version: Option<String>,
    /// How it runs here, e.g. the gVisor platform.
    pub detail: Option<String>,
    /// Why `auto` does not choose it here although it runs (a microVM lane whose guests are emulated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulated: Option<String>,
}

/// The isolation lanes of this server (a create's `runtime`), with why each unavailable one cannot run.
#[utoipa::path(get, path = "/v1/runtimes", security(("api_key" = [])),
    responses((status = 200, body = [RuntimeView]), (status = 401, body = crate::error::ErrorBody)))]
pub(crate) async fn list_runtimes(State(state): State<AppState>, _caller: Caller) -> Json<Vec<RuntimeView>> {
    let views = state
        .manager
        .runtimes()
        .reports()
        .iter()
        .map(|r| RuntimeView {
            name: r.name.to_string(),
            available: r.available,
            reason: r.reason.clone(),
            version: r.version.clone(),
            detail: r.detail.clone(),
            emulated: r.emulated.clone(),
        })
        .collect();
    Json(views)
}
