//! The `Backend` trait and the types that cross it.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use cellhost_spec::{Cell, Isolation};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::TeardownReport;
use crate::ids::CellId;

/// A secret's value, resolved on the host at create time. Zeroed on drop,
/// never serialized, never printed.
pub struct SecretValue {
    pub name: String,
    pub value: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SecretValue({}, <{} bytes redacted>)",
            self.name,
            self.value.len()
        )
    }
}

/// Everything a backend needs to make one cell.
#[derive(Debug)]
pub struct CreateRequest {
    pub id: CellId,
    /// A document that already passed `cellhost_spec::validate`.
    pub cell: Cell,
    /// Values for every `spec.secrets` entry, in document order.
    pub secrets: Vec<SecretValue>,
    /// Who the cell belongs to (the supervisor's owner), for tiers that
    /// label host objects with it; `None` outside the daemon.
    pub owner: Option<String>,
    /// The consumer's key for `spec.volume` with `encrypted: true`; held in
    /// memory only, zeroed when the request is dropped.
    pub volume_key: Option<crate::VolumeKey>,
    /// The host ids leased to this cell (tiers whose
    /// [`Backend::wants_uids`] is true get one from the supervisor).
    pub uids: Option<crate::UidRange>,
    /// The cell's network plan: the address leased to it in the pool
    /// [`Backend::address_pool`] named (bridged cells). Host ports are
    /// planned in the document itself: every `spec.ports[].host` is
    /// leased, none is 0.
    pub address: Option<Ipv4Addr>,
}

impl CreateRequest {
    /// A request with no secrets, no owner and no volume key (benchmarks,
    /// tests, documents that need none); set the fields to add them.
    pub fn new(id: CellId, cell: Cell) -> CreateRequest {
        CreateRequest {
            id,
            cell,
            secrets: Vec::new(),
            owner: None,
            volume_key: None,
            uids: None,
            address: None,
        }
    }
}

/// What destroy, status and reconcile need to find a cell's host objects
/// again, possibly in another process after a crash. Stored by the
/// supervisor; never holds secrets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellHandle {
    pub id: CellId,
    pub name: String,
    pub isolation: Isolation,
    /// The cell's private directory on the host (logs, bundle, state).
    pub state_dir: PathBuf,
    /// Tier-specific details (cgroup paths, container ids, pid files).
    #[serde(default)]
    pub tier: serde_json::Value,
    /// The host ids leased to the cell, when its tier uses them: teardown
    /// checks that no process runs as any of them before the lease goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uids: Option<crate::UidRange>,
    /// The address leased to the cell on its tier's bridge, if any: the
    /// network's teardown forgets its flows before the lease goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
}

/// Where a tier attaches a cell to the network: a bridge's address pool.
/// The supervisor leases the cell one address of `first..=last` in the
/// store (one allocator for every tier) and hands it over in the
/// [`CreateRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPool {
    /// The pool's name (the bridge's).
    pub pool: String,
    /// The tier taking the lease.
    pub owner: String,
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

/// How a workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when it was killed by a signal.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it (cgroup memory limit reached).
    #[serde(default)]
    pub oom_killed: bool,
}

impl ExitInfo {
    pub fn exited(code: i32) -> Self {
        ExitInfo {
            code: Some(code),
            signal: None,
            oom_killed: false,
        }
    }

    pub fn signaled(signal: i32) -> Self {
        ExitInfo {
            code: None,
            signal: Some(signal),
            oom_killed: false,
        }
    }

    /// It ended, but how was not observed.
    pub fn unknown() -> Self {
        ExitInfo {
            code: None,
            signal: None,
            oom_killed: false,
        }
    }

    /// The shell convention: the exit code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 1,
        }
    }

    /// `exited 0`, `killed by SIGKILL (OOM: memory limit reached)`.
    pub fn describe(&self) -> String {
        let base = match (self.code, self.signal) {
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(s)) => format!("killed by {}", signal_name(s)),
            (None, None) => "ended (status unknown)".to_string(),
        };
        if self.oom_killed {
            format!("{base} (OOM-killed: memory limit reached)")
        } else {
            base
        }
    }
}

/// `SIGKILL` for 9, `signal 42` for anything unnamed.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellState {
    /// Host objects exist; the workload has not been started.
    Created,
    Running,
    /// The workload ended; its objects (log, exit status) remain.
    Exited,
    /// No host objects of this cell exist.
    Gone,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellStatus {
    pub state: CellState,
    /// Host pid of the workload's first process, while it lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitInfo>,
}

/// A slice of a cell's log from a byte offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogChunk {
    pub data: Vec<u8>,
    /// Offset to pass next time to continue after `data`.
    pub next_offset: u64,
    /// More of the log is already there past `next_offset` (the chunk was
    /// cut at a page size): ask again at once rather than waiting.
    pub more: bool,
}

impl LogChunk {
    /// Up to `page` bytes of the log file at `path` from `offset`; `None`
    /// when there is no such file. `more` when the page was filled.
    pub fn read_file(
        path: &std::path::Path,
        offset: u64,
        page: u64,
    ) -> std::io::Result<Option<LogChunk>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(offset))?;
        let mut data = Vec::new();
        f.take(page).read_to_end(&mut data)?;
        Ok(Some(LogChunk {
            more: data.len() as u64 == page,
            next_offset: offset + data.len() as u64,
            data,
        }))
    }
}

#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit: ExitInfo,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A sample of what a cell is using now, for metering. Counters are
/// cumulative since the cell was created; gauges are instantaneous.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceUsage {
    /// CPU time consumed by every process of the cell, nanoseconds
    /// (counter).
    pub cpu_ns: u64,
    /// Memory charged to the cell now, bytes (gauge).
    pub memory_bytes: u64,
}

/// A cell's host objects found by naming convention, with or without a
/// record in the store (reconcile uses this to find orphans).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedCell {
    pub id: CellId,
    pub isolation: Isolation,
    pub state: CellState,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The host lacks something this cell needs. `cellhost doctor` explains.
    #[error("host lacks {capability}: {detail}")]
    MissingCapability { capability: String, detail: String },
    #[error("{op} is not supported by the {tier} tier")]
    Unsupported { op: &'static str, tier: Isolation },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Nothing in the cell accepts connections on this port.
    #[error("nothing in the cell accepts connections on port {0}")]
    PortClosed(u16),
    #[error("cell {0} not found")]
    NotFound(CellId),
    #[error("cell {id} is {state:?}; {op} needs it {wanted}")]
    WrongState {
        id: CellId,
        op: &'static str,
        state: CellState,
        wanted: &'static str,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The engine (libcontainer, dockerd, qemu...) failed: what was being
    /// done, and the engine's own error when there is one (shown after the
    /// context, and kept as the `source` for callers that walk the chain).
    #[error("{}", with_cause(.context, .source.as_deref()))]
    Engine {
        context: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
}

/// `context: source`, or the context alone.
fn with_cause(context: &str, source: Option<&(dyn std::error::Error + Send + Sync)>) -> String {
    match source {
        Some(s) => format!("{context}: {s}"),
        None => context.to_string(),
    }
}

impl BackendError {
    /// An engine failure described by `context` alone.
    pub fn engine(context: impl Into<String>) -> Self {
        BackendError::Engine {
            context: context.into(),
            source: None,
        }
    }

    /// An engine failure while doing `context`, caused by `source`.
    pub fn engine_from(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BackendError::Engine {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BackendError::Io {
            context: context.into(),
            source,
        }
    }
}

/// One isolation tier. Implementations are cheap to share (`Arc<dyn
/// Backend>`); every method may be called concurrently for different cells.
#[async_trait]
pub trait Backend: Send + Sync {
    fn isolation(&self) -> Isolation;

    /// The handle `create` will return for this id, computed without side
    /// effects so the store can record it before anything is made.
    fn handle_for(&self, id: &CellId, cell: &Cell) -> CellHandle;

    /// The handle of host objects found by naming that have no stored
    /// handle (an orphan of a crash): from the id alone, enough for
    /// `status` and `destroy` to find and remove every object.
    fn found_handle(&self, id: &CellId) -> CellHandle;

    /// Does this tier run cells under host ids leased per cell (a user
    /// namespace, an unprivileged VMM)? The supervisor then leases a
    /// [`crate::UidRange`] before create, puts it in the handle and the
    /// request, and gives it back only after a clean teardown.
    fn wants_uids(&self) -> bool {
        false
    }

    /// The pool `cell` takes its address from, when this tier plumbs it
    /// into a bridge of cellhost's (bridged process and VM cells). The
    /// supervisor then leases an address before create, puts it in the
    /// handle and the request, and gives it back only after a clean
    /// teardown. `None`: the tier needs none (or its engine assigns one).
    fn address_pool(&self, _cell: &Cell) -> Option<AddressPool> {
        None
    }

    /// Make every host object of the cell, workload ready but not running.
    /// On error, everything made so far has been removed again.
    async fn create(&self, req: CreateRequest) -> Result<CellHandle, BackendError>;

    /// Let the created workload run.
    async fn start(&self, handle: &CellHandle) -> Result<(), BackendError>;

    /// End the workload (SIGTERM, then SIGKILL after `grace`); objects stay.
    async fn stop(&self, handle: &CellHandle, grace: Duration) -> Result<(), BackendError>;

    /// Remove every host object of the cell and verify none is left.
    /// Idempotent: destroying a destroyed cell is a clean report.
    async fn destroy(&self, handle: &CellHandle) -> Result<TeardownReport, BackendError>;

    async fn status(&self, handle: &CellHandle) -> Result<CellStatus, BackendError>;

    /// Every cell of this tier that has host objects, found by naming.
    async fn list(&self) -> Result<Vec<ListedCell>, BackendError>;

    /// The cell's combined stdout+stderr log from `offset`.
    async fn logs(&self, handle: &CellHandle, offset: u64) -> Result<LogChunk, BackendError>;

    /// Live facts about the cell's host objects for `inspect`, merged into
    /// the handle's tier details (e.g. a bridged cell's packet counters
    /// under `network.counters`). Never secrets. `None` when there are none.
    async fn live_details(
        &self,
        handle: &CellHandle,
    ) -> Result<Option<serde_json::Value>, BackendError> {
        let _ = handle;
        Ok(None)
    }

    /// What the cell uses now (cgroup, engine or VM stats). Tiers that
    /// cannot measure say so.
    async fn usage(&self, handle: &CellHandle) -> Result<ResourceUsage, BackendError> {
        let _ = handle;
        Err(BackendError::Unsupported {
            op: "usage",
            tier: self.isolation(),
        })
    }

    /// The workload ended on its own (the supervisor saw it exit): let go
    /// of what only a running workload needs — close its encrypted volume,
    /// so data at rest is ciphertext until a start with the key. Tiers that
    /// restart workloads themselves keep it. Idempotent.
    async fn release(&self, handle: &CellHandle) -> Result<(), BackendError> {
        let _ = handle;
        Ok(())
    }

    /// Open a stopped cell's encrypted volume again with its key, so the
    /// cell can start. Tiers whose cells cannot restart say so.
    async fn open_volume(
        &self,
        handle: &CellHandle,
        key: &crate::VolumeKey,
    ) -> Result<(), BackendError> {
        let _ = (handle, key);
        Err(BackendError::Unsupported {
            op: "open_volume",
            tier: self.isolation(),
        })
    }

    /// Run a command inside a running cell. Tiers that cannot say so.
    async fn exec(
        &self,
        handle: &CellHandle,
        req: ExecRequest,
    ) -> Result<ExecOutput, BackendError> {
        let _ = (handle, req);
        Err(BackendError::Unsupported {
            op: "exec",
            tier: self.isolation(),
        })
    }

    /// A TCP connection to `port` on the running cell's own network (its
    /// loopback included), made from inside the cell: no host port is
    /// published and the host's own services are out of reach.
    /// [`BackendError::PortClosed`] when nothing listens there. Tiers
    /// that cannot say so.
    async fn connect(
        &self,
        handle: &CellHandle,
        port: u16,
    ) -> Result<std::net::TcpStream, BackendError> {
        let _ = (handle, port);
        Err(BackendError::Unsupported {
            op: "connect",
            tier: self.isolation(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_codes() {
        assert_eq!(ExitInfo::exited(3).shell_code(), 3);
        assert_eq!(ExitInfo::signaled(9).shell_code(), 137);
        let mut oom = ExitInfo::signaled(9);
        oom.oom_killed = true;
        assert_eq!(
            oom.describe(),
            "killed by SIGKILL (OOM-killed: memory limit reached)"
        );
    }

    #[test]
    fn engine_errors_keep_their_cause() {
        use std::error::Error as _;
        let io = std::io::Error::other("disk on fire");
        let e = BackendError::engine_from("writing the overlay", io);
        assert_eq!(e.to_string(), "writing the overlay: disk on fire");
        let cause = e.source().expect("the cause is kept");
        assert_eq!(cause.to_string(), "disk on fire");
        assert!(cause.downcast_ref::<std::io::Error>().is_some());
        let e = BackendError::engine("the shim reported no pid");
        assert_eq!(e.to_string(), "the shim reported no pid");
        assert!(e.source().is_none());
    }

    #[test]
    fn secret_debug_redacts() {
        let s = SecretValue {
            name: "tok".into(),
            value: Zeroizing::new(b"hunter2".to_vec()),
        };
        let d = format!("{s:?}");
        assert!(!d.contains("hunter2"));
        assert!(d.contains("7 bytes"));
    }
}
