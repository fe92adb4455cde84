//! Bearer-key authentication: every `/v1` request names a key; the key gives a tenant and a role.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use tartarus_store::Role;

use crate::error::ApiError;
use crate::AppState;

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    pub tenant: String,
    pub role: Role,
}

impl Caller {
    /// The tenant whose objects this caller may see: all for admins.
    /// The tenant a listing is limited to when the caller asks for `wanted`: admins get what they ask for
    /// (all tenants by default); others only their own, and asking for another tenant is refused.
    pub fn scope_for<'a>(&'a self, wanted: Option<&'a str>, what: &str) -> Result<Option<&'a str>, ApiError> {
        match (self.scope(), wanted) {
            (None, wanted) => Ok(wanted),
            (Some(own), None) => Ok(Some(own)),
            (Some(own), Some(wanted)) if own == wanted => Ok(Some(own)),
            (Some(_), Some(_)) => Err(ApiError::forbidden(format!(
                "only admin keys may read another tenant's {what}"
            ))),
        }
    }

    pub fn scope(&self) -> Option<&str> {
        match self.role {
            Role::Admin => None,
            _ => Some(&self.tenant),
        }
    }

    pub fn require_mutate(&self) -> Result<(), ApiError> {
        match self.role.can_mutate() {
            true => Ok(()),
            false => Err(ApiError::forbidden(
                "this key has the viewer role and cannot change anything",
            )),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized("missing Authorization header: send 'Authorization: Bearer <key>'")
            })?;
        let secret = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::unauthorized("Authorization must be 'Bearer <key>'"))?;
        let key = state
            .store
            .authenticate(secret.trim())
            .await?
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked API key"))?;
        Ok(Caller {
            key_id: key.id,
            tenant: key.tenant,
            role: key.role,
        })
    }
}
