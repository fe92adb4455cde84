//! Cluster mode against real processes and a real PostgreSQL: node agents register with per-node tokens,
//! report capacity and heartbeats, are marked unreachable when killed; bad tokens, nonsense capacity and
//! duplicate ids are refused; two server replicas on one database elect one leader and hand over when it
//! is killed; nodes report their isolation lanes and placement filters on the lane a create gets (needs
//! root and runsc, as tests/runtimes.rs).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::postgres::Database;
use common::server::{admin_audit, call, cli, host_release, DataDir, Server};
use serde_json::{json, Value};

fn start_server(dir: &DataDir, db: &Database) -> Server {
    Server::start_with(dir.path(), &[], &["--database", &db.url, "--node-timeout", "1s"])
}

fn token(server: &Server, id: &str) -> String {
    let out = cli(server, &server.admin, &["node", "token", "create", id], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Starts an agent and returns it with its listen address and data directory (it prints `listening on ADDR` first).
fn agent(server: &Server, id: &str, token: &str, extra: &[&str]) -> (Child, String, DataDir) {
    agent_with_env(server, id, token, extra, &[])
}

/// [`agent`] with extra environment variables.
fn agent_with_env(
    server: &Server,
    id: &str,
    token: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Child, String, DataDir) {
    // The node's own state (its server, sandboxes), removed with the returned guard.
    let dir = DataDir::new();
    let (child, line) = common::spawn_first_line(
        Command::new(common::bin())
            .envs(env.iter().copied())
            .args(["node", "--control", &server.base, "--token", token, "--id", id])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--cpus",
                "2",
                "--memory",
                "1G",
                "--data-dir",
            ])
            .arg(dir.path())
            .args(extra)
            .stderr(Stdio::piped()),
    );
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("agent: {line:?}"));
    (child, addr.to_string(), dir)
}

/// Polls until `done` holds for node `id` as the API lists it; panics after 15 s with the last view.
fn wait_node(server: &Server, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, nodes) = call(
            "GET",
            &format!("{}/v1/nodes", server.base),
            Some(&server.admin),
            None,
        );
        let node = nodes
            .as_array()
            .and_then(|n| n.iter().find(|n| n["id"] == id).cloned())
            .unwrap_or(Value::Null);
        if done(&node) {
            return node;
        }
        assert!(Instant::now() < deadline, "node {id} never got there: {node}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) for a cluster event of `kind`; fails naming the events seen.
fn wait_event(server: &Server, kind: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, events) = call(
            "GET",
            &format!("{}/v1/events?category=cluster", server.base),
            Some(&server.admin),
            None,
        );
        if events
            .as_array()
            .is_some_and(|all| all.iter().any(|e| e["kind"] == kind))
        {
            return;
        }
        assert!(Instant::now() < deadline, "no {kind} event: {events}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(mut child: Child) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            return (status.code(), stderr);
        }
        assert!(Instant::now() < deadline, "the agent did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agents_register_report_and_become_unreachable_when_killed() {
    let db = Database::new();
    let dir = DataDir::new();
    let server = start_server(&dir, &db);
    let secret = token(&server, "worker-1");
    let (mut child, addr, _node_dir) = agent(
        &server,
        "worker-1",
        &secret,
        &["--labels", "zone=eu", "--taint", "gpu=true:NoSchedule"],
    );
    let node = wait_node(&server, "worker-1", |n| n["state"] == "ready");
    assert_eq!(node["capacity"]["cpu_millis"], 2000, "{node}");
    assert_eq!(node["capacity"]["memory_bytes"], 1u64 << 30);
    assert_eq!(node["labels"]["zone"], "eu");
    assert_eq!(node["taints"][0]["key"], "gpu");
    assert_eq!(node["address"], addr.as_str());
    let health: Value = ureq::get(&format!("http://{addr}/healthz"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(health["status"], "ok", "the node's own server answers");
    // Heartbeats keep it ready past the timeout.
    let first = node["last_heartbeat_ms"].as_i64().unwrap();
    wait_node(&server, "worker-1", |n| {
        n["last_heartbeat_ms"].as_i64().unwrap_or(0) > first + 1000 && n["state"] == "ready"
    });
    // Killed: no heartbeats, unreachable after the 1 s timeout, with an event.
    child.kill().unwrap();
    child.wait().unwrap();
    wait_node(&server, "worker-1", |n| n["state"] == "unreachable");
    // The leader records the event right after it marks the node, so it may land a moment later.
    wait_event(&server, "node.unreachable");
    // A new agent for the id takes it over (a new epoch).
    let (child, _, _node_dir2) = agent(&server, "worker-1", &secret, &[]);
    let node = wait_node(&server, "worker-1", |n| n["state"] == "ready");
    assert_eq!(node["epoch"], 2);
    let mut child = child;
    child.kill().unwrap();
    child.wait().unwrap();
    let out = cli(&server, &server.admin, &["node", "ls"], b"");
    assert!(String::from_utf8_lossy(&out.stdout).contains("worker-1"));
}

#[test]
fn bad_tokens_nonsense_capacity_and_duplicate_ids_are_refused() {
    let db = Database::new();
    let dir = DataDir::new();
    let server = start_server(&dir, &db);
    // An unknown token: the agent stops with the reason; the attempt is audited.
    let (child, _, _d1) = agent(&server, "w1", "tn_0000", &[]);
    let (code, stderr) = finish(child);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("unknown node token"), "{stderr}");
    let audit = admin_audit(&server);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "node.auth" && a["outcome"].as_str().unwrap().starts_with("denied")),
        "{audit}"
    );
    // Another node's token.
    let secret = token(&server, "w1");
    let (child, _, _d2) = agent(&server, "w2", &secret, &[]);
    let (_, stderr) = finish(child);
    assert!(stderr.contains("belongs to node 'w1'"), "{stderr}");
    // Nonsense capacity and usage, sent by hand.
    let register = |body: Value| {
        let response = ureq::post(&format!("{}/v1/nodes/register", server.base))
            .set("Authorization", &format!("Bearer {secret}"))
            .send_json(body);
        match response {
            Ok(r) => (r.status(), r.into_json::<Value>().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("{e}"),
        }
    };
    let report = |capacity: Value, usage: Value| json!({"id": "w1", "instance": "x", "address": "127.0.0.1:1", "capacity": capacity, "usage": usage});
    let zero = json!({"cpu_millis": 0, "memory_bytes": 1 << 30, "gpus": 0});
    let huge = json!({"cpu_millis": 1u64 << 62, "memory_bytes": 1 << 30, "gpus": 0});
    let fine = json!({"cpu_millis": 1000, "memory_bytes": 1 << 30, "gpus": 0});
    let over = json!({"cpu_millis": 2000, "memory_bytes": 0, "gpus": 0});
    for (capacity, usage) in [(zero, json!({})), (huge, json!({})), (fine.clone(), over)] {
        let (status, body) = register(report(capacity, usage));
        assert_eq!(status, 422, "{body}");
    }
    assert!(wait_node_absent(&server, "w1"), "a refused node was stored");
    // Two agents for one id: the second is refused while the first runs.
    let (mut first, _, _d3) = agent(&server, "w1", &secret, &[]);
    wait_node(&server, "w1", |n| n["state"] == "ready");
    let (second, _, _d4) = agent(&server, "w1", &secret, &[]);
    let (code, stderr) = finish(second);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("held by another running agent"), "{stderr}");
    first.kill().unwrap();
    first.wait().unwrap();
    // Removed: gone from the list, and its token no longer works.
    let out = cli(&server, &server.admin, &["node", "rm", "w1"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_node_absent(&server, "w1"));
    let (again, _, _d5) = agent(&server, "w1", &secret, &[]);
    let (_, stderr) = finish(again);
    assert!(stderr.contains("unknown node token"), "{stderr}");
    // Tokens need a key.
    let (status, _) = call(
        "POST",
        &format!("{}/v1/nodes/tokens", server.base),
        None,
        Some(json!({"id": "w9"})),
    );
    assert_eq!(status, 401);
}

fn wait_node_absent(server: &Server, id: &str) -> bool {
    let (_, nodes) = call(
        "GET",
        &format!("{}/v1/nodes", server.base),
        Some(&server.admin),
        None,
    );
    !nodes.as_array().unwrap().iter().any(|n| n["id"] == id)
}

#[test]
fn replicas_elect_one_leader_and_hand_over_when_it_dies() {
    let db = Database::new();
    let (dir_a, dir_b) = (DataDir::new(), DataDir::new());
    let a = start_server(&dir_a, &db);
    let b = start_server(&dir_b, &db);
    let status =
        |server: &Server, key: &str| call("GET", &format!("{}/v1/cluster", server.base), Some(key), None).1;
    // Both replicas serve the same API; exactly one leads.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (leader, follower, leader_key, follower_key) = loop {
        let (sa, sb) = (status(&a, &a.admin), status(&b, &a.admin));
        assert_eq!(sa["backend"], "postgres");
        match (sa["leader"] == true, sb["leader"] == true) {
            (true, false) => break (a, b, dir_a, dir_b),
            (false, true) => break (b, a, dir_b, dir_a),
            (true, true) => panic!("two leaders: {sa} {sb}"),
            (false, false) => {
                assert!(Instant::now() < deadline, "no leader: {sa} {sb}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let admin = leader.admin.clone();
    let term = status(&follower, &admin)["term"].as_i64().unwrap();
    // A key created through one replica works on the other: one database.
    let (code, _) = call("GET", &format!("{}/v1/nodes", follower.base), Some(&admin), None);
    assert_eq!(code, 200);
    leader.kill9();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(&follower, &admin);
        if s["leader"] == true {
            assert!(s["term"].as_i64().unwrap() > term, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "the follower never took over: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop((leader_key, follower_key));
}

#[test]
fn requests_wait_in_the_queue_until_a_node_has_room_and_a_full_queue_answers_429() {
    let db = Database::new();
    let dir = DataDir::new();
    let server = Server::start_with(
        dir.path(),
        &[],
        &[
            "--database",
            &db.url,
            "--node-timeout",
            "1s",
            "--queue-depth",
            "1",
        ],
    );
    let secret = token(&server, "solo");
    let (mut child, _, _node_dir) = agent(&server, "solo", &secret, &[]);
    wait_node(&server, "solo", |n| n["state"] == "ready");
    let create = |body: Value| {
        call(
            "POST",
            &format!("{}/v1/sandboxes", server.base),
            Some(&server.admin),
            Some(body),
        )
    };
    // The node has 2 CPUs: two 1-CPU sandboxes fit, the third waits.
    let one_cpu = json!({"resources": {"cpus": 1.0}});
    let (status, first) = create(one_cpu.clone());
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["node"], "solo");
    let (status, second) = create(one_cpu.clone());
    assert_eq!(status, 201, "{second}");
    let (status, queued) = create(json!({"resources": {"cpus": 1.0}, "lane": "swift"}));
    assert_eq!(status, 202, "{queued}");
    assert_eq!(queued["status"], "queued");
    assert_eq!(queued["lane"], "swift");
    assert!(
        queued["reason"].as_str().unwrap().contains("capacity"),
        "{queued}"
    );
    let id = queued["id"].as_str().unwrap().to_string();
    let (_, item) = call(
        "GET",
        &format!("{}/v1/queue/{id}", server.base),
        Some(&server.admin),
        None,
    );
    assert!(item["state"] == "ready" || item["state"] == "leased", "{item}");
    // The queue holds one: the next create is refused with Retry-After.
    let refused = ureq::post(&format!("{}/v1/sandboxes", server.base))
        .set("Authorization", &format!("Bearer {}", server.admin))
        .send_json(one_cpu.clone());
    match refused {
        Err(ureq::Error::Status(429, response)) => {
            assert_eq!(response.header("retry-after"), Some("5"));
        }
        other => panic!("expected 429, got {other:?}"),
    }
    // Room again: the leader's dispatcher places the queued request, under the id it was given.
    let first_id = first["id"].as_str().unwrap();
    let (status, _) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{first_id}", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, item) = call(
            "GET",
            &format!("{}/v1/queue/{id}", server.base),
            Some(&server.admin),
            None,
        );
        if item["state"] == "done" {
            assert_eq!(item["sandbox"], id.as_str());
            break;
        }
        assert!(Instant::now() < deadline, "never dispatched: {item}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, placed) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(status, 200, "{placed}");
    assert_eq!(placed["status"], "running");
    assert_eq!(placed["node"], "solo");
    let (status, out) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/exec", server.base),
        Some(&server.admin),
        Some(json!({"cmd": ["echo", "dispatched"]})),
    );
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["stdout"], "dispatched\n");
    let metrics = ureq::get(&format!("{}/metrics", server.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(metrics.contains("tartarus_queue_depth"), "no queue metrics");
    assert!(
        metrics.contains("tartarus_queue_wait_duration_seconds"),
        "no queue metrics"
    );
    for sandbox in [second["id"].as_str().unwrap(), id.as_str()] {
        call(
            "DELETE",
            &format!("{}/v1/sandboxes/{sandbox}", server.base),
            Some(&server.admin),
            None,
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn placement_follows_taints_affinity_spreading_and_quarantine() {
    let db = Database::new();
    let dir = DataDir::new();
    let server = start_server(&dir, &db);
    let mut agents = Vec::new();
    for (id, extra) in [
        (
            "gpu",
            &["--taint", "gpu=true:NoSchedule", "--labels", "disk=ssd"][..],
        ),
        ("plain-1", &["--labels", "disk=hdd"][..]),
        ("plain-2", &["--labels", "disk=hdd"][..]),
        ("jail", &["--quarantine"][..]),
    ] {
        let secret = token(&server, id);
        agents.push(agent(&server, id, &secret, extra));
        wait_node(&server, id, |n| n["state"] == "ready");
    }
    let create = |body: Value| {
        let (status, record) = call(
            "POST",
            &format!("{}/v1/sandboxes", server.base),
            Some(&server.admin),
            Some(body),
        );
        assert_eq!(status, 201, "{record}");
        record
    };
    // Spread by the app label: two replicas of one app on two nodes; never on the tainted or quarantine node.
    let web = json!({"labels": {"app": "web"}, "spread_by": "app"});
    let (a, b) = (create(web.clone()), create(web));
    let placed = [a["node"].as_str().unwrap(), b["node"].as_str().unwrap()];
    assert!(placed.iter().all(|n| n.starts_with("plain-")), "{placed:?}");
    assert_ne!(placed[0], placed[1], "the replicas were not spread");
    // Preferring SSD and tolerating the GPU taint: the GPU node.
    let gpu = create(json!({
        "tolerations": [{"key": "gpu", "value": "true"}],
        "node_affinity": [{"key": "disk", "value": "ssd", "weight": 100}],
    }));
    assert_eq!(gpu["node"], "gpu", "{gpu}");
    assert!(gpu["placement"].as_str().unwrap().starts_with("gpu:"), "{gpu}");
    // The quarantine class runs only on the quarantine node.
    let jailed = create(json!({"class": "quarantine"}));
    assert_eq!(jailed["node"], "jail", "{jailed}");
    // tartarus inspect shows where and why.
    let out = cli(
        &server,
        &server.admin,
        &["inspect", gpu["id"].as_str().unwrap()],
        b"",
    );
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["node"], "gpu");
    assert!(
        shown["placement"].as_str().unwrap().contains("scored lower")
            || shown["placement"].as_str().unwrap().contains("fail"),
        "{shown}"
    );
    // Spreading by a label the sandbox does not have is refused, saying so.
    let (status, error) = call(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(&server.admin),
        Some(json!({"spread_by": "app"})),
    );
    assert_eq!(status, 422, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no label 'app'"),
        "{error}"
    );
    for record in [&a, &b, &gpu, &jailed] {
        call(
            "DELETE",
            &format!("{}/v1/sandboxes/{}", server.base, record["id"].as_str().unwrap()),
            Some(&server.admin),
            None,
        );
    }
    for (mut child, _, _dir) in agents {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

fn lane_names(node: &Value) -> Vec<String> {
    node["lanes"]
        .as_array()
        .unwrap_or_else(|| panic!("no lanes: {node}"))
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn nodes_report_their_lanes_and_untrusted_work_lands_on_a_gvisor_node() {
    let db = Database::new();
    let dir = DataDir::new();
    let server = start_server(&dir, &db);
    // Two nodes: one runs every lane (this host has runsc and QEMU); the other cannot find runsc or QEMU,
    // so it runs the process lane only.
    let walled_token = token(&server, "walled");
    let plain_token = token(&server, "plain");
    let (walled, _, _walled_dir) = agent(&server, "walled", &walled_token, &[]);
    let (plain, plain_addr, plain_dir) = agent_with_env(
        &server,
        "plain",
        &plain_token,
        &[],
        &[
            ("TARTARUS_RUNSC", "/nonexistent/runsc"),
            ("TARTARUS_QEMU", "/nonexistent/qemu-system-x86_64"),
        ],
    );
    let walled_view = wait_node(&server, "walled", |n| n["state"] == "ready");
    let plain_view = wait_node(&server, "plain", |n| n["state"] == "ready");
    assert_eq!(
        lane_names(&walled_view),
        ["process", "gvisor", "microvm", "wasm"],
        "{walled_view}"
    );
    assert_eq!(lane_names(&plain_view), ["process", "wasm"], "{plain_view}");
    let versions = &walled_view["lanes"];
    assert_eq!(versions[0]["version"], host_release().as_str(), "{walled_view}");
    assert!(
        versions[1]["version"].as_str().unwrap().starts_with("runsc "),
        "{walled_view}"
    );
    let out = cli(&server, &server.admin, &["node", "ls"], b"");
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    let line_of = |id: &str| {
        listing
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} not listed: {listing}"))
            .to_string()
    };
    assert!(
        line_of("walled").contains(" process,gvisor,microvm,wasm "),
        "{listing}"
    );
    assert!(!line_of("plain").contains("gvisor"), "{listing}");

    let (status, body) = call(
        "POST",
        &format!("{}/v1/policies", server.base),
        Some(&server.admin),
        Some(json!({
            "yaml": "id: beta-untrusted\ntenants: [beta]\nisolation: {trust: untrusted}\n",
            "source": "test.yaml",
        })),
    );
    assert!(status == 200 || status == 201, "{status} {body}");
    let beta = common::server::apikey(&["--database".as_ref(), db.url.as_ref()], "beta", "user");
    let create = |key: &str, body: Value| {
        call(
            "POST",
            &format!("{}/v1/sandboxes", server.base),
            Some(key),
            Some(body),
        )
    };

    // Untrusted: gVisor, so only the node that runs it; the decision names the filter.
    let (status, walled_box) = create(&beta, json!({}));
    assert_eq!(status, 201, "{walled_box}");
    assert_eq!(walled_box["runtime"], "gvisor", "{walled_box}");
    assert!(
        walled_box["runtime_reason"]
            .as_str()
            .unwrap()
            .contains("an untrusted tenant requires a strong wall"),
        "{walled_box}"
    );
    assert_eq!(walled_box["node"], "walled", "{walled_box}");
    let placement = walled_box["placement"].as_str().unwrap();
    assert!(placement.ends_with("2 nodes: 1 lacks lane gvisor"), "{placement}");
    let id = walled_box["id"].as_str().unwrap().to_string();
    // The node started it behind gVisor: the sentry reports its own kernel release, not the host's.
    let (status, out) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/exec", server.base),
        Some(&beta),
        Some(json!({"cmd": ["uname", "-r"]})),
    );
    assert_eq!(status, 200, "{out}");
    let release = out["stdout"].as_str().unwrap().trim().to_string();
    assert!(!release.is_empty() && release != host_release(), "{out}");
    let audit = admin_audit(&server);
    assert!(
        audit.as_array().unwrap().iter().any(|a| {
            a["action"] == "sandbox.create"
                && a["target"] == id.as_str()
                && a["outcome"]
                    .as_str()
                    .unwrap()
                    .starts_with("ok (runtime gvisor: an untrusted tenant requires a strong wall")
        }),
        "{audit}"
    );

    // Standard trust naming nothing: the process lane, which both nodes run.
    let (status, plain_box) = create(&server.admin, json!({}));
    assert_eq!(status, 201, "{plain_box}");
    assert_eq!(plain_box["runtime"], "process", "{plain_box}");
    assert!(
        !plain_box["placement"].as_str().unwrap().contains("lacks lane"),
        "{plain_box}"
    );

    // The node refuses a lane it lacks, naming it, even when asked directly.
    let node_key = std::fs::read_to_string(plain_dir.path().join("admin.key")).unwrap();
    let (status, refused) = call(
        "POST",
        &format!("http://{plain_addr}/v1/node/sandboxes"),
        Some(node_key.trim()),
        Some(json!({"tenant": "beta", "spec": {"command": []}, "template": null, "runtime": "gvisor"})),
    );
    assert_eq!(status, 422, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("gvisor lane") && message.contains("runsc"),
        "{refused}"
    );

    let delete = |sandbox: &str| {
        let (status, body) = call(
            "DELETE",
            &format!("{}/v1/sandboxes/{sandbox}", server.base),
            Some(&server.admin),
            None,
        );
        assert_eq!(status, 200, "{body}");
    };
    delete(plain_box["id"].as_str().unwrap());

    // Only the gVisor node could hold it, and it has no room now: queued with its lane, and dispatched
    // there on that lane once there is room.
    let (status, queued) = create(&beta, json!({"resources": {"cpus": 2.0}}));
    assert_eq!(status, 202, "{queued}");
    assert_eq!(queued["runtime"], "gvisor", "{queued}");
    assert!(
        queued["reason"].as_str().unwrap().contains("1 lacks lane gvisor"),
        "{queued}"
    );
    let queued_id = queued["id"].as_str().unwrap().to_string();
    delete(&id);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, item) = call(
            "GET",
            &format!("{}/v1/queue/{queued_id}", server.base),
            Some(&server.admin),
            None,
        );
        if item["state"] == "done" {
            break;
        }
        assert!(Instant::now() < deadline, "never dispatched: {item}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, dispatched) = call(
        "GET",
        &format!("{}/v1/sandboxes/{queued_id}", server.base),
        Some(&beta),
        None,
    );
    assert_eq!(
        (&dispatched["node"], &dispatched["runtime"]),
        (&json!("walled"), &json!("gvisor")),
        "{dispatched}"
    );
    assert!(
        dispatched["runtime_reason"]
            .as_str()
            .unwrap()
            .contains("an untrusted tenant requires a strong wall"),
        "{dispatched}"
    );
    delete(&queued_id);

    // The gVisor node gone: no live node offers gVisor.
    let mut walled = walled;
    walled.kill().unwrap();
    walled.wait().unwrap();
    wait_node(&server, "walled", |n| n["state"] == "unreachable");
    let sandboxes_before = call(
        "GET",
        &format!("{}/v1/sandboxes", server.base),
        Some(&server.admin),
        None,
    )
    .1;
    // Naming it: 422 naming the lane, and nothing created or queued.
    let (status, error) = create(&server.admin, json!({"runtime": "gvisor"}));
    assert_eq!(status, 422, "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("runtime gvisor") && message.contains("no live cluster node offers the gvisor lane"),
        "{error}"
    );
    let (_, queue) = call(
        "GET",
        &format!("{}/v1/queue", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(queue["waiting"], json!([]), "{queue}");
    assert_eq!(queue["dead_letters"], json!([]), "{queue}");
    let sandboxes_after = call(
        "GET",
        &format!("{}/v1/sandboxes", server.base),
        Some(&server.admin),
        None,
    )
    .1;
    assert_eq!(
        sandboxes_before, sandboxes_after,
        "a refused create left a sandbox"
    );
    // An untrusted tenant naming nothing falls back to the process lane, saying what was missing.
    let (status, fallback) = create(&beta, json!({}));
    assert_eq!(status, 201, "{fallback}");
    assert_eq!(
        (&fallback["runtime"], &fallback["node"]),
        (&json!("process"), &json!("plain")),
        "{fallback}"
    );
    assert!(
        fallback["runtime_reason"]
            .as_str()
            .unwrap()
            .contains("no live cluster node offers the gvisor lane"),
        "{fallback}"
    );
    call(
        "DELETE",
        &format!(
            "{}/v1/sandboxes/{}",
            server.base,
            fallback["id"].as_str().unwrap()
        ),
        Some(&server.admin),
        None,
    );
    let mut plain = plain;
    plain.kill().unwrap();
    plain.wait().unwrap();
}
