//! The tenant API's TLS identity and the pinned client, over real TCP on
//! loopback with rustls on both ends.

use std::os::unix::fs::PermissionsExt;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use cellhost_access::client::PinnedClient;
use cellhost_access::nip98::{SignedRequest, Verifier, now};
use cellhost_access::tls::{TlsIdentity, TlsListener};
use cellhost_access::{AccessError, Fingerprint};
use nostr::Keys;
use std::sync::Arc;

fn names() -> Vec<String> {
    vec!["127.0.0.1".into(), "localhost".into()]
}

#[test]
fn the_identity_is_made_once_and_its_key_kept_private() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let a = TlsIdentity::load_or_create(&tls, &names()).unwrap();
    let mode = |p: &str| std::fs::metadata(tls.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("key.der"), 0o600);
    assert_eq!(
        std::fs::metadata(&tls).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // Loaded again (another start): the same certificate, whatever names.
    let b = TlsIdentity::load_or_create(&tls, &["example.invalid".into()]).unwrap();
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.fingerprint().to_string().len(), 64);
    let parsed: Fingerprint = a.fingerprint().to_string().parse().unwrap();
    assert_eq!(parsed, a.fingerprint());
    // A key someone else can read is refused, not served.
    std::fs::set_permissions(tls.join("key.der"), std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        TlsIdentity::load_or_create(&tls, &names()),
        Err(AccessError::KeyMode { .. })
    ));
    assert!("abc".parse::<Fingerprint>().is_err());
}

/// A server on 127.0.0.1 whose one route answers the NIP-98 signer.
async fn server(id: &TlsIdentity) -> (String, Arc<Verifier>) {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", tcp.local_addr().unwrap());
    let v = Arc::new(Verifier::new(&base).unwrap());
    let vv = v.clone();
    let app = Router::new().route(
        "/whoami",
        get(move |h: HeaderMap| async move {
            let auth = h
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let req = SignedRequest {
                method: "GET",
                path_and_query: "/whoami",
                body: b"",
            };
            match vv.verify(auth, req, now()) {
                Ok(pk) => pk.to_hex(),
                Err(e) => e.code().to_string(),
            }
        }),
    );
    let listener = TlsListener::new(tcp, id.server_config().unwrap()).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, v)
}

#[tokio::test]
async fn the_pinned_client_reaches_its_server_and_refuses_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let id = TlsIdentity::load_or_create(&dir.path().join("a"), &names()).unwrap();
    let (base, _) = server(&id).await;

    // A client that never finishes its handshake does not hold up others.
    let _stalled = tokio::net::TcpStream::connect(base.trim_start_matches("https://"))
        .await
        .unwrap();

    let keys = Keys::generate();
    let c = PinnedClient::new(&base, id.fingerprint(), Some(keys.clone())).unwrap();
    let (status, body) = c.call("GET", "/whoami", vec![], 1 << 16).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, keys.public_key().to_hex().as_bytes());

    // A forged certificate: the same names, self-signed, another key.
    // The client pinned to the real one refuses it and says what it saw.
    let forged = TlsIdentity::load_or_create(&dir.path().join("b"), &names()).unwrap();
    let (forged_base, _) = server(&forged).await;
    let c = PinnedClient::new(&forged_base, id.fingerprint(), Some(keys)).unwrap();
    match c.call("GET", "/whoami", vec![], 1 << 16).await {
        Err(AccessError::CertificateMismatch {
            expected,
            presented,
        }) => {
            assert_eq!(expected, id.fingerprint());
            assert_eq!(presented, forged.fingerprint());
        }
        other => panic!("expected a certificate mismatch, got {other:?}"),
    }
}
