//! cellhost's state store: one SQLite file (`<state_dir>/cellhost.db`)
//! that remembers every cell, so reconcile can finish what a crash cut
//! short. It stores rows and hands them back typed; it knows nothing of
//! backends, and callers never write SQL.
//!
//! Invariants (the schema, migrations and reasons are in `docs/store.md`):
//! - the db file is created 0600 before SQLite opens it (tightened if wider,
//!   a symlink refused), in a dir created 0700; WAL with `synchronous=FULL`,
//!   so a commit that returned is on disk before the caller acts;
//! - migrations are append-only, counted by `PRAGMA user_version`, and run
//!   under `BEGIN IMMEDIATE`, so two processes apply each exactly once;
//! - the store polices no transition, it records what it is told;
//!   [`Store::apply`] groups a state change with its event in one commit;
//! - `events`, `usage` and leases have no foreign key to `cells` on purpose:
//!   they outlive the row (or precede it);
//! - [`Store::remove`] of an absent row is `Ok(false)`; a second
//!   [`Store::insert_cell`] of an id is [`StoreError::AlreadyExists`];
//! - never a secret value or a volume key: a [`NewCell::document`] is a
//!   [`cellhost_spec::Redacted`]; rows read back are parsed strictly
//!   ([`StoreError::Corrupt`], never a panic) and `CellId`s re-validated.
//!
//! Design: `docs/store.md`.

mod error;
mod host_ports;
mod leases;
mod state;
mod uid_leases;

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cellhost_core::ids::CellId;
use cellhost_core::{CellHandle, ExitInfo};
use cellhost_spec::{Cell, Isolation, Redacted};
use rusqlite::types::{FromSql, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, ToSql, TransactionBehavior, params};

pub use error::StoreError;
pub use host_ports::PortRefusal;
pub use leases::{Lease, LeaseOutcome};
pub use state::{Desired, Observed, ParseStateError};
pub use uid_leases::{UidLease, UidPool};

/// File name of the database inside the state dir.
pub const DB_FILE_NAME: &str = "cellhost.db";

/// Mode of a state dir created by [`Store::open`].
pub const STATE_DIR_MODE: u32 = 0o700;

/// Mode of the database file.
pub const DB_FILE_MODE: u32 = 0o600;

/// How long a write waits for another process's write lock before failing
/// with `SQLITE_BUSY`. Writes are single-row and short; five seconds is
/// far beyond any legitimate hold.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Migrations, in order. `PRAGMA user_version` = how many are applied.
/// Append only: never edit a shipped migration.
const MIGRATIONS: &[&str] = &[
    // 1: cells and events.
    "CREATE TABLE cells (
        id          TEXT    NOT NULL PRIMARY KEY,
        name        TEXT    NOT NULL,
        isolation   TEXT    NOT NULL,
        owner       TEXT    NOT NULL,
        document    TEXT    NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        desired     TEXT    NOT NULL,
        observed    TEXT    NOT NULL,
        handle      TEXT,
        exit        TEXT,
        last_error  TEXT,
        updated_at  INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX cells_expires_at ON cells (expires_at);
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        cell_id  TEXT    NOT NULL,
        at       INTEGER NOT NULL,
        type     TEXT    NOT NULL,
        data     TEXT    NOT NULL
    ) STRICT;
    CREATE INDEX events_cell_id ON events (cell_id, id);",
    // 2: events remember the cell's owner (filled from the row at insert,
    // so the log stays filterable by owner after the row is gone); usage
    // intervals for metering.
    "ALTER TABLE events ADD COLUMN owner TEXT;
    CREATE TABLE usage (
        id                  INTEGER PRIMARY KEY AUTOINCREMENT,
        cell_id             TEXT    NOT NULL,
        owner               TEXT    NOT NULL,
        start_ms            INTEGER NOT NULL,
        end_ms              INTEGER NOT NULL,
        cpu_ns_counter      INTEGER NOT NULL,
        cpu_seconds         REAL    NOT NULL,
        memory_byte_seconds REAL    NOT NULL,
        wall_seconds        REAL    NOT NULL
    ) STRICT;
    CREATE INDEX usage_cell_id ON usage (cell_id, id);",
    // 3: bridged networking: one address per cell from a pool (a bridge's
    // subnet), and the host ports its cells publish (see `leases`).
    "CREATE TABLE net_leases (
        cell_id   TEXT    NOT NULL PRIMARY KEY,
        pool      TEXT    NOT NULL,
        owner     TEXT    NOT NULL,
        address   INTEGER NOT NULL,
        leased_at INTEGER NOT NULL,
        UNIQUE (pool, address)
    ) STRICT;
    CREATE TABLE net_ports (
        protocol TEXT    NOT NULL,
        port     INTEGER NOT NULL,
        cell_id  TEXT    NOT NULL REFERENCES net_leases (cell_id) ON DELETE CASCADE,
        PRIMARY KEY (protocol, port)
    ) STRICT;",
    // 4: host uid ranges, one per live cell of a tier that runs under
    // leased ids (see `uid_leases`).
    "CREATE TABLE uid_leases (
        cell_id   TEXT    NOT NULL PRIMARY KEY,
        base      INTEGER NOT NULL UNIQUE,
        size      INTEGER NOT NULL,
        leased_at INTEGER NOT NULL
    ) STRICT;",
    // 5: host ports published by cells of every tier (see `host_ports`):
    // one allocator above the tiers, so no two cells publish one port.
    "CREATE TABLE host_ports (
        protocol TEXT    NOT NULL,
        port     INTEGER NOT NULL,
        cell_id  TEXT    NOT NULL,
        PRIMARY KEY (protocol, port)
    ) STRICT;
    CREATE INDEX host_ports_cell ON host_ports (cell_id);",
    // 6: one allocator for host ports (`host_ports`): the bridge's own
    // port table goes, its rows kept there (cells older than migration 5
    // held their ports only in it).
    "INSERT OR IGNORE INTO host_ports (protocol, port, cell_id)
        SELECT protocol, port, cell_id FROM net_ports;
    DROP TABLE net_ports;",
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Now, as unix milliseconds (negative before 1970, saturating).
pub fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// Source of `updated_at` and event `at` stamps (unix ms). [`Store::open`]
/// uses [`now_ms`]; tests pass a fixed or stepping clock.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// A cell row to insert. `name` and `isolation` are columns of their own
/// (for listing without parsing documents) and must agree with `document`.
#[derive(Debug, Clone, Copy)]
pub struct NewCell<'a> {
    pub id: &'a CellId,
    pub name: &'a str,
    pub isolation: Isolation,
    /// Who rents the cell (`local`, a Nostr pubkey...).
    pub owner: &'a str,
    /// The validated document, redacted (the type says so): the store
    /// writes it verbatim and never sees secret values.
    pub document: &'a Redacted,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms; end of the lease. Not before `created_at`.
    pub expires_at: i64,
}

/// Changes to one cell row for [`Store::apply`]; `None` leaves a column
/// as it is. Build with the chained setters:
///
/// ```
/// # use cellhost_store::{CellUpdate, Observed};
/// let data = serde_json::json!({ "pid": 4242 });
/// let u = CellUpdate::default()
///     .observed(Observed::Running)
///     .event("cellhost.cell.started", &data);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct CellUpdate<'a> {
    pub desired: Option<Desired>,
    pub observed: Option<Observed>,
    /// Must be this cell's handle.
    pub handle: Option<&'a CellHandle>,
    pub exit: Option<&'a ExitInfo>,
    /// `Some(Some(e))` sets `last_error`, `Some(None)` clears it.
    pub error: Option<Option<&'a str>>,
    pub expires_at: Option<i64>,
    /// An event (`type`, `data`) appended for this cell in the same
    /// transaction, stamped with the same time as `updated_at`.
    pub event: Option<(&'a str, &'a serde_json::Value)>,
}

impl<'a> CellUpdate<'a> {
    pub fn desired(mut self, d: Desired) -> Self {
        self.desired = Some(d);
        self
    }
    pub fn observed(mut self, o: Observed) -> Self {
        self.observed = Some(o);
        self
    }
    pub fn handle(mut self, h: &'a CellHandle) -> Self {
        self.handle = Some(h);
        self
    }
    pub fn exit(mut self, x: &'a ExitInfo) -> Self {
        self.exit = Some(x);
        self
    }
    pub fn error(mut self, e: &'a str) -> Self {
        self.error = Some(Some(e));
        self
    }
    pub fn clear_error(mut self) -> Self {
        self.error = Some(None);
        self
    }
    pub fn expires_at(mut self, at: i64) -> Self {
        self.expires_at = Some(at);
        self
    }
    pub fn event(mut self, kind: &'a str, data: &'a serde_json::Value) -> Self {
        self.event = Some((kind, data));
        self
    }
}

/// One cell row, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct CellRecord {
    pub id: CellId,
    pub name: String,
    pub isolation: Isolation,
    pub owner: String,
    pub document: Cell,
    pub created_at: i64,
    pub expires_at: i64,
    pub desired: Desired,
    pub observed: Observed,
    /// `None` until the backend's `create` returned.
    pub handle: Option<CellHandle>,
    pub exit: Option<ExitInfo>,
    pub last_error: Option<String>,
    pub updated_at: i64,
}

/// One entry of the append-only event log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Strictly increasing, never reused (AUTOINCREMENT): a stream cursor.
    pub id: i64,
    pub cell_id: CellId,
    /// Unix ms.
    pub at: i64,
    /// The `type` column, e.g. `cellhost.cell.created`.
    pub kind: String,
    pub data: serde_json::Value,
    /// Owner of the cell when the event was appended; `None` when the
    /// cell had no row (orphans, events appended after removal).
    pub owner: Option<String>,
}

/// One metering interval of one cell, for [`Store::record_usage`].
#[derive(Debug, Clone, PartialEq)]
pub struct UsageInterval {
    pub cell_id: CellId,
    pub owner: String,
    /// Unix ms.
    pub start_ms: i64,
    /// Unix ms, not before `start_ms`.
    pub end_ms: i64,
    /// The cell's cumulative CPU counter (ns) at `end_ms`, so the next
    /// interval's delta survives a supervisor restart.
    pub cpu_ns_counter: u64,
    pub cpu_seconds: f64,
    pub memory_byte_seconds: f64,
    pub wall_seconds: f64,
}

/// The sum of a cell's metering intervals.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageTotals {
    pub intervals: u64,
    pub cpu_seconds: f64,
    pub memory_byte_seconds: f64,
    pub wall_seconds: f64,
    /// `end_ms` of the last interval (unix ms), if any.
    pub last_end_ms: Option<i64>,
    /// `cpu_ns_counter` of the last interval, if any.
    pub last_cpu_ns_counter: Option<u64>,
}

/// A handle on the state store. Cheap to share behind an `Arc`; every
/// method takes `&self`.
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
    clock: Clock,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

const CELL_COLUMNS: &str = "id, name, isolation, owner, document, created_at, expires_at, \
                            desired, observed, handle, exit, last_error, updated_at";

impl Store {
    /// Open (creating if needed) the store in `state_dir`. See the module
    /// docs for what is created, with which modes, and which pragmas are set.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with_clock(state_dir, Arc::new(now_ms))
    }

    /// [`Store::open`] with a chosen clock for `updated_at` and event stamps.
    pub fn open_with_clock(state_dir: &Path, clock: Clock) -> Result<Store, StoreError> {
        prepare_state_dir(state_dir)?;
        let path = state_dir.join(DB_FILE_NAME);
        let mut conn = open_private_db(&path)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;

        Ok(Store {
            conn: Mutex::new(conn),
            path,
            clock,
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Record a new cell: `desired=running`, `observed=creating`, no handle.
    /// Call before the backend makes anything.
    pub fn insert_cell(&self, new: &NewCell<'_>) -> Result<(), StoreError> {
        self.insert_cell_with(new, &CellUpdate::default())
    }

    /// [`Store::insert_cell`] and [`Store::apply`] of `update` (typically
    /// the handle and a `cellhost.cell.creating` event) in one transaction:
    /// one disk sync for the whole "desired state first" step.
    pub fn insert_cell_with(
        &self,
        new: &NewCell<'_>,
        update: &CellUpdate<'_>,
    ) -> Result<(), StoreError> {
        if new.name != new.document.metadata.name {
            return Err(StoreError::Invalid(format!(
                "cell {}: name {:?} disagrees with document metadata.name {:?}",
                new.id, new.name, new.document.metadata.name
            )));
        }
        if new.isolation != new.document.spec.isolation {
            return Err(StoreError::Invalid(format!(
                "cell {}: isolation {} disagrees with document spec.isolation {}",
                new.id, new.isolation, new.document.spec.isolation
            )));
        }
        if new.expires_at < new.created_at {
            return Err(StoreError::Invalid(format!(
                "cell {}: expires_at {} is before created_at {}",
                new.id, new.expires_at, new.created_at
            )));
        }
        let document = encode("document", new.document)?;
        let prepared = prepare_update(new.id, update)?;
        let now = (self.clock)();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let res = tx.execute(
            "INSERT INTO cells (id, name, isolation, owner, document, created_at, expires_at,
                                desired, observed, handle, exit, last_error, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL, NULL, NULL, ?10)",
            params![
                new.id.as_str(),
                new.name,
                new.isolation.as_str(),
                new.owner,
                document,
                new.created_at,
                new.expires_at,
                Desired::Running.as_str(),
                Observed::Creating.as_str(),
                now,
            ],
        );
        match res {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                return Err(StoreError::AlreadyExists(new.id.clone()));
            }
            Err(e) => return Err(e.into()),
        }
        apply_prepared(&tx, new.id, prepared, now)?;
        tx.commit()?;
        Ok(())
    }

    /// Apply several changes to one cell, and optionally append the event
    /// that announces them, in **one** transaction: all or nothing, and one
    /// disk sync instead of one per change (see "Durability" above). Always
    /// stamps `updated_at`. `NotFound` if the cell has no row (nothing is
    /// written then, not even the event).
    pub fn apply(&self, id: &CellId, update: &CellUpdate<'_>) -> Result<(), StoreError> {
        // Encode and validate everything before taking the write lock.
        let prepared = prepare_update(id, update)?;
        let now = (self.clock)();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        apply_prepared(&tx, id, prepared, now)?; // on error tx drops: rollback
        tx.commit()?;
        Ok(())
    }

    /// Append the event (typically `cellhost.cell.destroyed` with the
    /// TeardownReport) and delete the row in one transaction: the log
    /// keeps the owner, and a crash cannot keep one without the other.
    /// `Ok(false)` if there was no row (the event is still appended).
    pub fn remove_with_event(
        &self,
        id: &CellId,
        kind: &str,
        data: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        self.remove_row(id, kind, data, true)
    }

    /// [`Store::remove_with_event`] for a cell found gone without a
    /// teardown of ours: its host ports and address stay leased until
    /// reconcile finds nothing of it left (a table may still DNAT to them).
    pub fn remove_lost(
        &self,
        id: &CellId,
        kind: &str,
        data: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        self.remove_row(id, kind, data, false)
    }

    fn remove_row(
        &self,
        id: &CellId,
        kind: &str,
        data: &serde_json::Value,
        network: bool,
    ) -> Result<bool, StoreError> {
        check_event_kind(kind)?;
        let data = encode("event data", data)?;
        let at = (self.clock)();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        insert_event(&tx, id, at, kind, &data)?;
        let n = tx.execute("DELETE FROM cells WHERE id = ?1", [id.as_str()])?;
        // The cell's host ids, ports and address go with its row: a clean
        // teardown checked that nothing of the cell uses them any more.
        tx.execute("DELETE FROM uid_leases WHERE cell_id = ?1", [id.as_str()])?;
        if network {
            tx.execute("DELETE FROM host_ports WHERE cell_id = ?1", [id.as_str()])?;
            tx.execute("DELETE FROM net_leases WHERE cell_id = ?1", [id.as_str()])?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// Append metering intervals, all in one transaction (one disk sync
    /// per metering pass, whatever the number of cells).
    pub fn record_usage(&self, intervals: &[UsageInterval]) -> Result<(), StoreError> {
        if intervals.is_empty() {
            return Ok(());
        }
        for u in intervals {
            let finite = [u.cpu_seconds, u.memory_byte_seconds, u.wall_seconds]
                .iter()
                .all(|v| v.is_finite() && *v >= 0.0);
            if u.end_ms < u.start_ms || !finite {
                return Err(StoreError::Invalid(format!(
                    "usage interval of cell {}: end before start or a negative/non-finite amount",
                    u.cell_id
                )));
            }
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO usage (cell_id, owner, start_ms, end_ms, cpu_ns_counter,
                                    cpu_seconds, memory_byte_seconds, wall_seconds)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for u in intervals {
                stmt.execute(params![
                    u.cell_id.as_str(),
                    u.owner,
                    u.start_ms,
                    u.end_ms,
                    i64::try_from(u.cpu_ns_counter).unwrap_or(i64::MAX),
                    u.cpu_seconds,
                    u.memory_byte_seconds,
                    u.wall_seconds,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Sum of a cell's metering intervals (zeros when it has none).
    pub fn usage_totals(&self, id: &CellId) -> Result<UsageTotals, StoreError> {
        let conn = self.conn();
        let (intervals, cpu, mem, wall): (i64, f64, f64, f64) = conn
            .prepare_cached(
                "SELECT COUNT(*), TOTAL(cpu_seconds), TOTAL(memory_byte_seconds),
                        TOTAL(wall_seconds)
                 FROM usage WHERE cell_id = ?1",
            )?
            .query_row([id.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
        let last: Option<(i64, i64)> = conn
            .prepare_cached(
                "SELECT end_ms, cpu_ns_counter FROM usage WHERE cell_id = ?1
                 ORDER BY id DESC LIMIT 1",
            )?
            .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(UsageTotals {
            intervals: u64::try_from(intervals).unwrap_or(0),
            cpu_seconds: cpu,
            memory_byte_seconds: mem,
            wall_seconds: wall,
            last_end_ms: last.map(|l| l.0),
            last_cpu_ns_counter: last.map(|l| u64::try_from(l.1).unwrap_or(0)),
        })
    }

    /// Record the backend's handle. It must be this cell's handle.
    pub fn set_handle(&self, id: &CellId, handle: &CellHandle) -> Result<(), StoreError> {
        self.apply(id, &CellUpdate::default().handle(handle))
    }

    pub fn set_observed(&self, id: &CellId, observed: Observed) -> Result<(), StoreError> {
        self.apply(id, &CellUpdate::default().observed(observed))
    }

    pub fn set_desired(&self, id: &CellId, desired: Desired) -> Result<(), StoreError> {
        self.apply(id, &CellUpdate::default().desired(desired))
    }

    pub fn set_exit(&self, id: &CellId, exit: &ExitInfo) -> Result<(), StoreError> {
        self.apply(id, &CellUpdate::default().exit(exit))
    }

    /// Record the last error of a step. It is shown to operators and
    /// consumers: it must not contain a secret.
    pub fn set_error(&self, id: &CellId, error: &str) -> Result<(), StoreError> {
        self.apply(id, &CellUpdate::default().error(error))
    }

    pub fn clear_error(&self, id: &CellId) -> Result<(), StoreError> {
        self.apply(id, &CellUpdate::default().clear_error())
    }

    /// Move the lease end (unix ms), e.g. after a paid extension.
    pub fn set_expires(&self, id: &CellId, expires_at: i64) -> Result<(), StoreError> {
        self.apply(id, &CellUpdate::default().expires_at(expires_at))
    }

    /// One cell, or `None` if there is no row.
    pub fn get(&self, id: &CellId) -> Result<Option<CellRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {CELL_COLUMNS} FROM cells WHERE id = ?1"))?;
        stmt.query_row([id.as_str()], |row| Ok(decode_cell(row)))
            .optional()?
            .transpose()
    }

    /// Every cell, oldest first. Fails on the first corrupt row; see
    /// [`Store::list_lenient`] for a listing that keeps going.
    pub fn list(&self) -> Result<Vec<CellRecord>, StoreError> {
        self.list_lenient()?.into_iter().collect()
    }

    /// Every cell, oldest first, each row decoded on its own: a corrupt row
    /// is an `Err` in its slot and the others still come back. For
    /// reconcile and `ls`, which must not let one bad row hide the rest.
    pub fn list_lenient(&self) -> Result<Vec<Result<CellRecord, StoreError>>, StoreError> {
        self.select_cells("", &[])
    }

    /// Cells whose lease ended at or before `now` (unix ms), soonest first,
    /// whatever their state (the reaper decides what to do with each).
    pub fn expired(&self, now: i64) -> Result<Vec<CellRecord>, StoreError> {
        self.select_cells("WHERE expires_at <= ?1", &[&now])?
            .into_iter()
            .collect()
    }

    /// Delete a cell's row. Only after a clean `TeardownReport`: the caller
    /// decides. `Ok(false)` if there was no row (already gone is success).
    pub fn remove(&self, id: &CellId) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM cells WHERE id = ?1", [id.as_str()])?;
        Ok(n > 0)
    }

    /// Append to the event log; returns the event's id. `kind` is the
    /// `type` column (`cellhost.cell.created`); `data` must hold no secret.
    /// Stamped with the store's clock. Events may name a cell that has no
    /// row (any more).
    pub fn append_event(
        &self,
        cell_id: &CellId,
        kind: &str,
        data: &serde_json::Value,
    ) -> Result<i64, StoreError> {
        check_event_kind(kind)?;
        let data = encode("event data", data)?;
        let at = (self.clock)();
        insert_event(&self.conn(), cell_id, at, kind, &data)
    }

    /// Up to `limit` events with id greater than `after_id`, in id order.
    /// Start from 0; resume from the last id seen.
    pub fn events_since(&self, after_id: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, cell_id, at, type, data, owner FROM events
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after_id, i64::from(limit)], |row| {
            Ok(decode_event(row))
        })?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row??);
        }
        Ok(out)
    }

    /// Cell `cell_id`'s events of type `kind`, in id order.
    pub fn cell_events(&self, cell_id: &CellId, kind: &str) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, cell_id, at, type, data, owner FROM events
             WHERE cell_id = ?1 AND type = ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![cell_id.as_str(), kind], |row| Ok(decode_event(row)))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row??);
        }
        Ok(out)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied write:
        // every write is one statement or one transaction, which SQLite
        // rolls back if it was not committed.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn select_cells(
        &self,
        filter: &'static str,
        args: &[&dyn ToSql],
    ) -> Result<Vec<Result<CellRecord, StoreError>>, StoreError> {
        let order = if filter.is_empty() {
            "created_at, id"
        } else {
            "expires_at, id"
        };
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {CELL_COLUMNS} FROM cells {filter} ORDER BY {order}"
        ))?;
        let rows = stmt.query_map(args, |row| Ok(decode_cell(row)))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?);
        }
        Ok(out)
    }
}

/// An update encoded and validated, ready to run under the write lock.
struct PreparedUpdate {
    sets: Vec<(&'static str, rusqlite::types::Value)>,
    event: Option<(String, String)>,
}

fn prepare_update(id: &CellId, update: &CellUpdate<'_>) -> Result<PreparedUpdate, StoreError> {
    use rusqlite::types::Value;
    let mut sets: Vec<(&'static str, Value)> = Vec::new();
    if let Some(h) = update.handle {
        if &h.id != id {
            return Err(StoreError::Invalid(format!(
                "handle of cell {} given for cell {id}",
                h.id
            )));
        }
        sets.push(("handle", Value::Text(encode("handle", h)?)));
    }
    if let Some(d) = update.desired {
        sets.push(("desired", Value::Text(d.as_str().into())));
    }
    if let Some(o) = update.observed {
        sets.push(("observed", Value::Text(o.as_str().into())));
    }
    if let Some(x) = update.exit {
        sets.push(("exit", Value::Text(encode("exit", x)?)));
    }
    if let Some(e) = update.error {
        sets.push((
            "last_error",
            e.map_or(Value::Null, |e| Value::Text(e.into())),
        ));
    }
    if let Some(at) = update.expires_at {
        sets.push(("expires_at", Value::Integer(at)));
    }
    let event = match update.event {
        Some((kind, data)) => {
            check_event_kind(kind)?;
            Some((kind.to_string(), encode("event data", data)?))
        }
        None => None,
    };
    Ok(PreparedUpdate { sets, event })
}

/// Run a prepared update inside `tx`; always stamps `updated_at = now`.
/// `NotFound` if the row is missing (the caller drops `tx`: rollback).
fn apply_prepared(
    tx: &rusqlite::Transaction<'_>,
    id: &CellId,
    prepared: PreparedUpdate,
    now: i64,
) -> Result<(), StoreError> {
    use rusqlite::types::Value;
    let PreparedUpdate { mut sets, event } = prepared;
    sets.push(("updated_at", Value::Integer(now)));
    // Column names are prepare_update's literals, never caller input.
    let assignments: Vec<String> = sets
        .iter()
        .enumerate()
        .map(|(i, (col, _))| format!("{col} = ?{}", i + 1))
        .collect();
    let sql = format!(
        "UPDATE cells SET {} WHERE id = ?{}",
        assignments.join(", "),
        sets.len() + 1
    );
    let mut values: Vec<Value> = sets.into_iter().map(|(_, v)| v).collect();
    values.push(Value::Text(id.as_str().into()));
    let n = tx
        .prepare_cached(&sql)?
        .execute(rusqlite::params_from_iter(values))?;
    if n == 0 {
        return Err(StoreError::NotFound(id.clone()));
    }
    if let Some((kind, data)) = event {
        insert_event(tx, id, now, &kind, &data)?;
    }
    Ok(())
}

/// Event types are dotted words (`cellhost.cell.created`): non-empty, no
/// whitespace or control characters.
fn check_event_kind(kind: &str) -> Result<(), StoreError> {
    if kind.is_empty() || kind.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(StoreError::Invalid(format!(
            "event type {kind:?}: must be non-empty, without whitespace"
        )));
    }
    Ok(())
}

fn insert_event(
    conn: &Connection,
    cell_id: &CellId,
    at: i64,
    kind: &str,
    data: &str,
) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO events (cell_id, at, type, data, owner)
         VALUES (?1, ?2, ?3, ?4, (SELECT owner FROM cells WHERE id = ?1))",
    )?
    .execute(params![cell_id.as_str(), at, kind, data])?;
    Ok(conn.last_insert_rowid())
}

/// Create `dir` (and parents) if missing; a newly created `dir` gets
/// exactly [`STATE_DIR_MODE`], whatever the umask.
fn prepare_state_dir(dir: &Path) -> Result<(), StoreError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(StoreError::io(
                "state dir",
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a directory",
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io("cannot stat state dir", dir, e)),
    }
    DirBuilder::new()
        .recursive(true)
        .mode(STATE_DIR_MODE)
        .create(dir)
        .map_err(|e| StoreError::io("cannot create state dir", dir, e))?;
    std::fs::set_permissions(dir, Permissions::from_mode(STATE_DIR_MODE))
        .map_err(|e| StoreError::io("cannot chmod state dir", dir, e))
}

/// Open (creating if needed) an SQLite file that only this user may read,
/// the way the store opens its own: created 0600 before SQLite sees it (a
/// symlink or non-file refused, a wider mode tightened), WAL, and the
/// store's busy timeout. Other state beside the store (the market's ledger)
/// opens its files with this.
pub fn open_private_db(path: &Path) -> Result<Connection, StoreError> {
    prepare_db_file(path)?;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    enable_wal(&conn)?;
    Ok(conn)
}

/// Create the db file 0600 before SQLite sees it (SQLite would use 0644),
/// refuse a symlink or non-file, and tighten a file found wider than 0600.
/// SQLite gives the `-wal` and `-shm` files the db file's mode.
fn prepare_db_file(path: &Path) -> Result<(), StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(DB_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| StoreError::io("cannot open db file", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| StoreError::io("cannot stat db file", path, e))?;
    if !meta.is_file() {
        return Err(StoreError::io(
            "db file",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    if meta.permissions().mode() & 0o7777 != DB_FILE_MODE {
        file.set_permissions(Permissions::from_mode(DB_FILE_MODE))
            .map_err(|e| StoreError::io("cannot chmod db file", path, e))?;
    }
    Ok(())
}

/// Put the file in WAL mode (persistent: later opens find it set).
///
/// Switching needs an exclusive lock, and SQLite answers `SQLITE_BUSY` to a
/// contended switch *without* calling the busy handler, so two processes
/// opening a fresh file at once would fail one of them. Retry with backoff
/// up to [`BUSY_TIMEOUT`], like the busy handler would.
fn enable_wal(conn: &Connection) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let res = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))
            .and_then(|mode| {
                if mode.eq_ignore_ascii_case("wal") {
                    Ok(mode)
                } else {
                    conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
                }
            });
        match res {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => return Err(StoreError::NotWal(mode)),
            Err(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && started.elapsed() < BUSY_TIMEOUT =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Bring the schema to [`SCHEMA_VERSION`]. Safe against concurrent openers:
/// the version is re-read under the write lock (`BEGIN IMMEDIATE`).
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let read = |c: &Connection| -> Result<i64, StoreError> {
        let v: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if !(0..=SCHEMA_VERSION).contains(&v) {
            return Err(StoreError::SchemaVersion {
                found: v,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(v)
    };
    if read(conn)? == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let from = read(&tx)?;
    for (done, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (done + 1) as i64)?;
    }
    tx.commit()?;
    Ok(())
}

fn encode<T: serde::Serialize + ?Sized>(what: &'static str, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|source| StoreError::Encode { what, source })
}

/// The row's id as text, for naming it in errors even when it is damaged.
fn raw_id(row: &Row<'_>) -> String {
    match row.get_ref(0) {
        Ok(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
        Ok(other) => format!("<{:?}>", other.data_type()),
        Err(e) => format!("<unreadable: {e}>"),
    }
}

fn column<T: FromSql>(
    row: &Row<'_>,
    idx: usize,
    name: &'static str,
    id: &str,
) -> Result<T, StoreError> {
    row.get(idx).map_err(|e| StoreError::corrupt(id, name, e))
}

fn json<T: serde::de::DeserializeOwned>(
    text: &str,
    name: &'static str,
    id: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::corrupt(id, name, e))
}

fn decode_cell(row: &Row<'_>) -> Result<CellRecord, StoreError> {
    let raw = raw_id(row);
    let id = CellId::parse(&raw).map_err(|e| StoreError::corrupt(&raw, "cells.id", e))?;
    let isolation: String = column(row, 2, "cells.isolation", &raw)?;
    let isolation = Isolation::parse(&isolation).ok_or_else(|| {
        StoreError::corrupt(
            &raw,
            "cells.isolation",
            format!("unknown tier {isolation:?}"),
        )
    })?;
    let document: String = column(row, 4, "cells.document", &raw)?;
    let desired: String = column(row, 7, "cells.desired", &raw)?;
    let observed: String = column(row, 8, "cells.observed", &raw)?;
    let handle: Option<String> = column(row, 9, "cells.handle", &raw)?;
    let exit: Option<String> = column(row, 10, "cells.exit", &raw)?;
    let handle: Option<CellHandle> = handle.map(|h| json(&h, "cells.handle", &raw)).transpose()?;
    if let Some(h) = &handle
        && h.id != id
    {
        return Err(StoreError::corrupt(
            &raw,
            "cells.handle",
            format!("handle names cell {}", h.id),
        ));
    }
    Ok(CellRecord {
        name: column(row, 1, "cells.name", &raw)?,
        isolation,
        owner: column(row, 3, "cells.owner", &raw)?,
        document: json(&document, "cells.document", &raw)?,
        created_at: column(row, 5, "cells.created_at", &raw)?,
        expires_at: column(row, 6, "cells.expires_at", &raw)?,
        desired: desired
            .parse()
            .map_err(|e| StoreError::corrupt(&raw, "cells.desired", e))?,
        observed: observed
            .parse()
            .map_err(|e| StoreError::corrupt(&raw, "cells.observed", e))?,
        handle,
        exit: exit.map(|x| json(&x, "cells.exit", &raw)).transpose()?,
        last_error: column(row, 11, "cells.last_error", &raw)?,
        updated_at: column(row, 12, "cells.updated_at", &raw)?,
        id,
    })
}

fn decode_event(row: &Row<'_>) -> Result<Event, StoreError> {
    let event_id: i64 = row.get(0)?;
    let raw: String = match row.get_ref(1) {
        Ok(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
        _ => "<unreadable>".to_string(),
    };
    // Errors name the event too: the cell id alone does not find the row.
    let bad = |column: &'static str, detail: &dyn std::fmt::Display| {
        StoreError::corrupt(&raw, column, format!("event {event_id}: {detail}"))
    };
    let cell_id = CellId::parse(&raw).map_err(|e| bad("events.cell_id", &e))?;
    let at: i64 = row.get(2).map_err(|e| bad("events.at", &e))?;
    let kind: String = row.get(3).map_err(|e| bad("events.type", &e))?;
    let data: String = row.get(4).map_err(|e| bad("events.data", &e))?;
    let data = serde_json::from_str(&data).map_err(|e| bad("events.data", &e))?;
    let owner: Option<String> = row.get(5).map_err(|e| bad("events.owner", &e))?;
    Ok(Event {
        id: event_id,
        cell_id,
        at,
        kind,
        data,
        owner,
    })
}

#[cfg(test)]
mod tests;
