//! E2B's control-plane REST calls on Tartarus sandboxes.
//!
//! A sandbox made here is an ordinary Tartarus sandbox (process lane, host-system root unless the
//! template names a Tartarus template) whose main command is the E2B daemon, `tartarus envd`, the
//! supervisor's own static executable mounted read-only at [`ENVD_EXECUTABLE`]. Its user is `user` with
//! the home `/home/user`, as in E2B's `base` template. Its E2B timeout is a store deadline
//! (`sandboxes::deadlines`), which `timeout`, `connect` and `resume` move.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tartarus_store::{SandboxRecord, SandboxStatus};

use super::wire::{
    ConnectRequest, Lifecycle, ListQuery, NewSandbox, PauseRequest, Sandbox, SandboxDetail, TimeoutRequest,
};
use super::{E2bError, ENVD_PORT};
use crate::api::{CreateSandbox, SandboxView};
use crate::auth::Caller;
use crate::{audit, AppState};

/// Where a sandbox sees the supervisor's executable, which serves the E2B daemon.
pub const ENVD_EXECUTABLE: &str = "/.tartarus/tartarus";
/// The label that marks a sandbox made through this API, holding the E2B template id it was made from.
/// Labels starting `e2b.` are this API's (not the sandbox's metadata).
pub const TEMPLATE_LABEL: &str = "e2b.template";
/// `pause` when the sandbox pauses at its timeout instead of stopping (E2B's auto-pause).
const ON_TIMEOUT_LABEL: &str = "e2b.on_timeout";
/// `true` when traffic to the paused sandbox resumes it (E2B's auto-resume).
const AUTO_RESUME_LABEL: &str = "e2b.auto_resume";
/// Prefix of this API's own labels.
const OWN_LABELS: &str = "e2b.";
/// E2B's default sandbox timeout, when a create names none.
const DEFAULT_TIMEOUT_S: u64 = 15;
/// The longest timeout accepted (E2B's own cap for its paid tier).
const MAX_TIMEOUT_S: u64 = 24 * 3600;
/// How long a new sandbox's daemon may take to listen before the create fails.
const ENVD_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The `clientID` every answer carries (E2B names the cluster node; Tartarus has one name).
const CLIENT_ID: &str = "tartarus";
/// Largest page of `GET /v2/sandboxes`.
const MAX_PAGE: u32 = 1000;

/// The routes of the control plane (under [`super::PREFIX`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(create_sandbox).get(list_sandboxes_v1))
        .route("/v2/sandboxes", post(create_sandbox).get(list_sandboxes_v2))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill_sandbox))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause_sandbox))
        .route("/sandboxes/{id}/resume", post(resume_sandbox))
        .route("/sandboxes/{id}/connect", post(connect_sandbox))
        .route("/v2/sandboxes/{id}/connect", post(connect_sandbox))
        .route("/sandboxes/{id}/refreshes", post(refresh_sandbox))
        .route("/sandboxes/{id}/metrics", get(sandbox_metrics))
        .route("/sandboxes/{id}/logs", get(sandbox_logs))
        .route("/v2/sandboxes/{id}/logs", get(sandbox_logs))
        .fallback(unsupported)
}

/// The caller of an E2B call: the Tartarus key in `X-API-Key` (see [`super::api_key_from_header`]).
pub struct E2bCaller(pub Caller);

impl FromRequestParts<AppState> for E2bCaller {
    type Rejection = E2bError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                E2bError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing X-API-Key header: set E2B_API_KEY (`tartarus e2b env` prints it)",
                )
            })?;
        let secret = super::api_key_from_header(header.trim());
        let key = state
            .store
            .authenticate(&secret)
            .await
            .map_err(|e| E2bError::from(crate::error::ApiError::from(e)))?
            .ok_or_else(|| E2bError::new(StatusCode::UNAUTHORIZED, "unknown or revoked API key"))?;
        Ok(E2bCaller(Caller {
            key_id: key.id,
            tenant: key.tenant,
            role: key.role,
        }))
    }
}

/// A JSON body, refused in E2B's shape (400) when malformed.
pub struct E2bJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for E2bJson<T> {
    type Rejection = E2bError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(E2bJson(value)),
            Err(rejection) => Err(E2bError::new(StatusCode::BAD_REQUEST, rejection.body_text())),
        }
    }
}

async fn unsupported(uri: axum::http::Uri) -> E2bError {
    E2bError::new(
        StatusCode::NOT_FOUND,
        format!(
            "{} is not supported by Tartarus's E2B API (templates, snapshots, volumes, secrets and network \
             updates are not; see docs/e2b.md)",
            uri.path()
        ),
    )
}

/// Refuses what a create asks for that Tartarus cannot give, naming it.
fn check_unsupported(body: &NewSandbox) -> Result<(), E2bError> {
    let refuse = |what: &str| {
        Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("{what} are not supported by Tartarus's E2B API"),
        ))
    };
    if body.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return refuse("volume mounts");
    }
    if body.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        // E2B answers a gateway that cannot start this way; here none can.
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            "Failed to start MCP gateway: MCP gateways are not supported by Tartarus's E2B API",
        ));
    }
    if body.auto_pause_memory == Some(false) {
        return refuse("filesystem-only pauses (autoPauseMemory: false)");
    }
    if let Some(metadata) = &body.metadata {
        if let Some(key) = metadata.keys().find(|k| k.starts_with(OWN_LABELS)) {
            return Err(E2bError::new(
                StatusCode::BAD_REQUEST,
                format!("metadata key '{key}' is reserved: keys starting '{OWN_LABELS}' are Tartarus's"),
            ));
        }
    }
    Ok(())
}

/// What an E2B template id names: the built-in `base` (bash, coreutils, python3 of the host system) and
/// `code-interpreter-v1`, or a Tartarus template of that id.
enum TemplateChoice {
    Base,
    CodeInterpreter,
    Tartarus(String),
}

fn template_choice(id: &str) -> TemplateChoice {
    // E2B accepts `name:tag`; the built-ins have one version.
    match id.split(':').next().unwrap_or(id) {
        "base" => TemplateChoice::Base,
        "code-interpreter-v1" | "code-interpreter" => TemplateChoice::CodeInterpreter,
        _ => TemplateChoice::Tartarus(id.to_string()),
    }
}

async fn create_sandbox(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    E2bJson(body): E2bJson<NewSandbox>,
) -> Result<Response, E2bError> {
    caller.require_mutate()?;
    check_unsupported(&body)?;
    let timeout = body.timeout.unwrap_or(DEFAULT_TIMEOUT_S);
    if !(1..=MAX_TIMEOUT_S).contains(&timeout) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("timeout must be between 1 and {MAX_TIMEOUT_S} seconds"),
        ));
    }
    let choice = template_choice(&body.template_id);
    let mut labels = body.metadata.clone().unwrap_or_default();
    labels.insert(TEMPLATE_LABEL.to_string(), body.template_id.clone());
    if body.auto_pause == Some(true) {
        labels.insert(ON_TIMEOUT_LABEL.to_string(), "pause".to_string());
    }
    if body.auto_resume.as_ref().is_some_and(|a| a.enabled) {
        labels.insert(AUTO_RESUME_LABEL.to_string(), "true".to_string());
    }
    let native = CreateSandbox {
        template: match &choice {
            TemplateChoice::Tartarus(id) => Some(id.clone()),
            _ => None,
        },
        env: body.env_vars.clone().unwrap_or_default(),
        labels,
        runtime: Some("process".to_string()),
        ..CreateSandbox::default()
    };
    let executable = state.manager.shim_exe().to_path_buf();
    let compat_bin = state.e2b.compat_bin.clone();
    let code_interpreter =
        matches!(choice, TemplateChoice::CodeInterpreter).then(|| state.e2b.code_interpreter.clone());
    let shape = move |spec: &mut tartarus_runtime::SandboxSpec| {
        shape_spec(spec, executable, compat_bin, code_interpreter.as_deref())
    };
    let response = crate::routes::sandboxes::create(state.clone(), caller.clone(), native, shape).await?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .map_err(|e| E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if status != StatusCode::CREATED {
        // Queued for a cluster node (202) or refused: E2B sandboxes run on this machine only.
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| "the sandbox could not be created here".to_string());
        return Err(E2bError::new(status, message));
    }
    let view: SandboxView = serde_json::from_slice(&bytes)
        .map_err(|e| E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let record = crate::find(&state, &caller, &view.id).await?;
    let mut ready = wait_for_port(&state, &record, ENVD_PORT, "E2B daemon", ENVD_READY_TIMEOUT).await;
    if ready.is_ok() && matches!(choice, TemplateChoice::CodeInterpreter) {
        ready = wait_for_code_interpreter(&state, &record).await;
    }
    if let Err(e) = ready {
        let _ = state.manager.kill(&record).await;
        return Err(e);
    }
    set_deadline(&state, &record, deadline_after(timeout)).await?;
    let answer = sandbox_answer(&state, &record);
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// The spec of an E2B sandbox: the daemon as the main command, as the user `user`.
fn shape_spec(
    spec: &mut tartarus_runtime::SandboxSpec,
    executable: std::path::PathBuf,
    compat_bin: std::path::PathBuf,
    code_interpreter: Option<&std::path::Path>,
) {
    spec.user_name = Some("user".to_string());
    let home = spec.home();
    let path = format!("{}:{}", super::COMPAT_BIN, tartarus_runtime::spec::DEFAULT_PATH);
    spec.mounts.push(tartarus_runtime::BindMount {
        source: compat_bin,
        target: super::COMPAT_BIN.into(),
        writable: false,
    });
    for (key, value) in [
        ("HOME", home.as_str()),
        ("USER", "user"),
        ("LOGNAME", "user"),
        ("PATH", path.as_str()),
    ] {
        if !spec.env.iter().any(|(k, _)| k == key) {
            spec.env.push((key.to_string(), value.to_string()));
        }
    }
    spec.workdir = Some(home.clone().into());
    spec.mounts.push(tartarus_runtime::BindMount {
        source: executable,
        target: ENVD_EXECUTABLE.into(),
        writable: false,
    });
    let envd = format!("{ENVD_EXECUTABLE} envd --listen 127.0.0.1:{ENVD_PORT}");
    spec.command = match code_interpreter {
        None => vec![
            ENVD_EXECUTABLE.to_string(),
            "envd".to_string(),
            "--listen".to_string(),
            format!("127.0.0.1:{ENVD_PORT}"),
        ],
        Some(server) => {
            spec.mounts.push(tartarus_runtime::BindMount {
                source: server.to_path_buf(),
                target: CODE_INTERPRETER_SERVER.into(),
                writable: false,
            });
            vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                format!(
                    "python3 {CODE_INTERPRETER_SERVER} --port {} >/tmp/code-interpreter.log 2>&1 & exec {envd}",
                    super::CODE_INTERPRETER_PORT
                ),
            ]
        }
    };
}

/// Where a code-interpreter sandbox sees the code interpreter's server.
pub const CODE_INTERPRETER_SERVER: &str = "/.tartarus/code-interpreter.py";

/// How long the code interpreter's server may take to be ready (its default Jupyter kernel started).
const CODE_INTERPRETER_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the code interpreter answers `GET /health` with 2xx: it listens at once, and is ready once
/// its default context's kernel runs (503 until then), so the first `run_code` neither fails nor waits
/// and the default context is the first in its list, as in E2B.
async fn wait_for_code_interpreter(state: &AppState, record: &SandboxRecord) -> Result<(), E2bError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = super::CODE_INTERPRETER_PORT;
    let started = tokio::time::Instant::now();
    wait_for_port(
        state,
        record,
        port,
        "code interpreter",
        CODE_INTERPRETER_READY_TIMEOUT,
    )
    .await?;
    let shim = state.manager.shim(record);
    let mut pause = Duration::from_millis(10);
    let mut last = String::new();
    while started.elapsed() < CODE_INTERPRETER_READY_TIMEOUT {
        let probe = async {
            let mut stream = shim.connect_port(port).await.map_err(|e| e.to_string())?;
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(String::from_utf8_lossy(&head[9..12]).into_owned())
        };
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(status)) if status.starts_with('2') => return Ok(()),
            Ok(Ok(status)) => last = format!("/health answered {status}"),
            Ok(Err(e)) => last = e,
            Err(_) => last = "/health did not answer within 5 s".to_string(),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    Err(E2bError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the sandbox's code interpreter was not ready within {} s ({last})",
            CODE_INTERPRETER_READY_TIMEOUT.as_secs()
        ),
    ))
}

/// Waits until a program of the sandbox accepts connections on `port` (the daemon starts in
/// milliseconds; the bound is for a sandbox that never gets there).
async fn wait_for_port(
    state: &AppState,
    record: &SandboxRecord,
    port: u16,
    what: &str,
    limit: Duration,
) -> Result<(), E2bError> {
    let shim = state.manager.shim(record);
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match shim.connect_port(port).await {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() < limit => {
                tracing::trace!(sandbox = %record.id, "daemon not listening yet: {e}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(E2bError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the sandbox's {what} did not start within {} s: {}",
                        limit.as_secs(),
                        tartarus_runtime::error_chain(&e)
                    ),
                ))
            }
        }
    }
}

/// What the sandbox's timeout does: pause (auto-pause) or stop.
fn expiry(record: &SandboxRecord) -> tartarus_store::Expiry {
    match record.labels.get(ON_TIMEOUT_LABEL).map(String::as_str) {
        Some("pause") => tartarus_store::Expiry::Pause,
        _ => tartarus_store::Expiry::Stop,
    }
}

/// Whether traffic resumes this sandbox when it is paused.
pub fn auto_resumes(record: &SandboxRecord) -> bool {
    record.labels.get(AUTO_RESUME_LABEL).is_some_and(|v| v == "true")
}

/// How long a sandbox woken by traffic runs before its timeout acts again (the SDK's default timeout).
const AUTO_RESUME_TIMEOUT_S: u64 = 300;

/// Resumes a paused sandbox that traffic reached (E2B's auto-resume); returns its record as it is now.
pub async fn auto_resume(state: &AppState, record: SandboxRecord) -> Result<SandboxRecord, E2bError> {
    state.manager.set_paused(&record, false).await?;
    set_deadline(state, &record, deadline_after(AUTO_RESUME_TIMEOUT_S)).await?;
    state
        .store
        .sandbox(&record.id, None)
        .await
        .map_err(|e| E2bError::from(crate::error::ApiError::from(e)))?
        .ok_or_else(|| {
            E2bError::new(
                StatusCode::BAD_GATEWAY,
                format!("sandbox {} is not running", record.id),
            )
        })
}

async fn set_deadline(state: &AppState, record: &SandboxRecord, deadline_ms: i64) -> Result<(), E2bError> {
    state
        .store
        .set_deadline(&record.id, deadline_ms, expiry(record))
        .await
        .map_err(|e| E2bError::from(crate::error::ApiError::from(e)))
}

fn deadline_after(timeout_s: u64) -> i64 {
    tartarus_store::now_ms().saturating_add(i64::try_from(timeout_s.saturating_mul(1000)).unwrap_or(i64::MAX))
}

fn sandbox_answer(state: &AppState, record: &SandboxRecord) -> Sandbox {
    Sandbox {
        template_id: template_id(record),
        sandbox_id: record.id.clone(),
        client_id: CLIENT_ID.to_string(),
        envd_version: super::ENVD_VERSION.to_string(),
        envd_access_token: state.e2b.tokens.access_token(&record.id),
        traffic_access_token: state.e2b.tokens.traffic_token(&record.id),
        domain: state.e2b.domain.clone(),
    }
}

fn template_id(record: &SandboxRecord) -> String {
    record
        .labels
        .get(TEMPLATE_LABEL)
        .cloned()
        .unwrap_or_else(|| record.template.clone().unwrap_or_else(|| "base".to_string()))
}

/// A live sandbox of the caller's tenant made through this API; anything else is E2B's 404.
async fn find_e2b(state: &AppState, caller: &Caller, id: &str) -> Result<SandboxRecord, E2bError> {
    let not_found = || E2bError::new(StatusCode::NOT_FOUND, format!("sandbox {id} not found"));
    let record = crate::find(state, caller, id).await.map_err(|_| not_found())?;
    if !record.status.is_live() || !record.labels.contains_key(TEMPLATE_LABEL) {
        return Err(not_found());
    }
    Ok(record)
}

async fn detail(state: &AppState, record: &SandboxRecord, with_token: bool) -> SandboxDetail {
    let deadline = state
        .store
        .deadline(&record.id)
        .await
        .ok()
        .flatten()
        .map(|(ms, _)| ms);
    let spec = crate::sandboxes::stored_spec(record).ok();
    let limits = spec.as_ref().map(|s| s.applied_limits());
    let cpus = limits.as_ref().and_then(|l| l.cpu_quota).unwrap_or(1.0);
    let memory = limits.as_ref().and_then(|l| l.memory_bytes.value()).unwrap_or(0);
    let disk = spec.as_ref().map(|s| s.scratch_bytes).unwrap_or(0);
    SandboxDetail {
        template_id: template_id(record),
        sandbox_id: record.id.clone(),
        client_id: CLIENT_ID.to_string(),
        started_at: rfc3339(record.created_ms),
        end_at: rfc3339(deadline.unwrap_or(record.created_ms)),
        envd_version: super::ENVD_VERSION.to_string(),
        cpu_count: cpus.ceil() as u64,
        memory_mb: memory >> 20,
        disk_size_mb: disk >> 20,
        state: if record.paused { "paused" } else { "running" },
        metadata: metadata(record),
        envd_access_token: with_token.then(|| state.e2b.tokens.access_token(&record.id)),
        domain: state.e2b.domain.clone(),
        lifecycle: Lifecycle {
            on_timeout: match expiry(record) {
                tartarus_store::Expiry::Pause => "pause",
                tartarus_store::Expiry::Stop => "kill",
            },
            auto_resume: auto_resumes(record),
        },
    }
}

/// The sandbox's labels as E2B metadata (without this API's own).
fn metadata(record: &SandboxRecord) -> BTreeMap<String, String> {
    let mut metadata = record.labels.clone();
    metadata.retain(|k, _| !k.starts_with(OWN_LABELS));
    metadata
}

/// Milliseconds since the epoch as RFC 3339 in UTC (`2026-12-03T18:00:00.123Z`).
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An RFC 3339 time as milliseconds since the epoch.
fn parse_rfc3339(text: &str) -> Result<i64, E2bError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            E2bError::new(
                StatusCode::BAD_REQUEST,
                format!("'{text}' is not an RFC 3339 time: {e}"),
            )
        })
}

/// Parses E2B's metadata filter, `key=value&key2=value2` (URL-encoded once more in the query).
fn metadata_filter(raw: Option<&str>) -> Result<Vec<(String, String)>, E2bError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(Vec::new());
    };
    url::form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| match k.is_empty() {
            true => Err(E2bError::new(
                StatusCode::BAD_REQUEST,
                "metadata filter must be key=value pairs joined by '&'",
            )),
            false => Ok((k.into_owned(), v.into_owned())),
        })
        .collect()
}

/// The caller's live E2B sandboxes that match, newest first.
async fn matching(
    state: &AppState,
    caller: &Caller,
    query: &ListQuery,
) -> Result<Vec<SandboxRecord>, E2bError> {
    let filter = metadata_filter(query.metadata.as_deref())?;
    let states: Vec<&str> = match query.state.as_deref() {
        Some(s) if !s.is_empty() => s.split(',').map(str::trim).collect(),
        _ => vec!["running", "paused"],
    };
    if let Some(bad) = states.iter().find(|s| !matches!(**s, "running" | "paused")) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("unknown state '{bad}': use running or paused"),
        ));
    }
    let started_after = query.started_after.as_deref().map(parse_rfc3339).transpose()?;
    let ascending = match query.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return Err(E2bError::new(
                StatusCode::BAD_REQUEST,
                format!("unknown order '{other}': use asc or desc"),
            ))
        }
    };
    let mut records: Vec<SandboxRecord> = state
        .store
        .sandboxes(caller.scope(), Some(SandboxStatus::Running))
        .await
        .map_err(crate::error::ApiError::from)?
        .into_iter()
        .filter(|r| r.labels.contains_key(TEMPLATE_LABEL))
        .filter(|r| states.contains(&if r.paused { "paused" } else { "running" }))
        .filter(|r| filter.iter().all(|(k, v)| r.labels.get(k) == Some(v)))
        .filter(|r| started_after.is_none_or(|after| r.created_ms >= after))
        .filter(|r| query.template.as_deref().is_none_or(|t| template_id(r) == t))
        .collect();
    // Newest first (the store's order), ties by id, so pages are stable.
    records.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then_with(|| b.id.cmp(&a.id)));
    if ascending {
        records.reverse();
    }
    Ok(records)
}

async fn list_sandboxes_v1(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<SandboxDetail>>, E2bError> {
    let mut answer = Vec::new();
    for record in matching(&state, &caller, &query).await? {
        answer.push(detail(&state, &record, false).await);
    }
    Ok(Json(answer))
}

/// `GET /v2/sandboxes`: pages of `limit` (default 100), the next page's token in `x-next-token`.
async fn list_sandboxes_v2(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, E2bError> {
    let Query(query) = query.map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    let records = matching(&state, &caller, &query).await?;
    // The token is the id the previous page ended with; the order is the store's (newest first, by id).
    let start = match query.next_token.as_deref().filter(|t| !t.is_empty()) {
        Some(token) => match records.iter().position(|r| r.id == token) {
            Some(i) => i + 1,
            None => {
                return Err(E2bError::new(
                    StatusCode::BAD_REQUEST,
                    "nextToken does not name a sandbox of this listing (it may have ended); list again",
                ))
            }
        },
        None => 0,
    };
    let page: Vec<&SandboxRecord> = records.iter().skip(start).take(limit as usize).collect();
    let more = start + page.len() < records.len();
    let mut answer = Vec::new();
    for record in &page {
        answer.push(detail(&state, record, false).await);
    }
    let mut headers = HeaderMap::new();
    if let (true, Some(last)) = (more, page.last()) {
        if let Ok(value) = HeaderValue::from_str(&last.id) {
            headers.insert("x-next-token", value);
        }
    }
    Ok((headers, Json(answer)).into_response())
}

async fn get_sandbox(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    Path(id): Path<String>,
) -> Result<Json<SandboxDetail>, E2bError> {
    let record = find_e2b(&state, &caller, &id).await?;
    Ok(Json(detail(&state, &record, true).await))
}

async fn kill_sandbox(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    caller.require_mutate()?;
    let record = find_e2b(&state, &caller, &id).await?;
    let result = state.manager.kill(&record).await;
    audit(
        &state,
        &caller,
        "sandbox.delete",
        Some(&id),
        if result.is_ok() {
            "ok (e2b)"
        } else {
            "failed (e2b)"
        },
    )
    .await;
    result?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    Path(id): Path<String>,
    E2bJson(body): E2bJson<TimeoutRequest>,
) -> Result<StatusCode, E2bError> {
    caller.require_mutate()?;
    // 0 is "now", as in E2B.
    if body.timeout > MAX_TIMEOUT_S {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("timeout must be at most {MAX_TIMEOUT_S} seconds"),
        ));
    }
    let record = find_e2b(&state, &caller, &id).await?;
    set_deadline(&state, &record, deadline_after(body.timeout)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause_sandbox(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    caller.require_mutate()?;
    let request: PauseRequest = optional_body(&body)?;
    if request.memory == Some(false) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            "filesystem-only pauses (memory: false) are not supported by Tartarus's E2B API",
        ));
    }
    let record = find_e2b(&state, &caller, &id).await?;
    if record.paused {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already paused"),
        ));
    }
    state.manager.set_paused(&record, true).await?;
    // A paused sandbox waits to be resumed: its timeout stops counting, as in E2B.
    state
        .store
        .clear_deadline(&record.id)
        .await
        .map_err(crate::error::ApiError::from)?;
    audit(&state, &caller, "sandbox.pause", Some(&id), "ok (e2b)").await;
    Ok(StatusCode::NO_CONTENT)
}

/// An optional JSON body (`connect`, `resume`, `pause`, `refreshes`): empty is the default.
fn optional_body<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, E2bError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))
}

/// Moves the deadline to `wanted` unless it is already later (`connect` and `refreshes` never shorten).
async fn extend_deadline(state: &AppState, record: &SandboxRecord, wanted: i64) -> Result<(), E2bError> {
    let current = state
        .store
        .deadline(&record.id)
        .await
        .map_err(crate::error::ApiError::from)?
        .map(|(ms, _)| ms);
    if current.is_none_or(|c| c < wanted) {
        set_deadline(state, record, wanted).await?;
    }
    Ok(())
}

/// `resume`: a paused sandbox runs again with a new timeout; a running one is a conflict.
async fn resume_sandbox(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    caller.require_mutate()?;
    let record = find_e2b(&state, &caller, &id).await?;
    if !record.paused {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already running"),
        ));
    }
    let timeout = optional_body::<ConnectRequest>(&body)?
        .timeout
        .unwrap_or(DEFAULT_TIMEOUT_S);
    state.manager.set_paused(&record, false).await?;
    set_deadline(&state, &record, deadline_after(timeout.clamp(1, MAX_TIMEOUT_S))).await?;
    audit(&state, &caller, "sandbox.resume", Some(&id), "ok (e2b)").await;
    Ok((StatusCode::CREATED, Json(sandbox_answer(&state, &record))).into_response())
}

/// `connect`: resumes a paused sandbox (201) or returns a running one (200); its timeout becomes at least
/// `timeout` from now, never shorter than it was.
async fn connect_sandbox(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    caller.require_mutate()?;
    let record = find_e2b(&state, &caller, &id).await?;
    let request: ConnectRequest = optional_body(&body)?;
    if request.memory == Some(false) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            "resuming with a cold boot (memory: false) is not supported by Tartarus's E2B API",
        ));
    }
    let timeout = request.timeout.unwrap_or(DEFAULT_TIMEOUT_S);
    let wanted = deadline_after(timeout.clamp(1, MAX_TIMEOUT_S));
    let status = match record.paused {
        true => {
            state.manager.set_paused(&record, false).await?;
            StatusCode::CREATED
        }
        false => StatusCode::OK,
    };
    match status {
        // A resumed sandbox had no deadline (a pause clears it).
        StatusCode::CREATED => set_deadline(&state, &record, wanted).await?,
        _ => extend_deadline(&state, &record, wanted).await?,
    }
    Ok((status, Json(sandbox_answer(&state, &record))).into_response())
}

/// `refreshes`: the timeout becomes at least `duration` seconds from now (older SDKs' keep-alive).
async fn refresh_sandbox(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    caller.require_mutate()?;
    #[derive(serde::Deserialize, Default)]
    struct Refresh {
        duration: Option<u64>,
    }
    let refresh: Refresh = optional_body(&body)?;
    let record = find_e2b(&state, &caller, &id).await?;
    let wanted = deadline_after(
        refresh
            .duration
            .unwrap_or(DEFAULT_TIMEOUT_S)
            .clamp(1, MAX_TIMEOUT_S),
    );
    // A paused sandbox's timeout does not run.
    if !record.paused {
        extend_deadline(&state, &record, wanted).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Metrics over time are not collected for E2B's API yet: an empty series (the SDK accepts it).
async fn sandbox_metrics(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    Path(id): Path<String>,
) -> Result<Json<Vec<serde_json::Value>>, E2bError> {
    find_e2b(&state, &caller, &id).await?;
    Ok(Json(Vec::new()))
}

/// The daemon's own logs are not E2B's log format: an empty list (the main command's output is in `GET
/// /v1/sandboxes/{id}/logs`).
async fn sandbox_logs(
    State(state): State<AppState>,
    E2bCaller(caller): E2bCaller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, E2bError> {
    find_e2b(&state, &caller, &id).await?;
    Ok(Json(serde_json::json!({"logs": [], "logEntries": []})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_refuses_garbage() {
        assert_eq!(
            parse_rfc3339("2026-12-03T17:30:00.000Z").unwrap(),
            1_796_319_000_000
        );
        assert_eq!(
            parse_rfc3339("2026-12-03T18:30:00+01:00").unwrap(),
            1_796_319_000_000
        );
        assert_eq!(
            parse_rfc3339("yesterday").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_319_000_000), "2026-12-03T17:30:00.000Z");
    }

    #[test]
    fn the_metadata_filter_reads_pairs_and_refuses_an_empty_key() {
        assert_eq!(
            metadata_filter(Some("a=1&b=two%20words")).unwrap(),
            vec![("a".into(), "1".into()), ("b".into(), "two words".into())]
        );
        assert!(metadata_filter(Some("=x")).is_err());
        assert!(metadata_filter(None).unwrap().is_empty());
    }
}
