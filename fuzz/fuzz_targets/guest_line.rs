//! Fuzz the guest agent's request path: bytes in, through the capped line
//! framer and `Agent::handle_line`, responses out.
//!
//! Run (nightly + cargo-fuzz):
//!
//! ```text
//! cd fuzz && cargo +nightly fuzz run guest_line -- -max_len=65536 -rss_limit_mb=256
//! ```
//!
//! Invariants (as the crate's property test
//! `crates/cellhost-guest/tests/fuzz_lines.rs`): never panics; every
//! response is one JSON line of the protocol's shape; memory stays within
//! the rss limit whatever the input (the framer never buffers more than
//! its cap). exec is off: random argv would run random programs.

#![no_main]

use std::sync::OnceLock;

use cellhost_guest::agent::{Agent, Config, serve};
use cellhost_guest::proto::Response;
use libfuzzer_sys::fuzz_target;

fn agent() -> &'static Agent {
    static A: OnceLock<(Agent, tempfile::TempDir)> = OnceLock::new();
    &A.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("files")).expect("files dir");
        let mut cfg = Config::new(dir.path().join("state"));
        cfg.file_roots = vec![dir.path().join("files")];
        cfg.exec = false;
        (Agent::new(cfg).expect("agent"), dir)
    })
    .0
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    serve::serve_stream(agent(), data, &mut out).expect("in-memory streams do not fail");
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let r: Response = serde_json::from_slice(line).expect("a protocol response");
        assert_eq!(r.ok, r.error.is_none());
        assert_eq!(r.ok, r.code.is_none());
    }
});
