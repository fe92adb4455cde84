//! Templates over the API: `POST /v1/templates`, `GET /v1/templates`, `GET`/`DELETE /v1/templates/{id}`.
//!
//! Every definition goes through [`tartarus_image::template::parse_template`], so the API refuses exactly
//! what `tartarus template create` would (422 with `file:line:column: message`), and the store keeps the
//! canonical JSON. A template created with an admin key is shared: every tenant sees it and only admins may
//! change it. One created with a user key belongs to that tenant. Ids are per tenant: a tenant's create
//! answers the same whether or not another tenant uses the id (nothing about other tenants' templates
//! leaks), but a tenant cannot take the id of a shared template (every tenant sees those). A tenant's own
//! template comes before a shared one with its id (an admin may create that later). Admins address a
//! tenant's template with `?tenant=`. Viewers may only read.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tartarus_image::template::{parse_template, Template};
use tartarus_store::{Role, TemplatePut, TemplateRecord};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{json_rejection, ApiError, ErrorBody};
use crate::{audit, AppState};

/// `POST /v1/templates`: either `{"yaml": "<template YAML>", "source": "python-ds.yaml"}` (`source` only
/// names the text in error messages), or the template itself as a JSON object (`{"id": …, "name": …}`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    /// The template as YAML (or JSON) text, as `tartarus template create -f FILE` sends it.
    pub yaml: String,
    /// A name for the text in error messages (default `template`).
    pub source: Option<String>,
}

/// A template as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateView {
    pub id: String,
    /// The owning tenant; `null` for a shared template (created by an admin) that every tenant sees.
    pub tenant: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_ms: i64,
    pub updated_ms: i64,
    /// The validated definition, with every default filled in (see templates/README.md for the keys).
    #[schema(value_type = Object)]
    pub template: Value,
    /// Warm sandboxes ready in this server's pool for the template now (the pool refills in the background).
    pub warm: usize,
}

fn view(state: &AppState, record: &TemplateRecord) -> Result<TemplateView, ApiError> {
    let template = serde_json::from_str(&record.definition)
        .map_err(|e| ApiError::internal(format!("stored template '{}' is not JSON: {e}", record.id)))?;
    Ok(TemplateView {
        id: record.id.clone(),
        tenant: record.tenant.clone(),
        created_ms: record.created_ms,
        updated_ms: record.updated_ms,
        template,
        warm: state
            .manager
            .pool_ready(&crate::images::pool_key(record.tenant.as_deref(), &record.id)),
    })
}

/// The template in a create body: YAML text under `yaml`, or the template as a JSON object.
pub(crate) fn template_from(body: Value) -> Result<Template, ApiError> {
    let is_text = body.as_object().is_some_and(|o| o.contains_key("yaml"));
    let (text, source) = match is_text {
        true => {
            let request: CreateTemplate = serde_json::from_value(body)
                .map_err(|e| ApiError::invalid(format!("invalid request: {e}")))?;
            let source = request.source.unwrap_or_else(|| "template".to_string());
            (request.yaml, source)
        }
        false if body.is_object() => {
            // Pretty, so that errors point at a line of their own.
            let text = serde_json::to_string_pretty(&body).map_err(|e| ApiError::internal(e.to_string()))?;
            (text, "template.json".to_string())
        }
        false => {
            return Err(ApiError::invalid(
                "the body must be {\"yaml\": \"...\"} or the template as a JSON object",
            ))
        }
    };
    parse_template(&text, &source).map_err(|e| ApiError::invalid(e.to_string()))
}

/// Most templates a tenant may own (shared, admin-made templates are not counted).
pub const MAX_TEMPLATES_PER_TENANT: usize = 20;

/// Most warm sandboxes all of a tenant's own templates may keep started together. Pooled sandboxes belong
/// to no tenant until claimed, so they are outside every quota: this caps what a user key can start that
/// way (admins' shared templates may pool up to [`tartarus_image::template::MAX_POOL`] each).
pub const MAX_POOLED_PER_TENANT: u32 = 4;

/// Refuses a user key's template that would make its tenant own more than [`MAX_TEMPLATES_PER_TENANT`]
/// templates, or keep more than [`MAX_POOLED_PER_TENANT`] sandboxes warm (the template replaced, if any,
/// is not counted twice).
async fn tenant_template_limits(state: &AppState, tenant: &str, template: &Template) -> Result<(), ApiError> {
    let owned: Vec<TemplateRecord> = state
        .store
        .list_templates(Some(tenant))
        .await?
        .into_iter()
        .filter(|r| r.tenant.as_deref() == Some(tenant) && r.id != template.id)
        .collect();
    if owned.len() >= MAX_TEMPLATES_PER_TENANT {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            format!(
                "the tenant has {} templates, the most a tenant may own ({MAX_TEMPLATES_PER_TENANT}); delete one first",
                owned.len()
            ),
        ));
    }
    let pooled: u32 = owned
        .iter()
        .filter_map(|r| serde_json::from_str::<Template>(&r.definition).ok())
        .map(|t| t.pool.size)
        .sum();
    if pooled.saturating_add(template.pool.size) > MAX_POOLED_PER_TENANT {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            format!(
                "pool.size {} would make the tenant's templates keep {} sandboxes warm, the most a tenant may ({MAX_POOLED_PER_TENANT}; {pooled} in other templates)",
                template.pool.size,
                pooled.saturating_add(template.pool.size)
            ),
        ));
    }
    Ok(())
}

/// Create a template, or replace one the caller owns (admins: any). 201 when new, 200 when replaced.
#[utoipa::path(post, path = "/v1/templates", request_body = CreateTemplate, security(("api_key" = [])),
    responses((status = 201, body = TemplateView), (status = 200, body = TemplateView),
               (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody),
               (status = 429, body = ErrorBody, description = "the tenant's templates or warm sandboxes are at their cap")))]
pub async fn create_template(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<TemplateView>), ApiError> {
    caller.require_mutate()?;
    let Json(body) = body.map_err(json_rejection)?;
    // Off the async runtime: a large document's parse must not stall other tenants' requests.
    let template = crate::limits::parse_document(move || template_from(body)).await??;
    let id = template.id.clone();
    // Admins write shared templates; users their tenant's. A user may not take a shared template's id
    // (every tenant sees shared templates, so this says nothing about other tenants).
    let owner = match caller.role {
        Role::Admin => None,
        _ => Some(caller.tenant.clone()),
    };
    if let Some(tenant) = owner.as_deref() {
        let shared = state.store.get_template(&id, None).await?;
        if shared.is_some() {
            audit(&state, &caller, "template.replace", Some(&id), "denied").await;
            return Err(ApiError::forbidden(format!(
                "template '{id}' is shared; only admin keys may replace it"
            )));
        }
        tenant_template_limits(&state, tenant, &template).await?;
    }
    let result = state
        .store
        .put_template(&id, owner.as_deref(), &template.to_json())
        .await;
    let (action, outcome) = match &result {
        Ok(TemplatePut::Created) => ("template.create", "ok"),
        Ok(TemplatePut::Replaced) => ("template.replace", "ok"),
        Err(_) => ("template.create", "failed"),
    };
    audit(&state, &caller, action, Some(&id), outcome).await;
    let status = match result? {
        TemplatePut::Created => StatusCode::CREATED,
        TemplatePut::Replaced => StatusCode::OK,
    };
    // The warm pool follows the definition (pulling its image in the background).
    crate::images::start_template_pool(&state.manager, &state.images, owner.clone(), template.clone());
    let record = state
        .store
        .templates_named(&id)
        .await?
        .into_iter()
        .find(|r| r.tenant == owner)
        .ok_or_else(|| ApiError::not_found(format!("template '{id}' was deleted meanwhile")))?;
    Ok((status, Json(view(&state, &record)?)))
}

/// List the templates the caller sees (shared ones and its tenant's; all for admins), by id.
#[utoipa::path(get, path = "/v1/templates", security(("api_key" = [])),
    responses((status = 200, body = [TemplateView]), (status = 401, body = ErrorBody)))]
pub async fn list_templates(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<TemplateView>>, ApiError> {
    let records = state.store.list_templates(caller.scope()).await?;
    Ok(Json(
        records
            .iter()
            .map(|r| view(&state, r))
            .collect::<Result<_, _>>()?,
    ))
}

/// `?tenant=` on a template's routes: which tenant's template an admin means.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TemplateQuery {
    /// Admins: the tenant whose template this is (default: the shared one, else the only one with the id).
    pub tenant: Option<String>,
}

async fn find(
    state: &AppState,
    caller: &Caller,
    id: &str,
    query: &TemplateQuery,
) -> Result<TemplateRecord, ApiError> {
    let missing = || ApiError::not_found(format!("no template '{id}'"));
    let wanted = caller.scope_for(query.tenant.as_deref(), "templates")?;
    if let Some(tenant) = caller.scope() {
        // Another tenant's template is reported exactly like a missing one.
        return state
            .store
            .get_template(id, Some(tenant))
            .await?
            .ok_or_else(missing);
    }
    let named = state.store.templates_named(id).await?;
    if let Some(tenant) = wanted {
        return named
            .into_iter()
            .find(|r| r.tenant.as_deref() == Some(tenant))
            .ok_or_else(missing);
    }
    if named.len() > 1 && named[0].tenant.is_some() {
        let owners: Vec<&str> = named.iter().filter_map(|r| r.tenant.as_deref()).collect();
        return Err(ApiError::conflict(format!(
            "tenants {} each have a template '{id}': add ?tenant=NAME",
            owners.join(", ")
        )));
    }
    named.into_iter().next().ok_or_else(missing)
}

/// Get one template.
#[utoipa::path(get, path = "/v1/templates/{id}", params(TemplateQuery), security(("api_key" = [])),
    responses((status = 200, body = TemplateView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_template(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<TemplateQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<TemplateView>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    Ok(Json(view(&state, &find(&state, &caller, &id, &query).await?)?))
}

/// Delete a template (shared ones: admins only); returns what was deleted. Sandboxes made from it live on.
#[utoipa::path(delete, path = "/v1/templates/{id}", params(TemplateQuery), security(("api_key" = [])),
    responses((status = 200, body = TemplateView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_template(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<TemplateQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<TemplateView>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let record = find(&state, &caller, &id, &query).await?;
    caller.require_mutate()?;
    if record.tenant.is_none() && caller.role != Role::Admin {
        return Err(ApiError::forbidden(format!(
            "template '{id}' is shared; only admin keys may delete it"
        )));
    }
    let result = state.store.delete_template(&id, record.tenant.as_deref()).await;
    let outcome = if result.is_ok() { "ok" } else { "failed" };
    audit(&state, &caller, "template.delete", Some(&id), outcome).await;
    if !result? {
        return Err(ApiError::not_found(format!("no template '{id}'")));
    }
    state
        .manager
        .remove_pool(&crate::images::pool_key(record.tenant.as_deref(), &id));
    Ok(Json(view(&state, &record)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_template_from_accepts_yaml_text_and_json_objects() {
        let yaml = json!({"yaml": "id: a\nname: A\nbase_image: alpine\n", "source": "a.yaml"});
        assert_eq!(template_from(yaml).unwrap().id, "a");
        let object = json!({"id": "b", "name": "B", "base_image": "alpine"});
        assert_eq!(template_from(object).unwrap().id, "b");
    }

    #[test]
    fn test_template_from_reports_line_column_and_source() {
        let e = template_from(
            json!({"yaml": "id: a\nname: A\nbase_image: x\nresorces: {}\n", "source": "a.yaml"}),
        )
        .unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            e.message.starts_with("a.yaml:4:1: unknown field `resorces`"),
            "{}",
            e.message
        );
        let e = template_from(json!({"id": "a", "name": "A", "base_image": "x", "pool": {"size": 99}}))
            .unwrap_err();
        assert!(e.message.starts_with("template.json:"), "{}", e.message);
        assert!(e.message.contains("pool.size"), "{}", e.message);
        for bad in [
            json!([1]),
            json!("id: a"),
            json!({"yaml": 3}),
            json!({"yaml": "x", "extra": 1}),
        ] {
            assert_eq!(
                template_from(bad).unwrap_err().status,
                StatusCode::UNPROCESSABLE_ENTITY
            );
        }
    }
}
