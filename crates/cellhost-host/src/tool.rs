//! Running a host tool where the tool is the interface (cryptsetup, mkfs,
//! qemu-img, ip, nft, conntrack…): one runner for every crate.
//!
//! The child gets an empty environment plus `PATH` and `LC_ALL=C` (stable
//! messages to match on), stdin from the given bytes (then EOF) or
//! /dev/null, stdout discarded or captured, stderr captured (capped), and a
//! deadline after which it is killed. A secret goes to the child's stdin
//! through a pipe that is closed as soon as it is written; callers keep
//! argv to fixed flags, paths and names.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Deadline for one tool run (formatting and mkfs of a big sparse file are
/// the slow ones; they take milliseconds to seconds).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Most stderr kept from one tool.
const MAX_STDERR: usize = 16 * 1024;

/// The executable `tool` names, if there is one: a path as is, a bare
/// name as the host probe finds it.
pub fn find(tool: &Path) -> Option<PathBuf> {
    if tool.components().count() > 1 {
        use std::os::unix::fs::PermissionsExt;
        let exec =
            fs::metadata(tool).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        return exec.then(|| tool.to_path_buf());
    }
    crate::probe::which(tool.to_str()?)
}

/// How a tool run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Not installed (or not executable).
    #[error("{0}")]
    Missing(String),
    /// Ran and failed: exit code (None when killed) and its stderr.
    #[error("{}: {}", .0.map_or_else(|| "killed".to_string(), |c| format!("exit {c}")), .1)]
    Failed(Option<i32>, String),
}

/// Run `tool args…`, feeding `stdin` (then EOF) when given; stdout
/// discarded.
pub fn run(tool: &Path, args: &[&OsStr], stdin: Option<&[u8]>) -> Result<(), RunError> {
    run_inner(tool, args, stdin, false).map(drop)
}

/// [`run`], returning what the tool printed on stdout (for tools that
/// answer, such as `nft -j`). Not for a tool that leaves a daemon holding
/// its stdout: that would be read until the deadline.
pub fn output(tool: &Path, args: &[&OsStr], stdin: Option<&[u8]>) -> Result<Vec<u8>, RunError> {
    run_inner(tool, args, stdin, true)
}

fn run_inner(
    tool: &Path,
    args: &[&OsStr],
    stdin: Option<&[u8]>,
    capture: bool,
) -> Result<Vec<u8>, RunError> {
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
        .stdout(if capture {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RunError::Missing(format!("{}: {e}", exe.display())))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A child that exits early closes the pipe (EPIPE): its exit status
        // and stderr say why, so the write error itself is not the story.
        let _ = pipe.write_all(data);
        drop(pipe);
    }
    let out = child.stdout.take().map(|mut o| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = o.read_to_end(&mut buf);
            buf
        })
    });
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
    let msg = crate::probe::one_line_max(&String::from_utf8_lossy(&stderr), 400);
    match status {
        Some(s) if s.success() => Ok(out.and_then(|t| t.join().ok()).unwrap_or_default()),
        Some(s) => Err(RunError::Failed(s.code(), msg)),
        None => Err(RunError::Failed(
            None,
            format!("no answer within {TOOL_TIMEOUT:?}; {msg}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_stdout_stdin_and_failures() {
        let out = output(Path::new("cat"), &[], Some(b"hi")).unwrap();
        assert_eq!(out, b"hi");
        assert!(run(Path::new("true"), &[], None).is_ok());
        match run(
            Path::new("sh"),
            &[OsStr::new("-c"), OsStr::new("echo no >&2; exit 3")],
            None,
        ) {
            Err(RunError::Failed(Some(3), msg)) => assert_eq!(msg, "no"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run(Path::new("cellhost-no-such-tool"), &[], None),
            Err(RunError::Missing(_))
        ));
    }
}

#[cfg(test)]
mod run_error_tests {
    use super::RunError;

    #[test]
    fn run_errors_read_as_before() {
        let run = RunError::Failed(Some(3), "bad flag".into());
        assert_eq!(run.to_string(), "exit 3: bad flag");
        let run = RunError::Failed(None, "x".into());
        assert_eq!(run.to_string(), "killed: x");
    }
}
