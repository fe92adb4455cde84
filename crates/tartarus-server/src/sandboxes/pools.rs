//! Warm pools: sandboxes started ahead of requests, keyed by template (or the plain default pool), handed
//! out once each and refilled in the background.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tartarus_runtime::lanes::LaneName;
use tartarus_runtime::SandboxSpec;
use tartarus_shim::protocol::ExecRequest;

use super::*;

/// What a warm pool holds and how many.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub spec: SandboxSpec,
    pub size: usize,
    /// An exec that must succeed before a started sandbox counts as warm (the zygote's readiness probe).
    pub warm_probe: Option<Vec<String>>,
}

pub(super) struct Pool {
    pub(super) spec: PoolSpec,
    pub(super) ready: Vec<Pooled>,
    pub(super) refilling: bool,
}

/// A prepared sandbox waiting in the warm pool.
pub(super) struct Pooled {
    pub(super) id: String,
    pub(super) dir: PathBuf,
    pub(super) child: tokio::process::Child,
    pub(super) pid: i64,
}

/// The spec of a pooled sandbox: the defaults of a service sandbox, with the pids limit admission gives
/// every sandbox.
pub(super) fn pool_spec() -> SandboxSpec {
    let mut spec = SandboxSpec {
        service: true,
        ..SandboxSpec::default()
    };
    with_default_pids(&mut spec);
    spec
}

/// Gives `spec` the pids limit admission gives a request that asks for none (without a policy), so a
/// pooled sandbox matches the requests it is for.
pub(crate) fn with_default_pids(spec: &mut SandboxSpec) {
    spec.limits
        .pids
        .get_or_insert(u64::from(tartarus_policy::effective::DEFAULT_MAX_PIDS));
}

/// Whether a pooled sandbox satisfies `spec`: the sandbox's env is applied by the server to every exec,
/// so only what is fixed at start must match the pool's defaults.
pub(super) fn poolable(spec: &SandboxSpec) -> bool {
    // Everything but the environment must be the pool's: any other field (limits, seccomp additions, a
    // root, a user) is fixed when the sandbox starts.
    let without_env = SandboxSpec {
        env: Vec::new(),
        ..spec.clone()
    };
    without_env == pool_spec()
}

impl Manager {
    /// Sets up (or replaces) a warm pool and starts filling it. Sandboxes of a replaced pool whose spec
    /// changed are killed: they would not match new requests.
    pub fn register_pool(self: &Arc<Self>, key: &str, spec: PoolSpec) {
        let mut spec = spec;
        with_default_pids(&mut spec.spec);
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
        self.discard(stale);
        self.refill(key);
    }

    /// Drops a pool and ends its unclaimed sandboxes, removing their files.
    pub fn remove_pool(&self, key: &str) {
        let removed = self.pools.lock().ok().and_then(|mut pools| pools.remove(key));
        self.discard(removed.map(|p| p.ready).unwrap_or_default());
    }

    /// Ends unclaimed pooled sandboxes in the background: each shim is asked to kill its sandbox (so it
    /// removes its cgroups), then killed if it has not exited; then the sandbox's directory and gateway
    /// directory (and so its sockets) are removed. Nothing of a discarded pooled sandbox outlives this.
    fn discard(&self, pooled: Vec<Pooled>) {
        for mut p in pooled {
            let gateway = self.gateway_dir(&p.id);
            tokio::spawn(async move {
                let _ = ShimClient::new(&SandboxDir::new(&p.dir)).kill().await;
                if tokio::time::timeout(Duration::from_secs(5), p.child.wait())
                    .await
                    .is_err()
                {
                    let _ = p.child.start_kill();
                    let _ = p.child.wait().await;
                }
                let _ = tokio::fs::remove_dir_all(&p.dir).await;
                let _ = tokio::fs::remove_dir_all(&gateway).await;
            });
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

    /// Warm sandboxes ready and wanted, summed over the plain pool (`none`) and over template pools
    /// (`template`), as the pool metrics label them.
    pub fn pool_totals(&self) -> [(&'static str, usize, usize); 2] {
        let mut totals = [("none", 0, 0), ("template", 0, 0)];
        if let Ok(pools) = self.pools.lock() {
            for (key, pool) in pools.iter() {
                let total = &mut totals[usize::from(key != DEFAULT_POOL)];
                total.1 += pool.ready.len();
                total.2 += pool.spec.size;
            }
        }
        totals
    }

    /// A live prepared sandbox from the pool `key`, if any; a pool that should hold some and has none
    /// counts a miss.
    pub(super) fn take_pooled(&self, key: &str) -> Option<Pooled> {
        let mut pools = self.pools.lock().ok()?;
        let pool = pools.get_mut(key)?;
        let template = crate::metrics::template_label((key != DEFAULT_POOL).then_some(key));
        while let Some(mut p) = pool.ready.pop() {
            if matches!(p.child.try_wait(), Ok(None)) {
                metrics::counter!(crate::metrics::POOL_CLAIMS.name, "template" => template, "outcome" => "hit")
                    .increment(1);
                return Some(p);
            }
        }
        if pool.spec.size > 0 {
            metrics::counter!(crate::metrics::POOL_CLAIMS.name, "template" => template, "outcome" => "miss")
                .increment(1);
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
                let Ok((id, dir, _)) = manager.prepare_dir(&spec.spec, LaneName::Process).await else {
                    break;
                };
                let (mut child, pid) = match manager
                    .launcher
                    .launch(&SandboxDir::new(&dir), LaneName::Process)
                    .await
                {
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
                        _ => stale = Some(Pooled { id, dir, child, pid }),
                    }
                }
                if let Some(pooled) = stale {
                    manager.discard(vec![pooled]);
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
    pub(super) async fn probe(
        &self,
        dir: &Path,
        spec: &SandboxSpec,
        command: &[String],
    ) -> Result<(), String> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_requests_that_differ_in_env_alone_take_a_pooled_sandbox() {
        let plain = pool_spec();
        assert!(poolable(&plain));
        let with_env = SandboxSpec {
            env: vec![("K".into(), "V".into())],
            ..pool_spec()
        };
        assert!(poolable(&with_env), "the env is applied to every exec");
        let mut limited = pool_spec();
        limited.limits.pids = Some(10);
        assert!(
            pool_spec().limits.pids.is_some(),
            "every sandbox has a pids limit"
        );
        assert!(!poolable(&limited), "limits are fixed at start");
        let mut timed = pool_spec();
        timed.timeout = Some(Duration::from_secs(5));
        assert!(!poolable(&timed));
        let mut with_command = pool_spec();
        with_command.command = vec!["sleep".into()];
        assert!(!poolable(&with_command));
        let mut host_net = pool_spec();
        host_net.network = tartarus_runtime::NetworkMode::HostLoopback;
        assert!(!poolable(&host_net));
    }
}
