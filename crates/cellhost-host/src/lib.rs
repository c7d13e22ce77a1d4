//! Host utilities the tiers share, kept out of the contract crate
//! (`cellhost-core`): the one subprocess runner (`tool`), the shim's exit
//! record (`shim`), cgroup discovery (`cgroups`), scans of the processes
//! running as a uid range (`uids`), and the host capability probe
//! (`probe`, split by subject).

pub mod cgroups;
pub mod netns;
pub mod ports;
pub mod probe;
pub mod shim;
pub mod tool;
pub mod uids;
