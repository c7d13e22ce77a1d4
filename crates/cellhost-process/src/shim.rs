//! The per-cell shim: the single-threaded helper that owns one workload.
//!
//! libcontainer forks and clones, so it must not run on a thread of a
//! tokio runtime. The backend therefore re-executes the `cellhost` binary
//! as `cellhost __shim <cell-dir> <container-id>` (as containerd shims and
//! conmon do). The shim:
//!
//! 1. forks once and lets its parent exit, so it is nobody's child (the
//!    supervisor never has to reap it and may die without taking it along),
//!    and starts a new session (no terminal signals reach it);
//! 2. creates the container with libcontainer — the workload's init waits
//!    for the start signal — with stdin `/dev/null` and stdout+stderr one
//!    pipe whose read end only the shim holds; the init process is the shim's child
//!    (libcontainer clones it with CLONE_PARENT from its intermediate);
//! 3. brings up loopback in the cell's fresh network namespace;
//! 4. reports `{"ok":true,"pid":N}` (or `{"ok":false,"error":...}`) as one
//!    line on its stdout, a pipe the backend reads, then detaches from it;
//! 5. copies the pipe into `<cell-dir>/log` up to a size cap (the rest is
//!    drained and dropped: a chatty workload cannot fill the host's disk),
//!    then reaps the init, reads the cgroup's OOM-kill counter, and
//!    writes `<cell-dir>/exit.json` atomically (tmp + fsync + rename).
//!
//! Layout: `<cell-dir>/shim.pid` (the shim's pid), `<cell-dir>/shim.log`
//! (its own diagnostics, never the workload's output), `<cell-dir>/lc/`
//! (libcontainer's state root), `<cell-dir>/exit.json`.
//!
//! Idempotency: a shim for a cell dir that already has libcontainer state
//! fails the create; destroy removes everything regardless.
//!
//! Threat model: the shim never sees secrets (they are files in a tmpfs
//! made by the backend before the shim runs); its argv holds only paths
//! and ids.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use cellhost_core::ExitInfo;
pub use cellhost_host::shim::{
    ShimReport, copy_capped, detach_stdout, error_chain, exit_of, reap, report, write_atomic,
};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::unistd::{ForkResult, Pid};

use crate::executor::ExactEnvExecutor;
use crate::hostfs::CellCgroups;

/// File names inside a cell dir.
pub const LOG_FILE: &str = "log";
pub use cellhost_host::shim::EXIT_FILE;
pub const SHIM_PID_FILE: &str = "shim.pid";
pub const SHIM_LOG_FILE: &str = "shim.log";
pub const LC_ROOT: &str = "lc";

/// Entry point of `cellhost __shim`. Returns the process exit code.
pub fn main(cell_dir: &Path, container_id: &str, log_cap: u64) -> i32 {
    // Step 1: detach. The parent returns at once so the spawner can reap it.
    // SAFETY: the shim is single-threaded here (called first thing from the
    // binary's main before any runtime or thread starts), so fork is sound.
    match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Parent { .. }) => return 0,
        Ok(ForkResult::Child) => {}
        Err(e) => {
            report(&ShimReport {
                ok: false,
                pid: None,
                error: Some(format!("fork: {e}")),
            });
            return 1;
        }
    }
    let _ = nix::unistd::setsid();

    let (pid, output, log) = match create(cell_dir, container_id) {
        Ok(made) => made,
        Err(e) => {
            tracing::error!("create failed: {e}");
            report(&ShimReport {
                ok: false,
                pid: None,
                error: Some(e),
            });
            return 1;
        }
    };
    report(&ShimReport {
        ok: true,
        pid: Some(pid.as_raw()),
        error: None,
    });
    detach_stdout();

    copy_capped(output, log, log_cap);
    let mut exit = wait_for(pid);
    // The cell dir is <backend state>/cells/<id>: the same instance tag the
    // backend computed from its state dir.
    let instance = cell_dir
        .parent()
        .and_then(Path::parent)
        .map(crate::hostfs::instance_tag)
        .unwrap_or_default();
    if let Ok(cg) = CellCgroups::for_object(&crate::hostfs::cgroup_object(&instance, container_id))
    {
        exit.oom_killed = cg.oom_kills().unwrap_or(0) > 0;
    }
    if let Err(e) = cellhost_host::shim::write_exit(cell_dir, &exit) {
        tracing::error!("writing exit status: {e}");
        return 1;
    }
    0
}

/// Create the container. Returns the init pid, the read end of the pipe
/// that is the workload's stdout and stderr, and the cell log.
fn create(cell_dir: &Path, container_id: &str) -> Result<(Pid, OwnedFd, File), String> {
    write_atomic(
        &cell_dir.join(SHIM_PID_FILE),
        std::process::id().to_string().as_bytes(),
    )
    .map_err(|e| format!("writing shim pid: {e}"))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(cell_dir.join(LOG_FILE))
        .map_err(|e| format!("opening cell log: {e}"))?;
    let (output, input) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("output pipe: {e}"))?;
    let input2 = input.try_clone().map_err(|e| format!("dup pipe: {e}"))?;
    let null = File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    let lc_root = cell_dir.join(LC_ROOT);
    fs::create_dir_all(&lc_root).map_err(|e| format!("{}: {e}", lc_root.display()))?;
    raise_hard_limits(cell_dir)?;

    // The builder owns the write ends and closes them when it is done, so
    // the shim holds only the read end: EOF means every writer is gone.
    let container = ContainerBuilder::new(container_id.to_string(), SyscallType::default())
        .with_root_path(&lc_root)
        .map_err(|e| error_chain(&e))?
        .with_executor(ExactEnvExecutor)
        .with_stdin(OwnedFd::from(null))
        .with_stdout(input)
        .with_stderr(input2)
        .validate_id()
        .map_err(|e| error_chain(&e))?
        .as_init(cell_dir)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|e| error_chain(&e))?;
    let pid = container
        .pid()
        .ok_or_else(|| "libcontainer reported no init pid".to_string())?;
    loopback_up(pid).map_err(|e| format!("bringing up loopback: {e}"))?;
    Ok((pid, output, log))
}

/// The cell's rlimits are set inside its user namespace, where a hard
/// limit can only be lowered: lift the shim's own hard limits (it is host
/// root) to what the cell asks, so they are the cell's own, never the
/// ones cellhost happened to inherit.
pub(crate) fn raise_hard_limits(cell_dir: &Path) -> Result<(), String> {
    let config = fs::read(cell_dir.join("config.json")).map_err(|e| format!("config.json: {e}"))?;
    let spec: serde_json::Value =
        serde_json::from_slice(&config).map_err(|e| format!("config.json: {e}"))?;
    let Some(rlimits) = spec["process"]["rlimits"].as_array() else {
        return Ok(());
    };
    for r in rlimits {
        let (Some(name), Some(hard)) = (r["type"].as_str(), r["hard"].as_u64()) else {
            continue;
        };
        let Some(res) = resource(name) else { continue };
        let (soft, cur_hard) =
            nix::sys::resource::getrlimit(res).map_err(|e| format!("getrlimit {name}: {e}"))?;
        if hard > cur_hard {
            nix::sys::resource::setrlimit(res, soft.min(hard), hard)
                .map_err(|e| format!("raising {name} to {hard}: {e}"))?;
        }
    }
    Ok(())
}

/// `RLIMIT_NOFILE` as nix's resource.
fn resource(name: &str) -> Option<nix::sys::resource::Resource> {
    use nix::sys::resource::Resource as R;
    Some(match name {
        "RLIMIT_AS" => R::RLIMIT_AS,
        "RLIMIT_CORE" => R::RLIMIT_CORE,
        "RLIMIT_CPU" => R::RLIMIT_CPU,
        "RLIMIT_DATA" => R::RLIMIT_DATA,
        "RLIMIT_FSIZE" => R::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => R::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => R::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => R::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => R::RLIMIT_NICE,
        "RLIMIT_NOFILE" => R::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => R::RLIMIT_NPROC,
        "RLIMIT_RSS" => R::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => R::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => R::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => R::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => R::RLIMIT_STACK,
        _ => return None,
    })
}

fn wait_for(pid: Pid) -> ExitInfo {
    reap(pid).unwrap_or_else(|e| {
        tracing::error!("waitpid {pid}: {e}");
        ExitInfo::unknown()
    })
}

/// Bring `lo` up inside the network namespace of `pid`. A fresh network
/// namespace has loopback down; `network.mode: none` promises loopback.
fn loopback_up(pid: Pid) -> io::Result<()> {
    use nix::sched::{CloneFlags, setns};
    let own = File::open("/proc/self/ns/net")?;
    let theirs = File::open(format!("/proc/{pid}/ns/net"))?;
    setns(&theirs, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let res = set_lo_up();
    setns(&own, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    res
}

fn set_lo_up() -> io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    if_flags_up(sock.as_raw_fd(), b"lo")
}

/// SIOCGIFFLAGS / SIOCSIFFLAGS with IFF_UP on interface `name`.
fn if_flags_up(fd: i32, name: &[u8]) -> io::Result<()> {
    // SAFETY: `ifreq` is plain old data, so all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.iter()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid, initialised ifreq that outlives both ioctls;
    // `fd` is an open socket; the union field ifru_flags is the one these
    // requests read and write.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
