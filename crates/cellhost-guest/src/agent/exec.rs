//! Child processes of the agent: one reaper for all of them, and `exec`.
//!
//! # Lifecycle
//!
//! The agent is the parent (and, by `PR_SET_CHILD_SUBREAPER` or by being
//! PID 1, the reaper) of everything it starts and everything those leave
//! behind. One thread, the [`Reaper`], reaps every child: it peeks at an
//! exited child with `waitid(P_ALL, WNOWAIT)`, takes the lock, reaps it
//! and records the status if someone waits for that pid. Nothing else
//! calls `wait`, so no exit status is stolen and no zombie stays.
//!
//! Because a pid is reaped only under the lock, "is it still unreaped?
//! then kill its group" under the same lock can never signal a recycled
//! pid: a zombie's pid is not reused. Each exec runs in its own process
//! group, so a timeout kills the command and whatever it forked.
//!
//! # Output
//!
//! stdout and stderr are read by one thread each; the first `max_output`
//! bytes are kept, the rest read and counted, so a chatty process never
//! blocks on a full pipe. A process that leaves a background child
//! holding the pipes open is waited for until the exec's deadline, then
//! its group is killed.
//!
//! # Threat model
//!
//! exec runs what the host asks, as the agent's user: it is a shell for
//! the cell's owner, not a sandbox. The agent's own environment is not
//! passed on (the exec sees the env file plus the request's env), no
//! agent descriptor leaks (std spawns with `O_CLOEXEC` everywhere), and a
//! run-away exec is bounded in time and in the memory its output takes.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

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
    /// Start the reaper thread. Call once per process, before spawning.
    pub fn start() -> Arc<Reaper> {
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
                    let exit = match waitpid(pid, None) {
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

    /// SIGKILL `pid`'s process group if `pid` is not yet reaped; after it
    /// is, the group is signalled only while it still has members.
    pub fn kill_group(&self, pid: i32) {
        let _t = self.lock();
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
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
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;

    let started = Instant::now();
    let deadline = started + spec.timeout;
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

    if let (Some(mut pipe), Some(data)) = (child.stdin.take(), spec.stdin) {
        std::thread::spawn(move || {
            // EPIPE when the process does not read it all: not an error.
            let _ = pipe.write_all(&data);
        });
    }
    let (tx, rx) = mpsc::channel();
    for (which, pipe) in [
        (
            0usize,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            1,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ] {
        let Some(pipe) = pipe else { continue };
        let tx = tx.clone();
        let cap = spec.max_output;
        std::thread::spawn(move || {
            let _ = tx.send((which, drain(pipe, cap)));
        });
    }
    drop(tx);
    // The reaper owns the pid from here; `child` is never waited on.
    drop(child);

    let mut timed_out = false;
    let exit = match reaper.wait(pid, Some(deadline)) {
        Some(e) => e,
        None => {
            timed_out = true;
            reaper.kill_group(pid);
            reaper
                .wait(pid, None)
                .unwrap_or(Exit::Signal(Signal::SIGKILL as i32))
        }
    };

    // Collect both streams: until the deadline, then kill the group (a
    // background child holding the pipes) and give it a moment.
    let mut outs: [(Vec<u8>, u64); 2] = Default::default();
    let mut got = 0;
    let mut killed = timed_out;
    while got < 2 {
        let wait_until = if killed {
            Instant::now().max(deadline) + Duration::from_secs(2)
        } else {
            deadline
        };
        match rx.recv_timeout(wait_until.saturating_duration_since(Instant::now())) {
            Ok((which, out)) => {
                outs[which] = out;
                got += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if !killed => {
                killed = true;
                timed_out = true;
                reaper.kill_group(pid);
            }
            Err(_) => break,
        }
    }
    let [(stdout, stdout_dropped), (stderr, stderr_dropped)] = outs;
    Ok(ExecReply {
        exit_code: exit.code(),
        signal: exit.signal(),
        stdout_b64: b64.encode(stdout),
        stderr_b64: b64.encode(stderr),
        stdout_dropped,
        stderr_dropped,
        timed_out,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Read `r` to its end; keep the first `cap` bytes, count the rest.
fn drain(mut r: impl Read, cap: usize) -> (Vec<u8>, u64) {
    let mut kept = Vec::new();
    let mut dropped = 0u64;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len()).min(n);
                kept.extend_from_slice(&buf[..room]);
                dropped += (n - room) as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    (kept, dropped)
}
