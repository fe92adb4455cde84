//! Receipts: the signed statement that one tool call happened, with the ids of the exact bytes sent and
//! received (effects-v1 §10).
//!
//! A receipt is an [`Envelope`] whose payload is a [`Receipt`]. The hashes are raw CIDs (BLAKE3) of the
//! request and response bodies as they crossed the wire, so anyone holding those bytes can check them
//! against the receipt ([`Receipt::check_bytes`]) without trusting whoever stored them.

use serde::{Deserialize, Serialize};

use crate::cid::{Cid, Codec};
use crate::envelope::Signed;
use crate::EffectsError;

/// The `format` of every v1 receipt.
pub const RECEIPT_FORMAT: &str = "tartarus-effects/v1/receipt";

/// The outcome of a tool call, as the gateway saw it.
pub mod status {
    /// The tool answered with success (HTTP 2xx, exit status 0).
    pub const OK: &str = "ok";
    /// The tool answered with a failure (another HTTP status, a non-zero exit status).
    pub const FAILED: &str = "failed";
    /// The tool gave no answer (unreachable, timed out, killed); `response_hash` is absent.
    pub const ERROR: &str = "error";
}

/// One tool call. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// [`RECEIPT_FORMAT`].
    pub format: String,
    /// The tool's name as the operator declared it.
    pub tool: String,
    /// Raw CID of the request body bytes sent to the tool.
    pub request_hash: Cid,
    /// Raw CID of the response body bytes received; absent when the tool gave no answer.
    pub response_hash: Option<Cid>,
    /// The caller's idempotency key, if it sent one.
    pub idempotency_key: Option<String>,
    /// The sandbox that made the call.
    pub sandbox: String,
    /// The sandbox's tenant.
    pub tenant: String,
    pub started_at: u64,
    pub finished_at: u64,
    /// [`status::OK`], [`status::FAILED`] or [`status::ERROR`].
    pub status: String,
    /// The HTTP status or exit status the tool answered with; absent with [`status::ERROR`].
    pub code: Option<i64>,
    /// What makes this call's receipt its own ([`new_nonce`]): two calls with the same tool, bytes,
    /// sandbox and times (the same millisecond, no idempotency key) are still two receipts with two ids.
    /// The one optional key: left out, never null, so receipts written before it existed keep their
    /// bytes and ids (effects-v1 §10.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// The length of a [`Receipt::nonce`] in hex digits (16 random bytes).
pub const NONCE_HEX_LEN: usize = 32;

/// A fresh receipt nonce: 16 random bytes as lower-case hex.
pub fn new_nonce() -> Result<String, EffectsError> {
    let mut bytes = [0u8; NONCE_HEX_LEN / 2];
    getrandom::fill(&mut bytes).map_err(|e| EffectsError::Randomness(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Receipt {
    /// Checks that `request` / `response` (when given) are the bytes the receipt names.
    pub fn check_bytes(&self, request: Option<&[u8]>, response: Option<&[u8]>) -> Result<(), EffectsError> {
        if let Some(bytes) = request {
            let actual = Cid::of_bytes(bytes);
            if actual != self.request_hash {
                return Err(EffectsError::HashMismatch {
                    what: "request",
                    expected: self.request_hash.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        if let Some(bytes) = response {
            let actual = Cid::of_bytes(bytes);
            match &self.response_hash {
                Some(expected) if *expected == actual => {}
                Some(expected) => {
                    return Err(EffectsError::HashMismatch {
                        what: "response",
                        expected: expected.to_string(),
                        actual: actual.to_string(),
                    })
                }
                None => {
                    return Err(EffectsError::HashMismatch {
                        what: "response",
                        expected: "none (the tool gave no answer)".to_string(),
                        actual: actual.to_string(),
                    })
                }
            }
        }
        Ok(())
    }

    /// The rules a receipt obeys beyond its types.
    pub fn check(&self) -> Result<(), EffectsError> {
        let bad = |reason: String| {
            Err(EffectsError::InvalidObject {
                what: "receipt",
                reason,
            })
        };
        if self.format != RECEIPT_FORMAT {
            return bad(format!(
                "format is {:?}, expected {RECEIPT_FORMAT:?}",
                self.format
            ));
        }
        if self.tool.is_empty() || self.sandbox.is_empty() || self.tenant.is_empty() {
            return bad("tool, sandbox and tenant must not be empty".to_string());
        }
        let raw = |cid: &Cid| cid.codec() == Codec::Raw;
        if !raw(&self.request_hash) || !self.response_hash.as_ref().is_none_or(raw) {
            return bad("request_hash and response_hash must be raw CIDs".to_string());
        }
        if self.finished_at < self.started_at {
            return bad("finished_at is before started_at".to_string());
        }
        let hex =
            |n: &str| n.len() == NONCE_HEX_LEN && n.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if self.nonce.as_deref().is_some_and(|n| !hex(n)) {
            return bad(format!("nonce must be {NONCE_HEX_LEN} lower-case hex digits"));
        }
        match (self.status.as_str(), self.code, &self.response_hash) {
            (status::OK | status::FAILED, Some(_), Some(_)) | (status::ERROR, None, None) => Ok(()),
            (status::OK | status::FAILED, _, _) => bad(format!(
                "status {:?} needs a code and a response_hash",
                self.status
            )),
            (status::ERROR, _, _) => bad("status \"error\" has no code and no response_hash".to_string()),
            (other, _, _) => bad(format!("unknown status {other:?}: use ok, failed or error")),
        }
    }
}

impl Signed for Receipt {
    const WHAT: &'static str = "receipt";

    fn check(&self) -> Result<(), EffectsError> {
        Receipt::check(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope;
    use crate::keyring::Keyring;

    fn receipt() -> Receipt {
        Receipt {
            format: RECEIPT_FORMAT.to_string(),
            tool: "charge".to_string(),
            request_hash: Cid::of_bytes(b"{\"amount\":100}"),
            response_hash: Some(Cid::of_bytes(b"{\"id\":\"ch_1\"}")),
            idempotency_key: Some("order-7".to_string()),
            sandbox: "sb_0123456789ab".to_string(),
            tenant: "team-a".to_string(),
            started_at: 1_700_000_000_000,
            finished_at: 1_700_000_000_042,
            status: status::OK.to_string(),
            code: Some(200),
            nonce: None,
        }
    }

    #[test]
    fn signs_and_verifies_and_checks_the_bytes() {
        let keyring = Keyring::from_seed([7; 32]);
        let bytes = receipt().sign(&keyring).unwrap().encode().unwrap();
        let (_, back) = Receipt::verify(&keyring, &bytes).unwrap();
        assert_eq!(back, receipt());
        back.check_bytes(Some(b"{\"amount\":100}"), Some(b"{\"id\":\"ch_1\"}"))
            .unwrap();
        let err = back.check_bytes(Some(b"{\"amount\":1000}"), None).unwrap_err();
        assert_eq!(err.kind(), "hash_mismatch");
        assert!(err.to_string().contains("request"), "{err}");
        let err = back.check_bytes(None, Some(b"{}")).unwrap_err();
        assert!(err.to_string().contains("response"), "{err}");
    }

    #[test]
    fn a_nonce_makes_identical_calls_two_receipts_and_its_absence_keeps_old_bytes() {
        let keyring = Keyring::from_seed([7; 32]);
        let plain = receipt().sign(&keyring).unwrap().encode().unwrap();
        let payload = crate::canonical::encode(&receipt()).unwrap();
        let text = String::from_utf8_lossy(&payload);
        assert!(!text.contains("nonce"), "no nonce key when there is none");
        let with = |nonce: &str| Receipt {
            nonce: Some(nonce.to_string()),
            ..receipt()
        };
        let (a, b) = (new_nonce().unwrap(), new_nonce().unwrap());
        assert_ne!(a, b);
        let first = with(&a).sign(&keyring).unwrap().encode().unwrap();
        let second = with(&b).sign(&keyring).unwrap().encode().unwrap();
        assert_ne!(first, second);
        assert_ne!(first, plain);
        let (_, back) = Receipt::verify(&keyring, &first).unwrap();
        assert_eq!(back.nonce.as_deref(), Some(a.as_str()));
        for bad in ["", "ABCDEF0123456789ABCDEF0123456789", "0123", &format!("{a}0")] {
            assert_eq!(
                with(bad).sign(&keyring).unwrap_err().kind(),
                "invalid_object",
                "{bad:?}"
            );
        }
        // Written as null instead of left out: not canonical.
        #[derive(Serialize)]
        struct NullNonce {
            #[serde(flatten)]
            receipt: Receipt,
            nonce: Option<String>,
        }
        let bytes = crate::canonical::encode(&NullNonce {
            receipt: receipt(),
            nonce: None,
        })
        .unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains("nonce"));
        let err = crate::canonical::decode::<Receipt>(&bytes).unwrap_err();
        assert_eq!(err.kind(), "not_canonical");
    }

    #[test]
    fn refuses_tampering_and_other_keys() {
        let keyring = Keyring::from_seed([7; 32]);
        let mut envelope = receipt().sign(&keyring).unwrap();
        let other = Keyring::from_seed([8; 32]);
        let err = Receipt::verify(&other, &envelope.encode().unwrap()).unwrap_err();
        assert_eq!(err.kind(), "unknown_key");
        // A receipt re-encoded with a changed status keeps the old signature: refused.
        let mut changed = receipt();
        changed.status = status::FAILED.to_string();
        envelope.payload = crate::canonical::encode(&changed).unwrap();
        let err = Receipt::verify(&keyring, &envelope.encode().unwrap()).unwrap_err();
        assert_eq!(err.kind(), "bad_signature");
    }

    #[test]
    fn refuses_inconsistent_receipts() {
        let keyring = Keyring::from_seed([7; 32]);
        let mut r = receipt();
        r.status = status::ERROR.to_string();
        assert_eq!(r.sign(&keyring).unwrap_err().kind(), "invalid_object");
        let mut r = receipt();
        r.request_hash = Cid::of_object(&"x").unwrap();
        assert_eq!(r.sign(&keyring).unwrap_err().kind(), "invalid_object");
        let mut r = receipt();
        r.finished_at = r.started_at - 1;
        assert_eq!(r.sign(&keyring).unwrap_err().kind(), "invalid_object");
        // A signed payload that breaks the rules (signed by hand, bypassing Receipt::sign) is refused on read.
        let mut r = receipt();
        r.format = "tartarus-effects/v2/receipt".to_string();
        let bytes = envelope::sign(&keyring, &r).unwrap().encode().unwrap();
        assert_eq!(
            Receipt::verify(&keyring, &bytes).unwrap_err().kind(),
            "invalid_object"
        );
    }
}
