//! Running sandboxes through shims: one `tartarus shim` process per sandbox, in its own process group so
//! it survives a server restart. The server talks to a shim over its unix socket, watches it exit, and
//! records the outcome the shim leaves in `result.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use futures_util::future::BoxFuture;
use tartarus_runtime::lanes::LaneName;
use tartarus_runtime::SandboxSpec;
use tartarus_shim::protocol::{EndReason, ErrorCode, ExecRequest, StartFailureKind};
use tartarus_store::{now_ms, Finish, NewEvent, SandboxRecord, SandboxStatus, Store};
use tokio::sync::watch;

pub use self::shim_client::{CallError, ExecEvents, SandboxDir, ShimClient, ShimLauncher};
use crate::error::ApiError;

mod deadlines;
mod fork;
mod hibernation;
mod pools;
mod reconcile;
mod request;
mod retention;
mod runtimes;
mod shim_client;

pub use self::fork::MAX_FORK_COUNT;
pub(crate) use self::pools::with_default_pids;
pub use self::pools::PoolSpec;
use self::pools::{pool_spec, poolable, Pool};
pub use self::retention::Retention;
pub use self::runtimes::Runtimes;

pub(crate) use self::request::spec_from;
pub use self::request::HostAccess;

pub struct Manager {
    store: Store,
    data_dir: PathBuf,
    launcher: ShimLauncher,
    /// The isolation lanes this machine offers.
    runtimes: Arc<Runtimes>,
    /// The `node` metrics label.
    node: String,
    /// Per live sandbox: becomes true once its outcome is recorded.
    done: Mutex<HashMap<String, watch::Receiver<bool>>>,
    /// Warm pools by key ([`DEFAULT_POOL`] or a template id): prepared, unclaimed sandboxes (not in the
    /// store until claimed).
    pools: Mutex<HashMap<String, Pool>>,
    /// Told when a sandbox is handed to a tenant (created or re-adopted) and when it has ended.
    lifecycle: std::sync::OnceLock<Arc<dyn Lifecycle>>,
    /// Execs running per local sandbox, at most [`crate::limits::EXECS_PER_SANDBOX`] each.
    pub execs: crate::limits::PerKey,
    /// Connections forwarded into each local sandbox's ports, at most
    /// [`crate::limits::PORT_CONNECTIONS_PER_SANDBOX`] each.
    pub port_connections: crate::limits::PerKey,
    /// Sandboxes being paused to disk, resumed from it or stopped while on it: one transition at a time.
    transitions: crate::limits::PerKey,
}

/// What else happens when a sandbox starts belonging to a tenant and when its outcome is recorded: the
/// tool gateway and the trace (crate::effects).
pub trait Lifecycle: Send + Sync {
    /// A sandbox is running for `record.tenant` (just created, or re-adopted after a restart). Awaited
    /// before the create returns.
    fn started<'a>(&'a self, record: &'a SandboxRecord, adopted: bool) -> BoxFuture<'a, ()>;
    /// A sandbox's outcome is recorded. Awaited before waiters learn that the sandbox ended.
    fn ended<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;
}

/// Where a sandbox sees the tool gateway's socket directory.
pub const GATEWAY_MOUNT: &str = "/run/tartarus";

/// The key of the pool of plain sandboxes (template pools are keyed by template id).
pub const DEFAULT_POOL: &str = "";

fn new_record(
    id: &str,
    tenant: &str,
    dir: &Path,
    spec: String,
    labels: std::collections::BTreeMap<String, String>,
) -> SandboxRecord {
    SandboxRecord {
        id: id.to_string(),
        tenant: tenant.to_string(),
        status: SandboxStatus::Starting,
        template: None,
        spec,
        labels,
        created_ms: now_ms(),
        finished_ms: None,
        exit_code: None,
        reason: None,
        shim_pid: None,
        dir: dir.display().to_string(),
        paused: false,
        node: None,
        remote_id: None,
        placement: None,
        runtime: LaneName::Process.to_string(),
        runtime_reason: None,
        hibernated_to: None,
    }
}

/// A new sandbox id as the API shows it: `sb_` and 48 random bits in hex. (The runtime names the host
/// resources of one instance with its own shorter id, which fits interface-name limits.)
pub fn new_sandbox_id() -> Result<String, ApiError> {
    let hex = tartarus_hostsys::random_hex(6).map_err(|e| ApiError::internal(format!("randomness: {e}")))?;
    Ok(format!("sb_{hex}"))
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> ApiError + '_ {
    move |e| ApiError::internal(format!("{what}: {e}"))
}

impl Manager {
    pub fn new(
        store: Store,
        data_dir: PathBuf,
        shim_exe: PathBuf,
        pool_size: usize,
        runtimes: Arc<Runtimes>,
    ) -> Arc<Self> {
        let default_pool = Pool {
            spec: PoolSpec {
                spec: pool_spec(),
                size: pool_size,
                warm_probe: None,
            },
            ready: Vec::new(),
            refilling: false,
        };
        Arc::new(Manager {
            store,
            data_dir,
            launcher: ShimLauncher::new(shim_exe),
            runtimes,
            node: crate::metrics::node_name(),
            done: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::from([(DEFAULT_POOL.to_string(), default_pool)])),
            lifecycle: std::sync::OnceLock::new(),
            execs: crate::limits::PerKey::new(crate::limits::EXECS_PER_SANDBOX),
            port_connections: crate::limits::PerKey::new(crate::limits::PORT_CONNECTIONS_PER_SANDBOX),
            transitions: crate::limits::PerKey::new(1),
        })
    }

    /// The isolation lanes this machine offers.
    pub fn runtimes(&self) -> &Runtimes {
        &self.runtimes
    }

    /// Sets the lifecycle hooks (once, before sandboxes are created or reconciled).
    pub fn set_lifecycle(&self, hooks: Arc<dyn Lifecycle>) {
        let _ = self.lifecycle.set(hooks);
    }

    /// The host directory mounted at [`GATEWAY_MOUNT`] in sandbox `id`: the gateway binds its socket here
    /// once the sandbox belongs to a tenant.
    pub fn gateway_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("gateway").join(id)
    }

    /// The `tartarus` binary the shims run (also mounted into template sandboxes as their python launcher).
    pub fn shim_exe(&self) -> &Path {
        self.launcher.exe()
    }

    /// Creates `DIR/sandboxes/<new id>/spec.json` and the sandbox's gateway directory, which the spec
    /// mounts read-only at [`GATEWAY_MOUNT`] on a lane that takes bind mounts (a microVM's guest cannot
    /// reach a host socket that way: its sandboxes have no gateway yet, docs/microvm.md). Returns the spec
    /// as requested (without that mount).
    async fn prepare_dir(
        &self,
        spec: &SandboxSpec,
        lane: LaneName,
    ) -> Result<(String, PathBuf, String), ApiError> {
        use std::os::unix::fs::PermissionsExt;
        let id = new_sandbox_id()?;
        let dir = self.data_dir.join("sandboxes").join(&id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_err("creating the sandbox directory"))?;
        // Traversable by the sandbox's unprivileged ids (which open it as a mount source), not listable;
        // its parent is made so once, by `open_state`.
        let gateway = self.gateway_dir(&id);
        tokio::fs::create_dir(&gateway)
            .await
            .map_err(io_err("creating the gateway directory"))?;
        tokio::fs::set_permissions(&gateway, std::fs::Permissions::from_mode(0o711))
            .await
            .map_err(io_err("creating the gateway directory"))?;
        let spec_json = serde_json::to_string(spec).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut started = spec.clone();
        if lane.capabilities().bind_mounts {
            started.mounts.push(tartarus_runtime::BindMount {
                source: gateway,
                target: PathBuf::from(GATEWAY_MOUNT),
                writable: false,
            });
        }
        let started_json = serde_json::to_string(&started).map_err(|e| ApiError::internal(e.to_string()))?;
        tokio::fs::write(SandboxDir::new(&dir).spec(), &started_json)
            .await
            .map_err(io_err("writing the spec"))?;
        Ok((id, dir, spec_json))
    }

    /// Starts a sandbox on the lane `runtime` chose and returns its record once it runs. A request the
    /// warm pool can serve (the process lane; no main command, limits, timeout, rootfs or host network)
    /// takes a prepared sandbox instead.
    pub async fn create(
        self: &Arc<Self>,
        tenant: &str,
        spec: SandboxSpec,
        labels: std::collections::BTreeMap<String, String>,
        template: Option<&str>,
        pool_key: Option<&str>,
        runtime: &tartarus_policy::RuntimeDecision,
    ) -> Result<SandboxRecord, ApiError> {
        let started = std::time::Instant::now();
        let pool_key = match pool_key {
            // Warm pools hold process-lane sandboxes.
            _ if runtime.runtime != LaneName::Process => None,
            Some(key) => Some(key),
            None if template.is_none() && poolable(&spec) => Some(DEFAULT_POOL),
            None => None,
        };
        let pooled = pool_key.and_then(|key| self.take_pooled(key));
        let template_label = crate::metrics::template_label(template).to_string();
        // A sandbox started for this request has its record already; a pooled one gets it now.
        let (id, dir, mut child, pid, inserted) = match pooled {
            Some(p) => (p.id, p.dir, p.child, p.pid, false),
            None => {
                let (id, dir, spec_json) = self.prepare_dir(&spec, runtime.runtime).await?;
                let mut record = new_record(&id, tenant, &dir, spec_json, labels.clone());
                record.template = template.map(str::to_string);
                record.runtime = runtime.runtime.to_string();
                record.runtime_reason = Some(runtime.reason.clone());
                self.store.insert_sandbox(&record).await?;
                match self
                    .launcher
                    .launch(&SandboxDir::new(&dir), runtime.runtime)
                    .await
                {
                    Ok(shim) => (id, dir, shim.child, shim.pid, true),
                    Err(e) => {
                        let message = tartarus_runtime::error_chain(&e);
                        let finish = Finish {
                            status: SandboxStatus::Failed,
                            exit_code: e.exit_code().map(i64::from),
                            reason: &message,
                        };
                        self.store.finish_sandbox(&id, &finish).await?;
                        // A dead letter: what was asked for and why it did not start, for operators.
                        let details = serde_json::to_string(&spec).ok();
                        let dead_letter = NewEvent {
                            category: "dead_letter",
                            kind: "start.failed",
                            sandbox: Some(&id),
                            tenant: Some(tenant),
                            message: &format!("sandbox {id} did not start: {message}"),
                            details: details.as_deref(),
                        };
                        match self.store.record_event(&dead_letter).await {
                            Ok(_) => crate::metrics::event_recorded(&dead_letter),
                            Err(e) => {
                                tracing::error!(sandbox = %id, "recording a dead letter failed: {}", tartarus_runtime::error_chain(&e))
                            }
                        }
                        metrics::counter!(crate::metrics::TOTAL.name, "template" => template_label, "status" => "failed", "lane" => runtime.runtime.as_str())
                            .increment(1);
                        let _ = tokio::fs::remove_dir_all(&dir).await;
                        let _ = tokio::fs::remove_dir_all(self.gateway_dir(&id)).await;
                        return Err(start_error(&id, &e, message));
                    }
                }
            }
        };
        let spec_json = serde_json::to_string(&spec).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut record = new_record(&id, tenant, &dir, spec_json, labels);
        record.template = template.map(str::to_string);
        record.runtime = runtime.runtime.to_string();
        record.runtime_reason = Some(runtime.reason.clone());
        if !inserted {
            self.store.insert_sandbox(&record).await?;
        }
        self.store.mark_running(&id, pid).await?;
        tracing::info!(sandbox = %id, tenant, lane = runtime.runtime.as_str(), node = %self.node, warm = !inserted, "sandbox running");
        metrics::histogram!(crate::metrics::LAUNCH_DURATION.name, "template" => template_label, "node" => self.node.clone(), "lane" => runtime.runtime.as_str())
            .record(started.elapsed().as_secs_f64());
        self.watch(id.clone(), dir, runtime.runtime, async move {
            let _ = child.wait().await;
        })?;
        if let Some(key) = pool_key {
            self.refill(key);
        }
        record.status = SandboxStatus::Running;
        record.shim_pid = Some(pid);
        if let Some(hooks) = self.lifecycle.get() {
            hooks.started(&record, false).await;
        }
        Ok(record)
    }

    /// Records the outcome the shim left behind (or `lost` with `missing` when there is none).
    async fn finalize(&self, id: &str, dir: &Path, lane: LaneName, missing: &str) {
        let sandbox_dir = SandboxDir::new(dir);
        let result = sandbox_dir.read_result().await;
        if let Ok(Some(r)) = &result {
            if r.reason == EndReason::Hibernated {
                let _ = tokio::fs::remove_file(sandbox_dir.socket()).await;
                match self.record_hibernation(id, lane, r.snapshot.clone()).await {
                    Ok(()) => {
                        if let Ok(mut done) = self.done.lock() {
                            done.remove(id);
                        }
                        return;
                    }
                    Err(e) => tracing::error!(sandbox = id, "recording a pause to disk failed: {e}"),
                }
            }
        }
        // A sandbox paused to disk has not ended: its usage goes on after the resume.
        crate::usage::finish(&self.store, id, result.as_ref().ok().and_then(Option::as_ref)).await;
        let outcome = match result {
            Ok(Some(r)) => {
                let status = match r.reason {
                    EndReason::Exited => SandboxStatus::Exited,
                    _ => SandboxStatus::Killed,
                };
                (
                    status,
                    Some(i64::from(r.exit_code)),
                    r.reason.as_str().to_string(),
                )
            }
            Ok(None) => (SandboxStatus::Lost, None, missing.to_string()),
            Err(e) => {
                let cause = tartarus_runtime::error_chain(&e);
                tracing::error!(sandbox = id, "{cause}");
                (SandboxStatus::Lost, None, format!("{missing}: {cause}"))
            }
        };
        let finish = Finish {
            status: outcome.0,
            exit_code: outcome.1,
            reason: &outcome.2,
        };
        let record = self.store.sandbox(id, None).await.ok().flatten();
        let template = crate::metrics::template_label(record.as_ref().and_then(|r| r.template.as_deref()));
        let tenant = record.as_ref().map_or("", |r| r.tenant.as_str());
        tracing::info!(sandbox = id, tenant, lane = lane.as_str(), node = %self.node, status = outcome.0.as_str(), reason = %outcome.2, "sandbox ended");
        metrics::counter!(crate::metrics::TOTAL.name, "template" => template, "status" => outcome.0.as_str(), "lane" => lane.as_str())
            .increment(1);
        if let Err(e) = self.store.finish_sandbox(id, &finish).await {
            tracing::error!(
                sandbox = id,
                "recording the outcome failed: {}",
                tartarus_runtime::error_chain(&e)
            );
        }
        let enforced = match outcome.2.as_str() {
            "timeout" => Some((
                "enforcement",
                "timeout.kill",
                "reached its timeout; the whole sandbox was killed",
            )),
            "oom" => Some((
                "enforcement",
                "resources.oom",
                "ran out of memory; the kernel killed it",
            )),
            _ if matches!(outcome.0, SandboxStatus::Lost) => Some(("lifecycle", "sandbox.lost", missing)),
            _ => None,
        };
        if let Some((category, kind, message)) = enforced {
            let tenant = record.map(|r| r.tenant);
            let event = NewEvent {
                category,
                kind,
                sandbox: Some(id),
                tenant: tenant.as_deref(),
                message: &format!("sandbox {id} {message}"),
                details: None,
            };
            match self.store.record_event(&event).await {
                Ok(_) => crate::metrics::event_recorded(&event),
                Err(e) => tracing::error!(
                    sandbox = id,
                    "recording an event failed: {}",
                    tartarus_runtime::error_chain(&e)
                ),
            }
        }
        let _ = tokio::fs::remove_file(sandbox_dir.socket()).await;
        if let Some(hooks) = self.lifecycle.get() {
            hooks.ended(id).await;
        }
        let _ = tokio::fs::remove_dir_all(self.gateway_dir(id)).await;
        if let Ok(mut done) = self.done.lock() {
            done.remove(id);
        }
    }

    /// The client of a local sandbox's shim.
    pub fn shim(&self, record: &SandboxRecord) -> ShimClient {
        ShimClient::new(&SandboxDir::new(&record.dir))
    }

    /// Starts a streaming exec; returns its events after `started`.
    pub async fn exec_stream(
        &self,
        record: &SandboxRecord,
        request: ExecRequest,
    ) -> Result<ExecEvents, ApiError> {
        self.shim(record)
            .exec_stream(request)
            .await
            .map_err(|e| call_error(&record.id, e))
    }

    /// Pauses (freezes) or resumes a running sandbox; a resume of a sandbox paused to disk restores it.
    pub async fn set_paused(self: &Arc<Self>, record: &SandboxRecord, paused: bool) -> Result<(), ApiError> {
        if record.hibernated_to.is_some() {
            return match paused {
                true => Ok(()),
                false => self.resume_from_disk(record).await,
            };
        }
        let shim = self.shim(record);
        let result = match paused {
            true => shim.pause().await,
            false => shim.resume().await,
        };
        result.map_err(|e| call_error(&record.id, e))?;
        self.store.set_paused(&record.id, paused).await?;
        Ok(())
    }

    pub async fn exec(
        &self,
        record: &SandboxRecord,
        request: ExecRequest,
    ) -> Result<tartarus_shim::protocol::ExecOutput, ApiError> {
        self.shim(record)
            .exec(request)
            .await
            .map_err(|e| call_error(&record.id, e))
    }

    /// Resolves to true once a live sandbox's outcome is recorded (`None` when it is not live).
    pub fn done(&self, id: &str) -> Option<watch::Receiver<bool>> {
        self.done.lock().ok().and_then(|done| done.get(id).cloned())
    }

    /// Waits up to `limit` for a live sandbox's outcome to be recorded.
    pub async fn wait(&self, id: &str, limit: Duration) {
        let waiter = self.done.lock().ok().and_then(|done| done.get(id).cloned());
        if let Some(mut rx) = waiter {
            let _ = tokio::time::timeout(limit, rx.wait_for(|done| *done)).await;
        }
    }

    /// Kills a running sandbox and waits until its outcome is recorded.
    pub async fn kill(&self, record: &SandboxRecord) -> Result<(), ApiError> {
        self.stop(record, None).await
    }

    /// Stops a running sandbox — with `grace`, SIGTERM first and SIGKILL once it is over, else SIGKILL at
    /// once — and waits until its outcome is recorded.
    pub async fn stop(&self, record: &SandboxRecord, grace: Option<Duration>) -> Result<(), ApiError> {
        if record.hibernated_to.is_some() {
            return self.stop_hibernated(record).await;
        }
        let waiter = self
            .done
            .lock()
            .map_err(|_| ApiError::internal("lock poisoned"))?
            .get(&record.id)
            .cloned();
        let shim = self.shim(record);
        let stopped = match grace {
            Some(grace) => shim.terminate(grace).await,
            None => shim.kill().await,
        };
        let mut waiter = waiter;
        let ended = |rx: &mut Option<watch::Receiver<bool>>| {
            let rx = rx.take();
            async move {
                match rx {
                    Some(mut rx) => tokio::time::timeout(STOP_WAIT, rx.wait_for(|done| *done))
                        .await
                        .is_ok_and(|r| r.is_ok()),
                    None => false,
                }
            }
        };
        match stopped {
            Ok(()) => {
                ended(&mut waiter).await;
                Ok(())
            }
            // Another stop got there first: the shim went away under this call (not there, the
            // connection cut, no answer). This stop's wish is being carried out, so it waits for the
            // same end rather than failing — kills race when a client kills a sandbox while another of
            // its requests is cut off by that kill.
            Err(e @ (CallError::NotRunning | CallError::Io { .. } | CallError::Protocol { .. })) => {
                match ended(&mut waiter).await {
                    true => Ok(()),
                    false => Err(call_error(&record.id, e)),
                }
            }
            Err(e) => Err(call_error(&record.id, e)),
        }
    }

    /// Records the sandbox's outcome once `exited` (its shim's exit) completes, and lets `wait`/`kill`
    /// callers know.
    fn watch(
        self: &Arc<Self>,
        id: String,
        dir: PathBuf,
        lane: LaneName,
        exited: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ApiError> {
        let (tx, rx) = watch::channel(false);
        self.done
            .lock()
            .map_err(|_| ApiError::internal("lock poisoned"))?
            .insert(id.clone(), rx);
        let manager = Arc::clone(self);
        tokio::spawn(async move {
            exited.await;
            manager
                .finalize(&id, &dir, lane, "shim exited without a result")
                .await;
            let _ = tx.send(true);
        });
        Ok(())
    }
}

/// How long a stop waits for the sandbox's end to be recorded once its shim is gone.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// A sandbox that did not start, as the API answers it: the request's fault (its spec or command) is 422,
/// the host's is 503 with the cause.
fn start_error(id: &str, e: &shim_client::LaunchError, message: String) -> ApiError {
    match e.is_spec_fault() {
        Some(StartFailureKind::CommandNotFound) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "command_not_found", message)
        }
        Some(StartFailureKind::NotExecutable) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "not_executable", message)
        }
        Some(_) => ApiError::invalid(message),
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("sandbox {id} did not start: {message}"),
        ),
    }
}

/// A failed shim call, as the API answers it.
pub fn call_error(id: &str, e: CallError) -> ApiError {
    let message = tartarus_runtime::error_chain(&e);
    let Some(code) = e.code() else {
        return match e {
            CallError::NotRunning => ApiError::conflict(format!("sandbox {id} is not running")),
            CallError::Timeout { .. } => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "shim_timeout",
                format!("sandbox {id}: {message}"),
            ),
            _ => ApiError::internal(format!("sandbox {id}: {message}")),
        };
    };
    match code {
        ErrorCode::Paused => ApiError::conflict(message),
        ErrorCode::CommandNotFound => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "command_not_found", message)
        }
        ErrorCode::NotExecutable => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "not_executable", message)
        }
        ErrorCode::InvalidRequest | ErrorCode::WrongType => ApiError::invalid(message),
        ErrorCode::NotFound => ApiError::not_found(message),
        ErrorCode::Forbidden => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the sandbox refused: {message}"),
        ),
        ErrorCode::TooLarge => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message),
        ErrorCode::Unsupported | ErrorCode::Unavailable => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
        ErrorCode::ExecFailed => ApiError::internal(format!("sandbox {id}: {message}")),
        ErrorCode::PortClosed => ApiError::new(StatusCode::BAD_GATEWAY, "port_closed", message),
        ErrorCode::Refused => ApiError::conflict(message),
    }
}

/// The spec a sandbox record holds, read as a record (fields a newer server wrote are ignored and logged,
/// see `SandboxSpec::from_stored_json`). An unreadable one is an error, logged here with its cause, so each
/// caller can fail safe (count it at the maximum, redact everything, leave it out) instead of reading
/// defaults.
pub fn stored_spec(record: &SandboxRecord) -> Result<SandboxSpec, ApiError> {
    match SandboxSpec::from_stored_json(&record.spec) {
        Ok((spec, ignored)) => {
            if !ignored.is_empty() {
                tracing::warn!(sandbox = %record.id, ?ignored, "the stored spec has fields this server does not know");
            }
            Ok(spec)
        }
        Err(e) => {
            tracing::error!(sandbox = %record.id, tenant = %record.tenant, "the stored spec is unreadable: {}", tartarus_runtime::error_chain(&e));
            Err(ApiError::internal(format!(
                "the stored spec of sandbox {} is unreadable",
                record.id
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use tartarus_shim::protocol::ShimError;

    use super::*;

    fn refused(code: ErrorCode) -> CallError {
        CallError::Refused(ShimError {
            code,
            message: "m".into(),
        })
    }

    #[test]
    fn shim_refusals_map_to_client_errors_and_host_failures_to_5xx() {
        let cases = [
            (refused(ErrorCode::Paused), StatusCode::CONFLICT),
            (
                refused(ErrorCode::CommandNotFound),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                refused(ErrorCode::NotExecutable),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                refused(ErrorCode::InvalidRequest),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (refused(ErrorCode::WrongType), StatusCode::UNPROCESSABLE_ENTITY),
            (refused(ErrorCode::NotFound), StatusCode::NOT_FOUND),
            (refused(ErrorCode::Forbidden), StatusCode::FORBIDDEN),
            (refused(ErrorCode::TooLarge), StatusCode::PAYLOAD_TOO_LARGE),
            (refused(ErrorCode::Unsupported), StatusCode::SERVICE_UNAVAILABLE),
            (refused(ErrorCode::Unavailable), StatusCode::SERVICE_UNAVAILABLE),
            (CallError::NotRunning, StatusCode::CONFLICT),
            (
                CallError::Timeout {
                    op: "status",
                    deadline: Duration::from_secs(1),
                },
                StatusCode::GATEWAY_TIMEOUT,
            ),
        ];
        for (error, status) in cases {
            let shown = format!("{error:?}");
            assert_eq!(call_error("sb_1", error).status, status, "{shown}");
        }
    }

    #[test]
    fn an_unreadable_stored_spec_is_an_error_not_a_default() {
        let mut record = new_record(
            "sb_1",
            "alpha",
            Path::new("/x"),
            "{\"cmd\":".into(),
            Default::default(),
        );
        assert!(stored_spec(&record).is_err());
        record.spec = serde_json::to_string(&SandboxSpec::default()).unwrap();
        assert!(stored_spec(&record).is_ok());
        // A field a newer server wrote does not make the record unreadable.
        record.spec = record.spec.replacen('{', "{\"from_the_future\":1,", 1);
        assert!(stored_spec(&record).is_ok());
    }
}
