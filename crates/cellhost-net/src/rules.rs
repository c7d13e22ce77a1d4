//! One cell's nftables table, as text for `nft -f -` (one transaction:
//! the table appears whole or not at all), and its counters.
//!
//! ```text
//! table inet cellhost_<id>
//!   ingress     hook ingress on the link's host end: anything not from
//!               the cell's own IPv4 and MAC (spoofing), and IPv6, is dropped;
//!               the optional egress byte rate is enforced here
//!   forward     from the cell: replies, then each egress rule, then DNS to
//!               the declared resolvers, then reject (admin-prohibited);
//!               to the cell: replies and published ports (DNAT), else drop
//!   input       from the cell to the host itself: the same allow-list
//!   prerouting  published ports: host-local address:host port → cell
//!   output      the same for connections made on the host (127.0.0.1 too)
//!   postrouting masquerade the cell's allowed egress, and loopback-sourced
//!               connections to its published ports
//! ```
//!
//! Every base chain has `policy accept` and matches only the cell's own
//! address or device: a drop here is final for the packet, and packets of
//! other cells or of the host must pass untouched.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use cellhost_core::ids::CellId;
use cellhost_spec::{Cell, Cidr, Port, Protocol, parse_cidr};

use crate::subnet::{mac_for, table_name, veth_name};

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    pub net: Ipv4Addr,
    pub prefix: u8,
    pub port: Option<u16>,
    pub protocol: Option<Protocol>,
}

/// What goes into one cell's table.
#[derive(Debug, Clone)]
pub struct CellRules {
    pub id: CellId,
    pub bridge: String,
    /// The tier whose cell this is (in the table's comment).
    pub owner: String,
    pub address: Ipv4Addr,
    pub egress: Vec<Allow>,
    pub dns: Vec<Ipv4Addr>,
    pub ports: Vec<Port>,
    pub rate_bytes_per_second: Option<u64>,
}

/// A document setting this host cannot express, naming its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    pub field: String,
    pub message: String,
}

impl CellRules {
    /// The rules for a (validated) document's network section.
    pub fn for_cell(
        id: &CellId,
        bridge: &str,
        owner: &str,
        address: Ipv4Addr,
        cell: &Cell,
    ) -> Result<CellRules, RuleError> {
        let net = &cell.spec.network;
        let mut egress = Vec::with_capacity(net.egress.len());
        for (i, rule) in net.egress.iter().enumerate() {
            let field = |f: &str| format!("spec.network.egress.{i}.{f}");
            let (addr, prefix) = match parse_cidr(&rule.cidr) {
                Ok(Cidr::V4(a, p)) => (a, p),
                Ok(Cidr::V6(..)) => {
                    return Err(RuleError {
                        field: field("cidr"),
                        message: format!("{} is IPv6; bridged cells have IPv4 only", rule.cidr),
                    });
                }
                Err(message) => {
                    return Err(RuleError {
                        field: field("cidr"),
                        message,
                    });
                }
            };
            let port = match rule.port {
                None => None,
                Some(p) => {
                    Some(
                        u16::try_from(p)
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or_else(|| RuleError {
                                field: field("port"),
                                message: format!("{p} is not a port"),
                            })?,
                    )
                }
            };
            egress.push(Allow {
                net: addr,
                prefix,
                port,
                protocol: rule.protocol,
            });
        }
        let mut dns = Vec::with_capacity(net.dns.len());
        for (i, r) in net.dns.iter().enumerate() {
            dns.push(r.parse().map_err(|_| RuleError {
                field: format!("spec.network.dns.{i}"),
                message: format!("{r:?} is not an IPv4 address"),
            })?);
        }
        for (i, p) in cell.spec.ports.iter().enumerate() {
            for (f, v) in [("container", p.container), ("host", p.host)] {
                if !(1..=65_535).contains(&v) {
                    return Err(RuleError {
                        field: format!("spec.ports.{i}.{f}"),
                        message: format!("{v} is not a port"),
                    });
                }
            }
        }
        Ok(CellRules {
            id: id.clone(),
            bridge: bridge.to_string(),
            owner: owner.to_string(),
            address,
            egress,
            dns,
            ports: cell.spec.ports.clone(),
            rate_bytes_per_second: net.egress_bytes_per_second,
        })
    }

    /// The comment that marks the table as this owner's on this bridge
    /// (reconcile finds its own tables by it).
    pub fn comment(id: &CellId, bridge: &str, owner: &str) -> String {
        format!("cellhost {owner} cell {id} on {bridge}")
    }

    /// The whole transaction: create-or-replace the table.
    pub fn render(&self) -> String {
        let t = table_name(&self.id);
        let ip = self.address;
        let mut s = String::new();
        // `table` then `delete table` makes the load idempotent: a retried
        // create replaces what an earlier attempt left, atomically.
        let _ = writeln!(
            s,
            "table inet {t}\ndelete table inet {t}\ntable inet {t} {{"
        );
        let _ = writeln!(
            s,
            "\tcomment \"{}\"",
            Self::comment(&self.id, &self.bridge, &self.owner)
        );
        for c in COUNTERS {
            let _ = writeln!(s, "\tcounter {c} {{ }}");
        }

        let _ = writeln!(
            s,
            "\tchain ingress {{\n\t\ttype filter hook ingress device \"{}\" priority -450; policy accept;",
            veth_name(&self.id)
        );
        let _ = writeln!(s, "\t\tmeta protocol ip6 counter name ipv6 drop");
        let _ = writeln!(s, "\t\tip saddr != {ip} counter name spoofed drop");
        let _ = writeln!(
            s,
            "\t\tether saddr != {} counter name spoofed drop",
            mac_for(&self.id)
        );
        if let Some(rate) = self.rate_bytes_per_second {
            let _ = writeln!(
                s,
                "\t\tlimit rate over {rate} bytes/second counter name rate_limited drop"
            );
        }
        s.push_str("\t}\n");

        let allows = self.allow_rules();
        let _ = writeln!(
            s,
            "\tchain forward {{\n\t\ttype filter hook forward priority filter - 5; policy accept;"
        );
        let _ = writeln!(s, "\t\tip saddr {ip} ct state established,related accept");
        s.push_str(&allows);
        let _ = writeln!(
            s,
            "\t\tip saddr {ip} counter name egress_denied reject with icmpx admin-prohibited"
        );
        let _ = writeln!(s, "\t\tip daddr {ip} ct state established,related accept");
        let _ = writeln!(
            s,
            "\t\tip daddr {ip} ct status dnat counter name ingress_published accept"
        );
        let _ = writeln!(s, "\t\tip daddr {ip} drop\n\t}}");

        let _ = writeln!(
            s,
            "\tchain input {{\n\t\ttype filter hook input priority filter - 5; policy accept;"
        );
        let _ = writeln!(s, "\t\tip saddr {ip} ct state established,related accept");
        s.push_str(&allows);
        let _ = writeln!(
            s,
            "\t\tip saddr {ip} counter name egress_denied reject with icmpx admin-prohibited\n\t}}"
        );

        let dnat = self.dnat_rules();
        let _ = writeln!(
            s,
            "\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat - 5; policy accept;\n{dnat}\t}}"
        );
        // The output hook takes a number here, not `dstnat - 5` (nft 1.0).
        let _ = writeln!(
            s,
            "\tchain output {{\n\t\ttype nat hook output priority -105; policy accept;\n{dnat}\t}}"
        );
        let _ = writeln!(
            s,
            "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat - 5; policy accept;"
        );
        let _ = writeln!(
            s,
            "\t\tip saddr {ip} oifname != \"{}\" masquerade",
            self.bridge
        );
        let _ = writeln!(s, "\t\tip saddr 127.0.0.0/8 ip daddr {ip} masquerade\n\t}}");
        s.push_str("}\n");
        s
    }

    fn allow_rules(&self) -> String {
        let ip = self.address;
        let mut s = String::new();
        for a in &self.egress {
            let dest = format!("ip daddr {}/{}", a.net, a.prefix);
            let l4 = match (a.protocol, a.port) {
                (Some(p), Some(port)) => format!(" {} dport {port}", p.as_str()),
                (Some(p), None) => format!(" meta l4proto {}", p.as_str()),
                (None, Some(port)) => format!(" meta l4proto {{ tcp, udp }} th dport {port}"),
                (None, None) => String::new(),
            };
            let _ = writeln!(
                s,
                "\t\tip saddr {ip} {dest}{l4} counter name egress_allowed accept"
            );
        }
        if !self.dns.is_empty() {
            let set = self
                .dns
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                s,
                "\t\tip saddr {ip} ip daddr {{ {set} }} meta l4proto {{ tcp, udp }} th dport 53 counter name egress_allowed accept"
            );
        }
        s
    }

    fn dnat_rules(&self) -> String {
        let mut s = String::new();
        for p in &self.ports {
            let _ = writeln!(
                s,
                "\t\tfib daddr type local {} dport {} dnat ip to {}:{}",
                p.protocol.as_str(),
                p.host,
                self.address,
                p.container
            );
        }
        s
    }
}

/// The table's named counters.
pub const COUNTERS: [&str; 6] = [
    "egress_allowed",
    "egress_denied",
    "ingress_published",
    "spoofed",
    "ipv6",
    "rate_limited",
];

/// Packets and bytes of one counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// A cell's counters, as `inspect` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    /// New connections (first packets) the allow-list let out.
    pub egress_allowed: Count,
    /// Packets the allow-list refused.
    pub egress_denied: Count,
    /// New connections to published ports.
    pub ingress_published: Count,
    /// IPv4 packets not from the cell's own address or MAC, dropped.
    pub spoofed: Count,
    /// IPv6 packets, dropped (cells have IPv4 only; a VM guest's kernel
    /// sends router solicitations and the like).
    pub ipv6: Count,
    /// Packets over the egress byte rate, dropped.
    pub rate_limited: Count,
}

/// Parse `nft -j list counters table inet <t>`.
pub fn parse_counters(json: &[u8]) -> Result<Counters, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("nft's JSON: {e}"))?;
    let items = v["nftables"]
        .as_array()
        .ok_or("nft's JSON has no \"nftables\" array")?;
    let mut out = Counters::default();
    for c in items.iter().filter_map(|i| i.get("counter")) {
        let count = Count {
            packets: c["packets"].as_u64().unwrap_or(0),
            bytes: c["bytes"].as_u64().unwrap_or(0),
        };
        match c["name"].as_str() {
            Some("egress_allowed") => out.egress_allowed = count,
            Some("egress_denied") => out.egress_denied = count,
            Some("ingress_published") => out.ingress_published = count,
            Some("spoofed") => out.spoofed = count,
            Some("ipv6") => out.ipv6 = count,
            Some("rate_limited") => out.rate_limited = count,
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(network: &str, ports: &str) -> Cell {
        let doc = format!(
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{name: n}}\nspec:\n  isolation: process\n  image: host\n  command: [/bin/true]\n  network: {network}\n  ports: {ports}\n"
        );
        cellhost_spec::parse_and_validate(&doc).unwrap()
    }

    fn rules(network: &str, ports: &str) -> Result<CellRules, RuleError> {
        CellRules::for_cell(
            &CellId::parse("0123456789ab").unwrap(),
            "chbr0",
            "process",
            Ipv4Addr::new(10, 47, 0, 2),
            &cell(network, ports),
        )
    }

    #[test]
    fn default_is_deny_everything_but_replies() {
        let r = rules("{mode: bridged}", "[]").unwrap();
        let t = r.render();
        assert!(t.starts_with(
            "table inet cellhost_0123456789ab\ndelete table inet cellhost_0123456789ab\n"
        ));
        assert!(!t.contains("egress_allowed accept"), "{t}");
        assert!(t.contains("ip saddr 10.47.0.2 counter name egress_denied reject"));
        assert!(t.contains("ip daddr 10.47.0.2 drop"));
        assert!(t.contains("device \"chv0123456789ab\""));
        assert!(t.contains("ether saddr != 02:01:23:45:67:89"));
        assert!(t.contains("comment \"cellhost process cell 0123456789ab on chbr0\""));
        assert!(!t.contains("dnat ip to"));
        assert!(!t.contains("limit rate"));
        // Balanced braces: one table, six chains, five counters.
        assert_eq!(t.matches('{').count(), t.matches('}').count());
    }

    #[test]
    fn egress_rules_dns_ports_and_rate() {
        let r = rules(
            "{mode: bridged, egress: [{cidr: 10.1.0.0/16, port: 443, protocol: tcp}, {cidr: 192.0.2.7/32, protocol: udp}, {cidr: 198.51.100.0/24, port: 123}, {cidr: 203.0.113.0/24}], dns: [10.0.0.53, 10.0.0.54], egressBytesPerSecond: 65536}",
            "[{container: 80, host: 18080}, {container: 53, host: 15353, protocol: udp}]",
        )
        .unwrap();
        let t = r.render();
        for want in [
            "ip saddr 10.47.0.2 ip daddr 10.1.0.0/16 tcp dport 443 counter name egress_allowed accept",
            "ip saddr 10.47.0.2 ip daddr 192.0.2.7/32 meta l4proto udp counter",
            "ip saddr 10.47.0.2 ip daddr 198.51.100.0/24 meta l4proto { tcp, udp } th dport 123 counter",
            "ip saddr 10.47.0.2 ip daddr 203.0.113.0/24 counter name egress_allowed accept",
            "ip daddr { 10.0.0.53, 10.0.0.54 } meta l4proto { tcp, udp } th dport 53",
            "limit rate over 65536 bytes/second counter name rate_limited drop",
            "fib daddr type local tcp dport 18080 dnat ip to 10.47.0.2:80",
            "fib daddr type local udp dport 15353 dnat ip to 10.47.0.2:53",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        // The allow-list guards the host itself (input) as well as the
        // world (forward), before the reject in each.
        assert_eq!(t.matches("tcp dport 443 counter").count(), 2);
        let fwd = &t[t.find("chain forward").unwrap()..t.find("chain input").unwrap()];
        assert!(fwd.find("dport 443").unwrap() < fwd.find("reject").unwrap());
    }

    #[test]
    fn ipv6_egress_is_refused_naming_the_rule() {
        let e = rules(
            "{mode: bridged, egress: [{cidr: 10.0.0.0/8}, {cidr: '2001:db8::/32'}]}",
            "[]",
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.network.egress.1.cidr");
        assert!(e.message.contains("IPv4 only"));
    }

    #[test]
    fn counters_parse_from_nft_json() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"counter": {"family": "inet", "name": "egress_allowed", "table": "t", "handle": 6, "packets": 3, "bytes": 180}},
            {"counter": {"family": "inet", "name": "egress_denied", "table": "t", "handle": 7, "packets": 2, "bytes": 120}},
            {"counter": {"family": "inet", "name": "other", "packets": 9, "bytes": 9}}]}"#;
        let c = parse_counters(json).unwrap();
        assert_eq!(
            c.egress_allowed,
            Count {
                packets: 3,
                bytes: 180
            }
        );
        assert_eq!(
            c.egress_denied,
            Count {
                packets: 2,
                bytes: 120
            }
        );
        assert_eq!(c.spoofed, Count::default());
        assert!(parse_counters(b"{}").unwrap_err().contains("nftables"));
        assert!(parse_counters(b"not json").is_err());
    }
}
