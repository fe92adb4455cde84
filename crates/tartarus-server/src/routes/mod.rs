//! HTTP handlers, one module per area; [`router`] puts them together with the layers every route has.

pub mod audit;
pub mod blobs;
pub mod exec;
pub mod files;
pub mod health;
pub mod logs;
pub mod policies;
pub mod sandboxes;
pub mod templates;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::error::ApiError;
use crate::{cluster, gateway, metrics, records, AppState};

/// Largest request body (JSON) accepted.
pub const MAX_BODY: usize = 1 << 20;

/// The router with every route and layer.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(health::metrics_text))
        .route("/v1/openapi.json", get(crate::openapi::openapi))
        .route(
            "/v1/sandboxes",
            post(sandboxes::create_sandbox).get(sandboxes::list_sandboxes),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(sandboxes::get_sandbox).delete(sandboxes::delete_sandbox),
        )
        .route("/v1/sandboxes/{id}/exec", post(exec::exec_sandbox))
        .route("/v1/sandboxes/{id}/wait", post(sandboxes::wait_sandbox))
        .route("/v1/sandboxes/{id}/logs", get(logs::logs_sandbox))
        .route("/v1/audit", get(audit::list_audit))
        .route("/v1/events", get(policies::list_events))
        .route(
            "/v1/sandboxes/{id}/quarantine",
            post(policies::quarantine_sandbox),
        )
        .route(
            "/v1/policies",
            post(policies::apply_policy).get(policies::list_policies),
        )
        .route(
            "/v1/policies/{id}",
            get(policies::get_policy).delete(policies::delete_policy),
        )
        .route("/v1/policies/{id}/history", get(policies::policy_history))
        .route("/v1/policies/{id}/rollback", post(policies::rollback_policy))
        .route(
            "/v1/templates",
            post(templates::create_template).get(templates::list_templates),
        )
        .route(
            "/v1/templates/{id}",
            get(templates::get_template).delete(templates::delete_template),
        )
        .route(
            "/v1/blobs",
            axum::routing::put(blobs::put_blob).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/blobs/gc", post(blobs::gc_blobs))
        .route("/v1/blobs/{cid}", get(blobs::get_blob).delete(blobs::delete_blob))
        .route("/v1/tools", post(gateway::put_tool).get(gateway::list_tools))
        .route("/v1/tools/{name}", axum::routing::delete(gateway::delete_tool))
        .route("/v1/receipts", get(records::list_receipts))
        .route("/v1/receipts/{id}", get(records::get_receipt))
        .route("/v1/keys", get(records::public_keys))
        .route("/v1/keys/rotate", post(records::rotate_key))
        .route("/v1/episodes", get(records::list_episodes))
        .route("/v1/episodes/{id}", get(records::get_episode))
        .route("/v1/episodes/{id}/export", get(records::export_episode))
        .route(
            "/v1/episodes/{id}/signals",
            post(records::add_signal).get(records::list_signals),
        )
        .route(
            "/v1/evaluators",
            post(records::add_evaluator).get(records::list_evaluators),
        )
        .route(
            "/v1/datasets",
            post(records::build_dataset).get(records::list_datasets),
        )
        .route("/v1/sandboxes/{id}/trace", get(records::sandbox_trace))
        .route("/v1/nodes", get(cluster::list_nodes))
        .route("/v1/nodes/tokens", post(cluster::create_token))
        .route("/v1/nodes/{id}", axum::routing::delete(cluster::delete_node))
        .route("/v1/nodes/register", post(cluster::register))
        .route("/v1/nodes/{id}/heartbeat", post(cluster::heartbeat))
        .route("/v1/cluster", get(cluster::cluster_status))
        .route("/v1/node/sandboxes", post(cluster::create_node_sandbox))
        .route("/v1/queue", get(cluster::list_queue))
        .route("/v1/queue/{id}", get(cluster::get_queued))
        .route("/v1/sandboxes/{id}/pause", post(sandboxes::pause_sandbox))
        .route("/v1/sandboxes/{id}/resume", post(sandboxes::resume_sandbox))
        .route(
            "/v1/sandboxes/{id}/files",
            get(files::get_file)
                .put(files::put_file)
                .layer(DefaultBodyLimit::max(files::MAX_FILE)),
        )
        .fallback(|| async { ApiError::not_found("no such route; see /v1/openapi.json") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::internal(
                "internal error (a bug: please report)",
            ))
        }))
        .with_state(state)
}
