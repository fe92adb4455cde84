//! The Grafana dashboards of deploy/grafana/: their JSON checked against the structure Grafana's
//! dashboard schema (schemaVersion 39) requires of what we use, and every panel's PromQL evaluated in a
//! real Prometheus scraping a real standalone server, a real control plane on PostgreSQL and its node
//! agent, after a workload that records every metric.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tartarus_server::metrics::catalogue;

use crate::common::postgres::Database;
use crate::common::server::{call, cli, DataDir, Server};
use crate::workload;

fn grafana_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana")
}

/// Every dashboard: file name and JSON.
fn dashboards() -> Vec<(String, Value)> {
    let dir = grafana_dir().join("dashboards");
    let mut all: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, json)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(all.len(), 6, "six dashboards in {}", dir.display());
    all
}

/// Every panel's expressions: (dashboard, panel title, expr).
fn expressions() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (name, dashboard) in dashboards() {
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                out.push((
                    name.clone(),
                    panel["title"].as_str().unwrap().to_string(),
                    target["expr"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    out
}

/// The metric names an expression reads (identifiers starting with `tartarus_`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tartarus_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Panel types Grafana ships.
const PANEL_TYPES: &[&str] = &[
    "timeseries",
    "stat",
    "gauge",
    "bargauge",
    "table",
    "heatmap",
    "piechart",
    "text",
    "state-timeline",
    "status-history",
];

/// The datasource uid the provisioning file gives the Prometheus.
fn provisioned_datasource() -> String {
    let text = std::fs::read_to_string(grafana_dir().join("provisioning/datasources/tartarus.yaml")).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(doc["apiVersion"].as_u64(), Some(1));
    let source = &doc["datasources"][0];
    assert_eq!(source["type"].as_str(), Some("prometheus"));
    source["uid"].as_str().unwrap().to_string()
}

/// The checked-in JSON is what `generate.py` writes.
pub fn check_generated() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new("python3")
        .arg(grafana_dir().join("generate.py"))
        .arg(out.path())
        .status()
        .expect("python3 runs deploy/grafana/generate.py");
    assert!(status.success());
    for (name, json) in dashboards() {
        let generated: Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join(&name)).unwrap()).unwrap();
        assert!(
            generated == json,
            "deploy/grafana/dashboards/{name} differs from what generate.py writes: run python3 deploy/grafana/generate.py"
        );
    }
}

pub fn check_all_structure() {
    let datasource = provisioned_datasource();
    let provider =
        std::fs::read_to_string(grafana_dir().join("provisioning/dashboards/tartarus.yaml")).unwrap();
    let provider: serde_yaml_ng::Value = serde_yaml_ng::from_str(&provider).unwrap();
    assert_eq!(provider["providers"][0]["type"].as_str(), Some("file"));
    assert!(provider["providers"][0]["options"]["path"].as_str().is_some());
    let mut uids = BTreeSet::new();
    for (name, d) in dashboards() {
        let uid = d["uid"].as_str().unwrap_or_else(|| panic!("{name}: no uid"));
        assert!(uid.len() <= 40, "{name}: a uid is at most 40 characters");
        assert!(uids.insert(uid.to_string()), "{name}: uid {uid} is used twice");
        assert!(
            d["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}: title"
        );
        assert!(
            d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
            "{name}: schemaVersion"
        );
        for key in ["templating", "annotations"] {
            assert!(d[key]["list"].is_array(), "{name}: {key}.list");
        }
        assert!(
            d["time"]["from"].is_string() && d["time"]["to"].is_string(),
            "{name}: time"
        );
        let panels = d["panels"].as_array().unwrap_or_else(|| panic!("{name}: panels"));
        assert!(!panels.is_empty(), "{name}: no panels");
        let mut ids = BTreeSet::new();
        for p in panels {
            let title = p["title"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: a panel without a title"));
            let at = format!("{name} / {title}");
            assert!(ids.insert(p["id"].as_u64().unwrap()), "{at}: panel id used twice");
            let kind = p["type"].as_str().unwrap();
            assert!(PANEL_TYPES.contains(&kind), "{at}: unknown panel type {kind}");
            let grid = &p["gridPos"];
            let [h, w, x, y] =
                ["h", "w", "x", "y"].map(|k| grid[k].as_u64().unwrap_or_else(|| panic!("{at}: gridPos.{k}")));
            assert!(
                h > 0 && (1..=24).contains(&w) && x + w <= 24,
                "{at}: gridPos {grid}"
            );
            let _ = y;
            assert_eq!(p["datasource"]["uid"], datasource.as_str(), "{at}: datasource");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{at}: no targets");
            let mut refs = BTreeSet::new();
            for t in targets {
                assert!(
                    refs.insert(t["refId"].as_str().unwrap().to_string()),
                    "{at}: refId twice"
                );
                assert_eq!(
                    t["datasource"]["uid"],
                    datasource.as_str(),
                    "{at}: target datasource"
                );
                let expr = t["expr"].as_str().unwrap();
                let names = metric_names(expr);
                // Prometheus's own `up` is the one other series a panel may read.
                let reads_up = expr.contains("(up{job=");
                assert!(
                    !names.is_empty() || reads_up,
                    "{at}: reads no Tartarus metric: {expr}"
                );
                for metric in names {
                    assert!(
                        catalogue::find(&metric).is_some(),
                        "{at}: {metric} is not a Tartarus metric (docs/metrics.md)"
                    );
                }
            }
        }
    }
}

/// Debian's `prometheus`, found on PATH; the test fails (never skips) without it.
fn prometheus_binary() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .expect("prometheus is needed: apt-get install prometheus (.ci/run installs it)")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Prometheus scraping `targets` (job, host:port) every second.
fn start_prometheus(work: &Path, targets: &[(&str, &str)]) -> (Killed, String) {
    let jobs: Vec<Value> = targets
        .iter()
        .map(|(job, target)| json!({"job_name": job, "static_configs": [{"targets": [target]}]}))
        .collect();
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": jobs,
    });
    // YAML is a superset of JSON.
    let config_path = work.join("prometheus.yml");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let port = free_port();
    let child = Command::new(prometheus_binary())
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--storage.tsdb.path={}", work.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    let child = Killed(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ureq::get(&format!("{base}/-/ready")).call().is_err() {
        assert!(
            Instant::now() < deadline,
            "prometheus did not become ready: {}",
            std::fs::read_to_string(work.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (child, base)
}

/// Evaluates `expr` now: `Err` with Prometheus's error when it fails, else the number of series.
fn query(prometheus: &str, expr: &str) -> Result<usize, String> {
    let response = ureq::get(&format!("{prometheus}/api/v1/query"))
        .query("query", expr)
        .call();
    let body: Value = match response {
        Ok(r) => r.into_json().unwrap(),
        Err(ureq::Error::Status(_, r)) => r.into_json().unwrap_or(Value::Null),
        Err(e) => return Err(e.to_string()),
    };
    if body["status"] != "success" {
        return Err(format!("{}: {}", body["errorType"], body["error"]));
    }
    Ok(body["data"]["result"].as_array().map_or(0, Vec::len))
}

/// A node agent for `server` with 2 CPUs and 1 GiB, registered as `id`; with its listen address.
fn node_agent(server: &Server, id: &str) -> (Killed, String, DataDir) {
    let out = cli(server, &server.admin, &["node", "token", "create", id], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let dir = DataDir::new();
    let (child, line) = crate::common::spawn_first_line(
        Command::new(crate::common::bin())
            .args(["node", "--control", &server.base, "--token", &token, "--id", id])
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
            .stderr(Stdio::null()),
    );
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("agent: {line:?}"))
        .to_string();
    (Killed(child), addr, dir)
}

/// The cluster's part of the workload: a node fills up, a request waits in the queue and is placed
/// when room appears.
fn cluster_workload(server: &Server, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, nodes) = call(
            "GET",
            &format!("{}/v1/nodes", server.base),
            Some(&server.admin),
            None,
        );
        if nodes
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["id"] == node && n["state"] == "ready"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "node never ready: {nodes}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let create = |body: Value| {
        call(
            "POST",
            &format!("{}/v1/sandboxes", server.base),
            Some(&server.admin),
            Some(body),
        )
    };
    let one_cpu = json!({"resources": {"cpus": 1.0}});
    let (status, first) = create(one_cpu.clone());
    assert_eq!(status, 201, "{first}");
    let (status, second) = create(one_cpu.clone());
    assert_eq!(status, 201, "{second}");
    let (status, queued) = create(one_cpu);
    assert_eq!(status, 202, "{queued}");
    let queued = queued["id"].as_str().unwrap().to_string();
    let delete = |id: &str| {
        let (status, body) = call(
            "DELETE",
            &format!("{}/v1/sandboxes/{id}", server.base),
            Some(&server.admin),
            None,
        );
        assert_eq!(status, 200, "{body}");
    };
    delete(first["id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, item) = call(
            "GET",
            &format!("{}/v1/queue/{queued}", server.base),
            Some(&server.admin),
            None,
        );
        if item["state"] == "done" {
            break;
        }
        assert!(Instant::now() < deadline, "never dispatched: {item}");
        std::thread::sleep(Duration::from_millis(100));
    }
    delete(second["id"].as_str().unwrap());
    delete(&queued);
}

pub fn every_panel_has_data() {
    // Fail before starting anything when Prometheus is missing.
    prometheus_binary();
    let work = tempfile::tempdir().unwrap();
    let standalone_dir = DataDir::new();
    let standalone = Server::start_with(standalone_dir.path(), &[], &["--warm-pool", "1"]);
    let db = Database::new();
    let control_dir = DataDir::new();
    let control = Server::start_with(
        control_dir.path(),
        &[],
        &[
            "--database",
            &db.url,
            "--node-timeout",
            "2s",
            "--queue-depth",
            "4",
        ],
    );
    let (_agent, agent_addr, _agent_dir) = node_agent(&control, "obs-node");
    let strip = |base: &str| base.trim_start_matches("http://").to_string();
    let targets = [
        ("tartarus-standalone", strip(&standalone.base)),
        ("tartarus-control", strip(&control.base)),
        ("tartarus-node", agent_addr.clone()),
    ];
    let target_refs: Vec<(&str, &str)> = targets.iter().map(|(j, t)| (*j, t.as_str())).collect();
    let (_prometheus, prometheus) = start_prometheus(work.path(), &target_refs);
    workload::standalone(&standalone, standalone_dir.path());
    workload::egress(&standalone);
    cluster_workload(&control, "obs-node");
    // Rates need two samples of a series: poll (every scrape is a second) until every expression has
    // data; an expression Prometheus refuses fails at once.
    let expressions = expressions();
    assert!(expressions.len() >= 25, "{} expressions", expressions.len());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut empty = Vec::new();
        for (dashboard, panel, expr) in &expressions {
            match query(&prometheus, expr) {
                Ok(0) => empty.push(format!("{dashboard} / {panel}: {expr}")),
                Ok(_) => {}
                Err(e) => panic!("{dashboard} / {panel}: Prometheus refused {expr}: {e}"),
            }
        }
        if empty.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "panels without data after the workload:\n{}",
            empty.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every target was scraped as itself.
    assert_eq!(query(&prometheus, "up == 1"), Ok(3));
}
