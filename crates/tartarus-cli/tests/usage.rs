//! Usage and cost end to end (docs/usage.md): a real server with real process-lane sandboxes, on SQLite
//! and on PostgreSQL. A sandbox that burns CPU shows CPU-seconds while it runs and keeps them after it
//! ended; another tenant gets 404 for it, never its numbers; a price table turns usage into cost.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::time::{Duration, Instant};

use common::postgres::Database;
use common::server::{apikey, call, create, exec, DataDir, Server};
use serde_json::{json, Value};

/// About a second of CPU in the sandbox's shell.
const BURN: &str = "i=0; while [ $i -lt 1500000 ]; do i=$((i+1)); done";

/// Polls `url` with `key` until `done` holds for the answer; panics with the last answer after 30 s.
fn poll(url: &str, key: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = call("GET", url, Some(key), None);
        assert_eq!(status, 200, "{url}: {body}");
        if done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 30 s; last answer {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Setup {
    server: Server,
    team_a: String,
    team_b: String,
    _dir: DataDir,
    _db: Option<Database>,
}

fn start(postgres: bool, extra: &[&str]) -> Setup {
    let dir = DataDir::new();
    let db = postgres.then(Database::new);
    let mut store: Vec<&std::ffi::OsStr> = vec!["--data-dir".as_ref(), dir.path().as_os_str()];
    let mut args: Vec<&str> = extra.to_vec();
    if let Some(db) = &db {
        store.push("--database".as_ref());
        store.push(db.url.as_ref());
        args.extend(["--database", &db.url]);
    }
    let server = Server::start_with(dir.path(), &[], &args);
    Setup {
        team_a: apikey(&store, "team-a", "user"),
        team_b: apikey(&store, "team-b", "user"),
        server,
        _dir: dir,
        _db: db,
    }
}

fn cpu_is_recorded_while_running_and_kept_after_the_end(postgres: bool) {
    let setup = start(postgres, &[]);
    let (server, team_a) = (&setup.server, &setup.team_a);
    let id = create(server, team_a, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let usage_url = format!("{}/v1/sandboxes/{id}/usage", server.base);

    let (status, out) = exec(server, team_a, &id, json!({"cmd": ["sh", "-c", BURN]}));
    assert_eq!((status, out["exit_code"].as_i64()), (200, Some(0)), "{out}");
    let running = poll(&usage_url, team_a, "CPU time of the burn", |u| {
        u["cpu_seconds"].as_f64().unwrap() > 0.2
    });
    assert_eq!(running["live"], json!(true), "{running}");
    assert_eq!(running["tenant"], json!("team-a"));
    assert!(running["memory_bytes"].as_u64().unwrap() > 0, "{running}");
    assert!(running["memory_gib_seconds"].as_f64().unwrap() > 0.0, "{running}");
    assert_eq!(
        (running["snapshot_bytes"].as_u64(), running["tool_calls"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(running["cost"], Value::Null, "no price table, no cost");

    let (status, _) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(team_a),
        None,
    );
    assert_eq!(status, 200);
    let ended = poll(&usage_url, team_a, "the final usage", |u| {
        u["live"] == json!(false)
    });
    assert!(
        ended["cpu_seconds"].as_f64().unwrap() >= running["cpu_seconds"].as_f64().unwrap(),
        "the end never lowers what was used: {running} then {ended}"
    );
    assert!(ended["finished_ms"].as_i64().is_some(), "{ended}");
    assert!(ended["memory_gib_seconds"].as_f64().unwrap() >= running["memory_gib_seconds"].as_f64().unwrap());

    // Kept after the end, in the tenant's report too.
    let (status, report) = call(
        "GET",
        &format!("{}/v1/usage?tenant=team-a", server.base),
        Some(team_a),
        None,
    );
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["sandboxes"][0]["sandbox"], json!(id), "{report}");
    let totals = &report["tenants"][0];
    assert_eq!(
        (totals["tenant"].as_str(), totals["sandboxes"].as_u64()),
        (Some("team-a"), Some(1))
    );
    assert!(totals["cpu_seconds"].as_f64().unwrap() > 0.2, "{report}");
    // `since` after the end leaves it out.
    let later = ended["finished_ms"].as_i64().unwrap() + 1;
    let (_, after) = call(
        "GET",
        &format!("{}/v1/usage?since={later}", server.base),
        Some(team_a),
        None,
    );
    assert_eq!(after["sandboxes"], json!([]), "{after}");
}

#[test]
fn cpu_is_recorded_while_running_and_kept_after_the_end_on_sqlite() {
    cpu_is_recorded_while_running_and_kept_after_the_end(false);
}

#[test]
fn cpu_is_recorded_while_running_and_kept_after_the_end_on_postgres() {
    cpu_is_recorded_while_running_and_kept_after_the_end(true);
}

fn another_tenant_never_sees_the_numbers(postgres: bool) {
    let setup = start(postgres, &[]);
    let (server, team_a, team_b) = (&setup.server, &setup.team_a, &setup.team_b);
    let id = create(server, team_a, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}/usage", server.base),
        Some(team_b),
        None,
    );
    assert_eq!(
        status, 404,
        "another tenant's sandbox is missing, not shown: {body}"
    );
    assert!(body.get("cpu_seconds").is_none(), "{body}");
    let (status, _) = call(
        "GET",
        &format!("{}/v1/usage?tenant=team-a", server.base),
        Some(team_b),
        None,
    );
    assert_eq!(status, 403);
    let (status, own) = call("GET", &format!("{}/v1/usage", server.base), Some(team_b), None);
    assert_eq!(
        (status, &own["sandboxes"], &own["tenants"]),
        (200, &json!([]), &json!([])),
        "{own}"
    );
    // The admin may name the tenant.
    let (status, theirs) = call(
        "GET",
        &format!("{}/v1/usage?tenant=team-a", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(
        (status, theirs["sandboxes"][0]["sandbox"].as_str()),
        (200, Some(id.as_str())),
        "{theirs}"
    );
    // Bad input is the client's error.
    for query in ["since=-5", "since=soon", "limit=100000", "colour=red"] {
        let (status, body) = call(
            "GET",
            &format!("{}/v1/usage?{query}", server.base),
            Some(team_a),
            None,
        );
        assert!((400..500).contains(&status), "{query}: {status} {body}");
    }
}

#[test]
fn another_tenant_never_sees_the_numbers_on_sqlite() {
    another_tenant_never_sees_the_numbers(false);
}

#[test]
fn another_tenant_never_sees_the_numbers_on_postgres() {
    another_tenant_never_sees_the_numbers(true);
}

#[test]
fn a_price_table_turns_usage_into_cost() {
    let prices = tempfile::tempdir().unwrap();
    let path = prices.path().join("prices.json");
    std::fs::write(
        &path,
        r#"{"currency": "EUR", "cpu_second": 2.0, "memory_gib_second": 0.5}"#,
    )
    .unwrap();
    let setup = start(false, &["--price-table", path.to_str().unwrap()]);
    let (server, team_a) = (&setup.server, &setup.team_a);
    let id = create(server, team_a, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = exec(server, team_a, &id, json!({"cmd": ["sh", "-c", BURN]}));
    assert_eq!(status, 200);
    let (status, _) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(team_a),
        None,
    );
    assert_eq!(status, 200);
    let usage = poll(
        &format!("{}/v1/sandboxes/{id}/usage", server.base),
        team_a,
        "the final usage",
        |u| u["live"] == json!(false) && u["cpu_seconds"].as_f64().unwrap() > 0.0,
    );
    let cost = &usage["cost"];
    assert_eq!(cost["currency"], json!("EUR"), "{usage}");
    let expected =
        usage["cpu_seconds"].as_f64().unwrap() * 2.0 + usage["memory_gib_seconds"].as_f64().unwrap() * 0.5;
    assert!(
        (cost["total"].as_f64().unwrap() - expected).abs() < 1e-9,
        "{usage}"
    );
    assert!(cost["cpu"].as_f64().unwrap() > 0.0, "{usage}");
}

#[test]
fn a_bad_price_table_stops_the_server_at_start_saying_why() {
    let dir = DataDir::new();
    let path = dir.path().join("prices.json");
    std::fs::write(&path, r#"{"cpu_second": "cheap"}"#).unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--price-table")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("price table") && stderr.contains("line 1 column"),
        "{stderr}"
    );
}
