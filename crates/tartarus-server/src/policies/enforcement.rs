//! The enforcement loop: what each running sandbox's counters say it did, and what its policy says to do
//! about it (log, throttle, kill, quarantine), each action an event.

use serde_json::json;
use tartarus_store::{NewEvent, SandboxStatus};

use super::event;
use crate::error::ApiError;
use crate::sandboxes::CallError;
use crate::AppState;

/// The enforcement loop: for every running sandbox, watches its blocked-packet counter (egress) and its
/// limit hits (OOM kills, forks refused at the pids limit) and, when one grows, acts as the sandbox's
/// effective policy says: `on_network_violation` (log, kill, quarantine) and `on_resource_violation`
/// (throttle: the CPU quota drops to a quarter, at least 0.05 core; kill; quarantine). Without any policy in
/// force, violations are only logged as events.
pub fn spawn_enforcement(state: AppState, every: std::time::Duration) {
    tokio::spawn(async move {
        let mut seen: std::collections::HashMap<String, (u64, u64)> = std::collections::HashMap::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(live) = state.store.sandboxes(None, Some(SandboxStatus::Running)).await else {
                continue;
            };
            seen.retain(|id, _| live.iter().any(|r| &r.id == id));
            // Sandboxes on cluster nodes are enforced by their node's server. Every shim is asked at once,
            // each call with its own deadline, so one shim that does not answer delays nobody else.
            let local: Vec<_> = live.iter().filter(|r| !r.paused && r.node.is_none()).collect();
            for chunk in local.chunks(ENFORCEMENT_CONCURRENCY) {
                let statuses = futures_util::future::join_all(
                    chunk
                        .iter()
                        .map(|record| async { (*record, state.manager.shim(record).status().await) }),
                )
                .await;
                for (record, status) in statuses {
                    let status = match status {
                        Ok(status) => status,
                        Err(CallError::NotRunning) => continue,
                        Err(e) => {
                            tracing::warn!(sandbox = %record.id, tenant = %record.tenant, "enforcement: {}", tartarus_runtime::error_chain(&e));
                            continue;
                        }
                    };
                    crate::usage::sample(&state.store, record, &status).await;
                    let blocked = status.blocked_packets.unwrap_or(0);
                    let hits = status.limit_hits.total();
                    let (blocked_before, hits_before) =
                        seen.insert(record.id.clone(), (blocked, hits)).unwrap_or((0, 0));
                    if blocked > blocked_before {
                        metrics::counter!(crate::metrics::PACKETS_BLOCKED.name, "lane" => record.runtime.clone())
                            .increment(blocked - blocked_before);
                        enforce_network(&state, record, blocked - blocked_before).await;
                    } else if hits > hits_before {
                        enforce_resources(&state, record, hits - hits_before).await;
                    }
                }
            }
        }
    });
}

/// Shims the enforcement loop asks at once.
const ENFORCEMENT_CONCURRENCY: usize = 64;

async fn enforce_resources(state: &AppState, record: &tartarus_store::SandboxRecord, new_hits: u64) {
    use tartarus_policy::ResourceViolationAction as Action;
    let policies = state.policies.snapshot();
    let action = match policies.is_empty() {
        true => None,
        false => Some(
            tartarus_policy::effective(&policies, &record.tenant, record.template.as_deref())
                .enforcement
                .on_resource_violation,
        ),
    };
    let what = format!("hit its limits {new_hits} more time(s) (OOM kills, forks refused at the pids limit)");
    let id = &record.id;
    let (kind, message) = match action {
        None => ("resources.violation", format!("sandbox {id} {what}")),
        Some(Action::Throttle) => {
            // A spec that cannot be read throttles from one core, as one without a CPU limit does.
            let cpu_limit = crate::sandboxes::stored_spec(record)
                .ok()
                .and_then(|spec| spec.limits.cpus);
            let cpus = (cpu_limit.unwrap_or(1.0) / 4.0).max(0.05);
            match state.manager.shim(record).throttle(cpus).await {
                Ok(reply) if reply.throttled => (
                    "resources.throttle",
                    format!("sandbox {id} {what}; CPU quota lowered to {cpus} core(s) (on_resource_violation: throttle)"),
                ),
                Ok(_) => (
                    "resources.violation",
                    format!("sandbox {id} {what}; it has no CPU limit to throttle (give it resources.cpus)"),
                ),
                Err(e) => (
                    "resources.throttle_failed",
                    format!("sandbox {id} {what}; throttling failed: {}", tartarus_runtime::error_chain(&e)),
                ),
            }
        }
        Some(Action::Kill) => match state.manager.kill(record).await {
            Ok(()) => (
                "resources.kill",
                format!("sandbox {id} {what}; killed (on_resource_violation: kill)"),
            ),
            Err(e) => (
                "resources.kill_failed",
                format!("sandbox {id} {what}; killing it failed: {}", e.message),
            ),
        },
        Some(Action::Quarantine) => match quarantine(state, record).await {
            Ok(()) => (
                "resources.quarantine",
                format!(
                    "sandbox {id} {what}; network cut off and frozen (on_resource_violation: quarantine)"
                ),
            ),
            Err(e) => (
                "resources.quarantine_failed",
                format!("sandbox {id} {what}; quarantine failed: {}", e.message),
            ),
        },
    };
    event(
        state,
        NewEvent {
            category: "enforcement",
            kind,
            sandbox: Some(id),
            tenant: Some(&record.tenant),
            message: &message,
            details: Some(&json!({"limit_hits": new_hits}).to_string()),
        },
    )
    .await;
}

async fn enforce_network(state: &AppState, record: &tartarus_store::SandboxRecord, new_drops: u64) {
    use tartarus_policy::NetworkViolationAction as Action;
    let policies = state.policies.snapshot();
    let action = match policies.is_empty() {
        true => Action::Log,
        false => {
            tartarus_policy::effective(&policies, &record.tenant, record.template.as_deref())
                .enforcement
                .on_network_violation
        }
    };
    let what = format!("its network contract dropped {new_drops} more packet(s)");
    let (kind, message) = match action {
        Action::Log => ("network.violation", format!("sandbox {} {what}", record.id)),
        Action::Kill => match state.manager.kill(record).await {
            Ok(()) => (
                "network.kill",
                format!(
                    "sandbox {} {what}; killed (on_network_violation: kill)",
                    record.id
                ),
            ),
            Err(e) => (
                "network.kill_failed",
                format!("sandbox {} {what}; killing it failed: {}", record.id, e.message),
            ),
        },
        Action::Quarantine => match quarantine(state, record).await {
            Ok(()) => (
                "network.quarantine",
                format!(
                    "sandbox {} {what}; network cut off and frozen (on_network_violation: quarantine)",
                    record.id
                ),
            ),
            Err(e) => (
                "network.quarantine_failed",
                format!("sandbox {} {what}; quarantine failed: {}", record.id, e.message),
            ),
        },
    };
    event(
        state,
        NewEvent {
            category: "enforcement",
            kind,
            sandbox: Some(&record.id),
            tenant: Some(&record.tenant),
            message: &message,
            details: Some(&json!({"blocked_packets": new_drops}).to_string()),
        },
    )
    .await;
}

/// Quarantines a running sandbox: its egress network is cut off and every process frozen, kept for an
/// operator to inspect (`resume` thaws it; the network stays cut).
pub async fn quarantine(state: &AppState, record: &tartarus_store::SandboxRecord) -> Result<(), ApiError> {
    state
        .manager
        .shim(record)
        .isolate()
        .await
        .map_err(|e| crate::sandboxes::call_error(&record.id, e))?;
    state.store.set_paused(&record.id, true).await?;
    Ok(())
}
