//! Hostile Authorization headers: whatever a tenant sends, the verifier
//! answers with an error code (or a key), never a panic.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cellhost_access::nip98::{SignedRequest, Verifier, sign};
use nostr::Keys;
use proptest::prelude::*;

const BASE: &str = "https://127.0.0.1:7443";
const NOW: u64 = 1_800_000_000;

fn req<'a>(method: &'a str, pq: &'a str, body: &'a [u8]) -> SignedRequest<'a> {
    SignedRequest {
        method,
        path_and_query: pq,
        body,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_headers_never_panic(h in ".{0,600}", m in "[A-Z]{0,8}", pq in "/[ -~]{0,80}", body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let v = Verifier::new(BASE).unwrap();
        let _ = v.verify(&h, req(&m, &pq, &body), NOW);
        let _ = v.verify(&format!("Nostr {h}"), req(&m, &pq, &body), NOW);
    }

    /// Any JSON-ish text, base64-encoded: the decoder sees it all.
    #[test]
    fn arbitrary_events_never_panic(json in r#"\{("[a-z_]{1,10}":("[ -~]{0,40}"|[0-9]{1,20}|\[(\["[a-z]{0,8}"(,"[ -~]{0,40}"){0,3}\],?){0,4}\]),?){0,8}\}"#) {
        let v = Verifier::new(BASE).unwrap();
        let h = format!("Nostr {}", B64.encode(&json));
        let e = v.verify(&h, req("GET", "/v1/cells", b""), NOW);
        prop_assert!(e.is_err());
    }

    /// A real signed event with one byte of its JSON flipped is refused.
    #[test]
    fn a_flipped_byte_is_refused(at in 0usize..400, bit in 0u8..8) {
        let keys = Keys::generate();
        let v = Verifier::new(BASE).unwrap();
        let h = sign(&keys, "POST", &format!("{BASE}/v1/cells"), b"{}", NOW).unwrap();
        let mut json = B64.decode(&h[6..]).unwrap();
        let i = at % json.len();
        json[i] ^= 1 << bit;
        let h = format!("Nostr {}", B64.encode(&json));
        // Flipping a byte may leave equal JSON (e.g. whitespace), never a
        // different accepted event: what verifies is the original.
        if let Ok(pk) = v.verify(&h, req("POST", "/v1/cells", b"{}"), NOW) {
            prop_assert_eq!(pk, keys.public_key());
        }
    }
}
