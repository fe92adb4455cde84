//! Prometheus metrics (`GET /metrics`). Names follow the design map.
//!
//! `/metrics` needs no key, so no label names a tenant's objects: no template ids (tenants name their
//! own), no tool names; per-tenant detail is in the API (events, audit, receipts) behind a key.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Time from the create request until the sandbox runs.
pub const LAUNCH_DURATION: &str = "tartarus_sandbox_launch_duration_seconds";
/// Sandboxes starting or running now.
pub const ACTIVE: &str = "tartarus_sandbox_active_count";
/// Sandboxes by final status (and failed starts).
pub const TOTAL: &str = "tartarus_sandbox_total";
/// Tool invocations through the gateway, by receipt status (ok, failed, error).
pub const TOOL_CALLS: &str = "tartarus_tool_calls_total";
/// Tool calls answered from the idempotency ledger (replays) or refused as divergent, by outcome.
pub const LEDGER_OUTCOMES: &str = "tartarus_ledger_outcomes_total";
/// Time from a resume request until a sandbox paused to disk runs again from its snapshot.
pub const RESTORE_DURATION: &str = "tartarus_snapshot_restore_duration_seconds";
/// Size of each snapshot a pause to disk sealed.
pub const SNAPSHOT_BYTES: &str = "tartarus_snapshot_bytes";
/// API request latency.
pub const REQUEST_DURATION: &str = "tartarus_http_request_duration_seconds";

const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide recorder; `None` if one is already installed. Must be called inside a
/// Tokio runtime: it spawns the upkeep task that folds histogram samples into their buckets. The
/// recorder keeps every sample until then, so without it a server nobody scrapes grows with every
/// request.
pub fn install() -> Option<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .ok()?
        .install_recorder()
        .ok()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Some(handle)
}

/// The `template` label: whether a sandbox came from a template (`template`) or not (`none`), never which.
pub fn template_label(template: Option<&str>) -> &'static str {
    match template {
        Some(_) => "template",
        None => "none",
    }
}

/// This machine's name, the `node` label.
pub fn node_name() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

/// Records every request's latency by method, route template and status.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(REQUEST_DURATION, "method" => method, "route" => route, "status" => status)
        .record(started.elapsed().as_secs_f64());
    response
}
