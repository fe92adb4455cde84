//! Prometheus metrics (`GET /metrics`): the recorder, the request-latency layer and the label helpers.
//! Every metric is defined once in [`catalogue`] (docs/metrics.md is generated from it); the values read
//! from the store at each scrape are in `scrape.rs`.
//!
//! `/metrics` needs no key, so no label names a tenant's objects: no template ids (tenants name their
//! own), no tool names; per-tenant detail is in the API (events, audit, receipts) behind a key.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub mod catalogue;
mod scrape;

pub use self::catalogue::*;
pub use self::scrape::refresh;

const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How long a gauge no scrape has set stays in `/metrics`.
const GAUGE_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

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
        // Scrape-time gauges are set at every scrape; one not set for this long (a removed node's) is gone.
        .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(GAUGE_IDLE))
        .install_recorder()
        .ok()?;
    catalogue::describe_all();
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
    metrics::histogram!(REQUEST_DURATION.name, "method" => method, "route" => route, "status" => status)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Counts a recorded event: by category, and as an enforcement action or a dead letter when it is one.
/// Call it once the event is stored.
pub fn event_recorded(event: &tartarus_store::NewEvent<'_>) {
    metrics::counter!(EVENTS.name, "category" => event.category.to_string()).increment(1);
    match event.category {
        "enforcement" => {
            metrics::counter!(ENFORCEMENT_ACTIONS.name, "kind" => event.kind.to_string()).increment(1)
        }
        "dead_letter" => metrics::counter!(DEAD_LETTERS.name, "kind" => event.kind.to_string()).increment(1),
        _ => {}
    }
}

/// Records one sandbox operation's latency (`operation`: create, exec, pause, resume, delete).
pub fn operation(operation: &'static str, lane: &str, ok: bool, started: Instant) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::histogram!(OPERATION_DURATION.name, "operation" => operation, "lane" => lane.to_string(), "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}
