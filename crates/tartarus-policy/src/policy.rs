//! Policies as written: every section and key optional, so that a tenant override can change one key and
//! inherit the rest (see [`crate::effective()`] for the merge and the crate docs for the defaults).
//!
//! Users write policies as YAML (JSON is YAML) and [`parse_policy`] validates them, pointing every error at
//! `source:line:column` and naming the offending key. Per-value rules (ports, CIDRs, durations, classes,
//! syscall names) are checked while parsing, so they point at the very list item; rules between keys
//! (contradictions) are checked after, and located by searching the text for the key.

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::class::{resource_class, QUARANTINE_CLASS};
use crate::de::{self, Scalar};
use crate::isolation::IsolationPolicy;
use tartarus_document::{find_key, in_comment, line_column};

/// A validated policy (see the crate docs for the shape, the defaults and the precedence).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Lower-case letters, digits and `-`, starting with a letter or digit; at most 63 characters.
    pub id: String,
    /// The author's own number, informational (the server keeps its own revision history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Absent: a default, applying to every tenant. Present (never empty): an override for these tenants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<Vec<String>>,
    /// What sandboxes may reach.
    #[serde(default)]
    pub network: NetworkPolicy,
    /// Per-sandbox maxima and the tenant's quotas.
    #[serde(default)]
    pub resources: ResourcePolicy,
    /// Sandbox features requests may ask for, extra denied system calls.
    #[serde(default)]
    pub security: SecurityPolicy,
    /// What happens to a running sandbox that breaks a rule.
    #[serde(default)]
    pub enforcement: EnforcementPolicy,
    /// Which isolation lanes (runtimes) the tenant's sandboxes run on, and how far its code is trusted.
    /// Written only when set, so that versions that predate it keep reading the policies that leave it alone.
    #[serde(default, skip_serializing_if = "IsolationPolicy::is_empty")]
    pub isolation: IsolationPolicy,
    /// Rules for sandboxes made from one template, the most specific layer of the merge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<TemplateRule>,
}

/// `network`: what a sandbox may reach. Deny wins: an address in `denied_cidrs` (or in the private and
/// metadata ranges, when denied) is unreachable even when `allowed_cidrs` holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// Whether sandboxes may ask for egress beyond their own loopback (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
    /// Deny [`crate::PRIVATE_RANGES`] to egress (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_private: Option<bool>,
    /// Deny [`crate::METADATA_RANGES`] to egress (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_metadata: Option<bool>,
    /// Destination ports egress may reach, 1-65535, never empty (default 80 and 443).
    #[serde(
        default,
        deserialize_with = "de::ports",
        skip_serializing_if = "Option::is_none"
    )]
    pub allowed_egress_ports: Option<Vec<u16>>,
    /// Destinations egress may reach; empty or absent means anywhere not denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_cidrs: Option<Vec<Cidr>>,
    /// Destinations egress may never reach, on top of the private and metadata ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied_cidrs: Option<Vec<Cidr>>,
    /// Whether name resolution works (default: true with egress, always false without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<bool>,
    /// Egress bandwidth cap in kbit/s; 0 (the default) is no cap.
    #[serde(
        default,
        deserialize_with = "de::kbps",
        skip_serializing_if = "Option::is_none"
    )]
    pub rate_limit_kbps: Option<u64>,
}

/// `resources`: the most one sandbox, and all of a tenant's live sandboxes together, may use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcePolicy {
    /// Most CPU cores of one sandbox.
    #[serde(
        default,
        deserialize_with = "de::cores",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_cpu_cores: Option<f64>,
    /// Most memory of one sandbox, MiB.
    #[serde(
        default,
        deserialize_with = "de::mib",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_memory_mb: Option<u64>,
    /// Longest lifetime of one sandbox (`30s`, `5m`, `1h30m`; at most 7 days); also the timeout of a
    /// request that sets none.
    #[serde(
        default,
        deserialize_with = "de::duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_duration: Option<String>,
    /// Most live sandboxes of the tenant.
    #[serde(
        default,
        deserialize_with = "de::count",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_sandboxes: Option<u32>,
    /// Most CPU cores of all the tenant's live sandboxes.
    #[serde(
        default,
        deserialize_with = "de::cores",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_total_cpu_cores: Option<f64>,
    /// Most memory of all the tenant's live sandboxes, MiB.
    #[serde(
        default,
        deserialize_with = "de::mib",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_total_memory_mb: Option<u64>,
    /// Most processes (and threads) of one sandbox: its pids cgroup limit, and the most a request may ask.
    #[serde(
        default,
        deserialize_with = "de::count",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_pids: Option<u32>,
    /// Resource classes requests may name (`quarantine` is always allowed: it only takes away).
    #[serde(
        default,
        deserialize_with = "de::classes",
        skip_serializing_if = "Option::is_none"
    )]
    pub classes: Option<Vec<String>>,
}

/// `security`: the sandbox features a request may ask for, and system calls denied on top of the runtime's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityPolicy {
    /// Whether a request may share the host's network namespace (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_host_network: Option<bool>,
    /// Whether a request may bring its own root filesystem directory (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_rootfs: Option<bool>,
    /// Whether a request may bind host directories writable (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_writable_mounts: Option<bool>,
    /// x86_64 system call names denied in addition to the runtime's list.
    #[serde(
        default,
        deserialize_with = "de::syscalls",
        skip_serializing_if = "Option::is_none"
    )]
    pub extra_denied_syscalls: Option<Vec<String>>,
}

/// `enforcement`: what happens to a running sandbox that breaks a rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnforcementPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// On outliving the timeout (default `kill`).
    pub on_timeout: Option<TimeoutAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// On hitting a CPU or memory limit (default `throttle`).
    pub on_resource_violation: Option<ResourceViolationAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// On reaching for a denied destination (default `kill`).
    pub on_network_violation: Option<NetworkViolationAction>,
}

/// What ends a sandbox that outlived its timeout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    /// Kill it (the default and only choice).
    #[default]
    Kill,
}

/// What happens to a sandbox that hits its CPU or memory limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceViolationAction {
    /// Slow it down to its limits (the default).
    #[default]
    Throttle,
    /// Kill it.
    Kill,
    /// Move it to the quarantine class.
    Quarantine,
}

/// What happens to a sandbox that tries to reach a denied destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkViolationAction {
    /// Record it, let the sandbox run (the packet is dropped either way).
    Log,
    /// Kill it (the default).
    #[default]
    Kill,
    /// Move it to the quarantine class.
    Quarantine,
}

/// `templates[]`: rules for sandboxes made from the template `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateRule {
    /// The template's id.
    pub id: String,
    /// Tenants that may use the template; absent means every tenant, empty means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_callers: Option<Vec<String>>,
    /// Most live sandboxes of this template per tenant.
    #[serde(
        default,
        deserialize_with = "de::count",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_instances: Option<u32>,
    /// The timeout of a request for this template that sets none (capped at `resources.max_duration`).
    #[serde(
        default,
        deserialize_with = "de::duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub default_timeout: Option<String>,
    /// The resource class of a request for this template that names none.
    #[serde(
        default,
        deserialize_with = "de::class",
        skip_serializing_if = "Option::is_none"
    )]
    pub class: Option<String>,
}

/// A policy that cannot be used: where (`file:line:column` when known) and why, naming the key.
pub type PolicyError = tartarus_document::DocumentError;

/// Parses and validates a policy written in YAML or JSON; `source` names the text in errors (a file name).
pub fn parse_policy(text: &str, source: &str) -> Result<Policy, PolicyError> {
    let policy: Policy = tartarus_document::parse(text, source)?;
    policy.check().map_err(|v| PolicyError {
        file: source.to_string(),
        location: locate(text, &v.path),
        key: Some(v.key),
        message: v.message,
    })?;
    Ok(policy)
}

impl Policy {
    /// Checks every rule of [`parse_policy`] (policies built in code, not parsed, need this too).
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.check().map_err(|v| PolicyError {
            file: self.id.clone(),
            location: None,
            key: Some(v.key),
            message: v.message,
        })
    }

    /// The canonical JSON (what the server stores): keys in declaration order, absent keys left out.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a policy (strings, numbers, lists) always serialises")
    }

    /// The policy as YAML, as [`parse_policy`] reads it back.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a policy (strings, numbers, lists) always serialises")
    }

    /// Whether this is a default (no `tenants`), applying to every tenant.
    pub fn is_default(&self) -> bool {
        self.tenants.is_none()
    }

    /// Whether this is an override naming `tenant`.
    pub fn names_tenant(&self, tenant: &str) -> bool {
        self.tenants
            .as_ref()
            .is_some_and(|t| t.iter().any(|t| t == tenant))
    }

    fn check(&self) -> Result<(), Violation> {
        if !valid_id(&self.id) {
            return Err(Violation::new(
                "id",
                vec![Seg::Key("id")],
                format!(
                    "id '{}' is invalid: use 1-63 lower-case letters, digits and '-', starting with a letter or digit",
                    self.id
                ),
            ));
        }
        if let Some(tenants) = &self.tenants {
            if tenants.is_empty() {
                return Err(Violation::new(
                    "tenants",
                    vec![Seg::Key("tenants")],
                    "tenants is empty: list the tenants this policy overrides, or remove the key to make it \
                     a default for every tenant",
                ));
            }
            check_tenants(tenants, "tenants", vec![Seg::Key("tenants")])?;
        }
        self.network.check()?;
        self.resources.check()?;
        self.security.check()?;
        if let Some((field, message)) = self.isolation.contradiction() {
            return Err(Violation::new(
                &format!("isolation.{field}"),
                vec![Seg::Key("isolation"), Seg::Key(field)],
                message,
            ));
        }
        self.check_templates()
    }

    fn check_templates(&self) -> Result<(), Violation> {
        let resources = &self.resources;
        for (i, rule) in self.templates.iter().enumerate() {
            let at = |field: &'static str| {
                let mut path = vec![Seg::Key("templates"), Seg::Entry(rule.id.clone())];
                if field != "id" {
                    path.push(Seg::Key(field));
                }
                (format!("templates[{i}].{field}"), path)
            };
            let fail = |field: &'static str, message: String| {
                let (key, path) = at(field);
                Violation::new(&key, path, format!("{key}: {message}"))
            };
            if !valid_id(&rule.id) {
                return Err(fail(
                    "id",
                    format!("template id '{}' is invalid: use a template's id", rule.id),
                ));
            }
            if self.templates[..i].iter().any(|r| r.id == rule.id) {
                // Point at the second entry: search past the first.
                let (key, mut path) = at("id");
                path.push(Seg::Entry(rule.id.clone()));
                let message = format!(
                    "{key}: template '{}' has a rule already: merge the two entries",
                    rule.id
                );
                return Err(Violation::new(&key, path, message));
            }
            if let Some(callers) = &rule.allowed_callers {
                let (key, path) = at("allowed_callers");
                check_tenants(callers, &key, path)?;
            }
            if let Some(text) = &rule.default_timeout {
                let timeout = de::parse_duration(text).map_err(|m| fail("default_timeout", m))?;
                let max = resources
                    .max_duration
                    .as_deref()
                    .and_then(|m| de::parse_duration(m).ok());
                if let Some(max) = max.filter(|max| timeout > *max) {
                    return Err(fail(
                        "default_timeout",
                        format!(
                            "{} is longer than resources.max_duration ({}): no sandbox could run that long",
                            text,
                            de::format_duration(max)
                        ),
                    ));
                }
            }
            if let Some(class) = &rule.class {
                de::check_class(Scalar::Str(class)).map_err(|m| fail("class", m))?;
                let listed = resources.classes.as_ref().is_none_or(|c| c.contains(class));
                if !listed && class != QUARANTINE_CLASS {
                    return Err(fail(
                        "class",
                        format!(
                            "class {class} is not in resources.classes: add it there or pick a listed one"
                        ),
                    ));
                }
                resources.check_class_fits(class).map_err(|m| fail("class", m))?;
            }
            if let (Some(n), Some(max)) = (rule.max_instances, resources.max_sandboxes) {
                if n > max {
                    return Err(fail(
                        "max_instances",
                        format!("{n} is more than resources.max_sandboxes ({max}): the tenant could never reach it"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl NetworkPolicy {
    fn check(&self) -> Result<(), Violation> {
        let key = |field: &'static str| {
            (
                format!("network.{field}"),
                vec![Seg::Key("network"), Seg::Key(field)],
            )
        };
        if let Some(ports) = &self.allowed_egress_ports {
            let (k, path) = key("allowed_egress_ports");
            if ports.is_empty() {
                return Err(Violation::new(
                    &k,
                    path,
                    "network.allowed_egress_ports is empty: list the ports egress may reach (e.g. [443]), or \
                     set network.egress: false",
                ));
            }
            if ports.contains(&0) {
                return Err(Violation::new(
                    &k,
                    path,
                    "network.allowed_egress_ports: port 0 is out of range: use 1-65535",
                ));
            }
        }
        if self.egress == Some(false) {
            let set = [
                ("allowed_egress_ports", self.allowed_egress_ports.is_some()),
                (
                    "allowed_cidrs",
                    self.allowed_cidrs.as_ref().is_some_and(|c| !c.is_empty()),
                ),
                ("dns", self.dns == Some(true)),
                ("rate_limit_kbps", self.rate_limit_kbps.is_some_and(|r| r > 0)),
            ];
            if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
                let (k, path) = key(field);
                return Err(Violation::new(
                    &k,
                    path,
                    format!(
                        "network.{field} is set while network.egress is false, so it could never apply: remove \
                         it, or set egress: true"
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl ResourcePolicy {
    fn check(&self) -> Result<(), Violation> {
        let key = |field: &'static str| {
            (
                format!("resources.{field}"),
                vec![Seg::Key("resources"), Seg::Key(field)],
            )
        };
        let fail = |field: &'static str, message: String| {
            let (k, path) = key(field);
            Violation::new(&k, path, format!("resources.{field}: {message}"))
        };
        for (field, cores) in [
            ("max_cpu_cores", self.max_cpu_cores),
            ("max_total_cpu_cores", self.max_total_cpu_cores),
        ] {
            if let Some(cores) = cores {
                de::check_cores(Scalar::Float(cores)).map_err(|m| fail(field, m))?;
            }
        }
        for (field, mib) in [
            ("max_memory_mb", self.max_memory_mb),
            ("max_total_memory_mb", self.max_total_memory_mb),
        ] {
            if let Some(mib) = mib {
                de::check_mib(Scalar::Int(mib.into())).map_err(|m| fail(field, m))?;
            }
        }
        if let Some(text) = &self.max_duration {
            de::parse_duration(text).map_err(|m| fail("max_duration", m))?;
        }
        if self.max_pids == Some(0) {
            return Err(fail(
                "max_pids",
                "0 is invalid: a sandbox needs at least 1 process".to_string(),
            ));
        }
        if let (Some(one), Some(total)) = (self.max_cpu_cores, self.max_total_cpu_cores) {
            if one > total {
                return Err(fail(
                    "max_cpu_cores",
                    format!("{one} is more than resources.max_total_cpu_cores ({total}): one sandbox could never use it"),
                ));
            }
        }
        if let (Some(one), Some(total)) = (self.max_memory_mb, self.max_total_memory_mb) {
            if one > total {
                return Err(fail(
                    "max_memory_mb",
                    format!("{one} is more than resources.max_total_memory_mb ({total}): one sandbox could never use it"),
                ));
            }
        }
        for class in self.classes.iter().flatten() {
            let (k, mut path) = key("classes");
            path.push(Seg::Item(class.clone()));
            let message = de::check_class(Scalar::Str(class)).and_then(|_| self.check_class_fits(class));
            message.map_err(|m| Violation::new(&k, path, format!("resources.classes: {m}")))?;
        }
        Ok(())
    }

    /// Whether a class fits under this policy's own per-sandbox maxima (when it sets them).
    fn check_class_fits(&self, name: &str) -> Result<(), String> {
        let Some(class) = resource_class(name) else {
            return Ok(());
        };
        if let Some(max) = self.max_cpu_cores.filter(|max| class.cpus > *max) {
            return Err(format!(
                "class {name} needs {} CPU cores, more than resources.max_cpu_cores ({max})",
                class.cpus
            ));
        }
        if let Some(max) = self.max_memory_mb.filter(|max| class.memory_mb > *max) {
            return Err(format!(
                "class {name} needs {} MiB, more than resources.max_memory_mb ({max})",
                class.memory_mb
            ));
        }
        Ok(())
    }
}

impl SecurityPolicy {
    fn check(&self) -> Result<(), Violation> {
        for name in self.extra_denied_syscalls.iter().flatten() {
            de::check_syscall(Scalar::Str(name)).map_err(|m| {
                Violation::new(
                    "security.extra_denied_syscalls",
                    vec![
                        Seg::Key("security"),
                        Seg::Key("extra_denied_syscalls"),
                        Seg::Item(name.clone()),
                    ],
                    format!("security.extra_denied_syscalls: {m}"),
                )
            })?;
        }
        Ok(())
    }
}

/// Tenant names as API keys carry them: 1-128 characters, no whitespace or control characters, no repeats.
fn check_tenants(tenants: &[String], key: &str, path: Vec<Seg>) -> Result<(), Violation> {
    for (i, tenant) in tenants.iter().enumerate() {
        let bad = tenant.is_empty()
            || tenant.chars().count() > 128
            || tenant.chars().any(|c| c.is_whitespace() || c.is_control());
        let twice = tenants[..i].contains(tenant);
        let why = match (bad, twice) {
            (true, _) => "is not a tenant name: use 1-128 characters without spaces",
            (false, true) => "is listed twice",
            (false, false) => continue,
        };
        let mut path = path;
        path.push(Seg::Item(tenant.clone()));
        if twice {
            // Point at the second mention: search past the first.
            path.push(Seg::Item(tenant.clone()));
        }
        return Err(Violation::new(key, path, format!("{key}: '{tenant}' {why}")));
    }
    Ok(())
}

pub use tartarus_document::valid_id;

/// A broken rule: the key it is about, how to find it in the text, and what to change.
#[derive(Debug)]
struct Violation {
    key: String,
    path: Vec<Seg>,
    message: String,
}

impl Violation {
    fn new(key: &str, path: Vec<Seg>, message: impl Into<String>) -> Violation {
        Violation {
            key: key.to_string(),
            path,
            message: message.into(),
        }
    }
}

/// One step of the search for a key in the text.
#[derive(Debug)]
enum Seg {
    /// A mapping key.
    Key(&'static str),
    /// A list item that is a mapping, found by its `id: VALUE`.
    Entry(String),
    /// A scalar list item, found by its text.
    Item(String),
}

/// Where a violation's key is written: 1-based line and column, searching each step after the one before.
/// A heuristic over the text (serde_yaml_ng keeps no positions in values): block (`key:`), flow
/// (`{key: ...}`) and quoted JSON (`"key":`) keys, skipping comments. Falls back to the deepest step found.
fn locate(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    let mut from = 0;
    let mut found = None;
    for (depth, seg) in path.iter().enumerate() {
        let at = match seg {
            // A top-level key of block YAML starts its line; try that first.
            Seg::Key(key) if depth == 0 => {
                find_key(text, key, from, true).or_else(|| find_key(text, key, from, false))
            }
            Seg::Key(key) => find_key(text, key, from, false),
            Seg::Entry(id) => find_entry(text, id, from),
            Seg::Item(item) => find_word(text, item, from),
        };
        let Some(at) = at else { break };
        found = Some(at);
        from = at + 1;
    }
    found.map(|at| line_column(text, at))
}

/// The offset of the `id` key whose value is `id`, at or after `from`.
fn find_entry(text: &str, id: &str, from: usize) -> Option<usize> {
    let mut search = from;
    while let Some(at) = find_key(text, "id", search, false) {
        search = at + 1;
        let value = text[at..].split_once(':')?.1.trim_start_matches([' ', '\t']);
        let value = value.trim_start_matches(['"', '\'']);
        if value
            .strip_prefix(id)
            .is_some_and(|rest| !rest.starts_with(is_word))
        {
            return Some(at);
        }
    }
    None
}

/// The offset of `word` standing alone (not part of a longer name) at or after `from`.
fn find_word(text: &str, word: &str, from: usize) -> Option<usize> {
    let mut search = from;
    while let Some(rel) = text.get(search..)?.find(word) {
        let at = search + rel;
        search = at + word.len().max(1);
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        let line = &text[text[..at].rfind('\n').map_or(0, |n| n + 1)..at];
        if !before.is_some_and(is_word) && !after.is_some_and(is_word) && !in_comment(line) {
            return Some(at);
        }
    }
    None
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}
