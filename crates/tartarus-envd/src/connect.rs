//! The Connect protocol over HTTP/1.1, JSON codec only: unary calls (`application/json`) and server
//! streams (`application/connect+json`, 5-byte envelopes, an end-of-stream frame with flag 0x02).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

/// A Connect error code (<https://connectrpc.com/docs/protocol#error-codes>).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
        }
    }

    /// The HTTP status of a unary error response, as the Connect spec maps codes.
    pub fn http_status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::Unknown | Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An RPC failure: a code and a message, as the client sees them.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

pub type RpcResult<T> = Result<T, RpcError>;

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }
    /// An I/O error on `what` (usually a path), with the code its kind means.
    pub fn io(what: &str, e: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        let code = match e.kind() {
            NotFound => Code::NotFound,
            AlreadyExists => Code::AlreadyExists,
            PermissionDenied => Code::PermissionDenied,
            InvalidInput | NotADirectory | IsADirectory | DirectoryNotEmpty | InvalidFilename => {
                Code::InvalidArgument
            }
            _ => Code::Internal,
        };
        Self::new(code, format!("{what}: {e}"))
    }
    fn to_json(&self) -> Value {
        json!({"code": self.code.as_str(), "message": self.message})
    }
}

/// A unary response: the message as JSON, or the error with its HTTP status.
pub fn unary_response(result: RpcResult<Value>) -> Response {
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => json_response(e.code.http_status(), &e.to_json()),
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}

/// One envelope: flags, big-endian length, payload.
pub fn frame(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

pub fn message_frame(v: &Value) -> Bytes {
    frame(0, &serde_json::to_vec(v).unwrap_or_default())
}

/// The end-of-stream frame: `{}` or `{"error": {...}}`.
pub fn end_frame(error: Option<&RpcError>) -> Bytes {
    let v = match error {
        None => json!({}),
        Some(e) => json!({"error": e.to_json()}),
    };
    frame(0x02, &serde_json::to_vec(&v).unwrap_or_default())
}

/// Parses the single request message of a server-streaming call (one envelope, uncompressed).
pub fn parse_stream_request(body: &[u8]) -> RpcResult<Value> {
    if body.len() < 5 {
        return Err(RpcError::invalid("request body is not a Connect envelope"));
    }
    let flags = body[0];
    if flags & 0x01 != 0 {
        return Err(RpcError::new(
            Code::Unimplemented,
            "compressed request messages are not supported",
        ));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let payload = body
        .get(5..5 + len)
        .ok_or_else(|| RpcError::invalid("request envelope is truncated"))?;
    parse_json(payload)
}

pub fn parse_json(payload: &[u8]) -> RpcResult<Value> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(RpcError::invalid("request message must be a JSON object")),
        Err(e) => Err(RpcError::invalid(format!("malformed request JSON: {e}"))),
    }
}

/// The keepalive interval a client asked for (`Keepalive-Ping-Interval`, in seconds), at least 1 s.
pub fn keepalive_interval(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get("keepalive-ping-interval")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (secs > 0).then(|| Duration::from_secs(secs.max(1)))
}

/// A server-stream response whose frames come from a channel: the producer sends message frames and
/// finally an end frame, then drops the sender.
pub fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A stream that fails before its first message: HTTP 200 with only the end frame carrying the error.
pub fn stream_error(e: RpcError) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(Body::from(end_frame(Some(&e))))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

// ---- Reading fields of proto3 JSON messages (either the JSON name or the proto field name). ----

pub fn field<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    let obj = v.as_object()?;
    obj.get(camel).or_else(|| obj.get(snake)).filter(|v| !v.is_null())
}

pub fn get_str(v: &Value, camel: &str, snake: &str) -> RpcResult<Option<String>> {
    match field(v, camel, snake) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RpcError::invalid(format!("field {snake} must be a string"))),
    }
}

pub fn get_bool(v: &Value, camel: &str, snake: &str) -> RpcResult<bool> {
    match field(v, camel, snake) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(RpcError::invalid(format!("field {snake} must be a boolean"))),
    }
}

/// An unsigned 32-bit field: a JSON number or a decimal string, as proto3 JSON allows.
pub fn get_u32(v: &Value, camel: &str, snake: &str) -> RpcResult<Option<u32>> {
    let bad = || RpcError::invalid(format!("field {snake} must be an unsigned 32-bit integer"));
    match field(v, camel, snake) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(bad),
        Some(Value::String(s)) => s.parse::<u32>().map(Some).map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

/// A `bytes` field: base64, standard or URL-safe, padded or not.
pub fn get_bytes(v: &Value, camel: &str, snake: &str) -> RpcResult<Option<Vec<u8>>> {
    match field(v, camel, snake) {
        None => Ok(None),
        Some(Value::String(s)) => decode_b64(s)
            .map(Some)
            .ok_or_else(|| RpcError::invalid(format!("field {snake} is not valid base64"))),
        Some(_) => Err(RpcError::invalid(format!(
            "field {snake} must be a base64 string"
        ))),
    }
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = s.trim();
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
}

pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}
