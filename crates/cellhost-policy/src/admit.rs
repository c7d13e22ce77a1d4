//! [`Policy::admit`]: bound one document and write the defaults into it.

use std::net::Ipv4Addr;

use cellhost_spec::{Cell, Isolation, NetworkMode, Ulimit};
use serde::Serialize;

use crate::{ALWAYS_DENIED, Net, Policy};

/// What the policy needs to know of the host.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// Every IPv4 address of the host's interfaces (denied to cells).
    pub addresses: Vec<Ipv4Addr>,
    /// The cellhost bridge's subnet (denied: other cells, the gateway).
    pub bridge: Option<Net>,
    /// Networks the host is directly connected to (denied when the
    /// policy's `egress.denyConnected`).
    pub connected: Vec<Net>,
}

/// One thing the policy does not allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The document's field (`spec.resources.memoryMiB`).
    pub field: String,
    pub message: String,
    /// The policy line that says no (`resources.maximums.memoryMiB`).
    pub rule: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} (policy: {})",
            self.field, self.message, self.rule
        )
    }
}

/// Every refusal of one document, in document order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub refusals: Vec<Refusal>,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.refusals.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl PolicyError {
    /// The first refusal (there is always one).
    pub fn first(&self) -> Option<&Refusal> {
        self.refusals.first()
    }
}

struct Refusals(Vec<Refusal>);

impl Refusals {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>, rule: &str) {
        self.0.push(Refusal {
            field: field.into(),
            message: message.into(),
            rule: rule.into(),
        });
    }
}

impl Policy {
    /// Every range a cell may never reach: [`ALWAYS_DENIED`], the
    /// operator's `egress.deny`, the host's own addresses and the bridge.
    pub fn denied_nets(&self, facts: &HostFacts) -> Vec<Net> {
        let mut out: Vec<Net> = ALWAYS_DENIED.to_vec();
        out.extend(self.egress.deny.iter().copied());
        out.extend(facts.addresses.iter().map(|a| Net::host(*a)));
        out.extend(facts.bridge);
        if self.egress.deny_connected {
            out.extend(facts.connected.iter().copied());
        }
        out.sort_by_key(|n| (n.addr(), n.prefix()));
        out.dedup();
        out
    }

    /// Check a validated document against the policy and write the
    /// policy's defaults into what it leaves unset. All or nothing: on a
    /// refusal the document may be half-filled and must be dropped.
    pub fn admit(&self, cell: &mut Cell, facts: &HostFacts) -> Result<(), PolicyError> {
        let mut r = Refusals(Vec::new());
        let tier = cell.spec.isolation;
        if !self.offers(tier) {
            r.push(
                "spec.isolation",
                format!("the {tier} tier is not offered on this host"),
                "tiers",
            );
        }
        self.admit_image(cell, &mut r);
        self.admit_resources(cell, &mut r);
        let lease = &mut cell.spec.lifetime.ttl_seconds;
        match *lease {
            None => *lease = Some(self.lease.default_seconds),
            Some(t) if t > self.lease.max_seconds => r.push(
                "spec.lifetime.ttlSeconds",
                format!(
                    "{t} s is longer than the {} s allowed",
                    self.lease.max_seconds
                ),
                "lease.maxSeconds",
            ),
            Some(_) => {}
        }
        for (i, p) in cell.spec.ports.iter().enumerate() {
            let (lo, hi) = (u32::from(self.ports.min), u32::from(self.ports.max));
            // 0: the allocator picks one of the range.
            if p.host != 0 && !(lo..=hi).contains(&p.host) {
                r.push(
                    format!("spec.ports.{i}.host"),
                    format!(
                        "{} is outside the host ports {lo}-{hi} cells may publish on",
                        p.host
                    ),
                    "ports",
                );
            }
        }
        self.admit_network(cell, facts, &mut r);
        if r.0.is_empty() {
            Ok(())
        } else {
            Err(PolicyError { refusals: r.0 })
        }
    }

    fn admit_image(&self, cell: &Cell, r: &mut Refusals) {
        let image = cell.spec.image.as_str();
        let tier = cell.spec.isolation;
        match tier {
            Isolation::Process if image == "host" => {
                if !self.images.allow_host {
                    r.push(
                        "spec.image",
                        "`host` (the host's programs) is not offered; name an image in the store",
                        "images.allowHost",
                    );
                }
            }
            Isolation::Process | Isolation::Vm | Isolation::Microvm => {
                if !cellhost_spec::is_image_name(image) {
                    r.push(
                        "spec.image",
                        format!("{image:?} is not an image in the store"),
                        "images",
                    );
                } else if let Some(names) = &self.images.names
                    && !names.iter().any(|n| n == image)
                {
                    r.push(
                        "spec.image",
                        format!("{image:?} is not one of the images offered to tenants"),
                        "images.names",
                    );
                }
            }
            Isolation::Container => {
                let ok = self
                    .images
                    .container
                    .iter()
                    .any(|p| match p.strip_suffix('*') {
                        Some(prefix) => image.starts_with(prefix),
                        None => p == image,
                    });
                if !ok {
                    r.push(
                        "spec.image",
                        format!("{image:?} is not an image the operator allows"),
                        "images.container",
                    );
                }
            }
        }
    }

    fn admit_resources(&self, cell: &mut Cell, r: &mut Refusals) {
        let (d, m) = (self.resources.defaults, self.resources.maximums);
        let tier = cell.spec.isolation;
        let res = &mut cell.spec.resources;
        let max = "resources.maximums";
        match res.cpus {
            None => res.cpus = Some(d.cpus),
            Some(c) if c > m.cpus + 1e-9 => r.push(
                "spec.resources.cpus",
                format!("{c} is more than the {} allowed", m.cpus),
                &format!("{max}.cpus"),
            ),
            Some(_) => {}
        }
        for (field, value, default, limit) in [
            ("memoryMiB", &mut res.memory_mib, d.memory_mib, m.memory_mib),
            ("diskGiB", &mut res.disk_gib, d.disk_gib, m.disk_gib),
        ] {
            match *value {
                None => *value = Some(default),
                Some(v) if v > limit => r.push(
                    format!("spec.resources.{field}"),
                    format!("{v} is more than the {limit} allowed"),
                    &format!("{max}.{field}"),
                ),
                Some(_) => {}
            }
        }
        // A volume is host disk too: no larger than a cell's disk may be.
        if let Some(v) = &cell.spec.volume
            && v.size_gib > m.disk_gib
        {
            r.push(
                "spec.volume.sizeGiB",
                format!("{} is more than the {} allowed", v.size_gib, m.disk_gib),
                &format!("{max}.diskGiB"),
            );
        }
        let res = &mut cell.spec.resources;
        // The guest kernel of a VM keeps its own process table and file
        // limits: those tiers refuse pids and ulimits.
        if !matches!(tier, Isolation::Process | Isolation::Container) {
            return;
        }
        match res.pids {
            None => res.pids = Some(d.pids),
            Some(p) if p > m.pids => r.push(
                "spec.resources.pids",
                format!("{p} is more than the {} allowed", m.pids),
                &format!("{max}.pids"),
            ),
            Some(_) => {}
        }
        let pids = res.pids.unwrap_or(d.pids);
        let memory = res
            .memory_mib
            .unwrap_or(d.memory_mib)
            .saturating_mul(1 << 20);
        for (i, u) in res.ulimits.iter().enumerate() {
            let field = format!("spec.resources.ulimits.{i}");
            let (limit, rule): (u64, String) = match u.name.as_str() {
                "nofile" => (m.nofile, format!("{max}.nofile")),
                "nproc" => (pids, "resources: nproc is at most the cell's pids".into()),
                "memlock" => (
                    memory,
                    "resources: memlock is at most the cell's memory".into(),
                ),
                // Real-time scheduling and negative nice values take CPU
                // from everyone else on the host.
                "rtprio" | "nice" | "rttime" => {
                    (0, "resources: no real-time or nice rlimits".into())
                }
                _ => (u64::MAX, String::new()),
            };
            if u.hard > limit {
                r.push(
                    field,
                    format!("{} {} is more than the {limit} allowed", u.name, u.hard),
                    &rule,
                );
            }
        }
        let ensure = |ulimits: &mut Vec<Ulimit>, name: &str, v: u64| {
            if !ulimits.iter().any(|u| u.name == name) {
                ulimits.push(Ulimit {
                    name: name.into(),
                    soft: v,
                    hard: v,
                });
            }
        };
        ensure(&mut res.ulimits, "nofile", d.nofile.min(m.nofile));
        if tier == Isolation::Process {
            // Each process cell has host ids of its own, so RLIMIT_NPROC
            // counts its own processes only.
            ensure(&mut res.ulimits, "nproc", pids);
        }
    }

    fn admit_network(&self, cell: &mut Cell, facts: &HostFacts, r: &mut Refusals) {
        let net = &mut cell.spec.network;
        if net.mode != NetworkMode::Bridged {
            return;
        }
        if net.dns.is_empty() {
            net.dns = self
                .egress
                .resolvers
                .iter()
                .map(|a| a.to_string())
                .collect();
        }
        for (i, d) in net.dns.iter().enumerate() {
            let listed = d
                .parse::<Ipv4Addr>()
                .is_ok_and(|a| self.egress.resolvers.contains(&a));
            if !listed {
                r.push(
                    format!("spec.network.dns.{i}"),
                    format!("{d} is not one of the resolvers the operator lists"),
                    "egress.resolvers",
                );
            }
        }
        let denied = self.denied_nets(facts);
        for (i, rule) in net.egress.iter().enumerate() {
            let field = format!("spec.network.egress.{i}.cidr");
            let Ok(want) = rule.cidr.parse::<Net>() else {
                r.push(
                    field,
                    format!("{} is not an IPv4 network", rule.cidr),
                    "egress",
                );
                continue;
            };
            if !self.egress.allow.iter().any(|a| a.contains(&want)) {
                r.push(
                    field,
                    format!("{want} is outside the networks cells may reach"),
                    "egress.allow",
                );
            } else if let Some(d) = denied.iter().find(|d| d.contains(&want)) {
                r.push(
                    field,
                    format!("{want} lies in {d}, which no cell may reach (the host, loopback, link-local and metadata, other cells)"),
                    "egress.deny",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellhost_spec::parse_and_validate;

    fn doc(spec: &str) -> Cell {
        parse_and_validate(&format!(
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{ name: t }}\nspec:\n{spec}"
        ))
        .unwrap()
    }

    fn facts() -> HostFacts {
        HostFacts {
            addresses: vec![Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(10, 47, 0, 1)],
            bridge: Some("10.47.0.0/16".parse().unwrap()),
            connected: vec!["192.0.2.0/24".parse().unwrap()],
        }
    }

    fn refusals(p: &Policy, mut c: Cell) -> Vec<String> {
        match p.admit(&mut c, &facts()) {
            Ok(()) => Vec::new(),
            Err(e) => e.refusals.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn defaults_are_written_so_no_cell_is_unlimited() {
        let p = Policy::default();
        let mut c = doc("  isolation: process\n  command: [/bin/true]\n");
        p.admit(&mut c, &facts()).unwrap();
        let r = &c.spec.resources;
        assert_eq!(r.cpus, Some(0.5));
        assert_eq!(r.memory_mib, Some(256));
        assert_eq!(r.pids, Some(256));
        assert_eq!(r.disk_gib, Some(1));
        assert_eq!(c.spec.lifetime.ttl_seconds, Some(3600));
        let nofile = r.ulimits.iter().find(|u| u.name == "nofile").unwrap();
        assert_eq!((nofile.soft, nofile.hard), (1024, 1024));
        let nproc = r.ulimits.iter().find(|u| u.name == "nproc").unwrap();
        assert_eq!(nproc.hard, 256);
        // A VM gets cpus, memory and disk; its kernel has its own tables.
        let mut vm = doc("  isolation: microvm\n  image: deb\n  command: [/bin/true]\n");
        p.admit(&mut vm, &facts()).unwrap();
        assert_eq!(vm.spec.resources.pids, None);
        assert!(vm.spec.resources.ulimits.is_empty());
        assert_eq!(vm.spec.resources.memory_mib, Some(256));
    }

    #[test]
    fn maximums_tiers_images_ports_and_leases_are_refused_by_name() {
        let mut p = Policy {
            tiers: Some(vec![Isolation::Process]),
            ..Default::default()
        };
        p.images.allow_host = false;
        let r = refusals(
            &p,
            doc(
                "  isolation: container\n  image: alpine:3\n  command: [x]\n  resources: { cpus: 16, memoryMiB: 100000, pids: 100000 }\n  ports: [ { container: 80, host: 80 } ]\n  lifetime: { ttlSeconds: 2000000 }\n",
            ),
        );
        let want = [
            "spec.isolation: the container tier is not offered on this host (policy: tiers)",
            "spec.resources.cpus: 16 is more than the 4 allowed (policy: resources.maximums.cpus)",
            "spec.resources.memoryMiB: 100000 is more than the 8192 allowed (policy: resources.maximums.memoryMiB)",
            "spec.resources.pids: 100000 is more than the 4096 allowed (policy: resources.maximums.pids)",
            "spec.lifetime.ttlSeconds: 2000000 s is longer than the 604800 s allowed (policy: lease.maxSeconds)",
            "spec.ports.0.host: 80 is outside the host ports 10000-32767 cells may publish on (policy: ports)",
        ];
        assert_eq!(r, want);
        assert_eq!(
            refusals(&p, doc("  isolation: process\n  command: [x]\n")),
            [
                "spec.image: `host` (the host's programs) is not offered; name an image in the store (policy: images.allowHost)"
            ]
        );
        p.images.names = Some(vec!["busybox".into()]);
        assert!(
            refusals(
                &p,
                doc("  isolation: process\n  image: busybox\n  command: [x]\n")
            )
            .is_empty()
        );
        assert_eq!(
            refusals(
                &p,
                doc("  isolation: process\n  image: other\n  command: [x]\n")
            ),
            [
                "spec.image: \"other\" is not one of the images offered to tenants (policy: images.names)"
            ]
        );
        // A host path never gets past the policy, even on an unvalidated document.
        let mut c = doc("  isolation: process\n  command: [x]\n");
        c.spec.image = "/var/lib/cellhost".into();
        assert_eq!(
            refusals(&Policy::default(), c),
            ["spec.image: \"/var/lib/cellhost\" is not an image in the store (policy: images)"]
        );
        let mut p = Policy::default();
        p.images.container = vec!["registry.example/team/*".into(), "busybox:1".into()];
        for (img, ok) in [
            ("registry.example/team/app:2", true),
            ("busybox:1", true),
            ("busybox:2", false),
            ("registry.example/other/app", false),
        ] {
            let r = refusals(
                &p,
                doc(&format!(
                    "  isolation: container\n  image: {img}\n  command: [x]\n"
                )),
            );
            assert_eq!(r.is_empty(), ok, "{img}: {r:?}");
        }
    }

    #[test]
    fn a_volume_is_no_larger_than_a_cells_disk() {
        let r = refusals(
            &Policy::default(),
            doc(
                "  isolation: container\n  image: alpine:3\n  command: [x]\n  volume: { path: /data, sizeGiB: 65536 }\n",
            ),
        );
        assert_eq!(
            r,
            [
                "spec.volume.sizeGiB: 65536 is more than the 64 allowed (policy: resources.maximums.diskGiB)"
            ]
        );
    }

    #[test]
    fn ulimits_that_take_from_the_host_are_refused() {
        let r = refusals(
            &Policy::default(),
            doc(
                "  isolation: process\n  command: [x]\n  resources:\n    pids: 10\n    ulimits:\n      - { name: nofile, soft: 1, hard: 1000000 }\n      - { name: rtprio, soft: 0, hard: 99 }\n      - { name: nproc, soft: 5, hard: 50 }\n      - { name: core, soft: 0, hard: 0 }\n",
            ),
        );
        assert_eq!(r.len(), 3, "{r:?}");
        assert!(
            r[0].starts_with("spec.resources.ulimits.0: nofile 1000000"),
            "{r:?}"
        );
        assert!(
            r[1].starts_with("spec.resources.ulimits.1: rtprio 99"),
            "{r:?}"
        );
        assert!(
            r[2].starts_with("spec.resources.ulimits.2: nproc 50 is more than the 10"),
            "{r:?}"
        );
    }

    #[test]
    fn egress_stays_inside_the_operator_bounds() {
        let mut p = Policy::default();
        p.egress.resolvers = vec![Ipv4Addr::new(10, 1, 0, 53)];
        let mut ok = doc(
            "  isolation: process\n  command: [x]\n  network:\n    mode: bridged\n    egress: [ { cidr: 0.0.0.0/0 }, { cidr: 198.51.100.0/24, port: 443 } ]\n",
        );
        p.admit(&mut ok, &facts()).unwrap();
        assert_eq!(
            ok.spec.network.dns,
            ["10.1.0.53"],
            "the policy's resolvers by default"
        );
        let bad = [
            ("169.254.169.254/32", "egress.deny"),
            ("100.100.100.200/32", "egress.deny"), // a cloud's metadata in CGNAT space
            ("10.9.0.0/16", "egress.deny"),        // a private range: a VPC, the LAN
            ("192.0.2.77/32", "egress.deny"),      // a neighbour on the host's LAN
            ("127.0.0.1/32", "egress.deny"),
            ("192.0.2.10/32", "egress.deny"), // the host's own address
            ("10.47.0.1/32", "egress.deny"),  // the gateway
            ("10.47.3.0/24", "egress.deny"),  // other cells
            ("224.0.0.0/8", "egress.deny"),
        ];
        for (cidr, rule) in bad {
            let r = refusals(
                &p,
                doc(&format!(
                    "  isolation: process\n  command: [x]\n  network:\n    mode: bridged\n    egress: [ {{ cidr: {cidr} }} ]\n"
                )),
            );
            assert_eq!(r.len(), 1, "{cidr}: {r:?}");
            assert!(
                r[0].starts_with("spec.network.egress.0.cidr")
                    && r[0].ends_with(&format!("(policy: {rule})")),
                "{r:?}"
            );
        }
        // An operator who opens its private ranges and its LAN.
        let mut open = p.clone();
        open.egress.deny.clear();
        open.egress.deny_connected = false;
        assert!(
            refusals(
                &open,
                doc("  isolation: process\n  command: [x]\n  network:\n    mode: bridged\n    egress: [ { cidr: 10.9.0.0/16 }, { cidr: 192.0.2.77/32 } ]\n"),
            )
            .is_empty()
        );
        let r = refusals(
            &p,
            doc(
                "  isolation: process\n  command: [x]\n  network:\n    mode: bridged\n    dns: [ 8.8.8.8 ]\n",
            ),
        );
        assert_eq!(
            r,
            [
                "spec.network.dns.0: 8.8.8.8 is not one of the resolvers the operator lists (policy: egress.resolvers)"
            ]
        );
        p.egress.allow = vec!["198.51.100.0/24".parse().unwrap()];
        let r = refusals(
            &p,
            doc(
                "  isolation: process\n  command: [x]\n  network:\n    mode: bridged\n    egress: [ { cidr: 203.0.113.0/24 } ]\n",
            ),
        );
        assert!(r[0].ends_with("(policy: egress.allow)"), "{r:?}");
    }
}
