//! The contract every cellhost isolation tier implements.
//!
//! A tier is a [`Backend`]. The supervisor (or `cellhost run`) drives it:
//! `create` makes every host object the cell needs and leaves the workload
//! ready but not running; `start` lets it run; `stop` ends the workload but
//! keeps its objects (logs, exit status); `destroy` removes everything and
//! returns a [`TeardownReport`] that says what it checked and what it found
//! left. Destroy is idempotent: "already gone" is success.
//!
//! This crate holds no engine code and no host code: it is what the
//! engines and the supervisor agree on. Host utilities (the tool runner,
//! the probe, cgroups) are `cellhost-host`; OS helpers the guest agent
//! shares are `cellhost-os`.

mod backend;
pub mod ids;
mod report;

pub use backend::*;
pub use report::*;
pub mod secrets;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod uids;
pub use uids::UidRange;
mod volume_key;
pub use volume_key::*;
