//! `POST /v1/sandboxes/{id}/exec`: buffered or streamed (Server-Sent Events), with its trace record.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::Json;
use tartarus_store::SandboxRecord;

use super::sandboxes::on_node;
use crate::api::{ExecBody, ExecResult};
use crate::auth::Caller;
use crate::error::{json_rejection, ApiError, ErrorBody};
use crate::{audit, cluster, effects, find, sandboxes, AppState};

/// Run a command inside a running sandbox and return its output.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", request_body = ExecBody, security(("api_key" = [])),
    responses((status = 200, body = ExecResult), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
               (status = 422, body = ErrorBody)))]
pub(crate) async fn exec_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let record = find(&state, &caller, &id).await?;
    caller.require_mutate()?;
    let Json(body) = body.map_err(json_rejection)?;
    if body.cmd.is_empty() {
        return Err(ApiError::invalid("cmd must not be empty"));
    }
    if body.timeout_s.is_some_and(|t| !(t > 0.0 && t <= 86_400.0)) {
        return Err(ApiError::invalid("timeout_s must be in (0, 86400]"));
    }
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
            audit(&state, &caller, "sandbox.exec", Some(&id), outcome).await;
            return answer;
        }
        let forwarded = serde_json::to_value(&body).map_err(|e| ApiError::internal(e.to_string()))?;
        let result = on_node(&state, &record, reqwest::Method::POST, "/exec", Some(forwarded)).await;
        let outcome = match &result {
            Ok((status, _)) if status.is_success() => "ok",
            _ => "failed",
        };
        audit(&state, &caller, "sandbox.exec", Some(&id), outcome).await;
        let (status, answer) = result?;
        return Ok((status, Json(answer)).into_response());
    }
    // The sandbox's own env first (pooled sandboxes start without one), then the request's.
    let base = sandboxes::stored_spec(&record)?;
    let env: Vec<(String, String)> = base.env.into_iter().chain(body.env.clone()).collect();
    // The sandbox's working directory (an image's or template's) unless the request names one.
    let workdir = body
        .cwd
        .clone()
        .or_else(|| base.workdir.map(|w| w.display().to_string()));
    let request = tartarus_shim::protocol::ExecRequest {
        command: body.cmd.clone(),
        env: env.clone(),
        workdir,
        stdin: body.stdin.clone().unwrap_or_default().into_bytes(),
        timeout_ms: body.timeout_s.map(|t| (t * 1000.0) as u64),
        stream: body.stream,
    };
    if body.stream {
        let result = state.manager.exec_stream(&record, request).await;
        let error = result.as_ref().err().map(|e| e.message.as_str());
        trace_exec(&state, &record, (&body.cmd, &env), error, None).await;
        audit(
            &state,
            &caller,
            "sandbox.exec",
            Some(&id),
            if result.is_ok() { "ok" } else { "failed" },
        )
        .await;
        return Ok(sse_exec(result?).into_response());
    }
    let result = state.manager.exec(&record, request).await.map(ExecResult::from);
    let error = result.as_ref().err().map(|e| e.message.as_str());
    trace_exec(&state, &record, (&body.cmd, &env), error, result.as_ref().ok()).await;
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
/// `exit` with `{exit_code, signal, wall_ms, timed_out}`.
pub(crate) fn sse_exec(events: sandboxes::ExecEvents) -> impl axum::response::IntoResponse {
    use axum::response::sse::{Event, Sse};
    use tartarus_shim::protocol::StreamEvent;
    let events = futures_util::stream::unfold(Some(events), |state| async move {
        let mut events = state?;
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
            return Some((Ok(event), Some(events)));
        }
    });
    Sse::new(events)
}
