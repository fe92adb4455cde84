//! Calls from the control plane to node agents' servers: JSON calls, requests forwarded as they are
//! (streams passed through), and what the control plane records when a node reports an ending or
//! drops out.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tartarus_store::{Finish, NewEvent, NodeRecord, SandboxRecord, SandboxStatus};

use super::ClusterError;
use crate::error::ApiError;
use crate::AppState;

/// Calls a node's server with the key it registered; (status, JSON body).
pub async fn node_call(
    state: &AppState,
    node: &NodeRecord,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), ClusterError> {
    let mut request = state
        .http
        .request(method, format!("http://{}{path}", node.address))
        .bearer_auth(&node.api_key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .map_err(|e| ClusterError::unreachable(node, e))?;
    let status = response.status().as_u16();
    let value = response.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, value))
}

/// The node record of a sandbox placed on a node.
pub async fn node_of(state: &AppState, record: &SandboxRecord) -> Result<Option<NodeRecord>, ClusterError> {
    let Some(id) = &record.node else {
        return Ok(None);
    };
    match state.store.node(id).await? {
        Some(node) => Ok(Some(node)),
        None => Err(ClusterError::NodeGone {
            sandbox: record.id.clone(),
            node: id.clone(),
        }),
    }
}

/// Records the outcome a node reports for one of its sandboxes, when it has ended there.
pub async fn sync_from_node(
    state: &AppState,
    record: &SandboxRecord,
    remote: &serde_json::Value,
) -> Result<(), ClusterError> {
    let status = remote["status"].as_str().unwrap_or("running");
    if matches!(status, "running" | "starting" | "paused") || !record.status.is_live() {
        return Ok(());
    }
    let finish = Finish {
        status: status.parse().unwrap_or(SandboxStatus::Lost),
        exit_code: remote["exit_code"].as_i64(),
        reason: remote["reason"].as_str().unwrap_or(status),
    };
    state.store.finish_sandbox(&record.id, &finish).await?;
    Ok(())
}

/// A node became unreachable: its live sandboxes are lost (they may still run there, cut off; nothing
/// starts them again elsewhere, so nothing runs twice).
pub async fn lose_sandboxes_of(state: &AppState, node: &str) {
    let Ok(live) = state.store.sandboxes(None, Some(SandboxStatus::Running)).await else {
        return;
    };
    for record in live.into_iter().filter(|r| r.node.as_deref() == Some(node)) {
        let reason = format!("node {node} became unreachable");
        let finish = Finish {
            status: SandboxStatus::Lost,
            exit_code: None,
            reason: &reason,
        };
        if let Err(e) = state.store.finish_sandbox(&record.id, &finish).await {
            tracing::error!(
                sandbox = %record.id,
                "marking a sandbox lost failed: {}",
                tartarus_runtime::error_chain(&e)
            );
            continue;
        }
        let event = NewEvent {
            category: "lifecycle",
            kind: "sandbox.lost",
            sandbox: Some(&record.id),
            tenant: Some(&record.tenant),
            message: &format!("sandbox {} lost: {reason}", record.id),
            details: None,
        };
        if state.store.record_event(&event).await.is_ok() {
            crate::metrics::event_recorded(&event);
        }
    }
}

/// Forwards a request for a sandbox on a node as it is, and streams the node's answer back (status,
/// content type and body): streaming exec (Server-Sent Events), logs (also followed), files, pause,
/// resume and quarantine. The answer is the node's response itself, so this is part of the HTTP layer:
/// it answers an API error.
pub async fn forward(
    state: &AppState,
    record: &SandboxRecord,
    method: reqwest::Method,
    (suffix, query): (&str, &[(&str, &str)]),
    content_type: Option<&str>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let node = node_of(state, record).await?.ok_or(ClusterError::NotOnNode)?;
    let remote = record.remote_id.as_deref().unwrap_or_default();
    let mut request = state
        .stream_http
        .request(
            method,
            format!("http://{}/v1/sandboxes/{remote}{suffix}", node.address),
        )
        .query(query)
        .bearer_auth(&node.api_key)
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header(reqwest::header::CONTENT_TYPE, content_type);
    }
    let response = request
        .send()
        .await
        .map_err(|e| ClusterError::unreachable(&node, e))?;
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = response.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    let body = axum::body::Body::from_stream(response.bytes_stream());
    let mut answer = (status, body).into_response();
    if let Some(value) = content_type.and_then(|v| axum::http::HeaderValue::from_bytes(v.as_bytes()).ok()) {
        answer
            .headers_mut()
            .insert(axum::http::header::CONTENT_TYPE, value);
    }
    Ok(answer)
}
