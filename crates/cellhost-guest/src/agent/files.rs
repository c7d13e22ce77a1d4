//! Files the agent writes and reads inside the guest.
//!
//! # Layout in the guest
//!
//! ```text
//! <state>/            0700, default /run/cellhost
//!   env               KEY=VALUE lines, sorted, 0600 (set_env)
//!   secrets/          0700
//!     <name>          one file per secret, 0600 (set_secret)
//! <file roots>/...    write_file / read_file, confined beneath the roots
//! ```
//!
//! # Atomic writes
//!
//! Every write is: a temp file in the same directory, opened `O_EXCL |
//! O_NOFOLLOW` with mode 0600, written, mode set (before it has its real
//! name), fsynced, renamed over the target, then the directory fsynced. A
//! reader sees the old file or the new one, never a torn one; a crash
//! leaves the old file or the new one plus at most a stray `.<name>.tmp.*`.
//!
//! # Confinement
//!
//! Paths for `write_file`/`read_file` must be absolute, must not contain
//! `..`, and must lie beneath one of the operator's roots. They are walked
//! one component at a time from an fd of the root with `O_NOFOLLOW |
//! O_DIRECTORY`, so neither a symlink nor a rename racing the walk can
//! lead outside the root: a path that crosses a symlink is refused.
//!
//! # Threat model
//!
//! The host side of the channel is trusted to ask (it owns the cell); what
//! it sends is not trusted to be well-formed: every name is checked before
//! any file is touched, and nothing is followed out of the state dir or
//! the roots.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, fchmod, mkdirat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};

use crate::proto::{ErrorCode, Failure};

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Take ownership of a descriptor a syscall just returned.
fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was returned by a successful open/openat in this
    // function's caller and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(own(fd))
}

/// Create `path` (and parents) and force it to 0700. Refuses a symlink.
pub fn private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            path.display()
        )));
    }
    if meta.mode() & 0o7777 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Atomically replace `dir/name` with `data`, mode `mode`.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> io::Result<()> {
    let dirfd = open_dir(dir)?;
    write_atomic_at(&dirfd, OsStr::new(name), data, mode)
}

fn write_atomic_at(dirfd: &OwnedFd, name: &OsStr, data: &[u8], mode: u32) -> io::Result<()> {
    // The temp name does not embed the target's (a 255-byte name would
    // overflow NAME_MAX); a leftover from a crash is skipped by O_EXCL.
    let (fd, tmp) = loop {
        let tmp = format!(
            ".cellhost.tmp.{}.{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        match openat(
            Some(dirfd.as_raw_fd()),
            tmp.as_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => break (fd, tmp),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let tmp = OsStr::new(&tmp);
    let mut file = File::from(own(fd));
    let written = (|| -> io::Result<()> {
        file.write_all(data)?;
        fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode & 0o7777))?;
        file.sync_all()?;
        renameat(Some(dirfd.as_raw_fd()), tmp, Some(dirfd.as_raw_fd()), name)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = unlinkat(Some(dirfd.as_raw_fd()), tmp, UnlinkatFlags::NoRemoveDir);
        return Err(e);
    }
    fsync(dirfd.as_raw_fd())?;
    Ok(())
}

/// The roots `write_file` and `read_file` may touch.
#[derive(Debug, Clone, Default)]
pub struct Roots(Vec<PathBuf>);

impl Roots {
    /// Canonicalize each root (they must exist).
    pub fn new(roots: &[PathBuf]) -> io::Result<Roots> {
        let mut out = Vec::new();
        for r in roots {
            let c = fs::canonicalize(r)
                .map_err(|e| io::Error::new(e.kind(), format!("file root {}: {e}", r.display())))?;
            out.push(c);
        }
        // Longest first, so the most specific root wins.
        out.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        Ok(Roots(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.0
    }

    /// Split `path` into (root, directory components under it, file name).
    fn split<'a>(
        &'a self,
        path: &'a str,
    ) -> Result<(&'a Path, Vec<&'a OsStr>, &'a OsStr), Failure> {
        if self.0.is_empty() {
            return Err(Failure::new(
                ErrorCode::Disabled,
                "path: file operations are off (the agent has no --file-root)",
            ));
        }
        if path.contains('\0') {
            return Err(Failure::invalid("path: contains NUL"));
        }
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(Failure::invalid(format!("path: {path:?} is not absolute")));
        }
        let mut comps = Vec::new();
        for c in p.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(n) => comps.push(n),
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(Failure::new(
                        ErrorCode::PathNotAllowed,
                        format!("path: {path:?} contains '..'"),
                    ));
                }
            }
        }
        for root in &self.0 {
            let rc: Vec<&OsStr> = root
                .components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n),
                    _ => None,
                })
                .collect();
            if comps.len() > rc.len() && comps[..rc.len()] == rc[..] {
                let rest = &comps[rc.len()..];
                let (name, dirs) = rest.split_last().expect("rest is non-empty");
                return Ok((root.as_path(), dirs.to_vec(), name));
            }
        }
        Err(Failure::new(
            ErrorCode::PathNotAllowed,
            format!(
                "path: {path:?} is not beneath an allowed root ({})",
                self.0
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }

    /// Open the directory that holds `path`'s file, walking from the root
    /// without following symlinks; create missing dirs (0700) if asked.
    fn parent_fd<'a>(
        &'a self,
        path: &'a str,
        create: bool,
    ) -> Result<(OwnedFd, &'a OsStr), Failure> {
        let (root, dirs, name) = self.split(path)?;
        let mut fd =
            open_dir(root).map_err(|e| io_failure(&format!("root {}", root.display()), e))?;
        for d in dirs {
            let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
            let next = match openat(Some(fd.as_raw_fd()), d, flags, Mode::empty()) {
                Err(Errno::ENOENT) if create => {
                    match mkdirat(Some(fd.as_raw_fd()), d, Mode::from_bits_truncate(0o700)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(io_failure(path, e.into())),
                    }
                    openat(Some(fd.as_raw_fd()), d, flags, Mode::empty())
                }
                other => other,
            };
            fd = match next {
                Ok(n) => own(n),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    return Err(Failure::new(
                        ErrorCode::PathNotAllowed,
                        format!(
                            "path: {path:?}: component {:?} is a symlink or not a directory",
                            d.to_string_lossy()
                        ),
                    ));
                }
                Err(e) => return Err(io_failure(path, e.into())),
            };
        }
        Ok((fd, name))
    }

    /// Atomically write `data` to `path`.
    pub fn write(&self, path: &str, data: &[u8], mode: u32, parents: bool) -> Result<(), Failure> {
        let (dirfd, name) = self.parent_fd(path, parents)?;
        write_atomic_at(&dirfd, name, data, mode).map_err(|e| io_failure(path, e))
    }

    /// Read at most `limit` bytes of `path` from `offset`; returns the
    /// bytes and the file's size.
    pub fn read(&self, path: &str, offset: u64, limit: usize) -> Result<(Vec<u8>, u64), Failure> {
        let (dirfd, name) = self.parent_fd(path, false)?;
        let fd = openat(
            Some(dirfd.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP => Failure::new(
                ErrorCode::PathNotAllowed,
                format!("path: {path:?} is a symlink"),
            ),
            e => io_failure(path, e.into()),
        })?;
        let mut file = File::from(own(fd));
        let meta = file.metadata().map_err(|e| io_failure(path, e))?;
        if !meta.is_file() {
            return Err(Failure::invalid(format!(
                "path: {path:?} is not a regular file"
            )));
        }
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| io_failure(path, e))?;
        let mut out = Vec::with_capacity(limit.min(meta.len().saturating_sub(offset) as usize));
        (&mut file)
            .take(limit as u64)
            .read_to_end(&mut out)
            .map_err(|e| io_failure(path, e))?;
        Ok((out, meta.len()))
    }
}

/// An I/O error as a failure: missing files are `not_found`.
pub fn io_failure(what: &str, e: io::Error) -> Failure {
    let code = if e.kind() == io::ErrorKind::NotFound {
        ErrorCode::NotFound
    } else {
        ErrorCode::Io
    };
    Failure::new(code, format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confinement() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::create_dir(d.path().join("outside")).unwrap();
        std::os::unix::fs::symlink(d.path().join("outside"), root.join("link")).unwrap();
        let roots = Roots::new(std::slice::from_ref(&root)).unwrap();
        let r = roots.paths()[0].display().to_string();

        roots
            .write(&format!("{r}/a/b/f"), b"x", 0o640, true)
            .unwrap();
        let meta = fs::metadata(root.join("a/b/f")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!(fs::metadata(root.join("a")).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(
            roots.read(&format!("{r}/a/b/f"), 0, 10).unwrap(),
            (b"x".to_vec(), 1)
        );

        let code = |p: String| roots.write(&p, b"x", 0o600, true).unwrap_err().code;
        assert_eq!(code(format!("{r}/link/f")), ErrorCode::PathNotAllowed);
        assert!(!d.path().join("outside/f").exists());
        assert_eq!(code(format!("{r}/../outside/f")), ErrorCode::PathNotAllowed);
        assert_eq!(code("/etc/passwd".into()), ErrorCode::PathNotAllowed);
        assert_eq!(code(r.clone()), ErrorCode::PathNotAllowed);
        assert_eq!(code("relative".into()), ErrorCode::InvalidRequest);
        assert_eq!(
            roots
                .write(&format!("{r}/no/parent"), b"x", 0o600, false)
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
        // A symlink as the final component is read as "refused", and
        // written by replacing the link itself.
        std::os::unix::fs::symlink("/etc/hostname", root.join("ln")).unwrap();
        assert_eq!(
            roots.read(&format!("{r}/ln"), 0, 10).unwrap_err().code,
            ErrorCode::PathNotAllowed
        );
        roots
            .write(&format!("{r}/ln"), b"mine", 0o600, false)
            .unwrap();
        assert!(!fs::symlink_metadata(root.join("ln")).unwrap().is_symlink());
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            names.iter().all(|n| !n.to_string_lossy().contains(".tmp.")),
            "{names:?}"
        );
    }

    #[test]
    fn no_roots_means_off() {
        let roots = Roots::default();
        assert_eq!(
            roots.read("/tmp/x", 0, 1).unwrap_err().code,
            ErrorCode::Disabled
        );
    }
}
