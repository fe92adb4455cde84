//! Compilation of an admitted request under its effective policy into what the sandbox is built with: the
//! one place where policy becomes limits, seccomp, Landlock and the network contract.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::admission::{AdmissionRequest, NetworkRequest};
use crate::cidr::{Cidr, ANYWHERE, METADATA_RANGES, PRIVATE_RANGES};
use crate::effective::EffectivePolicy;
use crate::syscalls::QUARANTINE_DENIED_SYSCALLS;

/// The only directory a quarantined sandbox may write (Landlock); `/tmp` is its private tmpfs.
pub const QUARANTINE_WRITABLE: &[&str] = &["/tmp"];

/// What one sandbox is built with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxConstraints {
    /// CPU cores (cgroup bandwidth).
    pub cpus: Option<f64>,
    /// Memory limit, MiB.
    pub memory_mb: Option<u64>,
    /// Lifetime limit.
    pub timeout: Option<Duration>,
    /// Most processes: the request's, else `resources.max_pids` (never unbounded).
    pub pids: u64,
    /// x86_64 system call names denied on top of the runtime's `DENIED_SYSCALLS` (never repeating them).
    pub extra_denied_syscalls: Vec<String>,
    /// The network the sandbox gets.
    pub network: NetworkContract,
    /// Whether the sandbox runs in quarantine (its class and the stricter seccomp set).
    pub quarantined: bool,
    /// Directories the sandbox may write (Landlock); empty means the runtime's defaults.
    pub landlock_writable: Vec<String>,
}

/// The network a sandbox gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkContract {
    /// Its own network namespace with only loopback.
    None,
    /// The host's network namespace (allowed by `security.allow_host_network`).
    HostLoopback,
    /// Egress through the host: a destination is reachable when its port is in `allowed_ports`, its
    /// address is in `allowed_cidrs` and in none of `denied_cidrs` (deny wins; see [`NetworkContract::permits`]).
    Egress {
        /// Never empty: a policy's empty list becomes `0.0.0.0/0` and `::/0`.
        allowed_cidrs: Vec<Cidr>,
        /// The policy's list, then the private and metadata ranges when the policy denies them.
        denied_cidrs: Vec<Cidr>,
        /// Destination ports, never empty.
        allowed_ports: Vec<u16>,
        /// Whether the sandbox gets a resolver.
        dns: bool,
        /// 0 is no cap.
        rate_limit_kbps: u64,
    },
}

impl NetworkContract {
    /// Whether a connection to `ip:port` may leave the sandbox (loopback stays inside and is not judged here).
    pub fn permits(&self, ip: IpAddr, port: u16) -> bool {
        match self {
            NetworkContract::None => false,
            NetworkContract::HostLoopback => ip.is_loopback(),
            NetworkContract::Egress {
                allowed_cidrs,
                denied_cidrs,
                allowed_ports,
                ..
            } => {
                allowed_ports.contains(&port)
                    && allowed_cidrs.iter().any(|c| c.contains(ip))
                    && !denied_cidrs.iter().any(|c| c.contains(ip))
            }
        }
    }
}

/// The constraints of `request` (as admitted, after the judges' mutations) under `policy`.
///
/// Policy wins over the request even if admission was skipped: host network or egress the policy does not
/// allow compile to [`NetworkContract::None`], as does any network for a quarantined request. Quarantine also
/// adds [`QUARANTINE_DENIED_SYSCALLS`] and limits writes to [`QUARANTINE_WRITABLE`].
pub fn compile(policy: &EffectivePolicy, request: &AdmissionRequest) -> SandboxConstraints {
    let quarantined = request.quarantined;
    let network = match request.network {
        _ if quarantined => NetworkContract::None,
        NetworkRequest::None => NetworkContract::None,
        NetworkRequest::HostLoopback if policy.security.allow_host_network => NetworkContract::HostLoopback,
        NetworkRequest::HostLoopback => NetworkContract::None,
        NetworkRequest::Egress if policy.network.egress => egress(policy),
        NetworkRequest::Egress => NetworkContract::None,
    };
    let quarantine_set = QUARANTINE_DENIED_SYSCALLS.iter().filter(|_| quarantined).copied();
    let mut extra_denied_syscalls: Vec<String> = Vec::new();
    for name in policy
        .security
        .extra_denied_syscalls
        .iter()
        .map(String::as_str)
        .chain(quarantine_set)
    {
        let in_runtime = tartarus_runtime::process::DENIED_SYSCALLS
            .iter()
            .any(|(n, _)| *n == name);
        if !in_runtime && !extra_denied_syscalls.iter().any(|n| n == name) {
            extra_denied_syscalls.push(name.to_string());
        }
    }
    SandboxConstraints {
        cpus: request.cpus,
        memory_mb: request.memory_mb,
        timeout: request.timeout,
        pids: request
            .pids
            .unwrap_or(u64::from(policy.resources.max_pids))
            .min(u64::from(policy.resources.max_pids)),
        extra_denied_syscalls,
        network,
        quarantined,
        landlock_writable: match quarantined {
            true => QUARANTINE_WRITABLE.iter().map(|d| d.to_string()).collect(),
            false => Vec::new(),
        },
    }
}

fn egress(policy: &EffectivePolicy) -> NetworkContract {
    let n = &policy.network;
    let allowed_cidrs = match n.allowed_cidrs.is_empty() {
        true => ANYWHERE.to_vec(),
        false => n.allowed_cidrs.clone(),
    };
    let private = PRIVATE_RANGES.iter().filter(|_| n.deny_private);
    let metadata = METADATA_RANGES.iter().filter(|_| n.deny_metadata);
    let mut denied_cidrs: Vec<Cidr> = Vec::new();
    for cidr in n.denied_cidrs.iter().chain(private).chain(metadata) {
        if !denied_cidrs.contains(cidr) {
            denied_cidrs.push(*cidr);
        }
    }
    NetworkContract::Egress {
        allowed_cidrs,
        denied_cidrs,
        allowed_ports: n.allowed_egress_ports.clone(),
        dns: n.dns,
        rate_limit_kbps: n.rate_limit_kbps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{admit, effective, parse_policy, Usage};

    fn admitted(yaml: &str, mut request: AdmissionRequest) -> (EffectivePolicy, AdmissionRequest) {
        let policies = [parse_policy(yaml, "test.yaml").unwrap()];
        let policy = effective(&policies, &request.tenant, request.template.as_deref());
        let decision = admit(&mut request, &policy, &Usage::default());
        assert!(decision.accepted(), "{decision:?}");
        (policy, request)
    }

    const EGRESS: &str = "id: base\n\
        network: {egress: true, allowed_egress_ports: [443], allowed_cidrs: [10.1.0.0/16, 203.0.113.0/24],\n  \
        denied_cidrs: [203.0.113.128/25], rate_limit_kbps: 1000}\n\
        security: {extra_denied_syscalls: [ptrace, mincore]}\n";

    #[test]
    fn test_compile_normal_egress_sandbox() {
        let request = AdmissionRequest {
            tenant: "team-a".into(),
            class: Some("flame".into()),
            network: NetworkRequest::Egress,
            ..AdmissionRequest::default()
        };
        let (policy, request) = admitted(EGRESS, request);

        let c = compile(&policy, &request);

        assert_eq!(
            (c.cpus, c.memory_mb, c.timeout),
            (Some(2.0), Some(2048), Some(Duration::from_secs(3600)))
        );
        assert!(!c.quarantined);
        assert!(c.landlock_writable.is_empty());
        // ptrace is already the runtime's.
        assert_eq!(c.extra_denied_syscalls, ["mincore"]);
        let NetworkContract::Egress {
            denied_cidrs,
            allowed_ports,
            dns,
            rate_limit_kbps,
            ..
        } = &c.network
        else {
            panic!("{:?}", c.network)
        };
        assert_eq!(
            denied_cidrs.len(),
            1 + PRIVATE_RANGES.len() + METADATA_RANGES.len()
        );
        assert_eq!(denied_cidrs[0].to_string(), "203.0.113.128/25");
        assert_eq!(allowed_ports, &[443]);
        assert!(*dns);
        assert_eq!(*rate_limit_kbps, 1000);
        // Deny wins: 10.1.0.0/16 is allowed but private, 203.0.113.200 allowed but denied.
        let permits = |ip: &str, port| c.network.permits(ip.parse().unwrap(), port);
        assert!(permits("203.0.113.7", 443));
        assert!(!permits("203.0.113.7", 80));
        assert!(!permits("203.0.113.200", 443));
        assert!(!permits("10.1.2.3", 443));
        assert!(!permits("8.8.8.8", 443));
    }

    #[test]
    fn test_compile_egress_anywhere_but_private_and_metadata() {
        let yaml = "id: base\nnetwork: {egress: true, deny_private: false}\n";
        let request = AdmissionRequest {
            tenant: "t".into(),
            network: NetworkRequest::Egress,
            ..AdmissionRequest::default()
        };
        let (policy, request) = admitted(yaml, request);
        let c = compile(&policy, &request);
        let permits = |ip: &str, port| c.network.permits(ip.parse().unwrap(), port);
        assert!(permits("8.8.8.8", 443));
        assert!(permits("2001:4860:4860::8888", 80));
        assert!(permits("10.0.0.1", 443));
        assert!(!permits("169.254.169.254", 80));
        assert!(!permits("fd00:ec2::254", 80));
        assert!(!permits("8.8.8.8", 22));
    }

    #[test]
    fn test_compile_quarantine_sandbox() {
        let request = AdmissionRequest {
            tenant: "team-a".into(),
            quarantined: true,
            network: NetworkRequest::Egress,
            ..AdmissionRequest::default()
        };
        let (policy, request) = admitted(EGRESS, request);

        let c = compile(&policy, &request);

        assert!(c.quarantined);
        assert_eq!(c.network, NetworkContract::None);
        assert_eq!((c.cpus, c.memory_mb), (Some(1.0), Some(512)));
        assert_eq!(c.landlock_writable, ["/tmp"]);
        assert_eq!(c.extra_denied_syscalls[0], "mincore");
        assert_eq!(
            c.extra_denied_syscalls.len(),
            QUARANTINE_DENIED_SYSCALLS.len(),
            "mincore once"
        );
        assert!(c.extra_denied_syscalls.iter().any(|s| s == "chmod"));
    }

    #[test]
    fn test_compile_never_grants_what_the_policy_forbids() {
        let policy = EffectivePolicy::defaults("t");
        for network in [NetworkRequest::Egress, NetworkRequest::HostLoopback] {
            let request = AdmissionRequest {
                network,
                ..AdmissionRequest::default()
            };
            assert_eq!(compile(&policy, &request).network, NetworkContract::None);
        }
    }

    #[test]
    fn test_constraints_round_trip_as_json() {
        let request = AdmissionRequest {
            tenant: "t".into(),
            network: NetworkRequest::Egress,
            ..AdmissionRequest::default()
        };
        let (policy, request) = admitted(EGRESS, request);
        let c = compile(&policy, &request);
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(r#""allowed_cidrs":["10.1.0.0/16","203.0.113.0/24"]"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<SandboxConstraints>(&json).unwrap(), c);
    }
}
