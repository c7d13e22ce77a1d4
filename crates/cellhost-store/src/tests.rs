use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicI64, Ordering};

use cellhost_core::CellState;
use cellhost_spec::{Redacted, SecretSource};
use serde_json::json;

use super::*;

const T0: i64 = 1_700_000_000_000;

fn id(n: u8) -> CellId {
    CellId::parse(&format!("{n:012x}")).unwrap()
}

fn doc(name: &str, isolation: Isolation) -> Redacted {
    Redacted::of(&doc_of(name, isolation))
}

fn doc_of(name: &str, isolation: Isolation) -> Cell {
    serde_json::from_value(json!({
        "apiVersion": "cellhost.dev/v1",
        "kind": "Cell",
        "metadata": { "name": name, "labels": { "team": "a" } },
        "spec": {
            "isolation": isolation.as_str(),
            "command": ["/bin/echo", "hello"],
            "env": { "GREETING": "hi" },
            "resources": { "cpus": 0.5, "memoryMiB": 128 },
        }
    }))
    .unwrap()
}

fn new_cell<'a>(id: &'a CellId, document: &'a Redacted, created_at: i64) -> NewCell<'a> {
    NewCell {
        id,
        name: &document.metadata.name,
        isolation: document.spec.isolation,
        owner: "local",
        document,
        created_at,
        expires_at: created_at + 3_600_000,
    }
}

/// A clock the test moves by hand.
fn manual_clock(start: i64) -> (Arc<AtomicI64>, Clock) {
    let t = Arc::new(AtomicI64::new(start));
    let c = t.clone();
    (t, Arc::new(move || c.load(Ordering::SeqCst)))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A second, raw connection: what an operator with `sqlite3` (or disk
/// damage) could do to the file behind the store's back.
fn raw(store: &Store) -> Connection {
    let c = Connection::open(store.path()).unwrap();
    c.busy_timeout(BUSY_TIMEOUT).unwrap();
    c
}

fn handle(id: &CellId, isolation: Isolation) -> CellHandle {
    CellHandle {
        id: id.clone(),
        name: "hello".into(),
        isolation,
        state_dir: PathBuf::from(format!("/var/lib/cellhost/cells/{id}")),
        tier: json!({ "cgroup": format!("/sys/fs/cgroup/cellhost/{id}") }),
        uids: None,
        address: None,
    }
}

#[test]
fn store_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
}

#[test]
fn open_creates_dir_0700_and_db_0600() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested/state");
    let store = Store::open(&dir).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(store.path(), dir.join(DB_FILE_NAME));
    assert_eq!(mode(store.path()), 0o600);
    // A write makes SQLite create the WAL and its index; they must be no
    // wider than the db file.
    let d = doc("hello", Isolation::Process);
    store.insert_cell(&new_cell(&id(1), &d, T0)).unwrap();
    for suffix in ["-wal", "-shm"] {
        let p = dir.join(format!("{DB_FILE_NAME}{suffix}"));
        assert!(p.exists(), "{} missing", p.display());
        assert_eq!(mode(&p) & !0o600, 0, "{} is {:o}", p.display(), mode(&p));
    }
}

#[test]
fn open_sets_wal_full_foreign_keys_busy_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let conn = store.conn();
    let q = |sql: &str| -> String {
        conn.query_row(sql, [], |r| r.get::<_, rusqlite::types::Value>(0))
            .map(|v| format!("{v:?}"))
            .unwrap()
    };
    assert_eq!(q("PRAGMA journal_mode"), "Text(\"wal\")");
    assert_eq!(q("PRAGMA synchronous"), "Integer(2)"); // 2 = FULL
    assert_eq!(q("PRAGMA foreign_keys"), "Integer(1)");
    assert_eq!(q("PRAGMA busy_timeout"), "Integer(5000)");
}

#[test]
fn open_leaves_existing_dir_mode_but_tightens_db_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), Permissions::from_mode(0o755)).unwrap();
    let db = tmp.path().join(DB_FILE_NAME);
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, Permissions::from_mode(0o644)).unwrap();
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(mode(tmp.path()), 0o755);
    assert_eq!(mode(store.path()), 0o600);
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
}

#[test]
fn open_refuses_symlinked_db_and_non_dir_state_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("elsewhere.db");
    let dir = tmp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&target, dir.join(DB_FILE_NAME)).unwrap();
    let err = Store::open(&dir).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    assert!(!target.exists(), "followed the symlink");

    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(&file).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[test]
fn migrations_are_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let d = doc("hello", Isolation::Process);
    {
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        store.insert_cell(&new_cell(&id(1), &d, T0)).unwrap();
    }
    for _ in 0..2 {
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(
            store.list().unwrap().len(),
            1,
            "reopen lost or duplicated rows"
        );
    }
}

#[test]
fn newer_schema_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    raw(&store)
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(store);
    match Store::open(tmp.path()).unwrap_err() {
        StoreError::SchemaVersion { found, supported } => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn concurrent_opens_of_a_fresh_dir_all_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let threads: Vec<_> = (0..8u8)
        .map(|n| {
            let dir = dir.clone();
            std::thread::spawn(move || -> Result<(), StoreError> {
                let store = Store::open(&dir)?;
                let d = doc("hello", Isolation::Process);
                store.insert_cell(&new_cell(&id(n), &d, T0 + i64::from(n)))
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(store.list().unwrap().len(), 8);
}

const CHILD_DIR_ENV: &str = "CELLHOST_STORE_TEST_CHILD_DIR";
const CHILD_N_ENV: &str = "CELLHOST_STORE_TEST_CHILD_N";

/// The body of one child process of the test below; a no-op when run as an
/// ordinary test.
#[test]
fn child_process_entry() {
    let (Some(dir), Some(n)) = (
        std::env::var_os(CHILD_DIR_ENV),
        std::env::var_os(CHILD_N_ENV),
    ) else {
        return;
    };
    let n: u8 = n.to_str().unwrap().parse().unwrap();
    let store = Store::open(Path::new(&dir)).unwrap();
    let d = doc("hello", Isolation::Process);
    store
        .insert_cell(&new_cell(&id(n), &d, T0 + i64::from(n)))
        .unwrap();
    for k in 0..20 {
        store
            .append_event(&id(n), "cellhost.test", &json!({ "k": k }))
            .unwrap();
    }
}

/// Separate processes take real fcntl locks (threads of one process share
/// SQLite's in-process lock table), so this is the `cellhost run` beside a
/// daemon case.
#[test]
fn concurrent_processes_open_and_write_one_fresh_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..6u8)
        .map(|n| {
            std::process::Command::new(&exe)
                .args(["--exact", "tests::child_process_entry", "--test-threads=1"])
                .env(CHILD_DIR_ENV, &dir)
                .env(CHILD_N_ENV, n.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.list().unwrap().len(), 6);
    let events = store.events_since(0, 1000).unwrap();
    assert_eq!(events.len(), 6 * 20);
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
}

#[test]
fn insert_get_list_update_remove_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (clock, c) = manual_clock(T0 + 5);
    let store = Store::open_with_clock(tmp.path(), c).unwrap();
    let (a, b) = (id(0xa), id(0xb));
    let da = doc("alpha", Isolation::Process);
    let db = doc("beta", Isolation::Container);
    store.insert_cell(&new_cell(&b, &db, T0 + 1)).unwrap();
    store.insert_cell(&new_cell(&a, &da, T0)).unwrap();

    let rec = store.get(&a).unwrap().unwrap();
    assert_eq!(
        rec,
        CellRecord {
            id: a.clone(),
            name: "alpha".into(),
            isolation: Isolation::Process,
            owner: "local".into(),
            document: (*da).clone(),
            created_at: T0,
            expires_at: T0 + 3_600_000,
            desired: Desired::Running,
            observed: Observed::Creating,
            handle: None,
            exit: None,
            last_error: None,
            updated_at: T0 + 5,
        }
    );
    assert_eq!(store.get(&id(0xc)).unwrap(), None);

    // Oldest first.
    let ids: Vec<CellId> = store.list().unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, [a.clone(), b.clone()]);

    clock.store(T0 + 100, Ordering::SeqCst);
    let h = handle(&a, Isolation::Process);
    store.set_handle(&a, &h).unwrap();
    store.set_observed(&a, Observed::Running).unwrap();
    store.set_exit(&a, &ExitInfo::signaled(9)).unwrap();
    store.set_error(&a, "stop: timed out").unwrap();
    store.set_desired(&a, Desired::Destroyed).unwrap();
    store.set_expires(&a, T0 + 7_200_000).unwrap();
    let rec = store.get(&a).unwrap().unwrap();
    assert_eq!(rec.handle, Some(h));
    assert_eq!(rec.observed, Observed::Running);
    assert_eq!(rec.exit, Some(ExitInfo::signaled(9)));
    assert_eq!(rec.last_error.as_deref(), Some("stop: timed out"));
    assert_eq!(rec.desired, Desired::Destroyed);
    assert_eq!(rec.expires_at, T0 + 7_200_000);
    assert_eq!(rec.updated_at, T0 + 100);
    assert_eq!(rec.created_at, T0, "created_at must not move");
    store.clear_error(&a).unwrap();
    assert_eq!(store.get(&a).unwrap().unwrap().last_error, None);

    // The other row is untouched.
    assert_eq!(store.get(&b).unwrap().unwrap().observed, Observed::Creating);

    assert!(store.remove(&a).unwrap());
    assert!(
        !store.remove(&a).unwrap(),
        "second remove is 'already gone'"
    );
    assert_eq!(store.get(&a).unwrap(), None);
    assert_eq!(store.list().unwrap().len(), 1);
}

#[test]
fn updates_of_a_missing_cell_are_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let x = id(7);
    let errs = [
        store.set_observed(&x, Observed::Gone),
        store.set_desired(&x, Desired::Stopped),
        store.set_exit(&x, &ExitInfo::exited(0)),
        store.set_error(&x, "e"),
        store.clear_error(&x),
        store.set_expires(&x, T0),
        store.set_handle(&x, &handle(&x, Isolation::Vm)),
    ];
    for e in errs {
        assert!(
            matches!(e, Err(StoreError::NotFound(ref i)) if *i == x),
            "{e:?}"
        );
    }
}

#[test]
fn apply_writes_columns_and_event_in_one_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let (clock, c) = manual_clock(T0);
    let store = Store::open_with_clock(tmp.path(), c).unwrap();
    let (a, b) = (id(1), id(2));
    let d = doc("alpha", Isolation::Process);
    store.insert_cell(&new_cell(&a, &d, T0)).unwrap();
    store.set_error(&a, "old error").unwrap();

    clock.store(T0 + 42, Ordering::SeqCst);
    let h = handle(&a, Isolation::Process);
    let data = json!({ "pid": 4242 });
    store
        .apply(
            &a,
            &CellUpdate::default()
                .handle(&h)
                .observed(Observed::Running)
                .clear_error()
                .event("cellhost.cell.started", &data),
        )
        .unwrap();
    let rec = store.get(&a).unwrap().unwrap();
    assert_eq!(
        (rec.handle.as_ref(), rec.observed, rec.last_error.as_deref()),
        (Some(&h), Observed::Running, None)
    );
    assert_eq!(rec.desired, Desired::Running, "unset fields stay");
    let ev = store.events_since(0, 10).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (&ev[0].cell_id, ev[0].at, ev[0].kind.as_str(), &ev[0].data),
        (&a, rec.updated_at, "cellhost.cell.started", &data)
    );

    // All or nothing: a missing row writes no event; a bad part writes
    // no column.
    let e = store.apply(
        &b,
        &CellUpdate::default().event("cellhost.cell.started", &data),
    );
    assert!(matches!(e, Err(StoreError::NotFound(_))));
    let e = store.apply(
        &a,
        &CellUpdate::default()
            .observed(Observed::Exited)
            .event("bad type", &data),
    );
    assert!(matches!(e, Err(StoreError::Invalid(_))));
    let hb = handle(&b, Isolation::Process);
    let e = store.apply(
        &a,
        &CellUpdate::default().observed(Observed::Exited).handle(&hb),
    );
    assert!(matches!(e, Err(StoreError::Invalid(_))));
    assert_eq!(store.get(&a).unwrap().unwrap().observed, Observed::Running);
    assert_eq!(store.events_since(0, 10).unwrap().len(), 1);

    // An empty update only stamps updated_at.
    clock.store(T0 + 50, Ordering::SeqCst);
    store.apply(&a, &CellUpdate::default()).unwrap();
    let after = store.get(&a).unwrap().unwrap();
    assert_eq!(after.updated_at, T0 + 50);
    assert_eq!(
        CellRecord {
            updated_at: rec.updated_at,
            ..after
        },
        rec
    );
}

#[test]
fn insert_refuses_duplicates_and_inconsistent_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let a = id(1);
    let d = doc("alpha", Isolation::Process);
    store.insert_cell(&new_cell(&a, &d, T0)).unwrap();
    assert!(matches!(
        store.insert_cell(&new_cell(&a, &d, T0)),
        Err(StoreError::AlreadyExists(ref i)) if *i == a
    ));

    let b = id(2);
    let mut n = new_cell(&b, &d, T0);
    n.name = "other";
    assert!(matches!(store.insert_cell(&n), Err(StoreError::Invalid(_))));
    let mut n = new_cell(&b, &d, T0);
    n.isolation = Isolation::Vm;
    assert!(matches!(store.insert_cell(&n), Err(StoreError::Invalid(_))));
    let mut n = new_cell(&b, &d, T0);
    n.expires_at = T0 - 1;
    assert!(matches!(store.insert_cell(&n), Err(StoreError::Invalid(_))));
    assert_eq!(store.get(&b).unwrap(), None, "refused insert wrote a row");

    // A handle for another cell is refused.
    assert!(matches!(
        store.set_handle(&a, &handle(&b, Isolation::Process)),
        Err(StoreError::Invalid(_))
    ));
}

#[test]
fn corrupt_rows_give_typed_errors_naming_cell_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let d = doc("alpha", Isolation::Process);
    let cells: Vec<CellId> = (1..=6).map(id).collect();
    for (n, c) in cells.iter().enumerate() {
        store.insert_cell(&new_cell(c, &d, T0 + n as i64)).unwrap();
    }
    let r = raw(&store);
    let damage = [
        ("document", "{\"not\": \"a cell\"", "cells.document"),
        ("handle", "[1,2", "cells.handle"),
        ("exit", "{\"code\": \"zero\"}", "cells.exit"),
        ("observed", "exploded", "cells.observed"),
        ("isolation", "unikernel", "cells.isolation"),
    ];
    for ((column, value, _), c) in damage.iter().zip(&cells) {
        r.execute(
            &format!("UPDATE cells SET {column} = ?1 WHERE id = ?2"),
            params![value, c.as_str()],
        )
        .unwrap();
    }
    for ((_, _, want_col), c) in damage.iter().zip(&cells) {
        match store.get(c) {
            Err(StoreError::Corrupt { id, column, detail }) => {
                assert_eq!(id, c.as_str());
                assert_eq!(column, *want_col, "{detail}");
                let msg = store.get(c).unwrap_err().to_string();
                assert!(msg.contains(c.as_str()) && msg.contains(want_col), "{msg}");
            }
            other => panic!("{want_col}: expected Corrupt, got {other:?}"),
        }
    }
    // A handle that names another cell is corrupt too.
    r.execute(
        "UPDATE cells SET handle = ?1 WHERE id = ?2",
        params![
            serde_json::to_string(&handle(&cells[0], Isolation::Process)).unwrap(),
            cells[5].as_str()
        ],
    )
    .unwrap();
    assert!(matches!(
        store.get(&cells[5]),
        Err(StoreError::Corrupt {
            column: "cells.handle",
            ..
        })
    ));

    // `list` fails; `list_lenient` keeps every slot.
    assert!(matches!(store.list(), Err(StoreError::Corrupt { .. })));
    let all = store.list_lenient().unwrap();
    assert_eq!(all.len(), 6);
    assert!(all.iter().all(Result::is_err));

    // A damaged id is reported as stored, not trusted.
    let good = id(0x77);
    store.insert_cell(&new_cell(&good, &d, T0 + 100)).unwrap();
    r.execute(
        "UPDATE cells SET id = '../../etc' WHERE id = ?1",
        [good.as_str()],
    )
    .unwrap();
    let last = store.list_lenient().unwrap().pop().unwrap();
    match last {
        Err(StoreError::Corrupt { id, column, .. }) => {
            assert_eq!((id.as_str(), column), ("../../etc", "cells.id"));
        }
        other => panic!("expected corrupt id, got {other:?}"),
    }
}

#[test]
fn one_cells_events_of_one_type() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let (a, b) = (id(1), id(2));
    for n in 0..4 {
        let kind = if n == 2 {
            "cellhost.cell.extended"
        } else {
            "cellhost.cell.created"
        };
        store.append_event(&a, kind, &json!({ "n": n })).unwrap();
        store.append_event(&b, kind, &json!({ "n": -n })).unwrap();
    }
    let of_a = store.cell_events(&a, "cellhost.cell.created").unwrap();
    assert_eq!(
        of_a.iter().map(|e| e.data["n"].clone()).collect::<Vec<_>>(),
        [json!(0), json!(1), json!(3)]
    );
    let ext = store.cell_events(&b, "cellhost.cell.extended").unwrap();
    assert_eq!((ext.len(), &ext[0].data), (1, &json!({ "n": -2 })));
    assert!(
        store
            .cell_events(&id(3), "cellhost.cell.extended")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn events_append_and_read_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (clock, c) = manual_clock(T0);
    let store = Store::open_with_clock(tmp.path(), c).unwrap();
    let (a, b) = (id(1), id(2));
    let mut ids = Vec::new();
    for n in 0..5i64 {
        clock.store(T0 + n, Ordering::SeqCst);
        let cell = if n % 2 == 0 { &a } else { &b };
        ids.push(
            store
                .append_event(cell, "cellhost.cell.created", &json!({ "n": n }))
                .unwrap(),
        );
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    let all = store.events_since(0, 100).unwrap();
    assert_eq!(all.len(), 5);
    for (n, e) in all.iter().enumerate() {
        assert_eq!(e.id, ids[n]);
        assert_eq!(e.at, T0 + n as i64);
        assert_eq!(e.kind, "cellhost.cell.created");
        assert_eq!(e.data, json!({ "n": n }));
        assert_eq!(e.cell_id, if n % 2 == 0 { a.clone() } else { b.clone() });
    }

    // Paging with a cursor sees each event exactly once.
    let mut cursor = 0;
    let mut seen = Vec::new();
    loop {
        let page = store.events_since(cursor, 2).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        cursor = page.last().unwrap().id;
        seen.extend(page.into_iter().map(|e| e.id));
    }
    assert_eq!(seen, ids);
    assert!(store.events_since(0, 0).unwrap().is_empty());

    // Bad type refused; events need no cell row and outlive it.
    assert!(matches!(
        store.append_event(&a, "", &json!(null)),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.append_event(&a, "has space", &json!(null)),
        Err(StoreError::Invalid(_))
    ));
    let d = doc("alpha", Isolation::Process);
    store.insert_cell(&new_cell(&a, &d, T0)).unwrap();
    store.remove(&a).unwrap();
    let last = store
        .append_event(&a, "cellhost.cell.destroyed", &json!({ "residue": 0 }))
        .unwrap();
    assert_eq!(store.events_since(ids[4], 10).unwrap()[0].id, last);

    // A damaged event names its cell, column and event id.
    raw(&store)
        .execute("UPDATE events SET data = 'nope' WHERE id = ?1", [last])
        .unwrap();
    match store.events_since(ids[4], 10).unwrap_err() {
        StoreError::Corrupt { id, column, detail } => {
            assert_eq!((id.as_str(), column), (a.as_str(), "events.data"));
            assert!(detail.starts_with(&format!("event {last}:")), "{detail}");
        }
        e => panic!("expected Corrupt, got {e}"),
    }
}

#[test]
fn two_handles_on_one_file_see_each_others_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let s1 = Store::open(tmp.path()).unwrap();
    let s2 = Store::open(tmp.path()).unwrap();
    let a = id(1);
    let d = doc("alpha", Isolation::Vm);

    s1.insert_cell(&new_cell(&a, &d, T0)).unwrap();
    assert_eq!(s2.get(&a).unwrap().unwrap().observed, Observed::Creating);
    s2.set_observed(&a, Observed::Running).unwrap();
    assert_eq!(s1.get(&a).unwrap().unwrap().observed, Observed::Running);

    let e1 = s1
        .append_event(&a, "cellhost.cell.created", &json!({}))
        .unwrap();
    let e2 = s2
        .append_event(&a, "cellhost.cell.started", &json!({}))
        .unwrap();
    assert!(e2 > e1);
    let kinds: Vec<String> = s1
        .events_since(0, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["cellhost.cell.created", "cellhost.cell.started"]);

    assert!(s2.remove(&a).unwrap());
    assert_eq!(s1.get(&a).unwrap(), None);
}

/// The store takes only `Redacted` documents (an unredacted `Cell` does
/// not compile as `NewCell::document`), writes exactly that, and no
/// secret value reaches its files; file references are kept.
#[test]
fn only_a_redacted_document_is_stored_and_it_holds_no_secret() {
    const SECRET: &str = "hunter2-do-not-store";
    let mut original = doc_of("alpha", Isolation::Process);
    original.spec.secrets = serde_json::from_value(json!([
        { "name": "token", "from": { "value": SECRET } },
        { "name": "key", "from": { "file": "./key" } },
    ]))
    .unwrap();
    let redacted = Redacted::of(&original);

    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let a = id(1);
    store.insert_cell(&new_cell(&a, &redacted, T0)).unwrap();

    let stored: String = raw(&store)
        .query_row(
            "SELECT document FROM cells WHERE id = ?1",
            [a.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, serde_json::to_string(&redacted).unwrap());
    let back = store.get(&a).unwrap().unwrap().document;
    assert_eq!(back, *redacted);
    assert!(
        matches!(&back.spec.secrets[0].from, SecretSource::Value(v) if v == cellhost_spec::REDACTED)
    );
    assert!(matches!(&back.spec.secrets[1].from, SecretSource::File(_)));
    for suffix in ["", "-wal"] {
        let p = tmp.path().join(format!("{DB_FILE_NAME}{suffix}"));
        let bytes = std::fs::read(&p).unwrap();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "secret found in {}",
            p.display()
        );
    }
}

#[test]
fn expired_lists_ended_leases_soonest_first() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let d = doc("alpha", Isolation::Process);
    for n in 1..=3u8 {
        store.insert_cell(&new_cell(&id(n), &d, T0)).unwrap();
    }
    store.set_expires(&id(1), T0 + 20).unwrap();
    store.set_expires(&id(2), T0 + 10).unwrap();
    let got: Vec<CellId> = store
        .expired(T0 + 20)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(got, [id(2), id(1)]);
    assert!(store.expired(T0 + 9).unwrap().is_empty());
}

#[test]
fn state_words_round_trip() {
    for d in Desired::ALL {
        assert_eq!(d.as_str().parse::<Desired>().unwrap(), d);
        assert_eq!(d.to_string(), d.as_str());
        assert_eq!(serde_json::to_value(d).unwrap(), json!(d.as_str()));
    }
    for o in Observed::ALL {
        assert_eq!(o.as_str().parse::<Observed>().unwrap(), o);
        assert_eq!(serde_json::to_value(o).unwrap(), json!(o.as_str()));
    }
    let e = "Running".parse::<Desired>().unwrap_err();
    assert_eq!(e.what, "desired");
    assert!("".parse::<Observed>().is_err());
    assert_eq!(Observed::from(CellState::Exited), Observed::Exited);
    assert_eq!(Observed::from(CellState::Gone), Observed::Gone);
}

#[test]
fn now_ms_is_plausible() {
    let t = now_ms();
    assert!(t > T0 && t < 4_102_444_800_000, "{t}"); // 2023 < now < 2100
}

#[test]
fn insert_with_update_is_one_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let (a, d) = (id(1), doc("hello", Isolation::Process));
    let h = handle(&a, Isolation::Process);
    let data = json!({"n": 1});
    store
        .insert_cell_with(
            &new_cell(&a, &d, T0),
            &CellUpdate::default()
                .handle(&h)
                .event("cellhost.cell.creating", &data),
        )
        .unwrap();
    let rec = store.get(&a).unwrap().unwrap();
    assert_eq!(rec.handle.as_ref(), Some(&h));
    let ev = store.events_since(0, 10).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].owner.as_deref(), Some("local"));

    // A bad update (foreign handle) inserts nothing at all.
    let b = id(2);
    let err = store
        .insert_cell_with(&new_cell(&b, &d, T0), &CellUpdate::default().handle(&h))
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert!(store.get(&b).unwrap().is_none());
}

#[test]
fn remove_with_event_keeps_owner_in_log() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let (a, d) = (id(1), doc("hello", Isolation::Process));
    store.insert_cell(&new_cell(&a, &d, T0)).unwrap();
    assert!(
        store
            .remove_with_event(&a, "cellhost.cell.destroyed", &json!({}))
            .unwrap()
    );
    assert!(store.get(&a).unwrap().is_none());
    let ev = store.events_since(0, 10).unwrap();
    assert_eq!(ev.last().unwrap().kind, "cellhost.cell.destroyed");
    assert_eq!(ev.last().unwrap().owner.as_deref(), Some("local"));
    // Already gone: false, and the event of a row-less cell has no owner.
    assert!(
        !store
            .remove_with_event(&a, "cellhost.orphan.destroyed", &json!({}))
            .unwrap()
    );
    assert_eq!(
        store.events_since(0, 10).unwrap().last().unwrap().owner,
        None
    );
}

#[test]
fn usage_totals_sum_intervals_and_keep_last_counter() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let a = id(1);
    assert_eq!(store.usage_totals(&a).unwrap(), UsageTotals::default());
    let iv = |start: i64, counter: u64, cpu: f64| UsageInterval {
        cell_id: a.clone(),
        owner: "local".into(),
        start_ms: start,
        end_ms: start + 1000,
        cpu_ns_counter: counter,
        cpu_seconds: cpu,
        memory_byte_seconds: 1024.0,
        wall_seconds: 1.0,
    };
    store
        .record_usage(&[iv(T0, 500_000_000, 0.5), iv(T0 + 1000, 1_250_000_000, 0.75)])
        .unwrap();
    let t = store.usage_totals(&a).unwrap();
    assert_eq!(t.intervals, 2);
    assert!((t.cpu_seconds - 1.25).abs() < 1e-9);
    assert!((t.memory_byte_seconds - 2048.0).abs() < 1e-9);
    assert!((t.wall_seconds - 2.0).abs() < 1e-9);
    assert_eq!(t.last_end_ms, Some(T0 + 2000));
    assert_eq!(t.last_cpu_ns_counter, Some(1_250_000_000));

    // A bad interval rejects the whole batch.
    let mut bad = iv(T0 + 5000, 1, 0.1);
    bad.cpu_seconds = f64::NAN;
    assert!(store.record_usage(&[iv(T0 + 4000, 2, 0.1), bad]).is_err());
    assert_eq!(store.usage_totals(&a).unwrap().intervals, 2);
}

#[test]
fn migration_2_upgrades_a_version_1_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE_NAME);
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(MIGRATIONS[0]).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO events (cell_id, at, type, data) VALUES ('000000000001', 1, 'x', '{}')",
            [],
        )
        .unwrap();
    }
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let ev = store.events_since(0, 10).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].owner, None);
}

#[test]
fn migration_6_keeps_the_ports_only_the_bridge_table_held() {
    // A store at schema 5 whose bridged cell held its port only in
    // migration 3's net_ports (made before migration 5 existed).
    let tmp = tempfile::tempdir().unwrap();
    {
        let conn = Connection::open(tmp.path().join(DB_FILE_NAME)).unwrap();
        for sql in &MIGRATIONS[..5] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 5).unwrap();
        conn.execute_batch(&format!(
            "INSERT INTO net_leases (cell_id, pool, owner, address, leased_at)
                 VALUES ('{0}', 'br0', 'process', 167772162, 0);
             INSERT INTO net_ports (protocol, port, cell_id) VALUES ('tcp', 20000, '{0}');",
            id(1)
        ))
        .unwrap();
    }
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(store.port_holders().unwrap(), [id(1)]);
    // Another cell cannot take it.
    let taken = store
        .lease_ports(&id(2), &[("tcp", 20000)], 20000..=20001, &|_, _| true)
        .unwrap();
    assert!(
        matches!(&taken, Err(PortRefusal::Taken { by, .. }) if *by == id(1)),
        "{taken:?}"
    );
}
