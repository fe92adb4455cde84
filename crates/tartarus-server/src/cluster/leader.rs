//! Leadership among the server replicas that share a database, and the background loops the leader
//! runs: the heartbeat reaper and the queue dispatcher.

use std::sync::Arc;
use std::time::Duration;

use tartarus_runtime::error_chain;

use super::{event, node_rpc, queue};
use crate::AppState;

/// The leadership name of the control plane's background loops.
pub const LOOPS: &str = "control-loops";

/// Runs the background loops while this replica leads: competes for leadership every tick, and as leader
/// marks nodes that missed their heartbeats unreachable and dispatches the queue. `leading` tells the API
/// what this replica is.
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
                    Err(e) => tracing::warn!("leader election: {}", error_chain(&e)),
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
            reap(&state).await;
            queue::dispatch(&state).await;
        }
    });
}

/// Marks nodes whose last heartbeat is older than the node timeout unreachable, and loses their
/// sandboxes.
async fn reap(state: &AppState) {
    let before = tartarus_store::now_ms() - state.cluster.node_timeout.as_millis() as i64;
    let ids = match state.store.mark_unreachable(before).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::error!("reaping nodes: {}", error_chain(&e));
            return;
        }
    };
    for id in ids {
        tracing::warn!(node = %id, "node missed its heartbeats: unreachable");
        let message = format!(
            "node {id} sent no heartbeat for {} s: marked unreachable, no new work goes to it",
            state.cluster.node_timeout.as_secs_f64()
        );
        event(state, "node.unreachable", &id, &message).await;
        node_rpc::lose_sandboxes_of(state, &id).await;
    }
}
