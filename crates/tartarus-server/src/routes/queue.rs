//! `/v1/queue`: requests waiting for a node, and dead letters.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tartarus_store::{Lane, QueueItem};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/queue", get(list_queue))
        .route("/v1/queue/{id}", get(get_queued))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct QueueQuery {
    /// Admins only: one tenant's items.
    tenant: Option<String>,
}

/// A queue item as shown: its payload (the compiled request) is the control plane's.
fn shown(mut item: QueueItem) -> QueueItem {
    item.payload = String::new();
    item
}

/// Requests waiting for a node (in dequeue order) and dead letters, with the depth of each lane.
#[utoipa::path(get, path = "/v1/queue", tag = "cluster", params(QueueQuery), security(("api_key" = [])),
    responses((status = 200), (status = 403, description = "a user key naming another tenant")))]
pub async fn list_queue(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<QueueQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let tenant = caller.scope_for(query.tenant.as_deref(), "queue")?;
    let mut depth = serde_json::Map::new();
    for lane in Lane::ALL {
        depth.insert(
            lane.as_str().into(),
            state.store.queue_depth(Some(lane)).await?.into(),
        );
    }
    let waiting: Vec<_> = state.store.queued(tenant).await?.into_iter().map(shown).collect();
    let dead: Vec<_> = state
        .store
        .dead_letters(tenant)
        .await?
        .into_iter()
        .map(shown)
        .collect();
    Ok(Json(
        serde_json::json!({"depth": depth, "waiting": waiting, "dead_letters": dead}),
    ))
}

/// One queued request: waiting (with why), placed (with its sandbox) or dead.
#[utoipa::path(get, path = "/v1/queue/{id}", tag = "cluster", security(("api_key" = [])),
    responses((status = 200), (status = 404)))]
pub async fn get_queued(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<QueueItem>, ApiError> {
    let item = state
        .store
        .queue_item(&id)
        .await?
        .filter(|i| caller.scope().is_none_or(|t| t == i.tenant))
        .ok_or_else(|| ApiError::not_found(format!("no queued request '{id}'")))?;
    Ok(Json(shown(item)))
}
