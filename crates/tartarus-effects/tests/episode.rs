//! Episodes, signals, redaction and the episode bundle against their contract (effects-v1 §11, §12): a bundle
//! round-trips, and every way of tampering with one is refused with its own error.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeMap;
use tartarus_effects::Signed;

use ipld_core::ipld::Ipld;
use tartarus_effects::car::{read_car, CarWriter};
use tartarus_effects::episode::{trace_kind, EPISODE_FORMAT, SIGNAL_FORMAT};
use tartarus_effects::receipt::status;
use tartarus_effects::{
    encode, redacted_cid, sign, verify_episode_car, write_episode_car, Cid, EffectsError, Episode,
    EpisodeBundle, EpisodeKeys, Keyring, PublicKeys, Receipt, Redactor, Signal, TraceRecord, VerifyingKeys,
    RECEIPT_FORMAT,
};

const SANDBOX: &str = "sb-0001";
const TENANT: &str = "team-a";

fn link(cid: Cid) -> Ipld {
    Ipld::Link(ipld_core::cid::Cid::try_from(cid.to_bytes().as_slice()).unwrap())
}

/// Everything one test bundle is made of, with the keyrings that signed it.
struct Fixture {
    server: Keyring,
    evaluator: Keyring,
    episode: Episode,
    records: Vec<TraceRecord>,
    receipts: Vec<Receipt>,
    blobs: Vec<(Cid, Vec<u8>)>,
}

impl Fixture {
    fn new() -> Self {
        let stdout = b"hello\n".to_vec();
        let request = br#"{"amount":100}"#.to_vec();
        let response = br#"{"id":"ch_1"}"#.to_vec();
        let blobs: Vec<(Cid, Vec<u8>)> = [stdout.clone(), request.clone(), response.clone()]
            .into_iter()
            .map(|bytes| (Cid::of_bytes(&bytes), bytes))
            .collect();
        let receipt = Receipt {
            format: RECEIPT_FORMAT.into(),
            tool: "charge".into(),
            request_hash: Cid::of_bytes(&request),
            response_hash: Some(Cid::of_bytes(&response)),
            idempotency_key: None,
            sandbox: SANDBOX.into(),
            tenant: TENANT.into(),
            started_at: 1_700_000_000_100,
            finished_at: 1_700_000_000_150,
            status: status::OK.into(),
            code: Some(200),
            nonce: None,
        };
        let server = Keyring::from_seed([1; 32]);
        let receipt_cid = Cid::of_encoded(&receipt.sign(&server).unwrap().encode().unwrap()).unwrap();
        let attrs = |pairs: Vec<(&str, Ipld)>| -> BTreeMap<String, Ipld> {
            pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
        };
        let records = vec![
            TraceRecord::new(
                0,
                1_700_000_000_000,
                trace_kind::SANDBOX_START,
                SANDBOX,
                BTreeMap::new(),
            )
            .unwrap(),
            TraceRecord::new(
                1,
                1_700_000_000_050,
                trace_kind::EXEC,
                SANDBOX,
                attrs(vec![
                    ("argv", Ipld::List(vec![Ipld::String("echo".into())])),
                    ("exit_code", Ipld::Integer(0)),
                    ("stdout", link(Cid::of_bytes(&stdout))),
                ]),
            )
            .unwrap(),
            TraceRecord::new(
                2,
                1_700_000_000_150,
                trace_kind::TOOL_CALL,
                SANDBOX,
                attrs(vec![("receipt", link(receipt_cid))]),
            )
            .unwrap(),
            TraceRecord::new(
                3,
                1_700_000_000_200,
                trace_kind::SANDBOX_END,
                SANDBOX,
                BTreeMap::new(),
            )
            .unwrap(),
        ];
        let mut blob_ids: Vec<Cid> = blobs.iter().map(|(cid, _)| *cid).collect();
        blob_ids.sort();
        let episode = Episode {
            format: EPISODE_FORMAT.into(),
            sandbox: SANDBOX.into(),
            tenant: TENANT.into(),
            template: Some("python".into()),
            started_at: 1_700_000_000_000,
            finished_at: 1_700_000_000_200,
            outcome: "exited".into(),
            exit_code: Some(0),
            trace: records.iter().map(|r| r.cid().unwrap()).collect(),
            receipts: vec![receipt_cid],
            blobs: blob_ids,
        };
        Self {
            server,
            evaluator: Keyring::from_seed([2; 32]),
            episode,
            records,
            receipts: vec![receipt],
            blobs,
        }
    }

    fn episode_bytes(&self) -> Vec<u8> {
        self.episode.sign(&self.server).unwrap().encode().unwrap()
    }

    fn episode_id(&self) -> Cid {
        Cid::of_encoded(&self.episode_bytes()).unwrap()
    }

    fn signal(&self) -> Signal {
        Signal {
            format: SIGNAL_FORMAT.into(),
            episode: self.episode_id(),
            evaluator: "reviewer".into(),
            name: "quality".into(),
            score: Some(8_500),
            label: Some("good".into()),
            comment: None,
            at: 1_700_000_001_000,
        }
    }

    fn keys(&self) -> EpisodeKeys {
        EpisodeKeys {
            server: self.server.public_keys().clone(),
            evaluators: BTreeMap::from([("reviewer".to_string(), self.evaluator.public_keys().clone())]),
        }
    }

    fn bundle(&self) -> EpisodeBundle {
        EpisodeBundle {
            episode: self.episode_bytes(),
            records: self.records.iter().map(|r| r.to_bytes().unwrap()).collect(),
            receipts: self
                .receipts
                .iter()
                .map(|r| r.sign(&self.server).unwrap().encode().unwrap())
                .collect(),
            signals: vec![self.signal().sign(&self.evaluator).unwrap().encode().unwrap()],
            blobs: self.blobs.clone(),
            keys: self.keys(),
        }
    }
}

fn write(bundle: &EpisodeBundle) -> Vec<u8> {
    let mut out = Vec::new();
    write_episode_car(bundle, &mut out).unwrap();
    out
}

/// A CAR holding exactly these roots and blocks, written without the bundle checks, to build bad bundles.
fn raw_car(roots: &[Cid], blocks: &[Vec<u8>], blobs: &[Vec<u8>]) -> Vec<u8> {
    let mut writer = CarWriter::new(Vec::new(), roots).unwrap();
    for block in blocks {
        writer.block(&Cid::of_encoded(block).unwrap(), block).unwrap();
    }
    for blob in blobs {
        writer.block(&Cid::of_bytes(blob), blob).unwrap();
    }
    writer.finish().unwrap()
}

/// The roots and blocks of a good bundle, to edit before [`raw_car`].
struct Parts {
    episode: Vec<u8>,
    keys: Vec<u8>,
    signals: Vec<Vec<u8>>,
    objects: Vec<Vec<u8>>,
    blobs: Vec<Vec<u8>>,
}

impl Parts {
    fn of(bundle: &EpisodeBundle) -> Self {
        Self {
            episode: bundle.episode.clone(),
            keys: bundle.keys.to_json().into_bytes(),
            signals: bundle.signals.clone(),
            objects: bundle.records.iter().chain(&bundle.receipts).cloned().collect(),
            blobs: bundle.blobs.iter().map(|(_, b)| b.clone()).collect(),
        }
    }

    fn car(&self) -> Vec<u8> {
        let mut roots = vec![Cid::of_encoded(&self.episode).unwrap(), Cid::of_bytes(&self.keys)];
        roots.extend(self.signals.iter().map(|s| Cid::of_encoded(s).unwrap()));
        let mut blocks = vec![self.episode.clone()];
        blocks.extend(self.signals.iter().cloned());
        blocks.extend(self.objects.iter().cloned());
        let mut blobs = vec![self.keys.clone()];
        blobs.extend(self.blobs.iter().cloned());
        raw_car(&roots, &blocks, &blobs)
    }
}

fn refused(car: &[u8], trusted: Option<&EpisodeKeys>) -> EffectsError {
    verify_episode_car(car, trusted).expect_err("a bad bundle verified")
}

/// The whole error chain, as the CLI prints it.
fn chain(err: &EffectsError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[test]
fn test_bundle_round_trips_with_embedded_and_trusted_keys() {
    let fixture = Fixture::new();
    let car = write(&fixture.bundle());
    let verified = verify_episode_car(car.as_slice(), None).unwrap();
    assert_eq!(verified.id, fixture.episode_id());
    assert_eq!(verified.episode, fixture.episode);
    assert_eq!(verified.records, fixture.records);
    assert_eq!(verified.receipts, fixture.receipts);
    assert_eq!(verified.signals, vec![fixture.signal()]);
    assert_eq!(verified.blobs_included, 3);
    assert!(verified.blobs_missing.is_empty());
    assert!(verified.keys_embedded);
    assert_eq!(verified.keys, fixture.keys());

    let trusted = verify_episode_car(car.as_slice(), Some(&fixture.keys())).unwrap();
    assert!(!trusted.keys_embedded);
    assert_eq!(trusted.episode, fixture.episode);
}

#[test]
fn test_bundle_layout_roots_and_block_order() {
    let fixture = Fixture::new();
    let bundle = fixture.bundle();
    let car = read_car(write(&bundle).as_slice()).unwrap();
    let signal = Cid::of_encoded(&bundle.signals[0]).unwrap();
    let keys = Cid::of_bytes(bundle.keys.to_json().as_bytes());
    assert_eq!(car.roots, vec![fixture.episode_id(), keys, signal]);
    // episode + keys + signal + 4 records + 1 receipt + 3 blobs
    assert_eq!(car.blocks.len(), 11);
    let keys_text = String::from_utf8(car.blocks[&keys].clone()).unwrap();
    assert_eq!(EpisodeKeys::from_json(&keys_text).unwrap(), fixture.keys());
}

#[test]
fn test_written_bytes_do_not_depend_on_input_order() {
    let fixture = Fixture::new();
    let bundle = fixture.bundle();
    let mut shuffled = bundle.clone();
    shuffled.records.reverse();
    shuffled.blobs.reverse();
    assert_eq!(write(&bundle), write(&shuffled));
}

#[test]
fn test_missing_blobs_are_reported_not_refused() {
    let fixture = Fixture::new();
    let mut bundle = fixture.bundle();
    let left_out = bundle.blobs.remove(0).0;
    bundle.blobs.remove(0);
    let verified = verify_episode_car(write(&bundle).as_slice(), None).unwrap();
    assert_eq!(verified.blobs_included, 1);
    assert_eq!(verified.blobs_missing.len(), 2);
    assert!(verified.blobs_missing.contains(&left_out));
    assert!(verified.blobs_missing.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn test_tampered_block_is_a_hash_mismatch() {
    let fixture = Fixture::new();
    let mut car = write(&fixture.bundle());
    // The last block is a blob; flip its last byte.
    let last = car.len() - 1;
    car[last] ^= 0x20;
    let err = refused(&car, None);
    assert_eq!(err.kind(), "hash_mismatch", "{err}");
}

#[test]
fn test_every_bit_flip_and_truncation_is_refused_without_panicking() {
    let fixture = Fixture::new();
    let car = write(&fixture.bundle());
    for at in 0..car.len() {
        let mut bad = car.clone();
        bad[at] ^= 0x01;
        assert!(
            verify_episode_car(bad.as_slice(), None).is_err(),
            "flip at {at} verified"
        );
    }
    for len in 0..car.len() {
        // A cut between sections can leave a valid bundle without some blobs; never a complete one.
        if let Ok(verified) = verify_episode_car(&car[..len], None) {
            assert!(!verified.blobs_missing.is_empty(), "cut at {len}");
        }
    }
    // Pseudo-random garbage, with and without a valid header in front.
    let header_len = usize::from(car[0]) + 1;
    for seed in 0..200u32 {
        let mut garbage = vec![0u8; (seed as usize * 7) % 300];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut garbage);
        assert!(verify_episode_car(garbage.as_slice(), None).is_err());
        let mut prefixed = car[..header_len].to_vec();
        prefixed.extend_from_slice(&garbage);
        assert!(verify_episode_car(prefixed.as_slice(), None).is_err());
    }
}

#[test]
fn test_episode_signed_by_another_key_is_refused() {
    let fixture = Fixture::new();
    let mut parts = Parts::of(&fixture.bundle());
    let impostor = Keyring::from_seed([9; 32]);
    parts.episode = fixture.episode.sign(&impostor).unwrap().encode().unwrap();
    let err = refused(&parts.car(), None);
    assert_eq!(err.kind(), "unknown_key", "{}", chain(&err));
    assert!(chain(&err).starts_with("in episode"), "{}", chain(&err));

    // With the impostor's keys embedded, the embedded check passes but trusted keys catch it.
    let mut keys = fixture.keys();
    keys.server = impostor.public_keys().clone();
    parts.keys = keys.to_json().into_bytes();
    let err = refused(&parts.car(), Some(&fixture.keys()));
    assert_eq!(err.kind(), "unknown_key", "{}", chain(&err));
}

#[test]
fn test_episode_with_a_changed_payload_is_a_bad_signature() {
    let fixture = Fixture::new();
    let mut parts = Parts::of(&fixture.bundle());
    let mut envelope = fixture.episode.sign(&fixture.server).unwrap();
    let mut changed = fixture.episode.clone();
    changed.outcome = "killed".into();
    envelope.payload = encode(&changed).unwrap();
    parts.episode = envelope.encode().unwrap();
    let err = refused(&parts.car(), None);
    assert_eq!(err.kind(), "bad_signature", "{}", chain(&err));
}

#[test]
fn test_missing_trace_record_and_receipt_are_refused() {
    let fixture = Fixture::new();
    let mut parts = Parts::of(&fixture.bundle());
    parts.objects.remove(1);
    let err = refused(&parts.car(), None);
    assert_eq!(err.kind(), "invalid_bundle");
    assert!(err.to_string().contains("trace record 1"), "{err}");

    let mut parts = Parts::of(&fixture.bundle());
    parts.objects.pop(); // the receipt
    let err = refused(&parts.car(), None);
    assert_eq!(err.kind(), "invalid_bundle");
    assert!(err.to_string().contains("receipt 0"), "{err}");
}

/// A bundle whose episode is `edit`ed (and re-signed) and whose signal names the new episode.
fn with_episode(fixture: &Fixture, objects: Vec<Vec<u8>>, edit: impl FnOnce(&mut Episode)) -> Vec<u8> {
    let mut episode = fixture.episode.clone();
    edit(&mut episode);
    let episode_bytes = episode.sign(&fixture.server).unwrap().encode().unwrap();
    let mut signal = fixture.signal();
    signal.episode = Cid::of_encoded(&episode_bytes).unwrap();
    let mut parts = Parts::of(&fixture.bundle());
    parts.episode = episode_bytes;
    parts.signals = vec![signal.sign(&fixture.evaluator).unwrap().encode().unwrap()];
    parts.objects = objects;
    parts.car()
}

#[test]
fn test_trace_records_out_of_order_or_of_another_sandbox_are_refused() {
    let fixture = Fixture::new();
    let bundle = fixture.bundle();
    let car = with_episode(
        &fixture,
        bundle.records.iter().chain(&bundle.receipts).cloned().collect(),
        |e| e.trace.swap(0, 1),
    );
    let err = refused(&car, None);
    assert_eq!(err.kind(), "invalid_object");
    assert!(chain(&err).contains("seq 1 at position 0"), "{}", chain(&err));

    let stranger = TraceRecord::new(4, 1, trace_kind::EXEC, "sb-other", BTreeMap::new()).unwrap();
    let mut objects: Vec<Vec<u8>> = bundle.records.iter().chain(&bundle.receipts).cloned().collect();
    objects.push(stranger.to_bytes().unwrap());
    let car = with_episode(&fixture, objects, |e| e.trace.push(stranger.cid().unwrap()));
    let err = refused(&car, None);
    assert_eq!(err.kind(), "invalid_object");
    assert!(chain(&err).contains("sb-other"), "{}", chain(&err));
}

#[test]
fn test_receipts_of_another_tenant_or_signer_are_refused() {
    let fixture = Fixture::new();
    let bundle = fixture.bundle();
    let mut foreign = fixture.receipts[0].clone();
    foreign.tenant = "team-b".into();
    let foreign_bytes = foreign.sign(&fixture.server).unwrap().encode().unwrap();
    let mut objects = bundle.records.clone();
    objects.push(foreign_bytes.clone());
    let car = with_episode(&fixture, objects, |e| {
        e.receipts = vec![Cid::of_encoded(&foreign_bytes).unwrap()]
    });
    let err = refused(&car, None);
    assert_eq!(err.kind(), "invalid_object");
    assert!(chain(&err).contains("team-b"), "{}", chain(&err));

    let forged = fixture.receipts[0]
        .sign(&Keyring::from_seed([9; 32]))
        .unwrap()
        .encode()
        .unwrap();
    let mut objects = bundle.records.clone();
    objects.push(forged.clone());
    let car = with_episode(&fixture, objects, |e| {
        e.receipts = vec![Cid::of_encoded(&forged).unwrap()]
    });
    let err = refused(&car, None);
    assert_eq!(err.kind(), "unknown_key");
    assert!(chain(&err).starts_with("in receipt 0"), "{}", chain(&err));
}

#[test]
fn test_signals_are_checked_against_their_evaluator_and_episode() {
    let fixture = Fixture::new();
    let bundle = fixture.bundle();

    // About another episode.
    let mut parts = Parts::of(&bundle);
    let mut other = fixture.signal();
    other.episode = Cid::of_object(&"another episode").unwrap();
    parts.signals = vec![other.sign(&fixture.evaluator).unwrap().encode().unwrap()];
    let err = refused(&parts.car(), None);
    assert_eq!(err.kind(), "invalid_object");
    assert!(chain(&err).contains("in signal 0"), "{}", chain(&err));

    // Signed by a key no evaluator holds.
    let mut parts = Parts::of(&bundle);
    let stranger = Keyring::from_seed([7; 32]);
    parts.signals = vec![fixture.signal().sign(&stranger).unwrap().encode().unwrap()];
    assert_eq!(refused(&parts.car(), None).kind(), "unknown_key");

    // Signed by one evaluator's key in another evaluator's name.
    let mut parts = Parts::of(&bundle);
    let mut keys = fixture.keys();
    keys.evaluators
        .insert("grader".into(), stranger.public_keys().clone());
    parts.keys = keys.to_json().into_bytes();
    parts.signals = vec![fixture.signal().sign(&stranger).unwrap().encode().unwrap()];
    let err = refused(&parts.car(), None);
    assert_eq!(err.kind(), "invalid_object");
    assert!(
        chain(&err).contains("not a key of evaluator \"reviewer\""),
        "{}",
        chain(&err)
    );

    // Trusted keys without that evaluator.
    let mut trusted = fixture.keys();
    trusted.evaluators.clear();
    let car = write(&bundle);
    assert_eq!(refused(&car, Some(&trusted)).kind(), "unknown_key");
}

#[test]
fn test_smuggled_blocks_and_unlisted_blobs_are_refused() {
    let fixture = Fixture::new();
    let bundle = fixture.bundle();
    let mut parts = Parts::of(&bundle);
    parts.objects.push(encode(&"smuggled").unwrap());
    let err = refused(&parts.car(), None);
    assert_eq!(err.kind(), "invalid_bundle");
    assert!(err.to_string().contains("not referenced"), "{err}");

    let mut parts = Parts::of(&bundle);
    parts.blobs.push(b"not listed".to_vec());
    let err = refused(&parts.car(), None);
    assert_eq!(err.kind(), "invalid_bundle");
    assert!(err.to_string().contains("not listed"), "{err}");

    // The writer refuses the same bundles.
    let mut extra = bundle.clone();
    extra.blobs.push((Cid::of_bytes(b"x"), b"x".to_vec()));
    let err = write_episode_car(&extra, Vec::new()).unwrap_err();
    assert_eq!(err.kind(), "invalid_bundle");
    let mut wrong = bundle.clone();
    wrong.blobs[0].1.push(0);
    assert_eq!(
        write_episode_car(&wrong, Vec::new()).unwrap_err().kind(),
        "hash_mismatch"
    );
    let mut missing = bundle;
    missing.records.pop();
    assert_eq!(
        write_episode_car(&missing, Vec::new()).unwrap_err().kind(),
        "invalid_bundle"
    );
}

#[test]
fn test_bad_roots_and_key_documents_are_refused() {
    let fixture = Fixture::new();
    let bundle = fixture.bundle();
    let parts = Parts::of(&bundle);
    let episode = Cid::of_encoded(&parts.episode).unwrap();

    let only_episode = raw_car(&[episode], std::slice::from_ref(&parts.episode), &[]);
    assert_eq!(refused(&only_episode, None).kind(), "invalid_bundle");

    let keys_as_object = raw_car(&[episode, episode], std::slice::from_ref(&parts.episode), &[]);
    let err = refused(&keys_as_object, None);
    assert!(err.to_string().contains("root 1"), "{err}");

    let mut broken = Parts::of(&bundle);
    broken.keys = b"{\"format\": \"tartarus-effects/v1/episode-keys\"}".to_vec();
    let err = refused(&broken.car(), None);
    assert_eq!(err.kind(), "invalid_object");
    assert!(chain(&err).starts_with("in keys document"), "{}", chain(&err));

    let mut absent_root = vec![episode, Cid::of_bytes(&parts.keys)];
    absent_root.push(Cid::of_object(&"absent").unwrap());
    let car = raw_car(
        &absent_root,
        std::slice::from_ref(&parts.episode),
        std::slice::from_ref(&parts.keys),
    );
    assert!(refused(&car, None).to_string().contains("has no block"));
}

#[test]
fn test_episode_keys_json_round_trips_and_refuses_unknown_fields() {
    let fixture = Fixture::new();
    let keys = fixture.keys();
    let json = keys.to_json();
    assert!(
        json.starts_with("{\n  \"format\": \"tartarus-effects/v1/episode-keys\",\n  \"server\": {"),
        "{json}"
    );
    assert!(json.ends_with("}\n"));
    assert_eq!(EpisodeKeys::from_json(&json).unwrap(), keys);
    let extra = json.replacen("\"server\"", "\"extra\": 1,\n  \"server\"", 1);
    assert_eq!(
        EpisodeKeys::from_json(&extra).unwrap_err().kind(),
        "invalid_object"
    );
    let kid = fixture.server.current_kid();
    let wrong_kid = json.replace(kid, "0000000000000000");
    let err = EpisodeKeys::from_json(&wrong_kid).unwrap_err();
    assert_eq!(err.kind(), "invalid_object");
    assert!(err.to_string().contains("server"), "{err}");
    // A verifier's key set without a current key survives the round trip too.
    let mut plain = PublicKeys::new();
    plain.insert(fixture.server.verifying_key(kid).unwrap());
    let keys = EpisodeKeys {
        server: plain,
        evaluators: BTreeMap::new(),
    };
    assert_eq!(EpisodeKeys::from_json(&keys.to_json()).unwrap(), keys);
}

/// A change that breaks one rule of an object.
type Edit<T> = fn(&mut T);

#[test]
fn test_object_rules() {
    let fixture = Fixture::new();
    let err = TraceRecord::new(0, 0, "file.write", SANDBOX, BTreeMap::new()).unwrap_err();
    assert_eq!(err.kind(), "invalid_object");
    assert!(TraceRecord::new(0, 0, trace_kind::EXEC, "", BTreeMap::new()).is_err());
    let float = TraceRecord::new(
        0,
        0,
        trace_kind::EXEC,
        SANDBOX,
        BTreeMap::from([("x".into(), Ipld::Float(0.5))]),
    )
    .unwrap();
    assert_eq!(float.to_bytes().unwrap_err().kind(), "float");

    let broken: Vec<(&str, Edit<Episode>)> = vec![
        ("format", |e| e.format = "tartarus-effects/v2/episode".into()),
        ("before", |e| e.finished_at = e.started_at - 1),
        ("not sorted", |e| e.blobs.reverse()),
        ("not sorted", |e| e.blobs.push(e.blobs[2])),
        ("not a raw id", |e| e.blobs = vec![e.trace[0]]),
        ("not a dag-cbor id", |e| e.receipts.push(Cid::of_bytes(b"x"))),
        ("empty", |e| e.tenant.clear()),
    ];
    for (needle, edit) in broken {
        let mut episode = fixture.episode.clone();
        edit(&mut episode);
        let err = episode.sign(&fixture.server).unwrap_err();
        assert_eq!(err.kind(), "invalid_object");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }

    let broken: Vec<(&str, Edit<Signal>)> = vec![
        ("score, a label", |s| {
            s.score = None;
            s.label = None
        }),
        ("evaluator must not be empty", |s| s.evaluator.clear()),
        ("name is 129", |s| s.name = "n".repeat(129)),
        ("label must not be empty", |s| s.label = Some(String::new())),
        ("comment", |s| s.comment = Some("c".repeat(4097))),
        ("not a dag-cbor id", |s| s.episode = Cid::of_bytes(b"x")),
    ];
    for (needle, edit) in broken {
        let mut signal = fixture.signal();
        edit(&mut signal);
        let err = signal.sign(&fixture.evaluator).unwrap_err();
        assert_eq!(err.kind(), "invalid_object");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    // 128 characters of 2 bytes each is still a valid name; a score alone or a label alone is enough.
    let mut signal = fixture.signal();
    signal.name = "é".repeat(128);
    signal.label = None;
    let bytes = signal.sign(&fixture.evaluator).unwrap().encode().unwrap();
    assert_eq!(Signal::verify(&fixture.evaluator, &bytes).unwrap().1, signal);
}

#[test]
fn test_signed_objects_with_extra_fields_are_refused() {
    let fixture = Fixture::new();
    let mut map = match tartarus_effects::decode::<Ipld>(&encode(&fixture.episode).unwrap()).unwrap() {
        Ipld::Map(map) => map,
        other => panic!("{other:?}"),
    };
    map.insert("note".into(), Ipld::String("extra".into()));
    let bytes = sign(&fixture.server, &Ipld::Map(map)).unwrap().encode().unwrap();
    // Refused while reading (deny_unknown_fields), before the re-encoding check would refuse it.
    let err = Episode::verify(&fixture.server, &bytes).unwrap_err();
    assert_eq!(err.kind(), "malformed");
    assert!(err.to_string().contains("unknown field"), "{err}");
    // An optional field left out (rather than null) is refused by the re-encoding check.
    let mut map = match tartarus_effects::decode::<Ipld>(&encode(&fixture.episode).unwrap()).unwrap() {
        Ipld::Map(map) => map,
        other => panic!("{other:?}"),
    };
    map.remove("template");
    let bytes = sign(&fixture.server, &Ipld::Map(map)).unwrap().encode().unwrap();
    assert_eq!(
        Episode::verify(&fixture.server, &bytes).unwrap_err().kind(),
        "not_canonical"
    );
}

#[test]
fn test_redactor_hides_secret_values_and_names() {
    let redactor = Redactor::new(
        vec!["sk-live-123".into(), String::new()],
        Redactor::default_name_patterns(),
    );
    assert_eq!(redactor.text("plain"), Ipld::String("plain".into()));
    let hidden = redactor.text("Bearer sk-live-123 used");
    assert_eq!(
        redacted_cid(&hidden),
        Some(Cid::of_bytes(b"Bearer sk-live-123 used"))
    );
    // The holder of a secret checks the marker of a variable that held it.
    let var = redactor.env("STRIPE", "sk-live-123");
    assert_eq!(redacted_cid(&var), Some(Cid::of_bytes(b"sk-live-123")));
    for name in [
        "GITHUB_TOKEN",
        "db_password",
        "AWS_SECRET_ACCESS_KEY",
        "ssh_key",
        "Authorization",
        "MyApiKey",
    ] {
        assert!(redacted_cid(&redactor.env(name, "harmless")).is_some(), "{name}");
    }
    for name in ["PATH", "HOME", "KEYBOARD", "AUTHORIZATION_MODE"] {
        assert_eq!(redactor.env(name, "v"), Ipld::String("v".into()), "{name}");
    }
    // The empty secret is ignored: it would redact everything.
    assert!(!redactor.contains_secret(b"anything"));
    assert!(redactor.contains_secret(b"...sk-live-123"));
    assert!(!redactor.contains_secret(b"sk-live-12"));
    assert!(!format!("{redactor:?}").contains("sk-live"));
    // A marker is recognised only in its exact shape.
    assert_eq!(redacted_cid(&Ipld::String("x".into())), None);
    let object_link = Ipld::Map(BTreeMap::from([(
        "redacted".into(),
        link(Cid::of_object(&"x").unwrap()),
    )]));
    assert_eq!(redacted_cid(&object_link), None);
    // Markers go into records like any attribute.
    let record = TraceRecord::new(
        0,
        0,
        trace_kind::SANDBOX_START,
        SANDBOX,
        BTreeMap::from([("env.GITHUB_TOKEN".into(), redactor.env("GITHUB_TOKEN", "ghp_x"))]),
    )
    .unwrap();
    let back = TraceRecord::from_bytes(&record.to_bytes().unwrap()).unwrap();
    assert_eq!(
        redacted_cid(&back.attrs["env.GITHUB_TOKEN"]),
        Some(Cid::of_bytes(b"ghp_x"))
    );
}

#[test]
fn test_cid_order_is_binary_order() {
    let mut ids: Vec<Cid> = (0u32..64)
        .map(|i| {
            if i % 2 == 0 {
                Cid::of_bytes(&i.to_le_bytes())
            } else {
                Cid::of_object(&i).unwrap()
            }
        })
        .collect();
    ids.sort();
    assert!(ids.windows(2).all(|w| w[0].to_bytes() < w[1].to_bytes()));
}
