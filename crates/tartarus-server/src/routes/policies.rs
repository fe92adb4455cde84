//! Policies over the API (versioned: every apply a new revision, with history and rollback), the event
//! stream and operator quarantine.
//!
//! Routes: `POST /v1/policies` (apply), `GET /v1/policies`, `GET`/`DELETE /v1/policies/{id}`,
//! `GET /v1/policies/{id}/history`, `POST /v1/policies/{id}/rollback {"to": N}`, `GET /v1/events`,
//! `POST /v1/sandboxes/{id}/quarantine`. Policies govern every tenant, so only admin keys change them;
//! every key may read them.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tartarus_store::{EventQuery, NewEvent, PolicyRevision, Role, SandboxStatus};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{json_rejection, ApiError, ErrorBody};
use crate::policies::{event, quarantine};
use crate::{audit, AppState};

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

/// The policy text in an apply body and the name errors give it: YAML (or JSON) text under `yaml`, or the
/// policy itself as a JSON object (pretty, so that errors point at a line of their own).
pub(crate) fn policy_text(body: Value) -> Result<(String, String), ApiError> {
    match body.as_object().is_some_and(|o| o.contains_key("yaml")) {
        true => {
            let request: ApplyPolicy = serde_json::from_value(body)
                .map_err(|e| ApiError::invalid(format!("invalid request: {e}")))?;
            Ok((request.yaml, request.source.unwrap_or_else(|| "policy".into())))
        }
        false if body.is_object() => Ok((
            serde_json::to_string_pretty(&body).map_err(|e| ApiError::internal(e.to_string()))?,
            "policy.json".to_string(),
        )),
        false => Err(ApiError::invalid(
            "the body must be {\"yaml\": \"...\"} or the policy as a JSON object",
        )),
    }
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
    let (text, source) = policy_text(body)?;
    // Off the async runtime: a large document's parse must not stall other tenants' requests.
    let (text, parsed) = crate::limits::parse_document(move || {
        let parsed = tartarus_policy::parse_policy(&text, &source);
        (text, parsed)
    })
    .await?;
    let policy = match parsed {
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

/// `GET /v1/policies/effective` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EffectiveQuery {
    /// The tenant (default: the caller's; other tenants' need an admin key).
    pub tenant: Option<String>,
    /// A template whose rules apply.
    pub template: Option<String>,
}

/// The policy a tenant's creates are judged by now: every policy in force merged, or the built-in
/// default policy when none is (`builtin: true`).
#[utoipa::path(get, path = "/v1/policies/effective", params(EffectiveQuery), security(("api_key" = [])),
    responses((status = 200, body = Object), (status = 403, body = ErrorBody)))]
pub async fn effective_policy(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<axum::extract::Query<EffectiveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let axum::extract::Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let tenant = query.tenant.unwrap_or_else(|| caller.tenant.clone());
    if tenant != caller.tenant && caller.role != tartarus_store::Role::Admin {
        return Err(ApiError::forbidden(
            "only admin keys may see another tenant's policy",
        ));
    }
    // An admin asking for a tenant sees what that tenant's user keys get.
    let role = match tenant == caller.tenant {
        true => caller.role,
        false => tartarus_store::Role::User,
    };
    let (policy, builtin) =
        crate::policies::effective_policy(&state, &tenant, role, query.template.as_deref());
    let mut value = serde_json::to_value(&policy).map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(object) = value.as_object_mut() {
        object.insert("builtin".into(), serde_json::Value::Bool(builtin));
    }
    Ok(Json(value))
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
#[into_params(parameter_in = Query)]
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
