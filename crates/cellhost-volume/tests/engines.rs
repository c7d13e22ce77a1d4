//! The engines for real: cryptsetup, qemu-storage-daemon, FUSE, loop and
//! ext4 on this host. The userspace engine runs wherever /dev/fuse and the
//! tools are; the dm-crypt engine only where the kernel has device-mapper
//! (not on the build host this was written on: it is skipped there with
//! the probe's reason printed).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use cellhost_core::ids::CellId;
use cellhost_core::{TeardownReport, VolumeKey};
use cellhost_volume::{
    EngineChoice, EngineKind, LuksFormat, Tools, VolumeConfig, VolumeError, Volumes, probe,
};

const MIB: usize = 1 << 20;

/// Volumes on `engine` under a fresh temp root, or None (with the reason
/// printed) when this host cannot run it.
fn volumes(engine: EngineKind, tools: Tools) -> Option<(tempfile::TempDir, Volumes)> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: encrypted volumes need root");
        return None;
    }
    if let Err(why) = probe().get(engine) {
        eprintln!("SKIP: {engine} engine unavailable here: {why}");
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("cellhost-vol-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut cfg = VolumeConfig::new(dir.path().join("volumes"));
    cfg.engine = EngineChoice::Force(engine);
    cfg.tools = tools;
    let v = Volumes::new(cfg);
    assert_eq!(v.engine(), Ok(engine));
    Some((dir, v))
}

/// 1 MiB that occurs nowhere by chance: a counter-tagged text pattern.
fn pattern() -> Vec<u8> {
    let mut out = Vec::with_capacity(MIB);
    let mut i = 0u64;
    while out.len() < MIB {
        out.extend_from_slice(format!("cellhost-forensic-pattern-{i:012}|").as_bytes());
        i += 1;
    }
    out.truncate(MIB);
    out
}

fn file_contains(path: &Path, needle: &[u8]) -> (bool, u64) {
    let s = cellhost_volume::scan::find_in_data(path, needle).unwrap();
    (s.found, s.scanned)
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn assert_nothing_left(v: &Volumes, id: &CellId) {
    let p = v.paths(id);
    assert!(!p.dir.exists(), "{} left", p.dir.display());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(p.dir.to_str().unwrap()),
        "mount under {} left",
        p.dir.display()
    );
    assert_eq!(loops_under(&p.dir), Vec::<String>::new());
    assert!(
        daemons_for(&p.disk).is_empty(),
        "storage daemon for {} left",
        p.disk.display()
    );
}

fn loops_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file"))
            && Path::new(b.trim_end()).starts_with(dir)
        {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

fn daemons_for(disk: &Path) -> Vec<u32> {
    let d = disk.to_str().unwrap();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let c = fs::read(e.path().join("cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c);
            (c.contains("qemu-storage-daemon") && c.contains(d)).then_some(pid)
        })
        .collect()
}

fn destroy(v: &Volumes, id: &CellId) -> TeardownReport {
    let mut r = TeardownReport::new(id.as_str());
    v.destroy_into(id, &mut r);
    r
}

fn forensic_round(engine: EngineKind) {
    let Some((_tmp, v)) = volumes(engine, Tools::default()) else {
        return;
    };
    let id = CellId::random();
    let key = VolumeKey::random();
    let open = v.create(&id, 1, &key).unwrap();
    assert_eq!(open.engine, engine);
    assert_eq!(open.format, engine.format());
    assert!(v.is_open(&id));
    let pat = pattern();
    write_synced(&open.data_dir.join("pattern"), &pat);
    assert_eq!(fs::read(open.data_dir.join("pattern")).unwrap(), pat);
    v.close(&id).unwrap();
    assert!(!v.is_open(&id));
    assert!(!open.data_dir.exists(), "data dir visible while closed");

    let disk = v.paths(&id).disk;
    // The scanner finds the pattern where it is in the clear...
    let control = v.paths(&id).dir.join("control");
    write_synced(&control, &pat[1000..1000 + 4096]);
    assert!(file_contains(&control, b"forensic-pattern").0);
    fs::remove_file(&control).unwrap();
    // ...and not anywhere in the container: every 4 KiB block of the
    // pattern holds this marker, so one search covers all of it.
    let (found, scanned) = file_contains(&disk, b"forensic-pattern");
    assert!(!found, "plaintext found in {}", disk.display());
    assert!(
        scanned >= MIB as u64,
        "the container's data extents ({scanned} bytes) hold at least the 1 MiB written"
    );
    let mut head = [0u8; 8];
    fs::File::open(&disk)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head[..6], b"LUKS\xba\xbe", "LUKS magic");
    let version = u16::from_be_bytes([head[6], head[7]]);
    assert_eq!(
        version,
        match engine.format() {
            LuksFormat::Luks1 => 1,
            LuksFormat::Luks2 => 2,
        }
    );

    // Right key: the data is back.
    let again = v.open(&id, &key).unwrap();
    assert_eq!(fs::read(again.data_dir.join("pattern")).unwrap(), pat);
    v.close(&id).unwrap();

    // Wrong key: a clear error, and nothing changed.
    let header_before = read_prefix(&disk, 4 * MIB);
    match v.open(&id, &VolumeKey::random()) {
        Err(VolumeError::WrongKey(got)) => assert_eq!(got, id),
        other => panic!("wrong key: {other:?}"),
    }
    assert!(!v.is_open(&id));
    assert_eq!(read_prefix(&disk, 4 * MIB), header_before);
    assert!(daemons_for(&disk).is_empty());
    let third = v.open(&id, &key).unwrap();
    assert_eq!(fs::read(third.data_dir.join("pattern")).unwrap(), pat);
    // Open already: a wrong key is still refused, the right one accepted.
    assert!(matches!(
        v.open(&id, &VolumeKey::random()),
        Err(VolumeError::WrongKey(_))
    ));
    assert!(v.is_open(&id));
    v.verify_key(&id, &key).unwrap();

    // Destroy while open: everything goes, the report says so; twice is fine.
    let r = destroy(&v, &id);
    assert!(r.is_clean(), "{}", r.summary());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
    for want in [
        "volume-mount",
        "volume-loop",
        "volume-daemon",
        "volume-mapper",
        "volume-keyslots",
        "volume-file",
        "volume-dir",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert_nothing_left(&v, &id);
    let r2 = destroy(&v, &id);
    assert!(r2.is_clean() && r2.errors.is_empty(), "{r2:?}");
    assert!(matches!(v.open(&id, &key), Err(VolumeError::NotFound(_))));
}

fn read_prefix(p: &Path, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut f = fs::File::open(p).unwrap();
    f.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn userspace_pattern_is_ciphertext_reopens_and_destroys() {
    forensic_round(EngineKind::Userspace);
}

#[test]
fn dm_crypt_pattern_is_ciphertext_reopens_and_destroys() {
    forensic_round(EngineKind::DmCrypt);
}

#[test]
fn storage_daemon_outlives_its_caller_in_its_own_session() {
    let Some((_tmp, v)) = volumes(EngineKind::Userspace, Tools::default()) else {
        return;
    };
    let id = CellId::random();
    let key = VolumeKey::random();
    v.create(&id, 1, &key).unwrap();
    let pids = daemons_for(&v.paths(&id).disk);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let sid = |pid: u32| -> i32 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(3).unwrap().parse().unwrap()
    };
    assert_ne!(sid(pids[0]), sid(std::process::id()), "own session");
    // A fresh Volumes (a restarted daemon) sees it open and can close it.
    let mut cfg = VolumeConfig::new(v.root());
    cfg.engine = EngineChoice::Force(EngineKind::Userspace);
    let v2 = Volumes::new(cfg);
    assert!(v2.is_open(&id));
    assert_eq!(v2.meta(&id).unwrap().format, LuksFormat::Luks1);
    let r = destroy(&v2, &id);
    assert!(r.is_clean(), "{}", r.summary());
    assert_nothing_left(&v2, &id);
}

/// Every step of create made to fail in turn: the error names the step and
/// nothing of the volume is left.
#[test]
fn failure_at_every_create_step_rolls_back() {
    let Some((_tmp, base)) = volumes(EngineKind::Userspace, Tools::default()) else {
        return;
    };
    let root = base.root().to_path_buf();
    let fail = PathBuf::from("/bin/false");
    let missing = PathBuf::from("/nonexistent/mkfs.ext4");
    let cases: Vec<(&str, Tools, u64)> = vec![
        ("size", Tools::default(), 0),
        ("size", Tools::default(), 1 << 40),
        (
            "format",
            Tools {
                cryptsetup: fail.clone(),
                ..Tools::default()
            },
            1,
        ),
        (
            "open",
            Tools {
                qemu_storage_daemon: fail.clone(),
                ..Tools::default()
            },
            1,
        ),
        (
            "mkfs",
            Tools {
                mkfs_ext4: missing,
                ..Tools::default()
            },
            1,
        ),
        (
            "mkfs",
            Tools {
                mkfs_ext4: fail.clone(),
                ..Tools::default()
            },
            1,
        ),
        (
            "mount",
            Tools {
                mount: fail.clone(),
                ..Tools::default()
            },
            1,
        ),
    ];
    for (step, tools, size) in cases {
        // Volumes::new probes the tools: build it with the defaults, then
        // swap the broken tool in through a second config on the same root.
        let v = Volumes::new(VolumeConfig {
            root: root.clone(),
            engine: EngineChoice::Force(EngineKind::Userspace),
            tools: Tools::default(),
        })
        .with_tools(tools);
        let id = CellId::random();
        let err = v.create(&id, size, &VolumeKey::random()).unwrap_err();
        let msg = err.to_string();
        match step {
            "size" => assert!(matches!(err, VolumeError::Size(_)), "{msg}"),
            "mkfs" if msg.contains("not found") => {
                assert!(matches!(err, VolumeError::Unavailable(_)), "{msg}");
                assert!(msg.contains("mkfs"), "{msg}");
            }
            s => {
                assert!(
                    matches!(err, VolumeError::Step { step, .. } if step == s),
                    "{msg}"
                );
            }
        }
        assert_nothing_left(&v, &id);
    }
}

/// While volumes are made, opened, closed and destroyed, sample every
/// process's argv and environment: the key never shows, in any spelling.
#[test]
fn key_never_in_any_cmdline_or_environment() {
    let Some((_tmp, v)) = volumes(EngineKind::Userspace, Tools::default()) else {
        return;
    };
    let key = VolumeKey::random();
    let hex = key.passphrase().to_string();
    let needles: Vec<Vec<u8>> = vec![
        hex.as_bytes().to_vec(),
        hex.to_uppercase().into_bytes(),
        key.as_bytes().to_vec(),
        hex.as_bytes()[..16].to_vec(),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicUsize::new(0));
    let saw_daemon = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, samples, saw_daemon) = (stop.clone(), samples.clone(), saw_daemon.clone());
        std::thread::spawn(move || {
            let mut hits = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for e in fs::read_dir("/proc").unwrap().flatten() {
                    if e.file_name()
                        .to_str()
                        .and_then(|s| s.parse::<u32>().ok())
                        .is_none()
                    {
                        continue;
                    }
                    for what in ["cmdline", "environ"] {
                        let Ok(b) = fs::read(e.path().join(what)) else {
                            continue;
                        };
                        if what == "cmdline" && b.windows(19).any(|w| w == b"qemu-storage-daemon") {
                            saw_daemon.fetch_add(1, Ordering::Relaxed);
                        }
                        for n in &needles {
                            if b.windows(n.len()).any(|w| w == n.as_slice()) {
                                hits.push(format!("{}/{what}", e.path().display()));
                            }
                        }
                    }
                }
                samples.fetch_add(1, Ordering::Relaxed);
            }
            hits
        })
    };
    for _ in 0..3 {
        let id = CellId::random();
        v.create(&id, 1, &key).unwrap();
        v.close(&id).unwrap();
        v.open(&id, &key).unwrap();
        let _ = v.open(&id, &VolumeKey::random());
        assert!(destroy(&v, &id).is_clean());
    }
    stop.store(true, Ordering::Relaxed);
    let hits = sampler.join().unwrap();
    assert!(hits.is_empty(), "key seen in {hits:?}");
    assert!(samples.load(Ordering::Relaxed) > 3, "sampler ran");
    assert!(
        saw_daemon.load(Ordering::Relaxed) > 0,
        "the sampler saw a storage daemon at least once (so it looked while keys were in use)"
    );
}

#[test]
fn derived_keys_open_what_they_made() {
    let Some((_tmp, v)) = volumes(EngineKind::Userspace, Tools::default()) else {
        return;
    };
    let id = CellId::random();
    let k1 = VolumeKey::derive(b"consumer secret", &id);
    v.create(&id, 1, &k1).unwrap();
    v.close(&id).unwrap();
    // Same secret, other cell id: a different key, refused.
    let other = VolumeKey::derive(b"consumer secret", &CellId::random());
    assert!(matches!(v.open(&id, &other), Err(VolumeError::WrongKey(_))));
    v.open(&id, &VolumeKey::derive(b"consumer secret", &id))
        .unwrap();
    assert!(destroy(&v, &id).is_clean());
}
