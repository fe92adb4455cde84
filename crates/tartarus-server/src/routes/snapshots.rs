//! Snapshots through the API: `GET /v1/snapshots` (the sealed snapshots of sandboxes paused to disk) and
//! `POST /v1/sandboxes/{id}/fork` (copies of a running or paused-to-disk sandbox, memory and processes
//! included, each a sandbox of its own).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;

use crate::api::SandboxView;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::sandboxes::{stored_spec, MAX_FORK_COUNT};
use crate::{audit, find, policies, view, AppState};

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ForkQuery {
    /// How many children (1 to 16; default 1).
    pub count: Option<u32>,
}

/// Fork a sandbox into `count` children: each continues from the parent's state at one instant — its
/// memory, processes and scratch files — under its own id, gateway and episode, while the parent goes on
/// (a parent paused to disk stays paused). Lanes with `pause_to_disk` (gvisor; 409 `unsupported`
/// elsewhere). The tenant's quotas count every child before any starts (429 when they do not all fit);
/// refused while an exec is attached to the parent (409).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", params(ForkQuery), security(("api_key" = [])),
    responses((status = 201, body = [SandboxView]), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub(crate) async fn fork_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<ForkQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(StatusCode, Json<Vec<SandboxView>>), ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let count = query.count.unwrap_or(1);
    if !(1..=MAX_FORK_COUNT).contains(&count) {
        return Err(ApiError::invalid(format!(
            "count {count} is out of range: fork 1 to {MAX_FORK_COUNT} children at once"
        )));
    }
    let parent = find(&state, &caller, &id).await?;
    caller.require_mutate()?;
    if parent.status != tartarus_store::SandboxStatus::Running {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}; only a running or paused sandbox can be forked",
            parent.status.as_str()
        )));
    }
    if parent.node.is_some() {
        return Err(ApiError::conflict(format!(
            "sandbox {id} runs on cluster node {}; forking works on sandboxes of the control plane's own \
             machine for now",
            parent.node.as_deref().unwrap_or_default()
        )));
    }
    // Every child is a sandbox of the tenant: the quotas count them all, before any starts. The judges'
    // constraints were applied to the parent's spec already; the children keep it as it is.
    let mut spec = stored_spec(&parent)?;
    let facts = policies::AdmissionFacts {
        template: parent.template.as_deref(),
        class: None,
        rootfs: false,
    };
    policies::admit_copies(&state, &caller, &mut spec, &facts, count).await?;
    let result = state.manager.fork(&parent, count).await;
    let outcome = match &result {
        Ok(children) => format!(
            "ok: {}",
            children
                .iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Err(e) => format!("failed: {}", e.message),
    };
    audit(&state, &caller, "sandbox.fork", Some(&id), &outcome).await;
    let children = result?;
    Ok((StatusCode::CREATED, Json(children.iter().map(view).collect())))
}

/// A sealed snapshot of a sandbox paused to disk.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SnapshotView {
    /// The sandbox it resumes (`POST /v1/sandboxes/{sandbox}/resume`).
    pub sandbox: String,
    pub tenant: String,
    pub lane: String,
    /// Every part together, as stored.
    pub bytes: u64,
    /// When it was sealed (milliseconds since the Unix epoch).
    pub created_ms: i64,
}

/// The caller's tenant's snapshots (every tenant's for admins): one per sandbox paused to disk, newest
/// first.
#[utoipa::path(get, path = "/v1/snapshots", security(("api_key" = [])),
    responses((status = 200, body = [SnapshotView]), (status = 401, body = ErrorBody)))]
pub(crate) async fn list_snapshots(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<SnapshotView>>, ApiError> {
    let records = state
        .store
        .sandboxes(caller.scope(), Some(tartarus_store::SandboxStatus::Running))
        .await?;
    let mut views = Vec::new();
    for record in records {
        let Some(dir) = record.hibernated_to.clone() else {
            continue;
        };
        let path = std::path::PathBuf::from(&dir);
        let manifest = tokio::task::spawn_blocking(move || tartarus_runtime::snapshot::read_manifest(&path))
            .await
            .map_err(|e| ApiError::internal(format!("reading a snapshot manifest: {e}")))?;
        // The directory is named by the time it was made.
        let created_ms = std::path::Path::new(&dir)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        views.push(SnapshotView {
            sandbox: record.id,
            tenant: record.tenant,
            lane: record.runtime,
            bytes: manifest.map(|m| m.total_bytes()).unwrap_or(0),
            created_ms,
        });
    }
    views.sort_by_key(|v| std::cmp::Reverse(v.created_ms));
    Ok(Json(views))
}
