//! `tartarus server` end to end: the real binary on a loopback port, driven over HTTP.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::bin;
use common::server::{admin_audit, call, cli, create, exec, exec_stream, new_key, DataDir, Server};
use serde_json::{json, Value};

fn raw(server: &Server, path: &str, body: &str) -> (u16, Value) {
    let response = ureq::post(&format!("{}{path}", server.base))
        .set("Authorization", &format!("Bearer {}", server.admin))
        .set("Content-Type", "application/json")
        .send_string(body);
    match response {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn first_start_writes_a_private_admin_key_and_logs_only_its_path() {
    let dir = DataDir::new();
    let mut server = Server::start(dir.path());
    let key_file = dir.path().join("admin.key");
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (status, body) = call("GET", &format!("{}/healthz", server.base), None, None);
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    server.child.kill().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(server.child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.contains(&key_file.display().to_string()), "{log}");
    assert!(
        !log.contains(&server.admin),
        "the key itself must never be logged"
    );
}

#[test]
fn create_exec_list_and_delete_a_sandbox() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "team-a", "user");
    let record = create(
        &server,
        &key,
        json!({"labels": {"app": "demo"}, "env": {"GREETING": "hi"}}),
    );
    assert_eq!(
        (record["status"].as_str(), record["tenant"].as_str()),
        (Some("running"), Some("team-a"))
    );
    let id = record["id"].as_str().unwrap();

    let (status, r) = exec(
        &server,
        &key,
        id,
        json!({"cmd": ["sh", "-c", "echo $GREETING; id -u; echo oops >&2; exit 4"]}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        (
            r["stdout"].as_str(),
            r["stderr"].as_str(),
            r["exit_code"].as_i64()
        ),
        (Some("hi\n1000\n"), Some("oops\n"), Some(4))
    );
    let (_, r) = exec(
        &server,
        &key,
        id,
        json!({"cmd": ["sh", "-c", "cat > /tmp/f; cat /tmp/f"], "stdin": "kept"}),
    );
    assert_eq!(r["stdout"], "kept");

    let (_, list) = call(
        "GET",
        &format!("{}/v1/sandboxes?label=app=demo", server.base),
        Some(&key),
        None,
    );
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (_, list) = call(
        "GET",
        &format!("{}/v1/sandboxes?label=app=other", server.base),
        Some(&key),
        None,
    );
    assert_eq!(list.as_array().unwrap().len(), 0);

    let (status, gone) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&key),
        None,
    );
    assert_eq!((status, gone["status"].as_str()), (200, Some("killed")));
    let (status, r) = exec(&server, &key, id, json!({"cmd": ["true"]}));
    assert_eq!((status, r["error"]["code"].as_str()), (409, Some("conflict")));
    assert!(!dir.path().join("sandboxes").join(id).join("shim.sock").exists());
}

#[test]
fn main_command_exit_ends_the_sandbox() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let record = create(&server, &server.admin, json!({"cmd": ["sh", "-c", "exit 3"]}));
    let id = record["id"].as_str().unwrap();
    let (_, done) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/wait?timeout_s=30", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(
        (
            done["status"].as_str(),
            done["exit_code"].as_i64(),
            done["reason"].as_str()
        ),
        (Some("exited"), Some(3), Some("exited"))
    );
}

#[test]
fn keys_are_required_and_roles_enforced() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let url = format!("{}/v1/sandboxes", server.base);
    let (status, body) = call("GET", &url, None, None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = call("GET", &url, Some("tk_not-a-real-key"), None);
    assert_eq!(status, 401);

    let viewer = new_key(dir.path(), "team-a", "viewer");
    assert_eq!(call("GET", &url, Some(&viewer), None).0, 200);
    let (status, body) = call("POST", &url, Some(&viewer), Some(json!({})));
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")));

    let user = new_key(dir.path(), "team-a", "user");
    let (status, body) = call("POST", &url, Some(&user), Some(json!({"rootfs": "/"})));
    assert_eq!(status, 403, "{body}");
    let listed = Command::new(bin())
        .args(["apikey", "list", "--json", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let keys: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let user_id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "user")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let revoked = Command::new(bin())
        .args(["apikey", "revoke", &user_id, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(revoked.status.success());
    assert_eq!(
        call("GET", &url, Some(&user), None).0,
        401,
        "a revoked key must stop working at once"
    );
}

#[test]
fn tenants_cannot_see_or_touch_each_others_sandboxes() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let a = new_key(dir.path(), "team-a", "user");
    let b = new_key(dir.path(), "team-b", "user");
    let id = create(&server, &a, json!({}))["id"].as_str().unwrap().to_string();
    let base = &server.base;
    for (method, path, body) in [
        ("GET", format!("/v1/sandboxes/{id}"), None),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"cmd": ["true"]})),
        ),
        ("DELETE", format!("/v1/sandboxes/{id}"), None),
    ] {
        let (status, body) = call(method, &format!("{base}{path}"), Some(&b), body);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{method} {path}"
        );
    }
    let (_, list) = call("GET", &format!("{base}/v1/sandboxes"), Some(&b), None);
    assert_eq!(list.as_array().unwrap().len(), 0);
    // The owner and the admin still see it running.
    assert_eq!(
        call("GET", &format!("{base}/v1/sandboxes/{id}"), Some(&a), None).1["status"],
        "running"
    );
    let (_, all) = call("GET", &format!("{base}/v1/sandboxes"), Some(&server.admin), None);
    assert_eq!(all.as_array().unwrap().len(), 1);
}

#[test]
fn bad_input_gets_the_right_status_and_a_clear_message() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let cases: Vec<(&str, u16, &str)> = vec![
        ("{not json", 400, "invalid_request"),
        (r#"{"cmd": "ls"}"#, 422, "invalid_request"),
        (r#"{"unknown": 1}"#, 422, "invalid_request"),
        (r#"{"resources": {"cpus": -1}}"#, 422, "invalid_request"),
        (
            r#"{"resources": {"memory_mb": 99999999}}"#,
            422,
            "invalid_request",
        ),
        (r#"{"timeout_s": 0}"#, 422, "invalid_request"),
        (r#"{"network": "internet"}"#, 422, "invalid_request"),
        (r#"{"template": "python-ds"}"#, 422, "invalid_request"),
        (
            r#"{"cmd": ["definitely-not-a-command"]}"#,
            422,
            "command_not_found",
        ),
    ];
    for (body, status, code) in cases {
        let (got, reply) = raw(&server, "/v1/sandboxes", body);
        assert_eq!(
            (got, reply["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {reply}"
        );
        assert!(!reply["error"]["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(oversized_post_status(&server, 2 << 20), 413);
    let (status, body) = call(
        "GET",
        &format!("{}/v1/sandboxes/sb_nope", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, _) = call(
        "GET",
        &format!("{}/v1/sandboxes?status=sleeping", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(status, 422);
    // Nothing half-made: only the failed not-found record exists, and it is marked failed.
    let (_, all) = call(
        "GET",
        &format!("{}/v1/sandboxes", server.base),
        Some(&server.admin),
        None,
    );
    let all = all.as_array().unwrap();
    assert!(all.iter().all(|s| s["status"] == "failed"), "{all:?}");

    let id = create(&server, &server.admin, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    for (body, code) in [
        (r#"{"cmd": []}"#, "invalid_request"),
        (r#"{"cmd": ["nope-nope"]}"#, "command_not_found"),
        (r#"{"cmd": ["true"], "cwd": "../etc"}"#, "invalid_request"),
    ] {
        let (got, reply) = raw(&server, &format!("/v1/sandboxes/{id}/exec"), body);
        assert_eq!(
            reply["error"]["code"].as_str(),
            Some(code),
            "{body}: {got} {reply}"
        );
    }
}

#[test]
fn a_killed_server_reconciles_on_restart() {
    let dir = DataDir::new();
    let parent = common::cgroup_parent("reconcile");
    let env = [("TARTARUS_CGROUP_PARENT", parent.as_str())];
    let server = Server::start_with_env(dir.path(), &env);
    let key = server.admin.clone();
    let survivor = create(&server, &key, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let victim = create(&server, &key, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    exec(
        &server,
        &key,
        &survivor,
        json!({"cmd": ["sh", "-c", "echo state > /tmp/state"]}),
    );
    server.kill9();

    // While the server is down, one sandbox's supervisor dies too.
    let shim_pid = |id: &str| -> i32 {
        let out = Command::new("pgrep")
            .args(["-f", &format!("sandboxes/{id}/shim.sock")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let victim_pid = shim_pid(&victim);
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(victim_pid).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(victim_pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let mut poll = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)];
    rustix::event::poll(&mut poll, None).unwrap();

    let server = Server::start_with_env(dir.path(), &env);
    // Every sandbox has cgroups in more than one hierarchy (freezer, and pids for its default limit):
    // those left must all be the survivor's.
    let survivor_pid = shim_pid(&survivor);
    let left = common::leftover_cgroups(&parent);
    assert!(!left.is_empty(), "the survivor keeps its cgroups");
    assert!(
        left.iter().all(|c| c
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("{survivor_pid}-"))),
        "only the survivor's cgroups may remain: {left:?}"
    );
    let get = |id: &str| {
        call(
            "GET",
            &format!("{}/v1/sandboxes/{id}", server.base),
            Some(&key),
            None,
        )
        .1
    };
    assert_eq!(
        get(&survivor)["status"],
        "running",
        "a live sandbox must be re-adopted"
    );
    let (_, r) = exec(&server, &key, &survivor, json!({"cmd": ["cat", "/tmp/state"]}));
    assert_eq!(r["stdout"], "state\n", "re-adopted sandbox keeps its state");
    let lost = get(&victim);
    assert_eq!(lost["status"], "lost", "{lost}");
    assert!(lost["reason"].as_str().unwrap().contains("restarted"), "{lost}");
    let (status, gone) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{survivor}", server.base),
        Some(&key),
        None,
    );
    assert_eq!((status, gone["status"].as_str()), (200, Some("killed")));
    assert!(
        common::leftover_cgroups(&parent).is_empty(),
        "{:?}",
        common::leftover_cgroups(&parent)
    );
    common::remove_cgroup_parent(&parent);
}

#[test]
fn openapi_document_is_complete_and_consistent() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let (status, doc) = call("GET", &format!("{}/v1/openapi.json", server.base), None, None);
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/sandboxes",
        "/v1/sandboxes/{id}",
        "/v1/sandboxes/{id}/exec",
        "/v1/sandboxes/{id}/wait",
        "/healthz",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing from the document");
    }
    // Every $ref must point at a schema that exists.
    let text = doc.to_string();
    for reference in text
        .split("\"$ref\":\"")
        .skip(1)
        .map(|s| &s[..s.find('"').unwrap()])
    {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("odd ref {reference}"));
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref {reference}"
        );
    }
}

fn put(server: &Server, key: &str, id: &str, path: &str, bytes: &[u8]) -> (u16, Value) {
    let url = format!("{}/v1/sandboxes/{id}/files?path={path}", server.base);
    match ureq::put(&url)
        .set("Authorization", &format!("Bearer {key}"))
        .send_bytes(bytes)
    {
        Ok(r) => (r.status(), Value::Null),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{e}"),
    }
}

fn get_bytes(server: &Server, key: &str, id: &str, query: &str) -> (u16, Vec<u8>) {
    let url = format!("{}/v1/sandboxes/{id}/files?{query}", server.base);
    let response = match ureq::get(&url)
        .set("Authorization", &format!("Bearer {key}"))
        .call()
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = response.status();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
    (status, bytes)
}

#[test]
fn files_move_in_and_out_byte_for_byte_and_stay_inside() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "team-a", "user");
    let id = create(&server, &key, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect(); // includes NUL and invalid UTF-8
    assert_eq!(put(&server, &key, &id, "/tmp/data.bin", &payload).0, 204);
    assert_eq!(
        get_bytes(&server, &key, &id, "path=/tmp/data.bin"),
        (200, payload.clone())
    );
    let (_, r) = exec(
        &server,
        &key,
        &id,
        json!({"cmd": ["sh", "-c", "wc -c < /tmp/data.bin; id -u"]}),
    );
    assert_eq!(
        r["stdout"], "70000\n1000\n",
        "written inside the sandbox, as the sandbox user"
    );
    let (status, listing) = get_bytes(&server, &key, &id, "path=/tmp&list=1");
    let listing: Value = serde_json::from_slice(&listing).unwrap();
    assert_eq!(
        (status, &listing[0]["name"], &listing[0]["size"]),
        (200, &json!("data.bin"), &json!(70000))
    );

    for (query, status) in [
        ("path=/tmp/../etc/passwd", 422),
        ("path=relative", 422),
        ("path=/dev/zero", 422),
        ("path=/no/such/file", 404),
    ] {
        assert_eq!(get_bytes(&server, &key, &id, query).0, status, "{query}");
    }
    let (status, body) = put(&server, &key, &id, "/etc/passwd", b"owned");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    exec(
        &server,
        &key,
        &id,
        json!({"cmd": ["ln", "-s", "/etc/hostname", "/tmp/link"]}),
    );
    let (status, body) = put(&server, &key, &id, "/tmp/link", b"x");
    assert_eq!(status, 422, "symlinks are refused as targets: {body}");

    let viewer = new_key(dir.path(), "team-a", "viewer");
    assert_eq!(put(&server, &viewer, &id, "/tmp/v", b"x").0, 403);
    let other = new_key(dir.path(), "team-b", "user");
    assert_eq!(get_bytes(&server, &other, &id, "path=/tmp/data.bin").0, 404);
}

#[test]
fn logs_stream_the_main_command_until_the_sandbox_ends() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = server.admin.clone();
    // The main command prints, then waits for a file that the test creates through the API.
    let script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second >&2; exit 7";
    let id = create(&server, &key, json!({"cmd": ["sh", "-c", script]}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("{}/v1/sandboxes/{id}/logs?follow=true", server.base);
    let response = ureq::get(&url)
        .set("Authorization", &format!("Bearer {key}"))
        .call()
        .unwrap();
    let mut reader = BufReader::new(response.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "first\n", "output must stream while the command still runs");
    assert_eq!(put(&server, &key, &id, "/tmp/go", b"").0, 204);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    assert_eq!(rest, "second\n", "the stream ends when the sandbox ends");
    let (_, done) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&key),
        None,
    );
    assert_eq!(
        (done["status"].as_str(), done["exit_code"].as_i64()),
        (Some("exited"), Some(7))
    );
    // Without follow: what was written, at once.
    let (status, text) = get_bytes_at(&server, &key, &format!("/v1/sandboxes/{id}/logs"));
    assert_eq!(
        (status, String::from_utf8(text).unwrap()),
        (200, "first\nsecond\n".to_string())
    );
}

fn get_bytes_at(server: &Server, key: &str, path: &str) -> (u16, Vec<u8>) {
    let response = ureq::get(&format!("{}{path}", server.base))
        .set("Authorization", &format!("Bearer {key}"))
        .call()
        .unwrap();
    let status = response.status();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
    (status, bytes)
}

#[test]
fn the_cli_drives_the_server() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "team-a", "user");
    let out = cli(
        &server,
        &key,
        &["create", "--label", "app=cli", "--env", "GREETING=hello"],
        b"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let ps = String::from_utf8(cli(&server, &key, &["ps"], b"").stdout).unwrap();
    assert!(
        ps.starts_with("ID") && ps.contains(&id) && ps.contains("running"),
        "{ps}"
    );

    let out = cli(
        &server,
        &key,
        &["exec", &id, "--", "sh", "-c", "echo $GREETING; exit 5"],
        b"",
    );
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()),
        (Some(5), "hello\n")
    );
    let out = cli(&server, &key, &["exec", &id, "--", "tr", "a-z", "A-Z"], b"piped");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED");

    let files = tempfile::tempdir().unwrap();
    let src = files.path().join("in.bin");
    std::fs::write(&src, [0u8, 1, 2, 255]).unwrap();
    let dst = files.path().join("out.bin");
    let remote = format!("{id}:/tmp/copied.bin");
    assert!(cli(&server, &key, &["cp", src.to_str().unwrap(), &remote], b"")
        .status
        .success());
    assert!(cli(&server, &key, &["cp", &remote, dst.to_str().unwrap()], b"")
        .status
        .success());
    assert_eq!(std::fs::read(&dst).unwrap(), [0u8, 1, 2, 255]);

    let inspect: Value = serde_json::from_slice(&cli(&server, &key, &["inspect", &id], b"").stdout).unwrap();
    assert_eq!(inspect["labels"]["app"], "cli");
    assert!(cli(&server, &key, &["kill", &id], b"").status.success());
    let ps: Value = serde_json::from_slice(&cli(&server, &key, &["ps", "--json"], b"").stdout).unwrap();
    assert_eq!(ps[0]["status"], "killed");

    let out = cli(&server, &key, &["exec", "sb_missing", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sandbox 'sb_missing' (not_found, HTTP 404)"));
}

#[test]
fn config_set_stores_host_and_key_privately() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let config = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .env("XDG_CONFIG_HOME", config.path())
            .env_remove("TARTARUS_HOST")
            .env_remove("TARTARUS_API_KEY")
            .output()
            .unwrap()
    };
    let out = run(&["ps"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no server configured"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run(&["config", "set", "host", &server.base]).status.success());
    assert!(run(&["config", "set", "api-key", &server.admin]).status.success());
    let file = config.path().join("tartarus/config.toml");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let shown = String::from_utf8(run(&["config", "show"]).stdout).unwrap();
    assert!(
        !shown.contains(&server.admin),
        "config show must mask the key: {shown}"
    );
    assert!(
        run(&["ps"]).status.success(),
        "the client works from the config file"
    );
}

fn metrics_text(server: &Server) -> String {
    ureq::get(&format!("{}/metrics", server.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_follow_sandboxes_and_requests() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = server.admin.clone();
    let id = create(&server, &key, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let text = metrics_text(&server);
    assert_eq!(
        metric_value(&text, "tartarus_sandbox_active_count"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "tartarus_sandbox_launch_duration_seconds_count{"),
        Some(1.0),
        "{text}"
    );
    assert!(text.contains("node=\""), "{text}");
    assert!(
        text.contains("lane=\"process\""),
        "launches are counted by lane: {text}"
    );
    call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&key),
        None,
    );
    let text = metrics_text(&server);
    assert_eq!(metric_value(&text, "tartarus_sandbox_active_count"), Some(0.0));
    assert_eq!(
        metric_value(
            &text,
            "tartarus_sandbox_total{template=\"none\",status=\"killed\",lane=\"process\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(text.contains("tartarus_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/sandboxes\",status=\"201\"} 1"), "{text}");
}

/// Whether the kernel reports the sandbox cgroups under `parent` frozen (v2 `cgroup.events` or v1 state).
fn frozen_state(parent: &str) -> Vec<bool> {
    let mut states = Vec::new();
    for root in [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/freezer",
    ] {
        let Ok(entries) = std::fs::read_dir(Path::new(root).join(parent)) else {
            continue;
        };
        for entry in entries.flatten().filter(|e| e.path().is_dir()) {
            if let Ok(events) = std::fs::read_to_string(entry.path().join("cgroup.events")) {
                states.push(events.lines().any(|l| l == "frozen 1"));
            } else if let Ok(state) = std::fs::read_to_string(entry.path().join("freezer.state")) {
                states.push(state.trim() == "FROZEN");
            }
        }
    }
    states
}

#[test]
fn pause_freezes_the_sandbox_and_resume_thaws_it() {
    let dir = DataDir::new();
    let parent = common::cgroup_parent("pause");
    let server = Server::start_with_env(dir.path(), &[("TARTARUS_CGROUP_PARENT", &parent)]);
    let key = server.admin.clone();
    let id = create(&server, &key, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    exec(
        &server,
        &key,
        &id,
        json!({"cmd": ["sh", "-c", "echo before > /tmp/state"]}),
    );
    assert_eq!(frozen_state(&parent), vec![false]);

    let (status, paused) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/pause", server.base),
        Some(&key),
        None,
    );
    assert_eq!(
        (status, paused["status"].as_str()),
        (200, Some("paused")),
        "{paused}"
    );
    assert_eq!(
        frozen_state(&parent),
        vec![true],
        "the kernel must report the sandbox frozen"
    );
    let (status, body) = exec(&server, &key, &id, json!({"cmd": ["true"]}));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );

    let (status, resumed) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/resume", server.base),
        Some(&key),
        None,
    );
    assert_eq!((status, resumed["status"].as_str()), (200, Some("running")));
    assert_eq!(frozen_state(&parent), vec![false]);
    assert_eq!(
        exec(&server, &key, &id, json!({"cmd": ["cat", "/tmp/state"]})).1["stdout"],
        "before\n"
    );

    // Deleting a paused sandbox thaws and kills it, and leaves no cgroup behind.
    call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/pause", server.base),
        Some(&key),
        None,
    );
    let (status, gone) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&key),
        None,
    );
    assert_eq!((status, gone["status"].as_str()), (200, Some("killed")));
    assert!(
        common::leftover_cgroups(&parent).is_empty(),
        "{:?}",
        common::leftover_cgroups(&parent)
    );
    common::remove_cgroup_parent(&parent);
}

#[test]
fn warm_pool_sandboxes_behave_like_fresh_ones_and_unclaimed_ones_are_cleaned_up() {
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--warm-pool", "2"]);
    let key = new_key(dir.path(), "team-a", "user");
    let mut ids = Vec::new();
    for n in 0..3 {
        let record = create(
            &server,
            &key,
            json!({"env": {"N": n.to_string()}, "labels": {"n": n.to_string()}}),
        );
        let id = record["id"].as_str().unwrap().to_string();
        let (_, r) = exec(&server, &key, &id, json!({"cmd": ["sh", "-c", "echo $N; id -u"]}));
        assert_eq!(
            r["stdout"],
            format!("{n}\n1000\n"),
            "create env must reach execs in every sandbox"
        );
        ids.push(id);
    }
    let other = new_key(dir.path(), "team-b", "user");
    assert_eq!(
        call(
            "GET",
            &format!("{}/v1/sandboxes/{}", server.base, ids[0]),
            Some(&other),
            None
        )
        .0,
        404
    );
    server.kill9();

    let server = Server::start(dir.path());
    for id in &ids {
        let (_, r) = call(
            "GET",
            &format!("{}/v1/sandboxes/{id}", server.base),
            Some(&key),
            None,
        );
        assert_eq!(r["status"], "running", "claimed sandboxes are re-adopted: {r}");
    }
    let mut left: Vec<String> = std::fs::read_dir(dir.path().join("sandboxes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        left, expected,
        "unclaimed pooled sandboxes must be removed on restart"
    );
}

/// POSTs a body of `size` bytes over a raw socket and returns the status line's code. The server rejects
/// it before reading it all and may close while we are still writing, so the write side ignores errors
/// and the status is read from what the server actually sent.
fn oversized_post_status(server: &Server, size: usize) -> u16 {
    use std::io::{Read, Write};
    let addr = server.base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST /v1/sandboxes HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n",
        server.admin
    );
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(&vec![b'a'; size]);
    });
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let _ = sender.join();
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
}

#[test]
fn exec_streams_server_sent_events() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = server.admin.clone();
    let id = create(&server, &key, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second >&2; exit 6";
    let mut lines = exec_stream(&server, &key, &id, json!({"cmd": ["sh", "-c", script]}));
    assert_eq!(lines.next().unwrap(), "event: stdout");
    assert_eq!(
        lines.next().unwrap(),
        r#"data: "first\n""#,
        "output must arrive while the command runs"
    );
    assert_eq!(
        exec(&server, &key, &id, json!({"cmd": ["touch", "/tmp/go"]})).0,
        200
    );
    let rest: Vec<String> = lines.collect();
    assert_eq!(
        rest[..2],
        ["event: stderr".to_string(), r#"data: "second\n""#.to_string()],
        "{rest:?}"
    );
    assert_eq!(rest[2], "event: exit");
    let exit: Value = serde_json::from_str(rest[3].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(
        (exit["exit_code"].as_i64(), exit["timed_out"].as_bool()),
        (Some(6), Some(false))
    );
    // A command that cannot start is a plain JSON error, not a stream.
    let (status, body) = exec(
        &server,
        &key,
        &id,
        json!({"cmd": ["no-such-thing"], "stream": true}),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("command_not_found"))
    );
}

#[test]
fn the_audit_trail_records_mutations_per_tenant() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let a = new_key(dir.path(), "team-a", "user");
    let b = new_key(dir.path(), "team-b", "user");
    let id = create(&server, &a, json!({}))["id"].as_str().unwrap().to_string();
    exec(&server, &a, &id, json!({"cmd": ["true"]}));
    call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&a),
        None,
    );
    create(&server, &b, json!({}));

    let (status, trail) = call("GET", &format!("{}/v1/audit", server.base), Some(&a), None);
    assert_eq!(status, 200);
    let actions: Vec<&str> = trail
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "sandbox.delete",
            "sandbox.exec",
            "sandbox.create",
            "sandbox.admission"
        ],
        "newest first, own tenant only (the built-in policy's admission decision is audited too)"
    );
    assert!(trail.as_array().unwrap().iter().all(|r| r["tenant"] == "team-a"
            // An admission decision is made before the sandbox has an id; its target is the template.
            && (r["target"] == id.as_str() || r["action"] == "sandbox.admission")));
    let (status, _) = call(
        "GET",
        &format!("{}/v1/audit?tenant=team-b", server.base),
        Some(&a),
        None,
    );
    assert_eq!(status, 403, "a tenant cannot read another tenant's trail");
    let all = admin_audit(&server);
    assert_eq!(
        all.as_array().unwrap().len(),
        6,
        "team-a's four, team-b's admission and create"
    );
    let (_, only_b) = call(
        "GET",
        &format!("{}/v1/audit?tenant=team-b", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(only_b.as_array().unwrap().len(), 2);
    let out = cli(&server, &a, &["audit"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("AGO") && text.contains("sandbox.exec") && !text.contains("team-b"),
        "{text}"
    );
}

#[test]
fn a_movable_timeout_stops_the_sandbox_once_it_passes_and_survives_a_restart() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "alice", "user");
    let sandbox = create(&server, &key, json!({}));
    let id = sandbox["id"].as_str().unwrap().to_string();
    let set = |server: &Server, timeout_s: u64| {
        call(
            "POST",
            &format!("{}/v1/sandboxes/{id}/timeout", server.base),
            Some(&key),
            Some(json!({"timeout_s": timeout_s})),
        )
    };
    let (status, reply) = set(&server, 3600);
    assert_eq!(status, 200, "{reply}");
    assert!(reply["deadline_ms"].as_i64().unwrap() > 0);
    assert_eq!(set(&server, 0).0, 422);
    assert_eq!(set(&server, 86_401).0, 422);
    // Another tenant sees no such sandbox.
    let other = new_key(dir.path(), "mallory", "user");
    let (status, _) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/timeout", server.base),
        Some(&other),
        Some(json!({"timeout_s": 1})),
    );
    assert_eq!(status, 404);
    // The deadline is in the store: a restarted server still enforces it.
    drop(server);
    let server = Server::start(dir.path());
    assert_eq!(set(&server, 1).0, 200);
    let ended = common::server::wait_for(&server, &id, |r| r["status"] != "running");
    assert_eq!(ended["status"], "killed", "{ended}");
}
