//! The conformance runner: golden vectors (`conformance/v1/*.json`) checked against this implementation.
//!
//! Each vector is one JSON file with a `kind` and a `description` (effects-v1 §7 lists the kinds and
//! their fields). Golden bytes, ids and signatures are fixed: a change to the encoder, the CID format or
//! the signing input fails the run, and such a change needs a new format version.

use crate::envelope::Signed;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use ipld_core::ipld::Ipld;
use serde::Deserialize;
use serde_json::Value;

use crate::car::read_car;
use crate::dataset::{build_manifest, DatasetQuery, EpisodeFacts, FactValue, Manifest};
use crate::episode::{verify_episode_car, write_episode_car, EpisodeBundle, EpisodeKeys};
use crate::receipt::Receipt;
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
    /// A receipt (CIDs as text) signed with the key from a fixed seed, and the bytes it names.
    Receipt {
        description: String,
        seed_hex: String,
        receipt: ReceiptJson,
        request_hex: String,
        response_hex: Option<String>,
        envelope_hex: String,
        receipt_cid: String,
    },
    /// Receipt envelope bytes (and optionally bodies) that a verifier holding the key from the seed refuses.
    ReceiptReject {
        description: String,
        verifier_seed_hex: String,
        envelope_hex: String,
        request_hex: Option<String>,
        response_hex: Option<String>,
        error: String,
    },
    /// A dataset query over candidate facts, and the manifest it gives.
    Dataset {
        description: String,
        query: Value,
        facts: Vec<FactsJson>,
        manifest_hex: String,
        manifest_cid: String,
    },
    /// A dataset query the parser refuses.
    DatasetReject {
        description: String,
        query: Value,
        error: String,
    },
    /// An episode bundle that verifies with its own keys, what it holds, and which blobs it leaves out.
    EpisodeCar {
        description: String,
        car_hex: String,
        episode_cid: String,
        records: usize,
        receipts: usize,
        signals: usize,
        blobs_included: usize,
        blobs_missing: Vec<String>,
    },
    /// An episode bundle refused, with its own keys or with `trusted_keys` (an episode-keys document).
    EpisodeCarReject {
        description: String,
        car_hex: String,
        trusted_keys: Option<Value>,
        error: String,
    },
}

/// A receipt in a vector: the [`Receipt`] fields, CIDs as text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiptJson {
    format: String,
    tool: String,
    request_hash: String,
    response_hash: Option<String>,
    idempotency_key: Option<String>,
    sandbox: String,
    tenant: String,
    started_at: u64,
    finished_at: u64,
    status: String,
    code: Option<i64>,
    #[serde(default)]
    nonce: Option<String>,
}

/// One candidate of a dataset vector.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FactsJson {
    episode: String,
    fields: BTreeMap<String, FactValue>,
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
            | Self::EnvelopeReject { description, .. }
            | Self::Receipt { description, .. }
            | Self::ReceiptReject { description, .. }
            | Self::Dataset { description, .. }
            | Self::DatasetReject { description, .. }
            | Self::EpisodeCar { description, .. }
            | Self::EpisodeCarReject { description, .. } => description,
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
        Vector::Receipt {
            seed_hex,
            receipt,
            request_hex,
            response_hex,
            envelope_hex,
            receipt_cid,
            ..
        } => {
            let keyring = Keyring::from_seed(seed(&seed_hex)?);
            let receipt = receipt.into_receipt()?;
            let bytes = receipt
                .sign(&keyring)
                .and_then(|envelope| envelope.encode())
                .map_err(|e| format!("sign: {e}"))?;
            same("envelope", &hex::encode(&bytes), &envelope_hex)?;
            let id = Cid::of_encoded(&bytes).map_err(|e| e.to_string())?;
            same("receipt cid", &id.to_string(), &receipt_cid)?;
            let (_, back) = Receipt::verify(keyring.public_keys(), &unhex(&envelope_hex)?)
                .map_err(|e| format!("verify: {e}"))?;
            if back != receipt {
                return Err("verifies to another receipt".into());
            }
            let response = response_hex.as_deref().map(unhex).transpose()?;
            back.check_bytes(Some(&unhex(&request_hex)?), response.as_deref())
                .map_err(|e| format!("check bytes: {e}"))
        }
        Vector::ReceiptReject {
            verifier_seed_hex,
            envelope_hex,
            request_hex,
            response_hex,
            error,
            ..
        } => {
            let keyring = Keyring::from_seed(seed(&verifier_seed_hex)?);
            let request = request_hex.as_deref().map(unhex).transpose()?;
            let response = response_hex.as_deref().map(unhex).transpose()?;
            let result = Receipt::verify(keyring.public_keys(), &unhex(&envelope_hex)?)
                .and_then(|(_, receipt)| receipt.check_bytes(request.as_deref(), response.as_deref()));
            expect_error(result, &error)
        }
        Vector::Dataset {
            query,
            facts,
            manifest_hex,
            manifest_cid,
            ..
        } => {
            let query = DatasetQuery::from_value(&query).map_err(|e| format!("query: {e}"))?;
            let mut candidates = facts
                .into_iter()
                .map(|f| {
                    Ok(EpisodeFacts {
                        episode: f.episode.parse().map_err(|e| format!("facts: {e}"))?,
                        fields: f.fields,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            let manifest = build_manifest(&query, &candidates).map_err(|e| format!("build: {e}"))?;
            let bytes = manifest.to_bytes().map_err(|e| e.to_string())?;
            same("manifest", &hex::encode(&bytes), &manifest_hex)?;
            same("manifest cid", &Cid::of_bytes(&bytes).to_string(), &manifest_cid)?;
            check_cid_text(&manifest_cid, Codec::Raw)?;
            if Manifest::from_bytes(&bytes).map_err(|e| e.to_string())? != manifest {
                return Err("the manifest does not read back".into());
            }
            candidates.reverse();
            let reversed = build_manifest(&query, &candidates).and_then(|m| m.to_bytes());
            same(
                "manifest of the candidates in reverse",
                &hex::encode(reversed.map_err(|e| e.to_string())?),
                &manifest_hex,
            )
        }
        Vector::DatasetReject { query, error, .. } => {
            expect_error(DatasetQuery::from_value(&query).map(drop), &error)
        }
        Vector::EpisodeCar {
            car_hex,
            episode_cid,
            records,
            receipts,
            signals,
            blobs_included,
            blobs_missing,
            ..
        } => {
            let bytes = unhex(&car_hex)?;
            let verified =
                verify_episode_car(bytes.as_slice(), None).map_err(|e| format!("verify: {}", chain(&e)))?;
            same("episode cid", &verified.id.to_string(), &episode_cid)?;
            let counts = [
                verified.records.len(),
                verified.receipts.len(),
                verified.signals.len(),
                verified.blobs_included,
            ];
            if counts != [records, receipts, signals, blobs_included] {
                return Err(format!(
                    "holds {counts:?} records, receipts, signals, blobs; expected {:?}",
                    [records, receipts, signals, blobs_included]
                ));
            }
            let missing: Vec<String> = verified.blobs_missing.iter().map(Cid::to_string).collect();
            if missing != blobs_missing {
                return Err(format!("blobs missing {missing:?}, expected {blobs_missing:?}"));
            }
            let trusted = verify_episode_car(bytes.as_slice(), Some(&verified.keys))
                .map_err(|e| format!("verify with its keys as trusted: {}", chain(&e)))?;
            if trusted.keys_embedded || !verified.keys_embedded {
                return Err("keys_embedded is wrong".into());
            }
            same("re-exported bundle", &hex::encode(reexport(&bytes)?), &car_hex)
        }
        Vector::EpisodeCarReject {
            car_hex,
            trusted_keys,
            error,
            ..
        } => {
            let trusted = trusted_keys
                .map(|keys| EpisodeKeys::from_json(&keys.to_string()))
                .transpose()
                .map_err(|e| format!("trusted keys: {e}"))?;
            let result = verify_episode_car(unhex(&car_hex)?.as_slice(), trusted.as_ref()).map(drop);
            expect_error(result, &error)
        }
    }
}

impl ReceiptJson {
    fn into_receipt(self) -> Result<Receipt, String> {
        let cid = |text: &str| text.parse::<Cid>().map_err(|e| format!("receipt: {e}"));
        Ok(Receipt {
            format: self.format,
            tool: self.tool,
            request_hash: cid(&self.request_hash)?,
            response_hash: self.response_hash.as_deref().map(cid).transpose()?,
            idempotency_key: self.idempotency_key,
            sandbox: self.sandbox,
            tenant: self.tenant,
            started_at: self.started_at,
            finished_at: self.finished_at,
            status: self.status,
            code: self.code,
            nonce: self.nonce,
        })
    }
}

/// Takes a verified bundle apart and writes it again with [`write_episode_car`]: the layout of effects-v1
/// §11.2 gives back the same bytes.
fn reexport(car_bytes: &[u8]) -> Result<Vec<u8>, String> {
    let verified = verify_episode_car(car_bytes, None).map_err(|e| chain(&e))?;
    let car = read_car(car_bytes).map_err(|e| e.to_string())?;
    let block = |cid: &Cid| {
        car.blocks
            .get(cid)
            .cloned()
            .ok_or_else(|| format!("no block {cid}"))
    };
    let bundle = EpisodeBundle {
        episode: block(&verified.id)?,
        records: verified
            .episode
            .trace
            .iter()
            .map(block)
            .collect::<Result<_, _>>()?,
        receipts: verified
            .episode
            .receipts
            .iter()
            .map(block)
            .collect::<Result<_, _>>()?,
        signals: car.roots[2..].iter().map(block).collect::<Result<_, _>>()?,
        blobs: verified
            .episode
            .blobs
            .iter()
            .filter_map(|cid| car.blocks.get(cid).map(|bytes| (*cid, bytes.clone())))
            .collect(),
        keys: verified.keys,
    };
    let mut out = Vec::new();
    write_episode_car(&bundle, &mut out).map_err(|e| format!("write: {}", chain(&e)))?;
    Ok(out)
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
        Err(e) => Err(format!("error {} ({}); expected {kind}", e.kind(), chain(&e))),
    }
}

/// The error and its causes on one line.
fn chain(error: &EffectsError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn unhex(text: &str) -> Result<Vec<u8>, String> {
    hex::decode(text).map_err(|e| format!("vector hex: {e}"))
}

fn seed(text: &str) -> Result<[u8; 32], String> {
    unhex(text)?
        .try_into()
        .map_err(|_| "seed is not 32 bytes".to_string())
}
