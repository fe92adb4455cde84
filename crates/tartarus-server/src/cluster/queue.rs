//! The queue of requests no node has room for now: enqueueing, and the dispatcher that places them as
//! room appears (on the leader, one batch per tick).

use tartarus_store::{Enqueue, Lane, NewEvent, NewQueueItem};

use super::placement::{new_sandbox_id, place, PlacementRequest};
use super::{event, ClusterError};
use crate::AppState;

/// How often a queued request is tried before it becomes a dead letter.
const MAX_ATTEMPTS: i64 = 30;
/// Queued requests placed per dispatcher tick at most.
const BATCH: usize = 32;
/// How long a dispatcher holds a dequeued request before another may take it.
const LEASE_MS: i64 = 60_000;

/// Puts a request no node has room for now in the queue. `Ok(None)` when the queue is full (429).
pub async fn enqueue(
    state: &AppState,
    want: &PlacementRequest,
    lane: Lane,
    priority: i64,
    reason: &str,
) -> Result<Option<String>, ClusterError> {
    let id = new_sandbox_id()?;
    let payload = PlacementRequest {
        id: Some(id.clone()),
        ..want.clone()
    };
    let payload = serde_json::to_string(&payload).map_err(|source| ClusterError::Encode {
        what: "the queued request",
        source,
    })?;
    let item = NewQueueItem {
        id: &id,
        lane,
        priority,
        tenant: &want.tenant,
        payload: &payload,
        max_attempts: MAX_ATTEMPTS,
        reason: Some(reason),
    };
    match state
        .store
        .enqueue(&item, tartarus_store::now_ms(), state.cluster.queue_depth)
        .await?
    {
        Enqueue::Queued => Ok(Some(id)),
        Enqueue::Full { .. } => Ok(None),
    }
}

/// On the leader: places queued requests whose time has come, one tick's worth.
pub(super) async fn dispatch(state: &AppState) {
    let worker = state.cluster.replica.clone();
    for _ in 0..BATCH {
        let now = tartarus_store::now_ms();
        let item = match state.store.dequeue(&worker, now, LEASE_MS).await {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(e) => {
                tracing::error!("dequeue: {}", tartarus_runtime::error_chain(&e));
                break;
            }
        };
        let want: PlacementRequest = match serde_json::from_str(&item.payload) {
            Ok(w) => w,
            Err(e) => {
                let _ = state
                    .store
                    .reject(&item.id, &worker, &format!("unreadable request: {e}"), false, now)
                    .await;
                continue;
            }
        };
        let lane = item.lane.as_str();
        match place(state, &want).await {
            Ok(Some(record)) => {
                let waited = (tartarus_store::now_ms() - item.enqueued_ms).max(0) as f64 / 1000.0;
                metrics::histogram!(crate::metrics::QUEUE_WAIT.name, "lane" => lane).record(waited);
                if let Err(e) = state
                    .store
                    .ack_with(&item.id, &worker, Some(&record.id), tartarus_store::now_ms())
                    .await
                {
                    tracing::error!(item = %item.id, "ack: {}", tartarus_runtime::error_chain(&e));
                }
                state
                    .events
                    .sandbox("created", &record, serde_json::json!({ "queued_s": waited }));
                event(
                    state,
                    "queue.placed",
                    record.node.as_deref().unwrap_or("-"),
                    &format!(
                        "queued sandbox {} placed after {waited:.1} s: {}",
                        record.id,
                        record.placement.as_deref().unwrap_or_default()
                    ),
                )
                .await;
            }
            Ok(None) => {
                let _ = state
                    .store
                    .reject(&item.id, &worker, "no node is registered", true, now)
                    .await;
            }
            Err(e) if e.is_retryable() => {
                let reason = tartarus_runtime::error_chain(&e);
                let _ = state.store.reject(&item.id, &worker, &reason, true, now).await;
            }
            Err(e) => {
                let reason = tartarus_runtime::error_chain(&e);
                let _ = state.store.reject(&item.id, &worker, &reason, false, now).await;
                let event = NewEvent {
                    category: "dead_letter",
                    kind: "queue.dead",
                    sandbox: Some(&item.id),
                    tenant: Some(&item.tenant),
                    message: &format!("queued sandbox {} cannot be placed: {reason}", item.id),
                    details: Some(&item.payload),
                };
                if state.store.record_event(&event).await.is_ok() {
                    crate::metrics::event_recorded(&event);
                }
            }
        }
    }
}
