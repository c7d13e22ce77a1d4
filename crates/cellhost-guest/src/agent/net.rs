//! `configure_net`: the guest side of a bridged microVM.
//!
//! # Layout in the guest
//!
//! ```text
//! lo                up
//! <interface>       (eth0) up, <address>/<prefix>
//! default route     via <gateway> on <interface>
//! /etc/resolv.conf  the declared resolvers, or a comment naming none
//! ```
//!
//! # Lifecycle and idempotency
//!
//! Once, after boot and before `start`. Setting the same address again
//! replaces it; an existing default route is kept (EEXIST is success).
//!
//! # Threat model
//!
//! The host's per-cell nftables table is what confines the guest (it may
//! change all of this afterwards, and gains nothing: packets not from its
//! leased address and MAC are dropped on the host). The op only saves a
//! guest image from needing its own network tooling. It is off unless the
//! agent is PID 1 or runs with `--configure-net`, so an agent run as a
//! plain process on a host can never be told to reconfigure it.
//!
//! The interface itself is set by `cellhost_os::ifconfig` (ioctls), which
//! the host side uses too for a process cell's netns.

use std::io;
use std::net::Ipv4Addr;

use crate::proto::{Failure, NetRequest};

/// What `configure_net` will do, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    pub interface: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

/// Check a request, naming the field at fault.
pub fn plan(req: &NetRequest) -> Result<NetPlan, Failure> {
    let interface = req.interface.clone().unwrap_or_else(|| "eth0".into());
    if interface.is_empty()
        || interface.len() >= libc::IFNAMSIZ
        || !interface
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(Failure::invalid(format!(
            "interface: {interface:?} is not an interface name"
        )));
    }
    let (addr, prefix) = req
        .address
        .split_once('/')
        .ok_or_else(|| Failure::invalid("address: must be a.b.c.d/prefix"))?;
    let address: Ipv4Addr = addr
        .parse()
        .map_err(|_| Failure::invalid(format!("address: {addr:?} is not an IPv4 address")))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| Failure::invalid(format!("address: prefix {prefix:?} is not 1..32")))?;
    let gateway = match &req.gateway {
        None => None,
        Some(g) => {
            let g: Ipv4Addr = g
                .parse()
                .map_err(|_| Failure::invalid(format!("gateway: {g:?} is not an IPv4 address")))?;
            let mask = cellhost_os::ifconfig::mask(prefix);
            if u32::from(g) & mask != u32::from(address) & mask {
                return Err(Failure::invalid(format!(
                    "gateway: {g} is not on {address}/{prefix}"
                )));
            }
            Some(g)
        }
    };
    if req.dns.len() > 3 {
        return Err(Failure::invalid("dns: at most 3 resolvers"));
    }
    let dns = req
        .dns
        .iter()
        .enumerate()
        .map(|(i, d)| {
            d.parse()
                .map_err(|_| Failure::invalid(format!("dns[{i}]: {d:?} is not an IPv4 address")))
        })
        .collect::<Result<Vec<Ipv4Addr>, Failure>>()?;
    Ok(NetPlan {
        interface,
        address,
        prefix,
        gateway,
        dns,
    })
}

/// Carry out `p` on this machine's network stack.
pub fn apply(p: &NetPlan) -> io::Result<()> {
    cellhost_os::ifconfig::apply(&cellhost_os::ifconfig::Ipv4Config {
        interface: p.interface.clone(),
        address: p.address,
        prefix: p.prefix,
        gateway: p.gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(address: &str, gateway: Option<&str>, dns: &[&str]) -> NetRequest {
        NetRequest {
            interface: None,
            address: address.into(),
            gateway: gateway.map(String::from),
            dns: dns.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn plans_and_field_errors() {
        let p = plan(&req("10.47.0.2/16", Some("10.47.0.1"), &["10.0.0.53"])).unwrap();
        assert_eq!(p.interface, "eth0");
        assert_eq!((p.address, p.prefix), (Ipv4Addr::new(10, 47, 0, 2), 16));
        assert_eq!(p.gateway, Some(Ipv4Addr::new(10, 47, 0, 1)));
        for (r, want) in [
            (req("10.47.0.2", None, &[]), "address: must be"),
            (req("x/16", None, &[]), "address: \"x\""),
            (req("10.0.0.2/33", None, &[]), "prefix \"33\""),
            (
                req("10.0.0.2/24", Some("10.0.1.1"), &[]),
                "gateway: 10.0.1.1 is not on",
            ),
            (req("10.0.0.2/24", None, &["a"]), "dns[0]"),
            (req("10.0.0.2/24", None, &["1.1.1.1"; 4]), "at most 3"),
        ] {
            let e = plan(&r).unwrap_err();
            assert!(e.message.contains(want), "{}: {}", r.address, e.message);
        }
        let mut bad = req("10.0.0.2/24", None, &[]);
        bad.interface = Some("eth0; reboot".into());
        assert!(plan(&bad).unwrap_err().message.starts_with("interface:"));
    }
}
