//! `/v1/tools`: the operator declares, lists and removes the tools sandboxes may call through their
//! gateway (`crate::gateway`).

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Json, Router};
use tartarus_store::Role;

use crate::auth::Caller;
use crate::error::{json_rejection, ApiError};
use crate::gateway::{tools, ToolDefinition};
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tools", post(put_tool).get(list_tools))
        .route("/v1/tools/{name}", delete(delete_tool))
}

/// Declare (or replace) a tool. Admin only.
#[utoipa::path(post, path = "/v1/tools", tag = "gateway", request_body = ToolDefinition, security(("api_key" = [])),
    responses((status = 201, body = ToolDefinition), (status = 403), (status = 422)))]
pub async fn put_tool(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<ToolDefinition>, JsonRejection>,
) -> Result<(StatusCode, Json<ToolDefinition>), ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden("only admin keys may declare tools"));
    }
    let Json(tool) = body.map_err(json_rejection)?;
    tools::declare(&state.effects, &tool).await?;
    crate::audit(&state, &caller, "tool.put", Some(&tool.name), "ok").await;
    Ok((StatusCode::CREATED, Json(tool.public())))
}

/// The declared tools: for admins all of them (header values hidden); for other keys only those their
/// tenant may call, without URL, headers, command or tenants.
#[utoipa::path(get, path = "/v1/tools", tag = "gateway", security(("api_key" = [])),
    responses((status = 200, body = [ToolDefinition])))]
pub async fn list_tools(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<ToolDefinition>>, ApiError> {
    if caller.role != Role::Admin {
        return Ok(Json(tools::callable_by(&state.store, &caller.tenant).await?));
    }
    let declared = tools::declared(&state.store).await?;
    Ok(Json(declared.iter().map(ToolDefinition::public).collect()))
}

/// Remove a tool. Admin only.
#[utoipa::path(delete, path = "/v1/tools/{name}", tag = "gateway", params(("name" = String, Path, description = "the tool's name")),
    security(("api_key" = [])), responses((status = 204), (status = 403), (status = 404)))]
pub async fn delete_tool(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden("only admin keys may remove tools"));
    }
    tools::remove(&state.effects, &name).await?;
    crate::audit(&state, &caller, "tool.delete", Some(&name), "ok").await;
    Ok(StatusCode::NO_CONTENT)
}
