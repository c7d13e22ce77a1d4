//! `exec`: run a command inside a running process cell, like `docker exec`,
//! through a helper process (`cellhost __exec <cell-dir> <container-id>`,
//! see [`crate::ShimCommand::with_subcommand`]) that joins the cell with
//! libcontainer's tenant builder.
//!
//! Invariants (the join, lifecycle and threat model in `docs/tiers.md`,
//! "exec"):
//! - libcontainer never runs on a thread of the supervisor's runtime: the
//!   helper is single-threaded when it calls it, and lives exactly as long
//!   as the command;
//! - the command gets the cell's boundary (namespaces, cgroup, capabilities,
//!   `no_new_privileges`, seccomp, read-only root), exactly the requested
//!   environment and fds 0-2; the helper's environment is empty;
//! - the request (it may hold secrets) travels only over the control socket,
//!   never in argv, a file, a log line or an error message;
//! - `<cell-dir>/exec.lock` serialises the join of concurrent execs; destroy
//!   holds it for its whole teardown, so no exec re-creates the cgroup of a
//!   cell being destroyed;
//! - a timeout is `BackendError::Timeout` and drops the output; output is
//!   capped at [`OUTPUT_CAP_BYTES`] per pipe and never parsed.
//!
//! Design: `docs/tiers.md`.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use cellhost_core::ids::CellId;
use cellhost_core::{BackendError, CellState, ExecOutput, ExecRequest, ExitInfo};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use oci_spec::runtime::Spec;
use tokio::io::AsyncReadExt;

use crate::executor::{ExactEnvExecutor, resolve_command};
use crate::shim::{LC_ROOT, error_chain};
use crate::{EXEC_SUBCOMMAND, ProcessBackend};

/// Most bytes of each of stdout and stderr an exec returns; the rest is
/// read and dropped.
pub const OUTPUT_CAP_BYTES: usize = 16 << 20;
/// How long the backend reads on after the command ended, for output a
/// background child still writes.
pub const DRAIN_GRACE: Duration = Duration::from_millis(100);
/// How long past the timeout the backend waits for a helper that neither
/// reports nor exits.
pub const HELPER_SLACK: Duration = Duration::from_secs(30);
/// How long the backend waits for a helper that has reported to exit.
const HELPER_EXIT_WAIT: Duration = Duration::from_secs(5);
/// Largest request line the helper reads.
const MAX_REQUEST_BYTES: u64 = 8 << 20;
/// Largest report line the backend reads.
const MAX_REPORT_BYTES: u64 = 1 << 20;
/// Poll interval when the kernel has no pidfd (before Linux 5.3).
const FALLBACK_POLL_MS: i32 = 10;
/// The lock file in a cell dir (see the module docs).
const EXEC_LOCK_FILE: &str = "exec.lock";
/// Socket files libcontainer's tenant builder leaves in the state dir.
const TENANT_NOTIFY_PREFIX: &str = "tenant-notify-";

/// The request as it travels to the helper: one JSON line on the control
/// socket.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    timeout_ms: Option<u64>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Wire")
            .field("argv", &self.argv)
            .field("env_keys (values redacted)", &keys)
            .field("cwd", &self.cwd)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// What the helper reports: one JSON line on the control socket.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum Report {
    /// The command ran and ended (possibly killed by a signal).
    Exited { exit: ExitInfo },
    /// The timeout passed; the command's process group was killed.
    TimedOut,
    /// The cell is not running (or gone); nothing ran.
    NotRunning { error: String },
    /// Nothing ran, for another reason.
    Failed { error: String },
}

/// Why the helper could not run the command.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("usage: cellhost {EXEC_SUBCOMMAND} <cell-dir> <container-id> (request on stdin)")]
    Usage,
    #[error("bad request: {0}")]
    Request(String),
    #[error("the cell is not running: {0}")]
    NotRunning(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("libcontainer: {0}")]
    Engine(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> ExecError {
    let context = context.into();
    move |source| ExecError::Io { context, source }
}

// ---------------------------------------------------------------------------
// Helper side: `cellhost __exec <cell-dir> <container-id>`.

/// Entry point of `cellhost __exec`. Must run before the process starts a
/// thread or a runtime (libcontainer forks).
pub fn exec_main(args: &[OsString]) -> ExitCode {
    let (Some(dir), Some(id), None) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("{}", ExecError::Usage);
        return ExitCode::from(2);
    };
    // The control channel is stdin, a socket: the request comes in on it,
    // the report goes back on it.
    let control = match io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            eprintln!("cellhost {EXEC_SUBCOMMAND}: stdin: {e}");
            return ExitCode::from(1);
        }
    };
    let report = match helper(Path::new(dir), &id.to_string_lossy(), &control) {
        Ok(r) => r,
        Err(ExecError::NotRunning(error)) => Report::NotRunning { error },
        Err(e) => Report::Failed {
            error: e.to_string(),
        },
    };
    let mut line = serde_json::to_vec(&report)
        .unwrap_or_else(|_| br#"{"result":"failed","error":"encoding the report"}"#.to_vec());
    line.push(b'\n');
    // The backend may be gone (it gave up); nobody is left to tell.
    match (&control).write_all(&line) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(1),
    }
}

fn helper(cell_dir: &Path, container_id: &str, control: &UnixStream) -> Result<Report, ExecError> {
    let req = read_request(control)?;
    let deadline = req
        .timeout_ms
        .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let pid = {
        let _lock = lock_setup(cell_dir)?;
        join(cell_dir, container_id, req)?
    };
    detach_stdio();
    Ok(match wait_command(pid, deadline, control)? {
        Ended::Exited(exit) | Ended::Cancelled(exit) => Report::Exited { exit },
        Ended::TimedOut => Report::TimedOut,
    })
}

fn read_request(control: &UnixStream) -> Result<Wire, ExecError> {
    let mut line = Vec::new();
    io::BufReader::new(control.take(MAX_REQUEST_BYTES))
        .read_until(b'\n', &mut line)
        .map_err(io_error("reading the request"))?;
    // serde_json's messages can quote input; the input holds env values.
    serde_json::from_slice(&line).map_err(|e| {
        ExecError::Request(format!(
            "malformed request at line {} column {} ({:?})",
            e.line(),
            e.column(),
            e.classify()
        ))
    })
}

fn open_lock(cell_dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(cell_dir.join(EXEC_LOCK_FILE))
}

/// Take the cell's exec lock for the join (blocking).
fn lock_setup(cell_dir: &Path) -> Result<Flock<File>, ExecError> {
    let mut file = match open_lock(cell_dir) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ExecError::NotRunning("the cell's directory is gone".into()));
        }
        Err(e) => return Err(io_error("opening the exec lock")(e)),
    };
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(lock) => return Ok(lock),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(io_error("locking the exec lock")(e.into())),
        }
    }
}

/// Destroy's side of the exec lock: wait for any join in progress (they
/// take milliseconds) until `deadline`, then proceed without it. None when
/// the cell dir is gone (no exec can join then).
pub(crate) fn lock_for_destroy(cell_dir: &Path, deadline: Instant) -> Option<Flock<File>> {
    let mut file = open_lock(cell_dir).ok()?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Some(lock),
            Err((f, _)) if Instant::now() < deadline => {
                file = f;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => return None,
        }
    }
}

/// Start the command inside the cell; returns its host pid.
fn join(cell_dir: &Path, container_id: &str, req: Wire) -> Result<Pid, ExecError> {
    let lc_root = cell_dir.join(LC_ROOT);
    let state_dir = lc_root.join(container_id);
    if !state_dir.join("state.json").is_file() {
        return Err(ExecError::NotRunning("the cell has no container".into()));
    }
    // The init libcontainer will join by pid must still be this cell's:
    // a pid reused by another cell's process would put the command there.
    // (Checked under the exec lock; what remains is the microseconds until
    // libcontainer opens its namespaces.)
    let instance = cell_dir
        .parent()
        .and_then(Path::parent)
        .map(crate::hostfs::instance_tag)
        .unwrap_or_default();
    let cgroup = crate::hostfs::cgroup_object(&instance, container_id);
    match crate::read_state_pid(&state_dir) {
        Some(pid) if crate::pid_in_cell(pid, &cgroup) => {}
        _ => return Err(ExecError::NotRunning("its init is gone".into())),
    }
    // The cell's own hard limits, which the joining process keeps inside
    // the cell's user namespace (where it could only lower them).
    crate::shim::raise_hard_limits(cell_dir).map_err(ExecError::Engine)?;
    let cwd = req.cwd.unwrap_or_else(|| cell_cwd(cell_dir));
    let null = File::open("/dev/null").map_err(io_error("opening /dev/null"))?;
    let env = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let built = ContainerBuilder::new(container_id.to_string(), SyscallType::default())
        .with_root_path(&lc_root)
        .and_then(|b| {
            b.with_executor(ExecExecutor { env })
                .with_stdin(OwnedFd::from(null))
                .validate_id()
        })
        .and_then(|b| {
            b.as_tenant()
                .with_container_args(req.argv)
                .with_cwd(Some(cwd))
                .build()
        });
    remove_notify_sockets(&state_dir);
    built.map_err(|e| match e {
        LibcontainerError::IncorrectStatus(s) => {
            ExecError::NotRunning(format!("its container is {s:?}"))
        }
        LibcontainerError::NoDirectory => {
            ExecError::NotRunning("its container state is gone".into())
        }
        other => ExecError::Engine(error_chain(&other)),
    })
}

/// The cell's working directory (docker exec's default).
fn cell_cwd(cell_dir: &Path) -> String {
    Spec::load(cell_dir.join("config.json"))
        .ok()
        .and_then(|s| s.process().as_ref().map(|p| p.cwd().clone()))
        .and_then(|p| p.to_str().map(str::to_string))
        .unwrap_or_else(|| "/".to_string())
}

/// libcontainer leaves the tenant's notify socket file behind. Called with
/// the exec lock held, so no other join is using one.
fn remove_notify_sockets(state_dir: &Path) {
    let Ok(rd) = fs::read_dir(state_dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TENANT_NOTIFY_PREFIX) && name.ends_with(".sock") {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Point the helper's own stdout and stderr at /dev/null: the pipes are
/// the command's now, and reach EOF when its processes close them.
fn detach_stdio() {
    if let Ok(null) = OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
        let _ = nix::unistd::dup2(null.as_raw_fd(), 2);
    }
}

enum Ended {
    Exited(ExitInfo),
    TimedOut,
    /// The backend closed the control socket; the command was killed.
    Cancelled(ExitInfo),
}

/// Wait for the command `pid` (the helper's child) to end, the deadline to
/// pass, or the backend to hang up.
fn wait_command(
    pid: Pid,
    deadline: Option<Instant>,
    control: &UnixStream,
) -> Result<Ended, ExecError> {
    // Until it is reaped, `pid` (and so its process group id) is ours and
    // cannot name another process.
    let pidfd = pidfd_open(pid).ok();
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(status) => {
                if let Some(exit) = crate::shim::exit_of(status) {
                    return Ok(Ended::Exited(exit));
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(io_error("waiting for the command")(e.into())),
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            kill_group(pid);
            reap(pid)?;
            return Ok(Ended::TimedOut);
        }
        let mut ms = deadline.map_or(-1, |d| {
            let left = d.saturating_duration_since(now).as_millis() + 1;
            i32::try_from(left).unwrap_or(i32::MAX)
        });
        let mut fds = vec![libc::pollfd {
            fd: control.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        match &pidfd {
            Some(p) => fds.push(libc::pollfd {
                fd: p.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }),
            None if ms < 0 => ms = FALLBACK_POLL_MS,
            None => ms = ms.min(FALLBACK_POLL_MS),
        }
        match poll_fds(&mut fds, ms) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error("poll")(e)),
        }
        if fds[0].revents != 0 {
            // EOF (or anything) on the control socket: the backend gave up.
            kill_group(pid);
            return Ok(Ended::Cancelled(reap(pid)?));
        }
    }
}

fn kill_group(pid: Pid) {
    let _ = killpg(pid, Signal::SIGKILL);
    let _ = kill(pid, Signal::SIGKILL);
}

fn reap(pid: Pid) -> Result<ExitInfo, ExecError> {
    crate::shim::reap(pid).map_err(|e| io_error("reaping the command")(e.into()))
}

fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags by value and returns a new
    // descriptor or -1; no memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: `fd` was just returned by the kernel, is open, and is owned by
    // nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn poll_fds(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed slice of initialised
    // pollfd structs for the whole call, and its length goes with it.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// The executor of an exec'd command: the cell's [`ExactEnvExecutor`]
/// (seccomp, then `execve`) with the request's environment instead of the
/// cell's. Runs in the joined process, single-threaded.
///
/// A command that cannot be found exits 127, one found but not executable
/// 126, with a line on its stderr (the shell's convention, and docker
/// exec's), rather than failing the exec.
#[derive(Clone)]
struct ExecExecutor {
    env: Vec<String>,
}

impl Executor for ExecExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let mut process = spec.process().clone().ok_or(ExecutorError::InvalidArg)?;
        let first = process
            .args()
            .as_ref()
            .and_then(|a| a.first())
            .cloned()
            .ok_or(ExecutorError::InvalidArg)?;
        if let Err(msg) = resolve_command(&first, &self.env) {
            let code = if first.contains('/') && Path::new(&first).exists() {
                126
            } else {
                127
            };
            let _ = writeln!(io::stderr(), "cellhost exec: {msg}");
            exit_now(code);
        }
        // (ExactEnvExecutor resets SIGPIPE to its default before execve.)
        process.set_env(Some(self.env.clone()));
        let mut spec = spec.clone();
        spec.set_process(Some(process));
        ExactEnvExecutor.exec(&spec)
    }

    fn validate(&self, _spec: &Spec) -> Result<(), ExecutorValidationError> {
        // Resolution happens in `exec`, with the shell's exit codes.
        Ok(())
    }

    fn setup_envs(
        &self,
        _envs: std::collections::HashMap<String, String>,
    ) -> Result<(), ExecutorSetEnvsError> {
        // The environment goes to execve explicitly.
        Ok(())
    }
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process at once; nothing of this process's
    // state is used afterwards.
    unsafe { libc::_exit(code) }
}

// ---------------------------------------------------------------------------
// Backend side.

/// Check a request before anything runs.
fn check_request(req: &ExecRequest) -> Result<(), BackendError> {
    let invalid = |m: String| Err(BackendError::Invalid(m));
    match req.argv.first() {
        None => return invalid("exec argv is empty".into()),
        Some(a) if a.is_empty() => return invalid("exec argv[0] is empty".into()),
        Some(_) => {}
    }
    if let Some(i) = req.argv.iter().position(|a| a.contains('\0')) {
        return invalid(format!("exec argv[{i}] contains a NUL byte"));
    }
    for (i, (k, v)) in req.env.iter().enumerate() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return invalid(format!(
                "exec env[{i}]: name must be non-empty, without '=' or NUL"
            ));
        }
        if v.contains('\0') {
            // Name only: the value may be a secret.
            return invalid(format!("exec env {k}: value contains a NUL byte"));
        }
    }
    if let Some(cwd) = &req.cwd
        && (!cwd.starts_with('/') || cwd.contains('\0'))
    {
        return invalid(format!("exec cwd {cwd:?} must be an absolute path"));
    }
    Ok(())
}

/// Output kept up to a cap; the rest counted and dropped.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
    dropped: u64,
}

impl Capped {
    fn new(cap: usize) -> Capped {
        Capped {
            buf: Vec::new(),
            cap,
            dropped: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let take = self.cap.saturating_sub(self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        self.dropped += (data.len() - take) as u64;
    }
}

/// What the backend gathered from one helper.
struct Gathered {
    /// None when the hard deadline passed before any report.
    report: Option<Result<Report, String>>,
    stdout: Capped,
    stderr: Capped,
}

/// Read both pipes until `report` resolves; then read on to EOF, or for
/// [`DRAIN_GRACE`] at most.
async fn gather<R, O, E>(
    report_rx: R,
    mut stdout: O,
    mut stderr: E,
    hard: Option<Instant>,
) -> Gathered
where
    R: std::future::Future<Output = Result<Report, String>>,
    O: tokio::io::AsyncRead + Unpin,
    E: tokio::io::AsyncRead + Unpin,
{
    tokio::pin!(report_rx);
    let mut out = Capped::new(OUTPUT_CAP_BYTES);
    let mut err = Capped::new(OUTPUT_CAP_BYTES);
    let mut obuf = vec![0u8; 64 * 1024];
    let mut ebuf = vec![0u8; 64 * 1024];
    let (mut out_open, mut err_open) = (true, true);
    let mut report: Option<Result<Report, String>> = None;
    let mut until = hard;
    // Far enough to never fire; the branch is disabled without a deadline.
    let never = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    loop {
        if report.is_some() && !out_open && !err_open {
            break;
        }
        let wake = tokio::time::Instant::from_std(until.unwrap_or(never));
        tokio::select! {
            r = stdout.read(&mut obuf), if out_open => match r {
                Ok(n) if n > 0 => out.push(&obuf[..n]),
                _ => out_open = false,
            },
            r = stderr.read(&mut ebuf), if err_open => match r {
                Ok(n) if n > 0 => err.push(&ebuf[..n]),
                _ => err_open = false,
            },
            r = &mut report_rx, if report.is_none() => {
                report = Some(r);
                until = Some(Instant::now() + DRAIN_GRACE);
            }
            _ = tokio::time::sleep_until(wake), if until.is_some() => break,
        }
    }
    for (name, c) in [("stdout", &out), ("stderr", &err)] {
        if c.dropped > 0 {
            tracing::warn!(
                "exec {name} capped at {} bytes; {} bytes dropped",
                c.cap,
                c.dropped
            );
        }
    }
    Gathered {
        report,
        stdout: out,
        stderr: err,
    }
}

/// The backend's half of the control channel, on a blocking thread: send
/// the request, read the report. Zeroes the request buffer when sent.
fn converse(control: UnixStream, mut request: Vec<u8>) -> Result<Report, String> {
    // A helper that died early shows up as a missing report.
    let _ = (&control).write_all(&request);
    request.fill(0);
    let mut line = Vec::new();
    match io::BufReader::new((&control).take(MAX_REPORT_BYTES)).read_until(b'\n', &mut line) {
        Ok(0) => Err("it ended without a report".to_string()),
        Ok(_) => serde_json::from_slice(&line).map_err(|e| format!("unreadable report ({e})")),
        Err(e) => Err(format!("reading its report: {e}")),
    }
}

/// Shuts the control socket down when dropped: the helper then kills a
/// command still running (nobody wants its result), and a blocked
/// `converse` returns.
struct HangUp(UnixStream);

impl Drop for HangUp {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

pub(crate) async fn cell_state(b: &ProcessBackend, id: &CellId) -> Result<CellState, BackendError> {
    let id = id.clone();
    b.blocking("status", move |this| this.status_blocking(&id).state)
        .await
}

/// The error for `op` on a cell in `state` (not running).
pub(crate) fn not_running(id: &CellId, op: &'static str, state: CellState) -> BackendError {
    match state {
        CellState::Gone => BackendError::NotFound(id.clone()),
        state => BackendError::WrongState {
            id: id.clone(),
            op,
            state,
            wanted: "running",
        },
    }
}

/// `Backend::exec` of the process tier (see the module docs).
pub(crate) async fn run(
    b: &ProcessBackend,
    id: &CellId,
    req: ExecRequest,
) -> Result<ExecOutput, BackendError> {
    check_request(&req)?;
    let state = cell_state(b, id).await?;
    if state != CellState::Running {
        return Err(not_running(id, "exec", state));
    }
    let p = b.paths(id);
    let timeout = req.timeout;
    let mut line = serde_json::to_vec(&Wire {
        argv: req.argv,
        env: req.env,
        cwd: req.cwd,
        timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
    })
    .map_err(|e| BackendError::engine_from("encoding the exec request", e))?;
    line.push(b'\n');

    let helper = b.cfg.shim.with_subcommand(EXEC_SUBCOMMAND);
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| BackendError::io("making the exec control socket", e))?;
    let mut cmd = tokio::process::Command::new(&helper.program);
    cmd.args(&helper.args)
        .arg(&p.dir)
        .arg(&p.container_id)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawned = cmd.spawn();
    // The command holds our copy of the helper's end of the socket: drop
    // it, or a helper that dies would never look like EOF.
    drop(cmd);
    let mut child = spawned.map_err(|e| {
        BackendError::io(
            format!("spawning exec helper {}", helper.program.display()),
            e,
        )
    })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.start_kill();
        return Err(BackendError::engine("exec helper pipes missing"));
    };
    // The control socket is served on a blocking thread (a std socket);
    // `hang_up` ends the conversation however this future ends.
    let hang_up = match ours.try_clone() {
        Ok(c) => HangUp(c),
        Err(e) => {
            let _ = child.start_kill();
            return Err(BackendError::io("cloning the exec control socket", e));
        }
    };
    let conversation = tokio::task::spawn_blocking(move || converse(ours, line));
    let report_rx = async move {
        conversation
            .await
            .unwrap_or_else(|e| Err(format!("control task: {e}")))
    };
    let hard = timeout.and_then(|t| Instant::now().checked_add(t + HELPER_SLACK));
    let got = gather(report_rx, stdout, stderr, hard).await;
    drop(hang_up);
    if got.report.is_none() {
        let _ = child.start_kill();
    }
    let status = match tokio::time::timeout(HELPER_EXIT_WAIT, child.wait()).await {
        Ok(Ok(s)) => s.to_string(),
        Ok(Err(e)) => format!("wait: {e}"),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            "killed: did not exit after reporting".to_string()
        }
    };
    match got.report {
        None => Err(BackendError::Timeout(
            timeout.unwrap_or_default() + HELPER_SLACK,
            "the exec helper to report",
        )),
        Some(Ok(Report::Exited { exit })) => Ok(ExecOutput {
            exit,
            stdout: got.stdout.buf,
            stderr: got.stderr.buf,
        }),
        Some(Ok(Report::TimedOut)) => Err(BackendError::Timeout(
            timeout.unwrap_or_default(),
            "the exec'd command",
        )),
        Some(Ok(Report::NotRunning { error })) => {
            tracing::debug!("exec in cell {id}: {error}");
            // libcontainer saw the init gone (or a zombie) a moment before
            // the shim records the exit: that is an exited cell.
            let state = match cell_state(b, id).await? {
                CellState::Running => CellState::Exited,
                s => s,
            };
            Err(not_running(id, "exec", state))
        }
        Some(Ok(Report::Failed { error })) => {
            Err(BackendError::engine(format!("exec in cell {id}: {error}")))
        }
        Some(Err(why)) => {
            let tail = String::from_utf8_lossy(&got.stderr.buf);
            let tail = tail.lines().last().unwrap_or("no diagnostics");
            Err(BackendError::engine(format!(
                "exec helper for cell {id}: {why} ({status}): {tail}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ShimCommand;

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_checked() {
        assert!(check_request(&req(&["/bin/true"])).is_ok());
        assert!(check_request(&req(&[])).is_err());
        assert!(check_request(&req(&[""])).is_err());
        assert!(check_request(&req(&["a\0b"])).is_err());
        let mut r = req(&["env"]);
        r.env = vec![("A=B".into(), "x".into())];
        assert!(check_request(&r).is_err());
        r.env = vec![("".into(), "x".into())];
        assert!(check_request(&r).is_err());
        r.env = vec![("TOKEN".into(), "hunter2\0".into())];
        let e = check_request(&r).unwrap_err().to_string();
        assert!(e.contains("TOKEN") && !e.contains("hunter2"), "{e}");
        r.env = vec![];
        r.cwd = Some("relative".into());
        assert!(check_request(&r).is_err());
        r.cwd = Some("/tmp".into());
        assert!(check_request(&r).is_ok());
    }

    #[test]
    fn wire_debug_redacts_env_values() {
        let w = Wire {
            argv: vec!["env".into()],
            env: vec![("TOKEN".into(), "hunter2".into())],
            cwd: None,
            timeout_ms: Some(5),
        };
        let d = format!("{w:?}");
        assert!(d.contains("TOKEN") && !d.contains("hunter2"), "{d}");
    }

    #[test]
    fn reports_round_trip() {
        for r in [
            Report::Exited {
                exit: ExitInfo::signaled(9),
            },
            Report::TimedOut,
            Report::NotRunning { error: "x".into() },
            Report::Failed { error: "y".into() },
        ] {
            let s = serde_json::to_string(&r).unwrap();
            assert!(!s.contains('\n'));
            assert_eq!(serde_json::from_str::<Report>(&s).unwrap(), r);
        }
    }

    #[test]
    fn capped_keeps_the_head_and_counts_the_rest() {
        let mut c = Capped::new(5);
        c.push(b"abc");
        c.push(b"defg");
        c.push(b"h");
        assert_eq!(c.buf, b"abcde");
        assert_eq!(c.dropped, 3);
    }

    #[test]
    fn subcommand_replaces_the_shim_subcommand() {
        let shim = ShimCommand {
            program: "/usr/bin/cellhost".into(),
            args: vec!["--flag".into(), crate::SHIM_SUBCOMMAND.into()],
        };
        let e = shim.with_subcommand(EXEC_SUBCOMMAND);
        assert_eq!(e.program, shim.program);
        assert_eq!(
            e.args,
            vec![OsString::from("--flag"), EXEC_SUBCOMMAND.into()]
        );
        let other = ShimCommand {
            program: "/x".into(),
            args: vec![],
        };
        assert_eq!(
            other.with_subcommand("__exec").args,
            vec![OsString::from("__exec")]
        );
    }

    #[tokio::test]
    async fn gather_reads_everything_and_stops_after_the_grace() {
        use tokio::io::AsyncWriteExt;
        let (mut out_w, out_r) = tokio::io::duplex(1 << 20);
        let (_err_w, err_r) = tokio::io::duplex(1024);
        out_w.write_all(b"hello").await.unwrap();
        let report = async {
            Ok(Report::Exited {
                exit: ExitInfo::exited(0),
            })
        };
        // Neither output writer closes: gather must stop after DRAIN_GRACE.
        let t0 = Instant::now();
        let got = gather(report, out_r, err_r, None).await;
        assert!(t0.elapsed() < DRAIN_GRACE * 10);
        assert_eq!(
            got.report,
            Some(Ok(Report::Exited {
                exit: ExitInfo::exited(0)
            }))
        );
        assert_eq!(got.stdout.buf, b"hello");
        assert!(got.stderr.buf.is_empty());
    }

    #[tokio::test]
    async fn gather_without_report_stops_at_the_hard_deadline() {
        let (_out_w, out_r) = tokio::io::duplex(16);
        let (_err_w, err_r) = tokio::io::duplex(16);
        let never = std::future::pending::<Result<Report, String>>();
        let hard = Some(Instant::now() + Duration::from_millis(20));
        let got = gather(never, out_r, err_r, hard).await;
        assert!(got.report.is_none());
    }

    #[test]
    fn converse_sends_the_request_and_reads_the_report() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let helper = std::thread::spawn(move || {
            let mut line = Vec::new();
            io::BufReader::new(&theirs)
                .read_until(b'\n', &mut line)
                .unwrap();
            (&theirs)
                .write_all(b"{\"result\":\"timed_out\"}\n")
                .unwrap();
            line
        });
        let r = converse(ours, b"{\"argv\":[]}\n".to_vec());
        assert_eq!(r, Ok(Report::TimedOut));
        assert_eq!(helper.join().unwrap(), b"{\"argv\":[]}\n");
        // A helper that hangs up without a word.
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(
            converse(ours, b"x\n".to_vec())
                .unwrap_err()
                .contains("without a report")
        );
    }
}
