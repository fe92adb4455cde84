//! Per-sandbox network contracts: the topology and firewall rules that give a sandbox filtered egress.
//!
//! Place in the data flow: the runtime's `prepare` calls [`SandboxNetwork::create`] for a sandbox whose
//! spec asks for egress; `start` makes the sandbox join the namespace it created ([`SandboxNetwork::netns`]),
//! and `cleanup` calls [`SandboxNetwork::remove`]. `gc` calls [`collect_garbage`] for supervisors that died.
//!
//! Topology, in the network namespace where the supervisor runs: a bridge `tartarus0` (10.88.0.1/16 unless
//! `TARTARUS_BRIDGE_CIDR` says otherwise), created on first use; per sandbox a named network namespace
//! `tartarus-<id>` with loopback and `eth0` (the next free address, default route via the bridge), whose
//! peer `tt<id>` is an *isolated* bridge port, so sandboxes cannot reach each other at layer 2. The
//! namespace belongs to the initial user namespace, so the sandbox (without capabilities there) cannot
//! change its addresses or routes.
//!
//! Rules live in one nftables table, `tartarus`, in the `inet` family (masquerade of the bridge network,
//! forward and input chains that jump to the per-sandbox contract chain `sb_<id>`) and the `bridge` family
//! (per-port anti-spoofing). Routed packets carry the bridge, not the port, as their input interface, so
//! the inet rules key on the sandbox's source address, and the bridge rules — keyed on the port (`iifname`)
//! — guarantee that only that port can use it.
//!
//! Why the `ip` and `nft` programs rather than netlink from Rust: the nft language is nftables' stable,
//! documented interface (its netlink encoding is an implementation detail that changes between kernel and
//! libnftnl versions), `nft -f -` applies a whole ruleset as one atomic transaction — a sandbox's rules
//! appear and disappear all at once — and the Rust netlink crates for nftables are thin or unmaintained.
//! `ip` (iproute2) is the reference netlink client for links, addresses, routes and named namespaces. Both
//! run only in `prepare`, `cleanup` and `gc`, never on the sandbox start path.

pub mod cidr;
mod contract;
mod host;
mod tap;

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

pub use self::cidr::{Cidr, CidrError, ANYWHERE, METADATA_RANGES, PRIVATE_RANGES};
use self::contract::{chain_name, SandboxRules, TABLE};
pub use self::contract::{ContractError, EgressContract};
use self::host::{Tools, TransactionLock};
pub use self::tap::{GuestAddress, TAP_NAME};

/// Name of the host bridge every egress sandbox is a port of.
pub const BRIDGE: &str = "tartarus0";
/// The bridge's address and network unless `TARTARUS_BRIDGE_CIDR` overrides it.
pub const DEFAULT_BRIDGE_CIDR: &str = "10.88.0.1/16";
/// Prefix of the named network namespaces of sandboxes (`ip netns list`).
pub const NETNS_PREFIX: &str = "tartarus-";

/// Setting up, inspecting or removing a sandbox's network failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "network egress needs root: it creates a network namespace, a veth pair and nftables rules on the \
         host (run as root, or use --network none)"
    )]
    NeedsRoot,
    #[error("network egress needs the `{program}` program (Debian package {package}), not found in PATH")]
    ToolMissing {
        program: &'static str,
        package: &'static str,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("TARTARUS_BRIDGE_CIDR '{value}' must be the bridge's IPv4 address with a prefix of 8 to 30 bits, e.g. 10.88.0.1/16")]
    BridgeCidr { value: String },
    #[error("no free address left in the sandbox network {0}")]
    AddressesExhausted(Cidr),
    #[error("sandbox id '{0}' cannot name network objects (1-12 letters or digits)")]
    Id(String),
    #[error(transparent)]
    Contract(#[from] ContractError),
    #[error("{what}")]
    Host {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Where sandbox networks are attached: the bridge and its IPv4 network.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub bridge: String,
    /// The bridge's own address: every sandbox's gateway.
    pub gateway: Ipv4Addr,
    pub subnet: Cidr,
}

impl NetworkConfig {
    /// The defaults, with the bridge address from `TARTARUS_BRIDGE_CIDR` when set (tests use their own
    /// range).
    pub fn from_env() -> Result<NetworkConfig, NetworkError> {
        let value = std::env::var("TARTARUS_BRIDGE_CIDR").unwrap_or_else(|_| DEFAULT_BRIDGE_CIDR.into());
        NetworkConfig::parse(&value)
    }

    /// A config for the bridge address `value` (`10.88.0.1/16`).
    pub fn parse(value: &str) -> Result<NetworkConfig, NetworkError> {
        let bad = || NetworkError::BridgeCidr {
            value: value.to_string(),
        };
        let (addr, prefix) = value.split_once('/').ok_or_else(bad)?;
        let gateway: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let subnet = Cidr::containing(IpAddr::V4(gateway), prefix).ok_or_else(bad)?;
        if !subnet.ipv4_hosts().any(|h| h == gateway) {
            return Err(bad());
        }
        Ok(NetworkConfig {
            bridge: BRIDGE.to_string(),
            gateway,
            subnet,
        })
    }
}

/// The live network of one sandbox: its namespace (held open), veth and rules. Remove it with
/// [`SandboxNetwork::remove`]; dropping it without removing leaves the pieces for [`collect_garbage`].
#[derive(Debug)]
pub struct SandboxNetwork {
    id: String,
    address: Ipv4Addr,
    netns: Option<OwnedFd>,
    resolvers: Vec<IpAddr>,
    removed: bool,
}

impl SandboxNetwork {
    /// Builds the sandbox's namespace, veth and rules (bridge, table and forwarding on first use), for
    /// the supervisor `owner`. On failure everything created so far is removed again.
    pub fn create(
        id: &str,
        contract: &EgressContract,
        config: &NetworkConfig,
        resolvers: &[IpAddr],
    ) -> Result<SandboxNetwork, NetworkError> {
        let contract = contract.parsed()?;
        if !rustix::process::geteuid().is_root() {
            return Err(NetworkError::NeedsRoot);
        }
        if id.is_empty() || id.len() > 12 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(NetworkError::Id(id.to_string()));
        }
        let tools = Tools::find()?;
        let resolvers: Vec<IpAddr> = match contract.dns {
            true => resolvers.to_vec(),
            false => Vec::new(),
        };
        let owner = std::process::id();
        let mut network = SandboxNetwork {
            id: id.to_string(),
            address: Ipv4Addr::UNSPECIFIED,
            netns: None,
            resolvers,
            removed: false,
        };
        // From the first rule on, `remove` knows how to undo whatever exists.
        let result = (|| {
            let lock = TransactionLock::acquire()?;
            host::enable_forwarding()?;
            host::ensure_bridge(&tools, config)?;
            host::ensure_table(&tools, config)?;
            network.address = host::free_address(&tools, config)?;
            let rules = contract::render_install(&SandboxRules {
                id,
                veth: &veth_name(id),
                bridge: &config.bridge,
                subnet: config.subnet,
                address: network.address,
                owner,
                contract: &contract,
                resolvers: &network.resolvers,
            });
            tools.nft_apply(&rules)?;
            drop(lock);
            network.netns = Some(host::create_namespace(&tools, config, id, network.address)?);
            Ok(())
        })();
        match result {
            Ok(()) => Ok(network),
            Err(e) => {
                let _ = network.remove();
                Err(e)
            }
        }
    }

    /// The sandbox's network namespace, to `setns` into before creating the sandbox's processes.
    pub fn netns(&self) -> Option<BorrowedFd<'_>> {
        self.netns.as_ref().map(|fd| fd.as_fd())
    }

    /// The sandbox's address on `eth0`.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// Packets dropped by the contract so far (counters of the drop rules).
    pub fn blocked_packets(&self) -> io::Result<u64> {
        blocked_packets(&self.id)
    }

    /// Cuts the sandbox off (quarantine): its chain is replaced, in one transaction, by a single counted
    /// drop, so nothing leaves or enters any more; the namespace stays for inspection until removal.
    pub fn isolate(&self) -> Result<(), NetworkError> {
        let tools = Tools::find()?;
        let chain = chain_name(&self.id);
        tools.nft_apply(&format!(
            "flush chain inet {TABLE} {chain}\nadd rule inet {TABLE} {chain} counter drop\n"
        ))
    }

    /// Removes the namespace, veth and rules; idempotent, and tolerant of pieces already gone.
    pub fn remove(&mut self) -> Result<(), NetworkError> {
        if self.removed {
            return Ok(());
        }
        self.netns = None;
        let result = remove_sandbox(&self.id);
        self.removed = result.is_ok();
        result
    }
}

/// The host end of the sandbox's veth pair (at most 15 bytes: `tt` and a 12-character id).
pub fn veth_name(id: &str) -> String {
    format!("tt{id}")
}

/// The named network namespace of a sandbox.
pub fn netns_name(id: &str) -> String {
    format!("{NETNS_PREFIX}{id}")
}

/// Packets dropped by the contract of sandbox `id` so far (the sum of its drop rules' counters).
pub fn blocked_packets(id: &str) -> io::Result<u64> {
    let tools = Tools::find().map_err(io::Error::other)?;
    let json = tools
        .nft_json(&["list", "chain", "inet", TABLE, &chain_name(id)])
        .map_err(io::Error::other)?;
    Ok(host::sum_counters(&json))
}

fn remove_sandbox(id: &str) -> Result<(), NetworkError> {
    let tools = Tools::find()?;
    // The namespace first, the rules last: a namespace never exists without its rules, which carry the
    // owner that gc checks.
    let mut first_error = host::delete_link(&tools, &veth_name(id)).err();
    if let Err(e) = host::delete_namespace(&tools, &netns_name(id)) {
        first_error.get_or_insert(e);
    }
    if let Err(e) = host::delete_rules(&tools, id) {
        first_error.get_or_insert(e);
    }
    first_error.map_or(Ok(()), Err)
}

/// Removes the networks of sandboxes whose supervisor is gone, in this network namespace; returns what
/// was removed (one entry per namespace and per chain). Quiet when egress was never used here.
pub fn collect_garbage() -> Vec<PathBuf> {
    let Ok(tools) = Tools::find() else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for (id, owner) in host::sandbox_owners(&tools) {
        if tartarus_hostsys::process_exists(owner as i32) {
            continue;
        }
        if remove_sandbox(&id).is_ok() {
            removed.push(PathBuf::from(format!("/run/netns/{}", netns_name(&id))));
            removed.push(PathBuf::from(format!("nft:{TABLE}/{}", chain_name(&id))));
        }
    }
    removed
}

/// The host's DNS resolvers from `/etc/resolv.conf` that a sandbox can reach (loopback resolvers, such
/// as systemd-resolved's 127.0.0.53, cannot be reached from another network namespace).
pub fn host_resolvers() -> Vec<IpAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    parse_resolvers(&text)
}

fn parse_resolvers(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words
            .next()
            .and_then(|w| w.split('%').next()?.parse::<IpAddr>().ok())
        else {
            continue;
        };
        let link_local_v6 = matches!(addr, IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80);
        if !addr.is_loopback() && !addr.is_unspecified() && !link_local_v6 && !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// The `resolv.conf` a sandbox with egress sees: the resolvers it may use, or why it has none.
pub fn resolv_conf(contract: &EgressContract, resolvers: &[IpAddr]) -> String {
    if !contract.dns {
        return "# DNS is not part of this sandbox's network contract (tartarus run --dns)\n".into();
    }
    if resolvers.is_empty() {
        return "# the host has no resolver a sandbox can reach (loopback resolvers are not reachable)\n"
            .into();
    }
    resolvers.iter().map(|r| format!("nameserver {r}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolvers_skip_loopback_and_duplicates() {
        let text = "# c\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver 10.255.255.53\n\
                    nameserver fe80::1%eth0\nnameserver 2001:db8::53\nsearch example\n";
        let got: Vec<String> = parse_resolvers(text).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["10.255.255.53", "2001:db8::53"]);
    }

    #[test]
    fn bridge_cidr_must_be_a_host_address_with_a_sane_prefix() {
        let parse = NetworkConfig::parse;
        let config = parse("10.99.0.1/24").unwrap();
        assert_eq!(config.subnet.to_string(), "10.99.0.0/24");
        assert_eq!(config.gateway, Ipv4Addr::new(10, 99, 0, 1));
        for bad in ["10.99.0.0/24", "10.99.0.1", "10.99.0.1/31", "::1/64", "x/24"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_fit_the_kernel_limits() {
        assert_eq!(veth_name("0123456789ab").len(), 14);
        assert_eq!(netns_name("ab"), "tartarus-ab");
    }
}
