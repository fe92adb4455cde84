//! HTTP handlers, one module per area; [`router`] puts them together with the layers every route has.

pub mod audit;
pub mod blobs;
pub mod datasets;
pub mod episodes;
pub mod evaluators;
pub mod exec;
pub mod files;
pub mod health;
pub mod keys;
pub mod logs;
pub mod nodes;
pub mod policies;
pub mod ports;
pub mod projects;
pub mod queue;
pub mod receipts;
pub mod runtimes;
pub mod sandboxes;
pub mod signals;
pub mod snapshots;
pub mod tasks;
pub mod templates;
pub mod tools;
pub mod usage;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::error::ApiError;
use crate::{metrics, AppState};

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
        .route(
            "/v1/projects",
            post(projects::create_project).get(projects::list_projects),
        )
        .route(
            "/v1/projects/{id}",
            get(projects::get_project).delete(projects::delete_project),
        )
        .route("/v1/tasks", post(tasks::create_task).get(tasks::list_tasks))
        .route("/v1/tasks/{id}", get(tasks::get_task))
        .route("/v1/tasks/{id}/logs", get(tasks::task_logs))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel_task))
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
        .route("/v1/policies/effective", get(policies::effective_policy))
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
        .merge(tools::routes())
        .merge(receipts::routes())
        .merge(keys::routes())
        .merge(episodes::routes())
        .merge(signals::routes())
        .merge(evaluators::routes())
        .merge(datasets::routes())
        .merge(nodes::routes())
        .merge(queue::routes())
        .merge(runtimes::routes())
        .merge(ports::routes())
        .merge(usage::routes())
        .merge(crate::ui::routes())
        .route("/v1/sandboxes/{id}/pause", post(sandboxes::pause_sandbox))
        .route("/v1/sandboxes/{id}/fork", post(snapshots::fork_sandbox))
        .route("/v1/snapshots", get(snapshots::list_snapshots))
        .route("/v1/sandboxes/{id}/resume", post(sandboxes::resume_sandbox))
        .route("/v1/sandboxes/{id}/timeout", post(sandboxes::set_timeout))
        .route(
            "/v1/sandboxes/{id}/files",
            get(files::get_file)
                .put(files::put_file)
                .layer(DefaultBodyLimit::max(files::MAX_FILE)),
        )
        .nest(crate::e2b::PREFIX, crate::e2b::routes(state.clone()))
        // The E2B SDK builds signed file URLs on the server's root (see `e2b::traffic::signed_files`).
        .route(
            "/files",
            get(crate::e2b::traffic::signed_files)
                .post(crate::e2b::traffic::signed_files)
                .layer(DefaultBodyLimit::disable()),
        )
        .fallback(|| async { ApiError::not_found("no such route; see /v1/openapi.json") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        // E2B's sandbox host names (`--sandbox-domain`) before any route.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::e2b::traffic::route_sandbox_hosts,
        ))
        .layer(axum::middleware::map_response(crate::error::json_client_errors))
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::internal(
                "internal error (a bug: please report)",
            ))
        }))
        .with_state(state)
}
