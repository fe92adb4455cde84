//! What can go wrong in the gateway, and the one place it becomes an API error.

use axum::http::StatusCode;

use super::invocation::NoAnswer;
use super::tools::ToolDefinitionError;
use crate::error::ApiError;

/// Why a tool declaration or a tool call failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] tartarus_store::StoreError),
    #[error("stored tool '{name}'")]
    StoredTool {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding tool '{name}'")]
    Encode {
        name: String,
        #[source]
        source: serde_json::Error,
    },

    // The operator's API.
    #[error(transparent)]
    InvalidDefinition(#[from] ToolDefinitionError),
    #[error("no tool '{name}'")]
    NotDeclared { name: String },

    // Calls from a sandbox.
    #[error("no tool '{name}' (GET /v1/tools lists them)")]
    NoSuchTool { name: String },
    #[error("Idempotency-Key must be 1-255 visible ASCII characters")]
    InvalidIdempotencyKey,
    #[error(
        "idempotency key '{key}' was first used with another request to tool '{tool}' (request \
         {stored_request}); this request is {request}: use a new key for a different request"
    )]
    Divergence {
        key: String,
        tool: String,
        stored_request: String,
        request: String,
    },
    #[error("a call with idempotency key '{key}' is still in progress (held by {holder}); retry later")]
    InProgress { key: String, holder: String },
    #[error(
        "idempotency key '{key}': this call outlived its lease and a retry took it over; its answer was not \
         recorded (receipt {receipt})"
    )]
    LeaseLost { key: String, receipt: String },
    #[error("tool '{tool}'")]
    ToolUnavailable {
        tool: String,
        #[source]
        source: NoAnswer,
    },
    #[error("signing the receipt")]
    Signing(#[source] tartarus_effects::EffectsError),
    #[error("tool call")]
    CallAborted(#[source] tokio::task::JoinError),
}

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        use GatewayError as E;
        let e = match e {
            E::Store(e) => return e.into(),
            other => other,
        };
        let (status, code) = match &e {
            E::InvalidDefinition(_) | E::InvalidIdempotencyKey => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
            }
            E::NotDeclared { .. } | E::NoSuchTool { .. } => (StatusCode::NOT_FOUND, "not_found"),
            E::Divergence { .. } => (StatusCode::CONFLICT, "idempotency_divergence"),
            E::InProgress { .. } | E::LeaseLost { .. } => (StatusCode::CONFLICT, "conflict"),
            E::ToolUnavailable { .. } => (StatusCode::BAD_GATEWAY, "tool_unavailable"),
            E::Store(_) | E::StoredTool { .. } | E::Encode { .. } | E::Signing(_) | E::CallAborted(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, tartarus_runtime::error_chain(&e))
    }
}
