//! IPv4 networks as the policy file writes them (`10.0.0.0/8`), with the
//! containment tests egress bounds need.

use std::net::Ipv4Addr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 network: an address with no bits past its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Net {
    /// Every IPv4 address.
    pub const ANY: Net = Net {
        addr: Ipv4Addr::UNSPECIFIED,
        prefix: 0,
    };

    /// The network of `addr/prefix`, host bits cleared; prefix capped at 32.
    pub const fn new(addr: Ipv4Addr, prefix: u8) -> Net {
        let prefix = if prefix > 32 { 32 } else { prefix };
        let bits = addr.to_bits() & mask(prefix);
        Net {
            addr: Ipv4Addr::from_bits(bits),
            prefix,
        }
    }

    /// A single address.
    pub const fn host(addr: Ipv4Addr) -> Net {
        Net { addr, prefix: 32 }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn first(&self) -> u32 {
        self.addr.to_bits()
    }

    fn last(&self) -> u32 {
        self.first() | !mask(self.prefix)
    }

    /// Is every address of `other` in `self`?
    pub fn contains(&self, other: &Net) -> bool {
        self.prefix <= other.prefix && other.first() & mask(self.prefix) == self.first()
    }

    /// Do the two share an address?
    pub fn overlaps(&self, other: &Net) -> bool {
        self.first() <= other.last() && other.first() <= self.last()
    }
}

const fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Net {
    type Err = String;

    /// `a.b.c.d/n` as documents write CIDRs (host bits must be clear), or
    /// a bare address for a /32.
    fn from_str(s: &str) -> Result<Net, String> {
        if let Ok(a) = s.parse::<Ipv4Addr>() {
            return Ok(Net::host(a));
        }
        match cellhost_spec::parse_cidr(s)? {
            cellhost_spec::Cidr::V4(a, p) => Ok(Net::new(a, p)),
            cellhost_spec::Cidr::V6(..) => Err(format!("{s} is IPv6; cells have IPv4 only")),
        }
    }
}

impl Serialize for Net {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Net, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Net {
        s.parse().unwrap()
    }

    #[test]
    fn containment_and_overlap() {
        assert!(Net::ANY.contains(&n("10.0.0.0/8")));
        assert!(n("10.0.0.0/8").contains(&n("10.1.2.3/32")));
        assert!(!n("10.0.0.0/8").contains(&n("11.0.0.0/8")));
        assert!(!n("10.1.0.0/16").contains(&n("10.0.0.0/8")));
        assert!(n("10.0.0.0/8").overlaps(&n("10.1.0.0/16")));
        assert!(n("10.1.0.0/16").overlaps(&n("10.0.0.0/8")));
        assert!(!n("10.0.0.0/8").overlaps(&n("11.0.0.0/8")));
        assert!(n("169.254.169.254").overlaps(&n("169.254.0.0/16")));
        assert!(n("0.0.0.0/0").overlaps(&n("127.0.0.1/32")));
        assert_eq!(n("192.0.2.7").to_string(), "192.0.2.7/32");
    }

    #[test]
    fn parse_refuses_what_documents_refuse() {
        assert!("10.1.2.3/8".parse::<Net>().is_err());
        assert!("::/0".parse::<Net>().is_err());
        assert!("10.0.0.0/33".parse::<Net>().is_err());
        assert!("banana".parse::<Net>().is_err());
    }
}
