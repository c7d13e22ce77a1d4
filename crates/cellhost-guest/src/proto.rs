//! The wire protocol, shared by the agent and the host client.
//!
//! Newline-delimited JSON over one byte stream. Each request is one line,
//! `{"op": <name>, "id": <string|number>, ...fields}`; each response is
//! one line, `{"id": <same id>, "ok": true|false, "error"?: <message>,
//! "code"?: <stable error code>, ...result fields}`, in request order per
//! connection. This is microvm-runtime's `guest_metadata_daemon` shape
//! (`ping`, `set_env`, `set_secret` keep their names and fields), so its
//! clients talk to `cellhost-agent` unchanged; `hello` adds a version
//! exchange that those clients may skip.
//!
//! Requests are decoded in two steps so that a bad request still gets an
//! answer carrying its id: the line is parsed as a JSON object, the `id`
//! is taken out and checked, then the rest is decoded into [`Op`]
//! (unknown fields refused, so a typo is an error and not a silent
//! default).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The protocol version this crate speaks. `hello` answers with it and
/// with the list of ops; versions only add ops and fields, so a client
/// checks the op list rather than the number (and the agent refuses only
/// versions it cannot be, i.e. 0).
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line the agent reads, newline excluded. A longer line
/// is answered with [`ErrorCode::LineTooLong`] without being buffered.
pub const MAX_REQUEST_LINE: usize = 1024 * 1024;

/// Longest response line the host client reads. Responses carry at most
/// two capped exec streams or one file chunk, base64-encoded.
pub const MAX_RESPONSE_LINE: usize = 4 * 1024 * 1024;

/// Cap on each of an exec's stdout and stderr (bytes kept; the rest is
/// read and counted, so the process never blocks on a full pipe).
pub const MAX_EXEC_OUTPUT: usize = 256 * 1024;

/// Cap on one `write_file` body and one `read_file` chunk.
pub const MAX_FILE_CHUNK: usize = 512 * 1024;

/// Exec timeout when the request names none, and the largest accepted.
pub const DEFAULT_EXEC_TIMEOUT_MS: u64 = 60_000;
pub const MAX_EXEC_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

/// Longest secret name (a file name in the secrets dir).
pub const MAX_SECRET_NAME: usize = 255;

/// A string that never shows in `Debug` output (secret values).
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sensitive(pub String);

impl std::fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<redacted {} bytes>", self.0.len())
    }
}

/// A request, without its id. `Debug` shows env keys and sizes, never
/// env values, secrets, stdin or file contents.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Version exchange; optional. `version` is the client's.
    Hello {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    Ping,
    /// Merge `env` into the env file: keys not named are kept, an empty
    /// value deletes its key.
    SetEnv {
        env: BTreeMap<String, String>,
    },
    /// Write `<secrets>/<name>` (0600) with the decoded value.
    SetSecret {
        name: String,
        value_b64: Sensitive,
    },
    Exec(ExecRequest),
    WriteFile(WriteFileRequest),
    ReadFile(ReadFileRequest),
    /// Start the cell's main command (once): after `set_env` and
    /// `set_secret`, so it starts with both in place. Its output goes to
    /// the agent's console.
    Start(StartRequest),
    /// Give the guest's interface its address, default route and
    /// resolvers (a microVM on a cellhost bridge). Only a PID 1 agent, or
    /// one started with `--configure-net`, accepts it.
    ConfigureNet(NetRequest),
    /// The agent's own state and the main command's.
    Status,
    /// Answer, then stop: a PID 1 agent powers the machine off, any other
    /// agent exits.
    Shutdown,
}

impl Op {
    /// The op's wire name.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello { .. } => "hello",
            Op::Ping => "ping",
            Op::SetEnv { .. } => "set_env",
            Op::SetSecret { .. } => "set_secret",
            Op::Exec(_) => "exec",
            Op::WriteFile(_) => "write_file",
            Op::ReadFile(_) => "read_file",
            Op::Start(_) => "start",
            Op::ConfigureNet(_) => "configure_net",
            Op::Status => "status",
            Op::Shutdown => "shutdown",
        }
    }
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::SetEnv { env } => f
                .debug_struct("SetEnv")
                .field("keys", &env.keys().collect::<Vec<_>>())
                .finish(),
            Op::SetSecret { name, value_b64 } => f
                .debug_struct("SetSecret")
                .field("name", name)
                .field("value_b64", value_b64)
                .finish(),
            Op::Exec(r) => r.fmt(f),
            Op::WriteFile(r) => f
                .debug_struct("WriteFile")
                .field("path", &r.path)
                .field("content_b64_len", &r.content_b64.len())
                .finish(),
            Op::ReadFile(r) => f.debug_struct("ReadFile").field("path", &r.path).finish(),
            other => f.write_str(other.name()),
        }
    }
}

/// `start`: the main command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// `configure_net`: IPv4 only (cells have no IPv6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRequest {
    /// The interface; default `eth0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// `a.b.c.d/prefix`.
    pub address: String,
    /// The default route's gateway, on the address's subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Resolvers for /etc/resolv.conf (at most 3); none writes a
    /// resolv.conf that names none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

/// Every op name, as `hello` lists them.
pub const OPS: &[&str] = &[
    "hello",
    "ping",
    "set_env",
    "set_secret",
    "exec",
    "write_file",
    "read_file",
    "start",
    "configure_net",
    "status",
    "shutdown",
];

#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in the exec's PATH
    /// when it has no slash.
    pub argv: Vec<String>,
    /// Added to (and overriding) the env file's variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory; `/` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    /// Kill the exec's process group after this long; default
    /// [`DEFAULT_EXEC_TIMEOUT_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Bytes of each stream to keep, at most [`MAX_EXEC_OUTPUT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output: Option<usize>,
}

impl std::fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec")
            .field("argv", &self.argv)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .field("stdin_b64_len", &self.stdin_b64.as_ref().map(String::len))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileRequest {
    pub path: String,
    pub content_b64: String,
    /// Octal permission bits as a string (`"0644"`); default `0644`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Create missing parent directories (0700).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parents: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileRequest {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Bytes to read, at most [`MAX_FILE_CHUNK`] (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// Stable error codes: clients branch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line was longer than [`MAX_REQUEST_LINE`].
    LineTooLong,
    /// Not UTF-8, not JSON, or not an object.
    BadJson,
    /// `id` is not a string, a number or null.
    BadId,
    /// `op` missing or not one of [`OPS`].
    UnknownOp,
    /// A field is missing, of the wrong type, unknown, or fails a rule.
    InvalidRequest,
    UnsupportedVersion,
    /// The path is outside every allowed root, or crosses a symlink.
    PathNotAllowed,
    NotFound,
    /// The operator started the agent with this op turned off.
    Disabled,
    /// The program could not be started.
    SpawnFailed,
    /// Too many connections or execs at once.
    Busy,
    /// The host side of an I/O operation failed.
    Io,
    /// A code this build does not know (from a newer agent).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadId => "bad_id",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::PathNotAllowed => "path_not_allowed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Disabled => "disabled",
            ErrorCode::SpawnFailed => "spawn_failed",
            ErrorCode::Busy => "busy",
            ErrorCode::Io => "io",
            ErrorCode::Unknown => "unknown",
        }
    }
}

/// An agent-side failure: a code and a one-line message naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::new(ErrorCode::InvalidRequest, message)
    }
}

/// One response line. Result fields sit beside `id` and `ok`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: Value,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Response {
    pub fn success(id: Value, fields: Map<String, Value>) -> Self {
        Response {
            id,
            ok: true,
            error: None,
            code: None,
            fields,
        }
    }
    pub fn failure(id: Value, f: Failure) -> Self {
        Response {
            id,
            ok: false,
            error: Some(f.message),
            code: Some(f.code),
            fields: Map::new(),
        }
    }
    /// The response as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // A Response holds only strings, numbers, bools and maps with
        // string keys: serialization cannot fail.
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        v.push(b'\n');
        v
    }
}

/// A decoded request line.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Value,
    pub op: Op,
}

impl Request {
    /// The request as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut obj = match serde_json::to_value(&self.op) {
            Ok(Value::Object(m)) => m,
            // Op is an internally tagged enum of structs: always an object.
            _ => Map::new(),
        };
        obj.insert("id".into(), self.id.clone());
        let mut v = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

/// Decode one request line (newline stripped). On failure the error comes
/// with whatever id could be recovered (null when none), so the answer can
/// still be matched.
pub fn parse_request(line: &[u8]) -> Result<Request, (Value, Failure)> {
    let text = std::str::from_utf8(line).map_err(|e| {
        (
            Value::Null,
            Failure::new(ErrorCode::BadJson, format!("request is not UTF-8: {e}")),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        (
            Value::Null,
            Failure::new(ErrorCode::BadJson, format!("request is not JSON: {e}")),
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err((
            Value::Null,
            Failure::new(ErrorCode::BadJson, "request is not a JSON object"),
        ));
    };
    let id = obj.remove("id").unwrap_or(Value::Null);
    match &id {
        Value::Null | Value::String(_) | Value::Number(_) => {}
        _ => {
            return Err((
                Value::Null,
                Failure::new(ErrorCode::BadId, "id: must be a string, a number or null"),
            ));
        }
    }
    match obj.get("op") {
        Some(Value::String(op)) if OPS.contains(&op.as_str()) => {
            // serde ignores extra fields on unit variants even under
            // deny_unknown_fields; refuse them here like every other op.
            if matches!(op.as_str(), "ping" | "status" | "shutdown")
                && let Some(k) = obj.keys().find(|k| *k != "op")
            {
                let shown: String = k.chars().take(64).collect();
                return Err((
                    id,
                    Failure::invalid(format!("{shown}: unknown field for op {op}")),
                ));
            }
        }
        Some(Value::String(op)) => {
            let shown: String = op.chars().take(64).collect();
            return Err((
                id,
                Failure::new(
                    ErrorCode::UnknownOp,
                    format!("op: unknown op {shown:?}; known: {}", OPS.join(", ")),
                ),
            ));
        }
        Some(_) => {
            return Err((
                id,
                Failure::new(ErrorCode::UnknownOp, "op: must be a string"),
            ));
        }
        None => return Err((id, Failure::new(ErrorCode::UnknownOp, "op: missing"))),
    }
    match serde_json::from_value::<Op>(Value::Object(obj)) {
        Ok(op) => Ok(Request { id, op }),
        Err(e) => Err((id, Failure::invalid(format!("bad request: {e}")))),
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: a POSIX portable environment variable name.
pub fn check_env_name(name: &str) -> Result<(), Failure> {
    let mut chars = name.chars();
    let ok = match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {
            chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Failure::invalid(format!(
            "env.{}: not a POSIX variable name ([A-Za-z_][A-Za-z0-9_]*)",
            shown(name)
        )))
    }
}

/// An env value for the env file: no newline (it would start a new
/// entry) and no NUL (execve cannot carry it).
pub fn check_env_value(name: &str, value: &str) -> Result<(), Failure> {
    if value.contains(['\n', '\r', '\0']) {
        return Err(Failure::invalid(format!(
            "env.{}: value contains a newline, carriage return or NUL",
            shown(name)
        )));
    }
    Ok(())
}

/// `[A-Za-z0-9_-]+`, at most [`MAX_SECRET_NAME`] bytes: a plain file
/// name that cannot be `.`, `..` or contain a slash.
pub fn check_secret_name(name: &str) -> Result<(), Failure> {
    if name.is_empty()
        || name.len() > MAX_SECRET_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Failure::invalid(format!(
            "name: {:?} is not a secret name ([A-Za-z0-9_-]{{1,{MAX_SECRET_NAME}}})",
            shown(name)
        )));
    }
    Ok(())
}

/// A name or value as quoted in an error: at most 64 characters.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// `hello`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub version: u32,
    pub agent: String,
    pub ops: Vec<String>,
    pub max_line: usize,
}

/// Bytes as standard base64 strings on the wire (reply fields).
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        B64.decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// `exec`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecReply {
    /// The exit code, when the process exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the process, when one did.
    pub signal: Option<i32>,
    /// On the wire as `stdout_b64` / `stderr_b64`.
    #[serde(rename = "stdout_b64", with = "b64")]
    pub stdout: Vec<u8>,
    #[serde(rename = "stderr_b64", with = "b64")]
    pub stderr: Vec<u8>,
    /// Bytes produced beyond `max_output` and dropped.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    /// The timeout fired and the process group was killed.
    pub timed_out: bool,
    pub duration_ms: u64,
}

/// `read_file`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFileReply {
    /// On the wire as `content_b64`.
    #[serde(rename = "content_b64", with = "b64")]
    pub content: Vec<u8>,
    /// The file's size when read.
    pub size: u64,
    pub offset: u64,
    /// This chunk reaches the end of the file.
    pub eof: bool,
}

/// `write_file`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileReply {
    pub size: u64,
}

/// The main command's state in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum MainState {
    NotStarted,
    Running {
        pid: i32,
    },
    Exited {
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
    SpawnFailed {
        error: String,
    },
}

/// `status`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub version: u32,
    pub agent: String,
    pub pid1: bool,
    pub uptime_ms: u64,
    pub main: MainState,
}

/// The agent's name and version, as `hello` and `status` report it.
pub fn agent_name() -> String {
    format!("cellhost-agent/{}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        for ok in ["A", "_", "a_1", "PATH", "_X9"] {
            assert!(check_env_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A B", "A=B", "Ä", "a.b"] {
            let e = check_env_name(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            assert!(e.message.starts_with("env."), "{}", e.message);
        }
        assert!(check_env_value("A", "x y=z\t").is_ok());
        for bad in ["a\nb", "a\0", "\r"] {
            assert!(check_env_value("A", bad).is_err());
        }
    }

    #[test]
    fn secret_names() {
        for ok in ["db", "api-key", "A_1", &"x".repeat(255)] {
            assert!(check_secret_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a.b", "a b", &"x".repeat(256), "é"] {
            assert!(check_secret_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_keeps_id_on_errors() {
        let (id, f) = parse_request(br#"{"op":"nope","id":7}"#).unwrap_err();
        assert_eq!(id, Value::from(7));
        assert_eq!(f.code, ErrorCode::UnknownOp);
        let (id, f) = parse_request(br#"{"op":"set_env","id":"a"}"#).unwrap_err();
        assert_eq!(id, Value::from("a"));
        assert_eq!(f.code, ErrorCode::InvalidRequest);
        assert!(f.message.contains("env"), "{}", f.message);
        let (_, f) = parse_request(br#"{"op":"ping","id":[1]}"#).unwrap_err();
        assert_eq!(f.code, ErrorCode::BadId);
        let (_, f) = parse_request(br#"{"op":"ping","id":1,"extra":true}"#).unwrap_err();
        assert_eq!(f.code, ErrorCode::InvalidRequest);
        assert!(f.message.contains("extra"), "{}", f.message);
        let (_, f) = parse_request(b"[1]").unwrap_err();
        assert_eq!(f.code, ErrorCode::BadJson);
        let (_, f) = parse_request(b"\xff").unwrap_err();
        assert_eq!(f.code, ErrorCode::BadJson);
    }

    #[test]
    fn microvm_runtime_requests_parse() {
        let r = parse_request(br#"{"op":"set_env","id":"1","env":{"A":"b"}}"#).unwrap();
        assert_eq!(
            r.op,
            Op::SetEnv {
                env: [("A".to_string(), "b".to_string())].into()
            }
        );
        let r =
            parse_request(br#"{"op":"set_secret","id":2,"name":"k","value_b64":"eA=="}"#).unwrap();
        assert_eq!(r.op.name(), "set_secret");
        let r = parse_request(br#"{"op":"ping"}"#).unwrap();
        assert_eq!((r.id, r.op), (Value::Null, Op::Ping));
    }

    #[test]
    fn requests_round_trip() {
        let req = Request {
            id: Value::from(3),
            op: Op::Exec(ExecRequest {
                argv: vec!["/bin/echo".into(), "hi".into()],
                timeout_ms: Some(5),
                ..Default::default()
            }),
        };
        let line = req.to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(parse_request(&line[..line.len() - 1]).unwrap(), req);
    }

    #[test]
    fn debug_hides_values() {
        let op = Op::SetEnv {
            env: [("TOKEN".to_string(), "hunter2".to_string())].into(),
        };
        let secret = Op::SetSecret {
            name: "k".into(),
            value_b64: Sensitive("aHVudGVyMg==".into()),
        };
        let exec = Op::Exec(ExecRequest {
            argv: vec!["x".into()],
            env: [("T".to_string(), "hunter2".to_string())].into(),
            stdin_b64: Some("aHVudGVyMg==".into()),
            ..Default::default()
        });
        for o in [op, secret, exec] {
            let d = format!("{o:?}");
            assert!(!d.contains("hunter2") && !d.contains("aHVudGVyMg"), "{d}");
        }
        let code: ErrorCode = serde_json::from_str("\"quota_exceeded\"").unwrap();
        assert_eq!(code, ErrorCode::Unknown);
    }

    #[test]
    fn response_shape() {
        let r = Response::failure(Value::from("x"), Failure::invalid("bad"));
        let v: Value = serde_json::from_slice(&r.to_line()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"x","ok":false,"error":"bad","code":"invalid_request"})
        );
        let mut m = Map::new();
        m.insert("pong".into(), Value::Bool(true));
        let v: Value =
            serde_json::from_slice(&Response::success(Value::from(1), m).to_line()).unwrap();
        assert_eq!(v, serde_json::json!({"id":1,"ok":true,"pong":true}));
    }
}
