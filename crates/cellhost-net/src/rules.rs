//! One cell's nftables tables, as text for `nft -f -` (one transaction:
//! both appear whole or not at all), and their counters. Two families,
//! one name:
//!
//! ```text
//! table netdev cellhost_<id>     the link
//!   ingress     hook ingress on `chv<id>` (every ethertype): only IPv4 and
//!               ARP from the cell's own MAC and address pass; IPv6 and
//!               packets for the host's loopback are dropped; the optional
//!               egress byte rate is enforced here
//! table inet cellhost_<id>       routing, by the cell's address
//!   forward     from the cell: established flows, DNS to the declared
//!               resolvers, a reject of the operator's denied networks, then
//!               each egress rule, then reject
//!               (admin-prohibited); to the cell: established flows and
//!               published ports (DNAT), else drop
//!   input       from the cell to the host itself (any address of it,
//!               broadcast ones included): established flows and the
//!               resolvers; else reject
//!   prerouting  published ports: host address:host port → cell
//!   output      the same for connections made on the host (127.0.0.1 too)
//!   postrouting masquerade the cell's allowed egress, and loopback-sourced
//!               connections to its published ports
//! ```
//!
//! Every base chain has `policy accept` and matches only the cell's own
//! address or device: a drop here is final for the packet, and packets of
//! other cells or of the host must pass untouched. "Established" trusts
//! the conntrack table, so the flows of an address are flushed before its
//! lease is released (see the crate's `detach`).

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
    /// The host address published ports are reached on; `None`: every
    /// host address. 127.0.0.1 works from the host itself either way.
    pub publish: Option<Ipv4Addr>,
    /// Whose store the cell's lease is in (the bridge's alias), named in
    /// the comment so a daemon of another store never takes the tables
    /// for its own.
    pub store: String,
    /// Networks rejected before any allow rule (the operator's bounds).
    pub deny: Vec<(Ipv4Addr, u8)>,
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
            if addr.is_loopback() {
                return Err(RuleError {
                    field: field("cidr"),
                    message: format!("{} is loopback: the host's own, never a cell's", rule.cidr),
                });
            }
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
            let field = format!("spec.network.dns.{i}");
            let a: Ipv4Addr = r.parse().map_err(|_| RuleError {
                field: field.clone(),
                message: format!("{r:?} is not an IPv4 address"),
            })?;
            if a.is_loopback() {
                return Err(RuleError {
                    field,
                    message: format!("{a} is loopback: the host's own, never a cell's"),
                });
            }
            dns.push(a);
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
            publish: None,
            store: String::new(),
            deny: Vec::new(),
        })
    }

    /// The comment that marks the table as this owner's on this bridge
    /// (reconcile finds its own tables by it).
    pub fn comment(id: &CellId, bridge: &str, owner: &str, store: &str) -> String {
        format!("cellhost {owner} cell {id} on {bridge} for {store}")
    }

    /// The whole transaction: both tables, replacing earlier ones when
    /// `replace` (an attach retried after a crash).
    pub fn render(&self, replace: bool) -> String {
        let t = table_name(&self.id);
        let ip = self.address;
        let mac = mac_for(&self.id);
        let comment = Self::comment(&self.id, &self.bridge, &self.owner, &self.store);
        let mut s = String::new();
        // replace: `table` then `delete table` makes the load idempotent (a
        // retried create replaces what an earlier attempt left, atomically).
        // Otherwise `create table` fails the whole transaction if one is
        // left, rather than merging new rules into old ones.
        for family in ["netdev", "inet"] {
            if replace {
                let _ = writeln!(s, "table {family} {t}\ndelete table {family} {t}");
            } else {
                let _ = writeln!(s, "create table {family} {t}");
            }
        }

        // The link: only the cell's own IPv4 and ARP, from its own MAC.
        let _ = writeln!(s, "table netdev {t} {{\n\tcomment \"{comment}\"");
        for c in LINK_COUNTERS {
            let _ = writeln!(s, "\tcounter {c} {{ }}");
        }
        let _ = writeln!(
            s,
            "\tchain ingress {{\n\t\ttype filter hook ingress device \"{}\" priority -500; policy accept;",
            veth_name(&self.id)
        );
        for rule in [
            format!("ether saddr != {mac} counter name spoofed drop"),
            "meta protocol ip6 counter name ipv6 drop".to_string(),
            "meta protocol != { ip, arp } counter name spoofed drop".to_string(),
            format!("arp saddr ether != {mac} counter name spoofed drop"),
            format!("arp saddr ip != {ip} counter name spoofed drop"),
            format!("ip saddr != {ip} counter name spoofed drop"),
            // The host's loopback through the gateway (route_localnet is
            // on for the local-connect path): never from a cell.
            "ip daddr 127.0.0.0/8 counter name spoofed drop".to_string(),
        ] {
            let _ = writeln!(s, "\t\t{rule}");
        }
        if let Some(rate) = self.rate_bytes_per_second {
            let _ = writeln!(
                s,
                "\t\tlimit rate over {rate} bytes/second counter name rate_limited drop"
            );
        }
        s.push_str("\t}\n}\n");

        // Routing, filtering and NAT by the cell's address.
        let _ = writeln!(s, "table inet {t} {{\n\tcomment \"{comment}\"");
        for c in ROUTE_COUNTERS {
            let _ = writeln!(s, "\tcounter {c} {{ }}");
        }
        let own = "ct state established,related accept";
        let reject =
            format!("ip saddr {ip} counter name egress_denied reject with icmpx admin-prohibited");
        let _ = writeln!(
            s,
            "\tchain forward {{\n\t\ttype filter hook forward priority filter - 5; policy accept;"
        );
        let _ = writeln!(s, "\t\tip saddr {ip} {own}");
        s.push_str(&self.dns_rule());
        s.push_str(&self.deny_rule());
        s.push_str(&self.egress_rules());
        let _ = writeln!(s, "\t\t{reject}");
        let _ = writeln!(s, "\t\tip daddr {ip} {own}");
        let _ = writeln!(
            s,
            "\t\tip daddr {ip} ct status dnat counter name ingress_published accept"
        );
        let _ = writeln!(s, "\t\tip daddr {ip} drop\n\t}}");

        // The host itself (any of its addresses, broadcast ones included):
        // replies and the declared resolvers, nothing else. No egress
        // rule, however it is written, opens the provider's own services.
        let _ = writeln!(
            s,
            "\tchain input {{\n\t\ttype filter hook input priority filter - 5; policy accept;"
        );
        let _ = writeln!(s, "\t\tip saddr {ip} {own}");
        s.push_str(&self.dns_rule());
        let _ = writeln!(s, "\t\t{reject}\n\t}}");

        let dnat = self.dnat_rules();
        let _ = writeln!(
            s,
            "\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat - 5; policy accept;\n{}\t}}",
            dnat.external
        );
        // The output hook takes a number here, not `dstnat - 5` (nft 1.0).
        let _ = writeln!(
            s,
            "\tchain output {{\n\t\ttype nat hook output priority -105; policy accept;\n{}\t}}",
            dnat.local
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

    /// The operator's denied networks, rejected before any allow rule:
    /// no egress rule, however broad, reaches them.
    fn deny_rule(&self) -> String {
        if self.deny.is_empty() {
            return String::new();
        }
        let set = self
            .deny
            .iter()
            .map(|(a, p)| format!("{a}/{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "\t\tip saddr {} ip daddr {{ {set} }} counter name egress_denied reject with icmpx admin-prohibited\n",
            self.address
        )
    }

    /// Accepts for the egress list.
    fn egress_rules(&self) -> String {
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
        s
    }

    /// DNS (udp and tcp 53) to the declared resolvers: the operator's own
    /// list, so it passes before the denied networks.
    fn dns_rule(&self) -> String {
        let ip = self.address;
        let mut s = String::new();
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

    /// DNAT of published ports: `external` for packets arriving at the
    /// host (on `publish`, or any host address), `local` for connections
    /// made on the host (the same, plus 127.0.0.1).
    fn dnat_rules(&self) -> Dnat {
        let mut d = Dnat::default();
        for p in &self.ports {
            let to = format!(
                "{} dport {} dnat ip to {}:{}",
                p.protocol.as_str(),
                p.host,
                self.address,
                p.container
            );
            let (ext, local) = match self.publish {
                None => (
                    "fib daddr type local".to_string(),
                    "fib daddr type local".to_string(),
                ),
                Some(a) if a.is_loopback() => (format!("ip daddr {a}"), format!("ip daddr {a}")),
                Some(a) => (
                    format!("ip daddr {a}"),
                    format!("ip daddr {{ {a}, 127.0.0.1 }}"),
                ),
            };
            let _ = writeln!(d.external, "\t\t{ext} {to}");
            let _ = writeln!(d.local, "\t\t{local} {to}");
        }
        d
    }
}

#[derive(Default)]
struct Dnat {
    external: String,
    local: String,
}

/// The link table's named counters (family netdev).
pub const LINK_COUNTERS: [&str; 3] = ["spoofed", "ipv6", "rate_limited"];
/// The routing table's named counters (family inet).
pub const ROUTE_COUNTERS: [&str; 3] = ["egress_allowed", "egress_denied", "ingress_published"];

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

/// The counters of `table` (both families) in `nft -j list counters`.
pub fn parse_counters(json: &[u8], table: &str) -> Result<Counters, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("nft's JSON: {e}"))?;
    let items = v["nftables"]
        .as_array()
        .ok_or("nft's JSON has no \"nftables\" array")?;
    let mut out = Counters::default();
    for c in items
        .iter()
        .filter_map(|i| i.get("counter"))
        .filter(|c| c["table"].as_str() == Some(table))
    {
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

    /// The text between `start` and the next line that is just `}`.
    fn section<'a>(t: &'a str, start: &str) -> &'a str {
        let from = t.find(start).unwrap_or_else(|| panic!("{start:?} in\n{t}"));
        let rest = &t[from..];
        &rest[..rest.find("\n\t}").unwrap()]
    }

    #[test]
    fn default_is_deny_everything_but_replies() {
        let r = rules("{mode: bridged}", "[]").unwrap();
        let t = r.render(true);
        assert!(t.starts_with(
            "table netdev cellhost_0123456789ab\ndelete table netdev cellhost_0123456789ab\n\
             table inet cellhost_0123456789ab\ndelete table inet cellhost_0123456789ab\n"
        ));
        assert!(r.render(false).starts_with(
            "create table netdev cellhost_0123456789ab\ncreate table inet cellhost_0123456789ab\n"
        ));
        assert!(!t.contains("counter name egress_allowed"), "{t}");
        let fwd = section(&t, "chain forward");
        assert!(fwd.contains("ip saddr 10.47.0.2 ct state established,related accept"));
        assert!(fwd.contains("ip saddr 10.47.0.2 counter name egress_denied reject"));
        assert!(fwd.contains("ip daddr 10.47.0.2 ct status dnat counter"));
        assert!(fwd.ends_with("ip daddr 10.47.0.2 drop"), "{fwd}");
        let link = section(&t, "chain ingress");
        for want in [
            "device \"chv0123456789ab\"",
            "ether saddr != 02:01:23:45:67:89 counter name spoofed drop",
            "meta protocol ip6 counter name ipv6 drop",
            "meta protocol != { ip, arp } counter name spoofed drop",
            "arp saddr ether != 02:01:23:45:67:89",
            "arp saddr ip != 10.47.0.2",
            "ip saddr != 10.47.0.2 counter name spoofed drop",
            "ip daddr 127.0.0.0/8 counter name spoofed drop",
        ] {
            assert!(link.contains(want), "{want:?} in {link}");
        }
        assert!(t.contains("comment \"cellhost process cell 0123456789ab on chbr0 for \""));
        assert!(!t.contains("dnat ip to"));
        assert!(!t.contains("limit rate"));
        assert_eq!(t.matches('{').count(), t.matches('}').count());
    }

    #[test]
    fn egress_rules_dns_ports_and_rate() {
        let mut r = rules(
            "{mode: bridged, egress: [{cidr: 10.1.0.0/16, port: 443, protocol: tcp}, {cidr: 192.0.2.7/32, protocol: udp}, {cidr: 198.51.100.0/24, port: 123}, {cidr: 203.0.113.0/24}], dns: [10.0.0.53, 10.0.0.54], egressBytesPerSecond: 65536}",
            "[{container: 80, host: 18080}, {container: 53, host: 15353, protocol: udp}]",
        )
        .unwrap();
        let t = r.render(true);
        let mark = "accept";
        for want in [
            format!("ip saddr 10.47.0.2 ip daddr 10.1.0.0/16 tcp dport 443 counter name egress_allowed {mark}"),
            format!("ip saddr 10.47.0.2 ip daddr 192.0.2.7/32 meta l4proto udp counter name egress_allowed {mark}"),
            "ip saddr 10.47.0.2 ip daddr 198.51.100.0/24 meta l4proto { tcp, udp } th dport 123 counter".into(),
            format!("ip saddr 10.47.0.2 ip daddr 203.0.113.0/24 counter name egress_allowed {mark}"),
            "ip daddr { 10.0.0.53, 10.0.0.54 } meta l4proto { tcp, udp } th dport 53".into(),
            "limit rate over 65536 bytes/second counter name rate_limited drop".into(),
            "fib daddr type local tcp dport 18080 dnat ip to 10.47.0.2:80".into(),
            "fib daddr type local udp dport 15353 dnat ip to 10.47.0.2:53".into(),
        ] {
            assert!(t.contains(&want), "missing {want:?} in\n{t}");
        }
        // The world (forward) gets every rule before the reject; the host
        // itself (input) only the resolvers: not even a /32 rule, which a
        // directed broadcast or an address the host gains later would turn
        // into a way to the provider's own services.
        let fwd = section(&t, "chain forward");
        assert!(fwd.find("dport 443").unwrap() < fwd.find("reject").unwrap());
        let input = section(&t, "chain input");
        assert!(input.contains("th dport 53"), "{input}");
        for rule in [
            "192.0.2.7/32",
            "10.1.0.0/16",
            "198.51.100.0/24",
            "203.0.113.0/24",
        ] {
            assert!(!input.contains(rule), "{rule} opens the host: {input}");
        }
        // A publish address narrows the DNAT; 127.0.0.1 stays for the host.
        r.publish = Some(Ipv4Addr::new(192, 0, 2, 1));
        let t = r.render(true);
        assert!(section(&t, "chain prerouting").contains("ip daddr 192.0.2.1 tcp dport 18080"));
        assert!(
            section(&t, "chain output")
                .contains("ip daddr { 192.0.2.1, 127.0.0.1 } tcp dport 18080")
        );
        r.publish = Some(Ipv4Addr::LOCALHOST);
        let t = r.render(false);
        assert!(section(&t, "chain output").contains("ip daddr 127.0.0.1 tcp dport 18080"));
    }

    #[test]
    fn denied_networks_are_rejected_before_any_allow() {
        let mut r = rules("{mode: bridged, egress: [{cidr: 0.0.0.0/0}]}", "[]").unwrap();
        r.deny = vec![
            (Ipv4Addr::new(169, 254, 0, 0), 16),
            (Ipv4Addr::new(10, 47, 0, 0), 16),
        ];
        let t = r.render(false);
        let deny = t
            .find("ip daddr { 169.254.0.0/16, 10.47.0.0/16 } counter name egress_denied reject")
            .unwrap_or_else(|| panic!("{t}"));
        let allow = t.find("ip daddr 0.0.0.0/0").unwrap();
        assert!(deny < allow, "the deny must come first: {t}");
    }

    #[test]
    fn ipv6_and_loopback_are_refused_naming_the_field() {
        let e = rules(
            "{mode: bridged, egress: [{cidr: 10.0.0.0/8}, {cidr: '2001:db8::/32'}]}",
            "[]",
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.network.egress.1.cidr");
        assert!(e.message.contains("IPv4 only"));
        let e = rules("{mode: bridged, egress: [{cidr: 127.0.0.0/8}]}", "[]").unwrap_err();
        assert_eq!(e.field, "spec.network.egress.0.cidr");
        assert!(e.message.contains("loopback"));
        let e = rules("{mode: bridged, dns: [10.0.0.53, 127.0.0.53]}", "[]").unwrap_err();
        assert_eq!(e.field, "spec.network.dns.1");
    }

    #[test]
    fn counters_parse_from_nft_json_for_one_table() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"counter": {"family": "inet", "name": "egress_allowed", "table": "t", "handle": 6, "packets": 3, "bytes": 180}},
            {"counter": {"family": "netdev", "name": "spoofed", "table": "t", "handle": 7, "packets": 2, "bytes": 120}},
            {"counter": {"family": "inet", "name": "egress_allowed", "table": "other", "packets": 9, "bytes": 9}}]}"#;
        let c = parse_counters(json, "t").unwrap();
        assert_eq!(
            c.egress_allowed,
            Count {
                packets: 3,
                bytes: 180
            }
        );
        assert_eq!(
            c.spoofed,
            Count {
                packets: 2,
                bytes: 120
            }
        );
        assert_eq!(c.egress_denied, Count::default());
        assert!(parse_counters(b"{}", "t").unwrap_err().contains("nftables"));
        assert!(parse_counters(b"not json", "t").is_err());
    }
}
