//! After a restart: re-adopt every sandbox whose shim still answers, record the others' outcomes, and
//! kill pooled sandboxes a previous run never handed out.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tartarus_shim::protocol::RunState;
use tartarus_store::SandboxStatus;

use super::*;

impl Manager {
    /// After a restart: re-adopt sandboxes whose shim still runs, record the others' outcomes.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(usize, usize), ApiError> {
        let (mut adopted, mut ended) = (0, 0);
        self.settle_hibernated().await?;
        for status in [SandboxStatus::Starting, SandboxStatus::Running] {
            // Sandboxes on cluster nodes are their node's to re-adopt.
            for record in self
                .store
                .sandboxes(None, Some(status))
                .await?
                .into_iter()
                // Paused to disk: no shim to find, its snapshot waits for a resume.
                .filter(|r| r.node.is_none() && r.hibernated_to.is_none())
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
                        self.watch_adopted(record.id.clone(), dir, lane_of(&record), pidfd)?;
                        adopted += 1;
                    }
                    (false, Some(pidfd)) if self.hibernation_under_way(&record.id) => {
                        // A pause to disk was under way when the last server stopped: its shim is busy
                        // saving and answers nothing until it is done. It is let finish (bounded), and its
                        // result says whether the sandbox is on disk now or ended.
                        wait_for_exit(pidfd, super::shim_client::HIBERNATE_DEADLINE).await;
                        end_unadopted(&SandboxDir::new(&dir)).await;
                        self.finalize(
                            &record.id,
                            &dir,
                            lane_of(&record),
                            "the server restarted while the sandbox was being paused to disk",
                        )
                        .await;
                        ended += 1;
                    }
                    _ => {
                        // A shim may still run (killed mid-create, or not answering): end it before its
                        // socket goes, or nothing could ever stop it.
                        end_unadopted(&SandboxDir::new(&dir)).await;
                        self.finalize(
                            &record.id,
                            &dir,
                            lane_of(&record),
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

    /// Sandboxes paused to disk whose resume the last server did not finish: a shim it started may run
    /// the restored sandbox, unrecorded. It is ended, so the sandbox is paused to disk (its snapshot is
    /// removed only once a resume is recorded), never half resumed.
    async fn settle_hibernated(&self) -> Result<(), ApiError> {
        for record in self.store.sandboxes(None, Some(SandboxStatus::Running)).await? {
            if record.node.is_some() || record.hibernated_to.is_none() {
                continue;
            }
            let dir = SandboxDir::new(&record.dir);
            if !processes_naming(&dir.socket()).is_empty() {
                tracing::warn!(sandbox = %record.id, "ending a restore the last server did not record");
                end_unadopted(&dir).await;
            }
            let _ = tokio::fs::remove_file(dir.socket()).await;
            let _ = tokio::fs::remove_file(dir.result()).await;
        }
        Ok(())
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

    fn watch_adopted(
        self: &Arc<Self>,
        id: String,
        dir: PathBuf,
        lane: LaneName,
        pidfd: OwnedFd,
    ) -> Result<(), ApiError> {
        // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor stays open and refers to the
        // same pidfd for the AsyncFd's whole life, and OwnedFd::as_raw_fd always returns it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(pidfd) }
            .map_err(|e| ApiError::internal(format!("watching the shim: {e}")))?;
        self.watch(id, dir, lane, async move {
            let _ = fd.readable().await;
        })
    }
}

/// The lane a stored sandbox ran on (the `lane` label of its metrics); a record from before lanes were
/// recorded ran on the process lane.
pub(super) fn lane_of(record: &SandboxRecord) -> LaneName {
    record.runtime.parse().unwrap_or(LaneName::Process)
}

/// How long a shim found for an unadopted sandbox gets to end its sandbox (it may still be starting it)
/// before it is killed outright.
const UNADOPTED_DEADLINE: Duration = Duration::from_secs(15);

/// Ends every process of a sandbox the server could not adopt: its shim is asked over the socket to kill
/// the sandbox (so it removes the sandbox's cgroups and writes its result), retried while the shim may
/// still be starting; what is left at [`UNADOPTED_DEADLINE`] is sent SIGKILL through a pidfd. A process
/// is the sandbox's when its command line names the sandbox's socket (the shim, and init, its fork).
pub(super) async fn end_unadopted(dir: &SandboxDir) {
    let socket = dir.socket();
    let deadline = Instant::now() + UNADOPTED_DEADLINE;
    let mut asked = false;
    loop {
        let left = processes_naming(&socket);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for (pid, pidfd) in left {
                tracing::warn!(pid, socket = %socket.display(), "killing a shim the server could not adopt");
                let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
            }
            return;
        }
        if !asked {
            match ShimClient::new(dir).kill().await {
                Ok(()) => asked = true,
                Err(CallError::NotRunning) => {}
                Err(e) => {
                    tracing::warn!(socket = %socket.display(), "killing an unadopted sandbox: {}", tartarus_runtime::error_chain(&e))
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Processes whose command line has `path` as an argument, each with a pidfd opened before its command
/// line was read again (so a reused pid is never signalled).
fn processes_naming(path: &Path) -> Vec<(i32, OwnedFd)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let wanted = path.as_os_str().as_encoded_bytes();
    let names = |pid: i32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).any(|arg| arg == wanted))
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if !names(pid) {
            continue;
        }
        let Some(raw) = rustix::process::Pid::from_raw(pid) else {
            continue;
        };
        if let Ok(pidfd) = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
            if names(pid) {
                found.push((pid, pidfd));
            }
        }
    }
    found
}

/// Waits until the process behind `pidfd` has exited, at most `limit`.
async fn wait_for_exit(pidfd: OwnedFd, limit: Duration) {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor stays open and refers to the
    // same pidfd for the AsyncFd's whole life.
    if let Ok(fd) = unsafe { tokio::io::unix::AsyncFd::register(pidfd) } {
        let _ = tokio::time::timeout(limit, fd.readable()).await;
    }
}
