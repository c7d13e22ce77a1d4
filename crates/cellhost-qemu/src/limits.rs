//! A VM's cgroup: what qemu may use of the host, and where the limits go.
//!
//! # Layout on the host
//!
//! `<hierarchy>/cellhost/<instance>/cellhost-<id>` (named and found as a
//! process cell's, [`cellhost_host::cgroups`]; `<instance>` is the tier's
//! state dir's tag, so vm and microvm cells are listed apart): in each
//! mounted v1 hierarchy that carries memory, cpu, cpuacct or pids on a v1
//! or hybrid host, or in the unified hierarchy on a v2 host (the memory,
//! cpu and pids controllers enabled on the way down). Only qemu is in it;
//! it joins before it execs ([`crate::spawn`]).
//!
//! # The limits
//!
//! - memory: the guest's RAM plus qemu's own overhead
//!   ([`OVERHEAD_MIB`], measured; see there), no swap beyond it. Under
//!   TCG the translation buffer is bounded (`-accel tcg,tb-size=`
//!   [`TB_MIB`]): qemu 7.2's default is 1 GiB, touched as the guest runs
//!   new code, which would make the bound meaningless.
//! - CPU: a CFS quota of the vCPU count plus [`CPU_EXTRA_PERMILLE`] of a
//!   CPU for qemu's own threads (main loop, I/O workers, RCU).
//! - tasks: [`PIDS_BASE`] plus one per vCPU: qemu's thread pool grows to
//!   64 workers under I/O and qemu aborts when it cannot make a thread,
//!   so the cap sits above what qemu makes, and bounds what an escaped
//!   qemu could (its sandbox already forbids fork).
//!
//! Threat model: the limits bound a qemu the guest took over: it cannot
//! take more memory, CPU or tasks of the host than the cell was given.
//! A limit that cannot be set (a controller missing) refuses the cell.

use std::io;
use std::path::{Path, PathBuf};

use cellhost_host::cgroups::{CGROUP_PARENT, CellCgroups, Hierarchy};
use cellhost_host::probe::Accel;
use cellhost_spec::Cell;

use crate::args::{DEFAULT_MEMORY_MIB, vcpus};

/// TCG translation buffer, MiB (the default of `QemuConfig::tb_mib`).
pub const TB_MIB: u64 = 128;
/// qemu's own memory beyond the guest's RAM and the translation buffer,
/// MiB, plus [`VCPU_MIB`] per vCPU.
pub const OVERHEAD_MIB: u64 = 128;
/// qemu's memory per vCPU (thread, TLBs, CPU state), MiB.
pub const VCPU_MIB: u64 = 16;
/// CPU for qemu's own threads, thousandths of a CPU.
pub const CPU_EXTRA_PERMILLE: u64 = 100;
/// CFS period, µs.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Tasks beyond one per vCPU.
pub const PIDS_BASE: u64 = 96;

/// What one VM's qemu may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub pids: u64,
}

impl Limits {
    /// The limits of `cell`'s qemu under `accel`, with a translation
    /// buffer of `tb_mib` under TCG.
    pub fn for_cell(cell: &Cell, accel: Accel, tb_mib: u64) -> Limits {
        let mem = cell.spec.resources.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        let cpus = vcpus(cell);
        let overhead = OVERHEAD_MIB
            + VCPU_MIB * cpus
            + match accel {
                Accel::Tcg => tb_mib,
                Accel::Kvm => 0,
            };
        Limits {
            memory_bytes: (mem + overhead) << 20,
            cpu_quota_us: (cpus * 1000 + CPU_EXTRA_PERMILLE) * CPU_PERIOD_US / 1000,
            cpu_period_us: CPU_PERIOD_US,
            pids: PIDS_BASE + cpus,
        }
    }
}

/// Why a VM's cgroup could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup {controller} controller is available here (a VM's qemu gets memory, cpu and pids limits)"
    )]
    Missing { controller: &'static str },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One write into a cgroup file; `optional` ones are skipped where the
/// file does not exist (swap accounting off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub file: PathBuf,
    pub value: String,
    pub optional: bool,
}

/// The dirs to make (in order), the writes to make in them, and the dirs
/// qemu joins, for cell cgroup `object` (`<instance>/cellhost-<id>`) in
/// hierarchies `hs`. Pure, for the tests.
pub fn plan(
    hs: &[Hierarchy],
    object: &str,
    l: &Limits,
) -> Result<(Vec<PathBuf>, Vec<Write>), CgroupError> {
    let rel = Path::new(CGROUP_PARENT).join(object);
    let w = |dir: &Path, file: &str, value: String, optional: bool| Write {
        file: dir.join(file),
        value,
        optional,
    };
    let v1: Vec<&Hierarchy> = hs
        .iter()
        .filter(|h| !h.unified && !h.controllers.is_empty())
        .collect();
    if !v1.is_empty() {
        let has = |h: &Hierarchy, c: &str| h.controllers.iter().any(|x| x == c);
        for c in ["memory", "cpu", "pids"] {
            if !v1.iter().any(|h| has(h, c)) {
                return Err(CgroupError::Missing { controller: c });
            }
        }
        let mut dirs = Vec::new();
        let mut writes = Vec::new();
        for h in v1.iter().filter(|h| {
            ["memory", "cpu", "cpuacct", "pids"]
                .iter()
                .any(|c| has(h, c))
        }) {
            let dir = h.mount_point.join(&rel);
            if has(h, "memory") {
                let m = l.memory_bytes.to_string();
                writes.push(w(&dir, "memory.limit_in_bytes", m.clone(), false));
                // memory+swap no larger: no swap beyond the limit.
                writes.push(w(&dir, "memory.memsw.limit_in_bytes", m, true));
            }
            if has(h, "cpu") {
                let (p, q) = (l.cpu_period_us.to_string(), l.cpu_quota_us.to_string());
                writes.push(w(&dir, "cpu.cfs_period_us", p, false));
                writes.push(w(&dir, "cpu.cfs_quota_us", q, false));
            }
            if has(h, "pids") {
                writes.push(w(&dir, "pids.max", l.pids.to_string(), false));
            }
            dirs.push(dir);
        }
        return Ok((dirs, writes));
    }
    let Some(u) = hs.iter().find(|h| h.unified) else {
        return Err(CgroupError::Missing {
            controller: "memory",
        });
    };
    // v2: the controllers enabled from the root down to the cell's parent
    // (cgroup.controllers of the root is checked when applying).
    let mut writes = Vec::new();
    let mut at = u.mount_point.clone();
    for part in rel.parent().into_iter().flat_map(|p| p.components()) {
        writes.push(w(
            &at,
            "cgroup.subtree_control",
            "+memory +cpu +pids".into(),
            false,
        ));
        at = at.join(part);
    }
    writes.push(w(
        &at,
        "cgroup.subtree_control",
        "+memory +cpu +pids".into(),
        false,
    ));
    let dir = u.mount_point.join(&rel);
    writes.push(w(&dir, "memory.max", l.memory_bytes.to_string(), false));
    writes.push(w(&dir, "memory.swap.max", "0".into(), true));
    writes.push(w(
        &dir,
        "cpu.max",
        format!("{} {}", l.cpu_quota_us, l.cpu_period_us),
        false,
    ));
    writes.push(w(&dir, "pids.max", l.pids.to_string(), false));
    Ok((vec![dir], writes))
}

/// Make cell cgroup `object` with limits `l`; the dirs qemu joins. On
/// error, what was made is removed again.
pub fn create(object: &str, l: &Limits) -> Result<Vec<PathBuf>, CgroupError> {
    let hs = cellhost_host::cgroups::hierarchies()
        .map_err(io_err("reading", Path::new("/proc/self/mountinfo")))?;
    let (dirs, writes) = plan(&hs, object, l)?;
    if let Some(u) = hs.iter().find(|h| h.unified)
        && dirs.iter().any(|d| d.starts_with(&u.mount_point))
    {
        let file = u.mount_point.join("cgroup.controllers");
        let have = std::fs::read_to_string(&file).map_err(io_err("reading", &file))?;
        for c in ["memory", "cpu", "pids"] {
            if !have.split_whitespace().any(|x| x == c) {
                return Err(CgroupError::Missing { controller: c });
            }
        }
    }
    let made = (|| {
        for d in &dirs {
            std::fs::create_dir_all(d).map_err(io_err("creating", d))?;
        }
        for wr in &writes {
            if wr.optional && !wr.file.exists() {
                continue;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(&wr.file)
                .and_then(|mut f| io::Write::write_all(&mut f, wr.value.as_bytes()))
                .map_err(io_err("writing", &wr.file))?;
        }
        Ok(())
    })();
    match made {
        Ok(()) => Ok(dirs),
        Err(e) => {
            remove(object);
            Err(e)
        }
    }
}

/// Kill whatever is left in cell cgroup `object` and remove its dirs;
/// the dirs still there afterwards.
pub fn remove(object: &str) -> Vec<PathBuf> {
    let Ok(cg) = CellCgroups::for_object(object) else {
        return Vec::new();
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let pids = cg.pids();
        if pids.is_empty() || std::time::Instant::now() > until {
            break;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for d in cg.existing() {
        let _ = std::fs::remove_dir(&d);
    }
    cg.existing()
}

/// The dirs cell cgroup `object` has or would have (for the report).
pub fn dirs(object: &str) -> Vec<PathBuf> {
    CellCgroups::for_object(object)
        .map(|c| c.dirs)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellhost_host::cgroups::hierarchies_from;
    use cellhost_os::mountinfo::parse;

    fn cell(extra: &str) -> Cell {
        cellhost_spec::parse_and_validate(&format!(
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{name: x}}\nspec:\n  isolation: microvm\n  image: i\n  command: [/bin/true]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn limits_follow_the_cell() {
        let l = Limits::for_cell(&cell(""), Accel::Tcg, TB_MIB);
        assert_eq!(
            l.memory_bytes,
            (DEFAULT_MEMORY_MIB + OVERHEAD_MIB + VCPU_MIB + TB_MIB) << 20
        );
        assert_eq!(
            l.cpu_quota_us,
            CPU_PERIOD_US + CPU_PERIOD_US * CPU_EXTRA_PERMILLE / 1000
        );
        assert_eq!(l.pids, PIDS_BASE + 1);
        let l = Limits::for_cell(
            &cell("  resources: {cpus: 1.5, memoryMiB: 512}\n"),
            Accel::Kvm,
            TB_MIB,
        );
        assert_eq!(
            l.memory_bytes,
            (512 + OVERHEAD_MIB + 2 * VCPU_MIB) << 20,
            "no translator"
        );
        assert_eq!(
            l.cpu_quota_us,
            2 * CPU_PERIOD_US + CPU_PERIOD_US * CPU_EXTRA_PERMILLE / 1000
        );
        assert_eq!(l.pids, PIDS_BASE + 2);
    }

    const LIMITS: Limits = Limits {
        memory_bytes: 1 << 29,
        cpu_quota_us: 125_000,
        cpu_period_us: 100_000,
        pids: 97,
    };

    #[test]
    fn v1_split_cpu_and_cpuacct() {
        // This host's layout: cpu and cpuacct mounted apart, no pids in v2.
        let hs = hierarchies_from(&parse(
            "1 0 0:1 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
             2 0 0:2 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n\
             3 0 0:3 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
             4 0 0:4 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
             5 0 0:5 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n\
             6 0 0:6 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
        ));
        let (dirs, writes) = plan(&hs, "abcd/cellhost-x", &LIMITS).unwrap();
        let d = |h: &str| PathBuf::from(format!("/sys/fs/cgroup/{h}/cellhost/abcd/cellhost-x"));
        assert_eq!(dirs, ["cpu", "cpuacct", "memory", "pids"].map(d));
        let has = |h: &str, f: &str, v: &str| {
            writes
                .iter()
                .any(|w| w.file == d(h).join(f) && w.value == v)
        };
        assert!(has("memory", "memory.limit_in_bytes", "536870912"));
        assert!(has("cpu", "cpu.cfs_quota_us", "125000"));
        assert!(has("cpu", "cpu.cfs_period_us", "100000"));
        assert!(has("pids", "pids.max", "97"));
        // Every cell cgroup dir the residue check looks at includes ours.
        let all = CellCgroups::from_hierarchies("abcd/cellhost-x", &hs).dirs;
        assert!(dirs.iter().all(|d| all.contains(d)), "{all:?}");
    }

    #[test]
    fn v2_enables_controllers_on_the_way_down() {
        let hs = hierarchies_from(&parse("1 0 0:1 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"));
        let (dirs, writes) = plan(&hs, "abcd/cellhost-x", &LIMITS).unwrap();
        assert_eq!(
            dirs,
            [PathBuf::from("/sys/fs/cgroup/cellhost/abcd/cellhost-x")]
        );
        let files: Vec<String> = writes
            .iter()
            .map(|w| format!("{}={}", w.file.display(), w.value))
            .collect();
        assert_eq!(
            files,
            [
                "/sys/fs/cgroup/cgroup.subtree_control=+memory +cpu +pids",
                "/sys/fs/cgroup/cellhost/cgroup.subtree_control=+memory +cpu +pids",
                "/sys/fs/cgroup/cellhost/abcd/cgroup.subtree_control=+memory +cpu +pids",
                "/sys/fs/cgroup/cellhost/abcd/cellhost-x/memory.max=536870912",
                "/sys/fs/cgroup/cellhost/abcd/cellhost-x/memory.swap.max=0",
                "/sys/fs/cgroup/cellhost/abcd/cellhost-x/cpu.max=125000 100000",
                "/sys/fs/cgroup/cellhost/abcd/cellhost-x/pids.max=97",
            ]
        );
    }

    #[test]
    fn a_missing_controller_refuses() {
        let hs = hierarchies_from(&parse(
            "1 0 0:1 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct\n\
             3 0 0:3 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        ));
        let e = plan(&hs, "a/cellhost-x", &LIMITS).unwrap_err();
        assert!(
            matches!(e, CgroupError::Missing { controller: "pids" }),
            "{e}"
        );
        assert!(plan(&[], "a/cellhost-x", &LIMITS).is_err());
    }
}
