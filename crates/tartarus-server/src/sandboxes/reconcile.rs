//! After a restart: re-adopt every sandbox whose shim still answers, record the others' outcomes, and
//! kill pooled sandboxes a previous run never handed out.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use tartarus_shim::protocol::RunState;
use tartarus_store::SandboxStatus;

use super::*;

impl Manager {
    /// After a restart: re-adopt sandboxes whose shim still runs, record the others' outcomes.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(usize, usize), ApiError> {
        let (mut adopted, mut ended) = (0, 0);
        for status in [SandboxStatus::Starting, SandboxStatus::Running] {
            // Sandboxes on cluster nodes are their node's to re-adopt.
            for record in self
                .store
                .sandboxes(None, Some(status))
                .await?
                .into_iter()
                .filter(|r| r.node.is_none())
            {
                let dir = PathBuf::from(&record.dir);
                let pidfd = record
                    .shim_pid
                    .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
                    .and_then(|pid| {
                        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
                    });
                let state = match (&pidfd, status) {
                    (Some(_), SandboxStatus::Running) => match self.shim(&record).status().await {
                        Ok(status) => Some(status),
                        Err(e) => {
                            tracing::warn!(sandbox = %record.id, "the shim does not answer: {}", tartarus_runtime::error_chain(&e));
                            None
                        }
                    },
                    _ => None,
                };
                let alive = state.is_some();
                if let Some(state) = &state {
                    self.store
                        .set_paused(&record.id, state.state == RunState::Paused)
                        .await?;
                }
                match (alive, pidfd) {
                    (true, Some(pidfd)) => {
                        if let Some(hooks) = self.lifecycle.get() {
                            hooks.started(&record, true).await;
                        }
                        self.watch_adopted(record.id.clone(), dir, pidfd)?;
                        adopted += 1;
                    }
                    _ => {
                        self.finalize(
                            &record.id,
                            &dir,
                            "the server restarted and the sandbox's shim was gone",
                        )
                        .await;
                        ended += 1;
                    }
                }
            }
        }
        self.remove_orphans().await?;
        Ok((adopted, ended))
    }

    /// Kills pooled sandboxes a previous run prepared but never handed out (they have no record), and
    /// removes their directories.
    async fn remove_orphans(&self) -> Result<(), ApiError> {
        let Ok(mut entries) = tokio::fs::read_dir(self.data_dir.join("sandboxes")).await else {
            return Ok(());
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let id = entry.file_name().to_string_lossy().into_owned();
            if self.store.sandbox(&id, None).await?.is_some() {
                continue;
            }
            let dir = entry.path();
            // A shim that is gone already is what we want; any other failure is logged.
            match ShimClient::new(&SandboxDir::new(&dir)).kill().await {
                Ok(()) | Err(CallError::NotRunning) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %id, "killing an orphaned pooled sandbox: {}", tartarus_runtime::error_chain(&e))
                }
            }
            let _ = tokio::fs::remove_dir_all(&dir).await;
            let _ = tokio::fs::remove_dir_all(self.gateway_dir(&id)).await;
        }
        Ok(())
    }

    fn watch_adopted(self: &Arc<Self>, id: String, dir: PathBuf, pidfd: OwnedFd) -> Result<(), ApiError> {
        // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor stays open and refers to the
        // same pidfd for the AsyncFd's whole life, and OwnedFd::as_raw_fd always returns it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(pidfd) }
            .map_err(|e| ApiError::internal(format!("watching the shim: {e}")))?;
        self.watch(id, dir, async move {
            let _ = fd.readable().await;
        })
    }
}
