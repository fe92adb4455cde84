//! `/v1/evaluators`: the keys that may sign signals about episodes, by evaluator name.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tartarus_store::{EvaluatorKey, Role};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::effects::parse_public_key;
use crate::error::{json_rejection, ApiError};
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/evaluators", post(add_evaluator).get(list_evaluators))
}

/// Register an evaluator's public key.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddEvaluator {
    /// 1–64 of `a-z`, `0-9`, `-`, `_`, `.`.
    pub name: String,
    /// The Ed25519 public key, 64 hex digits.
    pub public_key: String,
}

/// Whether `name` may name an evaluator: 1-64 of `a-z`, `0-9`, `-`, `_`, `.`.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// Allow a key to sign signals as evaluator `name`. Admin only.
#[utoipa::path(post, path = "/v1/evaluators", tag = "records", request_body = AddEvaluator, security(("api_key" = [])),
    responses((status = 201), (status = 403), (status = 422)))]
pub async fn add_evaluator(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<AddEvaluator>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden("only admin keys may register evaluators"));
    }
    let Json(body) = body.map_err(json_rejection)?;
    if !valid_name(&body.name) {
        return Err(ApiError::invalid(format!(
            "evaluator name '{}': use 1-64 lower-case letters, digits, '-', '_' or '.'",
            body.name
        )));
    }
    let key = parse_public_key(&body.public_key).map_err(|e| ApiError::invalid(e.to_string()))?;
    let kid = tartarus_effects::key_id(&key);
    state
        .store
        .add_evaluator_key(&EvaluatorKey {
            name: body.name.clone(),
            kid: kid.clone(),
            public_key: body.public_key.to_ascii_lowercase(),
            created_ms: tartarus_store::now_ms(),
        })
        .await?;
    crate::audit(&state, &caller, "evaluator.add", Some(&body.name), "ok").await;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"name": body.name, "kid": kid})),
    ))
}

/// Registered evaluator keys.
#[utoipa::path(get, path = "/v1/evaluators", tag = "records", security(("api_key" = [])), responses((status = 200)))]
pub async fn list_evaluators(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Vec<EvaluatorKey>>, ApiError> {
    Ok(Json(state.store.evaluator_keys(None).await?))
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn evaluator_names_are_1_to_64_of_lower_case_digits_and_dash_underscore_dot() {
        assert!(valid_name("grader-1.v2_b"));
        assert!(valid_name(&"a".repeat(64)));
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(65)));
        assert!(!valid_name("Grader"));
        assert!(!valid_name("a b"));
        assert!(!valid_name("a/b"));
    }
}
