//! `/v1/nodes`, `/v1/cluster` and `/v1/node/sandboxes`: node agents register and send heartbeats with
//! their join token ([`NodeCaller`]); admins list and remove nodes and create tokens; a node's own server
//! starts the sandboxes the control plane places on it.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tartarus_store::Role;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::cluster::leader::LOOPS;
use crate::cluster::nodes::{self, Heartbeat, NodeReport, Registration};
use crate::cluster::placement::NodeSandbox;
use crate::cluster::ClusterError;
use crate::error::{json_rejection, ApiError};
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/tokens", post(create_token))
        .route("/v1/nodes/{id}", delete(delete_node))
        .route("/v1/nodes/register", post(register))
        .route("/v1/nodes/{id}/heartbeat", post(heartbeat))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/node/sandboxes", post(create_node_sandbox))
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
        let node_id = nodes::authenticate(state, token).await?;
        Ok(NodeCaller { node_id })
    }
}

/// Register a node agent (node token).
#[utoipa::path(post, path = "/v1/nodes/register", tag = "cluster", request_body = NodeReport,
    security(("node_token" = [])), responses((status = 200, body = Registration), (status = 401), (status = 403), (status = 409), (status = 422)))]
pub async fn register(
    State(state): State<AppState>,
    node: NodeCaller,
    body: Result<Json<NodeReport>, JsonRejection>,
) -> Result<Json<Registration>, ApiError> {
    let Json(report) = body.map_err(json_rejection)?;
    Ok(Json(nodes::register(&state, &node.node_id, &report).await?))
}

/// A node agent's heartbeat (node token).
#[utoipa::path(post, path = "/v1/nodes/{id}/heartbeat", tag = "cluster", request_body = Heartbeat,
    security(("node_token" = [])), responses((status = 204), (status = 401), (status = 409, description = "superseded: register again")))]
pub async fn heartbeat(
    State(state): State<AppState>,
    node: NodeCaller,
    Path(id): Path<String>,
    body: Result<Json<Heartbeat>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(beat) = body.map_err(json_rejection)?;
    nodes::heartbeat(&state, &node.node_id, &id, &beat).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A node as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub id: String,
    pub state: String,
    pub address: String,
    #[schema(value_type = Object)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[schema(value_type = Object)]
    pub taints: Vec<tartarus_scheduler::Taint>,
    #[schema(value_type = Object)]
    pub capacity: tartarus_scheduler::Resources,
    #[schema(value_type = Object)]
    pub usage: tartarus_scheduler::Resources,
    pub epoch: i64,
    pub last_heartbeat_ms: i64,
    /// The isolation lanes it reported, with their versions (empty: its agent reports none, and it runs
    /// the process lane).
    #[schema(value_type = Vec<Object>)]
    pub lanes: Vec<tartarus_store::NodeLane>,
}

impl From<tartarus_store::NodeRecord> for NodeView {
    fn from(n: tartarus_store::NodeRecord) -> Self {
        NodeView {
            labels: n.labels,
            taints: n.taints,
            capacity: n.capacity,
            usage: n.usage,
            id: n.id,
            state: n.state.to_string(),
            address: n.address,
            epoch: n.epoch,
            last_heartbeat_ms: n.last_heartbeat_ms,
            lanes: n.lanes,
        }
    }
}

/// Registered nodes.
#[utoipa::path(get, path = "/v1/nodes", tag = "cluster", security(("api_key" = [])),
    responses((status = 200, body = [NodeView])))]
pub async fn list_nodes(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    // An unreadable node fails the listing with its cause rather than showing a node of nulls.
    let nodes = state.store.nodes().await?;
    let views = nodes
        .into_iter()
        .map(|node| node.map(NodeView::from))
        .collect::<Result<_, _>>()?;
    Ok(Json(views))
}

/// Remove a node and its join token (its agent is refused from then on). Admin only. Its sandboxes still
/// running are marked lost.
#[utoipa::path(delete, path = "/v1/nodes/{id}", tag = "cluster", security(("api_key" = [])),
    responses((status = 204), (status = 403), (status = 404)))]
pub async fn delete_node(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden("only admin keys may remove nodes"));
    }
    nodes::remove(&state, &id).await?;
    crate::audit(&state, &caller, "node.delete", Some(&id), "ok").await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNodeToken {
    pub id: String,
}

/// Create (or replace) a node's join token. Admin only; the token is shown once.
#[utoipa::path(post, path = "/v1/nodes/tokens", tag = "cluster", request_body = CreateNodeToken,
    security(("api_key" = [])), responses((status = 201), (status = 403), (status = 422)))]
pub async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CreateNodeToken>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden("only admin keys may create node tokens"));
    }
    let Json(body) = body.map_err(json_rejection)?;
    let token = nodes::create_token(&state, &body.id).await?;
    crate::audit(&state, &caller, "node.token", Some(&body.id), "ok").await;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"id": body.id, "token": token})),
    ))
}

/// Which replica leads the background loops.
#[utoipa::path(get, path = "/v1/cluster", tag = "cluster", security(("api_key" = [])), responses((status = 200)))]
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

/// Node side: start a sandbox the control plane placed here (admin key: the control plane's).
pub async fn create_node_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<NodeSandbox>, JsonRejection>,
) -> Result<(StatusCode, Json<crate::api::SandboxView>), ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden(
            "only the control plane (an admin key) places sandboxes on a node",
        ));
    }
    let Json(body) = body.map_err(json_rejection)?;
    let spec = body.checked_spec()?;
    // The control plane chose the lane among those this node reported; this machine checks it again.
    let lane = body.lane();
    let offer = state
        .manager
        .runtimes()
        .offers(&spec)
        .into_iter()
        .find(|o| o.lane == lane);
    let refusal = match &offer {
        None => Some("this build does not know it".to_string()),
        Some(offer) => offer.unavailable.clone().or_else(|| offer.unsupported.clone()),
    };
    if let Some(reason) = refusal {
        crate::audit(
            &state,
            &caller,
            "sandbox.create",
            None,
            &format!("refused: the {lane} lane: {reason}"),
        )
        .await;
        return Err(ClusterError::LaneRefused { lane, reason }.into());
    }
    let runtime = tartarus_policy::RuntimeDecision {
        runtime: lane,
        reason: "chosen by the control plane that placed it here".to_string(),
    };
    let record = state
        .manager
        .create(
            &body.tenant,
            spec,
            body.labels,
            body.template.as_deref(),
            None,
            &runtime,
        )
        .await?;
    crate::audit(&state, &caller, "sandbox.create", Some(&record.id), "ok").await;
    Ok((StatusCode::CREATED, Json(crate::view(&record))))
}
