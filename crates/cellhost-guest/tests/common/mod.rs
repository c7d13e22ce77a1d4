//! A real `cellhost-agent` process for tests, and a client to it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cellhost_guest::{Client, ConnectOptions, Endpoint};

pub const AGENT: &str = env!("CARGO_BIN_EXE_cellhost-agent");

pub struct AgentProc {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl AgentProc {
    /// An agent on a unix socket with `<dir>/state` and file root
    /// `<dir>/files`; `extra` goes before `--`.
    pub fn start(extra: &[&str]) -> AgentProc {
        Self::start_with(extra, &[])
    }

    pub fn start_with(extra: &[&str], command: &[&str]) -> AgentProc {
        Self::start_env(extra, command, &[])
    }

    pub fn start_env(extra: &[&str], command: &[&str], env: &[(&str, &str)]) -> AgentProc {
        Self::start_wrapped(&[], extra, command, env)
    }

    /// [`AgentProc::start_env`] run by `wrapper` (e.g. `ip netns exec NS`).
    pub fn start_wrapped(
        wrapper: &[&str],
        extra: &[&str],
        command: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProc {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("files")).unwrap();
        let sock = dir.path().join("agent.sock");
        let mut cmd = match wrapper.split_first() {
            None => Command::new(AGENT),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(AGENT);
                c
            }
        };
        cmd.arg("--unix")
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--file-root")
            .arg(dir.path().join("files"))
            .args(extra)
            .env("CELLHOST_TEST_AGENT_ENV", "must-not-leak")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap());
        if !command.is_empty() {
            cmd.arg("--").args(command);
        }
        let child = cmd.spawn().unwrap();
        AgentProc { child, dir, sock }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn files(&self) -> PathBuf {
        std::fs::canonicalize(self.dir.path().join("files")).unwrap()
    }

    pub fn client(&self) -> Client {
        Client::connect(&Endpoint::Unix(self.sock.clone()), &opts()).unwrap()
    }

    /// A raw connection for hostile input.
    pub fn raw(&self) -> UnixStream {
        let c = self.client(); // waits until it listens
        drop(c);
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    /// Wait for the agent to exit (within 30 s) and return its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..300 {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("agent did not exit");
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn opts() -> ConnectOptions {
    ConnectOptions {
        deadline: Duration::from_secs(30),
        request_timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    }
}

pub fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Kill and reap a child when the test ends, panicking or not.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
