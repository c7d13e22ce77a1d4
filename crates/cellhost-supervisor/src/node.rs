//! What this node has: real CPU, memory and disk figures (sysinfo), the
//! capacity cells may reserve, and what is reserved.
//!
//! Capacity = what the host has × the operator's overcommit ratio, minus
//! the memory the operator keeps for the host itself:
//!
//! ```text
//! cpus    = logical CPUs × cpu_overcommit            (default 4.0: CPU is
//!                                                     time-shared, cells are
//!                                                     throttled by quota)
//! memory  = (total memory − host reserve) × memory_overcommit  (default 1.0:
//!                                                     memory is not shareable;
//!                                                     overcommit means OOM)
//!
//! disk    = the state dir's filesystem × 0.9           (what cells may be
//!                                                     promised, in all)
//! ```
//!
//! A cell reserves its `resources.cpus` / `resources.memoryMiB`: the
//! operator's policy writes its defaults into every document that sets
//! none, so a cell reserves exactly what its cgroup (or VM) enforces. It
//! also reserves the disk it may fill: its volume's `sizeGiB`, and
//! `diskGiB` where that is host disk (a container's writable layer or
//! scratch file, a VM's overlay; a process cell's scratch is a tmpfs in
//! its memory).

use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

/// How much of the node cells may reserve, from `cellhost serve` flags.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionPolicy {
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    /// Memory kept for the host, never reserved by cells.
    pub host_reserve_bytes: u64,
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        AdmissionPolicy {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            host_reserve_bytes: 256 << 20,
        }
    }
}

/// What one cell holds against capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    pub cpus: f64,
    pub memory_bytes: u64,
    /// Host disk the cell may fill.
    #[serde(default)]
    pub disk_bytes: u64,
}

impl Reservation {
    /// What `spec` holds: its own figures, which the policy filled in (a
    /// row stored before policies existed gets the policy's defaults).
    pub fn of(spec: &cellhost_spec::CellSpec, policy: &cellhost_policy::Policy) -> Reservation {
        let d = &policy.resources.defaults;
        let gib = |g: u64| g.saturating_mul(1 << 30);
        let scratch = match spec.isolation {
            cellhost_spec::Isolation::Process => 0,
            _ => gib(spec.resources.disk_gib.unwrap_or(d.disk_gib)),
        };
        let volume = spec.volume.as_ref().map_or(0, |v| gib(v.size_gib));
        Reservation {
            cpus: spec.resources.cpus.unwrap_or(d.cpus),
            memory_bytes: spec
                .resources
                .memory_mib
                .unwrap_or(d.memory_mib)
                .saturating_mul(1 << 20),
            disk_bytes: scratch.saturating_add(volume),
        }
    }
}

impl<'a> std::iter::Sum<&'a Reservation> for Reservation {
    fn sum<I: Iterator<Item = &'a Reservation>>(iter: I) -> Reservation {
        iter.fold(Reservation::default(), |a, r| Reservation {
            cpus: a.cpus + r.cpus,
            memory_bytes: a.memory_bytes.saturating_add(r.memory_bytes),
            disk_bytes: a.disk_bytes.saturating_add(r.disk_bytes),
        })
    }
}

/// Capacity cells may reserve on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    pub cpus: f64,
    pub memory_bytes: u64,
    /// Disk all cells may be promised (the state dir's filesystem × 0.9).
    pub disk_bytes: u64,
}

/// Share of the state dir's filesystem cells may be promised in all.
pub const DISK_SHARE: f64 = 0.9;

impl Capacity {
    /// `disk`: the size of the filesystem holding the state dir.
    pub fn from_host(
        cpus: usize,
        total_memory: u64,
        disk: u64,
        policy: &AdmissionPolicy,
    ) -> Capacity {
        let mem = total_memory.saturating_sub(policy.host_reserve_bytes) as f64
            * policy.memory_overcommit;
        Capacity {
            cpus: cpus as f64 * policy.cpu_overcommit,
            memory_bytes: mem.max(0.0) as u64,
            disk_bytes: (disk as f64 * DISK_SHARE) as u64,
        }
    }

    /// What is left beside `reserved`, floored at zero.
    pub fn free(&self, reserved: Reservation) -> Reservation {
        Reservation {
            cpus: (self.cpus - reserved.cpus).max(0.0),
            memory_bytes: self.memory_bytes.saturating_sub(reserved.memory_bytes),
            disk_bytes: self.disk_bytes.saturating_sub(reserved.disk_bytes),
        }
    }

    /// `Err(reason)` when `want` does not fit beside `reserved`.
    pub fn admit(&self, reserved: Reservation, want: Reservation) -> Result<(), String> {
        // A small epsilon: 0.1 + 0.2 must fit in 0.3.
        if reserved.cpus + want.cpus > self.cpus + 1e-9 {
            return Err(format!(
                "the cell asks for {:.2} CPUs; {:.2} of this node's {:.2} are free \
                 (capacity = logical CPUs × cpu overcommit)",
                want.cpus,
                (self.cpus - reserved.cpus).max(0.0),
                self.cpus
            ));
        }
        if reserved.memory_bytes.saturating_add(want.memory_bytes) > self.memory_bytes {
            return Err(format!(
                "the cell asks for {} MiB of memory; {} of this node's {} MiB are free",
                want.memory_bytes >> 20,
                self.memory_bytes.saturating_sub(reserved.memory_bytes) >> 20,
                self.memory_bytes >> 20
            ));
        }
        if reserved.disk_bytes.saturating_add(want.disk_bytes) > self.disk_bytes {
            return Err(format!(
                "the cell asks for {} GiB of disk (diskGiB and its volume); {} of this node's {} GiB are free",
                want.disk_bytes >> 30,
                self.disk_bytes.saturating_sub(reserved.disk_bytes) >> 30,
                self.disk_bytes >> 30
            ));
        }
        Ok(())
    }
}

/// `GET /v1/node`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub version: String,
    pub kernel: Option<String>,
    pub uptime_seconds: u64,
    pub cpu: CpuStatus,
    pub memory: MemoryStatus,
    /// The filesystem holding the state dir.
    pub disk: Option<DiskStatus>,
    pub capacity: Capacity,
    pub reserved: Reservation,
    /// `capacity − reserved`, floored at zero.
    pub free: Reservation,
    /// Tiers this daemon can run now.
    pub tiers: Vec<String>,
    pub cells: CellCounts,
}

/// `GET /v1/node` as a tenant sees it: what the market publishes anyway,
/// nothing of the host's hardware, load or other tenants' reservations.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantNodeStatus {
    pub name: String,
    /// Tiers this daemon can run now.
    pub tiers: Vec<String>,
    /// Room left for new cells.
    pub free: Reservation,
    pub running_cells: usize,
}

/// `GET /v1/node`: the whole status for the operator, the tenant view for
/// a tenant.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum NodeView {
    Operator(Box<NodeStatus>),
    Tenant(TenantNodeStatus),
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CpuStatus {
    pub logical: usize,
    /// Busy share of all CPUs since the previous sample, 0..=100.
    pub usage_percent: f32,
    pub load_average: [f64; 3],
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemoryStatus {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    pub mount_point: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CellCounts {
    pub total: usize,
    pub running: usize,
}

/// Host figures, sampled on demand. Holds one `System` so CPU usage is
/// measured between consecutive samples (sysinfo needs two).
pub struct HostInfo {
    sys: Mutex<System>,
}

impl Default for HostInfo {
    fn default() -> Self {
        Self::new()
    }
}

/// One sample of host figures.
#[derive(Debug, Clone)]
pub struct HostSample {
    pub cpus: usize,
    pub cpu_usage: f32,
    pub memory: MemoryStatus,
}

impl HostInfo {
    pub fn new() -> HostInfo {
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        HostInfo {
            sys: Mutex::new(sys),
        }
    }

    pub fn sample(&self) -> HostSample {
        let mut sys = self.sys.lock().unwrap_or_else(|p| p.into_inner());
        sys.refresh_cpu_usage();
        sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let total = sys.total_memory();
        let available = sys.available_memory();
        HostSample {
            cpus: sys.cpus().len().max(1),
            cpu_usage: sys.global_cpu_usage(),
            memory: MemoryStatus {
                total_bytes: total,
                available_bytes: available,
                used_bytes: total.saturating_sub(available),
            },
        }
    }

    pub fn load_average() -> [f64; 3] {
        let l = System::load_average();
        [l.one, l.five, l.fifteen]
    }

    /// The disk whose mount point is the longest prefix of `path`.
    pub fn disk_for(path: &Path) -> Option<DiskStatus> {
        let disks = Disks::new_with_refreshed_list();
        disks
            .list()
            .iter()
            .filter(|d| path.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map(|d| DiskStatus {
                mount_point: d.mount_point().display().to_string(),
                total_bytes: d.total_space(),
                available_bytes: d.available_space(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_applies_overcommit_and_reserve() {
        let p = AdmissionPolicy {
            cpu_overcommit: 2.0,
            memory_overcommit: 1.0,
            host_reserve_bytes: 1 << 30,
        };
        let c = Capacity::from_host(2, 5 << 30, 100 << 30, &p);
        assert_eq!(c.cpus, 4.0);
        assert_eq!(c.memory_bytes, 4 << 30);
    }

    #[test]
    fn admit_refuses_with_a_reason() {
        let c = Capacity {
            cpus: 1.0,
            memory_bytes: 1 << 30,
            disk_bytes: 10 << 30,
        };
        let r = |cpus, mib: u64| Reservation {
            cpus,
            memory_bytes: mib << 20,
            disk_bytes: 0,
        };
        assert!(c.admit(r(0.7, 0), r(0.3, 1024)).is_ok());
        let e = c.admit(r(0.8, 0), r(0.3, 1)).unwrap_err();
        assert!(e.contains("0.30 CPUs") && e.contains("0.20"), "{e}");
        let e = c.admit(r(0.0, 1000), r(0.1, 100)).unwrap_err();
        assert!(e.contains("100 MiB") && e.contains("24 of"), "{e}");
        // Disk: what all cells may fill together.
        let disk = |g: u64| Reservation {
            disk_bytes: g << 30,
            ..r(0.0, 0)
        };
        assert!(c.admit(disk(6), disk(4)).is_ok());
        let e = c.admit(disk(7), disk(4)).unwrap_err();
        assert!(e.contains("4 GiB of disk") && e.contains("3 of"), "{e}");
    }

    #[test]
    fn host_sample_is_real() {
        let s = HostInfo::new().sample();
        assert!(s.cpus >= 1);
        assert!(s.memory.total_bytes > 0);
        assert!(s.memory.available_bytes <= s.memory.total_bytes);
        assert!(HostInfo::disk_for(Path::new("/")).is_some_and(|d| d.total_bytes > 0));
    }
}
