#!/usr/bin/env python3
"""Writes the Grafana dashboards in deploy/grafana/dashboards/ from the panel lists below.

Edit the lists here and run `python3 deploy/grafana/generate.py`; commit both. Every expression uses only
metrics from crates/tartarus-server/src/metrics/catalogue.rs (docs/metrics.md), and
crates/tartarus-cli/tests/observability.rs evaluates every one of them in a real Prometheus scraping a real
server and node agent, failing if one errors or has no data.
"""
import json
import os
import sys

DATASOURCE = {"type": "prometheus", "uid": "tartarus-prometheus"}
R = "5m"  # rate window

# (title, panel type, unit, [(expr, legend)], description)
DASHBOARDS = {
    "control-plane": ("Tartarus: control-plane health", [
        ("Scrape targets up", "stat", "none", [("sum by (job) (up{job=~\"tartarus.*\"})", "{{job}}")],
         "Tartarus servers Prometheus reaches, by job."),
        ("Live sandboxes", "stat", "none", [("tartarus_sandbox_active_count", "live")],
         "Sandboxes starting or running (cluster view from the store)."),
        ("Sandboxes by state", "timeseries", "none", [("sum by (state) (tartarus_sandboxes)", "{{state}}")],
         "Live sandboxes: starting, running, paused."),
        ("API requests by status", "timeseries", "reqps",
         [(f"sum by (status) (rate(tartarus_http_request_duration_seconds_count[{R}]))", "{{status}}")],
         "Requests per second by HTTP status; 5xx are the server's faults."),
        ("API latency p95 by route", "timeseries", "s",
         [(f"histogram_quantile(0.95, sum by (le, route) (rate(tartarus_http_request_duration_seconds_bucket[{R}])))", "{{route}}")],
         "95th percentile request latency per route template."),
        ("Events by category", "timeseries", "ops",
         [(f"sum by (category) (rate(tartarus_events_total[{R}]))", "{{category}}")],
         "Events recorded in the event stream per second."),
    ]),
    "lanes-templates": ("Tartarus: lanes and templates", [
        ("Launch latency", "heatmap", "s",
         [(f"sum by (le) (rate(tartarus_sandbox_launch_duration_seconds_bucket[{R}]))", "{{le}}")],
         "Time from a create request to a running sandbox, all lanes (heatmap of the histogram's buckets)."),
        ("Launch latency p95 by lane and template", "timeseries", "s",
         [(f"histogram_quantile(0.95, sum by (le, lane, template) (rate(tartarus_sandbox_launch_duration_seconds_bucket[{R}])))", "{{lane}} {{template}}")],
         "template: whether the sandbox came from a template, never which."),
        ("Operation latency p95", "timeseries", "s",
         [(f"histogram_quantile(0.95, sum by (le, operation) (rate(tartarus_sandbox_operation_duration_seconds_bucket[{R}])))", "{{operation}}")],
         "create, exec, pause, resume, delete through the API."),
        ("Operation errors", "timeseries", "ops",
         [(f"sum by (operation, outcome) (rate(tartarus_sandbox_operation_duration_seconds_count[{R}]))", "{{operation}} {{outcome}}")],
         "Operations per second by outcome."),
        ("Warm-pool hit rate", "stat", "percentunit",
         [(f"sum(rate(tartarus_pool_claims_total{{outcome=\"hit\"}}[{R}])) / sum(rate(tartarus_pool_claims_total[{R}]))", "hit rate")],
         "Share of poolable creates served by a warm sandbox."),
        ("Warm pools: ready and target", "timeseries", "none",
         [("sum by (template) (tartarus_pool_ready_sandboxes)", "ready {{template}}"),
          ("sum by (template) (tartarus_pool_target_sandboxes)", "target {{template}}")],
         "Warm sandboxes waiting, against what the pools are configured to hold."),
        ("Sandboxes ended by lane and status", "timeseries", "none",
         [("sum by (lane, status) (increase(tartarus_sandbox_total[1h]))", "{{lane}} {{status}}")],
         "Ends in the last hour; failed are starts that did not happen."),
    ]),
    "enforcement-network": ("Tartarus: enforcement and network", [
        ("Admission verdicts by judge", "timeseries", "ops",
         [(f"sum by (judge, verdict) (rate(tartarus_admission_decisions_total[{R}]))", "{{judge}} {{verdict}}")],
         "Each judge that ran on a create request and what it said."),
        ("Enforcement actions (1h)", "bargauge", "none",
         [("sum by (kind) (increase(tartarus_enforcement_actions_total[1h]))", "{{kind}}")],
         "Throttles, kills, quarantines, timeouts and OOM kills in the last hour."),
        ("Network contracts active", "timeseries", "none",
         [("sum by (lane) (tartarus_network_contracts_active)", "{{lane}}")],
         "Live sandboxes with an egress contract."),
        ("Packets blocked", "timeseries", "pps",
         [(f"sum by (lane) (rate(tartarus_network_packets_blocked_total[{R}]))", "{{lane}}")],
         "Packets the egress contracts dropped."),
    ]),
    "queue-scheduler": ("Tartarus: queue and scheduler", [
        ("Queue depth by lane", "timeseries", "none", [("sum by (lane) (tartarus_queue_depth)", "{{lane}}")],
         "Create requests waiting for room on a node."),
        ("Queue wait p95 by lane", "timeseries", "s",
         [(f"histogram_quantile(0.95, sum by (le, lane) (rate(tartarus_queue_wait_duration_seconds_bucket[{R}])))", "{{lane}}")],
         "How long placed requests waited."),
        ("Placed from the queue", "timeseries", "ops",
         [(f"sum by (lane) (rate(tartarus_queue_wait_duration_seconds_count[{R}]))", "{{lane}}")],
         "Queued requests placed per second."),
        ("Dead letters (1h)", "bargauge", "none",
         [("sum by (kind) (increase(tartarus_dead_letters_total[1h]))", "{{kind}}")],
         "Requests given up on: start failures and queued requests that cannot be placed."),
        ("Nodes by state", "stat", "none", [("sum by (state) (tartarus_nodes)", "{{state}}")],
         "Registered nodes: ready, unreachable, draining."),
    ]),
    "capacity": ("Tartarus: capacity per node", [
        ("CPU in use per node", "heatmap", "percentunit",
         [("sum by (node) (tartarus_node_usage{resource=\"cpu_millis\"}) / sum by (node) (tartarus_node_capacity{resource=\"cpu_millis\"})", "{{node}}")],
         "Share of each node's CPUs its last heartbeat reported in use (one row per node)."),
        ("Memory in use per node", "heatmap", "percentunit",
         [("sum by (node) (tartarus_node_usage{resource=\"memory_bytes\"}) / sum by (node) (tartarus_node_capacity{resource=\"memory_bytes\"})", "{{node}}")],
         "Share of each node's memory in use (one row per node)."),
        ("Capacity", "table", "none",
         [("sum by (node, resource) (tartarus_node_capacity)", "{{node}} {{resource}}")],
         "What each node offers."),
        ("Launches per machine", "timeseries", "ops",
         [(f"sum by (node) (rate(tartarus_sandbox_launch_duration_seconds_count[{R}]))", "{{node}}")],
         "Sandboxes started per second by the machine that runs them (host name)."),
    ]),
    "effects": ("Tartarus: effects", [
        ("Tool calls by receipt status", "timeseries", "ops",
         [(f"sum by (status) (rate(tartarus_tool_calls_total[{R}]))", "{{status}}")],
         "Tool invocations through the gateway, each with a signed receipt."),
        ("Ledger outcomes (1h)", "bargauge", "none",
         [("sum by (outcome) (increase(tartarus_ledger_outcomes_total[1h]))", "{{outcome}}")],
         "Replays answered from the idempotency ledger and divergent repeats refused."),
        ("Blob store", "stat", "bytes", [("sum(tartarus_blob_store_bytes)", "bytes")],
         "Blob data stored, all servers."),
        ("Effects and enforcement events (1h)", "bargauge", "none",
         [("sum by (category) (increase(tartarus_events_total[1h]))", "{{category}}")],
         "Events recorded in the last hour by category."),
    ]),
}


def panel(i, title, kind, unit, targets, description):
    p = {
        "id": i + 1,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + j), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
             **({"format": "heatmap"} if kind == "heatmap" and "le" in legend else {})}
            for j, (expr, legend) in enumerate(targets)
        ],
    }
    if kind == "table":
        p["targets"][0]["instant"] = True
        p["targets"][0]["format"] = "table"
    return p


def dashboard(uid, title, panels):
    return {
        "uid": f"tartarus-{uid}",
        "title": title,
        "tags": ["tartarus"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [],
        "panels": [panel(i, *p) for i, p in enumerate(panels)],
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    # An output directory other than dashboards/ (the drift test writes to a temporary one).
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "dashboards")
    for uid, (title, panels) in DASHBOARDS.items():
        path = os.path.join(out, f"{uid}.json")
        with open(path, "w") as f:
            json.dump(dashboard(uid, title, panels), f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
