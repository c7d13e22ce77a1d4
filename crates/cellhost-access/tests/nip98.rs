//! NIP-98 verification: each way a signed request can be wrong gets its
//! own code, and headers made by rust-nostr's own NIP-98 implementation
//! (an independent signer and verifier) interoperate with ours.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cellhost_access::nip98::{AuthError, MAX_REMEMBERED, SignedRequest, Verifier, WINDOW, sign};
use nostr::nips::nip98::{HttpData, HttpMethod, verify_auth_header};
use nostr::{EventBuilder, JsonUtil, Keys, Kind, Tag, Timestamp, Url};

const BASE: &str = "https://127.0.0.1:7443";
const NOW: u64 = 1_800_000_000;

fn get(path: &str) -> SignedRequest<'_> {
    SignedRequest {
        method: "GET",
        path_and_query: path,
        body: b"",
    }
}

#[test]
fn a_signed_request_names_its_signer_once() {
    let v = Verifier::new(BASE).unwrap();
    let keys = Keys::generate();
    let h = sign(&keys, "GET", &format!("{BASE}/v1/cells"), b"", NOW).unwrap();
    assert_eq!(
        v.verify(&h, get("/v1/cells"), NOW).unwrap(),
        keys.public_key()
    );
    // The same header again, even a second later: a replay.
    assert_eq!(
        v.verify(&h, get("/v1/cells"), NOW + 1).unwrap_err(),
        AuthError::Replayed
    );
    // A fresh signature of the same request is fine.
    let h2 = sign(&keys, "GET", &format!("{BASE}/v1/cells"), b"", NOW + 1).unwrap();
    assert!(v.verify(&h2, get("/v1/cells"), NOW + 1).is_ok());
}

#[test]
fn each_wrong_request_has_its_code() {
    let v = Verifier::new(BASE).unwrap();
    let keys = Keys::generate();
    let url = format!("{BASE}/v1/cells/abc");
    let code =
        |h: &str, req: SignedRequest<'_>, now: u64| v.verify(h, req, now).unwrap_err().code();

    // Stale or from the future, past the window either way.
    let old = sign(&keys, "GET", &url, b"", NOW - WINDOW - 1).unwrap();
    assert_eq!(code(&old, get("/v1/cells/abc"), NOW), "auth_expired");
    let ahead = sign(&keys, "GET", &url, b"", NOW + WINDOW + 1).unwrap();
    assert_eq!(code(&ahead, get("/v1/cells/abc"), NOW), "auth_expired");
    // A created_at far past i64 is refused, not an overflow.
    let far = sign(&keys, "GET", &url, b"", 1 << 63).unwrap();
    assert_eq!(code(&far, get("/v1/cells/abc"), NOW), "auth_expired");
    // At the window's edge it still counts.
    let edge = sign(&keys, "GET", &url, b"", NOW - WINDOW).unwrap();
    assert!(v.verify(&edge, get("/v1/cells/abc"), NOW).is_ok());

    // Misaddressed: another path, another host, another method.
    let h = sign(&keys, "GET", &url, b"", NOW).unwrap();
    assert_eq!(code(&h, get("/v1/cells/abd"), NOW), "auth_url_mismatch");
    let elsewhere = Verifier::new("https://203.0.113.7:7443").unwrap();
    assert_eq!(
        elsewhere
            .verify(&h, get("/v1/cells/abc"), NOW)
            .unwrap_err()
            .code(),
        "auth_url_mismatch"
    );
    let del = SignedRequest {
        method: "DELETE",
        ..get("/v1/cells/abc")
    };
    assert_eq!(code(&h, del, NOW), "auth_method_mismatch");

    // A body: the payload must be signed and match.
    let body = br#"{"seconds":60}"#;
    let post = |b: &'static [u8]| SignedRequest {
        method: "POST",
        path_and_query: "/v1/cells/abc/extend",
        body: b,
    };
    let purl = format!("{BASE}/v1/cells/abc/extend");
    let signed = sign(&keys, "POST", &purl, body, NOW).unwrap();
    assert_eq!(
        code(&signed, post(br#"{"seconds":99999}"#), NOW),
        "auth_payload_mismatch"
    );
    let bodiless = sign(&keys, "POST", &purl, b"", NOW).unwrap();
    assert_eq!(code(&bodiless, post(body), NOW), "auth_payload_mismatch");
    assert!(v.verify(&signed, post(body), NOW).is_ok());

    // Another kind, a broken signature, garbage.
    let note = EventBuilder::new(Kind::TextNote, "")
        .tags([
            Tag::parse(["u", &url]).unwrap(),
            Tag::parse(["method", "GET"]).unwrap(),
        ])
        .custom_created_at(Timestamp::from(NOW))
        .sign_with_keys(&keys)
        .unwrap();
    let h = format!("Nostr {}", B64.encode(note.as_json()));
    assert_eq!(code(&h, get("/v1/cells/abc"), NOW), "auth_wrong_kind");

    let good = sign(&keys, "GET", &url, b"", NOW + 2).unwrap();
    let json = String::from_utf8(B64.decode(&good[6..]).unwrap()).unwrap();
    let mut ev: serde_json::Value = serde_json::from_str(&json).unwrap();
    // Another key claims the event: the signature no longer matches.
    ev["pubkey"] = Keys::generate().public_key().to_hex().into();
    let forged = format!("Nostr {}", B64.encode(ev.to_string()));
    assert_eq!(
        code(&forged, get("/v1/cells/abc"), NOW + 2),
        "auth_bad_signature"
    );

    for h in [
        "",
        "Bearer abc",
        "Nostr",
        "Nostr !!!",
        "Nostr e30=",
        &"Nostr ".repeat(4000),
    ] {
        assert_eq!(
            code(h, get("/v1/cells/abc"), NOW),
            "auth_malformed",
            "{h:.40}"
        );
    }
}

#[test]
fn the_memory_of_used_ids_is_bounded_and_fails_closed() {
    const CAP: usize = 200;
    const { assert!(MAX_REMEMBERED > CAP) };
    let v = Verifier::new(BASE).unwrap().with_capacity(CAP);
    let keys = Keys::generate();
    let url = format!("{BASE}/v1/cells");
    let headers: Vec<String> = (0..CAP as u64)
        .map(|i| {
            // Distinct events: the `u` query differs.
            sign(&keys, "GET", &format!("{url}?n={i}"), b"", NOW).unwrap()
        })
        .collect();
    for (i, h) in headers.iter().enumerate() {
        let pq = format!("/v1/cells?n={i}");
        v.verify(h, get(&pq), NOW).unwrap();
    }
    let one_more = sign(&keys, "GET", &url, b"", NOW).unwrap();
    assert_eq!(
        v.verify(&one_more, get("/v1/cells"), NOW).unwrap_err(),
        AuthError::Busy
    );
    // Once the window has passed they are forgotten, and all are refused
    // as expired rather than accepted again.
    let later = NOW + 2 * WINDOW + 1;
    assert_eq!(
        v.verify(&headers[0], get("/v1/cells?n=0"), later)
            .unwrap_err()
            .code(),
        "auth_expired"
    );
    let fresh = sign(&keys, "GET", &url, b"", later).unwrap();
    assert!(v.verify(&fresh, get("/v1/cells"), later).is_ok());
}

/// rust-nostr's NIP-98 signer → our verifier, and ours → theirs.
#[tokio::test]
async fn interoperates_with_rust_nostr_nip98() {
    let keys = Keys::generate();
    let v = Verifier::new(BASE).unwrap();
    let url = format!("{BASE}/v1/cells/abc/exec");
    let body = br#"{"argv":["true"]}"#;
    let data = HttpData::new(Url::parse(&url).unwrap(), HttpMethod::POST)
        .payload(nostr::hashes::sha256::Hash::hash(body));
    let theirs = data.to_authorization(&keys).await.unwrap();
    let req = SignedRequest {
        method: "POST",
        path_and_query: "/v1/cells/abc/exec",
        body,
    };
    let now = Timestamp::now().as_secs();
    assert_eq!(v.verify(&theirs, req, now).unwrap(), keys.public_key());

    let ours = sign(&keys, "POST", &url, body, now).unwrap();
    let pk = verify_auth_header(
        &ours,
        &Url::parse(&url).unwrap(),
        HttpMethod::POST,
        Timestamp::from(now),
        Some(body),
    )
    .unwrap();
    assert_eq!(pk, keys.public_key());
}

use nostr::hashes::Hash as _;

#[test]
fn the_same_request_twice_in_one_second_is_two_events() {
    let v = Verifier::new(BASE).unwrap();
    let keys = Keys::generate();
    let url = format!("{BASE}/v1/cells");
    let a = sign(&keys, "GET", &url, b"", NOW).unwrap();
    let b = sign(&keys, "GET", &url, b"", NOW).unwrap();
    assert!(v.verify(&a, get("/v1/cells"), NOW).is_ok());
    assert!(v.verify(&b, get("/v1/cells"), NOW).is_ok());
}
