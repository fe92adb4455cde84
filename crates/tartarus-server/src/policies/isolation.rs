//! The isolation lane of a create: the caller's effective policy picks among the lanes this machine offers
//! ([`tartarus_policy::choose_runtime`]). A lane the policy forbids, or one too weak for the request while a
//! stronger one is offered, is a 403; a lane this host lacks or that cannot honour the request is a 422.

use axum::http::StatusCode;
use tartarus_policy::{IsolationFacts, LaneOffer, RuntimeChoice, RuntimeDecision, QUARANTINE_CLASS};
use tartarus_runtime::SandboxSpec;

use super::effective_policy;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

/// Chooses the lane for a create that names `requested` (`None`: the policy's default), of `class`. With
/// `node_offers` the sandbox goes to a cluster node, and the lanes are those the nodes offer
/// ([`crate::cluster::node_lane_offers`]) instead of this machine's.
pub fn choose_runtime(
    state: &AppState,
    caller: &Caller,
    template: Option<&str>,
    requested: Option<&str>,
    class: Option<&str>,
    spec: &SandboxSpec,
    node_offers: Option<Vec<LaneOffer>>,
) -> Result<RuntimeDecision, ApiError> {
    let requested = requested
        .map(str::parse::<RuntimeChoice>)
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let (policy, _) = effective_policy(state, &caller.tenant, caller.role, template);
    let facts = IsolationFacts {
        quarantine: class == Some(QUARANTINE_CLASS),
    };
    let offers = node_offers.unwrap_or_else(|| state.manager.runtimes().offers(spec));
    tartarus_policy::choose_runtime(requested, facts, &policy.isolation, &offers).map_err(|refusal| {
        match refusal.is_policy() {
            true => ApiError::new(StatusCode::FORBIDDEN, "runtime_forbidden", refusal.to_string()),
            false => ApiError::invalid(refusal.to_string()),
        }
    })
}
