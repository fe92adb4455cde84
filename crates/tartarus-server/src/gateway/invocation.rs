//! One tool call from a sandbox, to its end: the ledger when the call has an idempotency key, the
//! invocation (an HTTP upstream or a host command), the signed receipt, and the trace record.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ipld_core::ipld::Ipld;
use tartarus_effects::receipt::{status, Receipt};
use tartarus_effects::{Cid, Signed, RECEIPT_FORMAT};
use tartarus_store::{LedgerCommit, LedgerEntry, ReceiptRecord};

use super::ledger::{self, Claimed};
use super::socket::Context;
use super::tools::{self, ToolDefinition};
use super::{GatewayError, MAX_TOOL_BODY};
use crate::effects::{link, Effects};
use crate::error::ApiError;

/// What a tool answered: an HTTP response (http tools) or an exit status and stdout (commands).
struct Reply {
    /// HTTP status or exit status.
    code: i64,
    ok: bool,
    body: Vec<u8>,
    content_type: Option<String>,
}

/// Why a tool gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum NoAnswer {
    #[error("declared without a url")]
    NoUrl,
    #[error("declared without a command")]
    NoCommand,
    /// The text carries the error's causes (what the upstream did), not the request.
    #[error("{}", describe_http_error(.0))]
    Upstream(reqwest::Error),
    #[error("the response is larger than {MAX_TOOL_BODY} bytes")]
    ResponseTooLarge,
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no stdin")]
    NoStdin,
    #[error("no stdout")]
    NoStdout,
    #[error("reading its output")]
    Output(#[source] std::io::Error),
    #[error("its output is larger than {MAX_TOOL_BODY} bytes")]
    OutputTooLarge,
    #[error("waiting for it")]
    Wait(#[source] std::io::Error),
    #[error("timed out after {} s", .0.as_secs())]
    TimedOut(Duration),
    #[error("it was killed by a signal")]
    Signal,
}

/// Runs the call to `name` that `context`'s sandbox made, to its end.
pub(super) async fn call(
    context: Arc<Context>,
    name: String,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, GatewayError> {
    let effects = &context.effects;
    let tool = tools::stored(&effects.store, &name)
        .await?
        .filter(|t| t.allows(&context.tenant))
        .ok_or_else(|| GatewayError::NoSuchTool { name: name.clone() })?;
    let key = ledger::idempotency_key(&headers)?;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let request_hash = Cid::of_bytes(&body);
    let mut epoch = None;
    if let Some(key) = &key {
        let holder = format!("{}:{}", effects.gateways.holder, context.sandbox);
        let claim = ledger::Call {
            tenant: &context.tenant,
            sandbox: &context.sandbox,
            key,
            tool: &tool.name,
            request_hash: &request_hash,
            holder: &holder,
            lease_ms: ledger::lease_ms(tool.timeout()),
        };
        match ledger::claim(effects, &claim).await? {
            Claimed::Acquired { epoch: e } => epoch = Some(e),
            Claimed::Replay(entry) => return Ok(replay(&context, &tool, (&request_hash, key), *entry).await),
        }
    }

    let started_at = tartarus_store::now_ms();
    let answer = invoke(effects, &tool, &context, content_type.as_deref(), body.to_vec()).await;
    let finished_at = tartarus_store::now_ms().max(started_at);
    let receipt_id = write_receipt(
        &context,
        &tool,
        (&request_hash, key.as_deref()),
        &answer,
        (started_at, finished_at),
    )
    .await?;
    trace_call(
        &context,
        &tool,
        (&request_hash, key.as_deref()),
        &receipt_id,
        &body,
        &answer,
    )
    .await?;

    let reply = match answer {
        Ok(reply) => reply,
        Err(source) => {
            if let (Some(key), Some(epoch)) = (&key, epoch) {
                // No answer: give the key up so that a retry runs the call again.
                ledger::abort(effects, &context.tenant, key, epoch).await?;
            }
            let error = GatewayError::ToolUnavailable { tool: name, source };
            let mut response = ApiError::from(error).into_response();
            set_receipt_headers(response.headers_mut(), Some(&receipt_id.to_string()), false);
            return Ok(response);
        }
    };
    let gateway_code = match tool.kind.as_str() {
        "http" => reply.code,
        _ if reply.ok => 200,
        _ => 502,
    };
    if let (Some(key), Some(epoch)) = (&key, epoch) {
        let commit = LedgerCommit {
            response_code: gateway_code,
            response_type: reply.content_type.as_deref(),
            response_body: &reply.body,
            receipt: &receipt_id.to_string(),
            now_ms: tartarus_store::now_ms(),
        };
        ledger::commit(effects, &context.tenant, key, epoch, &commit).await?;
    }
    let mut response = respond(
        gateway_code,
        reply.content_type.as_deref(),
        reply.body,
        Some(&receipt_id.to_string()),
        false,
    );
    if tool.kind == "command" {
        if let Ok(value) = HeaderValue::from_str(&reply.code.to_string()) {
            response.headers_mut().insert("tartarus-exit-code", value);
        }
    }
    Ok(response)
}

/// Answers a repeated call from the ledger, without invoking the tool; the trace records the replay.
async fn replay(
    context: &Context,
    tool: &ToolDefinition,
    (request_hash, key): (&Cid, &str),
    entry: LedgerEntry,
) -> Response {
    let mut attrs = call_attrs(&tool.name, key, request_hash);
    attrs.insert("replayed".into(), Ipld::Bool(true));
    if let Some(receipt) = entry.receipt.as_deref().and_then(|r| r.parse::<Cid>().ok()) {
        attrs.insert("receipt".into(), link(&receipt));
    }
    context
        .effects
        .trace(&context.sandbox, &context.tenant, "tool_call", attrs)
        .await;
    respond(
        entry.response_code.unwrap_or(200),
        entry.response_type.as_deref(),
        entry.response_body.unwrap_or_default(),
        entry.receipt.as_deref(),
        true,
    )
}

/// The receipt's status: the tool answered with success, answered with a failure, or gave no answer.
fn receipt_status(answer: &Result<Reply, NoAnswer>) -> &'static str {
    match answer {
        Ok(reply) if reply.ok => status::OK,
        Ok(_) => status::FAILED,
        Err(_) => status::ERROR,
    }
}

/// Signs and stores the call's receipt; its id.
async fn write_receipt(
    context: &Context,
    tool: &ToolDefinition,
    (request_hash, key): (&Cid, Option<&str>),
    answer: &Result<Reply, NoAnswer>,
    (started_at, finished_at): (i64, i64),
) -> Result<Cid, GatewayError> {
    let effects = &context.effects;
    let reply = answer.as_ref().ok();
    let receipt = Receipt {
        format: RECEIPT_FORMAT.to_string(),
        tool: tool.name.clone(),
        request_hash: *request_hash,
        response_hash: reply.map(|r| Cid::of_bytes(&r.body)),
        idempotency_key: key.map(str::to_string),
        sandbox: context.sandbox.clone(),
        tenant: context.tenant.clone(),
        started_at: started_at as u64,
        finished_at: finished_at as u64,
        status: receipt_status(answer).to_string(),
        code: reply.map(|r| r.code),
        // Every call its own receipt, even one identical to another in the same millisecond.
        nonce: Some(tartarus_effects::receipt::new_nonce().map_err(GatewayError::Signing)?),
    };
    metrics::counter!(crate::metrics::TOOL_CALLS.name, "status" => receipt.status.clone()).increment(1);
    let envelope = effects
        .with_keyring(|keyring| receipt.sign(keyring))
        .and_then(|e| e.encode())
        .map_err(GatewayError::Signing)?;
    let receipt_id = Cid::of_encoded(&envelope).map_err(GatewayError::Signing)?;
    effects
        .store
        .insert_receipt(&ReceiptRecord {
            id: receipt_id.to_string(),
            tenant: context.tenant.clone(),
            sandbox: context.sandbox.clone(),
            tool: tool.name.clone(),
            status: receipt.status,
            idempotency_key: key.map(str::to_string),
            created_ms: finished_at,
            envelope,
        })
        .await?;
    Ok(receipt_id)
}

/// The call's `tool_call` trace record, with the exact bytes of request and answer kept as blobs (the
/// receipt names them by hash) unless they hold a secret.
async fn trace_call(
    context: &Context,
    tool: &ToolDefinition,
    (request_hash, key): (&Cid, Option<&str>),
    receipt_id: &Cid,
    body: &[u8],
    answer: &Result<Reply, NoAnswer>,
) -> Result<(), GatewayError> {
    let effects = &context.effects;
    let mut attrs = call_attrs(&tool.name, key.unwrap_or(""), request_hash);
    if key.is_none() {
        attrs.remove("idempotency_key");
    }
    attrs.insert("receipt".into(), link(receipt_id));
    attrs.insert("status".into(), Ipld::String(receipt_status(answer).to_string()));
    let redactor = match effects.store.sandbox(&context.sandbox, None).await? {
        Some(record) => effects.redactor_for(&record),
        None => effects.redactor(&[], &[]),
    };
    let storable = |bytes: &[u8]| !redactor.contains_secret(bytes);
    if storable(body) {
        if let Some(cid) = effects.put_blob(&context.tenant, body.to_vec()).await {
            attrs.insert("request".into(), link(&cid));
        }
    }
    if let Ok(reply) = answer {
        if storable(&reply.body) {
            if let Some(cid) = effects.put_blob(&context.tenant, reply.body.clone()).await {
                attrs.insert("response".into(), link(&cid));
            }
        }
    }
    effects
        .trace(&context.sandbox, &context.tenant, "tool_call", attrs)
        .await;
    Ok(())
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
) -> Result<Reply, NoAnswer> {
    match tool.kind.as_str() {
        "http" => call_upstream(effects, tool, content_type, body).await,
        _ => run_command(tool, (&context.sandbox, &context.tenant), body).await,
    }
}

/// Calls an http tool's upstream: the declared URL, method and headers, redirects not followed.
async fn call_upstream(
    effects: &Effects,
    tool: &ToolDefinition,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<Reply, NoAnswer> {
    let url = tool.url.as_deref().ok_or(NoAnswer::NoUrl)?;
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
    let mut response = request.send().await.map_err(NoAnswer::Upstream)?;
    let code = i64::from(response.status().as_u16());
    let ok = response.status().is_success();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(NoAnswer::Upstream)? {
        if bytes.len() + chunk.len() > MAX_TOOL_BODY {
            return Err(NoAnswer::ResponseTooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Reply {
        code,
        ok,
        body: bytes,
        content_type,
    })
}

/// What went wrong with an upstream, with its causes (not the request, which names the upstream's URL).
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
async fn run_command(
    tool: &ToolDefinition,
    (sandbox, tenant): (&str, &str),
    body: Vec<u8>,
) -> Result<Reply, NoAnswer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let argv = tool.command.as_deref().unwrap_or_default();
    let program = argv.first().ok_or(NoAnswer::NoCommand)?;
    let mut child = tokio::process::Command::new(program)
        .args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("TARTARUS_SANDBOX", sandbox)
        .env("TARTARUS_TENANT", tenant)
        .env("TARTARUS_TOOL", &tool.name)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| NoAnswer::Spawn {
            program: program.clone(),
            source,
        })?;
    let mut stdin = child.stdin.take().ok_or(NoAnswer::NoStdin)?;
    let mut stdout = child.stdout.take().ok_or(NoAnswer::NoStdout)?;
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let run = async {
        let mut out = Vec::new();
        let mut limited = (&mut stdout).take(MAX_TOOL_BODY as u64 + 1);
        limited.read_to_end(&mut out).await.map_err(NoAnswer::Output)?;
        if out.len() > MAX_TOOL_BODY {
            return Err(NoAnswer::OutputTooLarge);
        }
        let status = child.wait().await.map_err(NoAnswer::Wait)?;
        Ok((out, status))
    };
    let result = tokio::time::timeout(tool.timeout(), run).await;
    feed.abort();
    let (out, status) = result.map_err(|_| NoAnswer::TimedOut(tool.timeout()))??;
    let code = status.code().ok_or(NoAnswer::Signal)?;
    Ok(Reply {
        code: i64::from(code),
        ok: code == 0,
        body: out,
        content_type: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str, timeout_s: Option<u64>) -> ToolDefinition {
        ToolDefinition {
            name: "sh".to_string(),
            description: None,
            kind: "command".to_string(),
            url: None,
            method: None,
            headers: BTreeMap::new(),
            command: Some(vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()]),
            timeout_s,
            tenants: None,
        }
    }

    async fn run(script: &str, body: &str) -> Result<Reply, NoAnswer> {
        run_command(&shell(script, None), ("sb_1", "team-a"), body.as_bytes().to_vec()).await
    }

    #[tokio::test]
    async fn test_a_command_gets_the_body_on_stdin_and_answers_on_stdout() {
        let reply = run("tr a-z A-Z", "hello").await.unwrap();
        assert_eq!((reply.code, reply.ok), (0, true));
        assert_eq!(reply.body, b"HELLO");
        assert_eq!(reply.content_type, None);
    }

    #[tokio::test]
    async fn test_a_command_runs_in_a_clean_environment_that_names_the_caller() {
        let reply = run("env | sort", "").await.unwrap();
        let env = String::from_utf8(reply.body).unwrap();
        let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
        // sh itself may add PWD (and SHLVL, _); nothing of the server's environment is passed.
        let own: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !matches!(*n, "PWD" | "SHLVL" | "_" | "OLDPWD"))
            .collect();
        assert_eq!(
            own,
            ["PATH", "TARTARUS_SANDBOX", "TARTARUS_TENANT", "TARTARUS_TOOL"],
            "{env}"
        );
        assert!(env.contains("TARTARUS_SANDBOX=sb_1\n") && env.contains("TARTARUS_TENANT=team-a\n"));
    }

    #[tokio::test]
    async fn test_a_failing_command_is_an_answer_with_its_exit_status() {
        let reply = run("echo partial; exit 3", "").await.unwrap();
        assert_eq!((reply.code, reply.ok), (3, false));
        assert_eq!(reply.body, b"partial\n");
    }

    #[tokio::test]
    async fn test_a_command_killed_by_a_signal_gives_no_answer() {
        assert!(matches!(run("kill -9 $$", "").await, Err(NoAnswer::Signal)));
    }

    #[tokio::test]
    async fn test_a_command_that_cannot_start_gives_no_answer() {
        let mut tool = shell("", None);
        tool.command = Some(vec!["/nonexistent/tool".to_string()]);
        let result = run_command(&tool, ("sb_1", "team-a"), Vec::new()).await;
        assert!(
            matches!(&result, Err(NoAnswer::Spawn { program, .. }) if program == "/nonexistent/tool"),
            "{:?}",
            result.err()
        );
    }

    #[tokio::test]
    async fn test_a_command_past_its_time_limit_gives_no_answer() {
        let tool = shell("sleep 30", Some(1));
        let result = run_command(&tool, ("sb_1", "team-a"), Vec::new()).await;
        assert!(matches!(result, Err(NoAnswer::TimedOut(t)) if t == Duration::from_secs(1)));
    }

    #[tokio::test]
    async fn test_output_beyond_the_limit_gives_no_answer() {
        let script = format!("head -c {} /dev/zero", MAX_TOOL_BODY + 1);
        assert!(matches!(run(&script, "").await, Err(NoAnswer::OutputTooLarge)));
        let script = format!("head -c {MAX_TOOL_BODY} /dev/zero");
        assert_eq!(run(&script, "").await.unwrap().body.len(), MAX_TOOL_BODY);
    }

    #[test]
    fn test_receipt_status_says_whether_the_tool_answered_and_how() {
        let reply = |ok| Reply {
            code: 0,
            ok,
            body: Vec::new(),
            content_type: None,
        };
        assert_eq!(receipt_status(&Ok(reply(true))), status::OK);
        assert_eq!(receipt_status(&Ok(reply(false))), status::FAILED);
        assert_eq!(receipt_status(&Err(NoAnswer::Signal)), status::ERROR);
    }
}
