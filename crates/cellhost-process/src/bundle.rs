//! The OCI runtime spec of a process cell.
//!
//! Layout on the host: `<state>/cells/<id>/config.json` (0600), written
//! by the backend before the shim runs; its root is what `root::prepare`
//! made. No secret is in it: env is the declared env, secrets are files.
//!
//! What it asks of libcontainer, and why (threat model: the workload is a
//! hostile stranger sharing the host's kernel):
//!
//! - **A user namespace of its own**: cell ids `0..65536` map onto the
//!   host ids the supervisor leased it (never shared with a live cell), so
//!   the cell's root is an unprivileged stranger on the host. Its own
//!   pid, mount, uts, ipc, net and cgroup namespaces (the net one made
//!   inside the user namespace, so it may mount its own sysfs; a bridged
//!   cell's veth is moved in after create).
//! - **Capabilities**: Docker's default set minus CAP_MKNOD (and minus
//!   CAP_NET_RAW unless the operator's policy allows it), all of them
//!   only over the cell's own namespaces; `no_new_privileges`.
//! - **Devices**: the cgroup denies every device, then allows only null,
//!   zero, full, random, urandom, tty, ptmx and the pts; the nodes are bound
//!   in from the host (a user namespace cannot mknod), and the cell's own
//!   /dev is `nodev`.
//! - **Read-only**: the root, recursively, and every host bind (`rro`:
//!   `mount_setattr` with `AT_RECURSIVE`, so no submount stays writable);
//!   `/proc/sys`, `/proc/sysrq-trigger`, … read-only; `/sys` read-only with
//!   block devices, firmware, powercap and the kernel's debug and security
//!   trees masked. The writable places are the cell's own tmpfs mounts
//!   (`/tmp`, sized `diskGiB` and charged to its memory, `/run`,
//!   `/dev/shm`) and its volume.
//! - **Limits** in the cgroup (cpu, memory, pids: the policy writes them
//!   into every document) and rlimits (the policy adds `nofile` and
//!   `nproc`, never the caller's inherited ones).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use cellhost_core::UidRange;
use cellhost_spec::Cell;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount,
    MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use crate::root::{ALTERNATIVES, Prepared};

/// CPU bandwidth period (100 ms, the kernel default).
const CPU_PERIOD_US: u64 = 100_000;

/// Paths of `/proc` and `/sys` the cell never sees (a read-only tmpfs or
/// /dev/null over each): kernel memory and timers, keys, block devices
/// (a loop device of another tenant), firmware tables, power meters (a
/// side channel), the kernel's debug and security trees.
pub const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/block",
    "/sys/class/block",
    "/sys/dev/block",
    "/sys/devices/virtual/block",
    "/sys/devices/virtual/powercap",
    "/sys/kernel/debug",
    "/sys/kernel/security",
    "/sys/kernel/tracing",
    "/sys/fs/bpf",
];

/// `/proc` paths the cell may read but never write.
pub const READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Character devices a cell may open (type, major, minor; `None`: any).
const DEVICES: &[(i64, Option<i64>)] = &[
    (1, Some(3)), // null
    (1, Some(5)), // zero
    (1, Some(7)), // full
    (1, Some(8)), // random
    (1, Some(9)), // urandom
    (5, Some(0)), // tty
    (5, Some(2)), // ptmx
    (136, None),  // pts
];

#[derive(Debug, thiserror::Error)]
#[error("building the OCI spec: {0}")]
pub struct BundleError(String);

fn spec_err(e: impl std::fmt::Display) -> BundleError {
    BundleError(e.to_string())
}

/// Inputs to [`oci_spec`] beyond the document.
pub struct SpecInputs<'a> {
    pub cell: &'a Cell,
    pub root: &'a Prepared,
    /// Host dir (a tmpfs) holding the secret files, if the cell has secrets.
    pub secrets_dir: Option<&'a Path>,
    /// Relative cgroup path (`/cellhost/<instance>/cellhost-<id>`).
    pub cgroup_path: &'a str,
    /// The host ids the cell's user namespace maps 0.. onto; `None`: no
    /// user namespace (the benchmark's baseline only).
    pub uids: Option<UidRange>,
    /// Keep CAP_NET_RAW (the operator's policy).
    pub net_raw: bool,
}

fn mount(dest: &str, typ: &str, source: &str, opts: &[&str]) -> Result<Mount, BundleError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(spec_err)
}

fn bind(dest: &str, source: &Path, opts: &[&str]) -> Result<Mount, BundleError> {
    MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(source)
        .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(spec_err)
}

/// Read-only, recursively (`rro`: no submount stays writable).
fn bind_ro(dest: &str, source: &Path) -> Result<Mount, BundleError> {
    bind(dest, source, &["rbind", "ro", "rro", "nosuid", "nodev"])
}

/// The capabilities a cell's processes get (over its own namespaces).
pub fn capabilities(net_raw: bool) -> HashSet<Capability> {
    let mut caps: HashSet<Capability> = [
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
    .into_iter()
    .collect();
    if net_raw {
        caps.insert(Capability::NetRaw);
    }
    caps
}

/// The OCI runtime spec for a cell.
pub fn oci_spec(inp: &SpecInputs<'_>) -> Result<Spec, BundleError> {
    let spec = &inp.cell.spec;
    // The cell's scratch: its diskGiB (the policy always sets one), charged
    // to its memory like every tmpfs page.
    let tmp_size = format!("size={}g", spec.resources.disk_gib.unwrap_or(1));

    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        // nodev: the standard nodes are bind mounts of the host's (a user
        // namespace cannot mknod), each its own mount; nothing made in
        // this tmpfs opens as a device. (Without a user namespace — the
        // benchmark's baseline only — libcontainer mknods them here.)
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &[
                "nosuid",
                "noexec",
                if inp.uids.is_some() { "nodev" } else { "dev" },
                "strictatime",
                "mode=755",
                "size=65536k",
            ],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/tmp",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=1777", &tmp_size],
        )?,
        mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=755", "size=16m"],
        )?,
    ];
    for t in &inp.root.host_binds {
        mounts.push(bind_ro(&format!("/{t}"), &Path::new("/").join(t))?);
    }
    if inp.root.alternatives {
        mounts.push(bind_ro(ALTERNATIVES, Path::new(ALTERNATIVES))?);
    }
    if let Some(conf) = &inp.root.resolv_conf {
        mounts.push(bind_ro("/etc/resolv.conf", conf)?);
    }
    if let Some(dir) = inp.secrets_dir {
        mounts.push(bind(
            "/run/secrets",
            dir,
            &["bind", "ro", "nosuid", "nodev", "noexec"],
        )?);
    }
    if let (Some(v), Some(src)) = (&spec.volume, &inp.root.volume) {
        mounts.push(bind(&v.path, src, &["bind", "rw", "nosuid", "nodev"])?);
    }

    let caps = capabilities(inp.net_raw);
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(HashSet::<Capability>::new())
        .ambient(HashSet::<Capability>::new())
        .build()
        .map_err(spec_err)?;

    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(spec_err)?,
        )
        .args(spec.command.clone())
        .env(env)
        .cwd(spec.working_dir.clone().unwrap_or_else(|| "/".to_string()))
        .capabilities(capabilities)
        .no_new_privileges(true)
        .rlimits(rlimits(&spec.resources.ulimits)?)
        .build()
        .map_err(spec_err)?;

    let mut resources = LinuxResourcesBuilder::default().devices(devices()?);
    if let Some(mib) = spec.resources.memory_mib {
        let bytes = (mib as i64).saturating_mul(1024 * 1024);
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(bytes)
                // No swap beyond the limit: the limit is the limit.
                .swap(bytes)
                .build()
                .map_err(spec_err)?,
        );
    }
    if let Some(cpus) = spec.resources.cpus {
        let quota = (cpus * CPU_PERIOD_US as f64).round().max(1000.0) as i64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD_US)
                .build()
                .map_err(spec_err)?,
        );
    }
    if let Some(pids) = spec.resources.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(pids as i64)
                .build()
                .map_err(spec_err)?,
        );
    }

    let namespaces = [
        inp.uids.map(|_| LinuxNamespaceType::User),
        Some(LinuxNamespaceType::Pid),
        Some(LinuxNamespaceType::Mount),
        Some(LinuxNamespaceType::Uts),
        Some(LinuxNamespaceType::Ipc),
        Some(LinuxNamespaceType::Network),
        Some(LinuxNamespaceType::Cgroup),
    ]
    .into_iter()
    .flatten()
    .map(|t| {
        LinuxNamespaceBuilder::default()
            .typ(t)
            .build()
            .map_err(spec_err)
    })
    .collect::<Result<Vec<_>, _>>()?;

    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut linux = LinuxBuilder::default().namespaces(namespaces);
    if let Some(uids) = inp.uids {
        linux = linux
            .uid_mappings(id_mappings(uids)?)
            .gid_mappings(id_mappings(uids)?);
    }
    let linux = linux
        .cgroups_path(PathBuf::from(inp.cgroup_path))
        .resources(resources.build().map_err(spec_err)?)
        .masked_paths(strings(MASKED))
        .readonly_paths(strings(READ_ONLY))
        .build()
        .map_err(spec_err)?;

    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(&inp.root.root)
                .readonly(true)
                .build()
                .map_err(spec_err)?,
        )
        .hostname(inp.cell.metadata.name.clone())
        .mounts(mounts)
        .process(process)
        .linux(linux)
        .build()
        .map_err(spec_err)
}

/// Cell ids `0..size` onto the leased host range.
fn id_mappings(r: UidRange) -> Result<Vec<oci_spec::runtime::LinuxIdMapping>, BundleError> {
    let m = serde_json::from_value(serde_json::json!({
        "containerID": 0u32,
        "hostID": r.base,
        "size": r.size,
    }))
    .map_err(spec_err)?;
    Ok(vec![m])
}

/// Deny every device, then allow [`DEVICES`] (read, write, mknod).
fn devices() -> Result<Vec<oci_spec::runtime::LinuxDeviceCgroup>, BundleError> {
    let mut out = vec![
        serde_json::from_value(serde_json::json!({ "allow": false, "access": "rwm" }))
            .map_err(spec_err)?,
    ];
    for (major, minor) in DEVICES {
        out.push(
            serde_json::from_value(serde_json::json!({
                "allow": true,
                "type": "c",
                "major": major,
                "minor": minor,
                "access": "rwm",
            }))
            .map_err(spec_err)?,
        );
    }
    Ok(out)
}

/// `spec.resources.ulimits` as OCI rlimits (`nofile` -> `RLIMIT_NOFILE`).
/// The names were checked by the spec crate against the same list.
fn rlimits(
    ulimits: &[cellhost_spec::Ulimit],
) -> Result<Vec<oci_spec::runtime::PosixRlimit>, BundleError> {
    ulimits
        .iter()
        .map(|u| {
            serde_json::from_value(serde_json::json!({
                "type": format!("RLIMIT_{}", u.name.to_ascii_uppercase()),
                "soft": u.soft,
                "hard": u.hard,
            }))
            .map_err(|e| BundleError(format!("spec.resources.ulimits {}: {e}", u.name)))
        })
        .collect()
}
