//! Wire types of the REST API v1 (serde + OpenAPI schemas).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Resources of a sandbox.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (0.5 = half a core).
    pub cpus: Option<f64>,
    pub memory_mb: Option<u64>,
    pub pids: Option<u64>,
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// A template id (`GET /v1/templates`): its image, defaults, resource caps and warm pool.
    pub template: Option<String>,
    /// A resource class: ember (1 CPU, 512 MiB), flame (2, 2 GiB), blaze (4, 8 GiB), inferno (8, 32 GiB, GPU)
    /// or quarantine (1, 512 MiB, no network, stricter seccomp). Policies may restrict which are allowed.
    pub class: Option<String>,
    /// An OCI image reference, pulled when not in the server's store; its layers are the sandbox's
    /// (writable, ephemeral) root, its Env, WorkingDir and User the defaults.
    pub image: Option<String>,
    /// Host directory to use as the read-only root (admin keys only).
    pub rootfs: Option<String>,
    /// Main command; the sandbox ends when it exits. Without it the sandbox lives until deleted or timed out.
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the main command.
    pub cwd: Option<String>,
    #[serde(default)]
    pub resources: Resources,
    /// Lifetime limit in seconds.
    pub timeout_s: Option<u64>,
    /// Seconds between SIGTERM and SIGKILL when `timeout_s` ends the sandbox (default 2, at most 300; 0 kills
    /// at once). The result's `signal` says which ended it.
    pub timeout_grace_s: Option<u64>,
    /// The isolation lane: `auto` (the policy decides from the class and the tenant's trust; the default
    /// unless the policy's `isolation.default_runtime` names a lane), `process` or `gvisor`. A lane this host
    /// lacks is refused (422), one the policy forbids too (403); the choice and its reason are in the answer.
    pub runtime: Option<String>,
    /// `none` (default) or `host-loopback`.
    pub network: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Ports inside the sandbox that preview URLs may reach (`/v1/sandboxes/{id}/ports/{port}/…`); none by
    /// default. Kept as the label `tartarus.ports` (comma-separated).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Cluster mode: node labels the sandbox's node must have.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Cluster mode: node taints this sandbox tolerates: `[{"key": "gpu", "value": "true"}]` (no value:
    /// any value).
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub tolerations: Vec<tartarus_scheduler::Toleration>,
    /// Cluster mode: node labels preferred, with weights 1-100: `[{"key": "disk", "value": "ssd", "weight": 50}]`.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub node_affinity: Vec<tartarus_scheduler::LabelTerm>,
    /// Cluster mode: node labels avoided, with weights.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub node_anti_affinity: Vec<tartarus_scheduler::LabelTerm>,
    /// Cluster mode: spread the sandboxes that share this label's value (e.g. `app`) over nodes.
    pub spread_by: Option<String>,
    /// Cluster mode: the queue lane while no node has room: swift, main (default) or deep.
    pub lane: Option<String>,
    /// Cluster mode: priority within the lane (higher first; default 0).
    pub priority: Option<i64>,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxView {
    pub id: String,
    pub tenant: String,
    /// starting, running, paused, exited, killed, failed, lost
    pub status: String,
    pub template: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// RFC 3339 / ISO 8601 is left to clients: milliseconds since the Unix epoch.
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub exit_code: Option<i64>,
    /// Why it ended: exited, timeout, oom, killed, or a reason for lost/failed.
    pub reason: Option<String>,
    /// Cluster mode: the node that runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Cluster mode: why the scheduler put it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// The isolation lane it runs on: `process` or `gvisor` (`GET /v1/runtimes`).
    pub runtime: String,
    /// Why that lane: `the quarantine class requires a strong wall`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_reason: Option<String>,
    /// A paused sandbox: `memory` (frozen in place) or `disk` (saved to a snapshot, using no CPU or memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_to: Option<PauseMode>,
}

/// `POST /v1/sandboxes/{id}/pause` (the body is optional: an empty one pauses in memory).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseBody {
    #[serde(default)]
    pub mode: PauseMode,
}

/// How a sandbox is paused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PauseMode {
    /// Freeze every process where it is; memory stays in use. Every lane with `pause`.
    #[default]
    Memory,
    /// Save memory, processes and scratch files to a sealed snapshot on disk, then release the sandbox's
    /// CPU and memory; a resume restores it under the same id. Lanes with `pause_to_disk` (gvisor).
    Disk,
}

/// `POST /v1/sandboxes/{id}/exec`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Text given to the command's stdin.
    pub stdin: Option<String>,
    pub timeout_s: Option<f64>,
    /// Answer with Server-Sent Events as output is written: `stdout` and `stderr` events whose data is a
    /// JSON string, then one `exit` event with `{exit_code, signal, wall_ms, timed_out}`. Stdin can only be
    /// given up front, in `stdin`. Closing the connection kills the command.
    #[serde(default)]
    pub stream: bool,
}

/// The result of an exec.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub wall_ms: f64,
    pub timed_out: bool,
    /// Output beyond 4 MiB per stream was dropped.
    pub truncated: bool,
}

/// `GET /v1/sandboxes` query.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub status: Option<String>,
    /// `key=value`: only sandboxes with this label.
    pub label: Option<String>,
}

impl From<tartarus_shim::protocol::ExecOutput> for ExecResult {
    fn from(output: tartarus_shim::protocol::ExecOutput) -> Self {
        ExecResult {
            exit_code: output.exit.exit_code,
            signal: output.exit.signal,
            stdout: output.stdout,
            stderr: output.stderr,
            wall_ms: output.exit.wall_ms,
            timed_out: output.exit.timed_out,
            truncated: output.truncated,
        }
    }
}
