//! Namespaces: each kind exists (`/proc/self/ns`) and a child can
//! `unshare(2)` into it; user namespaces separately.

use super::*;

pub(super) const NS_KINDS: [(&str, &str); 6] = [
    ("user", "user"),
    ("pid", "pid"),
    ("mnt", "mount"),
    ("uts", "uts"),
    ("ipc", "ipc"),
    ("net", "net"),
];

pub(super) const UNSHARE_FLAGS: [(libc::c_int, &str); 5] = [
    (libc::CLONE_NEWPID, "pid"),
    (libc::CLONE_NEWNS, "mount"),
    (libc::CLONE_NEWUTS, "uts"),
    (libc::CLONE_NEWIPC, "ipc"),
    (libc::CLONE_NEWNET, "net"),
];

pub(super) fn check_namespaces() -> Capability {
    let missing: Vec<&str> = NS_KINDS
        .iter()
        .filter(|(file, _)| fs::symlink_metadata(Path::new("/proc/self/ns").join(file)).is_err())
        .map(|&(_, name)| name)
        .collect();
    let mut failed = Vec::new();
    for (flag, name) in UNSHARE_FLAGS {
        if let Err(e) = unshare_in_child(flag) {
            failed.push(format!("{name} ({e})"));
        }
    }
    let mut detail = if missing.is_empty() {
        "user, pid, mount, uts, ipc, net listed in /proc/self/ns".to_string()
    } else {
        format!("missing from /proc/self/ns: {}", missing.join(", "))
    };
    if failed.is_empty() {
        detail.push_str("; unshare(pid|mount|uts|ipc|net) works in a forked child");
    } else {
        detail.push_str(&format!(
            "; unshare failed in a forked child for: {}",
            failed.join(", ")
        ));
    }
    Capability::new(
        "namespaces",
        missing.is_empty() && failed.is_empty(),
        detail,
    )
}

/// User namespaces: process cells run in one of their own (their root is
/// an unprivileged host uid), so without them the process tier is not
/// offered.
pub(super) fn check_userns() -> Capability {
    let max = fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    if max == Some(0) {
        return Capability::new(
            "userns",
            false,
            "user.max_user_namespaces is 0: user namespaces are off (sysctl user.max_user_namespaces)",
        );
    }
    match unshare_in_child(libc::CLONE_NEWUSER) {
        Ok(()) => Capability::new(
            "userns",
            true,
            format!(
                "unshare(user) works in a forked child; max_user_namespaces {}",
                max.map_or_else(|| "?".to_string(), |m| m.to_string())
            ),
        ),
        Err(e) => Capability::new("userns", false, format!("unshare(user) failed: {e}")),
    }
}

/// Why a forked unshare test did not pass.
#[derive(Debug, thiserror::Error)]
pub(super) enum ForkTestError {
    #[error("fork: {0}")]
    Fork(io::Error),
    #[error("waitpid: {0}")]
    Wait(io::Error),
    #[error("{0}")]
    Unshare(io::Error),
    #[error("child killed by signal {0}")]
    Signaled(i32),
    #[error("child did not finish within {0:?}")]
    Timeout(Duration),
}

/// Fork a child that calls `unshare(flag)` and `_exit`s with 0 or the errno.
pub(super) fn unshare_in_child(flag: libc::c_int) -> Result<(), ForkTestError> {
    // SAFETY: fork() in a possibly multi-threaded process: the child runs
    // only async-signal-safe code (unshare is a bare system call, errno is
    // read through the thread-local libc location, _exit ends it without
    // running atexit handlers or touching the heap, locks or stdio).
    let pid = unsafe { fork_unshare_exit(flag) };
    if pid < 0 {
        return Err(ForkTestError::Fork(io::Error::last_os_error()));
    }
    let deadline = Instant::now() + FORK_TIMEOUT;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: status is a valid out-pointer; pid is our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ForkTestError::Wait(e));
        }
        if r == pid {
            if libc::WIFEXITED(status) {
                return match libc::WEXITSTATUS(status) {
                    0 => Ok(()),
                    errno => Err(ForkTestError::Unshare(io::Error::from_raw_os_error(errno))),
                };
            }
            if libc::WIFSIGNALED(status) {
                return Err(ForkTestError::Signaled(libc::WTERMSIG(status)));
            }
            continue;
        }
        if Instant::now() >= deadline {
            // SAFETY: pid is our unreaped child, so it cannot name another
            // process; kill and a blocking waitpid reap it.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err(ForkTestError::Timeout(FORK_TIMEOUT));
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Returns the child's pid in the parent, or -1 (errno set).
///
/// # Safety
///
/// Forks the calling process. The child executes only `unshare`, reads
/// `errno` and calls `_exit`, all async-signal-safe, so it is sound even
/// when other threads held locks at the moment of the fork.
pub(super) unsafe fn fork_unshare_exit(flag: libc::c_int) -> libc::pid_t {
    // SAFETY: see the function's contract above.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let code = if libc::unshare(flag) == 0 {
                0
            } else {
                // errno values fit in a byte; 0 would read as success.
                let e = *libc::__errno_location();
                if (1..=255).contains(&e) { e } else { 255 }
            };
            libc::_exit(code);
        }
        pid
    }
}
