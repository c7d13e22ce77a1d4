//! Fuzz the market provider's request parser (what arrives in a NIP-17
//! DM from anyone) and its config parser.
//!
//! Run (nightly + cargo-fuzz):
//!
//! ```text
//! cd fuzz && cargo +nightly fuzz run market_request -- -max_len=8192
//! ```
//!
//! Invariants: never panics; an accepted request round-trips through its
//! own JSON; a refusal has a message.

#![no_main]

use cellhost_market::MarketConfig;
use cellhost_market::proto::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    match Request::parse(input) {
        Ok(r) => assert_eq!(Request::parse(&r.to_json()).unwrap(), r),
        Err(e) => assert!(!e.message.is_empty()),
    }
    let _ = MarketConfig::parse(input);
});
