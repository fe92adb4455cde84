//! The OpenAPI document (`GET /v1/openapi.json`), generated from the handlers' annotations.

use axum::Json;
use utoipa::OpenApi;

use crate::api::{CreateSandbox, ExecBody, ExecResult, SandboxView};
use crate::error::ErrorBody;
use crate::routes::{audit, blobs, exec, files, health, logs, policies, sandboxes, templates};
use crate::{api, cluster, gateway, routes};

#[derive(OpenApi)]
#[openapi(
    info(title = "Tartarus API", version = "1"),
    paths(sandboxes::create_sandbox, sandboxes::list_sandboxes, sandboxes::get_sandbox, sandboxes::delete_sandbox,
          exec::exec_sandbox, sandboxes::wait_sandbox, health::healthz,
          files::put_file, files::get_file, logs::logs_sandbox, sandboxes::pause_sandbox, sandboxes::resume_sandbox,
          audit::list_audit,
          templates::create_template, templates::list_templates, templates::get_template,
          templates::delete_template, policies::apply_policy, policies::list_policies, policies::get_policy, policies::effective_policy,
          policies::delete_policy, policies::policy_history, policies::rollback_policy, policies::list_events,
          policies::quarantine_sandbox, blobs::put_blob, blobs::get_blob, blobs::delete_blob, blobs::gc_blobs,
          routes::tools::put_tool, routes::tools::list_tools, routes::tools::delete_tool, routes::receipts::list_receipts,
          routes::receipts::get_receipt, routes::episodes::list_episodes, routes::episodes::get_episode, routes::episodes::export_episode,
          routes::evaluators::add_evaluator, routes::evaluators::list_evaluators, routes::signals::add_signal, routes::signals::list_signals,
          routes::datasets::build_dataset, routes::datasets::list_datasets, routes::nodes::register, routes::nodes::heartbeat,
          routes::nodes::list_nodes, routes::nodes::create_token, routes::nodes::cluster_status,
          routes::queue::list_queue, routes::queue::get_queued, routes::nodes::delete_node),
    components(schemas(CreateSandbox, SandboxView, ExecBody, ExecResult, ErrorBody, api::Resources, files::DirEntry,
                       templates::CreateTemplate, templates::TemplateView,
                       policies::ApplyPolicy, policies::PolicyView, policies::Rollback, blobs::BlobPut,
                       blobs::GcView, gateway::ToolDefinition, routes::receipts::ReceiptView, routes::episodes::EpisodeView,
                       routes::evaluators::AddEvaluator, routes::signals::SignalView, routes::datasets::DatasetView,
                       cluster::NodeReport, cluster::Heartbeat, cluster::Registration, routes::nodes::NodeView,
                       routes::nodes::CreateNodeToken)),
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

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use utoipa::OpenApi;

    use super::ApiDoc;

    /// Every operation of the document as (METHOD path, operation).
    fn operations() -> Vec<(String, String, Value)> {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                out.push((method.to_uppercase(), path.clone(), operation.clone()));
            }
        }
        out
    }

    #[test]
    fn test_path_parameters_are_exactly_the_routes_placeholders() {
        for (method, path, operation) in operations() {
            let declared: Vec<&str> = operation["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            let mut placeholders: Vec<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            let mut sorted = declared.clone();
            sorted.sort_unstable();
            placeholders.sort_unstable();
            assert_eq!(
                sorted, placeholders,
                "{method} {path}: path parameters {declared:?}"
            );
        }
    }

    #[test]
    fn test_query_structs_are_optional_query_parameters() {
        let find = |method: &str, wanted: &str, name: &str| {
            let (_, _, operation) = operations()
                .into_iter()
                .find(|(m, p, _)| m == method && p == wanted)
                .unwrap();
            let parameter = operation["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap()
                .clone();
            (parameter["in"].clone(), parameter["required"].clone())
        };
        let optional_query = (Value::from("query"), Value::from(false));
        assert_eq!(
            find("POST", "/v1/sandboxes/{id}/wait", "timeout_s"),
            optional_query
        );
        assert_eq!(find("GET", "/v1/sandboxes", "status"), optional_query);
        assert_eq!(find("DELETE", "/v1/sandboxes/{id}", "grace_s"), optional_query);
        assert_eq!(find("GET", "/v1/sandboxes/{id}/logs", "follow"), optional_query);
        assert_eq!(find("GET", "/v1/events", "limit"), optional_query);
        let required_query = (Value::from("query"), Value::from(true));
        assert_eq!(find("GET", "/v1/sandboxes/{id}/files", "path"), required_query);
    }
}
