//! The supervisor's state machine, without root: reconcile driven over
//! every (desired, observed, lease, host objects) combination, plus the
//! create path's crash and failure points, on `cellhost_core::testing::
//! FakeBackend` and a real store in a temp dir.
//!
//! The expected outcome of each combination comes from [`expect`], which
//! restates the rules of `docs/supervisor.md` independently of the code: a
//! change of either must change both.

use std::collections::BTreeMap;
use std::sync::Arc;

use cellhost_core::ids::CellId;
use cellhost_core::testing::{FakeBackend, Fault, Op};
use cellhost_core::{Backend, CellState, ExitInfo};
use cellhost_spec::{Cell, Isolation, Redacted};
use cellhost_store::{CellUpdate, Desired, NewCell, Observed, Store, now_ms};
use cellhost_supervisor::events::kinds;
use cellhost_supervisor::{
    Caller, Confidential, ReconcileSummary, Supervisor, SupervisorConfig, SupervisorError,
};

struct Rig {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    fake: Arc<FakeBackend>,
    sup: Arc<Supervisor>,
}

fn rig_with(fake: FakeBackend) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fake = Arc::new(fake);
    let mut cfg = SupervisorConfig::new("table", dir.path().to_path_buf());
    cfg.uid_claims_dir = dir.path().join("claims");
    let sup = Supervisor::new(store.clone(), vec![fake.clone() as Arc<dyn Backend>], cfg).unwrap();
    Rig {
        dir,
        store,
        fake,
        sup,
    }
}

fn rig() -> Rig {
    rig_with(FakeBackend::new(Isolation::Process))
}

fn doc() -> Cell {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "cellhost.dev/v1",
        "kind": "Cell",
        "metadata": { "name": "t" },
        "spec": { "isolation": "process", "image": "host", "command": ["/bin/true"] }
    }))
    .unwrap()
}

/// A row as a crash or an earlier step left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    desired: Desired,
    observed: Observed,
    expired: bool,
}

impl Rig {
    /// Write `row` for a new cell, with host objects in `object` (none when
    /// `None`). Returns the id.
    fn put(&self, row: Row, object: Option<CellState>) -> CellId {
        let id = CellId::random();
        let cell = doc();
        let handle = self.fake.handle_for(&id, &cell);
        let now = now_ms();
        let expires = if row.expired {
            now - 1
        } else {
            now + 3_600_000
        };
        self.store
            .insert_cell_with(
                &NewCell {
                    id: &id,
                    name: "t",
                    isolation: Isolation::Process,
                    owner: "alice",
                    document: &Redacted::of(&cell),
                    created_at: expires.min(now),
                    expires_at: expires,
                },
                &CellUpdate::default()
                    .handle(&handle)
                    .desired(row.desired)
                    .observed(row.observed),
            )
            .unwrap();
        if let Some(state) = object {
            let exit = (state == CellState::Exited).then(|| ExitInfo::exited(3));
            self.fake.put(&id, state, exit);
        }
        id
    }

    fn last_event_id(&self) -> i64 {
        self.store
            .events_since(0, u32::MAX)
            .unwrap()
            .last()
            .map_or(0, |e| e.id)
    }

    /// Event kinds appended after event `after`, per cell.
    fn events_after(&self, after: i64) -> BTreeMap<CellId, Vec<String>> {
        let mut out: BTreeMap<CellId, Vec<String>> = BTreeMap::new();
        for e in self.store.events_since(after, u32::MAX).unwrap() {
            out.entry(e.cell_id).or_default().push(e.kind);
        }
        out
    }
}

/// What reconcile must leave: the row (or none), the host objects (or
/// none), and the events it appends, in order.
#[derive(Debug, PartialEq)]
struct Outcome {
    row: Option<(Desired, Observed)>,
    object: Option<CellState>,
    events: Vec<String>,
}

/// The rules, restated from `docs/supervisor.md`.
fn expect(row: Row, object: Option<CellState>) -> Outcome {
    let owned = |events: Vec<&str>| events.into_iter().map(String::from).collect();
    let gone = |events: Vec<&str>| Outcome {
        row: None,
        object: None,
        events: owned(events),
    };
    let Row {
        desired,
        observed,
        expired,
    } = row;
    // Finish an interrupted destroy (or retry a dirty one).
    if desired == Desired::Destroyed || matches!(observed, Observed::Destroying | Observed::Failed)
    {
        return gone(vec![kinds::DESTROYING, kinds::DESTROYED]);
    }
    // An interrupted create cannot be finished (secrets are not stored).
    if observed == Observed::Creating {
        return gone(vec![
            kinds::ROLLED_BACK,
            kinds::DESTROYING,
            kinds::DESTROYED,
        ]);
    }
    if expired {
        return gone(vec![kinds::EXPIRED, kinds::DESTROYING, kinds::DESTROYED]);
    }
    let kept = |observed, object, events: Vec<&str>| Outcome {
        row: Some((desired, observed)),
        object: Some(object),
        events: owned(events),
    };
    match object {
        // The host objects vanished: the row goes with a `lost` event.
        None => gone(vec![kinds::LOST]),
        // An interrupted stop is finished.
        Some(CellState::Running) if desired == Desired::Stopped => {
            kept(Observed::Exited, CellState::Exited, vec![kinds::STOPPED])
        }
        // Adopted: announced once per process start.
        Some(CellState::Running) => {
            kept(Observed::Running, CellState::Running, vec![kinds::ADOPTED])
        }
        Some(CellState::Exited) if observed != Observed::Exited => {
            kept(Observed::Exited, CellState::Exited, vec![kinds::EXITED])
        }
        Some(state) => kept(observed, state, vec![]),
        // `put` never makes a `Gone` object.
    }
}

const OBJECTS: [Option<CellState>; 4] = [
    None,
    Some(CellState::Created),
    Some(CellState::Running),
    Some(CellState::Exited),
];

fn every_row() -> Vec<Row> {
    let mut rows = Vec::new();
    for desired in Desired::ALL {
        for observed in Observed::ALL {
            for expired in [false, true] {
                rows.push(Row {
                    desired,
                    observed,
                    expired,
                });
            }
        }
    }
    rows
}

/// Every combination in one store, one pass: each row ends as [`expect`]
/// says, every orphan is destroyed, and a second pass changes nothing
/// (reconcile converges in one pass).
#[tokio::test]
async fn every_combination_ends_as_the_rules_say() {
    let rig = rig();
    let mut cases = Vec::new();
    for row in every_row() {
        for object in OBJECTS {
            cases.push((rig.put(row, object), row, object));
        }
    }
    let orphans: Vec<CellId> = OBJECTS
        .iter()
        .flatten()
        .map(|&state| {
            let id = CellId::random();
            rig.fake.put(&id, state, None);
            id
        })
        .collect();
    let before = rig.last_event_id();

    let sum = rig.sup.reconcile_once().await;

    let events = rig.events_after(before);
    let mut wrong = Vec::new();
    let mut want_sum = ReconcileSummary {
        orphans: orphans.len() as u32,
        ..Default::default()
    };
    for (id, row, object) in &cases {
        let want = expect(*row, *object);
        match want.events.first().map(String::as_str) {
            Some(kinds::DESTROYING) => want_sum.destroys_finished += 1,
            Some(kinds::ROLLED_BACK) => want_sum.rolled_back += 1,
            Some(kinds::EXPIRED) => want_sum.reaped += 1,
            Some(kinds::LOST) => want_sum.lost += 1,
            Some(kinds::STOPPED) => want_sum.stops_finished += 1,
            Some(kinds::ADOPTED) => want_sum.adopted += 1,
            Some(kinds::EXITED) => want_sum.exited += 1,
            _ => {}
        }
        let got = Outcome {
            row: rig.store.get(id).unwrap().map(|r| (r.desired, r.observed)),
            object: rig.fake.object(id).map(|o| o.state),
            events: events.get(id).cloned().unwrap_or_default(),
        };
        if got != want {
            wrong.push(format!(
                "{row:?} objects {object:?}:\n  want {want:?}\n  got  {got:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} combinations went wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    for id in &orphans {
        assert_eq!(rig.fake.object(id), None, "orphan {id} kept");
        assert_eq!(
            events.get(id).map(Vec::as_slice),
            Some(&[kinds::ORPHAN_DESTROYED.to_string()][..])
        );
    }
    assert_eq!(sum, want_sum);

    let after = rig.last_event_id();
    let again = rig.sup.reconcile_once().await;
    assert_eq!(again, ReconcileSummary::default(), "a second pass acted");
    assert!(rig.events_after(after).is_empty());
}

/// Destroys reconcile finishes fail (an error, or a report that is not
/// clean): the row stays with its error and the object stays, the pass
/// counts an error; the next pass, with the fault gone, finishes it.
#[tokio::test]
async fn a_failed_teardown_is_kept_and_retried() {
    for fault in [Fault::Error, Fault::Dirty] {
        let rig = rig();
        let row = Row {
            desired: Desired::Destroyed,
            observed: Observed::Destroying,
            expired: false,
        };
        let id = rig.put(row, Some(CellState::Running));
        rig.fake.fail(Op::Destroy, fault);
        let sum = rig.sup.reconcile_once().await;
        assert_eq!(sum.errors, 1, "{fault:?}: {sum:?}");
        assert_eq!(sum.destroys_finished, 0, "{fault:?}: {sum:?}");
        let rec = rig.store.get(&id).unwrap().expect("row kept");
        assert_eq!(rec.desired, Desired::Destroyed);
        assert!(rec.last_error.is_some(), "{fault:?}: no error recorded");
        if fault == Fault::Dirty {
            assert_eq!(rec.observed, Observed::Failed);
        }
        assert!(rig.fake.object(&id).is_some());

        let sum = rig.sup.reconcile_once().await;
        assert_eq!(sum.destroys_finished, 1, "{fault:?}: {sum:?}");
        assert_eq!(rig.store.get(&id).unwrap(), None);
        assert_eq!(rig.fake.object(&id), None);
    }
}

/// A backend that cannot say how a cell is (status fails) or cannot list:
/// the row is left as it is, nothing is destroyed on a guess.
#[tokio::test]
async fn unknown_state_destroys_nothing() {
    let rig = rig();
    let row = Row {
        desired: Desired::Running,
        observed: Observed::Running,
        expired: false,
    };
    let id = rig.put(row, Some(CellState::Running));
    let orphan = CellId::random();
    rig.fake.put(&orphan, CellState::Running, None);
    rig.fake.fail(Op::Status, Fault::Error);
    rig.fake.fail(Op::List, Fault::Error);
    let sum = rig.sup.reconcile_once().await;
    assert_eq!(sum.errors, 2, "{sum:?}");
    let rec = rig.store.get(&id).unwrap().unwrap();
    assert_eq!(
        (rec.desired, rec.observed),
        (Desired::Running, Observed::Running)
    );
    // The row's error is the tenant's to read: the public text, not the
    // engine's (which names host objects).
    assert_eq!(
        rec.last_error.as_deref(),
        Some("the tier failed on the host")
    );
    assert!(rig.fake.object(&id).is_some());
    assert!(
        rig.fake.object(&orphan).is_some(),
        "unlisted orphan touched"
    );
    assert_eq!(rig.fake.calls(Op::Destroy), 0);
}

/// A row whose slot a request holds is left to that request, even one
/// that reconcile would destroy.
#[tokio::test]
async fn busy_rows_are_skipped() {
    let rig = rig();
    let row = Row {
        desired: Desired::Destroyed,
        observed: Observed::Destroying,
        expired: true,
    };
    let id = rig.put(row, Some(CellState::Running));
    let slot = rig.sup.try_lock(&id).unwrap();
    assert_eq!(rig.sup.reconcile_once().await, ReconcileSummary::default());
    assert!(rig.store.get(&id).unwrap().is_some());
    assert!(rig.fake.object(&id).is_some());
    drop(slot);
    assert_eq!(rig.sup.reconcile_once().await.destroys_finished, 1);
}

/// Every point where a create can fail, with the rollback succeeding, dirty
/// or failing too: the caller gets the create's error (and the rollback's
/// when that failed), and what is left is a row reconcile finishes.
#[tokio::test]
async fn create_failures_roll_back_and_report_both_errors() {
    let caller = Caller::tenant("alice");
    for failing in [Op::Create, Op::Start] {
        for rollback in [None, Some(Fault::Dirty), Some(Fault::Error)] {
            let rig = rig_with(FakeBackend::new(Isolation::Process).with_uids());
            let case = format!("{failing:?} fails, rollback {rollback:?}");
            rig.fake.fail(failing, Fault::Error);
            if let Some(f) = rollback {
                rig.fake.fail(Op::Destroy, f);
            }
            let err = rig
                .sup
                .create(&caller, doc(), Confidential::default(), true)
                .await
                .expect_err(&case);
            let msg = err.to_string();
            let cause = format!("scripted {failing:?} failure");
            assert!(msg.contains(&cause), "{case}: {msg}");
            // A failed create made nothing, so a dirty destroy has nothing
            // to leave; an erring one fails all the same.
            let left = match rollback {
                Some(Fault::Error) => Some("scripted Destroy failure"),
                Some(Fault::Dirty) if failing == Op::Start => Some("residue"),
                _ => None,
            };
            if let Some(why) = left {
                assert!(msg.contains(why), "{case}: {msg}");
                assert!(
                    matches!(err, SupervisorError::RollbackFailed { .. }),
                    "{case}: {err:?}"
                );
            } else {
                assert!(
                    matches!(err, SupervisorError::Backend(_)),
                    "{case}: {err:?}"
                );
            }
            let rows = rig.store.list().unwrap();
            let leases = rig.store.uid_leases().unwrap();
            if left.is_some() {
                // Objects were made and could not be removed: the row stays
                // for reconcile, and so does the uid lease.
                assert_eq!(rows.len(), 1, "{case}");
                assert_eq!(rows[0].desired, Desired::Destroyed, "{case}");
                assert_eq!(leases.len(), 1, "{case}");
                let sum = rig.sup.reconcile_once().await;
                assert_eq!(sum.destroys_finished, 1, "{case}: {sum:?}");
            }
            assert!(rig.store.list().unwrap().is_empty(), "{case}");
            assert!(rig.fake.ids().is_empty(), "{case}");
            assert!(rig.store.uid_leases().unwrap().is_empty(), "{case}");
            let claims = std::fs::read_dir(rig.dir.path().join("claims"))
                .map(|d| {
                    d.flatten()
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .count()
                })
                .unwrap_or(0);
            assert_eq!(claims, 0, "{case}: a host-wide uid claim was kept");
        }
    }
}

/// The happy path and the lease: create records running, the reaper ends
/// it when the lease is over, and nothing is left (row, objects, uids).
#[tokio::test]
async fn create_then_lease_end_leaves_nothing() {
    let rig = rig_with(FakeBackend::new(Isolation::Process).with_uids());
    let caller = Caller::tenant("alice");
    let view = rig
        .sup
        .create(&caller, doc(), Confidential::default(), true)
        .await
        .unwrap();
    let id = CellId::parse(&view.id).unwrap();
    assert_eq!(rig.fake.object(&id).unwrap().state, CellState::Running);
    assert_eq!(rig.store.uid_leases().unwrap().len(), 1);
    rig.store.set_expires(&id, now_ms() - 1).unwrap();
    assert_eq!(rig.sup.reap_once().await.unwrap(), 1);
    assert_eq!(rig.store.get(&id).unwrap(), None);
    assert!(rig.fake.ids().is_empty());
    assert!(rig.store.uid_leases().unwrap().is_empty());
    assert_eq!(
        rig.fake.calls_on(&id),
        [Op::Create, Op::Start, Op::Usage, Op::Destroy]
    );
}
