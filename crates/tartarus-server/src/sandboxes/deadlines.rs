//! Deadlines the API can move: a sandbox with a row in the store's deadlines is stopped (or paused, for
//! E2B's auto-pause) once its deadline has passed (E2B's `timeout`, `set_timeout` and `connect`, which move it). Unlike the spec's
//! fixed `timeout`, which the shim enforces, a deadline lives in the store, so it survives a server
//! restart and is moved without touching the running sandbox.

use std::sync::Arc;
use std::time::Duration;

use super::Manager;

/// How often due sandboxes are looked for: a sandbox outlives its deadline by at most this (plus its stop).
pub const DEADLINE_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Due sandboxes stopped per check (the rest wait for the next).
const DUE_PAGE: i64 = 64;
/// Grace between SIGTERM and SIGKILL for a sandbox whose deadline passed.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);

impl Manager {
    /// Stops local sandboxes whose deadline has passed, in the background.
    pub fn spawn_deadlines(self: &Arc<Self>) {
        let manager = Arc::clone(self);
        tokio::spawn(async move {
            // Sandboxes being stopped now: the next checks leave them alone.
            let stopping: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
            let mut tick = tokio::time::interval(DEADLINE_CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let due = match manager
                    .store
                    .due_sandboxes(tartarus_store::now_ms(), DUE_PAGE)
                    .await
                {
                    Ok(due) => due,
                    Err(e) => {
                        tracing::warn!(
                            "reading due sandboxes failed: {}",
                            tartarus_runtime::error_chain(&e)
                        );
                        continue;
                    }
                };
                for (id, expiry) in due {
                    let Ok(Some(record)) = manager.store.sandbox(&id, None).await else {
                        continue;
                    };
                    // Another replica's sandbox (its shim's socket is on that machine) is that replica's.
                    let here = super::SandboxDir::new(&record.dir).socket().exists();
                    if record.node.is_some() || !record.status.is_live() || !here {
                        continue;
                    }
                    if !stopping
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.clone())
                    {
                        continue;
                    }
                    let manager = Arc::clone(&manager);
                    let stopping = Arc::clone(&stopping);
                    // Each stop on its own: one slow sandbox never delays another's.
                    tokio::spawn(async move {
                        match expiry {
                            tartarus_store::Expiry::Pause => {
                                let paused = match record.paused {
                                    true => Ok(()),
                                    false => manager.set_paused(&record, true).await,
                                };
                                match paused {
                                    // Paused: kept until resumed (which sets a new deadline) or deleted.
                                    Ok(()) => {
                                        let _ = manager.store.clear_deadline(&record.id).await;
                                    }
                                    Err(e) => {
                                        tracing::warn!(sandbox = %record.id, "pausing at its deadline failed, stopping it: {}", e.message);
                                        let _ = manager.stop(&record, Some(DEADLINE_GRACE)).await;
                                    }
                                }
                            }
                            tartarus_store::Expiry::Stop => {
                                if record.paused {
                                    let _ = manager.set_paused(&record, false).await;
                                }
                                if let Err(e) = manager.stop(&record, Some(DEADLINE_GRACE)).await {
                                    tracing::warn!(sandbox = %record.id, "stopping at its deadline failed: {}", e.message);
                                }
                            }
                        }
                        stopping.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    });
                }
            }
        });
    }
}
