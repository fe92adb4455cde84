//! Retention of what sandboxes leave on the host: ended sandboxes' directories are removed once they are
//! older than the retention (their records stay), and a running sandbox's `main.log` is cut back to empty
//! whenever it grows past its cap.
//!
//! The shim appends the main command's output to `main.log` (opened `O_APPEND`), so truncating it here
//! is safe: the next write lands at the new end. The cap is checked every [`LOG_CHECK_INTERVAL`], so a log
//! can pass it by what the command writes in that time (the runtime's `RLIMIT_FSIZE` stays the hard stop).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tartarus_store::SandboxStatus;

use super::{Manager, SandboxDir};

/// How often running sandboxes' logs are measured.
pub const LOG_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What the server keeps of sandboxes on disk.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// How long an ended sandbox's directory (spec, logs, result) stays after it ended.
    pub keep_ended: Duration,
    /// The most bytes a running sandbox's `main.log` may hold before it is cut back to empty.
    pub max_log_bytes: u64,
}

/// How many ended sandboxes one store read of a sweep returns.
const SWEEP_PAGE: u32 = 256;

impl Manager {
    /// Runs retention in the background: logs every [`LOG_CHECK_INTERVAL`], ended directories every
    /// quarter of the retention (between 1 s and 1 min).
    pub fn spawn_retention(self: &Arc<Self>, retention: Retention) {
        let manager = Arc::clone(self);
        let sweep_every = (retention.keep_ended / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOG_CHECK_INTERVAL);
            let mut last_sweep: Option<tokio::time::Instant> = None;
            let mut swept = None;
            loop {
                tick.tick().await;
                manager.cap_logs(retention.max_log_bytes).await;
                if last_sweep.is_none_or(|t| t.elapsed() >= sweep_every) {
                    last_sweep = Some(tokio::time::Instant::now());
                    manager.remove_ended(retention.keep_ended, &mut swept).await;
                }
            }
        });
    }

    /// Cuts back every running local sandbox's `main.log` that holds more than `max` bytes.
    async fn cap_logs(&self, max: u64) {
        let running = match self.store.sandboxes(None, Some(SandboxStatus::Running)).await {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(
                    "retention: listing sandboxes failed: {}",
                    tartarus_runtime::error_chain(&e)
                );
                return;
            }
        };
        for record in running.iter().filter(|r| r.node.is_none()) {
            let log = SandboxDir::new(&record.dir).main_log();
            if let Err(e) = cap_log(&log, max).await {
                tracing::warn!(sandbox = %record.id, "retention: capping main.log failed: {e}");
            }
        }
    }

    /// Removes the directories of local sandboxes that ended more than `keep` ago (records are kept),
    /// in the order they ended from `swept` on, a page at a time, so a store holding many ended
    /// sandboxes is never read whole; `swept` then marks the last one seen. A directory that cannot be
    /// removed is logged and left (the next sweeps go on from the mark).
    async fn remove_ended(&self, keep: Duration, swept: &mut Option<(i64, String)>) {
        let cutoff =
            tartarus_store::now_ms().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
        loop {
            let after = swept.as_ref().map(|(ms, id)| (*ms, id.as_str()));
            let page = match self.store.ended_sandboxes(after, cutoff, SWEEP_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(
                        "retention: listing ended sandboxes failed: {}",
                        tartarus_runtime::error_chain(&e)
                    );
                    return;
                }
            };
            let Some(last) = page.last() else { return };
            *swept = Some((last.finished_ms, last.id.clone()));
            for record in page.iter().filter(|r| r.node.is_none()) {
                let dir = Path::new(&record.dir);
                // Only directories under our own sandboxes directory: a record is never a path to delete.
                if dir.parent() != Some(self.data_dir.join("sandboxes").as_path()) || !dir.exists() {
                    continue;
                }
                match tokio::fs::remove_dir_all(dir).await {
                    Ok(()) => {
                        tracing::debug!(sandbox = %record.id, "retention: removed the ended sandbox's files")
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %record.id, "retention: removing {} failed: {e}", dir.display())
                    }
                }
                let _ = tokio::fs::remove_dir_all(self.gateway_dir(&record.id)).await;
            }
            if page.len() < SWEEP_PAGE as usize {
                return;
            }
        }
    }
}

/// Truncates `log` to empty when it holds more than `max` bytes, and notes the cut in it.
async fn cap_log(log: &Path, max: u64) -> std::io::Result<()> {
    let size = match tokio::fs::metadata(log).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if size <= max {
        return Ok(());
    }
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::OpenOptions::new().append(true).open(log).await?;
    file.set_len(0).await?;
    file.write_all(format!("[tartarus: main.log passed {max} bytes and was truncated]\n").as_bytes())
        .await
}
