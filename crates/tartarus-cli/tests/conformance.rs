//! `tartarus conformance run DIR` over the effects format's golden vectors.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::path::Path;
use std::process::Command;

use common::{bin, code, stdout};

fn vectors() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/v1")
}

#[test]
fn the_golden_vectors_pass_and_a_changed_byte_fails() {
    let out = Command::new(bin())
        .args(["conformance", "run"])
        .arg(vectors())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert!(stdout(&out).contains(" 0 failed"), "{}", stdout(&out));

    // A copy with one expected byte changed: the runner must notice.
    let dir = tempfile::tempdir().unwrap();
    let copy = Command::new("cp")
        .arg("-r")
        .arg(vectors())
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(copy.success());
    let vector = dir.path().join("v1/canonical/byte-strings.json");
    let text = std::fs::read_to_string(&vector).unwrap();
    assert!(text.contains("\"hex\": \"a2"), "{text}");
    std::fs::write(&vector, text.replacen("\"hex\": \"a2", "\"hex\": \"a3", 1)).unwrap();
    let out = Command::new(bin())
        .args(["conformance", "run"])
        .arg(dir.path().join("v1"))
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(stdout(&out).contains("FAIL "), "{}", stdout(&out));
}
