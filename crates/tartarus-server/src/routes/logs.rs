//! `GET /v1/sandboxes/{id}/logs`: the main command's output, optionally followed live.

use std::time::Duration;

use axum::extract::{Path, Query, State};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::{cluster, find, sandboxes, AppState};

/// The main command's output (stdout and stderr interleaved). With `follow=true` the response streams
/// what is written until the sandbox ends.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", params(LogsQuery), security(("api_key" = [])),
    responses((status = 200, description = "text/plain output", content_type = "text/plain"), (status = 404, body = ErrorBody)))]
pub(crate) async fn logs_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    use tokio::io::AsyncReadExt;
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let record = find(&state, &caller, &id).await?;
    if record.node.is_some() {
        let follow = if query.follow.unwrap_or(false) {
            "true"
        } else {
            "false"
        };
        return cluster::forward(
            &state,
            &record,
            reqwest::Method::GET,
            ("/logs", &[("follow", follow)]),
            None,
            Default::default(),
        )
        .await;
    }
    let path = sandboxes::SandboxDir::new(&record.dir).main_log();
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ApiError::internal(format!("reading logs: {e}"))),
    };
    let done = if query.follow.unwrap_or(false) {
        state.manager.done(&id)
    } else {
        None
    };
    struct Tail {
        file: Option<tokio::fs::File>,
        done: Option<tokio::sync::watch::Receiver<bool>>,
    }
    let stream = futures_util::stream::unfold(Tail { file, done }, |mut tail| async move {
        loop {
            if let Some(file) = tail.file.as_mut() {
                let mut buf = vec![0u8; 64 * 1024];
                match file.read(&mut buf).await {
                    Ok(0) => {}
                    Ok(n) => {
                        buf.truncate(n);
                        return Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), tail));
                    }
                    Err(e) => {
                        return Some((
                            Err(e),
                            Tail {
                                file: None,
                                done: None,
                            },
                        ))
                    }
                }
            }
            // At the end of what is written: stop, or wait for more while the sandbox lives (the shim
            // creates the log before the sandbox runs). Growth is checked four times a second.
            let rx = tail.done.as_mut()?;
            let ended = tokio::select! {
                _ = rx.wait_for(|done| *done) => true,
                _ = tokio::time::sleep(Duration::from_millis(250)) => false,
            };
            if ended {
                tail.done = None; // one last read, then the end
            }
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogsQuery {
    pub follow: Option<bool>,
}
