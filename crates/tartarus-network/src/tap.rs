//! A sandbox network for a virtual machine: the namespace's `eth0` becomes a port of a bridge `br0`
//! inside the namespace, together with a TAP device `tap0` whose descriptor goes to the VMM, so the
//! guest's NIC is the host on the sandbox's address and every packet it sends crosses the sandbox's
//! veth and its contract exactly as a process lane sandbox's would. The namespace itself keeps no
//! address (the guest has it).
//!
//! The TAP is not persistent: it exists while a descriptor of it is open (the supervisor's until the VMM
//! has its own, then the VMM's), and goes with the namespace in any case.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::host::Tools;
use crate::{netns_name, NetworkConfig, NetworkError, SandboxNetwork};

/// The TAP device's name inside the sandbox's namespace.
pub const TAP_NAME: &str = "tap0";

/// What the guest configures on its NIC: the sandbox's address and prefix, and its default gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestAddress {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

impl GuestAddress {
    /// A locally administered unicast MAC from the address, unique on the host bridge as the address is.
    pub fn mac(&self) -> String {
        let [a, b, c, d] = self.address.octets();
        format!("02:54:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
    }
}

// linux/if_tun.h
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

impl SandboxNetwork {
    /// Moves the namespace's address to a VM: bridges `eth0` with a new TAP device and returns the TAP's
    /// descriptor (for the VMM's `-netdev tap,fd=`) and what the guest sets on its NIC.
    pub fn attach_tap(&self, config: &NetworkConfig) -> Result<(OwnedFd, GuestAddress), NetworkError> {
        let netns = self.netns().ok_or(NetworkError::Host {
            what: "attaching a VM: the sandbox's network namespace is gone",
            source: io::Error::from_raw_os_error(libc::ENOENT),
        })?;
        let tap = open_tap_in(netns.try_clone_to_owned().map_err(|source| NetworkError::Host {
            what: "attaching a VM: duplicating the namespace's descriptor",
            source,
        })?)?;
        let tools = Tools::find()?;
        let inside = format!(
            "addr flush dev eth0\n\
             link add br0 type bridge\n\
             link set dev eth0 master br0\n\
             link set dev {TAP_NAME} master br0\n\
             link set dev {TAP_NAME} up\n\
             link set dev br0 up\n"
        );
        tools.ip_batch(&netns_name(&self.id), &inside)?;
        Ok((
            tap,
            GuestAddress {
                address: self.address,
                prefix: config.subnet.prefix(),
                gateway: config.gateway,
            },
        ))
    }
}

/// Creates [`TAP_NAME`] in `netns` and returns its descriptor: a thread of its own joins the namespace
/// (a TAP belongs to the namespace it is created in), so no other thread ever changes namespace.
fn open_tap_in(netns: OwnedFd) -> Result<OwnedFd, NetworkError> {
    let host = |what: &'static str| move |source: io::Error| NetworkError::Host { what, source };
    std::thread::spawn(move || -> io::Result<OwnedFd> {
        // SAFETY: setns on a namespace descriptor this thread owns; only this thread changes namespace.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } == -1 {
            return Err(io::Error::last_os_error());
        }
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in request.ifr_name.iter_mut().zip(TAP_NAME.bytes()) {
            *dst = src as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: `request` is a valid ifreq naming the device; TUNSETIFF reads and writes only it.
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut request) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(tun.into())
    })
    .join()
    .map_err(|_| host("creating the VM's TAP device")(io::Error::other("the thread panicked")))?
    .map_err(host("creating the VM's TAP device (/dev/net/tun; modprobe tun)"))
}
