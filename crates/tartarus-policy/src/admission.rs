//! Admission: judges that accept, adjust or reject a sandbox request against an [`EffectivePolicy`].
//!
//! [`admit`] runs [`DefaultsJudge`], [`SecurityJudge`] and [`QuotaJudge`], in that order; the first
//! rejection stops the run. The fourth judge, audit ([`AUDIT_JUDGE`]), is the caller's: the server writes
//! the returned [`Decision`] to its audit log, accepted or not.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::class::{resource_class, ResourceClass, DEFAULT_CLASS, QUARANTINE_CLASS};
use crate::de::format_duration;
use crate::effective::{EffectivePolicy, EffectiveTemplateRule};

/// The name of the fourth judge, implemented by the caller recording the [`Decision`].
pub const AUDIT_JUDGE: &str = "audit";

/// Tolerance of CPU sums (`0.1 + 0.2` cores must fit under `0.3`).
const CPU_EPSILON: f64 = 1e-9;

/// What a tenant asks for, as the API received it; judges may fill in or change keys (mutations).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdmissionRequest {
    /// The caller's tenant (from its API key).
    pub tenant: String,
    /// The template the sandbox is made from.
    pub template: Option<String>,
    /// A resource class (`ember`, `flame`, `blaze`, `inferno`, `quarantine`).
    pub class: Option<String>,
    /// CPU cores.
    pub cpus: Option<f64>,
    /// Memory, MiB.
    pub memory_mb: Option<u64>,
    /// Lifetime limit.
    pub timeout: Option<Duration>,
    /// Most processes; absent from the digest when not asked (digests of older requests stay the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// The network the sandbox asks for.
    pub network: NetworkRequest,
    /// Whether it brings its own root filesystem directory.
    pub rootfs: bool,
    /// Whether it binds host directories writable.
    pub writable_mounts: bool,
    /// Whether it goes to the quarantine pool (no network, stricter seccomp).
    pub quarantined: bool,
}

/// The network a request asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkRequest {
    /// Its own loopback only.
    #[default]
    None,
    /// The host's network namespace (`security.allow_host_network`).
    HostLoopback,
    /// Egress as the policy's `network` section allows.
    Egress,
}

/// A tenant's live sandboxes, as the server counts them before admitting one more.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Live sandboxes of the tenant.
    pub sandboxes: u32,
    /// CPU cores they hold.
    pub cpu_cores: f64,
    /// MiB they hold.
    pub memory_mb: u64,
    /// Live sandboxes of the tenant made from the request's template.
    pub template_instances: u32,
}

/// One judge's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to say.
    Accept,
    /// The judge changed the request; one line per change, for the audit log.
    Mutate(Vec<String>),
    /// The request may not run.
    Reject(Rejection),
}

/// Why a request may not run, and the HTTP status the API answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// The judge that refused.
    pub judge: &'static str,
    /// 403: the policy forbids it; 422: invalid for the policy (exceeds a maximum); 429: a quota is used up.
    pub status: u16,
    /// What was refused and which policy key refused it.
    pub reason: String,
}

/// An admission check; the server may add its own to [`admit_with`].
pub trait Judge: Send + Sync {
    /// A short lower-case name for decisions and audit records.
    fn name(&self) -> &'static str;

    /// Judges `request` (after the judges before this one changed it) under `policy`, given the tenant's
    /// live `usage`. A judge that returns [`Verdict::Mutate`] has already changed `request`.
    fn judge(&self, request: &mut AdmissionRequest, policy: &EffectivePolicy, usage: &Usage) -> Verdict;
}

/// The outcome of [`admit`], recorded by the server as the audit judge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// `accept` or `reject`.
    pub verdict: &'static str,
    /// Why, when rejected.
    pub rejection: Option<Rejection>,
    /// Every change the judges made, in order.
    pub mutations: Vec<String>,
    /// The judges that ran, in order (the last one rejected, if any did).
    pub judges: Vec<&'static str>,
    /// BLAKE3 (hex) of the canonical JSON of the request as received, before any mutation.
    pub request_digest: String,
    /// The policies the decision was made under ([`EffectivePolicy::sources`]).
    pub policy_sources: Vec<String>,
}

impl Decision {
    /// Whether the request may run.
    pub fn accepted(&self) -> bool {
        self.rejection.is_none()
    }
}

/// The built-in judges in the order [`admit`] runs them.
pub const JUDGES: &[&dyn Judge] = &[&DefaultsJudge, &SecurityJudge, &QuotaJudge];

/// Runs [`JUDGES`] — defaults, security, quota — on `request`, which leaves with their mutations.
///
/// `policy` must be the [`crate::effective()`] policy of the request's tenant and template: a template rule
/// applies only to a request naming that template.
pub fn admit(request: &mut AdmissionRequest, policy: &EffectivePolicy, usage: &Usage) -> Decision {
    admit_with(JUDGES, request, policy, usage)
}

/// Runs `judges` in order, stopping at the first rejection.
pub fn admit_with(
    judges: &[&dyn Judge],
    request: &mut AdmissionRequest,
    policy: &EffectivePolicy,
    usage: &Usage,
) -> Decision {
    let request_digest = digest(request);
    let mut mutations = Vec::new();
    let mut ran = Vec::with_capacity(judges.len());
    let mut rejection = None;
    for judge in judges {
        ran.push(judge.name());
        match judge.judge(request, policy, usage) {
            Verdict::Accept => {}
            Verdict::Mutate(changes) => mutations.extend(changes),
            Verdict::Reject(r) => {
                rejection = Some(r);
                break;
            }
        }
    }
    Decision {
        verdict: if rejection.is_some() { "reject" } else { "accept" },
        rejection,
        mutations,
        judges: ran,
        request_digest,
        policy_sources: policy.sources.clone(),
    }
}

/// BLAKE3 hex of the request's canonical JSON (keys in declaration order).
pub fn digest(request: &AdmissionRequest) -> String {
    let json = serde_json::to_vec(request).expect("a request (strings, numbers, flags) always serialises");
    blake3::hash(&json).to_hex().to_string()
}

fn reject(judge: &'static str, status: u16, reason: String) -> Verdict {
    Verdict::Reject(Rejection {
        judge,
        status,
        reason,
    })
}

/// The matching template rule (the policy must have been computed for the request's template).
fn rule_for<'p>(
    policy: &'p EffectivePolicy,
    request: &AdmissionRequest,
) -> Option<&'p EffectiveTemplateRule> {
    policy
        .template_rule
        .as_ref()
        .filter(|r| request.template.as_deref() == Some(r.id.as_str()))
}

/// Fills in what the request leaves open, in this order:
///
/// 1. refuses (422) non-positive or non-finite `cpus`, zero `memory_mb` or `timeout`;
/// 2. quarantine: a `quarantine` class marks the request quarantined, a quarantined request gets the
///    `quarantine` class and its size (1 CPU, 512 MiB) whatever it asked;
/// 3. class → size: a named class fills `cpus`/`memory_mb` left open and refuses (422) larger ones; else the
///    template rule's `class` becomes the request's class and fills them; else the sizes left open come from
///    `ember` (the request keeps no class);
/// 4. timeout: the template rule's `default_timeout`, else `resources.max_duration`; a default longer than
///    `max_duration` is cut to it.
pub struct DefaultsJudge;

impl Judge for DefaultsJudge {
    fn name(&self) -> &'static str {
        "defaults"
    }

    fn judge(&self, request: &mut AdmissionRequest, policy: &EffectivePolicy, _usage: &Usage) -> Verdict {
        let name = self.name();
        if let Some(cpus) = request.cpus.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return reject(name, 422, format!("cpus {cpus} is invalid: ask for more than 0"));
        }
        if request.memory_mb == Some(0) {
            return reject(
                name,
                422,
                "memory_mb 0 is invalid: ask for at least 1 MiB".to_string(),
            );
        }
        if request.timeout == Some(Duration::ZERO) {
            return reject(
                name,
                422,
                "timeout 0 is invalid: ask for a positive duration".to_string(),
            );
        }
        let mut changes = Vec::new();
        if request.class.as_deref() == Some(QUARANTINE_CLASS) && !request.quarantined {
            request.quarantined = true;
            changes.push("quarantined=true (class quarantine)".to_string());
        }
        if request.quarantined {
            if request.class.as_deref() != Some(QUARANTINE_CLASS) {
                request.class = Some(QUARANTINE_CLASS.to_string());
                changes.push("class=quarantine (quarantined)".to_string());
            }
            if let Some(class) = resource_class(QUARANTINE_CLASS) {
                set_size(request, class, true, "quarantine class", &mut changes);
            }
        } else if let Some(named) = request.class.clone() {
            let Some(class) = resource_class(&named) else {
                return reject(
                    name,
                    422,
                    format!(
                        "unknown class '{named}': use one of {}",
                        crate::class::class_names()
                    ),
                );
            };
            if let Some(cpus) = request.cpus.filter(|c| *c > class.cpus + CPU_EPSILON) {
                return reject(
                    name,
                    422,
                    format!(
                        "cpus {cpus} is more than class {named} gives ({}): pick a larger class",
                        class.cpus
                    ),
                );
            }
            if let Some(mib) = request.memory_mb.filter(|m| *m > class.memory_mb) {
                return reject(
                    name,
                    422,
                    format!(
                        "memory_mb {mib} is more than class {named} gives ({}): pick a larger class",
                        class.memory_mb
                    ),
                );
            }
            set_size(request, class, false, &format!("class {named}"), &mut changes);
        } else if let Some(class) = rule_for(policy, request).and_then(|r| r.class.as_deref()) {
            if let Some(rc) = resource_class(class) {
                request.class = Some(class.to_string());
                changes.push(format!("class={class} (template rule)"));
                set_size(request, rc, false, &format!("class {class}"), &mut changes);
            }
        } else if let Some(class) = resource_class(DEFAULT_CLASS) {
            set_size(
                request,
                class,
                false,
                &format!("default class {DEFAULT_CLASS}"),
                &mut changes,
            );
        }
        if request.timeout.is_none() {
            let max = policy.resources.max_duration;
            let (timeout, why) = match rule_for(policy, request).and_then(|r| r.default_timeout) {
                Some(d) if d <= max => (d, "template default_timeout".to_string()),
                Some(d) => (
                    max,
                    format!(
                        "template default_timeout {} cut to max_duration",
                        format_duration(d)
                    ),
                ),
                None => (max, "policy max_duration".to_string()),
            };
            request.timeout = Some(timeout);
            changes.push(format!("timeout={} ({why})", format_duration(timeout)));
        }
        match changes.is_empty() {
            true => Verdict::Accept,
            false => Verdict::Mutate(changes),
        }
    }
}

/// Sets `cpus`/`memory_mb` to the class's: those left open, or (with `force`) any that differ.
fn set_size(
    request: &mut AdmissionRequest,
    class: ResourceClass,
    force: bool,
    why: &str,
    changes: &mut Vec<String>,
) {
    if request.cpus.is_none() || (force && request.cpus != Some(class.cpus)) {
        request.cpus = Some(class.cpus);
        changes.push(format!("cpus={} ({why})", class.cpus));
    }
    if request.memory_mb.is_none() || (force && request.memory_mb != Some(class.memory_mb)) {
        request.memory_mb = Some(class.memory_mb);
        changes.push(format!("memory_mb={} ({why})", class.memory_mb));
    }
}

/// What the sandbox may do: a quarantined request loses any network it asked for (a mutation); then host
/// network, egress, a root filesystem or writable mounts the policy does not allow are refused (403).
pub struct SecurityJudge;

impl Judge for SecurityJudge {
    fn name(&self) -> &'static str {
        "security"
    }

    fn judge(&self, request: &mut AdmissionRequest, policy: &EffectivePolicy, _usage: &Usage) -> Verdict {
        let forbid = |what: &str, key: &str| {
            reject(
                self.name(),
                403,
                format!("{what} is not allowed by policy ({key} is false)"),
            )
        };
        let mut changes = Vec::new();
        if request.quarantined && request.network != NetworkRequest::None {
            request.network = NetworkRequest::None;
            changes.push("network=none (quarantined)".to_string());
        }
        let security = &policy.security;
        if request.network == NetworkRequest::HostLoopback && !security.allow_host_network {
            return forbid("host network", "security.allow_host_network");
        }
        if request.network == NetworkRequest::Egress && !policy.network.egress {
            return forbid("network egress", "network.egress");
        }
        if request.rootfs && !security.allow_rootfs {
            return forbid("a root filesystem directory", "security.allow_rootfs");
        }
        if request.writable_mounts && !security.allow_writable_mounts {
            return forbid("a writable mount", "security.allow_writable_mounts");
        }
        match changes.is_empty() {
            true => Verdict::Accept,
            false => Verdict::Mutate(changes),
        }
    }
}

/// How much: the template must allow the caller (403); `cpus`, `memory_mb`, `pids` and `timeout` must be within the
/// per-sandbox maxima (422); the class must be one of `resources.classes` (403; `quarantine` always is);
/// and one more sandbox must fit in `max_sandboxes`, `max_total_cpu_cores`, `max_total_memory_mb` and the
/// template rule's `max_instances` (429).
pub struct QuotaJudge;

impl Judge for QuotaJudge {
    fn name(&self) -> &'static str {
        "quota"
    }

    fn judge(&self, request: &mut AdmissionRequest, policy: &EffectivePolicy, usage: &Usage) -> Verdict {
        let name = self.name();
        let rule = rule_for(policy, request);
        if let Some((id, callers)) = rule.and_then(|r| Some((&r.id, r.allowed_callers.as_ref()?))) {
            if !callers.contains(&request.tenant) {
                return reject(
                    name,
                    403,
                    format!(
                        "tenant '{}' may not use template '{id}' (templates[].allowed_callers)",
                        request.tenant
                    ),
                );
            }
        }
        let limits = &policy.resources;
        if let Some(class) = request.class.as_deref() {
            if class != QUARANTINE_CLASS && !limits.classes.iter().any(|c| c == class) {
                return reject(
                    name,
                    403,
                    format!(
                        "class {class} is not allowed by policy (resources.classes: {})",
                        limits.classes.join(", ")
                    ),
                );
            }
        }
        if let Some(cpus) = request.cpus.filter(|c| *c > limits.max_cpu_cores + CPU_EPSILON) {
            return reject(
                name,
                422,
                format!(
                    "cpus {cpus} is more than resources.max_cpu_cores ({})",
                    limits.max_cpu_cores
                ),
            );
        }
        if let Some(mib) = request.memory_mb.filter(|m| *m > limits.max_memory_mb) {
            return reject(
                name,
                422,
                format!(
                    "memory_mb {mib} is more than resources.max_memory_mb ({})",
                    limits.max_memory_mb
                ),
            );
        }
        if let Some(pids) = request.pids.filter(|p| *p > u64::from(limits.max_pids)) {
            return reject(
                name,
                422,
                format!(
                    "pids {pids} is more than resources.max_pids ({})",
                    limits.max_pids
                ),
            );
        }
        if let Some(timeout) = request.timeout.filter(|t| *t > limits.max_duration) {
            return reject(
                name,
                422,
                format!(
                    "timeout {} is longer than resources.max_duration ({})",
                    format_duration(timeout),
                    format_duration(limits.max_duration)
                ),
            );
        }
        let exhausted = |what: String| reject(name, 429, what);
        if usage.sandboxes.saturating_add(1) > limits.max_sandboxes {
            return exhausted(format!(
                "the tenant has {} live sandboxes, the most resources.max_sandboxes allows ({})",
                usage.sandboxes, limits.max_sandboxes
            ));
        }
        let cpus = request.cpus.unwrap_or(0.0);
        if usage.cpu_cores + cpus > limits.max_total_cpu_cores + CPU_EPSILON {
            return exhausted(format!(
                "{cpus} more CPU cores would exceed resources.max_total_cpu_cores ({}; {} in use)",
                limits.max_total_cpu_cores, usage.cpu_cores
            ));
        }
        let mib = request.memory_mb.unwrap_or(0);
        if usage.memory_mb.saturating_add(mib) > limits.max_total_memory_mb {
            return exhausted(format!(
                "{mib} more MiB would exceed resources.max_total_memory_mb ({}; {} in use)",
                limits.max_total_memory_mb, usage.memory_mb
            ));
        }
        if let Some((id, max)) = rule.and_then(|r| Some((&r.id, r.max_instances?))) {
            if usage.template_instances.saturating_add(1) > max {
                return exhausted(format!(
                    "the tenant has {} live sandboxes of template '{id}', the most its max_instances allows ({max})",
                    usage.template_instances
                ));
            }
        }
        Verdict::Accept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{effective, parse_policy, Policy};

    fn policy(yaml: &str) -> Policy {
        parse_policy(yaml, "test.yaml").unwrap()
    }

    fn request(tenant: &str) -> AdmissionRequest {
        AdmissionRequest {
            tenant: tenant.to_string(),
            ..AdmissionRequest::default()
        }
    }

    fn seed() -> Vec<Policy> {
        vec![
            policy(
                "id: production-default\nversion: 1\n\
                 network: {egress: false, deny_private: true, deny_metadata: true}\n\
                 resources: {max_cpu_cores: 4, max_memory_mb: 8192, max_duration: 15m, max_sandboxes: 50,\n  \
                 max_total_cpu_cores: 16, max_total_memory_mb: 65536, classes: [ember, flame, blaze]}\n\
                 security: {allow_host_network: false, allow_rootfs: false, allow_writable_mounts: false,\n  \
                 extra_denied_syscalls: [ptrace]}\n\
                 templates: [{id: python-ds, allowed_callers: [team-a], max_instances: 20, default_timeout: 10m,\n  \
                 class: flame}]\n",
            ),
            policy("id: team-b-egress\ntenants: [team-b]\nnetwork: {egress: true, allowed_egress_ports: [443]}\n"),
        ]
    }

    fn rejection(decision: &Decision) -> (&'static str, u16) {
        let r = decision.rejection.as_ref().expect("rejected");
        (r.judge, r.status)
    }

    #[test]
    fn test_defaults_fill_class_size_and_template_timeout() {
        let policies = seed();
        let e = effective(&policies, "team-a", Some("python-ds"));
        let mut req = AdmissionRequest {
            template: Some("python-ds".into()),
            ..request("team-a")
        };

        let d = admit(&mut req, &e, &Usage::default());

        assert!(d.accepted(), "{d:?}");
        assert_eq!(d.verdict, "accept");
        assert_eq!(d.judges, ["defaults", "security", "quota"]);
        assert_eq!(req.class.as_deref(), Some("flame"));
        assert_eq!((req.cpus, req.memory_mb), (Some(2.0), Some(2048)));
        assert_eq!(req.timeout, Some(Duration::from_secs(600)));
        assert_eq!(
            d.mutations,
            [
                "class=flame (template rule)",
                "cpus=2 (class flame)",
                "memory_mb=2048 (class flame)",
                "timeout=10m (template default_timeout)"
            ]
        );
        assert_eq!(d.policy_sources, ["production-default"]);
    }

    #[test]
    fn test_defaults_use_ember_and_max_duration_without_class_or_template() {
        let e = effective(&seed(), "team-c", None);
        let mut req = AdmissionRequest {
            cpus: Some(3.0),
            ..request("team-c")
        };
        let d = admit(&mut req, &e, &Usage::default());
        assert!(d.accepted());
        assert_eq!(
            (req.class.as_deref(), req.cpus, req.memory_mb),
            (None, Some(3.0), Some(512))
        );
        assert_eq!(req.timeout, Some(Duration::from_secs(900)));
        assert_eq!(
            d.mutations,
            [
                "memory_mb=512 (default class ember)",
                "timeout=15m (policy max_duration)"
            ]
        );
    }

    #[test]
    fn test_defaults_accept_a_request_that_leaves_nothing_open() {
        let e = effective(&seed(), "team-c", None);
        let mut req = AdmissionRequest {
            cpus: Some(1.0),
            memory_mb: Some(100),
            timeout: Some(Duration::from_secs(5)),
            ..request("team-c")
        };
        assert_eq!(
            DefaultsJudge.judge(&mut req, &e, &Usage::default()),
            Verdict::Accept
        );
    }

    #[test]
    fn test_defaults_cut_a_template_timeout_longer_than_max_duration() {
        let policies = [
            policy("id: base\ntemplates: [{id: py, default_timeout: 2h}]\n"),
            policy("id: a\ntenants: [team-a]\nresources: {max_duration: 30m}\n"),
        ];
        let e = effective(&policies, "team-a", Some("py"));
        let mut req = AdmissionRequest {
            template: Some("py".into()),
            ..request("team-a")
        };
        let d = admit(&mut req, &e, &Usage::default());
        assert!(d.accepted());
        assert_eq!(req.timeout, Some(Duration::from_secs(1800)));
        assert!(d
            .mutations
            .contains(&"timeout=30m (template default_timeout 2h cut to max_duration)".to_string()));
    }

    #[test]
    fn test_defaults_reject_invalid_numbers_and_sizes_beyond_the_named_class() {
        let e = effective(&seed(), "team-a", None);
        for req in [
            AdmissionRequest {
                cpus: Some(0.0),
                ..request("team-a")
            },
            AdmissionRequest {
                cpus: Some(f64::NAN),
                ..request("team-a")
            },
            AdmissionRequest {
                memory_mb: Some(0),
                ..request("team-a")
            },
            AdmissionRequest {
                timeout: Some(Duration::ZERO),
                ..request("team-a")
            },
            AdmissionRequest {
                class: Some("volcano".into()),
                ..request("team-a")
            },
            AdmissionRequest {
                class: Some("ember".into()),
                cpus: Some(2.0),
                ..request("team-a")
            },
            AdmissionRequest {
                class: Some("ember".into()),
                memory_mb: Some(1024),
                ..request("team-a")
            },
        ] {
            let mut req = req;
            let d = admit(&mut req, &e, &Usage::default());
            assert_eq!(rejection(&d), ("defaults", 422), "{req:?}");
            assert_eq!(d.judges, ["defaults"]);
            assert_eq!(d.verdict, "reject");
        }
    }

    #[test]
    fn test_quarantined_request_gets_the_quarantine_class_and_no_network() {
        let e = effective(&seed(), "team-b", None);
        let mut req = AdmissionRequest {
            quarantined: true,
            cpus: Some(4.0),
            network: NetworkRequest::Egress,
            ..request("team-b")
        };
        let d = admit(&mut req, &e, &Usage::default());
        assert!(d.accepted(), "{d:?}");
        assert_eq!(req.class.as_deref(), Some("quarantine"));
        assert_eq!((req.cpus, req.memory_mb), (Some(1.0), Some(512)));
        assert_eq!(req.network, NetworkRequest::None);
        assert!(d.mutations.contains(&"network=none (quarantined)".to_string()));

        let mut by_class = AdmissionRequest {
            class: Some("quarantine".into()),
            ..request("team-b")
        };
        assert!(admit(&mut by_class, &e, &Usage::default()).accepted());
        assert!(by_class.quarantined);
    }

    #[test]
    fn test_security_rejects_what_the_policy_forbids_with_403() {
        let e = effective(&seed(), "team-a", None);
        for req in [
            AdmissionRequest {
                network: NetworkRequest::HostLoopback,
                ..request("team-a")
            },
            AdmissionRequest {
                network: NetworkRequest::Egress,
                ..request("team-a")
            },
            AdmissionRequest {
                rootfs: true,
                ..request("team-a")
            },
            AdmissionRequest {
                writable_mounts: true,
                ..request("team-a")
            },
        ] {
            let mut req = req;
            let d = admit(&mut req, &e, &Usage::default());
            assert_eq!(rejection(&d), ("security", 403), "{req:?}");
            assert_eq!(d.judges, ["defaults", "security"]);
        }
        let mut egress = AdmissionRequest {
            network: NetworkRequest::Egress,
            ..request("team-a")
        };
        let reason = admit(&mut egress, &e, &Usage::default())
            .rejection
            .unwrap()
            .reason;
        assert_eq!(
            reason,
            "network egress is not allowed by policy (network.egress is false)"
        );
    }

    #[test]
    fn test_security_allows_egress_where_an_override_grants_it() {
        let e = effective(&seed(), "team-b", None);
        let mut req = AdmissionRequest {
            network: NetworkRequest::Egress,
            ..request("team-b")
        };
        let d = admit(&mut req, &e, &Usage::default());
        assert!(d.accepted(), "{d:?}");
        assert_eq!(d.policy_sources, ["production-default", "team-b-egress"]);
    }

    #[test]
    fn test_quota_rejects_a_caller_the_template_does_not_allow_with_403() {
        let e = effective(&seed(), "team-b", Some("python-ds"));
        let mut req = AdmissionRequest {
            template: Some("python-ds".into()),
            ..request("team-b")
        };
        let d = admit(&mut req, &e, &Usage::default());
        assert_eq!(rejection(&d), ("quota", 403));
        assert_eq!(
            d.rejection.unwrap().reason,
            "tenant 'team-b' may not use template 'python-ds' (templates[].allowed_callers)"
        );
    }

    #[test]
    fn test_quota_rejects_above_the_maxima_with_422() {
        let e = effective(&seed(), "team-a", None);
        for req in [
            AdmissionRequest {
                cpus: Some(4.5),
                ..request("team-a")
            },
            AdmissionRequest {
                memory_mb: Some(8193),
                ..request("team-a")
            },
            AdmissionRequest {
                timeout: Some(Duration::from_secs(901)),
                ..request("team-a")
            },
        ] {
            let mut req = req;
            assert_eq!(
                rejection(&admit(&mut req, &e, &Usage::default())),
                ("quota", 422),
                "{req:?}"
            );
        }
    }

    #[test]
    fn test_quota_rejects_a_class_outside_the_list_with_403() {
        let policies = [policy(
            "id: base\nresources: {max_cpu_cores: 8, max_memory_mb: 32768, classes: [ember]}\n",
        )];
        let e = effective(&policies, "team-a", None);
        let mut req = AdmissionRequest {
            class: Some("inferno".into()),
            ..request("team-a")
        };
        let d = admit(&mut req, &e, &Usage::default());
        assert_eq!(rejection(&d), ("quota", 403));
        assert_eq!(
            d.rejection.unwrap().reason,
            "class inferno is not allowed by policy (resources.classes: ember)"
        );
    }

    #[test]
    fn test_quota_rejects_exhausted_quotas_with_429() {
        let policies = seed();
        let e = effective(&policies, "team-a", Some("python-ds"));
        let req = AdmissionRequest {
            template: Some("python-ds".into()),
            ..request("team-a")
        };
        let full = [
            Usage {
                sandboxes: 50,
                ..Usage::default()
            },
            Usage {
                cpu_cores: 14.5,
                ..Usage::default()
            },
            Usage {
                memory_mb: 65536 - 2047,
                ..Usage::default()
            },
            Usage {
                template_instances: 20,
                ..Usage::default()
            },
        ];
        for usage in full {
            let d = admit(&mut req.clone(), &e, &usage);
            assert_eq!(rejection(&d), ("quota", 429), "{usage:?}");
        }
        let room = Usage {
            sandboxes: 49,
            cpu_cores: 14.0,
            memory_mb: 65536 - 2048,
            template_instances: 19,
        };
        assert!(admit(&mut req.clone(), &e, &room).accepted());
    }

    #[test]
    fn test_cpu_sums_tolerate_rounding() {
        let policies = [policy(
            "id: base\nresources: {max_cpu_cores: 0.1, max_total_cpu_cores: 0.3}\n",
        )];
        let e = effective(&policies, "t", None);
        let mut req = AdmissionRequest {
            cpus: Some(0.1),
            memory_mb: Some(64),
            ..request("t")
        };
        let usage = Usage {
            sandboxes: 2,
            cpu_cores: 0.1 + 0.1,
            ..Usage::default()
        };
        assert!(admit(&mut req, &e, &usage).accepted());
    }

    #[test]
    fn test_digest_is_of_the_request_as_received() {
        let e = effective(&seed(), "team-a", None);
        let mut req = request("team-a");
        let before = digest(&req);
        let d = admit(&mut req, &e, &Usage::default());
        assert_eq!(d.request_digest, before);
        assert_eq!(d.request_digest.len(), 64);
        assert_ne!(digest(&req), before, "the request was mutated");
    }

    struct Never;

    impl Judge for Never {
        fn name(&self) -> &'static str {
            "never"
        }
        fn judge(&self, _: &mut AdmissionRequest, _: &EffectivePolicy, _: &Usage) -> Verdict {
            Verdict::Reject(Rejection {
                judge: "never",
                status: 403,
                reason: "no".into(),
            })
        }
    }

    #[test]
    fn test_first_rejection_stops_the_run() {
        let e = effective(&seed(), "team-a", None);
        let mut req = request("team-a");
        let d = admit_with(
            &[&DefaultsJudge, &Never, &QuotaJudge],
            &mut req,
            &e,
            &Usage::default(),
        );
        assert_eq!(d.judges, ["defaults", "never"]);
        assert_eq!(d.mutations.len(), 3, "{:?}", d.mutations);
        assert_eq!(rejection(&d), ("never", 403));
    }
}
