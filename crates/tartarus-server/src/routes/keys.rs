//! `/v1/keys`: the server's public signing keys, and their rotation.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tartarus_store::Role;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/keys", get(public_keys))
        .route("/v1/keys/rotate", post(rotate_key))
}

/// The server's public keys (effects-v1 §5.4): what receipts and episodes verify against. Public.
#[utoipa::path(get, path = "/v1/keys", tag = "records",
    responses((status = 200, body = Object, description = "the public keyring (effects-v1 §5.4)")))]
pub async fn public_keys(State(state): State<AppState>) -> Response {
    let json = state.effects.with_keyring(|keys| keys.public_keys().to_json());
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

/// Retire the current signing key and start signing with a new one. Admin only.
#[utoipa::path(post, path = "/v1/keys/rotate", tag = "records", security(("api_key" = [])),
    responses((status = 200, body = Object, description = "the public keyring after the rotation"), (status = 403)))]
pub async fn rotate_key(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::forbidden("only admin keys may rotate the signing key"));
    }
    let json = {
        let mut keyring = state
            .effects
            .keyring
            .write()
            .map_err(|_| ApiError::internal("keyring lock poisoned"))?;
        keyring.rotate().map_err(|e| ApiError::internal(e.to_string()))?;
        keyring.public_keys().to_json()
    };
    crate::audit(&state, &caller, "keys.rotate", None, "ok").await;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}
