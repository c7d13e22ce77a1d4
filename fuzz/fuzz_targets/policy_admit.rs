//! Fuzz the operator policy's reading and its admission of documents:
//! input is `<policy text>\n---8<---\n<cell document>`.
//!
//! Run (nightly + cargo-fuzz):
//!
//! ```text
//! cd fuzz && cargo +nightly fuzz run policy_admit -- -max_len=8192
//! ```
//!
//! Checks the property test's invariants (crates/cellhost-policy/tests/
//! admit_props.rs): no panic; errors are one line; an admitted document
//! is still valid, within the maximums, and admitting it again changes
//! nothing.

#![no_main]

use cellhost_policy::{HostFacts, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let (policy_text, doc) = input.split_once("\n---8<---\n").unwrap_or(("", input));
    let policy = if policy_text.trim().is_empty() {
        Policy::default()
    } else {
        match Policy::parse(policy_text) {
            Ok(p) => p,
            Err(e) => {
                assert!(!e.to_string().contains('\n'), "multi-line: {e}");
                return;
            }
        }
    };
    let Ok(mut cell) = cellhost_spec::parse_and_validate(doc) else {
        return;
    };
    let facts = HostFacts {
        addresses: vec![std::net::Ipv4Addr::new(192, 0, 2, 10)],
        bridge: Some("10.47.0.0/16".parse().unwrap()),
        connected: vec!["192.0.2.0/24".parse().unwrap()],
    };
    match policy.admit(&mut cell, &facts) {
        Ok(()) => {
            assert!(cellhost_spec::validate(&cell).is_ok(), "admission broke validity");
            let m = policy.resources.maximums;
            let r = &cell.spec.resources;
            assert!(r.cpus.is_some_and(|c| c <= m.cpus + 1e-9));
            assert!(r.memory_mib.is_some_and(|v| v <= m.memory_mib));
            let mut again = cell.clone();
            assert!(policy.admit(&mut again, &facts).is_ok());
            assert_eq!(again, cell);
        }
        Err(e) => {
            for r in &e.refusals {
                assert!(r.field.starts_with("spec."), "{r}");
                assert!(!r.to_string().contains('\n'), "{r}");
            }
        }
    }
});
