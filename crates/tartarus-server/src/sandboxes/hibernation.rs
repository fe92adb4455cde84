//! Pause to disk and resume: a running sandbox on a lane that can save memory (`pause_to_disk`) is
//! checkpointed by its shim into `DATA/snapshots/<id>/<epoch>/`, sealed there (every part hashed and read
//! back) and ended; its record stays `running` with `paused` set, `hibernated_to` naming the snapshot and
//! no shim, so it costs no CPU or memory and its deadlines and timeout do not run. A resume checks the
//! snapshot whole — a part missing or changed, another spec or lane is refused with the reason and the
//! snapshot kept for inspection — then starts a shim that restores it under the same id. A delete of a
//! sandbox paused to disk ends its record and removes its snapshots.
//!
//! One transition per sandbox at a time (pause to disk, resume, stop of a hibernated sandbox): a second
//! one is refused with 409 rather than racing the first for the shim's socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::StatusCode;
use tartarus_runtime::lanes::LaneName;
use tartarus_store::{Finish, NewEvent, SandboxRecord, SandboxStatus};

use super::reconcile::lane_of;
use super::shim_client::SandboxDir;
use super::{call_error, start_error, Manager};
use crate::error::ApiError;

/// Why a sandbox paused to disk and then deleted ended.
const KILLED_WHILE_HIBERNATED: &str = "killed while paused to disk";

impl Manager {
    /// The directory holding every snapshot of sandbox `id`.
    pub fn snapshots_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("snapshots").join(id)
    }

    /// Whether a pause to disk of sandbox `id` was started and not sealed: a snapshot directory without
    /// its manifest.
    pub(super) fn hibernation_under_way(&self, id: &str) -> bool {
        let Ok(entries) = std::fs::read_dir(self.snapshots_dir(id)) else {
            return false;
        };
        entries
            .flatten()
            .any(|e| e.path().is_dir() && !e.path().join(tartarus_runtime::snapshot::MANIFEST).exists())
    }

    /// Holds sandbox `id` for one transition, or says why not.
    pub(super) fn hold_transition(&self, id: &str) -> Result<crate::limits::Held, ApiError> {
        self.transitions.try_hold(id).ok_or_else(|| {
            ApiError::conflict(format!(
                "sandbox {id} is being paused, resumed or stopped already; try again when that is done"
            ))
        })
    }

    /// Pauses a running local sandbox to disk; returns once its snapshot is sealed and its shim is gone.
    pub async fn hibernate(self: &Arc<Self>, record: &SandboxRecord) -> Result<(), ApiError> {
        require_pause_to_disk(
            record,
            "pause sandbox {id} to disk",
            "pause it in memory (mode \"memory\") or run it on the gvisor lane",
        )?;
        if record.hibernated_to.is_some() {
            return Ok(());
        }
        let _held = self.hold_transition(&record.id)?;
        let dir = self
            .snapshots_dir(&record.id)
            .join(tartarus_store::now_ms().to_string());
        create_private_dirs(&dir)
            .await
            .map_err(|e| ApiError::internal(format!("creating the snapshot directory: {e}")))?;
        let waiter = self.done(&record.id);
        match self.shim(record).hibernate(&dir).await {
            Ok(()) => {}
            Err(e) => {
                // The sandbox keeps running (or ended for its own reasons, recorded as usual); nothing of
                // the snapshot is kept.
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(call_error(&record.id, e));
            }
        }
        // The shim has exited; its result names the snapshot, which `finalize` records.
        if let Some(mut rx) = waiter {
            let _ = tokio::time::timeout(super::STOP_WAIT, rx.wait_for(|done| *done)).await;
        }
        match self.store.sandbox(&record.id, None).await? {
            Some(now) if now.hibernated_to.is_some() => Ok(()),
            _ => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!(
                    "sandbox {} was saved but its pause to disk was not recorded",
                    record.id
                ),
            )),
        }
    }

    /// What `finalize` does with a result of reason `hibernated`: the record keeps the sandbox, paused, at
    /// its snapshot.
    pub(super) async fn record_hibernation(
        &self,
        id: &str,
        lane: LaneName,
        snapshot: Option<PathBuf>,
    ) -> Result<(), String> {
        let dir = snapshot.ok_or("the shim reported a pause to disk without its snapshot")?;
        let bytes = tartarus_runtime::snapshot::read_manifest(&dir)
            .map(|m| m.total_bytes())
            .map_err(|e| tartarus_runtime::error_chain(&e))?;
        self.store
            .set_hibernated(id, &dir.to_string_lossy())
            .await
            .map_err(|e| tartarus_runtime::error_chain(&e))?;
        let tenant = self
            .store
            .sandbox(id, None)
            .await
            .ok()
            .flatten()
            .map(|r| r.tenant);
        let event = NewEvent {
            category: "lifecycle",
            kind: "sandbox.paused_to_disk",
            sandbox: Some(id),
            tenant: tenant.as_deref(),
            message: &format!("sandbox {id} was paused to disk ({bytes} bytes of snapshot)"),
            details: None,
        };
        if let Err(e) = self.store.record_event(&event).await {
            tracing::error!(
                sandbox = id,
                "recording an event failed: {}",
                tartarus_runtime::error_chain(&e)
            );
        }
        metrics::histogram!(crate::metrics::SNAPSHOT_BYTES.name, "lane" => lane.as_str())
            .record(bytes as f64);
        Ok(())
    }

    /// Resumes a sandbox paused to disk under the same id, from its snapshot.
    pub async fn resume_from_disk(self: &Arc<Self>, record: &SandboxRecord) -> Result<(), ApiError> {
        let Some(snapshot) = record.hibernated_to.as_deref().map(PathBuf::from) else {
            return Err(ApiError::conflict(format!(
                "sandbox {} is not paused to disk",
                record.id
            )));
        };
        let _held = self.hold_transition(&record.id)?;
        let started = std::time::Instant::now();
        let lane = lane_of(record);
        let sandbox_dir = SandboxDir::new(&record.dir);
        let spec = tokio::fs::read(sandbox_dir.spec())
            .await
            .map_err(|e| ApiError::internal(format!("reading the spec of sandbox {}: {e}", record.id)))?;
        let checked = {
            let snapshot = snapshot.clone();
            tokio::task::spawn_blocking(move || {
                tartarus_runtime::snapshot::verify(&snapshot, lane.as_str(), &spec)
            })
            .await
            .map_err(|e| ApiError::internal(format!("checking the snapshot: {e}")))?
        };
        if let Err(e) = checked {
            let message = tartarus_runtime::error_chain(&e);
            self.note(record, "snapshot.unusable", &message).await;
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "snapshot_unusable",
                format!(
                    "sandbox {} cannot be resumed: {message}; it stays paused (delete it to discard it)",
                    record.id
                ),
            ));
        }
        // The result of the pause is the previous shim's; the restored one writes its own.
        let _ = tokio::fs::remove_file(sandbox_dir.result()).await;
        let shim = match self
            .launcher
            .launch_from(&sandbox_dir, lane, Some(&snapshot))
            .await
        {
            Ok(shim) => shim,
            Err(e) => {
                let message = tartarus_runtime::error_chain(&e);
                self.note(record, "snapshot.restore_failed", &message).await;
                return Err(start_error(&record.id, &e, message));
            }
        };
        let mut child = shim.child;
        if !self.store.mark_resumed(&record.id, shim.pid).await? {
            // Deleted meanwhile: the restored sandbox is not wanted.
            let _ = self.shim(record).kill().await;
            let _ = child.wait().await;
            return Err(ApiError::conflict(format!(
                "sandbox {} ended while it was resumed",
                record.id
            )));
        }
        metrics::histogram!(crate::metrics::RESTORE_DURATION.name, "lane" => lane.as_str(), "node" => self.node.clone())
            .record(started.elapsed().as_secs_f64());
        self.watch(record.id.clone(), PathBuf::from(&record.dir), lane, async move {
            let _ = child.wait().await;
        })?;
        if let Some(hooks) = self.lifecycle.get() {
            // The gateway reopens if a restart of this server closed it; the episode continues.
            hooks.started(record, true).await;
        }
        // The restored sandbox has moved on from its snapshot: it is no use any more.
        let _ = tokio::fs::remove_dir_all(&snapshot).await;
        let _ = tokio::fs::remove_dir(self.snapshots_dir(&record.id)).await;
        Ok(())
    }

    /// Ends a sandbox paused to disk (delete, deadline): no shim to stop, so the record is finished here
    /// and its snapshots removed.
    pub(super) async fn stop_hibernated(&self, record: &SandboxRecord) -> Result<(), ApiError> {
        let _held = self.hold_transition(&record.id)?;
        let finish = Finish {
            status: SandboxStatus::Killed,
            exit_code: None,
            reason: KILLED_WHILE_HIBERNATED,
        };
        self.store.finish_sandbox(&record.id, &finish).await?;
        metrics::counter!(crate::metrics::TOTAL.name, "template" => crate::metrics::template_label(record.template.as_deref()), "status" => "killed", "lane" => lane_of(record).as_str())
            .increment(1);
        let _ = tokio::fs::remove_dir_all(self.snapshots_dir(&record.id)).await;
        if let Some(hooks) = self.lifecycle.get() {
            hooks.ended(&record.id).await;
        }
        let _ = tokio::fs::remove_dir_all(self.gateway_dir(&record.id)).await;
        Ok(())
    }

    async fn note(&self, record: &SandboxRecord, kind: &str, message: &str) {
        let event = NewEvent {
            category: "lifecycle",
            kind,
            sandbox: Some(&record.id),
            tenant: Some(&record.tenant),
            message: &format!("sandbox {}: {message}", record.id),
            details: None,
        };
        if let Err(e) = self.store.record_event(&event).await {
            tracing::error!(sandbox = %record.id, "recording an event failed: {}", tartarus_runtime::error_chain(&e));
        }
    }
}

/// The lane of `record` when it can save a sandbox's memory; otherwise 409 `unsupported` saying that it
/// cannot `what` (`{id}` stands for the sandbox's id) and what to do instead.
pub(super) fn require_pause_to_disk(
    record: &SandboxRecord,
    what: &str,
    instead: &str,
) -> Result<LaneName, ApiError> {
    let lane = lane_of(record);
    match lane.capabilities().pause_to_disk {
        true => Ok(lane),
        false => Err(ApiError::new(
            StatusCode::CONFLICT,
            "unsupported",
            format!(
                "the {lane} lane cannot {}: it cannot save a sandbox's memory and processes; {instead}",
                what.replace("{id}", &record.id)
            ),
        )),
    }
}

/// Creates `dir` and its missing parents, owner-only.
async fn create_private_dirs(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
    })
    .await
    .map_err(std::io::Error::other)?
}
