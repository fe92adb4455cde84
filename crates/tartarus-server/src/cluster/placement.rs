//! Placing a sandbox on a node: what a placement request carries, what the scheduler assumes a sandbox
//! takes, and the call that has the chosen node's server start it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tartarus_policy::LaneOffer;
use tartarus_runtime::lanes::LaneName;
use tartarus_runtime::{RootSpec, SandboxSpec};
use tartarus_scheduler::{LabelTerm, Node, Resources, Toleration};
use tartarus_store::{SandboxRecord, SandboxStatus};

use super::{node_rpc, nodes, ClusterError};
use crate::error::ApiError;
use crate::AppState;

/// What the control plane sends a node's server: a sandbox already admitted and compiled.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSandbox {
    pub tenant: String,
    pub spec: SandboxSpec,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub template: Option<String>,
    /// The isolation lane to start it on; left out for the process lane, so that a node from before
    /// lanes were sent takes process-lane sandboxes and refuses (an unknown field) any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<LaneName>,
}

impl NodeSandbox {
    /// The lane to start it on.
    pub fn lane(&self) -> LaneName {
        self.runtime.unwrap_or(LaneName::Process)
    }

    /// Node side: the spec to start, refused when it is not one the control plane places (it runs on
    /// the node's host root, as a service).
    pub fn checked_spec(&self) -> Result<SandboxSpec, ClusterError> {
        if !matches!(self.spec.root, RootSpec::HostSystem) {
            return Err(ClusterError::ImageOnNode);
        }
        let mut spec = self.spec.clone();
        spec.service = true;
        spec.validate()?;
        Ok(spec)
    }
}

/// A sandbox to place: admitted and compiled; also the payload of a queued request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementRequest {
    /// Set for a queued request: its queue id becomes the sandbox's id.
    pub id: Option<String>,
    pub tenant: String,
    pub spec: SandboxSpec,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub class: Option<String>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    #[serde(default)]
    pub node_affinity: Vec<LabelTerm>,
    #[serde(default)]
    pub node_anti_affinity: Vec<LabelTerm>,
    /// Spread sandboxes that share this label's value over nodes.
    pub spread_by: Option<String>,
    /// The isolation lane chosen for it (a request queued before lanes were chosen: process).
    #[serde(default = "process_lane")]
    pub runtime: LaneName,
    /// Why that lane.
    #[serde(default)]
    pub runtime_reason: Option<String>,
}

fn process_lane() -> LaneName {
    LaneName::Process
}

/// Why a request queued before lanes were chosen runs on the process lane.
const PROCESS_ONLY_REASON: &str = "cluster nodes ran the process lane only when it was queued";

/// A new sandbox id (the same form as the manager's).
pub fn new_sandbox_id() -> Result<String, ClusterError> {
    let hex = tartarus_hostsys::random_hex(6).map_err(ClusterError::Randomness)?;
    Ok(format!("sb_{hex}"))
}

/// What the scheduler should assume a sandbox without limits takes.
const DEFAULT_REQUEST: Resources = Resources::new(100, 128 << 20, 0);

/// What a sandbox takes of a node: its limits, or [`DEFAULT_REQUEST`]'s share of what it leaves open.
pub fn requested(spec: &SandboxSpec) -> Resources {
    Resources::new(
        spec.limits
            .cpus
            .map(|c| (c * 1000.0).ceil() as u64)
            .unwrap_or(DEFAULT_REQUEST.cpu_millis),
        spec.limits.memory_bytes.unwrap_or(DEFAULT_REQUEST.memory_bytes),
        0,
    )
}

/// Adds what a live sandbox takes to what is allocated on `node`. What a node reports is what it has:
/// never account more than that.
fn account(node: &mut Node, taken: Resources) {
    let sum = node.allocated.saturating_add(taken);
    node.allocated = Resources::new(
        sum.cpu_millis.min(node.capacity.cpu_millis),
        sum.memory_bytes.min(node.capacity.memory_bytes),
        sum.gpus.min(node.capacity.gpus),
    );
}

/// [`place`] for the create handler, which answers the failure as an API error, or queues the request
/// when its code is `no_capacity` ([`ClusterError::NoCapacity`]).
pub async fn place_on_node(
    state: &AppState,
    want: &PlacementRequest,
) -> Result<Option<SandboxRecord>, ApiError> {
    Ok(place(state, want).await?)
}

/// The nodes placement chooses among: every readable node with a key to call it by. An unreadable one
/// (its taints, say) is never placed on with defaults: left out, and said why.
async fn placement_nodes(state: &AppState) -> Result<Vec<tartarus_store::NodeRecord>, ClusterError> {
    Ok(state
        .store
        .nodes()
        .await?
        .into_iter()
        .filter_map(|node| {
            node.inspect_err(|e| {
                tracing::error!("node left out of placement: {}", tartarus_runtime::error_chain(e))
            })
            .ok()
        })
        .filter(|n| !n.api_key.is_empty())
        .collect())
}

/// The isolation lanes the cluster's nodes offer a host-root sandbox of `spec`
/// ([`nodes::lane_offers`]), or `None` when the cluster has no nodes (it runs on this machine).
pub async fn node_lane_offers(
    state: &AppState,
    spec: &SandboxSpec,
) -> Result<Option<Vec<LaneOffer>>, ApiError> {
    let records = placement_nodes(state).await?;
    Ok((!records.is_empty()).then(|| nodes::lane_offers(&records, spec)))
}

/// Places a (host-root) sandbox on a ready node when the cluster has any: the scheduler picks the node
/// among what live sandboxes leave free, the node's server starts it, and the control plane records
/// where and why. `Ok(None)` when there are no nodes: the sandbox runs on this machine.
pub async fn place(state: &AppState, want: &PlacementRequest) -> Result<Option<SandboxRecord>, ClusterError> {
    let PlacementRequest {
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
        runtime,
        runtime_reason,
    } = want;
    // The group this sandbox spreads with: its own value of the `spread_by` label.
    let group = match spread_by {
        None => None,
        Some(key) => {
            let value = labels
                .get(key)
                .ok_or_else(|| ClusterError::SpreadLabelMissing { key: key.clone() })?;
            Some(format!("{key}={value}"))
        }
    };
    let _serial = state.placement.lock().await;
    // A queued request delivered again after its dispatcher died: already placed.
    if let Some(id) = wanted_id {
        if let Some(existing) = state.store.sandbox(id, None).await? {
            return Ok(Some(existing));
        }
    }
    let records = placement_nodes(state).await?;
    if records.is_empty() {
        if !selector.is_empty() {
            return Err(ClusterError::SelectorWithoutNodes);
        }
        return Ok(None);
    }
    let live = state.store.sandboxes(None, Some(SandboxStatus::Running)).await?;
    let mut nodes = Vec::with_capacity(records.len());
    for record in &records {
        let mut node = nodes::scheduler_node(record)?;
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
            // A sandbox whose spec cannot be read takes what the largest class would: never overcommit.
            let spec = crate::sandboxes::stored_spec(sandbox).unwrap_or_else(|_| {
                let (cpus, memory_mb) = crate::policies::admission::largest_class();
                let mut spec = SandboxSpec::default();
                spec.limits.cpus = Some(cpus);
                spec.limits.memory_bytes = Some(memory_mb << 20);
                spec
            });
            account(&mut node, requested(&spec));
        }
        nodes.push(node);
    }
    let id = match wanted_id {
        Some(id) => id.clone(),
        None => new_sandbox_id()?,
    };
    let mut request = tartarus_scheduler::Request::new(&id, requested(spec));
    request.class = class.clone();
    request.selector = selector.clone();
    request.tolerations = tolerations.clone();
    request.affinity = node_affinity.clone();
    request.anti_affinity = node_anti_affinity.clone();
    request.spread = group.is_some();
    request.group = group;
    request.lane = Some(runtime.to_string());
    request.validate().map_err(ClusterError::InvalidRequest)?;
    let placement = tartarus_scheduler::place(&request, &nodes, state.cluster.strategy).map_err(|e| {
        if e.never_fits {
            ClusterError::NeverFits(e)
        } else {
            ClusterError::NoCapacity { reason: e }
        }
    })?;
    let node = records
        .iter()
        .find(|n| n.id == placement.node)
        .ok_or(ClusterError::UnknownChoice)?;
    let body = NodeSandbox {
        tenant: tenant.clone(),
        spec: spec.clone(),
        labels: labels.clone(),
        template: None,
        runtime: (*runtime != LaneName::Process).then_some(*runtime),
    };
    let (status, remote) = node_rpc::node_call(
        state,
        node,
        reqwest::Method::POST,
        "/v1/node/sandboxes",
        Some(serde_json::to_value(&body).unwrap_or_default()),
    )
    .await?;
    if status != 201 {
        return Err(ClusterError::NodeFailed {
            node: node.id.clone(),
            reason: remote["error"]["message"]
                .as_str()
                .unwrap_or("no reason")
                .to_string(),
        });
    }
    let remote_id = remote["id"].as_str().unwrap_or_default().to_string();
    let record = SandboxRecord {
        id,
        tenant: tenant.clone(),
        status: SandboxStatus::Running,
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
        runtime: runtime.to_string(),
        runtime_reason: Some(
            runtime_reason
                .clone()
                .unwrap_or_else(|| PROCESS_ONLY_REASON.to_string()),
        ),
        hibernated_to: None,
    };
    state.store.insert_sandbox(&record).await?;
    state.store.mark_running(&record.id, 0).await?;
    Ok(Some(record))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tartarus_runtime::ResourceLimits;

    use super::*;

    fn spec_with(cpus: Option<f64>, memory_bytes: Option<u64>) -> SandboxSpec {
        let mut spec = SandboxSpec::new(vec!["sleep".to_string(), "1".to_string()]);
        spec.limits = ResourceLimits {
            memory_bytes,
            cpus,
            pids: None,
        };
        spec
    }

    #[test]
    fn test_a_sandbox_without_limits_requests_the_default() {
        assert_eq!(requested(&spec_with(None, None)), DEFAULT_REQUEST);
        assert_eq!(requested(&SandboxSpec::default()), DEFAULT_REQUEST);
    }

    #[test]
    fn test_limits_are_what_a_sandbox_requests() {
        assert_eq!(
            requested(&spec_with(Some(2.0), Some(512 << 20))),
            Resources::new(2000, 512 << 20, 0)
        );
        // Only the limit that is set replaces the default.
        assert_eq!(
            requested(&spec_with(Some(0.5), None)),
            Resources::new(500, DEFAULT_REQUEST.memory_bytes, 0)
        );
        assert_eq!(
            requested(&spec_with(None, Some(1 << 30))),
            Resources::new(DEFAULT_REQUEST.cpu_millis, 1 << 30, 0)
        );
    }

    #[test]
    fn test_a_fraction_of_a_milli_cpu_rounds_up_and_gpus_are_never_requested() {
        assert_eq!(requested(&spec_with(Some(0.0001), None)).cpu_millis, 1);
        assert_eq!(requested(&spec_with(Some(1.0005), None)).cpu_millis, 1001);
        assert_eq!(requested(&spec_with(Some(64.0), Some(1 << 40))).gpus, 0);
    }

    #[test]
    fn test_accounting_adds_up_and_never_exceeds_what_the_node_has() {
        let mut node = Node::new("node-1", Resources::new(1000, 1 << 30, 1)).unwrap();
        account(&mut node, Resources::new(400, 256 << 20, 0));
        account(&mut node, Resources::new(400, 256 << 20, 0));
        assert_eq!(node.allocated, Resources::new(800, 512 << 20, 0));
        account(&mut node, Resources::new(400, 1 << 30, 5));
        assert_eq!(node.allocated, node.capacity);
        account(&mut node, Resources::new(u64::MAX, u64::MAX, u32::MAX));
        assert_eq!(node.allocated, node.capacity);
    }

    #[test]
    fn test_a_node_starts_only_host_root_sandboxes_and_as_services() {
        let placed = NodeSandbox {
            tenant: "team-a".to_string(),
            spec: spec_with(Some(1.0), None),
            labels: BTreeMap::new(),
            template: None,
            runtime: None,
        };
        let spec = placed.checked_spec().unwrap();
        assert!(spec.service);
        assert!(matches!(spec.root, RootSpec::HostSystem));

        let mut on_image = placed;
        on_image.spec.root = RootSpec::Directory(PathBuf::from("/srv/root"));
        assert!(matches!(on_image.checked_spec(), Err(ClusterError::ImageOnNode)));
    }

    #[test]
    fn test_a_placed_spec_that_does_not_validate_is_refused() {
        let mut placed = NodeSandbox {
            tenant: "team-a".to_string(),
            spec: SandboxSpec::new(Vec::new()),
            labels: BTreeMap::new(),
            template: None,
            runtime: None,
        };
        placed.spec.env.push(("A=B".to_string(), "x".to_string()));
        assert!(matches!(placed.checked_spec(), Err(ClusterError::InvalidSpec(_))));
    }

    #[test]
    fn test_the_lane_is_sent_to_a_node_only_when_it_is_not_the_process_lane() {
        let mut placed = NodeSandbox {
            tenant: "team-a".to_string(),
            spec: spec_with(None, None),
            labels: BTreeMap::new(),
            template: None,
            runtime: None,
        };
        let sent = serde_json::to_value(&placed).unwrap();
        assert!(sent.get("runtime").is_none(), "{sent}");
        let received: NodeSandbox = serde_json::from_value(sent).unwrap();
        assert_eq!(received.lane(), LaneName::Process);
        placed.runtime = Some(LaneName::Gvisor);
        let sent = serde_json::to_value(&placed).unwrap();
        assert_eq!(sent["runtime"], "gvisor");
        let received: NodeSandbox = serde_json::from_value(sent).unwrap();
        assert_eq!(received.lane(), LaneName::Gvisor);
    }

    #[test]
    fn test_a_request_queued_before_lanes_were_chosen_runs_on_the_process_lane() {
        let queued = serde_json::json!({
            "id": "sb_000000000001", "tenant": "team-a", "spec": spec_with(None, None), "class": null,
            "spread_by": null,
        });
        let want: PlacementRequest = serde_json::from_value(queued).unwrap();
        assert_eq!((want.runtime, want.runtime_reason), (LaneName::Process, None));
    }

    #[test]
    fn test_sandbox_ids_have_the_managers_form() {
        let id = new_sandbox_id().unwrap();
        assert_eq!(id.len(), "sb_".len() + 12, "{id}");
        assert!(id.starts_with("sb_") && id[3..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, new_sandbox_id().unwrap());
    }
}
