//! IPv4 subnets of environments: one typed value, parsed and checked once
//! (by `kiln-spec`), then used by the planner (addresses) and the local
//! provider (bridges) alike.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The smallest prefix accepted: larger networks are a typo rather than a
/// plan, and server ids leave room for 65,536 servers at most.
pub const MIN_PREFIX: u8 = 16;
/// The largest prefix accepted: a /28 holds 13 servers.
pub const MAX_PREFIX: u8 = 28;

/// An IPv4 network such as `10.88.1.0/24`: the network address (no host
/// bits set) and a prefix between [`MIN_PREFIX`] and [`MAX_PREFIX`].
/// `.1` is the gateway (the host); servers take `.2` up to the last
/// address before the broadcast address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// Why a subnet was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubnetError {
    /// Not `A.B.C.D/N`.
    Syntax,
    /// The prefix is outside [`MIN_PREFIX`]..=[`MAX_PREFIX`].
    Prefix(u8),
    /// Host bits are set; the network address is given.
    HostBits(Ipv4Addr),
}

impl fmt::Display for SubnetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubnetError::Syntax => write!(f, "expected an IPv4 network like 10.88.1.0/24"),
            SubnetError::Prefix(p) => write!(
                f,
                "prefix /{p} is out of range; expected /{MIN_PREFIX} to /{MAX_PREFIX}"
            ),
            SubnetError::HostBits(n) => {
                write!(f, "host bits are set; the network address is {n}")
            }
        }
    }
}

impl std::error::Error for SubnetError {}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl Subnet {
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Subnet, SubnetError> {
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return Err(SubnetError::Prefix(prefix));
        }
        let masked = Ipv4Addr::from(u32::from(network) & mask(prefix));
        if masked != network {
            return Err(SubnetError::HostBits(masked));
        }
        Ok(Subnet { network, prefix })
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// `.1`: the host's address on the environment's network.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// Server addresses, lowest first: `.2` up to broadcast − 1.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }

    /// How many servers fit.
    pub fn capacity(&self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix))) - 3
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.network)
    }

    /// Whether a server may take `addr`: inside, not the network, gateway
    /// or broadcast address.
    pub fn is_host(&self, addr: Ipv4Addr) -> bool {
        self.contains(addr)
            && addr != self.network
            && addr != self.gateway()
            && addr != self.broadcast()
    }

    pub fn overlaps(&self, other: &Subnet) -> bool {
        let p = self.prefix.min(other.prefix);
        u32::from(self.network) & mask(p) == u32::from(other.network) & mask(p)
    }
}

/// How many /24s the default pool (10.64.0.0/10) holds.
pub const DEFAULT_POOL: u32 = 16_384;

impl Subnet {
    /// The `i`-th /24 of the default pool, 10.64.0.0/10 (wrapping): where
    /// environments that declare no subnet get theirs.
    pub fn default_pool(i: u32) -> Subnet {
        let i = i % DEFAULT_POOL;
        let net = Ipv4Addr::new(10, 64 + (i / 256) as u8, (i % 256) as u8, 0);
        Subnet {
            network: net,
            prefix: 24,
        }
    }

    /// This subnet's index in the default pool, if it is one of its /24s.
    pub fn pool_index(&self) -> Option<u32> {
        let o = self.network.octets();
        (self.prefix == 24 && o[0] == 10 && (64..128).contains(&o[1]))
            .then(|| u32::from(o[1] - 64) * 256 + u32::from(o[2]))
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Subnet, SubnetError> {
        let (a, p) = s.split_once('/').ok_or(SubnetError::Syntax)?;
        let network: Ipv4Addr = a.parse().map_err(|_| SubnetError::Syntax)?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SubnetError::Syntax);
        }
        let prefix: u8 = p.parse().map_err(|_| SubnetError::Syntax)?;
        Subnet::new(network, prefix)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Serialize for Subnet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Subnet, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks_and_counts() {
        let s: Subnet = "10.88.1.0/24".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 88, 1, 1));
        assert_eq!(s.hosts().next(), Some(Ipv4Addr::new(10, 88, 1, 2)));
        assert_eq!(s.hosts().last(), Some(Ipv4Addr::new(10, 88, 1, 254)));
        assert_eq!(s.capacity(), 253);
        assert_eq!(s.hosts().count() as u32, s.capacity());
        assert!(s.is_host(Ipv4Addr::new(10, 88, 1, 9)));
        assert!(!s.is_host(Ipv4Addr::new(10, 88, 1, 255)));
        assert_eq!(s.to_string(), "10.88.1.0/24");
        assert_eq!(
            "10.88.1.5/24".parse::<Subnet>(),
            Err(SubnetError::HostBits(Ipv4Addr::new(10, 88, 1, 0)))
        );
        assert_eq!("10.0.0.0/8".parse::<Subnet>(), Err(SubnetError::Prefix(8)));
        assert_eq!(
            "10.0.0.0/30".parse::<Subnet>(),
            Err(SubnetError::Prefix(30))
        );
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/+24",
            "x/24",
            "10.0.0.0/024",
        ] {
            assert_eq!(bad.parse::<Subnet>(), Err(SubnetError::Syntax), "{bad}");
        }
    }

    #[test]
    fn overlap_is_symmetric() {
        let a: Subnet = "10.88.0.0/16".parse().unwrap();
        let b: Subnet = "10.88.7.0/24".parse().unwrap();
        let c: Subnet = "10.89.7.0/24".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!b.overlaps(&c) && !c.overlaps(&b));
    }
}
