//! The host side of the guest channel.
//!
//! [`Client::connect`] reaches the agent over one of four transports
//! ([`Endpoint`]), retrying with exponential backoff until a deadline —
//! a guest that is still booting refuses, resets or stays silent, and all
//! of those mean "try again" — and finishes with a `hello`. Each call then
//! sends one request line and reads lines until the one carrying its id
//! arrives or the per-request timeout passes. Responses with another id
//! (a late answer to a request that timed out, a virtio-serial port's
//! leftovers from an earlier session) are dropped, so a timeout never
//! leaves the connection out of step.
//!
//! Blocking by design: std sockets with read/write timeouts, no runtime.
//! Async callers run it on a blocking thread.
//!
//! An agent that does not know `hello` (microvm-runtime's daemon) is
//! accepted as protocol version 0 speaking `ping`, `set_env` and
//! `set_secret`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::line::{Frame, LineReader};
use crate::proto::{
    self, ErrorCode, ExecReply, ExecRequest, HelloReply, Op, ReadFileReply, ReadFileRequest,
    Request, Response, Sensitive, StatusReply, WriteFileRequest,
};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Where the agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket the agent listens on (`--unix`).
    Unix(PathBuf),
    /// qemu's `-chardev socket,path=…,server=on` behind a
    /// `virtserialport`: a unix socket carrying the port's byte stream.
    VirtioSerial(PathBuf),
    /// Firecracker's vsock device: a unix socket on the host; the client
    /// writes `CONNECT <port>\n` and reads `OK <host port>\n`.
    HybridVsock { uds: PathBuf, port: u32 },
    /// AF_VSOCK through the host's vhost-vsock.
    Vsock { cid: u32, port: u32 },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::VirtioSerial(p) => write!(f, "virtio-serial:{}", p.display()),
            Endpoint::HybridVsock { uds, port } => {
                write!(f, "hybrid-vsock:{}:{port}", uds.display())
            }
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;
    /// `unix:PATH`, `virtio-serial:PATH`, `hybrid-vsock:PATH:PORT`,
    /// `vsock:CID:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |v: &str, what: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{what}: {v:?} is not a number"))
        };
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected unix:PATH, virtio-serial:PATH, hybrid-vsock:PATH:PORT or vsock:CID:PORT"))?;
        match kind {
            "unix" if !rest.is_empty() => Ok(Endpoint::Unix(rest.into())),
            "virtio-serial" if !rest.is_empty() => Ok(Endpoint::VirtioSerial(rest.into())),
            "hybrid-vsock" => {
                let (p, port) = rest
                    .rsplit_once(':')
                    .ok_or("hybrid-vsock: expected PATH:PORT")?;
                Ok(Endpoint::HybridVsock {
                    uds: p.into(),
                    port: num(port, "port")?,
                })
            }
            "vsock" => {
                let (cid, port) = rest.split_once(':').ok_or("vsock: expected CID:PORT")?;
                Ok(Endpoint::Vsock {
                    cid: num(cid, "cid")?,
                    port: num(port, "port")?,
                })
            }
            _ => Err(format!("{s:?}: unknown endpoint kind {kind:?}")),
        }
    }
}

/// Timing of [`Client::connect`] and of calls.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Give up connecting after this long.
    pub deadline: Duration,
    /// One attempt (connect, handshake, hello) may take this long.
    pub attempt_timeout: Duration,
    /// First wait between attempts; doubles up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Timeout of a call (exec adds its own timeout on top).
    pub request_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(2),
            backoff: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
            request_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{endpoint}: agent not ready after {attempts} attempts in {waited:?}: {last}")]
    NotReady {
        endpoint: String,
        attempts: u32,
        waited: Duration,
        last: String,
    },
    #[error("{endpoint}: {op}: no answer within {after:?}")]
    Timeout {
        endpoint: String,
        op: &'static str,
        after: Duration,
    },
    #[error("{endpoint}: {op}: {source}")]
    Io {
        endpoint: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("agent refused {op}: {message} ({})", code.map(|c| c.as_str()).unwrap_or("no code"))]
    Agent {
        op: &'static str,
        code: Option<ErrorCode>,
        message: String,
    },
    #[error("{endpoint}: {op}: {message}")]
    Protocol {
        endpoint: String,
        op: &'static str,
        message: String,
    },
    #[error("{op}: request of {len} bytes is over the agent's {max} byte line cap")]
    TooLarge {
        op: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{endpoint}: the agent refused this client's protocol version: {message}")]
    Version { endpoint: String, message: String },
    #[error("{endpoint}: {op}: the agent ({agent}) does not offer this op")]
    Unsupported {
        endpoint: String,
        op: &'static str,
        agent: String,
    },
    #[error("{endpoint}: {op}: connection out of step ({why}); reconnect")]
    Broken {
        endpoint: String,
        op: &'static str,
        why: String,
    },
}

impl ClientError {
    /// The agent's error code, when the agent refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent { code, .. } => *code,
            _ => None,
        }
    }
}

/// One stream, whatever carries it.
enum Conn {
    Unix(UnixStream),
    Vsock(vsock::VsockStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Vsock(s) => Conn::Vsock(s.try_clone()?),
        })
    }
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        // A zero timeout means "none" to the kernel: never pass it.
        let t = Some(t.max(Duration::from_millis(1)));
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::Vsock(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Vsock(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Vsock(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// A connected, `hello`ed client.
pub struct Client {
    endpoint: Endpoint,
    name: String,
    reader: LineReader<Conn>,
    writer: Conn,
    next_id: u64,
    hello: HelloReply,
    opts: ConnectOptions,
    /// Set when the stream can no longer be trusted to be in step (a
    /// request half written, the agent gone): every later call fails.
    broken: Option<String>,
}

/// `now + d`, saturating far in the future instead of overflowing.
pub(crate) fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Worth another attempt: the guest may still be booting.
fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Io { source, .. } => {
            matches!(
                source.kind(),
                ErrorKind::NotFound
                    | ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::TimedOut
                    | ErrorKind::WouldBlock
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::NotConnected
            ) || matches!(
                source.raw_os_error(),
                Some(libc::ENODEV | libc::ETIMEDOUT | libc::EHOSTUNREACH)
            )
        }
        ClientError::Timeout { .. } | ClientError::Protocol { .. } => true,
        _ => false,
    }
}

impl Client {
    /// Connect and `hello`, retrying until `opts.deadline` while the
    /// failure is one a booting guest gives (refused, reset, missing
    /// socket, silence); other failures return at once. No attempt runs
    /// past the deadline, except that an AF_VSOCK connect is bounded by the
    /// kernel's own connect timeout (2 s).
    pub fn connect(endpoint: &Endpoint, opts: &ConnectOptions) -> Result<Client, ClientError> {
        let started = Instant::now();
        let give_up = after(started, opts.deadline);
        let mut backoff = opts.backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let left = give_up.saturating_duration_since(Instant::now());
            let budget = opts.attempt_timeout.min(left).max(Duration::from_millis(1));
            let last = match Client::attempt(endpoint, opts, budget) {
                Ok(c) => return Ok(c),
                Err(e) if !retryable(&e) => return Err(e),
                Err(e) => e.to_string(),
            };
            let now = Instant::now();
            if now >= give_up {
                return Err(ClientError::NotReady {
                    endpoint: endpoint.to_string(),
                    attempts,
                    waited: now - started,
                    last,
                });
            }
            tracing::debug!(%endpoint, attempts, "agent not ready: {last}");
            std::thread::sleep(backoff.min(give_up - now));
            backoff = (backoff * 2).min(opts.backoff_max);
        }
    }

    /// Talk to an agent on an already connected stream (a socketpair to
    /// `cellhost-agent --stdio`); `hello` once, no retries.
    pub fn from_unix_stream(
        stream: UnixStream,
        name: &str,
        opts: &ConnectOptions,
    ) -> Result<Client, ClientError> {
        Client::handshake(
            Endpoint::Unix(name.into()),
            Conn::Unix(stream),
            opts,
            opts.attempt_timeout,
        )
    }

    fn attempt(
        endpoint: &Endpoint,
        opts: &ConnectOptions,
        budget: Duration,
    ) -> Result<Client, ClientError> {
        let io_err = |source| ClientError::Io {
            endpoint: endpoint.to_string(),
            op: "connect",
            source,
        };
        let conn = match endpoint {
            Endpoint::Unix(p)
            | Endpoint::VirtioSerial(p)
            | Endpoint::HybridVsock { uds: p, .. } => {
                Conn::Unix(UnixStream::connect(p).map_err(io_err)?)
            }
            Endpoint::Vsock { cid, port } => {
                Conn::Vsock(vsock::VsockStream::connect_with_cid_port(*cid, *port).map_err(io_err)?)
            }
        };
        Client::handshake(endpoint.clone(), conn, opts, budget)
    }

    /// Transport handshake and `hello`, all within `budget`.
    fn handshake(
        endpoint: Endpoint,
        conn: Conn,
        opts: &ConnectOptions,
        budget: Duration,
    ) -> Result<Client, ClientError> {
        let until = after(Instant::now(), budget);
        let name = endpoint.to_string();
        let io_err = |op, source| ClientError::Io {
            endpoint: name.clone(),
            op,
            source,
        };
        conn.set_timeouts(budget)
            .map_err(|e| io_err("connect", e))?;
        let writer = conn.try_clone().map_err(|e| io_err("connect", e))?;
        let mut client = Client {
            endpoint: endpoint.clone(),
            name: name.clone(),
            reader: LineReader::new(conn, proto::MAX_RESPONSE_LINE),
            writer,
            next_id: first_id(),
            hello: HelloReply {
                version: 0,
                agent: String::new(),
                ops: vec!["hello".into()],
                max_line: proto::MAX_REQUEST_LINE,
            },
            opts: opts.clone(),
            broken: None,
        };
        match endpoint {
            Endpoint::HybridVsock { port, .. } => client.hybrid_handshake(port, budget)?,
            // End whatever partial line an earlier host client left in
            // the port; the agent answers it with an error (id null),
            // which `call` drops.
            Endpoint::VirtioSerial(_) => client
                .writer
                .write_all(b"\n")
                .map_err(|e| io_err("connect", e))?,
            _ => {}
        }
        let hello = Op::Hello {
            version: Some(proto::PROTOCOL_VERSION),
            client: Some(format!("cellhost/{}", env!("CARGO_PKG_VERSION"))),
        };
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        client.hello = match client.call_within(hello, left) {
            Ok(fields) => decode::<HelloReply>(&name, "hello", fields)?,
            // An agent that refuses the version: not one we can talk to.
            Err(ClientError::Agent {
                code: Some(ErrorCode::UnsupportedVersion),
                message,
                ..
            }) => {
                return Err(ClientError::Version {
                    endpoint: name,
                    message,
                });
            }
            // An agent without `hello` (microvm-runtime's daemon answers
            // an unknown op with an error and no code): the three ops
            // that protocol had.
            Err(ClientError::Agent {
                code: None | Some(ErrorCode::UnknownOp | ErrorCode::Unknown),
                ..
            }) => HelloReply {
                version: 0,
                agent: "legacy (no hello)".into(),
                ops: ["ping", "set_env", "set_secret"].map(String::from).to_vec(),
                max_line: proto::MAX_REQUEST_LINE,
            },
            Err(e) => return Err(e),
        };
        Ok(client)
    }

    /// Firecracker's host-initiated vsock connection: `CONNECT <port>\n`,
    /// answered by `OK <assigned host port>\n`; the stream then belongs to
    /// the guest port. A guest not listening yet gets the connection
    /// closed, which the caller retries.
    fn hybrid_handshake(&mut self, port: u32, budget: Duration) -> Result<(), ClientError> {
        let proto_err = |m: String| ClientError::Protocol {
            endpoint: self.name.clone(),
            op: "CONNECT",
            message: m,
        };
        self.writer
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(|e| proto_err(format!("write: {e}")))?;
        // The answer is one short line; the framed reader keeps whatever
        // follows it for the protocol.
        match self.reader.next_frame() {
            Ok(Some(Frame::Line(l))) => {
                let text = String::from_utf8_lossy(l);
                match text.strip_prefix("OK ") {
                    Some(n) if n.trim().parse::<u32>().is_ok() => Ok(()),
                    _ => Err(proto_err(format!(
                        "expected \"OK <port>\", got {:?}",
                        truncate(&text)
                    ))),
                }
            }
            Ok(Some(Frame::TooLong { len })) => {
                Err(proto_err(format!("{len}-byte answer to CONNECT")))
            }
            Ok(None) => Err(proto_err(format!(
                "closed by the vsock device (nothing listens on port {port} yet?)"
            ))),
            Err(e) if is_timeout(&e) => {
                Err(proto_err(format!("no answer to CONNECT within {budget:?}")))
            }
            Err(e) => Err(proto_err(format!("read: {e}"))),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// What the agent said to `hello` (version 0 for a legacy agent).
    pub fn agent(&self) -> &HelloReply {
        &self.hello
    }

    /// Send `op`, wait for its answer up to the default request timeout.
    pub fn call(&mut self, op: Op) -> Result<Map<String, Value>, ClientError> {
        let t = self.opts.request_timeout;
        self.call_within(op, t)
    }

    /// Send `op`, wait for its answer up to `timeout`.
    pub fn call_within(
        &mut self,
        op: Op,
        timeout: Duration,
    ) -> Result<Map<String, Value>, ClientError> {
        let name = op.name();
        if let Some(why) = &self.broken {
            return Err(ClientError::Broken {
                endpoint: self.name.clone(),
                op: name,
                why: why.clone(),
            });
        }
        if timeout.is_zero() {
            return Err(ClientError::Protocol {
                endpoint: self.name.clone(),
                op: name,
                message: "a zero timeout would send the request and never wait for it".into(),
            });
        }
        if !self.hello.ops.iter().any(|o| o == name) {
            return Err(ClientError::Unsupported {
                endpoint: self.name.clone(),
                op: name,
                agent: self.hello.agent.clone(),
            });
        }
        // String ids: microvm-runtime's daemon accepts only strings.
        let id = self.next_id.to_string();
        self.next_id += 1;
        let line = Request {
            id: Value::String(id.clone()),
            op,
        }
        .to_line();
        let max = self.hello.max_line.min(proto::MAX_REQUEST_LINE);
        if line.len() - 1 > max {
            return Err(ClientError::TooLarge {
                op: name,
                len: line.len() - 1,
                max,
            });
        }
        let deadline = after(Instant::now(), timeout);
        let timed_out = |endpoint: &str| ClientError::Timeout {
            endpoint: endpoint.to_string(),
            op: name,
            after: timeout,
        };
        let write = self
            .writer
            .set_timeouts(timeout)
            .and_then(|()| self.writer.write_all(&line));
        if let Err(e) = write {
            // Part of the line may be out: the stream is out of step.
            self.broken = Some(format!("a request was cut off while writing: {e}"));
            return Err(if is_timeout(&e) {
                timed_out(&self.name)
            } else {
                ClientError::Io {
                    endpoint: self.name.clone(),
                    op: name,
                    source: e,
                }
            });
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out(&self.name));
            }
            let frame = match self
                .reader
                .get_ref()
                .set_timeouts(left)
                .and_then(|()| self.reader.next_frame())
            {
                Ok(Some(f)) => f,
                Err(e) if is_timeout(&e) => return Err(timed_out(&self.name)),
                other => {
                    let e = match other {
                        Ok(None) => io::Error::new(
                            ErrorKind::UnexpectedEof,
                            "the agent closed the connection",
                        ),
                        Err(e) => e,
                        Ok(Some(_)) => unreachable!(),
                    };
                    self.broken = Some(e.to_string());
                    return Err(ClientError::Io {
                        endpoint: self.name.clone(),
                        op: name,
                        source: e,
                    });
                }
            };
            let Frame::Line(l) = frame else {
                return Err(ClientError::Protocol {
                    endpoint: self.name.clone(),
                    op: name,
                    message: format!("response line over {} bytes", proto::MAX_RESPONSE_LINE),
                });
            };
            let resp: Response = match serde_json::from_slice(l) {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(endpoint = %self.name, "dropping a line that is not a response: {e}");
                    continue;
                }
            };
            if resp.id.as_str() != Some(id.as_str()) {
                tracing::debug!(endpoint = %self.name, id = %resp.id, "dropping a stale response");
                continue;
            }
            if !resp.ok {
                return Err(ClientError::Agent {
                    op: name,
                    code: resp.code,
                    message: resp.error.unwrap_or_else(|| "(no message)".into()),
                });
            }
            return Ok(resp.fields);
        }
    }

    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.call(Op::Ping).map(drop)
    }

    /// Merge `env` into the guest's env file (empty value = delete).
    /// Returns how many variables the file holds now.
    pub fn set_env(&mut self, env: &BTreeMap<String, String>) -> Result<u64, ClientError> {
        let fields = self.call(Op::SetEnv { env: env.clone() })?;
        Ok(fields.get("count").and_then(Value::as_u64).unwrap_or(0))
    }

    pub fn set_secret(&mut self, name: &str, value: &[u8]) -> Result<(), ClientError> {
        self.call(Op::SetSecret {
            name: name.into(),
            value_b64: Sensitive(B64.encode(value)),
        })
        .map(drop)
    }

    /// Run a command to completion; waits the exec's own timeout plus the
    /// request timeout.
    pub fn exec(&mut self, req: ExecRequest) -> Result<ExecReply, ClientError> {
        let t = Duration::from_millis(req.timeout_ms.unwrap_or(proto::DEFAULT_EXEC_TIMEOUT_MS))
            .saturating_add(self.opts.request_timeout);
        let fields = self.call_within(Op::Exec(req), t)?;
        decode(&self.name, "exec", fields)
    }

    pub fn write_file(
        &mut self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
        parents: bool,
    ) -> Result<(), ClientError> {
        self.call(Op::WriteFile(WriteFileRequest {
            path: path.into(),
            content_b64: B64.encode(data),
            mode: mode.map(|m| format!("{m:04o}")),
            parents,
        }))
        .map(drop)
    }

    /// Read one chunk.
    pub fn read_file(
        &mut self,
        path: &str,
        offset: u64,
        limit: Option<usize>,
    ) -> Result<(Vec<u8>, ReadFileReply), ClientError> {
        let fields = self.call(Op::ReadFile(ReadFileRequest {
            path: path.into(),
            offset: Some(offset),
            limit,
        }))?;
        let mut reply: ReadFileReply = decode(&self.name, "read_file", fields)?;
        Ok((std::mem::take(&mut reply.content), reply))
    }

    /// Read a whole file in chunks, refusing more than `max` bytes. The
    /// guest is not trusted: the total is bounded here, not by its `size`.
    pub fn read_file_all(&mut self, path: &str, max: u64) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let offset = out.len() as u64;
            let (chunk, reply) = self.read_file(path, offset, None)?;
            let bad = |message: String| ClientError::Protocol {
                endpoint: self.name.clone(),
                op: "read_file",
                message,
            };
            if reply.size > max || offset + chunk.len() as u64 > max {
                return Err(bad(format!("{path}: more than the {max} byte limit")));
            }
            if reply.offset != offset {
                return Err(bad(format!(
                    "asked for offset {offset}, got {}",
                    reply.offset
                )));
            }
            let done = reply.eof || chunk.is_empty();
            out.extend_from_slice(&chunk);
            if done {
                return Ok(out);
            }
        }
    }

    /// Start the cell's main command (once); returns its pid in the guest.
    pub fn start(&mut self, argv: &[String], cwd: Option<&str>) -> Result<i32, ClientError> {
        let fields = self.call(Op::Start(proto::StartRequest {
            argv: argv.to_vec(),
            cwd: cwd.map(str::to_string),
        }))?;
        Ok(fields.get("pid").and_then(|p| p.as_i64()).unwrap_or(0) as i32)
    }

    /// Give the guest's interface its address, route and resolvers.
    pub fn configure_net(&mut self, req: proto::NetRequest) -> Result<(), ClientError> {
        self.call(Op::ConfigureNet(req)).map(drop)
    }

    pub fn status(&mut self) -> Result<StatusReply, ClientError> {
        let fields = self.call(Op::Status)?;
        decode(&self.name, "status", fields)
    }

    /// Ask the agent to stop (a PID 1 agent powers the guest off).
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        self.call(Op::Shutdown).map(drop)
    }
}

fn decode<T: DeserializeOwned>(
    endpoint: &str,
    op: &'static str,
    fields: Map<String, Value>,
) -> Result<T, ClientError> {
    serde_json::from_value(Value::Object(fields)).map_err(|e| ClientError::Protocol {
        endpoint: endpoint.into(),
        op,
        message: format!("unexpected answer: {e}"),
    })
}

/// A random first request id (below 2^53, exact in any JSON reader): a
/// client that reconnects to a virtio-serial port must not take a late
/// answer meant for an earlier client's request as its own.
fn first_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 12).max(1)
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print() {
        for s in [
            "unix:/run/a.sock",
            "virtio-serial:/x/y",
            "hybrid-vsock:/v.sock:5555",
            "vsock:3:5555",
        ] {
            let e: Endpoint = s.parse().unwrap();
            assert_eq!(e.to_string(), s);
        }
        for bad in [
            "",
            "unix:",
            "vsock:3",
            "vsock:x:1",
            "hybrid-vsock:/p",
            "tcp:1.2.3.4:5",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}
