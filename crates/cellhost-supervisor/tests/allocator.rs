//! The one allocator, without root, on `FakeBackend`: the supervisor
//! leases a cell's host ports and address before create, hands them to
//! the tier (the address in the request and the handle, the ports in the
//! document), and gives them back only when the cell's teardown is clean:
//! on destroy, on a failed create, and for an orphan reconcile removes.

use std::net::Ipv4Addr;
use std::sync::Arc;

use cellhost_core::ids::CellId;
use cellhost_core::testing::{FakeBackend, Fault, Op};
use cellhost_core::{AddressPool, Backend, CellState};
use cellhost_spec::{Cell, Isolation};
use cellhost_store::Store;
use cellhost_supervisor::{
    Caller, Confidential, CreateOptions, Supervisor, SupervisorConfig, SupervisorError,
};

struct Rig {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    fake: Arc<FakeBackend>,
    sup: Arc<Supervisor>,
    /// The policy's host ports: three in a row, free on this host now.
    ports: [u16; 3],
}

const POOL_FIRST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fake = Arc::new(
        FakeBackend::new(Isolation::Process).with_addresses(AddressPool {
            pool: "fakebr0".into(),
            owner: "process".into(),
            first: POOL_FIRST,
            last: Ipv4Addr::new(10, 77, 0, 3),
        }),
    );
    let base = three_free_ports();
    let mut cfg = SupervisorConfig::new("allocator", dir.path().to_path_buf());
    cfg.uid_claims_dir = dir.path().join("claims");
    let mut policy = (*cfg.policy).clone();
    policy.ports = cellhost_policy::PortRange {
        min: base,
        max: base + 2,
    };
    cfg.policy = Arc::new(policy);
    let sup = Supervisor::new(store.clone(), vec![fake.clone() as Arc<dyn Backend>], cfg).unwrap();
    Rig {
        _dir: dir,
        store,
        fake,
        sup,
        ports: [base, base + 1, base + 2],
    }
}

/// The first of three consecutive ports below the ephemeral range that
/// nothing on this host binds (TCP) now, in a stretch of its own per rig:
/// the tests run at once, and the allocator's own check that a port is
/// free (a brief bind) would otherwise meet another test's.
fn three_free_ports() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let stretch = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = 20_000 + stretch * 1_000;
    (start..start + 1_000)
        .step_by(7)
        .find(|b| (0..3).all(|i| std::net::TcpListener::bind(("0.0.0.0", b + i)).is_ok()))
        .expect("three free ports")
}

/// A bridged process cell publishing `hosts` (0: any port of the range).
fn doc(hosts: &[u32]) -> Cell {
    let ports: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| serde_json::json!({ "container": 80 + i, "host": h }))
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "cellhost.dev/v1",
        "kind": "Cell",
        "metadata": { "name": "t" },
        "spec": {
            "isolation": "process", "image": "host", "command": ["/bin/true"],
            "network": { "mode": "bridged" },
            "ports": ports,
        }
    }))
    .unwrap()
}

impl Rig {
    async fn create(
        &self,
        hosts: &[u32],
    ) -> Result<cellhost_supervisor::CellView, SupervisorError> {
        self.sup
            .create(
                &Caller::tenant("alice"),
                doc(hosts),
                Confidential::default(),
                true,
            )
            .await
    }

    fn held_ports(&self) -> usize {
        self.store
            .port_holders()
            .unwrap()
            .iter()
            .map(|c| {
                self.store
                    .get(c)
                    .unwrap()
                    .map_or(0, |r| r.document.spec.ports.len())
            })
            .sum()
    }
}

fn id(v: &cellhost_supervisor::CellView) -> CellId {
    CellId::parse(&v.id).unwrap()
}

fn hosts(v: &cellhost_supervisor::CellView) -> Vec<u32> {
    v.document.spec.ports.iter().map(|p| p.host).collect()
}

#[tokio::test]
async fn ports_and_addresses_are_planned_before_create_and_freed_after_teardown() {
    let r = rig();
    let [p0, p1, p2] = r.ports.map(u32::from);
    // Port 0 gets the lowest free port of the policy's range; a named one
    // is kept. The stored document and the tier see the chosen ports.
    let a = r.create(&[0, p1]).await.unwrap();
    assert_eq!(hosts(&a), [p0, p1]);
    let stored = r.store.get(&id(&a)).unwrap().unwrap();
    assert_eq!(stored.document.spec.ports[0].host, p0);
    // The address is the pool's lowest, in the request and the handle.
    assert_eq!(
        r.fake.addresses_on(&id(&a)),
        [(Op::Create, Some(POOL_FIRST))]
    );
    assert_eq!(stored.handle.unwrap().address, Some(POOL_FIRST));

    // A second cell: the next address, the last free port; a named port
    // the first cell holds is refused naming the entry, leasing nothing.
    let err = r.create(&[0, p1]).await.unwrap_err();
    assert_eq!(err.field(), Some("spec.ports.1.host"), "{err}");
    assert_eq!(err.status(), 409);
    let b = r.create(&[0]).await.unwrap();
    assert_eq!(hosts(&b), [p2]);
    let b_addr = Ipv4Addr::new(10, 77, 0, 3);
    assert_eq!(r.fake.addresses_on(&id(&b)), [(Op::Create, Some(b_addr))]);

    // Full: no port left, then no address left. Nothing is leased or made.
    let err = r.create(&[0]).await.unwrap_err();
    assert!(
        matches!(&err, SupervisorError::Capacity(m) if m.contains("spec.ports.0.host")),
        "{err:?}"
    );
    let err = r.create(&[]).await.unwrap_err();
    assert!(
        matches!(&err, SupervisorError::Capacity(m) if m.contains("fakebr0")),
        "{err:?}"
    );
    assert_eq!(r.store.list().unwrap().len(), 2);
    assert_eq!(r.held_ports(), 3);
    assert_eq!(r.store.leases().unwrap().len(), 2);

    // Destroy hands the tier the address; a clean teardown frees both.
    r.sup
        .destroy(&Caller::tenant("alice"), &a.id)
        .await
        .unwrap();
    assert_eq!(
        r.fake.addresses_on(&id(&a)).last(),
        Some(&(Op::Destroy, Some(POOL_FIRST)))
    );
    assert_eq!(r.store.lease_of(&id(&a)).unwrap(), None);
    let c = r.create(&[0, 0]).await.unwrap();
    assert_eq!(hosts(&c), [p0, p1]);
    assert_eq!(
        r.fake.addresses_on(&id(&c)),
        [(Op::Create, Some(POOL_FIRST))]
    );

    // A teardown that leaves something keeps the address and the ports:
    // nothing new may meet what is left of the cell.
    r.fake.fail(Op::Destroy, Fault::Dirty);
    let dirty = r.sup.destroy(&Caller::tenant("alice"), &c.id).await;
    assert!(dirty.is_ok_and(|rep| !rep.is_clean()));
    assert_eq!(
        r.store.lease_of(&id(&c)).unwrap().map(|l| l.address),
        Some(POOL_FIRST)
    );
    assert_eq!(r.store.port_holders().unwrap().len(), 2);
}

#[tokio::test]
async fn a_failed_create_gives_back_what_it_leased() {
    let r = rig();
    r.fake.fail(Op::Create, Fault::Error);
    r.create(&[0]).await.unwrap_err();
    assert!(r.store.list().unwrap().is_empty());
    assert!(r.store.leases().unwrap().is_empty());
    assert!(r.store.port_holders().unwrap().is_empty());
    // The same port and address go to the next cell.
    let v = r.create(&[0]).await.unwrap();
    assert_eq!(hosts(&v), [u32::from(r.ports[0])]);
    assert_eq!(
        r.fake.addresses_on(&id(&v)),
        [(Op::Create, Some(POOL_FIRST))]
    );
}

#[tokio::test]
async fn the_market_range_narrows_the_policy_range() {
    let r = rig();
    let narrow = r.ports[1]..=r.ports[2];
    let opts = CreateOptions {
        start: true,
        host_ports: Some(narrow.clone()),
    };
    r.sup
        .check_ports(&doc(&[0, 0]), Some(narrow.clone()))
        .await
        .unwrap();
    // A check leases nothing.
    assert!(r.store.port_holders().unwrap().is_empty());
    let v = r
        .sup
        .create_with(
            &Caller::tenant("m"),
            doc(&[0, 0]),
            Confidential::default(),
            opts,
        )
        .await
        .unwrap();
    assert_eq!(hosts(&v), [u32::from(r.ports[1]), u32::from(r.ports[2])]);
    let err = r
        .sup
        .check_ports(&doc(&[0]), Some(narrow))
        .await
        .unwrap_err();
    assert!(matches!(err, SupervisorError::Capacity(_)), "{err:?}");
}

#[tokio::test]
async fn reconcile_tears_an_orphan_down_at_its_address_then_frees_it() {
    let r = rig();
    // A create cut short after its object was made, before its row: the
    // lease is in the store, the object on the host, no row.
    let orphan = CellId::random();
    r.store
        .lease_address(&orphan, "fakebr0", "process", POOL_FIRST..=POOL_FIRST)
        .unwrap();
    r.fake.put(&orphan, CellState::Running, None);
    // Its teardown leaves something at first: the lease stays.
    r.fake.fail(Op::Destroy, Fault::Dirty);
    let sum = r.sup.reconcile_once().await;
    assert_eq!(sum.orphans, 1, "{sum:?}");
    assert_eq!(
        r.fake.addresses_on(&orphan),
        [(Op::Destroy, Some(POOL_FIRST))]
    );
    assert!(r.store.lease_of(&orphan).unwrap().is_some());
    // The next pass finishes it and gives the address back.
    r.sup.reconcile_once().await;
    assert!(r.fake.object(&orphan).is_none());
    assert_eq!(r.store.lease_of(&orphan).unwrap(), None);
    // A cell found gone without a teardown of ours: its row goes, its
    // address and ports stay leased through that pass (a table of it may
    // still DNAT to them) and go at the next one, which finds nothing.
    let v = r.create(&[0]).await.unwrap();
    let handle = r.store.get(&id(&v)).unwrap().unwrap().handle.unwrap();
    r.fake.destroy(&handle).await.unwrap();
    let sum = r.sup.reconcile_once().await;
    assert_eq!(sum.lost, 1, "{sum:?}");
    assert!(r.store.get(&id(&v)).unwrap().is_none());
    assert!(r.store.lease_of(&id(&v)).unwrap().is_some());
    assert_eq!(r.store.port_holders().unwrap(), [id(&v)]);
    r.sup.reconcile_once().await;
    assert_eq!(r.store.lease_of(&id(&v)).unwrap(), None);
    assert!(r.store.port_holders().unwrap().is_empty());
    // A lease with neither row nor object (a create that crashed before
    // making anything) goes too.
    let lost = CellId::random();
    r.store
        .lease_address(&lost, "fakebr0", "process", POOL_FIRST..=POOL_FIRST)
        .unwrap();
    r.sup.reconcile_once().await;
    assert_eq!(r.store.lease_of(&lost).unwrap(), None);
}
