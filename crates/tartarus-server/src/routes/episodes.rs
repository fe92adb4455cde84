//! `/v1/episodes`: the signed record of each ended sandbox run (list, one, export as CAR), and a running
//! sandbox's trace so far.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tartarus_effects::episode::TraceRecord;
use tartarus_effects::Cid;
use tartarus_store::{EpisodeRecord, SignalRecord};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::effects::facts_with_signals;
use crate::error::ApiError;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/episodes", get(list_episodes))
        .route("/v1/episodes/{id}", get(get_episode))
        .route("/v1/episodes/{id}/export", get(export_episode))
        .route("/v1/sandboxes/{id}/trace", get(sandbox_trace))
}

/// An episode as listed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EpisodeView {
    pub id: String,
    pub sandbox: String,
    pub tenant: String,
    pub created_ms: i64,
    /// The queryable fields (what dataset queries filter on), with the latest signals.
    #[schema(value_type = Object)]
    pub facts: serde_json::Value,
}

/// The episode's facts with its latest signals (see [`facts_with_signals`]).
pub(super) fn facts(
    episode: &EpisodeRecord,
    signals: &[SignalRecord],
) -> Result<serde_json::Value, ApiError> {
    facts_with_signals(&episode.facts, &episode.id, signals).map_err(|e| ApiError::internal(e.to_string()))
}

fn episode_view(episode: EpisodeRecord, signals: &[SignalRecord]) -> Result<EpisodeView, ApiError> {
    Ok(EpisodeView {
        facts: facts(&episode, signals)?,
        id: episode.id,
        sandbox: episode.sandbox,
        tenant: episode.tenant,
        created_ms: episode.created_ms,
    })
}

/// Episodes: one per ended sandbox, oldest first.
#[utoipa::path(get, path = "/v1/episodes", tag = "records", security(("api_key" = [])),
    responses((status = 200, body = [EpisodeView])))]
pub async fn list_episodes(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<EpisodeView>>, ApiError> {
    let episodes = state.store.episodes(caller.scope()).await?;
    let signals = state.store.signals(None, caller.scope()).await?;
    let views = episodes
        .into_iter()
        .map(|episode| episode_view(episode, &signals))
        .collect::<Result<_, _>>()?;
    Ok(Json(views))
}

/// One episode, by its id or its sandbox's id.
#[utoipa::path(get, path = "/v1/episodes/{id}", tag = "records", security(("api_key" = [])),
    responses((status = 200, body = EpisodeView), (status = 404)))]
pub async fn get_episode(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<EpisodeView>, ApiError> {
    let episode = find_episode(&state, &caller, &id).await?;
    let signals = state.store.signals(Some(&episode.id), None).await?;
    Ok(Json(episode_view(episode, &signals)?))
}

/// The caller's episode `id` (an episode id or its sandbox's id).
pub(super) async fn find_episode(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<EpisodeRecord, ApiError> {
    state.store.episode(id, caller.scope()).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no episode '{id}' (an episode is sealed when its sandbox ends; see GET /v1/episodes)"
        ))
    })
}

/// The episode as a CAR file (effects-v1 §11): the signed episode, its trace records, receipts, signals,
/// blobs up to 16 MiB, and the public keys that signed them. `tartarus episode verify` checks it offline.
#[utoipa::path(get, path = "/v1/episodes/{id}/export", tag = "records", security(("api_key" = [])),
    responses((status = 200, description = "CARv1", content_type = "application/vnd.ipld.car"), (status = 404)))]
pub async fn export_episode(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let episode = find_episode(&state, &caller, &id).await?;
    let car = state.effects.export(&episode).await?;
    let disposition = format!("attachment; filename=\"{}.car\"", episode.sandbox);
    Ok((
        [
            (header::CONTENT_TYPE, "application/vnd.ipld.car".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        car,
    )
        .into_response())
}

/// A sandbox's trace so far, decoded (for `tartarus inspect` and debugging; the episode is the record).
pub async fn sandbox_trace(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    crate::find(&state, &caller, &id).await?;
    let internal = |e: tartarus_effects::EffectsError| ApiError::internal(e.to_string());
    let mut out = Vec::new();
    for row in state.store.trace(&id).await? {
        let record: TraceRecord = tartarus_effects::decode(&row.record).map_err(internal)?;
        out.push(serde_json::json!({
            "seq": record.seq, "at": record.at, "kind": record.kind,
            "cid": Cid::of_encoded(&row.record).map_err(internal)?.to_string(),
            "attrs": serde_json::to_value(&record.attrs).unwrap_or_default(),
        }));
    }
    Ok(Json(out))
}
