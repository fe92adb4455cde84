//! Running sandboxes through shims: one `tartarus shim` process per sandbox, in its own process group so
//! it survives a server restart. The server talks to a shim over its unix socket, watches it exit, and
//! records the outcome the shim leaves in `result.json`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use tartarus_runtime::SandboxSpec;
use tartarus_store::{now_ms, Finish, NewEvent, SandboxRecord, SandboxStatus, Store};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;

use crate::api::ExecResult;
use crate::error::ApiError;

/// How long a shim may take to report `ready`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Manager {
    store: Store,
    data_dir: PathBuf,
    shim_exe: PathBuf,
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
            shim_exe,
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
        &self.shim_exe
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

    fn socket(dir: &Path) -> PathBuf {
        dir.join("shim.sock")
    }

    /// Starts a shim for the spec in `dir` and waits for `ready`; on failure returns the shim's exit code
    /// and its last log line.
    async fn start_shim(&self, dir: &Path) -> Result<(tokio::process::Child, i64), (Option<i32>, String)> {
        let fail = |e: std::io::Error| (None, format!("starting the shim: {e}"));
        let shim_log = std::fs::File::create(dir.join("shim.log")).map_err(fail)?;
        let mut child = tokio::process::Command::new(&self.shim_exe)
            .arg("shim")
            .arg("--socket")
            .arg(Self::socket(dir))
            .arg("--spec")
            .arg(dir.join("spec.json"))
            .arg("--result")
            .arg(dir.join("result.json"))
            .arg("--log")
            .arg(dir.join("main.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(shim_log)
            // Its own process group: a Ctrl-C to the server must not reach sandboxes.
            .process_group(0)
            .spawn()
            .map_err(fail)?;
        let pid = child.id().unwrap_or(0) as i64;
        let stdout = child
            .stdout
            .take()
            .ok_or((None, "shim has no stdout".to_string()))?;
        let mut line = String::new();
        let ready = tokio::time::timeout(START_TIMEOUT, BufReader::new(stdout).read_line(&mut line)).await;
        if matches!(ready, Ok(Ok(n)) if n > 0 && line.starts_with("ready ")) {
            return Ok((child, pid));
        }
        let _ = child.start_kill();
        let status = child.wait().await.ok().and_then(|s| s.code());
        let log = tokio::fs::read_to_string(dir.join("shim.log"))
            .await
            .unwrap_or_default();
        let message = log
            .lines()
            .last()
            .unwrap_or("the sandbox did not start")
            .trim_start_matches("tartarus: ");
        Err((status, message.to_string()))
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
        tokio::fs::write(dir.join("spec.json"), &started_json)
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
                match self.start_shim(&dir).await {
                    Ok((child, pid)) => (id, dir, child, pid, true),
                    Err((status, message)) => {
                        let finish = Finish {
                            status: SandboxStatus::Failed,
                            exit_code: status.map(i64::from),
                            reason: &message,
                        };
                        self.store.finish_sandbox(&id, &finish).await?;
                        // A dead letter: what was asked for and why it did not start, for operators.
                        let details = serde_json::to_string(&spec).unwrap_or_default();
                        let dead_letter = NewEvent {
                            category: "dead_letter",
                            kind: "start.failed",
                            sandbox: Some(&id),
                            tenant: Some(tenant),
                            message: &format!("sandbox {id} did not start: {message}"),
                            details: Some(&details),
                        };
                        if let Err(e) = self.store.record_event(&dead_letter).await {
                            tracing::error!(sandbox = %id, "recording a dead letter failed: {e}");
                        }
                        metrics::counter!(crate::metrics::TOTAL, "template" => template_label, "status" => "failed")
                            .increment(1);
                        let _ = tokio::fs::remove_dir_all(&dir).await;
                        let _ = tokio::fs::remove_dir_all(self.gateway_dir(&id)).await;
                        return Err(match status {
                            Some(127) => {
                                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "command_not_found", message)
                            }
                            Some(126) => {
                                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "not_executable", message)
                            }
                            Some(125) => ApiError::invalid(message),
                            _ => ApiError::internal(format!("sandbox did not start: {message}")),
                        });
                    }
                }
            }
        };
        let mut record = new_record(
            &id,
            tenant,
            &dir,
            serde_json::to_string(&spec).unwrap_or_default(),
            labels,
        );
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
                let (mut child, pid) = match manager.start_shim(&dir).await {
                    Ok(started) => started,
                    Err((_, message)) => {
                        tracing::error!(pool = %key, "warm pool: a sandbox did not start: {message}");
                        let _ = tokio::fs::remove_dir_all(&dir).await;
                        let _ = tokio::fs::remove_dir_all(manager.gateway_dir(&id)).await;
                        break;
                    }
                };
                if let Some(probe) = &spec.warm_probe {
                    if let Err(message) = manager.probe(&id, &dir, &spec.spec, probe).await {
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
    async fn probe(
        &self,
        id: &str,
        dir: &Path,
        spec: &SandboxSpec,
        command: &[String],
    ) -> Result<(), String> {
        let record = new_record(id, "", dir, String::new(), Default::default());
        let request = json!({
            "op": "exec",
            "command": command,
            "env": spec.env,
            "workdir": null,
            "stdin": null,
            "timeout_ms": 600_000,
            "stream": false,
        });
        let result = self.exec(&record, request).await.map_err(|e| e.message)?;
        match result.exit_code {
            0 => Ok(()),
            code => Err(format!("probe exited with {code}: {}", result.stderr.trim())),
        }
    }

    /// Records the outcome the shim left behind (or `lost` with `missing` when there is none).
    async fn finalize(&self, id: &str, dir: &Path, missing: &str) {
        let result: Option<Value> = tokio::fs::read_to_string(dir.join("result.json"))
            .await
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok());
        let outcome = match &result {
            Some(r) => {
                let reason = r["reason"].as_str().unwrap_or("exited");
                let status = if reason == "exited" {
                    SandboxStatus::Exited
                } else {
                    SandboxStatus::Killed
                };
                (status, r["exit_code"].as_i64(), reason.to_string())
            }
            None => (SandboxStatus::Lost, None, missing.to_string()),
        };
        let finish = Finish {
            status: outcome.0,
            exit_code: outcome.1,
            reason: &outcome.2,
        };
        metrics::counter!(crate::metrics::TOTAL, "template" => "none", "status" => outcome.0.as_str())
            .increment(1);
        if let Err(e) = self.store.finish_sandbox(id, &finish).await {
            tracing::error!(sandbox = id, "recording the outcome failed: {e}");
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
        let _ = tokio::fs::remove_file(Self::socket(dir)).await;
        if let Some(hooks) = self.lifecycle.get() {
            hooks.ended(id).await;
        }
        let _ = tokio::fs::remove_dir_all(self.gateway_dir(id)).await;
        if let Ok(mut done) = self.done.lock() {
            done.remove(id);
        }
    }

    /// Connects to the sandbox's shim, sends `request`, and returns its first reply line with the
    /// connection (reader for further lines, writer kept open).
    async fn open(
        &self,
        record: &SandboxRecord,
        request: &Value,
    ) -> Result<(String, ShimConnection), ApiError> {
        let gone = || ApiError::conflict(format!("sandbox {} is not running", record.id));
        let stream = UnixStream::connect(Self::socket(Path::new(&record.dir)))
            .await
            .map_err(|_| gone())?;
        let (read, mut write) = stream.into_split();
        write
            .write_all(format!("{request}\n").as_bytes())
            .await
            .map_err(|_| gone())?;
        let mut lines = BufReader::new(read).lines();
        let first = lines.next_line().await.map_err(|_| gone())?.ok_or_else(gone)?;
        Ok((first, ShimConnection { lines, write }))
    }

    /// Sends one request to the sandbox's shim and returns its reply.
    pub async fn request(&self, record: &SandboxRecord, request: Value) -> Result<Value, ApiError> {
        let (line, _) = self.open(record, &request).await?;
        serde_json::from_str(&line).map_err(|e| ApiError::internal(format!("shim reply: {e}")))
    }

    /// Starts a streaming exec; returns the shim's reply lines after `{"started":true}`.
    pub async fn exec_stream(&self, record: &SandboxRecord, request: Value) -> Result<ExecStream, ApiError> {
        let (first, connection) = self.open(record, &request).await?;
        let reply: Value =
            serde_json::from_str(&first).map_err(|e| ApiError::internal(format!("shim reply: {e}")))?;
        if let Some(error) = reply.get("error") {
            return Err(exec_error(error));
        }
        if reply["started"] != true {
            return Err(ApiError::internal(format!(
                "unexpected shim reply to a streaming exec: {reply}"
            )));
        }
        Ok(ExecStream {
            lines: connection.lines,
            _write: connection.write,
        })
    }

    /// Pauses (freezes) or resumes a running sandbox.
    pub async fn set_paused(&self, record: &SandboxRecord, paused: bool) -> Result<(), ApiError> {
        let reply = self
            .request(record, json!({"op": if paused { "pause" } else { "resume" }}))
            .await?;
        if let Some(error) = reply.get("error") {
            let message = error["message"].as_str().unwrap_or("pause failed").to_string();
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                message,
            ));
        }
        self.store.set_paused(&record.id, paused).await?;
        Ok(())
    }

    pub async fn exec(&self, record: &SandboxRecord, request: Value) -> Result<ExecResult, ApiError> {
        let reply = self.request(record, request).await?;
        if let Some(error) = reply.get("error") {
            return Err(exec_error(error));
        }
        serde_json::from_value(reply).map_err(|e| ApiError::internal(format!("shim exec reply: {e}")))
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
        self.request(record, json!({"op": "kill"})).await?;
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
                    (Some(_), SandboxStatus::Running) => {
                        self.request(&record, json!({"op": "status"})).await.ok()
                    }
                    _ => None,
                };
                let alive = state.is_some();
                if let Some(state) = &state {
                    self.store
                        .set_paused(&record.id, state["state"] == "paused")
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
            if let Ok(stream) = UnixStream::connect(Self::socket(&dir)).await {
                let (read, mut write) = stream.into_split();
                if write.write_all(b"{\"op\":\"kill\"}\n").await.is_ok() {
                    let mut line = String::new();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        BufReader::new(read).read_line(&mut line),
                    )
                    .await;
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

/// Maps a shim's exec error to the API's.
fn exec_error(error: &Value) -> ApiError {
    let message = error["message"].as_str().unwrap_or("exec failed").to_string();
    match error["code"].as_str() {
        Some("paused") => ApiError::conflict(message),
        Some("command_not_found") => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "command_not_found", message)
        }
        Some("not_executable") => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "not_executable", message),
        Some("invalid_request") => ApiError::invalid(message),
        _ => ApiError::internal(message),
    }
}

/// An open connection to a shim.
struct ShimConnection {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

/// The shim's output lines of a streaming exec. Dropping it closes the connection, which makes the shim
/// kill the command; the write half is kept because shutting it down early would look like that too.
pub struct ExecStream {
    pub lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    _write: tokio::net::unix::OwnedWriteHalf,
}
