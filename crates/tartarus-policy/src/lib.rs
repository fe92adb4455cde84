//! The policy engine: what tenants' sandboxes may do, decided before a sandbox starts and compiled into what
//! it is built with. Pure logic — no I/O, no clock, no globals — so the server, the CLI and tests share it.
//!
//! Place in the data flow: the server stores policies ([`parse_policy`], [`Policy::to_json`]); for each
//! `POST /v1/sandboxes` it computes the caller's [`effective()`] policy, runs [`admit`] (and records the
//! [`Decision`] as the audit judge), then builds the sandbox from [`compile()`]'s [`SandboxConstraints`].
//!
//! # Policies
//!
//! YAML or JSON; unknown keys are errors everywhere, every section and key is optional:
//!
//! ```yaml
//! id: production-default            # required: lower-case letters, digits, '-'
//! version: 1                        # the author's own number, informational
//! tenants: [team-a]                 # absent: a default for every tenant; present: an override for these
//! network: {egress: true, deny_private: true, deny_metadata: true, allowed_egress_ports: [80, 443],
//!           allowed_cidrs: [], denied_cidrs: [203.0.113.0/24], dns: true, rate_limit_kbps: 0}
//! resources: {max_cpu_cores: 4, max_memory_mb: 8192, max_duration: 15m, max_sandboxes: 50,
//!             max_total_cpu_cores: 16, max_total_memory_mb: 65536, max_pids: 256,
//!             classes: [ember, flame, blaze]}
//! security: {allow_host_network: false, allow_rootfs: false, allow_writable_mounts: false,
//!            extra_denied_syscalls: [mincore]}
//! enforcement: {on_timeout: kill, on_resource_violation: throttle, on_network_violation: quarantine}
//! isolation: {trust: untrusted, runtimes: [process, gvisor], default_runtime: auto}
//! templates: [{id: python-ds, allowed_callers: [team-a], max_instances: 20, default_timeout: 10m, class: flame}]
//! ```
//!
//! # Defaults
//!
//! What a key is when no applicable policy sets it (safe: nothing leaves the sandbox unless allowed).
//!
//! | key | default |
//! | --- | --- |
//! | `network.egress` | `false` |
//! | `network.deny_private`, `network.deny_metadata` | `true` |
//! | `network.allowed_egress_ports` | `[80, 443]` |
//! | `network.allowed_cidrs` | `[]`: anywhere not denied |
//! | `network.denied_cidrs` | `[]` (plus [`PRIVATE_RANGES`] and [`METADATA_RANGES`] while denied) |
//! | `network.dns` | `true` with egress; without egress always `false` |
//! | `network.rate_limit_kbps` | `0`: no cap |
//! | `resources.max_cpu_cores` / `max_memory_mb` | 4 / 8192 |
//! | `resources.max_duration` | `1h` (also the timeout of a request that sets none) |
//! | `resources.max_sandboxes` | 50 |
//! | `resources.max_total_cpu_cores` / `max_total_memory_mb` | 16 / 65536 |
//! | `resources.max_pids` | 256 (every sandbox gets a pids limit: the request's, at most this) |
//! | `resources.classes` | `[ember, flame, blaze]` (`quarantine` is always allowed) |
//! | `security.allow_host_network`, `allow_rootfs`, `allow_writable_mounts` | `false` |
//! | `security.extra_denied_syscalls` | `[]` |
//! | `enforcement` | `on_timeout: kill`, `on_resource_violation: throttle`, `on_network_violation: kill` |
//! | `isolation.trust` | `standard`: `auto` takes the fastest lane; `untrusted` needs a lane stronger than process |
//! | `isolation.runtimes` | every lane (`process`, `gvisor`) |
//! | `isolation.default_runtime` | `auto` ([`choose_runtime`]; the quarantine class always needs a strong lane) |
//! | `templates[]` keys | absent: no rule (every caller, no instance cap, the class and timeout defaults) |
//!
//! With no policy loaded at all the server applies [`builtin_policy`] (id `builtin-default`: 20 live
//! sandboxes and 10 GiB per tenant, 256 processes per sandbox, no host network or egress).
//!
//! # Validation
//!
//! [`parse_policy`] reports `source:line:column: message` naming the key: unknown keys, values of the wrong
//! type, ports outside 1-65535, CIDRs that are malformed or have host bits set (`10.0.0.1/8`), durations
//! ([`tartarus_runtime::units::parse_duration`], at most 7 days), unknown classes or x86_64 syscall names,
//! and contradictions within the policy:
//!
//! - `allowed_egress_ports`, a non-empty `allowed_cidrs`, `dns: true` or a `rate_limit_kbps` above 0 with
//!   `egress: false` (they could never apply); an empty `allowed_egress_ports`; an empty `tenants`;
//! - `max_cpu_cores` above `max_total_cpu_cores`, `max_memory_mb` above `max_total_memory_mb`;
//! - a class (in `classes` or a template rule) larger than `max_cpu_cores` / `max_memory_mb`, a template
//!   rule's class missing from `classes`, its `default_timeout` above `max_duration`, its `max_instances`
//!   above `max_sandboxes`; two rules for one template.
//!
//! Keys that only make sense together are checked together only within one policy; across policies the
//! precedence below decides, and [`effective()`] never fails.
//!
//! # Precedence
//!
//! [`effective()`] merges key by key, and for each key the most specific layer that sets it wins:
//!
//! 1. the built-in defaults above;
//! 2. policies without `tenants`, in the order given (a later one wins);
//! 3. policies whose `tenants` name the tenant, in the order given (a later one wins);
//! 4. the `templates` entries for the request's template, from the same policies in the same order —
//!    they hold the template keys (`allowed_callers`, `max_instances`, `default_timeout`, `class`).
//!
//! Lists replace, they do not add up. Between addresses, deny wins: an address in `denied_cidrs`, or in
//! the private or metadata ranges while `deny_private` / `deny_metadata` hold, is unreachable even when
//! `allowed_cidrs` lists it. [`EffectivePolicy::sources`] names the policies that applied.
//!
//! # Admission
//!
//! [`admit`] runs the judges in this fixed order; the first rejection stops it:
//!
//! 1. [`DefaultsJudge`]: class → `cpus`/`memory_mb`, the template's `default_timeout` or `max_duration`
//!    as the timeout; quarantine requests get the `quarantine` class (422 for invalid numbers);
//! 2. [`SecurityJudge`]: quarantined requests lose their network; host network, egress, a root filesystem
//!    or writable mounts the policy does not allow → 403;
//! 3. [`QuotaJudge`]: template not allowed for the caller → 403; `cpus`/`memory_mb`/`timeout` above the
//!    maxima → 422; class not allowed → 403; live sandboxes, total CPU, total memory or the template's
//!    `max_instances` used up → 429;
//! 4. audit ([`AUDIT_JUDGE`]): the caller's — the server writes the [`Decision`] (verdict, mutations,
//!    judges, the request's digest, the policy sources) to its audit log.
//!
//! # Quarantine
//!
//! The `quarantine` class (1 CPU, 512 MiB): no network, writes only to `/tmp`, and
//! [`QUARANTINE_DENIED_SYSCALLS`] on top of the runtime's deny list (the choice is explained in
//! [`syscalls`]).
//!
//! # Modules
//!
//! - [`policy`]: the policy as written, parsing and validation with located errors;
//! - [`effective`](mod@effective): the merge and the built-in defaults;
//! - [`admission`]: requests, usage, the [`Judge`] trait and the three built-in judges;
//! - [`compile`](mod@compile): the sandbox's [`SandboxConstraints`] and [`NetworkContract`];
//! - [`cidr`], [`class`], [`syscalls`]: networks, resource classes, system call names.

#![warn(missing_docs)]

pub mod admission;
pub mod cidr {
    //! The address blocks of network contracts, shared with the runtime's network crate.
    pub use tartarus_network::cidr::{Cidr, CidrError, ANYWHERE, METADATA_RANGES, PRIVATE_RANGES};
}
pub mod class;
pub mod compile;
mod de;
pub mod effective;
pub mod isolation;
pub mod policy;
pub mod syscalls;

pub use admission::{
    admit, admit_with, digest, AdmissionRequest, Decision, DefaultsJudge, Judge, NetworkRequest, QuotaJudge,
    Rejection, SecurityJudge, Usage, Verdict, AUDIT_JUDGE, JUDGES,
};
pub use cidr::{Cidr, CidrError, ANYWHERE, METADATA_RANGES, PRIVATE_RANGES};
pub use class::{resource_class, ResourceClass, DEFAULT_CLASS, QUARANTINE_CLASS, RESOURCE_CLASSES};
pub use compile::{compile, NetworkContract, SandboxConstraints, QUARANTINE_WRITABLE};
pub use de::{format_duration, MAX_CORES, MAX_DURATION, MAX_MIB};
pub use effective::{
    builtin_policy, effective, EffectiveNetwork, EffectivePolicy, EffectiveResources, EffectiveSecurity,
    EffectiveTemplateRule, Enforcement, BUILTIN_POLICY_ID, BUILTIN_POLICY_YAML,
};
pub use isolation::{
    choose_runtime, wall_strength, EffectiveIsolation, IsolationFacts, IsolationPolicy, LaneOffer,
    RuntimeChoice, RuntimeDecision, RuntimeRefusal, Trust, UnknownRuntime,
};
pub use policy::{
    parse_policy, EnforcementPolicy, NetworkPolicy, NetworkViolationAction, Policy, PolicyError,
    ResourcePolicy, ResourceViolationAction, SecurityPolicy, TemplateRule, TimeoutAction,
};
pub use syscalls::{is_known_syscall, KNOWN_SYSCALLS, QUARANTINE_DENIED_SYSCALLS};

#[cfg(test)]
mod tests;
