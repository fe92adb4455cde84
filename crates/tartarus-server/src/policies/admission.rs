//! Admission: a create request against the caller's effective policy and the tenant's live usage; the
//! decision is audited and compiled into the spec's limits, seccomp additions and network contract.

use axum::http::StatusCode;
use serde_json::json;
use tartarus_policy::{AdmissionRequest, Decision, NetworkRequest, Usage};
use tartarus_runtime::{NetworkMode, SandboxSpec};
use tartarus_store::{NewAudit, NewEvent, Role, SandboxStatus};

use super::event;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

/// What a create asks for, in the terms of the admission judges.
pub struct AdmissionFacts<'a> {
    pub template: Option<&'a str>,
    pub class: Option<&'a str>,
    pub rootfs: bool,
}

/// Runs admission for a create: the judges decide on the request (defaults applied, limits checked,
/// quotas counted over the tenant's live sandboxes); the decision is audited with the request's digest;
/// an accepted request's spec gets the compiled constraints (limits, timeout, seccomp additions, network).
///
/// Without any policy in force the built-in policy ([`tartarus_policy::builtin_policy`]) judges instead:
/// its quotas (live sandboxes, total memory), its security (no host network, egress or writable mounts
/// for non-admin keys; admin keys are the operator's) and its pids limit apply; the other compiled
/// constraints do not (the spec keeps the server's defaults, so warm pools still fit, and `None` is
/// returned); a requested class still applies its resources, and quarantine its restrictions.
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    spec: &mut SandboxSpec,
    facts: &AdmissionFacts<'_>,
) -> Result<Option<Decision>, ApiError> {
    admit_copies(state, caller, spec, facts, 1).await
}

/// [`admit`] for `copies` sandboxes of one spec at once (a fork): the quotas count all of them, so either
/// every copy fits or the request is refused before any starts.
pub async fn admit_copies(
    state: &AppState,
    caller: &Caller,
    spec: &mut SandboxSpec,
    facts: &AdmissionFacts<'_>,
    copies: u32,
) -> Result<Option<Decision>, ApiError> {
    let (policy, builtin) = effective_policy(state, &caller.tenant, caller.role, facts.template);
    if builtin {
        // A class still means what it says.
        if let Some(class) = facts.class.and_then(tartarus_policy::resource_class) {
            spec.limits.cpus.get_or_insert(class.cpus);
            spec.limits.memory_bytes.get_or_insert(class.memory_mb << 20);
            if class.quarantined {
                spec.network = NetworkMode::None;
                spec.denied_syscalls.extend(
                    tartarus_policy::QUARANTINE_DENIED_SYSCALLS
                        .iter()
                        .map(|s| s.to_string()),
                );
                spec.writable_paths = vec!["/tmp".into()];
            }
        }
    }
    let mut request = AdmissionRequest {
        tenant: caller.tenant.clone(),
        template: facts.template.map(str::to_string),
        class: facts.class.map(str::to_string),
        cpus: spec.limits.cpus,
        memory_mb: spec.limits.memory_bytes.map(|b| b >> 20),
        timeout: spec.timeout,
        pids: spec.limits.pids,
        network: match spec.network {
            NetworkMode::None => NetworkRequest::None,
            NetworkMode::HostLoopback => NetworkRequest::HostLoopback,
            NetworkMode::Egress(_) => NetworkRequest::Egress,
        },
        rootfs: facts.rootfs,
        writable_mounts: spec.mounts.iter().any(|m| m.writable),
        quarantined: facts.class == Some("quarantine"),
    };
    let mut usage = usage(state, &caller.tenant, facts.template).await?;
    // The judges count this request as one more sandbox; the other copies count as already there.
    let others = copies.saturating_sub(1);
    usage.sandboxes += others;
    usage.cpu_cores += spec.limits.cpus.unwrap_or(0.0) * f64::from(others);
    usage.memory_mb += spec
        .limits
        .memory_bytes
        .map(|b| b >> 20)
        .unwrap_or(DEFAULT_CLASS_MEMORY_MB)
        * u64::from(others);
    if facts.template.is_some() {
        usage.template_instances += others;
    }
    let decision = tartarus_policy::admit(&mut request, &policy, &usage);
    for (i, judge) in decision.judges.iter().enumerate() {
        let rejected = decision.rejection.is_some() && i + 1 == decision.judges.len();
        let verdict = if rejected { "reject" } else { "accept" };
        metrics::counter!(crate::metrics::ADMISSION_DECISIONS.name, "judge" => *judge, "verdict" => verdict)
            .increment(1);
    }
    let detail = json!({
        "request_digest": decision.request_digest,
        "verdict": decision.verdict,
        "judges": decision.judges,
        "mutations": decision.mutations,
        "policies": decision.policy_sources,
        "rejection": decision.rejection.as_ref().map(|r| json!({"judge": r.judge, "status": r.status, "reason": r.reason})),
    })
    .to_string();
    let record = NewAudit {
        tenant: &caller.tenant,
        key_id: Some(&caller.key_id),
        action: "sandbox.admission",
        target: facts.template,
        outcome: decision.verdict,
        detail: Some(&detail),
    };
    if let Err(e) = state.store.record_audit(&record).await {
        tracing::error!("audit write failed: {}", tartarus_runtime::error_chain(&e));
    }
    if let Some(rejection) = &decision.rejection {
        let message = format!("{} judge: {}", rejection.judge, rejection.reason);
        event(
            state,
            NewEvent {
                category: "admission",
                kind: "admission.rejected",
                sandbox: None,
                tenant: Some(&caller.tenant),
                message: &message,
                details: Some(&detail),
            },
        )
        .await;
        let status = StatusCode::from_u16(rejection.status).unwrap_or(StatusCode::FORBIDDEN);
        let code = match status {
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::TOO_MANY_REQUESTS => "quota_exceeded",
            _ => "invalid_request",
        };
        return Err(ApiError::new(status, code, message));
    }
    let constraints = tartarus_policy::compile(&policy, &request);
    spec.limits.pids = Some(constraints.pids);
    if builtin {
        return Ok(None);
    }
    if spec.limits.cpus.is_none() {
        spec.limits.cpus = constraints.cpus;
    }
    if spec.limits.memory_bytes.is_none() {
        spec.limits.memory_bytes = constraints.memory_mb.map(|m| m << 20);
    }
    if spec.timeout.is_none() {
        spec.timeout = constraints.timeout;
    }
    spec.denied_syscalls
        .extend(constraints.extra_denied_syscalls.iter().cloned());
    spec.writable_paths = constraints.landlock_writable.iter().map(Into::into).collect();
    spec.network = match (&constraints.network, &spec.network) {
        (tartarus_policy::NetworkContract::None, _) => NetworkMode::None,
        (tartarus_policy::NetworkContract::HostLoopback, _) => NetworkMode::HostLoopback,
        // The policy's contract, in the runtime's terms (the runtime orders DNS before the private ranges,
        // so those travel as flags rather than as denied CIDRs).
        (tartarus_policy::NetworkContract::Egress { .. }, _) => {
            let n = &policy.network;
            NetworkMode::Egress(tartarus_runtime::EgressContract {
                allowed_cidrs: n.allowed_cidrs.iter().map(ToString::to_string).collect(),
                denied_cidrs: n.denied_cidrs.iter().map(ToString::to_string).collect(),
                deny_private: n.deny_private,
                deny_metadata: n.deny_metadata,
                allowed_ports: n.allowed_egress_ports.clone(),
                dns: n.dns,
                rate_limit_kbps: u32::try_from(n.rate_limit_kbps).unwrap_or(u32::MAX),
            })
        }
    };
    Ok(Some(decision))
}

/// The policy admission judges a request of `tenant` (with a key of `role`) by, and whether it is the
/// built-in one (no policy loaded). Without a policy, admin keys keep what the API lets admins do (host
/// network, egress, a root filesystem, writable mounts); every key gets the built-in quotas and limits.
pub fn effective_policy(
    state: &AppState,
    tenant: &str,
    role: Role,
    template: Option<&str>,
) -> (tartarus_policy::EffectivePolicy, bool) {
    let loaded = state.policies.snapshot();
    if !loaded.is_empty() {
        return (tartarus_policy::effective(&loaded, tenant, template), false);
    }
    let builtin = [tartarus_policy::builtin_policy()];
    let mut policy = tartarus_policy::effective(&builtin, tenant, template);
    if role == Role::Admin {
        policy.security.allow_host_network = true;
        policy.security.allow_rootfs = true;
        policy.security.allow_writable_mounts = true;
        policy.network.egress = true;
    }
    (policy, true)
}

/// The tenant's live sandboxes in the terms of the quota judge.
async fn usage(state: &AppState, tenant: &str, template: Option<&str>) -> Result<Usage, ApiError> {
    let mut usage = Usage::default();
    for status in [SandboxStatus::Starting, SandboxStatus::Running] {
        for record in state.store.sandboxes(Some(tenant), Some(status)).await? {
            usage.sandboxes += 1;
            // A record whose spec cannot be read counts as the largest class: a quota never under-counts.
            let (cpus, memory_mb) = match crate::sandboxes::stored_spec(&record) {
                Ok(spec) => (
                    spec.limits.cpus.unwrap_or(0.0),
                    // No memory limit set counts as the default class's size.
                    spec.limits
                        .memory_bytes
                        .map(|b| b >> 20)
                        .unwrap_or(DEFAULT_CLASS_MEMORY_MB),
                ),
                Err(_) => largest_class(),
            };
            usage.cpu_cores += cpus;
            usage.memory_mb += memory_mb;
            if template.is_some() && record.template.as_deref() == template {
                usage.template_instances += 1;
            }
        }
    }
    Ok(usage)
}

/// What a sandbox without a memory limit counts as in quotas: the default class's memory.
const DEFAULT_CLASS_MEMORY_MB: u64 = 512;

/// The CPUs and memory of the largest resource class.
pub(crate) fn largest_class() -> (f64, u64) {
    tartarus_policy::RESOURCE_CLASSES
        .iter()
        .fold((0.0, 0), |(cpus, memory), c| {
            (cpus.max(c.cpus), memory.max(c.memory_mb))
        })
}
