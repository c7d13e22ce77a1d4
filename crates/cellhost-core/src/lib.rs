//! The contract every cellhost isolation tier implements.
//!
//! A tier is a [`Backend`]. The supervisor (or `cellhost run`) drives it:
//! `create` makes every host object the cell needs and leaves the workload
//! ready but not running; `start` lets it run; `stop` ends the workload but
//! keeps its objects (logs, exit status); `destroy` removes everything and
//! returns a [`TeardownReport`] that says what it checked and what it found
//! left. Destroy is idempotent: "already gone" is success.
//!
//! This crate holds no engine code; it is what the engines and the
//! supervisor agree on.

mod backend;
pub mod cgroups;
pub mod ids;
pub mod ifconfig;
pub mod mountinfo;
pub mod probe;
mod report;

pub use backend::*;
pub use report::*;
pub mod secrets;
pub mod shim;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tool;
pub mod uids;
pub use uids::UidRange;
mod volume_key;
pub use volume_key::*;
