//! Running sandboxes through shims: one `tartarus shim` process per sandbox, in its own process group so
//! it survives a server restart. The server talks to a shim over its unix socket, watches it exit, and
//! records the outcome the shim leaves in `result.json`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use futures_util::future::BoxFuture;
use tartarus_runtime::SandboxSpec;
use tartarus_shim::protocol::{EndReason, ErrorCode, ExecRequest, RunState, StartFailureKind};
use tartarus_store::{now_ms, Finish, NewEvent, SandboxRecord, SandboxStatus, Store};
use tokio::sync::watch;

pub use self::shim_client::{CallError, ExecEvents, SandboxDir, ShimClient, ShimLauncher};
use crate::error::ApiError;

mod request;
mod shim_client;

pub(crate) use self::request::spec_from;

pub struct Manager {
    store: Store,
    data_dir: PathBuf,
    launcher: ShimLauncher,
    /// The `node` metrics label.
    node: String,
    /// Per live sandbox: becomes true once its outcome is recorded.
    done: Mutex<HashMap<String, watch::Receiver<bool>>>,
    /// Warm pools by key ([`DEFAULT_POOL`] or a template id): prepared, unclaimed sandboxes (not in the
    /// store until claimed).
    pools: Mutex<HashMap<String, Pool>>,
    /// Told when a sandbox is handed to a tenant (created or re-adopted) and when it has ended.
    lifecycle: std::sync::OnceLock<Arc<dyn Lifecycle>>,
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

/// What a warm pool holds and how many.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub spec: SandboxSpec,
    pub size: usize,
    /// An exec that must succeed before a started sandbox counts as warm (the zygote's readiness probe).
    pub warm_probe: Option<Vec<String>>,
}

struct Pool {
    spec: PoolSpec,
    ready: Vec<Pooled>,
    refilling: bool,
}

/// A prepared sandbox waiting in the warm pool.
struct Pooled {
    id: String,
    dir: PathBuf,
    child: tokio::process::Child,
    pid: i64,
}

/// The spec of a pooled sandbox: the defaults of a service sandbox.
fn pool_spec() -> SandboxSpec {
    SandboxSpec {
        service: true,
        ..SandboxSpec::default()
    }
}

/// Whether a pooled sandbox satisfies `spec`: the sandbox's env is applied by the server to every exec,
/// so only what is fixed at start must match the pool's defaults.
fn poolable(spec: &SandboxSpec) -> bool {
    // Everything but the environment must be the pool's: any other field (limits, seccomp additions, a
    // root, a user) is fixed when the sandbox starts.
    let without_env = SandboxSpec {
        env: Vec::new(),
        ..spec.clone()
    };
    without_env == pool_spec()
}

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
    }
}

fn random_id() -> Result<String, ApiError> {
    let hex = tartarus_hostsys::random_hex(6).map_err(|e| ApiError::internal(format!("randomness: {e}")))?;
    Ok(format!("sb_{hex}"))
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> ApiError + '_ {
    move |e| ApiError::internal(format!("{what}: {e}"))
}

impl Manager {
    pub fn new(store: Store, data_dir: PathBuf, shim_exe: PathBuf, pool_size: usize) -> Arc<Self> {
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
            node: crate::metrics::node_name(),
            done: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::from([(DEFAULT_POOL.to_string(), default_pool)])),
            lifecycle: std::sync::OnceLock::new(),
        })
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

    /// The `tartarus` binary the shims run (also mounted into template sandboxes as their python shim).
    pub fn shim_exe(&self) -> &Path {
        self.launcher.exe()
    }

    /// Sets up (or replaces) a warm pool and starts filling it. Sandboxes of a replaced pool whose spec
    /// changed are killed: they would not match new requests.
    pub fn register_pool(self: &Arc<Self>, key: &str, spec: PoolSpec) {
        let stale = {
            let Ok(mut pools) = self.pools.lock() else {
                return;
            };
            match pools.get_mut(key) {
                Some(pool) if pool.spec.spec == spec.spec && pool.spec.warm_probe == spec.warm_probe => {
                    pool.spec.size = spec.size;
                    Vec::new()
                }
                Some(pool) => {
                    pool.spec = spec;
                    std::mem::take(&mut pool.ready)
                }
                None => {
                    pools.insert(
                        key.to_string(),
                        Pool {
                            spec,
                            ready: Vec::new(),
                            refilling: false,
                        },
                    );
                    Vec::new()
                }
            }
        };
        for mut pooled in stale {
            let _ = pooled.child.start_kill();
        }
        self.refill(key);
    }

    /// Drops a pool and kills its unclaimed sandboxes.
    pub fn remove_pool(&self, key: &str) {
        let removed = self.pools.lock().ok().and_then(|mut pools| pools.remove(key));
        for mut pooled in removed.map(|p| p.ready).unwrap_or_default() {
            let _ = pooled.child.start_kill();
        }
    }

    /// How many warm sandboxes a pool holds now.
    pub fn pool_ready(&self, key: &str) -> usize {
        self.pools
            .lock()
            .ok()
            .and_then(|pools| pools.get(key).map(|p| p.ready.len()))
            .unwrap_or(0)
    }

    /// Creates `DIR/sandboxes/<new id>/spec.json` and the sandbox's gateway directory, which the spec
    /// mounts read-only at [`GATEWAY_MOUNT`]. Returns the spec as requested (without that mount).
    async fn prepare_dir(&self, spec: &SandboxSpec) -> Result<(String, PathBuf, String), ApiError> {
        use std::os::unix::fs::PermissionsExt;
        let id = random_id()?;
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
        started.mounts.push(tartarus_runtime::BindMount {
            source: gateway,
            target: PathBuf::from(GATEWAY_MOUNT),
            writable: false,
        });
        let started_json = serde_json::to_string(&started).map_err(|e| ApiError::internal(e.to_string()))?;
        tokio::fs::write(SandboxDir::new(&dir).spec(), &started_json)
            .await
            .map_err(io_err("writing the spec"))?;
        Ok((id, dir, spec_json))
    }

    /// Starts a sandbox and returns its record once it runs. A request the warm pool can serve (no main
    /// command, limits, timeout, rootfs or host network) takes a prepared sandbox instead.
    pub async fn create(
        self: &Arc<Self>,
        tenant: &str,
        spec: SandboxSpec,
        labels: std::collections::BTreeMap<String, String>,
        template: Option<&str>,
        pool_key: Option<&str>,
    ) -> Result<SandboxRecord, ApiError> {
        let started = std::time::Instant::now();
        let pool_key = match pool_key {
            Some(key) => Some(key),
            None if template.is_none() && poolable(&spec) => Some(DEFAULT_POOL),
            None => None,
        };
        let pooled = pool_key.and_then(|key| self.take_pooled(key));
        let template_label = template.unwrap_or("none").to_string();
        // A sandbox started for this request has its record already; a pooled one gets it now.
        let (id, dir, mut child, pid, inserted) = match pooled {
            Some(p) => (p.id, p.dir, p.child, p.pid, false),
            None => {
                let (id, dir, spec_json) = self.prepare_dir(&spec).await?;
                let mut record = new_record(&id, tenant, &dir, spec_json, labels.clone());
                record.template = template.map(str::to_string);
                self.store.insert_sandbox(&record).await?;
                match self.launcher.launch(&SandboxDir::new(&dir)).await {
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
                        if let Err(e) = self.store.record_event(&dead_letter).await {
                            tracing::error!(sandbox = %id, "recording a dead letter failed: {}", tartarus_runtime::error_chain(&e));
                        }
                        metrics::counter!(crate::metrics::TOTAL, "template" => template_label, "status" => "failed")
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
        if !inserted {
            self.store.insert_sandbox(&record).await?;
        }
        self.store.mark_running(&id, pid).await?;
        metrics::histogram!(crate::metrics::LAUNCH_DURATION, "template" => template_label, "node" => self.node.clone())
            .record(started.elapsed().as_secs_f64());
        self.watch(id.clone(), dir, async move {
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

    /// A live prepared sandbox from the pool `key`, if any.
    fn take_pooled(&self, key: &str) -> Option<Pooled> {
        let mut pools = self.pools.lock().ok()?;
        let pool = pools.get_mut(key)?;
        while let Some(mut p) = pool.ready.pop() {
            if matches!(p.child.try_wait(), Ok(None)) {
                return Some(p);
            }
        }
        None
    }

    /// Tops the warm pool `key` up to its size in the background (one filler per pool at a time).
    pub fn refill(self: &Arc<Self>, key: &str) {
        let spec = {
            let Ok(mut pools) = self.pools.lock() else {
                return;
            };
            let Some(pool) = pools.get_mut(key) else {
                return;
            };
            if pool.spec.size == 0 || pool.refilling {
                return;
            }
            pool.refilling = true;
            pool.spec.clone()
        };
        let manager = Arc::clone(self);
        let key = key.to_string();
        tokio::spawn(async move {
            loop {
                let have = manager
                    .pools
                    .lock()
                    .ok()
                    .and_then(|p| p.get(&key).map(|p| p.ready.len()))
                    .unwrap_or(usize::MAX);
                if have >= spec.size {
                    break;
                }
                let Ok((id, dir, _)) = manager.prepare_dir(&spec.spec).await else {
                    break;
                };
                let (mut child, pid) = match manager.launcher.launch(&SandboxDir::new(&dir)).await {
                    Ok(shim) => (shim.child, shim.pid),
                    Err(e) => {
                        tracing::error!(pool = %key, "warm pool: a sandbox did not start: {}", tartarus_runtime::error_chain(&e));
                        let _ = tokio::fs::remove_dir_all(&dir).await;
                        let _ = tokio::fs::remove_dir_all(manager.gateway_dir(&id)).await;
                        break;
                    }
                };
                if let Some(probe) = &spec.warm_probe {
                    if let Err(message) = manager.probe(&dir, &spec.spec, probe).await {
                        tracing::error!(pool = %key, "warm pool: a sandbox did not warm up: {message}");
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        let _ = tokio::fs::remove_dir_all(&dir).await;
                        let _ = tokio::fs::remove_dir_all(manager.gateway_dir(&id)).await;
                        break;
                    }
                }
                let mut stale = None;
                if let Ok(mut pools) = manager.pools.lock() {
                    match pools.get_mut(&key) {
                        // The pool was replaced or removed meanwhile: this sandbox fits no request.
                        Some(pool) if pool.spec.spec == spec.spec => {
                            pool.ready.push(Pooled { id, dir, child, pid })
                        }
                        _ => stale = Some(child),
                    }
                }
                if let Some(mut child) = stale {
                    let _ = child.start_kill();
                    break;
                }
            }
            if let Ok(mut pools) = manager.pools.lock() {
                if let Some(pool) = pools.get_mut(&key) {
                    pool.refilling = false;
                }
            }
        });
    }

    /// Runs a pool's readiness probe in a just-started sandbox.
    async fn probe(&self, dir: &Path, spec: &SandboxSpec, command: &[String]) -> Result<(), String> {
        let request = ExecRequest {
            command: command.to_vec(),
            env: spec.env.clone(),
            timeout_ms: Some(600_000),
            ..ExecRequest::default()
        };
        let client = ShimClient::new(&SandboxDir::new(dir));
        let result = client
            .exec(request)
            .await
            .map_err(|e| tartarus_runtime::error_chain(&e))?;
        match result.exit.exit_code {
            0 => Ok(()),
            code => Err(format!("probe exited with {code}: {}", result.stderr.trim())),
        }
    }

    /// Records the outcome the shim left behind (or `lost` with `missing` when there is none).
    async fn finalize(&self, id: &str, dir: &Path, missing: &str) {
        let sandbox_dir = SandboxDir::new(dir);
        let outcome = match sandbox_dir.read_result().await {
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
        metrics::counter!(crate::metrics::TOTAL, "template" => "none", "status" => outcome.0.as_str())
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
            let tenant = self
                .store
                .sandbox(id, None)
                .await
                .ok()
                .flatten()
                .map(|r| r.tenant);
            let event = NewEvent {
                category,
                kind,
                sandbox: Some(id),
                tenant: tenant.as_deref(),
                message: &format!("sandbox {id} {message}"),
                details: None,
            };
            if let Err(e) = self.store.record_event(&event).await {
                tracing::error!(sandbox = id, "recording an event failed: {e}");
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

    /// Pauses (freezes) or resumes a running sandbox.
    pub async fn set_paused(&self, record: &SandboxRecord, paused: bool) -> Result<(), ApiError> {
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
        let waiter = self
            .done
            .lock()
            .map_err(|_| ApiError::internal("lock poisoned"))?
            .get(&record.id)
            .cloned();
        self.shim(record)
            .kill()
            .await
            .map_err(|e| call_error(&record.id, e))?;
        if let Some(mut rx) = waiter {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|done| *done)).await;
        }
        Ok(())
    }

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

    /// Records the sandbox's outcome once `exited` (its shim's exit) completes, and lets `wait`/`kill`
    /// callers know.
    fn watch(
        self: &Arc<Self>,
        id: String,
        dir: PathBuf,
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
            manager.finalize(&id, &dir, "shim exited without a result").await;
            let _ = tx.send(true);
        });
        Ok(())
    }
}

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
    }
}

/// The spec a sandbox record holds. An unreadable one is an error, logged here with its cause, so each
/// caller can fail safe (count it at the maximum, redact everything, leave it out) instead of reading
/// defaults.
pub fn stored_spec(record: &SandboxRecord) -> Result<SandboxSpec, ApiError> {
    serde_json::from_str(&record.spec).map_err(|e| {
        tracing::error!(sandbox = %record.id, tenant = %record.tenant, "the stored spec is unreadable: {e}");
        ApiError::internal(format!("the stored spec of sandbox {} is unreadable", record.id))
    })
}
