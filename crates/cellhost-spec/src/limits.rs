//! Every numeric bound [`crate::validate`] enforces, in one place.
//!
//! The bounds are deliberately generous for honest documents and exist to
//! keep a hostile one from costing the host more than a normal cell: argv
//! and environ stay well under the kernel's `ARG_MAX`, counts stay small
//! enough that per-item work (a port mapping, a secret file) is bounded.

/// Longest `metadata.name`, in bytes (a DNS label's length).
pub const MAX_NAME_LEN: usize = 63;
/// Most entries in `metadata.labels`.
pub const MAX_LABELS: usize = 64;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Longest label value, in characters.
pub const MAX_LABEL_VALUE_LEN: usize = 256;

/// Most elements in `spec.command`.
pub const MAX_COMMAND_ARGS: usize = 1024;
/// Most bytes in `spec.command`, counting each argument's NUL terminator.
pub const MAX_COMMAND_BYTES: usize = 128 * 1024;

/// Most entries in `spec.env`.
pub const MAX_ENV_VARS: usize = 4096;
/// Most bytes in `spec.env`, counted as the workload's environ:
/// `KEY=VALUE\0` per entry.
pub const MAX_ENV_BYTES: usize = 128 * 1024;

/// Most entries in `spec.secrets`.
pub const MAX_SECRETS: usize = 64;
/// Longest secret name, in bytes.
pub const MAX_SECRET_NAME_LEN: usize = 128;

/// Fewest CPUs (`spec.resources.cpus`).
pub const MIN_CPUS: f64 = 0.01;
/// Most CPUs.
pub const MAX_CPUS: f64 = 1024.0;
/// Least memory, MiB (`spec.resources.memoryMiB`).
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most memory, MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1_048_576;
/// Fewest processes (`spec.resources.pids`).
pub const MIN_PIDS: u64 = 1;
/// Most processes (the kernel's `PID_MAX_LIMIT` on 64-bit).
pub const MAX_PIDS: u64 = 4_194_304;
/// Least disk / volume size, GiB (`spec.resources.diskGiB`, `spec.volume.sizeGiB`).
pub const MIN_DISK_GIB: u64 = 1;
/// Most disk / volume size, GiB (64 TiB).
pub const MAX_DISK_GIB: u64 = 65_536;

/// Most entries in `spec.ports`.
pub const MAX_PORTS: usize = 256;
/// Most entries in `spec.network.egress`.
pub const MAX_EGRESS_RULES: usize = 256;
/// Most entries in `spec.network.dns` (glibc's resolver reads three).
pub const MAX_DNS: usize = 3;
/// Least / most `spec.network.egressBytesPerSecond`: 1 KiB/s .. 10 GB/s.
pub const MIN_EGRESS_BYTES_PER_SECOND: u64 = 1024;
pub const MAX_EGRESS_BYTES_PER_SECOND: u64 = 10_000_000_000;

/// Longest lease, seconds (`spec.lifetime.ttlSeconds`): 30 days.
pub const MAX_TTL_SECONDS: u64 = 30 * 24 * 60 * 60;

/// Most entries in `spec.resources.ulimits`.
pub const MAX_ULIMITS: usize = 16;
