//! cellhost's `vm` and `microvm` tiers on qemu: each cell is a qemu started
//! under a per-VM shim (`cellhost __vmm`), as the cell's own uid, in its own
//! cgroup, from a root-owned cell dir `<state>/<tier>/<cell-id>/`.
//!
//! Invariants (layout, lifecycle, idempotency and threat model in
//! `docs/tiers.md`, "vm and microvm"):
//! - everything is found again from the cell dir, `/proc` and the tier's
//!   cgroups, never from memory: a supervisor killed -9 adopts its running
//!   VMs, and destroying a destroyed cell is a clean report;
//! - qemu is never root: the cell's uid and gid, no capabilities,
//!   `no_new_privs`, `-sandbox on,…`, a bounding cgroup, and only
//!   descriptors of its own cell's files (the shim opens them);
//! - root-side code never follows a path the cell's uid controls;
//! - secrets never touch the host's disk or argv (the volume key over a
//!   pipe, the seed ISO in a memfd, microVM env/secrets over the agent);
//! - destroy reports residue (uids counted, never killed by uid); the lease
//!   is the supervisor's to give back after a clean report.
//!
//! Design: `docs/tiers.md`.

pub mod args;
/// The image store moved to its own crate; re-exported for callers.
pub use cellhost_image as image;
pub mod limits;
pub mod qmp;
pub mod seed;
pub mod spawn;
pub mod vmm;

mod backend;
pub use backend::{QemuBackend, QemuConfig};
