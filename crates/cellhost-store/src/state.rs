//! The two state columns of a cell row: what the operator wants
//! ([`Desired`]) and what cellhost last saw ([`Observed`]).
//!
//! They are stored as lowercase words (`running`, `destroying`, ...) so a
//! human with `sqlite3` can read the file, and parsed back strictly: an
//! unknown word is a corrupt row, never a silent default.

use std::fmt;
use std::str::FromStr;

use cellhost_core::CellState;
use serde::{Deserialize, Serialize};

/// A word that is not one of a state enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} state {value:?} (expected one of: {expected})")]
pub struct ParseStateError {
    /// `desired` or `observed`.
    pub what: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// What the operator (or the lease) wants the cell to be. Written *before*
/// the side effect that moves the cell there, so a crash leaves the intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
    /// Terminal: the row stays until a clean teardown lets the caller
    /// [`remove`](crate::Store::remove) it.
    Destroyed,
}

impl Desired {
    pub const ALL: [Desired; 3] = [Desired::Running, Desired::Stopped, Desired::Destroyed];

    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
            Desired::Destroyed => "destroyed",
        }
    }
}

impl fmt::Display for Desired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Desired {
    type Err = ParseStateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Desired::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| ParseStateError {
                what: "desired",
                value: s.to_string(),
                expected: "running, stopped, destroyed",
            })
    }
}

/// What cellhost last observed of the cell. Written *after* each side
/// effect (or after a status probe), so it may lag reality by one step;
/// reconcile closes the gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Observed {
    /// Row written, backend `create` not yet known to have finished. A
    /// crash here may have left partial host objects: reconcile destroys
    /// by the cell id's naming convention.
    Creating,
    /// Host objects exist, workload not started.
    Created,
    Running,
    /// The workload ended; exit status in the row's `exit` column.
    Exited,
    /// Teardown started and has not yet produced a clean report.
    Destroying,
    /// No host objects left (clean TeardownReport); the caller may remove
    /// the row.
    Gone,
    /// A step failed; `last_error` says which. Reconcile decides.
    Failed,
}

impl Observed {
    pub const ALL: [Observed; 7] = [
        Observed::Creating,
        Observed::Created,
        Observed::Running,
        Observed::Exited,
        Observed::Destroying,
        Observed::Gone,
        Observed::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Observed::Creating => "creating",
            Observed::Created => "created",
            Observed::Running => "running",
            Observed::Exited => "exited",
            Observed::Destroying => "destroying",
            Observed::Gone => "gone",
            Observed::Failed => "failed",
        }
    }
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Observed {
    type Err = ParseStateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Observed::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| ParseStateError {
                what: "observed",
                value: s.to_string(),
                expected: "creating, created, running, exited, destroying, gone, failed",
            })
    }
}

/// A backend's [`CellState`] (from `status`) as an observed state.
impl From<CellState> for Observed {
    fn from(s: CellState) -> Self {
        match s {
            CellState::Created => Observed::Created,
            CellState::Running => Observed::Running,
            CellState::Exited => Observed::Exited,
            CellState::Gone => Observed::Gone,
        }
    }
}
