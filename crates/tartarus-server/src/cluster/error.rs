//! What can go wrong in cluster mode, and the one place it becomes an API error.

use axum::http::StatusCode;
use tartarus_scheduler::{NodeError, RequestError, Unschedulable};

use super::nodes::NodeReportError;
use crate::error::ApiError;

/// Why a cluster operation (registration, heartbeat, placement, a call to a node) failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] tartarus_store::StoreError),
    #[error("encoding {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("randomness")]
    Randomness(#[source] std::io::Error),

    // Node agents.
    #[error("unknown node token: create one with `tartarus node token create ID` and pass it as --token")]
    UnknownNodeToken,
    #[error("this token belongs to node '{token}', not '{claimed}'")]
    ForeignToken { token: String, claimed: String },
    #[error("this token belongs to node '{token}'")]
    ForeignHeartbeat { token: String },
    #[error("node '{node}'")]
    InvalidReport {
        node: String,
        #[source]
        source: NodeReportError,
    },
    #[error(
        "node id '{node}' is held by another running agent (instance {instance}, last heartbeat {idle_ms} ms \
         ago); stop it or give this node another id"
    )]
    Duplicate {
        node: String,
        instance: String,
        idle_ms: i64,
    },
    #[error("node '{node}' is not registered")]
    NotRegistered { node: String },
    #[error(
        "node '{node}' was registered again by another agent (or this one was superseded): register again"
    )]
    Superseded { node: String },
    #[error("no node '{node}'")]
    NoSuchNode { node: String },
    #[error(transparent)]
    InvalidNodeId(NodeError),
    #[error("stored capacity of node '{node}'")]
    StoredCapacity {
        node: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("stored node is invalid")]
    StoredNode(#[source] NodeError),

    // Placement.
    #[error("spread_by '{key}': the sandbox has no label '{key}' to spread by")]
    SpreadLabelMissing { key: String },
    #[error("node_selector given, but no node is registered")]
    SelectorWithoutNodes,
    #[error("placement")]
    InvalidRequest(#[source] RequestError),
    #[error("no node could ever run this sandbox")]
    NeverFits(#[source] Unschedulable),
    /// The reason is part of the message (not a cause): the queue keeps it as the request's reason.
    #[error("no node has room for this sandbox now ({reason}); retry later")]
    NoCapacity { reason: Unschedulable },
    #[error("the scheduler chose an unknown node")]
    UnknownChoice,
    #[error("a placed sandbox runs on the node's host root; images are not placed on nodes yet")]
    ImageOnNode,
    #[error(transparent)]
    InvalidSpec(#[from] tartarus_runtime::SpecError),

    // Calls to nodes.
    #[error("node {node} at {address} did not answer")]
    NodeUnreachable {
        node: String,
        address: String,
        #[source]
        source: reqwest::Error,
    },
    /// `reason` is the node's own error message.
    #[error("node {node} did not start the sandbox: {reason}")]
    NodeFailed { node: String, reason: String },
    #[error("sandbox {sandbox} is on node {node}, which is not registered")]
    NodeGone { sandbox: String, node: String },
    #[error("not a node sandbox")]
    NotOnNode,
}

impl ClusterError {
    /// Whether a queued request that failed this way may be placed later (the cluster may change); any
    /// other failure makes it a dead letter.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClusterError::NoCapacity { .. }
                | ClusterError::NodeUnreachable { .. }
                | ClusterError::NodeFailed { .. }
        )
    }

    pub(crate) fn unreachable(node: &tartarus_store::NodeRecord, source: reqwest::Error) -> Self {
        ClusterError::NodeUnreachable {
            node: node.id.clone(),
            address: node.address.clone(),
            source,
        }
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        use ClusterError as E;
        let e = match e {
            E::Store(e) => return e.into(),
            other => other,
        };
        let (status, code) = match &e {
            E::UnknownNodeToken => (StatusCode::UNAUTHORIZED, "unauthorized"),
            E::ForeignToken { .. } | E::ForeignHeartbeat { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            E::NotRegistered { .. } | E::NoSuchNode { .. } => (StatusCode::NOT_FOUND, "not_found"),
            E::Duplicate { .. } | E::Superseded { .. } => (StatusCode::CONFLICT, "conflict"),
            E::InvalidReport { .. }
            | E::InvalidNodeId(_)
            | E::SpreadLabelMissing { .. }
            | E::SelectorWithoutNodes
            | E::InvalidRequest(_)
            | E::NeverFits(_)
            | E::ImageOnNode
            | E::InvalidSpec(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            E::NoCapacity { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_capacity"),
            E::NodeUnreachable { .. } => (StatusCode::BAD_GATEWAY, "node_unreachable"),
            E::NodeFailed { .. } => (StatusCode::BAD_GATEWAY, "node_failed"),
            E::Store(_)
            | E::Encode { .. }
            | E::Randomness(_)
            | E::StoredCapacity { .. }
            | E::StoredNode(_)
            | E::UnknownChoice
            | E::NodeGone { .. }
            | E::NotOnNode => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, tartarus_runtime::error_chain(&e))
    }
}
