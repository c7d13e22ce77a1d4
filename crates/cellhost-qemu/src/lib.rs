//! cellhost's `vm` and `microvm` tiers on qemu.
//!
//! # Layout on the host
//!
//! ```text
//! <state>/images/<name>/            the image store (cellhost-image)
//! <state>/<tier>/<cell-id>/         one dir per cell (0700), tier = vm | microvm
//!   qemu.json                       the argv the shim runs (paths and ids only)
//!   qemu.pid shim.pid               written by the shim (vmm.rs)
//!   qmp.sock                        QMP, lifecycle and status
//!   agent.sock                      microvm: the guest agent's virtio-serial port
//!   serial.log                      the guest console, capped by the shim
//!   qemu.log                        qemu's own stderr
//!   disk.qcow2                      vm: overlay on the image's read-only base
//!   volume.luks | volume.qcow2      spec.volume: qemu LUKS (encrypted) or qcow2
//!   started exit.json               lifecycle markers
//! tap chv<id>, table inet cellhost_<id>, a lease    bridged cells (cellhost-net)
//! ```
//!
//! # Lifecycle
//!
//! `create` makes the dir, the overlay and the volume, then starts qemu
//! under the shim (`cellhost __vmm`). A vm boots paused (`-S`) with its
//! cloud-init seed attached; `start` is QMP `cont`. A microVM boots at
//! once to its agent (PID 1 of the initramfs); `create` waits for it, then
//! pushes env and secrets over the channel, and `start` asks the agent to
//! run the command. `stop`: the agent's `shutdown` (microvm) or ACPI
//! `system_powerdown` (vm) with the grace period, then QMP `quit`, then
//! SIGKILL. `status` reads QMP and, for a microVM, the agent: when the
//! command has ended its exit status is recorded and the VM quits.
//! A bridged cell's tap and table are made before qemu starts (qemu opens
//! the tap by name); a microVM's agent then configures eth0, a vm applies
//! the seed's `network-config`.
//! `destroy` quits/kills qemu, detaches the network, erases the LUKS
//! header, removes the dir and reports residue: qemu process, shim,
//! sockets, dir, overlay, volume, published ports, the network's objects.
//!
//! # Idempotency
//!
//! Everything is found again from the cell dir and from `/proc` (a qemu
//! whose argv names the cell dir), never from memory: a supervisor that
//! was killed -9 finds its VMs running (the shim is in its own session)
//! and adopts them; reconcile destroys dirs and qemu processes without a
//! record. Destroying a destroyed cell is a clean report.
//!
//! # Threat model
//!
//! The guest is hostile: it sees virtio devices only; QMP and the agent
//! socket live in the 0700 cell dir. With `network.mode: none` published
//! ports bind [`QemuConfig::publish_address`], and user-mode networking
//! runs with `restrict=on`, so the guest reaches nothing; bridged, it is
//! confined by its host-side nftables table (cellhost-net: its own
//! address and MAC only, the egress allow-list, deny by default).
//! Secrets never touch the host's disk or argv:
//! the volume key goes to qemu over a pipe (its `secret` object), the
//! seed ISO lives in a memfd, and microVM env/secrets go over the agent
//! channel. Why shell out: qemu and qemu-img are the interface; QMP is
//! spoken directly (qmp.rs).

pub mod args;
/// The image store moved to its own crate; re-exported for callers.
pub use cellhost_image as image;
pub mod qmp;
pub mod seed;
pub mod vmm;

mod backend;
pub use backend::{QemuBackend, QemuConfig};
