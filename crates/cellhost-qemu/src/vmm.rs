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
//! 2. starts qemu with the argv in `<cell-dir>/qemu.json`, stdin inherited
//!    (the spawner's pipe carrying the volume key, read once by qemu's
//!    `secret` object, or /dev/null), stdout a pipe only the shim reads —
//!    the guest's serial console (`-chardev file,path=/dev/stdout`) — and
//!    stderr `<cell-dir>/qemu.log`;
//! 3. writes `qemu.pid` and `shim.pid`, reports `{"ok":true,"pid":N}` on
//!    its stdout and detaches from it;
//! 4. copies the console into `<cell-dir>/serial.log` up to the cap (the
//!    rest is drained and dropped), reaps qemu and writes `exit.json`
//!    unless the backend already recorded a better one (a microVM's main
//!    command's own exit status).
//!
//! Threat model: qemu.json holds paths and ids only. Secrets reach qemu
//! through inherited descriptors (stdin, or a memfd the spawner holds),
//! never through argv, the environment or a file on disk.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use cellhost_core::shim::{ShimReport, copy_capped, detach_stdout, reap, report, write_atomic};
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

pub const QEMU_JSON: &str = "qemu.json";
pub const QEMU_PID: &str = "qemu.pid";
pub const SHIM_PID: &str = "shim.pid";
pub const QEMU_LOG: &str = "qemu.log";
pub const SERIAL_LOG: &str = "serial.log";
/// How the cell ended (the workload's status).
pub use cellhost_core::shim::EXIT_FILE;
/// How qemu itself ended.
pub const QEMU_EXIT: &str = "qemu-exit.json";

/// What the shim runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QemuCommand {
    pub program: String,
    pub args: Vec<String>,
    /// qemu's agent chardev socket (`server=on,wait=on`), which the shim
    /// holds connected for the VM's whole life, relaying
    /// `<cell-dir>/agent.sock` clients to it one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_chardev: Option<std::path::PathBuf>,
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
/// connection is made once, before the guest boots (qemu waits for it:
/// `wait=on`), and never dropped; host clients come and go on our own
/// socket. One reader thread forwards the guest's bytes to the current
/// client (or drops them when there is none: stale answers the next
/// client would discard by id anyway); the accept thread forwards one
/// client's bytes at a time to the guest.
fn relay_agent(cell_dir: &Path, chardev: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::{Arc, Mutex};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let guest = loop {
        match UnixStream::connect(chardev) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    };
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
    let child = Command::new(&cmd.program)
        .args(&cmd.args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .current_dir(cell_dir)
        .stdin(Stdio::inherit())
        .stdout(Stdio::from(File::from(console_w)))
        .stderr(Stdio::from(qemu_log))
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => return fail(format!("starting {}: {e}", cmd.program)),
    };
    let pid = child.id() as i32;
    drop(child);
    // Our stdin may be the key pipe: qemu has its own copy now.
    if let Ok(null) = File::open("/dev/null") {
        use std::os::fd::AsRawFd;
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
    }
    let pids = write_atomic(&cell_dir.join(QEMU_PID), pid.to_string().as_bytes()).and_then(|_| {
        write_atomic(
            &cell_dir.join(SHIM_PID),
            std::process::id().to_string().as_bytes(),
        )
    });
    if let Err(e) = pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        let _ = reap(Pid::from_raw(pid));
        return fail(format!("writing pid files: {e}"));
    }
    if let Some(chardev) = &cmd.agent_chardev
        && let Err(e) = relay_agent(cell_dir, chardev)
    {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        let _ = reap(Pid::from_raw(pid));
        return fail(format!("guest channel: {e}"));
    }
    report(&ShimReport {
        ok: true,
        pid: Some(pid),
        error: None,
    });
    detach_stdout();

    copy_capped(console_r, serial_log, log_cap);
    let exit = reap(Pid::from_raw(pid)).unwrap_or_else(|e| {
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
    if cmd.agent_chardev.is_none()
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
