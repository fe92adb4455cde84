//! `/v1/episodes/{id}/signals`: verdicts about an episode, signed by a registered evaluator.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tartarus_effects::episode::Signal;
use tartarus_effects::{Cid, Envelope, Signed};
use tartarus_store::SignalRecord;
use utoipa::ToSchema;

use super::episodes::find_episode;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/episodes/{id}/signals", post(add_signal).get(list_signals))
}

/// A stored signal.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SignalView {
    pub id: String,
    pub episode: String,
    pub evaluator: String,
    pub name: String,
    pub score: Option<i64>,
    pub label: Option<String>,
    pub at_ms: i64,
}

/// Attach a signal to an episode: the body is a signal envelope (DAG-CBOR, `application/cbor`) signed by
/// a registered evaluator's key. It is verified before it is stored.
#[utoipa::path(post, path = "/v1/episodes/{id}/signals", tag = "records", security(("api_key" = [])),
    request_body(content = Vec<u8>, content_type = "application/cbor"),
    responses((status = 201, body = SignalView), (status = 404), (status = 422)))]
pub async fn add_signal(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<SignalView>), ApiError> {
    caller.require_mutate()?;
    let episode = find_episode(&state, &caller, &id).await?;
    let refused = |e: &dyn std::fmt::Display| ApiError::invalid(format!("signal refused: {e}"));
    let envelope = Envelope::decode(&body).map_err(|e| refused(&e))?;
    let owner = state
        .store
        .evaluator_keys(None)
        .await?
        .into_iter()
        .find(|k| k.kid == envelope.kid)
        .ok_or_else(|| {
            refused(&format!(
                "key {} is not a registered evaluator key (POST /v1/evaluators)",
                envelope.kid
            ))
        })?;
    let keys = state.effects.evaluator_keys(&owner.name).await?;
    let (_, signal) = Signal::verify(&keys, &body).map_err(|e| refused(&e))?;
    if signal.evaluator != owner.name {
        return Err(refused(&format!(
            "signed by evaluator '{}' but names evaluator '{}'",
            owner.name, signal.evaluator
        )));
    }
    if signal.episode.to_string() != episode.id {
        return Err(refused(&format!(
            "it is about episode {}, not {}",
            signal.episode, episode.id
        )));
    }
    let signal_id = Cid::of_encoded(&body)
        .map_err(|e| ApiError::internal(e.to_string()))?
        .to_string();
    let record = SignalRecord {
        id: signal_id.clone(),
        episode: episode.id.clone(),
        tenant: episode.tenant.clone(),
        evaluator: signal.evaluator.clone(),
        name: signal.name.clone(),
        score: signal.score,
        label: signal.label.clone(),
        at_ms: i64::try_from(signal.at).unwrap_or(i64::MAX),
        envelope: body.to_vec(),
    };
    state.store.insert_signal(&record).await?;
    crate::audit(&state, &caller, "signal.add", Some(&signal_id), "ok").await;
    Ok((StatusCode::CREATED, Json(signal_view(&record))))
}

fn signal_view(record: &SignalRecord) -> SignalView {
    SignalView {
        id: record.id.clone(),
        episode: record.episode.clone(),
        evaluator: record.evaluator.clone(),
        name: record.name.clone(),
        score: record.score,
        label: record.label.clone(),
        at_ms: record.at_ms,
    }
}

/// An episode's signals, oldest first.
#[utoipa::path(get, path = "/v1/episodes/{id}/signals", tag = "records", security(("api_key" = [])),
    responses((status = 200, body = [SignalView]), (status = 404)))]
pub async fn list_signals(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<SignalView>>, ApiError> {
    let episode = find_episode(&state, &caller, &id).await?;
    let signals = state.store.signals(Some(&episode.id), None).await?;
    Ok(Json(signals.iter().map(signal_view).collect()))
}
