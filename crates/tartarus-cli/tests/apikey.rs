//! `tartarus apikey`: keys are created with a tenant and role, listed without secrets, and revoked.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::process::{Command, Output};

use common::{bin, code, stderr, stdout};

fn apikey(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("apikey")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn create_list_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let created = apikey(dir.path(), &["create", "--tenant", "team-a", "--role", "viewer"]);
    assert_eq!(code(&created), 0, "{}", stderr(&created));
    let secret = stdout(&created).trim().to_string();
    assert!(secret.starts_with("tk_"), "{secret}");

    let listed = apikey(dir.path(), &["list", "--json"]);
    let keys: serde_json::Value = serde_json::from_str(&stdout(&listed)).unwrap();
    assert_eq!(keys[0]["tenant"], "team-a");
    assert_eq!(keys[0]["role"], "viewer");
    assert!(
        !stdout(&listed).contains(&secret[3..]),
        "list must never show a secret"
    );

    let id = keys[0]["id"].as_str().unwrap();
    assert_eq!(code(&apikey(dir.path(), &["revoke", id])), 0);
    let keys: serde_json::Value =
        serde_json::from_str(&stdout(&apikey(dir.path(), &["list", "--json"]))).unwrap();
    assert!(keys[0]["revoked_ms"].is_i64());
}

#[test]
fn bad_role_tenant_and_id_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = apikey(dir.path(), &["create", "--tenant", "team-a", "--role", "root"]);
    assert_eq!(code(&out), 125);
    assert!(stderr(&out).contains("unknown role 'root'"), "{}", stderr(&out));
    let out = apikey(dir.path(), &["create", "--tenant", "Team A"]);
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("invalid tenant 'Team A'"),
        "{}",
        stderr(&out)
    );
    let out = apikey(dir.path(), &["revoke", "key_nope"]);
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("no API key with id 'key_nope'"),
        "{}",
        stderr(&out)
    );
    // Nothing was created by the failed calls.
    let keys: serde_json::Value =
        serde_json::from_str(&stdout(&apikey(dir.path(), &["list", "--json"]))).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 0);
}
