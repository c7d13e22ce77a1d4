//! `spec.resources.diskGiB` for container cells: the most a cell can write
//! to disk, enforced by the kernel in one of two modes ([`DiskChoice`]):
//! **storage-opt** (the engine caps the writable layer) or **scratch** (a
//! read-only root and one loop-mounted ext4 of N GiB, a [`LoopFs`], bound
//! at [`SCRATCH_TARGETS`] and at every `VOLUME` of the image).
//!
//! Invariants (modes, probe and the btrfs caveat in `docs/tiers.md`, "Disk
//! limit"):
//! - whether the engine enforces a size is decided once per backend and
//!   cached ([`Verdict`]); an engine error other than a `--storage-opt`
//!   refusal is the create's error and decides nothing;
//! - an image that declares `VOLUME`s always gets scratch; a btrfs engine
//!   gets scratch unless the operator opts in, and even then only while
//!   [`btrfs_qgroups_hold`];
//! - the scratch file is fallocated whole: tenants cannot overcommit the
//!   host's disk;
//! - teardown is idempotent (each step accepts "already gone") and detaches
//!   only a loop device backed by exactly that file.
//!
//! Design: `docs/tiers.md`.

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

/// A failure of a cell's loop file system (the scratch disk or a plain
/// volume); `field` is the document field it enforces.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{field}: {gib} GiB does not fit in {dir}: {free} bytes free")]
    NoRoom {
        field: &'static str,
        gib: u64,
        dir: PathBuf,
        free: u64,
    },
    #[error("{field}: {context}: {source}")]
    Io {
        field: &'static str,
        context: String,
        #[source]
        source: io::Error,
    },
    /// A tool the loop file system needs is not installed.
    #[error("{field}: {detail}")]
    Missing { field: &'static str, detail: String },
    /// A tool ran and failed (its own message).
    #[error("{field}: {step} failed: {detail}")]
    Step {
        field: &'static str,
        step: &'static str,
        detail: String,
    },
}

impl From<DiskError> for BackendError {
    fn from(e: DiskError) -> BackendError {
        match e {
            DiskError::Missing { .. } => BackendError::MissingCapability {
                capability: "loop".into(),
                detail: e.to_string(),
            },
            DiskError::Io {
                field,
                context,
                source,
            } => BackendError::Io {
                context: format!("{field}: {context}"),
                source,
            },
            other => BackendError::engine_from("scratch disk", other),
        }
    }
}

/// Why btrfs is not trusted with `storage_opt size` by default.
pub const BTRFS_UNRELIABLE: &str = "btrfs qgroups stop enforcing every limit, running containers' too, whenever the kernel marks their accounting inconsistent, which happened in ordinary operation here (DockerConfig.btrfs_storage_opt opts in)";

/// The verdict the storage driver alone gives: `Some(false)` when it is
/// not one that enforces a size, `None` when the engine must be asked.
pub fn driver_verdict(driver: &str, btrfs_opt_in: bool) -> Option<Verdict> {
    if driver == "btrfs" && !btrfs_opt_in {
        Some(Verdict {
            storage_opt: false,
            why: BTRFS_UNRELIABLE.into(),
        })
    } else if SIZE_DRIVERS.contains(&driver) {
        None
    } else {
        Some(Verdict {
            storage_opt: false,
            why: format!("storage driver {driver:?} is not one that enforces storage_opt size"),
        })
    }
}

/// Do the btrfs qgroups of the file system holding `root` enforce their
/// limits now? `mountinfo` is `/proc/self/mountinfo`, `sys` the sysfs root
/// (`/sys`). `Ok` when the kernel reports them consistent, or when quotas
/// are not on yet (the engine turns them on, with a rescan, at its first
/// sized create); `Err(why)` when they are inconsistent or the answer
/// cannot be found, which callers treat as "not enforced".
pub fn btrfs_qgroups_hold(mountinfo: &str, sys: &Path, root: &Path) -> Result<(), String> {
    let mounts = cellhost_os::mountinfo::parse(mountinfo);
    let m = cellhost_os::mountinfo::holding(&mounts, root)
        .ok_or_else(|| format!("no mount holds the engine's data root {}", root.display()))?;
    let (mount, source) = (m.mount_point.display().to_string(), m.source.clone());
    if m.fs_type != "btrfs" {
        return Err(format!(
            "the engine's data root {} is on {}, not btrfs",
            root.display(),
            m.fs_type
        ));
    }
    // The kernel lists a btrfs file system's devices by their name in
    // /dev (`loop0`, `dm-0`, `vda1`).
    let dev = fs::canonicalize(&source).unwrap_or_else(|_| PathBuf::from(&source));
    let name = dev
        .file_name()
        .ok_or_else(|| format!("btrfs on {source}: no device name"))?;
    let fsdir = fs::read_dir(sys.join("fs/btrfs"))
        .map_err(|e| format!("{}: {e}", sys.join("fs/btrfs").display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|d| d.join("devices").join(name).exists())
        .ok_or_else(|| format!("btrfs on {source}: not listed under /sys/fs/btrfs"))?;
    let qgroups = fsdir.join("qgroups");
    if !qgroups.is_dir() {
        return Ok(());
    }
    match fs::read_to_string(qgroups.join("inconsistent")).map(|s| s.trim().to_string()) {
        Ok(flag) if flag == "0" => Ok(()),
        Ok(_) => Err(format!(
            "the btrfs quota groups of {mount} are inconsistent, so the kernel does not enforce their limits (`btrfs quota rescan -w {mount}` repairs them)"
        )),
        Err(e) => Err(format!(
            "this kernel does not say whether the btrfs quota groups of {mount} are consistent ({}: {e})",
            qgroups.join("inconsistent").display()
        )),
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

/// One ext4 file system of a cell on a loop device: a fallocated file in
/// the cell dir and the dir it is mounted on. The scratch disk
/// ([`LoopFs::scratch`]) and a plain volume ([`crate::volume`]) are each
/// one; they differ only in names.
#[derive(Debug, Clone)]
pub struct LoopFs {
    /// The file (`<cell>/<stem>.img`), as the kernel shows it: the cell
    /// dir's symlinks resolved.
    pub img: PathBuf,
    /// Its mount point (`<cell>/<stem>/`).
    pub mnt: PathBuf,
    /// The ext4 label.
    label: &'static str,
    /// The document field it enforces: errors name it.
    field: &'static str,
    /// Teardown check names: mount, loop, file.
    checks: [&'static str; 3],
}

impl LoopFs {
    /// `<cell>/<stem>.img` mounted on `<cell>/<stem>/`.
    pub(crate) fn new(
        cell_dir: &Path,
        stem: &str,
        label: &'static str,
        field: &'static str,
        checks: [&'static str; 3],
    ) -> LoopFs {
        // Mount points and loop backing files are compared with what the
        // kernel shows, which has every symlink resolved.
        let dir = fs::canonicalize(cell_dir).unwrap_or_else(|_| cell_dir.to_path_buf());
        LoopFs {
            img: dir.join(format!("{stem}.img")),
            mnt: dir.join(stem),
            label,
            field,
            checks,
        }
    }

    /// The scratch disk of `diskGiB` (`disk.img` on `disk/`; checks
    /// `disk-mount`, `disk-loop`, `disk-file`).
    pub fn scratch(cell_dir: &Path) -> LoopFs {
        LoopFs::new(
            cell_dir,
            "disk",
            "cellhost-scratch",
            "spec.resources.diskGiB",
            ["disk-mount", "disk-loop", "disk-file"],
        )
    }

    fn io(&self, context: impl Into<String>, source: io::Error) -> DiskError {
        DiskError::Io {
            field: self.field,
            context: context.into(),
            source,
        }
    }

    fn tool(&self, name: &'static str, args: &[&std::ffi::OsStr]) -> Result<(), DiskError> {
        use cellhost_host::tool::RunError;
        cellhost_host::tool::run(Path::new(name), args, None).map_err(|e| match e {
            RunError::Missing(detail) => DiskError::Missing {
                field: self.field,
                detail,
            },
            e => DiskError::Step {
                field: self.field,
                step: name,
                detail: e.to_string(),
            },
        })
    }

    /// Make it: a fallocated file of `gib` GiB, ext4, mounted (nosuid,
    /// nodev), with each of `dirs` (under [`LoopFs::mnt`]) made with
    /// `mode`. Blocking. The caller tears down on error
    /// ([`LoopFs::teardown`]).
    pub fn make(&self, gib: u64, dirs: &[PathBuf], mode: u32) -> Result<(), DiskError> {
        let size = gib.saturating_mul(GIB);
        let dir = self.img.parent().unwrap_or(Path::new("/"));
        let st = nix::sys::statvfs::statvfs(dir)
            .map_err(|e| self.io(format!("statvfs {}", dir.display()), e.into()))?;
        let free = st.blocks_available() * st.fragment_size();
        if free < size {
            return Err(DiskError::NoRoom {
                field: self.field,
                gib,
                dir: dir.to_path_buf(),
                free,
            });
        }
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.img)
            .map_err(|e| self.io(format!("creating {}", self.img.display()), e))?;
        let len = i64::try_from(size).unwrap_or(i64::MAX);
        let reserve = |f: &fs::File| {
            nix::fcntl::fallocate(f.as_raw_fd(), nix::fcntl::FallocateFlags::empty(), 0, len)
                .map_err(|e| {
                    self.io(
                        format!("reserving {gib} GiB for {}", self.img.display()),
                        e.into(),
                    )
                })
        };
        reserve(&f)?;
        let os = std::ffi::OsStr::new;
        // No reserved blocks (the whole disk is the cell's), no discard (it
        // would punch holes in the reservation). Inode tables and journal
        // are zeroed now, by mke2fs's zeroing of the file: left to the
        // kernel's lazy init, they are zeroed through the loop device,
        // which punches them out of the file (16 MiB of a 1 GiB
        // reservation, measured).
        self.tool(
            "mkfs.ext4",
            &[
                os("-q"),
                os("-F"),
                os("-m"),
                os("0"),
                os("-L"),
                os(self.label),
                os("-E"),
                os("lazy_itable_init=0,lazy_journal_init=0,nodiscard,root_owner=0:0"),
                self.img.as_os_str(),
            ],
        )?;
        // Where the file system under the file has no zero-range (tmpfs),
        // mke2fs zeroes by punching holes (48 MiB of 1 GiB, measured):
        // reserve again, which fills the holes and leaves data alone.
        reserve(&f)?;
        drop(f);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.mnt)
            .map_err(|e| self.io(format!("creating {}", self.mnt.display()), e))?;
        self.mount()?;
        for d in dirs {
            fs::create_dir(d).map_err(|e| self.io(format!("creating {}", d.display()), e))?;
            fs::set_permissions(d, fs::Permissions::from_mode(mode))
                .map_err(|e| self.io(format!("chmod {}", d.display()), e))?;
        }
        Ok(())
    }

    /// Mount the file on its mount point (nosuid, nodev). mount(8) sets up
    /// the loop device under util-linux's lock, with autoclear: it
    /// detaches when the file system is unmounted. Blocking.
    pub fn mount(&self) -> Result<(), DiskError> {
        let os = std::ffi::OsStr::new;
        self.tool(
            "mount",
            &[
                os("-t"),
                os("ext4"),
                os("-o"),
                os("loop,nosuid,nodev"),
                self.img.as_os_str(),
                self.mnt.as_os_str(),
            ],
        )
    }

    /// Is something mounted at exactly [`LoopFs::mnt`]?
    pub fn is_mounted(&self) -> bool {
        cellhost_os::mountinfo::mounts_under(&self.mnt).is_ok_and(|m| m.contains(&self.mnt))
    }

    /// Remove it (its users gone: the container removed) and record its
    /// three checks. Blocking; never fails (a failed step is an error
    /// line). Returns whether anything of it was there.
    pub fn teardown(&self, report: &mut TeardownReport) -> bool {
        let [check_mount, check_loop, check_file] = self.checks;
        let found = match cellhost_os::mountinfo::unmount_under(&self.mnt, true) {
            Ok(u) => {
                report.errors.extend(u.errors);
                !u.found.is_empty()
            }
            Err(e) => {
                report.error(format!("reading mountinfo: {e}"));
                false
            }
        };
        // Loop devices are matched by their backing file as the kernel
        // shows it (symlinks resolved; " (deleted)" once the file is gone).
        // autoclear detaches the loop once the unmount has released it;
        // give the kernel a moment, then detach whatever is still backed
        // by it.
        for _ in 0..50 {
            if cellhost_volume::loops_backed_by_file(&self.img).is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        report.errors.extend(
            cellhost_volume::detach_loops_of_file(&self.img)
                .into_iter()
                .map(|e| format!("{check_loop}: {e}")),
        );
        let existed = self.img.exists();
        if let Err(e) = fs::remove_file(&self.img)
            && e.kind() != io::ErrorKind::NotFound
        {
            report.error(format!("removing {}: {e}", self.img.display()));
        }
        let mounts = cellhost_os::mountinfo::mounts_under(&self.mnt).unwrap_or_default();
        report.check_detail(
            check_mount,
            self.mnt.display().to_string(),
            mounts.len() as u64,
            format!("{mounts:?}"),
        );
        let loops = cellhost_volume::loops_backed_by_file(&self.img);
        report.check_detail(
            check_loop,
            self.img.display().to_string(),
            loops.len() as u64,
            loops.join(","),
        );
        report.check(
            check_file,
            self.img.display().to_string(),
            u64::from(self.img.exists()),
        );
        found || existed
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
        .map_err(|e| net_io(format!("creating {}", dir.display()), e))?;
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
        fs::write(&p, text).map_err(|e| net_io(format!("writing {}", p.display()), e))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
            .map_err(|e| net_io(format!("chmod {}", p.display()), e))?;
        out.push((p, target.to_string()));
    }
    Ok(out)
}

/// An error writing a storage-opt cell's network files.
fn net_io(context: String, source: io::Error) -> DiskError {
    DiskError::Io {
        field: "spec.resources.diskGiB",
        context,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_enforcing_drivers_are_asked() {
        for d in ["overlay2", "btrfs", "zfs", "devicemapper"] {
            assert_eq!(driver_verdict(d, true), None, "{d}");
        }
        let v = driver_verdict("btrfs", false).unwrap();
        assert!(!v.storage_opt && v.why.contains("inconsistent"), "{v:?}");
        for d in ["vfs", "fuse-overlayfs", "aufs", ""] {
            let v = driver_verdict(d, false).unwrap();
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

    /// A sysfs with one btrfs file system on `dev`, its qgroup flag
    /// `flag` (`None`: quotas off; `Some("")`: a kernel without the file).
    fn fake_sys(dev: &str, flag: Option<&str>) -> tempfile::TempDir {
        let sys = tempfile::tempdir().unwrap();
        let fsdir = sys.path().join("fs/btrfs/9f8d419c-0000");
        fs::create_dir_all(fsdir.join("devices").join(dev)).unwrap();
        fs::create_dir_all(sys.path().join("fs/btrfs/features")).unwrap();
        if let Some(flag) = flag {
            fs::create_dir_all(fsdir.join("qgroups/0_256")).unwrap();
            if !flag.is_empty() {
                fs::write(fsdir.join("qgroups/inconsistent"), flag).unwrap();
            }
        }
        sys
    }

    const MOUNTS: &str = "\
22 1 252:0 / / rw,relatime - ext4 /dev/vda rw
40 22 0:45 / /var/lib/docker\\040b rw,relatime - btrfs /dev/loop7 rw,space_cache=v2
41 40 0:46 / /var/lib/docker\\040b/containers/x/shm rw - tmpfs shm rw
";

    #[test]
    fn btrfs_qgroups_hold_only_when_the_kernel_says_consistent() {
        let root = Path::new("/var/lib/docker b/100000.100000");
        let ok = fake_sys("loop7", Some("0\n"));
        assert_eq!(btrfs_qgroups_hold(MOUNTS, ok.path(), root), Ok(()));
        // Quotas not on yet: the engine's first sized create turns them on.
        let off = fake_sys("loop7", None);
        assert_eq!(btrfs_qgroups_hold(MOUNTS, off.path(), root), Ok(()));

        let bad = fake_sys("loop7", Some("1\n"));
        let why = btrfs_qgroups_hold(MOUNTS, bad.path(), root).unwrap_err();
        assert!(why.contains("inconsistent"), "{why}");
        assert!(
            why.contains("btrfs quota rescan -w /var/lib/docker b"),
            "{why}"
        );
        // Unsure is unsafe: an unreadable flag, an unlisted device, a data
        // root on another file system are all "does not hold".
        let old = fake_sys("loop7", Some(""));
        let why = btrfs_qgroups_hold(MOUNTS, old.path(), root).unwrap_err();
        assert!(why.contains("does not say"), "{why}");
        let other = fake_sys("loop3", Some("0"));
        let why = btrfs_qgroups_hold(MOUNTS, other.path(), root).unwrap_err();
        assert!(why.contains("not listed"), "{why}");
        let why = btrfs_qgroups_hold(MOUNTS, ok.path(), Path::new("/srv/docker")).unwrap_err();
        assert!(why.contains("on ext4, not btrfs"), "{why}");
    }

    #[test]
    fn the_mount_of_a_path_is_the_deepest_one_on_top() {
        let holding = |text: &str, p: &Path| {
            let m = cellhost_os::mountinfo::parse(text);
            cellhost_os::mountinfo::holding(&m, p).cloned()
        };
        let m = holding(MOUNTS, Path::new("/var/lib/docker b/containers/x/shm/f")).unwrap();
        assert_eq!(m.fs_type, "tmpfs");
        let m = holding(MOUNTS, Path::new("/var/lib/docker bb")).unwrap();
        assert_eq!(m.fs_type, "ext4", "a prefix of the name is not a parent");
        let over = format!("{MOUNTS}50 22 0:47 / /var/lib/docker\\040b rw - xfs /dev/vdb rw\n");
        let m = holding(&over, Path::new("/var/lib/docker b/x")).unwrap();
        assert_eq!(m.fs_type, "xfs");
        assert!(holding("garbage\n - \n", Path::new("/x")).is_none());
    }
}
