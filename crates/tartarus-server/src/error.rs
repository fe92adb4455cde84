//! API errors: always `{"error":{"code":"...","message":"..."}}` with the right status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: unauthorized, forbidden, not_found, invalid_request, conflict,
    /// command_not_found, not_executable, unavailable, internal.
    pub code: &'static str,
    pub message: String,
    /// For `internal` errors: the id under which the server logged the cause. The body never carries
    /// database or host internals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (message, correlation_id) = match self.status {
            // The cause (a database error, a host path) goes to the log under an id the client can quote.
            StatusCode::INTERNAL_SERVER_ERROR => {
                let id = tartarus_hostsys::random_hex(6).unwrap_or_else(|_| "unknown".to_string());
                tracing::error!(correlation_id = %id, code = self.code, "{}", self.message);
                let shown = format!("internal error; the server log has the cause under correlation id {id}");
                (shown, Some(id))
            }
            status if status.is_server_error() => {
                tracing::error!(code = self.code, "{}", self.message);
                (self.message, None)
            }
            _ => (self.message, None),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message,
                correlation_id,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<tartarus_store::StoreError> for ApiError {
    fn from(e: tartarus_store::StoreError) -> Self {
        ApiError::internal(tartarus_runtime::error_chain(&e))
    }
}

/// Turns axum's JSON rejections (malformed JSON, wrong types, unknown fields, too large) into our shape.
pub fn json_rejection(rejection: axum::extract::rejection::JsonRejection) -> ApiError {
    let status = rejection.status();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "invalid_request",
    };
    ApiError::new(status, code, rejection.body_text())
}

/// Gives every client error the JSON shape (except answers forwarded from a sandbox): axum's own rejections (a query string or path that does not
/// parse, a method the route does not have, a body over the limit) answer plain text or nothing; their
/// status stays, the text becomes the message.
pub async fn json_client_errors(response: Response) -> Response {
    use axum::http::header::CONTENT_TYPE;
    // A sandbox's own answer (preview URLs, the E2B daemons) is passed on as it is.
    if response
        .extensions()
        .get::<crate::sandbox_ports::Forwarded>()
        .is_some()
    {
        return response;
    }
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 << 10).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = match text.is_empty() {
        true => status.canonical_reason().unwrap_or("client error").to_lowercase(),
        false => text,
    };
    let code = match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        _ => "invalid_request",
    };
    let mut answer = ApiError::new(status, code, message).into_response();
    // Keep what the rejection said besides its body (`Allow` on a 405, `Retry-After`).
    for (name, value) in parts.headers.iter() {
        if name != CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}
