//! Reach a TCP port inside a cell's network namespace from the host.
//!
//! The socket is made on a short-lived thread that joined the namespace
//! of one process, named by a pidfd: the connection lives in the cell's
//! network (its loopback included), never in the host's.
//!
//! Invariants:
//! - the process is named by a pidfd opened before it is checked, and the
//!   namespace is joined through that pidfd: a pid that was reused after
//!   the check (by another tenant's cell, say) fails the join (ESRCH) or
//!   the check, never joins the wrong namespace;
//! - `belongs` sees the process's `/proc/<pid>/cgroup` read after the
//!   pidfd was opened, so the caller decides whose process it is;
//! - only the helper thread changes namespace, and it ends with the call.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Longest a connection into a cell may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pidfd for `pid` (`pidfd_open(2)`, Linux 5.3).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags by value and returns a new
    // descriptor or -1; no memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: `fd` was just returned by the kernel, is open, and is owned by
    // nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connect to `addr` from inside the network namespace of `pid`, once
/// `belongs` accepted the process's cgroup file. Blocking (call it from a
/// blocking task); `timeout` bounds the connect.
pub fn connect_in(
    pid: i32,
    belongs: impl FnOnce(&str) -> bool,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let pidfd = pidfd_open(pid)?;
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    if !belongs(&cgroup) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {pid} is not the cell's"),
        ));
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&pidfd, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            TcpStream::connect_timeout(&addr, timeout)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// What a failed [`connect_in`] means to a tier: a refused or timed-out
/// connect is the tenant's closed port; a process that is not the cell's
/// (gone, or its pid reused) is the cell gone.
pub fn connect_error(
    id: &cellhost_core::ids::CellId,
    port: u16,
    e: io::Error,
) -> cellhost_core::BackendError {
    use cellhost_core::BackendError;
    match e.kind() {
        io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut => {
            BackendError::PortClosed(port)
        }
        io::ErrorKind::NotFound => BackendError::NotFound(id.clone()),
        _ if e.raw_os_error() == Some(libc::ESRCH) => BackendError::NotFound(id.clone()),
        _ => BackendError::io(format!("connecting to port {port} in cell {id}"), e),
    }
}
