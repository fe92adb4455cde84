//! Nodes as the scheduler sees them: labels, taints, capacity, what is reserved, which resource classes
//! they serve, which isolation lanes they run, whether they are quarantine nodes, and whether they take
//! new work at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::request::Toleration;
use crate::resources::{ResourceKind, Resources};

/// The resource class of quarantined work (the policy crate's `QUARANTINE_CLASS`); only quarantine nodes
/// may serve it.
pub const QUARANTINE_CLASS: &str = "quarantine";

/// The longest node or request id accepted, in bytes (a DNS name's length).
pub const MAX_ID_LEN: usize = 253;

/// Whether a node takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Its agent answers and it takes new work.
    Ready,
    /// Its agent stopped answering; its reservations stay until released.
    Unreachable,
    /// It is being emptied: existing work runs on, nothing new is placed.
    Draining,
}

impl NodeState {
    /// Whether new work may be placed on a node in this state.
    pub fn can_place(self) -> bool {
        self == NodeState::Ready
    }

    /// `ready`, `unreachable` or `draining`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Unreachable => "unreachable",
            NodeState::Draining => "draining",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a taint does to requests that do not tolerate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaintEffect {
    /// The node is filtered out.
    NoSchedule,
    /// The node stays eligible but its score drops by [`crate::PREFER_NO_SCHEDULE_PENALTY`].
    PreferNoSchedule,
}

/// A mark that keeps requests off a node unless they tolerate it (`gpu=true`, `dedicated=ci`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Taint {
    /// The taint's key.
    pub key: String,
    /// Its value (may be empty).
    #[serde(default)]
    pub value: String,
    /// What it does to requests that do not tolerate it.
    pub effect: TaintEffect,
}

impl Taint {
    /// A taint `key=value` with the given effect.
    pub fn new(key: impl Into<String>, value: impl Into<String>, effect: TaintEffect) -> Self {
        Taint {
            key: key.into(),
            value: value.into(),
            effect,
        }
    }

    /// Whether any of `tolerations` tolerates this taint.
    pub fn tolerated_by(&self, tolerations: &[Toleration]) -> bool {
        tolerations.iter().any(|toleration| toleration.tolerates(self))
    }
}

impl fmt::Display for Taint {
    /// `key=value`, or `key` when the value is empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            f.write_str(&self.key)
        } else {
            write!(f, "{}={}", self.key, self.value)
        }
    }
}

/// A node of the cluster as the control plane knows it.
///
/// The fields are public data (the server stores nodes as JSON); [`Node::validate`] says whether they make
/// sense, and [`crate::Cluster`] refuses nodes that do not. [`crate::place()`] never panics on an invalid
/// node, and it never places more on a node than `capacity − allocated`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Unique, non-empty, at most [`MAX_ID_LEN`] bytes, no whitespace or control characters.
    pub id: String,
    /// Labels requests select on and prefer (`zone=eu-1`, `disk=ssd`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Taints: requests must tolerate `NoSchedule` ones, and are steered away from `PreferNoSchedule` ones.
    #[serde(default)]
    pub taints: Vec<Taint>,
    /// What the node offers to sandboxes (after what its own system needs).
    pub capacity: Resources,
    /// The sum of the reservations on it.
    #[serde(default)]
    pub allocated: Resources,
    /// The resource classes it serves (`inferno`, …); empty means every class. A request without a class
    /// only goes to nodes with empty pools: dedicated nodes take only the classes they name.
    #[serde(default)]
    pub pools: BTreeSet<String>,
    /// A quarantine node takes only quarantined work, and quarantined work goes only to quarantine nodes.
    #[serde(default)]
    pub quarantine: bool,
    /// The isolation lanes it can run sandboxes on (`process`, `gvisor`, …). A request that names a lane
    /// ([`crate::Request::lane`]) goes only to nodes listing it; one that names none ignores them.
    #[serde(default)]
    pub lanes: BTreeSet<String>,
    /// Whether it takes new work.
    pub state: NodeState,
    /// How many reservations of each request group run here (see [`crate::Request::group`]).
    #[serde(default)]
    pub groups: BTreeMap<String, u32>,
}

impl Node {
    /// A ready node with the given capacity and nothing else: no labels, taints or pools, nothing
    /// allocated. Refuses what [`Node::validate`] refuses.
    pub fn new(id: impl Into<String>, capacity: Resources) -> Result<Self, NodeError> {
        let node = Node {
            id: id.into(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            capacity,
            allocated: Resources::ZERO,
            pools: BTreeSet::new(),
            quarantine: false,
            lanes: BTreeSet::new(),
            state: NodeState::Ready,
            groups: BTreeMap::new(),
        };
        node.validate()?;
        Ok(node)
    }

    /// With the label `key=value` added.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// With the taint added.
    pub fn with_taint(mut self, taint: Taint) -> Self {
        self.taints.push(taint);
        self
    }

    /// Serving the resource class `pool` (among the pools it already serves).
    pub fn with_pool(mut self, pool: impl Into<String>) -> Self {
        self.pools.insert(pool.into());
        self
    }

    /// Running the isolation lane `lane` (among the lanes it already runs).
    pub fn with_lane(mut self, lane: impl Into<String>) -> Self {
        self.lanes.insert(lane.into());
        self
    }

    /// Whether it runs the isolation lane `lane`.
    pub fn runs(&self, lane: &str) -> bool {
        self.lanes.contains(lane)
    }

    /// With `allocated` reserved.
    pub fn with_allocated(mut self, allocated: Resources) -> Self {
        self.allocated = allocated;
        self
    }

    /// A quarantine node, or not.
    pub fn with_quarantine(mut self, quarantine: bool) -> Self {
        self.quarantine = quarantine;
        self
    }

    /// In the given state.
    pub fn with_state(mut self, state: NodeState) -> Self {
        self.state = state;
        self
    }

    /// Running `count` reservations of `group`.
    pub fn with_group(mut self, group: impl Into<String>, count: u32) -> Self {
        self.groups.insert(group.into(), count);
        self
    }

    /// What is not reserved yet (zero for every kind that is over-committed).
    pub fn free(&self) -> Resources {
        self.capacity.saturating_sub(self.allocated)
    }

    /// Whether the node serves requests of this resource class (`None`: the request names none). The
    /// quarantine rule is separate (see [`Node::quarantine`]).
    pub fn serves(&self, class: Option<&str>) -> bool {
        match class {
            _ if self.pools.is_empty() => true,
            Some(class) => self.pools.contains(class),
            None => false,
        }
    }

    /// How many reservations of `group` run here.
    pub fn group_count(&self, group: &str) -> u32 {
        self.groups.get(group).copied().unwrap_or(0)
    }

    /// Checks that the node makes sense: a usable id, some CPU and memory, no more allocated than its
    /// capacity, no empty label keys, taint keys, pools, lane or group names, and the `quarantine` pool only on
    /// quarantine nodes.
    pub fn validate(&self) -> Result<(), NodeError> {
        check_id(&self.id).map_err(|problem| NodeError::Id {
            id: shorten(&self.id),
            problem,
        })?;
        let node = || self.id.clone();
        for kind in [ResourceKind::Cpu, ResourceKind::Memory] {
            if self.capacity.get(kind) == 0 {
                return Err(NodeError::ZeroCapacity {
                    node: node(),
                    resource: kind,
                });
            }
        }
        if let Some(resource) = self.allocated.exceeding(self.capacity).next() {
            return Err(NodeError::OverAllocated {
                node: node(),
                resource,
                allocated: self.allocated.get(resource),
                capacity: self.capacity.get(resource),
            });
        }
        if self.labels.keys().any(String::is_empty) {
            return Err(NodeError::EmptyLabelKey { node: node() });
        }
        if self.taints.iter().any(|taint| taint.key.is_empty()) {
            return Err(NodeError::EmptyTaintKey { node: node() });
        }
        if self.pools.iter().any(String::is_empty) {
            return Err(NodeError::EmptyPool { node: node() });
        }
        if self.lanes.iter().any(String::is_empty) {
            return Err(NodeError::EmptyLane { node: node() });
        }
        if !self.quarantine && self.pools.contains(QUARANTINE_CLASS) {
            return Err(NodeError::QuarantinePool { node: node() });
        }
        if self.groups.keys().any(String::is_empty) {
            return Err(NodeError::EmptyGroup { node: node() });
        }
        Ok(())
    }
}

/// Why an id is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdProblem {
    /// It is empty.
    Empty,
    /// It is longer than [`MAX_ID_LEN`] bytes.
    TooLong,
    /// It contains whitespace or a control character (ids appear in one-line explanations).
    BadCharacter,
}

impl fmt::Display for IdProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdProblem::Empty => f.write_str("is empty"),
            IdProblem::TooLong => write!(f, "is longer than {MAX_ID_LEN} bytes"),
            IdProblem::BadCharacter => f.write_str("contains whitespace or a control character"),
        }
    }
}

/// Checks a node or request id.
pub(crate) fn check_id(id: &str) -> Result<(), IdProblem> {
    if id.is_empty() {
        Err(IdProblem::Empty)
    } else if id.len() > MAX_ID_LEN {
        Err(IdProblem::TooLong)
    } else if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(IdProblem::BadCharacter)
    } else {
        Ok(())
    }
}

/// The id as an error shows it: at most 64 characters.
pub(crate) fn shorten(id: &str) -> String {
    match id.char_indices().nth(64) {
        Some((end, _)) => format!("{}…", &id[..end]),
        None => id.to_string(),
    }
}

/// A node description that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// The id is empty, too long or has whitespace or control characters.
    #[error("node id {id:?} {problem}")]
    Id {
        /// The id (shortened).
        id: String,
        /// What is wrong with it.
        problem: IdProblem,
    },
    /// The node offers no CPU or no memory.
    #[error("node {node}: capacity has no {resource}")]
    ZeroCapacity {
        /// The node.
        node: String,
        /// The missing kind (`cpu` or `memory`).
        resource: ResourceKind,
    },
    /// More is allocated than the node has.
    #[error(
        "node {node}: allocated {resource} {} exceeds its capacity {}",
        .resource.format_amount(*.allocated),
        .resource.format_amount(*.capacity)
    )]
    OverAllocated {
        /// The node.
        node: String,
        /// The first kind that is over.
        resource: ResourceKind,
        /// What is allocated of it.
        allocated: u64,
        /// What the node has of it.
        capacity: u64,
    },
    /// A label has an empty key.
    #[error("node {node}: a label has an empty key")]
    EmptyLabelKey {
        /// The node.
        node: String,
    },
    /// A taint has an empty key.
    #[error("node {node}: a taint has an empty key")]
    EmptyTaintKey {
        /// The node.
        node: String,
    },
    /// A pool name is empty.
    #[error("node {node}: a pool name is empty")]
    EmptyPool {
        /// The node.
        node: String,
    },
    /// A lane name is empty.
    #[error("node {node}: a lane name is empty")]
    EmptyLane {
        /// The node.
        node: String,
    },
    /// The node serves the `quarantine` class without being a quarantine node.
    #[error("node {node} serves the quarantine pool but is not a quarantine node (set quarantine: true)")]
    QuarantinePool {
        /// The node.
        node: String,
    },
    /// A group name is empty.
    #[error("node {node}: a group name is empty")]
    EmptyGroup {
        /// The node.
        node: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node() -> Node {
        Node::new("node-1", Resources::new(8000, 32 * GIB, 0)).unwrap()
    }

    fn error(node: Node) -> String {
        node.validate().unwrap_err().to_string()
    }

    #[test]
    fn test_new_refuses_bad_ids() {
        let capacity = Resources::new(1000, GIB, 0);
        assert_eq!(
            Node::new("", capacity).unwrap_err().to_string(),
            "node id \"\" is empty"
        );
        assert_eq!(
            Node::new("node 1", capacity).unwrap_err().to_string(),
            "node id \"node 1\" contains whitespace or a control character"
        );
        let long = "n".repeat(MAX_ID_LEN + 1);
        let err = Node::new(long, capacity).unwrap_err();
        assert!(
            matches!(
                err,
                NodeError::Id {
                    problem: IdProblem::TooLong,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().len() < 120, "the id is shortened: {err}");
        assert!(Node::new("n".repeat(MAX_ID_LEN), capacity).is_ok());
    }

    #[test]
    fn test_validate_refuses_zero_capacity() {
        let err = Node::new("node-1", Resources::new(0, GIB, 0)).unwrap_err();
        assert_eq!(err.to_string(), "node node-1: capacity has no cpu");
        let err = Node::new("node-1", Resources::new(1000, 0, 4)).unwrap_err();
        assert_eq!(
            err,
            NodeError::ZeroCapacity {
                node: "node-1".into(),
                resource: ResourceKind::Memory
            }
        );
        assert!(
            Node::new("gpu-less", Resources::new(1000, GIB, 0)).is_ok(),
            "no GPUs is fine"
        );
    }

    #[test]
    fn test_validate_refuses_more_allocated_than_capacity() {
        let over_memory = node().with_allocated(Resources::new(8000, 33 * GIB, 0));
        assert_eq!(
            error(over_memory),
            "node node-1: allocated memory 33 GiB exceeds its capacity 32 GiB"
        );
        let over_gpus = node().with_allocated(Resources::new(0, 0, 1));
        assert_eq!(
            error(over_gpus),
            "node node-1: allocated gpus 1 exceeds its capacity 0"
        );
        let full = node().with_allocated(Resources::new(8000, 32 * GIB, 0));
        assert!(full.validate().is_ok(), "exactly full is fine");
    }

    #[test]
    fn test_validate_refuses_empty_names_and_a_quarantine_pool_on_an_ordinary_node() {
        assert_eq!(
            error(node().with_label("", "x")),
            "node node-1: a label has an empty key"
        );
        let taint = Taint::new("", "x", TaintEffect::NoSchedule);
        assert_eq!(
            error(node().with_taint(taint)),
            "node node-1: a taint has an empty key"
        );
        assert_eq!(error(node().with_pool("")), "node node-1: a pool name is empty");
        assert_eq!(error(node().with_lane("")), "node node-1: a lane name is empty");
        assert_eq!(
            error(node().with_group("", 1)),
            "node node-1: a group name is empty"
        );
        assert!(matches!(
            node().with_pool(QUARANTINE_CLASS).validate(),
            Err(NodeError::QuarantinePool { .. })
        ));
        assert!(node()
            .with_pool(QUARANTINE_CLASS)
            .with_quarantine(true)
            .validate()
            .is_ok());
    }

    #[test]
    fn test_runs_only_the_lanes_it_lists() {
        assert!(!node().runs("process"), "a node lists its lanes; none by default");
        let both = node().with_lane("process").with_lane("gvisor");
        assert!(both.runs("process") && both.runs("gvisor"));
        assert!(!both.runs("microvm"));
    }

    #[test]
    fn test_serves_pools() {
        assert!(
            node().serves(Some("blaze")) && node().serves(None),
            "empty pools serve every class"
        );
        let gpu = node().with_pool("inferno");
        assert!(gpu.serves(Some("inferno")));
        assert!(!gpu.serves(Some("ember")));
        assert!(
            !gpu.serves(None),
            "work without a class stays off dedicated nodes"
        );
    }
}
