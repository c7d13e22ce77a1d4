//! Starting qemu as the cell's unprivileged user, inside its cgroups.
//!
//! The shim ([`crate::vmm`]) prepares everything while it is still root:
//! the program, argv and environment as C strings, every descriptor qemu
//! is to inherit (moved above the numbers qemu gets, close-on-exec), the
//! `cgroup.procs` files of the cell's cgroups (opened for writing), the
//! ids. Then it forks, and the child makes only async-signal-safe system
//! calls on what was prepared, allocating nothing:
//!
//! 1. stdout and stderr, then each descriptor at the number the argv
//!    names (`dup2` clears close-on-exec on the copy);
//! 2. writes `0` (itself) to each `cgroup.procs`: qemu is in the cell's
//!    cgroups before it runs a single instruction of its own;
//! 3. `setgroups` (none, or kvm's group under KVM), `setresgid`,
//!    `setresuid`: real, effective and saved ids all the cell's, so no
//!    way back to root, and with them every capability is gone;
//! 4. `PR_SET_NO_NEW_PRIVS`, SIGPIPE back to its default and no signal
//!    blocked (every descriptor but stdio and the targets was marked
//!    close-on-exec first);
//! 5. `execve`.
//!
//! A step that fails writes its index and errno on a close-on-exec pipe
//! and `_exit`s: the parent reads the pipe to its end, so an empty read is
//! a successful exec and anything else is the step that failed. The raw
//! system calls are used, not libc's wrappers: glibc's setuid family
//! signals every thread of a process, machinery a forked child has no
//! business running.
//!
//! Threat model: nothing the child does depends on the guest or the
//! tenant: the argv and the paths are the backend's own (qemu.json, in
//! the root-owned cell dir). uid or gid 0 is refused here as well as in
//! the backend: qemu never runs as root.

use std::ffi::{CString, c_char};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::unistd::Pid;

/// Why qemu could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{what}: {source}")]
    Prepare {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("qemu is never run as root (uid {uid}, gid {gid})")]
    Root { uid: u32, gid: u32 },
    #[error("{0} contains a NUL byte")]
    Nul(String),
    #[error("qemu's process could not {step}: {source}")]
    Child {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What the child does, by index, for the error it reports.
const STEPS: &[&str] = &[
    "set up its stdout",
    "set up its stderr",
    "take a descriptor qemu inherits",
    "join the cell's cgroup",
    "drop its supplementary groups",
    "set its gid",
    "set its uid",
    "set no_new_privs",
    "reset its signals",
    "exec qemu",
];

/// Everything the child needs, prepared before the fork.
pub struct Exec {
    program: CString,
    /// Kept alive for the pointers below.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const c_char>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    /// (source above every target, target).
    fds: Vec<(OwnedFd, RawFd)>,
    procs: Vec<OwnedFd>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    /// The first number above every target.
    above: RawFd,
}

/// Who qemu runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

fn cstring(what: &str, s: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Nul(what.to_string()))
}

/// `fd` duplicated to a close-on-exec descriptor numbered `min` or above.
fn dup_above(fd: RawFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor or fails; the result
    // is owned by nobody else.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just made and is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

impl Exec {
    /// Prepare `program args` with environment `env` (`NAME=value`),
    /// `(stdout, stderr)`, `fds` as (descriptor, number in qemu), the
    /// `cgroup.procs` files to join and the ids.
    pub fn new(
        program: &str,
        args: &[String],
        env: &[String],
        (stdout, stderr): (OwnedFd, OwnedFd),
        fds: Vec<(OwnedFd, RawFd)>,
        procs: Vec<OwnedFd>,
        ids: &Ids,
    ) -> Result<Exec, SpawnError> {
        if ids.uid == 0 || ids.gid == 0 {
            return Err(SpawnError::Root {
                uid: ids.uid,
                gid: ids.gid,
            });
        }
        let program_c = cstring("the program", program)?;
        let mut argv = vec![program_c.clone()];
        for a in args {
            argv.push(cstring("an argument", a)?);
        }
        let envp = env
            .iter()
            .map(|e| cstring("the environment", e))
            .collect::<Result<Vec<_>, _>>()?;
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let above = fds.iter().map(|(_, t)| *t + 1).max().unwrap_or(3).max(64);
        let prep = |what: &str| {
            let what = what.to_string();
            move |source| SpawnError::Prepare { what, source }
        };
        // Every source above every target: no dup2 overwrites a source
        // another one still needs.
        let mut moved = Vec::new();
        for (fd, target) in fds {
            moved.push((
                dup_above(fd.as_raw_fd(), above).map_err(prep("moving a descriptor"))?,
                target,
            ));
        }
        let above_all = |fd: OwnedFd| dup_above(fd.as_raw_fd(), above);
        Ok(Exec {
            program: program_c,
            argv_ptrs: ptrs(&argv),
            _argv: argv,
            envp_ptrs: ptrs(&envp),
            _envp: envp,
            stdout: above_all(stdout).map_err(prep("moving stdout"))?,
            stderr: above_all(stderr).map_err(prep("moving stderr"))?,
            fds: moved,
            procs: procs
                .into_iter()
                .map(above_all)
                .collect::<io::Result<_>>()
                .map_err(prep("moving cgroup.procs"))?,
            uid: ids.uid,
            gid: ids.gid,
            groups: ids.groups.clone(),
            above,
        })
    }

    /// Fork and exec; the child's pid once qemu runs.
    pub fn spawn(self) -> Result<Pid, SpawnError> {
        let mut p = [0; 2];
        // SAFETY: pipe2 fills the array with two new descriptors or fails.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(SpawnError::Prepare {
                what: "the exec report pipe".into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: both were just made and are ours alone.
        let (r, low) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        // Above the targets, so that no dup2 in the child replaces it; the
        // parent must hold no write end once forked, or it never sees EOF.
        let w = dup_above(low.as_raw_fd(), self.above).map_err(|source| SpawnError::Prepare {
            what: "the exec report pipe".into(),
            source,
        })?;
        drop(low);
        let mut empty: libc::sigset_t = unsafe_zeroed_sigset();
        // SAFETY: sigemptyset initialises the set we own.
        unsafe { libc::sigemptyset(&mut empty) };
        // SAFETY: fork is called with everything the child uses prepared;
        // the child runs `child` only (async-signal-safe system calls on
        // that data, no allocation, no lock) and never returns.
        match unsafe { libc::fork() } {
            -1 => Err(SpawnError::Prepare {
                what: "fork".into(),
                source: io::Error::last_os_error(),
            }),
            0 => {
                // SAFETY: in the child, see `child`.
                unsafe { self.child(w.as_raw_fd(), &empty) }
            }
            pid => {
                drop(w);
                let pid = Pid::from_raw(pid);
                let mut report = [0u8; 8];
                let n = read_full(&r, &mut report);
                if n == 0 {
                    return Ok(pid);
                }
                let _ = cellhost_host::shim::reap(pid);
                let step = u32::from_ne_bytes(report[..4].try_into().unwrap_or([0; 4]));
                let errno = i32::from_ne_bytes(report[4..].try_into().unwrap_or([0; 4]));
                Err(SpawnError::Child {
                    step: STEPS.get(step as usize).copied().unwrap_or("start"),
                    source: io::Error::from_raw_os_error(errno),
                })
            }
        }
    }

    /// The child's side of [`Exec::spawn`].
    ///
    /// # Safety
    ///
    /// Only in the child of a fork, with `report` the write end of the
    /// report pipe and `empty` an initialised empty signal set.
    unsafe fn child(&self, report: RawFd, empty: &libc::sigset_t) -> ! {
        let fail = |step: u32| -> ! {
            // SAFETY: __errno_location is this thread's errno; write and
            // _exit are async-signal-safe.
            unsafe {
                let errno = *libc::__errno_location();
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&step.to_ne_bytes());
                b[4..].copy_from_slice(&errno.to_ne_bytes());
                libc::write(report, b.as_ptr().cast(), b.len());
                libc::_exit(127)
            }
        };
        // SAFETY (the whole block): each call is a system call on
        // descriptors and memory prepared before the fork and owned by
        // this (single-threaded) child.
        unsafe {
            // Nothing but stdio and the targets reaches qemu, whatever the
            // shim holds without close-on-exec: everything from 3 up is
            // marked, then dup2 makes the targets (unmarked). Best effort:
            // a kernel before 5.11 lacks the flag, and every descriptor
            // cellhost opens is close-on-exec anyway.
            let _ = libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if libc::dup2(self.stdout.as_raw_fd(), 1) < 0 {
                fail(0);
            }
            if libc::dup2(self.stderr.as_raw_fd(), 2) < 0 {
                fail(1);
            }
            for (src, target) in &self.fds {
                if libc::dup2(src.as_raw_fd(), *target) < 0 {
                    fail(2);
                }
            }
            for procs in &self.procs {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    fail(3);
                }
            }
            if libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr()) != 0 {
                fail(4);
            }
            if libc::syscall(libc::SYS_setresgid, self.gid, self.gid, self.gid) != 0 {
                fail(5);
            }
            if libc::syscall(libc::SYS_setresuid, self.uid, self.uid, self.uid) != 0 {
                fail(6);
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                fail(7);
            }
            if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR
                || libc::sigprocmask(libc::SIG_SETMASK, empty, std::ptr::null_mut()) != 0
            {
                fail(8);
            }
            libc::execve(
                self.program.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
            );
            fail(9)
        }
    }
}

fn unsafe_zeroed_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; all zeroes is a valid (empty) value,
    // and sigemptyset initialises it properly right after.
    unsafe { std::mem::zeroed() }
}

/// Read until `buf` is full or the writers are gone; bytes read.
fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null() -> OwnedFd {
        std::fs::File::options()
            .write(true)
            .open("/dev/null")
            .unwrap()
            .into()
    }

    #[test]
    fn root_is_refused() {
        for (uid, gid) in [(0, 5), (5, 0)] {
            let e = Exec::new(
                "/bin/true",
                &[],
                &[],
                (null(), null()),
                vec![],
                vec![],
                &Ids {
                    uid,
                    gid,
                    groups: vec![],
                },
            )
            .err()
            .unwrap();
            assert!(matches!(e, SpawnError::Root { .. }), "{e}");
        }
    }

    /// As root: the child runs as the ids given, with the descriptor at
    /// its number and no supplementary group; a missing program is
    /// reported as the exec step's error.
    #[test]
    fn the_child_runs_as_the_ids_given() {
        if !nix::unistd::Uid::effective().is_root() {
            println!("skipped: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let f: OwnedFd = std::fs::File::create(&out).unwrap().into();
        let ids = Ids {
            uid: 1 << 30,
            gid: (1 << 30) + 1,
            groups: vec![],
        };
        let script = "grep -E '^(Uid|Gid|Groups|NoNewPrivs)' /proc/self/status >&7; echo done >&7";
        let exec = Exec::new(
            "/bin/sh",
            &["-c".into(), script.into()],
            &["PATH=/usr/bin:/bin".into()],
            (null(), null()),
            vec![(f, 7)],
            vec![],
            &ids,
        )
        .unwrap();
        let pid = exec.spawn().unwrap();
        cellhost_host::shim::reap(pid).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let u = 1u32 << 30;
        let g = u + 1;
        assert!(
            text.contains(&format!("Uid:\t{u}\t{u}\t{u}\t{u}")),
            "{text}"
        );
        assert!(
            text.contains(&format!("Gid:\t{g}\t{g}\t{g}\t{g}")),
            "{text}"
        );
        let groups = text
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .unwrap();
        assert_eq!(groups.trim(), "", "{text}");
        assert!(text.contains("NoNewPrivs:\t1"), "{text}");
        assert!(text.ends_with("done\n"), "{text}");

        let e = Exec::new(
            "/nonexistent/qemu",
            &[],
            &[],
            (null(), null()),
            vec![],
            vec![],
            &ids,
        )
        .unwrap()
        .spawn()
        .unwrap_err();
        match e {
            SpawnError::Child { step, source } => {
                assert_eq!(step, "exec qemu");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("{other}"),
        }
    }
}
