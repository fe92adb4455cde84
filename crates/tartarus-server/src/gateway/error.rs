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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn api(e: GatewayError) -> (u16, &'static str, String) {
        let e = ApiError::from(e);
        (e.status.as_u16(), e.code, e.message)
    }

    #[test]
    fn test_a_refused_declaration_is_422_with_the_reason_and_its_cause() {
        let url = "/relative".to_string();
        let source = reqwest::Url::parse(&url).unwrap_err();
        let (status, code, message) = api(GatewayError::InvalidDefinition(ToolDefinitionError::Url {
            url,
            source,
        }));
        assert_eq!((status, code), (422, "invalid_request"));
        assert_eq!(message, format!("url '/relative': {source}"));
        assert_eq!(
            api(GatewayError::InvalidDefinition(ToolDefinitionError::CommandPath)).2,
            "a command tool needs 'command' starting with an absolute path"
        );
        assert_eq!(
            api(GatewayError::InvalidDefinition(ToolDefinitionError::Name {
                name: "X Y".to_string()
            }))
            .2,
            "tool name 'X Y': use 1-64 lower-case letters, digits, '-' or '_'"
        );
        assert_eq!(
            api(GatewayError::InvalidDefinition(ToolDefinitionError::Timeout)).2,
            "timeout_s must be between 1 and 3600"
        );
    }

    #[test]
    fn test_unknown_tools_are_404_for_the_operator_and_for_sandboxes() {
        let name = || "weather".to_string();
        assert_eq!(
            api(GatewayError::NotDeclared { name: name() }),
            (404, "not_found", "no tool 'weather'".to_string())
        );
        assert_eq!(
            api(GatewayError::NoSuchTool { name: name() }),
            (
                404,
                "not_found",
                "no tool 'weather' (GET /v1/tools lists them)".to_string()
            )
        );
    }

    #[test]
    fn test_ledger_refusals_are_409_and_a_divergence_has_its_own_code() {
        let divergence = api(GatewayError::Divergence {
            key: "k1".to_string(),
            tool: "weather".to_string(),
            stored_request: "bafk-old".to_string(),
            request: "bafk-new".to_string(),
        });
        assert_eq!((divergence.0, divergence.1), (409, "idempotency_divergence"));
        assert!(
            divergence
                .2
                .contains("(request bafk-old); this request is bafk-new"),
            "{}",
            divergence.2
        );
        let busy = api(GatewayError::InProgress {
            key: "k1".to_string(),
            holder: "host:1:ab:sb_1".to_string(),
        });
        assert_eq!((busy.0, busy.1), (409, "conflict"));
        let lost = api(GatewayError::LeaseLost {
            key: "k1".to_string(),
            receipt: "bafr".to_string(),
        });
        assert_eq!((lost.0, lost.1), (409, "conflict"));
        assert_eq!(api(GatewayError::InvalidIdempotencyKey).0, 422);
    }

    #[test]
    fn test_a_tool_without_an_answer_is_502_saying_why() {
        let (status, code, message) = api(GatewayError::ToolUnavailable {
            tool: "stamp".to_string(),
            source: NoAnswer::TimedOut(Duration::from_secs(30)),
        });
        assert_eq!((status, code), (502, "tool_unavailable"));
        assert_eq!(message, "tool 'stamp': timed out after 30 s");
        let not_started = api(GatewayError::ToolUnavailable {
            tool: "stamp".to_string(),
            source: NoAnswer::Spawn {
                program: "/nonexistent".to_string(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            },
        });
        assert!(
            not_started
                .2
                .starts_with("tool 'stamp': cannot start /nonexistent: "),
            "{}",
            not_started.2
        );
    }
}
