//! Node agents on their own network: each agent runs in a network namespace of its own with its own
//! address, linked by a veth to a bridge in an outer test namespace where the control plane listens.
//! Sandboxes are placed on nodes by the scheduler and run there; a node whose link is cut
//! (`ip link set down`) becomes unreachable, its sandbox is lost (not started again elsewhere), new work
//! goes to the other node, and the node comes back when the link does.
//!
//! Safety: everything lives in namespaces this test creates (`tt-cl-<random>` and its nodes), linked to
//! nothing real, with test addresses; nothing is sent from or changed in the host's own namespace. The
//! namespaces are removed on drop, also when the test panics. The control plane keeps its state in SQLite
//! here (the PostgreSQL server listens on the host's loopback, which the test namespaces cannot reach);
//! the same cluster code runs on PostgreSQL in `tests/cluster.rs`.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::bin;
use serde_json::{json, Value};

const CONTROL: &str = "10.98.0.1";

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) is required");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The outer namespace with a bridge, and one namespace per node; all removed on drop.
struct Lab {
    outer: String,
    nodes: Vec<String>,
    children: Vec<Child>,
}

impl Lab {
    fn new() -> Lab {
        let outer = format!("tt-cl-{}", tartarus_hostsys::random_hex(4).unwrap());
        ip(&["netns", "add", &outer]);
        let lab = Lab {
            outer,
            nodes: Vec::new(),
            children: Vec::new(),
        };
        ip(&["-n", &lab.outer, "link", "set", "dev", "lo", "up"]);
        ip(&["-n", &lab.outer, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &lab.outer,
            "addr",
            "add",
            &format!("{CONTROL}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &lab.outer, "link", "set", "br0", "up"]);
        lab
    }

    /// A node namespace at 10.98.0.(10 + n) on the bridge; returns its namespace name.
    fn node(&mut self) -> (String, String) {
        let n = self.nodes.len() + 1;
        let name = format!("{}-n{n}", self.outer);
        ip(&["netns", "add", &name]);
        self.nodes.push(name.clone());
        let port = format!("p{n}");
        ip(&[
            "-n",
            &self.outer,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &name,
        ]);
        ip(&["-n", &self.outer, "link", "set", &port, "master", "br0"]);
        ip(&["-n", &self.outer, "link", "set", &port, "up"]);
        let addr = format!("10.98.0.{}", 10 + n);
        ip(&["-n", &name, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        (name, addr)
    }

    /// Spawns `tartarus ARGS` in namespace `ns`'s network (with `nsenter`, not `ip netns exec`, which
    /// would remount `/sys` and hide the cgroup tree the node's sandboxes need); returns its first line.
    fn spawn(&mut self, ns: &str, args: &[&str]) -> String {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        self.children.push(child);
        line
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in self.nodes.iter().chain(std::iter::once(&self.outer)) {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// An HTTP request from inside namespace `ns` (python's http.client: the test process itself stays in
/// the host's namespace and sends nothing).
fn request(ns: &str, method: &str, url: &str, key: &str, body: Option<Value>) -> Value {
    let script = r#"
import http.client, json, sys, urllib.parse
method, url, key, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
u = urllib.parse.urlsplit(url)
c = http.client.HTTPConnection(u.netloc, timeout=5)
c.request(method, u.path, body=body or None, headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
r = c.getresponse()
print(json.dumps({"status": r.status, "body": json.loads(r.read() or b"null")}))
"#;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "python3", "-c", script, method, url, key, &body,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn node_states(lab: &Lab, base: &str, key: &str) -> Vec<(String, String)> {
    let nodes = request(&lab.outer, "GET", &format!("{base}/v1/nodes"), key, None);
    nodes["body"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_string(),
                n["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn wait_states(lab: &Lab, base: &str, key: &str, want: &[(&str, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let states = node_states(lab, base, key);
        let have: Vec<(&str, &str)> = states.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nodes never reached {want:?}: {have:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_node_cut_off_its_network_becomes_unreachable_and_comes_back() {
    let data = common::server::DataDir::new();
    let mut lab = Lab::new();
    let outer = lab.outer.clone();
    let line = lab.spawn(
        &outer,
        &[
            "server",
            "--listen",
            &format!("{CONTROL}:7070"),
            "--node-timeout",
            "1s",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    assert!(line.starts_with("listening on"), "{line:?}");
    let base = format!("http://{CONTROL}:7070");
    let admin = std::fs::read_to_string(data.path().join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    let mut nodes = Vec::new();
    let node_dirs = [common::server::DataDir::new(), common::server::DataDir::new()];
    for (n, id) in ["node-1", "node-2"].into_iter().enumerate() {
        let token = request(
            &outer,
            "POST",
            &format!("{base}/v1/nodes/tokens"),
            &admin,
            Some(json!({"id": id})),
        );
        assert_eq!(token["status"], 201, "{token}");
        let (ns, addr) = lab.node();
        let line = lab.spawn(
            &ns,
            &[
                "node",
                "--control",
                &base,
                "--id",
                id,
                "--token",
                token["body"]["token"].as_str().unwrap(),
                "--listen",
                &format!("{addr}:7071"),
                "--cpus",
                "1",
                "--memory",
                "512M",
                "--labels",
                &format!("zone={}", ["a", "b"][n]),
                "--data-dir",
                node_dirs[n].path().to_str().unwrap(),
            ],
        );
        assert_eq!(line.trim(), format!("listening on {addr}:7071"));
        nodes.push((ns, addr));
    }
    wait_states(&lab, &base, &admin, &[("node-1", "ready"), ("node-2", "ready")]);
    let listed = request(&outer, "GET", &format!("{base}/v1/nodes"), &admin, None);
    let addresses: Vec<&str> = listed["body"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        addresses,
        [format!("{}:7071", nodes[0].1), format!("{}:7071", nodes[1].1)]
    );
    // A sandbox for zone b runs on node-2, placed by the scheduler, explained, and usable through the
    // control plane.
    let post =
        |path: &str, body: Value| request(&outer, "POST", &format!("{base}{path}"), &admin, Some(body));
    let created = post(
        "/v1/sandboxes",
        json!({"node_selector": {"zone": "b"}, "labels": {"app": "web"}}),
    );
    assert_eq!(created["status"], 201, "{created}");
    let sandbox = created["body"].clone();
    assert_eq!(sandbox["node"], "node-2", "{sandbox}");
    assert!(
        sandbox["placement"].as_str().unwrap().starts_with("node-2:"),
        "{sandbox}"
    );
    let id = sandbox["id"].as_str().unwrap().to_string();
    let out = post(
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": ["sh", "-c", "echo from the node"]}),
    );
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["body"]["stdout"], "from the node\n");
    // The CLI works on it as on a local sandbox: a streamed exec with its exit code, files both ways.
    let cli = |args: &[&str]| {
        let config = tempfile::tempdir().unwrap();
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{outer}"))
            .arg(bin())
            .args(args)
            .env("TARTARUS_HOST", &base)
            .env("TARTARUS_API_KEY", &admin)
            .env("XDG_CONFIG_HOME", config.path())
            .output()
            .unwrap()
    };
    let streamed = cli(&["exec", &id, "--", "sh", "-c", "echo streamed; exit 3"]);
    assert_eq!(
        streamed.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&streamed.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&streamed.stdout), "streamed\n");
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("in.txt");
    std::fs::write(&local, b"to the node and back").unwrap();
    let out = cli(&["cp", local.to_str().unwrap(), &format!("{id}:/tmp/file.txt")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let back = work.path().join("back.txt");
    let out = cli(&["cp", &format!("{id}:/tmp/file.txt"), back.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&back).unwrap(), b"to the node and back");
    // Paused on its node: execs wait for a resume.
    let paused = post(&format!("/v1/sandboxes/{id}/pause"), json!(null));
    assert_eq!(paused["body"]["status"], "paused", "{paused}");
    let refused = post(&format!("/v1/sandboxes/{id}/exec"), json!({"cmd": ["true"]}));
    assert_eq!(refused["status"], 409, "{refused}");
    let resumed = post(&format!("/v1/sandboxes/{id}/resume"), json!(null));
    assert_eq!(resumed["body"]["status"], "running", "{resumed}");
    let on_disk = |n: usize| {
        std::fs::read_dir(node_dirs[n].path().join("sandboxes"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(
        (on_disk(0), on_disk(1)),
        (0, 1),
        "the sandbox runs on node-2's machine only"
    );
    // What no node could ever hold fails at once, saying why (under a policy that allows the size: the
    // built-in default policy would refuse it first, at admission).
    let allow =
        json!({"yaml": "id: big\nresources: {max_memory_mb: 1048576, max_total_memory_mb: 4194304}\n"});
    let applied = request(
        &outer,
        "POST",
        &format!("{base}/v1/policies"),
        &admin,
        Some(allow),
    );
    assert!(applied["status"] == 201 || applied["status"] == 200, "{applied}");
    let huge = post("/v1/sandboxes", json!({"resources": {"memory_mb": 65536}}));
    let removed = request(&outer, "DELETE", &format!("{base}/v1/policies/big"), &admin, None);
    assert_eq!(removed["status"], 200, "{removed}");
    assert_eq!(huge["status"], 422, "{huge}");
    assert!(
        huge["body"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no node could ever"),
        "{huge}"
    );
    // Cut node-2 off: it misses its heartbeats and becomes unreachable; node-1 stays ready; the sandbox
    // on node-2 is lost (not started again anywhere), and new work goes to node-1.
    ip(&["-n", &nodes[1].0, "link", "set", "eth0", "down"]);
    wait_states(
        &lab,
        &base,
        &admin,
        &[("node-1", "ready"), ("node-2", "unreachable")],
    );
    let record = request(&outer, "GET", &format!("{base}/v1/sandboxes/{id}"), &admin, None);
    assert_eq!(record["body"]["status"], "lost", "{record}");
    assert!(
        record["body"]["reason"].as_str().unwrap().contains("node-2"),
        "{record}"
    );
    let next = post("/v1/sandboxes", json!({}));
    assert_eq!(next["status"], 201, "{next}");
    assert_eq!(next["body"]["node"], "node-1", "{next}");
    let zone_b = post("/v1/sandboxes", json!({"node_selector": {"zone": "b"}}));
    assert_eq!(
        zone_b["status"], 202,
        "only an unreachable node fits: it waits, it does not fail: {zone_b}"
    );
    let waiting = zone_b["body"]["id"].as_str().unwrap().to_string();
    // Its link back: the same agent's heartbeats count again.
    ip(&["-n", &nodes[1].0, "link", "set", "eth0", "up"]);
    wait_states(&lab, &base, &admin, &[("node-1", "ready"), ("node-2", "ready")]);
    // Back: the waiting request is dispatched to node-2, under the id it was given.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let item = request(&outer, "GET", &format!("{base}/v1/queue/{waiting}"), &admin, None);
        if item["body"]["state"] == "done" {
            break;
        }
        assert!(Instant::now() < deadline, "never dispatched: {item}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let placed = request(
        &outer,
        "GET",
        &format!("{base}/v1/sandboxes/{waiting}"),
        &admin,
        None,
    );
    assert_eq!(placed["body"]["node"], "node-2", "{placed}");
    assert_eq!(placed["body"]["status"], "running", "{placed}");
    let next_id = next["body"]["id"].as_str().unwrap();
    let deleted = request(
        &outer,
        "DELETE",
        &format!("{base}/v1/sandboxes/{next_id}"),
        &admin,
        None,
    );
    assert_eq!(deleted["status"], 200, "{deleted}");
    assert_eq!(deleted["body"]["status"], "killed", "{deleted}");
    let events = request(
        &outer,
        "GET",
        &format!("{base}/v1/events?category=cluster"),
        &admin,
        None,
    );
    let unreachable: Vec<&Value> = events["body"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "node.unreachable")
        .collect();
    assert_eq!(unreachable.len(), 1, "{events}");
    assert!(unreachable[0]["message"].as_str().unwrap().contains("node-2"));
}
