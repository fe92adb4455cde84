//! What every handler shares ([`AppState`]) and the small lookups they all use: a caller's sandbox, its API
//! view, the audit trail.

use std::path::PathBuf;
use std::sync::Arc;

use axum::http::StatusCode;
use tartarus_store::{NewAudit, SandboxRecord, SandboxStatus, Store};

use crate::api::SandboxView;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::sandboxes::Manager;
use crate::{cluster, effects, images, policies};

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub manager: Arc<Manager>,
    pub images: images::Images,
    pub policies: policies::Policies,
    pub classifier: Option<Arc<PathBuf>>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub effects: effects::Effects,
    pub cluster: Arc<cluster::ClusterConfig>,
    /// Whether this replica leads the background loops now.
    pub leading: tokio::sync::watch::Receiver<bool>,
    /// Serialises placements on cluster nodes within this replica (capacity is read, then reserved).
    pub placement: Arc<tokio::sync::Mutex<()>>,
    /// For calls to node agents.
    pub http: reqwest::Client,
    /// For streams forwarded from node agents (no overall time limit).
    pub stream_http: reqwest::Client,
    /// What of the host admin keys may give a sandbox (off unless the server was started to allow it).
    pub host_access: crate::sandboxes::HostAccess,
    /// The E2B-compatible surface's keys and files.
    pub e2b: Arc<crate::e2b::E2bState>,
    /// Prices that turn usage into cost (`--price-table`); `None`: usage is shown without cost.
    pub prices: Option<Arc<crate::usage::PriceTable>>,
    /// The event bus (docs/events.md).
    pub events: crate::events::ServerEvents,
    /// Agent tasks (docs/tasks.md): the settings, the key sealing projects' credentials, and where
    /// workers clone repositories.
    pub tasks: Arc<crate::tasks::TaskSettings>,
    pub task_key: crate::tasks::TaskKey,
    pub tasks_dir: PathBuf,
}

pub(crate) fn view(record: &SandboxRecord) -> SandboxView {
    SandboxView {
        id: record.id.clone(),
        tenant: record.tenant.clone(),
        status: match (record.status, record.paused) {
            (SandboxStatus::Running, true) => "paused".to_string(),
            (status, _) => status.as_str().to_string(),
        },
        template: record.template.clone(),
        labels: record.labels.clone(),
        created_ms: record.created_ms,
        finished_ms: record.finished_ms,
        exit_code: record.exit_code,
        reason: record.reason.clone(),
        node: record.node.clone(),
        placement: record.placement.clone(),
        runtime: record.runtime.clone(),
        runtime_reason: record.runtime_reason.clone(),
        paused_to: match (record.status, record.paused, &record.hibernated_to) {
            (SandboxStatus::Running, true, Some(_)) => Some(crate::api::PauseMode::Disk),
            (SandboxStatus::Running, true, None) => Some(crate::api::PauseMode::Memory),
            _ => None,
        },
    }
}

pub(crate) async fn audit(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: Option<&str>,
    outcome: &str,
) {
    let record = NewAudit {
        tenant: &caller.tenant,
        key_id: Some(&caller.key_id),
        action,
        target,
        outcome,
        detail: None,
    };
    if let Err(e) = state.store.record_audit(&record).await {
        tracing::error!("audit write failed: {}", tartarus_runtime::error_chain(&e));
    }
}

pub(crate) async fn find(state: &AppState, caller: &Caller, id: &str) -> Result<SandboxRecord, ApiError> {
    // Another tenant's sandbox is reported exactly like a missing one, so ids do not leak.
    state
        .store
        .sandbox(id, caller.scope())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no sandbox '{id}'")))
}

/// Refuses what sandboxes on cluster nodes cannot do yet.
pub(crate) fn local_only(record: &SandboxRecord, what: &str) -> Result<(), ApiError> {
    match &record.node {
        Some(node) => Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_on_nodes",
            format!("{what} is not available yet for sandboxes on cluster nodes (this one runs on {node})"),
        )),
        None => Ok(()),
    }
}
