//! Cluster mode, control-plane side: node join tokens, registration and heartbeats from node agents
//! (authenticated by per-node tokens), placement of sandboxes on nodes and the queue of requests no node
//! has room for, calls to node agents, and the background loops that run on one leader among the server
//! replicas sharing a database (the heartbeat reaper and the queue dispatcher).
//!
//! Node ↔ control traffic: the agent sends `Authorization: Bearer tn_…`, a token bound to one node id
//! (`POST /v1/nodes/tokens`, admin). Refusals are audited. The design leaves room for mTLS: the token
//! check is one function ([`nodes::authenticate`]) that a client-certificate check can replace.
//!
//! The HTTP handlers are in `crate::routes::{nodes, queue}`; everything here answers [`ClusterError`],
//! which becomes an API error once, at that boundary.

pub mod error;
pub mod leader;
pub mod node_rpc;
pub mod nodes;
pub mod placement;
pub mod queue;

use std::time::Duration;

use tartarus_store::NewEvent;

// What the rest of the server uses.
pub use error::ClusterError;
pub use leader::spawn_loops;
pub use node_rpc::{forward, node_call, node_of, sync_from_node};
pub use nodes::{Heartbeat, NodeReport, Registration};
pub use placement::{node_lane_offers, place, place_on_node, PlacementRequest};
pub use queue::enqueue;

use crate::AppState;

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

/// Records a `cluster` event about `node`; a failure is logged, never fatal to what it records.
async fn event(state: &AppState, kind: &str, node: &str, message: &str) {
    let event = NewEvent {
        category: "cluster",
        kind,
        sandbox: None,
        tenant: None,
        message,
        details: Some(&serde_json::json!({"node": node}).to_string()),
    };
    match state.store.record_event(&event).await {
        Ok(_) => crate::metrics::event_recorded(&event),
        Err(e) => tracing::error!(
            "recording a cluster event failed: {}",
            tartarus_runtime::error_chain(&e)
        ),
    }
}
