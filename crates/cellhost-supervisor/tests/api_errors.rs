//! What a tenant reads when the host fails, without root: the tenant API
//! on loopback over `FakeBackend`. A tier's engine error (whose text names
//! host paths and objects) reaches the tenant as a fixed sentence and a
//! reference into the operator's log; a refusal of the tenant's own
//! request keeps its message and field.

use std::io::{Read, Write};
use std::sync::Arc;

use cellhost_core::Backend;
use cellhost_core::testing::{FakeBackend, Fault, Op};
use cellhost_spec::Isolation;
use cellhost_store::Store;
use cellhost_supervisor::tokens::Tokens;
use cellhost_supervisor::{Supervisor, SupervisorConfig};

const TOKEN: &str = "tenant-token-0123456789abcdef";

/// `POST /v1/cells` with `body` as the tenant: (status, JSON body).
fn post(addr: std::net::SocketAddr, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/cells HTTP/1.1\r\nHost: cellhost\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let json = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(json).unwrap_or_default())
}

fn doc(spec: serde_json::Value) -> serde_json::Value {
    let mut s =
        serde_json::json!({ "isolation": "process", "image": "host", "command": ["/bin/true"] });
    for (k, v) in spec.as_object().unwrap() {
        s[k] = v.clone();
    }
    serde_json::json!({
        "apiVersion": "cellhost.dev/v1", "kind": "Cell", "metadata": { "name": "t" }, "spec": s
    })
}

#[test]
fn the_hosts_failures_reach_a_tenant_without_their_detail() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = Arc::new(FakeBackend::new(Isolation::Process));
    let mut cfg = SupervisorConfig::new("api-errors", dir.path().to_path_buf());
    cfg.uid_claims_dir = dir.path().join("claims");
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let sup = Supervisor::new(store, vec![fake.clone() as Arc<dyn Backend>], cfg).unwrap();
    let tokens = Arc::new(Tokens::parse(&format!("alice {TOKEN}\n")).unwrap());
    let auth = cellhost_supervisor::api::TenantAuth {
        tokens: Some(tokens),
        nostr: None,
    };
    let app = cellhost_supervisor::api::tenant_router(sup, auth);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });

    // The engine fails the create ("scripted Create failure" stands for
    // its text: a path under the state dir, a container name).
    fake.fail(Op::Create, Fault::Error);
    let (status, body) = post(addr, &doc(serde_json::json!({})));
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["code"], "backend", "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        !error.contains("scripted"),
        "engine detail reached the tenant: {error}"
    );
    assert!(
        error.starts_with("the tier failed on the host (ref "),
        "{error}"
    );

    // Its own mistakes keep their message and field.
    let (status, body) = post(addr, &doc(serde_json::json!({ "command": [] })));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "spec.command", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("spec.command"),
        "{body}"
    );
}
