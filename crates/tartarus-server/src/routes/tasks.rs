//! Tasks over the API (docs/tasks.md): `POST /v1/tasks` (202: stored pending and enqueued),
//! `GET /v1/tasks`, `GET /v1/tasks/{id}` (with its events), `GET /v1/tasks/{id}/logs`,
//! `POST /v1/tasks/{id}/cancel`.

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tartarus_store::{Enqueue, Lane, NewQueueItem, NewTask, TaskEvent, TaskRecord, TaskStatus, Topic};

use crate::auth::Caller;
use crate::error::{json_rejection, ApiError};
use crate::{audit, AppState};

/// The longest prompt accepted.
const MAX_PROMPT: usize = 64 * 1024;
/// Tasks that may wait for a worker before creates get 429.
const MAX_WAITING: i64 = 1000;

/// `POST /v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    /// The project's id or name.
    pub project: String,
    pub prompt: String,
    /// One of the server's `--agent-type` names.
    pub agent_type: String,
    pub parent_task_id: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub id: String,
    pub tenant: String,
    pub project: String,
    pub parent_task_id: Option<String>,
    pub agent_type: String,
    pub prompt: String,
    pub status: TaskStatus,
    pub cancel_requested: bool,
    /// The sandbox the agent runs in, while it runs.
    pub sandbox: Option<String>,
    /// The branch pushed with the agent's changes.
    pub branch: Option<String>,
    pub pull_request: Option<String>,
    /// What it produced (`no changes`, `pushed branch …`).
    pub output: Option<String>,
    /// Why it failed (or why the last attempt did, while it is retried).
    pub error: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub attempts: i64,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<TaskEvent>>,
}

fn view(t: TaskRecord, events: Option<Vec<TaskEvent>>) -> TaskView {
    TaskView {
        id: t.id,
        tenant: t.tenant,
        project: t.project,
        parent_task_id: t.parent_task_id,
        agent_type: t.agent_type,
        prompt: t.prompt,
        status: t.status,
        cancel_requested: t.cancel_requested,
        sandbox: t.sandbox,
        branch: t.branch,
        pull_request: t.pull_request,
        output: t.output,
        error: t.error,
        metadata: t.metadata,
        attempts: t.attempts,
        created_ms: t.created_ms,
        started_ms: t.started_ms,
        finished_ms: t.finished_ms,
        events,
    }
}

pub(crate) async fn create_task(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CreateTask>, JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    caller.require_mutate()?;
    let Json(body) = body.map_err(json_rejection)?;
    if body.prompt.trim().is_empty() || body.prompt.len() > MAX_PROMPT {
        return Err(ApiError::invalid(format!(
            "prompt must be 1 to {MAX_PROMPT} bytes"
        )));
    }
    if !state.tasks.agent_types.contains_key(&body.agent_type) {
        let known: Vec<&str> = state.tasks.agent_types.keys().map(String::as_str).collect();
        return Err(ApiError::invalid(format!(
            "unknown agent_type '{}': this server runs {}",
            body.agent_type.escape_debug(),
            if known.is_empty() {
                "none (start it with --agent-type NAME=COMMAND)".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    if body.metadata.len() > 64 || body.metadata.iter().any(|(k, v)| k.len() > 128 || v.len() > 4096) {
        return Err(ApiError::invalid(
            "metadata: at most 64 entries, keys of 128 and values of 4096 bytes",
        ));
    }
    let project = state
        .store
        .project(&body.project, Some(&caller.tenant))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no project {}", body.project)))?;
    if let Some(parent) = &body.parent_task_id {
        if state.store.task(parent, Some(&caller.tenant)).await?.is_none() {
            return Err(ApiError::not_found(format!("no parent task {parent}")));
        }
    }
    let id = format!(
        "task_{}",
        tartarus_hostsys::random_hex(8).map_err(|e| ApiError::internal(format!("randomness: {e}")))?
    );
    let now = tartarus_store::now_ms();
    state
        .store
        .insert_task(
            &NewTask {
                id: &id,
                tenant: &caller.tenant,
                project: &project.id,
                parent_task_id: body.parent_task_id.as_deref(),
                agent_type: &body.agent_type,
                prompt: &body.prompt,
                metadata: &body.metadata,
            },
            now,
        )
        .await?;
    let payload = serde_json::to_string(&crate::tasks::worker::TaskItem { task: id.clone() })
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let item = NewQueueItem {
        id: &id,
        lane: Lane::Main,
        priority: 0,
        tenant: &caller.tenant,
        payload: &payload,
        max_attempts: state.tasks.max_attempts.max(1),
        reason: Some("waiting for a task worker"),
    };
    if let Enqueue::Full { depth } = state
        .store
        .enqueue_on(Topic::Task, &item, now, MAX_WAITING)
        .await?
    {
        let outcome = tartarus_store::TaskOutcome {
            status: TaskStatus::Failed,
            output: None,
            error: Some("the task queue is full"),
            branch: None,
            pull_request: None,
        };
        state.store.finish_task(&id, &outcome, now).await?;
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("{depth} tasks already wait for a worker; retry later"),
        )
        .into_response();
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("5"),
        );
        return Ok(response);
    }
    audit(&state, &caller, "task.create", Some(&id), "ok").await;
    let task = state
        .store
        .task(&id, None)
        .await?
        .ok_or_else(|| ApiError::internal("the task just stored is gone"))?;
    crate::tasks::task_event(&state, &task, "task.created", "waiting for a worker", json!({})).await;
    Ok((StatusCode::ACCEPTED, Json(view(task, None))).into_response())
}

pub(crate) async fn list_tasks(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<TaskView>>, ApiError> {
    let tasks = state.store.tasks(Some(&caller.tenant), 500).await?;
    Ok(Json(tasks.into_iter().map(|t| view(t, None)).collect()))
}

async fn find(state: &AppState, caller: &Caller, id: &str) -> Result<TaskRecord, ApiError> {
    state
        .store
        .task(id, Some(&caller.tenant))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))
}

pub(crate) async fn get_task(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    let task = find(&state, &caller, &id).await?;
    let events = state.store.task_events(&task.id).await?;
    Ok(Json(view(task, Some(events))))
}

pub(crate) async fn task_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<String, ApiError> {
    let task = find(&state, &caller, &id).await?;
    Ok(state.store.task_logs(&task.id).await?)
}

pub(crate) async fn cancel_task(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    caller.require_mutate()?;
    let task = find(&state, &caller, &id).await?;
    match state
        .store
        .request_task_cancel(&task.id, tartarus_store::now_ms())
        .await?
    {
        Some(TaskStatus::Cancelled) => {
            crate::tasks::task_event(
                &state,
                &task,
                "task.cancelled",
                "cancelled before it started",
                json!({}),
            )
            .await;
        }
        Some(_) => {
            crate::tasks::task_event(
                &state,
                &task,
                "task.cancelling",
                "cancel requested: the sandbox is killed",
                json!({}),
            )
            .await;
        }
        None => {
            return Err(ApiError::conflict(format!(
                "task {id} is {}",
                task.status.as_str()
            )))
        }
    }
    audit(&state, &caller, "task.cancel", Some(&task.id), "ok").await;
    Ok(Json(view(find(&state, &caller, &id).await?, None)))
}
