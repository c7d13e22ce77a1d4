//! The [`Backend`] of the vm and microvm tiers (layout, lifecycle,
//! idempotency and threat model: `docs/tiers.md`).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cellhost_core::ids::CellId;
use cellhost_core::{
    Backend, BackendError, CellHandle, CellState, CellStatus, CreateRequest, ExecOutput,
    ExecRequest, ExitInfo, ListedCell, LogChunk, ResourceUsage, TeardownReport, UidRange,
    VolumeKey,
};
use cellhost_guest::client::{Client, ConnectOptions, Endpoint};
use cellhost_guest::proto::MainState;
use cellhost_host::probe::Accel;
use cellhost_host::shim::write_atomic;
use cellhost_spec::{Cell, Isolation, NetworkMode};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::args::{self, Plan};
use crate::image::{Image, ImageKind, ImageStore};
use crate::limits::{self, CgroupError, Limits};
use crate::qmp::Qmp;
use crate::vmm::{self, QemuCommand, RunAs};

/// How the vm and microvm tiers run.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub tier: Isolation,
    /// `<state>/<tier>`: one dir per cell.
    pub state_dir: PathBuf,
    pub images: ImageStore,
    /// The binary whose `__vmm` subcommand is the shim (`cellhost`).
    pub vmm_program: PathBuf,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    pub genisoimage: PathBuf,
    /// Formats encrypted volumes (LUKS1, which qemu opens).
    pub cryptsetup: PathBuf,
    pub accel: Accel,
    /// Host address published ports bind (default 127.0.0.1).
    pub publish_address: String,
    /// Bytes of guest console kept per cell.
    pub log_cap: u64,
    /// How long a microVM may take to boot to its agent.
    pub boot_timeout: Duration,
    /// The host's TSC rate, kHz, handed to TCG guests (see
    /// [`crate::args::Plan::tsc_khz`]); read from /proc/cpuinfo.
    pub tsc_khz: Option<u64>,
    /// Bridged networking (`network.mode: bridged`): VMs get a tap on the
    /// bridge; `None` refuses such cells.
    pub network: Option<cellhost_net::NetConfig>,
    /// TCG's translation buffer, MiB (`-accel tcg,tb-size=`); counted in
    /// each VM's memory limit (see [`crate::limits`]).
    pub tb_mib: u64,
}

/// The host's TSC rate in kHz: the kernel's own figure where it exports
/// one (`/sys/devices/system/cpu/cpu0/tsc_freq_khz`), else /proc/cpuinfo's
/// `cpu MHz` (the current clock: right on hosts with a constant TSC and
/// no frequency scaling, such as VMs).
pub fn host_tsc_khz() -> Option<u64> {
    if let Some(khz) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|k| *k > 0)
    {
        return Some(khz);
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

impl QemuConfig {
    /// Defaults: tools from PATH, TCG, ports on 127.0.0.1, 4 MiB of
    /// console, 120 s to boot (TCG on a busy host is slow).
    pub fn new(tier: Isolation, state_root: &Path, vmm_program: PathBuf) -> QemuConfig {
        let tool = |n: &str| cellhost_host::probe::which(n).unwrap_or_else(|| PathBuf::from(n));
        QemuConfig {
            tier,
            state_dir: state_root.join(tier.as_str()),
            images: ImageStore::of_state_dir(state_root),
            vmm_program,
            qemu: tool("qemu-system-x86_64"),
            qemu_img: tool("qemu-img"),
            genisoimage: tool("genisoimage"),
            cryptsetup: tool("cryptsetup"),
            accel: Accel::Tcg,
            publish_address: "127.0.0.1".into(),
            log_cap: 4 << 20,
            boot_timeout: Duration::from_secs(120),
            tsc_khz: host_tsc_khz(),
            network: None,
            tb_mib: limits::TB_MIB,
        }
    }
}

#[derive(Clone)]
pub struct QemuBackend {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: QemuConfig,
    net: Option<Arc<cellhost_net::Network>>,
    /// This tier's cgroup group (see [`cellhost_host::cgroups::instance_tag`]).
    instance: String,
}

impl QemuBackend {
    pub fn new(cfg: QemuConfig) -> QemuBackend {
        let net = cfg
            .network
            .clone()
            .map(|n| Arc::new(cellhost_net::Network::new(n, cfg.tier.as_str())));
        let instance = cellhost_host::cgroups::instance_tag(&cfg.state_dir);
        QemuBackend {
            inner: Arc::new(Inner { cfg, net, instance }),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| BackendError::engine_from("blocking task", e))?
    }
}

fn engine(what: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BackendError {
    BackendError::engine_from(what, e)
}

/// A cgroup that cannot be made: a missing controller is a capability
/// this host lacks, the rest the host's I/O.
fn cgroup_error(e: CgroupError) -> BackendError {
    match e {
        CgroupError::Missing { controller } => BackendError::MissingCapability {
            capability: format!("cgroup.{controller}"),
            detail: e.to_string(),
        },
        CgroupError::Io { what, path, source } => {
            BackendError::io(format!("{what} {}", path.display()), source)
        }
    }
}

/// The supplementary groups of a KVM guest's qemu: kvm's group when it
/// owns /dev/kvm, none when the node is open to all; else qemu could not
/// open it, a capability the host lacks.
fn kvm_groups() -> Result<Vec<u32>, BackendError> {
    let st = nix::sys::stat::stat("/dev/kvm").map_err(|e| BackendError::MissingCapability {
        capability: "kvm".into(),
        detail: format!("/dev/kvm: {e}"),
    })?;
    let kvm = nix::unistd::Group::from_name("kvm")
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    kvm_groups_for(st.st_mode, st.st_gid, kvm)
}

/// [`kvm_groups`] for a node of `mode` owned by group `gid`, the `kvm`
/// group being `kvm`.
fn kvm_groups_for(mode: u32, gid: u32, kvm: Option<u32>) -> Result<Vec<u32>, BackendError> {
    if kvm == Some(gid) && mode & 0o060 == 0o060 {
        return Ok(vec![gid]);
    }
    if mode & 0o006 == 0o006 {
        return Ok(Vec::new());
    }
    Err(BackendError::MissingCapability {
        capability: "kvm".into(),
        detail: "/dev/kvm is not open to an unprivileged qemu: give it to group kvm, mode 0660"
            .into(),
    })
}

/// Hand `path` (made by root) to qemu's ids: owner `who`, mode 0600.
fn give(path: &Path, who: &RunAs) -> Result<(), BackendError> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(who.uid), Some(who.gid))
        .and_then(|_| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)))
        .map_err(|e| BackendError::io(format!("giving {} to qemu's uid", path.display()), e))
}

/// Marker files.
const STARTED: &str = "started";
/// Written by stop before its grace period.
const STOPPING: &str = "stopping";
const SHIM_LOG: &str = "shim.log";

use cellhost_host::shim::{alive_naming as owns, read_exit, read_pid_file as read_pid};

/// Every process's pid and argv (NUL-separated), read from /proc.
fn cmdlines() -> Vec<(i32, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            Some((pid, std::fs::read(e.path().join("cmdline")).ok()?))
        })
        .collect()
}

/// The file name of a cmdline's argv[0].
fn program_of(cmdline: &[u8]) -> String {
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let name = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
    String::from_utf8_lossy(name).into_owned()
}

/// Every live process whose argv names `dir` (qemu and the shim), with
/// its program name, found by scanning /proc: pid files may be gone.
fn processes_naming(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.as_os_str().as_encoded_bytes();
    cmdlines()
        .into_iter()
        // The argv already read; `owns` reads again only for the few that
        // name the dir, to drop zombies.
        .filter(|(_, cmdline)| cmdline.windows(needle.len()).any(|w| w == needle))
        .filter(|(pid, _)| owns(*pid, dir))
        .map(|(pid, cmdline)| (pid, program_of(&cmdline)))
        .collect()
}

/// The pids in `found` running `program`.
fn running(found: &[(i32, String)], program: &str) -> Vec<i32> {
    found
        .iter()
        .filter(|(_, n)| n == program)
        .map(|(p, _)| *p)
        .collect()
}

/// Why qemu is gone during start-up, as far as the cell dir tells: how it
/// ended (the shim reaps it and records the status; a signal with nothing
/// in qemu.log means it was killed, not that it refused its arguments) and
/// the shim's own log. The caller adds qemu.log and the console.
fn died_starting(dir: &Path) -> String {
    // The shim writes the record right after reaping: give it a moment.
    let record = dir.join(vmm::QEMU_EXIT);
    let until = Instant::now() + Duration::from_secs(2);
    while !record.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let how = tail(&record, 200);
    let shim = tail(&dir.join(SHIM_LOG), 300);
    format!(
        "qemu exited during start-up (exit: {}{})",
        if how.is_empty() { "not recorded" } else { &how },
        if shim.is_empty() {
            String::new()
        } else {
            format!("; shim: {shim}")
        }
    )
}

fn tail(path: &Path, max: usize) -> String {
    let b = std::fs::read(path).unwrap_or_default();
    let s = String::from_utf8_lossy(&b[b.len().saturating_sub(max)..]).into_owned();
    cellhost_host::probe::one_line_max(&s, max)
}

impl Inner {
    fn microvm(&self) -> bool {
        self.cfg.tier == Isolation::Microvm
    }

    fn cell_dir(&self, id: &CellId) -> PathBuf {
        self.cfg.state_dir.join(id.as_str())
    }

    /// `<instance>/cellhost-<id>`: the cell's cgroup below `cellhost/`.
    fn cgroup_object(&self, id: &CellId) -> String {
        cellhost_host::cgroups::cgroup_object(&self.instance, &id.object_name())
    }

    /// The ids qemu runs as: the base of the cell's lease for both, no
    /// supplementary group (kvm's group under KVM, when it owns /dev/kvm
    /// and qemu needs it to open the node).
    fn run_as(&self, uids: UidRange) -> Result<RunAs, BackendError> {
        if uids.base == 0 {
            return Err(BackendError::Invalid(
                "uids: the range starts at 0, and qemu never runs as root".into(),
            ));
        }
        let groups = match self.cfg.accel {
            Accel::Kvm => kvm_groups()?,
            Accel::Tcg => Vec::new(),
        };
        Ok(RunAs {
            uid: uids.base,
            gid: uids.base,
            groups,
        })
    }

    fn qemu_program(&self) -> String {
        self.cfg
            .qemu
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "qemu-system-x86_64".into())
    }

    fn vmm_program(&self) -> String {
        self.cfg
            .vmm_program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The cell's live qemu, if any.
    /// The shim writes qemu.pid before it reports, and qemu never
    /// re-executes: a pid file is the answer, and /proc is scanned only
    /// when there is none (a create cut short), not on every status poll.
    fn qemu_pid(&self, dir: &Path) -> Option<i32> {
        match read_pid(&dir.join(vmm::QEMU_PID)) {
            Some(pid) => owns(pid, dir).then_some(pid),
            None => running(&processes_naming(dir), &self.qemu_program())
                .into_iter()
                .next(),
        }
    }

    /// How the microVM's command ended, by its agent: `None` while it
    /// runs (or when the agent cannot say).
    fn main_exit(&self, dir: &Path) -> Option<ExitInfo> {
        let main = self
            .agent(dir, Duration::from_secs(2))
            .and_then(|mut a| a.status().map_err(|e| engine("agent status", e)))
            .ok()?
            .main;
        match main {
            MainState::Exited { exit_code, signal } => Some(ExitInfo {
                code: exit_code,
                signal,
                oom_killed: false,
            }),
            MainState::SpawnFailed { .. } => Some(ExitInfo::exited(127)),
            MainState::NotStarted | MainState::Running { .. } => None,
        }
    }

    fn image_for(&self, cell: &Cell) -> Result<Image, BackendError> {
        let img = self
            .cfg
            .images
            .get(&cell.spec.image)
            .map_err(|e| BackendError::Invalid(format!("spec.image: {e}")))?;
        let want = if self.microvm() {
            ImageKind::Microvm
        } else {
            ImageKind::Vm
        };
        if img.manifest.kind != want {
            return Err(BackendError::Invalid(format!(
                "spec.image: {} is a {:?} image; {} cells need a {:?} image",
                img.manifest.name, img.manifest.kind, self.cfg.tier, want
            )));
        }
        Ok(img)
    }

    fn check_supported(&self, req: &CreateRequest) -> Result<(), BackendError> {
        let spec = &req.cell.spec;
        if req.uids.is_none_or(|u| u.base == 0) {
            return Err(BackendError::Invalid(format!(
                "uids: a {} cell needs a host uid range of its own (the supervisor leases one): its qemu runs as that unprivileged uid, never as root",
                self.cfg.tier
            )));
        }
        let unsupported = |what: &str| BackendError::MissingCapability {
            capability: "network".into(),
            detail: format!("{what} is not available on the {} tier yet", self.cfg.tier),
        };
        if spec.network.mode == NetworkMode::Bridged {
            let Some(net) = &self.net else {
                return Err(unsupported("network.mode: bridged (no bridge configured)"));
            };
            net.admit(&req.cell).map_err(cellhost_net::backend_error)?;
        }
        cellhost_spec::validate_for(self.cfg.tier, &req.cell)
            .map_err(|e| BackendError::Invalid(e.to_string()))?;
        if let Some(v) = &spec.volume
            && v.encrypted
            && req.volume_key.is_none()
        {
            return Err(BackendError::Invalid(
                "spec.volume.encrypted: a volume key is required".into(),
            ));
        }
        if req.volume_key.is_some() && !spec.volume.as_ref().is_some_and(|v| v.encrypted) {
            return Err(BackendError::Invalid(
                "a volume key was given but spec.volume is not encrypted".into(),
            ));
        }
        Ok(())
    }

    /// A VM's overlay has the size `diskGiB` asks for; one smaller than the
    /// base disk would cut the guest's filesystem short (qemu-img does not
    /// refuse it), so it is refused here, naming the field.
    fn check_disk_fits(&self, req: &CreateRequest, image: &Image) -> Result<(), BackendError> {
        let Some(gib) = req.cell.spec.resources.disk_gib else {
            return Ok(());
        };
        if self.microvm() {
            return Ok(());
        }
        let base = image
            .disk_size()
            .map_err(|e| BackendError::engine_from("spec.image", e))?
            .unwrap_or(0);
        if gib.saturating_mul(1 << 30) < base {
            return Err(BackendError::Invalid(format!(
                "spec.resources.diskGiB: {gib} GiB is smaller than image {}'s disk ({:.1} GiB)",
                image.manifest.name,
                base as f64 / f64::from(1u32 << 30)
            )));
        }
        Ok(())
    }

    /// qemu-img and friends, through the shared tool runner (PATH
    /// lookup, cleared env, timeout, one-line stderr).
    fn run_tool(&self, tool: &Path, args: &[&str]) -> Result<(), BackendError> {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        cellhost_host::tool::run(tool, &args, None).map_err(|e| {
            BackendError::engine(format!(
                "{} {}: {e}",
                tool.display(),
                args.first().and_then(|a| a.to_str()).unwrap_or("")
            ))
        })
    }

    fn create(&self, req: CreateRequest) -> Result<CellHandle, BackendError> {
        if req.cell.spec.isolation != self.cfg.tier {
            return Err(BackendError::Invalid(format!(
                "the {} backend got a {} cell",
                self.cfg.tier, req.cell.spec.isolation
            )));
        }
        self.check_supported(&req)?;
        let image = self.image_for(&req.cell)?;
        self.check_disk_fits(&req, &image)?;
        let dir = self.cell_dir(&req.id);
        // A dir left by a crashed create of this id: start clean.
        if dir.exists() {
            self.teardown(
                &req.id,
                req.uids,
                req.address,
                &mut TeardownReport::new(req.id.as_str()),
            );
        }
        std::fs::create_dir_all(&self.cfg.state_dir)
            .map_err(|e| BackendError::io(format!("{}", self.cfg.state_dir.display()), e))?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| BackendError::io(format!("creating {}", dir.display()), e))?;
        match self.create_in(&req, &image, &dir) {
            Ok(net) => {
                let mut h = handle(&self.cfg, &req.id, Some(&req.cell));
                h.uids = req.uids;
                h.address = req.address;
                if let Some(a) = net {
                    h.tier["network"] = serde_json::to_value(&a).unwrap_or_default();
                }
                Ok(h)
            }
            Err(e) => {
                let log = tail(&dir.join(vmm::QEMU_LOG), 400);
                let console = tail(&dir.join(vmm::SERIAL_LOG), 400);
                self.teardown(
                    &req.id,
                    req.uids,
                    req.address,
                    &mut TeardownReport::new(req.id.as_str()),
                );
                Err(match e {
                    BackendError::Engine { context, source }
                        if !log.is_empty() || !console.is_empty() =>
                    {
                        let m = BackendError::Engine { context, source }.to_string();
                        BackendError::engine(format!("{m}; qemu: {log}; console: {console}"))
                    }
                    other => other,
                })
            }
        }
    }

    fn create_in(
        &self,
        req: &CreateRequest,
        image: &Image,
        dir: &Path,
    ) -> Result<Option<cellhost_net::Attachment>, BackendError> {
        let spec = &req.cell.spec;
        let user = self.run_as(req.uids.expect("checked"))?;
        // What `start` runs (a microVM's agent gets it then); no secrets.
        let main = MainCommand {
            argv: spec.command.clone(),
            cwd: spec.working_dir.clone(),
        };
        write_atomic(
            &dir.join(MAIN_JSON),
            &serde_json::to_vec(&main).unwrap_or_default(),
        )
        .map_err(|e| BackendError::io("main.json", e))?;
        let mut seed = None;
        if !self.microvm() {
            let base = image.disk().ok_or_else(|| {
                BackendError::Invalid(format!("spec.image: {} has no disk", image.manifest.name))
            })?;
            let fmt = image
                .manifest
                .disk_format
                .clone()
                .unwrap_or_else(|| "raw".into());
            let overlay = dir.join(args::OVERLAY);
            let (b, o) = (base.to_string_lossy(), overlay.to_string_lossy());
            let size = spec.resources.disk_gib.map(|g| format!("{g}G"));
            let mut a = vec!["create", "-q", "-f", "qcow2", "-F", &fmt, "-b", &b, &o];
            if let Some(s) = &size {
                a.push(s);
            }
            self.run_tool(&self.cfg.qemu_img, &a)?;
            give(&overlay, &user)?;
        }
        // The tap before the seed (the vm's network-config names its
        // address) and before qemu (which opens the tap by name).
        let attached = match (&self.net, spec.network.mode, req.address) {
            (Some(net), NetworkMode::Bridged, Some(address)) => Some(
                net.attach_tap(&req.id, &req.cell, address, user.uid, user.gid)
                    .map_err(cellhost_net::backend_error)?,
            ),
            (Some(_), NetworkMode::Bridged, None) => {
                return Err(BackendError::Invalid(
                    "a bridged cell attaches at its leased address: the request needs one from \
                     the tier's address pool (the supervisor leases one)"
                        .into(),
                ));
            }
            _ => None,
        };
        if !self.microvm() {
            seed = Some(crate::seed::build(
                &self.cfg.genisoimage,
                req,
                attached.as_ref(),
            )?);
        }
        let mut volume = None;
        if let Some(v) = &spec.volume {
            let size = format!("{}G", v.size_gib);
            if v.encrypted {
                let file = dir.join(args::VOLUME_LUKS);
                let key = req.volume_key.as_ref().expect("checked");
                let tools = cellhost_volume::Tools {
                    cryptsetup: self.cfg.cryptsetup.clone(),
                    ..Default::default()
                };
                cellhost_volume::format_luks1(&tools, &req.id, &file, v.size_gib << 30, key)
                    .map_err(|e| engine("formatting the volume", e))?;
                give(&file, &user)?;
                volume = Some((file, true));
            } else {
                let file = dir.join(args::VOLUME_QCOW2);
                let f = file.to_string_lossy();
                self.run_tool(
                    &self.cfg.qemu_img,
                    &["create", "-q", "-f", "qcow2", &f, &size],
                )?;
                give(&file, &user)?;
                volume = Some((file, false));
            }
        }
        // qemu reads the seed through a read-only description of the memfd
        // (it is a read-only drive), inherited through the shim.
        let seed = seed
            .map(|f| {
                std::fs::File::open(crate::seed::proc_path(&f))
                    .map_err(|e| BackendError::io("reopening the seed read-only", e))
            })
            .transpose()?;
        let limits = Limits::for_cell(&req.cell, self.cfg.accel, self.cfg.tb_mib);
        let cgroups =
            limits::create(&self.cgroup_object(&req.id), &limits).map_err(cgroup_error)?;
        let plan = Plan {
            microvm: self.microvm(),
            dir,
            name: req.id.object_name(),
            cell: &req.cell,
            image,
            accel: self.cfg.accel,
            publish_address: &self.cfg.publish_address,
            seed: seed.as_ref().map(|f| f.as_raw_fd()),
            volume,
            tsc_khz: self.cfg.tsc_khz,
            tap: attached.as_ref().map(|a| (a.link.clone(), a.mac.clone())),
            tb_mib: self.cfg.tb_mib,
        };
        let (args, fds) = plan.command();
        let cmd = QemuCommand {
            program: self.cfg.qemu.to_string_lossy().into_owned(),
            args,
            user,
            cgroups,
            fds,
        };
        self.launch(dir, &cmd, req.volume_key.as_ref(), seed.as_ref())?;
        // The shim handed the seed to qemu, which holds it open.
        drop(seed);
        if self.microvm() {
            let mut agent = self.agent(dir, self.cfg.boot_timeout)?;
            let env: BTreeMap<String, String> = spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !env.is_empty() {
                agent
                    .set_env(&env)
                    .map_err(|e| engine("agent set_env", e))?;
            }
            for s in &req.secrets {
                agent
                    .set_secret(&s.name, &s.value)
                    .map_err(|e| engine(&format!("agent set_secret {}", s.name), e))?;
            }
            if let Some(a) = &attached {
                agent
                    .configure_net(cellhost_guest::proto::NetRequest {
                        interface: None,
                        address: format!("{}/{}", a.address, a.prefix),
                        gateway: Some(a.gateway.to_string()),
                        dns: spec.network.dns.clone(),
                    })
                    .map_err(|e| {
                        engine(
                            "agent configure_net (does the image load virtio_net? rebuild it with `cellhost image initramfs`)",
                            e,
                        )
                    })?;
            }
        }
        Ok(attached)
    }

    /// Start qemu under the shim and wait until QMP answers. `seed` is
    /// the descriptor qemu.json names as inherited.
    fn launch(
        &self,
        dir: &Path,
        cmd: &QemuCommand,
        key: Option<&VolumeKey>,
        seed: Option<&std::fs::File>,
    ) -> Result<(), BackendError> {
        write_atomic(
            &dir.join(vmm::QEMU_JSON),
            &serde_json::to_vec_pretty(cmd).unwrap_or_default(),
        )
        .map_err(|e| BackendError::io("writing qemu.json", e))?;
        let stdin = match key {
            Some(k) => {
                // Close-on-exec until it is the shim's stdin: a shim of
                // another cell forked meanwhile must not inherit it.
                let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                    .map_err(|e| BackendError::io("key pipe", e.into()))?;
                // qemu's `secret` reopens /dev/stdin as its own uid.
                nix::unistd::fchown(
                    r.as_raw_fd(),
                    Some(nix::unistd::Uid::from_raw(cmd.user.uid)),
                    Some(nix::unistd::Gid::from_raw(cmd.user.gid)),
                )
                .map_err(|e| BackendError::io("key pipe", e.into()))?;
                let mut w = std::fs::File::from(w);
                w.write_all(k.passphrase().as_bytes())
                    .map_err(|e| BackendError::io("key pipe", e))?;
                drop(w);
                Stdio::from(std::fs::File::from(r))
            }
            None => Stdio::null(),
        };
        let shim_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(SHIM_LOG))
            .map_err(|e| BackendError::io("shim log", e))?;
        let mut command = Command::new(&self.cfg.vmm_program);
        command
            .arg("__vmm")
            .arg(dir)
            .arg(self.cfg.log_cap.to_string())
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(shim_log));
        if let Some(fd) = seed.map(|f| f.as_raw_fd()) {
            // SAFETY: the closure runs in the forked child and only makes
            // one fcntl call (async-signal-safe, no allocation): the seed
            // descriptor, close-on-exec here, reaches the shim alone.
            unsafe {
                command.pre_exec(move || {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().map_err(|e| {
            BackendError::io(format!("starting {}", self.cfg.vmm_program.display()), e)
        })?;
        let stdout = child.stdout.take().expect("piped");
        let _ = child.wait();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| BackendError::io("reading the shim's report", e))?;
        let report: cellhost_host::shim::ShimReport = serde_json::from_str(line.trim())
            .map_err(|_| BackendError::engine(format!("the shim reported {:?}", line.trim())))?;
        if !report.ok {
            return Err(BackendError::engine(format!(
                "starting qemu: {}",
                report.error.unwrap_or_default()
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let qmp = dir.join(args::QMP_SOCK);
        loop {
            match Qmp::connect(&qmp, Duration::from_secs(5)).and_then(|mut q| q.status()) {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if self.qemu_pid(dir).is_none() {
                        return Err(BackendError::engine(died_starting(dir)));
                    }
                    if Instant::now() > deadline {
                        return Err(engine("QMP never answered", e));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn agent(&self, dir: &Path, deadline: Duration) -> Result<Client, BackendError> {
        let opts = ConnectOptions {
            deadline,
            ..Default::default()
        };
        let ep = Endpoint::VirtioSerial(dir.join(args::AGENT_SOCK));
        let started = Instant::now();
        loop {
            match Client::connect(&ep, &opts) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    // A qemu that died (kernel panic) ends the wait early.
                    if self.qemu_pid(dir).is_none() || started.elapsed() >= deadline {
                        return Err(engine("the guest agent did not answer", e));
                    }
                    // connect retried what a booting guest produces; an
                    // error it returns early must not become a busy loop.
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }

    fn qmp(&self, dir: &Path) -> Result<Qmp, BackendError> {
        Qmp::connect(&dir.join(args::QMP_SOCK), Duration::from_secs(5))
            .map_err(|e| engine("QMP", e))
    }

    fn start(&self, h: &CellHandle) -> Result<(), BackendError> {
        let dir = self.cell_dir(&h.id);
        let st = self.status(h)?;
        if st.state != CellState::Created {
            return Err(BackendError::WrongState {
                id: h.id.clone(),
                op: "start",
                state: st.state,
                wanted: "created (vm and microvm cells run once)",
            });
        }
        // Marked first: a start cut short (a crash, a command that cannot
        // spawn) must leave a cell whose status asks the agent.
        write_atomic(&dir.join(STARTED), b"").map_err(|e| BackendError::io("start marker", e))?;
        if self.microvm() {
            let main = read_main(&dir)?;
            let mut agent = self.agent(&dir, Duration::from_secs(10))?;
            match agent.start(&main.argv, main.cwd.as_deref()) {
                Ok(_) => Ok(()),
                // Started by an earlier attempt.
                Err(e) if e.code() == Some(cellhost_guest::proto::ErrorCode::Busy) => Ok(()),
                // status() reads SpawnFailed from the agent: exit 127.
                Err(e) => Err(engine("agent start", e)),
            }
        } else {
            self.qmp(&dir)?
                .execute("cont", None)
                .map(drop)
                .map_err(|e| engine("QMP cont", e))
        }
    }

    fn status(&self, h: &CellHandle) -> Result<CellStatus, BackendError> {
        let dir = self.cell_dir(&h.id);
        if !dir.exists() {
            return Ok(CellStatus {
                state: CellState::Gone,
                pid: None,
                exit: None,
            });
        }
        let exited = |exit| CellStatus {
            state: CellState::Exited,
            pid: None,
            exit: Some(exit),
        };
        if let Some(exit) = read_exit(&dir) {
            // The microVM quits after its command ends; make sure (unless
            // a stop is giving it its grace period now).
            if !dir.join(STOPPING).exists()
                && let Some(pid) = self.qemu_pid(&dir)
            {
                self.end_qemu(&dir, pid, Duration::ZERO);
            }
            return Ok(exited(exit));
        }
        let Some(pid) = self.qemu_pid(&dir) else {
            // qemu just ended: its shim writes how within moments.
            let until = Instant::now() + Duration::from_secs(3);
            while !dir.join(vmm::QEMU_EXIT).exists()
                && Instant::now() < until
                && read_pid(&dir.join(vmm::SHIM_PID)).is_some_and(|p| owns(p, &dir))
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(exit) = read_exit(&dir) {
                return Ok(exited(exit));
            }
            if !dir.join(vmm::QEMU_PID).exists() {
                // Create has not launched it yet (or failed before).
                return Ok(CellStatus {
                    state: CellState::Created,
                    pid: None,
                    exit: None,
                });
            }
            return Ok(exited(ExitInfo::unknown()));
        };
        let running = |state| CellStatus {
            state,
            pid: Some(pid as u32),
            exit: None,
        };
        if !dir.join(STARTED).exists() {
            return Ok(running(CellState::Created));
        }
        // A microVM's command's own end is the cell's end.
        if self.microvm()
            && let Some(exit) = self.main_exit(&dir)
        {
            record_exit(&dir, &exit)?;
            self.end_qemu(&dir, pid, Duration::from_secs(5));
            return Ok(exited(exit));
        }
        Ok(running(CellState::Running))
    }

    /// Graceful where possible: agent shutdown / ACPI powerdown for
    /// `grace`, then QMP quit, then SIGKILL. Returns once qemu is gone.
    fn end_qemu(&self, dir: &Path, pid: i32, grace: Duration) {
        let gone = |within: Duration| {
            let until = Instant::now() + within;
            loop {
                if !owns(pid, dir) {
                    return true;
                }
                if Instant::now() >= until {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        };
        if !grace.is_zero() {
            if self.microvm() {
                if let Ok(mut a) = self.agent(dir, Duration::from_secs(2)) {
                    let _ = a.shutdown();
                }
            } else if let Ok(mut q) = self.qmp(dir) {
                let _ = q.execute("system_powerdown", None);
            }
            if gone(grace) {
                return;
            }
        }
        if let Ok(mut q) = self.qmp(dir) {
            let _ = q.execute("quit", None);
        }
        if gone(Duration::from_secs(5)) {
            return;
        }
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        gone(Duration::from_secs(5));
    }

    fn stop(&self, h: &CellHandle, grace: Duration) -> Result<(), BackendError> {
        let dir = self.cell_dir(&h.id);
        let Some(pid) = self.qemu_pid(&dir) else {
            return Ok(());
        };
        let _ = write_atomic(&dir.join(STOPPING), b"");
        if self.microvm() && !dir.join(vmm::EXIT_FILE).exists() {
            // Stopped before its command ended: say so, like a signal.
            let exit = self
                .main_exit(&dir)
                .unwrap_or(ExitInfo::signaled(libc::SIGTERM));
            let _ = record_exit(&dir, &exit);
        }
        self.end_qemu(&dir, pid, grace);
        let _ = std::fs::remove_file(dir.join(STOPPING));
        Ok(())
    }

    /// Remove everything of a cell, recording what was checked. `uids`
    /// is the cell's lease when known (the handle's); else qemu.json names
    /// the uid qemu ran as.
    fn teardown(
        &self,
        id: &CellId,
        uids: Option<UidRange>,
        address: Option<std::net::Ipv4Addr>,
        report: &mut TeardownReport,
    ) {
        let dir = self.cell_dir(id);
        let uids = uids.or_else(|| {
            let b = std::fs::read(dir.join(vmm::QEMU_JSON)).ok()?;
            let cmd: QemuCommand = serde_json::from_slice(&b).ok()?;
            Some(UidRange {
                base: cmd.user.uid,
                size: 1,
            })
        });
        let qemu = self.qemu_program();
        let vmm_name = self.vmm_program();
        // One scan finds both; afterwards each pid is checked on its own.
        let found = processes_naming(&dir);
        for pid in running(&found, &qemu) {
            self.end_qemu(&dir, pid, Duration::ZERO);
        }
        let shims = running(&found, &vmm_name);
        // The shim ends by itself once qemu is gone (console EOF).
        let until = Instant::now() + Duration::from_secs(5);
        while shims.iter().any(|p| owns(*p, &dir)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in shims.iter().filter(|p| owns(**p, &dir)) {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        // qemu's cgroup, with anything still in it killed (qemu is gone by
        // now, and its sandbox forbids it children; a process cannot leave
        // the cgroup it was put in): gone before anything it could hold
        // open (the volume) is erased.
        let object = self.cgroup_object(id);
        let cgroups_left = limits::remove(&object);
        // Then nothing may run as one of the cell's ids. Only counted, not
        // killed: everything of the cell was in its cgroup, so a process
        // here is not one this teardown knows, and the lease stays taken
        // (the supervisor keeps a lease whose teardown left residue).
        let running_as = |r: UidRange| {
            let until = Instant::now() + Duration::from_secs(5);
            loop {
                let left = cellhost_host::uids::processes_in(r);
                if left.is_empty() || Instant::now() > until {
                    return left;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let uids_left = uids.map(|r| (r, running_as(r)));
        // The tap, table, neighbour and lease, with checks of their own
        // (qemu, which held the tap open, is gone by now).
        if let Some(net) = &self.net {
            net.detach_if_any(id, address, report);
        }
        let luks = dir.join(args::VOLUME_LUKS);
        let keyslots = match cellhost_volume::erase_header(&luks) {
            Ok(left) => u64::from(left),
            Err(e) => {
                report.error(format!("erasing {}: {e}", luks.display()));
                1
            }
        };
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            report.error(format!("removing {}: {e}", dir.display()));
        }
        let left = |p: PathBuf| u64::from(p.exists());
        let left_procs = processes_naming(&dir);
        report.check(
            "vm-process",
            format!("{qemu} naming {}", dir.display()),
            running(&left_procs, &qemu).len() as u64,
        );
        report.check(
            "vm-shim",
            format!("{vmm_name} __vmm"),
            running(&left_procs, &vmm_name).len() as u64,
        );
        report.check(
            "vm-qmp-socket",
            dir.join(args::QMP_SOCK).display().to_string(),
            left(dir.join(args::QMP_SOCK)),
        );
        report.check(
            "vm-agent-socket",
            dir.join(args::AGENT_SOCK).display().to_string(),
            left(dir.join(args::AGENT_SOCK)),
        );
        report.check(
            "vm-overlay",
            dir.join(args::OVERLAY).display().to_string(),
            left(dir.join(args::OVERLAY)),
        );
        report.check(
            "vm-volume-keyslots",
            luks.display().to_string(),
            keyslots.min(left(luks.clone())),
        );
        report.check(
            "vm-volume",
            luks.display().to_string(),
            left(luks) + left(dir.join(args::VOLUME_QCOW2)),
        );
        report.check("vm-seed", "memfd (never on disk)", 0);
        report.check("vm-dir", dir.display().to_string(), left(dir.clone()));
        report.check(
            "vm-cgroup",
            format!("cgroup {}/{object}", cellhost_host::cgroups::CGROUP_PARENT),
            cgroups_left.len() as u64,
        );
        if let Some((r, left)) = uids_left {
            report.check_detail(
                "uids",
                format!("processes running as uids {r}"),
                left.len() as u64,
                format!("(pid, id): {left:?}"),
            );
        }
    }

    fn destroy(&self, h: &CellHandle) -> Result<TeardownReport, BackendError> {
        let mut report = TeardownReport::new(h.id.as_str());
        let dir = self.cell_dir(&h.id);
        report.already_gone = !dir.exists()
            && self.qemu_pid(&dir).is_none()
            && limits::dirs(&self.cgroup_object(&h.id))
                .iter()
                .all(|d| !d.exists());
        let ports: Vec<u32> = h
            .tier
            .get("ports")
            .and_then(|p| p.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64().map(|x| x as u32))
                    .collect()
            })
            .unwrap_or_default();
        self.teardown(&h.id, h.uids, h.address, &mut report);
        let addr = &self.cfg.publish_address;
        let bound = ports
            .iter()
            .filter(|p| std::net::TcpListener::bind((addr.as_str(), **p as u16)).is_err())
            .count() as u64;
        report.check("vm-port-forwards", format!("{addr}:{ports:?}"), bound);
        Ok(report)
    }

    fn list(&self) -> Result<Vec<ListedCell>, BackendError> {
        let mut out = Vec::new();
        // No tier dir yet: still look for the other objects below.
        let rd = match std::fs::read_dir(&self.cfg.state_dir) {
            Ok(rd) => Some(rd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(BackendError::io("listing cells", e)),
        };
        for e in rd.into_iter().flatten().flatten() {
            let Some(id) = e.file_name().to_str().and_then(|s| CellId::parse(s).ok()) else {
                continue;
            };
            let dir = e.path();
            let state = if self.qemu_pid(&dir).is_some() {
                CellState::Running
            } else {
                CellState::Exited
            };
            out.push(ListedCell {
                id,
                isolation: self.cfg.tier,
                state,
            });
        }
        // Network objects of this tier whose cell dir is gone.
        if let Some(net) = &self.net {
            for id in net
                .cells()
                .map_err(|e| engine("listing bridged cells", e))?
            {
                if !out.iter().any(|c| c.id == id) {
                    out.push(ListedCell {
                        id,
                        isolation: self.cfg.tier,
                        state: CellState::Exited,
                    });
                }
            }
        }
        // Cgroups of this tier whose cell dir is gone (a teardown cut
        // short): reconcile destroys them with the rest.
        for name in cellhost_host::cgroups::cell_cgroup_names(&self.instance)
            .map_err(|e| BackendError::io("listing the tier's cgroups", e))?
        {
            let Some(id) = name
                .strip_prefix("cellhost-")
                .and_then(|s| CellId::parse(s).ok())
            else {
                continue;
            };
            if !out.iter().any(|c| c.id == id) {
                out.push(ListedCell {
                    id,
                    isolation: self.cfg.tier,
                    state: CellState::Exited,
                });
            }
        }
        // qemu processes of this tier whose cell dir is gone (a teardown
        // that could not kill them): still cells, so reconcile destroys them.
        for id in self.qemu_ids_without_dir() {
            if !out.iter().any(|c| c.id == id) {
                out.push(ListedCell {
                    id,
                    isolation: self.cfg.tier,
                    state: CellState::Running,
                });
            }
        }
        Ok(out)
    }

    /// Ids of live qemu processes whose argv names `<state_dir>/<id>/` of
    /// a dir that no longer exists.
    fn qemu_ids_without_dir(&self) -> Vec<CellId> {
        let prefix = format!("{}/", self.cfg.state_dir.display());
        let qemu = self.qemu_program();
        let mut ids = Vec::new();
        for (_, cmdline) in cmdlines() {
            if program_of(&cmdline) != qemu {
                continue;
            }
            let text = String::from_utf8_lossy(&cmdline);
            let Some(at) = text.find(&prefix) else {
                continue;
            };
            let rest = &text[at + prefix.len()..];
            let Some(id) = rest.split('/').next().and_then(|s| CellId::parse(s).ok()) else {
                continue;
            };
            if !self.cell_dir(&id).exists() && !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    fn exec(&self, h: &CellHandle, req: ExecRequest) -> Result<ExecOutput, BackendError> {
        if !self.microvm() {
            return Err(BackendError::Unsupported {
                op: "exec",
                tier: self.cfg.tier,
            });
        }
        let st = self.status(h)?;
        if st.state != CellState::Running {
            return Err(BackendError::WrongState {
                id: h.id.clone(),
                op: "exec",
                state: st.state,
                wanted: "running",
            });
        }
        let dir = self.cell_dir(&h.id);
        let mut agent = self.agent(&dir, Duration::from_secs(10))?;
        let reply = agent
            .exec(cellhost_guest::proto::ExecRequest {
                argv: req.argv,
                env: req.env.into_iter().collect(),
                cwd: req.cwd,
                stdin_b64: None,
                timeout_ms: req.timeout.map(|t| t.as_millis() as u64),
                max_output: None,
            })
            .map_err(|e| engine("agent exec", e))?;
        Ok(ExecOutput {
            exit: ExitInfo {
                code: reply.exit_code,
                signal: reply.signal,
                oom_killed: false,
            },
            stdout: reply.stdout,
            stderr: reply.stderr,
        })
    }

    fn usage(&self, h: &CellHandle) -> Result<ResourceUsage, BackendError> {
        let dir = self.cell_dir(&h.id);
        let pid = self
            .qemu_pid(&dir)
            .ok_or_else(|| BackendError::WrongState {
                id: h.id.clone(),
                op: "usage",
                state: CellState::Exited,
                wanted: "running",
            })?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_err(|e| BackendError::io("qemu stat", e))?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        // utime, stime: fields 14 and 15 of stat(5), 12 and 13 after ')'.
        let ticks: u64 = fields
            .get(11..13)
            .map(|f| f.iter().filter_map(|x| x.parse::<u64>().ok()).sum())
            .unwrap_or(0);
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        Ok(ResourceUsage {
            cpu_ns: ticks * 1_000_000_000 / hz,
            memory_bytes: rss_kib * 1024,
        })
    }
}

/// The cell's recorded exit (exit.json), if any.
fn record_exit(dir: &Path, exit: &ExitInfo) -> Result<(), BackendError> {
    cellhost_host::shim::write_exit(dir, exit).map_err(|e| BackendError::io("exit.json", e))
}

const MAIN_JSON: &str = "main.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct MainCommand {
    argv: Vec<String>,
    cwd: Option<String>,
}

fn read_main(dir: &Path) -> Result<MainCommand, BackendError> {
    let b = std::fs::read(dir.join(MAIN_JSON)).map_err(|e| BackendError::io(MAIN_JSON, e))?;
    serde_json::from_slice(&b).map_err(|e| engine(MAIN_JSON, e))
}

/// The handle: the cell dir, the accelerator and the image's digests.
/// A cell's handle; `cell` is `None` for objects found by naming alone
/// (an orphan), whose image and ports are unknown.
fn handle(cfg: &QemuConfig, id: &CellId, cell: Option<&Cell>) -> CellHandle {
    let image = cell.and_then(|c| cfg.images.get(&c.spec.image).ok());
    CellHandle {
        id: id.clone(),
        name: id.object_name(),
        isolation: cfg.tier,
        state_dir: cfg.state_dir.join(id.as_str()),
        tier: serde_json::json!({
            "accel": cfg.accel.to_string(),
            "image": cell.map(|c| &c.spec.image),
            "digests": image.as_ref().map(|i| i.manifest.digests.clone()).unwrap_or_default(),
            "ports": cell.map(|c| c.spec.ports.iter().map(|p| p.host).collect::<Vec<_>>()).unwrap_or_default(),
            "qmp": cfg.state_dir.join(id.as_str()).join(args::QMP_SOCK),
        }),
        uids: None,
        address: None,
    }
}

use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;

#[async_trait]
impl Backend for QemuBackend {
    fn isolation(&self) -> Isolation {
        self.inner.cfg.tier
    }

    /// qemu runs as the base uid and gid of the cell's lease.
    fn wants_uids(&self) -> bool {
        true
    }

    fn address_pool(&self, cell: &Cell) -> Option<cellhost_core::AddressPool> {
        let net = self.inner.net.as_ref()?;
        (cell.spec.network.mode == NetworkMode::Bridged).then(|| net.pool())
    }

    fn handle_for(&self, id: &CellId, cell: &Cell) -> CellHandle {
        handle(&self.inner.cfg, id, Some(cell))
    }

    fn found_handle(&self, id: &CellId) -> CellHandle {
        handle(&self.inner.cfg, id, None)
    }

    async fn create(&self, req: CreateRequest) -> Result<CellHandle, BackendError> {
        self.blocking(move |i| i.create(req)).await
    }

    async fn start(&self, h: &CellHandle) -> Result<(), BackendError> {
        let h = h.clone();
        self.blocking(move |i| i.start(&h)).await
    }

    async fn stop(&self, h: &CellHandle, grace: Duration) -> Result<(), BackendError> {
        let h = h.clone();
        self.blocking(move |i| i.stop(&h, grace)).await
    }

    async fn destroy(&self, h: &CellHandle) -> Result<TeardownReport, BackendError> {
        let h = h.clone();
        self.blocking(move |i| i.destroy(&h)).await
    }

    async fn status(&self, h: &CellHandle) -> Result<CellStatus, BackendError> {
        let h = h.clone();
        self.blocking(move |i| i.status(&h)).await
    }

    async fn list(&self) -> Result<Vec<ListedCell>, BackendError> {
        self.blocking(|i| i.list()).await
    }

    async fn logs(&self, h: &CellHandle, offset: u64) -> Result<LogChunk, BackendError> {
        let path = self.inner.cell_dir(&h.id).join(vmm::SERIAL_LOG);
        self.blocking(move |_| read_log(&path, offset)).await
    }

    /// A bridged VM's nftables counters, as `network.counters`.
    async fn live_details(
        &self,
        h: &CellHandle,
    ) -> Result<Option<serde_json::Value>, BackendError> {
        let (Some(net), Some(_)) = (self.inner.net.clone(), h.tier.get("network")) else {
            return Ok(None);
        };
        let id = h.id.clone();
        self.blocking(move |_| net.live_details(&id).map_err(cellhost_net::backend_error))
            .await
    }

    async fn usage(&self, h: &CellHandle) -> Result<ResourceUsage, BackendError> {
        let h = h.clone();
        self.blocking(move |i| i.usage(&h)).await
    }

    async fn exec(&self, h: &CellHandle, req: ExecRequest) -> Result<ExecOutput, BackendError> {
        let h = h.clone();
        self.blocking(move |i| i.exec(&h, req)).await
    }
}

/// Up to 64 KiB of the console log from `offset` (empty before the shim
/// made it).
fn read_log(path: &Path, offset: u64) -> Result<LogChunk, BackendError> {
    Ok(LogChunk::read_file(path, offset, 64 * 1024)
        .map_err(|e| BackendError::io("console log", e))?
        .unwrap_or(LogChunk {
            data: Vec::new(),
            next_offset: offset,
            more: false,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_gives_qemu_the_kvm_group_only_when_it_owns_the_node() {
        assert_eq!(kvm_groups_for(0o20660, 108, Some(108)).unwrap(), [108]);
        assert_eq!(kvm_groups_for(0o20666, 108, Some(108)).unwrap(), [108]);
        assert!(kvm_groups_for(0o20666, 0, Some(108)).unwrap().is_empty());
        assert!(kvm_groups_for(0o20666, 0, None).unwrap().is_empty());
        for (mode, gid, kvm) in [
            (0o20600, 0, None),
            (0o20660, 0, Some(108)),
            (0o20600, 108, Some(108)),
        ] {
            assert!(matches!(
                kvm_groups_for(mode, gid, kvm),
                Err(BackendError::MissingCapability { .. })
            ));
        }
    }

    #[test]
    fn a_death_at_start_up_says_how_qemu_ended() {
        let d = tempfile::tempdir().unwrap();
        let m = died_starting(d.path());
        assert!(m.contains("exit: not recorded"), "{m}");
        std::fs::write(d.path().join(vmm::QEMU_EXIT), r#"{"signal":13}"#).unwrap();
        std::fs::write(d.path().join(SHIM_LOG), "qemu ended\n").unwrap();
        let m = died_starting(d.path());
        assert!(m.contains(r#"exit: {"signal":13}"#), "{m}");
        assert!(m.ends_with("; shim: qemu ended)"), "{m}");
    }
}
