//! The gauges read at each scrape: the cluster view from the store (sandboxes by state and lane, network
//! contracts, queue depth, nodes' capacity and usage) and this server's own state (warm pools, blob
//! store). One scrape reads at a time; scrapes that arrive meanwhile wait for it and reuse its values,
//! so the unauthenticated `/metrics` cannot turn into a pile of concurrent store queries.

use std::collections::BTreeMap;

use tartarus_runtime::NetworkMode;
use tartarus_store::SandboxStatus;

use super::catalogue::*;
use crate::error::ApiError;
use crate::AppState;

static REFRESHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sets every gauge read at scrape time (or, while another scrape does, waits for it to finish).
pub async fn refresh(state: &AppState) -> Result<(), ApiError> {
    let _refreshing = match REFRESHING.try_lock() {
        Ok(guard) => guard,
        Err(_) => {
            let _ = REFRESHING.lock().await;
            return Ok(());
        }
    };
    let live = state.store.live_count_all().await?;
    metrics::gauge!(ACTIVE.name).set(live as f64);
    sandboxes(state).await?;
    for lane in tartarus_store::Lane::ALL {
        let depth = state.store.queue_depth(Some(lane)).await?;
        metrics::gauge!(QUEUE_DEPTH.name, "lane" => lane.as_str()).set(depth as f64);
    }
    nodes(state).await?;
    for (template, ready, target) in state.manager.pool_totals() {
        metrics::gauge!(POOL_READY.name, "template" => template).set(ready as f64);
        metrics::gauge!(POOL_TARGET.name, "template" => template).set(target as f64);
    }
    let blobs = std::sync::Arc::clone(&state.effects.blobs);
    match tokio::task::spawn_blocking(move || blobs.stored_bytes()).await {
        Ok(Ok(bytes)) => metrics::gauge!(BLOB_BYTES.name).set(bytes as f64),
        Ok(Err(e)) => tracing::warn!("metrics: reading the blob store: {e}"),
        Err(e) => tracing::warn!("metrics: reading the blob store: {e}"),
    }
    Ok(())
}

/// Live sandboxes by state and lane, and those with an egress contract by lane. Every lane and state
/// gets a value (zero included), so a count that drops to nothing shows as zero rather than vanishing.
async fn sandboxes(state: &AppState) -> Result<(), ApiError> {
    let mut by_state: BTreeMap<(&'static str, String), u64> = BTreeMap::new();
    let mut contracts: BTreeMap<String, u64> = BTreeMap::new();
    for lane in tartarus_runtime::lanes::LaneName::ALL {
        for s in ["starting", "running", "paused"] {
            by_state.insert((s, lane.to_string()), 0);
        }
        contracts.insert(lane.to_string(), 0);
    }
    for status in [SandboxStatus::Starting, SandboxStatus::Running] {
        for record in state.store.sandboxes(None, Some(status)).await? {
            let shown = match (status, record.paused) {
                (SandboxStatus::Running, true) => "paused",
                (status, _) => status.as_str(),
            };
            *by_state.entry((shown, record.runtime.clone())).or_default() += 1;
            // An unreadable spec was logged where it is read; it is not counted as a contract.
            let egress = tartarus_runtime::SandboxSpec::from_stored_json(&record.spec)
                .is_ok_and(|(spec, _)| matches!(spec.network, NetworkMode::Egress(_)));
            if egress {
                *contracts.entry(record.runtime.clone()).or_default() += 1;
            }
        }
    }
    for ((shown, lane), n) in by_state {
        metrics::gauge!(BY_STATE.name, "state" => shown, "lane" => lane).set(n as f64);
    }
    for (lane, n) in contracts {
        metrics::gauge!(NETWORK_CONTRACTS.name, "lane" => lane).set(n as f64);
    }
    Ok(())
}

/// Nodes by state, and each node's reported capacity and usage.
async fn nodes(state: &AppState) -> Result<(), ApiError> {
    let mut by_state: BTreeMap<&'static str, u64> = ["ready", "unreachable", "draining"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for node in state.store.nodes().await?.into_iter().flatten() {
        *by_state.entry(node.state.as_str()).or_default() += 1;
        for (metric, resources) in [(&NODE_CAPACITY, &node.capacity), (&NODE_USAGE, &node.usage)] {
            let values = [
                ("cpu_millis", resources.cpu_millis as f64),
                ("memory_bytes", resources.memory_bytes as f64),
                ("gpus", f64::from(resources.gpus)),
            ];
            for (resource, value) in values {
                metrics::gauge!(metric.name, "node" => node.id.clone(), "resource" => resource).set(value);
            }
        }
    }
    for (s, n) in by_state {
        metrics::gauge!(NODES.name, "state" => s).set(n as f64);
    }
    Ok(())
}
