//! `spec.resources.diskGiB` for container cells: the most a cell can write
//! to disk, enforced by the kernel in one of two modes.
//!
//! # Modes
//!
//! - **storage-opt**: the engine's `HostConfig.StorageOpt {"size": "<N>G"}`
//!   caps the container's writable layer (overlay2 on xfs mounted with
//!   `prjquota`: a project quota; btrfs: a qgroup; zfs: a dataset quota;
//!   devicemapper: the thin device's size). Writes past it fail with
//!   EDQUOT/ENOSPC. The root is writable everywhere. The engine's own
//!   `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` are host files
//!   outside that layer, writable by the container and counted by nothing:
//!   these cells get their own, read-only, from `<cell>/net/` instead (the
//!   container's hostname is then its cell id).
//! - **scratch**: a read-only root (`ReadonlyRootfs`) and one ext4 file
//!   system of N GiB per cell, on a loop device, whose directories are
//!   bind-mounted read-write at [`SCRATCH_TARGETS`] (`/tmp`, `/var/tmp`,
//!   `/run`: where programs expect to write on a read-only root; each is
//!   mode 1777, so any uid of the cell, remapped or not, can write there)
//!   and at every `VOLUME` the image declares (which would otherwise be an
//!   engine volume that nothing limits). They share the N GiB: writes past
//!   it fail with ENOSPC; everywhere else in the root they fail with EROFS.
//!   The engine's network files are read-only under a read-only root.
//!
//! Under both, `spec.volume.path` (its own size) and the engine's `/dev`
//! and `/dev/shm` tmpfs (64 MiB each, charged to the memory limit) are
//! writable too; secrets are read-only.
//!
//! # Which mode
//!
//! [`DiskChoice`] (operator or test): `Auto` uses storage-opt where the
//! engine enforces it, else scratch; `StorageOpt` refuses a cell the engine
//! cannot limit; `Scratch` always uses scratch. Whether the engine enforces
//! a size is decided once per backend and cached ([`Verdict`]): the storage
//! driver (from `GET /info`) must be one that enforces it in the kernel
//! ([`SIZE_DRIVERS`]); then the first create that asks for a size is the
//! probe: the engine either accepts it (and then enforces it) or refuses
//! with a `--storage-opt` message (overlay2 without xfs+pquota), after which
//! that cell and every later one uses scratch. Any other engine error is
//! the create's error and decides nothing. An image that declares `VOLUME`s
//! always gets scratch (the engine's size does not cover volumes).
//!
//! # Layout on the host (scratch)
//!
//! ```text
//! <state>/docker/cells/<id>/disk.img   N GiB, fallocated (the space is the
//!                                      cell's: tenants cannot overcommit
//!                                      the host's disk), ext4, no discard
//! <state>/docker/cells/<id>/disk/      its loop mount (nosuid, nodev)
//!   tmp/ var-tmp/ run/ vol-<n>/        the bind sources, mode 1777
//! ```
//!
//! Teardown (after the container is removed): unmount (lazily if busy),
//! detach any loop device still backed by the file (the mount's autoclear
//! normally has), delete the file; checks `disk-mount`, `disk-loop`,
//! `disk-file`. Idempotent: each step accepts "already gone".

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cellhost_core::{BackendError, TeardownReport};

/// Bytes in a GiB.
const GIB: u64 = 1 << 30;

/// Storage drivers whose `size` option the kernel enforces (and which
/// refuse the option where they cannot).
pub const SIZE_DRIVERS: &[&str] = &["overlay2", "btrfs", "zfs", "devicemapper"];

/// Where a scratch cell can write (besides image volumes).
pub const SCRATCH_TARGETS: &[&str] = &["/tmp", "/var/tmp", "/run"];

/// How `diskGiB` is enforced, chosen by the operator (or a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskChoice {
    /// storage-opt where the engine enforces it, else scratch.
    #[default]
    Auto,
    /// Only storage-opt: a cell the engine cannot limit is refused.
    StorageOpt,
    /// Always a read-only root plus a per-cell ext4.
    Scratch,
}

/// The mode a cell got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskMode {
    StorageOpt,
    Scratch,
}

/// Whether this backend's engine enforces `storage_opt size`, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub storage_opt: bool,
    pub why: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("spec.resources.diskGiB: {gib} GiB does not fit in {dir}: {free} bytes free")]
    NoRoom { gib: u64, dir: PathBuf, free: u64 },
    #[error("spec.resources.diskGiB: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A tool the scratch disk needs is not installed.
    #[error("spec.resources.diskGiB: {0}")]
    Missing(String),
    /// A tool ran and failed (its own message).
    #[error("spec.resources.diskGiB: {step} failed: {detail}")]
    Step { step: &'static str, detail: String },
}

impl DiskError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        DiskError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<DiskError> for BackendError {
    fn from(e: DiskError) -> BackendError {
        match e {
            DiskError::Missing(_) => BackendError::MissingCapability {
                capability: "loop".into(),
                detail: e.to_string(),
            },
            DiskError::Io { context, source } => BackendError::Io {
                context: format!("spec.resources.diskGiB: {context}"),
                source,
            },
            other => BackendError::Engine(other.to_string()),
        }
    }
}

/// The verdict the storage driver alone gives: `Some(false)` when it is
/// not one that enforces a size, `None` when the engine must be asked.
pub fn driver_verdict(driver: &str) -> Option<Verdict> {
    if SIZE_DRIVERS.contains(&driver) {
        None
    } else {
        Some(Verdict {
            storage_opt: false,
            why: format!("storage driver {driver:?} is not one that enforces storage_opt size"),
        })
    }
}

/// Is this engine error its refusal of the size option itself (overlay2:
/// "--storage-opt is supported only for overlay over xfs with 'pquota'
/// mount option")?
pub fn refuses_storage_opt(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("storage-opt") || m.contains("storage opt") || m.contains("storageopt")
}

/// `HostConfig.StorageOpt` for `gib`.
pub fn storage_opt(gib: u64) -> HashMap<String, String> {
    HashMap::from([("size".to_string(), format!("{gib}G"))])
}

/// The scratch disk's paths in a cell dir.
#[derive(Debug, Clone)]
pub struct Scratch {
    pub img: PathBuf,
    pub mnt: PathBuf,
}

impl Scratch {
    pub fn of(cell_dir: &Path) -> Scratch {
        Scratch {
            img: cell_dir.join("disk.img"),
            mnt: cell_dir.join("disk"),
        }
    }
}

/// Bind sources (under the mount) and targets: [`SCRATCH_TARGETS`] and the
/// image's volumes, without `skip` (what something else mounts there:
/// `spec.volume.path`) and without duplicates.
pub fn scratch_binds(
    mnt: &Path,
    image_volumes: &[String],
    skip: &[&str],
) -> Vec<(PathBuf, String)> {
    let mut out: Vec<(PathBuf, String)> = Vec::new();
    let fixed = SCRATCH_TARGETS.iter().map(|t| {
        let name = t.trim_start_matches('/').replace('/', "-");
        (mnt.join(name), t.to_string())
    });
    let vols = image_volumes.iter().enumerate().map(|(i, t)| {
        (
            mnt.join(format!("vol-{i}")),
            t.trim_end_matches('/').to_string(),
        )
    });
    for (src, target) in fixed.chain(vols) {
        // The root itself is not a place to bind over (it stays read-only).
        if target.is_empty()
            || skip.contains(&target.as_str())
            || out.iter().any(|(_, t)| *t == target)
        {
            continue;
        }
        out.push((src, target));
    }
    out
}

/// Make the scratch disk: a fallocated file of `gib` GiB, ext4, loop-
/// mounted (nosuid, nodev), with each bind source made mode 1777. Blocking.
/// The caller tears down on error ([`teardown`]).
pub fn make(s: &Scratch, gib: u64, binds: &[(PathBuf, String)]) -> Result<(), DiskError> {
    let size = gib.saturating_mul(GIB);
    let dir = s.img.parent().unwrap_or(Path::new("/"));
    let st = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| DiskError::io(format!("statvfs {}", dir.display()), e.into()))?;
    let free = st.blocks_available() * st.fragment_size();
    if free < size {
        return Err(DiskError::NoRoom {
            gib,
            dir: dir.to_path_buf(),
            free,
        });
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&s.img)
        .map_err(|e| DiskError::io(format!("creating {}", s.img.display()), e))?;
    let len = i64::try_from(size).unwrap_or(i64::MAX);
    nix::fcntl::fallocate(f.as_raw_fd(), nix::fcntl::FallocateFlags::empty(), 0, len).map_err(
        |e| {
            DiskError::io(
                format!("reserving {gib} GiB for {}", s.img.display()),
                e.into(),
            )
        },
    )?;
    drop(f);
    let os = std::ffi::OsStr::new;
    // No reserved blocks (the whole disk is the cell's), no discard (it
    // would punch holes in the reservation), lazy init (milliseconds).
    tool(
        "mkfs.ext4",
        &[
            os("-q"),
            os("-F"),
            os("-m"),
            os("0"),
            os("-L"),
            os("cellhost-scratch"),
            os("-E"),
            os("lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0"),
            s.img.as_os_str(),
        ],
    )?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&s.mnt)
        .map_err(|e| DiskError::io(format!("creating {}", s.mnt.display()), e))?;
    // mount(8) sets up the loop device under util-linux's lock, with
    // autoclear: it detaches when the file system is unmounted.
    tool(
        "mount",
        &[
            os("-t"),
            os("ext4"),
            os("-o"),
            os("loop,nosuid,nodev"),
            s.img.as_os_str(),
            s.mnt.as_os_str(),
        ],
    )?;
    for (src, _) in binds {
        fs::create_dir(src).map_err(|e| DiskError::io(format!("creating {}", src.display()), e))?;
        fs::set_permissions(src, fs::Permissions::from_mode(0o1777))
            .map_err(|e| DiskError::io(format!("chmod {}", src.display()), e))?;
    }
    Ok(())
}

fn tool(name: &'static str, args: &[&std::ffi::OsStr]) -> Result<(), DiskError> {
    use cellhost_core::tool::RunError;
    cellhost_core::tool::run(Path::new(name), args, None).map_err(|e| match e {
        RunError::Missing(m) => DiskError::Missing(m),
        e => DiskError::Step {
            step: name,
            detail: e.to_string(),
        },
    })
}

/// Remove the scratch disk (container already removed) and record the
/// `disk-mount`, `disk-loop` and `disk-file` checks. Blocking; never fails
/// (a failed step is an error line). Returns whether anything was there.
pub fn teardown(s: &Scratch, report: &mut TeardownReport) -> bool {
    let found = match cellhost_core::mountinfo::unmount_under(&s.mnt, true) {
        Ok(u) => {
            report.errors.extend(u.errors);
            !u.found.is_empty()
        }
        Err(e) => {
            report.error(format!("reading mountinfo: {e}"));
            false
        }
    };
    // Loop devices are matched by their backing file as the kernel shows
    // it: every symlink resolved, and " (deleted)" appended once the file
    // is gone, so by the cell dir (which holds no other loop-backed file).
    let dir = s.img.parent().unwrap_or(Path::new("/"));
    let backing = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    // autoclear detaches the loop once the unmount has released it; give
    // the kernel a moment, then detach whatever is still backed by it.
    for _ in 0..50 {
        if cellhost_volume::loops_backed_by(&backing).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    report.errors.extend(
        cellhost_volume::detach_loops(&backing)
            .into_iter()
            .map(|e| format!("disk loop: {e}")),
    );
    let existed = s.img.exists();
    if let Err(e) = fs::remove_file(&s.img)
        && e.kind() != io::ErrorKind::NotFound
    {
        report.error(format!("removing {}: {e}", s.img.display()));
    }
    let mounts = cellhost_core::mountinfo::mounts_under(&s.mnt).unwrap_or_default();
    report.check_detail(
        "disk-mount",
        s.mnt.display().to_string(),
        mounts.len() as u64,
        format!("{mounts:?}"),
    );
    let loops = cellhost_volume::loops_backed_by(&backing);
    report.check_detail(
        "disk-loop",
        backing.display().to_string(),
        loops.len() as u64,
        loops.join(","),
    );
    report.check(
        "disk-file",
        s.img.display().to_string(),
        u64::from(s.img.exists()),
    );
    found || existed
}

/// The read-only network files of a storage-opt cell, in `<cell>/net/`:
/// `(source, target)` pairs. `bridged` cells resolve through the engine's
/// embedded DNS on the cellhost network, as they would with the engine's
/// own file; cells without a network have no name server. Blocking.
pub fn write_net_files(
    cell_dir: &Path,
    hostname: &str,
    bridged: bool,
) -> Result<Vec<(PathBuf, String)>, DiskError> {
    let dir = cell_dir.join("net");
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&dir)
        .map_err(|e| DiskError::io(format!("creating {}", dir.display()), e))?;
    let resolv = if bridged {
        "nameserver 127.0.0.11\noptions ndots:0\n".to_string()
    } else {
        "# no network: no name server\n".to_string()
    };
    let files = [
        (
            "hosts",
            "/etc/hosts",
            format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
        ),
        ("hostname", "/etc/hostname", format!("{hostname}\n")),
        ("resolv.conf", "/etc/resolv.conf", resolv),
    ];
    let mut out = Vec::new();
    for (name, target, text) in files {
        let p = dir.join(name);
        fs::write(&p, text).map_err(|e| DiskError::io(format!("writing {}", p.display()), e))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
            .map_err(|e| DiskError::io(format!("chmod {}", p.display()), e))?;
        out.push((p, target.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_enforcing_drivers_are_asked() {
        for d in ["overlay2", "btrfs", "zfs", "devicemapper"] {
            assert_eq!(driver_verdict(d), None, "{d}");
        }
        for d in ["vfs", "fuse-overlayfs", "aufs", ""] {
            let v = driver_verdict(d).unwrap();
            assert!(!v.storage_opt && v.why.contains("storage driver"), "{d}");
        }
    }

    #[test]
    fn the_engines_refusal_is_recognised() {
        assert!(refuses_storage_opt(
            "--storage-opt is supported only for overlay over xfs with 'pquota' mount option"
        ));
        assert!(refuses_storage_opt("vfs: Storage opt size not supported"));
        assert!(!refuses_storage_opt("No such image: busybox"));
        assert!(!refuses_storage_opt(
            "Conflict. The container name is already in use"
        ));
    }

    #[test]
    fn size_is_in_binary_gigabytes() {
        assert_eq!(storage_opt(3)["size"], "3G");
    }

    #[test]
    fn scratch_binds_cover_the_usual_places_and_image_volumes_once() {
        let mnt = Path::new("/s/disk");
        let b = scratch_binds(
            mnt,
            &["/data/".into(), "/tmp".into(), "/srv".into(), "/".into()],
            &["/srv"],
        );
        let targets: Vec<&str> = b.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(targets, ["/tmp", "/var/tmp", "/run", "/data"]);
        assert_eq!(b[1].0, mnt.join("var-tmp"));
        assert_eq!(b[3].0, mnt.join("vol-0"));
        assert!(b.iter().all(|(s, _)| s.starts_with(mnt)));
    }
}
