//! Observability end to end against real servers: every metric is recorded when its action happens and
//! `/metrics` shows only catalogued series with allowed labels and no tenant data; `--log-format json`
//! gives one JSON object a line with the sandbox, tenant, lane and node; and every panel of the Grafana
//! dashboards in deploy/grafana/ has data in a real Prometheus scraping a real server and node agent
//! (Debian's `prometheus`; needs PostgreSQL for the cluster part, as tests/cluster.rs).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;
#[path = "observability/dashboards.rs"]
mod dashboards;
#[path = "observability/workload.rs"]
mod workload;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::server::{call, create, DataDir, Server};
use serde_json::{json, Value};
use tartarus_server::metrics::catalogue;
use workload::{scrape, value};

/// Every `tartarus_` series in `text` belongs to a catalogued metric and carries only its declared
/// labels; nothing names the workload's tenant or tool.
fn assert_only_catalogued(text: &str) {
    for line in text.lines().filter(|l| l.starts_with("tartarus_")) {
        let (series, _) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let metric = catalogue::find(name)
            .unwrap_or_else(|| panic!("{name} is not in the metric catalogue (metrics/catalogue.rs)"));
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let label = pair.split_once('=').unwrap().0;
            let declared = metric.labels.contains(&label) || (label == "le" && name.ends_with("_bucket"));
            assert!(declared, "{name} has the undeclared label {label}: {line}");
        }
    }
    for secret in [workload::TENANT, workload::TOOL] {
        assert!(!text.contains(secret), "/metrics names {secret}");
    }
}

#[test]
fn every_operation_is_recorded_and_metrics_show_only_catalogued_series() {
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--warm-pool", "1"]);
    let before = scrape(&server.base);
    assert_only_catalogued(&before);
    // Help texts come from the catalogue.
    assert!(
        before.contains(&format!(
            "# HELP {} {}",
            catalogue::BY_STATE.name,
            catalogue::BY_STATE.help
        )),
        "{before}"
    );
    workload::standalone(&server, dir.path());
    let text = scrape(&server.base);
    assert_only_catalogued(&text);
    let at_least = |series: &str, n: f64| {
        let got = value(&text, series);
        assert!(
            got.is_some_and(|v| v >= n),
            "{series} is {got:?}, wanted at least {n}:\n{text}"
        );
    };
    for operation in ["create", "exec", "pause", "resume", "delete"] {
        at_least(
            &format!(
                "tartarus_sandbox_operation_duration_seconds_count{{operation=\"{operation}\",lane=\"process\",outcome=\"ok\"}}"
            ),
            1.0,
        );
    }
    at_least("tartarus_sandbox_launch_duration_seconds_count", 4.0);
    at_least(
        "tartarus_pool_claims_total{template=\"none\",outcome=\"hit\"}",
        1.0,
    );
    at_least(
        "tartarus_pool_claims_total{template=\"none\",outcome=\"miss\"}",
        1.0,
    );
    at_least("tartarus_pool_target_sandboxes{template=\"none\"}", 1.0);
    at_least(
        "tartarus_admission_decisions_total{judge=\"security\",verdict=\"reject\"}",
        1.0,
    );
    at_least(
        "tartarus_admission_decisions_total{judge=\"defaults\",verdict=\"accept\"}",
        4.0,
    );
    at_least("tartarus_events_total{category=\"admission\"}", 1.0);
    at_least("tartarus_events_total{category=\"enforcement\"}", 1.0);
    at_least("tartarus_enforcement_actions_total{kind=\"timeout.kill\"}", 1.0);
    at_least("tartarus_dead_letters_total{kind=\"start.failed\"}", 1.0);
    at_least(
        "tartarus_sandbox_total{template=\"none\",status=\"failed\",lane=\"process\"}",
        1.0,
    );
    at_least(
        "tartarus_sandbox_total{template=\"none\",status=\"killed\",lane=\"process\"}",
        4.0,
    );
    at_least("tartarus_tool_calls_total{status=\"ok\"}", 1.0);
    at_least("tartarus_ledger_outcomes_total{outcome=\"replay\"}", 1.0);
    at_least("tartarus_ledger_outcomes_total{outcome=\"divergence\"}", 1.0);
    at_least("tartarus_blob_store_bytes", 5000.0);
    at_least("tartarus_http_request_duration_seconds_count", 1.0);
    // Every sandbox has ended: the live gauges say so (present, at zero).
    assert_eq!(value(&text, "tartarus_sandbox_active_count"), Some(0.0), "{text}");
    assert_eq!(
        value(&text, "tartarus_sandboxes{state=\"running\",lane=\"process\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "tartarus_queue_depth{lane=\"main\"}"),
        Some(0.0),
        "{text}"
    );
}

#[test]
fn sandboxes_by_state_follow_pause_and_resume() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let id = create(&server, &server.admin, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let running = "tartarus_sandboxes{state=\"running\",lane=\"process\"}";
    let paused = "tartarus_sandboxes{state=\"paused\",lane=\"process\"}";
    let text = scrape(&server.base);
    assert_eq!(
        (value(&text, running), value(&text, paused)),
        (Some(1.0), Some(0.0)),
        "{text}"
    );
    let post = |op: &str| {
        let (status, body) = call(
            "POST",
            &format!("{}/v1/sandboxes/{id}/{op}", server.base),
            Some(&server.admin),
            None,
        );
        assert_eq!(status, 200, "{body}");
    };
    post("pause");
    let text = scrape(&server.base);
    assert_eq!(
        (value(&text, running), value(&text, paused)),
        (Some(0.0), Some(1.0)),
        "{text}"
    );
    post("resume");
    let text = scrape(&server.base);
    assert_eq!(
        (value(&text, running), value(&text, paused)),
        (Some(1.0), Some(0.0)),
        "{text}"
    );
}

#[test]
fn json_logs_carry_the_sandbox_tenant_lane_and_node() {
    let dir = DataDir::new();
    let mut server = Server::start_with(dir.path(), &[], &["--log-format", "json"]);
    let stderr = server.child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let id = create(&server, &server.admin, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let mut wanted: Vec<&str> = vec!["sandbox running", "sandbox ended"];
    while !wanted.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log lines for {wanted:?} in time; saw:\n{}", seen.join("\n")));
        let record: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(
            record["timestamp"].is_string() && record["level"].is_string(),
            "{line}"
        );
        if record["sandbox"] == id.as_str() {
            let message = record["message"].as_str().unwrap_or_default().to_string();
            if let Some(i) = wanted.iter().position(|w| *w == message) {
                assert_eq!(record["tenant"], "admin", "{line}");
                assert_eq!(record["lane"], "process", "{line}");
                assert!(record["node"].as_str().is_some_and(|n| !n.is_empty()), "{line}");
                wanted.remove(i);
            }
        }
        seen.push(line);
    }
}

#[test]
fn dashboards_are_well_formed_and_generated() {
    dashboards::check_all_structure();
    dashboards::check_generated();
}

#[test]
fn every_dashboard_panel_has_data_in_a_real_prometheus() {
    dashboards::every_panel_has_data();
}
