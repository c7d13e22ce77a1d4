//! Property tests of `Policy::admit` over generated documents: it never
//! panics; what it admits is valid, within every maximum and leaves nothing
//! unset the kernel must enforce; what it refuses names a document field
//! and a policy rule.

use cellhost_policy::{HostFacts, Net, Policy};
use cellhost_spec::{Isolation, parse_and_validate, validate};
use proptest::prelude::*;

fn tier() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("process"),
        Just("container"),
        Just("vm"),
        Just("microvm")
    ]
}

fn image() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("host"),
        Just("busybox"),
        Just("deb"),
        Just("alpine:3"),
        Just("registry.example/team/app:1"),
    ]
}

prop_compose! {
    fn document()(
        tier in tier(),
        image in image(),
        cpus in prop::option::of(1u32..2000),
        memory in prop::option::of(16u64..20_000),
        pids in prop::option::of(1u64..10_000),
        disk in prop::option::of(1u64..200),
        nofile in prop::option::of(16u64..2_000_000),
        ttl in prop::option::of(1u64..2_000_000),
        port in prop::option::of(1u32..65_536),
        bridged in any::<bool>(),
        cidr in prop::option::of((any::<u32>(), 0u8..=32)),
        dns in prop::option::of(any::<u32>()),
    ) -> String {
        let mut spec = format!("  isolation: {tier}\n  image: {image}\n  command: [/bin/true]\n");
        let is_vm = matches!(tier, "vm" | "microvm");
        let mut res = Vec::new();
        if let Some(c) = cpus { res.push(format!("cpus: {}", f64::from(c) / 100.0)); }
        if let Some(m) = memory { res.push(format!("memoryMiB: {m}")); }
        if let Some(p) = pids.filter(|_| !is_vm) { res.push(format!("pids: {p}")); }
        if let Some(d) = disk { res.push(format!("diskGiB: {d}")); }
        if let Some(n) = nofile.filter(|_| !is_vm) {
            res.push(format!("ulimits: [ {{ name: nofile, soft: {n}, hard: {n} }} ]"));
        }
        if !res.is_empty() { spec.push_str(&format!("  resources: {{ {} }}\n", res.join(", "))); }
        if let Some(t) = ttl.filter(|t| *t <= 30 * 24 * 3600) {
            spec.push_str(&format!("  lifetime: {{ ttlSeconds: {t} }}\n"));
        }
        if bridged {
            let mut net = vec!["mode: bridged".to_string()];
            if let Some((a, p)) = cidr {
                let n = Net::new(std::net::Ipv4Addr::from(a), p);
                net.push(format!("egress: [ {{ cidr: \"{n}\" }} ]"));
            }
            if let Some(d) = dns {
                net.push(format!("dns: [ \"{}\" ]", std::net::Ipv4Addr::from(d)));
            }
            spec.push_str(&format!("  network: {{ {} }}\n", net.join(", ")));
            if let Some(p) = port {
                spec.push_str(&format!("  ports: [ {{ container: 80, host: {p} }} ]\n"));
            }
        }
        format!("apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{ name: p }}\nspec:\n{spec}")
    }
}

fn facts() -> HostFacts {
    HostFacts {
        addresses: vec![std::net::Ipv4Addr::new(192, 0, 2, 10)],
        bridge: Some("10.47.0.0/16".parse().unwrap()),
        connected: vec!["192.0.2.0/24".parse().unwrap()],
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn admitted_documents_are_valid_bounded_and_complete(text in document()) {
        let Ok(mut cell) = parse_and_validate(&text) else { return Ok(()) };
        let mut policy = Policy::default();
        policy.egress.resolvers = vec![std::net::Ipv4Addr::new(10, 1, 0, 53)];
        let m = policy.resources.maximums;
        match policy.admit(&mut cell, &facts()) {
            Ok(()) => {
                prop_assert!(validate(&cell).is_ok(), "admission broke validity: {cell:?}");
                let r = &cell.spec.resources;
                prop_assert!(r.cpus.is_some_and(|c| c <= m.cpus + 1e-9));
                prop_assert!(r.memory_mib.is_some_and(|v| v <= m.memory_mib));
                prop_assert!(r.disk_gib.is_some_and(|v| v <= m.disk_gib));
                prop_assert!(cell.spec.lifetime.ttl_seconds.is_some_and(|t| t <= policy.lease.max_seconds));
                if matches!(cell.spec.isolation, Isolation::Process | Isolation::Container) {
                    prop_assert!(r.pids.is_some_and(|v| v <= m.pids));
                    let nofile = r.ulimits.iter().find(|u| u.name == "nofile");
                    prop_assert!(nofile.is_some_and(|u| u.hard <= m.nofile));
                }
                for p in &cell.spec.ports {
                    prop_assert!((u32::from(policy.ports.min)..=u32::from(policy.ports.max)).contains(&p.host));
                }
                let denied = policy.denied_nets(&facts());
                for e in &cell.spec.network.egress {
                    let n: Net = e.cidr.parse().unwrap();
                    prop_assert!(!denied.iter().any(|d| d.contains(&n)), "{n} admitted");
                }
                // Admitting again changes nothing: the defaults are in.
                let mut again = cell.clone();
                prop_assert!(policy.admit(&mut again, &facts()).is_ok());
                prop_assert_eq!(again, cell);
            }
            Err(e) => {
                prop_assert!(!e.refusals.is_empty());
                for r in &e.refusals {
                    prop_assert!(r.field.starts_with("spec."), "{r}");
                    prop_assert!(!r.rule.is_empty(), "{r}");
                    prop_assert!(!r.to_string().contains('\n'), "{r}");
                }
            }
        }
    }

    #[test]
    fn any_policy_text_is_a_policy_or_a_one_line_error(text in ".{0,300}") {
        match Policy::parse(&text) {
            Ok(p) => prop_assert!(p.check().is_ok()),
            Err(e) => prop_assert!(!e.to_string().contains('\n'), "{e}"),
        }
    }
}

#[test]
fn the_example_policy_is_the_built_in_default() {
    let text = include_str!("../../../examples/policy.yaml");
    assert_eq!(Policy::parse(text).unwrap(), Policy::default());
}

/// What the README tells people to run is admitted as it stands.
#[test]
fn every_example_cell_is_admitted_by_the_default_policy() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if !text.lines().any(|l| l.trim() == "kind: Cell") {
            continue;
        }
        let mut cell =
            parse_and_validate(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Policy::default()
            .admit(&mut cell, &HostFacts::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(
        seen >= 5,
        "only {seen} example cells found in {}",
        dir.display()
    );
}
