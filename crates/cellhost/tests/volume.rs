//! Encrypted volumes in process cells, for real: the cell writes through
//! its mount, the host's container file holds only ciphertext, and after
//! destroy not even a hard link the operator kept can be unlocked.

mod common;

use std::fs;
use std::time::Duration;

use cellhost_core::ids::CellId;
use cellhost_core::{Backend, BackendError, CellState, CreateRequest, VolumeKey};
use cellhost_volume::scan::find_in_data;

const MARKER: &[u8] = b"cellhost-cell-pattern";

/// The first `n` bytes of a (big, sparse) file.
fn prefix(p: &std::path::Path, n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    fs::File::open(p).unwrap().read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn process_cell_volume_is_ciphertext_and_unrecoverable_after_destroy() {
    require_process_tier!();
    require_volume_engine!();
    let t = common::tier();
    let rt = common::rt();
    rt.block_on(async {
        let cell = common::cell(
            "vol",
            "  command: [/bin/sh, -c, \"yes cellhost-cell-pattern | head -c 1048576 > /data/p && sync && echo wrote\"]\n  volume: { path: /data, sizeGiB: 1, encrypted: true }\n",
        );
        let key = VolumeKey::random();
        let id = CellId::random();
        let uids = common::lease_uids(&id);
        // Without the key: refused before anything is made.
        let err = t
            .backend
            .create(CreateRequest {
                uids: Some(uids),
                ..CreateRequest::new(id.clone(), cell.clone())
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BackendError::Invalid(m) if m.contains("spec.volume.encrypted")),
            "{err}"
        );
        assert!(!t.backend.volumes().exists(&id));

        let h = t
            .backend
            .create(CreateRequest {
                volume_key: Some(key.duplicate()),
                uids: Some(uids),
                ..CreateRequest::new(id.clone(), cell)
            })
            .await
            .expect("create");
        t.backend.start(&h).await.expect("start");
        let st = t.wait_exit(&h, Duration::from_secs(60)).await;
        assert_eq!(st.exit.map(|e| e.code), Some(Some(0)), "{}", t.log(&h).await);
        assert_eq!(t.log(&h).await, "wrote\n");

        let vols = t.backend.volumes();
        let paths = vols.paths(&id);
        // Positive control: the plaintext is where the cell put it.
        let written = fs::read(paths.data.join("p")).unwrap();
        assert_eq!(written.len(), 1 << 20);
        assert!(written.starts_with(MARKER));
        // Written by the cell's root: its own host uid, never host root.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(paths.data.join("p")).unwrap().uid(), uids.base);

        // Stop closes the volume: data at rest is ciphertext.
        t.backend.stop(&h, Duration::from_secs(1)).await.unwrap();
        assert!(!vols.is_open(&id));
        assert!(!paths.data.exists());
        let s = find_in_data(&paths.disk, MARKER).unwrap();
        assert!(!s.found, "plaintext in the container");
        assert!(s.scanned >= 1 << 20, "scanned {} bytes", s.scanned);
        assert_eq!(prefix(&paths.disk, 6), b"LUKS\xba\xbe");
        // A closed volume cannot start again (and this tier's cells do not
        // restart anyway).
        assert!(matches!(
            t.backend.start(&h).await,
            Err(BackendError::Invalid(m)) if m.contains("closed")
        ));

        // The operator keeps a hard link to the container...
        let evidence = t.dir.path().join("evidence.luks");
        fs::hard_link(&paths.disk, &evidence).unwrap();
        let r = t.backend.destroy(&h).await.unwrap();
        assert!(r.is_clean(), "{}", r.summary());
        for name in ["volume-keyslots", "volume-file", "volume-daemon", "volume-mount"] {
            assert!(
                r.checks.iter().any(|c| c.name == name && c.residue == 0),
                "{name}: {r:?}"
            );
        }
        assert!(!paths.dir.exists());
        assert_eq!(t.backend.status(&h).await.unwrap().state, CellState::Gone);
        // ...but destroy overwrote the header in place, so the link holds
        // no keyslot: the right key opens nothing, and the data blocks are
        // still ciphertext.
        let head = prefix(&evidence, 16 << 20);
        assert!(head.iter().all(|b| *b == 0), "header erased");
        assert!(!find_in_data(&evidence, MARKER).unwrap().found);
        let isluks = std::process::Command::new("cryptsetup")
            .arg("isLuks")
            .arg(&evidence)
            .status();
        if let Ok(s) = isluks {
            assert!(!s.success(), "cryptsetup still sees a LUKS header");
        }
        fs::remove_file(&evidence).unwrap();
    });
}

const DOC: &str = "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata:\n  name: v\nspec:\n  isolation: process\n  command: [/bin/sh, -c, \"echo kept > /data/f && cat /data/f\"]\n  volume: { path: /data, sizeGiB: 1, encrypted: true }\n";

#[test]
fn run_with_a_volume_key_file() {
    require_process_tier!();
    require_volume_engine!();
    let dir = common::state_dir();
    let doc = dir.path().join("v.yaml");
    fs::write(&doc, DOC).unwrap();
    let key = dir.path().join("key");
    // 64 hex digits and a newline, as `openssl rand -hex 32` writes it.
    fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();

    let run_with_key = || {
        common::cellhost(dir.path())
            .arg("run")
            .arg(&doc)
            .arg("--volume-key-file")
            .arg(&key)
            .output()
            .unwrap()
    };
    let out = run_with_key();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
    assert!(
        err.contains("teardown clean") && err.contains("volume-keyslots"),
        "{err}"
    );
    assert!(!err.contains(&"ab".repeat(32)));
    let vols = dir.path().join("process/volumes");
    assert_eq!(
        fs::read_dir(&vols).map(|d| d.count()).unwrap_or(0),
        0,
        "volume dir left"
    );

    // No key: exit 3 naming the field; a malformed key file: exit 3 naming
    // the file and not quoting it.
    let out = common::cellhost(dir.path())
        .arg("run")
        .arg(&doc)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.volume.encrypted"));
    fs::write(&key, "hunter2-not-a-key").unwrap();
    let out = run_with_key();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("--volume-key-file") && err.contains("32 bytes"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    // A forced engine the host lacks: exit 4 (capability), nothing made.
    if cellhost_volume::probe().dm_crypt.is_err() {
        fs::write(&key, "ab".repeat(32)).unwrap();
        let out = common::cellhost(dir.path())
            .args(["run", "--volume-engine", "dm-crypt", "--volume-key-file"])
            .arg(&key)
            .arg(&doc)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{err}");
        assert!(err.contains("dm-crypt"), "{err}");
    }
}

#[test]
fn bench_volume_reports_every_engine_against_plain() {
    require_process_tier!();
    require_volume_engine!();
    let dir = common::state_dir();
    let out = common::cellhost(dir.path())
        .args(["--json", "bench", "volume", "--cells", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let engines = v["engines"].as_array().unwrap();
    assert!(engines.len() >= 2, "{v}");
    assert_eq!(engines[0]["engine"], "plain ext4 (loop)");
    for e in engines {
        assert!(
            e["measure"]["ready"]["p50_ms"].as_f64().unwrap() > 0.0,
            "{e}"
        );
        assert!(
            e["measure"]["write_mb_s_median"].as_f64().unwrap() > 0.0,
            "{e}"
        );
    }
    assert!(engines[1]["write_ratio_vs_plain"].as_f64().unwrap() > 0.0);
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bench-volume-"))
        .collect();
    assert!(left.is_empty(), "bench dir left");
}
