//! The btrfs qgroup check against the real kernel: a loop-mounted btrfs
//! with quotas on, its accounting made inconsistent the way the kernel
//! documents (a snapshot inherited into a higher-level qgroup), then
//! repaired by a rescan. [`btrfs_qgroups_hold`] reads the real
//! `/proc/self/mountinfo` and `/sys`. Needs root and btrfs-progs
//! (`scripts/test` installs them); skipped, printed, otherwise.
//!
//! Why it matters: after this machine's host restart, the engine's btrfs
//! data root came back inconsistent and a container wrote 3 GiB under
//! `storage_opt size=1G` (the hostile suite's fill, measured).

use std::path::Path;
use std::process::Command;

use cellhost_docker::disk::btrfs_qgroups_hold;

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
}

fn hold(mnt: &Path) -> Result<(), String> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    btrfs_qgroups_hold(&mi, Path::new("/sys"), &mnt.join("data-root"))
}

/// Unmounts at the end, even when an assertion failed.
struct Mounted<'a>(&'a Path);
impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn inconsistent_qgroups_are_seen_and_a_rescan_clears_them() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: not root (mounting a loop btrfs)");
        return;
    }
    if Command::new("mkfs.btrfs")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: no mkfs.btrfs (btrfs-progs)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, mnt) = (dir.path().join("fs.img"), dir.path().join("mnt"));
    std::fs::create_dir(&mnt).unwrap();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let (img_s, mnt_s) = (img.to_str().unwrap(), mnt.to_str().unwrap());
    run(&["mkfs.btrfs", "-q", img_s]);
    run(&["mount", "-o", "loop", img_s, mnt_s]);
    let _m = Mounted(&mnt);
    let sv = mnt.join("data-root");
    run(&["btrfs", "subvolume", "create", sv.to_str().unwrap()]);

    // Quotas off: the engine turns them on at its first sized create.
    assert_eq!(hold(&mnt), Ok(()));
    run(&["btrfs", "quota", "enable", mnt_s]);
    std::fs::write(sv.join("x"), vec![7u8; 8 << 20]).unwrap();
    run(&["sync"]);
    assert_eq!(hold(&mnt), Ok(()));

    run(&["btrfs", "qgroup", "create", "1/100", mnt_s]);
    let snap = mnt.join("snap");
    run(&[
        "btrfs",
        "subvolume",
        "snapshot",
        "-i",
        "1/100",
        sv.to_str().unwrap(),
        snap.to_str().unwrap(),
    ]);
    let why = hold(&mnt).unwrap_err();
    assert!(why.contains("inconsistent"), "{why}");
    assert!(
        why.contains(&format!("btrfs quota rescan -w {mnt_s}")),
        "{why}"
    );

    run(&["btrfs", "quota", "rescan", "-w", mnt_s]);
    assert_eq!(hold(&mnt), Ok(()));
}
