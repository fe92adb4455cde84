//! Verifiable effects, the foundation: canonical encoding, content ids and signed envelopes, as specified
//! by `docs/spec/effects-v1.md`.
//!
//! Contract: a value has exactly one encoding ([`encode`]); [`decode`] accepts only that encoding, so the
//! id of an object ([`Cid::of_object`]) and a signature over its bytes ([`sign`]) are statements about the
//! value, not about one of several spellings of it. A [`Keyring`] signs with its current Ed25519 key and
//! verifies with every key it has held; [`verify`] reads a payload only after its signature holds.
//!
//! Place in the data flow: a library below the server and the CLI. Receipts, episodes, signals and
//! datasets are built from these pieces as pure data: the server decides what to record, this crate how it
//! is encoded, signed, exported and checked; it does not know about sandboxes. It does I/O only in
//! [`Keyring::load_or_create`] / [`Keyring::rotate`] (the key directory), [`run_conformance`] (reading
//! vectors) and [`BlobStore`] (the blob directory); CAR files go through the caller's `Read` / `Write`.
//!
//! | module | role |
//! | --- | --- |
//! | [`canonical`] | deterministic DAG-CBOR without floats; the strict decoder |
//! | [`cid`] | [`Cid`]: CIDv1, dag-cbor or raw, BLAKE3-256; base32 lower text |
//! | [`blobs`] | [`BlobStore`]: content-addressed blobs on disk, verified reads, range proofs, quotas, gc |
//! | [`keyring`] | [`Keyring`], [`PublicKeys`], key ids, the key directory |
//! | [`envelope`] | [`Envelope`], [`sign`], [`verify`], the signing input |
//! | [`receipt`] | [`Receipt`]: the signed record of one tool call, checked against the bytes |
//! | [`car`] | CARv1 of effects-v1 blocks: [`CarWriter`], [`CarReader`], [`read_car`]; every block verified |
//! | [`episode`] | [`TraceRecord`], [`Episode`], [`Signal`], [`Redactor`]; bundles: [`write_episode_car`], [`verify_episode_car`] |
//! | [`dataset`] | [`DatasetQuery`], [`build_manifest`]: deterministic, seeded, stratified selection of episodes |
//! | [`conformance`] | [`run_conformance`] over the golden vectors in `conformance/v1` |
//! | `error` | [`EffectsError`] with stable kinds |
//!
//! # Crate choices
//!
//! * **`serde_ipld_dagcbor` 0.7** (ipld/serde_ipld_dagcbor, the IPLD project's own serde codec): encodes
//!   DAG-CBOR deterministically (map keys sorted length-first, minimal heads, definite lengths) and, in its
//!   default strict mode, decodes only canonical input — it refuses unsorted or repeated keys, non-minimal
//!   integers and lengths, indefinite lengths, trailing bytes, tags other than 42 and f32/non-finite/-0.0
//!   floats. The tests check each refusal against the library directly, not only through this crate. On
//!   top of it [`decode`] re-encodes the typed value and compares bytes, which also refuses fields the
//!   target type would drop, and both directions refuse floats (a project rule, not DAG-CBOR's).
//! * **`cid` 0.11** with its `multihash` 0.19 (multiformats/rust-cid): the reference Rust CID types, the
//!   binary and multibase forms; BLAKE3 digests come from the workspace's `blake3` and are wrapped with
//!   multihash code 0x1e, so no hasher table (`multihash-codetable`) is needed. `ipld-core` is the generic
//!   tree the strict decoder yields, used to find floats and read envelope versions.
//! * **`ed25519-dalek` 2** (dalek-cryptography): the maintained pure-Rust Ed25519, deterministic
//!   signatures (RFC 8032) so golden vectors are stable, `verify_strict` against malleability and
//!   small-order keys, secrets zeroized on drop. Version 2 rather than the new 3.0 for its long record.
//!   New keys come from the operating system via `getrandom`, with no `rand` stack.
//! * **CARv1 by hand** (`car`): the format is a varint, a DAG-CBOR header and length-prefixed sections, a
//!   hundred lines over the pieces above. The Rust CAR crates (`iroh-car`, `rs-car`) are async and accept
//!   any CID; here only effects-v1 CIDs are read, every block is checked against its id as it arrives, and
//!   hostile lengths are bounded — no dependency added.

pub mod blobs;
pub mod canonical;
pub mod car;
pub mod cid;
pub mod conformance;
pub mod dataset;
pub mod envelope;
pub mod episode;
mod error;
pub mod keyring;
pub mod receipt;

pub use crate::blobs::{verify_range, BlobError, BlobStore, GcReport, PutResult, Quota, RangeRead};
pub use crate::canonical::{decode, encode};
pub use crate::car::{read_car, Car, CarReader, CarWriter};
pub use crate::cid::{Cid, Codec};
pub use crate::conformance::{run_conformance, ConformanceFailure, ConformanceReport};
pub use crate::dataset::{build_manifest, DatasetQuery, EpisodeFacts, FactValue, Filter, Manifest, Sample};
pub use crate::envelope::{sign, signing_input, verify, Envelope, Signed};
pub use crate::episode::{
    redacted_cid, verify_episode_car, write_episode_car, Episode, EpisodeBundle, EpisodeKeys, Redactor,
    Signal, TraceRecord, VerifiedEpisode,
};
pub use crate::error::EffectsError;
pub use crate::keyring::{key_id, Keyring, PublicKeys, VerifyingKeys};
pub use crate::receipt::{Receipt, RECEIPT_FORMAT};
