//! The OpenAPI document (`GET /v1/openapi.json`), generated from the handlers' annotations.

use axum::Json;
use utoipa::OpenApi;

use crate::api::{CreateSandbox, ExecBody, ExecResult, SandboxView};
use crate::error::ErrorBody;
use crate::routes::{audit, blobs, exec, files, health, logs, policies, sandboxes, templates};
use crate::{api, cluster, gateway, records};

#[derive(OpenApi)]
#[openapi(
    info(title = "Tartarus API", version = "1"),
    paths(sandboxes::create_sandbox, sandboxes::list_sandboxes, sandboxes::get_sandbox, sandboxes::delete_sandbox,
          exec::exec_sandbox, sandboxes::wait_sandbox, health::healthz,
          files::put_file, files::get_file, logs::logs_sandbox, sandboxes::pause_sandbox, sandboxes::resume_sandbox,
          audit::list_audit,
          templates::create_template, templates::list_templates, templates::get_template,
          templates::delete_template, policies::apply_policy, policies::list_policies, policies::get_policy,
          policies::delete_policy, policies::policy_history, policies::rollback_policy, policies::list_events,
          policies::quarantine_sandbox, blobs::put_blob, blobs::get_blob, blobs::delete_blob, blobs::gc_blobs,
          gateway::put_tool, gateway::list_tools, gateway::delete_tool, records::list_receipts,
          records::get_receipt, records::list_episodes, records::get_episode, records::export_episode,
          records::add_evaluator, records::list_evaluators, records::add_signal, records::list_signals,
          records::build_dataset, records::list_datasets, cluster::register, cluster::heartbeat,
          cluster::list_nodes, cluster::create_token, cluster::cluster_status,
          cluster::list_queue, cluster::get_queued, cluster::delete_node),
    components(schemas(CreateSandbox, SandboxView, ExecBody, ExecResult, ErrorBody, api::Resources, files::DirEntry,
                       templates::CreateTemplate, templates::TemplateView,
                       policies::ApplyPolicy, policies::PolicyView, policies::Rollback, blobs::BlobPut,
                       blobs::GcView, gateway::ToolDefinition, records::ReceiptView, records::EpisodeView,
                       records::AddEvaluator, records::SignalView, records::DatasetView,
                       cluster::NodeReport, cluster::Heartbeat, cluster::Registration, cluster::NodeView,
                       cluster::CreateNodeToken)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub(crate) async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
