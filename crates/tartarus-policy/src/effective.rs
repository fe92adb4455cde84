//! The effective policy of one tenant (and template): every applicable policy merged key by key, the most
//! specific layer winning, over the built-in defaults (precedence and defaults in the crate docs).

use std::time::Duration;

use serde::Serialize;

use crate::cidr::Cidr;
use crate::class::DEFAULT_CLASS;
use crate::de;
use crate::isolation::{EffectiveIsolation, IsolationPolicy};
use crate::policy::{
    EnforcementPolicy, NetworkPolicy, NetworkViolationAction, Policy, ResourcePolicy,
    ResourceViolationAction, SecurityPolicy, TemplateRule, TimeoutAction,
};

/// Egress ports when no policy lists any.
pub const DEFAULT_EGRESS_PORTS: &[u16] = &[80, 443];
/// Most CPU cores of one sandbox when no policy sets `resources.max_cpu_cores`.
pub const DEFAULT_MAX_CPU_CORES: f64 = 4.0;
/// Most MiB of one sandbox when no policy sets `resources.max_memory_mb`.
pub const DEFAULT_MAX_MEMORY_MB: u64 = 8192;
/// Longest sandbox lifetime when no policy sets `resources.max_duration`.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(3600);
/// Most live sandboxes of a tenant when no policy sets `resources.max_sandboxes`.
pub const DEFAULT_MAX_SANDBOXES: u32 = 50;
/// Most CPU cores of a tenant's live sandboxes when no policy sets `resources.max_total_cpu_cores`.
pub const DEFAULT_MAX_TOTAL_CPU_CORES: f64 = 16.0;
/// Most MiB of a tenant's live sandboxes when no policy sets `resources.max_total_memory_mb`.
pub const DEFAULT_MAX_TOTAL_MEMORY_MB: u64 = 65536;
/// Most processes of one sandbox when no policy sets `resources.max_pids`.
pub const DEFAULT_MAX_PIDS: u32 = 256;
/// Classes requests may name when no policy sets `resources.classes` (`inferno`, with its GPU, is opt-in).
pub const DEFAULT_CLASSES: &[&str] = &[DEFAULT_CLASS, "flame", "blaze"];

/// The id of [`builtin_policy`].
pub const BUILTIN_POLICY_ID: &str = "builtin-default";

/// The policy a server applies when no policy is loaded (the "Default limits" of the README): a tenant
/// holds at most 20 live sandboxes and 10 GiB of memory across them (20 of the `ember` class) (a sandbox that sets no memory counts
/// as the `ember` class, 512 MiB), each sandbox at most 256 processes (its pids limit); no host network,
/// no egress, no root filesystem, no writable mounts; everything else the built-in defaults of the crate
/// docs.
pub const BUILTIN_POLICY_YAML: &str = "id: builtin-default
version: 1
network: {egress: false}
resources: {max_sandboxes: 20, max_total_memory_mb: 10240, max_pids: 256}
security: {allow_host_network: false, allow_rootfs: false, allow_writable_mounts: false}
";

/// [`BUILTIN_POLICY_YAML`], parsed.
pub fn builtin_policy() -> Policy {
    crate::parse_policy(BUILTIN_POLICY_YAML, "builtin-default.yaml")
        .expect("the built-in policy is valid (tested)")
}

/// The rules in force for one tenant's request (and template), every key resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EffectivePolicy {
    /// The tenant it was computed for.
    pub tenant: String,
    /// The template it was computed for, if any.
    pub template: Option<String>,
    /// The resolved `network` section.
    pub network: EffectiveNetwork,
    /// The resolved `resources` section.
    pub resources: EffectiveResources,
    /// The resolved `security` section.
    pub security: EffectiveSecurity,
    /// The resolved `enforcement` section.
    pub enforcement: Enforcement,
    /// The resolved `isolation` section.
    pub isolation: EffectiveIsolation,
    /// The merged `templates` entries for [`EffectivePolicy::template`]; `None` when no applicable policy
    /// has one (the template is then unrestricted beyond the rest of the policy).
    pub template_rule: Option<EffectiveTemplateRule>,
    /// Ids of the policies that applied, lowest precedence first: the defaults in the order given, then the
    /// overrides naming the tenant.
    pub sources: Vec<String>,
}

/// `network`, resolved. Without egress, the egress keys are empty, `dns` false and `rate_limit_kbps` 0.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EffectiveNetwork {
    /// Whether sandboxes may have egress.
    pub egress: bool,
    /// Whether [`crate::PRIVATE_RANGES`] are denied.
    pub deny_private: bool,
    /// Whether [`crate::METADATA_RANGES`] are denied.
    pub deny_metadata: bool,
    /// Destination ports egress may reach.
    pub allowed_egress_ports: Vec<u16>,
    /// Empty means anywhere not denied.
    pub allowed_cidrs: Vec<Cidr>,
    /// Denied destinations besides the private and metadata ranges; deny wins.
    pub denied_cidrs: Vec<Cidr>,
    /// Whether the sandbox gets a resolver.
    pub dns: bool,
    /// 0 is no cap.
    pub rate_limit_kbps: u64,
}

/// `resources`, resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EffectiveResources {
    /// Most CPU cores of one sandbox.
    pub max_cpu_cores: f64,
    /// Most MiB of one sandbox.
    pub max_memory_mb: u64,
    /// Longest lifetime of one sandbox, and the timeout of a request that sets none.
    #[serde(serialize_with = "de::ser_duration")]
    pub max_duration: Duration,
    /// Most live sandboxes of the tenant.
    pub max_sandboxes: u32,
    /// Most CPU cores of all the tenant's live sandboxes.
    pub max_total_cpu_cores: f64,
    /// Most MiB of all the tenant's live sandboxes.
    pub max_total_memory_mb: u64,
    /// Most processes of one sandbox (its pids limit).
    pub max_pids: u32,
    /// Classes requests may name (besides `quarantine`).
    pub classes: Vec<String>,
}

/// `security`, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveSecurity {
    /// Whether requests may share the host's network namespace.
    pub allow_host_network: bool,
    /// Whether requests may bring a root filesystem directory.
    pub allow_rootfs: bool,
    /// Whether requests may bind host directories writable.
    pub allow_writable_mounts: bool,
    /// System calls denied on top of the runtime's list.
    pub extra_denied_syscalls: Vec<String>,
}

/// `enforcement`, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Enforcement {
    /// On outliving the timeout.
    pub on_timeout: TimeoutAction,
    /// On hitting a CPU or memory limit.
    pub on_resource_violation: ResourceViolationAction,
    /// On reaching for a denied destination.
    pub on_network_violation: NetworkViolationAction,
}

/// The `templates` entries for one template, merged key by key; absent keys stay absent (no rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveTemplateRule {
    /// The template's id.
    pub id: String,
    /// `None`: every tenant may use the template.
    pub allowed_callers: Option<Vec<String>>,
    /// Most live sandboxes of the template per tenant.
    pub max_instances: Option<u32>,
    /// The timeout of a request that sets none (cut to `max_duration`).
    #[serde(serialize_with = "de::ser_opt_duration")]
    pub default_timeout: Option<Duration>,
    /// The class of a request that names none.
    pub class: Option<String>,
}

/// The effective policy of `tenant` (for a request from `template`, if any).
///
/// Key by key, the last layer that sets a key wins: the built-in defaults, then the policies without
/// `tenants` in the order given, then the policies naming `tenant` in the order given; the `templates`
/// entries for `template` merge in the same order into [`EffectivePolicy::template_rule`]. Lists are
/// replaced, not concatenated. Policies are assumed validated ([`crate::parse_policy`]); a malformed
/// duration in one built in code is ignored.
pub fn effective(policies: &[Policy], tenant: &str, template: Option<&str>) -> EffectivePolicy {
    let mut merged = Merged::default();
    let mut sources = Vec::new();
    let layers = policies
        .iter()
        .filter(|p| p.is_default())
        .chain(policies.iter().filter(|p| p.names_tenant(tenant)));
    for policy in layers {
        merged.overlay(policy, template);
        sources.push(policy.id.clone());
    }
    merged.resolve(tenant, template, sources)
}

/// The keys set so far, as the policies write them.
#[derive(Default)]
struct Merged {
    network: NetworkPolicy,
    resources: ResourcePolicy,
    security: SecurityPolicy,
    enforcement: EnforcementPolicy,
    isolation: IsolationPolicy,
    rule: Option<TemplateRule>,
}

/// Copies each named `Option` field of `$from` that is set over `$into`'s.
macro_rules! overlay {
    ($into:expr, $from:expr, $($field:ident),+) => {
        $(if $from.$field.is_some() {
            $into.$field.clone_from(&$from.$field);
        })+
    };
}

impl Merged {
    fn overlay(&mut self, policy: &Policy, template: Option<&str>) {
        let (n, r, s, e) = (
            &policy.network,
            &policy.resources,
            &policy.security,
            &policy.enforcement,
        );
        overlay!(
            self.network,
            n,
            egress,
            deny_private,
            deny_metadata,
            allowed_egress_ports,
            allowed_cidrs,
            denied_cidrs,
            dns,
            rate_limit_kbps
        );
        overlay!(
            self.resources,
            r,
            max_cpu_cores,
            max_memory_mb,
            max_duration,
            max_sandboxes,
            max_total_cpu_cores,
            max_total_memory_mb,
            max_pids,
            classes
        );
        overlay!(
            self.security,
            s,
            allow_host_network,
            allow_rootfs,
            allow_writable_mounts,
            extra_denied_syscalls
        );
        overlay!(
            self.enforcement,
            e,
            on_timeout,
            on_resource_violation,
            on_network_violation
        );
        self.isolation.overlay(&policy.isolation);
        let Some(template) = template else { return };
        for rule in policy.templates.iter().filter(|t| t.id == template) {
            let into = self.rule.get_or_insert_with(|| TemplateRule {
                id: rule.id.clone(),
                allowed_callers: None,
                max_instances: None,
                default_timeout: None,
                class: None,
            });
            overlay!(into, rule, allowed_callers, max_instances, default_timeout, class);
        }
    }

    fn resolve(self, tenant: &str, template: Option<&str>, sources: Vec<String>) -> EffectivePolicy {
        let Merged {
            network: n,
            resources: r,
            security: s,
            enforcement: e,
            isolation,
            rule,
        } = self;
        let egress = n.egress.unwrap_or(false);
        let when_egress = |v: Option<Vec<Cidr>>| if egress { v.unwrap_or_default() } else { Vec::new() };
        let network = EffectiveNetwork {
            egress,
            deny_private: n.deny_private.unwrap_or(true),
            deny_metadata: n.deny_metadata.unwrap_or(true),
            allowed_egress_ports: match egress {
                true => n
                    .allowed_egress_ports
                    .unwrap_or_else(|| DEFAULT_EGRESS_PORTS.to_vec()),
                false => Vec::new(),
            },
            allowed_cidrs: when_egress(n.allowed_cidrs),
            denied_cidrs: when_egress(n.denied_cidrs),
            dns: egress && n.dns.unwrap_or(true),
            rate_limit_kbps: if egress { n.rate_limit_kbps.unwrap_or(0) } else { 0 },
        };
        let resources = EffectiveResources {
            max_cpu_cores: r.max_cpu_cores.unwrap_or(DEFAULT_MAX_CPU_CORES),
            max_memory_mb: r.max_memory_mb.unwrap_or(DEFAULT_MAX_MEMORY_MB),
            max_duration: duration(r.max_duration.as_deref()).unwrap_or(DEFAULT_MAX_DURATION),
            max_sandboxes: r.max_sandboxes.unwrap_or(DEFAULT_MAX_SANDBOXES),
            max_total_cpu_cores: r.max_total_cpu_cores.unwrap_or(DEFAULT_MAX_TOTAL_CPU_CORES),
            max_total_memory_mb: r.max_total_memory_mb.unwrap_or(DEFAULT_MAX_TOTAL_MEMORY_MB),
            max_pids: r.max_pids.unwrap_or(DEFAULT_MAX_PIDS),
            classes: r
                .classes
                .unwrap_or_else(|| DEFAULT_CLASSES.iter().map(|c| c.to_string()).collect()),
        };
        let security = EffectiveSecurity {
            allow_host_network: s.allow_host_network.unwrap_or(false),
            allow_rootfs: s.allow_rootfs.unwrap_or(false),
            allow_writable_mounts: s.allow_writable_mounts.unwrap_or(false),
            extra_denied_syscalls: s.extra_denied_syscalls.unwrap_or_default(),
        };
        let enforcement = Enforcement {
            on_timeout: e.on_timeout.unwrap_or_default(),
            on_resource_violation: e.on_resource_violation.unwrap_or_default(),
            on_network_violation: e.on_network_violation.unwrap_or_default(),
        };
        let template_rule = rule.map(|t| EffectiveTemplateRule {
            default_timeout: duration(t.default_timeout.as_deref()),
            id: t.id,
            allowed_callers: t.allowed_callers,
            max_instances: t.max_instances,
            class: t.class,
        });
        EffectivePolicy {
            tenant: tenant.to_string(),
            template: template.map(str::to_string),
            network,
            resources,
            security,
            enforcement,
            isolation: isolation.resolve(),
            template_rule,
            sources,
        }
    }
}

fn duration(text: Option<&str>) -> Option<Duration> {
    text.and_then(|t| de::parse_duration(t).ok())
}

impl EffectivePolicy {
    /// The built-in defaults alone (what a tenant gets when no policy applies).
    pub fn defaults(tenant: &str) -> EffectivePolicy {
        effective(&[], tenant, None)
    }

    /// The effective policy as JSON (durations as text such as `5m`), for the API and audit records.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an effective policy (strings, numbers, lists) always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_policy;

    fn policy(yaml: &str) -> Policy {
        parse_policy(yaml, "test.yaml").unwrap()
    }

    #[test]
    fn test_builtin_policy_bounds_count_memory_and_pids_and_refuses_host_network() {
        let builtin = builtin_policy();
        let e = effective(std::slice::from_ref(&builtin), "anyone", None);
        assert_eq!(builtin.id, BUILTIN_POLICY_ID);
        assert_eq!(e.resources.max_sandboxes, 20);
        assert_eq!(e.resources.max_total_memory_mb, 10240);
        assert_eq!(e.resources.max_pids, 256);
        assert!(!e.security.allow_host_network && !e.network.egress);
        assert_eq!(e.sources, [BUILTIN_POLICY_ID]);
    }

    #[test]
    fn test_max_pids_is_overridden_and_zero_refused() {
        let p = policy("id: few\nresources: {max_pids: 32}\n");
        assert_eq!(effective(&[p], "t", None).resources.max_pids, 32);
        assert_eq!(effective(&[], "t", None).resources.max_pids, DEFAULT_MAX_PIDS);
        let err = parse_policy("id: none\nresources: {max_pids: 0}\n", "p.yaml").unwrap_err();
        assert!(err.to_string().contains("max_pids"), "{err}");
    }

    #[test]
    fn test_no_policy_gives_the_safe_defaults() {
        let e = EffectivePolicy::defaults("team-a");
        assert!(!e.network.egress);
        assert!(e.network.deny_private && e.network.deny_metadata);
        assert!(!e.network.dns);
        assert!(e.network.allowed_egress_ports.is_empty());
        assert_eq!(e.resources.max_cpu_cores, DEFAULT_MAX_CPU_CORES);
        assert_eq!(e.resources.max_duration, Duration::from_secs(3600));
        assert_eq!(e.resources.classes, ["ember", "flame", "blaze"]);
        assert!(
            !e.security.allow_host_network && !e.security.allow_rootfs && !e.security.allow_writable_mounts
        );
        assert_eq!(e.enforcement.on_timeout, TimeoutAction::Kill);
        assert_eq!(
            e.enforcement.on_resource_violation,
            ResourceViolationAction::Throttle
        );
        assert_eq!(e.enforcement.on_network_violation, NetworkViolationAction::Kill);
        assert!(e.template_rule.is_none());
        assert!(e.sources.is_empty());
    }

    #[test]
    fn test_precedence_default_then_tenant_then_template_key_by_key() {
        let policies = [
            policy(
                "id: tenant-a\ntenants: [team-a]\nresources: {max_cpu_cores: 2}\n\
                 templates: [{id: py, max_instances: 3}]\n",
            ),
            policy(
                "id: base\nnetwork: {egress: true}\nresources: {max_cpu_cores: 4, max_memory_mb: 4096}\n\
                 templates: [{id: py, max_instances: 10, class: flame, default_timeout: 10m}]\n",
            ),
            policy("id: base-later\nresources: {max_memory_mb: 2048}\n"),
            policy("id: tenant-b\ntenants: [team-b]\nresources: {max_cpu_cores: 1}\n"),
        ];

        let a = effective(&policies, "team-a", Some("py"));

        // Overrides come after every default, whatever the order given.
        assert_eq!(a.sources, ["base", "base-later", "tenant-a"]);
        assert_eq!(a.resources.max_cpu_cores, 2.0);
        // A later default wins over an earlier one; the override left the key alone.
        assert_eq!(a.resources.max_memory_mb, 2048);
        assert!(a.network.egress);
        assert_eq!(a.network.allowed_egress_ports, [80, 443]);
        assert!(a.network.dns);
        let rule = a.template_rule.unwrap();
        assert_eq!(rule.max_instances, Some(3));
        assert_eq!(rule.class.as_deref(), Some("flame"));
        assert_eq!(rule.default_timeout, Some(Duration::from_secs(600)));

        let c = effective(&policies, "team-c", Some("py"));
        assert_eq!(c.sources, ["base", "base-later"]);
        assert_eq!(c.resources.max_cpu_cores, 4.0);
        assert_eq!(c.template_rule.unwrap().max_instances, Some(10));

        let other = effective(&policies, "team-a", Some("r-analytics"));
        assert!(other.template_rule.is_none());
    }

    #[test]
    fn test_egress_off_in_an_override_clears_the_egress_keys() {
        let policies = [
            policy(
                "id: base\nnetwork: {egress: true, dns: true, allowed_egress_ports: [443], rate_limit_kbps: 100}\n",
            ),
            policy("id: locked\ntenants: [team-a]\nnetwork: {egress: false}\n"),
        ];
        let e = effective(&policies, "team-a", None);
        assert!(!e.network.egress);
        assert!(!e.network.dns);
        assert!(e.network.allowed_egress_ports.is_empty());
        assert_eq!(e.network.rate_limit_kbps, 0);
        let other = effective(&policies, "team-b", None);
        assert_eq!(other.network.allowed_egress_ports, [443]);
        assert_eq!(other.network.rate_limit_kbps, 100);
    }

    #[test]
    fn test_lists_are_replaced_not_concatenated() {
        let policies = [
            policy("id: base\nsecurity: {extra_denied_syscalls: [ptrace, mincore]}\n"),
            policy("id: a\ntenants: [team-a]\nsecurity: {extra_denied_syscalls: [personality]}\n"),
        ];
        assert_eq!(
            effective(&policies, "team-a", None)
                .security
                .extra_denied_syscalls,
            ["personality"]
        );
    }

    #[test]
    fn test_effective_serialises_durations_as_text() {
        let json = effective(&[policy("id: base\nresources: {max_duration: 90m}\n")], "t", None).to_json();
        assert!(json.contains(r#""max_duration":"1h30m""#), "{json}");
    }
}
