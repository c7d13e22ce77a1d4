//! Running cryptsetup, qemu-storage-daemon, mkfs.ext4 and mount; unmounting
//! and loop-device checks by syscall.
//!
//! Every child gets an empty environment plus `PATH` and `LC_ALL=C` (stable
//! messages to match on), stdout discarded, stderr captured (capped), and
//! a deadline after which it is killed. A secret goes to the child's stdin
//! through a pipe that is closed as soon as it is written; argv holds only
//! fixed flags and paths.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cellhost_core::ids::CellId;

use crate::{EngineKind, VolumeError};

/// Deadline for one tool run (formatting and mkfs of a big sparse file are
/// the slow ones; they take milliseconds to seconds).
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Most stderr kept from one tool.
const MAX_STDERR: usize = 16 * 1024;

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

/// The executable `tool` names, if there is one: a path as is, a bare
/// name as the host probe finds it.
pub(crate) fn find(tool: &Path) -> Option<PathBuf> {
    if tool.components().count() > 1 {
        use std::os::unix::fs::PermissionsExt;
        let exec =
            fs::metadata(tool).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        return exec.then(|| tool.to_path_buf());
    }
    cellhost_core::probe::which(tool.to_str()?)
}

/// How a tool run failed.
#[derive(Debug)]
pub enum RunError {
    /// Not installed (or not executable).
    Missing(String),
    /// Ran and failed: exit code (None when killed) and its stderr.
    Failed(Option<i32>, String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Missing(m) => f.write_str(m),
            RunError::Failed(Some(c), e) => write!(f, "exit {c}: {e}"),
            RunError::Failed(None, e) => write!(f, "killed: {e}"),
        }
    }
}

/// Run `tool args…`, feeding `stdin` (then EOF) when given.
pub fn run(tool: &Path, args: &[&OsStr], stdin: Option<&[u8]>) -> Result<(), RunError> {
    let Some(exe) = find(tool) else {
        return Err(RunError::Missing(format!(
            "{} not found (install it: see `cellhost doctor`)",
            tool.display()
        )));
    };
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut child = Command::new(&exe)
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RunError::Missing(format!("{}: {e}", exe.display())))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A child that exits early closes the pipe (EPIPE): its exit status
        // and stderr say why, so the write error itself is not the story.
        let _ = pipe.write_all(data);
        drop(pipe);
    }
    let (tx, rx) = mpsc::channel();
    if let Some(mut err) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut err).take(MAX_STDERR as u64).read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    // A daemonizing child may hold stderr a moment longer; do not wait on
    // it forever.
    let stderr = rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
    let msg = cellhost_core::probe::one_line_max(&String::from_utf8_lossy(&stderr), 400);
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(RunError::Failed(s.code(), msg)),
        None => Err(RunError::Failed(
            None,
            format!("no answer within {TOOL_TIMEOUT:?}; {msg}"),
        )),
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
        let u = cellhost_core::mountinfo::unmount_under(mnt, lazy_if_busy)
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
pub(crate) fn loops_backed_by(dir: &Path) -> Vec<String> {
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
            back.starts_with(dir).then(|| format!("/dev/{name}"))
        })
        .collect();
    out.sort();
    out
}

nix::ioctl_none!(loop_clr_fd, 0x4C, 0x01);

/// Detach loop devices still backed by files under `dir` (a mount that
/// failed after its loop was set up, or a lazily unmounted volume once its
/// last user left). Errors are returned per device.
pub(crate) fn detach_loops(dir: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    for dev in loops_backed_by(dir) {
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
