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
//! # Why ioctls
//!
//! SIOCSIFADDR / SIOCSIFNETMASK / SIOCSIFFLAGS / SIOCADDRT are the whole
//! interface needed for one IPv4 address and one route, with no netlink
//! library in a static agent that has no async runtime. Each call is a
//! small function with its SAFETY note.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

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
            let mask = mask(prefix);
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

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// The resolv.conf for `dns`.
pub fn resolv_conf(dns: &[Ipv4Addr]) -> String {
    if dns.is_empty() {
        return "# no resolvers declared (spec.network.dns): DNS is denied\n".into();
    }
    let mut s = String::from("# spec.network.dns\n");
    for d in dns {
        s.push_str(&format!("nameserver {d}\n"));
    }
    s
}

/// Carry out `p` on this machine's network stack.
pub fn apply(p: &NetPlan) -> io::Result<()> {
    let sock: OwnedFd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let fd = sock.as_raw_fd();
    set_up(fd, "lo")?;
    let mut ifr = ifreq(&p.interface);
    ifr.ifr_ifru.ifru_addr = sockaddr_in(p.address);
    ioctl_ifreq(fd, libc::SIOCSIFADDR, &mut ifr)?;
    let mut ifr = ifreq(&p.interface);
    ifr.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask(p.prefix)));
    ioctl_ifreq(fd, libc::SIOCSIFNETMASK, &mut ifr)?;
    set_up(fd, &p.interface)?;
    if let Some(gw) = p.gateway {
        match add_default_route(fd, &p.interface, gw) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            other => other?,
        }
    }
    Ok(())
}

/// An `ifreq` naming `name` (checked shorter than IFNAMSIZ by `plan`;
/// "lo" is).
fn ifreq(name: &str) -> libc::ifreq {
    let mut name_buf = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, b) in name_buf
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = b as libc::c_char;
    }
    // SAFETY: ifreq is plain data (a name array and a union of integers
    // and sockaddrs); all-zero is a valid value of it, and zeroing the
    // whole union means no uninitialised byte reaches the kernel.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_name = name_buf;
    ifr
}

/// `a.b.c.d` as the generic `sockaddr` the interface ioctls take: family,
/// port 0, the address, zeros.
fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    for (i, b) in a.octets().into_iter().enumerate() {
        data[2 + i] = b as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

fn set_up(fd: i32, name: &str) -> io::Result<()> {
    let mut ifr = ifreq(name);
    ioctl_ifreq(fd, libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS just filled the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl_ifreq(fd, libc::SIOCSIFFLAGS, &mut ifr)
}

fn ioctl_ifreq(fd: i32, request: libc::Ioctl, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `fd` is an open socket; `ifr` is a valid, exclusively
    // borrowed ifreq that outlives the call, which is what every SIOC*IF*
    // request used here reads or writes.
    let rc = unsafe { libc::ioctl(fd, request, ifr as *mut libc::ifreq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn add_default_route(fd: i32, dev: &str, gw: Ipv4Addr) -> io::Result<()> {
    let mut dev_name: Vec<libc::c_char> = dev.bytes().map(|b| b as libc::c_char).collect();
    dev_name.push(0);
    // SAFETY: rtentry is plain data (integers, sockaddrs, one pointer);
    // all-zero is its documented "unset" value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gw);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev_name.as_mut_ptr();
    // SAFETY: `fd` is an open socket; `rt` and the NUL-terminated
    // `dev_name` it points to live until the call returns.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCADDRT, &mut rt as *mut libc::rtentry) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
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

    #[test]
    fn resolv_conf_names_resolvers_or_none() {
        assert_eq!(
            resolv_conf(&[Ipv4Addr::new(10, 0, 0, 53)]),
            "# spec.network.dns\nnameserver 10.0.0.53\n"
        );
        assert!(resolv_conf(&[]).contains("DNS is denied"));
    }
}
