//! Cluster mode, control-plane side: node join tokens, registration and heartbeats from node agents
//! (authenticated by per-node tokens), the node list, and the background loops that run on one leader
//! among the server replicas sharing a database (the heartbeat reaper today).
//!
//! Node ↔ control traffic: the agent sends `Authorization: Bearer tn_…`, a token bound to one node id
//! (`POST /v1/nodes/tokens`, admin). Refusals are audited. The design leaves room for mTLS: the token
//! check is one extractor ([`NodeCaller`]) that a client-certificate check can replace.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tartarus_scheduler::{Node, Resources, Taint};
use tartarus_store::{NewAudit, NewEvent, NodeRegistration, Registered, Role};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{json_rejection, ApiError};
use crate::AppState;

/// The leadership name of the control plane's background loops.
pub const LOOPS: &str = "control-loops";

/// Cluster settings of a server replica.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// A node whose last heartbeat is older than this is marked unreachable.
    pub node_timeout: Duration,
    /// Requests waiting in the queue beyond which creates are refused (429).
    pub queue_depth: i64,
    /// How the scheduler scores nodes.
    pub strategy: tartarus_scheduler::Strategy,
    /// This replica's name in leader terms.
    pub replica: String,
}

/// What an agent reports when it registers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeReport {
    pub id: String,
    /// The agent process (random per start): one agent holds a node id at a time.
    pub instance: String,
    /// Where the agent listens (HOST:PORT).
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub taints: Vec<Taint>,
    #[schema(value_type = Object)]
    pub capacity: Resources,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub usage: Resources,
    /// The key the control plane uses to call this node's agent (its local admin key).
    #[serde(default)]
    pub api_key: String,
    /// Resource classes this node is dedicated to (empty: it takes any request without a dedicated pool).
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub pools: std::collections::BTreeSet<String>,
    /// A quarantine node: it takes only quarantined work, and quarantined work goes only to such nodes.
    #[serde(default)]
    pub quarantine: bool,
}

/// A heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub instance: String,
    pub epoch: i64,
    #[schema(value_type = Object)]
    pub usage: Resources,
}

/// The answer to a registration.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Registration {
    pub epoch: i64,
    /// How often to send heartbeats.
    pub heartbeat_ms: u64,
}

/// The most a node may claim: beyond this a report is nonsense, not a big machine.
const MAX_CPU_MILLIS: u64 = 100_000 * 1000;
const MAX_MEMORY_BYTES: u64 = 1 << 50;
const MAX_GPUS: u32 = 1024;

impl NodeReport {
    /// Refuses ids, capacities and usages that make no sense, saying which.
    pub fn validate(&self) -> Result<(), String> {
        let mut node = Node::new(&self.id, self.capacity).map_err(|e| e.to_string())?;
        node.labels = self.labels.clone();
        node.taints = self.taints.clone();
        node.pools = self.pools.clone();
        node.quarantine = self.quarantine;
        node.validate().map_err(|e| e.to_string())?;
        let c = &self.capacity;
        if c.cpu_millis > MAX_CPU_MILLIS || c.memory_bytes > MAX_MEMORY_BYTES || c.gpus > MAX_GPUS {
            return Err(format!(
                "capacity {c} is beyond any machine (at most {} cores, 1 PiB, {MAX_GPUS} GPUs)",
                MAX_CPU_MILLIS / 1000
            ));
        }
        check_usage(&self.usage, c)?;
        if self.instance.is_empty() || self.instance.len() > 128 {
            return Err("instance must be 1-128 characters".to_string());
        }
        if self.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!("address '{}' is not HOST:PORT", self.address));
        }
        Ok(())
    }
}

fn check_usage(usage: &Resources, capacity: &Resources) -> Result<(), String> {
    if !usage.fits_in(*capacity) {
        return Err(format!("usage {usage} exceeds capacity {capacity}"));
    }
    Ok(())
}

/// A node agent, authenticated by its join token.
pub struct NodeCaller {
    pub node_id: String,
}

impl FromRequestParts<AppState> for NodeCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or_default();
        match state.store.node_for_token(token).await? {
            Some(node_id) => Ok(NodeCaller { node_id }),
            None => {
                audit_node(state, "?", "node.auth", "denied: unknown node token").await;
                Err(ApiError::unauthorized(
                    "unknown node token: create one with `tartarus node token create ID` and pass it as --token",
                ))
            }
        }
    }
}

async fn audit_node(state: &AppState, node: &str, action: &str, outcome: &str) {
    let record = NewAudit {
        tenant: "cluster",
        key_id: None,
        action,
        target: Some(node),
        outcome,
        detail: None,
    };
    if let Err(e) = state.store.record_audit(&record).await {
        tracing::error!("audit write failed: {e}");
    }
}

/// Register a node agent (node token).
#[utoipa::path(post, path = "/v1/nodes/register", request_body = NodeReport,
    responses((status = 200, body = Registration), (status = 401), (status = 403), (status = 409), (status = 422)))]
pub async fn register(
    State(state): State<AppState>,
    node: NodeCaller,
    body: Result<Json<NodeReport>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Registration>, ApiError> {
    let Json(report) = body.map_err(json_rejection)?;
    if report.id != node.node_id {
        audit_node(
            &state,
            &report.id,
            "node.register",
            "denied: token of another node",
        )
        .await;
        return Err(ApiError::forbidden(format!(
            "this token belongs to node '{}', not '{}'",
            node.node_id, report.id
        )));
    }
    if let Err(reason) = report.validate() {
        audit_node(&state, &report.id, "node.register", "refused: invalid report").await;
        return Err(ApiError::invalid(format!("node '{}': {reason}", report.id)));
    }
    let config = &state.cluster;
    let registration = NodeRegistration {
        id: &report.id,
        instance: &report.instance,
        address: &report.address,
        labels: &report.labels,
        taints: &report.taints,
        capacity: report.capacity,
        usage: report.usage,
        api_key: &report.api_key,
        pools: &report.pools,
        quarantine: report.quarantine,
        now_ms: tartarus_store::now_ms(),
        stale_after_ms: config.node_timeout.as_millis() as i64,
    };
    match state.store.register_node(&registration).await? {
        Registered::Accepted { epoch } => {
            audit_node(&state, &report.id, "node.register", "ok").await;
            event(
                &state,
                "node.registered",
                &report.id,
                &format!("node {} registered (epoch {epoch})", report.id),
            )
            .await;
            Ok(Json(Registration {
                epoch,
                heartbeat_ms: (config.node_timeout / 4).as_millis().max(50) as u64,
            }))
        }
        Registered::Duplicate {
            instance,
            last_heartbeat_ms,
        } => {
            audit_node(&state, &report.id, "node.register", "refused: duplicate id").await;
            Err(ApiError::conflict(format!(
                "node id '{}' is held by another running agent (instance {instance}, last heartbeat {} ms ago); \
                 stop it or give this node another id",
                report.id,
                tartarus_store::now_ms() - last_heartbeat_ms
            )))
        }
    }
}

/// A node agent's heartbeat (node token).
#[utoipa::path(post, path = "/v1/nodes/{id}/heartbeat", request_body = Heartbeat,
    responses((status = 204), (status = 401), (status = 409, description = "superseded: register again")))]
pub async fn heartbeat(
    State(state): State<AppState>,
    node: NodeCaller,
    Path(id): Path<String>,
    body: Result<Json<Heartbeat>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(beat) = body.map_err(json_rejection)?;
    if id != node.node_id {
        audit_node(&state, &id, "node.heartbeat", "denied: token of another node").await;
        return Err(ApiError::forbidden(format!(
            "this token belongs to node '{}'",
            node.node_id
        )));
    }
    let record = state
        .store
        .node(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("node '{id}' is not registered")))?;
    check_usage(&beat.usage, &record.capacity)
        .map_err(|reason| ApiError::invalid(format!("node '{id}': {reason}")))?;
    let fresh = state
        .store
        .node_heartbeat(
            &id,
            &beat.instance,
            beat.epoch,
            beat.usage,
            tartarus_store::now_ms(),
        )
        .await?;
    if !fresh {
        return Err(ApiError::conflict(format!(
            "node '{id}' was registered again by another agent (or this one was superseded): register again"
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A node as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub id: String,
    pub state: String,
    pub address: String,
    #[schema(value_type = Object)]
    pub labels: BTreeMap<String, String>,
    #[schema(value_type = Object)]
    pub taints: Vec<Taint>,
    #[schema(value_type = Object)]
    pub capacity: Resources,
    #[schema(value_type = Object)]
    pub usage: Resources,
    pub epoch: i64,
    pub last_heartbeat_ms: i64,
}

/// Registered nodes.
#[utoipa::path(get, path = "/v1/nodes", security(("api_key" = [])), responses((status = 200, body = [NodeView])))]
pub async fn list_nodes(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    Ok(Json(
        state
            .store
            .nodes()
            .await?
            .into_iter()
            .map(|n| {
                n.map(|n| NodeView {
                    labels: n.labels,
                    taints: n.taints,
                    capacity: n.capacity,
                    usage: n.usage,
                    id: n.id,
                    state: n.state.to_string(),
                    address: n.address,
                    epoch: n.epoch,
                    last_heartbeat_ms: n.last_heartbeat_ms,
                })
            })
            .collect::<Result<_, _>>()?,
    ))
}

/// Remove a node and its join token (its agent is refused from then on). Admin only. Its sandboxes still
/// running are marked lost.
#[utoipa::path(delete, path = "/v1/nodes/{id}", security(("api_key" = [])), responses((status = 204), (status = 404)))]
pub async fn delete_node(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden("only admin keys may remove nodes"));
    }
    if !state.store.delete_node(&id).await? {
        return Err(ApiError::not_found(format!("no node '{id}'")));
    }
    lose_sandboxes_of(&state, &id).await;
    crate::audit(&state, &caller, "node.delete", Some(&id), "ok").await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNodeToken {
    pub id: String,
}

/// Create (or replace) a node's join token. Admin only; the token is shown once.
#[utoipa::path(post, path = "/v1/nodes/tokens", request_body = CreateNodeToken, security(("api_key" = [])),
    responses((status = 201), (status = 403), (status = 422)))]
pub async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CreateNodeToken>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden("only admin keys may create node tokens"));
    }
    let Json(body) = body.map_err(json_rejection)?;
    Node::new(&body.id, Resources::new(1, 1, 0)).map_err(|e| ApiError::invalid(e.to_string()))?;
    let token = state.store.create_node_token(&body.id).await?;
    crate::audit(&state, &caller, "node.token", Some(&body.id), "ok").await;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"id": body.id, "token": token})),
    ))
}

/// Which replica leads the background loops.
#[utoipa::path(get, path = "/v1/cluster", security(("api_key" = [])), responses((status = 200)))]
pub async fn cluster_status(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    let leader = state.store.leader(LOOPS).await?;
    let (holder, term, since) = leader
        .map(|(h, t, s)| (Some(h), Some(t), Some(s)))
        .unwrap_or_default();
    Ok(Json(serde_json::json!({
        "replica": state.cluster.replica,
        "leader": holder.as_deref() == Some(state.cluster.replica.as_str()) && *state.leading.borrow(),
        "leader_replica": holder,
        "term": term,
        "since_ms": since,
        "backend": match state.store.backend() {
            tartarus_store::Backend::Sqlite => "sqlite",
            tartarus_store::Backend::Postgres => "postgres",
        },
    })))
}

async fn event(state: &AppState, kind: &str, node: &str, message: &str) {
    let event = NewEvent {
        category: "cluster",
        kind,
        sandbox: None,
        tenant: None,
        message,
        details: Some(&serde_json::json!({"node": node}).to_string()),
    };
    if let Err(e) = state.store.record_event(&event).await {
        tracing::error!("recording a cluster event failed: {e}");
    }
}

/// Runs the background loops while this replica leads: competes for leadership every tick, and as leader
/// marks nodes that missed their heartbeats unreachable. `leading` tells the API what this replica is.
pub fn spawn_loops(state: AppState, leading: Arc<tokio::sync::watch::Sender<bool>>) {
    tokio::spawn(async move {
        let tick = (state.cluster.node_timeout / 4).max(Duration::from_millis(50));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leadership = None;
        loop {
            interval.tick().await;
            if leadership.is_none() {
                match state.store.try_lead(LOOPS, &state.cluster.replica).await {
                    Ok(Some(held)) => {
                        tracing::info!(term = held.term, "this replica now leads the background loops");
                        leadership = Some(held);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("leader election: {e}"),
                }
            }
            let Some(held) = leadership.as_mut() else {
                leading.send_replace(false);
                continue;
            };
            if !held.check().await {
                tracing::warn!("lost the database connection that held leadership; stepping down");
                leadership = None;
                leading.send_replace(false);
                continue;
            }
            leading.send_replace(true);
            let before = tartarus_store::now_ms() - state.cluster.node_timeout.as_millis() as i64;
            match state.store.mark_unreachable(before).await {
                Ok(ids) => {
                    for id in ids {
                        tracing::warn!(node = %id, "node missed its heartbeats: unreachable");
                        let message = format!(
                            "node {id} sent no heartbeat for {} s: marked unreachable, no new work goes to it",
                            state.cluster.node_timeout.as_secs_f64()
                        );
                        event(&state, "node.unreachable", &id, &message).await;
                        lose_sandboxes_of(&state, &id).await;
                    }
                }
                Err(e) => tracing::error!("reaping nodes: {e}"),
            }
            dispatch(&state).await;
        }
    });
}

// ---- Sandboxes on nodes ----

/// What the control plane sends a node's server: a sandbox already admitted and compiled.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSandbox {
    pub tenant: String,
    pub spec: tartarus_runtime::SandboxSpec,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub template: Option<String>,
}

/// Node side: start a sandbox the control plane placed here (admin key: the control plane's).
pub async fn create_node_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<NodeSandbox>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<crate::api::SandboxView>), ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden(
            "only the control plane (an admin key) places sandboxes on a node",
        ));
    }
    let Json(body) = body.map_err(json_rejection)?;
    let mut spec = body.spec;
    if !matches!(spec.root, tartarus_runtime::RootSpec::HostSystem) {
        return Err(ApiError::invalid(
            "a placed sandbox runs on the node's host root; images are not placed on nodes yet",
        ));
    }
    spec.service = true;
    spec.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    let record = state
        .manager
        .create(&body.tenant, spec, body.labels, body.template.as_deref(), None)
        .await?;
    crate::audit(&state, &caller, "sandbox.create", Some(&record.id), "ok").await;
    Ok((StatusCode::CREATED, Json(crate::view(&record))))
}

/// A sandbox to place: admitted and compiled; also the payload of a queued request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wanted {
    /// Set for a queued request: its queue id becomes the sandbox's id.
    pub id: Option<String>,
    pub tenant: String,
    pub spec: tartarus_runtime::SandboxSpec,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub class: Option<String>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<tartarus_scheduler::Toleration>,
    #[serde(default)]
    pub node_affinity: Vec<tartarus_scheduler::LabelTerm>,
    #[serde(default)]
    pub node_anti_affinity: Vec<tartarus_scheduler::LabelTerm>,
    /// Spread sandboxes that share this label's value over nodes.
    pub spread_by: Option<String>,
}

/// A new sandbox id (the same form as the manager's).
pub fn new_sandbox_id() -> Result<String, ApiError> {
    let hex = tartarus_hostsys::random_hex(6).map_err(|e| ApiError::internal(format!("randomness: {e}")))?;
    Ok(format!("sb_{hex}"))
}

/// Queue lanes' depth and wait metrics.
pub const QUEUE_DEPTH: &str = "tartarus_queue_depth";
pub const QUEUE_WAIT: &str = "tartarus_queue_wait_duration_seconds";

/// Puts a request no node has room for now in the queue. `Ok(None)` when the queue is full (429).
pub async fn enqueue(
    state: &AppState,
    want: &Wanted,
    lane: tartarus_store::Lane,
    priority: i64,
    reason: &str,
) -> Result<Option<String>, ApiError> {
    let id = new_sandbox_id()?;
    let payload = Wanted {
        id: Some(id.clone()),
        ..want.clone()
    };
    let payload = serde_json::to_string(&payload).map_err(|e| ApiError::internal(e.to_string()))?;
    let item = tartarus_store::NewQueueItem {
        id: &id,
        lane,
        priority,
        tenant: &want.tenant,
        payload: &payload,
        max_attempts: 30,
        reason: Some(reason),
    };
    match state
        .store
        .enqueue(&item, tartarus_store::now_ms(), state.cluster.queue_depth)
        .await?
    {
        tartarus_store::Enqueue::Queued => Ok(Some(id)),
        tartarus_store::Enqueue::Full { .. } => Ok(None),
    }
}

/// On the leader: places queued requests whose time has come, one tick's worth.
async fn dispatch(state: &AppState) {
    let worker = state.cluster.replica.clone();
    for _ in 0..32 {
        let now = tartarus_store::now_ms();
        let item = match state.store.dequeue(&worker, now, 60_000).await {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(e) => {
                tracing::error!("dequeue: {e}");
                break;
            }
        };
        let want: Wanted = match serde_json::from_str(&item.payload) {
            Ok(w) => w,
            Err(e) => {
                let _ = state
                    .store
                    .reject(&item.id, &worker, &format!("unreadable request: {e}"), false, now)
                    .await;
                continue;
            }
        };
        let lane = item.lane.as_str();
        match place_on_node(state, &want).await {
            Ok(Some(record)) => {
                let waited = (tartarus_store::now_ms() - item.enqueued_ms).max(0) as f64 / 1000.0;
                metrics::histogram!(QUEUE_WAIT, "lane" => lane).record(waited);
                if let Err(e) = state
                    .store
                    .ack_with(&item.id, &worker, Some(&record.id), tartarus_store::now_ms())
                    .await
                {
                    tracing::error!(item = %item.id, "ack: {e}");
                }
                event(
                    state,
                    "queue.placed",
                    record.node.as_deref().unwrap_or("-"),
                    &format!(
                        "queued sandbox {} placed after {waited:.1} s: {}",
                        record.id,
                        record.placement.as_deref().unwrap_or_default()
                    ),
                )
                .await;
            }
            Ok(None) => {
                let _ = state
                    .store
                    .reject(&item.id, &worker, "no node is registered", true, now)
                    .await;
            }
            Err(e) if e.code == "no_capacity" || e.code == "node_unreachable" || e.code == "node_failed" => {
                let _ = state.store.reject(&item.id, &worker, &e.message, true, now).await;
            }
            Err(e) => {
                let _ = state
                    .store
                    .reject(&item.id, &worker, &e.message, false, now)
                    .await;
                let event = NewEvent {
                    category: "dead_letter",
                    kind: "queue.dead",
                    sandbox: Some(&item.id),
                    tenant: Some(&item.tenant),
                    message: &format!("queued sandbox {} cannot be placed: {}", item.id, e.message),
                    details: Some(&item.payload),
                };
                let _ = state.store.record_event(&event).await;
            }
        }
    }
    for lane in tartarus_store::Lane::ALL {
        if let Ok(depth) = state.store.queue_depth(Some(lane)).await {
            metrics::gauge!(QUEUE_DEPTH, "lane" => lane.as_str()).set(depth as f64);
        }
    }
}

/// What the scheduler should assume a sandbox without limits takes.
const DEFAULT_REQUEST: Resources = Resources::new(100, 128 << 20, 0);

fn requested(spec: &tartarus_runtime::SandboxSpec) -> Resources {
    Resources::new(
        spec.limits
            .cpus
            .map(|c| (c * 1000.0).ceil() as u64)
            .unwrap_or(DEFAULT_REQUEST.cpu_millis),
        spec.limits.memory_bytes.unwrap_or(DEFAULT_REQUEST.memory_bytes),
        0,
    )
}

/// Places a (host-root) sandbox on a ready node when the cluster has any: the scheduler picks the node
/// among what live sandboxes leave free, the node's server starts it, and the control plane records
/// where and why. `Ok(None)` when there are no nodes: the sandbox runs on this machine.
pub async fn place_on_node(
    state: &AppState,
    want: &Wanted,
) -> Result<Option<tartarus_store::SandboxRecord>, ApiError> {
    let Wanted {
        id: wanted_id,
        tenant,
        spec,
        labels,
        class,
        node_selector: selector,
        tolerations,
        node_affinity,
        node_anti_affinity,
        spread_by,
    } = want;
    // The group this sandbox spreads with: its own value of the `spread_by` label.
    let group = match spread_by {
        None => None,
        Some(key) => Some(format!(
            "{key}={}",
            labels.get(key).ok_or_else(|| ApiError::invalid(format!(
                "spread_by '{key}': the sandbox has no label '{key}' to spread by"
            )))?
        )),
    };
    let (tenant, class) = (tenant.as_str(), class.as_deref());
    let _serial = state.placement.lock().await;
    // A queued request delivered again after its dispatcher died: already placed.
    if let Some(id) = wanted_id {
        if let Some(existing) = state.store.sandbox(id, None).await? {
            return Ok(Some(existing));
        }
    }
    let records: Vec<_> = state
        .store
        .nodes()
        .await?
        .into_iter()
        .filter_map(|node| {
            // An unreadable node (its taints, say) is never placed on with defaults: left out, and said why.
            node.inspect_err(|e| {
                tracing::error!("node left out of placement: {}", tartarus_runtime::error_chain(e))
            })
            .ok()
        })
        .filter(|n| !n.api_key.is_empty())
        .collect();
    if records.is_empty() {
        if !selector.is_empty() {
            return Err(ApiError::invalid(
                "node_selector given, but no node is registered",
            ));
        }
        return Ok(None);
    }
    let live = state
        .store
        .sandboxes(None, Some(tartarus_store::SandboxStatus::Running))
        .await?;
    let mut nodes = Vec::with_capacity(records.len());
    for record in &records {
        let capacity = record.capacity;
        let mut node = Node::new(&record.id, capacity).map_err(|e| ApiError::internal(e.to_string()))?;
        node.labels = record.labels.clone();
        node.taints = record.taints.clone();
        node.state = record.state;
        node.pools = record.pools.clone();
        node.quarantine = record.quarantine;
        for sandbox in live
            .iter()
            .filter(|s| s.node.as_deref() == Some(record.id.as_str()))
        {
            if let (Some(group), Some(key)) = (&group, spread_by) {
                if sandbox
                    .labels
                    .get(key)
                    .is_some_and(|v| format!("{key}={v}") == *group)
                {
                    *node.groups.entry(group.clone()).or_default() += 1;
                }
            }
            let spec: tartarus_runtime::SandboxSpec = serde_json::from_str(&sandbox.spec).unwrap_or_default();
            let sum = node.allocated.saturating_add(requested(&spec));
            // What a node reports is what it has: never account more than that.
            node.allocated = Resources::new(
                sum.cpu_millis.min(capacity.cpu_millis),
                sum.memory_bytes.min(capacity.memory_bytes),
                sum.gpus.min(capacity.gpus),
            );
        }
        nodes.push(node);
    }
    let id = match wanted_id {
        Some(id) => id.clone(),
        None => new_sandbox_id()?,
    };
    let mut request = tartarus_scheduler::Request::new(&id, requested(spec));
    request.class = class.map(str::to_string);
    request.selector = selector.clone();
    request.tolerations = tolerations.clone();
    request.affinity = node_affinity.clone();
    request.anti_affinity = node_anti_affinity.clone();
    request.spread = group.is_some();
    request.group = group;
    request
        .validate()
        .map_err(|e| ApiError::invalid(format!("placement: {e}")))?;
    let placement = tartarus_scheduler::place(&request, &nodes, state.cluster.strategy).map_err(|e| {
        if e.never_fits {
            ApiError::invalid(format!("no node could ever run this sandbox: {}", e.message))
        } else {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_capacity",
                format!(
                    "no node has room for this sandbox now ({}); retry later",
                    e.message
                ),
            )
        }
    })?;
    let node = records
        .iter()
        .find(|n| n.id == placement.node)
        .ok_or_else(|| ApiError::internal("the scheduler chose an unknown node"))?;
    let body = NodeSandbox {
        tenant: tenant.to_string(),
        spec: spec.clone(),
        labels: labels.clone(),
        template: None,
    };
    let (status, remote) = node_call(
        state,
        node,
        reqwest::Method::POST,
        "/v1/node/sandboxes",
        Some(serde_json::to_value(&body).unwrap_or_default()),
    )
    .await?;
    if status != 201 {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "node_failed",
            format!(
                "node {} did not start the sandbox: {}",
                node.id,
                remote["error"]["message"].as_str().unwrap_or("no reason")
            ),
        ));
    }
    let remote_id = remote["id"].as_str().unwrap_or_default().to_string();
    let record = tartarus_store::SandboxRecord {
        id,
        tenant: tenant.to_string(),
        status: tartarus_store::SandboxStatus::Running,
        template: None,
        spec: serde_json::to_string(spec).unwrap_or_default(),
        labels: labels.clone(),
        created_ms: tartarus_store::now_ms(),
        finished_ms: None,
        exit_code: None,
        reason: None,
        shim_pid: None,
        dir: String::new(),
        paused: false,
        node: Some(node.id.clone()),
        remote_id: Some(remote_id),
        placement: Some(placement.explanation.clone()),
    };
    state.store.insert_sandbox(&record).await?;
    state.store.mark_running(&record.id, 0).await?;
    Ok(Some(record))
}

/// A node that did not answer a call.
fn node_unreachable(node: &tartarus_store::NodeRecord, e: &reqwest::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "node_unreachable",
        format!(
            "node {} at {} did not answer: {}",
            node.id,
            node.address,
            tartarus_runtime::error_chain(e)
        ),
    )
}

/// Calls a node's server with the key it registered; (status, JSON body).
pub async fn node_call(
    state: &AppState,
    node: &tartarus_store::NodeRecord,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), ApiError> {
    let mut request = state
        .http
        .request(method, format!("http://{}{path}", node.address))
        .bearer_auth(&node.api_key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|e| node_unreachable(node, &e))?;
    let status = response.status().as_u16();
    let value = response.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, value))
}

/// The node record of a sandbox placed on a node.
pub async fn node_of(
    state: &AppState,
    record: &tartarus_store::SandboxRecord,
) -> Result<Option<tartarus_store::NodeRecord>, ApiError> {
    match &record.node {
        None => Ok(None),
        Some(id) => Ok(Some(state.store.node(id).await?.ok_or_else(|| {
            ApiError::internal(format!(
                "sandbox {} is on node {id}, which is not registered",
                record.id
            ))
        })?)),
    }
}

/// Records the outcome a node reports for one of its sandboxes, when it has ended there.
pub async fn sync_from_node(
    state: &AppState,
    record: &tartarus_store::SandboxRecord,
    remote: &serde_json::Value,
) -> Result<(), ApiError> {
    let status = remote["status"].as_str().unwrap_or("running");
    if matches!(status, "running" | "starting" | "paused") || !record.status.is_live() {
        return Ok(());
    }
    let finish = tartarus_store::Finish {
        status: status.parse().unwrap_or(tartarus_store::SandboxStatus::Lost),
        exit_code: remote["exit_code"].as_i64(),
        reason: remote["reason"].as_str().unwrap_or(status),
    };
    state.store.finish_sandbox(&record.id, &finish).await?;
    Ok(())
}

/// A node became unreachable: its live sandboxes are lost (they may still run there, cut off; nothing
/// starts them again elsewhere, so nothing runs twice).
async fn lose_sandboxes_of(state: &AppState, node: &str) {
    let Ok(live) = state
        .store
        .sandboxes(None, Some(tartarus_store::SandboxStatus::Running))
        .await
    else {
        return;
    };
    for record in live.into_iter().filter(|r| r.node.as_deref() == Some(node)) {
        let reason = format!("node {node} became unreachable");
        let finish = tartarus_store::Finish {
            status: tartarus_store::SandboxStatus::Lost,
            exit_code: None,
            reason: &reason,
        };
        if let Err(e) = state.store.finish_sandbox(&record.id, &finish).await {
            tracing::error!(sandbox = %record.id, "marking a sandbox lost failed: {e}");
            continue;
        }
        let event = NewEvent {
            category: "lifecycle",
            kind: "sandbox.lost",
            sandbox: Some(&record.id),
            tenant: Some(&record.tenant),
            message: &format!("sandbox {} lost: {reason}", record.id),
            details: None,
        };
        let _ = state.store.record_event(&event).await;
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct QueueQuery {
    /// Admins only: one tenant's items.
    tenant: Option<String>,
}

/// Requests waiting for a node (in dequeue order) and dead letters, with the depth of each lane.
#[utoipa::path(get, path = "/v1/queue", params(QueueQuery), security(("api_key" = [])), responses((status = 200)))]
pub async fn list_queue(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<axum::extract::Query<QueueQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let axum::extract::Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let tenant = caller.scope_for(query.tenant.as_deref(), "queue")?;
    let mut depth = serde_json::Map::new();
    for lane in tartarus_store::Lane::ALL {
        depth.insert(
            lane.as_str().into(),
            state.store.queue_depth(Some(lane)).await?.into(),
        );
    }
    let hide = |mut item: tartarus_store::QueueItem| {
        item.payload = String::new();
        item
    };
    let waiting: Vec<_> = state.store.queued(tenant).await?.into_iter().map(hide).collect();
    let dead: Vec<_> = state
        .store
        .dead_letters(tenant)
        .await?
        .into_iter()
        .map(hide)
        .collect();
    Ok(Json(
        serde_json::json!({"depth": depth, "waiting": waiting, "dead_letters": dead}),
    ))
}

/// One queued request: waiting (with why), placed (with its sandbox) or dead.
#[utoipa::path(get, path = "/v1/queue/{id}", security(("api_key" = [])), responses((status = 200), (status = 404)))]
pub async fn get_queued(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<tartarus_store::QueueItem>, ApiError> {
    let mut item = state
        .store
        .queue_item(&id)
        .await?
        .filter(|i| caller.scope().is_none_or(|t| t == i.tenant))
        .ok_or_else(|| ApiError::not_found(format!("no queued request '{id}'")))?;
    item.payload = String::new();
    Ok(Json(item))
}

/// Forwards a request for a sandbox on a node as it is, and streams the node's answer back (status,
/// content type and body): streaming exec (Server-Sent Events), logs (also followed), files, pause,
/// resume and quarantine.
pub async fn forward(
    state: &AppState,
    record: &tartarus_store::SandboxRecord,
    method: reqwest::Method,
    (suffix, query): (&str, &[(&str, &str)]),
    content_type: Option<&str>,
    body: axum::body::Bytes,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let node = node_of(state, record)
        .await?
        .ok_or_else(|| ApiError::internal("not a node sandbox"))?;
    let remote = record.remote_id.as_deref().unwrap_or_default();
    let mut request = state
        .stream_http
        .request(
            method,
            format!("http://{}/v1/sandboxes/{remote}{suffix}", node.address),
        )
        .query(query)
        .bearer_auth(&node.api_key)
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header(reqwest::header::CONTENT_TYPE, content_type);
    }
    let response = request.send().await.map_err(|e| node_unreachable(&node, &e))?;
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = response.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    let body = axum::body::Body::from_stream(response.bytes_stream());
    let mut answer = (status, body).into_response();
    if let Some(value) = content_type.and_then(|v| axum::http::HeaderValue::from_bytes(v.as_bytes()).ok()) {
        answer
            .headers_mut()
            .insert(axum::http::header::CONTENT_TYPE, value);
    }
    Ok(answer)
}
