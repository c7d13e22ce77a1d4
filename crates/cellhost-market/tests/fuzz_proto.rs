//! Hostile input never panics the provider's parsers: request contents,
//! Cashu tokens and market configs, from random bytes and from mutations
//! of valid shapes.

use cellhost_market::MarketConfig;
use cellhost_market::cashier::Cashier;
use cellhost_market::proto::{ErrorCode, Request};
use proptest::prelude::*;

fn cashier() -> Cashier {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let seed = zeroize::Zeroizing::new([7u8; 64]);
    rt.block_on(Cashier::in_memory(
        &seed,
        &["http://127.0.0.1:3338".to_string()],
    ))
    .unwrap()
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

const OPS: [&str; 6] = ["spawn", "topup", "status", "stop", "", "SPAWN"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_text_is_a_request_or_a_coded_refusal(s in ".{0,400}") {
        match Request::parse(&s) {
            Ok(r) => prop_assert_eq!(Request::parse(&r.to_json()).unwrap(), r),
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }

    #[test]
    fn mutated_requests_never_panic(
        op in 0usize..6,
        cell in proptest::option::of(".{0,40}"),
        token in proptest::option::of(".{0,80}"),
        tier in proptest::option::of("[a-z]{0,10}"),
        extra in proptest::option::weighted(0.2, ("[a-zA-Z]{1,8}", any::<i64>())),
        version in proptest::option::weighted(0.2, any::<u32>()),
    ) {
        let mut v = serde_json::json!({"op": OPS[op]});
        for (k, val) in [("cell", cell), ("token", token), ("tier", tier)] {
            if let Some(x) = val { v[k] = x.into(); }
        }
        if let Some((k, n)) = extra { v[k] = n.into(); }
        if let Some(n) = version { v["cellhost"] = n.into(); }
        match Request::parse(&v.to_string()) {
            Ok(r) => prop_assert_eq!(r.version(), 1),
            Err(e) => prop_assert!(matches!(e.code, ErrorCode::BadRequest | ErrorCode::UnknownOp)),
        }
    }

    #[test]
    fn hostile_tokens_are_refused_with_a_code(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        prefix in prop_oneof![Just("cashuA"), Just("cashuB"), Just(""), Just("cashu")],
        text in ".{0,200}",
    ) {
        thread_local! { static C: Cashier = cashier(); }
        C.with(|c| {
            for t in [format!("{prefix}{}", base64url(&bytes)), text.clone(), format!("{prefix}{text}")] {
                let e = c.check(&t).expect_err("random bytes are not a token");
                assert!(matches!(e.code, ErrorCode::TokenInvalid | ErrorCode::MintNotAccepted), "{e}");
            }
        });
    }

    #[test]
    fn any_config_text_parses_or_names_a_field(s in ".{0,300}") {
        let _ = MarketConfig::parse(&s);
    }
}

#[test]
fn some_mutations_are_valid_requests() {
    // The mutation property above mostly hits refusals; the success path
    // of every op is checked here.
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::default();
    let strat = (0usize..4, ".{1,20}", ".{1,20}");
    runner
        .run(&strat, |(op, cell, token)| {
            let v =
                serde_json::json!({"op": OPS[op], "cell": cell, "token": token, "tier": "process"});
            let _ = Request::parse(&v.to_string());
            let minimal = match OPS[op] {
                "spawn" => serde_json::json!({"op": "spawn", "tier": "process", "token": token}),
                "topup" => serde_json::json!({"op": "topup", "cell": cell, "token": token}),
                o => serde_json::json!({"op": o, "cell": cell}),
            };
            prop_assert!(Request::parse(&minimal.to_string()).is_ok());
            Ok(())
        })
        .unwrap();
}
