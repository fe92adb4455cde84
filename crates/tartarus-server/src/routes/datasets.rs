//! `/v1/datasets`: datasets built from episodes by a query, their manifests stored as blobs.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tartarus_effects::dataset::{build_manifest, DatasetQuery, EpisodeFacts};
use tartarus_store::DatasetRecord;
use utoipa::ToSchema;

use super::episodes::facts;
use crate::auth::Caller;
use crate::effects::fact_fields;
use crate::error::ApiError;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/datasets", post(build_dataset).get(list_datasets))
}

/// A built dataset.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DatasetView {
    /// The manifest's blob id: the same query over the same episodes gives the same id.
    pub id: String,
    pub episodes: u64,
    pub matched: u64,
    pub strata: BTreeMap<String, u64>,
}

/// Build a dataset from the caller's episodes (all tenants' for admins): a query (filter, sample with a
/// seed, stratify), and a manifest stored as a blob.
#[utoipa::path(post, path = "/v1/datasets", tag = "records", security(("api_key" = [])),
    request_body(content = Object, description = "the dataset query (effects-v1 §13)"),
    responses((status = 201, body = DatasetView), (status = 422)))]
pub async fn build_dataset(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<DatasetView>), ApiError> {
    caller.require_mutate()?;
    let internal = |e: tartarus_effects::EffectsError| ApiError::internal(e.to_string());
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::invalid("the query must be UTF-8 JSON"))?;
    let query =
        DatasetQuery::from_json(text).map_err(|e| ApiError::invalid(format!("dataset query: {e}")))?;
    let episodes = state.store.episodes(caller.scope()).await?;
    let signals = state.store.signals(None, caller.scope()).await?;
    let mut candidates = Vec::with_capacity(episodes.len());
    for episode in &episodes {
        candidates.push(EpisodeFacts {
            episode: episode.id.parse().map_err(internal)?,
            fields: fact_fields(&facts(episode, &signals)?),
        });
    }
    let manifest =
        build_manifest(&query, &candidates).map_err(|e| ApiError::invalid(format!("dataset query: {e}")))?;
    let bytes = manifest.to_bytes().map_err(internal)?;
    let blobs = std::sync::Arc::clone(&state.effects.blobs);
    let tenant = caller.tenant.clone();
    let put = tokio::task::spawn_blocking(move || blobs.put(&tenant, bytes.as_slice()))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(crate::routes::blobs::blob_error)?;
    let view = DatasetView {
        id: put.cid.to_string(),
        episodes: manifest.episodes.len() as u64,
        matched: manifest.matched,
        strata: manifest.strata.clone(),
    };
    state
        .store
        .insert_dataset(&DatasetRecord {
            id: view.id.clone(),
            tenant: caller.tenant.clone(),
            query: text.to_string(),
            episodes: view.episodes as i64,
            created_ms: tartarus_store::now_ms(),
        })
        .await?;
    crate::audit(&state, &caller, "dataset.build", Some(&view.id), "ok").await;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Datasets built, oldest first.
#[utoipa::path(get, path = "/v1/datasets", tag = "records", security(("api_key" = [])), responses((status = 200)))]
pub async fn list_datasets(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<DatasetRecord>>, ApiError> {
    Ok(Json(state.store.datasets(caller.scope()).await?))
}
