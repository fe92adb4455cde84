//! `tartarus node`: the agent on a worker machine. It registers with the control plane (a per-node
//! token), reports the machine's capacity (CPUs, memory, GPUs), labels and taints, and sends heartbeats
//! with its usage; the control plane marks the node unreachable when they stop.
//!
//! On `--listen` it serves this machine's own Tartarus server (its data directory, SQLite, shims): the
//! control plane starts the sandboxes it places here through `POST /v1/node/sandboxes` and reaches them
//! with the node's local admin key, which the agent sends when it registers. The isolation lanes it
//! reports (at registration and in every heartbeat) are the ones that server probed at its start
//! (`GET /v1/runtimes`): exactly what it will launch sandboxes on.
//!
//! Failures: a control plane that cannot be reached is retried with backoff (one log line per attempt);
//! a refusal (bad token, nonsense capacity, a duplicate node id) ends the agent with the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tartarus_scheduler::{Resources, Taint};

use crate::cluster::{Heartbeat, NodeReport, Registration};
use crate::routes::runtimes::RuntimeView;

/// Settings of `tartarus node`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The control plane's base URL (`http://HOST:PORT`).
    pub control: String,
    pub token: String,
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub listen: SocketAddr,
    /// Overrides what the machine reports (tests, or reserving part of a machine).
    pub capacity: Option<Resources>,
    /// Resource classes this node is dedicated to (empty: any).
    pub pools: std::collections::BTreeSet<String>,
    /// A quarantine node.
    pub quarantine: bool,
    /// This machine's server (data directory, runtime settings); its `listen` is not used.
    pub server: crate::ServerConfig,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the control plane refused this node: {0}")]
    Refused(String),
    #[error("reading this machine's capacity: {0}")]
    Capacity(String),
}

/// This machine: CPUs (available parallelism), memory (MemTotal), GPUs (`/dev/nvidiaN`).
pub fn machine_capacity() -> Result<Resources, AgentError> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .map_err(|e| AgentError::Capacity(e.to_string()))?;
    let memory =
        meminfo("MemTotal").ok_or_else(|| AgentError::Capacity("no MemTotal in /proc/meminfo".into()))?;
    let gpus = std::fs::read_dir("/dev")
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.strip_prefix("nvidia")
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                })
                .count() as u32
        })
        .unwrap_or(0);
    Ok(Resources::new(cpus * 1000, memory, gpus))
}

/// What this machine uses now, within `capacity`: memory not available, and the 1-minute load as CPU.
pub fn machine_usage(capacity: &Resources) -> Resources {
    let memory = match (meminfo("MemTotal"), meminfo("MemAvailable")) {
        (Some(total), Some(available)) => total.saturating_sub(available),
        _ => 0,
    };
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    Resources::new(
        ((load * 1000.0) as u64).min(capacity.cpu_millis),
        memory.min(capacity.memory_bytes),
        0,
    )
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?;
    let kib: u64 = line[key.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Runs the agent until it is refused (or the process is stopped).
/// `ready` is told the address once this node's own server accepts connections.
pub async fn run(
    config: AgentConfig,
    ready: impl FnOnce(std::net::SocketAddr) + Send,
) -> Result<(), AgentError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.listen,
            source,
        })?;
    let address = listener.local_addr().map_err(|source| AgentError::Listen {
        addr: config.listen,
        source,
    })?;
    // This machine's server: its state (and the admin key the control plane will use) first.
    crate::open_state(&config.server.data_dir).await.map_err(|e| {
        AgentError::Refused(format!(
            "this node's data directory: {}",
            tartarus_runtime::error_chain(&e)
        ))
    })?;
    let api_key = std::fs::read_to_string(config.server.data_dir.join("admin.key"))
        .map_err(|e| AgentError::Refused(format!("reading this node's admin key: {e}")))?
        .trim()
        .to_string();
    // The node's own server runs beside the agent's loop; when it stops (SIGTERM: it finishes in-flight
    // requests and returns) the agent stops too, and a server that fails takes the agent down with it.
    let server = crate::serve_on(config.server.clone(), listener, ready);
    tokio::pin!(server);
    let agent = agent_loop(&config, address, api_key);
    tokio::select! {
        served = &mut server => match served {
            Ok(()) => {
                tracing::info!(node = %config.id, "this node's server stopped; the agent stops");
                Ok(())
            }
            Err(e) => Err(AgentError::Refused(format!(
                "this node's server stopped: {}",
                tartarus_runtime::error_chain(&e)
            ))),
        },
        refused = agent => refused,
    }
}

/// The lanes this machine's own server can run (it probed them at its start), with their versions.
async fn own_lanes(
    http: &reqwest::Client,
    address: SocketAddr,
    api_key: &str,
) -> Result<Vec<tartarus_store::NodeLane>, AgentError> {
    let failed = |e: String| AgentError::Refused(format!("reading this node's own lanes: {e}"));
    let views: Vec<RuntimeView> = http
        .get(format!("http://{address}/v1/runtimes"))
        .bearer_auth(api_key)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| failed(tartarus_runtime::error_chain(&e)))?
        .json()
        .await
        .map_err(|e| failed(tartarus_runtime::error_chain(&e)))?;
    Ok(views
        .into_iter()
        .filter(|v| v.available)
        .map(|v| tartarus_store::NodeLane {
            name: v.name,
            version: v.version,
            emulated: v.emulated,
        })
        .collect())
}

/// Registers this node and sends heartbeats until refused.
async fn agent_loop(
    config: &AgentConfig,
    address: std::net::SocketAddr,
    api_key: String,
) -> Result<(), AgentError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| AgentError::Refused(e.to_string()))?;
    // Register only once this machine's server answers: the control plane may place work at once.
    let started = std::time::Instant::now();
    while !http
        .get(format!("http://{address}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if started.elapsed() > Duration::from_secs(60) {
            return Err(AgentError::Refused(
                "this node's own server did not start".to_string(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let capacity = match config.capacity {
        Some(c) => c,
        None => machine_capacity()?,
    };
    let lanes = own_lanes(&http, address, &api_key).await?;
    tracing::info!(
        lanes = %lanes.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", "),
        "this node's isolation lanes"
    );
    let instance = tartarus_hostsys::random_hex(8).unwrap_or_else(|_| std::process::id().to_string());
    let base = config.control.trim_end_matches('/').to_string();
    let mut backoff = Duration::from_millis(500);
    loop {
        let report = NodeReport {
            id: config.id.clone(),
            instance: instance.clone(),
            address: address.to_string(),
            labels: config.labels.clone(),
            taints: config.taints.clone(),
            capacity,
            usage: machine_usage(&capacity),
            api_key: api_key.clone(),
            pools: config.pools.clone(),
            quarantine: config.quarantine,
            lanes: lanes.clone(),
        };
        let registered = http
            .post(format!("{base}/v1/nodes/register"))
            .bearer_auth(&config.token)
            .json(&report)
            .send()
            .await;
        let registration: Registration = match registered {
            Ok(response) if response.status().is_success() => match response.json().await {
                Ok(r) => r,
                Err(e) => return Err(AgentError::Refused(format!("unreadable answer: {e}"))),
            },
            Ok(response) => {
                let status = response.status();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                let message = body["error"]["message"]
                    .as_str()
                    .unwrap_or("no reason given")
                    .to_string();
                return Err(AgentError::Refused(format!("{message} (HTTP {status})")));
            }
            Err(e) => {
                tracing::warn!(
                    "control plane {base} not reachable ({}); retrying in {:.1} s",
                    tartarus_runtime::error_chain(&e),
                    backoff.as_secs_f64()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(500);
        tracing::info!(node = %config.id, epoch = registration.epoch, "registered");
        let every = Duration::from_millis(registration.heartbeat_ms.max(50));
        let mut interval = tokio::time::interval(every);
        loop {
            interval.tick().await;
            let beat = Heartbeat {
                instance: instance.clone(),
                epoch: registration.epoch,
                usage: machine_usage(&capacity),
                lanes: Some(lanes.clone()),
            };
            // A heartbeat stuck on a dead connection must not outlive the next ones.
            let sent = http
                .post(format!("{base}/v1/nodes/{}/heartbeat", config.id))
                .timeout((every * 3).clamp(Duration::from_secs(1), Duration::from_secs(10)))
                .bearer_auth(&config.token)
                .json(&beat)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {}
                // Superseded, or the control plane forgot us: register again.
                Ok(r)
                    if r.status() == reqwest::StatusCode::CONFLICT
                        || r.status() == reqwest::StatusCode::NOT_FOUND =>
                {
                    tracing::warn!("heartbeat refused ({}); registering again", r.status());
                    break;
                }
                Ok(r) => {
                    let status = r.status();
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    let message = body["error"]["message"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_string();
                    return Err(AgentError::Refused(format!(
                        "heartbeat: {message} (HTTP {status})"
                    )));
                }
                Err(e) => tracing::warn!("heartbeat not delivered: {}", tartarus_runtime::error_chain(&e)),
            }
        }
    }
}
