//! Node agents: what they report, their join tokens, registration and heartbeats, how a stored node
//! record is read back for the scheduler, and the isolation lanes the nodes offer a create.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tartarus_policy::LaneOffer;
use tartarus_runtime::lanes::LaneName;
use tartarus_runtime::SandboxSpec;
use tartarus_scheduler::{Node, NodeError, NodeState, Resources, Taint};
use tartarus_store::{NewAudit, NodeLane, NodeRecord, NodeRegistration, Registered};
use utoipa::ToSchema;

use super::{event, node_rpc, ClusterError};
use crate::AppState;

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
    pub pools: BTreeSet<String>,
    /// A quarantine node: it takes only quarantined work, and quarantined work goes only to such nodes.
    #[serde(default)]
    pub quarantine: bool,
    /// The isolation lanes the node's own server can run, with their versions (an agent that reports
    /// none runs the process lane only).
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub lanes: Vec<NodeLane>,
}

/// A heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub instance: String,
    pub epoch: i64,
    #[schema(value_type = Object)]
    pub usage: Resources,
    /// The node's isolation lanes now (left out: those it registered with).
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub lanes: Option<Vec<NodeLane>>,
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
/// The longest agent instance name.
const MAX_INSTANCE_LEN: usize = 128;
/// The most lanes a node may report, the longest lane name and the longest version text.
const MAX_LANES: usize = 16;
const MAX_LANE_NAME_LEN: usize = 32;
const MAX_LANE_VERSION_LEN: usize = 256;

/// A node report (or heartbeat) that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeReportError {
    /// The id, capacity, labels, taints or pools, by the scheduler's rules.
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(
        "capacity {capacity} is beyond any machine (at most {} cores, 1 PiB, {MAX_GPUS} GPUs)",
        MAX_CPU_MILLIS / 1000
    )]
    BeyondAnyMachine { capacity: Resources },
    #[error("usage {usage} exceeds capacity {capacity}")]
    UsageOverCapacity { usage: Resources, capacity: Resources },
    #[error("instance must be 1-{MAX_INSTANCE_LEN} characters")]
    Instance,
    #[error("address '{address}' is not HOST:PORT")]
    Address { address: String },
    #[error(
        "lanes: at most {MAX_LANES}, each named once in 1-{MAX_LANE_NAME_LEN} lowercase letters, digits or \
         '-', with a version of at most {MAX_LANE_VERSION_LEN} characters ({problem})"
    )]
    Lanes { problem: String },
}

impl NodeReport {
    /// Refuses ids, capacities and usages that make no sense, saying which.
    pub fn validate(&self) -> Result<(), NodeReportError> {
        let mut node = Node::new(&self.id, self.capacity)?;
        node.labels = self.labels.clone();
        node.taints = self.taints.clone();
        node.pools = self.pools.clone();
        node.quarantine = self.quarantine;
        node.lanes = self.lanes.iter().map(|l| l.name.clone()).collect();
        node.validate()?;
        check_lanes(&self.lanes)?;
        let c = self.capacity;
        if c.cpu_millis > MAX_CPU_MILLIS || c.memory_bytes > MAX_MEMORY_BYTES || c.gpus > MAX_GPUS {
            return Err(NodeReportError::BeyondAnyMachine { capacity: c });
        }
        check_usage(&self.usage, &c)?;
        if self.instance.is_empty() || self.instance.len() > MAX_INSTANCE_LEN {
            return Err(NodeReportError::Instance);
        }
        if self.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(NodeReportError::Address {
                address: self.address.clone(),
            });
        }
        Ok(())
    }
}

/// Refuses a lane list that makes no sense, saying what is wrong. Names this version does not know are
/// kept (a newer node's lane): the scheduler matches names, and offers only the lanes it knows.
pub fn check_lanes(lanes: &[NodeLane]) -> Result<(), NodeReportError> {
    let problem = |problem: String| Err(NodeReportError::Lanes { problem });
    if lanes.len() > MAX_LANES {
        return problem(format!("{} reported", lanes.len()));
    }
    for (i, lane) in lanes.iter().enumerate() {
        let name = &lane.name;
        let well_formed = !name.is_empty()
            && name.len() <= MAX_LANE_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !well_formed {
            return problem(format!("{:?}", name.chars().take(40).collect::<String>()));
        }
        if lanes[..i].iter().any(|other| other.name == *name) {
            return problem(format!("{name} twice"));
        }
        if lane
            .version
            .as_ref()
            .is_some_and(|v| v.len() > MAX_LANE_VERSION_LEN)
            || lane
                .emulated
                .as_ref()
                .is_some_and(|v| v.len() > MAX_LANE_VERSION_LEN)
        {
            return problem(format!("{name}'s version is too long"));
        }
    }
    Ok(())
}

/// The lanes a stored node runs, as the scheduler matches them: those it reported, or the process lane
/// for an agent that reports none (one from before nodes reported lanes ran only that).
pub fn node_lanes(record: &NodeRecord) -> BTreeSet<String> {
    match record.lanes.is_empty() {
        true => BTreeSet::from([LaneName::Process.to_string()]),
        false => record.lanes.iter().map(|l| l.name.clone()).collect(),
    }
}

/// What the cluster's nodes offer a create bound for them, lane by lane: a lane is available when some
/// node that is not unreachable runs it, and it honours `spec` by the lane's declared capabilities (the
/// node checks again when it starts the sandbox).
pub fn lane_offers(records: &[NodeRecord], spec: &SandboxSpec) -> Vec<LaneOffer> {
    let live: Vec<&NodeRecord> = records
        .iter()
        .filter(|n| n.state != NodeState::Unreachable)
        .collect();
    LaneName::ALL
        .into_iter()
        .map(|lane| {
            let offered = live.iter().any(|n| node_lanes(n).contains(lane.as_str()));
            let unavailable = (!offered).then(|| {
                let mut have: BTreeSet<String> = BTreeSet::new();
                for node in &live {
                    have.extend(node_lanes(node));
                }
                let have = match have.is_empty() {
                    true => "no node is reachable".to_string(),
                    false => format!("they offer {}", have.into_iter().collect::<Vec<_>>().join(", ")),
                };
                format!("no live cluster node offers the {lane} lane ({have})")
            });
            let unsupported = lane
                .capabilities()
                .check(lane.as_str(), spec)
                .err()
                .map(|e| e.to_string());
            LaneOffer {
                lane,
                unavailable,
                unsupported,
                // Too slow for auto when every live node that runs it emulates it.
                emulated: offered
                    .then(|| {
                        let mut on = live
                            .iter()
                            .filter_map(|n| n.lanes.iter().find(|l| l.name == lane.as_str()));
                        match on.all(|l| l.emulated.is_some()) {
                            true => Some("every node runs its guests under emulation".to_string()),
                            false => None,
                        }
                    })
                    .flatten(),
            }
        })
        .collect()
}

/// Refuses a usage the node's capacity cannot hold.
pub fn check_usage(usage: &Resources, capacity: &Resources) -> Result<(), NodeReportError> {
    if !usage.fits_in(*capacity) {
        return Err(NodeReportError::UsageOverCapacity {
            usage: *usage,
            capacity: *capacity,
        });
    }
    Ok(())
}

/// The scheduler's view of a stored node, with nothing allocated yet. The store has decoded every field
/// (an unreadable one is its error, and such a node is left out of placement by the caller).
pub fn scheduler_node(record: &NodeRecord) -> Result<Node, ClusterError> {
    let mut node = Node::new(&record.id, record.capacity).map_err(ClusterError::StoredNode)?;
    node.labels = record.labels.clone();
    node.taints = record.taints.clone();
    node.state = record.state;
    node.pools = record.pools.clone();
    node.quarantine = record.quarantine;
    node.lanes = node_lanes(record);
    Ok(node)
}

/// Audits what a node agent did, under the `cluster` tenant.
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
        tracing::error!("audit write failed: {}", tartarus_runtime::error_chain(&e));
    }
}

/// The node a join token belongs to; an unknown token is audited and refused.
pub async fn authenticate(state: &AppState, token: &str) -> Result<String, ClusterError> {
    match state.store.node_for_token(token).await? {
        Some(node_id) => Ok(node_id),
        None => {
            audit_node(state, "?", "node.auth", "denied: unknown node token").await;
            Err(ClusterError::UnknownNodeToken)
        }
    }
}

/// Registers the agent that sent `report` with `token_node`'s token. Refusals are audited.
pub async fn register(
    state: &AppState,
    token_node: &str,
    report: &NodeReport,
) -> Result<Registration, ClusterError> {
    if report.id != token_node {
        audit_node(
            state,
            &report.id,
            "node.register",
            "denied: token of another node",
        )
        .await;
        return Err(ClusterError::ForeignToken {
            token: token_node.to_string(),
            claimed: report.id.clone(),
        });
    }
    if let Err(source) = report.validate() {
        audit_node(state, &report.id, "node.register", "refused: invalid report").await;
        return Err(ClusterError::InvalidReport {
            node: report.id.clone(),
            source,
        });
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
        lanes: &report.lanes,
        now_ms: tartarus_store::now_ms(),
        stale_after_ms: config.node_timeout.as_millis() as i64,
    };
    match state.store.register_node(&registration).await? {
        Registered::Accepted { epoch } => {
            audit_node(state, &report.id, "node.register", "ok").await;
            let message = format!("node {} registered (epoch {epoch})", report.id);
            event(state, "node.registered", &report.id, &message).await;
            Ok(Registration {
                epoch,
                heartbeat_ms: (config.node_timeout / 4).as_millis().max(50) as u64,
            })
        }
        Registered::Duplicate {
            instance,
            last_heartbeat_ms,
        } => {
            audit_node(state, &report.id, "node.register", "refused: duplicate id").await;
            Err(ClusterError::Duplicate {
                node: report.id.clone(),
                instance,
                idle_ms: tartarus_store::now_ms() - last_heartbeat_ms,
            })
        }
    }
}

/// Records node `id`'s heartbeat, sent with `token_node`'s token.
pub async fn heartbeat(
    state: &AppState,
    token_node: &str,
    id: &str,
    beat: &Heartbeat,
) -> Result<(), ClusterError> {
    if id != token_node {
        audit_node(state, id, "node.heartbeat", "denied: token of another node").await;
        return Err(ClusterError::ForeignHeartbeat {
            token: token_node.to_string(),
        });
    }
    let record = state
        .store
        .node(id)
        .await?
        .ok_or_else(|| ClusterError::NotRegistered { node: id.to_string() })?;
    check_usage(&beat.usage, &record.capacity)
        .and_then(|()| beat.lanes.as_deref().map_or(Ok(()), check_lanes))
        .map_err(|source| ClusterError::InvalidReport {
            node: id.to_string(),
            source,
        })?;
    let fresh = state
        .store
        .node_heartbeat(
            id,
            &beat.instance,
            beat.epoch,
            beat.usage,
            beat.lanes.as_deref(),
            tartarus_store::now_ms(),
        )
        .await?;
    if !fresh {
        return Err(ClusterError::Superseded { node: id.to_string() });
    }
    Ok(())
}

/// Creates (or replaces) node `id`'s join token.
pub async fn create_token(state: &AppState, id: &str) -> Result<String, ClusterError> {
    // The scheduler's rules for node ids, checked before an agent can register with the id.
    Node::new(id, Resources::new(1, 1, 0)).map_err(ClusterError::InvalidNodeId)?;
    Ok(state.store.create_node_token(id).await?)
}

/// Removes node `id` and its join token; its sandboxes still running are lost.
pub async fn remove(state: &AppState, id: &str) -> Result<(), ClusterError> {
    if !state.store.delete_node(id).await? {
        return Err(ClusterError::NoSuchNode { node: id.to_string() });
    }
    node_rpc::lose_sandboxes_of(state, id).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use tartarus_scheduler::{IdProblem, NodeState, ResourceKind, TaintEffect};

    use super::*;

    const GIB: u64 = 1 << 30;

    fn report() -> NodeReport {
        NodeReport {
            id: "node-1".to_string(),
            instance: "agent-7f3a".to_string(),
            address: "127.0.0.1:7071".to_string(),
            labels: BTreeMap::from([("zone".to_string(), "eu-1".to_string())]),
            taints: vec![Taint::new("gpu", "true", TaintEffect::NoSchedule)],
            capacity: Resources::new(4000, 8 * GIB, 0),
            usage: Resources::new(500, GIB, 0),
            api_key: "tk_local".to_string(),
            pools: BTreeSet::new(),
            quarantine: false,
            lanes: vec![lane("process"), lane("gvisor")],
        }
    }

    fn lane(name: &str) -> NodeLane {
        NodeLane {
            name: name.to_string(),
            version: Some("1".to_string()),
            emulated: None,
        }
    }

    fn record() -> NodeRecord {
        NodeRecord {
            id: "node-1".to_string(),
            instance: "agent-7f3a".to_string(),
            epoch: 3,
            address: "127.0.0.1:7071".to_string(),
            // As registration stores them.
            labels: report().labels,
            taints: report().taints,
            capacity: Resources::new(4000, 8 * GIB, 1),
            usage: Resources::ZERO,
            state: NodeState::Ready,
            registered_ms: 1,
            last_heartbeat_ms: 2,
            api_key: "tk_local".to_string(),
            pools: ["inferno".to_string()].into(),
            quarantine: false,
            lanes: vec![lane("process")],
        }
    }

    #[test]
    fn test_lanes_that_make_no_sense_are_refused_saying_which() {
        let refused = |lanes: Vec<NodeLane>| {
            let mut report = report();
            report.lanes = lanes;
            match report.validate() {
                Err(NodeReportError::Lanes { problem }) => problem,
                Err(NodeReportError::Node(e)) => e.to_string(),
                other => panic!("accepted: {other:?}"),
            }
        };
        assert_eq!(refused(vec![lane("gvisor"), lane("gvisor")]), "gvisor twice");
        assert_eq!(refused(vec![lane("gVisor")]), "\"gVisor\"");
        assert_eq!(refused(vec![lane("")]), "node node-1: a lane name is empty");
        assert_eq!(
            refused((0..17).map(|i| lane(&format!("l{i}"))).collect()),
            "17 reported"
        );
        let mut long = lane("gvisor");
        long.version = Some("x".repeat(MAX_LANE_VERSION_LEN + 1));
        assert_eq!(refused(vec![long]), "gvisor's version is too long");
        // A lane this version does not know is kept: a newer node may run it.
        let mut newer = report();
        newer.lanes.push(lane("microvm"));
        assert_eq!(newer.validate(), Ok(()));
        let mut none = report();
        none.lanes.clear();
        assert_eq!(none.validate(), Ok(()));
    }

    #[test]
    fn test_a_node_that_reports_no_lanes_runs_the_process_lane() {
        let mut old = record();
        old.lanes.clear();
        assert_eq!(node_lanes(&old), BTreeSet::from(["process".to_string()]));
        let mut both = record();
        both.lanes.push(lane("gvisor"));
        assert_eq!(scheduler_node(&both).unwrap().lanes, node_lanes(&both));
        assert!(scheduler_node(&both).unwrap().runs("gvisor"));
    }

    #[test]
    fn test_the_cluster_offers_the_lanes_of_its_live_nodes() {
        let spec = SandboxSpec::default();
        let offer = |records: &[NodeRecord], lane: LaneName| {
            lane_offers(records, &spec)
                .into_iter()
                .find(|o| o.lane == lane)
                .unwrap()
        };
        let process_only = record();
        let mut both = record();
        both.id = "node-2".to_string();
        both.lanes.push(lane("gvisor"));
        let nodes = [process_only.clone(), both.clone()];
        assert_eq!(offer(&nodes, LaneName::Gvisor).unavailable, None);
        assert_eq!(offer(&nodes, LaneName::Process).unavailable, None);
        // The only gVisor node unreachable: gVisor is not offered, and the refusal says what is.
        both.state = NodeState::Unreachable;
        let nodes = [process_only, both];
        assert_eq!(
            offer(&nodes, LaneName::Gvisor).unavailable.as_deref(),
            Some("no live cluster node offers the gvisor lane (they offer process)")
        );
        let mut gone = nodes.clone();
        gone[0].state = NodeState::Unreachable;
        assert_eq!(
            offer(&gone, LaneName::Process).unavailable.as_deref(),
            Some("no live cluster node offers the process lane (no node is reachable)")
        );
        // What a lane cannot honour is its declared capabilities', wherever it runs.
        let tty = SandboxSpec {
            tty: true,
            ..SandboxSpec::default()
        };
        let walled = lane_offers(&nodes, &tty)
            .into_iter()
            .find(|o| o.lane == LaneName::Gvisor)
            .unwrap();
        assert!(walled.unsupported.is_some_and(|u| u.contains("gvisor")));
    }

    #[test]
    fn test_a_sensible_report_is_accepted() {
        assert_eq!(report().validate(), Ok(()));
    }

    #[test]
    fn test_capacity_at_the_limits_is_accepted() {
        let mut report = report();
        report.capacity = Resources::new(MAX_CPU_MILLIS, MAX_MEMORY_BYTES, MAX_GPUS);
        assert_eq!(report.validate(), Ok(()));
    }

    #[test]
    fn test_capacity_beyond_any_machine_is_refused_for_each_resource() {
        let limit = Resources::new(MAX_CPU_MILLIS, MAX_MEMORY_BYTES, MAX_GPUS);
        let beyond = [
            Resources::new(MAX_CPU_MILLIS + 1, MAX_MEMORY_BYTES, MAX_GPUS),
            Resources::new(MAX_CPU_MILLIS, MAX_MEMORY_BYTES + 1, MAX_GPUS),
            Resources::new(MAX_CPU_MILLIS, MAX_MEMORY_BYTES, MAX_GPUS + 1),
            Resources::new(u64::MAX, u64::MAX, u32::MAX),
        ];
        for capacity in beyond {
            let mut report = report();
            report.capacity = capacity;
            assert_eq!(
                report.validate(),
                Err(NodeReportError::BeyondAnyMachine { capacity }),
                "{capacity} (limit {limit})"
            );
        }
    }

    #[test]
    fn test_capacity_without_cpu_or_memory_is_refused() {
        for (capacity, resource) in [
            (Resources::new(0, 8 * GIB, 0), ResourceKind::Cpu),
            (Resources::new(4000, 0, 0), ResourceKind::Memory),
        ] {
            let mut report = report();
            report.capacity = capacity;
            report.usage = Resources::ZERO;
            assert_eq!(
                report.validate(),
                Err(NodeReportError::Node(NodeError::ZeroCapacity {
                    node: "node-1".to_string(),
                    resource,
                }))
            );
        }
    }

    #[test]
    fn test_usage_equal_to_capacity_is_accepted_and_beyond_it_refused() {
        let capacity = Resources::new(4000, 8 * GIB, 2);
        assert_eq!(check_usage(&capacity, &capacity), Ok(()));
        for usage in [
            Resources::new(4001, 8 * GIB, 2),
            Resources::new(4000, 8 * GIB + 1, 2),
            Resources::new(4000, 8 * GIB, 3),
        ] {
            assert_eq!(
                check_usage(&usage, &capacity),
                Err(NodeReportError::UsageOverCapacity { usage, capacity })
            );
            let mut report = report();
            report.capacity = capacity;
            report.usage = usage;
            assert!(matches!(
                report.validate(),
                Err(NodeReportError::UsageOverCapacity { .. })
            ));
        }
    }

    #[test]
    fn test_instance_must_be_1_to_128_characters() {
        for (instance, ok) in [
            (String::new(), false),
            ("a".to_string(), true),
            ("a".repeat(MAX_INSTANCE_LEN), true),
            ("a".repeat(MAX_INSTANCE_LEN + 1), false),
        ] {
            let mut report = report();
            report.instance = instance.clone();
            let expected = if ok {
                Ok(())
            } else {
                Err(NodeReportError::Instance)
            };
            assert_eq!(
                report.validate(),
                expected,
                "instance of {} bytes",
                instance.len()
            );
        }
    }

    #[test]
    fn test_address_must_be_an_ip_and_port() {
        for (address, ok) in [
            ("127.0.0.1:7071", true),
            ("[::1]:7071", true),
            ("node-1:7071", false),
            ("127.0.0.1", false),
            ("127.0.0.1:99999", false),
            ("", false),
        ] {
            let mut report = report();
            report.address = address.to_string();
            let expected = if ok {
                Ok(())
            } else {
                Err(NodeReportError::Address {
                    address: address.to_string(),
                })
            };
            assert_eq!(report.validate(), expected, "{address:?}");
        }
    }

    #[test]
    fn test_ids_labels_and_pools_follow_the_scheduler_rules() {
        let mut empty_id = report();
        empty_id.id = String::new();
        assert!(matches!(
            empty_id.validate(),
            Err(NodeReportError::Node(NodeError::Id {
                problem: IdProblem::Empty,
                ..
            }))
        ));
        let mut spaced_id = report();
        spaced_id.id = "node 1".to_string();
        assert!(matches!(
            spaced_id.validate(),
            Err(NodeReportError::Node(NodeError::Id {
                problem: IdProblem::BadCharacter,
                ..
            }))
        ));
        let mut empty_label = report();
        empty_label.labels.insert(String::new(), "x".to_string());
        assert!(matches!(
            empty_label.validate(),
            Err(NodeReportError::Node(NodeError::EmptyLabelKey { .. }))
        ));
        let mut quarantine_pool = report();
        quarantine_pool.pools.insert("quarantine".to_string());
        assert!(matches!(
            quarantine_pool.validate(),
            Err(NodeReportError::Node(NodeError::QuarantinePool { .. }))
        ));
        quarantine_pool.quarantine = true;
        assert_eq!(quarantine_pool.validate(), Ok(()));
    }

    #[test]
    fn test_refusals_say_what_is_wrong() {
        let mut report = report();
        report.usage = Resources::new(8000, GIB, 0);
        let message = report.validate().unwrap_err().to_string();
        assert!(
            message.starts_with("usage ") && message.contains("exceeds capacity"),
            "{message}"
        );
        report.usage = Resources::ZERO;
        report.instance = String::new();
        assert_eq!(
            report.validate().unwrap_err().to_string(),
            "instance must be 1-128 characters"
        );
        report.instance = "agent-7f3a".to_string();
        report.capacity = Resources::new(MAX_CPU_MILLIS + 1, GIB, 0);
        let message = report.validate().unwrap_err().to_string();
        assert!(
            message.ends_with("is beyond any machine (at most 100000 cores, 1 PiB, 1024 GPUs)"),
            "{message}"
        );
        report.capacity = Resources::new(4000, 8 * GIB, 0);
        report.address = "nowhere".to_string();
        assert_eq!(
            report.validate().unwrap_err().to_string(),
            "address 'nowhere' is not HOST:PORT"
        );
    }

    #[test]
    fn test_a_stored_node_is_read_back_for_the_scheduler() {
        let node = scheduler_node(&record()).unwrap();
        assert_eq!(node.id, "node-1");
        assert_eq!(node.capacity, Resources::new(4000, 8 * GIB, 1));
        assert_eq!(node.allocated, Resources::ZERO);
        assert_eq!(node.labels.get("zone").map(String::as_str), Some("eu-1"));
        assert_eq!(node.taints, report().taints);
        assert!(node.pools.contains("inferno"));
        assert_eq!(node.state, NodeState::Ready);
    }

    #[test]
    fn test_a_stored_node_without_capacity_is_an_error_not_an_empty_node() {
        let mut record = record();
        record.capacity = Resources::new(0, 1, 0);
        assert!(matches!(
            scheduler_node(&record),
            Err(ClusterError::StoredNode(NodeError::ZeroCapacity { .. }))
        ));
    }
}
