//! A process cell's root filesystem, made before its container.
//!
//! # Layout on the host
//!
//! ```text
//! <state>/cells/<id>/            0711 root (the cell's uid must pass through)
//!   rt/                          tmpfs (nosuid, nodev, 0711, 16 MiB): the cell's own
//!     root/                      image `host`: the skeleton (mount points, the
//!                                host's /bin,/lib… symlinks, a minimal /etc with
//!                                the cell's resolv.conf)
//!     upper/ work/               a store image: the overlay's upper (mount points
//!                                only) and work dirs
//!     resolv.conf                a store image, bridged: bound over /etc/resolv.conf
//!     volume/                    spec.volume: the open volume's data dir, bound here
//!   image/                       a store image: its ext4, read-only (loop, noload)
//!   root/                        a store image: overlay (lower image/, upper rt/upper)
//! ```
//!
//! # Invariants
//!
//! - Nothing is ever written into an image: it is mounted read-only and
//!   only ever the lower layer of the cell's own overlay; mount points the
//!   cell needs are made in the upper layer, which lives and dies with the
//!   cell's tmpfs.
//! - No host path of the state dir shows in the cell's mountinfo: every
//!   mount the cell sees is the root of a filesystem of its own (`rt`, the
//!   overlay), a subdir of one (`/secrets`, `/resolv.conf`, `/volume`), or
//!   a host system dir (`/usr`, …); the overlay's options name its layers
//!   through `/proc/self/fd/<n>/`, not by path.
//! - Mount points are made by walking the root without following a
//!   symlink (an image's `/data -> /../../etc` is refused, not followed).
//! - Everything here is under the cell dir: teardown's `unmount_under`
//!   takes it all (newest first) and checks nothing is left.
//!
//! # Threat model
//!
//! Images are the operator's; documents are the tenant's. A document picks
//! the volume path, so it is created with the symlink-free walk above.
//! The cell's root user is an unprivileged host uid: every file here is
//! host root's (read-only to the cell) except what the cell must own
//! (secrets, the volume's data dir).

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use cellhost_core::BackendError;
use nix::fcntl::{OFlag, openat};
use nix::mount::{MsFlags, mount};
use nix::sys::stat::{Mode, mkdirat};

/// Top-level host entries mirrored into the `image: host` root: bound
/// read-only when they are directories, re-created when they are symlinks
/// (Debian's merged /usr makes most of them symlinks into /usr).
pub const HOST_TREES: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Host dir of symlinks that many host programs resolve through.
pub const ALTERNATIVES: &str = "/etc/alternatives";

/// Mount points every root needs (the container's own /proc, /dev, ...).
const MOUNT_POINTS: &[&str] = &["proc", "dev", "sys", "tmp", "run"];

/// The `rt` tmpfs: the skeleton, the overlay's upper layer, resolv.conf.
const RT_OPTIONS: &str = "mode=0711,size=16m";

/// Where the cell's root comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The host's programs, read-only.
    Host,
    /// A rootfs image of the store: its ext4 file.
    Image(PathBuf),
}

/// What [`prepare`] made.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The container's root.
    pub root: PathBuf,
    /// Host trees (`usr`, `lib`...) to bind read-only (image `host` only).
    pub host_binds: Vec<String>,
    /// Bind `/etc/alternatives` from the host (image `host` only).
    pub alternatives: bool,
    /// A file to bind over `/etc/resolv.conf` (a store image that has one).
    pub resolv_conf: Option<PathBuf>,
    /// The volume's data, bound into `rt/volume` (bind this at its path).
    pub volume: Option<PathBuf>,
}

fn io_ctx(what: impl Into<String>) -> impl FnOnce(io::Error) -> BackendError {
    let what = what.into();
    move |e| BackendError::io(what, e)
}

fn nix_ctx(what: impl Into<String>) -> impl FnOnce(nix::Error) -> BackendError {
    let what = what.into();
    move |e| BackendError::io(what, e.into())
}

fn mkdir(p: &Path, mode: u32) -> Result<(), BackendError> {
    match fs::DirBuilder::new().mode(mode).create(p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(BackendError::io(format!("creating {}", p.display()), e)),
    }
    // The umask may have taken bits the cell's uid needs.
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .map_err(io_ctx(format!("chmod {}", p.display())))
}

fn write_file(p: &Path, text: &[u8]) -> Result<(), BackendError> {
    fs::write(p, text).map_err(io_ctx(format!("writing {}", p.display())))?;
    fs::set_permissions(p, fs::Permissions::from_mode(0o644))
        .map_err(io_ctx(format!("chmod {}", p.display())))
}

/// Make the cell's root under `cell_dir` (which exists, 0711). `resolv`:
/// the cell's resolv.conf text (bridged cells). `volume_data`: the open
/// volume's data dir and its path in the cell.
pub fn prepare(
    cell_dir: &Path,
    source: &Source,
    resolv: Option<&str>,
    volume: Option<(&str, &Path)>,
) -> Result<Prepared, BackendError> {
    let rt = cell_dir.join("rt");
    mkdir(&rt, 0o711)?;
    mount(
        Some("cellhost"),
        &rt,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(RT_OPTIONS),
    )
    .map_err(nix_ctx(format!(
        "mounting the cell's tmpfs at {}",
        rt.display()
    )))?;
    let mut prepared = match source {
        Source::Host => host_root(&rt, resolv)?,
        Source::Image(file) => image_root(cell_dir, &rt, file, resolv)?,
    };
    if let Some((path, data)) = volume {
        // Bound into the cell's own tmpfs first, so the container binds a
        // path the cell's uid can reach and its mountinfo shows only the
        // volume's own root.
        let inside = rt.join("volume");
        mkdir(&inside, 0o755)?;
        mount(
            Some(data),
            &inside,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(nix_ctx(format!(
            "binding the volume at {}",
            inside.display()
        )))?;
        mount_point(&prepared.root, path, true)?;
        prepared.volume = Some(inside);
    }
    Ok(prepared)
}

/// The `image: host` skeleton in `rt/root`.
fn host_root(rt: &Path, resolv: Option<&str>) -> Result<Prepared, BackendError> {
    let root = rt.join("root");
    mkdir(&root, 0o755)?;
    for d in MOUNT_POINTS {
        mkdir(&root.join(d), 0o755)?;
    }
    let mut host_binds = Vec::new();
    for t in HOST_TREES {
        let host = Path::new("/").join(t);
        let Ok(m) = fs::symlink_metadata(&host) else {
            continue;
        };
        if m.file_type().is_symlink() {
            let target =
                fs::read_link(&host).map_err(io_ctx(format!("reading {}", host.display())))?;
            symlink(target, root.join(t)).map_err(io_ctx(format!("linking {t}")))?;
        } else if m.is_dir() {
            mkdir(&root.join(t), 0o755)?;
            host_binds.push(t.to_string());
        }
    }
    let etc = root.join("etc");
    mkdir(&etc, 0o755)?;
    write_file(
        &etc.join("passwd"),
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )?;
    write_file(&etc.join("group"), b"root:x:0:\nnogroup:x:65534:\n")?;
    write_file(
        &etc.join("hosts"),
        b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    write_file(
        &etc.join("nsswitch.conf"),
        b"passwd: files\ngroup: files\nhosts: files dns\n",
    )?;
    write_file(&etc.join("resolv.conf"), resolv.unwrap_or("").as_bytes())?;
    if let Ok(cache) = fs::read("/etc/ld.so.cache") {
        write_file(&etc.join("ld.so.cache"), &cache)?;
    }
    let alternatives = Path::new(ALTERNATIVES).is_dir();
    if alternatives {
        mkdir(&etc.join("alternatives"), 0o755)?;
    }
    Ok(Prepared {
        root,
        host_binds,
        alternatives,
        resolv_conf: None,
        volume: None,
    })
}

/// A store image: its ext4 read-only at `image/`, and the cell's overlay on
/// it at `root/`, upper and work in `rt`.
fn image_root(
    cell_dir: &Path,
    rt: &Path,
    file: &Path,
    resolv: Option<&str>,
) -> Result<Prepared, BackendError> {
    let image = cell_dir.join("image");
    mkdir(&image, 0o711)?;
    // mount(8) is the interface to loop devices here: it allocates one
    // under util-linux's lock, with autoclear, so the device goes with the
    // mount. `noload`: a read-only ext4 replays nothing.
    cellhost_host::tool::run(
        Path::new("mount"),
        &[
            OsStr::new("-t"),
            OsStr::new("ext4"),
            OsStr::new("-o"),
            OsStr::new("ro,loop,noload,nosuid,nodev"),
            file.as_os_str(),
            image.as_os_str(),
        ],
        None,
    )
    .map_err(|e| BackendError::engine(format!("mounting image {}: {e}", file.display())))?;
    for d in ["upper", "work"] {
        mkdir(&rt.join(d), 0o755)?;
    }
    let root = cell_dir.join("root");
    mkdir(&root, 0o755)?;
    // Layers named through an open dir, so the overlay's options (which
    // the cell reads in its mountinfo) hold no host path.
    let dir =
        fs::File::open(cell_dir).map_err(io_ctx(format!("opening {}", cell_dir.display())))?;
    let via = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let opts = format!("lowerdir={via}/image,upperdir={via}/rt/upper,workdir={via}/rt/work");
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(nix_ctx(format!(
        "mounting the cell's overlay at {}",
        root.display()
    )))?;
    drop(dir);
    for d in MOUNT_POINTS {
        mount_point(&root, d, true)?;
    }
    // Bound over the image's own /etc/resolv.conf, when it has a regular
    // one (a symlink names a path of the cell's root, not the host's).
    let resolv_conf = match resolv {
        Some(text)
            if fs::symlink_metadata(root.join("etc/resolv.conf")).is_ok_and(|m| m.is_file()) =>
        {
            let f = rt.join("resolv.conf");
            write_file(&f, text.as_bytes())?;
            Some(f)
        }
        _ => None,
    };
    Ok(Prepared {
        root,
        host_binds: Vec::new(),
        alternatives: false,
        resolv_conf,
        volume: None,
    })
}

/// Make directory `path` (absolute in the cell) inside `root`, walking
/// from `root` without following any symlink; `Ok` when it exists as a
/// directory already. `dir`: make missing components.
pub fn mount_point(root: &Path, path: &str, dir: bool) -> Result<(), BackendError> {
    let refuse = |why: String| BackendError::Invalid(format!("spec.volume.path: {path}: {why}"));
    let mut cur = fs::File::open(root).map_err(io_ctx(format!("opening {}", root.display())))?;
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    for c in Path::new(path).components() {
        let name = match c {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(n) => n,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(refuse("must not contain ..".into()));
            }
        };
        let open =
            |at: &fs::File| openat(Some(at.as_raw_fd()), name, flags, Mode::empty()).map(owned);
        cur = match open(&cur) {
            Ok(f) => f,
            Err(nix::errno::Errno::ENOENT) if dir => {
                mkdirat(Some(cur.as_raw_fd()), name, Mode::from_bits_truncate(0o755))
                    .map_err(nix_ctx(format!("making {path} in the cell's root")))?;
                open(&cur).map_err(nix_ctx(format!("opening {path} in the cell's root")))?
            }
            // O_NOFOLLOW|O_DIRECTORY on a symlink: ENOTDIR (or ELOOP).
            Err(nix::errno::Errno::ENOTDIR | nix::errno::Errno::ELOOP) => {
                return Err(refuse(format!(
                    "{} is a symlink or not a directory in the image",
                    name.to_string_lossy()
                )));
            }
            Err(e) => return Err(nix_ctx(format!("opening {path} in the cell's root"))(e)),
        };
    }
    Ok(())
}

/// An fd `openat` just returned, owned.
fn owned(fd: std::os::fd::RawFd) -> fs::File {
    // SAFETY: `fd` was just returned by a successful openat and is owned by
    // nobody else; the File closes it.
    unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_never_follow_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        symlink("../outside", root.join("data")).unwrap();
        symlink("/", root.join("abs")).unwrap();
        mount_point(&root, "/srv/app/data", true).unwrap();
        assert!(root.join("srv/app/data").is_dir());
        mount_point(&root, "/srv/app/data", true).unwrap();
        for p in ["/data", "/data/x", "/abs/etc", "/srv/../data"] {
            let e = mount_point(&root, p, true).unwrap_err().to_string();
            assert!(e.contains("spec.volume.path"), "{p}: {e}");
        }
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing made outside"
        );
    }
}
