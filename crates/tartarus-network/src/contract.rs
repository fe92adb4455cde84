//! The egress contract a sandbox is started with, its validation, and its translation into nftables rules.
//!
//! Precedence (deny beats allow), in rule order:
//! 1. packets to the sandbox bridge network (other sandboxes, the host's bridge address) are dropped;
//! 2. the metadata addresses (with `deny_metadata`) and `denied_cidrs` are dropped;
//! 3. DNS (TCP/UDP port 53) is accepted to the host's resolvers when `dns` is set, and dropped to
//!    everything else (always when `dns` is not set);
//! 4. packets to the host itself — any of its addresses (`fib daddr type local`), and broadcast or
//!    multicast, which the host would take in too — are dropped: a service bound to 0.0.0.0 (sshd, a node
//!    agent, the API) is never reachable, whatever the contract allows. Only the DNS of step 3 reaches a
//!    resolver on the host, and replies to connections the sandbox made come back (`established`);
//! 5. the private ranges (with `deny_private`) are dropped — even when an allowed CIDR covers them;
//! 6. with a non-empty `allowed_cidrs`, everything outside them is dropped;
//! 7. with a non-empty `allowed_ports`, TCP and UDP to other ports are dropped;
//! 8. the rest is accepted, at most `rate_limit_kbps` KiB/s in each direction when set.
//!
//! The same chain serves the `forward` hook (traffic leaving through the host) and the `input` hook
//! (traffic for the host): step 4 is what keeps the second from reaching the final accept.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::cidr::{Cidr, CidrError, METADATA_RANGES, PRIVATE_RANGES};

/// What a sandbox with egress may reach. See the module documentation for the precedence.
///
/// Unknown fields are not refused here but by the spec that holds the contract (`SandboxSpec` in
/// tartarus-runtime): refused to execute it, ignored and reported to read a stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EgressContract {
    /// When non-empty, only these networks are reachable (after the denials).
    pub allowed_cidrs: Vec<String>,
    /// Always unreachable, even when an allowed network covers them.
    pub denied_cidrs: Vec<String>,
    /// Drop the private, shared and link-local ranges ([`crate::PRIVATE_RANGES`]).
    pub deny_private: bool,
    /// Drop the cloud metadata addresses ([`crate::METADATA_RANGES`]).
    pub deny_metadata: bool,
    /// TCP and UDP destination ports allowed; empty means every port.
    pub allowed_ports: Vec<u16>,
    /// Allow DNS to the host's resolvers (and give the sandbox a `resolv.conf` naming them).
    pub dns: bool,
    /// Bandwidth cap in KiB/s for each direction; 0 means none.
    pub rate_limit_kbps: u32,
}

impl Default for EgressContract {
    fn default() -> Self {
        EgressContract {
            allowed_cidrs: Vec::new(),
            denied_cidrs: Vec::new(),
            deny_private: true,
            deny_metadata: true,
            allowed_ports: Vec::new(),
            dns: false,
            rate_limit_kbps: 0,
        }
    }
}

/// A contract that cannot be enforced, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// `reason` quotes the value.
    #[error("{field}: {reason}")]
    Cidr {
        field: &'static str,
        value: String,
        reason: CidrError,
    },
    #[error("port 0 cannot be allowed: give ports between 1 and 65535")]
    PortZero,
}

impl EgressContract {
    /// Checks every CIDR and port without touching the host.
    pub fn validate(&self) -> Result<(), ContractError> {
        self.parsed().map(drop)
    }

    pub(crate) fn parsed(&self) -> Result<ParsedContract, ContractError> {
        let parse = |field: &'static str, list: &[String]| -> Result<Vec<Cidr>, ContractError> {
            list.iter()
                .map(|value| {
                    Cidr::parse(value).map_err(|reason| ContractError::Cidr {
                        field,
                        value: value.clone(),
                        reason,
                    })
                })
                .collect()
        };
        if self.allowed_ports.contains(&0) {
            return Err(ContractError::PortZero);
        }
        let mut ports = self.allowed_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        Ok(ParsedContract {
            allowed: parse("allowed CIDR", &self.allowed_cidrs)?,
            denied: parse("denied CIDR", &self.denied_cidrs)?,
            deny_private: self.deny_private,
            deny_metadata: self.deny_metadata,
            ports,
            dns: self.dns,
            rate_limit_kbps: self.rate_limit_kbps,
        })
    }
}

/// A validated contract.
#[derive(Debug, Clone)]
pub(crate) struct ParsedContract {
    pub allowed: Vec<Cidr>,
    pub denied: Vec<Cidr>,
    pub deny_private: bool,
    pub deny_metadata: bool,
    pub ports: Vec<u16>,
    pub dns: bool,
    pub rate_limit_kbps: u32,
}

/// Everything the per-sandbox rules are made of.
pub(crate) struct SandboxRules<'a> {
    pub id: &'a str,
    pub veth: &'a str,
    pub bridge: &'a str,
    pub subnet: Cidr,
    pub address: Ipv4Addr,
    pub owner: u32,
    pub contract: &'a ParsedContract,
    pub resolvers: &'a [IpAddr],
}

/// The nftables table (in the `inet` and `bridge` families) that holds every Tartarus rule.
pub(crate) const TABLE: &str = "tartarus";

/// The comment that marks a sandbox's rules: gc and cleanup find them by it.
pub(crate) fn rule_comment(id: &str, owner: u32, address: Ipv4Addr) -> String {
    format!("tartarus id={id} owner={owner} addr={address}")
}

pub(crate) fn chain_name(id: &str) -> String {
    format!("sb_{id}")
}

fn family(cidr: &Cidr) -> &'static str {
    if cidr.is_ipv4() {
        "ip"
    } else {
        "ip6"
    }
}

fn addr_family(addr: &IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "ip"
    } else {
        "ip6"
    }
}

fn set_of<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The one `nft -f` transaction that installs a sandbox: its contract chain, the jumps to it from the
/// shared forward and input chains, and its anti-spoofing chain on the bridge port.
pub(crate) fn render_install(r: &SandboxRules<'_>) -> String {
    let chain = chain_name(r.id);
    let comment = rule_comment(r.id, r.owner, r.address);
    let bridge = r.bridge;
    let c = r.contract;
    let mut out = String::new();
    let mut rule = |text: &str| {
        let _ = writeln!(out, "add rule inet {TABLE} {chain} {text}");
    };
    let rate =
        (c.rate_limit_kbps > 0).then(|| format!("limit rate over {} kbytes/second drop", c.rate_limit_kbps));
    // Towards the sandbox: only replies, within the rate limit.
    if let Some(rate) = &rate {
        rule(&format!("oifname \"{bridge}\" {rate}"));
    }
    rule(&format!(
        "oifname \"{bridge}\" ct state established,related accept"
    ));
    rule(&format!("oifname \"{bridge}\" drop"));
    // From the sandbox.
    if let Some(rate) = &rate {
        rule(rate);
    }
    rule("ct state established,related accept");
    rule(&format!(
        "ip daddr {} counter drop comment \"bridge network\"",
        r.subnet
    ));
    if c.deny_metadata {
        for m in METADATA_RANGES {
            rule(&format!(
                "{} daddr {m} counter drop comment \"metadata\"",
                family(m)
            ));
        }
    }
    for d in &c.denied {
        rule(&format!(
            "{} daddr {d} counter drop comment \"denied\"",
            family(d)
        ));
    }
    if c.dns {
        for resolver in r.resolvers {
            rule(&format!(
                "meta l4proto {{ tcp, udp }} th dport 53 {} daddr {resolver} accept",
                addr_family(resolver)
            ));
        }
    }
    rule("meta l4proto { tcp, udp } th dport 53 counter drop comment \"dns\"");
    rule("fib daddr type { local, broadcast, multicast } counter drop comment \"host\"");
    if c.deny_private {
        for p in PRIVATE_RANGES {
            rule(&format!(
                "{} daddr {p} counter drop comment \"private\"",
                family(p)
            ));
        }
    }
    if !c.allowed.is_empty() {
        for (fam, nfproto) in [("ip", "ipv4"), ("ip6", "ipv6")] {
            let allowed: Vec<&Cidr> = c.allowed.iter().filter(|a| family(a) == fam).collect();
            match allowed.is_empty() {
                true => rule(&format!(
                    "meta nfproto {nfproto} counter drop comment \"not allowed\""
                )),
                false => rule(&format!(
                    "{fam} daddr != {} counter drop comment \"not allowed\"",
                    set_of(allowed)
                )),
            }
        }
    }
    if !c.ports.is_empty() {
        rule(&format!(
            "meta l4proto {{ tcp, udp }} th dport != {} counter drop comment \"port\"",
            set_of(&c.ports)
        ));
    }
    rule("accept");

    let mut head = format!("add chain inet {TABLE} {chain}\n");
    head.push_str(&out);
    let a = r.address;
    for jump in [
        format!("forward iifname \"{bridge}\" ip saddr {a}"),
        format!("forward oifname \"{bridge}\" ip daddr {a}"),
        format!("input iifname \"{bridge}\" ip saddr {a}"),
    ] {
        let _ = writeln!(
            head,
            "insert rule inet {TABLE} {jump} jump {chain} comment \"{comment}\""
        );
    }
    // The bridge port may only speak IPv4 and ARP from its own address, so the address the inet rules
    // key on cannot be borrowed by another sandbox.
    let _ = writeln!(head, "add chain bridge {TABLE} {chain}");
    for text in [
        format!("ether type arp arp saddr ip != {a} drop"),
        format!("ether type ip ip saddr != {a} drop"),
        "ether type != { ip, arp } drop".to_string(),
    ] {
        let _ = writeln!(head, "add rule bridge {TABLE} {chain} {text}");
    }
    let _ = writeln!(
        head,
        "add rule bridge {TABLE} prerouting iifname \"{}\" jump {chain} comment \"{comment}\"",
        r.veth
    );
    head
}

/// The shared tables, created once per network namespace (`inet`, then `bridge`): default drops for the
/// bridge, so a port without rules reaches nothing, and the masquerade for the bridge network.
pub(crate) fn render_base(bridge: &str, subnet: Cidr) -> (String, String) {
    let inet = format!(
        "add table inet {TABLE}\n\
         add chain inet {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}\n\
         add rule inet {TABLE} forward iifname \"{bridge}\" drop\n\
         add rule inet {TABLE} forward oifname \"{bridge}\" drop\n\
         add chain inet {TABLE} input {{ type filter hook input priority filter; policy accept; }}\n\
         add rule inet {TABLE} input iifname \"{bridge}\" drop\n\
         add chain inet {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         add rule inet {TABLE} postrouting ip saddr {subnet} oifname != \"{bridge}\" masquerade\n"
    );
    let bridge_table = format!(
        "add table bridge {TABLE}\n\
         add chain bridge {TABLE} prerouting {{ type filter hook prerouting priority filter; policy accept; }}\n"
    );
    (inet, bridge_table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract() -> EgressContract {
        EgressContract {
            allowed_cidrs: vec!["203.0.113.0/24".into()],
            denied_cidrs: vec!["203.0.113.66/32".into()],
            allowed_ports: vec![443, 80, 80],
            ..EgressContract::default()
        }
    }

    fn render(c: &EgressContract, resolvers: &[IpAddr]) -> String {
        let parsed = c.parsed().unwrap();
        render_install(&SandboxRules {
            id: "abc123",
            veth: "ttabc123",
            bridge: "tartarus0",
            subnet: Cidr::parse("10.88.0.0/16").unwrap(),
            address: "10.88.0.2".parse().unwrap(),
            owner: 42,
            contract: &parsed,
            resolvers,
        })
    }

    #[test]
    fn defaults_deny_private_and_metadata() {
        let c: EgressContract = serde_json::from_str("{}").unwrap();
        assert!(c.deny_private && c.deny_metadata && !c.dns);
        assert_eq!(c, EgressContract::default());
    }

    #[test]
    fn bad_cidrs_name_the_field() {
        let mut c = contract();
        c.denied_cidrs.push("10.0.0.1/8".into());
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "denied CIDR: '10.0.0.1/8' has host bits set: the network is 10.0.0.0/8"
        );
        let mut c = contract();
        c.allowed_ports.push(0);
        assert_eq!(c.validate(), Err(ContractError::PortZero));
    }

    #[test]
    fn denials_come_before_the_allowlist_and_ports() {
        let text = render(&contract(), &[]);
        let pos = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("{needle} in\n{text}"));
        assert!(pos("169.254.169.254") < pos("203.0.113.66/32 counter drop"));
        assert!(pos("203.0.113.66/32 counter drop") < pos("10.0.0.0/8 counter drop"));
        assert!(pos("10.0.0.0/8 counter drop") < pos("ip daddr != { 203.0.113.0/24 }"));
        assert!(pos("meta nfproto ipv6 counter drop") < pos("th dport != { 80, 443 }"));
        assert!(text.contains("th dport 53 counter drop"));
        assert!(!text.contains("limit rate"));
        assert!(text.contains("comment \"tartarus id=abc123 owner=42 addr=10.88.0.2\""));
        assert!(text.contains("prerouting iifname \"ttabc123\" jump sb_abc123"));
    }

    #[test]
    fn dns_is_accepted_only_to_resolvers_and_before_the_private_drop() {
        let mut c = contract();
        c.dns = true;
        let text = render(&c, &["10.255.255.53".parse().unwrap()]);
        let accept = text.find("th dport 53 ip daddr 10.255.255.53 accept").unwrap();
        assert!(accept < text.find("th dport 53 counter drop").unwrap());
        assert!(accept < text.find("10.0.0.0/8 counter drop").unwrap());
    }

    #[test]
    fn test_the_host_itself_is_dropped_after_dns_and_before_anything_that_accepts() {
        let host = "fib daddr type { local, broadcast, multicast } counter drop comment \"host\"";
        for c in [
            contract(),
            EgressContract {
                deny_private: false,
                dns: true,
                ..EgressContract::default()
            },
        ] {
            let text = render(&c, &["203.0.113.1".parse().unwrap()]);
            let pos = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("{needle} in\n{text}"));
            assert!(pos("th dport 53 counter drop") < pos(host));
            if c.dns {
                assert!(pos("th dport 53 ip daddr 203.0.113.1 accept") < pos(host));
            }
            let rules: Vec<&str> = text.lines().filter(|l| l.starts_with("add rule inet")).collect();
            let at = rules
                .iter()
                .position(|r| r.ends_with(host))
                .expect("the host rule");
            // Before it, only replies and DNS to the resolvers are accepted.
            for r in &rules[..at] {
                if r.ends_with(" accept") {
                    assert!(
                        r.contains("established") || r.contains("th dport 53 ip daddr"),
                        "{r}"
                    );
                }
            }
            assert!(rules.last().is_some_and(|r| r.ends_with("sb_abc123 accept")));
            // The input hook jumps to this chain: the host rule is what stops it there.
            assert!(text.contains("input iifname \"tartarus0\" ip saddr 10.88.0.2 jump sb_abc123"));
        }
    }

    #[test]
    fn rate_limit_applies_both_ways() {
        let c = EgressContract {
            rate_limit_kbps: 64,
            deny_private: false,
            ..EgressContract::default()
        };
        let text = render(&c, &[]);
        assert_eq!(text.matches("limit rate over 64 kbytes/second drop").count(), 2);
        assert!(!text.contains("\"private\""));
        assert!(!text.contains("not allowed"));
    }
}
