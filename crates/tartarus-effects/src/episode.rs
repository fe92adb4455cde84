//! Episodes: the signed account of one sandbox's life (its trace records, the receipts of its tool calls,
//! the blobs they name), the signals evaluators attach to it, redaction of secrets before anything is
//! recorded, and the episode bundle, a CAR file anyone can check offline (effects-v1 §11, §12).
//!
//! Objects, all canonical DAG-CBOR with times in milliseconds since the Unix epoch:
//!
//! * a [`TraceRecord`] is one event (`sandbox.start`, `exec`, `tool_call`, `sandbox.end`) with free-form
//!   attributes; it is not signed by itself, the episode names it by id;
//! * an [`Episode`] is signed by the server (an [`Envelope`] with an `Episode` payload) and lists its trace
//!   records, its receipts and its blobs by id; its **id** is the dag-cbor CID of the envelope bytes;
//! * a [`Signal`] (a score or label) is signed by an evaluator's key and names the episode's id.
//!
//! [`write_episode_car`] exports an [`EpisodeBundle`]; [`verify_episode_car`] checks every block, every
//! signature and every cross-reference, and refuses blocks the episode does not account for, so a bundle
//! cannot smuggle content under a verified root. Missing blobs are reported, not refused: an exporter may
//! leave out large or secret-bearing blobs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{Read, Write};
use std::path::Path;

use ipld_core::ipld::Ipld;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::car::{read_car, CarWriter};
use crate::cid::{Cid, Codec};
use crate::envelope::Signed;
use crate::envelope::{self, Envelope};
use crate::keyring::{PublicKeys, PublicKeysDocument, VerifyingKeys};
use crate::receipt::Receipt;
use crate::{canonical, EffectsError};

/// The `format` of every v1 trace record.
pub const TRACE_FORMAT: &str = "tartarus-effects/v1/trace";
/// The `format` of every v1 episode.
pub const EPISODE_FORMAT: &str = "tartarus-effects/v1/episode";
/// The `format` of every v1 signal.
pub const SIGNAL_FORMAT: &str = "tartarus-effects/v1/signal";
/// The `format` of the key document inside an episode bundle ([`EpisodeKeys`]).
pub const EPISODE_KEYS_FORMAT: &str = "tartarus-effects/v1/episode-keys";
/// Longest signal name, label and evaluator name, in characters (Unicode scalar values).
pub const MAX_NAME_CHARS: usize = 128;
/// Longest signal comment, in characters.
pub const MAX_COMMENT_CHARS: usize = 4096;

/// The kinds of trace record; no other kind is valid in v1.
pub mod trace_kind {
    /// The sandbox started (attributes: the spec's summary).
    pub const SANDBOX_START: &str = "sandbox.start";
    /// One command ran in the sandbox (attributes: argv, exit status, output blob ids).
    pub const EXEC: &str = "exec";
    /// One tool call went through the gateway (attributes: the tool, the receipt's id).
    pub const TOOL_CALL: &str = "tool_call";
    /// The sandbox ended (attributes: outcome, exit code).
    pub const SANDBOX_END: &str = "sandbox.end";
    /// Every kind, in lifecycle order.
    pub const ALL: [&str; 4] = [SANDBOX_START, EXEC, TOOL_CALL, SANDBOX_END];
}

/// One event of a sandbox's life, numbered from 0 in the order the server recorded it.
///
/// `attrs` is free-form (canonical DAG-CBOR values: no floats) and is where redaction applies
/// ([`Redactor`]); links in it to raw CIDs name blobs (command output, request bodies).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRecord {
    /// [`TRACE_FORMAT`].
    pub format: String,
    /// Position in the episode's trace: 0, 1, 2 … without gaps.
    pub seq: u64,
    /// When it happened, ms since the Unix epoch.
    pub at: u64,
    /// One of [`trace_kind::ALL`].
    pub kind: String,
    /// The sandbox's id.
    pub sandbox: String,
    /// What happened, by kind.
    pub attrs: BTreeMap<String, Ipld>,
}

impl TraceRecord {
    /// A record, checked ([`TraceRecord::check`]).
    pub fn new(
        seq: u64,
        at: u64,
        kind: &str,
        sandbox: &str,
        attrs: BTreeMap<String, Ipld>,
    ) -> Result<Self, EffectsError> {
        let record = Self {
            format: TRACE_FORMAT.to_string(),
            seq,
            at,
            kind: kind.to_string(),
            sandbox: sandbox.to_string(),
            attrs,
        };
        record.check()?;
        Ok(record)
    }

    /// The rules beyond the types: the format, a known kind, a sandbox id.
    pub fn check(&self) -> Result<(), EffectsError> {
        let bad = |reason: String| invalid_object("trace record", reason);
        if self.format != TRACE_FORMAT {
            return bad(format!("format is {:?}, expected {TRACE_FORMAT:?}", self.format));
        }
        if !trace_kind::ALL.contains(&self.kind.as_str()) {
            return bad(format!(
                "kind {:?} is not one of {}",
                self.kind,
                trace_kind::ALL.join(", ")
            ));
        }
        if self.sandbox.is_empty() {
            return bad("sandbox must not be empty".into());
        }
        Ok(())
    }

    /// The canonical bytes (refused when an attribute holds a float or an out-of-range integer).
    pub fn to_bytes(&self) -> Result<Vec<u8>, EffectsError> {
        canonical::encode(self)
    }

    /// The id the episode lists: the dag-cbor CID of [`TraceRecord::to_bytes`].
    pub fn cid(&self) -> Result<Cid, EffectsError> {
        Cid::of_object(self)
    }

    /// Reads canonical bytes and checks the record.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EffectsError> {
        let record: Self = canonical::decode(bytes)?;
        record.check()?;
        Ok(record)
    }
}

/// One sandbox's life as the server recorded it: signed by the server's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Episode {
    /// [`EPISODE_FORMAT`].
    pub format: String,
    /// The sandbox's id.
    pub sandbox: String,
    /// The sandbox's tenant.
    pub tenant: String,
    /// The template it was created from, if any.
    pub template: Option<String>,
    /// When the sandbox started, ms since the Unix epoch.
    pub started_at: u64,
    /// When it ended; not before `started_at`.
    pub finished_at: u64,
    /// How it ended, as the server names it (`exited`, `killed`, `timeout` …).
    pub outcome: String,
    /// The main command's exit code, if it had one.
    pub exit_code: Option<i64>,
    /// Dag-cbor CIDs of the trace records, in `seq` order.
    pub trace: Vec<Cid>,
    /// Dag-cbor CIDs of the receipt envelopes (`Cid::of_encoded(envelope bytes)`), in call order.
    pub receipts: Vec<Cid>,
    /// Raw CIDs of the blobs the records and receipts name (output, request and response bodies), sorted
    /// by binary form, without repeats.
    pub blobs: Vec<Cid>,
}

impl Episode {
    /// The rules beyond the types: format, non-empty names, id codecs, sorted unique blobs, time order.
    pub fn check(&self) -> Result<(), EffectsError> {
        let bad = |reason: String| invalid_object("episode", reason);
        if self.format != EPISODE_FORMAT {
            return bad(format!(
                "format is {:?}, expected {EPISODE_FORMAT:?}",
                self.format
            ));
        }
        if self.sandbox.is_empty() || self.tenant.is_empty() || self.outcome.is_empty() {
            return bad("sandbox, tenant and outcome must not be empty".into());
        }
        if self.finished_at < self.started_at {
            return bad("finished_at is before started_at".into());
        }
        for (list, ids, codec) in [
            ("trace", &self.trace, Codec::DagCbor),
            ("receipts", &self.receipts, Codec::DagCbor),
            ("blobs", &self.blobs, Codec::Raw),
        ] {
            if let Some(cid) = ids.iter().find(|cid| cid.codec() != codec) {
                let expected = if codec == Codec::Raw { "raw" } else { "dag-cbor" };
                return bad(format!("{list} lists {cid}, which is not a {expected} id"));
            }
        }
        if let Some(pair) = self.blobs.windows(2).find(|pair| pair[0] >= pair[1]) {
            return bad(format!(
                "blobs are not sorted and unique: {} then {}",
                pair[0], pair[1]
            ));
        }
        Ok(())
    }
}

impl Signed for Episode {
    const WHAT: &'static str = "episode";

    fn check(&self) -> Result<(), EffectsError> {
        Episode::check(self)
    }
}

/// An evaluator's judgement of an episode: a score, a label or both, signed by the evaluator's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signal {
    /// [`SIGNAL_FORMAT`].
    pub format: String,
    /// The episode's id: the dag-cbor CID of its envelope bytes.
    pub episode: Cid,
    /// Who judged (a person, a model, a test suite); names its key set in [`EpisodeKeys::evaluators`].
    pub evaluator: String,
    /// What was judged (`quality`, `review` …).
    pub name: String,
    /// An integer on the evaluator's scale (basis points, stars …).
    pub score: Option<i64>,
    /// A category (`pass`, `unsafe` …).
    pub label: Option<String>,
    /// Free text.
    pub comment: Option<String>,
    /// When, ms since the Unix epoch.
    pub at: u64,
}

impl Signal {
    /// The rules beyond the types: format, names present and short, a score or a label, a dag-cbor episode.
    pub fn check(&self) -> Result<(), EffectsError> {
        let bad = |reason: String| invalid_object("signal", reason);
        if self.format != SIGNAL_FORMAT {
            return bad(format!("format is {:?}, expected {SIGNAL_FORMAT:?}", self.format));
        }
        if self.episode.codec() != Codec::DagCbor {
            return bad(format!("episode {} is not a dag-cbor id", self.episode));
        }
        for (field, value) in [
            ("evaluator", Some(&self.evaluator)),
            ("name", Some(&self.name)),
            ("label", self.label.as_ref()),
        ] {
            match value.map(|text| text.chars().count()) {
                Some(0) => return bad(format!("{field} must not be empty")),
                Some(n) if n > MAX_NAME_CHARS => {
                    return bad(format!("{field} is {n} characters, more than {MAX_NAME_CHARS}"))
                }
                _ => {}
            }
        }
        if let Some(n) = self.comment.as_ref().map(|text| text.chars().count()) {
            if n > MAX_COMMENT_CHARS {
                return bad(format!(
                    "comment is {n} characters, more than {MAX_COMMENT_CHARS}"
                ));
            }
        }
        if self.score.is_none() && self.label.is_none() {
            return bad("a signal has a score, a label or both".into());
        }
        Ok(())
    }
}

impl Signed for Signal {
    const WHAT: &'static str = "signal";

    fn check(&self) -> Result<(), EffectsError> {
        Signal::check(self)
    }
}

/// Replaces secrets in what the server records, before it is hashed or signed.
///
/// A value is redacted when it contains one of the secret literals (the values of the sandbox's secret
/// variables, API keys the gateway injects …) or, for a variable, when its name matches a pattern. The
/// replacement is `{"redacted": <raw CID of the whole value>}`: it hides the value, yet commits to it, so a
/// holder of the value can check `Cid::of_bytes(value) == redacted_cid(…)`. For a variable that is the
/// secret itself. The id is an unsalted hash: a secret that can be guessed (a short password) can be
/// confirmed by anyone who guesses it, so only high-entropy secrets are protected by redaction alone.
#[derive(Clone, Default)]
pub struct Redactor {
    /// The secret literals, non-empty; wiped on drop.
    secrets: Vec<Zeroizing<Vec<u8>>>,
    /// The name patterns, lower-cased.
    patterns: Vec<String>,
}

impl fmt::Debug for Redactor {
    /// Never shows the secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.secrets.len())
            .field("patterns", &self.patterns)
            .finish()
    }
}

impl Redactor {
    /// A redactor for these secret literals and variable-name patterns (case-insensitive, `*` matches any
    /// run of characters). Empty secrets are ignored: they would match everything.
    pub fn new(secret_values: Vec<String>, name_patterns: Vec<String>) -> Self {
        Self {
            secrets: secret_values
                .into_iter()
                .filter(|secret| !secret.is_empty())
                .map(|secret| Zeroizing::new(secret.into_bytes()))
                .collect(),
            patterns: name_patterns
                .iter()
                .map(|pattern| pattern.to_lowercase())
                .collect(),
        }
    }

    /// Patterns of variable names that hold secrets by convention.
    pub fn default_name_patterns() -> Vec<String> {
        [
            "*TOKEN*",
            "*SECRET*",
            "*PASSWORD*",
            "*PASSWD*",
            "*_KEY",
            "*APIKEY*",
            "*API_KEY*",
            "*PRIVATE_KEY*",
            "AUTHORIZATION",
            "*CREDENTIAL*",
        ]
        .map(String::from)
        .to_vec()
    }

    /// `value` as text, or its redaction marker when it contains a secret literal.
    pub fn text(&self, value: &str) -> Ipld {
        if self.contains_secret(value.as_bytes()) {
            redaction_marker(value.as_bytes())
        } else {
            Ipld::String(value.to_string())
        }
    }

    /// A variable's value as text, or its redaction marker when its name matches a pattern or it contains a
    /// secret literal.
    pub fn env(&self, name: &str, value: &str) -> Ipld {
        if self.is_secret_name(name) {
            redaction_marker(value.as_bytes())
        } else {
            self.text(value)
        }
    }

    /// Whether a variable of this name is redacted whatever its value.
    pub fn is_secret_name(&self, name: &str) -> bool {
        let name = name.to_lowercase();
        self.patterns.iter().any(|pattern| glob_match(pattern, &name))
    }

    /// Whether `bytes` contain one of the secret literals (so they must not be stored as they are).
    pub fn contains_secret(&self, bytes: &[u8]) -> bool {
        self.secrets.iter().any(|secret| contains(bytes, secret))
    }
}

/// The id in a redaction marker (`{"redacted": <raw CID>}`), or `None` when `value` is not one.
pub fn redacted_cid(value: &Ipld) -> Option<Cid> {
    let Ipld::Map(map) = value else { return None };
    match (map.len(), map.get("redacted")) {
        (1, Some(Ipld::Link(link))) => Cid::from_bytes(&link.to_bytes())
            .ok()
            .filter(|cid| cid.codec() == Codec::Raw),
        _ => None,
    }
}

fn redaction_marker(value: &[u8]) -> Ipld {
    let cid = Cid::of_bytes(value);
    let link = ipld_core::cid::Cid::try_from(cid.to_bytes().as_slice())
        .unwrap_or_else(|_| unreachable!("an effects-v1 CID is a CID"));
    Ipld::Map(BTreeMap::from([("redacted".to_string(), Ipld::Link(link))]))
}

/// Whether `needle` (non-empty) occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return false;
    };
    haystack.len() >= needle.len()
        && haystack[..=haystack.len() - needle.len()]
            .iter()
            .enumerate()
            .any(|(at, &byte)| byte == first && haystack[at + 1..].starts_with(rest))
}

/// Matches `text` against `pattern`, where `*` stands for any run of characters (none included).
fn glob_match(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    // Greedy with one backtrack point: the classic linear-space wildcard match.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// The public keys that signed what an episode bundle holds: the server's (episode, receipts) and each
/// evaluator's (signals), by evaluator name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpisodeKeys {
    /// Keys of the server that signed the episode and its receipts.
    pub server: PublicKeys,
    /// Keys of each evaluator whose signals the bundle carries.
    pub evaluators: BTreeMap<String, PublicKeys>,
}

/// The JSON form of [`EpisodeKeys`]; field order is the order written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EpisodeKeysDocument {
    format: String,
    server: PublicKeysDocument,
    evaluators: BTreeMap<String, PublicKeysDocument>,
}

/// Checks one embedded public-keys document, naming whose keys it holds in errors.
fn parse_keys(document: PublicKeysDocument, whose: &str) -> Result<PublicKeys, EffectsError> {
    PublicKeys::from_document(document, Path::new(whose)).map_err(|e| match e {
        EffectsError::InvalidKeyStore { reason, .. } => EffectsError::InvalidObject {
            what: "episode keys",
            reason: format!("{whose}: {reason}"),
        },
        other => other,
    })
}

impl EpisodeKeys {
    /// The JSON document: `{"format": "tartarus-effects/v1/episode-keys", "server": <public keys>,
    /// "evaluators": {"<name>": <public keys>}}`, pretty-printed with two-space indents and a final newline.
    pub fn to_json(&self) -> String {
        let document = EpisodeKeysDocument {
            format: EPISODE_KEYS_FORMAT.to_string(),
            server: self.server.document(),
            evaluators: self
                .evaluators
                .iter()
                .map(|(name, keys)| (name.clone(), keys.document()))
                .collect(),
        };
        let mut json = serde_json::to_string_pretty(&document)
            .unwrap_or_else(|_| unreachable!("strings and lists serialise"));
        json.push('\n');
        json
    }

    /// Parses the JSON document, refusing unknown fields and checking every key id against its key.
    pub fn from_json(text: &str) -> Result<Self, EffectsError> {
        let bad = |reason: String| EffectsError::InvalidObject {
            what: "episode keys",
            reason,
        };
        let document: EpisodeKeysDocument =
            serde_json::from_str(text).map_err(|e| bad(format!("not an episode-keys document: {e}")))?;
        if document.format != EPISODE_KEYS_FORMAT {
            return Err(bad(format!(
                "format {:?} is not {EPISODE_KEYS_FORMAT:?}",
                document.format
            )));
        }
        let server = parse_keys(document.server, "server")?;
        let evaluators = document
            .evaluators
            .into_iter()
            .map(|(name, keys)| {
                let parsed = parse_keys(keys, &format!("evaluator {name:?}"))?;
                Ok((name, parsed))
            })
            .collect::<Result<_, EffectsError>>()?;
        Ok(Self { server, evaluators })
    }
}

/// Everything an episode export holds, as bytes: the signed episode, its trace records, its receipt
/// envelopes, signal envelopes, the blobs to include (any subset of the episode's) and the public keys.
#[derive(Clone, Debug, Default)]
pub struct EpisodeBundle {
    /// The episode's envelope bytes.
    pub episode: Vec<u8>,
    /// The canonical bytes of every trace record the episode lists.
    pub records: Vec<Vec<u8>>,
    /// The envelope bytes of every receipt the episode lists.
    pub receipts: Vec<Vec<u8>>,
    /// Signal envelope bytes, in the order they are to appear.
    pub signals: Vec<Vec<u8>>,
    /// Blobs to include, by id: each listed in the episode.
    pub blobs: Vec<(Cid, Vec<u8>)>,
    /// The keys that signed the episode, its receipts and the signals.
    pub keys: EpisodeKeys,
}

/// A bundle that verified ([`verify_episode_car`]).
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedEpisode {
    /// The episode's id: the dag-cbor CID of its envelope, `roots[0]`.
    pub id: Cid,
    /// The episode.
    pub episode: Episode,
    /// Its trace records, in `seq` order.
    pub records: Vec<TraceRecord>,
    /// Its receipts, in the episode's order.
    pub receipts: Vec<Receipt>,
    /// The signals, in the bundle's root order.
    pub signals: Vec<Signal>,
    /// How many of the episode's blobs the bundle holds.
    pub blobs_included: usize,
    /// The episode's blobs the bundle leaves out, sorted.
    pub blobs_missing: Vec<Cid>,
    /// The keys the bundle carries.
    pub keys: EpisodeKeys,
    /// Whether those keys were the ones used (no trusted keys were given): the bundle then proves only that
    /// it is consistent, not who signed it.
    pub keys_embedded: bool,
}

/// Writes `bundle` as a CAR file and returns the episode's id.
///
/// The bundle is verified first ([`verify_episode_car`]'s rules, with its own keys), so nothing is written
/// that a verifier would refuse. Roots: the episode, the keys document, the signals. Blocks, each once:
/// the episode envelope, the keys document, the signals, the trace records in `seq` order, the receipts in
/// the episode's order, the included blobs in the episode's (sorted) order.
pub fn write_episode_car(bundle: &EpisodeBundle, out: impl Write) -> Result<Cid, EffectsError> {
    let object = |what: String| move |e: EffectsError| in_bundle(what, e);
    let id = Cid::of_encoded(&bundle.episode).map_err(object("episode".into()))?;
    let keys = bundle.keys.to_json().into_bytes();
    let mut roots = vec![id, Cid::of_bytes(&keys)];
    let mut blocks: BTreeMap<Cid, &[u8]> = BTreeMap::new();
    blocks.insert(roots[0], &bundle.episode);
    blocks.insert(roots[1], &keys);
    for (index, bytes) in bundle.signals.iter().enumerate() {
        let cid = Cid::of_encoded(bytes).map_err(object(format!("signal {index}")))?;
        roots.push(cid);
        blocks.insert(cid, bytes);
    }
    for (what, list) in [("trace record", &bundle.records), ("receipt", &bundle.receipts)] {
        for (index, bytes) in list.iter().enumerate() {
            let cid = Cid::of_encoded(bytes).map_err(object(format!("{what} {index}")))?;
            blocks.insert(cid, bytes);
        }
    }
    for (cid, bytes) in &bundle.blobs {
        let actual = Cid::of_bytes(bytes);
        if actual != *cid {
            return Err(EffectsError::HashMismatch {
                what: "blob",
                expected: cid.to_string(),
                actual: actual.to_string(),
            });
        }
        blocks.insert(*cid, bytes);
    }
    let verified = verify_blocks(&roots, &blocks, None)?;

    let episode = &verified.episode;
    let order = roots
        .iter()
        .chain(&episode.trace)
        .chain(&episode.receipts)
        .chain(episode.blobs.iter().filter(|cid| blocks.contains_key(cid)));
    let mut writer = CarWriter::new(out, &roots)?;
    for cid in order {
        if let Some(bytes) = blocks.get(cid) {
            writer.block(cid, bytes)?;
        }
    }
    writer.finish()?;
    Ok(id)
}

/// Reads and verifies an episode bundle (effects-v1 §11.2).
///
/// With `trusted` keys, the episode and receipts must be signed by `trusted.server` and each signal by its
/// evaluator's keys in `trusted.evaluators`; without, the bundle's own keys are used
/// ([`VerifiedEpisode::keys_embedded`]). Refuses, each with its own error: a block that does not hash to its
/// id, a malformed CAR, bad roots, an episode that is not validly signed, a listed record or receipt that
/// is missing, a record out of sequence or of another sandbox, a receipt that does not verify or belongs to
/// another sandbox or tenant, a signal that does not verify under its evaluator's keys or names another
/// episode, a blob the episode does not list, and any other block the episode does not reference.
pub fn verify_episode_car(
    input: impl Read,
    trusted: Option<&EpisodeKeys>,
) -> Result<VerifiedEpisode, EffectsError> {
    let car = read_car(input)?;
    verify_blocks(&car.roots, &car.blocks, trusted)
}

/// The checks of [`verify_episode_car`] over blocks already verified against their ids, in the order of
/// effects-v1 §11.2.
fn verify_blocks<B: AsRef<[u8]>>(
    roots: &[Cid],
    blocks: &BTreeMap<Cid, B>,
    trusted: Option<&EpisodeKeys>,
) -> Result<VerifiedEpisode, EffectsError> {
    let block = |cid: &Cid| blocks.get(cid).map(AsRef::as_ref);
    check_roots(roots, |cid| blocks.contains_key(cid))?;
    let (id, keys_id) = (roots[0], roots[1]);

    let keys_object = || format!("keys document ({keys_id})");
    let keys_text = std::str::from_utf8(block(&keys_id).unwrap_or_default())
        .map_err(|_| in_bundle(keys_object(), invalid_keys("not UTF-8 text")))?;
    let embedded = EpisodeKeys::from_json(keys_text).map_err(|e| in_bundle(keys_object(), e))?;
    let keys = trusted.unwrap_or(&embedded);

    let (_, episode) = Episode::verify(&keys.server, block(&id).unwrap_or_default())
        .map_err(|e| in_bundle(format!("episode ({id})"), e))?;
    let records = verify_records(&episode, block)?;
    let receipts = verify_receipts(&episode, &keys.server, block)?;
    let signals = roots[2..]
        .iter()
        .enumerate()
        .map(|(index, cid)| {
            verify_signal(keys, block(cid).unwrap_or_default(), &id)
                .map_err(|e| in_bundle(format!("signal {index} ({cid})"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let blobs_included = account_for_blocks(roots, &episode, blocks.keys())?;
    let blobs_missing = episode
        .blobs
        .iter()
        .filter(|cid| !blocks.contains_key(cid))
        .copied()
        .collect();

    Ok(VerifiedEpisode {
        id,
        episode,
        records,
        receipts,
        signals,
        blobs_included,
        blobs_missing,
        keys: embedded.clone(),
        keys_embedded: trusted.is_none(),
    })
}

/// The episode's trace records: present, valid, numbered by their position, of the episode's sandbox.
fn verify_records<'a>(
    episode: &Episode,
    block: impl Fn(&Cid) -> Option<&'a [u8]>,
) -> Result<Vec<TraceRecord>, EffectsError> {
    let mut records = Vec::with_capacity(episode.trace.len());
    for (index, cid) in episode.trace.iter().enumerate() {
        let what = format!("trace record {index} ({cid})");
        let bytes = block(cid).ok_or_else(|| missing(&what))?;
        let record = TraceRecord::from_bytes(bytes).map_err(|e| in_bundle(what.clone(), e))?;
        if record.seq != index as u64 {
            let reason = format!("seq {} at position {index} of the trace", record.seq);
            return Err(broken_rule(what, "trace record", reason));
        }
        if record.sandbox != episode.sandbox {
            let reason = format!(
                "sandbox {:?} is not the episode's {:?}",
                record.sandbox, episode.sandbox
            );
            return Err(broken_rule(what, "trace record", reason));
        }
        records.push(record);
    }
    Ok(records)
}

/// The episode's receipts: present, signed by the server, of the episode's sandbox and tenant, and matching
/// the request and response blobs the bundle holds.
fn verify_receipts<'a>(
    episode: &Episode,
    server: &PublicKeys,
    block: impl Fn(&Cid) -> Option<&'a [u8]>,
) -> Result<Vec<Receipt>, EffectsError> {
    let mut receipts = Vec::with_capacity(episode.receipts.len());
    for (index, cid) in episode.receipts.iter().enumerate() {
        let what = format!("receipt {index} ({cid})");
        let bytes = block(cid).ok_or_else(|| missing(&what))?;
        let (_, receipt) = Receipt::verify(server, bytes).map_err(|e| in_bundle(what.clone(), e))?;
        if receipt.sandbox != episode.sandbox || receipt.tenant != episode.tenant {
            let reason = format!(
                "sandbox {:?} of tenant {:?} is not the episode's {:?} of {:?}",
                receipt.sandbox, receipt.tenant, episode.sandbox, episode.tenant
            );
            return Err(broken_rule(what, "receipt", reason));
        }
        let response = receipt.response_hash.as_ref().and_then(&block);
        receipt
            .check_bytes(block(&receipt.request_hash), response)
            .map_err(|e| in_bundle(what, e))?;
        receipts.push(receipt);
    }
    Ok(receipts)
}

/// Checks that every block is a root, a listed record or receipt, or a listed blob; returns the number of
/// listed blobs present.
fn account_for_blocks<'a>(
    roots: &[Cid],
    episode: &Episode,
    blocks: impl Iterator<Item = &'a Cid>,
) -> Result<usize, EffectsError> {
    let referenced: BTreeSet<&Cid> = roots
        .iter()
        .chain(&episode.trace)
        .chain(&episode.receipts)
        .collect();
    let listed: BTreeSet<&Cid> = episode.blobs.iter().collect();
    let mut blobs_included = 0;
    for cid in blocks.filter(|cid| !referenced.contains(cid)) {
        if listed.contains(cid) {
            blobs_included += 1;
        } else if cid.codec() == Codec::Raw {
            return Err(invalid_bundle(format!("blob {cid} is not listed in the episode")));
        } else {
            return Err(invalid_bundle(format!(
                "object {cid} is not referenced by the episode"
            )));
        }
    }
    Ok(blobs_included)
}

/// At least the episode and the keys; codecs by position; no repeats; every root has its block.
fn check_roots(roots: &[Cid], present: impl Fn(&Cid) -> bool) -> Result<(), EffectsError> {
    if roots.len() < 2 {
        return Err(invalid_bundle(format!(
            "{} root(s); a bundle has the episode, the keys document and then any signals",
            roots.len()
        )));
    }
    for (index, cid) in roots.iter().enumerate() {
        let (role, codec) = match index {
            0 => ("the episode", Codec::DagCbor),
            1 => ("the keys document", Codec::Raw),
            _ => ("a signal", Codec::DagCbor),
        };
        if cid.codec() != codec {
            return Err(invalid_bundle(format!(
                "root {index} ({cid}) must be {role}, a {} id",
                if codec == Codec::Raw { "raw" } else { "dag-cbor" }
            )));
        }
        if roots[..index].contains(cid) {
            return Err(invalid_bundle(format!(
                "root {index} ({cid}) repeats an earlier root"
            )));
        }
        if !present(cid) {
            return Err(invalid_bundle(format!("root {index} ({cid}) has no block")));
        }
    }
    Ok(())
}

/// Verifies a signal envelope under the key set of the evaluator it names, and that it is about `episode`.
///
/// The payload is read only after a signature holds: first under any evaluator's key with the envelope's
/// key id, then the signal's `evaluator` must be the one holding that key.
fn verify_signal(keys: &EpisodeKeys, bytes: &[u8], episode: &Cid) -> Result<Signal, EffectsError> {
    let envelope = Envelope::decode(bytes)?;
    let holder = keys
        .evaluators
        .values()
        .find(|set| set.verifying_key(&envelope.kid).is_some())
        .ok_or_else(|| EffectsError::UnknownKey {
            kid: envelope.kid.clone(),
        })?;
    let signal: Signal = envelope::verify(holder, &envelope)?;
    signal.check()?;
    let own = keys.evaluators.get(&signal.evaluator);
    if own.is_none_or(|set| set.verifying_key(&envelope.kid).is_none()) {
        return invalid_object(
            "signal",
            format!(
                "signed with key {}, which is not a key of evaluator {:?}",
                envelope.kid, signal.evaluator
            ),
        );
    }
    if signal.episode != *episode {
        return invalid_object(
            "signal",
            format!("it is about episode {}, not {episode}", signal.episode),
        );
    }
    Ok(signal)
}

fn invalid_object<T>(what: &'static str, reason: String) -> Result<T, EffectsError> {
    Err(EffectsError::InvalidObject { what, reason })
}

fn invalid_bundle(reason: String) -> EffectsError {
    EffectsError::InvalidBundle { reason }
}

fn missing(what: &str) -> EffectsError {
    invalid_bundle(format!("{what} is listed by the episode but not in the bundle"))
}

fn invalid_keys(reason: &str) -> EffectsError {
    EffectsError::InvalidObject {
        what: "episode keys",
        reason: reason.into(),
    }
}

/// An object of the bundle that breaks a rule relating it to the episode.
fn broken_rule(object: String, what: &'static str, reason: String) -> EffectsError {
    in_bundle(object, EffectsError::InvalidObject { what, reason })
}

fn in_bundle(object: String, source: EffectsError) -> EffectsError {
    EffectsError::InBundle {
        object,
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_glob_match() {
        for (pattern, text, expected) in [
            ("*token*", "github_token", true),
            ("*token*", "token", true),
            ("*_key", "ssh_key", true),
            ("*_key", "ssh_key_file", false),
            ("authorization", "authorization", true),
            ("authorization", "authorization2", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*", "", true),
            ("", "", true),
            ("", "x", false),
            ("**x", "x", true),
        ] {
            assert_eq!(glob_match(pattern, text), expected, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn test_contains() {
        assert!(contains(b"abcdef", b"cde"));
        assert!(contains(b"abc", b"abc"));
        assert!(contains(b"aab", b"ab"));
        assert!(!contains(b"ab", b"abc"));
        assert!(!contains(b"abc", b""));
        assert!(!contains(b"", b"a"));
    }
}
