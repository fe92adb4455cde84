//! The idempotency ledger as a tool call uses it: a call with an `Idempotency-Key` claims the key under a
//! lease (see `tartarus_store::effects`), then commits the answer or gives the key up. A repeat with the
//! same request is answered from the ledger; the key used with another request is a divergence.

use std::time::Duration;

use axum::http::HeaderMap;
use tartarus_effects::Cid;
use tartarus_store::{Claim, ClaimRequest, LedgerCommit, LedgerEntry, NewEvent};

use super::GatewayError;
use crate::effects::Effects;

/// How much longer than the tool's time limit a ledger lease lasts: a holder that has not answered by
/// then is presumed dead and a retry may take over.
const LEASE_MARGIN_MS: i64 = 5_000;
/// The longest idempotency key.
const MAX_KEY_LEN: usize = 255;
/// How often a call waiting for another holder of its key looks again.
const BUSY_POLL: Duration = Duration::from_millis(20);

/// The `Idempotency-Key` header of a tool call, if it has one: 1-255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN && k.bytes().all(|b| b.is_ascii_graphic()))
        .map(|k| Some(k.to_string()))
        .ok_or(GatewayError::InvalidIdempotencyKey)
}

/// The lease of a call to a tool with time limit `timeout`.
pub fn lease_ms(timeout: Duration) -> i64 {
    timeout.as_millis() as i64 + LEASE_MARGIN_MS
}

/// One call's claim on a key.
pub struct Call<'a> {
    pub tenant: &'a str,
    pub sandbox: &'a str,
    pub key: &'a str,
    pub tool: &'a str,
    pub request_hash: &'a Cid,
    /// Names the call's lease holder.
    pub holder: &'a str,
    pub lease_ms: i64,
}

/// What claiming a key gave a call.
pub enum Claimed {
    /// The call holds the key with this epoch: invoke the tool, then [`commit`] or [`abort`].
    Acquired { epoch: i64 },
    /// The key's stored answer to the same request.
    Replay(Box<LedgerEntry>),
}

/// Claims `call.key`. While another call holds it, looks again until that call's lease would have run
/// out; a divergence is recorded as an event.
pub async fn claim(effects: &Effects, call: &Call<'_>) -> Result<Claimed, GatewayError> {
    let hash = call.request_hash.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(call.lease_ms as u64 + 1_000);
    loop {
        let claim = ClaimRequest {
            tenant: call.tenant,
            key: call.key,
            tool: call.tool,
            request_hash: &hash,
            holder: call.holder,
            now_ms: tartarus_store::now_ms(),
            lease_ms: call.lease_ms,
        };
        match effects.store.ledger_claim(&claim).await? {
            Claim::Acquired { epoch } => return Ok(Claimed::Acquired { epoch }),
            Claim::Replay(entry) => {
                metrics::counter!(crate::metrics::LEDGER_OUTCOMES.name, "outcome" => "replay").increment(1);
                return Ok(Claimed::Replay(Box::new(entry)));
            }
            Claim::Divergent(entry) => {
                metrics::counter!(crate::metrics::LEDGER_OUTCOMES.name, "outcome" => "divergence")
                    .increment(1);
                let error = GatewayError::Divergence {
                    key: call.key.to_string(),
                    tool: entry.tool.clone(),
                    stored_request: entry.request_hash.clone(),
                    request: hash.clone(),
                };
                record_divergence(effects, call, &entry, &error).await;
                return Err(error);
            }
            Claim::Busy(_) if tokio::time::Instant::now() < deadline => {
                // Another call with this key is running: look again shortly (it commits, aborts or
                // its lease runs out; the lease bounds the wait).
                tokio::time::sleep(BUSY_POLL).await;
            }
            Claim::Busy(entry) => {
                return Err(GatewayError::InProgress {
                    key: call.key.to_string(),
                    holder: entry.holder,
                })
            }
        }
    }
}

async fn record_divergence(effects: &Effects, call: &Call<'_>, entry: &LedgerEntry, error: &GatewayError) {
    let details = serde_json::json!({
        "key": call.key, "tool": call.tool, "stored_request": entry.request_hash,
        "request": call.request_hash.to_string(), "divergences": entry.divergences,
    })
    .to_string();
    let event = NewEvent {
        category: "effects",
        kind: "idempotency.divergence",
        sandbox: Some(call.sandbox),
        tenant: Some(call.tenant),
        message: &error.to_string(),
        details: Some(&details),
    };
    match effects.store.record_event(&event).await {
        Ok(_) => crate::metrics::event_recorded(&event),
        Err(e) => tracing::error!(
            "recording a divergence failed: {}",
            tartarus_runtime::error_chain(&e)
        ),
    }
}

/// Records the answer as `key`'s. Refused when the call outlived its lease and a retry took the key
/// over: the answer is then not the key's (the receipt still records that the tool ran).
pub async fn commit(
    effects: &Effects,
    tenant: &str,
    key: &str,
    epoch: i64,
    commit: &LedgerCommit<'_>,
) -> Result<(), GatewayError> {
    if !effects.store.ledger_commit(tenant, key, epoch, commit).await? {
        return Err(GatewayError::LeaseLost {
            key: key.to_string(),
            receipt: commit.receipt.to_string(),
        });
    }
    Ok(())
}

/// Gives `key` up after a call without an answer, so that a retry runs the call again.
pub async fn abort(effects: &Effects, tenant: &str, key: &str, epoch: i64) -> Result<(), GatewayError> {
    effects.store.ledger_abort(tenant, key, epoch).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers_with(value: HeaderValue) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("idempotency-key", value);
        headers
    }

    fn key_of(text: &str) -> Result<Option<String>, GatewayError> {
        idempotency_key(&headers_with(HeaderValue::from_str(text).unwrap()))
    }

    #[test]
    fn test_a_call_without_the_header_has_no_key() {
        assert!(matches!(idempotency_key(&HeaderMap::new()), Ok(None)));
    }

    #[test]
    fn test_keys_are_1_to_255_visible_ascii_characters() {
        assert_eq!(
            key_of("order-42/retry~1").unwrap().as_deref(),
            Some("order-42/retry~1")
        );
        let longest = "k".repeat(MAX_KEY_LEN);
        assert_eq!(key_of(&longest).unwrap(), Some(longest));
        for refused in ["", "two words", "tab\there", &"k".repeat(MAX_KEY_LEN + 1)] {
            assert!(
                matches!(key_of(refused), Err(GatewayError::InvalidIdempotencyKey)),
                "{refused:?}"
            );
        }
        let not_ascii = headers_with(HeaderValue::from_bytes("clé".as_bytes()).unwrap());
        assert!(matches!(
            idempotency_key(&not_ascii),
            Err(GatewayError::InvalidIdempotencyKey)
        ));
    }

    #[test]
    fn test_a_lease_outlasts_the_tools_time_limit() {
        assert_eq!(lease_ms(Duration::from_secs(30)), 30_000 + LEASE_MARGIN_MS);
        assert_eq!(lease_ms(Duration::ZERO), LEASE_MARGIN_MS);
    }
}
