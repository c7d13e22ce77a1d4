//! cellhost's `vm` and `microvm` tiers on qemu.
//!
//! # Layout on the host
//!
//! ```text
//! <state>/images/<name>/            the image store (cellhost-image): root's,
//!                                   files 0444; qemu gets descriptors
//! <state>/<tier>/<cell-id>/         one dir per cell (root, 0700), tier = vm | microvm
//!   qemu.json                       the argv the shim runs, the ids, the cgroups and
//!                                   the descriptors qemu inherits (paths and ids only)
//!   qemu.pid shim.pid               written by the shim (vmm.rs)
//!   qmp.sock                        QMP, bound by the shim, listened on by qemu
//!   agent.sock                      microvm: the shim's relay to the guest agent
//!   serial.log                      the guest console, capped by the shim
//!   qemu.log                        qemu's own stderr
//!   disk.qcow2                      vm: overlay on the image's read-only base (the
//!                                   cell's uid, 0600)
//!   volume.luks | volume.qcow2      spec.volume: qemu LUKS (encrypted) or qcow2 (the
//!                                   cell's uid, 0600)
//!   started exit.json               lifecycle markers
//! <cgroup>/cellhost/<instance>/cellhost-<id>   qemu's cgroup in each hierarchy (limits.rs)
//! tap chv<id> (owned by the cell's uid), table inet cellhost_<id>, a lease
//!                                   bridged cells (cellhost-net)
//! ```
//!
//! # Lifecycle
//!
//! `create` needs the cell's uid range (the supervisor leases one, since
//! [`QemuBackend`] wants uids): it makes the dir, the overlay and the
//! volume (handed to the range's base uid), the cell's cgroup with its
//! limits, then starts qemu under the shim (`cellhost __vmm`), which opens
//! every file qemu uses and starts qemu as that uid in that cgroup
//! (spawn.rs). A vm boots paused (`-S`) with its cloud-init seed attached;
//! `start` is QMP `cont`. A microVM boots at once to its agent (PID 1 of
//! the initramfs); `create` waits for it, then pushes env and secrets over
//! the channel, and `start` asks the agent to run the command. `stop`: the
//! agent's `shutdown` (microvm) or ACPI `system_powerdown` (vm) with the
//! grace period, then QMP `quit`, then SIGKILL. `status` reads QMP and,
//! for a microVM, the agent: when the command has ended its exit status is
//! recorded and the VM quits. A bridged cell's tap and table are made
//! before qemu starts (the shim attaches the tap for qemu); a microVM's
//! agent then configures eth0, a vm applies the seed's `network-config`.
//! `destroy` quits/kills qemu, kills what is left in its cgroup and
//! removes the cgroup, detaches the network, erases the LUKS header,
//! removes the dir and reports residue: qemu process, shim, sockets, dir,
//! overlay, volume, published ports, the network's objects, `vm-cgroup`,
//! and `uids` (no process running as any id of the range; counted, never
//! killed by uid).
//! The lease is the supervisor's to give back after a clean report.
//!
//! # Idempotency
//!
//! Everything is found again from the cell dir, from `/proc` (a qemu
//! whose argv names the cell dir: each of its fdsets is described by the
//! path it stands for) and from the tier's cgroups, never from memory: a
//! supervisor that was killed -9 finds its VMs running (the shim is in its
//! own session) and adopts them; reconcile destroys dirs, cgroups and qemu
//! processes without a record. Destroying a destroyed cell is a clean
//! report.
//!
//! # Threat model
//!
//! The guest is hostile, and may take over qemu (guest-to-host qemu
//! escapes exist): a guest kernel exploit lands in the guest kernel; a
//! qemu escape lands in qemu, which is
//! - never root: the cell's own uid and gid (the base of its lease, so no
//!   two live cells share it), no supplementary group (kvm's only under
//!   KVM), no capabilities, `no_new_privs`;
//! - under `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
//!   resourcecontrol=deny` (seccomp: no fork or exec, no setuid family,
//!   no scheduler or affinity changes); the tiers are off on a qemu
//!   without it (`cellhost doctor`: `qemu.sandbox`);
//! - in a cgroup bounding its memory (guest RAM + measured overhead, TCG's
//!   translation buffer bounded), CPU (vCPUs + a tenth) and tasks;
//! - holding only descriptors of its own cell's files: it cannot traverse
//!   the state dir (root's, 0700), so another cell's files are out of its
//!   reach even by path, and it never opens /dev/net/tun or the store.
//!
//! It still sees what it holds: its guest's RAM, disks, volume key, seed
//! and tap (confined by the cell's nftables table), and the host kernel's
//! syscall surface its filter allows. None of this defends against the
//! host operator (root), who sees everything. QMP and the agent socket
//! live in the root-only cell dir; only the shim and the backend (root)
//! connect. With `network.mode: none` published ports bind
//! [`QemuConfig::publish_address`], and user-mode networking runs with
//! `restrict=on`, so the guest reaches nothing; bridged, it is confined by
//! its host-side nftables table (cellhost-net: its own address and MAC
//! only, the egress allow-list, deny by default). Secrets never touch the
//! host's disk or argv: the volume key goes to qemu over a pipe (its
//! `secret` object), the seed ISO lives in a memfd, and microVM
//! env/secrets go over the agent channel. Root-side code never follows a
//! path the cell's uid controls: everything the uid owns is a file in the
//! root-owned cell dir. Why shell out: qemu and qemu-img are the
//! interface; QMP is spoken directly (qmp.rs).

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
