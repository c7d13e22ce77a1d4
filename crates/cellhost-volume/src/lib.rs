//! Consumer-keyed encrypted volumes for cells: the consumer's key
//! ([`VolumeKey`]) encrypts an ext4 file system on a LUKS container file,
//! through dm-crypt ([`EngineKind::DmCrypt`], LUKS2) or userspace
//! ([`EngineKind::Userspace`], LUKS1 via `qemu-storage-daemon`), chosen by
//! [`probe`] unless the operator forces one ([`EngineChoice`]).
//!
//! Invariants (layout, lifecycle, threat model in `docs/volumes.md`):
//! - the key never touches argv, the environment, a file, a log or the
//!   store: it goes over a pipe on stdin; passphrases are
//!   [`zeroize::Zeroizing`];
//! - tiers bind `mnt/data`, never `mnt`: a closed volume leaves no path a
//!   cell could write plaintext to;
//! - create starts with destroy's cleanup and rolls back on failure;
//!   destroy and close of a missing or half-made volume succeed;
//! - destroy erases every keyslot in place before deleting the file;
//! - an open volume outlives the process that opened it (the storage daemon
//!   has its own session, mounts are the kernel's): a restarted daemon finds
//!   it open ([`Volumes::is_open`]);
//! - every argv is fixed text plus paths under `<root>`.
//!
//! Design: `docs/volumes.md`.

mod engine;
mod erase;
pub use erase::{ERASE_BYTES, erase_header};
mod tier;
mod tools;

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cellhost_core::{TeardownReport, VolumeKey, ids::CellId};
use cellhost_os::mountinfo::mounts_under;
use serde::{Deserialize, Serialize};

pub use engine::{EngineChoice, EngineKind, LuksFormat, Probe, probe};
pub use tools::Tools;
/// Loop-device residue helpers, shared with tiers that loop-mount files of
/// their own (the container tier's per-cell scratch disk and plain volume).
pub use tools::{detach_loops, detach_loops_of_file, loops_backed_by, loops_backed_by_file};

/// Make `disk` a sparse file of `size` bytes formatted as LUKS1 with the
/// same parameters as every cellhost volume (aes-xts-plain64, 512-bit
/// key, sha256, PBKDF2 at the minimum count: the passphrase is a random
/// 256-bit key), passphrase on stdin. LUKS1 is the format qemu's own
/// `luks` block driver opens: the vm tiers hand such a file to qemu,
/// which decrypts it for the guest (qemu-img's own LUKS creation
/// benchmarks PBKDF2 with thread CPU time, which this host does not
/// measure: "Unable to get accurate CPU usage").
pub fn format_luks1(
    tools: &Tools,
    id: &CellId,
    disk: &std::path::Path,
    size: u64,
    key: &VolumeKey,
) -> Result<(), VolumeError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(disk)
        .and_then(|f| f.set_len(size).map(|_| f));
    if let Err(e) = f {
        return Err(VolumeError::Io {
            context: format!("creating {}", disk.display()),
            source: e,
        });
    }
    engine::format(tools, id, disk, LuksFormat::Luks1, key)
}

/// Bytes in a GiB.
const GIB: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No engine can run here, or a forced one cannot.
    #[error("host lacks an encrypted-volume engine: {0}")]
    Unavailable(String),
    #[error("the volume key does not open the encrypted volume of cell {0}; nothing was changed")]
    WrongKey(CellId),
    #[error("cell {0} has no encrypted volume on this host")]
    NotFound(CellId),
    #[error("spec.volume.sizeGiB: {0}")]
    Size(String),
    /// A step of create/open failed; `step` names it (format, open, mkfs,
    /// mount...), `detail` is the tool's own message.
    #[error("encrypted volume of cell {id}: {step} failed: {detail}")]
    Step {
        id: CellId,
        step: &'static str,
        detail: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl VolumeError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        VolumeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// How the volumes of this host are made.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// Parent of every per-cell volume dir (`<state>/volumes`).
    pub root: PathBuf,
    pub engine: EngineChoice,
    /// Where the tools are (default: found on `PATH`).
    pub tools: Tools,
}

impl VolumeConfig {
    pub fn new(root: impl Into<PathBuf>) -> VolumeConfig {
        VolumeConfig {
            root: root.into(),
            engine: EngineChoice::Auto,
            tools: Tools::default(),
        }
    }
}

/// What `volume.json` records about a volume. Never the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMeta {
    pub engine: EngineKind,
    pub format: LuksFormat,
    pub size_gib: u64,
}

/// An open, mounted volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenVolume {
    /// The directory a tier binds into the cell (`mnt/data`).
    pub data_dir: PathBuf,
    pub engine: EngineKind,
    pub format: LuksFormat,
    pub size_gib: u64,
}

/// The paths of one cell's volume.
#[derive(Debug, Clone)]
pub struct VolumePaths {
    pub dir: PathBuf,
    pub meta: PathBuf,
    pub disk: PathBuf,
    pub plain: PathBuf,
    pub pidfile: PathBuf,
    pub mnt: PathBuf,
    pub data: PathBuf,
    /// dm-crypt mapping name.
    pub mapper: String,
}

/// The encrypted volumes of one host (one state dir).
#[derive(Debug, Clone)]
pub struct Volumes {
    root: PathBuf,
    /// The engine new volumes get, or why there is none.
    engine: Result<EngineKind, String>,
    tools: Tools,
}

impl Volumes {
    /// Resolve the engine (probe, or the operator's forced choice). Never
    /// fails: a host without an engine can still destroy and list what an
    /// earlier run left; only create says the engine is missing.
    ///
    /// The root is made and canonicalized here: mount points and loop
    /// backing files are compared with what the kernel reports, which has
    /// every symlink resolved.
    pub fn new(cfg: VolumeConfig) -> Volumes {
        let engine = engine::probe_with(&cfg.tools).choose(cfg.engine);
        let root = mkdir_private(&cfg.root)
            .ok()
            .and_then(|()| fs::canonicalize(&cfg.root).ok())
            .or_else(|| std::path::absolute(&cfg.root).ok())
            .unwrap_or(cfg.root);
        Volumes {
            root,
            engine,
            tools: cfg.tools,
        }
    }

    /// Use these tools from now on, without probing them again: a missing
    /// or failing tool then fails the step that runs it (tests inject
    /// failures this way).
    pub fn with_tools(mut self, tools: Tools) -> Volumes {
        self.tools = tools;
        self
    }

    /// The engine new volumes get, or why there is none.
    pub fn engine(&self) -> Result<EngineKind, &str> {
        self.engine.as_ref().copied().map_err(|e| e.as_str())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn paths(&self, id: &CellId) -> VolumePaths {
        let dir = self.root.join(id.as_str());
        let mnt = dir.join("mnt");
        VolumePaths {
            meta: dir.join("volume.json"),
            disk: dir.join("disk.luks"),
            plain: dir.join("plain"),
            pidfile: dir.join("qsd.pid"),
            data: mnt.join("data"),
            mnt,
            mapper: id.object_name(),
            dir,
        }
    }

    /// Make, format, open and mount a new volume of `size_gib` GiB for
    /// `id`, keyed by `key`. Leftovers at that id are removed first; on
    /// error nothing of it is left.
    pub fn create(
        &self,
        id: &CellId,
        size_gib: u64,
        key: &VolumeKey,
    ) -> Result<OpenVolume, VolumeError> {
        let engine = self.engine.clone().map_err(VolumeError::Unavailable)?;
        let p = self.paths(id);
        let mut pre = TeardownReport::new(id.as_str());
        self.destroy_into(id, &mut pre);
        if !pre.is_clean() {
            return Err(VolumeError::Step {
                id: id.clone(),
                step: "pre-clean",
                detail: pre.summary(),
            });
        }
        let r = self.create_steps(id, &p, engine, size_gib, key);
        if r.is_err() {
            let mut rb = TeardownReport::new(id.as_str());
            self.destroy_into(id, &mut rb);
            if !rb.is_clean() {
                tracing::error!(cell = %id, "volume rollback left residue: {}", rb.summary());
            }
        }
        r
    }

    fn create_steps(
        &self,
        id: &CellId,
        p: &VolumePaths,
        engine: EngineKind,
        size_gib: u64,
        key: &VolumeKey,
    ) -> Result<OpenVolume, VolumeError> {
        if size_gib == 0 {
            return Err(VolumeError::Size("must be >= 1".into()));
        }
        let bytes = size_gib
            .checked_mul(GIB)
            .filter(|b| i64::try_from(*b).is_ok())
            .ok_or_else(|| VolumeError::Size(format!("{size_gib} GiB is too large")))?;
        mkdir_private(&self.root)?;
        let free = free_bytes(&self.root)?;
        if bytes > free {
            return Err(VolumeError::Size(format!(
                "{size_gib} GiB does not fit: {} GiB free under {}",
                free / GIB,
                self.root.display()
            )));
        }
        let meta = VolumeMeta {
            engine,
            format: engine.format(),
            size_gib,
        };
        mkdir_private(&p.dir)?;
        mkdir_private(&p.mnt)?;
        write_meta(&p.meta, &meta)?;
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p.disk)
            .map_err(|e| VolumeError::io(format!("creating {}", p.disk.display()), e))?;
        f.set_len(bytes)
            .map_err(|e| VolumeError::io(format!("sizing {}", p.disk.display()), e))?;
        drop(f);
        engine::format(&self.tools, id, &p.disk, meta.format, key)?;
        let dev = engine::open(&self.tools, id, p, meta.engine, key)?;
        self.tools.mkfs(id, &dev)?;
        self.tools.mount(id, &dev, &p.mnt, meta.engine)?;
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&p.data)
            .map_err(|e| VolumeError::io(format!("creating {}", p.data.display()), e))?;
        Ok(open_volume(p, &meta))
    }

    /// The volume's recorded engine, format and size.
    pub fn meta(&self, id: &CellId) -> Result<VolumeMeta, VolumeError> {
        read_meta(&self.paths(id).meta)?.ok_or_else(|| VolumeError::NotFound(id.clone()))
    }

    /// Open and mount an existing, closed volume with its key. A wrong key
    /// is [`VolumeError::WrongKey`] and leaves the volume as it was. Opening
    /// an open volume checks the key and returns it as is.
    pub fn open(&self, id: &CellId, key: &VolumeKey) -> Result<OpenVolume, VolumeError> {
        let p = self.paths(id);
        let meta = self.meta(id)?;
        if !p.disk.exists() {
            return Err(VolumeError::NotFound(id.clone()));
        }
        if self.is_open(id) {
            // Open already: the key must still be the right one.
            engine::verify_key(&self.tools, id, &p, key)?;
            return Ok(open_volume(&p, &meta));
        }
        // A half-open state (daemon alive, no mount) from a crash: close
        // first so open starts from the container file alone.
        self.close(id)?;
        let dev = engine::open(&self.tools, id, &p, meta.engine, key)?;
        let mounted = self.tools.mount(id, &dev, &p.mnt, meta.engine);
        if let Err(e) = mounted {
            let _ = self.close(id);
            return Err(e);
        }
        if !p.data.is_dir() {
            let _ = self.close(id);
            return Err(VolumeError::Step {
                id: id.clone(),
                step: "open",
                detail: format!(
                    "{} is missing from the opened file system",
                    p.data.display()
                ),
            });
        }
        Ok(open_volume(&p, &meta))
    }

    /// The volume is mounted (so its data dir is usable).
    pub fn is_open(&self, id: &CellId) -> bool {
        is_mounted(&self.paths(id).mnt)
    }

    /// The volume exists here (open or closed).
    pub fn exists(&self, id: &CellId) -> bool {
        self.paths(id).dir.exists()
    }

    /// Unmount and close; the container file stays. Idempotent.
    pub fn close(&self, id: &CellId) -> Result<(), VolumeError> {
        let p = self.paths(id);
        // Unreadable metadata must not keep a volume open: look for both
        // engines' objects then.
        let meta = read_meta(&p.meta).ok().flatten();
        tools::unmount(&p.mnt, false).map_err(|e| VolumeError::Step {
            id: id.clone(),
            step: "umount",
            detail: e,
        })?;
        engine::close(&self.tools, id, &p, meta.map(|m| m.engine))
    }

    /// Does `key` open this volume? (Reads the header only.)
    pub fn verify_key(&self, id: &CellId, key: &VolumeKey) -> Result<(), VolumeError> {
        let p = self.paths(id);
        if !p.disk.exists() {
            return Err(VolumeError::NotFound(id.clone()));
        }
        engine::verify_key(&self.tools, id, &p, key)
    }

    /// Remove every host object of the volume and record what is left:
    /// checks `volume-mount`, `volume-loop`, `volume-daemon`,
    /// `volume-mapper`, `volume-keyslots`, `volume-file`, `volume-dir`.
    /// Never fails; a failed step is an error line in the report.
    pub fn destroy_into(&self, id: &CellId, report: &mut TeardownReport) {
        let p = self.paths(id);
        let meta = read_meta(&p.meta).ok().flatten();
        // 1. unmount (lazily only when busy), then verify.
        if let Err(e) = tools::unmount(&p.mnt, true) {
            report.error(format!("volume umount: {e}"));
        }
        // 2. close: storage daemon or dm mapping (both looked for, whatever
        //    the record says, so a lost volume.json still gets closed).
        if let Err(e) = engine::close(&self.tools, id, &p, meta.map(|m| m.engine)) {
            report.error(format!("volume close: {e}"));
        }
        let mounts = mounts_under(&p.dir).unwrap_or_default();
        report.check_detail(
            "volume-mount",
            p.dir.display().to_string(),
            mounts.len() as u64,
            format!("{mounts:?}"),
        );
        let loops = tools::loops_backed_by(&p.dir);
        report.check_detail(
            "volume-loop",
            p.dir.display().to_string(),
            loops.len() as u64,
            loops.join(","),
        );
        let daemon = engine::daemon_pid(&p);
        report.check_detail(
            "volume-daemon",
            p.pidfile.display().to_string(),
            u64::from(daemon.is_some()),
            format!("qemu-storage-daemon pid {daemon:?} still runs"),
        );
        let mapper = engine::mapper_exists(&p);
        report.check(
            "volume-mapper",
            format!("/dev/mapper/{}", p.mapper),
            u64::from(mapper),
        );
        // 3. keyslots: overwrite the header area before the file goes.
        let slots = match erase::erase_header(&p.disk) {
            Ok(left) => u64::from(left),
            Err(e) => {
                report.error(format!("volume keyslots: {e}"));
                u64::from(p.disk.exists())
            }
        };
        report.check_detail(
            "volume-keyslots",
            p.disk.display().to_string(),
            slots,
            "LUKS header still readable",
        );
        // 4. the file, 5. the dir (only when nothing is mounted in it).
        if let Err(e) = remove_file(&p.disk) {
            report.error(format!("volume file: {e}"));
        }
        report.check(
            "volume-file",
            p.disk.display().to_string(),
            u64::from(p.disk.exists()),
        );
        if mounts.is_empty()
            && let Err(e) = remove_dir(&p.dir)
        {
            report.error(format!("volume dir: {e}"));
        }
        report.check(
            "volume-dir",
            p.dir.display().to_string(),
            u64::from(p.dir.exists()),
        );
    }

    /// Ids of every volume dir under the root (reconcile's orphan sweep).
    pub fn list(&self) -> Vec<CellId> {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| CellId::parse(e.file_name().to_str()?).ok())
            .collect()
    }
}

fn open_volume(p: &VolumePaths, meta: &VolumeMeta) -> OpenVolume {
    OpenVolume {
        data_dir: p.data.clone(),
        engine: meta.engine,
        format: meta.format,
        size_gib: meta.size_gib,
    }
}

fn mkdir_private(dir: &Path) -> Result<(), VolumeError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| VolumeError::io(format!("creating {}", dir.display()), e))
}

fn write_meta(path: &Path, meta: &VolumeMeta) -> Result<(), VolumeError> {
    let text = serde_json::to_vec_pretty(meta).expect("VolumeMeta serializes");
    let tmp = path.with_extension("json.tmp");
    let write = || -> io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        io::Write::write_all(&mut f, &text)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| VolumeError::io(format!("writing {}", path.display()), e))
}

fn read_meta(path: &Path) -> Result<Option<VolumeMeta>, VolumeError> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            VolumeError::io(
                format!("reading {}", path.display()),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VolumeError::io(format!("reading {}", path.display()), e)),
    }
}

fn free_bytes(dir: &Path) -> Result<u64, VolumeError> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(|e| {
        VolumeError::io(
            format!("statvfs {}", dir.display()),
            io::Error::from_raw_os_error(e as i32),
        )
    })?;
    Ok(s.blocks_available() * s.fragment_size())
}

/// Is something mounted at exactly `p`?
fn is_mounted(p: &Path) -> bool {
    mounts_under(p).is_ok_and(|m| m.iter().any(|e| e == p))
}

fn remove_file(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn remove_dir(p: &Path) -> io::Result<()> {
    match fs::remove_dir_all(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

pub mod scan {
    //! Forensic scan of a (sparse) file: reads only its data extents
    //! (SEEK_DATA/SEEK_HOLE; holes are zeros), so a 1 GiB container with a
    //! few MiB written is scanned in milliseconds. Used by the tests and
    //! the benchmark to show that what went into a volume is not in its
    //! container file.

    use std::fs;
    use std::io::{self, Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    use std::path::Path;

    const CHUNK: usize = 8 << 20;

    /// What a scan found.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Scan {
        pub found: bool,
        /// Bytes of data extents read.
        pub scanned: u64,
    }

    pub fn find_in_data(path: &Path, needle: &[u8]) -> io::Result<Scan> {
        use nix::unistd::{Whence, lseek};
        let mut f = fs::File::open(path)?;
        let len = i64::try_from(f.metadata()?.len()).unwrap_or(i64::MAX);
        let (mut pos, mut scanned) = (0i64, 0u64);
        while pos < len {
            // ENXIO: no data after pos.
            let Ok(start) = lseek(f.as_raw_fd(), pos, Whence::SeekData) else {
                break;
            };
            let end = lseek(f.as_raw_fd(), start, Whence::SeekHole)
                .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            f.seek(SeekFrom::Start(start as u64))?;
            // Chunks, each searched with the tail of the one before, so a
            // match across a chunk boundary is found too.
            let mut left = (end - start) as u64;
            let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + needle.len());
            while left > 0 {
                let keep = buf.len().min(needle.len().saturating_sub(1));
                buf.drain(..buf.len() - keep);
                let k = left.min(CHUNK as u64) as usize;
                let at = buf.len();
                buf.resize(at + k, 0);
                f.read_exact(&mut buf[at..])?;
                scanned += k as u64;
                left -= k as u64;
                if buf.windows(needle.len().max(1)).any(|w| w == needle) {
                    return Ok(Scan {
                        found: true,
                        scanned,
                    });
                }
            }
            pos = end;
        }
        Ok(Scan {
            found: false,
            scanned,
        })
    }
}

pub mod baseline {
    //! A plain (unencrypted) loop-mounted ext4 of the same size, made with
    //! the same mkfs and mount options as the engines: what an encrypted
    //! volume costs is measured against this (`cellhost bench volume`).
    //! Layout: `<dir>/disk.img`, `<dir>/mnt`. Not used for cells.

    use std::fs;
    use std::path::{Path, PathBuf};

    use cellhost_core::ids::CellId;

    use crate::{EngineKind, GIB, Tools, VolumeError, mkdir_private, tools};

    /// Make and mount it; returns the mount point.
    pub fn create(tools: &Tools, dir: &Path, size_gib: u64) -> Result<PathBuf, VolumeError> {
        let id = CellId::parse("000000000000").expect("a valid id");
        let (disk, mnt) = (dir.join("disk.img"), dir.join("mnt"));
        mkdir_private(dir)?;
        mkdir_private(&mnt)?;
        let f = fs::File::create(&disk)
            .map_err(|e| VolumeError::io(format!("creating {}", disk.display()), e))?;
        f.set_len(size_gib * GIB)
            .map_err(|e| VolumeError::io(format!("sizing {}", disk.display()), e))?;
        tools.mkfs(&id, &disk)?;
        // The userspace engine's mount options: loop, nosuid, nodev.
        tools.mount(&id, &disk, &mnt, EngineKind::Userspace)?;
        Ok(mnt)
    }

    /// Unmount and delete it.
    pub fn remove(dir: &Path) -> Result<(), VolumeError> {
        tools::unmount(&dir.join("mnt"), true).map_err(|detail| VolumeError::Step {
            id: CellId::parse("000000000000").expect("a valid id"),
            step: "umount",
            detail,
        })?;
        tools::detach_loops(dir);
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(VolumeError::io(format!("removing {}", dir.display()), e))
            }
            _ => Ok(()),
        }
    }
}
