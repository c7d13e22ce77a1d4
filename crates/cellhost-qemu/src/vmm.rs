//! The per-VM shim: `cellhost __vmm <cell-dir> <log-cap-bytes>`.
//!
//! qemu could daemonize itself (`-daemonize -pidfile`, as paygress runs
//! it), but then nobody reaps it, nobody records how it ended and its
//! serial console goes to a file that grows without bound. The shim owns
//! one qemu for its whole life instead:
//!
//! 1. forks and lets its parent exit (the spawner reaps that at once), and
//!    starts a new session: the supervisor may die, be killed -9 or be
//!    restarted, and the VM runs on;
//! 2. as root, opens what qemu is to use (the [`PassFd`]s of
//!    `<cell-dir>/qemu.json`): the image's kernel, initrd and base disk,
//!    the cell's overlay and volume, the seed memfd it inherited from the
//!    spawner, the tap (attached through /dev/net/tun), the QMP socket it
//!    binds at `<cell-dir>/qmp.sock`, a socket pair for the guest agent
//!    and the console pipe; and the `cgroup.procs` of the cell's cgroups;
//! 3. starts qemu through [`crate::spawn`]: in the cell's cgroups, as the
//!    cell's unprivileged uid and gid, those descriptors at the numbers
//!    its argv names, stdin inherited (the spawner's pipe carrying the
//!    volume key, read once by qemu's `secret` object, or /dev/null),
//!    stdout the console pipe, stderr `<cell-dir>/qemu.log`;
//! 4. writes `qemu.pid` and `shim.pid`, reports `{"ok":true,"pid":N}` on
//!    its stdout and detaches from it;
//! 5. relays `<cell-dir>/agent.sock` clients to its end of the agent pair
//!    (microvm), copies the console into `<cell-dir>/serial.log` up to the
//!    cap (the rest is drained and dropped), reaps qemu and writes
//!    `exit.json` unless the backend already recorded a better one (a
//!    microVM's main command's own exit status).
//!
//! The shim stays root and outside the cell's cgroup: it is host-side
//! plumbing, like the supervisor, and only copies bytes from the guest
//! (the console into its capped log, the agent channel to and from host
//! clients) without parsing them. qemu, the only process that runs guest
//! code and emulates its devices, is neither root nor outside the cgroup.
//!
//! Threat model: qemu.json holds paths and ids only, in the root-owned
//! 0700 cell dir. Secrets reach qemu through inherited descriptors (stdin,
//! or the seed memfd), never through argv, the environment or a file on
//! disk. qemu can open no path of the state dir (it could not traverse
//! it): it holds exactly the descriptors it was given, so an escaped qemu
//! reaches its own cell's files and nothing of another cell's.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use cellhost_host::shim::{ShimReport, copy_capped, detach_stdout, reap, report, write_atomic};
use nix::unistd::ForkResult;
use serde::{Deserialize, Serialize};

use crate::spawn::{Exec, Ids};

pub const QEMU_JSON: &str = "qemu.json";
pub const QEMU_PID: &str = "qemu.pid";
pub const SHIM_PID: &str = "shim.pid";
pub const QEMU_LOG: &str = "qemu.log";
pub const SERIAL_LOG: &str = "serial.log";
/// How the cell ended (the workload's status).
pub use cellhost_host::shim::EXIT_FILE;
/// How qemu itself ended.
pub const QEMU_EXIT: &str = "qemu-exit.json";

/// What the shim runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QemuCommand {
    pub program: String,
    pub args: Vec<String>,
    /// Who qemu runs as: never root.
    pub user: RunAs,
    /// The cell's cgroup dirs; qemu joins each before it execs.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// What qemu inherits, at which numbers.
    #[serde(default)]
    pub fds: Vec<PassFd>,
}

impl QemuCommand {
    /// Does qemu have a guest agent channel (a microVM)?
    pub fn agent(&self) -> bool {
        self.fds.iter().any(|f| matches!(f.what, FdSource::Agent))
    }
}

/// The ids qemu runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: none, or kvm's group under KVM.
    #[serde(default)]
    pub groups: Vec<u32>,
}

/// One descriptor qemu inherits, at number `fd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassFd {
    pub fd: i32,
    pub what: FdSource,
}

/// Where the shim gets a descriptor qemu inherits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum FdSource {
    /// A file opened as root, read-write when `write`.
    File { path: PathBuf, write: bool },
    /// A descriptor the spawner handed the shim (the seed memfd), by its
    /// number in the shim.
    Inherited { from: i32 },
    /// A unix socket the shim binds and listens on (QMP), 0600.
    Listen { path: PathBuf },
    /// qemu's end of a socket pair whose other end the shim relays
    /// `<cell-dir>/agent.sock` to.
    Agent,
    /// The write end of the console pipe.
    Console,
    /// The tap `name`, attached through /dev/net/tun.
    Tap { name: String },
}

/// The socket host clients of the guest agent connect to.
pub const AGENT_SOCK: &str = "agent.sock";

/// Hold the agent's virtio-serial chardev connected and relay clients.
///
/// Why: a virtio-serial port learns "host connected" from qemu when a
/// chardev client connects, and a guest that opened the port while no
/// host was connected never saw data from a host that connected later
/// (observed with Debian's 6.1 kernel on qemu 7.2's microvm: the agent's
/// read stayed blocked while the host's bytes went nowhere). So the
/// channel is a socket pair, connected before qemu starts, and never
/// dropped; host clients come and go on our own socket. One reader thread forwards the guest's bytes to the current
/// client (or drops them when there is none: stale answers the next
/// client would discard by id anyway); the accept thread forwards one
/// client's bytes at a time to the guest.
fn relay_agent(cell_dir: &Path, guest: UnixStream) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};
    let path = cell_dir.join(AGENT_SOCK);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let current: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
    let mut from_guest = guest.try_clone()?;
    let cur = current.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_guest.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Not under the lock: a client that stops reading costs at
            // most the write timeout, and the accept thread is never held.
            let client = cur
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .and_then(|c| c.try_clone().ok());
            if let Some(mut c) = client
                && c.write_all(&buf[..n]).is_err()
            {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    });
    let mut to_guest = guest;
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let _ = client.set_write_timeout(Some(std::time::Duration::from_secs(5)));
            let Ok(writer) = client.try_clone() else {
                continue;
            };
            *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if to_guest.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    });
    Ok(())
}

/// The descriptors the shim opened for qemu, and what it keeps.
struct Opened {
    /// (descriptor, number in qemu).
    fds: Vec<(OwnedFd, i32)>,
    /// The shim's end of the agent pair.
    agent: Option<UnixStream>,
}

/// Open each of `cmd.fds` (as root); `console` is the console pipe's
/// write end.
fn open_fds(cmd: &QemuCommand, console: &OwnedFd) -> Result<Opened, String> {
    let mut out = Opened {
        fds: Vec::new(),
        agent: None,
    };
    for p in &cmd.fds {
        let fd: OwnedFd = match &p.what {
            FdSource::File { path, write } => OpenOptions::new()
                .read(true)
                .write(*write)
                .open(path)
                .map_err(|e| format!("opening {}: {e}", path.display()))?
                .into(),
            FdSource::Inherited { from } => {
                // Taken over once: a second entry naming it would be a
                // second owner.
                if out.fds.iter().any(|(f, _)| f.as_raw_fd() == *from) || *from <= 2 {
                    return Err(format!("descriptor {from} handed over twice"));
                }
                // SAFETY: the spawner handed this descriptor to the shim
                // for qemu (qemu.json names it); nothing else here owns it.
                unsafe { OwnedFd::from_raw_fd(*from) }
            }
            FdSource::Listen { path } => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path)
                    .map_err(|e| format!("binding {}: {e}", path.display()))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| format!("chmod {}: {e}", path.display()))?;
                l.into()
            }
            FdSource::Agent => {
                let (ours, theirs) =
                    UnixStream::pair().map_err(|e| format!("agent socket pair: {e}"))?;
                out.agent = Some(ours);
                theirs.into()
            }
            FdSource::Console => console
                .try_clone()
                .map_err(|e| format!("console pipe: {e}"))?,
            FdSource::Tap { name } => open_tap(name).map_err(|e| format!("tap {name}: {e}"))?,
        };
        out.fds.push((fd, p.fd));
    }
    Ok(out)
}

/// Attach to the tap `name` (made by cellhost-net) as qemu would: no
/// packet information, virtio-net headers.
fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= ifr.ifr_name.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads (and may write) the ifreq we own, on our
    // own /dev/net/tun descriptor.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f.into())
}

/// `cgroup.procs` of each of the cell's cgroups, open for writing.
fn open_procs(cgroups: &[PathBuf]) -> Result<Vec<OwnedFd>, String> {
    cgroups
        .iter()
        .map(|d| {
            let p = d.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&p)
                .map(OwnedFd::from)
                .map_err(|e| format!("opening {}: {e}", p.display()))
        })
        .collect()
}

/// Entry point of `cellhost __vmm`; the process exit code.
pub fn main(cell_dir: &Path, log_cap: u64) -> i32 {
    let fail = |e: String| {
        report(&ShimReport {
            ok: false,
            pid: None,
            error: Some(e),
        });
        1
    };
    let cmd: QemuCommand = match std::fs::read(cell_dir.join(QEMU_JSON))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => return fail(format!("{QEMU_JSON}: {e}")),
    };
    if cmd.user.uid == 0 || cmd.user.gid == 0 {
        return fail(format!(
            "{QEMU_JSON}: qemu is never run as root (uid {}, gid {})",
            cmd.user.uid, cmd.user.gid
        ));
    }
    // SAFETY: called first thing from the binary's main, before any
    // runtime or thread exists: fork in a single-threaded process is sound.
    match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Parent { .. }) => return 0,
        Ok(ForkResult::Child) => {}
        Err(e) => return fail(format!("fork: {e}")),
    }
    let _ = nix::unistd::setsid();
    let open_log = |name: &str| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(cell_dir.join(name))
    };
    let (qemu_log, serial_log) = match (open_log(QEMU_LOG), open_log(SERIAL_LOG)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return fail(format!("opening logs: {e}")),
    };
    let (console_r, console_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return fail(format!("console pipe: {e}")),
    };
    let opened = match open_fds(&cmd, &console_w) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let procs = match open_procs(&cmd.cgroups) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let exec = Exec::new(
        &cmd.program,
        &cmd.args,
        &["PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_string()],
        (console_w, qemu_log.into()),
        opened.fds,
        procs,
        &Ids {
            uid: cmd.user.uid,
            gid: cmd.user.gid,
            groups: cmd.user.groups.clone(),
        },
    );
    // Exec::new took its own copies; ours (the QMP listener among them)
    // are closed with `exec` once qemu runs.
    let pid = match exec.and_then(|e| e.spawn()) {
        Ok(pid) => pid,
        Err(e) => return fail(format!("starting {}: {e}", cmd.program)),
    };
    // Our stdin may be the key pipe: qemu has its own copy now.
    if let Ok(null) = File::open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
    }
    let pids = write_atomic(&cell_dir.join(QEMU_PID), pid.to_string().as_bytes()).and_then(|_| {
        write_atomic(
            &cell_dir.join(SHIM_PID),
            std::process::id().to_string().as_bytes(),
        )
    });
    if let Err(e) = pids {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = reap(pid);
        return fail(format!("writing pid files: {e}"));
    }
    if let Some(guest) = opened.agent
        && let Err(e) = relay_agent(cell_dir, guest)
    {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = reap(pid);
        return fail(format!("guest channel: {e}"));
    }
    report(&ShimReport {
        ok: true,
        pid: Some(pid.as_raw()),
        error: None,
    });
    detach_stdout();

    copy_capped(console_r, serial_log, log_cap);
    let exit = reap(pid).unwrap_or_else(|e| {
        tracing::error!("waitpid {pid}: {e}");
        cellhost_core::ExitInfo::unknown()
    });
    tracing::info!(?exit, "qemu ended");
    let record = serde_json::to_vec(&exit).unwrap_or_default();
    // A VM without an agent ends when qemu does: that is the cell's exit.
    // With an agent, only the agent knows the command's status (qemu exits
    // 0 on a guest panic as on a poweroff): the backend records it.
    // exit.json goes first: qemu-exit.json is the "shim is done" mark a
    // status poll waits for, so the cell's exit must already be there.
    let path = cell_dir.join(EXIT_FILE);
    if !cmd.agent()
        && !path.exists()
        && let Err(e) = write_atomic(&path, &record)
    {
        tracing::error!("writing exit status: {e}");
        return 1;
    }
    if let Err(e) = write_atomic(&cell_dir.join(QEMU_EXIT), &record) {
        tracing::error!("writing qemu's exit status: {e}");
        return 1;
    }
    0
}
