//! Signed envelopes: a canonical payload, the id of the key that signed it and an Ed25519 signature over a
//! domain-separated signing input (effects-v1 §4).

use ed25519_dalek::Signature;
use ipld_core::ipld::Ipld;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cid::{Cid, Codec};
use crate::keyring::{Keyring, VerifyingKeys};
use crate::{canonical, EffectsError};

/// The envelope version this implementation writes and reads.
pub const VERSION: u32 = 1;
/// The domain separation string inside every signing input: a v1 envelope signature cannot be replayed as
/// a signature over anything else this project (or another using the same key) signs.
pub const DOMAIN: &str = "tartarus-effects/v1/envelope";

/// A signed object: `{"kid", "payload", "version", "signature"}` in canonical DAG-CBOR.
///
/// `payload` holds the canonical bytes of the signed value, not the value: the signature covers exactly
/// these bytes, and the payload's id ([`Envelope::payload_cid`]) is computable without knowing its type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version; [`VERSION`].
    pub version: u32,
    /// Key id of the signing key ([`crate::key_id`]).
    pub kid: String,
    /// Canonical DAG-CBOR of the signed value.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Ed25519 signature (64 bytes) over [`signing_input`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// What the signature covers (effects-v1 §4.2).
#[derive(Serialize)]
struct SigningInput<'a> {
    domain: &'a str,
    version: u32,
    kid: &'a str,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}

/// The exact bytes an envelope's signature covers: canonical DAG-CBOR of
/// `{"kid": kid, "domain": "tartarus-effects/v1/envelope", "payload": payload, "version": version}`.
pub fn signing_input(version: u32, kid: &str, payload: &[u8]) -> Result<Vec<u8>, EffectsError> {
    canonical::encode(&SigningInput {
        domain: DOMAIN,
        version,
        kid,
        payload,
    })
}

impl Envelope {
    /// The envelope's canonical bytes.
    pub fn encode(&self) -> Result<Vec<u8>, EffectsError> {
        canonical::encode(self)
    }

    /// Reads an envelope from canonical bytes, checking the version before the layout so that a future
    /// version is reported as [`EffectsError::WrongVersion`] rather than as a shape error.
    pub fn decode(bytes: &[u8]) -> Result<Self, EffectsError> {
        if let Ipld::Map(fields) = canonical::decode::<Ipld>(bytes)? {
            if let Some(Ipld::Integer(version)) = fields.get("version") {
                if *version != i128::from(VERSION) {
                    return Err(EffectsError::WrongVersion {
                        found: u64::try_from(*version).unwrap_or(u64::MAX),
                        supported: VERSION,
                    });
                }
            }
        }
        canonical::decode(bytes)
    }

    /// The id of the signed object (codec dag-cbor, over the payload bytes).
    pub fn payload_cid(&self) -> Cid {
        Cid::from_digest(Codec::DagCbor, *blake3::hash(&self.payload).as_bytes())
    }
}

/// Signs `value` with the keyring's current key.
pub fn sign<T: Serialize + ?Sized>(keyring: &Keyring, value: &T) -> Result<Envelope, EffectsError> {
    let payload = canonical::encode(value)?;
    let kid = keyring.current_kid().to_string();
    let signature = keyring.sign(&signing_input(VERSION, &kid, &payload)?);
    Ok(Envelope {
        version: VERSION,
        kid,
        payload,
        signature: signature.to_bytes().to_vec(),
    })
}

/// Verifies `envelope` against `keys` and returns the signed value.
///
/// In order: the version is [`VERSION`]; `keys` knows the key id; the signature verifies under Ed25519's
/// strict rules (no small-order keys, no malleable signatures); only then is the payload read, and it must
/// be canonical for `T` ([`canonical::decode`]).
pub fn verify<T: DeserializeOwned + Serialize>(
    keys: &impl VerifyingKeys,
    envelope: &Envelope,
) -> Result<T, EffectsError> {
    if envelope.version != VERSION {
        return Err(EffectsError::WrongVersion {
            found: envelope.version.into(),
            supported: VERSION,
        });
    }
    let key = keys
        .verifying_key(&envelope.kid)
        .ok_or_else(|| EffectsError::UnknownKey {
            kid: envelope.kid.clone(),
        })?;
    let bad = || EffectsError::BadSignature {
        kid: envelope.kid.clone(),
    };
    let signature = Signature::from_slice(&envelope.signature).map_err(|_| bad())?;
    let message = signing_input(envelope.version, &envelope.kid, &envelope.payload)?;
    key.verify_strict(&message, &signature).map_err(|_| bad())?;
    canonical::decode(&envelope.payload)
}

/// An object exchanged as a signed envelope (receipts, episodes, signals): it obeys rules beyond its
/// types, checked before it is signed and after its signature is verified.
pub trait Signed: Serialize + DeserializeOwned + Sized {
    /// The object's name in errors.
    const WHAT: &'static str;

    /// The rules beyond the types.
    fn check(&self) -> Result<(), EffectsError>;

    /// Checks the object and signs it with the keyring's current key.
    fn sign(&self, keyring: &Keyring) -> Result<Envelope, EffectsError> {
        self.check()?;
        sign(keyring, self)
    }

    /// Reads an envelope's bytes: canonical, signed by a key in `keys`, a valid object of this type.
    fn verify(keys: &impl VerifyingKeys, envelope_bytes: &[u8]) -> Result<(Envelope, Self), EffectsError> {
        let envelope = Envelope::decode(envelope_bytes)?;
        let object: Self = verify(keys, &envelope)?;
        object.check()?;
        Ok((envelope, object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PublicKeys;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Effect {
        sandbox: String,
        exit_code: i64,
        wall_ms: u64,
    }

    fn effect() -> Effect {
        Effect {
            sandbox: "sb-1".into(),
            exit_code: 0,
            wall_ms: 1234,
        }
    }

    fn keyring() -> Keyring {
        Keyring::from_seed([42; 32])
    }

    #[test]
    fn test_sign_then_verify_returns_the_value() {
        let keyring = keyring();
        let envelope = sign(&keyring, &effect()).unwrap();
        assert_eq!(envelope.kid, keyring.current_kid());
        assert_eq!(envelope.signature.len(), 64);
        assert_eq!(verify::<Effect>(&keyring, &envelope).unwrap(), effect());
        assert_eq!(
            verify::<Effect>(keyring.public_keys(), &envelope).unwrap(),
            effect()
        );
    }

    #[test]
    fn test_envelope_bytes_round_trip() {
        let envelope = sign(&keyring(), &effect()).unwrap();
        let bytes = envelope.encode().unwrap();
        assert_eq!(Envelope::decode(&bytes).unwrap(), envelope);
        assert_eq!(envelope.payload_cid(), Cid::of_object(&effect()).unwrap());
    }

    #[test]
    fn test_signing_is_deterministic() {
        assert_eq!(
            sign(&keyring(), &effect()).unwrap(),
            sign(&keyring(), &effect()).unwrap()
        );
    }

    #[test]
    fn test_verify_with_unknown_kid_fails() {
        let envelope = sign(&keyring(), &effect()).unwrap();
        let other = Keyring::from_seed([1; 32]);
        let err = verify::<Effect>(&other, &envelope).unwrap_err();
        assert_eq!(err.kind(), "unknown_key");
        assert!(err.to_string().contains(&envelope.kid), "{err}");
        assert_eq!(
            verify::<Effect>(&PublicKeys::new(), &envelope)
                .unwrap_err()
                .kind(),
            "unknown_key"
        );
    }

    #[test]
    fn test_verify_rejects_tampered_payload_signature_and_kid() {
        let keyring = keyring();
        let envelope = sign(&keyring, &effect()).unwrap();

        let mut payload = envelope.clone();
        payload.payload = canonical::encode(&Effect {
            exit_code: 1,
            ..effect()
        })
        .unwrap();
        assert_eq!(
            verify::<Effect>(&keyring, &payload).unwrap_err().kind(),
            "bad_signature"
        );

        let mut signature = envelope.clone();
        signature.signature[10] ^= 1;
        assert_eq!(
            verify::<Effect>(&keyring, &signature).unwrap_err().kind(),
            "bad_signature"
        );

        let mut short = envelope.clone();
        short.signature.truncate(63);
        assert_eq!(
            verify::<Effect>(&keyring, &short).unwrap_err().kind(),
            "bad_signature"
        );
    }

    #[test]
    fn test_signature_is_bound_to_the_kid() {
        // Two keys the verifier knows: an envelope relabelled with the other key's id must not verify.
        let mut keyring = keyring();
        let envelope = sign(&keyring, &effect()).unwrap();
        let new_kid = keyring.rotate().unwrap().to_string();
        let relabelled = Envelope {
            kid: new_kid,
            ..envelope
        };
        assert_eq!(
            verify::<Effect>(&keyring, &relabelled).unwrap_err().kind(),
            "bad_signature"
        );
    }

    #[test]
    fn test_verify_rejects_wrong_version() {
        let keyring = keyring();
        let envelope = Envelope {
            version: 2,
            ..sign(&keyring, &effect()).unwrap()
        };
        assert_eq!(
            verify::<Effect>(&keyring, &envelope).unwrap_err().kind(),
            "wrong_version"
        );
        let bytes = envelope.encode().unwrap();
        let err = Envelope::decode(&bytes).unwrap_err();
        assert_eq!(err.kind(), "wrong_version");
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn test_verify_rejects_signed_non_canonical_payload() {
        // A signer that signed non-canonical bytes ({"b":1,"a":2}): the signature is valid, the payload is not.
        let keyring = keyring();
        let payload = hex::decode("a2616201616102").unwrap();
        let signature = keyring.sign(&signing_input(VERSION, keyring.current_kid(), &payload).unwrap());
        let envelope = Envelope {
            version: VERSION,
            kid: keyring.current_kid().into(),
            payload,
            signature: signature.to_bytes().to_vec(),
        };
        assert_eq!(
            verify::<Ipld>(&keyring, &envelope).unwrap_err().kind(),
            "unsorted_keys"
        );
    }

    #[test]
    fn test_old_key_verifies_after_rotation_but_only_current_signs() {
        let mut keyring = keyring();
        let before = sign(&keyring, &effect()).unwrap();
        let old = keyring.current_kid().to_string();
        keyring.rotate().unwrap();
        let after = sign(&keyring, &effect()).unwrap();
        assert_eq!(verify::<Effect>(&keyring, &before).unwrap(), effect());
        assert_eq!(before.kid, old);
        assert_ne!(after.kid, old);
        assert_eq!(after.kid, keyring.current_kid());
        assert_eq!(verify::<Effect>(keyring.public_keys(), &after).unwrap(), effect());
    }

    #[test]
    fn test_old_key_verifies_after_rotation_on_disk_and_export() {
        let tmp = tempfile::tempdir().unwrap();
        let mut keyring = Keyring::load_or_create(tmp.path()).unwrap();
        let before = sign(&keyring, &effect()).unwrap();
        keyring.rotate().unwrap();
        let exported = PublicKeys::load(&tmp.path().join(crate::keyring::PUBLIC_KEYS_FILE)).unwrap();
        assert_eq!(verify::<Effect>(&exported, &before).unwrap(), effect());
        let reloaded = Keyring::load_or_create(tmp.path()).unwrap();
        assert_ne!(sign(&reloaded, &effect()).unwrap().kid, before.kid);
    }

    #[test]
    fn test_envelope_decode_rejects_non_canonical_and_truncated_bytes() {
        let bytes = sign(&keyring(), &effect()).unwrap().encode().unwrap();
        assert_eq!(
            Envelope::decode(&bytes[..bytes.len() - 1]).unwrap_err().kind(),
            "truncated"
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(Envelope::decode(&trailing).unwrap_err().kind(), "trailing_bytes");
    }

    #[test]
    fn test_envelope_decode_rejects_unknown_fields() {
        let envelope = sign(&keyring(), &effect()).unwrap();
        let mut map = match canonical::decode::<Ipld>(&envelope.encode().unwrap()).unwrap() {
            Ipld::Map(map) => map,
            other => panic!("{other:?}"),
        };
        map.insert("extra".into(), Ipld::Integer(1));
        let bytes = canonical::encode(&Ipld::Map(map)).unwrap();
        assert_eq!(Envelope::decode(&bytes).unwrap_err().kind(), "not_canonical");
    }
}
