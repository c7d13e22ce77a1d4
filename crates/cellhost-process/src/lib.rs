//! The `process` tier: a workload in its own user, pid, mount, uts, ipc,
//! net and cgroup namespaces, inside its own cgroup, on a read-only root,
//! run by youki's `libcontainer` through a per-cell shim.
//!
//! Invariants (layout, lifecycle and threat model in `docs/tiers.md`,
//! "process"):
//! - everything is found again from the cell id alone (dir and cgroup
//!   names), so destroy works from a fresh process after a crash and on a
//!   destroyed cell; a create that fails half way calls destroy;
//! - destroy *checks* every object it removed, and the uid range, and
//!   reports what is left;
//! - the cell's uid range comes with the request (the supervisor leases it):
//!   the workload's root is an unprivileged host uid of that range;
//! - the workload gets exactly its declared environment, fds 0-2, and limits
//!   that are never unlimited;
//! - secret values never appear in argv (the shim's argv is paths and ids),
//!   config.json, logs or the store: only in the cell's tmpfs, and in memory
//!   during create.
//!
//! Design: `docs/tiers.md`.

mod bundle;
pub mod exec;
pub mod executor;
pub mod hostfs;
pub mod root;
pub mod seccomp;
pub mod shim;

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cellhost_core::ids::CellId;
use cellhost_core::{
    Backend, BackendError, CellHandle, CellState, CellStatus, CreateRequest, ExecOutput,
    ExecRequest, ExitInfo, ListedCell, LogChunk, ResourceUsage, TeardownReport, UidRange,
    VolumeKey,
};
use cellhost_spec::{Cell, Isolation};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;

pub use bundle::BundleError;
use hostfs::{CellCgroups, Hierarchy};
use shim::{EXIT_FILE, LC_ROOT, LOG_FILE, SHIM_LOG_FILE, SHIM_PID_FILE, ShimReport};

/// How long create waits for the shim to report.
const SHIM_REPORT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long destroy waits for processes to die and the shim to exit.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes of log one `logs` call returns.
const LOG_PAGE: u64 = 1 << 20;

/// The hidden subcommand of the `cellhost` binary that runs a shim.
pub const SHIM_SUBCOMMAND: &str = "__shim";
/// The hidden subcommand that runs one exec helper (see [`exec`]). The
/// binary's `main` dispatches on it (and on [`SHIM_SUBCOMMAND`]) before
/// anything else runs.
pub const EXEC_SUBCOMMAND: &str = "__exec";

/// How the backend starts a shim:
/// `program args... <cell-dir> <container-id> <log-cap-bytes>`, where
/// `args` ends with the subcommand ([`SHIM_SUBCOMMAND`]). The backend's
/// other helpers are the same binary with another subcommand (see
/// [`ShimCommand::with_subcommand`]).
#[derive(Debug, Clone)]
pub struct ShimCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl ShimCommand {
    /// Re-execute the running binary as `<exe> __shim` (the `cellhost` CLI).
    pub fn current_exe() -> io::Result<ShimCommand> {
        Ok(ShimCommand {
            program: std::env::current_exe()?,
            args: vec![SHIM_SUBCOMMAND.into()],
        })
    }

    /// The same program and argument prefix with another hidden
    /// subcommand: `<exe> __shim` becomes `<exe> <sub>`. A prefix that
    /// does not end in [`SHIM_SUBCOMMAND`] gets `sub` appended.
    pub fn with_subcommand(&self, sub: &str) -> ShimCommand {
        let mut args = self.args.clone();
        if args.last().is_some_and(|a| a == SHIM_SUBCOMMAND) {
            args.pop();
        }
        args.push(sub.into());
        ShimCommand {
            program: self.program.clone(),
            args,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Root of this tier's host state (e.g. `/var/lib/cellhost/process`).
    pub state_dir: PathBuf,
    pub shim: ShimCommand,
    /// Most bytes of workload output kept in a cell's log; the rest is
    /// dropped (see `shim::copy_capped`).
    pub log_cap_bytes: u64,
    /// Which encrypted-volume engine (`<state>/volumes`).
    pub volume_engine: cellhost_volume::EngineChoice,
    /// Bridged networking (`network.mode: bridged`, `spec.ports`); `None`
    /// refuses such cells.
    pub network: Option<cellhost_net::NetConfig>,
    /// Cells keep CAP_NET_RAW (the operator's policy `netRaw`).
    pub net_raw: bool,
    /// The image store rootfs images come from (`<state>/images`).
    pub images_dir: PathBuf,
    /// Run cells in user namespaces of their own (on by default). Off only
    /// for `cellhost bench process`'s baseline, which measures what the
    /// user namespace costs: nothing that serves tenants turns it off.
    pub user_namespace: bool,
}

/// Default cap on a cell's log: 64 MiB.
pub const DEFAULT_LOG_CAP_BYTES: u64 = 64 << 20;

impl ProcessConfig {
    /// A config with the default log cap.
    pub fn new(state_dir: PathBuf, shim: ShimCommand) -> ProcessConfig {
        ProcessConfig {
            shim,
            log_cap_bytes: DEFAULT_LOG_CAP_BYTES,
            volume_engine: cellhost_volume::EngineChoice::Auto,
            network: None,
            net_raw: false,
            user_namespace: true,
            images_dir: cellhost_image::ImageStore::of_state_dir(
                state_dir.parent().unwrap_or(Path::new("")),
            )
            .root()
            .to_path_buf(),
            state_dir,
        }
    }
}

/// The process tier.
#[derive(Debug, Clone)]
pub struct ProcessBackend {
    cfg: ProcessConfig,
    /// The host's cgroup hierarchies, read from mountinfo once (shared by
    /// clones) for `usage`, which a metering loop calls every few seconds
    /// per cell. Cgroup hierarchies are mounted at boot and not moved.
    hierarchies: Arc<OnceLock<Vec<Hierarchy>>>,
    /// This instance's cgroup group (see [`hostfs::instance_tag`]).
    instance: String,
    /// Encrypted volumes of this tier's cells (`<state>/volumes/<id>`).
    volumes: cellhost_volume::Volumes,
    /// Bridged networking, when configured.
    net: Option<Arc<cellhost_net::Network>>,
    /// Rootfs images (`spec.image` other than `host`).
    images: cellhost_image::ImageStore,
}

/// Paths of one cell on the host, derived from its id.
#[derive(Debug, Clone)]
pub struct CellPaths {
    pub dir: PathBuf,
    pub container_id: String,
    /// The cell's cgroup below `/cellhost`: `<instance>/cellhost-<id>`.
    pub cgroup: String,
}

impl CellPaths {
    pub fn log(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }
    pub fn exit(&self) -> PathBuf {
        self.dir.join(EXIT_FILE)
    }
    pub fn secrets(&self) -> PathBuf {
        self.dir.join("secrets")
    }
    pub fn lc_state(&self) -> PathBuf {
        self.dir.join(LC_ROOT).join(&self.container_id)
    }
    pub fn shim_pid(&self) -> PathBuf {
        self.dir.join(SHIM_PID_FILE)
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> BackendError {
    let context = context.into();
    move |e| BackendError::io(context, e)
}

impl ProcessBackend {
    pub fn new(mut cfg: ProcessConfig) -> ProcessBackend {
        // Absolute, so the shim (another cwd) derives the same paths and
        // the same cgroup instance tag.
        if let Ok(abs) = std::path::absolute(&cfg.state_dir) {
            cfg.state_dir = abs;
        }
        let instance = hostfs::instance_tag(&cfg.state_dir);
        let mut vcfg = cellhost_volume::VolumeConfig::new(cfg.state_dir.join("volumes"));
        vcfg.engine = cfg.volume_engine;
        ProcessBackend {
            images: cellhost_image::ImageStore::new(cfg.images_dir.clone()),
            volumes: cellhost_volume::Volumes::new(vcfg),
            net: cfg
                .network
                .clone()
                .map(|n| Arc::new(cellhost_net::Network::new(n, "process"))),
            cfg,
            hierarchies: Arc::default(),
            instance,
        }
    }

    /// The cgroup of a cell below `/cellhost`: `<instance>/cellhost-<id>`.
    fn cgroup_object(&self, id: &CellId) -> String {
        hostfs::cgroup_object(&self.instance, &id.object_name())
    }

    /// This instance's cgroup group under `/cellhost` (cells of other state
    /// dirs live in other groups).
    pub fn cgroup_instance(&self) -> &str {
        &self.instance
    }

    /// The cgroup hierarchies, read from mountinfo once per backend (cgroup
    /// mounts do not change under a running host).
    fn cached_hierarchies(&self) -> io::Result<&[Hierarchy]> {
        Ok(match self.hierarchies.get() {
            Some(hs) => hs,
            None => {
                let read = hostfs::hierarchies()?;
                self.hierarchies.get_or_init(|| read)
            }
        })
    }

    /// The cgroups of a cgroup object (`<instance>/cellhost-<id>`) from the
    /// cached hierarchies.
    fn cgroups_of(&self, object: &str) -> io::Result<CellCgroups> {
        Ok(CellCgroups::from_hierarchies(
            object,
            self.cached_hierarchies()?,
        ))
    }

    /// Run `f` on a blocking thread with a clone of this backend.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&ProcessBackend) -> T + Send + 'static,
    ) -> Result<T, BackendError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| BackendError::engine(format!("{what} task: {e}")))
    }

    /// Cumulative cpu time and current memory of the cell's cgroup.
    fn usage_now(&self, id: &CellId) -> Result<ResourceUsage, BackendError> {
        let cg = self
            .cgroups_of(&self.cgroup_object(id))
            .map_err(io_err("reading /proc/self/mountinfo"))?;
        let cpu = cg.cpu_usage_ns();
        let mem = cg.memory_bytes();
        if cpu.is_none() && mem.is_none() {
            // No cgroup (never made, or destroyed): nothing to meter.
            return Err(BackendError::NotFound(id.clone()));
        }
        Ok(ResourceUsage {
            cpu_ns: cpu.unwrap_or(0),
            memory_bytes: mem.unwrap_or(0),
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }

    /// This tier's encrypted volumes.
    pub fn volumes(&self) -> &cellhost_volume::Volumes {
        &self.volumes
    }

    pub fn paths(&self, id: &CellId) -> CellPaths {
        CellPaths {
            dir: self.cfg.state_dir.join("cells").join(id.as_str()),
            container_id: id.object_name(),
            cgroup: self.cgroup_object(id),
        }
    }

    /// The cgroups of a cell (for limits, metering and tests).
    pub fn cgroups(&self, id: &CellId) -> io::Result<CellCgroups> {
        self.cgroups_of(&self.cgroup_object(id))
    }

    /// Host pid of the cell's init process, if libcontainer recorded one.
    pub fn init_pid(&self, id: &CellId) -> Option<i32> {
        read_state_pid(&self.paths(id).lc_state())
    }

    /// A cell's processes run as its own unprivileged host uid, and its
    /// init reaches its root and binds under `<state>/cells/<id>/` with
    /// that uid: every directory from `/` down to `cells` must be
    /// searchable by others (o+x; nothing in them becomes listable or
    /// readable). The dirs cellhost owns (the state dir and below) are
    /// made so; one above that is not is a clear refusal.
    fn ensure_traversable(&self) -> Result<(), BackendError> {
        let cells = self.cfg.state_dir.join("cells");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&cells)
            .map_err(io_err(format!("creating {}", cells.display())))?;
        let ours: Vec<&Path> = [
            Some(cells.as_path()),
            Some(self.cfg.state_dir.as_path()),
            self.cfg.state_dir.parent(),
        ]
        .into_iter()
        .flatten()
        .collect();
        for dir in cells.ancestors() {
            let m = fs::metadata(dir).map_err(io_err(format!("reading {}", dir.display())))?;
            let mode = m.permissions().mode();
            if mode & 0o001 != 0 {
                continue;
            }
            if ours.contains(&dir) {
                fs::set_permissions(dir, fs::Permissions::from_mode((mode & 0o7777) | 0o011))
                    .map_err(io_err(format!("chmod o+x {}", dir.display())))?;
            } else {
                return Err(BackendError::MissingCapability {
                    capability: "state_dir".into(),
                    detail: format!(
                        "process cells run as their own unprivileged uid, which must pass \
                         through every directory above {}; {} is mode {:o} (not o+x): use a \
                         --state-dir whose parents are searchable, e.g. /var/lib/cellhost",
                        cells.display(),
                        dir.display(),
                        mode & 0o7777
                    ),
                });
            }
        }
        Ok(())
    }

    /// Check the host can enforce what the document asks, before any side
    /// effect.
    fn admit(&self, cell: &Cell, key: Option<&VolumeKey>) -> Result<(), BackendError> {
        cellhost_spec::validate_for(Isolation::Process, cell)
            .map_err(|e| BackendError::Invalid(e.to_string()))?;
        if !nix::unistd::geteuid().is_root() {
            return Err(BackendError::MissingCapability {
                capability: "root".into(),
                detail: "the process tier needs root (namespaces, cgroups, mounts)".into(),
            });
        }
        self.ensure_traversable()?;
        let cg = self
            .cgroups_of(&hostfs::cgroup_object(&self.instance, "cellhost-admit"))
            .map_err(io_err("reading /proc/self/mountinfo"))?;
        let r = &cell.spec.resources;
        let need = |what: &str, ok: bool| -> Result<(), BackendError> {
            if ok {
                Ok(())
            } else {
                Err(BackendError::MissingCapability {
                    capability: format!("cgroup.{what}"),
                    detail: format!(
                        "spec.resources asks for a {what} limit but no {what} cgroup controller is mounted"
                    ),
                })
            }
        };
        need("memory", r.memory_mib.is_none() || cg.memory.is_some())?;
        need("cpu", r.cpus.is_none() || cg.cpu.is_some())?;
        need("pids", r.pids.is_none() || cg.procs.is_some())?;
        if cell.spec.network.mode == cellhost_spec::NetworkMode::Bridged {
            let Some(net) = &self.net else {
                return Err(BackendError::MissingCapability {
                    capability: "network.bridged".into(),
                    detail: "bridged networking is not configured for this process tier".into(),
                });
            };
            net.admit(cell).map_err(cellhost_net::backend_error)?;
        }
        self.volumes.admit(cell, key)?;
        Ok(())
    }

    async fn create_inner(
        &self,
        req: &CreateRequest,
        p: &CellPaths,
        uids: Option<UidRange>,
    ) -> Result<Option<cellhost_net::Attachment>, BackendError> {
        let source = self.root_source(&req.cell)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&p.dir)
            .map_err(io_err(format!("creating {}", p.dir.display())))?;
        fs::set_permissions(&p.dir, fs::Permissions::from_mode(0o711))
            .map_err(io_err(format!("chmod {}", p.dir.display())))?;
        let secrets_dir = if req.secrets.is_empty() {
            None
        } else {
            cellhost_core::secrets::write_tmpfs(&p.secrets(), &req.secrets, uids)?;
            Some(p.secrets())
        };
        let bridged =
            self.net.is_some() && req.cell.spec.network.mode == cellhost_spec::NetworkMode::Bridged;
        let resolv =
            bridged.then(|| cellhost_os::ifconfig::resolv_conf(&req.cell.spec.network.dns));
        let volume = self.volumes.create_for(req).await?;
        if let (Some(open), Some(uids)) = (&volume, uids) {
            // The cell's root owns its volume; nobody else on the host does.
            std::os::unix::fs::chown(&open.data_dir, Some(uids.base), Some(uids.base))
                .map_err(io_err(format!("chown {}", open.data_dir.display())))?;
        }
        let volume = match (&volume, &req.cell.spec.volume) {
            (Some(open), Some(v)) => Some((v.path.as_str(), open.data_dir.as_path())),
            _ => None,
        };
        let prepared = root::prepare(&p.dir, &source, resolv.as_deref(), volume)?;
        let cgroup_path = format!("/{}/{}", hostfs::CGROUP_PARENT, p.cgroup);
        let spec = bundle::oci_spec(&bundle::SpecInputs {
            cell: &req.cell,
            root: &prepared,
            secrets_dir: secrets_dir.as_deref(),
            cgroup_path: &cgroup_path,
            uids,
            net_raw: self.cfg.net_raw,
        })
        .map_err(|e| BackendError::engine_from("building the OCI spec", e))?;
        let json = serde_json::to_vec(&spec)
            .map_err(|e| BackendError::engine_from("encoding config.json", e))?;
        write_private(&p.dir.join("config.json"), &json)?;
        // The log exists before the shim so readers never race its creation.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(p.log())
            .map_err(io_err("creating cell log"))?;
        let pid = self.run_shim(p).await?;
        // The cell's network namespace was made inside its user namespace
        // (so it may mount its own sysfs): a bridged cell's veth goes in
        // now, before the workload starts.
        let attached = match (&self.net, bridged, req.address) {
            (Some(net), true, Some(address)) => {
                let (net, id, cell) = (net.clone(), req.id.clone(), req.cell.clone());
                let a = tokio::task::spawn_blocking(move || {
                    net.pin_netns(&id, pid)?;
                    net.attach(&id, &cell, address)
                })
                .await
                .map_err(|e| BackendError::engine_from("network attach task", e))?
                .map_err(cellhost_net::backend_error)?;
                Some(a)
            }
            _ => None,
        };
        Ok(attached)
    }

    /// Where a cell's root comes from: `host` (if the image is allowed at
    /// all is the policy's business) or a rootfs image of the store.
    fn root_source(&self, cell: &Cell) -> Result<root::Source, BackendError> {
        let image = cell.spec.image.as_str();
        if image == "host" {
            return Ok(root::Source::Host);
        }
        let img = self.images.get(image).map_err(|e| match e {
            cellhost_image::ImageError::NotFound(_) | cellhost_image::ImageError::BadName(_) => {
                BackendError::Invalid(format!("spec.image: {e}"))
            }
            other => BackendError::engine_from("spec.image", other),
        })?;
        match img.rootfs() {
            Some(f) => Ok(root::Source::Image(f)),
            None => Err(BackendError::Invalid(format!(
                "spec.image: {image} is a {} image, not a rootfs for process cells",
                img.manifest.kind.as_str()
            ))),
        }
    }

    /// Run the shim; the container's init pid once it reports.
    async fn run_shim(&self, p: &CellPaths) -> Result<i32, BackendError> {
        let shim_log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(p.dir.join(SHIM_LOG_FILE))
            .map_err(io_err("creating shim log"))?;
        let mut cmd = tokio::process::Command::new(&self.cfg.shim.program);
        cmd.args(&self.cfg.shim.args)
            .arg(&p.dir)
            .arg(&p.container_id)
            .arg(self.cfg.log_cap_bytes.to_string())
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(shim_log);
        let mut child = cmd.spawn().map_err(io_err(format!(
            "spawning shim {}",
            self.cfg.shim.program.display()
        )))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BackendError::engine("shim stdout missing"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(SHIM_REPORT_TIMEOUT, lines.next_line()).await;
        // The shim's first process exits right after forking; reap it.
        let _ = child.wait().await;
        let line = match line {
            Err(_) => {
                return Err(BackendError::Timeout(
                    SHIM_REPORT_TIMEOUT,
                    "the shim to report",
                ));
            }
            Ok(Err(e)) => return Err(BackendError::io("reading shim report", e)),
            Ok(Ok(None)) => {
                let log = fs::read_to_string(p.dir.join(SHIM_LOG_FILE)).unwrap_or_default();
                return Err(BackendError::engine(format!(
                    "shim exited without reporting: {}",
                    log.lines().last().unwrap_or("no diagnostics")
                )));
            }
            Ok(Ok(Some(l))) => l,
        };
        let rep: ShimReport = serde_json::from_str(&line)
            .map_err(|e| BackendError::engine(format!("bad shim report {line:?}: {e}")))?;
        if rep.ok {
            rep.pid
                .ok_or_else(|| BackendError::engine("the shim reported no pid"))
        } else {
            Err(BackendError::engine(
                rep.error.unwrap_or_else(|| "shim failed".into()),
            ))
        }
    }

    /// SIGKILL the namespace init (`init`, from libcontainer's state) and
    /// everything in the cgroup until the cgroup is empty or the deadline
    /// passes.
    fn kill_all(&self, p: &CellPaths, init: Option<i32>, cg: &CellCgroups, deadline: Instant) {
        if let Some(pid) = init
            && pid_in_cell(pid, &p.cgroup)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        loop {
            let pids = cg.pids();
            if pids.is_empty() || Instant::now() >= deadline {
                return;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn wait_shim_gone(&self, p: &CellPaths, deadline: Instant) {
        let Some(pid) = read_pid_file(&p.shim_pid()) else {
            return;
        };
        while shim_alive(pid, &p.dir) {
            if Instant::now() >= deadline {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                std::thread::sleep(Duration::from_millis(10));
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Close the cell's encrypted volume (stop, release): first the bind
    /// its root holds (`rt/volume`), so the volume's mount is free to go.
    fn close_volume(&self, id: &CellId) -> Result<(), BackendError> {
        let bind = self.paths(id).dir.join("rt").join("volume");
        match nix::mount::umount2(&bind, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(BackendError::io(
                    format!("unmounting {}", bind.display()),
                    e.into(),
                ));
            }
        }
        self.volumes.close_if_any(id)
    }

    /// Blocking teardown + verification (runs on a blocking thread).
    /// `uids`: the cell's leased range, checked for processes at the end.
    fn destroy_blocking(
        &self,
        id: &CellId,
        uids: Option<UidRange>,
        address: Option<std::net::Ipv4Addr>,
    ) -> TeardownReport {
        let p = self.paths(id);
        let mut report = TeardownReport::new(id.as_str());
        report.already_gone = !p.dir.exists() && !self.volumes.exists(id);
        let cg = match self.cgroups_of(&p.cgroup) {
            Ok(cg) => cg,
            Err(e) => {
                report.error(format!("reading cgroup mounts: {e}"));
                CellCgroups::from_hierarchies(&p.cgroup, &[])
            }
        };
        let deadline = Instant::now() + KILL_TIMEOUT;
        // No exec may be joining the cell while it is torn down (a late
        // join would re-create the cgroup): hold the exec lock throughout.
        // It lives in the cell dir and goes with it.
        let _exec_lock = exec::lock_for_destroy(&p.dir, deadline);
        let shim_pid = read_pid_file(&p.shim_pid());
        let init_pid = read_state_pid(&p.lc_state());

        // 1. processes: the cgroup's, then anything else still running as
        //    the cell's ids (a container init that failed before joining
        //    its cgroup, a zombie its parent has yet to reap).
        self.kill_all(&p, init_pid, &cg, deadline);
        self.wait_shim_gone(&p, deadline);
        // What still runs as the cell's ids once the kill is done: nothing
        // can join afterwards (the exec lock is ours), so this is the
        // report's check too.
        let uid_left = uids.map(|r| (r, kill_uids(r, deadline)));

        // 2. libcontainer's own delete (cgroups + its state dir).
        if p.lc_state().join("state.json").exists() {
            match libcontainer::container::Container::load(p.lc_state()) {
                Ok(mut c) => {
                    if let Err(e) = c.delete(true) {
                        report.error(format!("libcontainer delete: {}", shim::error_chain(&e)));
                    }
                }
                Err(e) => report.error(format!("libcontainer load: {}", shim::error_chain(&e))),
            }
        }
        // Fallback: remove any cgroup dir still there (empty by now).
        for d in cg.existing() {
            let mut tries = 0;
            while let Err(e) = fs::remove_dir(&d) {
                if e.kind() == io::ErrorKind::NotFound {
                    break;
                }
                tries += 1;
                if tries > 50 || Instant::now() >= deadline {
                    report.error(format!("rmdir {}: {e}", d.display()));
                    break;
                }
                self.kill_all(&p, init_pid, &cg, deadline);
                std::thread::sleep(Duration::from_millis(2));
            }
        }

        // 3. mounts under the cell dir (the secrets tmpfs).
        if let Ok(u) = cellhost_os::mountinfo::unmount_under(&p.dir, true) {
            for e in u.errors {
                report.error(e);
            }
        }

        // 4. the network (its own objects; checks of its own).
        if let Some(net) = &self.net {
            net.detach_if_any(id, address, &mut report);
        }

        // 5. the encrypted volume (its own dir; checks of its own).
        self.volumes.destroy_if_any(id, &mut report);

        // 6. the cell dir.
        if let Err(e) = fs::remove_dir_all(&p.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            report.error(format!("removing {}: {e}", p.dir.display()));
        }

        // Verify.
        let mut left: Vec<String> = cg.pids().iter().map(|p| p.to_string()).collect();
        if let Some(pid) = init_pid
            && pid_in_cell(pid, &p.cgroup)
        {
            left.push(format!("init {pid}"));
        }
        if let Some(pid) = shim_pid
            && shim_alive(pid, &p.dir)
        {
            left.push(format!("shim {pid}"));
        }
        report.check_detail(
            "processes",
            format!("cgroup {} + init + shim", cg.relative),
            left.len() as u64,
            left.join(" "),
        );
        let cgs = cg.existing();
        report.check_detail(
            "cgroup",
            cg.relative.clone(),
            cgs.len() as u64,
            cgs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
        );
        match hostfs::mounts_under(&p.dir) {
            Ok(ms) => {
                let secret_mounts = ms.iter().filter(|m| m.starts_with(p.secrets())).count() as u64;
                report.check_detail(
                    "mounts",
                    format!("/proc/self/mountinfo under {}", p.dir.display()),
                    ms.len() as u64,
                    ms.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                );
                report.check(
                    "secrets",
                    format!("tmpfs {}", p.secrets().display()),
                    secret_mounts + p.secrets().exists() as u64,
                );
            }
            Err(e) => {
                report.check_detail(
                    "mounts",
                    "/proc/self/mountinfo",
                    1,
                    format!("unreadable: {e}"),
                );
            }
        }
        report.check(
            "state_dir",
            p.dir.display().to_string(),
            p.dir.exists() as u64,
        );
        if let Some((r, left)) = uid_left {
            // Nothing may run as the cell's ids once it is gone: the range
            // goes to another cell next.
            report.check_detail(
                "uids",
                format!("processes running as {r}"),
                left.len() as u64,
                left.iter()
                    .map(|(pid, uid)| format!("{pid} (uid {uid})"))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        report
    }

    /// Ids of cells with a dir or a cgroup on this host.
    fn listed_ids(&self) -> Vec<CellId> {
        let mut ids: Vec<CellId> = Vec::new();
        if let Ok(rd) = fs::read_dir(self.cfg.state_dir.join("cells")) {
            for e in rd.flatten() {
                if let Ok(id) = CellId::parse(&e.file_name().to_string_lossy()) {
                    ids.push(id);
                }
            }
        }
        for id in self.volumes.list() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        if let Some(net) = &self.net {
            match net.cells() {
                Ok(net_ids) => {
                    for id in net_ids {
                        if !ids.contains(&id) {
                            ids.push(id);
                        }
                    }
                }
                Err(e) => tracing::warn!("listing bridged cells: {e}"),
            }
        }
        if let Ok(hs) = self.cached_hierarchies() {
            for n in hostfs::cell_cgroup_names_in(&self.instance, hs) {
                if let Some(id) = n
                    .strip_prefix("cellhost-")
                    .and_then(|s| CellId::parse(s).ok())
                    && !ids.contains(&id)
                {
                    ids.push(id);
                }
            }
        }
        ids.sort();
        ids
    }

    fn status_blocking(&self, id: &CellId) -> CellStatus {
        let p = self.paths(id);
        if let Some(exit) = cellhost_host::shim::read_exit(&p.dir) {
            return CellStatus {
                state: CellState::Exited,
                pid: None,
                exit: Some(exit),
            };
        }
        if !p.dir.exists() {
            // Only here is the cgroup worth walking: a cell dir answers
            // every other question.
            let cg_pids = self
                .cgroups_of(&p.cgroup)
                .map(|c| c.pids())
                .unwrap_or_default();
            return if cg_pids.is_empty() {
                CellStatus {
                    state: CellState::Gone,
                    pid: None,
                    exit: None,
                }
            } else {
                // An orphan: processes without a cell dir.
                CellStatus {
                    state: CellState::Running,
                    pid: cg_pids.first().map(|p| *p as u32),
                    exit: None,
                }
            };
        }
        let state = LcState::read(&p.lc_state());
        let pid = state.pid.filter(|pid| pid_in_cell(*pid, &p.cgroup));
        match (state.status.as_deref(), pid) {
            (Some("created"), Some(pid)) => CellStatus {
                state: CellState::Created,
                pid: Some(pid as u32),
                exit: None,
            },
            (_, Some(pid)) => CellStatus {
                state: CellState::Running,
                pid: Some(pid as u32),
                exit: None,
            },
            // The init is gone and no shim recorded how: it ended unobserved.
            (Some(_), None) => {
                let shim_up = read_pid_file(&p.shim_pid()).is_some_and(|s| shim_alive(s, &p.dir));
                if shim_up {
                    // The shim is about to write exit.json.
                    CellStatus {
                        state: CellState::Running,
                        pid: None,
                        exit: None,
                    }
                } else {
                    // The shim may have written exit.json and exited since
                    // we looked: read it again before calling it unknown.
                    let exit =
                        cellhost_host::shim::read_exit(&p.dir).unwrap_or_else(ExitInfo::unknown);
                    CellStatus {
                        state: CellState::Exited,
                        pid: None,
                        exit: Some(exit),
                    }
                }
            }
            // Dir but no container yet: a create in progress or interrupted.
            (None, None) => CellStatus {
                state: CellState::Created,
                pid: None,
                exit: None,
            },
        }
    }
}

/// SIGKILL every process running as an id of `r` until none is left or
/// the deadline passes; what is left then. Every such process is the
/// cell's: the range is leased to it alone.
fn kill_uids(r: UidRange, deadline: Instant) -> Vec<(i32, u32)> {
    loop {
        let left = cellhost_host::uids::processes_in(r);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        for (pid, _) in left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Let a created container run: libcontainer's start, minus its `chdir`.
///
/// `Container::start` reaches the init's notify socket by `chdir`ing into
/// the state dir (socket paths are limited to 108 bytes). The working
/// directory is process-wide, so two starts on two threads of a supervisor
/// race and can signal each other's cells. This connects through
/// `/proc/self/fd/<dirfd>/notify.sock` instead, then records the state
/// change the way libcontainer does.
fn start_container(lc_state: &Path) -> Result<(), BackendError> {
    use libcontainer::container::{Container, ContainerStatus};
    use std::os::fd::AsRawFd;
    let engine = |what: &str, e: &dyn std::error::Error| {
        BackendError::engine(format!("{what}: {}", shim::error_chain(e)))
    };
    let mut c = Container::load(lc_state.to_path_buf()).map_err(|e| engine("loading state", &e))?;
    if !c.can_start() {
        return Err(BackendError::engine(format!(
            "container is {:?}, not created",
            c.status()
        )));
    }
    let dir =
        fs::File::open(lc_state).map_err(io_err(format!("opening {}", lc_state.display())))?;
    let sock = format!(
        "/proc/self/fd/{}/{}",
        dir.as_raw_fd(),
        libcontainer::notify_socket::NOTIFY_FILE
    );
    let mut stream = std::os::unix::net::UnixStream::connect(&sock)
        .map_err(io_err("connecting to the cell's notify socket"))?;
    stream
        .write_all(b"start container")
        .map_err(io_err("signalling the cell to start"))?;
    // The init reads to EOF.
    drop(stream);
    c.set_status(ContainerStatus::Running)
        .save()
        .map_err(|e| engine("saving state", &e))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), BackendError> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("writing {}", path.display())))?;
    f.write_all(data)
        .map_err(io_err(format!("writing {}", path.display())))
}

use cellhost_host::shim::read_pid_file;

/// The two fields of libcontainer's `state.json` cellhost reads.
#[derive(Debug, Default, serde::Deserialize)]
struct LcState {
    status: Option<String>,
    pid: Option<i32>,
}

impl LcState {
    /// Read once; a missing or unreadable file is an empty state.
    fn read(lc_state: &Path) -> LcState {
        let mut st: LcState = fs::read(lc_state.join("state.json"))
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default();
        st.pid = st.pid.filter(|p| *p > 0);
        st
    }
}

pub(crate) fn read_state_pid(lc_state: &Path) -> Option<i32> {
    LcState::read(lc_state).pid
}

/// Is `pid` alive and a member of the cell's cgroup (guards against pid
/// reuse)?
pub(crate) fn pid_in_cell(pid: i32, cgroup: &str) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/cgroup")) {
        Ok(s) => s
            .lines()
            .any(|l| l.ends_with(&format!("/{}/{cgroup}", hostfs::CGROUP_PARENT))),
        Err(_) => false,
    }
}

/// Is `pid` a live shim of the cell at `dir`? (A zombie is not alive.)
fn shim_alive(pid: i32, dir: &Path) -> bool {
    cellhost_host::shim::alive_naming(pid, dir)
}

#[async_trait]
impl Backend for ProcessBackend {
    fn isolation(&self) -> Isolation {
        Isolation::Process
    }

    fn wants_uids(&self) -> bool {
        true
    }

    fn address_pool(&self, cell: &Cell) -> Option<cellhost_core::AddressPool> {
        let net = self.net.as_ref()?;
        (cell.spec.network.mode == cellhost_spec::NetworkMode::Bridged).then(|| net.pool())
    }

    fn handle_for(&self, id: &CellId, cell: &Cell) -> CellHandle {
        CellHandle {
            name: cell.metadata.name.clone(),
            ..self.found_handle(id)
        }
    }

    fn found_handle(&self, id: &CellId) -> CellHandle {
        let p = self.paths(id);
        CellHandle {
            id: id.clone(),
            name: id.object_name(),
            isolation: Isolation::Process,
            state_dir: p.dir.clone(),
            tier: serde_json::json!({
                "containerId": p.container_id,
                "cgroup": format!("/{}/{}", hostfs::CGROUP_PARENT, p.cgroup),
            }),
            uids: None,
            address: None,
        }
    }

    async fn create(&self, req: CreateRequest) -> Result<CellHandle, BackendError> {
        if req.cell.spec.isolation != Isolation::Process {
            return Err(BackendError::Invalid(format!(
                "spec.isolation is {}, this is the process tier",
                req.cell.spec.isolation
            )));
        }
        let uids = match (req.uids, self.cfg.user_namespace) {
            (Some(u), true) => Some(u),
            (_, false) => None,
            (None, true) => {
                return Err(BackendError::Invalid(
                    "process cells run in a user namespace of their own: the request needs the \
                     cell's leased uid range (the supervisor leases one)"
                        .into(),
                ));
            }
        };
        if self.address_pool(&req.cell).is_some() && req.address.is_none() {
            return Err(BackendError::Invalid(
                "a bridged cell attaches at its leased address: the request needs one from the \
                 tier's address pool (the supervisor leases one)"
                    .into(),
            ));
        }
        self.admit(&req.cell, req.volume_key.as_ref())?;
        let mut handle = self.handle_for(&req.id, &req.cell);
        handle.uids = uids;
        handle.address = req.address;
        let p = self.paths(&req.id);
        if p.dir.exists() || self.volumes.exists(&req.id) {
            // Leftovers at this id: pre-clean (idempotent).
            let _ = self.destroy(&handle).await?;
        }
        match self.create_inner(&req, &p, uids).await {
            Ok(None) => Ok(handle),
            Ok(Some(net)) => {
                let mut handle = handle;
                handle.tier["network"] = serde_json::to_value(&net).unwrap_or_default();
                Ok(handle)
            }
            Err(e) => {
                let report = self.destroy(&handle).await?;
                if report.is_clean() {
                    Err(e)
                } else {
                    Err(BackendError::engine(format!(
                        "{e}; rollback incomplete: {}",
                        report.summary()
                    )))
                }
            }
        }
    }

    async fn start(&self, handle: &CellHandle) -> Result<(), BackendError> {
        let id = handle.id.clone();
        self.blocking("start", move |this| {
            this.volumes.require_open(&id)?;
            start_container(&this.paths(&id).lc_state()).map_err(|e| match e {
                BackendError::Engine { context, source } => BackendError::Engine {
                    context: format!("starting cell {id}: {context}"),
                    source,
                },
                other => other,
            })
        })
        .await?
    }

    async fn stop(&self, handle: &CellHandle, grace: Duration) -> Result<(), BackendError> {
        let id = handle.id.clone();
        self.blocking("stop", move |this| {
            let p = this.paths(&id);
            let st = this.status_blocking(&id);
            if st.state != CellState::Running && st.state != CellState::Created {
                return this.close_volume(&id);
            }
            if let Some(pid) = st.pid {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
            let until = Instant::now() + grace;
            while Instant::now() < until && !p.exit().exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
            let cg = this
                .cgroups_of(&p.cgroup)
                .map_err(io_err("reading cgroups"))?;
            this.kill_all(
                &p,
                st.pid.map(|p| p as i32),
                &cg,
                Instant::now() + KILL_TIMEOUT,
            );
            this.wait_shim_gone(&p, Instant::now() + KILL_TIMEOUT);
            // Data at rest is ciphertext while the cell does not run.
            this.close_volume(&id)
        })
        .await?
    }

    async fn release(&self, handle: &CellHandle) -> Result<(), BackendError> {
        let id = handle.id.clone();
        self.blocking("release", move |this| this.close_volume(&id))
            .await?
    }

    async fn destroy(&self, handle: &CellHandle) -> Result<TeardownReport, BackendError> {
        let (id, uids, address) = (handle.id.clone(), handle.uids, handle.address);
        self.blocking("destroy", move |this| {
            this.destroy_blocking(&id, uids, address)
        })
        .await
    }

    async fn status(&self, handle: &CellHandle) -> Result<CellStatus, BackendError> {
        let id = handle.id.clone();
        self.blocking("status", move |this| this.status_blocking(&id))
            .await
    }

    async fn list(&self) -> Result<Vec<ListedCell>, BackendError> {
        self.blocking("list", |this| {
            this.listed_ids()
                .into_iter()
                .map(|id| {
                    let state = this.status_blocking(&id).state;
                    ListedCell {
                        id,
                        isolation: Isolation::Process,
                        state,
                    }
                })
                .collect()
        })
        .await
    }

    async fn logs(&self, handle: &CellHandle, offset: u64) -> Result<LogChunk, BackendError> {
        let path = self.paths(&handle.id).log();
        LogChunk::read_file(&path, offset, LOG_PAGE)
            .map_err(|e| BackendError::io(format!("reading {}", path.display()), e))?
            .ok_or_else(|| BackendError::NotFound(handle.id.clone()))
    }

    /// A bridged cell's nftables counters, as `network.counters`.
    async fn live_details(
        &self,
        handle: &CellHandle,
    ) -> Result<Option<serde_json::Value>, BackendError> {
        let (Some(net), Some(_)) = (self.net.clone(), handle.tier.get("network")) else {
            return Ok(None);
        };
        let id = handle.id.clone();
        self.blocking("counters", move |_| {
            net.live_details(&id).map_err(cellhost_net::backend_error)
        })
        .await?
    }

    /// A few small cgroupfs reads; cheap enough to run inline.
    async fn usage(&self, handle: &CellHandle) -> Result<ResourceUsage, BackendError> {
        self.usage_now(&handle.id)
    }

    /// See [`exec`]: a helper process joins the running cell with
    /// libcontainer's tenant builder. A timeout is `BackendError::Timeout`.
    async fn exec(
        &self,
        handle: &CellHandle,
        req: ExecRequest,
    ) -> Result<ExecOutput, BackendError> {
        exec::run(self, &handle.id, req).await
    }

    /// From inside the cell's network namespace, joined through a pidfd
    /// of its init, checked to be in the cell's cgroup.
    async fn connect(
        &self,
        handle: &CellHandle,
        port: u16,
    ) -> Result<std::net::TcpStream, BackendError> {
        let id = handle.id.clone();
        let state = exec::cell_state(self, &id).await?;
        if state != CellState::Running {
            return Err(exec::not_running(&id, "connect", state));
        }
        let pid = self
            .init_pid(&id)
            .ok_or_else(|| BackendError::NotFound(id.clone()))?;
        // `/proc/<pid>/cgroup` lines end in the path: this instance's
        // group of this cell (or below it).
        let object = format!("/{}", self.cgroup_object(&id));
        let belongs = move |cgroup: &str| {
            cgroup.lines().any(|l| {
                let path = l.splitn(3, ':').nth(2).unwrap_or_default();
                path.ends_with(&object) || path.contains(&format!("{object}/"))
            })
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        self.blocking("connect", move |_| {
            cellhost_host::netns::connect_in(
                pid,
                belongs,
                addr,
                cellhost_host::netns::CONNECT_TIMEOUT,
            )
        })
        .await?
        .map_err(|e| cellhost_host::netns::connect_error(&id, port, e))
    }
}
