//! The supervisor: owns the store and every cell's life.
//!
//! Invariants (the rules and the reasons are in `docs/supervisor.md`):
//! - desired state is written before a side effect, observed state after
//!   it, each step one store commit: a crash leaves a row that says what
//!   was being attempted, and reconcile finishes or undoes it;
//! - one operation per cell at a time (a per-cell busy slot); reconcile and
//!   the reaper skip busy cells;
//! - a row is removed only with a clean teardown report; residue keeps it
//!   `failed` for reconcile to retry;
//! - admission checks and reserves under one lock;
//! - a tenant sees only its own cells (any other id is `NotFound`);
//!   secret values never reach the store, the stored document is redacted.

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

mod lifecycle;
mod metering;
mod reconcile;
mod views;

pub use lifecycle::CreateOptions;
pub use reconcile::ReconcileSummary;
pub use views::{CellView, UsageView};

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
    /// A key that proved only who it is (a NIP-98 signature): anyone can
    /// make one, so it may use the cells it rented but neither create a
    /// cell nor extend a lease; the market does both once paid.
    pub unpaid: bool,
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
            unpaid: false,
        }
    }

    pub fn tenant(owner: impl Into<String>) -> Caller {
        let owner = owner.into();
        Caller {
            operator: owner == OPERATOR,
            owner,
            unpaid: false,
        }
    }

    /// The holder of a key that signed a request: the tenant `owner`,
    /// never the operator, and [`Caller::unpaid`].
    pub fn key_holder(owner: impl Into<String>) -> Caller {
        Caller {
            owner: owner.into(),
            operator: false,
            unpaid: true,
        }
    }

    /// Refuse what only payment (or the operator's trust) buys.
    fn must_have_paid(&self, what: &str) -> Result<()> {
        if self.unpaid {
            return Err(SupervisorError::Unpaid(format!(
                "a signature alone cannot {what}: rent and top up through the market, which \
                 does both once paid"
            )));
        }
        Ok(())
    }

    fn may_see(&self, owner: Option<&str>) -> bool {
        self.operator || owner == Some(self.owner.as_str())
    }
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
            connected: cellhost_os::ifconfig::connected_networks()
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
        cellhost_spec::validate_for(cell.spec.isolation, cell)?;
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
        let backend = self.backend(rec.isolation)?;
        let mut h = match &rec.handle {
            Some(h) => h.clone(),
            None => backend.handle_for(&rec.id, &rec.document),
        };
        // A handle stored before addresses were planned names none: the
        // lease does, so the network's teardown forgets the right flows.
        if h.address.is_none() && backend.address_pool(&rec.document).is_some() {
            h.address = self.store.lease_of(&rec.id)?.map(|l| l.address);
        }
        Ok(h)
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

    /// The stored handle of a cell (the backend's, with its uid lease).
    pub async fn handle(&self, id: &CellId) -> Result<CellHandle> {
        let idc = id.clone();
        let rec = self
            .db(move |s| s.get(&idc))
            .await?
            .ok_or_else(|| SupervisorError::NotFound(id.to_string()))?;
        self.handle_of(&rec)
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

    pub fn reserved(&self) -> Reservation {
        lock(&self.reservations).values().map(|h| &h.res).sum()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
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
