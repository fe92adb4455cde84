//! Every metric Tartarus exports, in one list: its name, type, help text, label names and where it is
//! measured. Code records metrics only by these definitions (`metrics::counter!(EVENTS.name, …)`), the
//! recorder is given each help text at install, and `docs/metrics.md` is generated from [`ALL`] (a test
//! fails when it differs), so the documentation cannot drift from what `/metrics` shows.
//!
//! Labels name lanes, nodes, template classes, states and outcomes — never a tenant or anything a tenant
//! names (`/metrics` needs no key; see [`ALLOWED_LABELS`]).

/// How Prometheus reads a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Where a metric's value comes from, which decides whose `/metrics` to read it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Measured by each server process about its own work: a node agent's server reports the sandboxes
    /// it runs, the control plane the requests it serves.
    Process,
    /// Read from the shared store at each scrape: the same cluster-wide value on every replica.
    Cluster,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Process => "each server",
            Scope::Cluster => "cluster (store)",
        }
    }
}

/// One exported metric.
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Label names, in the order code passes them.
    pub labels: &'static [&'static str],
    pub scope: Scope,
}

const fn metric(
    name: &'static str,
    kind: Kind,
    scope: Scope,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        help,
        labels,
        scope,
    }
}

use Kind::{Counter, Gauge, Histogram};
use Scope::{Cluster, Process};

pub const LAUNCH_DURATION: Metric = metric(
    "tartarus_sandbox_launch_duration_seconds",
    Histogram,
    Process,
    &["template", "node", "lane"],
    "Time from a create request reaching this server until its sandbox runs here (warm-pool claims included).",
);
pub const OPERATION_DURATION: Metric = metric(
    "tartarus_sandbox_operation_duration_seconds",
    Histogram,
    Process,
    &["operation", "lane", "outcome"],
    "Latency of sandbox operations through the API (create, exec, pause, resume, delete), forwarding to a node included; outcome ok or error.",
);
pub const ACTIVE: Metric = metric(
    "tartarus_sandbox_active_count",
    Gauge,
    Cluster,
    &[],
    "Sandboxes starting or running now.",
);
pub const BY_STATE: Metric = metric(
    "tartarus_sandboxes",
    Gauge,
    Cluster,
    &["state", "lane"],
    "Live sandboxes by state (starting, running, paused) and lane.",
);
pub const TOTAL: Metric = metric(
    "tartarus_sandbox_total",
    Counter,
    Process,
    &["template", "status", "lane"],
    "Sandboxes that ended here, by final status (exited, killed, lost), and failed starts (failed).",
);
pub const POOL_READY: Metric = metric(
    "tartarus_pool_ready_sandboxes",
    Gauge,
    Process,
    &["template"],
    "Warm sandboxes waiting in this server's pools (template: the plain pool is none, template pools template).",
);
pub const POOL_TARGET: Metric = metric(
    "tartarus_pool_target_sandboxes",
    Gauge,
    Process,
    &["template"],
    "How many warm sandboxes this server's pools are configured to hold.",
);
pub const POOL_CLAIMS: Metric = metric(
    "tartarus_pool_claims_total",
    Counter,
    Process,
    &["template", "outcome"],
    "Creates that could use a warm pool: outcome hit (a warm sandbox was handed out) or miss (the pool was empty; started cold).",
);
pub const ADMISSION_DECISIONS: Metric = metric(
    "tartarus_admission_decisions_total",
    Counter,
    Process,
    &["judge", "verdict"],
    "Admission judges' verdicts on create requests: each judge that ran, accept or reject.",
);
pub const ENFORCEMENT_ACTIONS: Metric = metric(
    "tartarus_enforcement_actions_total",
    Counter,
    Process,
    &["kind"],
    "What the enforcement loop and the sandboxes' limits did, by event kind (resources.throttle, network.kill, timeout.kill, resources.oom, …).",
);
pub const NETWORK_CONTRACTS: Metric = metric(
    "tartarus_network_contracts_active",
    Gauge,
    Cluster,
    &["lane"],
    "Live sandboxes with an egress network contract.",
);
pub const PACKETS_BLOCKED: Metric = metric(
    "tartarus_network_packets_blocked_total",
    Counter,
    Process,
    &["lane"],
    "Packets the egress contracts of this server's sandboxes dropped, as the enforcement loop read them.",
);
pub const QUEUE_DEPTH: Metric = metric(
    "tartarus_queue_depth",
    Gauge,
    Cluster,
    &["lane"],
    "Create requests waiting in the queue for room on a node, by queue lane.",
);
pub const QUEUE_WAIT: Metric = metric(
    "tartarus_queue_wait_duration_seconds",
    Histogram,
    Process,
    &["lane"],
    "Time queued requests waited until they were placed, by queue lane.",
);
pub const DEAD_LETTERS: Metric = metric(
    "tartarus_dead_letters_total",
    Counter,
    Process,
    &["kind"],
    "Requests given up on: start.failed (a sandbox did not start), queue.dead (a queued request cannot be placed).",
);
pub const EVENTS: Metric = metric(
    "tartarus_events_total",
    Counter,
    Process,
    &["category"],
    "Events recorded in the event stream, by category (lifecycle, admission, enforcement, cluster, dead_letter, effects, …).",
);
pub const TOOL_CALLS: Metric = metric(
    "tartarus_tool_calls_total",
    Counter,
    Process,
    &["status"],
    "Tool invocations through the gateway, each with a signed receipt, by receipt status (ok, failed, error).",
);
pub const LEDGER_OUTCOMES: Metric = metric(
    "tartarus_ledger_outcomes_total",
    Counter,
    Process,
    &["outcome"],
    "Tool calls answered from the idempotency ledger (replay) or refused as divergent (divergence).",
);
pub const BLOB_BYTES: Metric = metric(
    "tartarus_blob_store_bytes",
    Gauge,
    Process,
    &[],
    "Bytes of blob data in this server's blob store (outboards not counted).",
);
pub const NODES: Metric = metric(
    "tartarus_nodes",
    Gauge,
    Cluster,
    &["state"],
    "Registered cluster nodes by state.",
);
pub const NODE_CAPACITY: Metric = metric(
    "tartarus_node_capacity",
    Gauge,
    Cluster,
    &["node", "resource"],
    "What each node reported it offers: resource cpu_millis, memory_bytes or gpus.",
);
pub const NODE_USAGE: Metric = metric(
    "tartarus_node_usage",
    Gauge,
    Cluster,
    &["node", "resource"],
    "What each node's last heartbeat reported in use: resource cpu_millis, memory_bytes or gpus.",
);
pub const RESTORE_DURATION: Metric = metric(
    "tartarus_snapshot_restore_duration_seconds",
    Histogram,
    Process,
    &["lane", "node"],
    "Time from a resume (or fork) until a sandbox restored from a sealed snapshot runs: the snapshot checked, the shim started, the lane's restore done.",
);
pub const SNAPSHOT_BYTES: Metric = metric(
    "tartarus_snapshot_bytes",
    Histogram,
    Process,
    &["lane"],
    "Size of each snapshot a pause to disk sealed (every part together, as stored).",
);
pub const REQUEST_DURATION: Metric = metric(
    "tartarus_http_request_duration_seconds",
    Histogram,
    Process,
    &["method", "route", "status"],
    "API request latency by method, route template and status.",
);

/// Every metric, in the order docs/metrics.md lists them.
pub const ALL: &[&Metric] = &[
    &LAUNCH_DURATION,
    &OPERATION_DURATION,
    &ACTIVE,
    &BY_STATE,
    &TOTAL,
    &POOL_READY,
    &POOL_TARGET,
    &POOL_CLAIMS,
    &ADMISSION_DECISIONS,
    &ENFORCEMENT_ACTIONS,
    &NETWORK_CONTRACTS,
    &PACKETS_BLOCKED,
    &QUEUE_DEPTH,
    &QUEUE_WAIT,
    &DEAD_LETTERS,
    &EVENTS,
    &TOOL_CALLS,
    &LEDGER_OUTCOMES,
    &BLOB_BYTES,
    &NODES,
    &NODE_CAPACITY,
    &NODE_USAGE,
    &RESTORE_DURATION,
    &SNAPSHOT_BYTES,
    &REQUEST_DURATION,
];

/// The label names a metric may carry on the unauthenticated `/metrics`: none of them holds a tenant id,
/// a template or tool name a tenant chose, or a secret.
pub const ALLOWED_LABELS: &[&str] = &[
    "template",
    "node",
    "lane",
    "operation",
    "outcome",
    "status",
    "state",
    "judge",
    "verdict",
    "kind",
    "category",
    "resource",
    "method",
    "route",
];

/// The metric `name` (a series name: a histogram's `_bucket`, `_sum` and `_count` belong to it).
pub fn find(name: &str) -> Option<&'static Metric> {
    ALL.iter().copied().find(|m| {
        m.name == name
            || (m.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name.strip_suffix(suffix) == Some(m.name)))
    })
}

/// Gives the installed recorder every metric's help text (Prometheus `# HELP`).
pub fn describe_all() {
    for m in ALL {
        match m.kind {
            Counter => metrics::describe_counter!(m.name, m.help),
            Gauge => metrics::describe_gauge!(m.name, m.help),
            Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// The command that rewrites docs/metrics.md from [`ALL`].
pub const REGENERATE: &str = "TARTARUS_WRITE_METRICS_DOC=1 cargo test -p tartarus-server metrics_doc";

/// docs/metrics.md as [`ALL`] defines it.
pub fn markdown() -> String {
    let mut out = String::from(
        "# Metrics\n\n\
         <!-- Generated from crates/tartarus-server/src/metrics/catalogue.rs; do not edit. -->\n\
         <!-- Regenerate: ",
    );
    out.push_str(REGENERATE);
    out.push_str(
        " -->\n\n\
         Every server serves these in Prometheus text format at `GET /metrics` (no key: serve it where only \
         scrapers reach). A node agent's server reports the sandboxes it runs (scope *each server*); values \
         read from the shared store (scope *cluster*) are the same on every replica, so scrape them from one. \
         No label names a tenant, a template or tool a tenant named, or a secret: `template` says only \
         whether a sandbox came from a template (`template`) or not (`none`). Per-tenant detail is in the \
         API behind a key (events, audit, receipts).\n\n\
         Dashboards over these metrics are in `deploy/grafana/` (deploy/grafana/README.md).\n\n\
         | metric | type | labels | scope | meaning |\n\
         | --- | --- | --- | --- | --- |\n",
    );
    for m in ALL {
        let labels = match m.labels {
            [] => "—".to_string(),
            labels => labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            m.name,
            m.kind.as_str(),
            labels,
            m.scope.as_str(),
            m.help
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_doc_is_generated_from_the_catalogue() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/metrics.md");
        let want = markdown();
        if std::env::var_os("TARTARUS_WRITE_METRICS_DOC").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/metrics.md differs from the metric catalogue; regenerate it with:\n    {REGENERATE}"
        );
    }

    #[test]
    fn names_are_unique_prometheus_style_and_labels_never_name_tenants() {
        let mut names = std::collections::BTreeSet::new();
        for m in ALL {
            assert!(names.insert(m.name), "{} is listed twice", m.name);
            assert!(m.name.starts_with("tartarus_"), "{}", m.name);
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "counters and only counters end in _total: {}",
                m.name
            );
            if m.kind == Kind::Histogram {
                // In base units: seconds or bytes.
                assert!(
                    m.name.ends_with("_seconds") || m.name.ends_with("_bytes"),
                    "{}",
                    m.name
                );
            }
            for label in m.labels {
                assert!(ALLOWED_LABELS.contains(label), "{} has label {label}", m.name);
            }
        }
        assert!(!ALLOWED_LABELS.contains(&"tenant"));
    }

    #[test]
    fn histogram_series_belong_to_their_metric() {
        assert_eq!(
            find("tartarus_queue_wait_duration_seconds_bucket").map(|m| m.name),
            Some(QUEUE_WAIT.name)
        );
        assert!(find("tartarus_queue_depth_bucket").is_none());
        assert!(find("tartarus_nothing").is_none());
    }
}
