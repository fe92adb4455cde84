//! The server on PostgreSQL (`--database`): the same API over a real PostgreSQL server, state that survives
//! a restart, and a database that cannot be reached at start.
//!
//! PostgreSQL comes from `TARTARUS_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`);
//! each test creates a fresh database with `psql` and drops it at the end. `.ci/run` starts a server when
//! none listens; without one these tests fail, saying so.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::process::Command;

use common::postgres::Database;
use common::server::{admin_audit, call, create, exec, DataDir, Server};
use serde_json::json;

fn apikey(db: &Database, dir: &DataDir, tenant: &str, role: &str) -> String {
    let store = [
        "--database".as_ref(),
        db.url.as_ref(),
        "--data-dir".as_ref(),
        dir.path().as_os_str(),
    ];
    common::server::apikey(&store, tenant, role)
}

#[test]
fn the_server_keeps_its_state_in_postgres() {
    let db = Database::new();
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--database", &db.url]);
    let user = apikey(&db, &dir, "team-a", "user");
    let sandbox = create(&server, &user, json!({"labels": {"app": "pg"}}));
    let id = sandbox["id"].as_str().unwrap().to_string();
    let (status, out) = exec(
        &server,
        &user,
        &id,
        json!({"cmd": ["sh", "-c", "echo on postgres"]}),
    );
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["stdout"], "on postgres\n");
    // The state is in PostgreSQL, not in the data directory's SQLite file.
    assert!(!dir.path().join("state.db").exists(), "SQLite was used");
    let out = Command::new("psql")
        .args([
            &db.url,
            "-tAc",
            &format!("SELECT status FROM sandboxes WHERE id = '{id}'"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "running");
    // A restarted server finds the sandbox again (re-adopted) and runs its effects on PostgreSQL too.
    server.kill9();
    let server = Server::start_with(dir.path(), &[], &["--database", &db.url]);
    let (status, record) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&user),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(record["status"], "running", "{record}");
    let (status, out) = exec(&server, &user, &id, json!({"cmd": ["true"]}));
    assert_eq!(status, 200, "{out}");
    let (status, _) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&user),
        None,
    );
    assert_eq!(status, 200);
    let (status, episode) = call(
        "GET",
        &format!("{}/v1/episodes/{id}", server.base),
        Some(&user),
        None,
    );
    assert_eq!(status, 200, "{episode}");
    assert_eq!(episode["facts"]["label.app"], "pg");
    let audit = admin_audit(&server);
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["action"] == "sandbox.delete"));
}

#[test]
fn an_unreachable_database_is_retried_with_backoff_then_reported() {
    let dir = DataDir::new();
    // Nothing listens on port 9 (discard) of loopback.
    let started = std::time::Instant::now();
    let out = Command::new(common::bin())
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--database-wait",
            "3s",
            "--database",
        ])
        .arg("postgres://postgres:hunter2@127.0.0.1:9/tartarus")
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(elapsed < std::time::Duration::from_secs(20), "took {elapsed:?}");
    let retries = stderr.matches("not reachable").count();
    assert!(
        (1..=4).contains(&retries),
        "expected a few spaced retries, got {retries}: {stderr}"
    );
    assert!(stderr.contains("127.0.0.1:9"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password was printed: {stderr}");
    // A URL of another kind is refused at once, saying what to use.
    let out = Command::new(common::bin())
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--database",
            "mysql://x@127.0.0.1/db",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("postgres://"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
