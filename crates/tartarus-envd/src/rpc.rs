//! Routing of `POST /<service>/<method>` to the process and filesystem services.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::connect::{self, Code, RpcError};
use crate::{fs, process, watch, Shared, MAX_UNARY_BODY};

enum Kind {
    Unary,
    ServerStream,
}

fn kind(service: &str, method: &str) -> Option<Kind> {
    match (service, method) {
        ("process.Process", "Start" | "Connect") | ("filesystem.Filesystem", "WatchDir") => {
            Some(Kind::ServerStream)
        }
        (
            "process.Process",
            "List" | "SendInput" | "SendSignal" | "Update" | "CloseStdin" | "StreamInput",
        )
        | (
            "filesystem.Filesystem",
            "Stat" | "MakeDir" | "Move" | "ListDir" | "Remove" | "CreateWatcher" | "GetWatcherEvents"
            | "RemoveWatcher",
        ) => Some(Kind::Unary),
        _ => None,
    }
}

pub async fn dispatch(
    State(state): State<Shared>,
    Path((service, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(kind) = kind(&service, &method) else {
        return connect::unary_response(Err(RpcError::new(
            Code::Unimplemented,
            format!("no such method: /{service}/{method}"),
        )));
    };
    if method == "StreamInput" {
        return connect::stream_error(RpcError::new(
            Code::Unimplemented,
            "StreamInput is not supported; use SendInput",
        ));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    let expected = match kind {
        Kind::Unary => "application/json",
        Kind::ServerStream => "application/connect+json",
    };
    if content_type != expected {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            [("accept-post", expected)],
            format!("unsupported content type {content_type:?}; this envd speaks {expected}"),
        )
            .into_response();
    }
    if let Some(enc) = headers.get("content-encoding").and_then(|v| v.to_str().ok()) {
        if !enc.eq_ignore_ascii_case("identity") {
            let e = RpcError::new(
                Code::Unimplemented,
                format!("request compression {enc:?} is not supported"),
            );
            return match kind {
                Kind::Unary => connect::unary_response(Err(e)),
                Kind::ServerStream => connect::stream_error(e),
            };
        }
    }
    let bytes = match axum::body::to_bytes(body, MAX_UNARY_BODY).await {
        Ok(b) => b,
        Err(_) => {
            let e = RpcError::new(
                Code::ResourceExhausted,
                format!("request body too large or unreadable (limit {MAX_UNARY_BODY} bytes)"),
            );
            return match kind {
                Kind::Unary => connect::unary_response(Err(e)),
                Kind::ServerStream => connect::stream_error(e),
            };
        }
    };
    match kind {
        Kind::Unary => {
            let result = match connect::parse_json(&bytes) {
                Ok(req) => unary(&state, &service, &method, req).await,
                Err(e) => Err(e),
            };
            connect::unary_response(result)
        }
        Kind::ServerStream => {
            let req = match connect::parse_stream_request(&bytes) {
                Ok(req) => req,
                Err(e) => return connect::stream_error(e),
            };
            let keepalive = connect::keepalive_interval(&headers);
            let result = match method.as_str() {
                "Start" => process::start(&state, req, keepalive).await,
                "Connect" => process::connect(&state, req, keepalive).await,
                _ => watch::watch_dir(&state, req, keepalive).await,
            };
            result.unwrap_or_else(connect::stream_error)
        }
    }
}

async fn unary(state: &Shared, service: &str, method: &str, req: Value) -> connect::RpcResult<Value> {
    match (service, method) {
        ("process.Process", "List") => process::list(state),
        ("process.Process", "SendInput") => process::send_input(state, req).await,
        ("process.Process", "SendSignal") => process::send_signal(state, req),
        ("process.Process", "Update") => process::update(state, req),
        ("process.Process", "CloseStdin") => process::close_stdin(state, req).await,
        ("filesystem.Filesystem", "Stat") => fs::stat(state, req).await,
        ("filesystem.Filesystem", "MakeDir") => fs::make_dir(state, req).await,
        ("filesystem.Filesystem", "Move") => fs::move_entry(state, req).await,
        ("filesystem.Filesystem", "ListDir") => fs::list_dir(state, req).await,
        ("filesystem.Filesystem", "Remove") => fs::remove(state, req).await,
        ("filesystem.Filesystem", "CreateWatcher") => watch::create_watcher(state, req),
        ("filesystem.Filesystem", "GetWatcherEvents") => watch::get_watcher_events(state, req),
        ("filesystem.Filesystem", "RemoveWatcher") => watch::remove_watcher(state, req),
        _ => Err(RpcError::new(
            Code::Unimplemented,
            format!("no such method: /{service}/{method}"),
        )),
    }
}
