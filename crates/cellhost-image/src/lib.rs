//! cellhost's local image store: what cells boot and run from.
//!
//! Tenants never name a host path. A document's `spec.image` is `host` (a
//! read-only view of the host's programs, process tier only) or the name
//! of an image the operator put in this store:
//!
//! - `rootfs` images for process cells: a directory tree or a tarball,
//!   copied into a read-only ext4 image file (`cellhost image import NAME
//!   --rootfs DIR|TARBALL`), which a cell mounts read-only through a loop
//!   device under an overlay of its own (nothing is ever written into an
//!   image);
//! - `vm` images: a bootable base disk (qcow2 or raw), the read-only
//!   backing file of each cell's overlay;
//! - `microvm` images: a kernel and an initramfs carrying the guest agent
//!   as PID 1 (built here by [`ImageStore::build_microvm`]).
//!
//! Every file is 0444 with a sha256 digest in the manifest; `verify`
//! recomputes them. See [`store`](ImageStore) for the layout, lifecycle and
//! threat model.

pub mod cpio;
pub mod modules;
mod rootfs;
mod store;

pub use rootfs::{RootfsError, build_rootfs_image};
pub use store::*;
