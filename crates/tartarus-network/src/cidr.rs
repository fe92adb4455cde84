//! IP networks in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`), and the ranges denied by default — one type
//! for network contracts and the policy engine.
//!
//! A [`Cidr`] is always canonical: its address has no bits set below the prefix (`10.0.0.1/8` is refused,
//! naming `10.0.0.0/8`), so two equal networks compare and serialise equal.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 or IPv6 network: an address with no host bits set and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a text is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// No `/PREFIX`.
    #[error("'{0}' has no prefix length: write it as ADDRESS/PREFIX, e.g. 10.0.0.0/8 or 192.0.2.7/32")]
    NoPrefix(String),
    /// The part before `/` is not an address.
    #[error("'{0}' is not an IPv4 or IPv6 address")]
    Address(String),
    /// The prefix is not a number within the address family's width.
    #[error("'{text}' has prefix length '{prefix}': use 0-{max}")]
    #[allow(missing_docs)]
    Prefix { text: String, prefix: String, max: u8 },
    /// Bits below the prefix are set; `network` is what was probably meant.
    #[error("'{text}' has host bits set: the network is {network}")]
    #[allow(missing_docs)]
    HostBits { text: String, network: Cidr },
}

impl Cidr {
    /// An IPv4 network; `None` when the prefix is over 32 or host bits are set.
    pub const fn v4(octets: [u8; 4], prefix: u8) -> Option<Cidr> {
        let bits = u32::from_be_bytes(octets);
        if prefix > 32 || bits & !mask32(prefix) != 0 {
            return None;
        }
        Some(Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3])),
            prefix,
        })
    }

    /// An IPv6 network; `None` when the prefix is over 128 or host bits are set.
    pub const fn v6(addr: Ipv6Addr, prefix: u8) -> Option<Cidr> {
        if prefix > 128 || addr.to_bits() & !mask128(prefix) != 0 {
            return None;
        }
        Some(Cidr {
            addr: IpAddr::V6(addr),
            prefix,
        })
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length (0-32 for IPv4, 0-128 for IPv6).
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in this network (an IPv4 address is never in an IPv6 network, nor the reverse).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => (ip.to_bits() ^ net.to_bits()) & mask32(self.prefix) == 0,
            (IpAddr::V6(net), IpAddr::V6(ip)) => (ip.to_bits() ^ net.to_bits()) & mask128(self.prefix) == 0,
            _ => false,
        }
    }

    /// `ADDRESS/PREFIX`, or a bare address as a single host (`/32`, `/128`): the command line's form.
    /// ([`FromStr`] insists on the prefix, as policy files do.)
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let text = text.trim();
        if text.contains('/') {
            return text.parse();
        }
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => Ok(network_of(IpAddr::V4(v4), 32)),
            Ok(IpAddr::V6(v6)) => Ok(network_of(IpAddr::V6(v6), 128)),
            Err(_) => Err(CidrError::Address(text.to_string())),
        }
    }

    /// The network containing `addr` (host bits cleared), for building a block from an interface address.
    pub fn containing(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then(|| network_of(addr, prefix))
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The IPv4 addresses usable by hosts in this block (no network or broadcast address); empty for IPv6.
    pub fn ipv4_hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let (first, last) = match self.addr {
            IpAddr::V4(a) if self.prefix <= 30 => {
                let base = u32::from(a) as u64;
                let size = 1u64 << (32 - self.prefix);
                (base + 1, base + size - 2)
            }
            _ => (1, 0),
        };
        (first..=last).map(|n| Ipv4Addr::from(n as u32))
    }

    /// Whether the two networks share an address (one then contains the other).
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

const fn mask32(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - p as u32),
    }
}

const fn mask128(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => u128::MAX << (128 - p as u32),
    }
}

/// `const` unwrapping of the constructors above, for the tables below (a bad entry fails the build).
const fn net(cidr: Option<Cidr>) -> Cidr {
    match cidr {
        Some(cidr) => cidr,
        None => panic!("invalid built-in CIDR"),
    }
}

/// Denied when a policy's `network.deny_private` is true (the default): RFC 1918, carrier-grade NAT,
/// link-local (which holds the cloud metadata address) and their IPv6 counterparts (unique local,
/// link-local). Loopback is not here: it is the sandbox's own, in its own network namespace.
pub const PRIVATE_RANGES: &[Cidr] = &[
    net(Cidr::v4([10, 0, 0, 0], 8)),
    net(Cidr::v4([172, 16, 0, 0], 12)),
    net(Cidr::v4([192, 168, 0, 0], 16)),
    net(Cidr::v4([100, 64, 0, 0], 10)),
    net(Cidr::v4([169, 254, 0, 0], 16)),
    net(Cidr::v6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7)),
    net(Cidr::v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10)),
];

/// Denied when a policy's `network.deny_metadata` is true (the default): the cloud instance-metadata
/// endpoints (AWS, GCP, Azure, OpenStack on IPv4; AWS on IPv6), which hand out credentials.
pub const METADATA_RANGES: &[Cidr] = &[
    net(Cidr::v4([169, 254, 169, 254], 32)),
    net(Cidr::v6(
        Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254),
        128,
    )),
];

/// Every IPv4 and IPv6 address: what an empty `network.allowed_cidrs` means.
pub const ANYWHERE: &[Cidr] = &[
    net(Cidr::v4([0, 0, 0, 0], 0)),
    net(Cidr::v6(Ipv6Addr::UNSPECIFIED, 0)),
];

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let (addr, prefix_text) = text
            .split_once('/')
            .ok_or_else(|| CidrError::NoPrefix(text.to_string()))?;
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Address(text.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix_text
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max && !prefix_text.starts_with('+'))
            .ok_or_else(|| CidrError::Prefix {
                text: text.to_string(),
                prefix: prefix_text.to_string(),
                max,
            })?;
        let cidr = match addr {
            IpAddr::V4(v4) => Cidr::v4(v4.octets(), prefix),
            IpAddr::V6(v6) => Cidr::v6(v6, prefix),
        };
        cidr.ok_or_else(|| CidrError::HostBits {
            text: text.to_string(),
            network: network_of(addr, prefix),
        })
    }
}

/// The network `addr/prefix` belongs to (host bits cleared); `prefix` is in range.
fn network_of(addr: IpAddr, prefix: u8) -> Cidr {
    let addr = match addr {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from_bits(v4.to_bits() & mask32(prefix))),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask128(prefix))),
    };
    Cidr { addr, prefix }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    /// Parsed inside the visitor, so a YAML error points at the offending list item.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Cidr, D::Error> {
        struct CidrVisitor;
        impl Visitor<'_> for CidrVisitor {
            type Value = Cidr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CIDR such as 10.0.0.0/8 or 2001:db8::/32")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Cidr, E> {
                text.parse()
                    .map_err(|e: CidrError| E::custom(format!("invalid CIDR {e}")))
            }
        }
        deserializer.deserialize_str(CidrVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    #[test]
    fn test_parse_ipv4_and_ipv6_round_trip() {
        for text in [
            "10.0.0.0/8",
            "192.0.2.7/32",
            "0.0.0.0/0",
            "2001:db8::/32",
            "fd00:ec2::254/128",
            "::/0",
        ] {
            assert_eq!(cidr(text).to_string(), text);
        }
        assert_eq!(cidr("2001:DB8::/32").to_string(), "2001:db8::/32");
    }

    #[test]
    fn test_parse_rejects_host_bits_naming_the_network() {
        let err = "10.0.0.1/8".parse::<Cidr>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "'10.0.0.1/8' has host bits set: the network is 10.0.0.0/8"
        );
        let err = "2001:db8::1/32".parse::<Cidr>().unwrap_err();
        assert!(err.to_string().ends_with("the network is 2001:db8::/32"), "{err}");
    }

    #[test]
    fn test_parse_rejects_malformed() {
        for (text, want) in [
            ("10.0.0.0", "no prefix length"),
            ("10.0.0/8", "not an IPv4 or IPv6 address"),
            ("10.0.0.0/33", "use 0-32"),
            ("2001:db8::/129", "use 0-128"),
            ("10.0.0.0/-1", "use 0-32"),
            ("10.0.0.0/+8", "use 0-32"),
            ("10.0.0.0/", "use 0-32"),
            ("example.com/8", "not an IPv4 or IPv6 address"),
        ] {
            let err = text.parse::<Cidr>().unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn test_contains_and_overlaps() {
        let private = cidr("10.0.0.0/8");
        assert!(private.contains("10.1.2.3".parse().unwrap()));
        assert!(!private.contains("11.0.0.0".parse().unwrap()));
        assert!(!private.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(private.overlaps(&cidr("10.2.0.0/16")));
        assert!(cidr("10.2.0.0/16").overlaps(&private));
        assert!(!private.overlaps(&cidr("192.168.0.0/16")));
        assert!(cidr("::/0").contains("2001:db8::1".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn test_builtin_ranges_cover_metadata() {
        assert_eq!(PRIVATE_RANGES.len(), 7);
        let aws = "169.254.169.254".parse().unwrap();
        assert!(PRIVATE_RANGES.iter().any(|r| r.contains(aws)));
        assert!(METADATA_RANGES[0].contains(aws));
        assert_eq!(METADATA_RANGES[1].to_string(), "fd00:ec2::254/128");
        assert!(!PRIVATE_RANGES
            .iter()
            .any(|r| r.contains("127.0.0.1".parse().unwrap())));
    }

    #[test]
    fn the_command_line_form_takes_bare_addresses_and_hosts_are_listed() {
        assert_eq!(
            Cidr::parse("198.51.100.7").unwrap().to_string(),
            "198.51.100.7/32"
        );
        assert_eq!(Cidr::parse("fd00:ec2::254").unwrap().prefix(), 128);
        assert!(matches!(
            Cidr::parse("10.0.0.1/8"),
            Err(CidrError::HostBits { .. })
        ));
        assert!(Cidr::parse("example.com").is_err());
        let net = Cidr::parse("10.88.0.0/30").unwrap();
        let hosts: Vec<_> = net.ipv4_hosts().map(|a| a.to_string()).collect();
        assert_eq!(hosts, ["10.88.0.1", "10.88.0.2"]);
        assert_eq!(
            Cidr::containing("10.88.0.9".parse().unwrap(), 24)
                .unwrap()
                .to_string(),
            "10.88.0.0/24"
        );
    }
}
