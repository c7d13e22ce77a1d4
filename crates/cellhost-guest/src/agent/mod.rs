//! The in-guest agent: answers the protocol's ops.
//!
//! [`Agent::handle_line`] is the whole request path (decode, validate,
//! act, encode) and is what the fuzz target drives; [`serve`] frames
//! lines off a byte stream and feeds them to it.
//!
//! One agent serves any number of connections at once (a thread each);
//! `set_env`'s read-merge-write holds a lock so two writers never lose
//! each other's keys.

pub mod exec;
pub mod files;
pub mod init;
pub mod net;
pub mod serve;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::proto::{
    self, ErrorCode, ExecRequest, Failure, HelloReply, MainState, Op, ReadFileReply,
    ReadFileRequest, Response, StatusReply, WriteFileReply, WriteFileRequest,
};
use exec::{ExecSpec, Reaper};
use files::{Roots, io_failure};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// PATH for execs and the main command when the env file sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How the operator configured the agent.
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `env` and `secrets/` (created 0700).
    pub state_dir: PathBuf,
    /// Roots for write_file/read_file; none turns them off.
    pub file_roots: Vec<PathBuf>,
    /// Allow `exec`.
    pub exec: bool,
    /// Execs running at once; more are refused with `busy`.
    pub max_execs: usize,
    /// Where secrets go; `None` is `<state_dir>/secrets`. A microVM's agent
    /// uses `/run/secrets`, where the other tiers put them.
    pub secrets_dir: Option<PathBuf>,
    /// Accept `configure_net` although not PID 1 (tests in a netns of
    /// their own); a PID 1 agent always accepts it.
    pub configure_net: bool,
    /// Where `configure_net` writes the resolvers (`/etc`).
    pub resolv_dir: PathBuf,
}

impl Config {
    pub fn new(state_dir: impl Into<PathBuf>) -> Config {
        Config {
            state_dir: state_dir.into(),
            file_roots: Vec::new(),
            exec: true,
            max_execs: 16,
            secrets_dir: None,
            configure_net: false,
            resolv_dir: PathBuf::from("/etc"),
        }
    }
}

/// What the connection should do after answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Shutdown,
}

/// Lines longer than this are decoded at most [`BIG_LINE_SLOTS`] at a
/// time: a JSON value in memory is many times its text (a 1 MiB line of
/// `[0,0,…]` is ~14 MiB decoded), and connections are many.
const BIG_LINE: usize = 64 * 1024;
const BIG_LINE_SLOTS: usize = 2;

pub struct Agent {
    config: Config,
    big_lines: (Mutex<usize>, std::sync::Condvar),
    roots: Roots,
    reaper: Arc<Reaper>,
    env_lock: Mutex<()>,
    execs: AtomicUsize,
    main: Arc<Mutex<MainState>>,
    started: Instant,
    pid1: bool,
}

impl Agent {
    /// Make the state dirs (0700) and start the reaper.
    pub fn new(mut config: Config) -> io::Result<Agent> {
        files::private_dir(&config.state_dir)?;
        // Worked out once: `None` means `<state_dir>/secrets`.
        let secrets = config
            .secrets_dir
            .get_or_insert_with(|| config.state_dir.join("secrets"))
            .clone();
        files::private_dir(&secrets)?;
        let roots = Roots::new(&config.file_roots)?;
        Ok(Agent {
            config,
            roots,
            reaper: Reaper::global(),
            env_lock: Mutex::new(()),
            big_lines: (Mutex::new(0), std::sync::Condvar::new()),
            execs: AtomicUsize::new(0),
            main: Arc::new(Mutex::new(MainState::NotStarted)),
            started: Instant::now(),
            pid1: std::process::id() == 1,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn env_path(&self) -> PathBuf {
        self.config.state_dir.join("env")
    }

    pub fn secrets_dir(&self) -> PathBuf {
        // Set by `new`.
        self.config.secrets_dir.clone().unwrap_or_default()
    }

    pub fn is_pid1(&self) -> bool {
        self.pid1
    }

    /// Answer one request line (newline stripped).
    pub fn handle_line(&self, line: &[u8]) -> (Response, Control) {
        let parsed = if line.len() > BIG_LINE {
            let (lock, cv) = &self.big_lines;
            let mut busy = lock.lock().unwrap_or_else(|p| p.into_inner());
            while *busy >= BIG_LINE_SLOTS {
                busy = cv.wait(busy).unwrap_or_else(|p| p.into_inner());
            }
            *busy += 1;
            drop(busy);
            let parsed = proto::parse_request(line);
            *lock.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
            cv.notify_one();
            parsed
        } else {
            proto::parse_request(line)
        };
        let req = match parsed {
            Ok(r) => r,
            Err((id, f)) => return (Response::failure(id, f), Control::Continue),
        };
        let control = if req.op == Op::Shutdown {
            Control::Shutdown
        } else {
            Control::Continue
        };
        let resp = match self.dispatch(req.op) {
            Ok(fields) => Response::success(req.id, fields),
            Err(f) => Response::failure(req.id, f),
        };
        let control = if resp.ok { control } else { Control::Continue };
        (resp, control)
    }

    fn dispatch(&self, op: Op) -> Result<Map<String, Value>, Failure> {
        match op {
            Op::Hello { version, .. } => {
                if version == Some(0) {
                    return Err(Failure::new(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "version: 0 is not a protocol version; this agent speaks {}",
                            proto::PROTOCOL_VERSION
                        ),
                    ));
                }
                fields(&HelloReply {
                    version: proto::PROTOCOL_VERSION,
                    agent: proto::agent_name(),
                    ops: proto::OPS.iter().map(|s| s.to_string()).collect(),
                    max_line: proto::MAX_REQUEST_LINE,
                })
            }
            Op::Ping => {
                let mut m = Map::new();
                m.insert("pong".into(), Value::Bool(true));
                Ok(m)
            }
            Op::SetEnv { env } => {
                let n = self.set_env(&env)?;
                let mut m = Map::new();
                m.insert("count".into(), Value::from(n));
                Ok(m)
            }
            Op::SetSecret { name, value_b64 } => {
                proto::check_secret_name(&name)?;
                let value = B64
                    .decode(value_b64.0.as_bytes())
                    // No detail: it would quote bytes of the secret.
                    .map_err(|_| Failure::invalid("value_b64: not valid base64"))?;
                files::write_atomic(&self.secrets_dir(), &name, &value, 0o600)
                    .map_err(|e| io_failure("secret", e))?;
                Ok(Map::new())
            }
            Op::Exec(req) => self.exec(req),
            Op::Start(req) => {
                check_argv(&req.argv)?;
                let cwd = check_cwd(req.cwd)?;
                match self.start_main_in(&req.argv, &cwd) {
                    Some(MainState::SpawnFailed { error }) => {
                        Err(Failure::new(ErrorCode::SpawnFailed, error))
                    }
                    Some(MainState::Running { pid }) => {
                        let mut m = Map::new();
                        m.insert("pid".into(), Value::from(pid));
                        Ok(m)
                    }
                    _ => Err(Failure::new(
                        ErrorCode::Busy,
                        "start: the main command was started already",
                    )),
                }
            }
            Op::WriteFile(req) => self.write_file(req),
            Op::ReadFile(req) => self.read_file(req),
            Op::ConfigureNet(req) => {
                if !(self.pid1 || self.config.configure_net) {
                    return Err(Failure::new(
                        ErrorCode::Disabled,
                        "configure_net: only a PID 1 agent (or one run with --configure-net) changes the network",
                    ));
                }
                let plan = net::plan(&req)?;
                net::apply(&plan).map_err(|e| {
                    Failure::new(
                        ErrorCode::Io,
                        format!("configure_net: {}: {e}", plan.interface),
                    )
                })?;
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(&self.config.resolv_dir)
                    .and_then(|()| {
                        files::write_atomic(
                            &self.config.resolv_dir,
                            "resolv.conf",
                            cellhost_os::ifconfig::resolv_conf(&plan.dns).as_bytes(),
                            0o644,
                        )
                    })
                    .map_err(|e| io_failure("resolv.conf", e))?;
                let mut m = Map::new();
                m.insert("interface".into(), Value::from(plan.interface));
                Ok(m)
            }
            Op::Status => fields(&StatusReply {
                version: proto::PROTOCOL_VERSION,
                agent: proto::agent_name(),
                pid1: self.pid1,
                uptime_ms: self.started.elapsed().as_millis() as u64,
                main: self.main.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            }),
            Op::Shutdown => Ok(Map::new()),
        }
    }

    /// Validate every key and value, then merge into the env file under
    /// the lock. Returns the number of variables in the file.
    fn set_env(&self, req: &BTreeMap<String, String>) -> Result<usize, Failure> {
        for (k, v) in req {
            proto::check_env_name(k)?;
            proto::check_env_value(k, v)?;
        }
        let _g = self.env_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut env = self.read_env().map_err(|e| io_failure("env file", e))?;
        for (k, v) in req {
            if v.is_empty() {
                env.remove(k);
            } else {
                env.insert(k.clone(), v.clone());
            }
        }
        files::write_atomic(&self.config.state_dir, "env", &render_env(&env), 0o600)
            .map_err(|e| io_failure("env file", e))?;
        Ok(env.len())
    }

    /// The env file's variables (empty when there is none yet).
    pub fn read_env(&self) -> io::Result<BTreeMap<String, String>> {
        match std::fs::read(self.env_path()) {
            Ok(b) => Ok(parse_env(&b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e),
        }
    }

    /// The environment a process starts with: PATH and HOME defaults, the
    /// env file, then `extra`.
    fn process_env(&self, extra: &BTreeMap<String, String>) -> io::Result<Vec<(String, String)>> {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        env.insert("HOME".to_string(), "/root".to_string());
        env.extend(self.read_env()?);
        env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(env.into_iter().collect())
    }

    fn exec(&self, req: ExecRequest) -> Result<Map<String, Value>, Failure> {
        if !self.config.exec {
            return Err(Failure::new(
                ErrorCode::Disabled,
                "exec: turned off (agent started with --no-exec)",
            ));
        }
        let spec = self.exec_spec(req)?;
        // A slot, given back on every path out (a drop guard).
        let _slot = Slot(&self.execs);
        if self.execs.fetch_add(1, Ordering::SeqCst) >= self.config.max_execs {
            return Err(Failure::new(
                ErrorCode::Busy,
                format!("exec: {} execs already running", self.config.max_execs),
            ));
        }
        let argv0 = spec.argv[0].clone();
        let reply = exec::run(&self.reaper, spec).map_err(|e| {
            Failure::new(
                ErrorCode::SpawnFailed,
                format!("argv[0]: cannot run {argv0:?}: {e}"),
            )
        })?;
        fields(&reply)
    }

    fn exec_spec(&self, req: ExecRequest) -> Result<ExecSpec, Failure> {
        check_argv(&req.argv)?;
        for (k, v) in &req.env {
            proto::check_env_name(k)?;
            if v.contains('\0') {
                return Err(Failure::invalid(format!("env.{k}: value contains NUL")));
            }
        }
        let cwd = check_cwd(req.cwd)?;
        let timeout_ms = req.timeout_ms.unwrap_or(proto::DEFAULT_EXEC_TIMEOUT_MS);
        if timeout_ms == 0 || timeout_ms > proto::MAX_EXEC_TIMEOUT_MS {
            return Err(Failure::invalid(format!(
                "timeout_ms: {timeout_ms} is outside 1..={}",
                proto::MAX_EXEC_TIMEOUT_MS
            )));
        }
        let max_output = req.max_output.unwrap_or(proto::MAX_EXEC_OUTPUT);
        if max_output > proto::MAX_EXEC_OUTPUT {
            return Err(Failure::invalid(format!(
                "max_output: {max_output} is above the cap {}",
                proto::MAX_EXEC_OUTPUT
            )));
        }
        let stdin = match req.stdin_b64 {
            None => None,
            Some(s) => Some(
                B64.decode(s.as_bytes())
                    .map_err(|e| Failure::invalid(format!("stdin_b64: not base64: {e}")))?,
            ),
        };
        let env = self
            .process_env(&req.env)
            .map_err(|e| io_failure("env file", e))?;
        Ok(ExecSpec {
            argv: req.argv,
            env,
            cwd,
            stdin,
            timeout: Duration::from_millis(timeout_ms),
            max_output,
        })
    }

    fn write_file(&self, req: WriteFileRequest) -> Result<Map<String, Value>, Failure> {
        let mode = match &req.mode {
            None => 0o644,
            Some(m) => parse_mode(m)?,
        };
        let data = B64
            .decode(req.content_b64.as_bytes())
            .map_err(|e| Failure::invalid(format!("content_b64: not base64: {e}")))?;
        if data.len() > proto::MAX_FILE_CHUNK {
            return Err(Failure::invalid(format!(
                "content_b64: {} bytes is above the cap {}",
                data.len(),
                proto::MAX_FILE_CHUNK
            )));
        }
        self.roots.write(&req.path, &data, mode, req.parents)?;
        fields(&WriteFileReply {
            size: data.len() as u64,
        })
    }

    fn read_file(&self, req: ReadFileRequest) -> Result<Map<String, Value>, Failure> {
        let limit = req.limit.unwrap_or(proto::MAX_FILE_CHUNK);
        if limit > proto::MAX_FILE_CHUNK {
            return Err(Failure::invalid(format!(
                "limit: {limit} is above the cap {}",
                proto::MAX_FILE_CHUNK
            )));
        }
        let offset = req.offset.unwrap_or(0);
        let (data, size) = self.roots.read(&req.path, offset, limit)?;
        fields(&ReadFileReply {
            eof: offset + data.len() as u64 >= size,
            content: data,
            size,
            offset,
        })
    }

    /// Start the cell's main command and record how it ends. Its stdout
    /// and stderr go to the agent's stderr (the console; stdout may be the
    /// protocol stream).
    pub fn start_main(&self, argv: &[String]) {
        self.start_main_in(argv, "/");
    }

    /// [`Agent::start_main`] in `cwd`, once: the state after the attempt
    /// (`Running` or `SpawnFailed`), or `None` when it was started before.
    fn start_main_in(&self, argv: &[String], cwd: &str) -> Option<MainState> {
        use std::os::fd::AsFd;
        let mut main = self.main.lock().unwrap_or_else(|p| p.into_inner());
        if *main != MainState::NotStarted {
            return None;
        }
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .current_dir(cwd)
            // A pipe closed at once: no /dev/null needed.
            .stdin(std::process::Stdio::piped());
        if let Ok(fd) = io::stderr().as_fd().try_clone_to_owned() {
            cmd.stdout(std::process::Stdio::from(fd));
        }
        let spawned = self
            .process_env(&BTreeMap::new())
            .and_then(|env| self.reaper.spawn(cmd.envs(env)));
        match spawned {
            Err(e) => {
                tracing::error!("main command {:?}: {e}", argv[0]);
                *main = MainState::SpawnFailed {
                    error: format!("{}: {e}", argv[0]),
                };
            }
            Ok(mut child) => {
                let pid = child.id() as i32;
                drop(child.stdin.take());
                drop(child);
                tracing::info!(pid, "main command started: {:?}", argv[0]);
                *main = MainState::Running { pid };
                let (reaper, state) = (self.reaper.clone(), self.main.clone());
                std::thread::spawn(move || {
                    let exit = reaper.wait(pid, None);
                    tracing::info!(pid, ?exit, "main command ended");
                    *state.lock().unwrap_or_else(|p| p.into_inner()) = MainState::Exited {
                        exit_code: exit.and_then(|e| e.code()),
                        signal: exit.and_then(|e| e.signal()),
                    };
                });
            }
        }
        Some(main.clone())
    }

    /// Kill the main command's process group, if it runs.
    pub fn kill_main(&self) {
        if let MainState::Running { pid } = *self.main.lock().unwrap_or_else(|p| p.into_inner()) {
            self.reaper.kill_group(pid);
        }
    }
}

/// `argv` of an exec or the main command: a program, no NUL anywhere.
fn check_argv(argv: &[String]) -> Result<(), Failure> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(Failure::invalid("argv: must name a program"));
    }
    if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
        return Err(Failure::invalid(format!("argv[{i}]: contains NUL")));
    }
    Ok(())
}

/// `cwd`, absolute; `/` when absent.
fn check_cwd(cwd: Option<String>) -> Result<String, Failure> {
    let cwd = cwd.unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') || cwd.contains('\0') {
        return Err(Failure::invalid(format!(
            "cwd: {cwd:?} is not an absolute path"
        )));
    }
    Ok(cwd)
}

/// A taken slot of a counter (connections, execs), given back on drop.
pub(crate) struct Slot<'a>(pub(crate) &'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn fields<T: Serialize>(v: &T) -> Result<Map<String, Value>, Failure> {
    match serde_json::to_value(v) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Failure::new(
            ErrorCode::Io,
            "internal: reply did not encode",
        )),
    }
}

/// `"0644"`, `"644"`, `"0o600"`: permission bits, at most `07777`.
fn parse_mode(s: &str) -> Result<u32, Failure> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if !digits.is_empty() && m <= 0o7777 => Ok(m),
        _ => Err(Failure::invalid(format!(
            "mode: {s:?} is not octal permission bits (e.g. \"0644\")"
        ))),
    }
}

/// `KEY=VALUE` lines, sorted by key.
pub fn render_env(env: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in env {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    out
}

/// Parse an env file; lines that are not `NAME=VALUE` with a POSIX name
/// are skipped (the agent never writes them).
pub fn parse_env(b: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(b)
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| proto::check_env_name(k).is_ok())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The default state dir in a guest.
pub fn default_state_dir() -> &'static Path {
    Path::new("/run/cellhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert_eq!(parse_mode("0o4755").unwrap(), 0o4755);
        for bad in ["", "9", "0o", "17777", "rw", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_file_round_trip() {
        let env: BTreeMap<String, String> = [("B", "x=y z"), ("A", "")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(render_env(&env), b"A=\nB=x=y z\n");
        assert_eq!(parse_env(&render_env(&env)), env);
        assert_eq!(parse_env(b"junk\n1X=2\nOK=1\n").len(), 1);
    }
}
