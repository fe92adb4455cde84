//! `/v1/sandboxes`: create, list, get, delete, wait, pause and resume.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;
use tartarus_store::{SandboxRecord, SandboxStatus};

use crate::api::{CreateSandbox, ListQuery, PauseBody, PauseMode, SandboxView};
use crate::auth::Caller;
use crate::error::{json_rejection, ApiError, ErrorBody};
use crate::sandboxes::spec_from;
use crate::{audit, cluster, find, images, policies, view, AppState};

/// Create a sandbox.
#[utoipa::path(post, path = "/v1/sandboxes", request_body = CreateSandbox, security(("api_key" = [])),
    responses((status = 201, body = SandboxView),
               (status = 202, body = Object, description = "cluster mode: no node has room; queued (`GET /v1/queue/{id}`)"),
               (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody),
               (status = 429, body = ErrorBody, description = "over the tenant's quota, or the queue is full (`Retry-After`)"),
               (status = 503, body = ErrorBody, description = "the host could not start the sandbox")))]
pub(crate) async fn create_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CreateSandbox>, JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    caller.require_mutate()?;
    let Json(mut body) = body.map_err(json_rejection)?;
    super::ports::opt_in(&mut body)?;
    create(state, caller, body, |_| {}).await
}

/// Creates the sandbox `body` asks for, with `shape` applied to its spec before templates, images and
/// policies (other front ends, such as `crate::e2b`, add what their protocol needs there): what
/// `POST /v1/sandboxes` answers.
pub(crate) async fn create(
    state: AppState,
    caller: Caller,
    body: CreateSandbox,
    shape: impl FnOnce(&mut tartarus_runtime::SandboxSpec),
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let started = std::time::Instant::now();
    let mut spec = spec_from(&body, &caller, state.host_access)?;
    shape(&mut spec);
    let mut pool_key = None;
    if let Some(id) = &body.template {
        let record = state
            .store
            // The caller's own (admins: their tenant's), else the shared one.
            .get_template(id, Some(&caller.tenant))
            .await?
            .ok_or_else(|| ApiError::invalid(format!("unknown template '{id}' (see GET /v1/templates)")))?;
        let template: tartarus_image::template::Template = serde_json::from_str(&record.definition)
            .map_err(|e| ApiError::internal(format!("stored template '{id}': {e}")))?;
        let puller = images::PullFor::owner(record.tenant.as_deref());
        let image = state.images.ensure(&template.base_image, puller).await?;
        let plain = images::apply_template(
            &mut spec,
            &template,
            &state.images,
            &image,
            state.manager.shim_exe(),
        )?;
        if plain {
            pool_key = Some(images::pool_key(record.tenant.as_deref(), &template.id));
        }
    } else if let Some(reference) = &body.image {
        let puller = match caller.role {
            tartarus_store::Role::Admin => images::PullFor::Operator,
            _ => images::PullFor::Tenant(&caller.tenant),
        };
        let image = state.images.ensure(reference, puller).await?;
        images::root_on_image(&mut spec, &state.images, &image)?;
    }
    // The classification hook may send the request to quarantine, or refuse it.
    let classified = policies::classify(&state, &caller, &body).await?;
    let facts = policies::AdmissionFacts {
        template: body.template.as_deref(),
        class: classified.as_deref().or(body.class.as_deref()),
        rootfs: body.rootfs.is_some(),
    };
    if let Some(class) = body.class.as_deref() {
        if tartarus_policy::resource_class(class).is_none() {
            return Err(ApiError::invalid(format!(
                "unknown resource class '{class}': use ember, flame, blaze, inferno or quarantine"
            )));
        }
    }
    let decision = policies::admit(&state, &caller, &mut spec, &facts).await?;
    if decision.is_some() && pool_key.is_some() {
        // A pooled sandbox was started before the policy's constraints: only a fresh one carries them.
        pool_key = None;
    }
    spec.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    // Cluster mode: a sandbox on the host root goes to a node when there are nodes, on a lane some live
    // node offers (images and templates still run on this machine, on its lanes).
    let on_host_root = body.template.is_none() && body.image.is_none() && body.rootfs.is_none();
    let node_offers = match on_host_root {
        true => cluster::node_lane_offers(&state, &spec).await?,
        false => None,
    };
    let runtime = policies::choose_runtime(
        &state,
        &caller,
        body.template.as_deref(),
        body.runtime.as_deref(),
        facts.class,
        &spec,
        node_offers,
    );
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            audit(
                &state,
                &caller,
                "sandbox.create",
                None,
                &format!("refused: {}", e.message),
            )
            .await;
            return Err(e);
        }
    };
    if on_host_root {
        let lane: tartarus_store::Lane = body
            .lane
            .as_deref()
            .unwrap_or("main")
            .parse()
            .map_err(|e: tartarus_store::StoreError| ApiError::invalid(e.to_string()))?;
        let want = cluster::PlacementRequest {
            id: None,
            tenant: caller.tenant.clone(),
            spec: spec.clone(),
            labels: body.labels.clone(),
            class: classified.clone().or(body.class.clone()),
            node_selector: body.node_selector.clone(),
            tolerations: body.tolerations.clone(),
            node_affinity: body.node_affinity.clone(),
            node_anti_affinity: body.node_anti_affinity.clone(),
            spread_by: body.spread_by.clone(),
            runtime: runtime.runtime,
            runtime_reason: Some(runtime.reason.clone()),
        };
        let chosen = format!("runtime {}: {}", runtime.runtime, runtime.reason);
        match cluster::place_on_node(&state, &want).await {
            Ok(Some(record)) => {
                crate::metrics::operation("create", runtime.runtime.as_str(), true, started);
                audit(
                    &state,
                    &caller,
                    "sandbox.create",
                    Some(&record.id),
                    &format!("ok ({chosen})"),
                )
                .await;
                state.events.sandbox("created", &record, json!({}));
                return Ok((StatusCode::CREATED, Json(view(&record))).into_response());
            }
            Ok(None) => {}
            // No node has room now: wait in the queue (or 429 when it is full).
            Err(e) if e.code == "no_capacity" => {
                let priority = body.priority.unwrap_or(0);
                let Some(id) = cluster::enqueue(&state, &want, lane, priority, &e.message).await? else {
                    audit(&state, &caller, "sandbox.create", None, "refused: queue full").await;
                    let mut response = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "queue_full",
                        format!(
                            "no node has room and {} requests already wait; retry later",
                            state.cluster.queue_depth
                        ),
                    )
                    .into_response();
                    response.headers_mut().insert(
                        axum::http::header::RETRY_AFTER,
                        axum::http::HeaderValue::from_static("5"),
                    );
                    return Ok(response);
                };
                audit(
                    &state,
                    &caller,
                    "sandbox.create",
                    Some(&id),
                    &format!("queued ({chosen})"),
                )
                .await;
                let answer = json!({
                    "id": id, "status": "queued", "lane": lane.as_str(), "reason": e.message,
                    "runtime": runtime.runtime, "runtime_reason": runtime.reason,
                    "queue": format!("/v1/queue/{id}"),
                });
                return Ok((StatusCode::ACCEPTED, Json(answer)).into_response());
            }
            Err(e) => {
                crate::metrics::operation("create", runtime.runtime.as_str(), false, started);
                audit(&state, &caller, "sandbox.create", None, "failed").await;
                return Err(e);
            }
        }
    } else if !body.node_selector.is_empty() {
        return Err(ApiError::invalid(
            "node_selector applies to sandboxes on the host root; templates and images run on the control plane",
        ));
    }
    let result = state
        .manager
        .create(
            &caller.tenant,
            spec,
            body.labels.clone(),
            body.template.as_deref(),
            pool_key.as_deref(),
            &runtime,
        )
        .await;
    crate::metrics::operation("create", runtime.runtime.as_str(), result.is_ok(), started);
    let outcome = match &result {
        Ok(_) => format!("ok (runtime {}: {})", runtime.runtime, runtime.reason),
        Err(_) => "failed".to_string(),
    };
    audit(
        &state,
        &caller,
        "sandbox.create",
        result.as_ref().ok().map(|r| r.id.as_str()),
        &outcome,
    )
    .await;
    // sandbox.created and sandbox.started were published by the lifecycle hooks (crate::events).
    Ok((StatusCode::CREATED, Json(view(&result?))).into_response())
}

/// List sandboxes of the caller's tenant (all tenants for admins).
#[utoipa::path(get, path = "/v1/sandboxes", params(ListQuery), security(("api_key" = [])),
    responses((status = 200, body = [SandboxView]), (status = 401, body = ErrorBody)))]
pub(crate) async fn list_sandboxes(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<SandboxView>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let status: Option<SandboxStatus> = query
        .status
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("{e}")))?;
    let label = match &query.label {
        Some(l) => Some(
            l.split_once('=')
                .ok_or_else(|| ApiError::invalid("label filter must be key=value"))?,
        ),
        None => None,
    };
    let records = state.store.sandboxes(caller.scope(), status).await?;
    let views = records
        .iter()
        .filter(|r| label.is_none_or(|(k, v)| r.labels.get(k).is_some_and(|have| have == v)))
        .map(view)
        .collect();
    Ok(Json(views))
}

/// Get one sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", security(("api_key" = [])),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    let record = find(&state, &caller, &id).await?;
    if record.status.is_live() {
        if let (Some(node), Some(remote)) = (cluster::node_of(&state, &record).await?, &record.remote_id) {
            // Best effort: a node that does not answer leaves the record as it is.
            if let Ok((200, theirs)) = cluster::node_call(
                &state,
                &node,
                reqwest::Method::GET,
                &format!("/v1/sandboxes/{remote}"),
                None,
            )
            .await
            {
                cluster::sync_from_node(&state, &record, &theirs).await?;
            }
        }
    }
    Ok(Json(view(&find(&state, &caller, &id).await?)))
}

/// Forwards a request for a sandbox on a node, records an ending it reports, and answers with what the
/// node answered.
pub(crate) async fn on_node(
    state: &AppState,
    record: &SandboxRecord,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, serde_json::Value), ApiError> {
    let node = cluster::node_of(state, record)
        .await?
        .ok_or_else(|| ApiError::internal("not a node sandbox"))?;
    let remote = record.remote_id.as_deref().unwrap_or_default();
    let (status, answer) = cluster::node_call(
        state,
        &node,
        method,
        &format!("/v1/sandboxes/{remote}{path}"),
        body,
    )
    .await?;
    Ok((
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        answer,
    ))
}

/// `DELETE /v1/sandboxes/{id}` query.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Seconds the sandbox's processes get after SIGTERM before SIGKILL (at most 300); absent or 0:
    /// SIGKILL at once. The result record's `signal` says which ended it (15 or 9).
    pub grace_s: Option<u64>,
}

/// The longest `grace_s` a delete may ask for.
const MAX_GRACE_S: u64 = 300;

/// Kill a sandbox and remove its resources; returns its final record.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", params(DeleteQuery), security(("api_key" = [])),
    responses((status = 200, body = SandboxView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
               (status = 422, body = ErrorBody)))]
pub(crate) async fn delete_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SandboxView>, ApiError> {
    let axum::extract::Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let grace = match query.grace_s {
        Some(s) if s > MAX_GRACE_S => {
            return Err(ApiError::invalid(format!(
                "grace_s {s} is more than {MAX_GRACE_S}"
            )))
        }
        Some(0) | None => None,
        Some(s) => Some(std::time::Duration::from_secs(s)),
    };
    let started = std::time::Instant::now();
    let record = find(&state, &caller, &id).await?;
    caller.require_mutate()?;
    if record.status.is_live() {
        let stopped = stop(&state, &record, grace).await;
        crate::metrics::operation("delete", &record.runtime, stopped.is_ok(), started);
        stopped?;
    }
    audit(&state, &caller, "sandbox.delete", Some(&id), "ok").await;
    Ok(Json(view(&find(&state, &caller, &id).await?)))
}

/// Stops a live sandbox, here or through its node.
async fn stop(
    state: &AppState,
    record: &tartarus_store::SandboxRecord,
    grace: Option<Duration>,
) -> Result<(), ApiError> {
    if record.node.is_none() {
        return state.manager.stop(record, grace).await;
    }
    let (status, theirs) = on_node(state, record, reqwest::Method::DELETE, "", None).await?;
    if !status.is_success() {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "node_failed",
            format!("node: {theirs}"),
        ));
    }
    cluster::sync_from_node(state, record, &theirs).await?;
    Ok(())
}

/// Wait (up to `timeout_s`, default 60, at most 3600) until a sandbox has ended; returns its record.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/wait", params(WaitQuery), security(("api_key" = [])),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody)))]
pub(crate) async fn wait_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SandboxView>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let record = find(&state, &caller, &id).await?;
    let limit = Duration::from_secs(query.timeout_s.unwrap_or(60).min(3600));
    if record.status.is_live() && record.node.is_some() {
        let path = format!("/wait?timeout_s={}", limit.as_secs());
        let (status, theirs) = on_node(&state, &record, reqwest::Method::POST, &path, None).await?;
        if status.is_success() {
            cluster::sync_from_node(&state, &record, &theirs).await?;
        }
    } else if record.status.is_live() {
        state.manager.wait(&id, limit).await;
    }
    Ok(Json(view(&find(&state, &caller, &id).await?)))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct WaitQuery {
    pub timeout_s: Option<u64>,
}

pub(crate) async fn set_paused(
    state: AppState,
    caller: Caller,
    id: String,
    paused: bool,
    mode: PauseMode,
) -> Result<Json<SandboxView>, ApiError> {
    let started = std::time::Instant::now();
    let record = find(&state, &caller, &id).await?;
    caller.require_mutate()?;
    if record.status != SandboxStatus::Running {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}",
            record.status.as_str()
        )));
    }
    if paused && mode == PauseMode::Memory && record.hibernated_to.is_some() {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is paused to disk already; resume it first"
        )));
    }
    let result = match record.node.is_some() {
        // On a node: its server pauses it; this record keeps the flag for views.
        true => {
            let suffix = if paused { "/pause" } else { "/resume" };
            let body = (paused && mode == PauseMode::Disk).then(|| serde_json::json!({ "mode": "disk" }));
            let (status, theirs) = on_node(&state, &record, reqwest::Method::POST, suffix, body).await?;
            if status.is_success() {
                state.store.set_paused(&id, paused).await.map_err(ApiError::from)
            } else {
                Err(ApiError::new(
                    status,
                    "node_refused",
                    theirs["error"]["message"]
                        .as_str()
                        .unwrap_or("the node refused")
                        .to_string(),
                ))
            }
        }
        false if paused && mode == PauseMode::Disk => state.manager.hibernate(&record).await,
        false => state.manager.set_paused(&record, paused).await,
    };
    let (operation, action) = match (paused, mode) {
        (true, PauseMode::Disk) => ("pause_to_disk", "sandbox.pause_to_disk"),
        (true, PauseMode::Memory) => ("pause", "sandbox.pause"),
        (false, _) => ("resume", "sandbox.resume"),
    };
    crate::metrics::operation(operation, &record.runtime, result.is_ok(), started);
    audit(
        &state,
        &caller,
        action,
        Some(&id),
        if result.is_ok() { "ok" } else { "failed" },
    )
    .await;
    result?;
    let record = find(&state, &caller, &id).await?;
    state
        .events
        .sandbox(if paused { "paused" } else { "resumed" }, &record, json!({}));
    Ok(Json(view(&record)))
}

/// Pause a running sandbox; execs and file operations get 409 until it is resumed. Without a body (or
/// `{"mode":"memory"}`) every process is frozen in place (cgroup freezer). With `{"mode":"disk"}` the
/// sandbox's memory, processes and scratch files are saved to a sealed snapshot and its CPU and memory
/// released (lanes with `pause_to_disk`, `GET /v1/runtimes`; 409 `unsupported` elsewhere, and 409 while an
/// exec is attached or when the disk has too little room — the sandbox then keeps running); the timeout
/// does not run while it is on disk. Resume restores it under the same id.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", security(("api_key" = [])),
    request_body(content = Option<PauseBody>, content_type = "application/json"),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn pause_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    let mode = match body.iter().all(u8::is_ascii_whitespace) {
        true => PauseMode::Memory,
        false => {
            // `null` is no body too (clients and the node calls send it for a plain pause).
            serde_json::from_slice::<Option<PauseBody>>(&body)
                .map_err(|e| {
                    ApiError::invalid(format!(
                        "invalid pause request: {e}; send {{\"mode\": \"memory\"}}, {{\"mode\": \"disk\"}} or no body"
                    ))
                })?
                .unwrap_or_default()
                .mode
        }
    };
    set_paused(state, caller, id, true, mode).await
}

/// Thaw a paused sandbox.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", security(("api_key" = [])),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn resume_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    set_paused(state, caller, id, false, PauseMode::Memory).await
}

/// `POST /v1/sandboxes/{id}/timeout`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    /// Seconds from now after which the sandbox is stopped (SIGTERM, then SIGKILL after 1 s), unless
    /// set again: a keep-alive. At most 86400. The spec's own `timeout_s`, if any, still applies.
    pub timeout_s: u64,
}

/// The answer of `POST /v1/sandboxes/{id}/timeout`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Deadline {
    /// When the sandbox will be stopped, in milliseconds since the epoch.
    pub deadline_ms: i64,
}

/// Set (or move) when a running sandbox is stopped: a keep-alive that survives server restarts.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", request_body = SetTimeout, security(("api_key" = [])),
    responses((status = 200, body = Deadline), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
               (status = 422, body = ErrorBody)))]
pub(crate) async fn set_timeout(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<SetTimeout>, JsonRejection>,
) -> Result<Json<Deadline>, ApiError> {
    let record = find(&state, &caller, &id).await?;
    caller.require_mutate()?;
    let Json(body) = body.map_err(json_rejection)?;
    if !(1..=86_400).contains(&body.timeout_s) {
        return Err(ApiError::invalid("timeout_s must be between 1 and 86400"));
    }
    crate::local_only(&record, "a movable timeout")?;
    if !record.status.is_live() {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}",
            record.status.as_str()
        )));
    }
    let deadline_ms = tartarus_store::now_ms() + (body.timeout_s as i64) * 1000;
    state
        .store
        .set_deadline(&id, deadline_ms, tartarus_store::Expiry::Stop)
        .await?;
    audit(
        &state,
        &caller,
        "sandbox.timeout",
        Some(&id),
        &format!("ok ({} s)", body.timeout_s),
    )
    .await;
    Ok(Json(Deadline { deadline_ms }))
}
