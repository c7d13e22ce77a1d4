//! One IPv4 address and a default route on an interface of the calling
//! thread's network namespace, by ioctls: SIOCSIFADDR, SIOCSIFNETMASK,
//! SIOCSIFFLAGS (up, and `lo` up), SIOCADDRT.
//!
//! Used by the guest agent in a microVM (`configure_net`) and by the host
//! for a process cell's netns (on a thread that joined it), where spawning
//! `ip` would cost a process per cell. Idempotent: the same address again
//! replaces it; an existing default route is success.
//!
//! Why ioctls: they are the whole interface needed for one address and one
//! route, with no netlink library in a static agent without an async
//! runtime. Each call is a small function with its SAFETY note.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

/// What to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Config {
    pub interface: String,
    pub address: Ipv4Addr,
    /// 1..=32.
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// A cell's /etc/resolv.conf: its declared resolvers (`spec.network.dns`),
/// or a comment saying it has none. Written on the host for a process cell
/// and by the agent inside a microVM.
pub fn resolv_conf<T: std::fmt::Display>(dns: &[T]) -> String {
    if dns.is_empty() {
        return "# no resolvers declared (spec.network.dns): DNS is denied\n".into();
    }
    let mut s = String::from("# spec.network.dns\n");
    for d in dns {
        s.push_str(&format!("nameserver {d}\n"));
    }
    s
}

/// The netmask of a prefix length.
/// The IPv4 networks this host (the calling thread's network namespace)
/// is directly connected to: each interface address with its netmask, as
/// `(network, prefix)`, loopback left out. Cells are denied these: the
/// provider's LAN and every bridge of the host (other engines' containers
/// included) are neighbours, not the internet.
pub fn connected_networks() -> Vec<(std::net::Ipv4Addr, u8)> {
    let Ok(ifs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for i in ifs {
        let (Some(addr), Some(netmask)) = (
            i.address
                .as_ref()
                .and_then(|a| a.as_sockaddr_in().map(|v| v.ip())),
            i.netmask
                .as_ref()
                .and_then(|a| a.as_sockaddr_in().map(|v| v.ip())),
        ) else {
            continue;
        };
        if addr.is_loopback() {
            continue;
        }
        let prefix = u32::from(netmask).leading_ones() as u8;
        let net = std::net::Ipv4Addr::from(u32::from(addr) & mask(prefix));
        if !out.contains(&(net, prefix)) {
            out.push((net, prefix));
        }
    }
    out
}

pub fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

/// Bring `lo` and the interface up with the address, and add the default
/// route. The interface name must be shorter than IFNAMSIZ.
pub fn apply(c: &Ipv4Config) -> io::Result<()> {
    if c.interface.is_empty() || c.interface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {:?}", c.interface),
        ));
    }
    let sock: OwnedFd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let fd = sock.as_raw_fd();
    set_up(fd, "lo")?;
    let mut ifr = ifreq(&c.interface);
    ifr.ifr_ifru.ifru_addr = sockaddr_in(c.address);
    ioctl_ifreq(fd, libc::SIOCSIFADDR, &mut ifr)?;
    let mut ifr = ifreq(&c.interface);
    ifr.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask(c.prefix)));
    ioctl_ifreq(fd, libc::SIOCSIFNETMASK, &mut ifr)?;
    set_up(fd, &c.interface)?;
    if let Some(gw) = c.gateway {
        match add_default_route(fd, &c.interface, gw) {
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

    #[test]
    fn resolv_conf_names_resolvers_or_none() {
        assert_eq!(
            resolv_conf(&[Ipv4Addr::new(10, 0, 0, 53)]),
            "# spec.network.dns\nnameserver 10.0.0.53\n"
        );
        assert!(resolv_conf::<Ipv4Addr>(&[]).contains("DNS is denied"));
    }

    #[test]
    fn masks() {
        assert_eq!(mask(0), 0);
        assert_eq!(Ipv4Addr::from(mask(16)), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(Ipv4Addr::from(mask(32)), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn names_too_long_are_refused_before_any_ioctl() {
        let e = apply(&Ipv4Config {
            interface: "x".repeat(libc::IFNAMSIZ),
            address: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 24,
            gateway: None,
        })
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
