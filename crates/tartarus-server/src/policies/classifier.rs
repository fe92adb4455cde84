//! The classification hook: an operator's program that sees every create request and answers `allow`,
//! `quarantine` or `reject REASON` (fail closed).

use axum::http::StatusCode;
use serde_json::json;
use tartarus_store::NewEvent;

use super::event;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::{audit, AppState};

/// How long the classification hook may take before the create fails closed.
const CLASSIFIER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the classification hook, if one is configured, on a create request: `allow` (or nothing) keeps
/// the request as it is, `quarantine` makes it a quarantine-class sandbox (an event says so), `reject
/// REASON` refuses it (403). A hook that fails, times out or answers anything else refuses the request
/// (503): an unclassified request never runs. The hook gets the tenant and the request as JSON on stdin.
pub async fn classify(
    state: &AppState,
    caller: &Caller,
    body: &crate::api::CreateSandbox,
) -> Result<Option<String>, ApiError> {
    use tokio::io::AsyncWriteExt;
    let Some(hook) = state.classifier.as_deref() else {
        return Ok(None);
    };
    let request = json!({
        "tenant": caller.tenant,
        "template": body.template,
        "image": body.image,
        "cmd": body.cmd,
        "network": body.network,
        "class": body.class,
        "labels": body.labels,
    });
    let unavailable = |why: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "classifier_unavailable",
            format!("the classification hook {}: {why}", hook.display()),
        )
    };
    let run = async {
        let mut child = tokio::process::Command::new(hook)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(format!("{request}\n").as_bytes()).await?;
        }
        child.wait_with_output().await
    };
    let output = tokio::time::timeout(CLASSIFIER_TIMEOUT, run)
        .await
        .map_err(|_| unavailable("timed out".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
    if !output.status.success() {
        return Err(unavailable(format!("failed ({})", output.status)));
    }
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let (verdict, reason) = answer
        .split_once(char::is_whitespace)
        .unwrap_or((answer.as_str(), ""));
    match verdict {
        "" | "allow" => Ok(None),
        "quarantine" => {
            let message = format!(
                "the classification hook sent a request of {} to quarantine",
                caller.tenant
            );
            event(
                state,
                NewEvent {
                    category: "admission",
                    kind: "classifier.quarantine",
                    sandbox: None,
                    tenant: Some(&caller.tenant),
                    message: &message,
                    details: Some(&request.to_string()),
                },
            )
            .await;
            Ok(Some("quarantine".to_string()))
        }
        "reject" => {
            audit(state, caller, "sandbox.classify", None, "reject").await;
            Err(ApiError::forbidden(format!("classifier: {}", reason.trim())))
        }
        other => Err(unavailable(format!(
            "answered '{other}', not allow, quarantine or reject"
        ))),
    }
}
