//! Host capability probe: what this host can really do (`cellhost doctor`).
//!
//! [`probe`] runs one real check per capability and returns a
//! [`HostReport`]: a list of [`Capability`] rows under stable keys
//! ([`KEYS`]), and [`HostReport::tiers`], which says which isolation tiers
//! this host can run and, when it cannot, which capability is missing. The
//! CLI prints it (`cellhost doctor [--json]`) and turns
//! [`HostReport::require`] failures into "host lacks a capability" errors.
//! Nothing is assumed from the distribution, the kernel version or a config
//! file: a capability is `ok` only when the check just made on this host
//! succeeded.
//!
//! # What it touches on the host
//!
//! - Reads `/proc/self/{ns,mountinfo}`, `/proc/{misc,devices,modules,cgroups}`,
//!   `/sys/module`, the cgroup mounts and device nodes under `/dev`.
//! - Forks five short-lived children; each calls `unshare(2)` for one of
//!   pid, mount, uts, ipc, net and `_exit`s. Nothing is mounted or changed;
//!   the new namespaces die with the child.
//! - Creates, writes one limit into, and removes a child cgroup named
//!   `cellhost-probe-<pid>-<n>` at the root of the cpu, memory and pids
//!   hierarchies. No process is ever moved into it.
//! - Opens `/dev/kvm` and issues `KVM_GET_API_VERSION` and `KVM_CREATE_VM`
//!   (an empty VM: no memory, no vCPU; closed at once). Opens and closes
//!   `/dev/fuse`; creates and closes one `AF_VSOCK` socket.
//! - Connects to the Docker socket and sends `GET /_ping`, `GET /version`
//!   and `GET /info` (read-only API calls).
//! - Runs `--version` of cryptsetup and the qemu binaries,
//!   `qemu-system-x86_64 -machine help` and `nft list tables` (read-only),
//!   and starts `qemu-system-x86_64 -machine none` under the sandbox VM
//!   cells get ([`QEMU_SANDBOX`]), killed as soon as it answers on QMP.
//!   Every subprocess gets an empty environment plus `PATH`, stdin from
//!   `/dev/null`, captured output, its own process group, and a deadline;
//!   its whole group is SIGKILLed when it ends or the deadline passes, so no
//!   process outlives the probe.
//! - Only with [`ProbeOptions::kvm_boot`]: boots a probe VM with
//!   `qemu-system-x86_64 -accel kvm` on a guest kernel, with no disk and no
//!   network, for at most [`ProbeOptions::kvm_boot_deadline`], and kills it
//!   as soon as the serial console shows the verdict.
//!
//! # Idempotency
//!
//! The probe has no lasting effect, so running it twice gives the same
//! answer. The only host objects it makes are the probe cgroups, removed
//! before the check returns; one left by a probe that was killed in between
//! (its pid gone and the directory older than a minute) is removed by the
//! next probe. Names carry the pid and a per-process counter, so concurrent
//! probes never share a directory.
//!
//! # Threat model
//!
//! The probe runs with the operator's authority (usually root) on inputs the
//! operator controls: `PATH`, `DOCKER_HOST`, `CELLHOST_PROBE_KERNEL`, files
//! under `/proc`, `/sys` and `/boot`. It trusts them as much as the
//! operator's shell does; it executes binaries found on `PATH` as root. It
//! defends against what is merely broken: odd or truncated `/proc` content
//! is parsed without panics, a hung daemon or binary meets a deadline, a
//! chatty one meets a capture limit, and a guest kernel's serial output is
//! only pattern-matched and quoted (truncated, on one line). No secret
//! passes through the probe, and children inherit none of our environment.

use cellhost_os::mountinfo::MountEntry;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use cellhost_spec::Isolation;
use serde::Serialize;

use cellhost_core::BackendError;

/// Every capability key [`probe`] reports, in report order. Stable: the CLI,
/// `--json` consumers and test skips match on these strings.
pub const KEYS: &[&str] = &[
    "root",
    "namespaces",
    "userns",
    "cgroup",
    "cgroup.cpu",
    "cgroup.memory",
    "cgroup.pids",
    "kvm",
    "qemu",
    "qemu.sandbox",
    "docker",
    "docker.userns",
    "docker.storage-opt",
    "cryptsetup",
    "device-mapper",
    "fuse",
    "loop",
    "tun",
    "vsock",
    "nftables",
];

/// The seccomp sandbox every VM cell's qemu runs under (`-sandbox`): no
/// obsolete syscalls, no setuid/setgid family, no fork or exec, no
/// scheduler or affinity changes. The probe checks this qemu accepts it.
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Deadline for a `--version` style subprocess.
const CMD_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline for connecting to and reading from the Docker socket.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(1);
/// Deadline for a forked unshare child.
const FORK_TIMEOUT: Duration = Duration::from_secs(2);
/// Most bytes kept of one subprocess stream; the rest is read and dropped.
const MAX_CAPTURE: usize = 256 * 1024;
/// Most bytes read from one Docker API response.
const MAX_HTTP: u64 = 1024 * 1024;
/// Longest `detail` line.
const MAX_DETAIL: usize = 300;
/// Prefix of probe cgroup directories.
const PROBE_CGROUP_PREFIX: &str = "cellhost-probe-";
/// Age after which a dead probe's cgroup directory counts as stale.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: u64 = 0xAE00;
/// `_IO(KVMIO, 0x01)`.
const KVM_CREATE_VM: u64 = 0xAE01;
/// The only KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;

/// One checked host capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capability {
    /// Stable key, one of [`KEYS`].
    pub name: &'static str,
    /// The check succeeded on this host, just now.
    pub ok: bool,
    /// Why, on one line: what was found, or what failed and how.
    pub detail: String,
}

impl Capability {
    fn new(name: &'static str, ok: bool, detail: impl Into<String>) -> Self {
        Capability {
            name,
            ok,
            detail: one_line(&detail.into()),
        }
    }
}

/// The cgroup layout found in `/proc/self/mountinfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// Only v1 (`cgroup`) hierarchies.
    V1,
    /// Only the unified v2 (`cgroup2`) hierarchy.
    V2,
    /// v1 hierarchies plus a v2 mount (systemd's `/sys/fs/cgroup/unified`).
    Hybrid,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
            CgroupVersion::Hybrid => "hybrid",
        })
    }
}

/// How the vm and microvm tiers would run guests here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization: a probe boot under KVM succeeded.
    Kvm,
    /// qemu's software emulator.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Whether one isolation tier can run on this host, and why (not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TierStatus {
    pub tier: Isolation,
    pub ok: bool,
    /// For vm and microvm when `ok`: the accelerator guests would get.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    /// The first capability key this tier lacks, when not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<&'static str>,
    pub detail: String,
}

/// What [`probe`] found. Serializes as `{capabilities, tiers, ...}`.
#[derive(Debug, Clone)]
pub struct HostReport {
    /// One row per key of [`KEYS`], in that order.
    pub capabilities: Vec<Capability>,
    /// The cgroup layout, when any cgroup filesystem is mounted.
    pub cgroup_version: Option<CgroupVersion>,
    /// `qemu-system-x86_64`, when found on `PATH`.
    pub qemu_system: Option<PathBuf>,
    /// `qemu-system-x86_64 -machine help` lists `microvm`.
    pub qemu_microvm: bool,
    /// Wall time the probe took.
    pub elapsed: Duration,
}

impl HostReport {
    /// The row for `name`, if it is a key this report has.
    pub fn get(&self, name: &str) -> Option<&Capability> {
        self.capabilities.iter().find(|c| c.name == name)
    }

    /// `name` was checked and is usable. Unknown keys are not ok.
    pub fn is_ok(&self, name: &str) -> bool {
        self.get(name).is_some_and(|c| c.ok)
    }

    fn detail(&self, name: &str) -> &str {
        self.get(name).map_or("not checked", |c| c.detail.as_str())
    }

    /// Which tiers this host can run, weakest first.
    pub fn tiers(&self) -> Vec<TierStatus> {
        Isolation::ALL.iter().map(|&t| self.tier(t)).collect()
    }

    /// Whether `tier` can run here; when not, the first missing capability.
    pub fn tier(&self, tier: Isolation) -> TierStatus {
        let lacking = |keys: &[&'static str]| keys.iter().copied().find(|k| !self.is_ok(k));
        let (ok, accel, missing, detail) = match tier {
            Isolation::Process => {
                match lacking(&[
                    "root",
                    "namespaces",
                    "userns",
                    "cgroup",
                    "cgroup.cpu",
                    "cgroup.memory",
                    "cgroup.pids",
                ]) {
                    None => (
                        true,
                        None,
                        None,
                        format!(
                            "root, namespaces, user namespaces, cgroup {} with cpu/memory/pids limits",
                            self.cgroup_version
                                .map_or_else(|| "?".to_string(), |v| v.to_string())
                        ),
                    ),
                    Some(k) => (false, None, Some(k), format!("{k}: {}", self.detail(k))),
                }
            }
            Isolation::Container => {
                if self.is_ok("docker") {
                    (true, None, None, self.detail("docker").to_string())
                } else {
                    (
                        false,
                        None,
                        Some("docker"),
                        format!("docker: {}", self.detail("docker")),
                    )
                }
            }
            Isolation::Vm | Isolation::Microvm => match &self.qemu_system {
                None => (
                    false,
                    None,
                    Some("qemu"),
                    "qemu: qemu-system-x86_64 not found on PATH".to_string(),
                ),
                Some(_) if tier == Isolation::Microvm && !self.qemu_microvm => (
                    false,
                    None,
                    Some("qemu"),
                    "qemu: qemu-system-x86_64 does not offer the microvm machine".to_string(),
                ),
                // Never a VM without its seccomp sandbox.
                Some(_) if !self.is_ok("qemu.sandbox") => (
                    false,
                    None,
                    Some("qemu.sandbox"),
                    format!("qemu.sandbox: {}", self.detail("qemu.sandbox")),
                ),
                Some(q) => {
                    let (accel, why) = if self.is_ok("kvm") {
                        (Accel::Kvm, "a probe boot under KVM succeeded".to_string())
                    } else {
                        (Accel::Tcg, format!("kvm: {}", self.detail("kvm")))
                    };
                    let machine = if tier == Isolation::Microvm {
                        "-M microvm"
                    } else {
                        "q35"
                    };
                    (
                        true,
                        Some(accel),
                        None,
                        format!("{} {machine}, accel {accel} ({why})", q.display()),
                    )
                }
            },
        };
        TierStatus {
            tier,
            ok,
            accel,
            missing,
            detail: one_line(&detail),
        }
    }

    /// `Ok` with the tier's status when `tier` can run here, else the
    /// [`BackendError::MissingCapability`] the CLI maps to exit code 4.
    pub fn require(&self, tier: Isolation) -> Result<TierStatus, BackendError> {
        let status = self.tier(tier);
        if status.ok {
            return Ok(status);
        }
        let capability = status.missing.unwrap_or("unknown");
        Err(BackendError::MissingCapability {
            capability: capability.to_string(),
            detail: format!(
                "the {tier} tier needs it: {}",
                self.get(capability)
                    .map_or(status.detail.as_str(), |c| c.detail.as_str())
            ),
        })
    }
}

impl Serialize for HostReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            capabilities: &'a [Capability],
            tiers: Vec<TierStatus>,
            cgroup_version: Option<CgroupVersion>,
            elapsed_ms: u128,
        }
        Wire {
            capabilities: &self.capabilities,
            tiers: self.tiers(),
            cgroup_version: self.cgroup_version,
            elapsed_ms: self.elapsed.as_millis(),
        }
        .serialize(s)
    }
}

impl fmt::Display for HostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .capabilities
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(0);
        for c in &self.capabilities {
            let yes = if c.ok { "yes" } else { "no" };
            writeln!(f, "{yes:<3}  {:<width$}  {}", c.name, c.detail)?;
        }
        writeln!(f)?;
        writeln!(f, "tiers:")?;
        for t in self.tiers() {
            let yes = if t.ok { "yes" } else { "no" };
            writeln!(f, "{yes:<3}  {:<9}  {}", t.tier.as_str(), t.detail)?;
        }
        Ok(())
    }
}

/// What [`probe`] may do beyond the quick checks.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Boot a probe VM under KVM (takes seconds). Without it `kvm` is never
    /// ok: `/dev/kvm` answering ioctls does not mean guests boot on it.
    pub kvm_boot: bool,
    /// Docker socket; `None` means `DOCKER_HOST` (`unix://` only) or
    /// `/var/run/docker.sock`.
    pub docker_socket: Option<PathBuf>,
    /// Guest kernel for the probe boot; `None` means `CELLHOST_PROBE_KERNEL`,
    /// `/var/lib/cellhost/images/kernel`, then the newest `/boot/vmlinuz-*`.
    pub probe_kernel: Option<PathBuf>,
    /// Longest the probe boot may take before it counts as failed.
    pub kvm_boot_deadline: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            kvm_boot: false,
            docker_socket: None,
            probe_kernel: None,
            kvm_boot_deadline: Duration::from_secs(20),
        }
    }
}

/// Check every capability in [`KEYS`] on this host.
///
/// Independent checks run on scoped threads; each is bounded by its own
/// deadline, so the whole probe takes well under a few seconds (plus up to
/// [`ProbeOptions::kvm_boot_deadline`] when `kvm_boot` is set).
pub fn probe(opts: &ProbeOptions) -> HostReport {
    let started = Instant::now();
    let (qemu_facts, docker, cryptsetup, nftables, namespaces, userns, cgroup) =
        thread::scope(|s| {
            let qemu = s.spawn(check_qemu);
            let docker = s.spawn(|| check_docker(opts));
            let cryptsetup = s.spawn(check_cryptsetup);
            let nftables = s.spawn(check_nftables);
            let namespaces = s.spawn(check_namespaces);
            let userns = s.spawn(check_userns);
            let cgroup = check_cgroups();
            (
                qemu.join().unwrap_or_else(|_| QemuFacts::failed()),
                docker.join().unwrap_or_else(|_| {
                    DOCKER_KEYS
                        .iter()
                        .map(|k| Capability::new(k, false, "the check panicked"))
                        .collect()
                }),
                join_cap(cryptsetup, "cryptsetup"),
                join_cap(nftables, "nftables"),
                join_cap(namespaces, "namespaces"),
                join_cap(userns, "userns"),
                cgroup,
            )
        });
    // The KVM boot needs qemu's answer, so it runs after the others.
    let kvm = check_kvm(opts, qemu_facts.system.as_deref());

    let mut capabilities = vec![check_root(), namespaces, userns];
    capabilities.extend(cgroup.caps);
    capabilities.push(kvm);
    capabilities.push(qemu_facts.cap.clone());
    capabilities.push(qemu_facts.sandbox.clone());
    capabilities.extend(docker);
    capabilities.extend([
        cryptsetup,
        check_device_mapper(),
        check_fuse(),
        check_loop(),
        check_tun(),
        check_vsock(),
        nftables,
    ]);
    HostReport {
        capabilities,
        cgroup_version: cgroup.version,
        qemu_system: qemu_facts.system,
        qemu_microvm: qemu_facts.microvm,
        elapsed: started.elapsed(),
    }
}

fn join_cap(h: thread::ScopedJoinHandle<'_, Capability>, name: &'static str) -> Capability {
    h.join()
        .unwrap_or_else(|_| Capability::new(name, false, "the check panicked"))
}

// ---------------------------------------------------------------------------
// root, device nodes

fn check_root() -> Capability {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Capability::new("root", true, "effective uid 0")
    } else {
        Capability::new(
            "root",
            false,
            format!("effective uid {euid}; the process tier needs root"),
        )
    }
}

fn check_device_mapper() -> Capability {
    let control = Path::new("/dev/mapper/control");
    let listed = ["/proc/misc", "/proc/devices"].into_iter().find(|p| {
        fs::read_to_string(p).is_ok_and(|t| {
            t.lines()
                .any(|l| l.split_whitespace().nth(1) == Some("device-mapper"))
        })
    });
    let (ok, detail) = match (control.exists(), listed) {
        (true, Some(p)) => (true, format!("/dev/mapper/control exists, {p} lists device-mapper")),
        (true, None) => (
            false,
            "/dev/mapper/control exists but neither /proc/misc nor /proc/devices lists device-mapper".into(),
        ),
        (false, Some(p)) => (false, format!("{p} lists device-mapper but /dev/mapper/control is missing")),
        (false, None) => (
            false,
            "no /dev/mapper/control and the kernel lists no device-mapper (dm-crypt volumes cannot open)".into(),
        ),
    };
    Capability::new("device-mapper", ok, detail)
}

fn check_fuse() -> Capability {
    let path = Path::new("/dev/fuse");
    if !path.exists() {
        return Capability::new("fuse", false, "/dev/fuse does not exist");
    }
    match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Capability::new("fuse", true, "/dev/fuse exists and opens read-write"),
        Err(e) => Capability::new(
            "fuse",
            false,
            format!("/dev/fuse exists but open fails: {e}"),
        ),
    }
}

fn check_loop() -> Capability {
    node_exists("loop", "/dev/loop-control")
}

fn check_tun() -> Capability {
    node_exists("tun", "/dev/net/tun")
}

fn node_exists(name: &'static str, path: &str) -> Capability {
    match fs::metadata(path) {
        Ok(_) => Capability::new(name, true, format!("{path} exists")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Capability::new(name, false, format!("{path} does not exist"))
        }
        Err(e) => Capability::new(name, false, format!("{path}: {e}")),
    }
}

fn check_vsock() -> Capability {
    let vhost = Path::new("/dev/vhost-vsock").exists();
    let guest = Path::new("/dev/vsock").exists();
    // SAFETY: socket() takes no pointers; a returned fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    let socket = if fd >= 0 {
        // SAFETY: fd is a fresh descriptor nothing else owns.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    let detail = format!(
        "/dev/vhost-vsock (host side, for guests): {}; AF_VSOCK socket: {}; /dev/vsock (guest side): {}",
        if vhost { "present" } else { "missing" },
        match &socket {
            Ok(()) => "creates".to_string(),
            Err(e) => format!("fails ({e})"),
        },
        if guest { "present" } else { "missing" },
    );
    Capability::new("vsock", vhost && socket.is_ok(), detail)
}

// ---------------------------------------------------------------------------
// namespaces

const NS_KINDS: [(&str, &str); 6] = [
    ("user", "user"),
    ("pid", "pid"),
    ("mnt", "mount"),
    ("uts", "uts"),
    ("ipc", "ipc"),
    ("net", "net"),
];

const UNSHARE_FLAGS: [(libc::c_int, &str); 5] = [
    (libc::CLONE_NEWPID, "pid"),
    (libc::CLONE_NEWNS, "mount"),
    (libc::CLONE_NEWUTS, "uts"),
    (libc::CLONE_NEWIPC, "ipc"),
    (libc::CLONE_NEWNET, "net"),
];

fn check_namespaces() -> Capability {
    let missing: Vec<&str> = NS_KINDS
        .iter()
        .filter(|(file, _)| fs::symlink_metadata(Path::new("/proc/self/ns").join(file)).is_err())
        .map(|&(_, name)| name)
        .collect();
    let mut failed = Vec::new();
    for (flag, name) in UNSHARE_FLAGS {
        if let Err(e) = unshare_in_child(flag) {
            failed.push(format!("{name} ({e})"));
        }
    }
    let mut detail = if missing.is_empty() {
        "user, pid, mount, uts, ipc, net listed in /proc/self/ns".to_string()
    } else {
        format!("missing from /proc/self/ns: {}", missing.join(", "))
    };
    if failed.is_empty() {
        detail.push_str("; unshare(pid|mount|uts|ipc|net) works in a forked child");
    } else {
        detail.push_str(&format!(
            "; unshare failed in a forked child for: {}",
            failed.join(", ")
        ));
    }
    Capability::new(
        "namespaces",
        missing.is_empty() && failed.is_empty(),
        detail,
    )
}

/// User namespaces: process cells run in one of their own (their root is
/// an unprivileged host uid), so without them the process tier is not
/// offered.
fn check_userns() -> Capability {
    let max = fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    if max == Some(0) {
        return Capability::new(
            "userns",
            false,
            "user.max_user_namespaces is 0: user namespaces are off (sysctl user.max_user_namespaces)",
        );
    }
    match unshare_in_child(libc::CLONE_NEWUSER) {
        Ok(()) => Capability::new(
            "userns",
            true,
            format!(
                "unshare(user) works in a forked child; max_user_namespaces {}",
                max.map_or_else(|| "?".to_string(), |m| m.to_string())
            ),
        ),
        Err(e) => Capability::new("userns", false, format!("unshare(user) failed: {e}")),
    }
}

/// Why a forked unshare test did not pass.
#[derive(Debug, thiserror::Error)]
enum ForkTestError {
    #[error("fork: {0}")]
    Fork(io::Error),
    #[error("waitpid: {0}")]
    Wait(io::Error),
    #[error("{0}")]
    Unshare(io::Error),
    #[error("child killed by signal {0}")]
    Signaled(i32),
    #[error("child did not finish within {0:?}")]
    Timeout(Duration),
}

/// Fork a child that calls `unshare(flag)` and `_exit`s with 0 or the errno.
fn unshare_in_child(flag: libc::c_int) -> Result<(), ForkTestError> {
    // SAFETY: fork() in a possibly multi-threaded process: the child runs
    // only async-signal-safe code (unshare is a bare system call, errno is
    // read through the thread-local libc location, _exit ends it without
    // running atexit handlers or touching the heap, locks or stdio).
    let pid = unsafe { fork_unshare_exit(flag) };
    if pid < 0 {
        return Err(ForkTestError::Fork(io::Error::last_os_error()));
    }
    let deadline = Instant::now() + FORK_TIMEOUT;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: status is a valid out-pointer; pid is our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ForkTestError::Wait(e));
        }
        if r == pid {
            if libc::WIFEXITED(status) {
                return match libc::WEXITSTATUS(status) {
                    0 => Ok(()),
                    errno => Err(ForkTestError::Unshare(io::Error::from_raw_os_error(errno))),
                };
            }
            if libc::WIFSIGNALED(status) {
                return Err(ForkTestError::Signaled(libc::WTERMSIG(status)));
            }
            continue;
        }
        if Instant::now() >= deadline {
            // SAFETY: pid is our unreaped child, so it cannot name another
            // process; kill and a blocking waitpid reap it.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err(ForkTestError::Timeout(FORK_TIMEOUT));
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Returns the child's pid in the parent, or -1 (errno set).
///
/// # Safety
///
/// Forks the calling process. The child executes only `unshare`, reads
/// `errno` and calls `_exit`, all async-signal-safe, so it is sound even
/// when other threads held locks at the moment of the fork.
unsafe fn fork_unshare_exit(flag: libc::c_int) -> libc::pid_t {
    // SAFETY: see the function's contract above.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let code = if libc::unshare(flag) == 0 {
                0
            } else {
                // errno values fit in a byte; 0 would read as success.
                let e = *libc::__errno_location();
                if (1..=255).contains(&e) { e } else { 255 }
            };
            libc::_exit(code);
        }
        pid
    }
}

// ---------------------------------------------------------------------------
// cgroups

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    mount_point: PathBuf,
    v2: bool,
    controllers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct CgroupLayout {
    version: Option<CgroupVersion>,
    v1: Vec<Hierarchy>,
    v2: Vec<Hierarchy>,
}

/// v1 controller names the kernel knows (first column of `/proc/cgroups`),
/// or the usual set when that file is missing.
fn known_v1_controllers() -> BTreeSet<String> {
    let from_proc: BTreeSet<String> = fs::read_to_string("/proc/cgroups")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    if !from_proc.is_empty() {
        return from_proc;
    }
    cellhost_os::mountinfo::V1_CONTROLLERS
        .iter()
        .map(|c| c.to_string())
        .collect()
}

/// Work out the cgroup layout from parsed mountinfo. v2 controllers come
/// from `read_controllers(mount_point)` (the file `cgroup.controllers`).
fn cgroup_layout(
    mounts: &[MountEntry],
    known_v1: &BTreeSet<String>,
    read_controllers: impl Fn(&Path) -> Vec<String>,
) -> CgroupLayout {
    let mut layout = CgroupLayout::default();
    let mut seen_v1: BTreeSet<Vec<String>> = BTreeSet::new();
    for m in mounts {
        match m.fs_type.as_str() {
            "cgroup" => {
                let mut controllers: Vec<String> = m
                    .super_options
                    .split(',')
                    .filter(|o| known_v1.contains(*o))
                    .map(str::to_string)
                    .collect();
                if let Some(name) = m
                    .super_options
                    .split(',')
                    .find_map(|o| o.strip_prefix("name="))
                {
                    controllers.push(format!("name={name}"));
                }
                // The same hierarchy mounted twice (bind mounts, nested
                // containers): keep the first.
                if seen_v1.insert(controllers.clone()) {
                    layout.v1.push(Hierarchy {
                        mount_point: m.mount_point.clone(),
                        v2: false,
                        controllers,
                    });
                }
            }
            // There is one v2 hierarchy; further mounts of it are views of
            // the same tree: keep the first.
            "cgroup2" if layout.v2.is_empty() => {
                layout.v2.push(Hierarchy {
                    mount_point: m.mount_point.clone(),
                    v2: true,
                    controllers: read_controllers(&m.mount_point),
                });
            }
            _ => {}
        }
    }
    layout.version = match (layout.v1.is_empty(), layout.v2.is_empty()) {
        (true, true) => None,
        (false, true) => Some(CgroupVersion::V1),
        (true, false) => Some(CgroupVersion::V2),
        (false, false) => Some(CgroupVersion::Hybrid),
    };
    layout
}

fn read_v2_controllers(mount_point: &Path) -> Vec<String> {
    fs::read_to_string(mount_point.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

impl CgroupLayout {
    /// The hierarchy that carries `controller`: a v1 hierarchy first (in
    /// hybrid mode v1 owns it), else the v2 one that lists it.
    fn hierarchy_for(&self, controller: &str) -> Option<&Hierarchy> {
        self.v1
            .iter()
            .chain(self.v2.iter())
            .find(|h| h.controllers.iter().any(|c| c == controller))
    }

    fn summary(&self) -> String {
        let list = |hs: &[Hierarchy]| {
            hs.iter()
                .map(|h| {
                    let c = if h.controllers.is_empty() {
                        "no controllers".to_string()
                    } else {
                        h.controllers.join(" ")
                    };
                    if h.v2 {
                        format!("{} [{c}]", h.mount_point.display())
                    } else {
                        c
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.version {
            None => "no cgroup filesystem mounted".to_string(),
            Some(CgroupVersion::V1) => format!("v1: {}", list(&self.v1)),
            Some(CgroupVersion::V2) => format!("v2: {}", list(&self.v2)),
            Some(CgroupVersion::Hybrid) => {
                format!("hybrid: v1 {}; v2 {}", list(&self.v1), list(&self.v2))
            }
        }
    }
}

struct CgroupCheck {
    version: Option<CgroupVersion>,
    /// `cgroup`, `cgroup.cpu`, `cgroup.memory`, `cgroup.pids`.
    caps: Vec<Capability>,
}

/// The limit a probe child cgroup gets written, per controller and version.
fn limit_file(controller: &str, v2: bool) -> Option<(&'static str, &'static str)> {
    Some(match (controller, v2) {
        ("cpu", false) => ("cpu.cfs_quota_us", "50000"),
        ("cpu", true) => ("cpu.max", "50000 100000"),
        ("memory", false) => ("memory.limit_in_bytes", "67108864"),
        ("memory", true) => ("memory.max", "67108864"),
        ("pids", _) => ("pids.max", "64"),
        _ => return None,
    })
}

static PROBE_SEQ: AtomicU64 = AtomicU64::new(0);

/// Why a probe child cgroup could not be made to enforce a limit.
#[derive(Debug, thiserror::Error)]
enum CgroupProbeError {
    #[error("mkdir {path}: {source}")]
    Mkdir { path: String, source: io::Error },
    #[error("write {file}: {source}")]
    Write { file: String, source: io::Error },
    #[error("{controller} not enabled in {path}/cgroup.subtree_control")]
    NotDelegated { controller: String, path: String },
    #[error("rmdir {path}: {source} (probe cgroup LEFT BEHIND)")]
    Rmdir { path: String, source: io::Error },
}

/// Make `<base>/cellhost-probe-<pid>-<n>`, write a limit, remove it.
fn try_child_cgroup(h: &Hierarchy, controller: &str) -> Result<String, CgroupProbeError> {
    let name = format!(
        "{PROBE_CGROUP_PREFIX}{}-{}",
        std::process::id(),
        PROBE_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let dir = h.mount_point.join(&name);
    fs::create_dir(&dir).map_err(|source| CgroupProbeError::Mkdir {
        path: dir.display().to_string(),
        source,
    })?;
    let wrote = match limit_file(controller, h.v2) {
        None => Ok(String::new()),
        Some((file, value)) => {
            let path = dir.join(file);
            if h.v2 && !path.exists() {
                Err(CgroupProbeError::NotDelegated {
                    controller: controller.to_string(),
                    path: h.mount_point.display().to_string(),
                })
            } else {
                fs::write(&path, value)
                    .map(|()| format!("{file}={value}"))
                    .map_err(|source| CgroupProbeError::Write {
                        file: path.display().to_string(),
                        source,
                    })
            }
        }
    };
    remove_cgroup_dir(&dir)?;
    wrote
}

/// rmdir a cgroup directory, retrying briefly while the kernel still calls
/// it busy. "Already gone" is success.
fn remove_cgroup_dir(dir: &Path) -> Result<(), CgroupProbeError> {
    let mut tries = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 20 => {
                tries += 1;
                thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(CgroupProbeError::Rmdir {
                    path: dir.display().to_string(),
                    source,
                });
            }
        }
    }
}

/// Remove probe cgroups a killed probe left: pid gone, older than a minute.
fn remove_stale_probe_cgroups(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PROBE_CGROUP_PREFIX))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old {
            let _ = fs::remove_dir(entry.path());
        }
    }
}

fn check_cgroups() -> CgroupCheck {
    let mountinfo = match fs::read_to_string("/proc/self/mountinfo") {
        Ok(t) => t,
        Err(e) => {
            let why = format!("cannot read /proc/self/mountinfo: {e}");
            return CgroupCheck {
                version: None,
                caps: vec![
                    Capability::new("cgroup", false, &why),
                    Capability::new("cgroup.cpu", false, &why),
                    Capability::new("cgroup.memory", false, &why),
                    Capability::new("cgroup.pids", false, &why),
                ],
            };
        }
    };
    let layout = cgroup_layout(
        &cellhost_os::mountinfo::parse(&mountinfo),
        &known_v1_controllers(),
        read_v2_controllers,
    );
    let mut per = Vec::new();
    let mut brief = Vec::new();
    for (key, controller) in [
        ("cgroup.cpu", "cpu"),
        ("cgroup.memory", "memory"),
        ("cgroup.pids", "pids"),
    ] {
        let cap = match layout.hierarchy_for(controller) {
            None => Capability::new(
                key,
                false,
                format!("no mounted cgroup hierarchy offers the {controller} controller"),
            ),
            Some(h) => {
                remove_stale_probe_cgroups(&h.mount_point);
                match try_child_cgroup(h, controller) {
                    Ok(wrote) => Capability::new(
                        key,
                        true,
                        format!(
                            "child cgroup under {} created, {wrote} written, removed",
                            h.mount_point.display()
                        ),
                    ),
                    Err(e) => Capability::new(
                        key,
                        false,
                        format!("cannot enforce a {controller} limit: {e}"),
                    ),
                }
            }
        };
        brief.push(format!("{controller} {}", if cap.ok { "ok" } else { "NO" }));
        per.push(cap);
    }
    let all = per.iter().all(|c| c.ok);
    let detail = format!("{}; child cgroups: {}", layout.summary(), brief.join(", "));
    let mut caps = vec![Capability::new(
        "cgroup",
        layout.version.is_some() && all,
        detail,
    )];
    caps.extend(per);
    CgroupCheck {
        version: layout.version,
        caps,
    }
}

// ---------------------------------------------------------------------------
// subprocesses

/// Why a subprocess could not be run (a non-zero exit is not an error here).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    #[error("{program}: cannot start: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("{program}: cannot wait: {source}")]
    Wait { program: String, source: io::Error },
}

/// What a finished (or killed) subprocess left.
#[derive(Debug)]
pub(crate) struct RunOutput {
    /// The child's pid (also its process group id) while it ran.
    #[cfg_attr(not(test), allow(dead_code))]
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Killed because the deadline passed.
    pub timed_out: bool,
    /// Killed because `stop_when` matched its stdout.
    pub stopped: bool,
}

impl RunOutput {
    fn success(&self) -> bool {
        !self.timed_out && !self.stopped && self.status.success()
    }

    fn first_line(&self) -> String {
        let out = String::from_utf8_lossy(&self.stdout);
        out.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_string()
    }

    /// Why it failed, on one line.
    fn failure(&self, timeout: Duration) -> String {
        if self.timed_out {
            return format!("no answer within {timeout:?}");
        }
        let err = String::from_utf8_lossy(&self.stderr);
        let last = err.lines().map(str::trim).rfind(|l| !l.is_empty());
        match last {
            Some(l) => format!("{} ({l})", self.status),
            None => self.status.to_string(),
        }
    }
}

/// Run `program args` with an empty environment plus `PATH`, stdin from
/// /dev/null and stdout/stderr captured; kill it when `timeout` passes.
pub(crate) fn run_with_timeout(
    program: &Path,
    args: &[&OsStr],
    timeout: Duration,
) -> Result<RunOutput, RunError> {
    run_until(program, args, timeout, |_| false)
}

/// [`run_with_timeout`], also ending the child as soon as `stop_when`
/// returns true for the stdout captured so far.
///
/// The child leads its own process group; once it has exited (or is to be
/// killed) the whole group gets SIGKILL, so nothing it started survives.
pub(crate) fn run_until(
    program: &Path,
    args: &[&OsStr],
    timeout: Duration,
    stop_when: impl Fn(&[u8]) -> bool,
) -> Result<RunOutput, RunError> {
    let prog = program.display().to_string();
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", search_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| RunError::Spawn {
            program: prog.clone(),
            source,
        })?;
    let pid = child.id();
    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        child
            .stdout
            .take()
            .map(|s| spawn_reader(s, Arc::clone(&out))),
        child
            .stderr
            .take()
            .map(|s| spawn_reader(s, Arc::clone(&err))),
    ];

    let deadline = Instant::now() + timeout;
    let (mut timed_out, mut stopped) = (false, false);
    loop {
        match exited_nowait(pid) {
            Ok(true) => break,
            Ok(false) => {}
            Err(source) => {
                kill_group(pid);
                let _ = child.wait();
                return Err(RunError::Wait {
                    program: prog,
                    source,
                });
            }
        }
        if stop_when(&lock(&out)) {
            stopped = true;
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    // The child is alive or a zombie, so its pid (= its group id) still
    // names it: killing the group cannot hit an unrelated process.
    kill_group(pid);
    let status = child.wait().map_err(|source| RunError::Wait {
        program: prog,
        source,
    })?;
    // Readers end when the last holder of the pipes dies. A process that
    // left our group could hold them open; do not wait for it forever.
    let until = Instant::now() + Duration::from_millis(500);
    for r in readers.into_iter().flatten() {
        while !r.is_finished() && Instant::now() < until {
            thread::sleep(Duration::from_millis(5));
        }
        if r.is_finished() {
            let _ = r.join();
        }
    }
    let stdout = std::mem::take(&mut *lock(&out));
    let stderr = std::mem::take(&mut *lock(&err));
    Ok(RunOutput {
        pid,
        status,
        stdout,
        stderr,
        timed_out,
        stopped,
    })
}

fn lock(m: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn spawn_reader(
    mut src: impl Read + Send + 'static,
    dst: Arc<Mutex<Vec<u8>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut d = lock(&dst);
                    let room = MAX_CAPTURE.saturating_sub(d.len());
                    d.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

/// The child has exited (and is left unreaped as a zombie).
fn exited_nowait(pid: u32) -> io::Result<bool> {
    let id: libc::id_t = pid;
    loop {
        // SAFETY: all-zero is a valid siginfo_t; waitid writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: info is a valid out-pointer; WNOWAIT leaves the child
        // unreaped so std's Child::wait can still collect its status.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                id,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r == 0 {
            // SAFETY: waitid filled info (or left it zeroed: no child ready).
            return Ok(unsafe { info.si_pid() } != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn kill_group(pid: u32) {
    if let Ok(pgid) = libc::pid_t::try_from(pid) {
        // SAFETY: killpg takes no pointers; the group is the child's own
        // (process_group(0)) and the child is not yet reaped.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

/// Directories searched for binaries and given to children as `PATH`: ours,
/// plus the standard ones (sbin included: nft and cryptsetup live there).
fn search_path() -> String {
    let mut dirs: Vec<String> = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| d.starts_with('/'))
        .map(str::to_string)
        .collect();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_string());
        }
    }
    dirs.join(":")
}

/// The first executable regular file `name` on `PATH` or in the standard
/// sbin/bin dirs (where root's tools live even when `PATH` lacks them).
pub fn which(name: &str) -> Option<PathBuf> {
    search_path()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// `X.Y.Z` from `... version X.Y.Z ...`, else the whole line.
fn version_of(line: &str) -> String {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w.eq_ignore_ascii_case("version")
            && let Some(v) = words.next()
        {
            return v.trim_end_matches(',').to_string();
        }
    }
    line.to_string()
}

// ---------------------------------------------------------------------------
// binaries: cryptsetup, qemu, nft

fn check_cryptsetup() -> Capability {
    let Some(bin) = which("cryptsetup") else {
        return Capability::new("cryptsetup", false, "cryptsetup not found on PATH");
    };
    match run_with_timeout(&bin, &[OsStr::new("--version")], CMD_TIMEOUT) {
        Ok(o) if o.success() => Capability::new(
            "cryptsetup",
            true,
            format!("{} ({})", o.first_line(), bin.display()),
        ),
        Ok(o) => Capability::new(
            "cryptsetup",
            false,
            format!("{} --version: {}", bin.display(), o.failure(CMD_TIMEOUT)),
        ),
        Err(e) => Capability::new("cryptsetup", false, e.to_string()),
    }
}

struct QemuFacts {
    cap: Capability,
    /// `qemu.sandbox`: qemu runs under [`QEMU_SANDBOX`].
    sandbox: Capability,
    system: Option<PathBuf>,
    microvm: bool,
}

impl QemuFacts {
    fn failed() -> Self {
        QemuFacts {
            cap: Capability::new("qemu", false, "the check panicked"),
            sandbox: Capability::new("qemu.sandbox", false, "the check panicked"),
            system: None,
            microvm: false,
        }
    }
}

/// Does `qemu` run under [`QEMU_SANDBOX`]? It is started with no machine
/// and QMP on stdout: qemu installs its seccomp filter while it starts,
/// before the monitor greets, and exits if it cannot (a build without
/// seccomp refuses `-sandbox` outright). A greeting means the filter is in
/// place; the child is then killed.
fn check_qemu_sandbox(qemu: &Path) -> Capability {
    let args: Vec<&OsStr> = [
        "-sandbox",
        QEMU_SANDBOX,
        "-machine",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-qmp",
        "stdio",
    ]
    .into_iter()
    .map(OsStr::new)
    .collect();
    let greeted = |out: &[u8]| out.windows(6).any(|w| w == b"\"QMP\":");
    match run_until(qemu, &args, CMD_TIMEOUT, greeted) {
        Ok(o) if o.stopped => Capability::new(
            "qemu.sandbox",
            true,
            format!("qemu starts under -sandbox {QEMU_SANDBOX}"),
        ),
        Ok(o) => Capability::new(
            "qemu.sandbox",
            false,
            format!(
                "qemu -sandbox {QEMU_SANDBOX}: {} (VM cells never run without it)",
                o.failure(CMD_TIMEOUT)
            ),
        ),
        Err(e) => Capability::new("qemu.sandbox", false, e.to_string()),
    }
}

fn check_qemu() -> QemuFacts {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    let mut system = None;
    for name in ["qemu-system-x86_64", "qemu-img", "qemu-storage-daemon"] {
        let Some(bin) = which(name) else {
            missing.push(format!("{name} not found"));
            continue;
        };
        match run_with_timeout(&bin, &[OsStr::new("--version")], CMD_TIMEOUT) {
            Ok(o) if o.success() => {
                found.push(format!("{name} {}", version_of(&o.first_line())));
                if name == "qemu-system-x86_64" {
                    system = Some(bin);
                }
            }
            Ok(o) => missing.push(format!("{name} --version: {}", o.failure(CMD_TIMEOUT))),
            Err(e) => missing.push(e.to_string()),
        }
    }
    let microvm = system.as_deref().is_some_and(|q| {
        run_with_timeout(
            q,
            &[OsStr::new("-machine"), OsStr::new("help")],
            CMD_TIMEOUT,
        )
        .is_ok_and(|o| {
            o.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some("microvm"))
        })
    });
    let mut detail = found.join(", ");
    if system.is_some() {
        detail.push_str(if microvm {
            " (microvm machine available)"
        } else {
            " (no microvm machine)"
        });
    }
    if !missing.is_empty() {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str(&missing.join(", "));
    }
    let sandbox = match &system {
        Some(q) => check_qemu_sandbox(q),
        None => Capability::new("qemu.sandbox", false, "qemu-system-x86_64 not found"),
    };
    QemuFacts {
        cap: Capability::new("qemu", missing.is_empty(), detail),
        sandbox,
        system,
        microvm,
    }
}

fn check_nftables() -> Capability {
    let module = if fs::read_to_string("/proc/modules").is_ok_and(|t| {
        t.lines()
            .any(|l| l.split_whitespace().next() == Some("nf_tables"))
    }) {
        Some("nf_tables in /proc/modules")
    } else if Path::new("/sys/module/nf_tables").exists() {
        Some("/sys/module/nf_tables exists")
    } else {
        None
    };
    let nft = match which("nft") {
        None => Err("nft not found on PATH".to_string()),
        Some(bin) => match run_with_timeout(
            &bin,
            &[OsStr::new("list"), OsStr::new("tables")],
            CMD_TIMEOUT,
        ) {
            Ok(o) if o.success() => Ok(format!("{} list tables runs", bin.display())),
            Ok(o) => Err(format!(
                "{} list tables: {}",
                bin.display(),
                o.failure(CMD_TIMEOUT)
            )),
            Err(e) => Err(e.to_string()),
        },
    };
    match (nft, module) {
        (Ok(n), Some(m)) => Capability::new("nftables", true, format!("{n}; {m}")),
        (Ok(n), None) => Capability::new("nftables", true, n),
        (Err(n), Some(m)) => Capability::new("nftables", true, format!("{m}; {n}")),
        (Err(n), None) => Capability::new(
            "nftables",
            false,
            format!("{n}; nf_tables neither in /proc/modules nor /sys/module"),
        ),
    }
}

// ---------------------------------------------------------------------------
// docker

/// The unix socket to probe: the option, else `DOCKER_HOST`, else default.
fn docker_socket(opts: &ProbeOptions) -> Result<PathBuf, String> {
    if let Some(p) = &opts.docker_socket {
        return Ok(p.clone());
    }
    match std::env::var("DOCKER_HOST") {
        Ok(h) if !h.is_empty() => match h.strip_prefix("unix://") {
            Some(p) => Ok(PathBuf::from(p)),
            None => Err(format!(
                "DOCKER_HOST={h} is not a unix:// socket; only unix sockets are probed"
            )),
        },
        _ => Ok(PathBuf::from("/var/run/docker.sock")),
    }
}

/// The rows the docker check gives, in [`KEYS`] order.
const DOCKER_KEYS: [&str; 3] = ["docker", "docker.userns", "docker.storage-opt"];

/// `docker`, then what `GET /info` says: `docker.userns` (is the engine
/// run with `--userns-remap`?) and `docker.storage-opt` (does it enforce a
/// container's `storage_opt size`, the container tier's first way to
/// enforce `diskGiB`?).
fn check_docker(opts: &ProbeOptions) -> Vec<Capability> {
    let path = match docker_socket(opts) {
        Ok(p) => p,
        Err(why) => return docker_unchecked(Capability::new("docker", false, why)),
    };
    let engine = probe_docker(&path);
    if !engine.ok {
        return docker_unchecked(engine);
    }
    let info = http_get(&path, "GET /info HTTP/1.0\r\n\r\n").and_then(|(status, body)| {
        if !status_ok(&status) {
            return Err(DockerError::Status {
                path: path.display().to_string(),
                what: "/info",
                status,
            });
        }
        serde_json::from_str::<serde_json::Value>(&body).map_err(|e| DockerError::Body {
            path: path.display().to_string(),
            why: format!("GET /info: not JSON: {e}"),
        })
    });
    match info {
        Ok(info) => {
            let mounts = cellhost_os::mountinfo::read_self().unwrap_or_default();
            vec![
                engine,
                docker_userns(&info),
                docker_storage_opt(&info, &mounts),
            ]
        }
        Err(e) => vec![
            engine,
            Capability::new("docker.userns", false, e.to_string()),
            Capability::new("docker.storage-opt", false, e.to_string()),
        ],
    }
}

/// The engine row and the two `/info` rows as not checked.
fn docker_unchecked(engine: Capability) -> Vec<Capability> {
    let why = format!("not checked: {}", engine.detail);
    vec![
        engine,
        Capability::new("docker.userns", false, why.clone()),
        Capability::new("docker.storage-opt", false, why),
    ]
}

/// `SecurityOptions` holds `name=userns` when dockerd runs with
/// `--userns-remap`.
fn docker_userns(info: &serde_json::Value) -> Capability {
    let on = info["SecurityOptions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_str())
        .any(|o| o.split(',').any(|kv| kv == "name=userns"));
    if on {
        Capability::new(
            "docker.userns",
            true,
            "dockerd runs with --userns-remap: a container's root is an unprivileged host uid",
        )
    } else {
        Capability::new(
            "docker.userns",
            false,
            "dockerd runs without --userns-remap: a container's root is the host's uid 0 (confined by namespaces, capabilities, seccomp)",
        )
    }
}

/// Whether the engine's storage driver enforces `storage_opt size`:
/// zfs and devicemapper do, btrfs not reliably; overlay2 only on xfs mounted with
/// `prjquota` (looked up in this process's mount table for the engine's
/// data root, so a local engine). Otherwise the container tier enforces
/// `diskGiB` with a read-only root and a per-cell ext4 (scratch).
fn docker_storage_opt(info: &serde_json::Value, mounts: &[MountEntry]) -> Capability {
    let scratch = "diskGiB is a read-only root plus a per-cell ext4 (scratch)";
    let driver = info["Driver"].as_str().unwrap_or("");
    let status = |key: &str| {
        info["DriverStatus"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|pair| pair.as_array())
            .find(|pair| pair.first().and_then(|k| k.as_str()) == Some(key))
            .and_then(|pair| pair.get(1)?.as_str())
            .map(str::to_string)
    };
    let (ok, detail) = match driver {
        // Its qgroups stop enforcing every limit, running containers'
        // too, whenever the kernel marks their accounting inconsistent
        // (seen in ordinary operation here): see cellhost-docker's disk.
        "btrfs" => (
            false,
            format!(
                "storage driver btrfs: its qgroups stop enforcing limits whenever their accounting turns inconsistent, so {scratch}"
            ),
        ),
        "zfs" | "devicemapper" => (
            true,
            format!(
                "storage driver {driver} enforces storage_opt size: diskGiB caps the writable layer"
            ),
        ),
        "overlay2" => {
            let backing = status("Backing Filesystem").unwrap_or_else(|| "?".into());
            let root = info["DockerRootDir"].as_str().unwrap_or("/var/lib/docker");
            let mount = cellhost_os::mountinfo::holding(mounts, Path::new(root));
            let prjquota = mount.is_some_and(|m| {
                m.fs_type == "xfs"
                    && m.super_options
                        .split(',')
                        .any(|o| o == "prjquota" || o == "pquota")
            });
            if backing == "xfs" && prjquota {
                (
                    true,
                    format!(
                        "overlay2 on xfs with prjquota ({root}): diskGiB caps the writable layer"
                    ),
                )
            } else if backing == "xfs" {
                (
                    false,
                    format!("overlay2 on xfs without prjquota ({root}): {scratch}"),
                )
            } else {
                (
                    false,
                    format!("overlay2 on {backing}, not xfs with prjquota: {scratch}"),
                )
            }
        }
        "" => (
            false,
            format!("the engine names no storage driver: {scratch}"),
        ),
        other => (
            false,
            format!("storage driver {other} does not enforce storage_opt size: {scratch}"),
        ),
    };
    Capability::new("docker.storage-opt", ok, detail)
}

#[derive(Debug, thiserror::Error)]
enum DockerError {
    #[error("no socket at {0}")]
    NoSocket(String),
    #[error("{0} refuses connections (dockerd not running?)")]
    Refused(String),
    #[error("{0}: no answer within {1:?}")]
    Timeout(String, Duration),
    #[error("{0}: {1}")]
    Io(String, io::Error),
    #[error("{path}: GET {what} answered {status:?}")]
    Status {
        path: String,
        what: &'static str,
        status: String,
    },
    #[error("{path}: GET /version: {why}")]
    Body { path: String, why: String },
}

fn docker_io(path: &Path, e: io::Error) -> DockerError {
    let p = path.display().to_string();
    match e.kind() {
        io::ErrorKind::NotFound => DockerError::NoSocket(p),
        io::ErrorKind::ConnectionRefused => DockerError::Refused(p),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            DockerError::Timeout(p, DOCKER_TIMEOUT)
        }
        _ => DockerError::Io(p, e),
    }
}

fn probe_docker(path: &Path) -> Capability {
    match docker_version(path) {
        Ok((version, api)) => Capability::new(
            "docker",
            true,
            format!(
                "dockerd {version} (API {api}) answers at {}",
                path.display()
            ),
        ),
        Err(e) => Capability::new("docker", false, e.to_string()),
    }
}

/// `GET /_ping` then `GET /version`; the daemon's Version and ApiVersion.
fn docker_version(path: &Path) -> Result<(String, String), DockerError> {
    let p = || path.display().to_string();
    let (status, body) = http_get(path, "GET /_ping HTTP/1.0\r\n\r\n")?;
    if !status_ok(&status) || body.trim() != "OK" {
        return Err(DockerError::Status {
            path: p(),
            what: "/_ping",
            status,
        });
    }
    let (status, body) = http_get(path, "GET /version HTTP/1.0\r\n\r\n")?;
    if !status_ok(&status) {
        return Err(DockerError::Status {
            path: p(),
            what: "/version",
            status,
        });
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| DockerError::Body {
        path: p(),
        why: format!("not JSON: {e}"),
    })?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let version = field("Version").ok_or_else(|| DockerError::Body {
        path: p(),
        why: "no Version field".to_string(),
    })?;
    Ok((version, field("ApiVersion").unwrap_or_else(|| "?".into())))
}

fn status_ok(status_line: &str) -> bool {
    let mut w = status_line.split_whitespace();
    w.next().is_some_and(|h| h.starts_with("HTTP/")) && w.next() == Some("200")
}

/// Send one HTTP/1.0 request; return the status line and the body.
fn http_get(path: &Path, request: &str) -> Result<(String, String), DockerError> {
    let mut stream = connect_unix(path, DOCKER_TIMEOUT).map_err(|e| docker_io(path, e))?;
    let io_err = |e| docker_io(path, e);
    stream
        .set_read_timeout(Some(DOCKER_TIMEOUT))
        .map_err(io_err)?;
    stream
        .set_write_timeout(Some(DOCKER_TIMEOUT))
        .map_err(io_err)?;
    stream.write_all(request.as_bytes()).map_err(io_err)?;
    let mut raw = Vec::new();
    // HTTP/1.0: the server closes the connection after the response.
    stream
        .take(MAX_HTTP)
        .read_to_end(&mut raw)
        .map_err(io_err)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").trim().to_string();
    Ok((status, body.to_string()))
}

/// Connect a unix stream socket; the kernel gives up after `timeout` when
/// the listener's backlog is full (SO_SNDTIMEO bounds a blocking connect).
fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(1),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: tv outlives the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: addr is a valid sockaddr_un and len does not exceed it.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(UnixStream::from(fd));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

// ---------------------------------------------------------------------------
// kvm

/// What the ioctl part of the KVM check found.
#[derive(Debug, thiserror::Error)]
enum KvmError {
    #[error("/dev/kvm does not exist")]
    NoDevice,
    #[error("/dev/kvm exists but does not open read-write: {0}")]
    Open(io::Error),
    #[error("KVM_GET_API_VERSION failed: {0}")]
    ApiVersionCall(io::Error),
    #[error("KVM_GET_API_VERSION is {0}, not {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("/dev/kvm opens but KVM_CREATE_VM fails: {0}")]
    CreateVm(io::Error),
}

/// Open /dev/kvm, check the API version, create (and close) an empty VM.
fn kvm_ioctls() -> Result<(), KvmError> {
    let path = Path::new("/dev/kvm");
    if !path.exists() {
        return Err(KvmError::NoDevice);
    }
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(KvmError::Open)?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and touches no memory.
    let v = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if v < 0 {
        return Err(KvmError::ApiVersionCall(io::Error::last_os_error()));
    }
    if v != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(v));
    }
    // SAFETY: KVM_CREATE_VM takes the machine type (0) by value and returns
    // a new fd, which is owned (and closed) right away.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    if vm < 0 {
        return Err(KvmError::CreateVm(io::Error::last_os_error()));
    }
    // SAFETY: vm is a fresh descriptor nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    Ok(())
}

/// The guest kernel for the probe boot.
fn find_probe_kernel(opts: &ProbeOptions) -> Option<PathBuf> {
    if let Some(k) = &opts.probe_kernel {
        return Some(k.clone());
    }
    if let Some(k) = std::env::var_os("CELLHOST_PROBE_KERNEL").filter(|k| !k.is_empty()) {
        return Some(PathBuf::from(k));
    }
    let images = Path::new("/var/lib/cellhost/images/kernel");
    if images.is_file() {
        return Some(images.to_path_buf());
    }
    let mut boot: Vec<PathBuf> = fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    boot.sort_by(|a, b| version_cmp(a, b));
    boot.pop()
}

/// Compare paths by their digit runs as numbers (`6.10` after `6.9`).
fn version_cmp(a: &Path, b: &Path) -> std::cmp::Ordering {
    fn key(p: &Path) -> Vec<u64> {
        p.to_string_lossy()
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect()
    }
    key(a).cmp(&key(b)).then_with(|| a.cmp(b))
}

/// Serial lines a kernel prints only once it has finished initialising and
/// turns to the root filesystem or init. (A bare "VFS:" is not enough:
/// "VFS: Disk quotas" appears early in boot.)
const BOOT_MARKERS: [&str; 7] = [
    "Run /init",
    "Run /sbin/init",
    "Freeing unused kernel image",
    "VFS: Cannot open root device",
    "VFS: Unable to mount root",
    "No filesystem could mount root",
    "Kernel panic - not syncing: VFS",
];

/// Boot serial output shows the kernel got past early boot: "Linux version"
/// and, after it, init starting or the root mount attempt (a VFS panic for
/// lack of a root disk still proves the kernel ran under KVM).
fn boot_got_far(serial: &[u8]) -> bool {
    let text = String::from_utf8_lossy(serial);
    let Some(start) = text.find("Linux version") else {
        return false;
    };
    let after = &text[start..];
    BOOT_MARKERS.iter().any(|m| after.contains(m))
}

/// Drop terminal escape sequences (SeaBIOS and the kernel clear the screen).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // CSI: parameters and intermediates up to a final byte @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// Boot `kernel` under `-accel kvm` on q35 (SeaBIOS, present wherever
/// qemu-system-x86 is) with no disk and no network.
fn kvm_probe_boot(qemu: &Path, kernel: &Path, deadline: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let kernel_arg = kernel.as_os_str();
    let args: [&OsStr; 17] = [
        OsStr::new("-accel"),
        OsStr::new("kvm"),
        OsStr::new("-M"),
        OsStr::new("q35"),
        OsStr::new("-m"),
        OsStr::new("256M"),
        OsStr::new("-smp"),
        OsStr::new("1"),
        OsStr::new("-nographic"),
        OsStr::new("-no-reboot"),
        OsStr::new("-nic"),
        OsStr::new("none"),
        OsStr::new("-kernel"),
        kernel_arg,
        OsStr::new("-append"),
        OsStr::new("console=ttyS0 panic=-1"),
        OsStr::new("-no-user-config"),
    ];
    let o = run_until(qemu, &args, deadline, boot_got_far).map_err(|e| e.to_string())?;
    if boot_got_far(&o.stdout) {
        return Ok(started.elapsed());
    }
    let serial = strip_ansi(&String::from_utf8_lossy(&o.stdout));
    let last_serial = serial.lines().map(str::trim).rfind(|l| !l.is_empty());
    let stderr = String::from_utf8_lossy(&o.stderr);
    let last_err = stderr.lines().map(str::trim).rfind(|l| !l.is_empty());
    let how = if o.timed_out {
        format!("no sign of boot within {deadline:?}")
    } else {
        format!("qemu ended ({})", o.status)
    };
    let stage = if serial.contains("Linux version") {
        "the guest kernel started but did not reach its root mount or init"
    } else {
        "no kernel banner (\"Linux version\") on the serial console"
    };
    let mut why = format!("{how}; {stage}");
    if let Some(l) = last_serial {
        why.push_str(&format!("; last serial line: {l:?}"));
    }
    if let Some(l) = last_err {
        why.push_str(&format!("; qemu stderr: {l}"));
    }
    Err(why)
}

fn check_kvm(opts: &ProbeOptions, qemu: Option<&Path>) -> Capability {
    if let Err(e) = kvm_ioctls() {
        return Capability::new("kvm", false, e.to_string());
    }
    let base = "/dev/kvm opens and KVM_CREATE_VM works";
    let no_boot = |why: &str| {
        Capability::new(
            "kvm",
            false,
            format!(
                "{base}, but no probe boot ran ({why}); guest kernels may still fail on this host"
            ),
        )
    };
    let Some(qemu) = qemu else {
        return no_boot("qemu-system-x86_64 not found");
    };
    let Some(kernel) = find_probe_kernel(opts) else {
        return no_boot(
            "no guest kernel: set CELLHOST_PROBE_KERNEL or install /var/lib/cellhost/images/kernel",
        );
    };
    if !opts.kvm_boot {
        return no_boot("not requested: `cellhost doctor --kvm-boot` runs one");
    }
    match kvm_probe_boot(qemu, &kernel, opts.kvm_boot_deadline) {
        Ok(took) => Capability::new(
            "kvm",
            true,
            format!(
                "{base}; probe boot of {} under KVM reached init/root mount in {:.1}s",
                kernel.display(),
                took.as_secs_f64()
            ),
        ),
        Err(why) => Capability::new(
            "kvm",
            false,
            format!(
                "{base}, but the probe boot of {} under KVM failed: {why}",
                kernel.display()
            ),
        ),
    }
}

// ---------------------------------------------------------------------------

/// Collapse to one line (control characters become spaces) and cap length.
fn one_line(s: &str) -> String {
    one_line_max(s, MAX_DETAIL)
}

/// `one_line` with a cap of `max` characters: a tool's stderr as one
/// error line.
pub fn one_line_max(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if out.chars().count() > max {
        out = out.chars().take(max.saturating_sub(3)).collect();
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Tests that run the whole probe take turns, so one test's in-flight
    /// probe cgroup is never mistaken for another's leftover.
    static PROBE_LOCK: Mutex<()> = Mutex::new(());

    fn probe_now(opts: &ProbeOptions) -> HostReport {
        let _g = PROBE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        probe(opts)
    }

    fn is_root() -> bool {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    /// (fs type, mount point) of every mountinfo line, parsed independently
    /// of the module's parser.
    fn mounts_by_hand() -> Vec<(String, String)> {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| {
                let mp = l.split(' ').nth(4)?.to_string();
                let fstype = l.split(" - ").nth(1)?.split(' ').next()?.to_string();
                Some((fstype, mp))
            })
            .collect()
    }

    #[test]
    fn report_on_this_host() {
        let r = probe_now(&ProbeOptions::default());
        println!("{r}");
        println!("{}", serde_json::to_string_pretty(&r).unwrap());
        let names: Vec<&str> = r.capabilities.iter().map(|c| c.name).collect();
        assert_eq!(names, KEYS, "one row per stable key, in order");
        for c in &r.capabilities {
            assert!(!c.detail.is_empty(), "{} has no detail", c.name);
            assert!(!c.detail.contains('\n'), "{} detail is multi-line", c.name);
        }
        assert!(
            r.elapsed < Duration::from_secs(5),
            "probe without kvm boot took {:?}",
            r.elapsed
        );
        assert_eq!(r.tiers().len(), 4);
    }

    #[test]
    fn json_has_every_key_and_tier() {
        let r = probe_now(&ProbeOptions::default());
        let v = serde_json::to_value(&r).unwrap();
        let caps = v["capabilities"].as_array().unwrap();
        for key in KEYS {
            let c = caps
                .iter()
                .find(|c| c["name"] == *key)
                .unwrap_or_else(|| panic!("{key} missing from JSON"));
            assert!(c["ok"].is_boolean(), "{key}.ok");
            assert!(c["detail"].is_string(), "{key}.detail");
        }
        let tiers: Vec<&str> = v["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tier"].as_str().unwrap())
            .collect();
        assert_eq!(tiers, ["process", "container", "vm", "microvm"]);
    }

    #[test]
    fn root_matches_euid() {
        let r = probe_now(&ProbeOptions::default());
        assert_eq!(r.is_ok("root"), is_root());
    }

    #[test]
    fn namespaces_ok_as_root() {
        if !is_root() {
            println!("skipped: namespaces_ok_as_root needs root");
            return;
        }
        let r = probe_now(&ProbeOptions::default());
        let c = r.get("namespaces").unwrap();
        assert!(c.ok, "namespaces: {}", c.detail);
        assert!(c.detail.contains("unshare(pid|mount|uts|ipc|net) works"));
    }

    #[test]
    fn unshare_child_reports_errno() {
        // An invalid flag makes unshare fail with EINVAL in the child; the
        // parent must see that errno, not success.
        match unshare_in_child(0x0000_0001) {
            Err(ForkTestError::Unshare(e)) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL)),
            other => panic!("expected EINVAL, got {other:?}"),
        }
    }

    #[test]
    fn cgroup_version_matches_mountinfo() {
        let mounts = mounts_by_hand();
        let has = |t: &str, mp: &str| mounts.iter().any(|(f, m)| f == t && m == mp);
        let any_v1 = mounts.iter().any(|(f, _)| f == "cgroup");
        let any_v2 = mounts.iter().any(|(f, _)| f == "cgroup2");
        let r = probe_now(&ProbeOptions::default());
        let detail = &r.get("cgroup").unwrap().detail;
        // Forward: the systemd hybrid layout must be called hybrid.
        if has("cgroup2", "/sys/fs/cgroup/unified") && has("cgroup", "/sys/fs/cgroup/memory") {
            assert_eq!(r.cgroup_version, Some(CgroupVersion::Hybrid), "{detail}");
            assert!(detail.starts_with("hybrid:"), "{detail}");
        }
        // Backward: every answer must be backed by the mount table.
        let expected = match (any_v1, any_v2) {
            (true, true) => Some(CgroupVersion::Hybrid),
            (true, false) => Some(CgroupVersion::V1),
            (false, true) => Some(CgroupVersion::V2),
            (false, false) => None,
        };
        assert_eq!(r.cgroup_version, expected, "{detail}");
    }

    #[test]
    fn cgroup_limits_enforceable_as_root() {
        if !is_root() {
            println!("skipped: cgroup_limits_enforceable_as_root needs root");
            return;
        }
        let r = probe_now(&ProbeOptions::default());
        // A v1 hierarchy mounted read-write for a controller: as root we
        // must be able to make a child there and set its limit.
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
        for controller in ["cpu", "memory", "pids"] {
            let v1_rw = text.lines().any(|l| {
                let Some((left, right)) = l.split_once(" - ") else {
                    return false;
                };
                let opts = left.split(' ').nth(5).unwrap_or("");
                let mut r = right.split(' ');
                r.next() == Some("cgroup")
                    && r.nth(1)
                        .is_some_and(|so| so.split(',').any(|o| o == controller))
                    && opts.split(',').any(|o| o == "rw")
            });
            let key = format!("cgroup.{controller}");
            let c = r.get(&key).unwrap();
            if v1_rw {
                assert!(c.ok, "{key}: {}", c.detail);
            } else {
                println!(
                    "{key}: no rw v1 hierarchy; probe says {} ({})",
                    c.ok, c.detail
                );
            }
        }
        let all = ["cgroup.cpu", "cgroup.memory", "cgroup.pids"]
            .iter()
            .all(|k| r.is_ok(k));
        assert_eq!(r.is_ok("cgroup"), r.cgroup_version.is_some() && all);
    }

    #[test]
    fn probe_leaves_no_probe_cgroups() {
        let _ = probe_now(&ProbeOptions::default());
        let ours = format!("{PROBE_CGROUP_PREFIX}{}-", std::process::id());
        let _g = PROBE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let mut looked = 0;
        for (fstype, mp) in mounts_by_hand() {
            if fstype != "cgroup" && fstype != "cgroup2" {
                continue;
            }
            looked += 1;
            let Ok(entries) = fs::read_dir(&mp) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                assert!(!name.starts_with(&ours), "left behind: {mp}/{name}");
            }
        }
        println!("checked {looked} cgroup mounts for {ours}*");
    }

    #[test]
    fn docker_matches_socket_connect() {
        let r = probe_now(&ProbeOptions::default());
        let path = match std::env::var("DOCKER_HOST") {
            Ok(h) if !h.is_empty() => match h.strip_prefix("unix://") {
                Some(p) => PathBuf::from(p),
                None => {
                    assert!(!r.is_ok("docker"));
                    return;
                }
            },
            _ => PathBuf::from("/var/run/docker.sock"),
        };
        let connects = UnixStream::connect(&path).is_ok();
        let c = r.get("docker").unwrap();
        assert_eq!(c.ok, connects, "{}: {}", path.display(), c.detail);
        if !path.exists() {
            assert!(c.detail.starts_with("no socket at"), "{}", c.detail);
        }
    }

    /// Serve canned answers to `n` connections; returns the requests seen.
    fn fake_dockerd(
        listener: UnixListener,
        answers: Vec<&'static str>,
    ) -> thread::JoinHandle<Vec<String>> {
        thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in answers {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let mut b = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap() == 1 {
                    req.push(b[0]);
                }
                seen.push(String::from_utf8_lossy(&req).into_owned());
                s.write_all(answer.as_bytes()).unwrap();
            }
            seen
        })
    }

    #[test]
    fn docker_against_fake_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let server = fake_dockerd(
            UnixListener::bind(&sock).unwrap(),
            vec![
                "HTTP/1.0 200 OK\r\nApi-Version: 1.48\r\nContent-Type: text/plain\r\n\r\nOK",
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Version\":\"28.0.4\",\"ApiVersion\":\"1.48\",\"Os\":\"linux\"}\n",
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Driver\":\"zfs\",\"SecurityOptions\":[\"name=seccomp,profile=default\",\"name=userns\"]}\n",
            ],
        );
        let opts = ProbeOptions {
            docker_socket: Some(sock.clone()),
            ..Default::default()
        };
        let rows = check_docker(&opts);
        let seen = server.join().unwrap();
        let names: Vec<&str> = rows.iter().map(|c| c.name).collect();
        assert_eq!(names, DOCKER_KEYS);
        assert!(rows.iter().all(|c| c.ok), "{rows:?}");
        assert!(seen[2].starts_with("GET /info HTTP/1.0\r\n"), "{seen:?}");
        let c = &rows[0];
        assert_eq!(
            c.detail,
            format!("dockerd 28.0.4 (API 1.48) answers at {}", sock.display())
        );
        assert!(seen[0].starts_with("GET /_ping HTTP/1.0\r\n"), "{seen:?}");
        assert!(seen[1].starts_with("GET /version HTTP/1.0\r\n"), "{seen:?}");
    }

    #[test]
    fn docker_bad_answers_are_not_ok() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let server = fake_dockerd(
            UnixListener::bind(&sock).unwrap(),
            vec!["HTTP/1.0 500 Internal Server Error\r\n\r\noops"],
        );
        let c = probe_docker(&sock);
        server.join().unwrap();
        assert!(!c.ok);
        assert!(c.detail.contains("500"), "{}", c.detail);

        let server = fake_dockerd(
            UnixListener::bind(dir.path().join("e.sock")).unwrap(),
            vec![
                "HTTP/1.0 200 OK\r\n\r\nOK",
                "HTTP/1.0 200 OK\r\n\r\n{not json",
            ],
        );
        let c = probe_docker(&dir.path().join("e.sock"));
        server.join().unwrap();
        assert!(!c.ok);
        assert!(c.detail.contains("not JSON"), "{}", c.detail);
    }

    #[test]
    fn docker_refused_missing_and_silent() {
        let dir = tempfile::tempdir().unwrap();
        // A socket file nobody listens on any more: refused.
        let dead = dir.path().join("dead.sock");
        drop(UnixListener::bind(&dead).unwrap());
        let c = probe_docker(&dead);
        assert!(!c.ok);
        assert!(c.detail.contains("refuses connections"), "{}", c.detail);

        let c = probe_docker(&dir.path().join("nothing.sock"));
        assert!(!c.ok);
        assert!(c.detail.starts_with("no socket at"), "{}", c.detail);

        // A listener that accepts but never answers: bounded by the timeout.
        let silent = dir.path().join("silent.sock");
        let l = UnixListener::bind(&silent).unwrap();
        let t = Instant::now();
        let c = probe_docker(&silent);
        assert!(!c.ok);
        assert!(c.detail.contains("no answer within"), "{}", c.detail);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        drop(l);

        let opts = ProbeOptions {
            docker_socket: Some(PathBuf::from(format!("/{}", "x".repeat(200)))),
            ..Default::default()
        };
        let rows = check_docker(&opts);
        assert!(rows.iter().all(|c| !c.ok), "{rows:?}");
        assert!(rows[1].detail.starts_with("not checked: "), "{rows:?}");
    }

    /// `docker info` as dockerd 20.10 sends it (the fields read).
    fn info(driver: &str, backing: &str, root: &str, security: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "Driver": driver,
            "DriverStatus": [["Backing Filesystem", backing], ["Supports d_type", "true"]],
            "DockerRootDir": root,
            "SecurityOptions": security,
        })
    }

    fn mount(mp: &str, fs_type: &str, opts: &str) -> MountEntry {
        MountEntry {
            root: "/".into(),
            mount_point: PathBuf::from(mp),
            fs_type: fs_type.into(),
            source: "/dev/x".into(),
            super_options: opts.into(),
        }
    }

    #[test]
    fn docker_userns_is_read_from_security_options() {
        let on = info(
            "overlay2",
            "extfs",
            "/d",
            &["name=seccomp,profile=default", "name=userns"],
        );
        let c = docker_userns(&on);
        assert!(c.ok && c.detail.contains("unprivileged host uid"), "{c:?}");
        let off = info("overlay2", "extfs", "/d", &["name=seccomp,profile=default"]);
        let c = docker_userns(&off);
        assert!(!c.ok && c.detail.contains("uid 0"), "{c:?}");
        // Not fooled by a look-alike option, nor by a missing field.
        assert!(!docker_userns(&info("x", "y", "/d", &["name=usernsx"])).ok);
        assert!(!docker_userns(&serde_json::json!({})).ok);
    }

    #[test]
    fn docker_storage_opt_follows_the_driver_and_the_mount() {
        let mounts = [
            mount("/", "ext4", "rw"),
            mount("/var/lib/q", "xfs", "rw,attr2,inode64,prjquota"),
            mount("/var/lib/n", "xfs", "rw,attr2,inode64,pqnoenforce"),
        ];
        let row = |d, b, r| docker_storage_opt(&info(d, b, r, &[]), &mounts);
        let c = row("btrfs", "btrfs", "/var/lib/b");
        assert!(!c.ok && c.detail.contains("inconsistent"), "{c:?}");
        let c = row("zfs", "zfs", "/var/lib/z");
        assert!(c.ok, "{c:?}");
        let c = row("overlay2", "xfs", "/var/lib/q/docker");
        assert!(c.ok && c.detail.contains("prjquota"), "{c:?}");
        // Accounting without enforcement is not a limit.
        let c = row("overlay2", "xfs", "/var/lib/n");
        assert!(!c.ok && c.detail.contains("without prjquota"), "{c:?}");
        let c = row("overlay2", "extfs", "/var/lib/docker");
        assert!(!c.ok && c.detail.contains("overlay2 on extfs"), "{c:?}");
        assert!(c.detail.contains("scratch"), "{c:?}");
        let c = row("vfs", "extfs", "/var/lib/docker");
        assert!(!c.ok && c.detail.contains("storage driver vfs"), "{c:?}");
        assert!(!docker_storage_opt(&serde_json::json!({}), &mounts).ok);
    }

    #[test]
    fn device_nodes_match_dev() {
        let r = probe_now(&ProbeOptions::default());
        let exists = |p: &str| Path::new(p).exists();
        assert_eq!(r.is_ok("device-mapper"), exists("/dev/mapper/control"));
        assert_eq!(r.is_ok("loop"), exists("/dev/loop-control"));
        assert_eq!(r.is_ok("tun"), exists("/dev/net/tun"));
        let fuse_opens = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .is_ok();
        assert_eq!(r.is_ok("fuse"), fuse_opens);
        if !exists("/dev/vhost-vsock") {
            assert!(!r.is_ok("vsock"));
        }
        assert!(r.get("vsock").unwrap().detail.contains("AF_VSOCK socket"));
    }

    #[test]
    fn kvm_is_never_ok_without_a_probe_boot() {
        let r = probe_now(&ProbeOptions::default());
        let c = r.get("kvm").unwrap();
        assert!(!c.ok, "{}", c.detail);
        if Path::new("/dev/kvm").exists() {
            // Either the ioctls failed (and say which) or they worked and the
            // detail says no boot ran.
            assert!(
                c.detail.contains("no probe boot ran") || c.detail.contains("KVM_"),
                "{}",
                c.detail
            );
        } else {
            assert_eq!(c.detail, "/dev/kvm does not exist");
        }
        for t in r.tiers() {
            assert_ne!(t.accel, Some(Accel::Kvm), "kvm accel without a boot");
        }
    }

    #[test]
    fn kvm_probe_boot_when_possible() {
        let opts = ProbeOptions {
            kvm_boot: true,
            ..Default::default()
        };
        let Some(qemu) = which("qemu-system-x86_64") else {
            println!("skipped: kvm probe boot needs qemu-system-x86_64 on PATH");
            return;
        };
        let Some(kernel) = find_probe_kernel(&opts) else {
            println!("skipped: kvm probe boot needs a guest kernel (CELLHOST_PROBE_KERNEL)");
            return;
        };
        if kvm_ioctls().is_err() {
            println!("skipped: /dev/kvm does not answer KVM ioctls");
            return;
        }
        let t = Instant::now();
        let c = check_kvm(&opts, Some(&qemu));
        println!(
            "kvm ({} with {}): {} {}",
            qemu.display(),
            kernel.display(),
            c.ok,
            c.detail
        );
        assert!(c.detail.contains("probe boot"), "{}", c.detail);
        assert!(t.elapsed() < opts.kvm_boot_deadline + Duration::from_secs(3));
    }

    #[test]
    fn tiers_follow_capabilities() {
        let r = probe_now(&ProbeOptions::default());
        let process = r.tier(Isolation::Process);
        let needs = [
            "root",
            "namespaces",
            "userns",
            "cgroup",
            "cgroup.cpu",
            "cgroup.memory",
            "cgroup.pids",
        ];
        assert_eq!(process.ok, needs.iter().all(|k| r.is_ok(k)), "{process:?}");
        assert_eq!(r.tier(Isolation::Container).ok, r.is_ok("docker"));
        // Find qemu-system-x86_64 by hand, not through `which`.
        let mut dirs: Vec<String> = std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .map(str::to_string)
            .collect();
        dirs.extend(["/usr/bin".into(), "/usr/local/bin".into(), "/bin".into()]);
        let qemu_found = dirs
            .iter()
            .any(|d| Path::new(d).join("qemu-system-x86_64").is_file());
        let vm = r.tier(Isolation::Vm);
        assert_eq!(vm.ok, qemu_found && r.is_ok("qemu.sandbox"), "{vm:?}");
        if vm.ok {
            assert_eq!(vm.accel, Some(Accel::Tcg), "no probe boot ran, so tcg");
            assert!(vm.detail.contains("accel tcg"), "{}", vm.detail);
        }
        match r.require(Isolation::Process) {
            Ok(t) => assert!(t.ok),
            Err(BackendError::MissingCapability { capability, .. }) => {
                assert!(!r.is_ok(&capability), "{capability}")
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn no_vm_tier_without_the_qemu_sandbox() {
        let report = |sandbox: bool| HostReport {
            capabilities: KEYS
                .iter()
                .map(|&k| Capability::new(k, k != "qemu.sandbox" || sandbox, "seccomp off"))
                .collect(),
            cgroup_version: Some(CgroupVersion::V2),
            qemu_system: Some(PathBuf::from("/usr/bin/qemu-system-x86_64")),
            qemu_microvm: true,
            elapsed: Duration::ZERO,
        };
        for tier in [Isolation::Vm, Isolation::Microvm] {
            let t = report(false).tier(tier);
            assert!(!t.ok, "{t:?}");
            assert_eq!(t.missing, Some("qemu.sandbox"));
            assert_eq!(t.detail, "qemu.sandbox: seccomp off");
            assert!(report(true).tier(tier).ok);
        }
    }

    #[test]
    fn qemu_here_runs_under_its_sandbox() {
        let Some(qemu) = which("qemu-system-x86_64") else {
            println!("skipped: needs qemu-system-x86_64 on PATH");
            return;
        };
        let c = check_qemu_sandbox(&qemu);
        assert!(c.ok, "{c:?}");
    }

    #[test]
    fn require_names_the_missing_capability() {
        let report = HostReport {
            capabilities: KEYS
                .iter()
                .map(|&k| Capability::new(k, k != "cgroup.memory" && k != "docker", "x"))
                .collect(),
            cgroup_version: Some(CgroupVersion::V2),
            qemu_system: None,
            qemu_microvm: false,
            elapsed: Duration::ZERO,
        };
        match report.require(Isolation::Process) {
            Err(BackendError::MissingCapability { capability, detail }) => {
                assert_eq!(capability, "cgroup.memory");
                assert!(detail.contains("process tier"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        match report.require(Isolation::Container) {
            Err(BackendError::MissingCapability { capability, .. }) => {
                assert_eq!(capability, "docker")
            }
            other => panic!("{other:?}"),
        }
        let vm = report.tier(Isolation::Microvm);
        assert!(!vm.ok);
        assert_eq!(vm.missing, Some("qemu"));
        let text = report.to_string();
        // Names are padded to the longest key.
        let w = KEYS.iter().map(|k| k.len()).max().unwrap();
        assert!(
            text.contains(&format!("no   {:<w$}  x", "cgroup.memory")),
            "{text}"
        );
        assert!(text.contains(&format!("yes  {:<w$}  x", "root")), "{text}");
        assert!(text.contains("no   process    cgroup.memory: x"), "{text}");
    }

    #[test]
    fn mountinfo_hybrid_v1_v2() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:32 / /mnt/again rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
garbage line without separator
1 2 3 - short
";
        let known = known_v1_controllers();
        let mounts = cellhost_os::mountinfo::parse(text);
        assert_eq!(mounts.len(), 6);
        let l = cgroup_layout(&mounts, &known, |_| vec![]);
        assert_eq!(l.version, Some(CgroupVersion::Hybrid));
        assert_eq!(l.v1.len(), 3, "duplicate memory mount kept once");
        assert_eq!(
            l.hierarchy_for("memory").unwrap().mount_point,
            Path::new("/sys/fs/cgroup/memory")
        );
        assert!(l.hierarchy_for("pids").is_none());
        assert_eq!(
            l.summary(),
            "hybrid: v1 cpu, memory, name=systemd; v2 /sys/fs/cgroup/unified [no controllers]"
        );

        let v1_only: Vec<MountEntry> = mounts
            .iter()
            .filter(|m| m.fs_type != "cgroup2")
            .cloned()
            .collect();
        assert_eq!(
            cgroup_layout(&v1_only, &known, |_| vec![]).version,
            Some(CgroupVersion::V1)
        );

        let v2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let l = cgroup_layout(&cellhost_os::mountinfo::parse(v2), &known, |p| {
            assert_eq!(p, Path::new("/sys/fs/cgroup"));
            vec!["cpu".into(), "memory".into(), "pids".into()]
        });
        assert_eq!(l.version, Some(CgroupVersion::V2));
        assert!(l.hierarchy_for("pids").unwrap().v2);
        assert_eq!(cgroup_layout(&[], &known, |_| vec![]).version, None);
    }

    #[test]
    fn mountinfo_odd_content_does_not_panic() {
        let m =
            cellhost_os::mountinfo::parse("1 2 3:4 / /a\\040b\\ rw - ext4 /dev/x rw\n\\\n - \n");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mount_point, Path::new("/a b\\"));
        assert_eq!(cellhost_os::mountinfo::unescape("\\777\\0"), "\\777\\0");
        assert_eq!(cellhost_os::mountinfo::unescape("x\\134y"), "x\\y");
        for junk in [
            "",
            "-",
            " - ",
            "a b c d e - ",
            "\u{0} - \u{1}",
            "é é é é é - é",
        ] {
            let _ = cellhost_os::mountinfo::parse(junk);
        }
    }

    #[test]
    fn run_with_timeout_clears_env() {
        let env = which("env").expect("env(1) on PATH");
        let o = run_with_timeout(&env, &[], CMD_TIMEOUT).unwrap();
        assert!(o.success());
        let out = String::from_utf8(o.stdout).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert!(lines[0].starts_with("PATH=/"), "{out}");
    }

    fn dead(pid: &str) -> bool {
        // Gone, or a zombie waiting for a reaper: either way not running.
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(s) => s
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        }
    }

    #[test]
    fn run_with_timeout_kills_the_whole_group() {
        let sh = which("sh").expect("sh on PATH");
        let t = Instant::now();
        let o = run_with_timeout(
            &sh,
            &[OsStr::new("-c"), OsStr::new("sleep 30 & echo $!; wait")],
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(o.timed_out);
        assert!(!o.success());
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let grandchild = String::from_utf8(o.stdout).unwrap().trim().to_string();
        assert!(!grandchild.is_empty());
        let until = Instant::now() + Duration::from_secs(2);
        while !dead(&grandchild) && Instant::now() < until {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(dead(&grandchild), "sleep {grandchild} outlived the probe");
        assert!(dead(&o.pid.to_string()));

        // A child that exits leaving a background process: that one dies too.
        let o = run_with_timeout(
            &sh,
            &[
                OsStr::new("-c"),
                OsStr::new("sleep 30 >/dev/null 2>&1 & echo $!"),
            ],
            CMD_TIMEOUT,
        )
        .unwrap();
        assert!(o.success());
        let bg = String::from_utf8(o.stdout).unwrap().trim().to_string();
        let until = Instant::now() + Duration::from_secs(2);
        while !dead(&bg) && Instant::now() < until {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(dead(&bg), "background sleep {bg} outlived its parent");
    }

    #[test]
    fn run_until_stops_on_output() {
        let sh = which("sh").expect("sh on PATH");
        let t = Instant::now();
        let o = run_until(
            &sh,
            &[
                OsStr::new("-c"),
                OsStr::new("echo booting; echo ready; sleep 30"),
            ],
            Duration::from_secs(10),
            |out| String::from_utf8_lossy(out).contains("ready"),
        )
        .unwrap();
        assert!(o.stopped && !o.timed_out);
        assert!(t.elapsed() < Duration::from_secs(3));
        assert_eq!(o.first_line(), "booting");

        let missing = run_with_timeout(Path::new("/nonexistent/bin"), &[], CMD_TIMEOUT);
        assert!(matches!(missing, Err(RunError::Spawn { .. })));
    }

    #[test]
    fn boot_markers() {
        let ok = b"[0.0] Linux version 6.1.0-x\r\n[1.2] VFS: Cannot open root device \"\"\r\n[1.3] Kernel panic - not syncing: VFS: Unable to mount root fs";
        assert!(boot_got_far(ok));
        assert!(boot_got_far(
            b"Linux version 6.1\n...\nRun /init as init process\n"
        ));
        assert!(!boot_got_far(
            b"Linux version 6.1\nKernel panic - not syncing: Fatal exception\n"
        ));
        assert!(!boot_got_far(
            b"VFS: before the banner does not count\nLinux version 6.1\n"
        ));
        assert!(!boot_got_far(b""));
        assert!(!boot_got_far(
            b"Linux version 6.1\n[0.89] VFS: Disk quotas dquot_6.6.0\n[0.9] Freeing SMP alternatives memory\n"
        ));
        assert!(boot_got_far(
            b"Linux version 6.1\nNo filesystem could mount root, tried:\n"
        ));
        assert_eq!(
            strip_ansi("\u{1b}c\u{1b}[?7l\u{1b}[2JSeaBIOS\u{1b}[0m ok\u{1b}"),
            "SeaBIOS ok"
        );
        assert!(!boot_got_far(&[0xff, 0xfe, 0x00]));
    }

    #[test]
    fn small_helpers() {
        assert_eq!(
            version_of("qemu-img version 10.0.2 (Debian 1:10.0.2)"),
            "10.0.2"
        );
        assert_eq!(
            version_of("QEMU emulator version 7.2.15 (Debian)"),
            "7.2.15"
        );
        assert_eq!(
            version_of("cryptsetup 2.6.1 flags: UDEV"),
            "cryptsetup 2.6.1 flags: UDEV"
        );
        let long = "a\nb\t".repeat(400);
        let l = one_line(&long);
        assert!(!l.contains('\n') && !l.contains('\t'));
        assert!(l.chars().count() <= MAX_DETAIL);
        let mut ks = [
            PathBuf::from("/boot/vmlinuz-6.10.0-amd64"),
            PathBuf::from("/boot/vmlinuz-6.9.2-amd64"),
            PathBuf::from("/boot/vmlinuz-6.1.0-18-amd64"),
        ];
        ks.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(ks[2], Path::new("/boot/vmlinuz-6.10.0-amd64"));
        let dedup: BTreeSet<&str> = KEYS.iter().copied().collect();
        assert_eq!(dedup.len(), KEYS.len(), "keys are unique");
    }
}
