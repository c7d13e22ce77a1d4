//! Fuzz `cellhost_spec::parse_and_validate` with arbitrary bytes.
//!
//! Run (nightly + cargo-fuzz):
//!
//! ```text
//! cd fuzz && cargo +nightly fuzz run spec_parse -- -max_len=4096
//! ```
//!
//! Besides "never panics", it checks the same invariants as the crate's
//! property test (`crates/cellhost-spec/tests/no_panic.rs`): errors are one
//! line, and an accepted document round-trips through JSON unchanged.

#![no_main]

use cellhost_spec::{SpecError, parse, parse_and_validate, redacted, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The API takes &str; non-UTF-8 input is the caller's problem.
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    match parse_and_validate(input) {
        Ok(cell) => {
            let json = serde_json::to_string(&cell).expect("a valid cell serializes");
            let back = parse(&json).expect("a valid cell's JSON parses");
            assert_eq!(back, cell, "JSON round trip changed the cell");
            assert!(
                validate(&redacted(&cell)).is_ok(),
                "redaction broke validity"
            );
        }
        Err(SpecError::Parse(e)) => {
            let s = e.to_string();
            assert!(!s.contains('\n') && !s.contains('\r'), "multi-line: {s:?}");
        }
        Err(SpecError::Invalid(errs)) => {
            assert!(!errs.is_empty());
            for fe in &errs {
                assert!(!fe.to_string().chars().any(char::is_control), "{fe:?}");
            }
        }
    }
});
