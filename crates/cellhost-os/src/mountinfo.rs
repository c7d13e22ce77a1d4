//! `/proc/self/mountinfo`, parsed.
//!
//! Shared by the host probe and the tiers (residue checks, cgroup
//! discovery). Read-only. Mount points can hold any byte a mount's creator
//! chose; the kernel escapes space, tab, newline and backslash as octal,
//! which [`parse`] undoes. Malformed lines are skipped, never a panic.

use std::io;
use std::path::{Path, PathBuf};

/// cgroup v1 controller names as they appear in a hierarchy's mount
/// options (`/proc/cgroups` lists the ones this kernel has).
pub const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// The fields of one mountinfo line that cellhost uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Root of the mount within its filesystem.
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options (`rw,memory` for a v1 memory hierarchy).
    pub super_options: String,
}

/// Parse mountinfo text; lines without the documented shape are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut l = left.split_whitespace();
            let root = l.nth(3)?;
            let mount_point = l.next()?;
            let mut r = right.split_whitespace();
            let fs_type = r.next()?;
            let source = r.next().unwrap_or("");
            let super_options = r.next().unwrap_or("");
            Some(MountEntry {
                root: unescape(root),
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: fs_type.to_string(),
                source: unescape(source),
                super_options: super_options.to_string(),
            })
        })
        .collect()
}

/// The mount table of this process's mount namespace.
pub fn read_self() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mount that holds `path`: the longest mount point that is a prefix
/// of it, the later of two equal ones (which is on top).
pub fn holding<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
}

/// Mount points at or below `dir`, in mount order.
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(read_self()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect())
}

/// What [`unmount_under`] found and could not undo.
#[derive(Debug, Default)]
pub struct Unmounted {
    /// Mount points that were at or below the dir, in mount order.
    pub found: Vec<PathBuf>,
    /// One line per mount that is still there.
    pub errors: Vec<String>,
}

/// Unmount everything at or below `dir`, newest first (so stacked and
/// nested mounts go before what they sit on). A mount that will not go
/// (busy) is detached lazily when `lazy_if_busy`, else reported; one that
/// vanished meanwhile (EINVAL, ENOENT) is fine. The one unmount routine of
/// every tier's teardown.
pub fn unmount_under(dir: &Path, lazy_if_busy: bool) -> io::Result<Unmounted> {
    use nix::errno::Errno;
    use nix::mount::{MntFlags, umount2};
    let found = mounts_under(dir)?;
    let mut errors = Vec::new();
    for m in found.iter().rev() {
        match umount2(m, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) if lazy_if_busy => {
                if let Err(d) = umount2(m, MntFlags::MNT_DETACH) {
                    errors.push(format!("umount {}: {e}; lazy: {d}", m.display()));
                }
            }
            Err(e) => errors.push(format!("umount {}: {e}", m.display())),
        }
    }
    Ok(Unmounted { found, errors })
}

/// Undo the kernel's octal escapes (`\040` for a space).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = &b[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes() {
        let m = parse(
            "36 25 0:40 / /var/lib/cell\\040x/secrets rw - tmpfs tmp\\040fs rw,size=4k\n\
             garbage\n\
             31 23 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/var/lib/cell x/secrets"));
        assert_eq!(m[0].source, "tmp fs");
        assert_eq!(m[1].super_options, "rw,memory");
    }

    #[test]
    fn unescape_edges() {
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("\\040"), " ");
        assert_eq!(
            unescape("\\777"),
            "\\777",
            "out of byte range stays literal"
        );
    }

    #[test]
    fn reads_own_table() {
        let m = read_self().unwrap();
        assert!(m.iter().any(|e| e.mount_point == Path::new("/")));
    }
}
