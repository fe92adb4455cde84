//! The one error type of the crate, with a stable machine-readable [`EffectsError::kind`] that the
//! conformance vectors name.

use std::io;
use std::path::PathBuf;

/// Why an object could not be encoded, decoded, identified, signed or verified.
///
/// Messages are short and never repeat their source; [`EffectsError::kind`] is the stable code used by the
/// conformance vectors (`conformance/v1`) and by other implementations of `docs/spec/effects-v1.md`.
#[derive(Debug, thiserror::Error)]
pub enum EffectsError {
    /// The value has no DAG-CBOR form (a map with non-string keys, an unsupported type).
    #[error("cannot encode as DAG-CBOR: {0}")]
    Encode(String),
    /// A float somewhere in the object; v1 objects carry integers only.
    #[error("floats are not allowed in effects-v1 objects")]
    Float,
    /// The input ends before the object does.
    #[error("input ends early: {0}")]
    Truncated(String),
    /// Bytes follow the end of the object.
    #[error("trailing bytes after the object")]
    TrailingBytes,
    /// An indefinite-length string, array or map.
    #[error("indefinite-length item")]
    IndefiniteLength,
    /// An integer or a length written with more bytes than needed.
    #[error("{what} not minimally encoded (head byte 0x{head:02x})")]
    NonMinimal {
        /// What was being read (`u64`, `map key`, `bytes` …).
        what: &'static str,
        /// The offending head byte.
        head: u8,
    },
    /// Map keys not in DAG-CBOR order (shorter first, then bytewise), or a key repeated.
    #[error("map keys not in canonical order or repeated")]
    UnsortedKeys,
    /// Well-formed DAG-CBOR that does not re-encode to the same bytes as the target type, typically a field
    /// the type does not model or a value it normalises.
    #[error("not canonical for the target type: {0}")]
    NotCanonical(String),
    /// Not DAG-CBOR at all, or the wrong shape for the target type.
    #[error("invalid DAG-CBOR: {0}")]
    Malformed(String),
    /// A CID string or byte form that is not an effects-v1 CID.
    #[error("invalid CID: {0}")]
    InvalidCid(String),
    /// An envelope names a key the verifier does not know.
    #[error("unknown key id {kid:?}")]
    UnknownKey {
        /// The key id the envelope names.
        kid: String,
    },
    /// The signature does not verify under the named key.
    #[error("signature does not verify under key {kid:?}")]
    BadSignature {
        /// The key id the envelope names.
        kid: String,
    },
    /// An envelope of a version this implementation does not read.
    #[error("envelope version {found} is not supported (this implementation reads version {supported})")]
    WrongVersion {
        /// The version in the envelope.
        found: u64,
        /// The only version read.
        supported: u32,
    },
    /// The operating system could not provide randomness for a new key.
    #[error("no operating system randomness for a new key: {0}")]
    Randomness(String),
    /// A key file or directory that cannot be read or written.
    #[error("key store {path}")]
    KeyStore {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A key file readable by others than its owner.
    #[error("key file {path} has mode {mode:o}; make it 0600")]
    InsecureKeyFile {
        /// The private key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key store whose contents do not make sense (bad hex, a key id that does not match its key).
    #[error("key store {path}: {reason}")]
    InvalidKeyStore {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Bytes whose hash is not the id a signed object (or a CAR section) names for them.
    #[error("{what} bytes do not match their id: expected {expected}, got {actual}")]
    HashMismatch {
        /// Which bytes (`request`, `response`, `block` …).
        what: &'static str,
        /// The id the signed object names.
        expected: String,
        /// The id of the bytes given.
        actual: String,
    },
    /// A well-encoded, correctly signed object that breaks its type's rules.
    #[error("invalid {what}: {reason}")]
    InvalidObject {
        /// The object's type (`receipt`, `episode` …).
        what: &'static str,
        /// Which rule it breaks.
        reason: String,
    },
    /// A CAR file that is not well-formed CARv1 with effects-v1 blocks (effects-v1 §11.1).
    #[error("invalid CAR at byte {offset}: {reason}")]
    InvalidCar {
        /// Offset in the file of the header or section at fault.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A well-formed CAR that is not a valid episode bundle: roots, missing or unreferenced blocks, the key
    /// block (effects-v1 §11.2).
    #[error("invalid episode bundle: {reason}")]
    InvalidBundle {
        /// What is wrong.
        reason: String,
    },
    /// An object of an episode bundle that failed its check; [`EffectsError::kind`] is the kind of the cause.
    #[error("in {object}")]
    InBundle {
        /// Which object (`episode`, `receipt 2 (bafy…)` …).
        object: String,
        /// Why it failed.
        #[source]
        source: Box<EffectsError>,
    },
    /// A dataset query that does not parse or breaks a rule; `path` names the node (`filter.and[1].gt`).
    #[error("query {path}: {reason}")]
    InvalidQuery {
        /// Where in the query, dotted, with list indices.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a stream (a CAR file) failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// A conformance vector that cannot be read or does not describe a check.
    #[error("conformance vector {path}: {reason}")]
    Vector {
        /// The vector file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl EffectsError {
    /// A stable code for the kind of error, as named by the conformance vectors' `error` field. An
    /// [`EffectsError::InBundle`] has the kind of its cause.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Encode(_) => "encode",
            Self::Float => "float",
            Self::Truncated(_) => "truncated",
            Self::TrailingBytes => "trailing_bytes",
            Self::IndefiniteLength => "indefinite_length",
            Self::NonMinimal { .. } => "non_minimal",
            Self::UnsortedKeys => "unsorted_keys",
            Self::NotCanonical(_) => "not_canonical",
            Self::Malformed(_) => "malformed",
            Self::InvalidCid(_) => "invalid_cid",
            Self::UnknownKey { .. } => "unknown_key",
            Self::BadSignature { .. } => "bad_signature",
            Self::WrongVersion { .. } => "wrong_version",
            Self::Randomness(_) => "randomness",
            Self::KeyStore { .. } => "key_store",
            Self::InsecureKeyFile { .. } => "insecure_key_file",
            Self::InvalidKeyStore { .. } => "invalid_key_store",
            Self::HashMismatch { .. } => "hash_mismatch",
            Self::InvalidObject { .. } => "invalid_object",
            Self::InvalidCar { .. } => "invalid_car",
            Self::InvalidBundle { .. } => "invalid_bundle",
            Self::InBundle { source, .. } => source.kind(),
            Self::InvalidQuery { .. } => "invalid_query",
            Self::Io { .. } => "io",
            Self::Vector { .. } => "vector",
        }
    }
}
