//! Policies end to end: versions and rollback, admission with its judges, compilation into the sandbox,
//! the event stream — against a real server.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use common::server::{call, cli, create, exec, new_key, wait_for, DataDir, Server};
use serde_json::{json, Value};

fn post(server: &Server, key: &str, path: &str, body: Value) -> (u16, Value) {
    call("POST", &format!("{}{path}", server.base), Some(key), Some(body))
}

fn get(server: &Server, key: &str, path: &str) -> (u16, Value) {
    call("GET", &format!("{}{path}", server.base), Some(key), None)
}

fn apply(server: &Server, yaml: &str) -> (u16, Value) {
    post(
        server,
        &server.admin,
        "/v1/policies",
        json!({"yaml": yaml, "source": "test.yaml"}),
    )
}

const LIMITS: &str = "\
id: limits
version: 1
resources: {max_cpu_cores: 1, max_memory_mb: 1024, max_sandboxes: 2}
security: {allow_host_network: false}
";

#[test]
fn policies_are_versioned_validated_and_rolled_back() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let (status, first) = apply(&server, LIMITS);
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["revision"], 1);
    let (status, second) = apply(&server, &LIMITS.replace("max_sandboxes: 2", "max_sandboxes: 5"));
    assert_eq!((status, second["revision"].as_i64()), (201, Some(2)), "{second}");

    // Bad input: the message points at the line and column of the offending key; nothing changes.
    for (bad, needle) in [
        (
            "id: limits\nresources: {max_cpu_cores: 1, max_memroy_mb: 5}\n",
            "test.yaml:2:",
        ),
        (
            "id: limits\nnetwork: {egress: true, allowed_cidrs: [10.0.0.1/8]}\n",
            "10.0.0.1/8",
        ),
        ("id: limits\nenforcement: {on_timeout: shrug}\n", "on_timeout"),
    ] {
        let (status, reply) = apply(&server, bad);
        assert_eq!(status, 422, "{bad}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "wanted {needle:?} in {message:?}");
    }
    let (_, current) = get(&server, &server.admin, "/v1/policies/limits");
    assert_eq!(current["revision"], 2, "{current}");
    assert_eq!(current["policy"]["resources"]["max_sandboxes"], 5, "{current}");

    // Rollback: to an existing revision makes a new one; to a missing one says which exist.
    let (status, rolled) = post(
        &server,
        &server.admin,
        "/v1/policies/limits/rollback",
        json!({"to": 1}),
    );
    assert_eq!(
        (
            status,
            rolled["revision"].as_i64(),
            rolled["rollback_of"].as_i64()
        ),
        (201, Some(3), Some(1))
    );
    let (status, reply) = post(
        &server,
        &server.admin,
        "/v1/policies/limits/rollback",
        json!({"to": 9}),
    );
    assert_eq!(status, 404, "{reply}");
    assert!(
        reply["error"]["message"].as_str().unwrap().contains("1, 2, 3"),
        "{reply}"
    );
    let (_, history) = get(&server, &server.admin, "/v1/policies/limits/history");
    assert_eq!(history.as_array().unwrap().len(), 3);
    let (_, current) = get(&server, &server.admin, "/v1/policies/limits");
    assert_eq!(current["policy"]["resources"]["max_sandboxes"], 2, "{current}");

    // Only admins change policies; everyone may read them.
    let user = new_key(dir.path(), "team-a", "user");
    assert_eq!(apply_as(&server, &user, LIMITS).0, 403);
    assert_eq!(get(&server, &user, "/v1/policies").0, 200);

    // The CLI drives the same API.
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, LIMITS.replace("id: limits", "id: from-cli")).unwrap();
    let out = cli(
        &server,
        &server.admin,
        &["policy", "apply", "-f", file.to_str().unwrap()],
        b"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&server, &server.admin, &["policy", "history", "from-cli"], b"");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("from-cli"),
        "{out:?}"
    );
    let out = cli(
        &server,
        &server.admin,
        &["policy", "rollback", "from-cli", "--to", "7"],
        b"",
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no revision 7"),
        "{out:?}"
    );
}

fn apply_as(server: &Server, key: &str, yaml: &str) -> (u16, Value) {
    post(server, key, "/v1/policies", json!({"yaml": yaml}))
}

#[test]
fn admission_rejects_with_the_judges_reason_and_audits_every_decision() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let policy = "\
id: prod
resources: {max_cpu_cores: 1, max_memory_mb: 1024, max_sandboxes: 2, classes: [ember, quarantine]}
security: {allow_host_network: false}
";
    assert_eq!(apply(&server, policy).0, 201);
    let key = new_key(dir.path(), "team-a", "user");

    // The host's network is refused to user keys before admission (whatever a policy says), so that
    // request is no admission decision: the counts below are of the others.
    let cases = [
        (json!({"resources": {"cpus": 2}}), 422, "cpu"),
        (json!({"resources": {"memory_mb": 4096}}), 422, "memory"),
        (json!({"network": "host-loopback"}), 403, "host"),
        (json!({"class": "inferno"}), 403, "inferno"),
        (json!({"network": "egress"}), 403, "egress"),
    ];
    for (body, status, needle) in cases {
        let (got, reply) = post(&server, &key, "/v1/sandboxes", body.clone());
        assert_eq!(got, status, "{body}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.to_lowercase().contains(needle),
            "{body}: wanted {needle:?} in {message:?}"
        );
    }

    // The quota counts live sandboxes: two fit, the third is refused until one goes.
    let a = create(&server, &key, json!({}));
    let _b = create(&server, &key, json!({}));
    let (status, reply) = post(&server, &key, "/v1/sandboxes", json!({}));
    assert_eq!(status, 429, "{reply}");
    let (status, _) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{}", server.base, a["id"].as_str().unwrap()),
        Some(&key),
        None,
    );
    assert_eq!(status, 200);
    create(&server, &key, json!({}));

    // Every decision is in the audit trail with the request's digest; rejections are events too.
    let (_, audit) = get(&server, &server.admin, "/v1/audit?tenant=team-a");
    let decisions: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "sandbox.admission")
        .collect();
    assert_eq!(decisions.len(), 8, "{audit}");
    let rejected = decisions.iter().filter(|r| r["outcome"] == "reject").count();
    assert_eq!(rejected, 5, "{audit}");
    for record in &decisions {
        let detail: Value = serde_json::from_str(record["detail"].as_str().unwrap()).unwrap();
        assert_eq!(detail["request_digest"].as_str().unwrap().len(), 64, "{detail}");
        assert_eq!(detail["policies"], json!(["prod"]), "{detail}");
    }
    let (_, events) = get(&server, &key, "/v1/events?category=admission");
    assert_eq!(events.as_array().unwrap().len(), 5, "{events}");
}

#[test]
fn a_policy_compiles_into_limits_and_seccomp_and_quarantine_cuts_more() {
    let dir = DataDir::new();
    // The admin's host-network request below needs a server that allows it (then quarantine cuts it).
    let server = Server::start_with(dir.path(), &[], &["--allow-host-network"]);
    let policy = "\
id: hardened
security: {extra_denied_syscalls: [symlink, symlinkat]}
resources: {classes: [ember, flame, quarantine]}
";
    assert_eq!(apply(&server, policy).0, 201);
    let sandbox = create(&server, &server.admin, json!({"class": "flame"}));
    let id = sandbox["id"].as_str().unwrap();
    // The policy's seccomp additions are in force: symlinks are refused, files still work.
    let (_, out) = exec(
        &server,
        &server.admin,
        id,
        json!({"cmd": ["sh", "-c", "cd /tmp && touch a && ln -s a b; echo $?"]}),
    );
    assert_eq!(out["stdout"], "1\n", "{out}");
    assert!(out["stderr"].as_str().unwrap().contains("not permitted"), "{out}");

    // Quarantine: no network beyond its own loopback, and the stricter seccomp set (no mode, owner or
    // link changes) even though this policy adds nothing for it.
    // Asking for the host's network too: the security judge takes it away (the server's own port, open
    // on the host's loopback, is out of reach).
    let cut = create(
        &server,
        &server.admin,
        json!({"class": "quarantine", "network": "host-loopback"}),
    );
    let port = server.base.rsplit(':').next().unwrap().to_string();
    let connect = format!(
        "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('reached')"
    );
    let (_, out) = exec(
        &server,
        &server.admin,
        cut["id"].as_str().unwrap(),
        json!({"cmd": ["python3", "-c", connect]}),
    );
    assert_ne!(out["stdout"], "reached\n", "{out}");
    assert!(
        out["stderr"].as_str().unwrap().contains("Connection refused"),
        "{out}"
    );
    let quarantined = create(&server, &server.admin, json!({"class": "quarantine"}));
    let (_, out) = exec(
        &server,
        &server.admin,
        quarantined["id"].as_str().unwrap(),
        json!({"cmd": ["sh", "-c", "cd /tmp && touch f && chmod 600 f; echo $?"]}),
    );
    assert_eq!(out["stdout"], "1\n", "{out}");

    // Without the policy, the same request makes symlinks again (one source of truth: the policy).
    let (status, _) = call(
        "DELETE",
        &format!("{}/v1/policies/hardened", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(status, 200);
    let plain = create(&server, &server.admin, json!({}));
    let (_, out) = exec(
        &server,
        &server.admin,
        plain["id"].as_str().unwrap(),
        json!({"cmd": ["sh", "-c", "cd /tmp && touch a && ln -s a b; echo $?"]}),
    );
    assert_eq!(out["stdout"], "0\n", "{out}");
}

#[test]
fn timeouts_and_failed_starts_are_events() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let slow = create(
        &server,
        &server.admin,
        json!({"cmd": ["sleep", "600"], "timeout_s": 1}),
    );
    let id = slow["id"].as_str().unwrap();
    let (_, waited) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/wait", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(waited["reason"], "timeout", "{waited}");
    let (_, events) = get(&server, &server.admin, &format!("/v1/events?sandbox={id}"));
    assert_eq!(events[0]["kind"], "timeout.kill", "{events}");
    assert_eq!(events[0]["category"], "enforcement", "{events}");

    let (status, _) = post(
        &server,
        &server.admin,
        "/v1/sandboxes",
        json!({"cmd": ["no-such-program"]}),
    );
    assert_eq!(status, 422);
    let (_, dead) = get(&server, &server.admin, "/v1/events?category=dead_letter");
    assert_eq!(dead[0]["kind"], "start.failed", "{dead}");
    let spec: Value = serde_json::from_str(dead[0]["details"].as_str().unwrap()).unwrap();
    assert_eq!(spec["command"], json!(["no-such-program"]), "{spec}");

    // The CLI shows the stream.
    let out = cli(
        &server,
        &server.admin,
        &["events", "--category", "dead_letter"],
        b"",
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("start.failed"),
        "{out:?}"
    );
}

#[test]
fn a_sandbox_hitting_its_limits_is_handled_as_the_policy_says() {
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--enforcement-interval", "200ms"]);
    // Forks beyond the pids limit, from a background process (the exec that starts it answers at once).
    let fork_storm = |id: &str| {
        let (status, reply) = exec(
            &server,
            &server.admin,
            id,
            json!({"cmd": ["sh", "-c", "(for i in $(seq 20); do sleep 30 & done; wait) >/dev/null 2>&1 &"]}),
        );
        assert_eq!((status, reply["exit_code"].as_i64()), (200, Some(0)), "{reply}");
    };

    assert_eq!(
        apply(&server, "id: res\nenforcement: {on_resource_violation: kill}\n").0,
        201
    );
    let killed = create(&server, &server.admin, json!({"resources": {"pids": 8}}));
    let killed = killed["id"].as_str().unwrap().to_string();
    fork_storm(&killed);
    wait_for(&server, &killed, |r| r["status"] == "killed");

    assert_eq!(
        apply(
            &server,
            "id: res\nenforcement: {on_resource_violation: throttle}\n"
        )
        .0,
        201
    );
    let throttled = create(
        &server,
        &server.admin,
        json!({"resources": {"pids": 8, "cpus": 1}}),
    );
    let throttled = throttled["id"].as_str().unwrap().to_string();
    fork_storm(&throttled);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let events = loop {
        let (_, events) = get(&server, &server.admin, &format!("/v1/events?sandbox={throttled}"));
        if events.as_array().is_some_and(|e| !e.is_empty()) {
            break events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no enforcement event for {throttled}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(events[0]["kind"], "resources.throttle", "{events}");
    assert!(
        events[0]["message"].as_str().unwrap().contains("0.25"),
        "{events}"
    );
    // Throttled, not stopped.
    let (_, record) = get(&server, &server.admin, &format!("/v1/sandboxes/{throttled}"));
    assert_eq!(record["status"], "running", "{record}");

    let (_, events) = get(&server, &server.admin, &format!("/v1/events?sandbox={killed}"));
    assert_eq!(events[0]["kind"], "resources.kill", "{events}");
}

#[test]
fn the_classification_hook_quarantines_or_refuses_and_fails_closed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = DataDir::new();
    let hook = dir.path().join("classify");
    std::fs::write(
        &hook,
        "#!/bin/sh\nread request\ncase \"$request\" in\n  *untrusted*) echo quarantine ;;\n  \
         *evil*) echo 'reject known bad workload' ;;\n  *broken*) exit 3 ;;\n  *) echo allow ;;\nesac\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start_with(dir.path(), &[], &["--classifier", hook.to_str().unwrap()]);

    let plain = create(&server, &server.admin, json!({"labels": {"kind": "ok"}}));
    let quarantined = create(&server, &server.admin, json!({"labels": {"kind": "untrusted"}}));
    // The quarantine class's stricter seccomp applies to the classified sandbox only.
    let chmod = json!({"cmd": ["sh", "-c", "cd /tmp && touch f && chmod 600 f; echo $?"]});
    let (_, out) = exec(
        &server,
        &server.admin,
        quarantined["id"].as_str().unwrap(),
        chmod.clone(),
    );
    assert_eq!(out["stdout"], "1\n", "{out}");
    let (_, out) = exec(&server, &server.admin, plain["id"].as_str().unwrap(), chmod);
    assert_eq!(out["stdout"], "0\n", "{out}");
    // The class's writable paths: a quarantined sandbox writes only to /tmp (home is refused: Landlock on
    // the process lane, a read-only mount behind gVisor, where auto puts quarantine), a plain one both.
    let write_home = json!({"cmd": ["sh", "-c", "echo x > $HOME/f; echo $?; echo y > /tmp/g; echo $?"]});
    let (_, out) = exec(
        &server,
        &server.admin,
        quarantined["id"].as_str().unwrap(),
        write_home.clone(),
    );
    // (dash reports a failed redirection with status 2)
    assert_eq!(out["stdout"], "2\n0\n", "{out}");
    let refused = out["stderr"].as_str().unwrap();
    assert!(
        refused.contains("Permission denied") || refused.contains("Read-only file system"),
        "{out}"
    );
    let (_, out) = exec(&server, &server.admin, plain["id"].as_str().unwrap(), write_home);
    assert_eq!(out["stdout"], "0\n0\n", "{out}");

    let (status, reply) = post(
        &server,
        &server.admin,
        "/v1/sandboxes",
        json!({"labels": {"kind": "evil"}}),
    );
    assert_eq!(status, 403, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("known bad workload"),
        "{reply}"
    );
    let (status, reply) = post(
        &server,
        &server.admin,
        "/v1/sandboxes",
        json!({"labels": {"kind": "broken"}}),
    );
    assert_eq!(status, 503, "a failing hook refuses: {reply}");

    let (_, events) = get(&server, &server.admin, "/v1/events?category=admission");
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "classifier.quarantine"),
        "{events}"
    );
}
