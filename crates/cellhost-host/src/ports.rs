//! Whether a host port is free: the one check the port allocator and the
//! bridged network's admission share.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};

/// Can a socket bind `port` of `protocol` (`udp`, else tcp) on every host
/// address now? A service bound to one address of the host makes it not
/// free too.
pub fn free(protocol: &str, port: u16) -> Result<(), std::io::Error> {
    match protocol {
        "udp" => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).map(drop),
        _ => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).map(drop),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_port_a_socket_holds_is_not_free() {
        let tcp = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        assert!(super::free("tcp", tcp.local_addr().unwrap().port()).is_err());
        let udp = std::net::UdpSocket::bind(("127.0.0.1", 0)).unwrap();
        assert!(super::free("udp", udp.local_addr().unwrap().port()).is_err());
    }
}
