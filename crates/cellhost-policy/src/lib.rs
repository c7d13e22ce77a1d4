//! The operator's policy: what a tenant may ask of this host.
//!
//! The operator is trusted; every document is not. A policy file (`serve
//! --policy FILE`; `run` reads the same; [`Policy::default`] when there is
//! none) bounds what a cell may be given: the tiers offered, the images,
//! default and maximum resources, the lease, the host port range, the
//! egress a bridged cell may ask for, and per-tenant caps of the API.
//!
//! [`Policy::admit`] is the one check: the supervisor runs it on every
//! document from every entry (the CLI's `run`, the API, the market) before
//! anything is recorded or made. It *writes the defaults into the
//! document* (cpus, memory, pids, open files, disk, lease, resolvers), so
//! the stored document says exactly what the kernel enforces and
//! admission reserves exactly that; no cell is ever unlimited. It refuses
//! everything outside the bounds, each refusal naming the document's field
//! and the policy line (`spec.image: "/var/lib/x" is not ... (policy:
//! images)`); nothing is silently narrowed.
//!
//! Pure: no I/O. What it needs to know of the host (its own addresses,
//! the bridge's subnet) comes in [`HostFacts`].

mod admit;
mod cidr;
mod file;

pub use admit::{HostFacts, PolicyError, Refusal};
pub use cidr::Net;
pub use file::PolicyFileError;

use std::net::Ipv4Addr;

use cellhost_spec::Isolation;
use serde::{Deserialize, Serialize};

/// The whole policy. Every field has a documented default; a file sets
/// only what it changes. Unknown fields are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Policy {
    /// Tiers offered to documents; `None`: every tier this host runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiers: Option<Vec<Isolation>>,
    pub images: Images,
    pub resources: Resources,
    pub lease: Lease,
    /// Most bytes of a cell's output kept (the rest is dropped).
    pub log_bytes: u64,
    /// Host ports `spec.ports` may publish on.
    pub ports: PortRange,
    pub egress: Egress,
    /// Whether process cells keep CAP_NET_RAW (raw sockets forge packets;
    /// the bridge drops forged sources, but off unless needed).
    pub net_raw: bool,
    /// The host ids process cells' user namespaces and VM cells' qemu run
    /// under: `count` cells of 65 536 ids from `start`.
    pub uids: Uids,
    /// Caps per tenant on the API.
    pub tenants: Tenants,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Images {
    /// May a process cell run on `image: host` (a read-only view of the
    /// host's programs and libraries)?
    pub allow_host: bool,
    /// Store images documents may name (process, vm, microvm); `None`:
    /// every image in the store. Names only, never paths.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
    /// Container image references documents may name: exact, or a prefix
    /// ending in `*` (`registry.example/team/*`); `["*"]` for any.
    pub container: Vec<String>,
    /// May the container engine pull a missing image? Off: only images the
    /// operator already has locally run.
    pub pull: bool,
}

impl Default for Images {
    fn default() -> Self {
        Images {
            allow_host: true,
            names: None,
            container: vec!["*".into()],
            pull: false,
        }
    }
}

/// One set of resource figures (defaults or maximums).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limits {
    pub cpus: f64,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    pub pids: u64,
    /// RLIMIT_NOFILE (soft = hard).
    pub nofile: u64,
    #[serde(rename = "diskGiB")]
    pub disk_gib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Resources {
    /// Written into every document that sets none.
    pub defaults: Limits,
    /// No document may ask for more.
    pub maximums: Limits,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            defaults: Limits {
                cpus: 0.5,
                memory_mib: 256,
                pids: 256,
                nofile: 1024,
                disk_gib: 1,
            },
            maximums: Limits {
                cpus: 4.0,
                memory_mib: 8192,
                pids: 4096,
                nofile: 65_536,
                disk_gib: 64,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Lease {
    pub default_seconds: u64,
    pub max_seconds: u64,
}

impl Default for Lease {
    fn default() -> Self {
        Lease {
            default_seconds: cellhost_spec::DEFAULT_TTL_SECONDS,
            max_seconds: 7 * 24 * 3600,
        }
    }
}

/// An inclusive range of host ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl Default for PortRange {
    /// Above the privileged ports, below Linux's ephemeral range (32768+),
    /// so published ports never collide with the host's outgoing ones.
    fn default() -> Self {
        PortRange {
            min: 10_000,
            max: 32_767,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Egress {
    /// Every `spec.network.egress` rule must lie inside one of these.
    pub allow: Vec<Net>,
    /// Never reachable from a cell, whatever its rules; a rule inside one
    /// is refused. By default the private and shared ranges (10/8,
    /// 172.16/12, 192.168/16, 100.64/10: a provider's LAN, a cloud's VPC
    /// and metadata services such as 100.100.100.200). Always added on
    /// top: the host's own addresses, 0/8, 127/8, 169.254/16 (link-local
    /// and cloud metadata), 224/4 and 240/4, and the bridge's subnet
    /// (other cells, the gateway).
    pub deny: Vec<Net>,
    /// Also deny every network the host is directly connected to (its LAN,
    /// the container engine's bridges), as they are when a cell is made.
    pub deny_connected: bool,
    /// The only resolvers `spec.network.dns` may name, and the ones a
    /// bridged cell that names none gets.
    pub resolvers: Vec<Ipv4Addr>,
}

/// The private and shared ranges [`Egress::deny`] holds by default.
pub const PRIVATE_RANGES: [Net; 4] = [
    Net::new(Ipv4Addr::new(10, 0, 0, 0), 8),
    Net::new(Ipv4Addr::new(172, 16, 0, 0), 12),
    Net::new(Ipv4Addr::new(192, 168, 0, 0), 16),
    Net::new(Ipv4Addr::new(100, 64, 0, 0), 10),
];

impl Default for Egress {
    fn default() -> Self {
        Egress {
            allow: vec![Net::ANY],
            deny: PRIVATE_RANGES.to_vec(),
            deny_connected: true,
            resolvers: Vec::new(),
        }
    }
}

/// Ranges no cell may ever reach, whatever the operator lists (see
/// [`Egress::deny`]); the host's own addresses and the bridge subnet come
/// from [`HostFacts`].
pub const ALWAYS_DENIED: [Net; 5] = [
    Net::new(Ipv4Addr::new(0, 0, 0, 0), 8),
    Net::new(Ipv4Addr::new(127, 0, 0, 0), 8),
    Net::new(Ipv4Addr::new(169, 254, 0, 0), 16),
    Net::new(Ipv4Addr::new(224, 0, 0, 0), 4),
    Net::new(Ipv4Addr::new(240, 0, 0, 0), 4),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Uids {
    pub start: u32,
    pub count: u32,
}

impl Default for Uids {
    /// 4096 cells of 65 536 ids from 2^30: far above any account's id.
    fn default() -> Self {
        Uids {
            start: 1 << 30,
            count: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Tenants {
    /// Cells one tenant may hold at once.
    pub max_cells: u32,
    /// Open streams (logs or events following, execs) per tenant.
    pub max_streams: u32,
    /// Sustained API requests per second per tenant...
    pub requests_per_second: f64,
    /// ...with bursts of this many.
    pub burst: u32,
}

impl Default for Tenants {
    fn default() -> Self {
        Tenants {
            max_cells: 32,
            max_streams: 8,
            requests_per_second: 20.0,
            burst: 40,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            tiers: None,
            images: Images::default(),
            resources: Resources::default(),
            lease: Lease::default(),
            log_bytes: 16 << 20,
            ports: PortRange::default(),
            egress: Egress::default(),
            net_raw: false,
            uids: Uids::default(),
            tenants: Tenants::default(),
        }
    }
}

impl Policy {
    /// Is `tier` offered (by policy; the host may still lack it)?
    pub fn offers(&self, tier: Isolation) -> bool {
        self.tiers.as_ref().is_none_or(|t| t.contains(&tier))
    }
}
