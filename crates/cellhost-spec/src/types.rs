//! The Cell document, v1.
//!
//! Every struct denies unknown fields: a typo in a document is an error,
//! never a silently ignored setting. Field names are camelCase on the wire.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "cellhost.dev/v1";
pub const KIND: &str = "Cell";

/// A whole cell document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Cell {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: CellSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(
        default,
        skip_serializing_if = "IndexMap::is_empty",
        deserialize_with = "unique_map::deserialize"
    )]
    pub labels: IndexMap<String, String>,
}

/// Isolation tier, weakest to strongest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    Process,
    Container,
    Vm,
    Microvm,
}

impl Isolation {
    pub const ALL: [Isolation; 4] = [
        Isolation::Process,
        Isolation::Container,
        Isolation::Vm,
        Isolation::Microvm,
    ];

    /// The tier named `s` as [`Isolation::as_str`] spells it.
    pub fn parse(s: &str) -> Option<Isolation> {
        Isolation::ALL.into_iter().find(|i| i.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Process => "process",
            Isolation::Container => "container",
            Isolation::Vm => "vm",
            Isolation::Microvm => "microvm",
        }
    }
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CellSpec {
    pub isolation: Isolation,
    /// What the cell runs from. Process tier: `host` (a read-only view of
    /// the host's programs) or the name of a rootfs image in the operator's
    /// image store; vm and microvm: an image in that store; container: an
    /// engine image reference. Never a host path.
    #[serde(default = "default_image")]
    pub image: String,
    /// argv of the workload. Required and non-empty.
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// The workload's environment, exactly: nothing else is inherited.
    /// Order is preserved into the workload's environ. A key given twice
    /// is an error, in JSON as in YAML.
    #[serde(
        default,
        skip_serializing_if = "IndexMap::is_empty",
        deserialize_with = "unique_map::deserialize"
    )]
    pub env: IndexMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretRef>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<Volume>,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub lifetime: Lifetime,
}

fn default_image() -> String {
    "host".to_string()
}

/// A secret delivered to the workload as `/run/secrets/<name>`, mode 0600.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretRef {
    pub name: String,
    pub from: SecretSource,
}

/// Where the host reads a secret's value. Exactly one key.
///
/// `Debug` prints `Value(<redacted>)` for an inline value, so a cell can be
/// logged with `{:?}` without leaking it. `Serialize` does write the value:
/// use [`crate::redacted`] before storing or sending a document.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum SecretSource {
    /// A file on the caller's host, read at create time.
    File(String),
    /// An environment variable of the caller, read at create time.
    Env(String),
    /// Inline value. Less safe: the value lives in the document (and so in
    /// whatever stored or sent the document). cellhost redacts it before
    /// storing the document.
    Value(String),
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File(p) => f.debug_tuple("File").field(p).finish(),
            SecretSource::Env(v) => f.debug_tuple("Env").field(v).finish(),
            SecretSource::Value(_) => f.write_str("Value(<redacted>)"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    /// CPU bandwidth in cores (0.5 = half a core); 0.01..=1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory limit, MiB; 16..=1048576.
    #[serde(default, rename = "memoryMiB", skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Most processes/threads; 1..=4194304.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Writable disk for the workload, GiB; 1..=65536.
    #[serde(default, rename = "diskGiB", skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    /// Extra resource limits (setrlimit) for the workload, e.g.
    /// `{ name: nofile, soft: 1024, hard: 4096 }`. Unset ones keep the
    /// tier's defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ulimits: Vec<Ulimit>,
}

/// One rlimit: `name` is the lower-case resource without `RLIMIT_`
/// (`nofile`, `nproc`, `core`, `memlock`, `stack`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Ulimit {
    pub name: String,
    pub soft: u64,
    pub hard: u64,
}

/// The rlimit names a document may set, with their `RLIMIT_*` numbers on
/// Linux.
pub const ULIMIT_NAMES: [&str; 16] = [
    "as",
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Port {
    pub container: u32,
    /// The host port; 0 (or left out): any free port of the operator's
    /// range, chosen at create and shown in the stored document.
    #[serde(default)]
    pub host: u32,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Volume {
    pub path: String,
    #[serde(rename = "sizeGiB")]
    pub size_gib: u64,
    #[serde(default)]
    pub encrypted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Loopback only.
    #[default]
    None,
    Bridged,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Network {
    #[serde(default)]
    pub mode: NetworkMode,
    /// Egress allow-list; empty = deny all egress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
    /// IPv4 resolvers for the cell's /etc/resolv.conf: DNS (udp/tcp 53) to
    /// these is allowed, to any other address only if `egress` says so.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// Cap on the bytes per second the cell may send; `None` = no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_bytes_per_second: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressRule {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Lifetime {
    /// The lease, seconds. Unset: the operator's policy default (the
    /// supervisor writes it in before the cell is recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

impl Lifetime {
    /// The lease this document asks for: its own, or [`DEFAULT_TTL_SECONDS`].
    pub fn ttl(&self) -> u64 {
        self.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS)
    }
}

/// One hour: the lease of a document that sets none, where no operator
/// policy says otherwise.
pub const DEFAULT_TTL_SECONDS: u64 = 3600;

/// Deserialize a string map, rejecting a key given twice.
///
/// The YAML parser already refuses duplicate keys, but serde_json (like
/// `IndexMap`'s own `Deserialize`) silently keeps the last one, so
/// `{"env": {"A": "1", "A": "2"}}` would read as `A=2`: a document that
/// says two things. This makes JSON as strict as YAML.
mod unique_map {
    use std::fmt;

    use indexmap::IndexMap;
    use serde::Deserializer;
    use serde::de::{Error, MapAccess, Visitor};

    pub(super) fn deserialize<'de, D>(de: D) -> Result<IndexMap<String, String>, D::Error>
    where
        D: Deserializer<'de>,
    {
        struct UniqueMap;

        impl<'de> Visitor<'de> for UniqueMap {
            type Value = IndexMap<String, String>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // size_hint comes from the input: cap it, don't trust it.
                let mut out = IndexMap::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        // `parse` turns this wording into the path `<map>.<key>`.
                        return Err(A::Error::custom(format_args!("duplicate key `{key}`")));
                    }
                    let value = map.next_value::<String>()?;
                    out.insert(key, value);
                }
                Ok(out)
            }
        }

        de.deserialize_map(UniqueMap)
    }
}
