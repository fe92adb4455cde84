//! The conformance runner: golden vectors (`conformance/v1/*.json`) checked against this implementation.
//!
//! Each vector is one JSON file with a `kind` and a `description` (effects-v1 §7 lists the kinds and
//! their fields). Golden bytes, ids and signatures are fixed: a change to the encoder, the CID format or
//! the signing input fails the run, and such a change needs a new format version.

use std::fs;
use std::path::{Path, PathBuf};

use ipld_core::ipld::Ipld;
use serde::Deserialize;
use serde_json::Value;

use crate::{canonical, sign, signing_input, verify, Cid, Codec, EffectsError, Envelope, Keyring};

/// The outcome of [`run_conformance`].
#[derive(Debug, Default)]
pub struct ConformanceReport {
    /// Vectors that passed, by path relative to the vector directory.
    pub passed: Vec<String>,
    /// Vectors that failed.
    pub failed: Vec<ConformanceFailure>,
}

/// One failed vector.
#[derive(Debug)]
pub struct ConformanceFailure {
    /// Path relative to the vector directory.
    pub vector: String,
    /// What differed.
    pub reason: String,
}

impl ConformanceReport {
    /// Number of vectors checked.
    pub fn total(&self) -> usize {
        self.passed.len() + self.failed.len()
    }

    /// Whether every vector passed.
    pub fn all_passed(&self) -> bool {
        self.failed.is_empty()
    }
}

/// A vector file. Every hex string is lower case.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Vector {
    /// A JSON value (integers, strings, booleans, null, lists, maps), its canonical bytes and object id.
    Object {
        description: String,
        input: Value,
        canonical_hex: String,
        cid: String,
    },
    /// Canonical bytes with types JSON lacks (byte strings, links) and their object id.
    Canonical {
        description: String,
        hex: String,
        cid: String,
    },
    /// A blob and its raw id.
    Blob {
        description: String,
        hex: String,
        cid: String,
    },
    /// Bytes the decoder must refuse, or a JSON value the encoder must refuse, with the error kind.
    Reject {
        description: String,
        hex: Option<String>,
        input: Option<Value>,
        error: String,
    },
    /// CID text: valid (with its codec and digest) or refused with an error kind.
    Cid {
        description: String,
        text: String,
        codec: Option<String>,
        digest_hex: Option<String>,
        error: Option<String>,
    },
    /// A payload signed with the key from a fixed seed, and every intermediate byte string.
    Envelope {
        description: String,
        seed_hex: String,
        kid: String,
        payload: Value,
        payload_hex: String,
        payload_cid: String,
        signing_input_hex: String,
        signature_hex: String,
        envelope_hex: String,
    },
    /// Envelope bytes that a verifier holding the key from `verifier_seed_hex` must refuse.
    EnvelopeReject {
        description: String,
        verifier_seed_hex: String,
        envelope_hex: String,
        error: String,
    },
}

impl Vector {
    fn description(&self) -> &str {
        match self {
            Self::Object { description, .. }
            | Self::Canonical { description, .. }
            | Self::Blob { description, .. }
            | Self::Reject { description, .. }
            | Self::Cid { description, .. }
            | Self::Envelope { description, .. }
            | Self::EnvelopeReject { description, .. } => description,
        }
    }
}

/// Loads every `*.json` vector under `dir` (recursively, in path order) and checks it.
///
/// A vector that does not hold is a failure in the report; a file that is not a vector, or a directory
/// that cannot be read, is an error.
pub fn run_conformance(dir: &Path) -> Result<ConformanceReport, EffectsError> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    let mut report = ConformanceReport::default();
    for path in files {
        let name = path.strip_prefix(dir).unwrap_or(&path).display().to_string();
        let vector_error = |reason: String| EffectsError::Vector {
            path: path.clone(),
            reason,
        };
        let text = fs::read_to_string(&path).map_err(|e| vector_error(e.to_string()))?;
        let vector: Vector = serde_json::from_str(&text).map_err(|e| vector_error(e.to_string()))?;
        if vector.description().is_empty() {
            return Err(vector_error("empty description".into()));
        }
        match check(vector) {
            Ok(()) => report.passed.push(name),
            Err(reason) => report.failed.push(ConformanceFailure { vector: name, reason }),
        }
    }
    Ok(report)
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), EffectsError> {
    let error = |e: std::io::Error| EffectsError::Vector {
        path: dir.into(),
        reason: e.to_string(),
    };
    for entry in fs::read_dir(dir).map_err(error)? {
        let path = entry.map_err(error)?.path();
        if path.is_dir() {
            collect(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            files.push(path);
        }
    }
    Ok(())
}

fn check(vector: Vector) -> Result<(), String> {
    match vector {
        Vector::Object {
            input,
            canonical_hex,
            cid,
            ..
        } => {
            let bytes = canonical::encode(&input).map_err(|e| format!("encode: {e}"))?;
            same("canonical bytes", &hex::encode(&bytes), &canonical_hex)?;
            let back: Value = canonical::decode(&bytes).map_err(|e| format!("decode: {e}"))?;
            if back != input {
                return Err(format!("decodes to {back}, not the input"));
            }
            let id = Cid::of_object(&input).map_err(|e| e.to_string())?;
            same("cid", &id.to_string(), &cid)?;
            check_cid_text(&cid, Codec::DagCbor)
        }
        Vector::Canonical { hex, cid, .. } => {
            let bytes = unhex(&hex)?;
            let value: Ipld = canonical::decode(&bytes).map_err(|e| format!("decode: {e}"))?;
            let again = canonical::encode(&value).map_err(|e| format!("encode: {e}"))?;
            same("re-encoded bytes", &hex::encode(again), &hex)?;
            let id = Cid::of_encoded(&bytes).map_err(|e| e.to_string())?;
            same("cid", &id.to_string(), &cid)?;
            check_cid_text(&cid, Codec::DagCbor)
        }
        Vector::Blob { hex, cid, .. } => {
            same("cid", &Cid::of_bytes(&unhex(&hex)?).to_string(), &cid)?;
            check_cid_text(&cid, Codec::Raw)
        }
        Vector::Reject {
            hex, input, error, ..
        } => {
            let result = match (hex, input) {
                (Some(hex), None) => canonical::validate(&unhex(&hex)?),
                (None, Some(input)) => canonical::encode(&input).map(drop),
                _ => return Err("a reject vector has exactly one of `hex` and `input`".into()),
            };
            expect_error(result, &error)
        }
        Vector::Cid {
            text,
            codec,
            digest_hex,
            error,
            ..
        } => match error {
            Some(error) => expect_error(text.parse::<Cid>().map(drop), &error),
            None => {
                let cid: Cid = text.parse().map_err(|e| format!("parse: {e}"))?;
                let codec_name = match cid.codec() {
                    Codec::DagCbor => "dag-cbor",
                    Codec::Raw => "raw",
                };
                same("codec", codec_name, codec.as_deref().unwrap_or_default())?;
                same(
                    "digest",
                    &hex::encode(cid.digest()),
                    digest_hex.as_deref().unwrap_or_default(),
                )?;
                same("round trip", &cid.to_string(), &text)
            }
        },
        Vector::Envelope {
            seed_hex,
            kid,
            payload,
            payload_hex,
            payload_cid,
            signing_input_hex,
            signature_hex,
            envelope_hex,
            ..
        } => {
            let keyring = Keyring::from_seed(seed(&seed_hex)?);
            same("kid", keyring.current_kid(), &kid)?;
            let envelope = sign(&keyring, &payload).map_err(|e| format!("sign: {e}"))?;
            same("payload", &hex::encode(&envelope.payload), &payload_hex)?;
            same("payload cid", &envelope.payload_cid().to_string(), &payload_cid)?;
            let input = signing_input(envelope.version, &envelope.kid, &envelope.payload)
                .map_err(|e| e.to_string())?;
            same("signing input", &hex::encode(input), &signing_input_hex)?;
            same("signature", &hex::encode(&envelope.signature), &signature_hex)?;
            same(
                "envelope",
                &hex::encode(envelope.encode().map_err(|e| e.to_string())?),
                &envelope_hex,
            )?;
            let decoded =
                Envelope::decode(&unhex(&envelope_hex)?).map_err(|e| format!("decode envelope: {e}"))?;
            let value: Value = verify(keyring.public_keys(), &decoded).map_err(|e| format!("verify: {e}"))?;
            if value != payload {
                return Err(format!("verifies to {value}, not the payload"));
            }
            Ok(())
        }
        Vector::EnvelopeReject {
            verifier_seed_hex,
            envelope_hex,
            error,
            ..
        } => {
            let keyring = Keyring::from_seed(seed(&verifier_seed_hex)?);
            let result = Envelope::decode(&unhex(&envelope_hex)?)
                .and_then(|envelope| verify::<Ipld>(keyring.public_keys(), &envelope))
                .map(drop);
            expect_error(result, &error)
        }
    }
}

fn check_cid_text(text: &str, codec: Codec) -> Result<(), String> {
    let cid: Cid = text
        .parse()
        .map_err(|e| format!("expected cid does not parse: {e}"))?;
    if cid.codec() != codec {
        return Err(format!("expected cid has codec {:?}, not {codec:?}", cid.codec()));
    }
    Ok(())
}

fn same(what: &str, actual: &str, expected: &str) -> Result<(), String> {
    if actual == expected {
        Ok(())
    } else {
        Err(format!("{what}: got {actual}, expected {expected}"))
    }
}

fn expect_error(result: Result<(), EffectsError>, kind: &str) -> Result<(), String> {
    match result {
        Ok(()) => Err(format!("accepted; expected error {kind}")),
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => Err(format!("error {} ({e}); expected {kind}", e.kind())),
    }
}

fn unhex(text: &str) -> Result<Vec<u8>, String> {
    hex::decode(text).map_err(|e| format!("vector hex: {e}"))
}

fn seed(text: &str) -> Result<[u8; 32], String> {
    unhex(text)?
        .try_into()
        .map_err(|_| "seed is not 32 bytes".to_string())
}
