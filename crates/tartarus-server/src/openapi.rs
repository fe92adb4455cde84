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
          files::put_file, files::get_file, logs::logs_sandbox, sandboxes::pause_sandbox, sandboxes::resume_sandbox, routes::snapshots::fork_sandbox, routes::snapshots::list_snapshots,
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
          routes::queue::list_queue, routes::queue::get_queued, routes::nodes::delete_node,
          routes::keys::public_keys, routes::keys::rotate_key, routes::runtimes::list_runtimes,
          routes::ports::signed_url, routes::ports::forward_path, sandboxes::set_timeout,
          routes::usage::sandbox_usage, routes::usage::usage_report, routes::usage::whoami),
    components(schemas(CreateSandbox, SandboxView, api::PauseBody, api::PauseMode, routes::snapshots::SnapshotView, ExecBody, ExecResult, ErrorBody, api::Resources, files::DirEntry,
                       templates::CreateTemplate, templates::TemplateView,
                       policies::ApplyPolicy, policies::PolicyView, policies::Rollback, blobs::BlobPut,
                       blobs::GcView, gateway::ToolDefinition, routes::receipts::ReceiptView, routes::episodes::EpisodeView,
                       routes::evaluators::AddEvaluator, routes::signals::SignalView, routes::datasets::DatasetView,
                       cluster::NodeReport, cluster::Heartbeat, cluster::Registration, routes::nodes::NodeView,
                       routes::nodes::CreateNodeToken, routes::runtimes::RuntimeView,
                       routes::ports::SignedUrlRequest, routes::ports::SignedUrl,
                       sandboxes::SetTimeout, sandboxes::Deadline,
                       crate::usage::SandboxUsage, crate::usage::UsageReport, crate::usage::TenantUsage,
                       crate::usage::Totals, crate::usage::Cost, routes::usage::Whoami)),
    modifiers(&BearerAuth, &LayerResponses)
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
        // A node agent's join token (`tartarus node token create`), on the routes node agents call.
        components.add_security_scheme(
            "node_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The answers that come from the layers around a handler rather than from the handler itself, added to
/// every operation they apply to, so that no annotation has to repeat them and none can forget them:
/// 401 from the key check, 400 and 422 from a path, query or body that does not parse or is out of range
/// (the extractors and the handlers' first checks), 413 from the body limits, 415 from the JSON extractor,
/// 500 from a store failure or a caught panic. Every error response without a declared body gets the one
/// error body every error has ([`ErrorBody`]).
struct LayerResponses;

impl utoipa::Modify for LayerResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                add_layer_responses(path, operation);
            }
        }
    }
}

fn add_layer_responses(path: &str, operation: &mut utoipa::openapi::path::Operation) {
    let keyed = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let parsed = path.contains('{')
        || operation.parameters.as_ref().is_some_and(|p| !p.is_empty())
        || operation.request_body.is_some();
    let body_types: Vec<String> = operation
        .request_body
        .as_ref()
        .map(|b| b.content.keys().cloned().collect())
        .unwrap_or_default();
    let json_body = body_types.iter().any(|t| t == "application/json");
    let mut layered: Vec<(&str, &str)> = Vec::new();
    if parsed {
        layered.push((
            "400",
            "a path parameter, query string or body that does not parse",
        ));
        layered.push(("422", "a parameter or body of the wrong shape or out of range"));
    }
    if keyed {
        layered.push((
            "401",
            "no Authorization header, one that is not 'Bearer <key>', or an unknown or revoked key",
        ));
    }
    if !body_types.is_empty() {
        layered.push(("413", "the body is over the operation's limit"));
    }
    if json_body {
        layered.push(("415", "the body's Content-Type is not application/json"));
    }
    if keyed {
        layered.push((
            "500",
            "internal error: the server log has the cause under the body's correlation_id",
        ));
    }
    let responses = &mut operation.responses.responses;
    for (status, description) in layered {
        responses
            .entry(status.to_string())
            .or_insert_with(|| utoipa::openapi::Response::new(description).into());
    }
    for (status, response) in responses.iter_mut() {
        let error = status.starts_with('4') || status.starts_with('5');
        if let (true, utoipa::openapi::RefOr::T(response)) = (error, response) {
            if response.content.is_empty() {
                let schema = utoipa::openapi::Ref::from_schema_name("ErrorBody");
                response.content.insert(
                    "application/json".to_string(),
                    utoipa::openapi::Content::new(Some(schema)),
                );
            }
        }
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

    fn statuses(operation: &Value) -> Vec<String> {
        operation["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
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

    #[test]
    fn test_every_keyed_operation_documents_the_key_check_and_internal_errors() {
        for (method, path, operation) in operations() {
            if operation["security"].as_array().is_none_or(|s| s.is_empty()) {
                continue;
            }
            let statuses = statuses(&operation);
            for status in ["401", "500"] {
                assert!(
                    statuses.iter().any(|s| s == status),
                    "{method} {path} lacks {status}: {statuses:?}"
                );
            }
            if path.contains('{') {
                for status in ["400", "422"] {
                    assert!(
                        statuses.iter().any(|s| s == status),
                        "{method} {path} lacks {status}"
                    );
                }
            }
        }
    }

    #[test]
    fn test_every_error_response_has_the_error_body() {
        for (method, path, operation) in operations() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }

    #[test]
    fn test_a_blob_read_documents_the_range_proof_and_range_content_types() {
        let (_, _, operation) = operations()
            .into_iter()
            .find(|(m, p, _)| m == "GET" && p == "/v1/blobs/{cid}")
            .unwrap();
        let ok = &operation["responses"]["200"]["content"];
        assert!(ok["application/octet-stream"].is_object(), "{ok}");
        assert!(ok[crate::routes::blobs::PROOF_TYPE].is_object(), "{ok}");
        let partial = &operation["responses"]["206"]["content"];
        assert!(partial["application/octet-stream"].is_object(), "{partial}");
    }

    #[test]
    fn test_the_node_agents_routes_name_their_token() {
        for (method, path, operation) in operations() {
            if path == "/v1/nodes/register" || path == "/v1/nodes/{id}/heartbeat" {
                assert_eq!(
                    operation["security"][0]["node_token"],
                    serde_json::json!([]),
                    "{method} {path}"
                );
            }
        }
    }

    #[test]
    fn test_handlers_own_refusals_are_documented() {
        let cases = [
            ("GET", "/v1/audit", "403"),
            ("GET", "/v1/queue", "403"),
            ("GET", "/v1/receipts", "403"),
            ("GET", "/v1/templates/{id}", "403"),
            ("DELETE", "/v1/nodes/{id}", "403"),
            ("DELETE", "/v1/tools/{name}", "403"),
            ("GET", "/v1/episodes/{id}/signals", "404"),
            ("GET", "/v1/keys", "200"),
            ("POST", "/v1/keys/rotate", "403"),
            ("POST", "/v1/sandboxes", "202"),
            ("POST", "/v1/sandboxes", "429"),
            ("POST", "/v1/sandboxes/{id}/exec", "403"),
            ("POST", "/v1/sandboxes/{id}/exec", "429"),
            ("POST", "/v1/templates", "429"),
            ("PUT", "/v1/sandboxes/{id}/files", "403"),
            ("GET", "/v1/sandboxes/{id}/files", "403"),
        ];
        let all = operations();
        for (method, path, status) in cases {
            let (_, _, operation) = all.iter().find(|(m, p, _)| m == method && p == path).unwrap();
            assert!(
                statuses(operation).iter().any(|s| s == status),
                "{method} {path} lacks {status}"
            );
        }
    }
}
