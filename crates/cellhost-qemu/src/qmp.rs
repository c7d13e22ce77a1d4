//! A small QMP client (qemu's JSON machine protocol) over the per-VM unix
//! socket.
//!
//! QMP is line-oriented JSON: the server greets with `{"QMP": ...}`, the
//! client sends `qmp_capabilities`, then each `{"execute": ...}` gets one
//! `{"return": ...}` or `{"error": {"class", "desc"}}`. Asynchronous
//! `{"event": ...}` lines may arrive between them and are skipped.
//!
//! Blocking std I/O with a timeout on every read: the backend calls it
//! from `spawn_blocking`. qemu's `-qmp` socket serves one client at a
//! time: call sites connect, ask and disconnect; a second caller waits
//! for the first (or its timeout).
//!
//! Threat model: the socket lives in the cell's private dir (0700); the
//! guest cannot reach it. Lines are capped ([`MAX_LINE`]) so a confused
//! peer cannot make us buffer without bound.
//!
//! Why not the `qapi` crate (checked: 0.15.0 of 2024-09-09, its latest,
//! marked passively maintained): its sync `Qmp` decodes every line into
//! types generated from QEMU 9.1's schema, so an event or a run state that
//! schema lacks (this host runs QEMU 7.2) fails the command ("data did not
//! match any variant of untagged enum QmpMessage", arcnmx/qapi-rs#23,
//! open); its handshake panics on EOF before the greeting, and its reads
//! have no line cap. It would also add qapi-qmp, ~26k lines generated at
//! build time (about a minute to compile here). We send five commands and
//! read one string.

use std::io::{BufRead, BufReader, Read as _, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

/// Longest QMP line we read (query results are small).
pub const MAX_LINE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {path}: {what}")]
    Protocol { path: PathBuf, what: String },
    /// qemu answered `{"error": ...}`.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP {path}: no answer within {0:?}", .timeout)]
    Timeout { path: PathBuf, timeout: Duration },
}

pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect, read the greeting and leave capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let io = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_value(timeout)?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol(format!("expected a greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Run one command; its `return` value.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        let timeout = self
            .writer
            .read_timeout()
            .ok()
            .flatten()
            .unwrap_or(Duration::from_secs(10));
        loop {
            let v = self.read_value(timeout)?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(self.protocol(format!("unexpected line {v}")));
        }
    }

    /// `query-status`'s `status` (`running`, `paused`, `prelaunch`,
    /// `shutdown`, ...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None)?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.protocol(format!("query-status returned {r}")))
    }

    fn read_value(&mut self, timeout: Duration) -> Result<Value, QmpError> {
        let _ = self
            .reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))));
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    QmpError::Timeout {
                        path: self.path.clone(),
                        timeout,
                    }
                }
                _ => QmpError::Io {
                    path: self.path.clone(),
                    source,
                },
            })?;
        if n == 0 {
            return Err(self.protocol("connection closed".into()));
        }
        if !line.ends_with(b"\n") {
            return Err(self.protocol(format!("a line longer than {MAX_LINE} bytes")));
        }
        serde_json::from_slice(&line).map_err(|e| self.protocol(format!("bad JSON: {e}")))
    }

    fn protocol(&self, what: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            what,
        }
    }
}
