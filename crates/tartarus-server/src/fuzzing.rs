//! Entry points for the fuzz targets in `fuzz/` (`api_body`): not an API, hidden from the docs.
//!
//! Each takes a request body as its route receives it and runs the parsing and checks that route runs
//! before it touches any state (store, runtime, images), so the fuzzer reaches them without a database, a
//! sandbox or an async executor. The routes call the same functions; nothing here is a copy.

use serde::de::DeserializeOwned;
use tartarus_effects::DatasetQuery;
use tartarus_image::template::Template;
use tartarus_policy::Policy;
use tartarus_runtime::SandboxSpec;
use tartarus_shim::protocol::ExecRequest;
pub use tartarus_store::Role;

use crate::api::{CreateSandbox, ExecBody};
use crate::auth::Caller;
use crate::cluster::nodes::NodeReport;
use crate::cluster::placement::NodeSandbox;
use crate::error::ApiError;
use crate::gateway::tools::ToolDefinition;
use crate::routes::evaluators::AddEvaluator;
pub use crate::sandboxes::HostAccess;

/// A body as axum's `Json` extractor reads it: one JSON value of type `T`, nothing after it.
fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid request: {e}")))
}

/// `POST /v1/sandboxes`: the body and the spec it becomes for a key of `role` on a server allowing `host`
/// (before templates, images and admission).
pub fn create_sandbox(
    body: &[u8],
    role: Role,
    host: HostAccess,
) -> Result<(CreateSandbox, SandboxSpec), ApiError> {
    let body: CreateSandbox = json(body)?;
    let caller = Caller {
        key_id: "fuzz".into(),
        tenant: "fuzz".into(),
        role,
    };
    let spec = crate::sandboxes::spec_from(&body, &caller, host)?;
    Ok((body, spec))
}

/// `POST /v1/sandboxes/{id}/exec`: the checked body and the shim request it becomes in a sandbox made
/// from `base`.
pub fn exec(body: &[u8], base: SandboxSpec) -> Result<(ExecBody, ExecRequest), ApiError> {
    let body: ExecBody = json(body)?;
    crate::routes::exec::check_exec(&body)?;
    let request = crate::routes::exec::shim_request(&body, base);
    Ok((body, request))
}

/// `POST /v1/templates`: the validated template.
pub fn template(body: &[u8]) -> Result<Template, ApiError> {
    crate::routes::templates::template_from(json(body)?)
}

/// `POST /v1/policies`: the validated policy.
pub fn policy(body: &[u8]) -> Result<Policy, ApiError> {
    let (text, source) = crate::routes::policies::policy_text(json(body)?)?;
    tartarus_policy::parse_policy(&text, &source).map_err(|e| ApiError::invalid(e.to_string()))
}

/// `POST /v1/evaluators`: the name and the key id of the checked key.
pub fn evaluator(body: &[u8]) -> Result<(String, String), ApiError> {
    let body: AddEvaluator = json(body)?;
    if !crate::routes::evaluators::valid_name(&body.name) {
        return Err(ApiError::invalid("invalid evaluator name"));
    }
    let key =
        crate::effects::parse_public_key(&body.public_key).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok((body.name, tartarus_effects::key_id(&key)))
}

/// `POST /v1/tools`: the validated declaration.
pub fn tool(body: &[u8]) -> Result<ToolDefinition, ApiError> {
    let tool: ToolDefinition = json(body)?;
    tool.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(tool)
}

/// `POST /v1/nodes/register`: the validated report.
pub fn node_report(body: &[u8]) -> Result<NodeReport, ApiError> {
    let report: NodeReport = json(body)?;
    report.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(report)
}

/// Node side of a placement: the spec the node agent would start.
pub fn node_sandbox(body: &[u8]) -> Result<SandboxSpec, ApiError> {
    let body: NodeSandbox = json(body)?;
    body.checked_spec().map_err(|e| ApiError::invalid(e.to_string()))
}

/// `POST /v1/datasets`: the parsed query.
pub fn dataset_query(body: &[u8]) -> Result<DatasetQuery, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::invalid("the query must be UTF-8 JSON"))?;
    DatasetQuery::from_json(text).map_err(|e| ApiError::invalid(format!("dataset query: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_create_sandbox_entry_runs_the_route_checks() {
        let (_, spec) = create_sandbox(
            br#"{"cmd": ["/bin/true"], "timeout_s": 5}"#,
            Role::User,
            HostAccess::default(),
        )
        .unwrap();
        assert_eq!(spec.timeout, Some(std::time::Duration::from_secs(5)));
        let refused = create_sandbox(
            br#"{"network": "host-loopback"}"#,
            Role::User,
            HostAccess::default(),
        );
        assert_eq!(refused.unwrap_err().status, axum::http::StatusCode::FORBIDDEN);
    }

    #[test]
    fn test_exec_entry_builds_the_shim_request() {
        let base = SandboxSpec {
            env: vec![("A".into(), "1".into())],
            ..SandboxSpec::default()
        };
        let (_, request) = exec(br#"{"cmd": ["ls"], "env": {"B": "2"}, "timeout_s": 1.5}"#, base).unwrap();
        assert_eq!(
            request.env,
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(request.timeout_ms, Some(1500));
        assert!(exec(br#"{"cmd": ["ls"], "timeout_s": 0}"#, SandboxSpec::default()).is_err());
    }
}
