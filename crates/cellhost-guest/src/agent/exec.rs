//! Child processes of the agent: one reaper for all of them, and `exec`.
//!
//! # Lifecycle
//!
//! The agent is the parent (and, by `PR_SET_CHILD_SUBREAPER` or by being
//! PID 1, the reaper) of everything it starts and everything those leave
//! behind. One thread per process, the [`Reaper`], reaps every child: it
//! peeks at an exited child with `waitid(P_ALL, WNOWAIT)`, takes the lock,
//! reaps it and records the status if someone waits for that pid. Nothing
//! else calls `wait`, so no exit status is stolen and no zombie stays.
//!
//! A pid is reaped only under the lock, and [`Reaper::kill_group`] signals
//! a group only while its leader is still watched (unreaped) under that
//! same lock, so it never signals a recycled pid: a zombie's pid is not
//! reused. Each exec runs in its own process group, so a timeout kills the
//! command and whatever it forked that stayed in the group.
//!
//! # Output
//!
//! The exec's own thread polls stdout, stderr (and stdin, when there is
//! input) until the command is done: the first `max_output` bytes of each
//! stream are kept, the rest read and counted, so a chatty process never
//! blocks on a full pipe. When the command exits, whatever it left behind
//! gets [`GRACE_AFTER_EXIT`] to finish its output; then the pipes are
//! closed and the exec answers (the leftover keeps running and gets EPIPE
//! when it writes). On timeout the group is killed and the pipes read for
//! [`GRACE_AFTER_KILL`] at most. No thread or descriptor outlives the
//! request.
//!
//! Not contained: a process that leaves the group (`setsid`, `setpgid`)
//! survives a timeout; containing those needs a cgroup per exec.
//!
//! # Threat model
//!
//! exec runs what the host asks, as the agent's user: it is a shell for
//! the cell's owner, not a sandbox. The agent's own environment is not
//! passed on (the exec sees the env file plus the request's env), no
//! agent descriptor leaks (std spawns with `O_CLOEXEC`, and the binary
//! marks inherited descriptors close-on-exec at start), and a run-away
//! exec is bounded in time and in the memory its output takes.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

/// How long output may still arrive after the command exited.
pub const GRACE_AFTER_EXIT: Duration = Duration::from_millis(200);
/// How long output may still arrive after a timeout killed the group.
pub const GRACE_AFTER_KILL: Duration = Duration::from_secs(1);

use crate::proto::ExecReply;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn code(self) -> Option<i32> {
        match self {
            Exit::Code(c) => Some(c),
            Exit::Signal(_) => None,
        }
    }
    pub fn signal(self) -> Option<i32> {
        match self {
            Exit::Signal(s) => Some(s),
            Exit::Code(_) => None,
        }
    }
}

#[derive(Default)]
struct Table {
    /// Pids someone will wait for.
    watched: HashSet<i32>,
    /// Their exits, until collected.
    exited: HashMap<i32, Exit>,
    /// Bumped on every spawn, so a reaper that found no children knows to
    /// look again.
    spawns: u64,
    /// Children reaped that nobody waited for (orphans, re-parented).
    orphans_reaped: u64,
}

/// The one reaper of the agent's children.
pub struct Reaper {
    table: Mutex<Table>,
    cv: Condvar,
}

impl Reaper {
    /// The process's reaper (started on first use). There must be one per
    /// process: two would reap each other's children.
    pub fn global() -> Arc<Reaper> {
        static REAPER: OnceLock<Arc<Reaper>> = OnceLock::new();
        REAPER
            .get_or_init(|| {
                let r = Arc::new(Reaper {
                    table: Mutex::new(Table::default()),
                    cv: Condvar::new(),
                });
                let me = r.clone();
                std::thread::Builder::new()
                    .name("reaper".into())
                    .spawn(move || me.run())
                    .expect("spawn the reaper thread");
                r
            })
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        loop {
            let seen = self.lock().spawns;
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    let mut t = self.lock();
                    // Reap under the lock: see the module docs.
                    // WNOHANG: never block while holding the lock.
                    let exit = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::Exited(_, c)) => Exit::Code(c),
                        Ok(WaitStatus::Signaled(_, s, _)) => Exit::Signal(s as i32),
                        _ => continue,
                    };
                    let raw = pid.as_raw();
                    if t.watched.remove(&raw) {
                        t.exited.insert(raw, exit);
                    } else {
                        t.orphans_reaped += 1;
                    }
                    self.cv.notify_all();
                }
                Err(Errno::ECHILD) => {
                    let mut t = self.lock();
                    while t.spawns == seen {
                        t = self.cv.wait(t).unwrap_or_else(|p| p.into_inner());
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!("reaper: waitid: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Spawn `cmd` in its own process group and watch its pid.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<Child> {
        cmd.process_group(0);
        let mut t = self.lock();
        let child = cmd.spawn()?;
        t.watched.insert(child.id() as i32);
        t.spawns += 1;
        self.cv.notify_all();
        Ok(child)
    }

    /// Wait for `pid` until `deadline` (forever when `None`).
    pub fn wait(&self, pid: i32, deadline: Option<Instant>) -> Option<Exit> {
        let mut t = self.lock();
        loop {
            if let Some(e) = t.exited.remove(&pid) {
                return Some(e);
            }
            if !t.watched.contains(&pid) {
                return None;
            }
            match deadline {
                None => t = self.cv.wait(t).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    t = self
                        .cv
                        .wait_timeout(t, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// SIGKILL `pid`'s process group, only while `pid` is watched and not
    /// yet reaped (see the module docs). Returns whether it signalled.
    pub fn kill_group(&self, pid: i32) -> bool {
        let t = self.lock();
        t.watched.contains(&pid) && killpg(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
    }

    /// `pid`'s exit, if it has been reaped (without waiting).
    pub fn try_take(&self, pid: i32) -> Option<Exit> {
        self.lock().exited.remove(&pid)
    }

    /// Orphans reaped so far (processes nobody waited for).
    pub fn orphans_reaped(&self) -> u64 {
        self.lock().orphans_reaped
    }
}

/// What to run, already validated.
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
    pub max_output: usize,
}

/// Run one exec to completion (or its timeout).
pub fn run(reaper: &Reaper, spec: ExecSpec) -> std::io::Result<ExecReply> {
    let started = Instant::now();
    let deadline = crate::client::after(started, spec.timeout);
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        // A pipe, closed at once when there is no input: unlike /dev/null
        // it exists in a root without /dev.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = reaper.spawn(&mut cmd)?;
    let pid = child.id() as i32;
    let mut io = ExecIo::new(&mut child, spec.stdin, spec.max_output);
    // The reaper owns the pid from here; `child` is never waited on.
    drop(child);

    let mut exit: Option<Exit> = None;
    let mut timed_out = false;
    // After this instant the pipes are closed whatever is left in them.
    let mut stop_reading: Option<Instant> = None;
    loop {
        if exit.is_none() {
            exit = reaper.try_take(pid);
        }
        let now = Instant::now();
        if exit.is_none() && !timed_out && now >= deadline {
            timed_out = true;
            reaper.kill_group(pid);
            stop_reading = Some(now + GRACE_AFTER_KILL);
        }
        if exit.is_some() && stop_reading.is_none() {
            stop_reading = Some(now + GRACE_AFTER_EXIT);
        }
        if !io.reading() {
            match exit {
                Some(_) => break,
                // Pipes closed, command still running: wait for its exit
                // (after a kill it comes).
                None => {
                    exit = reaper.wait(pid, (!timed_out).then_some(deadline));
                    continue;
                }
            }
        }
        if stop_reading.is_some_and(|t| now >= t) {
            break;
        }
        // Wake for output, the deadline, the grace's end, and every 50 ms
        // to notice the command's exit while something holds its pipes.
        let mut wait = Duration::from_millis(50);
        if !timed_out {
            wait = wait.min(deadline.saturating_duration_since(now));
        }
        if let Some(t) = stop_reading {
            wait = wait.min(t.saturating_duration_since(now));
        }
        io.poll_once(wait)?;
    }
    let exit = match exit {
        Some(e) => e,
        None => reaper
            .wait(pid, None)
            .unwrap_or(Exit::Signal(Signal::SIGKILL as i32)),
    };
    let [(stdout, stdout_dropped), (stderr, stderr_dropped)] = io.finish();
    Ok(ExecReply {
        exit_code: exit.code(),
        signal: exit.signal(),
        stdout,
        stderr,
        stdout_dropped,
        stderr_dropped,
        timed_out,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// An exec's pipes, driven by `poll` from the exec's own thread.
struct ExecIo {
    /// stdout and stderr, as plain files (one type for both pipes).
    outs: [Option<std::fs::File>; 2],
    kept: [(Vec<u8>, u64); 2],
    stdin: Option<(std::process::ChildStdin, Vec<u8>, usize)>,
    cap: usize,
}

impl ExecIo {
    fn new(child: &mut Child, input: Option<Vec<u8>>, cap: usize) -> ExecIo {
        let stdin = match (child.stdin.take(), input) {
            (Some(pipe), Some(data)) if !data.is_empty() => {
                // Non-blocking, so a process that does not read its input
                // cannot stall the exec.
                let _ = fcntl(pipe.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
                Some((pipe, data, 0))
            }
            // No input: the pipe is dropped here, the process sees EOF.
            _ => None,
        };
        ExecIo {
            outs: [
                child
                    .stdout
                    .take()
                    .map(|p| std::fs::File::from(std::os::fd::OwnedFd::from(p))),
                child
                    .stderr
                    .take()
                    .map(|p| std::fs::File::from(std::os::fd::OwnedFd::from(p))),
            ],
            kept: Default::default(),
            stdin,
            cap,
        }
    }

    fn reading(&self) -> bool {
        self.outs.iter().any(Option::is_some)
    }

    fn poll_once(&mut self, wait: Duration) -> std::io::Result<()> {
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        let mut fds = Vec::with_capacity(3);
        let mut which = Vec::with_capacity(3);
        for (i, o) in self.outs.iter().enumerate() {
            if let Some(o) = o {
                fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
                which.push(i);
            }
        }
        if let Some((pipe, _, _)) = &self.stdin {
            fds.push(PollFd::new(pipe.as_fd(), PollFlags::POLLOUT));
            which.push(2);
        }
        match poll(&mut fds, ms) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<(usize, PollFlags)> = fds
            .iter()
            .zip(&which)
            .filter_map(|(f, &i)| f.revents().filter(|r| !r.is_empty()).map(|r| (i, r)))
            .collect();
        drop(fds);
        for (i, _) in ready {
            if i == 2 {
                self.feed_stdin();
            } else {
                self.read_out(i);
            }
        }
        Ok(())
    }

    fn read_out(&mut self, i: usize) {
        let Some(pipe) = self.outs[i].as_mut() else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        match pipe.read(&mut buf) {
            Ok(0) => self.outs[i] = None,
            Ok(n) => {
                let (kept, dropped) = &mut self.kept[i];
                let room = self.cap.saturating_sub(kept.len()).min(n);
                kept.extend_from_slice(&buf[..room]);
                *dropped += (n - room) as u64;
            }
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
            Err(_) => self.outs[i] = None,
        }
    }

    fn feed_stdin(&mut self) {
        let Some((pipe, data, off)) = self.stdin.as_mut() else {
            return;
        };
        match pipe.write(&data[*off..]) {
            Ok(n) => {
                *off += n;
                if *off >= data.len() {
                    self.stdin = None; // closes it: EOF for the process
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
            // EPIPE: the process stopped reading; not an error.
            Err(_) => self.stdin = None,
        }
    }

    /// The kept output and dropped counts; closes every pipe.
    fn finish(self) -> [(Vec<u8>, u64); 2] {
        self.kept
    }
}
