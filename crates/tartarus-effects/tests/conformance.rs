//! The golden vectors in `conformance/v1`, and golden bytes fixed in this file: either fails when the
//! effects-v1 format changes, which needs a new version (docs/spec/effects-v1.md §8).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tartarus_effects::{encode, run_conformance, sign, verify, Cid, Envelope, Keyring};

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../conformance/v1")
}

#[test]
fn test_conformance_v1_vectors_all_pass() {
    let report = run_conformance(&vectors()).unwrap();
    for failure in &report.failed {
        eprintln!("FAIL {}: {}", failure.vector, failure.reason);
    }
    assert!(
        report.all_passed(),
        "{} of {} vectors failed",
        report.failed.len(),
        report.total()
    );
    assert!(report.total() > 10, "only {} vectors found", report.total());
    for kind in [
        "object/",
        "canonical/",
        "blob/",
        "reject/",
        "cid/",
        "envelope/",
        "envelope-reject/",
        "receipt/",
        "receipt-reject/",
        "dataset/",
        "dataset-reject/",
        "episode-car/",
        "episode-car-reject/",
    ] {
        assert!(
            report.passed.iter().any(|name| name.starts_with(kind)),
            "no {kind} vectors"
        );
    }
}

#[test]
fn test_conformance_reports_a_wrong_vector_as_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let vector = r#"{"kind": "blob", "description": "wrong id", "hex": "00",
        "cid": "bafkr4ihkr4ld3m4gqkjf4reryxsy2s5tkbxprqkow6fin2iiyvreuzzab4"}"#;
    std::fs::write(tmp.path().join("wrong.json"), vector).unwrap();
    let report = run_conformance(tmp.path()).unwrap();
    assert_eq!(report.failed.len(), 1);
    assert!(
        report.failed[0].reason.starts_with("cid:"),
        "{}",
        report.failed[0].reason
    );
}

#[test]
fn test_conformance_refuses_a_file_that_is_not_a_vector() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("bad.json"),
        r#"{"kind": "nonsense", "description": "x"}"#,
    )
    .unwrap();
    assert_eq!(run_conformance(tmp.path()).unwrap_err().kind(), "vector");
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Receipt {
    sandbox: String,
    exit_code: i64,
    stdout: Cid,
}

/// Golden bytes written out in full here, independent of the vector files: a change to key order,
/// integer forms, CID layout, key ids, the signing input or the envelope layout fails this test.
#[test]
fn test_golden_bytes_detect_a_format_change() {
    let receipt = Receipt {
        sandbox: "sb-1".into(),
        exit_code: -1,
        stdout: Cid::of_bytes(b"hi\n"),
    };
    // Computed by conformance/generate_v1.py's independent encoder, not by this crate.
    let stdout = "bafkr4ialrnqcjd5npldn7lbcdn7adkfzdr3siinblm4h3up3fvvjjlxeha";
    assert_eq!(receipt.stdout.to_string(), stdout);
    let payload =
        "a3667374646f7574d82a58250001551e200b8b60248fad7ac6dfac221b7e01a8b91c772421a15b387dd1fb2d6a94aee4386\
                   773616e64626f786473622d3169657869745f636f646520";
    assert_eq!(hex::encode(encode(&receipt).unwrap()), payload);
    let cid = "bafyr4if2k34prdwzq5ute4dagu24johzw3cqlcasw7x252l4eyodeh6pae";
    assert_eq!(Cid::of_object(&receipt).unwrap().to_string(), cid);

    let keyring = Keyring::from_seed([0x11; 32]);
    assert_eq!(keyring.current_kid(), "4a78877c4a0926fc");
    let envelope = sign(&keyring, &receipt).unwrap();
    let bytes = envelope.encode().unwrap();
    let expected = "a4636b69647034613738383737633461303932366663677061796c6f61645849a3667374646f7574d82a58250001551e\
                    200b8b60248fad7ac6dfac221b7e01a8b91c772421a15b387dd1fb2d6a94aee4386773616e64626f786473622d3169657\
                    869745f636f6465206776657273696f6e01697369676e61747572655840bcd22d8c5b6c78920f0c3a2f501ff8c09a62f0\
                    be177ca03d66699598a9c2330b48f8bef2d7a9d32c0807630906d95e519559ae09c2bc7da96d20372c62944401";
    assert_eq!(hex::encode(&bytes), expected);
    assert_eq!(
        verify::<Receipt>(&keyring, &Envelope::decode(&bytes).unwrap()).unwrap(),
        receipt
    );
}
