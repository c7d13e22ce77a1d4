//! The host's cgroup hierarchies and where a cell's cgroups live in them.
//!
//! Layout on the host: every tier that gives cells cgroups of their own
//! (the process tier through libcontainer, the qemu tiers for each VM's
//! qemu) puts a cell's cgroup at
//! `<hierarchy>/cellhost/<instance>/cellhost-<id>` in every mounted
//! hierarchy it uses (each v1 controller hierarchy on a v1 or hybrid host;
//! the unified hierarchy on a v2 host), `<instance>` being the backend's
//! [`instance_tag`]. This module only reads `/proc/self/mountinfo` and
//! cgroup files; creating and removing the cgroups is the tier's.
//!
//! Threat model: the mount table and cgroup files are kernel-provided but
//! their *contents* (mount points, paths) can contain anything a cell's
//! creator chose; parsing never panics and treats odd lines as absent.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The cgroup parent every cell cgroup lives under.
pub const CGROUP_PARENT: &str = "cellhost";

/// The cgroup group of one backend instance, under [`CGROUP_PARENT`]: see
/// [`instance_tag`]. A cell's cgroup is
/// `/cellhost/<instance>/cellhost-<id>`.
pub use cellhost_core::ids::instance_tag;

/// `<instance>/cellhost-<id>`: the cell's cgroup below [`CGROUP_PARENT`].
pub fn cgroup_object(instance: &str, container_id: &str) -> String {
    format!("{instance}/{container_id}")
}

use cellhost_os::mountinfo::MountEntry;
use cellhost_os::mountinfo::read_self as mounts;

/// A mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount_point: PathBuf,
    /// `true` for cgroup2.
    pub unified: bool,
    /// v1 controllers bound to it (`cpu`, `memory`, ...); empty for v2.
    pub controllers: Vec<String>,
}

use cellhost_os::mountinfo::V1_CONTROLLERS;

/// Every cgroup hierarchy mounted in this mount namespace.
pub fn hierarchies() -> io::Result<Vec<Hierarchy>> {
    Ok(hierarchies_from(&mounts()?))
}

pub fn hierarchies_from(mounts: &[MountEntry]) -> Vec<Hierarchy> {
    let mut out: Vec<Hierarchy> = Vec::new();
    for m in mounts {
        let h = match m.fs_type.as_str() {
            "cgroup2" => Hierarchy {
                mount_point: m.mount_point.clone(),
                unified: true,
                controllers: vec![],
            },
            "cgroup" => Hierarchy {
                mount_point: m.mount_point.clone(),
                unified: false,
                controllers: m
                    .super_options
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o))
                    .map(str::to_string)
                    .collect(),
            },
            _ => continue,
        };
        if !out.iter().any(|o| o.mount_point == h.mount_point) {
            out.push(h);
        }
    }
    out
}

/// Where one cell's cgroups live on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellCgroups {
    /// Relative cgroup path given to libcontainer (`/cellhost/cellhost-<id>`).
    pub relative: String,
    /// Absolute directories: one per v1 hierarchy with controllers, or the
    /// unified one on a pure v2 host.
    pub dirs: Vec<PathBuf>,
    /// Directory to read memory accounting from.
    pub memory: Option<PathBuf>,
    /// Directory to read pids/cgroup.procs from.
    pub procs: Option<PathBuf>,
    /// Directory to read cpu accounting from.
    pub cpu: Option<PathBuf>,
    pub unified: bool,
}

impl CellCgroups {
    pub fn for_object(object_name: &str) -> io::Result<CellCgroups> {
        Ok(Self::from_hierarchies(object_name, &hierarchies()?))
    }

    pub fn from_hierarchies(object_name: &str, hs: &[Hierarchy]) -> CellCgroups {
        let relative = format!("/{CGROUP_PARENT}/{object_name}");
        let rel = relative.trim_start_matches('/').to_string();
        let rel = rel.as_str();
        let v1: Vec<&Hierarchy> = hs
            .iter()
            .filter(|h| !h.unified && !h.controllers.is_empty())
            .collect();
        if v1.is_empty() {
            // Pure v2: everything in the unified hierarchy.
            let dir = hs
                .iter()
                .find(|h| h.unified)
                .map(|h| h.mount_point.join(rel));
            return CellCgroups {
                relative,
                dirs: dir.iter().cloned().collect(),
                memory: dir.clone(),
                procs: dir.clone(),
                cpu: dir,
                unified: true,
            };
        }
        let find = |c: &str| {
            v1.iter()
                .find(|h| h.controllers.iter().any(|x| x == c))
                .map(|h| h.mount_point.join(rel))
        };
        let mut dirs: Vec<PathBuf> = v1.iter().map(|h| h.mount_point.join(rel)).collect();
        // On a hybrid host the (controller-less) unified hierarchy is also
        // checked for residue, though libcontainer does not create in it.
        if let Some(u) = hs.iter().find(|h| h.unified) {
            dirs.push(u.mount_point.join(rel));
        }
        CellCgroups {
            relative,
            memory: find("memory"),
            procs: find("pids")
                .or_else(|| find("freezer"))
                .or_else(|| find("cpu")),
            cpu: find("cpuacct").or_else(|| find("cpu")),
            dirs,
            unified: false,
        }
    }

    /// Cell cgroup directories that still exist.
    pub fn existing(&self) -> Vec<PathBuf> {
        self.dirs.iter().filter(|d| d.exists()).cloned().collect()
    }

    /// Pids in the cell's cgroup (all of its processes, any depth below it
    /// on v1 too since cellhost creates no sub-cgroups).
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for d in &self.dirs {
            collect_procs(d, &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Times the OOM killer fired in this cell (v1 `memory.oom_control`
    /// `oom_kill`, v2 `memory.events` `oom_kill`). None if unreadable.
    pub fn oom_kills(&self) -> Option<u64> {
        let dir = self.memory.as_ref()?;
        let (file, key) = if self.unified {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        let text = fs::read_to_string(dir.join(file)).ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// CPU time used by the cell so far, in nanoseconds.
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        let dir = self.cpu.as_ref()?;
        if self.unified {
            let text = fs::read_to_string(dir.join("cpu.stat")).ok()?;
            text.lines().find_map(|l| {
                let v = l.strip_prefix("usage_usec ")?;
                v.trim().parse::<u64>().ok().map(|us| us * 1000)
            })
        } else {
            fs::read_to_string(dir.join("cpuacct.usage"))
                .ok()?
                .trim()
                .parse()
                .ok()
        }
    }

    /// Memory in use by the cell now, in bytes.
    pub fn memory_bytes(&self) -> Option<u64> {
        let dir = self.memory.as_ref()?;
        let file = if self.unified {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
    }
}

fn collect_procs(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_procs(&e.path(), out);
            }
        }
    }
}

/// Remove the instance's (empty) cgroup group from every hierarchy; one
/// that still holds cells stays (rmdir of a non-empty cgroup fails).
/// For tools and tests that end an instance; cells never need it.
pub fn remove_instance_group(instance: &str) {
    if let Ok(hs) = hierarchies() {
        for h in hs {
            let _ = fs::remove_dir(h.mount_point.join(CGROUP_PARENT).join(instance));
        }
    }
}

/// Cell object names (`cellhost-<id>`) that have a cgroup of `instance`
/// (see [`instance_tag`]) on this host.
pub fn cell_cgroup_names(instance: &str) -> io::Result<Vec<String>> {
    Ok(cell_cgroup_names_in(instance, &hierarchies()?))
}

/// [`cell_cgroup_names`] over hierarchies the caller already read.
pub fn cell_cgroup_names_in(instance: &str, hs: &[Hierarchy]) -> Vec<String> {
    let mut names = Vec::new();
    for h in hs {
        if let Ok(rd) = fs::read_dir(h.mount_point.join(CGROUP_PARENT).join(instance)) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("cellhost-") && !names.contains(&n) {
                    names.push(n);
                }
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellhost_os::mountinfo::parse as parse_mountinfo;

    const SAMPLE: &str = "\
25 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
35 30 0:31 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
36 25 0:40 / /var/lib/cell\\040x/secrets rw - tmpfs tmpfs rw
garbage line without separator
";

    #[test]
    fn sample_parses() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 8);
        assert_eq!(m[7].mount_point, PathBuf::from("/var/lib/cell x/secrets"));
    }

    #[test]
    fn hybrid_uses_v1_controllers_and_checks_unified() {
        let hs = hierarchies_from(&parse_mountinfo(SAMPLE));
        assert_eq!(hs.len(), 5);
        let cg = CellCgroups::from_hierarchies("cellhost-abc", &hs);
        assert!(!cg.unified);
        assert_eq!(
            cg.memory,
            Some(PathBuf::from("/sys/fs/cgroup/memory/cellhost/cellhost-abc"))
        );
        assert_eq!(
            cg.cpu,
            Some(PathBuf::from(
                "/sys/fs/cgroup/cpu,cpuacct/cellhost/cellhost-abc"
            ))
        );
        assert_eq!(
            cg.procs,
            Some(PathBuf::from("/sys/fs/cgroup/pids/cellhost/cellhost-abc"))
        );
        // three v1 hierarchies with controllers + the unified one; not systemd
        assert_eq!(cg.dirs.len(), 4);
        assert!(cg.dirs.contains(&PathBuf::from(
            "/sys/fs/cgroup/unified/cellhost/cellhost-abc"
        )));
    }

    #[test]
    fn pure_v2() {
        let m = parse_mountinfo("1 0 0:1 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        let cg = CellCgroups::from_hierarchies("cellhost-x", &hierarchies_from(&m));
        assert!(cg.unified);
        assert_eq!(
            cg.dirs,
            vec![PathBuf::from("/sys/fs/cgroup/cellhost/cellhost-x")]
        );
    }
}
