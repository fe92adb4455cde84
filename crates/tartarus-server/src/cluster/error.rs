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
    /// Node side: the lane the control plane chose is one this node cannot run, or cannot run this
    /// sandbox on.
    #[error("this node cannot start the sandbox on the {lane} lane: {reason}")]
    LaneRefused {
        lane: tartarus_runtime::lanes::LaneName,
        reason: String,
    },

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
            | E::InvalidSpec(_)
            | E::LaneRefused { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            E::NoCapacity { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_capacity"),
            E::NodeUnreachable { .. } => (StatusCode::BAD_GATEWAY, "node_unreachable"),
            E::NodeFailed { .. } => (StatusCode::BAD_GATEWAY, "node_failed"),
            E::Store(_)
            | E::Encode { .. }
            | E::Randomness(_)
            | E::StoredNode(_)
            | E::UnknownChoice
            | E::NodeGone { .. }
            | E::NotOnNode => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, tartarus_runtime::error_chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tartarus_scheduler::Resources;

    use super::*;

    fn unschedulable(never_fits: bool) -> Unschedulable {
        Unschedulable {
            reasons: BTreeMap::from([("capacity".to_string(), 2)]),
            never_fits,
            message: "no node fits: 2 lack capacity (cpu)".to_string(),
        }
    }

    fn send_error() -> reqwest::Error {
        reqwest::Client::new()
            .get("not a url")
            .build()
            .expect_err("a request to 'not a url' is refused")
    }

    fn api(e: ClusterError) -> (u16, &'static str, String) {
        let e = ApiError::from(e);
        (e.status.as_u16(), e.code, e.message)
    }

    #[test]
    fn test_node_agent_refusals_keep_their_status_and_code() {
        assert_eq!(api(ClusterError::UnknownNodeToken).0, 401);
        assert_eq!(
            api(ClusterError::ForeignToken {
                token: "w1".to_string(),
                claimed: "w2".to_string()
            }),
            (
                403,
                "forbidden",
                "this token belongs to node 'w1', not 'w2'".to_string()
            )
        );
        assert_eq!(
            api(ClusterError::ForeignHeartbeat {
                token: "w1".to_string()
            }),
            (403, "forbidden", "this token belongs to node 'w1'".to_string())
        );
        let duplicate = api(ClusterError::Duplicate {
            node: "w1".to_string(),
            instance: "agent-1".to_string(),
            idle_ms: 40,
        });
        assert_eq!((duplicate.0, duplicate.1), (409, "conflict"));
        assert!(duplicate
            .2
            .contains("held by another running agent (instance agent-1, last heartbeat 40 ms ago)"));
        assert_eq!(
            api(ClusterError::NotRegistered {
                node: "w1".to_string()
            })
            .0,
            404
        );
        assert_eq!(
            api(ClusterError::Superseded {
                node: "w1".to_string()
            })
            .0,
            409
        );
    }

    #[test]
    fn test_an_invalid_report_is_422_with_the_node_and_the_reason() {
        let capacity = Resources::new(1000, 1 << 30, 0);
        let usage = Resources::new(2000, 1 << 30, 0);
        let (status, code, message) = api(ClusterError::InvalidReport {
            node: "w1".to_string(),
            source: NodeReportError::UsageOverCapacity { usage, capacity },
        });
        assert_eq!((status, code), (422, "invalid_request"));
        assert_eq!(
            message,
            format!("node 'w1': usage {usage} exceeds capacity {capacity}")
        );
    }

    #[test]
    fn test_no_room_now_is_503_no_capacity_and_never_is_422() {
        let (status, code, message) = api(ClusterError::NoCapacity {
            reason: unschedulable(false),
        });
        assert_eq!((status, code), (503, "no_capacity"));
        assert_eq!(
            message,
            "no node has room for this sandbox now (no node fits: 2 lack capacity (cpu)); retry later"
        );
        let (status, code, message) = api(ClusterError::NeverFits(unschedulable(true)));
        assert_eq!((status, code), (422, "invalid_request"));
        assert_eq!(
            message,
            "no node could ever run this sandbox: no node fits: 2 lack capacity (cpu)"
        );
    }

    #[test]
    fn test_a_node_that_does_not_answer_is_502_with_the_cause() {
        let source = send_error();
        let cause = source.to_string();
        let (status, code, message) = api(ClusterError::NodeUnreachable {
            node: "w1".to_string(),
            address: "127.0.0.1:1".to_string(),
            source,
        });
        assert_eq!((status, code), (502, "node_unreachable"));
        assert!(
            message.starts_with("node w1 at 127.0.0.1:1 did not answer: ") && message.contains(&cause),
            "{message}"
        );
        let failed = api(ClusterError::NodeFailed {
            node: "w1".to_string(),
            reason: "disk full".to_string(),
        });
        assert_eq!(
            failed,
            (
                502,
                "node_failed",
                "node w1 did not start the sandbox: disk full".to_string()
            )
        );
    }

    #[test]
    fn test_only_a_cluster_that_may_change_makes_a_queued_request_retryable() {
        assert!(ClusterError::NoCapacity {
            reason: unschedulable(false)
        }
        .is_retryable());
        assert!(ClusterError::NodeFailed {
            node: "w1".to_string(),
            reason: String::new()
        }
        .is_retryable());
        assert!(ClusterError::NodeUnreachable {
            node: "w1".to_string(),
            address: String::new(),
            source: send_error(),
        }
        .is_retryable());
        assert!(!ClusterError::NeverFits(unschedulable(true)).is_retryable());
        assert!(!ClusterError::SpreadLabelMissing {
            key: "app".to_string()
        }
        .is_retryable());
        assert!(!ClusterError::SelectorWithoutNodes.is_retryable());
        assert!(!ClusterError::UnknownChoice.is_retryable());
    }
}
