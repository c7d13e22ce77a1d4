//! Admission without root, on `FakeBackend`: a tier's refusals
//! (`cellhost_spec::validate_for`) reach the caller with the field named,
//! before anything is recorded or made, through `create` and `admits`
//! (the market's check before it takes payment) alike.

use std::sync::Arc;

use cellhost_core::Backend;
use cellhost_core::testing::FakeBackend;
use cellhost_spec::{Cell, Isolation};
use cellhost_store::Store;
use cellhost_supervisor::{Caller, Confidential, Supervisor, SupervisorConfig, SupervisorError};

fn doc(isolation: &str, extra: serde_json::Value) -> Cell {
    let mut d = serde_json::json!({
        "apiVersion": "cellhost.dev/v1",
        "kind": "Cell",
        "metadata": { "name": "t" },
        "spec": { "isolation": isolation, "image": "host", "command": ["/bin/true"] }
    });
    for (k, v) in extra.as_object().unwrap() {
        d["spec"][k] = v.clone();
    }
    serde_json::from_value(d).unwrap()
}

#[tokio::test]
async fn a_tier_refusal_names_its_field_and_makes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let process = Arc::new(FakeBackend::new(Isolation::Process));
    let container = Arc::new(FakeBackend::new(Isolation::Container));
    let mut cfg = SupervisorConfig::new("admission", dir.path().to_path_buf());
    cfg.uid_claims_dir = dir.path().join("claims");
    let sup = Supervisor::new(
        store.clone(),
        vec![
            process.clone() as Arc<dyn Backend>,
            container.clone() as Arc<dyn Backend>,
        ],
        cfg,
    )
    .unwrap();
    let caller = Caller::tenant("alice");
    let cases = [
        (
            doc(
                "process",
                serde_json::json!({ "volume": { "path": "/data", "sizeGiB": 1 } }),
            ),
            "spec.volume.encrypted",
        ),
        (
            doc(
                "container",
                serde_json::json!({ "network": { "mode": "bridged", "egress": [{ "cidr": "192.0.2.0/24" }] } }),
            ),
            "spec.network.egress",
        ),
        (
            doc(
                "process",
                serde_json::json!({ "ports": [{ "container": 80, "host": 18080 }] }),
            ),
            "spec.ports",
        ),
    ];
    for (cell, field) in cases {
        let err = sup.admits(&caller, &cell).expect_err(field);
        assert_eq!(err.field(), Some(field), "admits: {err}");
        assert_eq!(err.status(), 400, "{err}");
        let err = sup
            .create(&caller, cell, Confidential::default(), true)
            .await
            .expect_err(field);
        assert!(matches!(err, SupervisorError::Invalid { .. }), "{err:?}");
        assert_eq!(err.field(), Some(field), "create: {err}");
    }
    assert!(store.list().unwrap().is_empty(), "a refused cell got a row");
    assert!(process.ids().is_empty() && container.ids().is_empty());
    assert_eq!(process.calls(cellhost_core::testing::Op::Create), 0);
}
