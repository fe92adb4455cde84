//! E2B's JSON, as its SDKs send and read it (field names from the SDK's generated models, `e2b==2.45.1`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /sandboxes` (and `/v2/sandboxes`). Fields Tartarus does not act on are ignored: `secure` (every
/// sandbox has an access token), `allow_internet_access` and `network` (E2B sandboxes have no network
/// but their own loopback), `autoPause`/`autoResume` (a sandbox is stopped at its timeout). The ones that
/// would change what the sandbox is refuse when they ask for something Tartarus cannot give
/// (`control::check_unsupported`).
#[derive(Debug, Deserialize)]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds until the sandbox is stopped (E2B's default when absent: 15).
    pub timeout: Option<u64>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(rename = "envVars", default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Pause (freeze) instead of stopping at the timeout.
    #[serde(rename = "autoPause", default)]
    pub auto_pause: Option<bool>,
    /// `false` asks for a filesystem-only pause, which Tartarus cannot do.
    #[serde(rename = "autoPauseMemory", default)]
    pub auto_pause_memory: Option<bool>,
    /// `{"enabled": true}`: traffic to a paused sandbox resumes it.
    #[serde(rename = "autoResume", default)]
    pub auto_resume: Option<AutoResume>,
    #[serde(rename = "volumeMounts", default)]
    pub volume_mounts: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub mcp: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct AutoResume {
    pub enabled: bool,
}

/// `POST /sandboxes/{id}/pause`.
#[derive(Debug, Deserialize, Default)]
pub struct PauseRequest {
    /// `false` asks for a filesystem-only pause, which Tartarus cannot do.
    pub memory: Option<bool>,
}

/// The answer to create, connect and resume.
#[derive(Debug, Serialize)]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(rename = "envdAccessToken")]
    pub envd_access_token: String,
    #[serde(rename = "trafficAccessToken")]
    pub traffic_access_token: String,
    pub domain: Option<String>,
}

/// One sandbox of `GET /sandboxes` and `GET /v2/sandboxes`; with the token and lifecycle, `GET
/// /sandboxes/{id}`.
#[derive(Debug, Serialize)]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "startedAt")]
    pub started_at: String,
    #[serde(rename = "endAt")]
    pub end_at: String,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u64,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// `running` or `paused`.
    pub state: &'static str,
    pub metadata: BTreeMap<String, String>,
    #[serde(rename = "envdAccessToken", skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    pub lifecycle: Lifecycle,
}

/// What happens at the timeout, and whether traffic resumes a paused sandbox.
#[derive(Debug, Serialize)]
pub struct Lifecycle {
    #[serde(rename = "onTimeout")]
    pub on_timeout: &'static str,
    #[serde(rename = "autoResume")]
    pub auto_resume: bool,
}

/// `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Deserialize)]
pub struct TimeoutRequest {
    pub timeout: u64,
}

/// `POST /sandboxes/{id}/connect` (v1 and v2) and `/resume`.
#[derive(Debug, Deserialize, Default)]
pub struct ConnectRequest {
    pub timeout: Option<u64>,
    /// v2: `false` asks to resume with a cold boot, which Tartarus cannot do.
    pub memory: Option<bool>,
}

/// `GET /v2/sandboxes` (and the v1 list's `metadata`).
#[derive(Debug, Deserialize, Default)]
pub struct ListQuery {
    /// URL-encoded `key=value&key2=value2`: sandboxes with all of these.
    pub metadata: Option<String>,
    /// Comma-separated `running`, `paused`.
    pub state: Option<String>,
    pub limit: Option<u32>,
    #[serde(rename = "nextToken")]
    pub next_token: Option<String>,
    /// `asc` or `desc` (default) by start time.
    pub order: Option<String>,
    /// RFC 3339: sandboxes started at or after it.
    #[serde(rename = "startedAfter")]
    pub started_after: Option<String>,
    /// Sandboxes made from this template id.
    pub template: Option<String>,
}
