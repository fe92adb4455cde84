//! Projects over the API (docs/tasks.md): `POST /v1/projects`, `GET /v1/projects`, `GET`/`DELETE
//! /v1/projects/{id}`. Credentials are sealed with the server's task key before they are stored and are
//! never shown again: a project's view says only whether it has them.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tartarus_store::{NewProject, ProjectRecord};

use crate::auth::Caller;
use crate::error::{json_rejection, ApiError};
use crate::tasks::git::Credentials;
use crate::{audit, AppState};

/// `POST /v1/projects`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// Unique per tenant: `[a-z0-9-]`, 1 to 64.
    pub name: String,
    /// `https://…`, `http://…` (no user or password in it: give `credentials`).
    pub repo_url: String,
    #[serde(default = "default_branch")]
    pub default_branch: String,
    pub template: Option<String>,
    /// `OWNER/NAME` on GitHub: tasks open a pull request there (needs the server's `--github-token-file`).
    pub github_repo: Option<String>,
    pub credentials: Option<Credentials>,
}

fn default_branch() -> String {
    "main".to_string()
}

/// A project as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectView {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub repo_url: String,
    pub default_branch: String,
    pub template: Option<String>,
    pub github_repo: Option<String>,
    /// Whether credentials are stored (they are never returned).
    pub has_credentials: bool,
    pub created_ms: i64,
}

impl From<ProjectRecord> for ProjectView {
    fn from(p: ProjectRecord) -> ProjectView {
        ProjectView {
            id: p.id,
            tenant: p.tenant,
            name: p.name,
            repo_url: p.repo_url,
            default_branch: p.default_branch,
            template: p.template,
            github_repo: p.github_repo,
            has_credentials: p.has_credentials,
            created_ms: p.created_ms,
        }
    }
}

fn validate(body: &CreateProject) -> Result<(), ApiError> {
    let name_ok = !body.name.is_empty()
        && body.name.len() <= 64
        && body
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !name_ok {
        return Err(ApiError::invalid("name must be 1 to 64 of a-z, 0-9 and '-'"));
    }
    let url = url::Url::parse(&body.repo_url).map_err(|e| ApiError::invalid(format!("repo_url: {e}")))?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() || body.repo_url.len() > 2048 {
        return Err(ApiError::invalid(
            "repo_url must be an http:// or https:// URL with a host, at most 2048 bytes",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ApiError::invalid(
            "repo_url must not hold a user or password: give them as credentials (stored sealed)",
        ));
    }
    // A branch name git accepts and no option: no leading '-', no '..', printable, bounded.
    let branch = &body.default_branch;
    let branch_ok = !branch.is_empty()
        && branch.len() <= 200
        && !branch.starts_with('-')
        && !branch.contains("..")
        && branch
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"~^:?*[\\".contains(&b));
    if !branch_ok {
        return Err(ApiError::invalid("default_branch is not a branch name"));
    }
    if let Some(repo) = &body.github_repo {
        let ok = repo.split_once('/').is_some_and(|(owner, name)| {
            let part = |s: &str| {
                !s.is_empty()
                    && s.len() <= 100
                    && s != "."
                    && s != ".."
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            };
            part(owner) && part(name)
        });
        if !ok {
            return Err(ApiError::invalid("github_repo must be OWNER/NAME"));
        }
    }
    if let Some(c) = &body.credentials {
        if c.username.len() > 256 || c.password.len() > 4096 || c.username.contains(':') {
            return Err(ApiError::invalid(
                "credentials: username at most 256 bytes without ':', password at most 4096",
            ));
        }
    }
    Ok(())
}

pub(crate) async fn create_project(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CreateProject>, JsonRejection>,
) -> Result<(StatusCode, Json<ProjectView>), ApiError> {
    caller.require_mutate()?;
    let Json(body) = body.map_err(json_rejection)?;
    validate(&body)?;
    let id = format!(
        "prj_{}",
        tartarus_hostsys::random_hex(8).map_err(|e| ApiError::internal(format!("randomness: {e}")))?
    );
    let sealed = match &body.credentials {
        Some(c) => {
            let plain = serde_json::to_vec(c).map_err(|e| ApiError::internal(e.to_string()))?;
            Some(
                state
                    .task_key
                    .seal(&id, &plain)
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            )
        }
        None => None,
    };
    let inserted = state
        .store
        .insert_project(
            &NewProject {
                id: &id,
                tenant: &caller.tenant,
                name: &body.name,
                repo_url: &body.repo_url,
                default_branch: &body.default_branch,
                template: body.template.as_deref(),
                github_repo: body.github_repo.as_deref(),
                sealed_credentials: sealed.as_deref(),
            },
            tartarus_store::now_ms(),
        )
        .await?;
    if !inserted {
        return Err(ApiError::conflict(format!(
            "a project named '{}' exists",
            body.name
        )));
    }
    audit(&state, &caller, "project.create", Some(&id), "ok").await;
    let project = state
        .store
        .project(&id, None)
        .await?
        .ok_or_else(|| ApiError::internal("the project just stored is gone"))?;
    Ok((StatusCode::CREATED, Json(project.into())))
}

pub(crate) async fn list_projects(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<ProjectView>>, ApiError> {
    let projects = state.store.projects(Some(&caller.tenant)).await?;
    Ok(Json(projects.into_iter().map(Into::into).collect()))
}

pub(crate) async fn get_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ProjectView>, ApiError> {
    let project = state
        .store
        .project(&id, Some(&caller.tenant))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no project {id}")))?;
    Ok(Json(project.into()))
}

pub(crate) async fn delete_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_mutate()?;
    let project = state
        .store
        .project(&id, Some(&caller.tenant))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no project {id}")))?;
    if !state
        .store
        .delete_project(&project.id, Some(&caller.tenant))
        .await?
    {
        return Err(ApiError::conflict(format!("project {id} has tasks")));
    }
    audit(&state, &caller, "project.delete", Some(&project.id), "ok").await;
    Ok(StatusCode::NO_CONTENT)
}
