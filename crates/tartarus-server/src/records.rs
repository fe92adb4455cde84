//! What verifiable effects leave behind, over the API: receipts, the server's public keys, episodes (list,
//! export as CAR), evaluators and their signals, and datasets.

use std::collections::BTreeMap;
use tartarus_effects::Signed;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use tartarus_effects::dataset::{build_manifest, DatasetQuery, EpisodeFacts, FactValue};
use tartarus_effects::episode::{write_episode_car, EpisodeBundle, EpisodeKeys, Signal, TraceRecord};
use tartarus_effects::{Cid, Envelope, PublicKeys, Receipt};
use tartarus_store::{DatasetRecord, EvaluatorKey, Role, SignalRecord};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{json_rejection, ApiError};
use crate::AppState;

/// Blobs larger than this are left out of an episode export (the episode still names them).
const EXPORT_BLOB_LIMIT: u64 = 16 << 20;

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(e.to_string())
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
        .map_err(|e| internal(format!("stored receipt {id} does not verify: {e}")))?;
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
#[serde(deny_unknown_fields)]
pub struct ReceiptQuery {
    sandbox: Option<String>,
    /// Admins only: one tenant's receipts.
    tenant: Option<String>,
}

/// Receipts of tool calls, oldest first.
#[utoipa::path(get, path = "/v1/receipts", params(ReceiptQuery), security(("api_key" = [])),
    responses((status = 200, body = [ReceiptView])))]
pub async fn list_receipts(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ReceiptQuery>, axum::extract::rejection::QueryRejection>,
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
#[utoipa::path(get, path = "/v1/receipts/{id}", security(("api_key" = [])),
    responses((status = 200, body = ReceiptView), (status = 404)))]
pub async fn get_receipt(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
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

fn wants_cbor(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/cbor"))
}

/// The server's public keys (effects-v1 §5.4): what receipts and episodes verify against. Public.
pub async fn public_keys(State(state): State<AppState>) -> Response {
    let json = state.effects.with_keyring(|keys| keys.public_keys().to_json());
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

/// Retire the current signing key and start signing with a new one. Admin only.
pub async fn rotate_key(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden("only admin keys may rotate the signing key"));
    }
    let json = {
        let mut keyring = state
            .effects
            .keyring
            .write()
            .map_err(|_| ApiError::internal("keyring lock poisoned"))?;
        keyring.rotate().map_err(internal)?;
        keyring.public_keys().to_json()
    };
    crate::audit(&state, &caller, "keys.rotate", None, "ok").await;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
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

/// Episodes: one per ended sandbox, oldest first.
#[utoipa::path(get, path = "/v1/episodes", security(("api_key" = [])), responses((status = 200, body = [EpisodeView])))]
pub async fn list_episodes(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<EpisodeView>>, ApiError> {
    let episodes = state.store.episodes(caller.scope()).await?;
    let signals = state.store.signals(None, caller.scope()).await?;
    let mut views = Vec::with_capacity(episodes.len());
    for episode in episodes {
        let facts = facts_with_signals(&episode.facts, &episode.id, &signals)?;
        views.push(EpisodeView {
            id: episode.id,
            sandbox: episode.sandbox,
            tenant: episode.tenant,
            created_ms: episode.created_ms,
            facts,
        });
    }
    Ok(Json(views))
}

/// The stored facts plus `signal.<name>.score|label` from the latest signal of each name.
fn facts_with_signals(
    facts: &str,
    episode: &str,
    signals: &[SignalRecord],
) -> Result<serde_json::Value, ApiError> {
    let mut value: serde_json::Value = serde_json::from_str(facts).map_err(internal)?;
    if let Some(map) = value.as_object_mut() {
        // Signals are in time order: a later one of the same name overwrites an earlier one.
        for signal in signals.iter().filter(|s| s.episode == episode) {
            if let Some(score) = signal.score {
                map.insert(format!("signal.{}.score", signal.name), score.into());
            }
            if let Some(label) = &signal.label {
                map.insert(format!("signal.{}.label", signal.name), label.clone().into());
            }
        }
    }
    Ok(value)
}

/// One episode, by its id or its sandbox's id.
#[utoipa::path(get, path = "/v1/episodes/{id}", security(("api_key" = [])), responses((status = 200, body = EpisodeView), (status = 404)))]
pub async fn get_episode(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<EpisodeView>, ApiError> {
    let episode = find_episode(&state, &caller, &id).await?;
    let signals = state.store.signals(Some(&episode.id), None).await?;
    Ok(Json(EpisodeView {
        facts: facts_with_signals(&episode.facts, &episode.id, &signals)?,
        id: episode.id,
        sandbox: episode.sandbox,
        tenant: episode.tenant,
        created_ms: episode.created_ms,
    }))
}

async fn find_episode(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<tartarus_store::EpisodeRecord, ApiError> {
    state.store.episode(id, caller.scope()).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no episode '{id}' (an episode is sealed when its sandbox ends; see GET /v1/episodes)"
        ))
    })
}

/// The episode as a CAR file (effects-v1 §11): the signed episode, its trace records, receipts, signals,
/// blobs up to 16 MiB, and the public keys that signed them. `tartarus episode verify` checks it offline.
#[utoipa::path(get, path = "/v1/episodes/{id}/export", security(("api_key" = [])),
    responses((status = 200, description = "CARv1", content_type = "application/vnd.ipld.car"), (status = 404)))]
pub async fn export_episode(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let episode = find_episode(&state, &caller, &id).await?;
    let (_, payload) = state
        .effects
        .with_keyring(|keys| tartarus_effects::episode::Episode::verify(keys, &episode.envelope))
        .map_err(|e| internal(format!("stored episode does not verify: {e}")))?;
    let records: Vec<Vec<u8>> = state
        .store
        .trace(&episode.sandbox)
        .await?
        .into_iter()
        .map(|r| r.record)
        .filter(|bytes| {
            Cid::of_encoded(bytes)
                .map(|c| payload.trace.contains(&c))
                .unwrap_or(false)
        })
        .collect();
    let receipts: Vec<Vec<u8>> = state
        .store
        .receipts(None, Some(&episode.sandbox))
        .await?
        .into_iter()
        .map(|r| r.envelope)
        .filter(|bytes| {
            Cid::of_encoded(bytes)
                .map(|c| payload.receipts.contains(&c))
                .unwrap_or(false)
        })
        .collect();
    let signal_records = state.store.signals(Some(&episode.id), None).await?;
    let mut evaluators: BTreeMap<String, PublicKeys> = BTreeMap::new();
    for signal in &signal_records {
        if !evaluators.contains_key(&signal.evaluator) {
            evaluators.insert(
                signal.evaluator.clone(),
                evaluator_keys(&state, &signal.evaluator).await?,
            );
        }
    }
    // Blobs the tenant still holds, small enough to carry, without secrets.
    let redactor = match state.store.sandbox(&episode.sandbox, None).await? {
        Some(record) => state.effects.redactor_for(&record),
        None => state.effects.redactor(&[], &[]),
    };
    let mut blobs = Vec::new();
    for cid in &payload.blobs {
        let store = std::sync::Arc::clone(&state.effects.blobs);
        let (tenant, cid) = (episode.tenant.clone(), *cid);
        let bytes = tokio::task::spawn_blocking(move || match store.referenced_size(&tenant, &cid) {
            Ok(Some(size)) if size <= EXPORT_BLOB_LIMIT => {
                let mut out = Vec::with_capacity(size as usize);
                store.get(&cid, &mut out).ok().map(|_| out)
            }
            _ => None,
        })
        .await
        .map_err(internal)?;
        if let Some(bytes) = bytes.filter(|b| !redactor.contains_secret(b)) {
            blobs.push((cid, bytes));
        }
    }
    let bundle = EpisodeBundle {
        episode: episode.envelope.clone(),
        records,
        receipts,
        signals: signal_records.into_iter().map(|s| s.envelope).collect(),
        blobs,
        keys: EpisodeKeys {
            server: state.effects.with_keyring(|k| k.public_keys().clone()),
            evaluators,
        },
    };
    let mut out = Vec::new();
    write_episode_car(&bundle, &mut out).map_err(internal)?;
    let disposition = format!("attachment; filename=\"{}.car\"", episode.sandbox);
    Ok((
        [
            (header::CONTENT_TYPE, "application/vnd.ipld.car".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        out,
    )
        .into_response())
}

async fn evaluator_keys(state: &AppState, name: &str) -> Result<PublicKeys, ApiError> {
    let mut keys = PublicKeys::new();
    for row in state.store.evaluator_keys(Some(name)).await? {
        keys.insert(parse_public_key(&row.public_key).map_err(internal)?);
    }
    Ok(keys)
}

fn parse_public_key(hex_key: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(hex_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("public key '{hex_key}' is not 64 hex digits"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|_| format!("'{hex_key}' is not an Ed25519 public key"))
}

/// Register an evaluator's public key.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddEvaluator {
    /// 1–64 of `a-z`, `0-9`, `-`, `_`, `.`.
    pub name: String,
    /// The Ed25519 public key, 64 hex digits.
    pub public_key: String,
}

/// Allow a key to sign signals as evaluator `name`. Admin only.
#[utoipa::path(post, path = "/v1/evaluators", request_body = AddEvaluator, security(("api_key" = [])),
    responses((status = 201), (status = 403), (status = 422)))]
pub async fn add_evaluator(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<AddEvaluator>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden("only admin keys may register evaluators"));
    }
    let Json(body) = body.map_err(json_rejection)?;
    let name_ok = !body.name.is_empty()
        && body.name.len() <= 64
        && body
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if !name_ok {
        return Err(ApiError::invalid(format!(
            "evaluator name '{}': use 1-64 lower-case letters, digits, '-', '_' or '.'",
            body.name
        )));
    }
    let key = parse_public_key(&body.public_key).map_err(ApiError::invalid)?;
    let kid = tartarus_effects::key_id(&key);
    state
        .store
        .add_evaluator_key(&EvaluatorKey {
            name: body.name.clone(),
            kid: kid.clone(),
            public_key: body.public_key.to_ascii_lowercase(),
            created_ms: tartarus_store::now_ms(),
        })
        .await?;
    crate::audit(&state, &caller, "evaluator.add", Some(&body.name), "ok").await;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"name": body.name, "kid": kid})),
    ))
}

/// Registered evaluator keys.
#[utoipa::path(get, path = "/v1/evaluators", security(("api_key" = [])), responses((status = 200)))]
pub async fn list_evaluators(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Vec<EvaluatorKey>>, ApiError> {
    Ok(Json(state.store.evaluator_keys(None).await?))
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
#[utoipa::path(post, path = "/v1/episodes/{id}/signals", security(("api_key" = [])),
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
    let keys = evaluator_keys(&state, &owner.name).await?;
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
    let signal_id = Cid::of_encoded(&body).map_err(internal)?.to_string();
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
#[utoipa::path(get, path = "/v1/episodes/{id}/signals", security(("api_key" = [])), responses((status = 200, body = [SignalView])))]
pub async fn list_signals(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<SignalView>>, ApiError> {
    let episode = find_episode(&state, &caller, &id).await?;
    let signals = state.store.signals(Some(&episode.id), None).await?;
    Ok(Json(signals.iter().map(signal_view).collect()))
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
#[utoipa::path(post, path = "/v1/datasets", security(("api_key" = [])),
    request_body(content = Object, description = "the dataset query (effects-v1 §13)"),
    responses((status = 201, body = DatasetView), (status = 422)))]
pub async fn build_dataset(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<DatasetView>), ApiError> {
    caller.require_mutate()?;
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::invalid("the query must be UTF-8 JSON"))?;
    let query =
        DatasetQuery::from_json(text).map_err(|e| ApiError::invalid(format!("dataset query: {e}")))?;
    let episodes = state.store.episodes(caller.scope()).await?;
    let signals = state.store.signals(None, caller.scope()).await?;
    let mut candidates = Vec::with_capacity(episodes.len());
    for episode in &episodes {
        let facts = facts_with_signals(&episode.facts, &episode.id, &signals)?;
        let mut fields = BTreeMap::new();
        if let Some(map) = facts.as_object() {
            for (k, v) in map {
                let value = match v {
                    serde_json::Value::String(s) => FactValue::Text(s.clone()),
                    serde_json::Value::Bool(b) => FactValue::Bool(*b),
                    serde_json::Value::Number(n) => match n.as_i64() {
                        Some(i) => FactValue::Int(i),
                        None => continue,
                    },
                    _ => continue,
                };
                fields.insert(k.clone(), value);
            }
        }
        candidates.push(EpisodeFacts {
            episode: episode.id.parse().map_err(internal)?,
            fields,
        });
    }
    let manifest =
        build_manifest(&query, &candidates).map_err(|e| ApiError::invalid(format!("dataset query: {e}")))?;
    let bytes = manifest.to_bytes().map_err(internal)?;
    let blobs = std::sync::Arc::clone(&state.effects.blobs);
    let tenant = caller.tenant.clone();
    let put = tokio::task::spawn_blocking(move || blobs.put(&tenant, bytes.as_slice()))
        .await
        .map_err(internal)?
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
#[utoipa::path(get, path = "/v1/datasets", security(("api_key" = [])), responses((status = 200)))]
pub async fn list_datasets(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<DatasetRecord>>, ApiError> {
    Ok(Json(state.store.datasets(caller.scope()).await?))
}

/// A sandbox's trace so far, decoded (for `tartarus inspect` and debugging; the episode is the record).
pub async fn sandbox_trace(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    crate::find(&state, &caller, &id).await?;
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
