//! Running cryptsetup, qemu-storage-daemon, mkfs.ext4 and mount (through
//! `cellhost_host::tool`: cleared env, deadline, captured stderr, secrets
//! on stdin only); unmounting and loop-device checks by syscall.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};

use cellhost_core::ids::CellId;

use crate::{EngineKind, VolumeError};

pub(crate) use cellhost_host::tool::find;
pub use cellhost_host::tool::{RunError, run};

/// Where the tools are. A bare name is looked up on `PATH` when run; a path
/// is used as is. Operators with tools in odd places set these; tests use
/// them to make a step fail.
#[derive(Debug, Clone)]
pub struct Tools {
    pub cryptsetup: PathBuf,
    pub qemu_storage_daemon: PathBuf,
    pub mkfs_ext4: PathBuf,
    pub mount: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            cryptsetup: "cryptsetup".into(),
            qemu_storage_daemon: "qemu-storage-daemon".into(),
            mkfs_ext4: "mkfs.ext4".into(),
            mount: "mount".into(),
        }
    }
}

pub(crate) fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

impl Tools {
    /// ext4 on the opened device: no reserved blocks (the whole volume is
    /// the cell's), no discard (which would tell the host which blocks of
    /// the ciphertext are in use), lazy init (seconds → milliseconds).
    pub(crate) fn mkfs(&self, id: &CellId, dev: &Path) -> Result<(), VolumeError> {
        run(
            &self.mkfs_ext4,
            &[
                os("-q"),
                os("-F"),
                os("-m"),
                os("0"),
                os("-L"),
                os("cellhost"),
                os("-E"),
                os("lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0"),
                dev.as_os_str(),
            ],
            None,
        )
        .map_err(|e| step(id, "mkfs", e))
    }

    /// Mount the opened device's ext4 at `mnt` (nosuid, nodev); through a
    /// loop device (autoclear) when the device is the userspace engine's
    /// FUSE file.
    pub(crate) fn mount(
        &self,
        id: &CellId,
        dev: &Path,
        mnt: &Path,
        engine: EngineKind,
    ) -> Result<(), VolumeError> {
        let opts = match engine {
            EngineKind::Userspace => "loop,nosuid,nodev",
            EngineKind::DmCrypt => "nosuid,nodev",
        };
        run(
            &self.mount,
            &[
                os("-t"),
                os("ext4"),
                os("-o"),
                os(opts),
                dev.as_os_str(),
                mnt.as_os_str(),
            ],
            None,
        )
        .map_err(|e| step(id, "mount", e))
    }
}

pub(crate) fn step(id: &CellId, step: &'static str, e: RunError) -> VolumeError {
    match e {
        RunError::Missing(m) => VolumeError::Unavailable(format!("{step}: {m}")),
        e => VolumeError::Step {
            id: id.clone(),
            step,
            detail: e.to_string(),
        },
    }
}

/// Unmount whatever is mounted at `mnt` (stacked mounts too). When busy
/// and `lazy_if_busy`, detach lazily; then verify nothing is mounted there.
///
/// A strict unmount retries EBUSY for up to a second first: a process
/// forked elsewhere in this program (a tool run by another thread) holds
/// copies of our descriptors, files on the volume among them, until its
/// exec closes them. Seen as a one-off EBUSY in CI with tests in parallel.
pub(crate) fn unmount(mnt: &Path, lazy_if_busy: bool) -> Result<(), String> {
    let mut tries = 0;
    let u = loop {
        let u = cellhost_os::mountinfo::unmount_under(mnt, lazy_if_busy)
            .map_err(|e| format!("reading mountinfo: {e}"))?;
        let busy = u.errors.iter().any(|e| e.contains("EBUSY"));
        if lazy_if_busy || !busy || tries >= 20 {
            break u;
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    if !u.errors.is_empty() {
        return Err(u.errors.join("; "));
    }
    if u.found.is_empty() || !crate::is_mounted(mnt) {
        Ok(())
    } else {
        Err(format!("{} is still mounted", mnt.display()))
    }
}

/// Loop devices whose backing file lies under `dir` (`/dev/loopN`).
pub fn loops_backed_by(dir: &Path) -> Vec<String> {
    loops_where(|back| back.starts_with(dir))
}

/// Loop devices backed by exactly `file`, also once it is deleted (the
/// kernel then shows `<file> (deleted)`). `file` must be as the kernel
/// shows it: every symlink resolved.
pub fn loops_backed_by_file(file: &Path) -> Vec<String> {
    loops_where(|back| is_backing_file(back, file))
}

/// Is `back` (a loop device's backing file as sysfs shows it) `file`?
fn is_backing_file(back: &Path, file: &Path) -> bool {
    let mut deleted = file.as_os_str().to_owned();
    deleted.push(" (deleted)");
    back == file || back.as_os_str() == deleted
}

/// `/dev/loopN` of every loop device whose backing file passes `keep`.
fn loops_where(keep: impl Fn(&Path) -> bool) -> Vec<String> {
    let Ok(rd) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !name.starts_with("loop") {
                return None;
            }
            let back = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let back = PathBuf::from(back.trim_end_matches('\n'));
            keep(&back).then(|| format!("/dev/{name}"))
        })
        .collect();
    out.sort();
    out
}

nix::ioctl_none!(loop_clr_fd, 0x4C, 0x01);

/// Detach loop devices still backed by files under `dir` (a mount that
/// failed after its loop was set up, or a lazily unmounted volume once its
/// last user left). Errors are returned per device.
pub fn detach_loops(dir: &Path) -> Vec<String> {
    detach(loops_backed_by(dir))
}

/// Detach loop devices still backed by exactly `file` (see
/// [`loops_backed_by_file`]). Errors are returned per device.
pub fn detach_loops_of_file(file: &Path) -> Vec<String> {
    detach(loops_backed_by_file(file))
}

fn detach(devices: Vec<String>) -> Vec<String> {
    let mut errors = Vec::new();
    for dev in devices {
        let r = fs::OpenOptions::new()
            .read(true)
            .open(&dev)
            .map_err(|e| e.to_string())
            .and_then(|f| clear_loop(&f).map_err(|e| e.to_string()));
        if let Err(e) = r {
            errors.push(format!("detach {dev}: {e}"));
        }
    }
    errors
}

fn clear_loop(f: &fs::File) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is an open loop device
    // that lives for the duration of the call.
    unsafe { loop_clr_fd(f.as_raw_fd()) }.map(|_| ())
}

/// `,` doubled, as qemu's option syntax wants inside a value.
pub(crate) fn qemu_escape(p: &Path) -> OsString {
    let s = p.as_os_str().to_string_lossy().replace(',', ",,");
    OsString::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_is_matched_by_its_exact_file_even_once_deleted() {
        let f = Path::new("/s/cells/abc/volume.img");
        assert!(is_backing_file(f, f));
        assert!(is_backing_file(
            Path::new("/s/cells/abc/volume.img (deleted)"),
            f
        ));
        assert!(!is_backing_file(Path::new("/s/cells/abc/disk.img"), f));
        assert!(!is_backing_file(Path::new("/s/cells/abc/volume.img2"), f));
        assert!(!is_backing_file(Path::new("/s/cells/abc"), f));
    }

    #[test]
    fn run_reports_missing_and_failing_tools() {
        match run(Path::new("/nonexistent/tool"), &[], None) {
            Err(RunError::Missing(m)) => assert!(m.contains("/nonexistent/tool"), "{m}"),
            other => panic!("{other:?}"),
        }
        match run(
            Path::new("sh"),
            &[os("-c"), os("echo nope >&2; exit 3")],
            None,
        ) {
            Err(RunError::Failed(Some(3), m)) => assert_eq!(m, "nope"),
            other => panic!("{other:?}"),
        }
        run(
            Path::new("sh"),
            &[os("-c"), os("read x; test \"$x\" = abc")],
            Some(b"abc\n"),
        )
        .unwrap();
    }

    #[test]
    fn qemu_values_escape_commas() {
        assert_eq!(qemu_escape(Path::new("/a,b/c")), OsString::from("/a,,b/c"));
    }
}
