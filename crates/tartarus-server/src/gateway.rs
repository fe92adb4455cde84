//! Tools and the gateway: the only way a sandbox reaches a tool.
//!
//! The operator declares tools (`POST /v1/tools`): an HTTP upstream (the URL, method and headers are
//! fixed by the declaration, so a sandbox cannot choose the host; redirects are not followed) or a host
//! command (the request body on stdin, the response from stdout). Every sandbox that belongs to a tenant
//! gets its own gateway: an HTTP server on a Unix socket, `/run/tartarus/gateway.sock` inside the
//! sandbox (bind-mounted read-only from `DATA_DIR/gateway/<id>/`), so the socket a request arrives on
//! says which sandbox made it — nothing in the request can claim another identity.
//!
//! Inside the sandbox: `GET /v1/tools` lists the tools its tenant may call; `POST /v1/tools/{name}`
//! calls one with the request body, optionally with an `Idempotency-Key` header. Every invocation yields
//! a signed receipt (`Tartarus-Receipt: <id>` on the answer); a key runs the call through the ledger
//! (register → commit under a lease, see `tartarus_store::effects`): a repeat with the same body gets the
//! stored answer (`Tartarus-Replayed: true`) without invoking the tool, another body is a divergence (409).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tartarus_effects::Signed;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ipld_core::ipld::Ipld;
use serde::{Deserialize, Serialize};
use tartarus_effects::receipt::{status, Receipt};
use tartarus_effects::{Cid, RECEIPT_FORMAT};
use tartarus_store::{Claim, ClaimRequest, LedgerCommit, NewEvent, ReceiptRecord, SandboxRecord, Store};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::effects::{link, Effects};
use crate::error::{json_rejection, ApiError};
use crate::AppState;

/// Largest request or response body of a tool call.
pub const MAX_TOOL_BODY: usize = 8 << 20;
/// A tool's default time limit.
const DEFAULT_TIMEOUT_S: u64 = 30;
/// How much longer than the tool's time limit a ledger lease lasts: a holder that has not answered by
/// then is presumed dead and a retry may take over.
const LEASE_MARGIN_MS: i64 = 5_000;
/// The socket's name in the gateway directory.
pub const SOCKET: &str = "gateway.sock";

/// A declared tool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolDefinition {
    /// 1–64 of `a-z`, `0-9`, `-`, `_`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `http` or `command`.
    pub kind: String,
    /// For `http`: the upstream URL (http or https) every call goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// For `http`: the method (default POST).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// For `http`: headers added to every call (credentials live here, never in the sandbox; their values
    /// are redacted from traces).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// For `command`: the program (absolute path) and its arguments, run on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Time limit of one call in seconds (default 30, at most 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Tenants that may call it (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<Vec<String>>,
}

impl ToolDefinition {
    /// Checks the declaration; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(format!(
                "tool name '{}': use 1-64 lower-case letters, digits, '-' or '_'",
                self.name
            ));
        }
        if self.timeout_s.is_some_and(|t| !(1..=3600).contains(&t)) {
            return Err("timeout_s must be between 1 and 3600".to_string());
        }
        match self.kind.as_str() {
            "http" => {
                if self.command.is_some() {
                    return Err("an http tool has no 'command'".to_string());
                }
                let url = self.url.as_deref().ok_or("an http tool needs 'url'")?;
                let parsed = reqwest::Url::parse(url).map_err(|e| format!("url '{url}': {e}"))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                    return Err(format!("url '{url}': use http:// or https:// with a host"));
                }
                if let Some(method) = &self.method {
                    reqwest::Method::from_bytes(method.as_bytes())
                        .map_err(|_| format!("method '{method}' is not an HTTP method"))?;
                }
                for (name, value) in &self.headers {
                    reqwest::header::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("header name '{name}' is not valid"))?;
                    HeaderValue::from_str(value)
                        .map_err(|_| format!("header '{name}' has an invalid value"))?;
                }
            }
            "command" => {
                if self.url.is_some() || self.method.is_some() || !self.headers.is_empty() {
                    return Err("a command tool has no 'url', 'method' or 'headers'".to_string());
                }
                let argv = self.command.as_deref().unwrap_or_default();
                match argv.first() {
                    Some(program) if program.starts_with('/') => {}
                    _ => {
                        return Err(
                            "a command tool needs 'command' starting with an absolute path".to_string()
                        )
                    }
                }
            }
            other => return Err(format!("unknown tool kind '{other}': use http or command")),
        }
        Ok(())
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S))
    }

    fn allows(&self, tenant: &str) -> bool {
        self.tenants
            .as_ref()
            .is_none_or(|t| t.iter().any(|allowed| allowed == tenant))
    }

    /// The declaration as shown to callers: header values hidden.
    pub fn public(&self) -> ToolDefinition {
        ToolDefinition {
            headers: self
                .headers
                .keys()
                .map(|k| (k.clone(), "(hidden)".to_string()))
                .collect(),
            ..self.clone()
        }
    }
}

/// The open gateways, by sandbox.
#[derive(Clone)]
pub struct Gateways {
    open: Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>>,
    /// Names this server's ledger leases.
    holder: Arc<str>,
    http: reqwest::Client,
}

impl Default for Gateways {
    fn default() -> Self {
        Self::new()
    }
}

impl Gateways {
    pub fn new() -> Self {
        let suffix = tartarus_hostsys::random_hex(4).unwrap_or_default();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Gateways {
            open: Arc::new(Mutex::new(HashMap::new())),
            holder: format!("{}:{}:{suffix}", crate::metrics::node_name(), std::process::id()).into(),
            http,
        }
    }

    /// Serves the gateway of `record`'s sandbox on `dir/gateway.sock`.
    pub fn open(&self, effects: &Effects, record: &SandboxRecord, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(SOCKET);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = tokio::net::UnixListener::bind(&path)?;
        // The sandbox's user is an unprivileged host id: it may connect, the socket's directory is the
        // sandbox's own and mounted read-only.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let context = Arc::new(Context {
            effects: effects.clone(),
            sandbox: record.id.clone(),
            tenant: record.tenant.clone(),
        });
        let app = Router::new()
            .route("/v1/tools", get(sandbox_tools))
            .route("/v1/tools/{name}", post(call_tool))
            .fallback(|| async {
                ApiError::not_found("the gateway serves GET /v1/tools and POST /v1/tools/{name}")
            })
            .layer(axum::extract::DefaultBodyLimit::max(MAX_TOOL_BODY))
            .with_state(context);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("tool gateway: {e}");
            }
        });
        if let Ok(mut open) = self.open.lock() {
            if let Some(old) = open.insert(record.id.clone(), task.abort_handle()) {
                old.abort();
            }
        }
        Ok(())
    }

    /// Stops serving a sandbox's gateway.
    pub fn close(&self, id: &str) {
        if let Some(task) = self.open.lock().ok().and_then(|mut open| open.remove(id)) {
            task.abort();
        }
    }
}

struct Context {
    effects: Effects,
    sandbox: String,
    tenant: String,
}

async fn tool_definition(store: &Store, name: &str) -> Result<Option<ToolDefinition>, ApiError> {
    let Some(record) = store.tool(name).await? else {
        return Ok(None);
    };
    serde_json::from_str(&record.definition)
        .map(Some)
        .map_err(|e| ApiError::internal(format!("stored tool '{name}': {e}")))
}

async fn sandbox_tools(State(context): State<Arc<Context>>) -> Result<Json<Vec<ToolDefinition>>, ApiError> {
    let mut tools = Vec::new();
    for record in context.effects.store.tools().await? {
        if let Ok(tool) = serde_json::from_str::<ToolDefinition>(&record.definition) {
            if tool.allows(&context.tenant) {
                tools.push(tool.public());
            }
        }
    }
    Ok(Json(tools))
}

/// What the tool answered.
struct Answer {
    /// HTTP status (http tools) or exit status (commands); `None` when there was no answer.
    code: Option<i64>,
    ok: bool,
    body: Vec<u8>,
    content_type: Option<String>,
    /// Why there was no answer.
    error: Option<String>,
}

async fn call_tool(
    State(context): State<Arc<Context>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // A call, once started, finishes even if the caller hangs up: the tool may already have acted, and
    // its receipt and ledger entry must be written either way.
    tokio::spawn(call_tool_to_end(context, name, headers, body))
        .await
        .map_err(|e| ApiError::internal(format!("tool call: {e}")))?
}

async fn call_tool_to_end(
    context: Arc<Context>,
    name: String,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let effects = &context.effects;
    let tool = tool_definition(&effects.store, &name)
        .await?
        .filter(|t| t.allows(&context.tenant))
        .ok_or_else(|| ApiError::not_found(format!("no tool '{name}' (GET /v1/tools lists them)")))?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
                .ok_or_else(|| ApiError::invalid("Idempotency-Key must be 1-255 visible ASCII characters"))?
                .to_string(),
        ),
    };
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let request_hash = Cid::of_bytes(&body);
    let lease_ms = tool.timeout().as_millis() as i64 + LEASE_MARGIN_MS;
    let mut epoch = None;
    if let Some(key) = &key {
        let holder = format!("{}:{}", effects.gateways.holder, context.sandbox);
        let hash = request_hash.to_string();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(lease_ms as u64 + 1_000);
        loop {
            let claim = ClaimRequest {
                tenant: &context.tenant,
                key,
                tool: &tool.name,
                request_hash: &hash,
                holder: &holder,
                now_ms: tartarus_store::now_ms(),
                lease_ms,
            };
            match effects.store.ledger_claim(&claim).await? {
                Claim::Acquired { epoch: e } => {
                    epoch = Some(e);
                    break;
                }
                Claim::Replay(entry) => {
                    metrics::counter!(crate::metrics::LEDGER_OUTCOMES, "tool" => tool.name.clone(), "outcome" => "replay")
                        .increment(1);
                    let mut attrs = call_attrs(&tool.name, key, &request_hash);
                    attrs.insert("replayed".into(), Ipld::Bool(true));
                    if let Some(receipt) = entry.receipt.as_deref().and_then(|r| r.parse::<Cid>().ok()) {
                        attrs.insert("receipt".into(), link(&receipt));
                    }
                    effects
                        .trace(&context.sandbox, &context.tenant, "tool_call", attrs)
                        .await;
                    let code = entry.response_code.unwrap_or(200);
                    return Ok(respond(
                        code,
                        entry.response_type.as_deref(),
                        entry.response_body.unwrap_or_default(),
                        entry.receipt.as_deref(),
                        true,
                    ));
                }
                Claim::Divergent(entry) => {
                    metrics::counter!(crate::metrics::LEDGER_OUTCOMES, "tool" => tool.name.clone(), "outcome" => "divergence")
                        .increment(1);
                    let message = format!(
                        "idempotency key '{key}' was first used with another request to tool '{}' \
                         (request {}); this request is {request_hash}: use a new key for a different request",
                        entry.tool, entry.request_hash
                    );
                    let details = serde_json::json!({
                        "key": key, "tool": tool.name, "stored_request": entry.request_hash,
                        "request": request_hash.to_string(), "divergences": entry.divergences,
                    })
                    .to_string();
                    let event = NewEvent {
                        category: "effects",
                        kind: "idempotency.divergence",
                        sandbox: Some(&context.sandbox),
                        tenant: Some(&context.tenant),
                        message: &message,
                        details: Some(&details),
                    };
                    if let Err(e) = effects.store.record_event(&event).await {
                        tracing::error!("recording a divergence failed: {e}");
                    }
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "idempotency_divergence",
                        message,
                    ));
                }
                Claim::Busy(_) if tokio::time::Instant::now() < deadline => {
                    // Another call with this key is running: look again shortly (it commits, aborts or
                    // its lease runs out; the lease bounds the wait).
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Claim::Busy(entry) => {
                    return Err(ApiError::conflict(format!(
                        "a call with idempotency key '{key}' is still in progress (held by {}); retry later",
                        entry.holder
                    )))
                }
            }
        }
    }

    let started_at = tartarus_store::now_ms();
    let answer = invoke(effects, &tool, &context, content_type.as_deref(), body.to_vec()).await;
    let finished_at = tartarus_store::now_ms().max(started_at);
    let receipt = Receipt {
        format: RECEIPT_FORMAT.to_string(),
        tool: tool.name.clone(),
        request_hash,
        response_hash: answer.code.map(|_| Cid::of_bytes(&answer.body)),
        idempotency_key: key.clone(),
        sandbox: context.sandbox.clone(),
        tenant: context.tenant.clone(),
        started_at: started_at as u64,
        finished_at: finished_at as u64,
        status: match (answer.code, answer.ok) {
            (None, _) => status::ERROR,
            (Some(_), true) => status::OK,
            (Some(_), false) => status::FAILED,
        }
        .to_string(),
        code: answer.code,
    };
    metrics::counter!(crate::metrics::TOOL_CALLS, "tool" => tool.name.clone(), "status" => receipt.status.clone())
        .increment(1);
    let envelope = effects
        .with_keyring(|keyring| receipt.sign(keyring))
        .and_then(|e| e.encode())
        .map_err(|e| ApiError::internal(format!("signing the receipt: {e}")))?;
    let receipt_id = Cid::of_encoded(&envelope).map_err(|e| ApiError::internal(e.to_string()))?;
    effects
        .store
        .insert_receipt(&ReceiptRecord {
            id: receipt_id.to_string(),
            tenant: context.tenant.clone(),
            sandbox: context.sandbox.clone(),
            tool: tool.name.clone(),
            status: receipt.status.clone(),
            idempotency_key: key.clone(),
            created_ms: finished_at,
            envelope,
        })
        .await?;
    // The exact bytes, kept for the episode (the receipt names them by hash).
    let mut attrs = call_attrs(&tool.name, key.as_deref().unwrap_or(""), &request_hash);
    if key.is_none() {
        attrs.remove("idempotency_key");
    }
    attrs.insert("receipt".into(), link(&receipt_id));
    attrs.insert("status".into(), Ipld::String(receipt.status.clone()));
    let redactor = match effects.store.sandbox(&context.sandbox, None).await? {
        Some(record) => effects.redactor_for(&record),
        None => effects.redactor(&[], &[]),
    };
    let storable = |bytes: &[u8]| !redactor.contains_secret(bytes);
    if storable(&body) {
        if let Some(cid) = effects.put_blob(&context.tenant, body.to_vec()).await {
            attrs.insert("request".into(), link(&cid));
        }
    }
    if answer.code.is_some() && storable(&answer.body) {
        if let Some(cid) = effects.put_blob(&context.tenant, answer.body.clone()).await {
            attrs.insert("response".into(), link(&cid));
        }
    }
    effects
        .trace(&context.sandbox, &context.tenant, "tool_call", attrs)
        .await;

    let Some(code) = answer.code else {
        if let (Some(key), Some(epoch)) = (&key, epoch) {
            // No answer: give the key up so that a retry runs the call again.
            effects.store.ledger_abort(&context.tenant, key, epoch).await?;
        }
        let message = answer
            .error
            .unwrap_or_else(|| "the tool gave no answer".to_string());
        let mut response = ApiError::new(
            StatusCode::BAD_GATEWAY,
            "tool_unavailable",
            format!("tool '{name}': {message}"),
        )
        .into_response();
        set_receipt_headers(response.headers_mut(), Some(&receipt_id.to_string()), false);
        return Ok(response);
    };
    let gateway_code = match tool.kind.as_str() {
        "http" => code,
        _ if answer.ok => 200,
        _ => 502,
    };
    if let (Some(key), Some(epoch)) = (&key, epoch) {
        let commit = LedgerCommit {
            response_code: gateway_code,
            response_type: answer.content_type.as_deref(),
            response_body: &answer.body,
            receipt: &receipt_id.to_string(),
            now_ms: tartarus_store::now_ms(),
        };
        if !effects
            .store
            .ledger_commit(&context.tenant, key, epoch, &commit)
            .await?
        {
            // The lease ran out during the call and a retry took the key over: this answer is not the
            // key's answer. The receipt still records that the tool ran.
            return Err(ApiError::conflict(format!(
                "idempotency key '{key}': this call outlived its lease and a retry took it over; \
                 its answer was not recorded (receipt {receipt_id})"
            )));
        }
    }
    let mut response = respond(
        gateway_code,
        answer.content_type.as_deref(),
        answer.body,
        Some(&receipt_id.to_string()),
        false,
    );
    if tool.kind == "command" {
        if let Ok(value) = HeaderValue::from_str(&code.to_string()) {
            response.headers_mut().insert("tartarus-exit-code", value);
        }
    }
    Ok(response)
}

fn call_attrs(tool: &str, key: &str, request_hash: &Cid) -> BTreeMap<String, Ipld> {
    BTreeMap::from([
        ("tool".to_string(), Ipld::String(tool.to_string())),
        ("idempotency_key".to_string(), Ipld::String(key.to_string())),
        ("request_hash".to_string(), link(request_hash)),
        ("replayed".to_string(), Ipld::Bool(false)),
    ])
}

fn set_receipt_headers(headers: &mut HeaderMap, receipt: Option<&str>, replayed: bool) {
    if let Some(value) = receipt.and_then(|r| HeaderValue::from_str(r).ok()) {
        headers.insert("tartarus-receipt", value);
    }
    headers.insert(
        "tartarus-replayed",
        HeaderValue::from_static(if replayed { "true" } else { "false" }),
    );
}

fn respond(
    code: i64,
    content_type: Option<&str>,
    body: Vec<u8>,
    receipt: Option<&str>,
    replayed: bool,
) -> Response {
    let status = u16::try_from(code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, body).into_response();
    if let Some(value) = content_type.and_then(|t| HeaderValue::from_str(t).ok()) {
        response
            .headers_mut()
            .insert(axum::http::header::CONTENT_TYPE, value);
    }
    set_receipt_headers(response.headers_mut(), receipt, replayed);
    response
}

async fn invoke(
    effects: &Effects,
    tool: &ToolDefinition,
    context: &Context,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Answer {
    let no_answer = |error: String| Answer {
        code: None,
        ok: false,
        body: Vec::new(),
        content_type: None,
        error: Some(error),
    };
    match tool.kind.as_str() {
        "http" => {
            let Some(url) = tool.url.as_deref() else {
                return no_answer("declared without a url".to_string());
            };
            let method = tool
                .method
                .as_deref()
                .and_then(|m| reqwest::Method::from_bytes(m.as_bytes()).ok())
                .unwrap_or(reqwest::Method::POST);
            let mut request = effects
                .gateways
                .http
                .request(method, url)
                .timeout(tool.timeout())
                .body(body);
            if let Some(content_type) = content_type {
                request = request.header(reqwest::header::CONTENT_TYPE, content_type);
            }
            for (name, value) in &tool.headers {
                request = request.header(name.as_str(), value.as_str());
            }
            let mut response = match request.send().await {
                Ok(r) => r,
                Err(e) => return no_answer(describe_http_error(&e)),
            };
            let code = i64::from(response.status().as_u16());
            let ok = response.status().is_success();
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let mut bytes = Vec::new();
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) if bytes.len() + chunk.len() <= MAX_TOOL_BODY => {
                        bytes.extend_from_slice(&chunk)
                    }
                    Ok(Some(_)) => {
                        return no_answer(format!("the response is larger than {MAX_TOOL_BODY} bytes"))
                    }
                    Ok(None) => break,
                    Err(e) => return no_answer(describe_http_error(&e)),
                }
            }
            Answer {
                code: Some(code),
                ok,
                body: bytes,
                content_type,
                error: None,
            }
        }
        _ => run_command(tool, context, body).await.unwrap_or_else(no_answer),
    }
}

fn describe_http_error(e: &reqwest::Error) -> String {
    let mut message = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect to the upstream".to_string()
    } else {
        "the upstream request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// Runs a command tool on the host: the body on stdin, the answer from stdout; a clean environment.
async fn run_command(tool: &ToolDefinition, context: &Context, body: Vec<u8>) -> Result<Answer, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let argv = tool.command.as_deref().unwrap_or_default();
    let program = argv.first().ok_or("declared without a command")?;
    let mut child = tokio::process::Command::new(program)
        .args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("TARTARUS_SANDBOX", &context.sandbox)
        .env("TARTARUS_TENANT", &context.tenant)
        .env("TARTARUS_TOOL", &tool.name)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let run = async {
        let mut out = Vec::new();
        let mut limited = (&mut stdout).take(MAX_TOOL_BODY as u64 + 1);
        limited
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("reading its output: {e}"))?;
        if out.len() > MAX_TOOL_BODY {
            return Err(format!("its output is larger than {MAX_TOOL_BODY} bytes"));
        }
        let status = child.wait().await.map_err(|e| format!("waiting for it: {e}"))?;
        Ok((out, status))
    };
    let result = tokio::time::timeout(tool.timeout(), run).await;
    feed.abort();
    let (out, status) = match result {
        Ok(result) => result?,
        Err(_) => return Err(format!("timed out after {} s", tool.timeout().as_secs())),
    };
    let Some(code) = status.code() else {
        return Err("it was killed by a signal".to_string());
    };
    Ok(Answer {
        code: Some(i64::from(code)),
        ok: code == 0,
        body: out,
        content_type: None,
        error: None,
    })
}

// ---- The operator's API: /v1/tools ----

/// Declare (or replace) a tool. Admin only.
#[utoipa::path(post, path = "/v1/tools", request_body = ToolDefinition, security(("api_key" = [])),
    responses((status = 201, body = ToolDefinition), (status = 403), (status = 422)))]
pub async fn put_tool(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<ToolDefinition>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<ToolDefinition>), ApiError> {
    if caller.role != tartarus_store::Role::Admin {
        return Err(ApiError::forbidden("only admin keys may declare tools"));
    }
    let Json(tool) = body.map_err(json_rejection)?;
    tool.validate().map_err(ApiError::invalid)?;
    let json = serde_json::to_string(&tool).map_err(|e| ApiError::internal(e.to_string()))?;
    state.store.put_tool(&tool.name, &json).await?;
    refresh_redactor(&state.effects).await?;
    crate::audit(&state, &caller, "tool.put", Some(&tool.name), "ok").await;
    Ok((StatusCode::CREATED, Json(tool.public())))
}

/// The declared tools (header values hidden).
#[utoipa::path(get, path = "/v1/tools", security(("api_key" = [])), responses((status = 200, body = [ToolDefinition])))]
pub async fn list_tools(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Vec<ToolDefinition>>, ApiError> {
    let mut tools = Vec::new();
    for record in state.store.tools().await? {
        let tool: ToolDefinition = serde_json::from_str(&record.definition)
            .map_err(|e| ApiError::internal(format!("stored tool '{}': {e}", record.name)))?;
        tools.push(tool.public());
    }
    Ok(Json(tools))
}

/// Remove a tool. Admin only.
#[utoipa::path(delete, path = "/v1/tools/{name}", security(("api_key" = [])), responses((status = 204), (status = 404)))]
pub async fn delete_tool(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    if caller.role != tartarus_store::Role::Admin {
        return Err(ApiError::forbidden("only admin keys may remove tools"));
    }
    if !state.store.delete_tool(&name).await? {
        return Err(ApiError::not_found(format!("no tool '{name}'")));
    }
    refresh_redactor(&state.effects).await?;
    crate::audit(&state, &caller, "tool.delete", Some(&name), "ok").await;
    Ok(StatusCode::NO_CONTENT)
}

/// Makes the declared tools' header values (credentials) secrets that traces never show.
pub async fn refresh_redactor(effects: &Effects) -> Result<(), ApiError> {
    let mut secrets = Vec::new();
    for record in effects.store.tools().await? {
        if let Ok(tool) = serde_json::from_str::<ToolDefinition>(&record.definition) {
            secrets.extend(tool.headers.into_values());
        }
    }
    if let Ok(mut slot) = effects.tool_secrets.write() {
        *slot = secrets;
    }
    Ok(())
}
