//! Egress for a microVM: the sandbox's network namespace and contract, exactly as the other lanes get
//! them ([`tartarus_network::SandboxNetwork`]), with the namespace's address handed to the guest through
//! a TAP device (`SandboxNetwork::attach_tap`). QEMU gets only the TAP's descriptor (`-netdev
//! tap,fd=N`) and stays in its own empty network namespace; the guest's virtio-net NIC is configured by
//! the agent from the kernel command line.

use std::ffi::OsString;
use std::net::IpAddr;
use std::os::fd::RawFd;

use tartarus_network::{EgressContract, GuestAddress, NetworkConfig, SandboxNetwork};

use super::confine::Inherited;
use crate::sandbox::PrepareError;

/// A microVM's network: the namespace, veth and rules, and what the guest and QEMU are told.
pub(super) struct Egress {
    pub network: SandboxNetwork,
    tap_fd: RawFd,
    guest: GuestAddress,
    dns: Vec<IpAddr>,
}

impl Egress {
    /// Creates the sandbox `id`'s network under `contract` and passes its TAP to QEMU through
    /// `inherited`. On failure nothing of it is left.
    pub fn attach(
        id: &str,
        contract: &EgressContract,
        inherited: &mut Inherited,
    ) -> Result<Egress, PrepareError> {
        let config = NetworkConfig::from_env()?;
        let resolvers = match contract.dns {
            true => tartarus_network::host_resolvers(),
            false => Vec::new(),
        };
        tartarus_network::collect_garbage();
        let mut network = SandboxNetwork::create(id, contract, &config, &resolvers)?;
        let (tap, guest) = match network.attach_tap(&config) {
            Ok(attached) => attached,
            Err(e) => {
                let _ = network.remove();
                return Err(e.into());
            }
        };
        let (tap_fd, _) = inherited.add_fd(tap);
        Ok(Egress {
            network,
            tap_fd,
            guest,
            dns: resolvers.into_iter().filter(IpAddr::is_ipv4).collect(),
        })
    }

    /// QEMU's NIC: virtio-mmio, on the TAP, with a MAC unique on the host's sandbox bridge.
    pub fn qemu_args(&self) -> Vec<OsString> {
        vec![
            "-netdev".into(),
            format!("tap,id=net0,fd={},vhost=off", self.tap_fd).into(),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", self.guest.mac()).into(),
        ]
    }

    /// The agent's settings on the kernel command line: `tartarus.net=` and `tartarus.dns=`.
    pub fn cmdline(&self) -> String {
        let g = &self.guest;
        let mut line = format!(" tartarus.net={}/{},{}", g.address, g.prefix, g.gateway);
        if !self.dns.is_empty() {
            let dns: Vec<String> = self.dns.iter().map(IpAddr::to_string).collect();
            line.push_str(&format!(" tartarus.dns={}", dns.join(",")));
        }
        line
    }
}
