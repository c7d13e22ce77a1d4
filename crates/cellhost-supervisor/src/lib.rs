//! cellhost's supervisor: the daemon half of the runtime.
//!
//! [`Supervisor`] owns the store and every cell's life: admission against
//! the node's capacity, create/start/stop/extend/destroy with the store
//! written before and after each side effect, a lease reaper, a reconciler
//! that adopts, rolls back, finishes and sweeps after a crash, metering
//! from cgroup (and later engine/VM) stats, and an append-only event log.
//! [`api`] serves it over HTTP (axum) on a unix socket and, with bearer
//! tokens, on TCP. The `cellhost` binary wires both (`cellhost serve`).

pub mod api;
pub mod error;
pub mod events;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod supervisor;
pub mod tiers;
pub mod tokens;
pub mod uid_claims;

/// Does no process run as any id of `r`?
pub(crate) fn uids_free(r: cellhost_core::UidRange) -> bool {
    cellhost_host::uids::processes_in(r).is_empty()
}

pub use error::SupervisorError;
pub use supervisor::{
    Caller, CellView, Confidential, CreateOptions, ReconcileSummary, Supervisor, SupervisorConfig,
    record_teardown,
};
