//! Pieces every per-cell shim shares (the process tier's `__shim`, the
//! qemu tiers' `__vmm`): the one-line report to the spawner, detaching
//! from its pipe, the size-capped log copy, reaping, atomic state files.
//!
//! A shim is the small process that owns one workload for its whole life,
//! outliving the supervisor: it forks away from its spawner, reports
//! `{"ok":true,"pid":N}` once on its stdout, then copies the workload's
//! output into the cell's log and writes how the workload ended.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use cellhost_core::ExitInfo;

/// The line the shim reports on its stdout.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ShimReport {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn report(r: &ShimReport) {
    let mut line = serde_json::to_vec(r).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    let mut out = io::stdout().lock();
    let _ = out.write_all(&line);
    let _ = out.flush();
}

/// Point stdout at /dev/null so the spawner's pipe sees EOF.
pub fn detach_stdout() {
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
}

/// Copy the workload's output into the log until every writer has closed
/// the pipe (at the latest when the pid namespace dies with its init),
/// keeping at most `cap` bytes of log: past it, one marker line is written
/// and the rest is read and discarded, so the workload never blocks or
/// gets SIGPIPE for talking too much, and never fills the host's disk.
pub fn copy_capped(output: OwnedFd, mut log: File, cap: u64) {
    let mut written = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut capped = written >= cap;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match nix::unistd::read(output.as_raw_fd(), &mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("reading workload output: {e}");
                return;
            }
        };
        if capped {
            continue;
        }
        let room = usize::try_from(cap.saturating_sub(written)).unwrap_or(usize::MAX);
        let take = n.min(room);
        if log.write_all(&buf[..take]).is_err() {
            capped = true;
            continue;
        }
        written += take as u64;
        if take < n {
            capped = true;
            let _ = writeln!(
                log,
                "\n[cellhost: log capped at {cap} bytes; further output discarded]"
            );
        }
    }
}

/// `err: cause: cause` on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A final wait status as an exit; `None` for stops and continues.
pub fn exit_of(status: WaitStatus) -> Option<ExitInfo> {
    match status {
        WaitStatus::Exited(_, code) => Some(ExitInfo::exited(code)),
        WaitStatus::Signaled(_, sig, _) => Some(ExitInfo::signaled(sig as i32)),
        _ => None,
    }
}

/// Wait for `pid` (any kind of child) to end and reap it.
pub fn reap(pid: Pid) -> nix::Result<ExitInfo> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(status) => {
                if let Some(exit) = exit_of(status) {
                    return Ok(exit);
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// The file in a cell dir that records how the cell's workload ended
/// (written by the tier's shim, or by the backend when only it knows).
pub const EXIT_FILE: &str = "exit.json";

/// The cell's recorded exit, if any (`<dir>/exit.json`).
pub fn read_exit(dir: &Path) -> Option<cellhost_core::ExitInfo> {
    serde_json::from_slice(&fs::read(dir.join(EXIT_FILE)).ok()?).ok()
}

/// Record how the cell ended, atomically (`<dir>/exit.json`).
pub fn write_exit(dir: &Path, exit: &cellhost_core::ExitInfo) -> io::Result<()> {
    write_atomic(
        &dir.join(EXIT_FILE),
        &serde_json::to_vec(exit).unwrap_or_default(),
    )
}

/// Write `data` to `path` via a temp file, fsync, rename, dir fsync.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// A pid from a pid file (`None` when missing or not a number).
pub fn read_pid_file(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Is `pid` alive (not a zombie) and does its argv name `dir`? How a
/// shim, or the engine it runs, is recognised again after a restart
/// without trusting a pid that may have been reused.
pub fn alive_naming(pid: i32, dir: &Path) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.trim_start())
        && (rest.starts_with('Z') || rest.starts_with('X'))
    {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.as_os_str().as_encoded_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}
