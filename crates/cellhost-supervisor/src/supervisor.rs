//! The supervisor: owns the store and every cell's life.
//!
//! # Layout on the host
//!
//! Nothing of its own beyond the store (`<state>/cellhost.db`, see
//! `cellhost-store`) and the lock file `<state>/serve.lock` taken by the
//! binary. Host objects belong to the backends, each named `cellhost-<id>`.
//!
//! # Lifecycle of a cell (each step is one store commit)
//!
//! ```text
//! create   admission (in memory, atomic with the reservation)
//!          → row: desired=running observed=creating + handle + `creating` event
//!          → backend.create, backend.start
//!          → observed=running + `created` event
//!          (failure → desired=destroyed → backend.destroy → row removed with
//!           `create_failed` + `destroyed` events, or kept as `failed`)
//! stop     desired=stopped → backend.stop → observed=exited + exit + `stopped`
//! extend   expires_at += seconds + `extended`
//! destroy  desired=destroyed observed=destroying + `destroying`
//!          → final metering sample → backend.destroy → TeardownReport
//!          → clean: row removed + `destroyed` (report as data), one commit
//!            dirty: observed=failed + `teardown_failed`; reconcile retries
//! ```
//!
//! Desired state is written before a side effect, observed state after it,
//! so a crash anywhere leaves a row that says what was being attempted.
//!
//! # Reconcile (at start, then every few seconds)
//!
//! For each row not held by a running operation of this process:
//! `desired=destroyed` or `observed=destroying|failed` → finish the destroy;
//! `observed=creating` → the create was interrupted: secrets are never
//! stored, so it cannot be finished; roll it back (`create_rolled_back`);
//! lease ended → reap; otherwise ask the backend: running while
//! `desired=stopped` → finish the interrupted stop; running → adopt
//! (`adopted` once per process start), exited → record the exit, gone → the
//! host object vanished: remove the row (`lost`). Then every host object a
//! backend lists by naming that has no row is an orphan: destroyed, and
//! recorded as `cellhost.orphan.destroyed`. A teardown that leaves
//! residue keeps its row (`failed`) and counts as an error; the next pass
//! retries it. `tests/reconcile.rs` drives every combination. Objects are listed *before* rows
//! are read, and a create writes its row before making objects, so an
//! in-flight create is never taken for an orphan.
//!
//! # Idempotency and concurrency
//!
//! One operation per cell at a time: a per-cell busy set; a second request
//! on a busy cell is a conflict (409), the reaper and reconcile skip busy
//! cells and come back on their next tick. Destroy is idempotent (backends
//! treat "already gone" as success). Admission checks and reserves under
//! one lock, so concurrent creates cannot oversubscribe.
//!
//! # Threat model
//!
//! Callers are the operator (unix socket) or tenants (bearer tokens). A
//! tenant sees and touches only cells it owns; any other id is `NotFound`,
//! indistinguishable from a missing one. Secret values arrive in the
//! request, go to the backend, and are dropped (zeroized); the stored
//! document is redacted first. Documents over the API may carry only inline
//! `value` secrets: `file` and `env` would read the *daemon's* files and
//! environment on a tenant's behalf (the CLI inlines them client-side).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cellhost_core::ids::CellId;
use cellhost_core::{
    Backend, CellHandle, CellState, CreateRequest, ExecOutput, ExecRequest, ExitInfo, LogChunk,
    SecretValue, TeardownReport, VolumeKey,
};

/// What comes with a create request and must never be stored or logged:
/// secret values and the encrypted volume's key. Zeroed on drop.
#[derive(Debug, Default)]
pub struct Confidential {
    /// A value for every `spec.secrets` entry, in order.
    pub secrets: Vec<SecretValue>,
    /// The key of `spec.volume` when it is encrypted.
    pub volume_key: Option<VolumeKey>,
}
use cellhost_spec::{Cell, Isolation};
use cellhost_store::{
    CellRecord, CellUpdate, Desired, NewCell, Observed, Store, StoreError, UsageInterval,
    UsageTotals, now_ms,
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use cellhost_core::UidRange;
use cellhost_policy::{HostFacts, Net, Policy};

use crate::error::SupervisorError;
use crate::events::{CloudEvent, kinds, rfc3339_ms};
use crate::node::{
    AdmissionPolicy, Capacity, CellCounts, CpuStatus, HostInfo, NodeStatus, Reservation,
};
use crate::uid_claims::UidClaims;

type Result<T, E = SupervisorError> = std::result::Result<T, E>;

/// How long a request waits for a busy cell before answering 409.
pub const LOCK_WAIT: Duration = Duration::from_secs(15);

/// The longest single extension of a lease (one year).
pub const MAX_EXTEND_SECONDS: u64 = 366 * 24 * 3600;

/// Settings of one supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Shown in `/v1/node` and as the CloudEvents `source`.
    pub node_name: String,
    /// Where the store lives (for the disk figures of `/v1/node`).
    pub state_dir: PathBuf,
    /// Overcommit and the host's reserve: how much cells may reserve.
    pub admission: AdmissionPolicy,
    /// What a tenant may ask for (see cellhost-policy): applied to every
    /// document before anything is recorded or made.
    pub policy: Arc<Policy>,
    /// The bridge's subnet, when bridged cells exist here (the policy
    /// denies it to cells' egress rules).
    pub bridge_subnet: Option<Net>,
    /// Host-wide uid claims (see `uid_claims`).
    pub uid_claims_dir: PathBuf,
    /// How often reconcile runs after the first pass.
    pub reconcile_interval: Duration,
    /// How often the reaper looks for ended leases. Leases are reaped
    /// within this plus one destroy of `expires_at`.
    pub reap_interval: Duration,
    /// Length of a metering interval.
    pub meter_interval: Duration,
    /// SIGTERM→SIGKILL grace of `stop` when the caller gives none.
    pub stop_grace: Duration,
}

impl SupervisorConfig {
    pub fn new(node_name: impl Into<String>, state_dir: PathBuf) -> SupervisorConfig {
        SupervisorConfig {
            node_name: node_name.into(),
            state_dir,
            admission: AdmissionPolicy::default(),
            policy: Arc::new(Policy::default()),
            bridge_subnet: None,
            uid_claims_dir: PathBuf::from(crate::uid_claims::CLAIMS_DIR),
            reconcile_interval: Duration::from_secs(3),
            reap_interval: Duration::from_millis(200),
            meter_interval: Duration::from_secs(5),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub owner: String,
    /// The operator sees and manages every cell.
    pub operator: bool,
}

/// Move every secret's value out of a document that came from a remote
/// caller (the API, the market): such documents may carry only inline
/// values, since `file` and `env` would read the daemon's own files and
/// environment. The document keeps the entries (names, emptied values).
pub fn take_inline_secrets(cell: &mut Cell) -> Result<Vec<SecretValue>> {
    let mut out = Vec::with_capacity(cell.spec.secrets.len());
    for (i, s) in cell.spec.secrets.iter_mut().enumerate() {
        match &mut s.from {
            cellhost_spec::SecretSource::Value(v) => out.push(SecretValue {
                name: s.name.clone(),
                value: zeroize::Zeroizing::new(std::mem::take(v).into_bytes()),
            }),
            _ => {
                return Err(SupervisorError::invalid(
                    format!("spec.secrets.{i}.from"),
                    "only inline `value` secrets are accepted from a remote caller \
                     (`cellhost create` reads `file` and `env` secrets on the client)",
                ));
            }
        }
    }
    Ok(out)
}

/// The owner name of the operator.
pub const OPERATOR: &str = "operator";

impl Caller {
    pub fn operator() -> Caller {
        Caller {
            owner: OPERATOR.to_string(),
            operator: true,
        }
    }

    pub fn tenant(owner: impl Into<String>) -> Caller {
        let owner = owner.into();
        Caller {
            operator: owner == OPERATOR,
            owner,
        }
    }

    fn may_see(&self, owner: Option<&str>) -> bool {
        self.operator || owner == Some(self.owner.as_str())
    }
}

/// A cell as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CellView {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub isolation: String,
    /// What the supervisor is driving it to: running | stopped | destroyed.
    pub desired: String,
    /// What was last observed: creating | created | running | exited |
    /// destroying | gone | failed.
    pub observed: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339: end of the lease.
    pub expires_at: String,
    /// Seconds left on the lease (0 when ended).
    pub expires_in_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub exit: Option<ExitInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The document, with inline secret values redacted.
    #[schema(value_type = Object)]
    pub document: Cell,
    /// Metered totals (inspect only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageView>,
    /// What the tier says about its host objects: e.g. the accelerator
    /// (kvm | tcg) and the image's sha256 digests of a vm or microvm cell,
    /// the container's name. Never secrets.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub tier_details: Option<serde_json::Value>,
}

/// Metered totals of one cell: what per-second billing reads.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageView {
    pub intervals: u64,
    pub cpu_seconds: f64,
    pub memory_byte_seconds: f64,
    pub wall_seconds: f64,
}

impl From<UsageTotals> for UsageView {
    fn from(t: UsageTotals) -> Self {
        UsageView {
            intervals: t.intervals,
            cpu_seconds: t.cpu_seconds,
            memory_byte_seconds: t.memory_byte_seconds,
            wall_seconds: t.wall_seconds,
        }
    }
}

impl CellView {
    fn from_record(r: &CellRecord, now: i64, usage: Option<UsageView>) -> CellView {
        CellView {
            id: r.id.to_string(),
            name: r.name.clone(),
            owner: r.owner.clone(),
            isolation: r.isolation.to_string(),
            desired: r.desired.as_str().to_string(),
            observed: r.observed.as_str().to_string(),
            created_at: rfc3339_ms(r.created_at),
            expires_at: rfc3339_ms(r.expires_at),
            expires_in_seconds: u64::try_from((r.expires_at - now).max(0) / 1000).unwrap_or(0),
            exit: r.exit,
            last_error: r.last_error.clone(),
            document: r.document.clone(),
            usage,
            tier_details: r
                .handle
                .as_ref()
                .map(|h| h.tier.clone())
                .filter(|t| !t.is_null()),
        }
    }
}

/// Merge `live` into `into`, one level deep: objects under the same key
/// are merged key by key, anything else is replaced.
fn merge_details(into: &mut serde_json::Value, live: serde_json::Value) {
    let (Some(into), serde_json::Value::Object(live)) = (into.as_object_mut(), live) else {
        return;
    };
    for (k, v) in live {
        match (into.get_mut(&k), v) {
            (Some(serde_json::Value::Object(old)), serde_json::Value::Object(new)) => {
                old.extend(new);
            }
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// What one reconcile pass did (also logged and exported as metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileSummary {
    pub adopted: u32,
    pub exited: u32,
    pub rolled_back: u32,
    pub destroys_finished: u32,
    /// Stops interrupted between their intent and their effect, finished.
    pub stops_finished: u32,
    pub reaped: u32,
    pub lost: u32,
    pub orphans: u32,
    pub errors: u32,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub creates: AtomicU64,
    pub create_failures: AtomicU64,
    pub admission_refusals: AtomicU64,
    pub destroys: AtomicU64,
    pub dirty_teardowns: AtomicU64,
    pub leases_reaped: AtomicU64,
    pub orphans_destroyed: AtomicU64,
    pub rolled_back: AtomicU64,
    pub reconcile_passes: AtomicU64,
    pub reconcile_errors: AtomicU64,
    /// Sum and count of create→running latency, microseconds.
    pub create_us_sum: AtomicU64,
}

/// One state change of a row and the event that announces it: the only
/// way the supervisor writes a row (one commit each). Owned, so it can
/// move into the store's blocking task.
struct Change {
    desired: Option<Desired>,
    observed: Option<Observed>,
    exit: Option<ExitInfo>,
    error: Option<String>,
    expires_at: Option<i64>,
    kind: &'static str,
    data: serde_json::Value,
}

impl Change {
    fn event(kind: &'static str, data: serde_json::Value) -> Change {
        Change {
            desired: None,
            observed: None,
            exit: None,
            error: None,
            expires_at: None,
            kind,
            data,
        }
    }
    fn desired(mut self, d: Desired) -> Self {
        self.desired = Some(d);
        self
    }
    fn observed(mut self, o: Observed) -> Self {
        self.observed = Some(o);
        self
    }
    fn exit(mut self, x: ExitInfo) -> Self {
        self.exit = Some(x);
        self
    }
    fn error(mut self, e: String) -> Self {
        self.error = Some(e);
        self
    }
    fn expires_at(mut self, at: i64) -> Self {
        self.expires_at = Some(at);
        self
    }
    fn update(&self) -> CellUpdate<'_> {
        CellUpdate {
            desired: self.desired,
            observed: self.observed,
            handle: None,
            exit: self.exit.as_ref(),
            error: self.error.as_deref().map(Some),
            expires_at: self.expires_at,
            event: Some((self.kind, &self.data)),
        }
    }
}

/// Per-cell mark for metering deltas.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at_ms: i64,
    cpu_ns: u64,
}

/// A held per-cell operation slot; released on drop.
pub struct CellLock {
    set: Arc<Mutex<HashSet<CellId>>>,
    id: CellId,
}

impl Drop for CellLock {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Supervisor {
    store: Arc<Store>,
    backends: HashMap<Isolation, Arc<dyn Backend>>,
    cfg: SupervisorConfig,
    capacity: Capacity,
    host: HostInfo,
    busy: Arc<Mutex<HashSet<CellId>>>,
    /// What each live cell holds against capacity, and whose it is.
    reservations: Mutex<HashMap<CellId, Held>>,
    claims: UidClaims,
    marks: Mutex<HashMap<CellId, Mark>>,
    adopted: Mutex<HashSet<CellId>>,
    events: watch::Sender<()>,
    /// Reconcile passes finished since start.
    reconciled: watch::Sender<u64>,
    pub counters: Counters,
    started: Instant,
}

/// Record a destroy's outcome in one store commit: a clean report removes
/// the row with a `destroyed` event; a dirty one keeps it as `failed`
/// with the summary and a `teardown_failed` event. Shared by the daemon
/// and `cellhost run`.
pub fn record_teardown(
    store: &Store,
    id: &CellId,
    report: &TeardownReport,
) -> Result<(), StoreError> {
    // A report is strings and counts: encoding cannot fail, but say so
    // in the event rather than panic if it ever does.
    let data = serde_json::to_value(report)
        .unwrap_or_else(|e| serde_json::json!({ "error": format!("encoding report: {e}") }));
    if report.is_clean() {
        store
            .remove_with_event(id, kinds::DESTROYED, &data)
            .map(drop)
    } else {
        store.apply(
            id,
            &CellUpdate::default()
                .observed(Observed::Failed)
                .error(&report.summary())
                .event(kinds::TEARDOWN_FAILED, &data),
        )
    }
}

/// One live cell's reservation and owner.
#[derive(Debug, Clone)]
struct Held {
    res: Reservation,
    owner: String,
}

impl Supervisor {
    /// A supervisor over `store` with the given backends (one per tier this
    /// host can run). Reservations of existing rows are loaded now.
    pub fn new(
        store: Arc<Store>,
        backends: Vec<Arc<dyn Backend>>,
        cfg: SupervisorConfig,
    ) -> Result<Arc<Supervisor>> {
        let host = HostInfo::new();
        let sample = host.sample();
        let disk = HostInfo::disk_for(&cfg.state_dir).map_or(0, |d| d.total_bytes);
        let capacity =
            Capacity::from_host(sample.cpus, sample.memory.total_bytes, disk, &cfg.admission);
        let mut reservations = HashMap::new();
        for rec in store.list_lenient()?.into_iter().flatten() {
            if rec.desired != Desired::Destroyed {
                reservations.insert(
                    rec.id.clone(),
                    Held {
                        res: Reservation::of(&rec.document.spec, &cfg.policy),
                        owner: rec.owner.clone(),
                    },
                );
            }
        }
        let claims = UidClaims::new(
            cfg.uid_claims_dir.clone(),
            cellhost_core::ids::instance_tag(store.path()),
            store.path(),
        );
        let (events, _) = watch::channel(());
        Ok(Arc::new(Supervisor {
            store,
            backends: backends.into_iter().map(|b| (b.isolation(), b)).collect(),
            cfg,
            capacity,
            host,
            busy: Arc::default(),
            reservations: Mutex::new(reservations),
            claims,
            marks: Mutex::default(),
            adopted: Mutex::default(),
            events,
            reconciled: watch::channel(0).0,
            counters: Counters::default(),
            started: Instant::now(),
        }))
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// The operator's policy.
    pub fn policy(&self) -> &Policy {
        &self.cfg.policy
    }

    /// What the policy needs of the host now: its IPv4 addresses (they
    /// change) and the bridge's subnet.
    pub fn host_facts(&self) -> HostFacts {
        let addresses = nix::ifaddrs::getifaddrs()
            .map(|ifs| {
                ifs.filter_map(|i| {
                    i.address
                        .as_ref()
                        .and_then(|a| a.as_sockaddr_in().map(|v4| v4.ip()))
                })
                .collect()
            })
            .unwrap_or_default();
        HostFacts {
            addresses,
            bridge: self.cfg.bridge_subnet,
            connected: cellhost_core::ifconfig::connected_networks()
                .into_iter()
                .map(|(a, p)| Net::new(a, p))
                .collect(),
        }
    }

    /// The policy's check of a document (tier offered here, images,
    /// resources, lease, ports, egress), writing its defaults in. The one
    /// place every entry's documents pass.
    pub fn admit_document(&self, cell: &mut Cell) -> Result<()> {
        if !self.backends.contains_key(&cell.spec.isolation) {
            return Err(SupervisorError::Unavailable(format!(
                "the {} tier is not available on this host (see `cellhost doctor`)",
                cell.spec.isolation
            )));
        }
        self.cfg
            .policy
            .admit(cell, &self.host_facts())
            .map_err(SupervisorError::Policy)
    }

    /// Would `cell` be admitted now for `caller`? The same checks `create`
    /// makes (policy, the tenant's cell cap, capacity), without reserving
    /// anything: a front that must refuse before it takes payment asks
    /// first (a create in between may still take the room; the create's
    /// own check is the one that holds). Returns the document as the
    /// policy completed it.
    pub fn admits(&self, caller: &Caller, cell: &Cell) -> Result<Cell> {
        let mut cell = cell.clone();
        self.admit_document(&mut cell)?;
        let held = lock(&self.reservations);
        self.tenant_room(caller, &held)?;
        let reserved: Reservation = held.values().map(|h| &h.res).sum();
        self.capacity
            .admit(reserved, Reservation::of(&cell.spec, &self.cfg.policy))
            .map_err(SupervisorError::Capacity)?;
        Ok(cell)
    }

    /// A tenant holds at most the policy's `tenants.maxCells`.
    fn tenant_room(&self, caller: &Caller, held: &HashMap<CellId, Held>) -> Result<()> {
        if caller.operator {
            return Ok(());
        }
        let max = self.cfg.policy.tenants.max_cells as usize;
        let mine = held.values().filter(|h| h.owner == caller.owner).count();
        if mine >= max {
            return Err(SupervisorError::TooMany {
                code: "too_many_cells",
                message: format!(
                    "this tenant holds {mine} cells, the most one tenant may (policy: tenants.maxCells)"
                ),
            });
        }
        Ok(())
    }

    /// The node's name (as `GET /v1/node` shows it).
    pub fn node_name(&self) -> &str {
        &self.cfg.node_name
    }

    /// Tiers this supervisor can run.
    pub fn tiers(&self) -> Vec<Isolation> {
        let mut t: Vec<Isolation> = self.backends.keys().copied().collect();
        t.sort_by_key(|i| i.as_str());
        t
    }

    /// Wakes whenever an event may have been appended.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.events.subscribe()
    }

    fn notify(&self) {
        self.events.send_replace(());
    }

    async fn db<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| SupervisorError::Internal(format!("store task: {e}")))?
            .map_err(SupervisorError::from)
    }

    fn backend(&self, isolation: Isolation) -> Result<&Arc<dyn Backend>> {
        self.backends.get(&isolation).ok_or_else(|| {
            SupervisorError::Unavailable(format!(
                "this node cannot run {isolation} cells (see `cellhost doctor`)"
            ))
        })
    }

    /// Take the cell's operation slot, or `None` if an operation holds it.
    pub fn try_lock(&self, id: &CellId) -> Option<CellLock> {
        lock(&self.busy).insert(id.clone()).then(|| CellLock {
            set: self.busy.clone(),
            id: id.clone(),
        })
    }

    /// Take the cell's slot for a request, waiting up to [`LOCK_WAIT`] for
    /// a background pass (reconcile, metering, reaper) or another request
    /// to finish with it.
    async fn lock_for_request(&self, id: &CellId) -> Result<CellLock> {
        let until = Instant::now() + LOCK_WAIT;
        loop {
            if let Some(l) = self.try_lock(id) {
                return Ok(l);
            }
            if Instant::now() >= until {
                return Err(SupervisorError::Conflict(format!(
                    "cell {id} is busy: another operation on it is in progress; retry"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The caller's view of a row: `NotFound` for absent and foreign alike.
    async fn visible(&self, caller: &Caller, id: &str) -> Result<CellRecord> {
        let id = CellId::parse(id).map_err(|_| SupervisorError::NotFound(id.to_string()))?;
        self.visible_id(caller, &id).await
    }

    async fn visible_id(&self, caller: &Caller, id: &CellId) -> Result<CellRecord> {
        let idc = id.clone();
        match self.db(move |s| s.get(&idc)).await? {
            Some(rec) if caller.may_see(Some(&rec.owner)) => Ok(rec),
            _ => Err(SupervisorError::NotFound(id.to_string())),
        }
    }

    /// Take the cell's slot, then read the row under it (so no other
    /// operation changes it until the caller is done).
    async fn visible_locked(&self, caller: &Caller, id: &str) -> Result<(CellRecord, CellLock)> {
        let id = CellId::parse(id).map_err(|_| SupervisorError::NotFound(id.to_string()))?;
        let slot = self.lock_for_request(&id).await?;
        Ok((self.visible_id(caller, &id).await?, slot))
    }

    fn handle_of(&self, rec: &CellRecord) -> Result<CellHandle> {
        match &rec.handle {
            Some(h) => Ok(h.clone()),
            None => Ok(self
                .backend(rec.isolation)?
                .handle_for(&rec.id, &rec.document)),
        }
    }

    // ---------------------------------------------------------------- create

    /// Admit, record, create and (unless `start` is false) start a cell.
    /// `cell` must be validated; `confidential` holds its secret values and
    /// volume key.
    pub async fn create(
        self: &Arc<Self>,
        caller: &Caller,
        cell: Cell,
        confidential: Confidential,
        start: bool,
    ) -> Result<CellView> {
        let mut cell = cell;
        self.admit_document(&mut cell)?;
        let backend = self.backend(cell.spec.isolation)?.clone();
        let want = Reservation::of(&cell.spec, &self.cfg.policy);
        let id = CellId::random();
        let guard = self.lock_for_request(&id).await?;
        {
            let mut res = lock(&self.reservations);
            self.tenant_room(caller, &res)?;
            let reserved: Reservation = res.values().map(|h| &h.res).sum();
            if let Err(why) = self.capacity.admit(reserved, want) {
                self.counters
                    .admission_refusals
                    .fetch_add(1, Ordering::Relaxed);
                return Err(SupervisorError::Capacity(why));
            }
            res.insert(
                id.clone(),
                Held {
                    res: want,
                    owner: caller.owner.clone(),
                },
            );
        }
        let t0 = Instant::now();
        let out = self
            .create_inner(caller, &id, cell, confidential, start, &backend)
            .await;
        drop(guard);
        match &out {
            Ok(_) => {
                self.counters.creates.fetch_add(1, Ordering::Relaxed);
                self.counters.create_us_sum.fetch_add(
                    u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
            Err(_) => {
                self.counters
                    .create_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        out
    }

    async fn create_inner(
        &self,
        caller: &Caller,
        id: &CellId,
        cell: Cell,
        confidential: Confidential,
        start: bool,
        backend: &Arc<dyn Backend>,
    ) -> Result<CellView> {
        let now = now_ms();
        let ttl_ms =
            i64::try_from(cell.spec.lifetime.ttl().saturating_mul(1000)).unwrap_or(i64::MAX);
        let redacted = cellhost_spec::redacted(&cell);
        let mut handle = backend.handle_for(id, &cell);
        if backend.wants_uids() {
            match self.lease_uids(id).await {
                Ok(r) => handle.uids = Some(r),
                Err(e) => {
                    self.forget(id);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.lease_ports(id, &cell).await {
            self.release_uids(id, handle.uids).await;
            self.forget(id);
            return Err(e);
        }
        {
            let (idc, owner, h) = (id.clone(), caller.owner.clone(), handle.clone());
            let data = json!({ "name": cell.metadata.name, "isolation": cell.spec.isolation });
            let inserted = self
                .db(move |s| {
                    s.insert_cell_with(
                        &NewCell {
                            id: &idc,
                            name: &redacted.metadata.name,
                            isolation: redacted.spec.isolation,
                            owner: &owner,
                            document: &redacted,
                            created_at: now,
                            expires_at: now.saturating_add(ttl_ms),
                        },
                        &CellUpdate::default()
                            .handle(&h)
                            .event(kinds::CREATING, &data),
                    )
                })
                .await;
            if let Err(e) = inserted {
                self.release_uids(id, handle.uids).await;
                let idc = id.clone();
                let _ = self.db(move |s| s.release_ports(&idc)).await;
                self.forget(id);
                return Err(e);
            }
        }
        self.notify();

        let made = backend
            .create(CreateRequest {
                id: id.clone(),
                cell,
                secrets: confidential.secrets,
                owner: Some(caller.owner.clone()),
                volume_key: confidential.volume_key,
                uids: handle.uids,
            })
            .await;
        // A tier may learn more at create than handle_for could say (a
        // bridged cell's leased address): keep what create returned.
        let handle = match &made {
            Ok(h) if *h != handle => {
                let (idc, hc) = (id.clone(), h.clone());
                // Not fatal: the stored handle still finds every host
                // object by the id; only inspect shows less.
                if let Err(e) = self.db(move |s| s.set_handle(&idc, &hc)).await {
                    tracing::warn!(cell = %id, "keeping the handle create returned: {e}");
                }
                h.clone()
            }
            _ => handle,
        };
        let started = match made {
            Ok(_) if start => backend.start(&handle).await,
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            let cause = SupervisorError::from(e);
            return Err(match self.roll_back(id, &handle, backend, &cause).await {
                Ok(()) => cause,
                Err(rollback) => SupervisorError::RollbackFailed {
                    cause: Box::new(cause),
                    rollback: Box::new(rollback),
                },
            });
        }
        let observed = if start {
            Observed::Running
        } else {
            Observed::Created
        };
        self.mark_started(id);
        // Known to this process: reconcile does not announce it as adopted.
        lock(&self.adopted).insert(id.clone());
        self.record_view(
            id,
            Change::event(kinds::CREATED, json!({ "state": observed.as_str() })).observed(observed),
        )
        .await
    }

    /// Undo a create that failed with `cause`: mark the row destroyed,
    /// destroy what was made, remove the row. An error (or a report that is
    /// not clean) leaves the row for reconcile.
    async fn roll_back(
        &self,
        id: &CellId,
        handle: &CellHandle,
        backend: &Arc<dyn Backend>,
        cause: &SupervisorError,
    ) -> Result<()> {
        let msg = cause.to_string();
        self.record(
            id,
            Change::event(kinds::CREATE_FAILED, json!({ "error": msg }))
                .desired(Desired::Destroyed)
                .observed(Observed::Destroying)
                .error(msg),
        )
        .await?;
        let report = backend.destroy(handle).await?;
        self.finish_teardown(id, &report, handle.uids).await?;
        clean(report).map(drop)
    }

    /// Lease `id` a uid range: the lowest slot of the policy's range that
    /// neither this store nor another one on the host holds (see
    /// `uid_claims`).
    async fn lease_uids(&self, id: &CellId) -> Result<UidRange> {
        let pool = cellhost_store::UidPool {
            start: self.cfg.policy.uids.start,
            size: UidRange::CELL_SIZE,
            count: self.cfg.policy.uids.count,
        };
        let (store, claims, idc) = (self.store.clone(), self.claims.clone(), id.clone());
        tokio::task::spawn_blocking(move || {
            // Each retry learns of one more foreign claim; bounded anyway.
            for _ in 0..64 {
                let skip = claims.foreign();
                let Some(r) = store.lease_uids(&idc, pool, &skip)? else {
                    return Err(SupervisorError::Capacity(format!(
                        "every one of the {} uid ranges of this host is leased (policy: uids.count)",
                        pool.count
                    )));
                };
                match claims.claim(&idc, r) {
                    Ok(true) => return Ok(r),
                    Ok(false) => {
                        // Claimed by another store since we looked.
                        store.release_uids(&idc)?;
                    }
                    Err(e) => {
                        store.release_uids(&idc)?;
                        return Err(SupervisorError::Internal(format!(
                            "claiming uids {r} in {}: {e}",
                            claims.dir().display()
                        )));
                    }
                }
            }
            Err(SupervisorError::Internal(
                "no uid range could be claimed: other stores took each one first".into(),
            ))
        })
        .await
        .map_err(|e| SupervisorError::Internal(format!("uid lease task: {e}")))?
    }

    /// Lease the host ports `cell` publishes, across every tier: one
    /// allocator above the tiers, so no cell's published port is another's
    /// (a DNAT would otherwise win over a container's proxy).
    async fn lease_ports(&self, id: &CellId, cell: &Cell) -> Result<()> {
        let ports: Vec<(String, u16)> = cell
            .spec
            .ports
            .iter()
            .map(|p| {
                (
                    p.protocol.as_str().to_string(),
                    u16::try_from(p.host).unwrap_or(0),
                )
            })
            .collect();
        let idc = id.clone();
        let taken = self
            .db(move |s| {
                let refs: Vec<(&str, u16)> = ports.iter().map(|(p, n)| (p.as_str(), *n)).collect();
                s.lease_ports(&idc, &refs)
            })
            .await?;
        taken.map_err(|t| SupervisorError::PortTaken {
            field: format!("spec.ports.{}.host", t.index),
            message: format!(
                "{} port {} is published by another cell",
                t.protocol, t.port
            ),
        })
    }

    /// Give back a range whose cell never got (or no longer has) a row.
    async fn release_uids(&self, id: &CellId, uids: Option<UidRange>) {
        let Some(r) = uids else { return };
        let idc = id.clone();
        if let Err(e) = self.db(move |s| s.release_uids(&idc)).await {
            tracing::warn!(cell = %id, "releasing uids {r}: {e}");
            return;
        }
        self.claims.release(id, r);
    }

    /// The workload (re)starts now with a fresh CPU counter.
    fn mark_started(&self, id: &CellId) {
        lock(&self.marks).insert(
            id.clone(),
            Mark {
                at_ms: now_ms(),
                cpu_ns: 0,
            },
        );
    }

    /// Drop what the supervisor holds in memory for a cell.
    fn forget(&self, id: &CellId) {
        lock(&self.reservations).remove(id);
        lock(&self.marks).remove(id);
        lock(&self.adopted).remove(id);
    }

    /// After backend.destroy: remove the row on a clean report (one commit
    /// with the `destroyed` event, which takes the uid lease with it), or
    /// mark it failed for reconcile. The host-wide uid claim goes last.
    async fn finish_teardown(
        &self,
        id: &CellId,
        report: &TeardownReport,
        uids: Option<UidRange>,
    ) -> Result<()> {
        let (idc, rep) = (id.clone(), report.clone());
        self.db(move |s| record_teardown(s, &idc, &rep)).await?;
        self.notify();
        if report.is_clean() {
            if let Some(r) = uids {
                self.claims.release(id, r);
            }
            self.forget(id);
            self.counters.destroys.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters
                .dirty_teardowns
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Destroy a cell whose slot the caller holds. `reason` goes in the
    /// `destroying` event.
    async fn teardown(&self, rec: &CellRecord, reason: &str) -> Result<TeardownReport> {
        let backend = self.backend(rec.isolation)?.clone();
        let handle = self.handle_of(rec)?;
        if rec.observed == Observed::Running {
            self.meter_cell(rec, &handle).await;
        }
        self.record(
            &rec.id,
            Change::event(kinds::DESTROYING, json!({ "reason": reason }))
                .desired(Desired::Destroyed)
                .observed(Observed::Destroying),
        )
        .await?;
        let report = backend.destroy(&handle).await?;
        self.finish_teardown(&rec.id, &report, handle.uids).await?;
        Ok(report)
    }

    // ------------------------------------------------------- other requests

    pub async fn destroy(&self, caller: &Caller, id: &str) -> Result<TeardownReport> {
        let (rec, _slot) = self.visible_locked(caller, id).await?;
        self.teardown(&rec, "requested").await
    }

    /// End a cell its driver watched in the foreground (`cellhost run`):
    /// record how it ended (`kind`: exited, expired or interrupted, with
    /// the exit when known), then destroy it.
    pub async fn end(
        &self,
        caller: &Caller,
        id: &CellId,
        kind: &'static str,
        exit: Option<ExitInfo>,
    ) -> Result<TeardownReport> {
        let (rec, _slot) = self.visible_locked(caller, id.as_str()).await?;
        let data = serde_json::to_value(exit).unwrap_or_default();
        let mut change = Change::event(kind, data)
            .desired(Desired::Destroyed)
            .observed(Observed::Destroying);
        if let Some(x) = exit {
            change = change.exit(x);
        }
        self.record(&rec.id, change).await?;
        let rec = CellRecord {
            observed: Observed::Destroying,
            ..rec
        };
        let reason = match kind {
            kinds::EXPIRED => "lease expired",
            kinds::INTERRUPTED => "interrupted",
            _ => "exited",
        };
        self.teardown(&rec, reason).await
    }

    /// The stored handle of a cell (the backend's, with its uid lease).
    pub async fn handle(&self, id: &CellId) -> Result<CellHandle> {
        let idc = id.clone();
        let rec = self
            .db(move |s| s.get(&idc))
            .await?
            .ok_or_else(|| SupervisorError::NotFound(id.to_string()))?;
        self.handle_of(&rec)
    }

    /// Start a created or exited cell. `volume_key` reopens its encrypted
    /// volume first (closed when the cell stopped).
    pub async fn start(
        &self,
        caller: &Caller,
        id: &str,
        volume_key: Option<VolumeKey>,
    ) -> Result<CellView> {
        let (rec, _slot) = self.visible_locked(caller, id).await?;
        if !matches!(rec.observed, Observed::Created | Observed::Exited) {
            return Err(SupervisorError::Conflict(format!(
                "cell {} is {}; start needs it created or exited",
                rec.id,
                rec.observed.as_str()
            )));
        }
        let handle = self.handle_of(&rec)?;
        let backend = self.backend(rec.isolation)?;
        if let Some(key) = &volume_key {
            backend.open_volume(&handle, key).await?;
        }
        drop(volume_key);
        backend.start(&handle).await?;
        self.mark_started(&rec.id);
        self.record_view(
            &rec.id,
            Change::event(kinds::STARTED, json!({}))
                .desired(Desired::Running)
                .observed(Observed::Running),
        )
        .await
    }

    pub async fn stop(
        &self,
        caller: &Caller,
        id: &str,
        grace: Option<Duration>,
    ) -> Result<CellView> {
        let (rec, _slot) = self.visible_locked(caller, id).await?;
        if !matches!(
            rec.observed,
            Observed::Running | Observed::Created | Observed::Exited
        ) {
            return Err(SupervisorError::Conflict(format!(
                "cell {} is {}; stop needs it running",
                rec.id,
                rec.observed.as_str()
            )));
        }
        let handle = self.handle_of(&rec)?;
        let backend = self.backend(rec.isolation)?.clone();
        let idc = rec.id.clone();
        self.db(move |s| s.set_desired(&idc, Desired::Stopped))
            .await?;
        self.finish_stop(&rec, &handle, &backend, grace).await
    }

    /// The effect of a stop whose intent (`desired=stopped`) is recorded:
    /// meter, stop, record the exit.
    async fn finish_stop(
        &self,
        rec: &CellRecord,
        handle: &CellHandle,
        backend: &Arc<dyn Backend>,
        grace: Option<Duration>,
    ) -> Result<CellView> {
        if rec.observed == Observed::Running {
            self.meter_cell(rec, handle).await;
        }
        backend
            .stop(handle, grace.unwrap_or(self.cfg.stop_grace))
            .await?;
        let status = backend.status(handle).await?;
        let exit = status.exit.unwrap_or_else(ExitInfo::unknown);
        lock(&self.marks).remove(&rec.id);
        let data = serde_json::to_value(exit).unwrap_or_default();
        self.record_view(
            &rec.id,
            Change::event(kinds::STOPPED, data)
                .observed(Observed::Exited)
                .exit(exit),
        )
        .await
    }

    /// Move the lease end by `seconds`. An ended lease cannot be extended
    /// (the reaper owns it).
    pub async fn extend(&self, caller: &Caller, id: &str, seconds: u64) -> Result<CellView> {
        self.extend_for(caller, id, seconds, None).await
    }

    /// [`Supervisor::extend`], naming in the `extended` event what the
    /// extension was for (`request`: the market's request id), so
    /// [`Supervisor::extended_for`] can find it later.
    pub async fn extend_for(
        &self,
        caller: &Caller,
        id: &str,
        seconds: u64,
        request: Option<&str>,
    ) -> Result<CellView> {
        if seconds == 0 || seconds > MAX_EXTEND_SECONDS {
            return Err(SupervisorError::invalid(
                "seconds",
                format!("must be 1..={MAX_EXTEND_SECONDS}"),
            ));
        }
        let (rec, _slot) = self.visible_locked(caller, id).await?;
        let now = now_ms();
        if rec.expires_at <= now || rec.desired == Desired::Destroyed {
            return Err(SupervisorError::Conflict(format!(
                "the lease of cell {} has ended; it is being destroyed",
                rec.id
            )));
        }
        let at = rec.expires_at.saturating_add((seconds * 1000) as i64);
        // No lease runs longer than the policy's from now, however it was
        // reached: one create or many extends.
        let max = self.cfg.policy.lease.max_seconds;
        let left = u64::try_from((at - now).max(0) / 1000).unwrap_or(u64::MAX);
        if left > max {
            return Err(SupervisorError::Policy(cellhost_policy::PolicyError {
                refusals: vec![cellhost_policy::Refusal {
                    field: "seconds".into(),
                    message: format!(
                        "the lease would end in {left} s; at most {max} s from now is allowed"
                    ),
                    rule: "lease.maxSeconds".into(),
                }],
            }));
        }
        self.record_view(
            &rec.id,
            Change::event(kinds::EXTENDED, {
                let mut data = json!({ "seconds": seconds, "expiresAt": rfc3339_ms(at) });
                if let Some(r) = request {
                    data["request"] = r.into();
                }
                data
            })
            .expires_at(at),
        )
        .await
    }

    /// Write `change` (one commit) and wake event streams.
    async fn record(&self, id: &CellId, change: Change) -> Result<()> {
        let idc = id.clone();
        self.db(move |s| s.apply(&idc, &change.update())).await?;
        self.notify();
        Ok(())
    }

    /// [`Supervisor::record`], then the row as the API shows it.
    async fn record_view(&self, id: &CellId, change: Change) -> Result<CellView> {
        let idc = id.clone();
        let rec = self
            .db(move |s| {
                s.apply(&idc, &change.update())?;
                s.get(&idc)
            })
            .await?;
        self.notify();
        let rec = rec.ok_or_else(|| SupervisorError::NotFound(id.to_string()))?;
        Ok(CellView::from_record(&rec, now_ms(), None))
    }

    pub async fn exec(&self, caller: &Caller, id: &str, req: ExecRequest) -> Result<ExecOutput> {
        let rec = self.visible(caller, id).await?;
        if rec.observed != Observed::Running {
            return Err(SupervisorError::Conflict(format!(
                "cell {} is {}; exec needs it running",
                rec.id,
                rec.observed.as_str()
            )));
        }
        let handle = self.handle_of(&rec)?;
        Ok(self.backend(rec.isolation)?.exec(&handle, req).await?)
    }

    pub async fn logs(&self, caller: &Caller, id: &str, offset: u64) -> Result<LogChunk> {
        let rec = self.visible(caller, id).await?;
        let handle = self.handle_of(&rec)?;
        Ok(self.backend(rec.isolation)?.logs(&handle, offset).await?)
    }

    /// Whether the cell's workload can still write to its log.
    pub async fn log_open(&self, caller: &Caller, id: &str) -> bool {
        match self.visible(caller, id).await {
            Ok(rec) => matches!(
                rec.observed,
                Observed::Creating | Observed::Created | Observed::Running
            ),
            Err(_) => false,
        }
    }

    pub async fn get(&self, caller: &Caller, id: &str) -> Result<CellView> {
        let rec = self.visible(caller, id).await?;
        let idc = rec.id.clone();
        let usage = self.db(move |s| s.usage_totals(&idc)).await?;
        let mut view = CellView::from_record(&rec, now_ms(), Some(usage.into()));
        if let (Some(h), Some(b)) = (&rec.handle, self.backends.get(&rec.isolation))
            && let Ok(Some(live)) = b.live_details(h).await
        {
            merge_details(view.tier_details.get_or_insert(serde_json::json!({})), live);
        }
        Ok(view)
    }

    pub async fn list(&self, caller: &Caller) -> Result<Vec<CellView>> {
        let rows = self.db(|s| s.list_lenient()).await?;
        let now = now_ms();
        Ok(rows
            .into_iter()
            .filter_map(|r| match r {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!("skipping a corrupt cell row: {e}");
                    None
                }
            })
            .filter(|r| caller.may_see(Some(&r.owner)))
            .map(|r| CellView::from_record(&r, now, None))
            .collect())
    }

    /// Events after `after` the caller may see, oldest first, up to `limit`
    /// (scanned; a tenant's page may be shorter). Returns the events and the
    /// cursor to resume from.
    pub async fn events(
        &self,
        caller: &Caller,
        after: i64,
        limit: u32,
    ) -> Result<(Vec<CloudEvent>, i64)> {
        let events = self.db(move |s| s.events_since(after, limit)).await?;
        let cursor = events.last().map_or(after, |e| e.id);
        let node = &self.cfg.node_name;
        Ok((
            events
                .iter()
                .filter(|e| caller.may_see(e.owner.as_deref()))
                .map(|e| CloudEvent::from_event(e, node))
                .collect(),
            cursor,
        ))
    }

    /// Cells in the store, and how many run.
    pub async fn cell_counts(&self) -> Result<CellCounts> {
        let rows = self.db(|s| s.list_lenient()).await?;
        let mut counts = CellCounts::default();
        for r in rows.iter().flatten() {
            counts.total += 1;
            if r.observed == Observed::Running {
                counts.running += 1;
            }
        }
        Ok(counts)
    }

    pub async fn node(&self) -> Result<NodeStatus> {
        let sample = self.host.sample();
        let counts = self.cell_counts().await?;
        let reserved = self.reserved();
        let state_dir = self.cfg.state_dir.clone();
        let disk = tokio::task::spawn_blocking(move || HostInfo::disk_for(&state_dir))
            .await
            .ok()
            .flatten();
        Ok(NodeStatus {
            name: self.cfg.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            kernel: sysinfo::System::kernel_version(),
            uptime_seconds: sysinfo::System::uptime(),
            cpu: CpuStatus {
                logical: sample.cpus,
                usage_percent: sample.cpu_usage,
                load_average: HostInfo::load_average(),
            },
            memory: sample.memory,
            disk,
            capacity: self.capacity,
            reserved,
            free: self.capacity.free(reserved),
            tiers: self.tiers().iter().map(|t| t.to_string()).collect(),
            cells: counts,
        })
    }

    pub fn reserved(&self) -> Reservation {
        lock(&self.reservations).values().map(|h| &h.res).sum()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Rows of the store by tier and observed state, for `/metrics`.
    pub async fn cell_states(&self) -> Result<Vec<(String, String, usize)>> {
        let rows = self.db(|s| s.list_lenient()).await?;
        let mut m: HashMap<(String, String), usize> = HashMap::new();
        for r in rows.iter().flatten() {
            *m.entry((r.isolation.to_string(), r.observed.as_str().to_string()))
                .or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().map(|((a, b), n)| (a, b, n)).collect();
        v.sort();
        Ok(v)
    }

    // ------------------------------------------------------------ metering

    /// Sample one running cell and record the interval since its mark.
    async fn meter_cell(&self, rec: &CellRecord, handle: &CellHandle) {
        let Some(backend) = self.backends.get(&rec.isolation) else {
            return;
        };
        let Ok(usage) = backend.usage(handle).await else {
            return;
        };
        let Some(interval) = self
            .interval_for(rec, usage.cpu_ns, usage.memory_bytes)
            .await
        else {
            return;
        };
        if let Err(e) = self.db(move |s| s.record_usage(&[interval])).await {
            tracing::warn!("metering {}: {e}", rec.id);
        }
    }

    async fn interval_for(
        &self,
        rec: &CellRecord,
        cpu_ns: u64,
        memory_bytes: u64,
    ) -> Option<UsageInterval> {
        let now = now_ms();
        let known = lock(&self.marks).get(&rec.id).copied();
        let mark = match known {
            Some(m) => m,
            None => {
                // After a restart: resume from the last recorded interval.
                let idc = rec.id.clone();
                let t = self.db(move |s| s.usage_totals(&idc)).await.ok()?;
                Mark {
                    at_ms: t.last_end_ms.unwrap_or(rec.created_at),
                    cpu_ns: t.last_cpu_ns_counter.unwrap_or(0),
                }
            }
        };
        lock(&self.marks).insert(rec.id.clone(), Mark { at_ms: now, cpu_ns });
        if now <= mark.at_ms {
            return None;
        }
        let secs = (now - mark.at_ms) as f64 / 1000.0;
        // A counter that went backwards was reset (cell restarted): the
        // whole new value is this interval's.
        let cpu = cpu_ns.checked_sub(mark.cpu_ns).unwrap_or(cpu_ns);
        Some(UsageInterval {
            cell_id: rec.id.clone(),
            owner: rec.owner.clone(),
            start_ms: mark.at_ms,
            end_ms: now,
            cpu_ns_counter: cpu_ns,
            cpu_seconds: cpu as f64 / 1e9,
            memory_byte_seconds: memory_bytes as f64 * secs,
            wall_seconds: secs,
        })
    }

    /// One metering pass over every running cell: one store commit.
    pub async fn meter_once(&self) -> Result<usize> {
        let rows = self.db(|s| s.list_lenient()).await?;
        let mut intervals = Vec::new();
        for rec in rows.into_iter().flatten() {
            if rec.observed != Observed::Running || lock(&self.busy).contains(&rec.id) {
                continue;
            }
            let Some(backend) = self.backends.get(&rec.isolation) else {
                continue;
            };
            let Ok(handle) = self.handle_of(&rec) else {
                continue;
            };
            let Ok(u) = backend.usage(&handle).await else {
                continue;
            };
            if let Some(iv) = self.interval_for(&rec, u.cpu_ns, u.memory_bytes).await {
                intervals.push(iv);
            }
        }
        let n = intervals.len();
        self.db(move |s| s.record_usage(&intervals)).await?;
        Ok(n)
    }

    // ------------------------------------------------- reaper and reconcile

    /// Destroy every cell whose lease has ended. Each in its own task, so
    /// one slow teardown does not hold up the rest.
    pub async fn reap_once(self: &Arc<Self>) -> Result<usize> {
        let now = now_ms();
        let expired = self.db(move |s| s.expired(now)).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for rec in expired {
            let Some(guard) = self.try_lock(&rec.id) else {
                continue;
            };
            let this = self.clone();
            tasks.spawn(async move {
                let _guard = guard;
                this.reap(rec).await
            });
        }
        let mut n = 0;
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => n += 1,
                Ok(Err(e)) => tracing::warn!("reaping: {e}"),
                Err(e) => tracing::warn!("reaper task: {e}"),
            }
        }
        Ok(n)
    }

    async fn reap(&self, rec: CellRecord) -> Result<()> {
        // Re-read under the slot.
        let idc = rec.id.clone();
        let Some(rec) = self.db(move |s| s.get(&idc)).await? else {
            return Ok(());
        };
        if rec.expires_at > now_ms() {
            return Ok(()); // extended meanwhile
        }
        let data = json!({ "expiresAt": rfc3339_ms(rec.expires_at) });
        let idc = rec.id.clone();
        self.db(move |s| s.append_event(&idc, kinds::EXPIRED, &data))
            .await?;
        clean(self.teardown(&rec, "lease expired").await?)?;
        self.counters.leases_reaped.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// One reconcile pass; see the module docs for the rules.
    pub async fn reconcile_once(self: &Arc<Self>) -> ReconcileSummary {
        let mut sum = ReconcileSummary::default();
        self.counters
            .reconcile_passes
            .fetch_add(1, Ordering::Relaxed);
        // Host objects first, rows second (see module docs).
        let mut objects: Vec<(Arc<dyn Backend>, cellhost_core::ListedCell)> = Vec::new();
        for b in self.backends.values() {
            match b.list().await {
                Ok(l) => objects.extend(l.into_iter().map(|c| (b.clone(), c))),
                Err(e) => {
                    sum.errors += 1;
                    tracing::warn!("reconcile: listing {} cells: {e}", b.isolation());
                }
            }
        }
        let rows = match self.db(|s| s.list_lenient()).await {
            Ok(r) => r,
            Err(e) => {
                sum.errors += 1;
                tracing::error!("reconcile: reading the store: {e}");
                return sum;
            }
        };
        let mut recorded = HashSet::new();
        for row in rows {
            let rec = match row {
                Ok(r) => r,
                Err(e) => {
                    sum.errors += 1;
                    tracing::error!("reconcile: {e}");
                    continue;
                }
            };
            recorded.insert(rec.id.clone());
            let Some(guard) = self.try_lock(&rec.id) else {
                continue;
            };
            if let Err(e) = self.reconcile_row(&rec.id, &mut sum).await {
                sum.errors += 1;
                tracing::warn!("reconcile {}: {e}", rec.id);
                let (idc, msg) = (rec.id.clone(), e.to_string());
                let _ = self.db(move |s| s.set_error(&idc, &msg)).await;
            }
            drop(guard);
        }
        for (backend, obj) in objects {
            if recorded.contains(&obj.id) {
                continue;
            }
            let Some(_guard) = self.try_lock(&obj.id) else {
                continue;
            };
            let idc = obj.id.clone();
            match self.db(move |s| s.get(&idc)).await {
                Ok(None) => {}
                Ok(Some(_)) => continue, // a create wrote its row meanwhile
                Err(_) => {
                    sum.errors += 1;
                    continue;
                }
            }
            let handle = backend.handle_for(&obj.id, &orphan_document(obj.isolation));
            match backend.destroy(&handle).await {
                Ok(report) if report.already_gone => {}
                Ok(report) => {
                    sum.orphans += 1;
                    self.counters
                        .orphans_destroyed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!("destroyed orphan {}: {}", obj.id, report.summary());
                    let data = serde_json::to_value(&report).unwrap_or_default();
                    let idc = obj.id.clone();
                    if let Err(e) = self
                        .db(move |s| s.append_event(&idc, kinds::ORPHAN_DESTROYED, &data))
                        .await
                    {
                        tracing::warn!("recording orphan {}: {e}", obj.id);
                    }
                    self.notify();
                }
                Err(e) => {
                    sum.errors += 1;
                    tracing::warn!("destroying orphan {}: {e}", obj.id);
                }
            }
        }
        // After the orphans: the ranges of those just destroyed go back in
        // this pass, not the next one (which a stopped daemon never runs).
        self.sweep_uids(&recorded, &mut sum).await;
        if sum.errors > 0 {
            self.counters
                .reconcile_errors
                .fetch_add(u64::from(sum.errors), Ordering::Relaxed);
        }
        if sum != ReconcileSummary::default() {
            tracing::info!(?sum, "reconcile");
        }
        self.reconciled.send_modify(|n| *n += 1);
        sum
    }

    /// Give back uid leases and claims, and host ports, of this store whose
    /// cell has no row (a create that crashed between leasing and
    /// recording), uids once no process runs as any id of the range.
    async fn sweep_uids(&self, recorded: &HashSet<CellId>, sum: &mut ReconcileSummary) {
        let leases = match self.db(|s| s.uid_leases()).await {
            Ok(l) => l,
            Err(e) => {
                sum.errors += 1;
                tracing::warn!("reconcile: reading uid leases: {e}");
                return;
            }
        };
        for l in &leases {
            if recorded.contains(&l.cell) {
                continue;
            }
            let Some(_guard) = self.try_lock(&l.cell) else {
                continue;
            };
            let idc = l.cell.clone();
            if !matches!(self.db(move |s| s.get(&idc)).await, Ok(None)) {
                continue;
            }
            let left = cellhost_core::uids::processes_in(l.range);
            if !left.is_empty() {
                sum.errors += 1;
                tracing::warn!(
                    "uids {} of gone cell {} still run {} process(es); kept",
                    l.range,
                    l.cell,
                    left.len()
                );
                continue;
            }
            self.release_uids(&l.cell, Some(l.range)).await;
        }
        // Ports of a cell that has no row (a create cut short).
        if let Ok(holders) = self.db(|s| s.port_holders()).await {
            for cell in holders {
                if recorded.contains(&cell) {
                    continue;
                }
                let Some(_guard) = self.try_lock(&cell) else {
                    continue;
                };
                let idc = cell.clone();
                if matches!(self.db(move |s| s.get(&idc)).await, Ok(None)) {
                    let idc = cell.clone();
                    let _ = self.db(move |s| s.release_ports(&idc)).await;
                }
            }
        }
        let leased: HashSet<&CellId> = leases.iter().map(|l| &l.cell).collect();
        for (base, cell) in self.claims.ours() {
            if leased.contains(&cell) || recorded.contains(&cell) {
                continue;
            }
            if let Some(_guard) = self.try_lock(&cell) {
                let range = UidRange {
                    base,
                    size: UidRange::CELL_SIZE,
                };
                if cellhost_core::uids::processes_in(range).is_empty() {
                    self.claims.release(&cell, range);
                }
            }
        }
    }

    /// Wait until a reconcile pass has finished since start: rows then say
    /// what the host holds (interrupted creates rolled back, lost cells
    /// marked), not what a crash left.
    pub async fn reconciled(&self) {
        let mut rx = self.reconciled.subscribe();
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    /// Was cell `id` extended for `request` ([`Supervisor::extend_for`])?
    /// Read from its `extended` events, so the answer holds after the
    /// cell is gone.
    pub async fn extended_for(&self, caller: &Caller, id: &str, request: &str) -> Result<bool> {
        let Ok(id) = CellId::parse(id) else {
            return Ok(false);
        };
        let events = self
            .db(move |s| s.cell_events(&id, kinds::EXTENDED))
            .await?;
        Ok(events
            .iter()
            .any(|e| caller.may_see(e.owner.as_deref()) && e.data["request"] == request))
    }

    /// Bring one row (whose slot the caller holds) to its desired state.
    async fn reconcile_row(&self, id: &CellId, sum: &mut ReconcileSummary) -> Result<()> {
        let idc = id.clone();
        let Some(rec) = self.db(move |s| s.get(&idc)).await? else {
            return Ok(());
        };
        if rec.desired == Desired::Destroyed
            || matches!(rec.observed, Observed::Destroying | Observed::Failed)
        {
            clean(
                self.teardown(&rec, "finishing an interrupted destroy")
                    .await?,
            )?;
            sum.destroys_finished += 1;
            return Ok(());
        }
        if rec.observed == Observed::Creating {
            // Secrets are never stored: an interrupted create cannot be
            // finished, only rolled back.
            let idc = rec.id.clone();
            self.db(move |s| {
                s.append_event(
                    &idc,
                    kinds::ROLLED_BACK,
                    &json!({ "reason": "interrupted create" }),
                )
            })
            .await?;
            clean(
                self.teardown(&rec, "rolling back an interrupted create")
                    .await?,
            )?;
            self.counters.rolled_back.fetch_add(1, Ordering::Relaxed);
            sum.rolled_back += 1;
            return Ok(());
        }
        if rec.expires_at <= now_ms() {
            self.reap(rec).await?;
            sum.reaped += 1;
            return Ok(());
        }
        let backend = self.backend(rec.isolation)?.clone();
        let handle = self.handle_of(&rec)?;
        let status = backend.status(&handle).await?;
        match status.state {
            CellState::Running if rec.desired == Desired::Stopped => {
                // A stop was interrupted between its intent and its effect.
                self.finish_stop(&rec, &handle, &backend, None).await?;
                sum.stops_finished += 1;
            }
            CellState::Running => {
                let first = lock(&self.adopted).insert(rec.id.clone());
                if first || rec.observed != Observed::Running {
                    self.record(
                        &rec.id,
                        Change::event(kinds::ADOPTED, json!({ "pid": status.pid }))
                            .observed(Observed::Running),
                    )
                    .await?;
                    sum.adopted += 1;
                }
            }
            CellState::Exited if rec.observed != Observed::Exited => {
                let exit = status.exit.unwrap_or_else(ExitInfo::unknown);
                let data = serde_json::to_value(exit).unwrap_or_default();
                self.record(
                    &rec.id,
                    Change::event(kinds::EXITED, data)
                        .observed(Observed::Exited)
                        .exit(exit),
                )
                .await?;
                lock(&self.marks).remove(&rec.id);
                sum.exited += 1;
                if let Err(e) = backend.release(&handle).await {
                    tracing::warn!("releasing exited cell {}: {e}", rec.id);
                }
            }
            CellState::Gone => {
                let idc = rec.id.clone();
                self.db(move |s| {
                    s.remove_with_event(
                        &idc,
                        kinds::LOST,
                        &json!({ "reason": "its host objects are gone" }),
                    )
                })
                .await?;
                if let Some(r) = handle.uids {
                    self.claims.release(&rec.id, r);
                }
                self.forget(&rec.id);
                self.notify();
                sum.lost += 1;
            }
            _ => {}
        }
        Ok(())
    }

    /// The supervisor's background work until `shutdown` turns true:
    /// the first reconcile pass, then the reaper, reconcile and metering
    /// loops.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut reap = tokio::time::interval(self.cfg.reap_interval);
        let mut reconcile = tokio::time::interval(self.cfg.reconcile_interval);
        let mut meter = tokio::time::interval(self.cfg.meter_interval);
        for t in [&mut reap, &mut reconcile, &mut meter] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                }
                _ = reap.tick() => {
                    if let Err(e) = self.reap_once().await {
                        tracing::warn!("reaper: {e}");
                    }
                }
                _ = reconcile.tick() => {
                    self.reconcile_once().await;
                }
                _ = meter.tick() => {
                    if let Err(e) = self.meter_once().await {
                        tracing::warn!("metering: {e}");
                    }
                }
            }
        }
    }
}

/// A clean teardown report, or the residue it found as an error.
fn clean(report: TeardownReport) -> Result<TeardownReport> {
    if report.is_clean() {
        Ok(report)
    } else {
        Err(SupervisorError::Residue(report.summary()))
    }
}

/// The placeholder document an orphan's handle is computed from. Backends
/// compute handles from the id (and tier); the document only names it.
fn orphan_document(isolation: Isolation) -> Cell {
    let mut cell: Cell = serde_json::from_value(json!({
        "apiVersion": "cellhost.dev/v1",
        "kind": "Cell",
        "metadata": { "name": "orphan" },
        "spec": { "isolation": "process", "command": ["/bin/true"] }
    }))
    .expect("static orphan document");
    cell.spec.isolation = isolation;
    cell
}
