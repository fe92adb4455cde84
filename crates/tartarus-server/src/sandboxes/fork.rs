//! Fork: N new sandboxes continuing from one sandbox's state — memory, processes, scratch files — on a
//! lane that can save it (`pause_to_disk`). A running parent is paused to disk, every child is restored
//! from that one sealed snapshot under its own id, directory, gateway and episode, and the parent is
//! resumed; a parent already on disk stays there. What each child gets afresh and what it shares with its
//! parent (user-space random generators seeded before the fork) is in docs/snapshots.md.

use std::path::PathBuf;
use std::sync::Arc;

use tartarus_store::{Finish, SandboxRecord, SandboxStatus};

use super::hibernation::require_pause_to_disk;
use super::reconcile::lane_of;
use super::shim_client::SandboxDir;
use super::{new_record, start_error, stored_spec, Manager};
use crate::error::ApiError;

/// The most children one fork makes.
pub const MAX_FORK_COUNT: u32 = 16;

impl Manager {
    /// Forks local sandbox `parent` into `count` children; returns their records (running). The tenant's
    /// quotas were checked for all of them by the caller.
    pub async fn fork(
        self: &Arc<Self>,
        parent: &SandboxRecord,
        count: u32,
    ) -> Result<Vec<SandboxRecord>, ApiError> {
        require_pause_to_disk(parent, "fork sandbox {id}", "fork sandboxes of the gvisor lane")?;
        let was_running = parent.hibernated_to.is_none();
        if was_running {
            self.hibernate(parent).await?;
        }
        let parent = self
            .store
            .sandbox(&parent.id, None)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no sandbox {}", parent.id)))?;
        let forked = {
            let _held = self.hold_transition(&parent.id)?;
            self.restore_children(&parent, count).await
        };
        if was_running {
            // The parent continues whatever happened to its children.
            if let Err(e) = self.resume_from_disk(&parent).await {
                tracing::error!(sandbox = %parent.id, "resuming a forked sandbox failed: {}", e.message);
                return Err(e);
            }
        }
        forked
    }

    /// Restores `count` children of `parent` (paused to disk) from its snapshot; a child that does not
    /// start ends the fork, and the children started before it are stopped.
    async fn restore_children(
        self: &Arc<Self>,
        parent: &SandboxRecord,
        count: u32,
    ) -> Result<Vec<SandboxRecord>, ApiError> {
        let lane = lane_of(parent);
        let snapshot = parent
            .hibernated_to
            .as_deref()
            .map(PathBuf::from)
            .ok_or_else(|| ApiError::conflict(format!("sandbox {} has no snapshot to fork", parent.id)))?;
        let spec = stored_spec(parent)?;
        let mut children = Vec::new();
        for _ in 0..count {
            let started = std::time::Instant::now();
            let (id, dir, spec_json) = self.prepare_dir(&spec, lane).await?;
            let mut record = new_record(&id, &parent.tenant, &dir, spec_json, parent.labels.clone());
            record.template = parent.template.clone();
            record.runtime = parent.runtime.clone();
            record.runtime_reason = Some(format!("forked from {}", parent.id));
            self.store.insert_sandbox(&record).await?;
            let launched = self
                .launcher
                .launch_from(&SandboxDir::new(&dir), lane, Some(&snapshot))
                .await;
            let shim = match launched {
                Ok(shim) => shim,
                Err(e) => {
                    let message = tartarus_runtime::error_chain(&e);
                    let finish = Finish {
                        status: SandboxStatus::Failed,
                        exit_code: None,
                        reason: &message,
                    };
                    self.store.finish_sandbox(&id, &finish).await?;
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                    let _ = tokio::fs::remove_dir_all(self.gateway_dir(&id)).await;
                    for child in &children {
                        let _ = self.kill(child).await;
                    }
                    return Err(start_error(&id, &e, format!("fork of {}: {message}", parent.id)));
                }
            };
            self.store.mark_running(&id, shim.pid).await?;
            metrics::histogram!(crate::metrics::RESTORE_DURATION.name, "lane" => lane.as_str(), "node" => self.node.clone())
                .record(started.elapsed().as_secs_f64());
            let mut child = shim.child;
            self.watch(id.clone(), dir, lane, async move {
                let _ = child.wait().await;
            })?;
            record.status = SandboxStatus::Running;
            record.shim_pid = Some(shim.pid);
            if let Some(hooks) = self.lifecycle.get() {
                hooks.started(&record, false).await;
            }
            children.push(record);
        }
        Ok(children)
    }
}
