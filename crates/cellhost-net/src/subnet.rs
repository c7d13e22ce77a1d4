//! The bridge's IPv4 subnet and the names and addresses derived from a
//! cell id. Pure: no host access.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::str::FromStr;

use cellhost_core::ids::CellId;

/// An IPv4 subnet for a cellhost bridge: `10.47.0.0/16`. The first host
/// address is the bridge's own (the cells' gateway); cells lease the rest
/// up to the one before broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// Shortest / longest prefix a bridge subnet may have: /8 at most 16M
/// cells, /29 at least five.
pub const MIN_PREFIX: u8 = 8;
pub const MAX_PREFIX: u8 = 29;

impl Subnet {
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Subnet, String> {
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return Err(format!(
                "prefix /{prefix} out of range: a bridge subnet is /{MIN_PREFIX} to /{MAX_PREFIX}"
            ));
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(network) & !mask != 0 {
            return Err(format!(
                "{network}/{prefix} has host bits set (did you mean {}/{prefix}?)",
                Ipv4Addr::from(u32::from(network) & mask)
            ));
        }
        if network.is_loopback() || network.is_multicast() || network.is_unspecified() {
            return Err(format!("{network}/{prefix} is not a unicast subnet"));
        }
        Ok(Subnet { network, prefix })
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The bridge's address, the cells' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses cells may lease.
    pub fn cell_range(&self) -> RangeInclusive<Ipv4Addr> {
        let size = 1u32 << (32 - self.prefix);
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.network) + size - 2;
        Ipv4Addr::from(first)..=Ipv4Addr::from(last)
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(a) & mask == u32::from(self.network)
    }
}

impl FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Subnet, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a subnet like 10.47.0.0/16"))?;
        let network: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        Subnet::new(network, prefix)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Host end of the cell's veth pair: `chv<id>` (15 bytes, IFNAMSIZ - 1).
pub fn veth_name(id: &CellId) -> String {
    format!("chv{id}")
}

/// The cell's nftables table (family inet).
pub fn table_name(id: &CellId) -> String {
    format!("cellhost_{id}")
}

/// The cell's network namespace, under /run/netns as iproute2 names them.
pub fn netns_name(id: &CellId) -> String {
    format!("cellhost-{id}")
}

/// The id in a name made by one of the functions above, if it is one.
pub fn id_in(name: &str, prefix: &str) -> Option<CellId> {
    CellId::parse(name.strip_prefix(prefix)?).ok()
}

/// The cell's MAC: locally administered, unicast, from the id (the host
/// pins it in its neighbour table so a cell cannot claim another's
/// address by ARP).
pub fn mac_for(id: &CellId) -> String {
    let hex = id.as_str();
    let mut mac = String::from("02");
    for i in 0..5 {
        mac.push(':');
        mac.push_str(&hex[2 * i..2 * i + 2]);
    }
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_and_range() {
        let s: Subnet = "10.47.0.0/16".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 47, 0, 1));
        assert_eq!(
            s.cell_range(),
            Ipv4Addr::new(10, 47, 0, 2)..=Ipv4Addr::new(10, 47, 255, 254)
        );
        let s: Subnet = "192.168.7.248/29".parse().unwrap();
        assert_eq!(
            s.cell_range(),
            Ipv4Addr::new(192, 168, 7, 250)..=Ipv4Addr::new(192, 168, 7, 254)
        );
        assert!(s.contains(Ipv4Addr::new(192, 168, 7, 255)));
        assert!(!s.contains(Ipv4Addr::new(192, 168, 8, 0)));
        assert_eq!(s.to_string(), "192.168.7.248/29");
    }

    #[test]
    fn bad_subnets_say_why() {
        for (s, want) in [
            ("10.47.0.0", "not a subnet"),
            ("10.47.0.1/16", "host bits set (did you mean 10.47.0.0/16?)"),
            ("10.0.0.0/30", "out of range"),
            ("10.0.0.0/7", "out of range"),
            ("127.0.0.0/8", "not a unicast"),
            ("x/8", "not an IPv4"),
            ("10.0.0.0/x", "not a prefix"),
        ] {
            let e = s.parse::<Subnet>().unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn names_fit_and_round_trip() {
        let id = CellId::parse("0123456789ab").unwrap();
        assert_eq!(veth_name(&id), "chv0123456789ab");
        assert!(veth_name(&id).len() <= 15);
        assert_eq!(id_in(&veth_name(&id), "chv"), Some(id.clone()));
        assert_eq!(id_in(&table_name(&id), "cellhost_"), Some(id.clone()));
        assert_eq!(id_in(&netns_name(&id), "cellhost-"), Some(id.clone()));
        assert_eq!(id_in("chvnot-an-id", "chv"), None);
        assert_eq!(mac_for(&id), "02:01:23:45:67:89");
    }
}
