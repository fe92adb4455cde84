//! `POST /v1/sandboxes/{id}/exec`: buffered or streamed (Server-Sent Events), with its trace record.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::Json;
use tartarus_runtime::SandboxSpec;
use tartarus_store::SandboxRecord;

use super::sandboxes::on_node;
use crate::api::{ExecBody, ExecResult};
use crate::auth::Caller;
use crate::error::{json_rejection, ApiError, ErrorBody};
use crate::{audit, cluster, effects, find, sandboxes, AppState};

/// Run a command inside a running sandbox and return its output.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", request_body = ExecBody, security(("api_key" = [])),
    responses((status = 200, content((ExecResult = "application/json"),
                                      (String = "text/event-stream", example = "with `stream`: Server-Sent Events"))),
               (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
               (status = 422, body = ErrorBody),
               (status = 429, body = ErrorBody, description = "the sandbox already runs its most execs at once (`Retry-After`)")))]
pub(crate) async fn exec_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let started = std::time::Instant::now();
    let record = find(&state, &caller, &id).await?;
    caller.require_mutate()?;
    let Json(body) = body.map_err(json_rejection)?;
    check_exec(&body)?;
    if !record.status.is_live() {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}",
            record.status.as_str()
        )));
    }
    if record.node.is_some() {
        if body.stream {
            let bytes = serde_json::to_vec(&body).map_err(|e| ApiError::internal(e.to_string()))?;
            let answer = cluster::forward(
                &state,
                &record,
                reqwest::Method::POST,
                ("/exec", &[]),
                Some("application/json"),
                bytes.into(),
            )
            .await;
            let outcome = if answer.as_ref().is_ok_and(|r| r.status().is_success()) {
                "ok"
            } else {
                "failed"
            };
            crate::metrics::operation("exec", &record.runtime, outcome == "ok", started);
            audit(&state, &caller, "sandbox.exec", Some(&id), outcome).await;
            return answer;
        }
        let forwarded = serde_json::to_value(&body).map_err(|e| ApiError::internal(e.to_string()))?;
        let result = on_node(&state, &record, reqwest::Method::POST, "/exec", Some(forwarded)).await;
        let outcome = match &result {
            Ok((status, _)) if status.is_success() => "ok",
            _ => "failed",
        };
        crate::metrics::operation("exec", &record.runtime, outcome == "ok", started);
        audit(&state, &caller, "sandbox.exec", Some(&id), outcome).await;
        let (status, answer) = result?;
        return Ok((status, Json(answer)).into_response());
    }
    // Each exec holds a shim connection, a process and its output buffers until it ends: bounded per sandbox.
    let Some(slot) = state.manager.execs.try_hold(&record.id) else {
        return Ok(crate::limits::too_many_requests(format!(
            "sandbox {id} already runs {} execs; retry when one has ended",
            crate::limits::EXECS_PER_SANDBOX
        )));
    };
    let request = shim_request(&body, sandboxes::stored_spec(&record)?);
    let env = request.env.clone();
    if body.stream {
        let cwd = request.workdir.clone();
        let result = match state.manager.exec_stream(&record, request).await {
            Err(e) if e.status.is_server_error() => Err(explain_start_failure(&state, &record, cwd, e).await),
            other => other,
        };
        let error = result.as_ref().err().map(|e| e.message.as_str());
        trace_exec(&state, &record, (&body.cmd, &env), error, None).await;
        crate::metrics::operation("exec", &record.runtime, result.is_ok(), started);
        audit(
            &state,
            &caller,
            "sandbox.exec",
            Some(&id),
            if result.is_ok() { "ok" } else { "failed" },
        )
        .await;
        return Ok(sse_exec(result?, slot).into_response());
    }
    let cwd = request.workdir.clone();
    let result = state.manager.exec(&record, request).await.map(ExecResult::from);
    drop(slot);
    let result = match result {
        Err(e) if e.status.is_server_error() => Err(explain_start_failure(&state, &record, cwd, e).await),
        other => other,
    };
    let error = result.as_ref().err().map(|e| e.message.as_str());
    trace_exec(&state, &record, (&body.cmd, &env), error, result.as_ref().ok()).await;
    crate::metrics::operation("exec", &record.runtime, result.is_ok(), started);
    audit(
        &state,
        &caller,
        "sandbox.exec",
        Some(&id),
        if result.is_ok() { "ok" } else { "failed" },
    )
    .await;
    Ok(Json(result?).into_response())
}

/// The shim's request for `body` in a sandbox made from `base`: the sandbox's own env first (pooled
/// sandboxes start without one), then the request's; the sandbox's working directory (an image's or
/// template's) unless the request names one.
pub(crate) fn shim_request(body: &ExecBody, base: SandboxSpec) -> tartarus_shim::protocol::ExecRequest {
    tartarus_shim::protocol::ExecRequest {
        command: body.cmd.clone(),
        env: base.env.into_iter().chain(body.env.clone()).collect(),
        workdir: body
            .cwd
            .clone()
            .or_else(|| base.workdir.map(|w| w.display().to_string())),
        stdin: body.stdin.clone().unwrap_or_default().into_bytes(),
        timeout_ms: body.timeout_s.map(|t| (t * 1000.0) as u64),
        stream: body.stream,
    }
}

/// Largest command line an exec takes: `cmd`, `env` and `cwd` together, as JSON (the sandbox's control
/// channel carries one request in 256 KiB, and the kernel takes no argument over 128 KiB).
pub const MAX_EXEC_ARGS: usize = 128 << 10;

/// Refuses what no sandbox could run: an empty command, NUL bytes (the kernel's strings end at them), env
/// names that are empty or hold `=`, a command line over [`MAX_EXEC_ARGS`], a timeout outside (0, 86400] s.
pub(crate) fn check_exec(body: &ExecBody) -> Result<(), ApiError> {
    if body.cmd.is_empty() {
        return Err(ApiError::invalid("cmd must not be empty"));
    }
    if let Some(i) = body.cmd.iter().position(|a| a.contains('\0')) {
        return Err(ApiError::invalid(format!("cmd[{i}] contains a NUL byte")));
    }
    for (name, value) in &body.env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(ApiError::invalid(format!(
                "invalid environment variable name {name:?}: it must be non-empty, without '=' or NUL"
            )));
        }
        if value.contains('\0') {
            return Err(ApiError::invalid(format!(
                "environment variable {name} contains a NUL byte"
            )));
        }
    }
    if let Some(cwd) = &body.cwd {
        if cwd.contains('\0') {
            return Err(ApiError::invalid("cwd contains a NUL byte"));
        }
        if !cwd.starts_with('/') || cwd.split('/').any(|c| c == "..") {
            return Err(ApiError::invalid(format!(
                "cwd '{cwd}' must be absolute, without '..'"
            )));
        }
    }
    let size = serde_json::to_vec(&(&body.cmd, &body.env, &body.cwd)).map_or(usize::MAX, |v| v.len());
    if size > MAX_EXEC_ARGS {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "cmd, env and cwd take {size} bytes; at most {} KiB (pass large data as stdin or a file)",
                MAX_EXEC_ARGS >> 10
            ),
        ));
    }
    if body.timeout_s.is_some_and(|t| !(t > 0.0 && t <= 86_400.0)) {
        return Err(ApiError::invalid("timeout_s must be in (0, 86400]"));
    }
    Ok(())
}

/// An exec that could not start for a host reason may have failed on its working directory, which is the
/// request's fault: look at the directory the way the command would have (a listing inside the sandbox)
/// and say so; otherwise the original error stands.
async fn explain_start_failure(
    state: &AppState,
    record: &SandboxRecord,
    cwd: Option<String>,
    error: ApiError,
) -> ApiError {
    let Some(cwd) = cwd else { return error };
    match state.manager.shim(record).list_dir(&cwd).await {
        Err(e) => match e.code() {
            Some(tartarus_shim::protocol::ErrorCode::NotFound) => {
                ApiError::invalid(format!("cwd '{cwd}' does not exist in the sandbox"))
            }
            Some(tartarus_shim::protocol::ErrorCode::WrongType) => {
                ApiError::invalid(format!("cwd '{cwd}' is not a directory"))
            }
            Some(tartarus_shim::protocol::ErrorCode::Forbidden) => {
                ApiError::invalid(format!("cwd '{cwd}' is not accessible to the sandbox user"))
            }
            _ => error,
        },
        Ok(_) => error,
    }
}

/// The `exec` trace record: the command (secrets redacted), and its outcome with the output kept as
/// blobs; a streamed exec's output is not kept.
pub(crate) async fn trace_exec(
    state: &AppState,
    record: &SandboxRecord,
    (cmd, env): (&[String], &[(String, String)]),
    error: Option<&str>,
    result: Option<&ExecResult>,
) {
    use ipld_core::ipld::Ipld;
    let redactor = state.effects.redactor(env, &[]);
    let mut attrs = std::collections::BTreeMap::new();
    attrs.insert(
        "cmd".to_string(),
        Ipld::List(cmd.iter().map(|a| redactor.text(a)).collect()),
    );
    if let Some(error) = error {
        attrs.insert("error".to_string(), redactor.text(error));
    }
    match result {
        Some(result) => {
            attrs.insert("exit_code".to_string(), Ipld::Integer(result.exit_code.into()));
            attrs.insert(
                "wall_ms".to_string(),
                Ipld::Integer((result.wall_ms.max(0.0) as u64).into()),
            );
            attrs.insert("timed_out".to_string(), Ipld::Bool(result.timed_out));
            for (name, output) in [("stdout", &result.stdout), ("stderr", &result.stderr)] {
                if output.is_empty() {
                    continue;
                }
                let value = if redactor.contains_secret(output.as_bytes()) {
                    redactor.text(output)
                } else {
                    match state
                        .effects
                        .put_blob(&record.tenant, output.as_bytes().to_vec())
                        .await
                    {
                        Some(cid) => effects::link(&cid),
                        None => continue,
                    }
                };
                attrs.insert(name.to_string(), value);
            }
        }
        None if error.is_none() => {
            attrs.insert("stream".to_string(), Ipld::Bool(true));
        }
        None => {}
    }
    state
        .effects
        .trace(&record.id, &record.tenant, "exec", attrs)
        .await;
}

/// Turns the shim's stream events into Server-Sent Events: `stdout`/`stderr` with a JSON string, then
/// `exit` with `{exit_code, signal, wall_ms, timed_out}`. The exec's `slot` is held until the stream ends.
pub(crate) fn sse_exec(
    events: sandboxes::ExecEvents,
    slot: crate::limits::Held,
) -> impl axum::response::IntoResponse {
    use axum::response::sse::{Event, Sse};
    use tartarus_shim::protocol::StreamEvent;
    let events = futures_util::stream::unfold(Some((events, slot)), |state| async move {
        let (mut events, slot) = state?;
        loop {
            let event = match events.next().await? {
                Ok(StreamEvent::Output { stream, data }) => {
                    let data = serde_json::Value::String(data).to_string();
                    Event::default().event(stream.as_str()).data(data)
                }
                Ok(StreamEvent::Exit(exit)) => {
                    let data = serde_json::to_string(&exit).unwrap_or_default();
                    return Some((
                        Ok::<_, std::convert::Infallible>(Event::default().event("exit").data(data)),
                        None,
                    ));
                }
                Ok(StreamEvent::Started) => continue,
                Err(e) => {
                    tracing::error!(
                        "a streaming exec's event is unreadable: {}",
                        tartarus_runtime::error_chain(&e)
                    );
                    return None;
                }
            };
            return Some((Ok(event), Some((events, slot))));
        }
    });
    Sse::new(events)
}
