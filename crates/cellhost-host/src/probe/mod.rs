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

mod cgroups;
mod devices;
mod docker;
mod kvm;
mod namespaces;
mod run;
mod tools;

use cgroups::*;
use devices::*;
use docker::*;
use kvm::*;
use namespaces::*;
use run::*;
use tools::*;

pub use run::which;

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
