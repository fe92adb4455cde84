//! The guest's NIC for an egress sandbox: `eth0` (virtio-net) gets the sandbox's address, its prefix and
//! a default route through the host's sandbox bridge, as the host put them on the kernel command line
//! (`tartarus.net=ADDRESS/PREFIX,GATEWAY`). Set with the classic ioctls: no netlink, no tools in the
//! guest.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// The address, prefix and gateway of `tartarus.net=10.88.0.5/16,10.88.0.1`.
pub fn parse(value: &str) -> Option<(Ipv4Addr, u8, Ipv4Addr)> {
    let (cidr, gateway) = value.split_once(',')?;
    let (address, prefix) = cidr.split_once('/')?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    Some((address.parse().ok()?, prefix, gateway.parse().ok()?))
}

fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the bytes are a valid sockaddr for AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn ioctl<T>(socket: &OwnedFd, request: libc::c_ulong, argument: &mut T, what: &str) -> Result<(), String> {
    // SAFETY: `argument` is the structure this request reads and writes (ifreq or rtentry), valid for its
    // whole size.
    if unsafe { libc::ioctl(socket.as_raw_fd(), request, argument as *mut T) } == -1 {
        return Err(format!("{what}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Configures `name` with `address/prefix`, brings it up and routes everything through `gateway`.
pub fn configure(name: &str, address: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Result<(), String> {
    let present = super::wait_for(|| Path::new("/sys/class/net").join(name).exists().then_some(()));
    present.ok_or_else(|| format!("the NIC {name} did not appear (is virtio_net loaded?)"))?;
    // SAFETY: socket() has no memory preconditions; the result is checked and owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw == -1 {
        return Err(format!(
            "a socket to configure {name}: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let request = || {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req
    };
    let mut req = request();
    req.ifr_ifru.ifru_addr = sockaddr(address);
    ioctl(&socket, libc::SIOCSIFADDR, &mut req, "setting the address")?;
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let mut req = request();
    req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    ioctl(&socket, libc::SIOCSIFNETMASK, &mut req, "setting the netmask")?;
    let mut req = request();
    ioctl(&socket, libc::SIOCGIFFLAGS, &mut req, "reading the NIC's flags")?;
    // SAFETY: reading the flags member that SIOCGIFFLAGS just filled.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(&socket, libc::SIOCSIFFLAGS, &mut req, "bringing the NIC up")?;
    // SAFETY: rtentry is plain old data; all-zero is a valid value (the default destination and mask).
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(&socket, libc::SIOCADDRT, &mut route, "adding the default route")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_nic_setting_is_parsed_and_bad_ones_are_none() {
        assert_eq!(
            parse("10.88.0.5/16,10.88.0.1"),
            Some((Ipv4Addr::new(10, 88, 0, 5), 16, Ipv4Addr::new(10, 88, 0, 1)))
        );
        for bad in ["10.88.0.5/16", "10.88.0.5/33,10.88.0.1", "x/16,10.88.0.1", ""] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
