//! Policies over the API (versioned: every apply a new revision, with history and rollback), admission of
//! every create against them, and the event stream.
//!
//! Routes: `POST /v1/policies` (apply), `GET /v1/policies`, `GET`/`DELETE /v1/policies/{id}`,
//! `GET /v1/policies/{id}/history`, `POST /v1/policies/{id}/rollback {"to": N}`, `GET /v1/events`.
//! Policies govern every tenant, so only admin keys change them; every key may read them.

use std::sync::{Arc, RwLock};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tartarus_policy::{AdmissionRequest, Decision, NetworkRequest, Policy, Usage};
use tartarus_runtime::{NetworkMode, SandboxSpec};
use tartarus_store::{EventQuery, NewAudit, NewEvent, PolicyRevision, Role, SandboxStatus};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{json_rejection, ApiError, ErrorBody};
use crate::sandboxes::CallError;
use crate::{audit, AppState};

/// The policies in force, loaded from the store at start and replaced on every change.
#[derive(Clone, Default)]
pub struct Policies(Arc<RwLock<Vec<Policy>>>);

impl Policies {
    pub async fn load(store: &tartarus_store::Store) -> Result<Policies, String> {
        let policies = Policies::default();
        policies.reload(store).await?;
        Ok(policies)
    }

    async fn reload(&self, store: &tartarus_store::Store) -> Result<(), String> {
        let mut loaded = Vec::new();
        for revision in store.current_policies().await.map_err(|e| e.to_string())? {
            let policy: Policy = serde_json::from_str(&revision.document).map_err(|e| {
                format!(
                    "stored policy '{}' revision {}: {e}",
                    revision.id, revision.revision
                )
            })?;
            loaded.push(policy);
        }
        if let Ok(mut current) = self.0.write() {
            *current = loaded;
        }
        Ok(())
    }

    fn snapshot(&self) -> Vec<Policy> {
        self.0.read().map(|p| p.clone()).unwrap_or_default()
    }
}

/// `POST /v1/policies`: `{"yaml": "<policy YAML or JSON>", "source": "prod.yaml"}` or the policy itself as
/// a JSON object.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyPolicy {
    pub yaml: String,
    /// A name for the text in error messages (default `policy`).
    pub source: Option<String>,
}

/// One revision of a policy as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyView {
    pub id: String,
    /// The server's revision number (1, 2, …); every apply and rollback adds one.
    pub revision: i64,
    pub created_ms: i64,
    /// Tenant and key that applied it.
    pub author: String,
    /// For a rollback: the revision it restored.
    pub rollback_of: Option<i64>,
    /// The validated policy with defaults filled in; `null` for a removal.
    #[schema(value_type = Object)]
    pub policy: Value,
}

fn view(revision: &PolicyRevision) -> PolicyView {
    PolicyView {
        id: revision.id.clone(),
        revision: revision.revision,
        created_ms: revision.created_ms,
        author: revision.author.clone(),
        rollback_of: revision.rollback_of,
        policy: serde_json::from_str(&revision.document).unwrap_or(Value::Null),
    }
}

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match caller.role {
        Role::Admin => Ok(()),
        _ => Err(ApiError::forbidden(
            "policies govern every tenant: only admin keys may change them",
        )),
    }
}

fn author(caller: &Caller) -> String {
    format!("{}/{}", caller.tenant, caller.key_id)
}

/// Apply a policy: validated (422 with `file:line:column` on bad input, the previous revision stays in
/// force), then stored as the policy's next revision.
#[utoipa::path(post, path = "/v1/policies", request_body = ApplyPolicy, security(("api_key" = [])),
    responses((status = 201, body = PolicyView), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn apply_policy(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<PolicyView>), ApiError> {
    require_admin(&caller)?;
    let Json(body) = body.map_err(json_rejection)?;
    let (text, source) = match body.as_object().is_some_and(|o| o.contains_key("yaml")) {
        true => {
            let request: ApplyPolicy = serde_json::from_value(body)
                .map_err(|e| ApiError::invalid(format!("invalid request: {e}")))?;
            (request.yaml, request.source.unwrap_or_else(|| "policy".into()))
        }
        false if body.is_object() => (
            serde_json::to_string_pretty(&body).map_err(|e| ApiError::internal(e.to_string()))?,
            "policy.json".to_string(),
        ),
        false => {
            return Err(ApiError::invalid(
                "the body must be {\"yaml\": \"...\"} or the policy as a JSON object",
            ))
        }
    };
    let policy = match tartarus_policy::parse_policy(&text, &source) {
        Ok(policy) => policy,
        Err(e) => {
            audit(&state, &caller, "policy.apply", None, "invalid").await;
            return Err(ApiError::invalid(e.to_string()));
        }
    };
    let revision = state
        .store
        .put_policy(&policy.id, &policy.to_json(), &text, &author(&caller), None)
        .await?;
    audit(&state, &caller, "policy.apply", Some(&policy.id), "ok").await;
    state
        .policies
        .reload(&state.store)
        .await
        .map_err(ApiError::internal)?;
    Ok((StatusCode::CREATED, Json(view(&revision))))
}

/// The policies in force.
#[utoipa::path(get, path = "/v1/policies", security(("api_key" = [])),
    responses((status = 200, body = [PolicyView])))]
pub async fn list_policies(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Vec<PolicyView>>, ApiError> {
    Ok(Json(
        state.store.current_policies().await?.iter().map(view).collect(),
    ))
}

/// The revision of a policy in force.
#[utoipa::path(get, path = "/v1/policies/{id}", security(("api_key" = [])),
    responses((status = 200, body = PolicyView), (status = 404, body = ErrorBody)))]
pub async fn get_policy(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PolicyView>, ApiError> {
    let revision = state
        .store
        .current_policy(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no policy '{id}' in force")))?;
    Ok(Json(view(&revision)))
}

/// Every revision of a policy, oldest first.
#[utoipa::path(get, path = "/v1/policies/{id}/history", security(("api_key" = [])),
    responses((status = 200, body = [PolicyView]), (status = 404, body = ErrorBody)))]
pub async fn policy_history(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<PolicyView>>, ApiError> {
    let history = state.store.policy_history(&id).await?;
    if history.is_empty() {
        return Err(ApiError::not_found(format!("no policy '{id}'")));
    }
    Ok(Json(history.iter().map(view).collect()))
}

/// `POST /v1/policies/{id}/rollback`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// The revision to put back in force (as a new revision).
    pub to: i64,
}

/// Put an earlier revision back in force, as a new revision.
#[utoipa::path(post, path = "/v1/policies/{id}/rollback", request_body = Rollback, security(("api_key" = [])),
    responses((status = 201, body = PolicyView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn rollback_policy(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<Rollback>, JsonRejection>,
) -> Result<(StatusCode, Json<PolicyView>), ApiError> {
    require_admin(&caller)?;
    let Json(body) = body.map_err(json_rejection)?;
    let result = state.store.rollback_policy(&id, body.to, &author(&caller)).await;
    audit(
        &state,
        &caller,
        "policy.rollback",
        Some(&id),
        if result.is_ok() { "ok" } else { "failed" },
    )
    .await;
    let revision = result.map_err(|e| match e {
        tartarus_store::StoreError::Invalid(message) => ApiError::not_found(message),
        other => other.into(),
    })?;
    state
        .policies
        .reload(&state.store)
        .await
        .map_err(ApiError::internal)?;
    Ok((StatusCode::CREATED, Json(view(&revision))))
}

/// Take a policy out of force (its history stays; a rollback restores it).
#[utoipa::path(delete, path = "/v1/policies/{id}", security(("api_key" = [])),
    responses((status = 200, body = PolicyView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_policy(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PolicyView>, ApiError> {
    require_admin(&caller)?;
    if state.store.current_policy(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("no policy '{id}' in force")));
    }
    let revision = state
        .store
        .put_policy(&id, "", "", &author(&caller), None)
        .await?;
    audit(&state, &caller, "policy.delete", Some(&id), "ok").await;
    state
        .policies
        .reload(&state.store)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(view(&revision)))
}

/// `GET /v1/events` query.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Admins only: one tenant's events (others always see their own tenant's).
    pub tenant: Option<String>,
    pub sandbox: Option<String>,
    /// `enforcement`, `admission`, `lifecycle` or `dead_letter`.
    pub category: Option<String>,
    /// Only events at or after this time (milliseconds since the Unix epoch).
    pub since_ms: Option<i64>,
    /// At most this many (default 1000), newest first.
    pub limit: Option<i64>,
}

/// The event stream, newest first: enforcement actions, admission rejections, dead letters.
#[utoipa::path(get, path = "/v1/events", params(EventsQuery), security(("api_key" = [])),
    responses((status = 200, description = "events, newest first"), (status = 403, body = ErrorBody)))]
pub async fn list_events(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<tartarus_store::Event>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let tenant = caller.scope_for(query.tenant.as_deref(), "events")?;
    let events = state
        .store
        .events(&EventQuery {
            tenant,
            sandbox: query.sandbox.as_deref(),
            category: query.category.as_deref(),
            since_ms: query.since_ms,
            limit: Some(query.limit.unwrap_or(1000).clamp(1, 10_000)),
        })
        .await?;
    Ok(Json(events))
}

/// Records an event; failures are logged, never fatal.
pub async fn event(state: &AppState, event: NewEvent<'_>) {
    if let Err(e) = state.store.record_event(&event).await {
        tracing::error!("event write failed: {e}");
    }
}

/// What a create asks for, in the terms of the admission judges.
pub struct CreateFacts<'a> {
    pub template: Option<&'a str>,
    pub class: Option<&'a str>,
    pub rootfs: bool,
}

/// Runs admission for a create: the judges decide on the request (defaults applied, limits checked,
/// quotas counted over the tenant's live sandboxes); the decision is audited with the request's digest;
/// an accepted request's spec gets the compiled constraints (limits, timeout, seccomp additions, network).
/// Without any policy in force, everything the API accepts is admitted (nothing to judge against); a
/// requested class still applies its resources, and quarantine its restrictions.
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    spec: &mut SandboxSpec,
    facts: &CreateFacts<'_>,
) -> Result<Option<Decision>, ApiError> {
    let policies = state.policies.snapshot();
    if policies.is_empty() {
        // Nothing to judge against, but a class still means what it says.
        if let Some(class) = facts.class.and_then(tartarus_policy::resource_class) {
            spec.limits.cpus.get_or_insert(class.cpus);
            spec.limits.memory_bytes.get_or_insert(class.memory_mb << 20);
            if class.quarantined {
                spec.network = NetworkMode::None;
                spec.denied_syscalls.extend(
                    tartarus_policy::QUARANTINE_DENIED_SYSCALLS
                        .iter()
                        .map(|s| s.to_string()),
                );
                spec.writable_paths = vec!["/tmp".into()];
            }
        }
        return Ok(None);
    }
    let mut request = AdmissionRequest {
        tenant: caller.tenant.clone(),
        template: facts.template.map(str::to_string),
        class: facts.class.map(str::to_string),
        cpus: spec.limits.cpus,
        memory_mb: spec.limits.memory_bytes.map(|b| b >> 20),
        timeout: spec.timeout,
        network: match spec.network {
            NetworkMode::None => NetworkRequest::None,
            NetworkMode::HostLoopback => NetworkRequest::HostLoopback,
            NetworkMode::Egress(_) => NetworkRequest::Egress,
        },
        rootfs: facts.rootfs,
        writable_mounts: spec.mounts.iter().any(|m| m.writable),
        quarantined: facts.class == Some("quarantine"),
    };
    let policy = tartarus_policy::effective(&policies, &caller.tenant, facts.template);
    let usage = usage(state, &caller.tenant, facts.template).await?;
    let decision = tartarus_policy::admit(&mut request, &policy, &usage);
    let detail = json!({
        "request_digest": decision.request_digest,
        "verdict": decision.verdict,
        "judges": decision.judges,
        "mutations": decision.mutations,
        "policies": decision.policy_sources,
        "rejection": decision.rejection.as_ref().map(|r| json!({"judge": r.judge, "status": r.status, "reason": r.reason})),
    })
    .to_string();
    let record = NewAudit {
        tenant: &caller.tenant,
        key_id: Some(&caller.key_id),
        action: "sandbox.admission",
        target: facts.template,
        outcome: decision.verdict,
        detail: Some(&detail),
    };
    if let Err(e) = state.store.record_audit(&record).await {
        tracing::error!("audit write failed: {e}");
    }
    if let Some(rejection) = &decision.rejection {
        let message = format!("{} judge: {}", rejection.judge, rejection.reason);
        event(
            state,
            NewEvent {
                category: "admission",
                kind: "admission.rejected",
                sandbox: None,
                tenant: Some(&caller.tenant),
                message: &message,
                details: Some(&detail),
            },
        )
        .await;
        let status = StatusCode::from_u16(rejection.status).unwrap_or(StatusCode::FORBIDDEN);
        let code = match status {
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::TOO_MANY_REQUESTS => "quota_exceeded",
            _ => "invalid_request",
        };
        return Err(ApiError::new(status, code, message));
    }
    let constraints = tartarus_policy::compile(&policy, &request);
    if spec.limits.cpus.is_none() {
        spec.limits.cpus = constraints.cpus;
    }
    if spec.limits.memory_bytes.is_none() {
        spec.limits.memory_bytes = constraints.memory_mb.map(|m| m << 20);
    }
    if spec.timeout.is_none() {
        spec.timeout = constraints.timeout;
    }
    spec.denied_syscalls
        .extend(constraints.extra_denied_syscalls.iter().cloned());
    spec.writable_paths = constraints.landlock_writable.iter().map(Into::into).collect();
    spec.network = match (&constraints.network, &spec.network) {
        (tartarus_policy::NetworkContract::None, _) => NetworkMode::None,
        (tartarus_policy::NetworkContract::HostLoopback, _) => NetworkMode::HostLoopback,
        // The policy's contract, in the runtime's terms (the runtime orders DNS before the private ranges,
        // so those travel as flags rather than as denied CIDRs).
        (tartarus_policy::NetworkContract::Egress { .. }, _) => {
            let n = &policy.network;
            NetworkMode::Egress(tartarus_runtime::EgressContract {
                allowed_cidrs: n.allowed_cidrs.iter().map(ToString::to_string).collect(),
                denied_cidrs: n.denied_cidrs.iter().map(ToString::to_string).collect(),
                deny_private: n.deny_private,
                deny_metadata: n.deny_metadata,
                allowed_ports: n.allowed_egress_ports.clone(),
                dns: n.dns,
                rate_limit_kbps: u32::try_from(n.rate_limit_kbps).unwrap_or(u32::MAX),
            })
        }
    };
    Ok(Some(decision))
}

/// The tenant's live sandboxes in the terms of the quota judge.
async fn usage(state: &AppState, tenant: &str, template: Option<&str>) -> Result<Usage, ApiError> {
    let mut usage = Usage::default();
    for status in [SandboxStatus::Starting, SandboxStatus::Running] {
        for record in state.store.sandboxes(Some(tenant), Some(status)).await? {
            usage.sandboxes += 1;
            // A record whose spec cannot be read counts as the largest class: a quota never under-counts.
            let (cpus, memory_mb) = match crate::sandboxes::stored_spec(&record) {
                Ok(spec) => (
                    spec.limits.cpus.unwrap_or(0.0),
                    spec.limits.memory_bytes.map(|b| b >> 20).unwrap_or(0),
                ),
                Err(_) => largest_class(),
            };
            usage.cpu_cores += cpus;
            usage.memory_mb += memory_mb;
            if template.is_some() && record.template.as_deref() == template {
                usage.template_instances += 1;
            }
        }
    }
    Ok(usage)
}

/// The CPUs and memory of the largest resource class.
fn largest_class() -> (f64, u64) {
    tartarus_policy::RESOURCE_CLASSES
        .iter()
        .fold((0.0, 0), |(cpus, memory), c| {
            (cpus.max(c.cpus), memory.max(c.memory_mb))
        })
}

/// The enforcement loop: for every running sandbox, watches its blocked-packet counter (egress) and its
/// limit hits (OOM kills, forks refused at the pids limit) and, when one grows, acts as the sandbox's
/// effective policy says: `on_network_violation` (log, kill, quarantine) and `on_resource_violation`
/// (throttle: the CPU quota drops to a quarter, at least 0.05 core; kill; quarantine). Without any policy in
/// force, violations are only logged as events.
pub fn spawn_enforcement(state: AppState, every: std::time::Duration) {
    tokio::spawn(async move {
        let mut seen: std::collections::HashMap<String, (u64, u64)> = std::collections::HashMap::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(live) = state.store.sandboxes(None, Some(SandboxStatus::Running)).await else {
                continue;
            };
            seen.retain(|id, _| live.iter().any(|r| &r.id == id));
            // Sandboxes on cluster nodes are enforced by their node's server. Every shim is asked at once,
            // each call with its own deadline, so one shim that does not answer delays nobody else.
            let local: Vec<_> = live.iter().filter(|r| !r.paused && r.node.is_none()).collect();
            for chunk in local.chunks(ENFORCEMENT_CONCURRENCY) {
                let statuses = futures_util::future::join_all(
                    chunk
                        .iter()
                        .map(|record| async { (*record, state.manager.shim(record).status().await) }),
                )
                .await;
                for (record, status) in statuses {
                    let status = match status {
                        Ok(status) => status,
                        Err(CallError::NotRunning) => continue,
                        Err(e) => {
                            tracing::warn!(sandbox = %record.id, tenant = %record.tenant, "enforcement: {}", tartarus_runtime::error_chain(&e));
                            continue;
                        }
                    };
                    let blocked = status.blocked_packets.unwrap_or(0);
                    let hits = status.limit_hits.total();
                    let (blocked_before, hits_before) =
                        seen.insert(record.id.clone(), (blocked, hits)).unwrap_or((0, 0));
                    if blocked > blocked_before {
                        enforce_network(&state, record, blocked - blocked_before).await;
                    } else if hits > hits_before {
                        enforce_resources(&state, record, hits - hits_before).await;
                    }
                }
            }
        }
    });
}

/// Shims the enforcement loop asks at once.
const ENFORCEMENT_CONCURRENCY: usize = 64;

async fn enforce_resources(state: &AppState, record: &tartarus_store::SandboxRecord, new_hits: u64) {
    use tartarus_policy::ResourceViolationAction as Action;
    let policies = state.policies.snapshot();
    let action = match policies.is_empty() {
        true => None,
        false => Some(
            tartarus_policy::effective(&policies, &record.tenant, record.template.as_deref())
                .enforcement
                .on_resource_violation,
        ),
    };
    let what = format!("hit its limits {new_hits} more time(s) (OOM kills, forks refused at the pids limit)");
    let id = &record.id;
    let (kind, message) = match action {
        None => ("resources.violation", format!("sandbox {id} {what}")),
        Some(Action::Throttle) => {
            // A spec that cannot be read throttles from one core, as one without a CPU limit does.
            let cpu_limit = crate::sandboxes::stored_spec(record)
                .ok()
                .and_then(|spec| spec.limits.cpus);
            let cpus = (cpu_limit.unwrap_or(1.0) / 4.0).max(0.05);
            match state.manager.shim(record).throttle(cpus).await {
                Ok(reply) if reply.throttled => (
                    "resources.throttle",
                    format!("sandbox {id} {what}; CPU quota lowered to {cpus} core(s) (on_resource_violation: throttle)"),
                ),
                Ok(_) => (
                    "resources.violation",
                    format!("sandbox {id} {what}; it has no CPU limit to throttle (give it resources.cpus)"),
                ),
                Err(e) => (
                    "resources.throttle_failed",
                    format!("sandbox {id} {what}; throttling failed: {}", tartarus_runtime::error_chain(&e)),
                ),
            }
        }
        Some(Action::Kill) => match state.manager.kill(record).await {
            Ok(()) => (
                "resources.kill",
                format!("sandbox {id} {what}; killed (on_resource_violation: kill)"),
            ),
            Err(e) => (
                "resources.kill_failed",
                format!("sandbox {id} {what}; killing it failed: {}", e.message),
            ),
        },
        Some(Action::Quarantine) => match quarantine(state, record).await {
            Ok(()) => (
                "resources.quarantine",
                format!(
                    "sandbox {id} {what}; network cut off and frozen (on_resource_violation: quarantine)"
                ),
            ),
            Err(e) => (
                "resources.quarantine_failed",
                format!("sandbox {id} {what}; quarantine failed: {}", e.message),
            ),
        },
    };
    event(
        state,
        NewEvent {
            category: "enforcement",
            kind,
            sandbox: Some(id),
            tenant: Some(&record.tenant),
            message: &message,
            details: Some(&json!({"limit_hits": new_hits}).to_string()),
        },
    )
    .await;
}

async fn enforce_network(state: &AppState, record: &tartarus_store::SandboxRecord, new_drops: u64) {
    use tartarus_policy::NetworkViolationAction as Action;
    let policies = state.policies.snapshot();
    let action = match policies.is_empty() {
        true => Action::Log,
        false => {
            tartarus_policy::effective(&policies, &record.tenant, record.template.as_deref())
                .enforcement
                .on_network_violation
        }
    };
    let what = format!("its network contract dropped {new_drops} more packet(s)");
    let (kind, message) = match action {
        Action::Log => ("network.violation", format!("sandbox {} {what}", record.id)),
        Action::Kill => match state.manager.kill(record).await {
            Ok(()) => (
                "network.kill",
                format!(
                    "sandbox {} {what}; killed (on_network_violation: kill)",
                    record.id
                ),
            ),
            Err(e) => (
                "network.kill_failed",
                format!("sandbox {} {what}; killing it failed: {}", record.id, e.message),
            ),
        },
        Action::Quarantine => match quarantine(state, record).await {
            Ok(()) => (
                "network.quarantine",
                format!(
                    "sandbox {} {what}; network cut off and frozen (on_network_violation: quarantine)",
                    record.id
                ),
            ),
            Err(e) => (
                "network.quarantine_failed",
                format!("sandbox {} {what}; quarantine failed: {}", record.id, e.message),
            ),
        },
    };
    event(
        state,
        NewEvent {
            category: "enforcement",
            kind,
            sandbox: Some(&record.id),
            tenant: Some(&record.tenant),
            message: &message,
            details: Some(&json!({"blocked_packets": new_drops}).to_string()),
        },
    )
    .await;
}

/// Quarantines a running sandbox: its egress network is cut off and every process frozen, kept for an
/// operator to inspect (`resume` thaws it; the network stays cut).
pub async fn quarantine(state: &AppState, record: &tartarus_store::SandboxRecord) -> Result<(), ApiError> {
    state
        .manager
        .shim(record)
        .isolate()
        .await
        .map_err(|e| crate::sandboxes::call_error(&record.id, e))?;
    state.store.set_paused(&record.id, true).await?;
    Ok(())
}

/// Quarantine a running sandbox now (operator action): network cut off, processes frozen.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/quarantine", security(("api_key" = [])),
    responses((status = 200, description = "quarantined"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn quarantine_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_mutate()?;
    let record = crate::find(&state, &caller, &id).await?;
    crate::local_only(&record, "operator quarantine")?;
    if record.status != SandboxStatus::Running {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}",
            record.status.as_str()
        )));
    }
    let result = quarantine(&state, &record).await;
    audit(
        &state,
        &caller,
        "sandbox.quarantine",
        Some(&id),
        if result.is_ok() { "ok" } else { "failed" },
    )
    .await;
    result?;
    let message = format!("sandbox {id} quarantined by {}", caller.tenant);
    event(
        &state,
        NewEvent {
            category: "enforcement",
            kind: "operator.quarantine",
            sandbox: Some(&id),
            tenant: Some(&record.tenant),
            message: &message,
            details: None,
        },
    )
    .await;
    Ok(Json(json!({"id": id, "quarantined": true})))
}

/// How long the classification hook may take before the create fails closed.
const CLASSIFIER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the classification hook, if one is configured, on a create request: `allow` (or nothing) keeps
/// the request as it is, `quarantine` makes it a quarantine-class sandbox (an event says so), `reject
/// REASON` refuses it (403). A hook that fails, times out or answers anything else refuses the request
/// (503): an unclassified request never runs. The hook gets the tenant and the request as JSON on stdin.
pub async fn classify(
    state: &AppState,
    caller: &Caller,
    body: &crate::api::CreateSandbox,
) -> Result<Option<String>, ApiError> {
    use tokio::io::AsyncWriteExt;
    let Some(hook) = state.classifier.as_deref() else {
        return Ok(None);
    };
    let request = json!({
        "tenant": caller.tenant,
        "template": body.template,
        "image": body.image,
        "cmd": body.cmd,
        "network": body.network,
        "class": body.class,
        "labels": body.labels,
    });
    let unavailable = |why: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "classifier_unavailable",
            format!("the classification hook {}: {why}", hook.display()),
        )
    };
    let run = async {
        let mut child = tokio::process::Command::new(hook)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(format!("{request}\n").as_bytes()).await?;
        }
        child.wait_with_output().await
    };
    let output = tokio::time::timeout(CLASSIFIER_TIMEOUT, run)
        .await
        .map_err(|_| unavailable("timed out".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
    if !output.status.success() {
        return Err(unavailable(format!("failed ({})", output.status)));
    }
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let (verdict, reason) = answer
        .split_once(char::is_whitespace)
        .unwrap_or((answer.as_str(), ""));
    match verdict {
        "" | "allow" => Ok(None),
        "quarantine" => {
            let message = format!(
                "the classification hook sent a request of {} to quarantine",
                caller.tenant
            );
            event(
                state,
                NewEvent {
                    category: "admission",
                    kind: "classifier.quarantine",
                    sandbox: None,
                    tenant: Some(&caller.tenant),
                    message: &message,
                    details: Some(&request.to_string()),
                },
            )
            .await;
            Ok(Some("quarantine".to_string()))
        }
        "reject" => {
            audit(state, caller, "sandbox.classify", None, "reject").await;
            Err(ApiError::forbidden(format!("classifier: {}", reason.trim())))
        }
        other => Err(unavailable(format!(
            "answered '{other}', not allow, quarantine or reject"
        ))),
    }
}
