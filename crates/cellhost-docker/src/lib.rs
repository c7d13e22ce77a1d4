//! The `container` tier: a cell is a Docker container, driven through the
//! Engine API with `bollard` (no docker CLI in the path).
//!
//! Invariants (layout, lifecycle and threat model in `docs/tiers.md`,
//! "container"):
//! - every object is named from the cell id, so destroy works from a fresh
//!   process after a crash and twice in a row; "no such container/volume"
//!   is success;
//! - `list` finds cells by the instance label and by leftovers (engine
//!   volumes, cell dirs, encrypted volumes), so reconcile sees half-made
//!   cells as orphans;
//! - a failed create removes what was made; destroy *checks* each object and
//!   reports what is left;
//! - the container's environment is exactly the document's plus what the
//!   engine and image add (HOSTNAME; PATH/HOME when unset; image ENV);
//! - secret values live only in the host tmpfs (never the create body,
//!   `docker inspect`, argv, logs or the store), so the engine must be local.
//!
//! See also [`disk`] (`diskGiB`) and [`volume`] (plain volumes).
//!
//! Design: `docs/tiers.md`.

pub mod disk;
mod egress;
mod mapping;
pub mod volume;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, ListVolumesOptions,
    LogsOptions, RemoveContainerOptions, RemoveVolumeOptions, StatsOptions, StopContainerOptions,
    WaitContainerOptions,
};
use cellhost_core::ids::CellId;
use cellhost_core::{
    Backend, BackendError, CellHandle, CellState, CellStatus, CreateRequest, ExecOutput,
    ExecRequest, ExitInfo, ListedCell, LogChunk, ResourceUsage, TeardownReport,
};
use cellhost_spec::{Cell, Isolation, NetworkMode};
use futures_util::StreamExt;
use tokio::sync::OnceCell;

pub use disk::{DiskChoice, DiskMode, LoopFs, Verdict};
use mapping::{LABEL_CELL, LABEL_INSTANCE};
pub use mapping::{Names, Policy};

/// Timeout for every API call but pulls and waits.
const API_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout for an image pull.
const PULL_TIMEOUT: Duration = Duration::from_secs(3600);
/// Client timeout of one wait request (`wait` asks again after it).
const WAIT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most bytes of output an exec returns per stream.
pub const EXEC_OUTPUT_CAP: usize = 16 << 20;

/// Called with one line per pull progress message.
pub type PullProgress = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Clone)]
pub struct DockerConfig {
    /// `<state>/docker`: per-cell dirs (secrets) and the instance tag.
    pub state_dir: PathBuf,
    pub policy: Policy,
    /// Where pull progress goes (the CLI prints it); `None` logs it.
    pub progress: Option<PullProgress>,
    /// Engine of encrypted volumes (`<state>/volumes`, bind-mounted into
    /// the container).
    pub volume_engine: cellhost_volume::EngineChoice,
    /// How `resources.diskGiB` is enforced (tests force each mode).
    pub disk: DiskChoice,
    /// Trust btrfs qgroups with `storage_opt size` (off: a btrfs engine's
    /// sized cells get scratch; see [`disk`] for why that is the default).
    pub btrfs_storage_opt: bool,
    /// Where sysfs is (`/sys`): the btrfs qgroup flag is read under it.
    /// A test points it at a copy that says "inconsistent".
    pub sys_root: PathBuf,
}

impl DockerConfig {
    /// Defaults: restart policy `no`, ports on 0.0.0.0, network
    /// `cellhost`, 16 MiB of log per container, 5 s stop timeout.
    pub fn new(state_dir: PathBuf) -> DockerConfig {
        DockerConfig {
            state_dir,
            policy: Policy {
                restart_unless_stopped: false,
                publish_address: "0.0.0.0".into(),
                network: "cellhost".into(),
                log_max_bytes: 16 << 20,
                stop_timeout_secs: 5,
                pull: true,
            },
            progress: None,
            volume_engine: cellhost_volume::EngineChoice::Auto,
            disk: DiskChoice::Auto,
            btrfs_storage_opt: false,
            sys_root: PathBuf::from("/sys"),
        }
    }
}

impl std::fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerConfig")
            .field("state_dir", &self.state_dir)
            .field("policy", &self.policy)
            .field("disk", &self.disk)
            .field("btrfs_storage_opt", &self.btrfs_storage_opt)
            .finish_non_exhaustive()
    }
}

pub struct DockerBackend {
    cfg: DockerConfig,
    instance: String,
    /// The client for DOCKER_HOST (or the default socket), made once.
    local: Result<Docker, String>,
    /// The same client after API version negotiation (the engine may be
    /// older than bollard's default version). Negotiated on first use and
    /// retried until it succeeds, so a backend made while dockerd is down
    /// works once it is up.
    negotiated: OnceCell<Docker>,
    /// Encrypted volumes of this tier's cells.
    volumes: cellhost_volume::Volumes,
    /// The host uid and gid of a container's root when the engine runs
    /// with `--userns-remap` (`None`: it does not). Asked once.
    remap: OnceCell<Option<(u32, u32)>>,
    /// Does the engine enforce `storage_opt size`? Asked once (see
    /// [`disk`]); `None` until a cell with `diskGiB` asked.
    verdict: std::sync::Mutex<Option<Verdict>>,
    /// The engine's data root when its storage driver is btrfs, whose
    /// qgroups are checked before each sized create (see [`disk`]).
    btrfs_root: std::sync::OnceLock<PathBuf>,
}

/// What a create with `diskGiB` does.
enum DiskPlan {
    /// `storage_opt size`; `probe`: the engine's answer is the verdict.
    StorageOpt {
        probe: bool,
    },
    Scratch,
}

/// Is this an engine answer with `status`?
pub(crate) fn is_status(e: &DockerError, status: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == status)
}

/// An engine error with context; the engine's own message when it sent
/// one, else what the client saw (socket missing, refused, timeout).
pub(crate) fn engine_err(ctx: &str, e: DockerError) -> BackendError {
    match e {
        // The engine's message is the cause, in words: the HTTP error
        // around it adds nothing.
        DockerError::DockerResponseServerError { message, .. } => {
            BackendError::engine(format!("{ctx}: {message}"))
        }
        other => BackendError::engine_from(format!("{ctx}: docker engine"), other),
    }
}

/// A residue count from an inspect call: 1 when the object answered, 0 on
/// 404, an error otherwise.
fn still_there<T>(r: Result<T, bollard::errors::Error>, what: &str) -> Result<u64, BackendError> {
    match r {
        Ok(_) => Ok(1),
        Err(e) if is_status(&e, 404) => Ok(0),
        Err(e) => Err(engine_err(&format!("checking {what}"), e)),
    }
}

/// An engine exit code as the contract's exit (unknown when absent).
fn exit_of(code: Option<i64>) -> ExitInfo {
    code.and_then(|c| i32::try_from(c).ok())
        .map_or_else(ExitInfo::unknown, ExitInfo::exited)
}

impl DockerBackend {
    pub fn new(cfg: DockerConfig) -> DockerBackend {
        let instance = cellhost_core::ids::instance_tag(&cfg.state_dir);
        let local = Docker::connect_with_local_defaults()
            .map(|d| d.with_timeout(API_TIMEOUT))
            .map_err(|e| e.to_string());
        let mut vcfg = cellhost_volume::VolumeConfig::new(cfg.state_dir.join("volumes"));
        vcfg.engine = cfg.volume_engine;
        DockerBackend {
            volumes: cellhost_volume::Volumes::new(vcfg),
            cfg,
            instance,
            local,
            negotiated: OnceCell::new(),
            remap: OnceCell::new(),
            verdict: std::sync::Mutex::new(None),
            btrfs_root: std::sync::OnceLock::new(),
        }
    }

    /// Whether the engine enforces `storage_opt size`, once a cell with
    /// `diskGiB` has asked it (`None` before).
    pub fn disk_verdict(&self) -> Option<Verdict> {
        self.verdict
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_verdict(&self, v: Verdict) {
        *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
    }

    /// The refusal of a cell whose disk the engine cannot limit, when the
    /// operator allows storage-opt only.
    fn no_storage_opt(why: &str) -> BackendError {
        BackendError::MissingCapability {
            capability: "docker.storage-opt".into(),
            detail: format!(
                "spec.resources.diskGiB: the engine cannot limit a container's writable layer ({why}), and this backend allows only storage_opt"
            ),
        }
    }

    /// How this cell's `diskGiB` is enforced (before anything is made).
    async fn disk_plan(
        &self,
        docker: &Docker,
        image_volumes: &[String],
    ) -> Result<DiskPlan, BackendError> {
        let forced = self.cfg.disk == DiskChoice::StorageOpt;
        match self.cfg.disk {
            DiskChoice::Scratch => return Ok(DiskPlan::Scratch),
            DiskChoice::Auto | DiskChoice::StorageOpt => {}
        }
        if !image_volumes.is_empty() {
            if forced {
                return Err(BackendError::Invalid(format!(
                    "spec.resources.diskGiB: the image declares VOLUME {}, which storage_opt size does not cover",
                    image_volumes.join(", ")
                )));
            }
            return Ok(DiskPlan::Scratch);
        }
        let verdict = match self.disk_verdict() {
            Some(v) => v,
            None => {
                let info = docker
                    .info()
                    .await
                    .map_err(|e| engine_err("asking the engine for its storage driver", e))?;
                let driver = info.driver.unwrap_or_default();
                if driver == "btrfs" {
                    let root = info.docker_root_dir.unwrap_or_default();
                    let _ = self.btrfs_root.set(PathBuf::from(root));
                }
                match disk::driver_verdict(&driver, self.cfg.btrfs_storage_opt) {
                    Some(v) => {
                        self.set_verdict(v.clone());
                        v
                    }
                    // The create itself asks the engine.
                    None => {
                        return self.unless_qgroups_broken(DiskPlan::StorageOpt { probe: true });
                    }
                }
            }
        };
        match (verdict.storage_opt, forced) {
            (true, _) => self.unless_qgroups_broken(DiskPlan::StorageOpt { probe: false }),
            (false, true) => Err(Self::no_storage_opt(&verdict.why)),
            (false, false) => Ok(DiskPlan::Scratch),
        }
    }

    /// `plan`, unless the engine's data root is btrfs and its qgroups do
    /// not hold their limits right now: then scratch, or a refusal when
    /// the operator allows storage-opt only. Asked at every sized create
    /// (the flag can turn on at any time; reading it is two small files).
    fn unless_qgroups_broken(&self, plan: DiskPlan) -> Result<DiskPlan, BackendError> {
        let Some(root) = self.btrfs_root.get() else {
            return Ok(plan);
        };
        let held = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("/proc/self/mountinfo: {e}"))
            .and_then(|mi| disk::btrfs_qgroups_hold(&mi, &self.cfg.sys_root, root));
        match held {
            Ok(()) => Ok(plan),
            Err(why) if self.cfg.disk == DiskChoice::StorageOpt => Err(Self::no_storage_opt(&why)),
            Err(why) => {
                tracing::warn!("{why}: diskGiB as a read-only root with a scratch disk");
                Ok(DiskPlan::Scratch)
            }
        }
    }

    /// A container's root on the host when the engine remaps users.
    async fn remap(&self, docker: &Docker) -> Result<Option<(u32, u32)>, BackendError> {
        self.remap
            .get_or_try_init(|| async {
                let info = docker
                    .info()
                    .await
                    .map_err(|e| engine_err("asking the engine about --userns-remap", e))?;
                remapped_root(
                    &info.security_options.unwrap_or_default(),
                    info.docker_root_dir.as_deref().unwrap_or(""),
                )
                .map_err(|detail| BackendError::MissingCapability {
                    capability: "docker.userns".into(),
                    detail,
                })
            })
            .await
            .copied()
    }

    /// The `VOLUME`s the image declares.
    async fn image_volumes(
        &self,
        docker: &Docker,
        image: &str,
    ) -> Result<Vec<String>, BackendError> {
        let img = docker
            .inspect_image(image)
            .await
            .map_err(|e| engine_err(&format!("inspecting image {image}"), e))?;
        let mut v = img.config.and_then(|c| c.volumes).unwrap_or_default();
        v.sort();
        Ok(v)
    }

    /// This tier's encrypted volumes.
    pub fn volumes(&self) -> &cellhost_volume::Volumes {
        &self.volumes
    }

    /// The API client, version negotiated.
    pub async fn client(&self) -> Result<&Docker, BackendError> {
        let local = self
            .local
            .as_ref()
            .map_err(|e| BackendError::MissingCapability {
                capability: "docker".into(),
                detail: e.clone(),
            })?;
        self.negotiated
            .get_or_try_init(|| async {
                local
                    .clone()
                    .negotiate_version()
                    .await
                    .map_err(|e| engine_err("connecting to the docker engine", e))
            })
            .await
    }

    fn cell_dir(&self, id: &CellId) -> PathBuf {
        self.cfg.state_dir.join("cells").join(id.as_str())
    }

    /// Make sure the image is present; pull it (with progress) if not.
    async fn ensure_image(&self, docker: &Docker, image: &str) -> Result<(), BackendError> {
        match docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(engine_err(&format!("inspecting image {image}"), e)),
        }
        if !self.cfg.policy.pull {
            return Err(BackendError::Invalid(format!(
                "spec.image: {image} is not among this host's images, and the operator's \
                 policy pulls none (policy: images.pull)"
            )));
        }
        let (repo, tag) = mapping::split_image(image);
        let opts = CreateImageOptions {
            from_image: Some(repo.to_string()),
            tag: Some(tag.to_string()),
            ..Default::default()
        };
        let puller = docker.clone().with_timeout(PULL_TIMEOUT);
        let mut stream = puller.create_image(Some(opts), None, None);
        let say = |line: String| match &self.cfg.progress {
            Some(p) => p(&line),
            None => tracing::info!("{line}"),
        };
        say(format!("pulling image {image}"));
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| match e {
                DockerError::DockerResponseServerError { message, .. }
                | DockerError::DockerStreamError { error: message } => {
                    BackendError::engine(format!("spec.image: pulling {image} failed: {message}"))
                }
                other => engine_err(&format!("spec.image: pulling {image}"), other),
            })?;
            if let Some(msg) = info.error_detail.and_then(|d| d.message) {
                return Err(BackendError::engine(format!(
                    "spec.image: pulling {image} failed: {msg}"
                )));
            }
            let mut line = String::new();
            if let Some(id) = &info.id {
                line.push_str(id);
                line.push_str(": ");
            }
            line.push_str(info.status.as_deref().unwrap_or(""));
            if let Some(p) = &info.progress_detail
                && let (Some(cur), Some(total)) = (p.current, p.total)
                && total > 0
            {
                line.push_str(&format!(
                    " {:.1}/{:.1} MB",
                    cur as f64 / 1e6,
                    total as f64 / 1e6
                ));
            }
            say(line);
        }
        // The stream ending is not proof: make sure it is there now.
        docker
            .inspect_image(image)
            .await
            .map(|_| ())
            .map_err(|e| engine_err(&format!("spec.image: {image} after pull"), e))
    }

    /// The create steps after the pre-clean; the caller rolls back on error.
    async fn make(&self, docker: &Docker, req: &CreateRequest) -> Result<(), BackendError> {
        let cell = &req.cell;
        let names = Names::of(&req.id);
        let labels = mapping::labels(
            &req.id,
            &self.instance,
            req.owner.as_deref(),
            &cell.metadata.name,
        );
        let dir = self.cell_dir(&req.id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| BackendError::io(format!("creating {}", dir.display()), e))?;
        // The disk limit is decided first: a refusal makes nothing more.
        let disk = match cell.spec.resources.disk_gib {
            None => None,
            Some(gib) => {
                let image_volumes = self.image_volumes(docker, &cell.spec.image).await?;
                let plan = self.disk_plan(docker, &image_volumes).await?;
                Some((gib, image_volumes, plan))
            }
        };
        // Under --userns-remap the container's root is a host uid of the
        // engine's range: what the cell must read or write is its own.
        let remap = if req.secrets.is_empty() && cell.spec.volume.is_none() {
            None
        } else {
            self.remap(docker).await?
        };
        let secrets_dir = if req.secrets.is_empty() {
            None
        } else {
            let s = dir.join("secrets");
            cellhost_core::secrets::write_tmpfs(&s, &req.secrets, None)?;
            if let Some(ids) = remap {
                chown_tree(&s, ids)?;
            }
            Some(s)
        };
        let encrypted = self.volumes.create_for(req).await?;
        if let (Some(open), Some(ids)) = (&encrypted, remap) {
            chown_tree(&open.data_dir, ids)?;
        }
        let volume: Option<PathBuf> = match (&encrypted, &cell.spec.volume) {
            (Some(open), _) => Some(open.data_dir.clone()),
            (None, Some(v)) => {
                let (plain, gib) = (volume::of(&dir), v.size_gib);
                Some(blocking(move || volume::make(&plain, gib, remap)).await?)
            }
            (None, None) => None,
        };
        let bridged = cell.spec.network.mode == NetworkMode::Bridged;
        if bridged {
            egress::ensure(docker, &self.cfg.policy.network).await?;
        }
        let body = |disk: Option<&mapping::DiskLimit<'_>>| {
            mapping::create_body(
                cell,
                labels.clone(),
                &self.cfg.policy,
                secrets_dir.as_deref(),
                volume.as_deref(),
                disk,
            )
        };
        let opts = CreateContainerOptions {
            name: Some(names.container.clone()),
            ..Default::default()
        };
        let creating = format!("creating container {}", names.container);
        let Some((gib, image_volumes, plan)) = disk else {
            docker
                .create_container(Some(opts), body(None))
                .await
                .map_err(|e| engine_err(&creating, e))?;
            return Ok(());
        };

        if let DiskPlan::StorageOpt { probe } = plan {
            let (d, host) = (dir.clone(), req.id.to_string());
            let net = blocking(move || disk::write_net_files(&d, &host, bridged)).await?;
            let limit = mapping::DiskLimit::StorageOpt {
                gib,
                net_files: &net,
                hostname: req.id.as_str(),
            };
            match docker
                .create_container(Some(opts.clone()), body(Some(&limit)))
                .await
            {
                Ok(_) => {
                    if probe {
                        self.set_verdict(Verdict {
                            storage_opt: true,
                            why: "the engine accepted storage_opt size".into(),
                        });
                    }
                    return Ok(());
                }
                Err(DockerError::DockerResponseServerError { message, .. })
                    if probe && disk::refuses_storage_opt(&message) =>
                {
                    self.set_verdict(Verdict {
                        storage_opt: false,
                        why: message.clone(),
                    });
                    if self.cfg.disk == DiskChoice::StorageOpt {
                        return Err(Self::no_storage_opt(&message));
                    }
                    tracing::info!(
                        "the engine refuses storage_opt size ({message}): diskGiB as a read-only root with a scratch disk"
                    );
                }
                Err(e) => return Err(engine_err(&creating, e)),
            }
        }

        let scratch = LoopFs::scratch(&dir);
        let skip: Vec<&str> = cell
            .spec
            .volume
            .iter()
            .map(|v| v.path.as_str())
            .chain(secrets_dir.as_ref().map(|_| mapping::SECRETS_TARGET))
            .collect();
        let binds = disk::scratch_binds(&scratch.mnt, &image_volumes, &skip);
        let dirs: Vec<PathBuf> = binds.iter().map(|(src, _)| src.clone()).collect();
        // Mode 1777: any uid of the cell, remapped or not, can write there.
        blocking(move || scratch.make(gib, &dirs, 0o1777)).await?;
        let limit = mapping::DiskLimit::Scratch { binds: &binds };
        docker
            .create_container(Some(opts), body(Some(&limit)))
            .await
            .map_err(|e| engine_err(&creating, e))?;
        Ok(())
    }

    /// Refuse what this tier cannot do yet, before anything is made.
    fn check_supported(&self, req: &CreateRequest) -> Result<(), BackendError> {
        let cell = &req.cell;
        cellhost_spec::validate_for(Isolation::Container, cell)
            .map_err(|e| BackendError::Invalid(e.to_string()))?;
        self.volumes.admit(cell, req.volume_key.as_ref())?;
        Ok(())
    }

    /// Wait for the container to stop running; its exit as `status` sees it.
    /// (Not in the `Backend` contract: the benchmark uses it to avoid
    /// polling.)
    pub async fn wait(&self, handle: &CellHandle) -> Result<CellStatus, BackendError> {
        let docker = self.client().await?;
        let name = Names::of(&handle.id).container;
        // One long request at a time: a client timeout just asks again.
        let waiter = docker.clone().with_timeout(WAIT_TIMEOUT);
        loop {
            let opts = WaitContainerOptions {
                condition: "not-running".into(),
            };
            match waiter.wait_container(&name, Some(opts)).next().await {
                // A non-zero exit arrives as an "error" from bollard.
                Some(Ok(_)) | Some(Err(DockerError::DockerContainerWaitError { .. })) | None => {
                    return self.status(handle).await;
                }
                Some(Err(DockerError::RequestTimeoutError)) => continue,
                Some(Err(e)) if is_status(&e, 404) => {
                    return Err(BackendError::NotFound(handle.id.clone()));
                }
                Some(Err(e)) => return Err(engine_err(&format!("waiting for {name}"), e)),
            }
        }
    }

    /// Every container, volume and cell dir of this instance, by cell id.
    async fn listed_ids(&self, docker: &Docker) -> Result<Vec<(CellId, CellState)>, BackendError> {
        let filter = std::collections::HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_INSTANCE}={}", self.instance)],
        )]);
        let containers = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filter.clone()),
                ..Default::default()
            }))
            .await
            .map_err(|e| engine_err("listing containers", e))?;
        let mut out: Vec<(CellId, CellState)> = Vec::new();
        let mut seen = HashSet::new();
        for c in containers {
            let Some(id) = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_CELL))
                .and_then(|v| CellId::parse(v).ok())
            else {
                continue;
            };
            let state = cell_state(c.state.map(|s| s.to_string()).as_deref());
            if seen.insert(id.clone()) {
                out.push((id, state));
            }
        }
        let volumes = docker
            .list_volumes(Some(ListVolumesOptions {
                filters: Some(filter),
            }))
            .await
            .map_err(|e| engine_err("listing volumes", e))?;
        let vol_ids = volumes
            .volumes
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| v.labels.get(LABEL_CELL).and_then(|s| CellId::parse(s).ok()));
        let dir_ids = fs::read_dir(self.cfg.state_dir.join("cells"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| CellId::parse(&e.file_name().to_string_lossy()).ok());
        for id in vol_ids.chain(dir_ids).chain(self.volumes.list()) {
            if seen.insert(id.clone()) {
                // Leftovers without a container: nothing runs.
                out.push((id, CellState::Exited));
            }
        }
        Ok(out)
    }
}

/// The engine's state word (`created`, `running`, `exited`, ...) as the
/// contract's state; anything that is not created or running has ended.
fn cell_state(engine: Option<&str>) -> CellState {
    match engine {
        Some("created") => CellState::Created,
        Some("running" | "restarting" | "paused") => CellState::Running,
        _ => CellState::Exited,
    }
}

/// A container's state as the contract's.
fn to_status(state: Option<&bollard::models::ContainerState>) -> CellStatus {
    let Some(s) = state else {
        return CellStatus {
            state: CellState::Exited,
            pid: None,
            exit: Some(ExitInfo::unknown()),
        };
    };
    let pid = s.pid.filter(|p| *p > 0).and_then(|p| u32::try_from(p).ok());
    match cell_state(s.status.map(|x| x.to_string()).as_deref()) {
        CellState::Created => CellStatus {
            state: CellState::Created,
            pid: None,
            exit: None,
        },
        CellState::Running => CellStatus {
            state: CellState::Running,
            pid,
            exit: None,
        },
        _ => {
            let exit = if s.oom_killed == Some(true) {
                ExitInfo {
                    code: None,
                    signal: Some(libc::SIGKILL),
                    oom_killed: true,
                }
            } else {
                exit_of(s.exit_code)
            };
            CellStatus {
                state: CellState::Exited,
                pid: None,
                exit: Some(exit),
            }
        }
    }
}

#[async_trait]
impl Backend for DockerBackend {
    fn isolation(&self) -> Isolation {
        Isolation::Container
    }

    fn found_handle(&self, id: &CellId) -> CellHandle {
        let names = Names::of(id);
        CellHandle {
            id: id.clone(),
            name: names.container.clone(),
            isolation: Isolation::Container,
            state_dir: self.cell_dir(id),
            tier: serde_json::json!({
                "container": names.container,
                "instance": self.instance,
            }),
            uids: None,
            address: None,
        }
    }

    fn handle_for(&self, id: &CellId, cell: &Cell) -> CellHandle {
        let mut handle = self.found_handle(id);
        // The host file that backs spec.volume.
        handle.tier["volume"] = serde_json::json!(cell.spec.volume.as_ref().map(|v| {
            if v.encrypted {
                self.volumes.paths(id).disk
            } else {
                volume::of(&self.cell_dir(id)).img
            }
        }));
        handle.tier["image"] = serde_json::json!(cell.spec.image);
        handle
    }

    async fn create(&self, req: CreateRequest) -> Result<CellHandle, BackendError> {
        if req.cell.spec.isolation != Isolation::Container {
            return Err(BackendError::Invalid(format!(
                "the container backend got a {} cell",
                req.cell.spec.isolation
            )));
        }
        self.check_supported(&req)?;
        let docker = self.client().await?;
        let handle = self.handle_for(&req.id, &req.cell);
        // Leftovers of an earlier attempt at this id go first.
        let pre = self.destroy(&handle).await?;
        if !pre.is_clean() {
            return Err(BackendError::engine(format!(
                "cleaning leftovers of {}: {}",
                req.id,
                pre.summary()
            )));
        }
        // A failed pull makes nothing, so it needs no rollback.
        self.ensure_image(docker, &req.cell.spec.image).await?;
        if let Err(e) = self.make(docker, &req).await {
            match self.destroy(&handle).await {
                Ok(r) if r.is_clean() => {}
                Ok(r) => tracing::warn!("rolling back {}: {}", req.id, r.summary()),
                Err(d) => tracing::warn!("rolling back {}: {d}", req.id),
            }
            return Err(e);
        }
        Ok(handle)
    }

    async fn start(&self, handle: &CellHandle) -> Result<(), BackendError> {
        // Without its open volume the bind source is missing: say why
        // rather than let the engine fail on the path.
        self.volumes.require_open(&handle.id)?;
        // A plain volume unmounted since (a host reboot) is mounted again:
        // its data is the cell's until destroy.
        let plain = volume::of(&self.cell_dir(&handle.id));
        blocking(move || volume::ensure_mounted(&plain)).await?;
        let docker = self.client().await?;
        let name = Names::of(&handle.id).container;
        match docker.start_container(&name, None).await {
            Ok(()) => Ok(()),
            // 304: already started.
            Err(e) if is_status(&e, 304) => Ok(()),
            Err(e) if is_status(&e, 404) => Err(BackendError::NotFound(handle.id.clone())),
            Err(e) => Err(engine_err(&format!("starting {name}"), e)),
        }
    }

    async fn stop(&self, handle: &CellHandle, grace: Duration) -> Result<(), BackendError> {
        let docker = self.client().await?;
        let name = Names::of(&handle.id).container;
        let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let opts = StopContainerOptions {
            t: Some(i32::try_from(secs).unwrap_or(i32::MAX)),
            signal: None,
        };
        // The engine's stop waits the grace period itself; give the call
        // that long on top of the usual timeout.
        let stopper = docker.clone().with_timeout(API_TIMEOUT + grace);
        match stopper.stop_container(&name, Some(opts)).await {
            Ok(()) => {}
            // 304: already stopped.
            Err(e) if is_status(&e, 304) => {}
            Err(e) if is_status(&e, 404) => return Err(BackendError::NotFound(handle.id.clone())),
            Err(e) => return Err(engine_err(&format!("stopping {name}"), e)),
        }
        // Data at rest is ciphertext while the cell does not run; start
        // needs the key again.
        let id = handle.id.clone();
        self.volumes.blocking(move |v| v.close_if_any(&id)).await
    }

    /// With restart policy `no` an exited container stays exited: close
    /// its volume. Under `unless-stopped` the engine restarts it and needs
    /// the volume open.
    async fn release(&self, handle: &CellHandle) -> Result<(), BackendError> {
        if self.cfg.policy.restart_unless_stopped {
            return Ok(());
        }
        let id = handle.id.clone();
        self.volumes.blocking(move |v| v.close_if_any(&id)).await
    }

    async fn open_volume(
        &self,
        handle: &CellHandle,
        key: &cellhost_core::VolumeKey,
    ) -> Result<(), BackendError> {
        let (id, key) = (handle.id.clone(), key.duplicate());
        self.volumes
            .blocking(move |v| Ok(v.open(&id, &key).map(|_| ())?))
            .await
    }

    async fn destroy(&self, handle: &CellHandle) -> Result<TeardownReport, BackendError> {
        let docker = self.client().await?;
        let names = Names::of(&handle.id);
        let dir = self.cell_dir(&handle.id);
        let secrets = dir.join("secrets");
        let mut report = TeardownReport::new(handle.id.to_string());

        // The container's anonymous volumes, named before removal so they
        // can be checked after.
        let mut anon: Vec<String> = Vec::new();
        let container_existed = match docker.inspect_container(&names.container, None).await {
            Ok(c) => {
                for m in c.mounts.unwrap_or_default() {
                    if m.typ.as_deref() == Some("volume")
                        && let Some(n) = m.name
                        && n != names.volume
                    {
                        anon.push(n);
                    }
                }
                true
            }
            Err(e) if is_status(&e, 404) => false,
            Err(e) => return Err(engine_err(&format!("inspecting {}", names.container), e)),
        };
        if container_existed {
            let opts = RemoveContainerOptions {
                force: true,
                v: true,
                link: false,
            };
            match docker.remove_container(&names.container, Some(opts)).await {
                Ok(()) => {}
                Err(e) if is_status(&e, 404) => {}
                Err(e) => report.error(format!("removing container {}: {e}", names.container)),
            }
        }
        let volume_existed = match docker
            .remove_volume(&names.volume, Some(RemoveVolumeOptions { force: false }))
            .await
        {
            Ok(()) => true,
            Err(e) if is_status(&e, 404) => false,
            Err(e) => {
                report.error(format!("removing volume {}: {e}", names.volume));
                true
            }
        };
        let unmounted = cellhost_os::mountinfo::unmount_under(&secrets, true).unwrap_or_default();
        report.errors.extend(unmounted.errors);
        let mounted = unmounted.found;
        let (plain, scratch) = (volume::of(&dir), LoopFs::scratch(&dir));
        let (plain_existed, disk_existed);
        (report, plain_existed, disk_existed) = blocking(move || {
            let plain = plain.teardown(&mut report);
            let disk = scratch.teardown(&mut report);
            Ok::<_, BackendError>((report, plain, disk))
        })
        .await?;
        let volume_dir_existed = self.volumes.exists(&handle.id);
        if volume_dir_existed {
            let id = handle.id.clone();
            report = self
                .volumes
                .blocking(move |v| {
                    v.destroy_into(&id, &mut report);
                    Ok(report)
                })
                .await?;
        }
        let dir_existed = match fs::remove_dir_all(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                report.error(format!("removing {}: {e}", dir.display()));
                true
            }
        };

        // Checks: what is still there now. What the engine or the kernel
        // already said was absent above is not asked for again.
        let container_left = if container_existed {
            still_there(
                docker.inspect_container(&names.container, None).await,
                &names.container,
            )?
        } else {
            0
        };
        report.check(
            "container",
            format!("engine container {}", names.container),
            container_left,
        );
        let volume_left = if volume_existed {
            still_there(docker.inspect_volume(&names.volume).await, &names.volume)?
        } else {
            0
        };
        // Cells made before plain volumes were file systems had one.
        report.check(
            "volume",
            format!("engine volume {}", names.volume),
            volume_left,
        );
        let mut anon_left = Vec::new();
        for v in &anon {
            if !matches!(docker.inspect_volume(v).await, Err(e) if is_status(&e, 404)) {
                anon_left.push(v.as_str());
            }
        }
        report.check_detail(
            "anonymous-volumes",
            format!("{} anonymous volume(s) of the container", anon.len()),
            anon_left.len() as u64,
            anon_left.join(", "),
        );
        let endpoints = match docker.inspect_network(&self.cfg.policy.network, None).await {
            Ok(net) => net
                .containers
                .unwrap_or_default()
                .values()
                .filter(|ep| ep.name.as_deref() == Some(names.container.as_str()))
                .count() as u64,
            Err(e) if is_status(&e, 404) => 0,
            Err(e) => return Err(engine_err("checking network endpoints", e)),
        };
        report.check(
            "network-endpoints",
            format!("network {}", self.cfg.policy.network),
            endpoints,
        );
        let secret_mounts = if mounted.is_empty() {
            0
        } else {
            cellhost_os::mountinfo::mounts_under(&secrets)
                .map(|m| m.len() as u64)
                .unwrap_or(0)
        };
        report.check(
            "secrets",
            format!("tmpfs {}", secrets.display()),
            secret_mounts,
        );
        report.check(
            "state-dir",
            dir.display().to_string(),
            (dir_existed && dir.exists()) as u64,
        );
        report.already_gone = !container_existed
            && !volume_existed
            && !dir_existed
            && !volume_dir_existed
            && !plain_existed
            && !disk_existed;
        Ok(report)
    }

    async fn status(&self, handle: &CellHandle) -> Result<CellStatus, BackendError> {
        let docker = self.client().await?;
        let name = Names::of(&handle.id).container;
        match docker.inspect_container(&name, None).await {
            Ok(c) => Ok(to_status(c.state.as_ref())),
            Err(e) if is_status(&e, 404) => Ok(CellStatus {
                state: CellState::Gone,
                pid: None,
                exit: None,
            }),
            Err(e) => Err(engine_err(&format!("inspecting {name}"), e)),
        }
    }

    async fn list(&self) -> Result<Vec<ListedCell>, BackendError> {
        let docker = self.client().await?;
        Ok(self
            .listed_ids(docker)
            .await?
            .into_iter()
            .map(|(id, state)| ListedCell {
                id,
                isolation: Isolation::Container,
                state,
            })
            .collect())
    }

    async fn logs(&self, handle: &CellHandle, offset: u64) -> Result<LogChunk, BackendError> {
        let docker = self.client().await?;
        let name = Names::of(&handle.id).container;
        let opts = LogsOptions {
            follow: false,
            stdout: true,
            stderr: true,
            tail: "all".into(),
            ..Default::default()
        };
        // The engine has no byte offsets: read the whole (capped) log and
        // skip what the caller has.
        let mut data = Vec::new();
        let mut s = docker.logs(&name, Some(opts));
        while let Some(item) = s.next().await {
            match item {
                Ok(LogOutput::StdOut { message } | LogOutput::StdErr { message })
                | Ok(LogOutput::Console { message }) => data.extend_from_slice(&message),
                Ok(LogOutput::StdIn { .. }) => {}
                Err(e) if is_status(&e, 404) => {
                    return Err(BackendError::NotFound(handle.id.clone()));
                }
                Err(e) => return Err(engine_err(&format!("reading the log of {name}"), e)),
            }
        }
        // The engine rotates a full log by truncating it (one file, capped):
        // a log shorter than the caller's offset started over, and all of
        // it is new to the caller.
        let len = data.len() as u64;
        let from = if offset > len { 0 } else { offset as usize };
        // Always everything up to the end: there is never more.
        Ok(LogChunk {
            data: data.split_off(from),
            next_offset: len,
            more: false,
        })
    }

    async fn usage(&self, handle: &CellHandle) -> Result<ResourceUsage, BackendError> {
        let docker = self.client().await?;
        let name = Names::of(&handle.id).container;
        let opts = StatsOptions {
            stream: false,
            one_shot: true,
        };
        let mut s = docker.stats(&name, Some(opts));
        match s.next().await {
            Some(Ok(st)) => Ok(ResourceUsage {
                cpu_ns: st
                    .cpu_stats
                    .and_then(|c| c.cpu_usage)
                    .and_then(|u| u.total_usage)
                    .unwrap_or(0),
                memory_bytes: st.memory_stats.and_then(|m| m.usage).unwrap_or(0),
            }),
            Some(Err(e)) if is_status(&e, 404) => Err(BackendError::NotFound(handle.id.clone())),
            Some(Err(e)) => Err(engine_err(&format!("stats of {name}"), e)),
            None => Err(BackendError::engine(format!("stats of {name}: no answer"))),
        }
    }

    /// From inside the container's network namespace, joined through a
    /// pidfd of its init, checked to be in the container's cgroup.
    async fn connect(
        &self,
        handle: &CellHandle,
        port: u16,
    ) -> Result<std::net::TcpStream, BackendError> {
        let docker = self.client().await?;
        let name = Names::of(&handle.id).container;
        let c = match docker.inspect_container(&name, None).await {
            Ok(c) => c,
            Err(e) if is_status(&e, 404) => return Err(BackendError::NotFound(handle.id.clone())),
            Err(e) => return Err(engine_err(&format!("inspecting {name}"), e)),
        };
        let st = to_status(c.state.as_ref());
        let (Some(full_id), Some(pid)) = (c.id, st.pid.filter(|_| st.state == CellState::Running))
        else {
            return Err(BackendError::WrongState {
                id: handle.id.clone(),
                op: "connect",
                state: st.state,
                wanted: "running",
            });
        };
        let pid =
            i32::try_from(pid).map_err(|_| BackendError::engine(format!("{name}: pid {pid}")))?;
        let belongs = move |cgroup: &str| cgroup.contains(&full_id);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let id = handle.id.clone();
        tokio::task::spawn_blocking(move || {
            cellhost_host::netns::connect_in(
                pid,
                belongs,
                addr,
                cellhost_host::netns::CONNECT_TIMEOUT,
            )
        })
        .await
        .map_err(|e| BackendError::engine(format!("connect task: {e}")))?
        .map_err(|e| cellhost_host::netns::connect_error(&id, port, e))
    }

    async fn exec(
        &self,
        handle: &CellHandle,
        req: ExecRequest,
    ) -> Result<ExecOutput, BackendError> {
        let docker = self.client().await?;
        let name = Names::of(&handle.id).container;
        let st = self.status(handle).await?;
        if st.state != CellState::Running {
            return Err(BackendError::WrongState {
                id: handle.id.clone(),
                op: "exec",
                state: st.state,
                wanted: "running",
            });
        }
        let env: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let created = docker
            .create_exec(
                &name,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    attach_stdin: Some(false),
                    tty: Some(false),
                    env: Some(env),
                    cmd: Some(req.argv.clone()),
                    working_dir: req.cwd.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| engine_err(&format!("exec in {name}"), e))?;
        let exec_id = created.id;
        let started = docker
            .start_exec(
                &exec_id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: None,
                }),
            )
            .await
            .map_err(|e| engine_err(&format!("exec in {name}"), e))?;
        let StartExecResults::Attached { mut output, .. } = started else {
            return Err(BackendError::engine(format!(
                "exec in {name}: engine detached"
            )));
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let collect = async {
            while let Some(item) = output.next().await {
                match item {
                    Ok(LogOutput::StdOut { message }) => push_capped(&mut out, &message),
                    Ok(LogOutput::StdErr { message }) => push_capped(&mut err, &message),
                    Ok(_) => {}
                    Err(e) => return Err(engine_err(&format!("exec output from {name}"), e)),
                }
            }
            Ok(())
        };
        let finished = match req.timeout {
            Some(t) => tokio::time::timeout(t, collect).await,
            None => Ok(collect.await),
        };
        match finished {
            Ok(r) => r?,
            Err(_) => {
                // The engine cannot kill an exec: kill its process (the
                // engine is local; the pid is the host's).
                if let Ok(i) = docker.inspect_exec(&exec_id).await
                    && let Some(pid) = i.pid.filter(|p| *p > 0)
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Err(BackendError::Timeout(
                    req.timeout.unwrap_or_default(),
                    "the exec'd command",
                ));
            }
        }
        let info = docker
            .inspect_exec(&exec_id)
            .await
            .map_err(|e| engine_err(&format!("exec in {name}"), e))?;
        let exit = exit_of(info.exit_code);
        Ok(ExecOutput {
            exit,
            stdout: out,
            stderr: err,
        })
    }
}

/// The host uid and gid of a container's root under `--userns-remap`
/// (`SecurityOptions` has `name=userns`): dockerd keeps that engine's data
/// in `<data root>/<uid>.<gid>`. `None` without remapping.
fn remapped_root(
    security_options: &[String],
    root_dir: &str,
) -> Result<Option<(u32, u32)>, String> {
    let on = security_options
        .iter()
        .any(|o| o.split(',').any(|kv| kv == "name=userns"));
    if !on {
        return Ok(None);
    }
    let last = std::path::Path::new(root_dir)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    last.split_once('.')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
        .map(Some)
        .ok_or_else(|| {
            format!("dockerd runs with --userns-remap but its data root {root_dir:?} does not name the remapped uid.gid")
        })
}

/// Give `path` and what is directly in it to the remapped root.
fn chown_tree(path: &std::path::Path, (uid, gid): (u32, u32)) -> Result<(), BackendError> {
    let own = |p: &std::path::Path| {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid))
            .map_err(|e| BackendError::io(format!("chown {uid}:{gid} {}", p.display()), e))
    };
    own(path)?;
    for entry in fs::read_dir(path)
        .map_err(|e| BackendError::io(format!("reading {}", path.display()), e))?
    {
        let entry =
            entry.map_err(|e| BackendError::io(format!("reading {}", path.display()), e))?;
        own(&entry.path())?;
    }
    Ok(())
}

/// Run blocking host work (mkfs, mount, files) off the async workers.
async fn blocking<T: Send + 'static, E: Into<BackendError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::engine_from("host task", e))?
        .map_err(Into::into)
}

fn push_capped(buf: &mut Vec<u8>, data: &[u8]) {
    let room = EXEC_OUTPUT_CAP.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerState, ContainerStateStatusEnum};

    #[test]
    fn states_map_to_the_contract() {
        let st = |status, code, oom| ContainerState {
            status: Some(status),
            exit_code: Some(code),
            oom_killed: Some(oom),
            pid: Some(0),
            ..Default::default()
        };
        assert_eq!(
            to_status(Some(&st(ContainerStateStatusEnum::CREATED, 0, false))).state,
            CellState::Created
        );
        let exited = to_status(Some(&st(ContainerStateStatusEnum::EXITED, 3, false)));
        assert_eq!(exited.state, CellState::Exited);
        assert_eq!(exited.exit, Some(ExitInfo::exited(3)));
        let oom = to_status(Some(&st(ContainerStateStatusEnum::EXITED, 137, true)));
        assert!(oom.exit.unwrap().oom_killed);
        let mut running = st(ContainerStateStatusEnum::RUNNING, 0, false);
        running.pid = Some(4242);
        let r = to_status(Some(&running));
        assert_eq!((r.state, r.pid), (CellState::Running, Some(4242)));
    }

    #[test]
    fn the_remapped_root_is_read_from_info() {
        let opts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let seccomp = opts(&["name=seccomp,profile=default"]);
        assert_eq!(remapped_root(&seccomp, "/var/lib/docker"), Ok(None));
        let remap = opts(&["name=seccomp,profile=default", "name=userns"]);
        assert_eq!(
            remapped_root(&remap, "/var/lib/docker/100000.100000"),
            Ok(Some((100000, 100000)))
        );
        assert_eq!(
            remapped_root(&remap, "/d/231072.231073/"),
            Ok(Some((231072, 231073)))
        );
        let err = remapped_root(&remap, "/var/lib/docker").unwrap_err();
        assert!(err.contains("--userns-remap"), "{err}");
    }

    #[test]
    fn exec_output_is_capped() {
        let mut b = vec![0u8; EXEC_OUTPUT_CAP - 2];
        push_capped(&mut b, b"abcd");
        assert_eq!(b.len(), EXEC_OUTPUT_CAP);
        assert_eq!(&b[b.len() - 2..], b"ab");
    }
}
