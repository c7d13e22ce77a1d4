//! The probe's subprocess runner: a deadline, a capture limit, its own
//! process group killed at the end, an empty environment plus `PATH`.
//! Not `crate::tool`'s runner: the probe also needs to stop a child as
//! soon as its output shows an answer (qemu's QMP greeting, a guest
//! kernel's boot markers), which `tool` does not offer.

use super::*;

/// Why a subprocess could not be run (a non-zero exit is not an error here).
#[derive(Debug, thiserror::Error)]
pub(super) enum RunError {
    #[error("{program}: cannot start: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("{program}: cannot wait: {source}")]
    Wait { program: String, source: io::Error },
}

/// What a finished (or killed) subprocess left.
#[derive(Debug)]
pub(super) struct RunOutput {
    /// The child's pid (also its process group id) while it ran.
    #[cfg_attr(not(test), allow(dead_code))]
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Killed because the deadline passed.
    pub timed_out: bool,
    /// Killed because `stop_when` matched its stdout.
    pub stopped: bool,
}

impl RunOutput {
    pub(super) fn success(&self) -> bool {
        !self.timed_out && !self.stopped && self.status.success()
    }

    pub(super) fn first_line(&self) -> String {
        let out = String::from_utf8_lossy(&self.stdout);
        out.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_string()
    }

    /// Why it failed, on one line.
    pub(super) fn failure(&self, timeout: Duration) -> String {
        if self.timed_out {
            return format!("no answer within {timeout:?}");
        }
        let err = String::from_utf8_lossy(&self.stderr);
        let last = err.lines().map(str::trim).rfind(|l| !l.is_empty());
        match last {
            Some(l) => format!("{} ({l})", self.status),
            None => self.status.to_string(),
        }
    }
}

/// Run `program args` with an empty environment plus `PATH`, stdin from
/// /dev/null and stdout/stderr captured; kill it when `timeout` passes.
pub(super) fn run_with_timeout(
    program: &Path,
    args: &[&OsStr],
    timeout: Duration,
) -> Result<RunOutput, RunError> {
    run_until(program, args, timeout, |_| false)
}

/// [`run_with_timeout`], also ending the child as soon as `stop_when`
/// returns true for the stdout captured so far.
///
/// The child leads its own process group; once it has exited (or is to be
/// killed) the whole group gets SIGKILL, so nothing it started survives.
pub(super) fn run_until(
    program: &Path,
    args: &[&OsStr],
    timeout: Duration,
    stop_when: impl Fn(&[u8]) -> bool,
) -> Result<RunOutput, RunError> {
    let prog = program.display().to_string();
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", search_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| RunError::Spawn {
            program: prog.clone(),
            source,
        })?;
    let pid = child.id();
    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        child
            .stdout
            .take()
            .map(|s| spawn_reader(s, Arc::clone(&out))),
        child
            .stderr
            .take()
            .map(|s| spawn_reader(s, Arc::clone(&err))),
    ];

    let deadline = Instant::now() + timeout;
    let (mut timed_out, mut stopped) = (false, false);
    loop {
        match exited_nowait(pid) {
            Ok(true) => break,
            Ok(false) => {}
            Err(source) => {
                kill_group(pid);
                let _ = child.wait();
                return Err(RunError::Wait {
                    program: prog,
                    source,
                });
            }
        }
        if stop_when(&lock(&out)) {
            stopped = true;
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    // The child is alive or a zombie, so its pid (= its group id) still
    // names it: killing the group cannot hit an unrelated process.
    kill_group(pid);
    let status = child.wait().map_err(|source| RunError::Wait {
        program: prog,
        source,
    })?;
    // Readers end when the last holder of the pipes dies. A process that
    // left our group could hold them open; do not wait for it forever.
    let until = Instant::now() + Duration::from_millis(500);
    for r in readers.into_iter().flatten() {
        while !r.is_finished() && Instant::now() < until {
            thread::sleep(Duration::from_millis(5));
        }
        if r.is_finished() {
            let _ = r.join();
        }
    }
    let stdout = std::mem::take(&mut *lock(&out));
    let stderr = std::mem::take(&mut *lock(&err));
    Ok(RunOutput {
        pid,
        status,
        stdout,
        stderr,
        timed_out,
        stopped,
    })
}

pub(super) fn lock(m: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn spawn_reader(
    mut src: impl Read + Send + 'static,
    dst: Arc<Mutex<Vec<u8>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut d = lock(&dst);
                    let room = MAX_CAPTURE.saturating_sub(d.len());
                    d.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

/// The child has exited (and is left unreaped as a zombie).
pub(super) fn exited_nowait(pid: u32) -> io::Result<bool> {
    let id: libc::id_t = pid;
    loop {
        // SAFETY: all-zero is a valid siginfo_t; waitid writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: info is a valid out-pointer; WNOWAIT leaves the child
        // unreaped so std's Child::wait can still collect its status.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                id,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r == 0 {
            // SAFETY: waitid filled info (or left it zeroed: no child ready).
            return Ok(unsafe { info.si_pid() } != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub(super) fn kill_group(pid: u32) {
    if let Ok(pgid) = libc::pid_t::try_from(pid) {
        // SAFETY: killpg takes no pointers; the group is the child's own
        // (process_group(0)) and the child is not yet reaped.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

/// Directories searched for binaries and given to children as `PATH`: ours,
/// plus the standard ones (sbin included: nft and cryptsetup live there).
pub(super) fn search_path() -> String {
    let mut dirs: Vec<String> = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| d.starts_with('/'))
        .map(str::to_string)
        .collect();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_string());
        }
    }
    dirs.join(":")
}

/// The first executable regular file `name` on `PATH` or in the standard
/// sbin/bin dirs (where root's tools live even when `PATH` lacks them).
pub fn which(name: &str) -> Option<PathBuf> {
    search_path()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// `X.Y.Z` from `... version X.Y.Z ...`, else the whole line.
pub(super) fn version_of(line: &str) -> String {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w.eq_ignore_ascii_case("version")
            && let Some(v) = words.next()
        {
            return v.trim_end_matches(',').to_string();
        }
    }
    line.to_string()
}
