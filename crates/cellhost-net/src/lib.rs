//! Bridged networking for cells: a veth pair from a process cell's network
//! namespace (or a tap for a VM) to a cellhost bridge, at the address the
//! supervisor leased the cell from [`Network::pool`], and one nftables table
//! per cell and family that denies egress by default. This crate plumbs; it
//! allocates nothing and never opens the store.
//!
//! Invariants (host objects, threat model and reasons in `docs/network.md`):
//! - every object is named from the cell id alone, so `detach` works from a
//!   fresh process after a crash, and twice; `attach` replaces what an
//!   earlier attempt left;
//! - every object of a cell is found through [`Network::cells`] until it is
//!   gone: reconcile sweeps orphans by it;
//! - `attach` order: bridge, netns, link, neighbour, fdb, both tables (one
//!   `nft -f -` transaction), address and route inside the netns;
//! - `detach` removes the link first (a cell is never connected without its
//!   tables), then neighbours, tables, netns and the address's tracked flows,
//!   each checked into the `TeardownReport`; the supervisor gives the address
//!   back only when the report is clean;
//! - tools get fixed argv: generated names, validated addresses and ports.
//!
//! Design: `docs/network.md`.

pub mod rules;
pub mod subnet;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use cellhost_core::ids::CellId;
use cellhost_core::{AddressPool, TeardownReport};
use cellhost_spec::Cell;

pub use rules::{CellRules, Count, Counters, RuleError};
pub use subnet::{Subnet, mac_for, netns_name, table_name, veth_name};

/// The default bridge name.
pub const DEFAULT_BRIDGE: &str = "cellhost-br0";
/// The default bridge subnet (65 533 cells).
pub const DEFAULT_SUBNET: &str = "10.47.0.0/16";

/// Where a host's cells attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Bridge interface name (at most 15 bytes).
    pub bridge: String,
    pub subnet: Subnet,
    /// The state dir whose cells use the bridge (named in the bridge's
    /// alias: one bridge serves one state dir).
    pub store_dir: PathBuf,
    /// The host address published ports are reached on from outside;
    /// `None`: every host address. 127.0.0.1 works on the host either way.
    pub publish: Option<Ipv4Addr>,
    /// Networks no cell may reach whatever its egress rules say (the
    /// operator's policy: link-local and cloud metadata, multicast, the
    /// bridge's subnet, …): rejected before any allow rule.
    pub deny: Vec<(Ipv4Addr, u8)>,
    /// Also reject every network the host is directly connected to when a
    /// cell attaches (its LAN, other engines' bridges: an iptables accept
    /// for the bridge would otherwise carry a cell past their isolation).
    pub deny_connected: bool,
}

impl NetConfig {
    /// The default bridge and subnet, for `store_dir`'s cells.
    pub fn new(store_dir: PathBuf) -> NetConfig {
        NetConfig {
            bridge: DEFAULT_BRIDGE.into(),
            subnet: DEFAULT_SUBNET.parse().expect("default subnet parses"),
            store_dir,
            publish: None,
            deny: Vec::new(),
            deny_connected: true,
        }
    }

    /// Check the bridge name can be an interface name.
    pub fn check(&self) -> Result<(), NetError> {
        let ok = !self.bridge.is_empty()
            && self.bridge.len() <= 15
            && self
                .bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(())
        } else {
            Err(NetError::Config(format!(
                "bridge name {:?}: 1 to 15 of [A-Za-z0-9_-]",
                self.bridge
            )))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("host lacks {tool}: {detail}")]
    MissingTool { tool: &'static str, detail: String },
    #[error("network config: {0}")]
    Config(String),
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{field}: host port {port}/{protocol} is {why}")]
    PortTaken {
        field: String,
        port: u16,
        protocol: &'static str,
        why: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// The host side of a cell's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// A veth pair, its peer `eth0` in the cell's netns (process cells).
    Veth,
    /// A tap device (VM cells), owned by the uid and gid of the VM's
    /// unprivileged qemu, the only ids besides root that may attach to it.
    Tap { uid: u32, gid: u32 },
}

/// A network error as a backend reports it: a document the host cannot
/// carry out is invalid (naming the field), a missing tool is a missing
/// capability, the rest is the engine's.
pub fn backend_error(e: NetError) -> cellhost_core::BackendError {
    use cellhost_core::BackendError as B;
    match e {
        NetError::Rule(_) | NetError::PortTaken { .. } => B::Invalid(e.to_string()),
        NetError::MissingTool { tool, detail } => B::MissingCapability {
            capability: tool.into(),
            detail,
        },
        other => B::engine_from("bridged network", other),
    }
}

/// A cell's network as attached.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    /// The netns to run the workload in (process cells; VMs have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    pub bridge: String,
    /// The host end: the veth (process cells) or the tap (VMs), `chv<id>`.
    pub link: String,
    pub table: String,
    pub mac: String,
}

/// One host's bridged networking. Cheap to share; every method takes
/// `&self` and may run concurrently for different cells.
pub struct Network {
    cfg: NetConfig,
    /// The tier using this handle (`process`, `vm`, `microvm`): leases
    /// and tables carry it, and [`Network::cells`] lists only its own, so
    /// tiers sharing a bridge never sweep each other's cells.
    owner: String,
    /// When [`Network::ensure_bridge`] last found everything in place.
    ensured: Mutex<Option<std::time::Instant>>,
}

/// How long a successful [`Network::ensure_bridge`] is trusted before it
/// looks again (for a bridge deleted by hand, or a Docker started since,
/// which sets the FORWARD policy to DROP).
pub const ENSURE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").field("cfg", &self.cfg).finish()
    }
}

impl Network {
    pub fn new(cfg: NetConfig, owner: &str) -> Network {
        Network {
            cfg,
            owner: owner.to_string(),
            ensured: Mutex::new(None),
        }
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// The pool cells of this tier lease their address from: the
    /// bridge's subnet past the gateway, leases owned by this tier.
    pub fn pool(&self) -> AddressPool {
        let range = self.cfg.subnet.cell_range();
        AddressPool {
            pool: self.cfg.bridge.clone(),
            owner: self.owner.clone(),
            first: *range.start(),
            last: *range.end(),
        }
    }

    /// Check, before any side effect, that this host can attach `cell`:
    /// the tools exist, the document's network section can be expressed,
    /// and its host ports are free on the host.
    pub fn admit(&self, cell: &Cell) -> Result<(), NetError> {
        self.cfg.check()?;
        for tool in ["ip", "bridge", "nft", "conntrack"] {
            if cellhost_host::probe::which(tool).is_none() {
                return Err(NetError::MissingTool {
                    tool: match tool {
                        "ip" => "ip",
                        "bridge" => "bridge",
                        "nft" => "nft",
                        _ => "conntrack",
                    },
                    detail: format!(
                        "bridged networking runs `{tool}` (packages iproute2, nftables, conntrack)"
                    ),
                });
            }
        }
        let probe = CellId::parse("000000000000").expect("valid id");
        CellRules::for_cell(
            &probe,
            &self.cfg.bridge,
            &self.owner,
            self.cfg.subnet.gateway(),
            cell,
        )?;
        for (i, p) in cell.spec.ports.iter().enumerate() {
            let port = u16::try_from(p.host).unwrap_or(0);
            if let Err(e) = cellhost_host::ports::free(p.protocol.as_str(), port) {
                return Err(NetError::PortTaken {
                    field: format!("spec.ports.{i}.host"),
                    port,
                    protocol: p.protocol.as_str(),
                    why: format!("not free on the host ({e})"),
                });
            }
        }
        Ok(())
    }

    /// Name the network namespace of process `pid` (a cell's init, which
    /// made it inside the cell's user namespace) as cell `id`'s:
    /// `/run/netns/cellhost-<id>`, a bind mount of `/proc/<pid>/ns/net`, as
    /// `ip netns` names its own. [`Network::attach`] then uses it rather
    /// than making one, and `detach` removes the name like any other.
    pub fn pin_netns(&self, id: &CellId, pid: i32) -> Result<PathBuf, NetError> {
        let io = |context: String| move |source| NetError::Io { context, source };
        let dir = Path::new("/run/netns");
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let path = dir.join(netns_name(id));
        if path.exists() {
            // A retried create: the old name goes first.
            remove_netns(&path)?;
        }
        std::fs::File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        let src = format!("/proc/{pid}/ns/net");
        nix::mount::mount(
            Some(src.as_str()),
            &path,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| NetError::Io {
            context: format!("binding {src} at {}", path.display()),
            source: e.into(),
        })?;
        Ok(path)
    }

    /// Give process cell `id` its network at `address` (leased from
    /// [`Network::pool`]): a veth from its own netns. See the module docs
    /// for the order. On error the caller detaches (everything made so far
    /// is found by name).
    pub fn attach(
        &self,
        id: &CellId,
        cell: &Cell,
        address: Ipv4Addr,
    ) -> Result<Attachment, NetError> {
        self.attach_link(id, cell, address, Link::Veth)
    }

    /// Give VM cell `id` its network: a tap device on the bridge
    /// (`chv<id>`, the same name, rules and checks as a veth) owned by
    /// `uid`:`gid`, the ids its qemu runs as; the guest configures
    /// [`Attachment::address`] itself.
    pub fn attach_tap(
        &self,
        id: &CellId,
        cell: &Cell,
        address: Ipv4Addr,
        uid: u32,
        gid: u32,
    ) -> Result<Attachment, NetError> {
        self.attach_link(id, cell, address, Link::Tap { uid, gid })
    }

    fn attach_link(
        &self,
        id: &CellId,
        cell: &Cell,
        address: Ipv4Addr,
        link: Link,
    ) -> Result<Attachment, NetError> {
        if !self.cfg.subnet.cell_range().contains(&address) {
            return Err(NetError::Config(format!(
                "address {address} is not in {}'s cell range ({})",
                self.cfg.bridge, self.cfg.subnet
            )));
        }
        self.ensure_bridge()?;
        let mut rules = CellRules::for_cell(id, &self.cfg.bridge, &self.owner, address, cell)?;
        rules.publish = self.cfg.publish;
        rules.deny = self.cfg.deny.clone();
        if self.cfg.deny_connected {
            for n in cellhost_os::ifconfig::connected_networks() {
                if !rules.deny.contains(&n) {
                    rules.deny.push(n);
                }
            }
        }
        rules.store = self.bridge_alias();
        let a = Attachment {
            netns: (link == Link::Veth).then(|| Path::new("/run/netns").join(netns_name(id))),
            address,
            gateway: self.cfg.subnet.gateway(),
            prefix: self.cfg.subnet.prefix(),
            bridge: self.cfg.bridge.clone(),
            link: veth_name(id),
            table: table_name(id),
            mac: mac_for(id),
        };
        let ns = netns_name(id);
        // One `ip` for the host side (each spawn costs ~5 ms here).
        let mut host = String::new();
        if let Some(netns) = &a.netns
            && !netns.exists()
        {
            host.push_str(&format!("netns add {ns}\n"));
        }
        if link_exists(&a.link) {
            // A retried attach: the old link goes, the new one is made.
            host.push_str(&format!("link del {}\n", a.link));
        }
        host.push_str(&match link {
            Link::Veth => format!(
                "link add {} type veth peer name eth0 address {} netns {ns}\n",
                a.link, a.mac
            ),
            Link::Tap { uid, gid } => format!(
                "tuntap add dev {} mode tap user {uid} group {gid}\n",
                a.link
            ),
        });
        host.push_str(&format!(
            "link set {veth} master {br}\n\
             link set dev {veth} type bridge_slave isolated on learning off flood off mcast_flood off\n\
             link set {veth} up\n\
             neigh replace {ip} lladdr {mac} dev {br} nud permanent\n",
            veth = a.link,
            mac = a.mac,
            br = a.bridge,
            ip = a.address,
        ));
        run("ip", &["-batch", "-"], Some(host.as_bytes()))?;
        // The port neither learns nor floods: frames for this cell's MAC go
        // to its port alone, and no cell sees another's traffic.
        run(
            "bridge",
            &["fdb", "replace", &a.mac, "dev", &a.link, "master", "static"],
            None,
        )?;
        // Load the tables as new (replacing costs the kernel a table
        // delete, ~10 ms); if an earlier attempt left some, the `create`
        // fails the transaction and they are replaced.
        if run("nft", &["-f", "-"], Some(rules.render(false).as_bytes())).is_err() {
            run("nft", &["-f", "-"], Some(rules.render(true).as_bytes()))?;
        }

        let Some(netns) = &a.netns else {
            return Ok(a);
        };
        // Inside: IPv6 off, then lo, eth0's address and the route, by a
        // thread that joins the netns (no process to spawn).
        configure_in(
            netns,
            &cellhost_os::ifconfig::Ipv4Config {
                interface: "eth0".into(),
                address: a.address,
                prefix: a.prefix,
                gateway: Some(a.gateway),
            },
        )?;
        Ok(a)
    }

    /// Remove `id`'s network and record each check in `report`: the
    /// table, the veth, the neighbour entry, the netns, the flows of
    /// `address` (the cell's; when `None`, the one its neighbour entry
    /// names, if any).
    pub fn detach(&self, id: &CellId, address: Option<Ipv4Addr>, report: &mut TeardownReport) {
        let table = table_name(id);
        let veth = veth_name(id);
        let ns = netns_name(id);
        let mac = mac_for(id);
        let br = &self.cfg.bridge;
        let netns = Path::new("/run/netns").join(&ns);
        let address = address.or_else(|| {
            neighbours_with(br, &mac)
                .iter()
                .find_map(|a| a.parse::<Ipv4Addr>().ok())
        });
        // The link first: without it the cell has no network at all.
        // Links and neighbours in one `ip -force -batch` (the checks below
        // say what is left if a line fails).
        let mut batch = String::new();
        for ip in neighbours_with(br, &mac) {
            batch.push_str(&format!("neigh del {ip} dev {br}\n"));
        }
        if link_exists(&veth) {
            batch.push_str(&format!("link del {veth}\n"));
        }
        // "No such file": gone already (a neighbour flushed with the link);
        // the checks below are the truth either way.
        if !batch.is_empty()
            && let Err(e) = run("ip", &["-force", "-batch", "-"], Some(batch.as_bytes()))
            && !e.to_string().contains("No such file or directory")
        {
            report.error(e.to_string());
        }
        let link_left = link_exists(&veth);
        if link_left {
            // Still connected: its tables stay, so it is never connected
            // and unconfined. Reconcile retries.
            report.error(format!("{veth} is still there: its tables are kept"));
        } else {
            // Both tables in one transaction (create-then-delete: no error
            // for one that is already gone).
            let mut del = String::new();
            for family in FAMILIES {
                del.push_str(&format!(
                    "table {family} {table}\ndelete table {family} {table}\n"
                ));
            }
            if let Err(e) = run("nft", &["-f", "-"], Some(del.as_bytes())) {
                report.error(e.to_string());
            }
        }
        if let Err(e) = remove_netns(&netns) {
            report.error(e.to_string());
        }
        // Nothing of the cell can make new flows now: forget the ones the
        // host tracks for its address.
        let flows = match address {
            Some(a) if !link_left => match flush_conntrack(a, &["--orig-src", "--reply-src"]) {
                Ok(()) => 0,
                Err(e) => {
                    report.error(e.to_string());
                    1
                }
            },
            Some(_) => 1,
            None => 0,
        };

        let tables = match tables_of(&table) {
            Ok(t) => t.len() as u64,
            Err(e) => {
                report.error(e.to_string());
                1
            }
        };
        let links = u64::from(link_left);
        let neighbours = neighbours_with(br, &mac).len() as u64;
        let namespaces = u64::from(netns.exists());
        report.check("net-veth", veth.clone(), links);
        report.check("net-neighbour", format!("{mac} on {br}"), neighbours);
        report.check("net-table", format!("nft tables {table}"), tables);
        report.check("net-netns", netns.display().to_string(), namespaces);
        let target = address.map_or_else(|| "no lease".into(), |a| format!("flows of {a}"));
        report.check("net-conntrack", target, flows);
    }

    /// [`Network::detach`] if `id` has an address or any network object,
    /// else nothing (a cell with `network.mode: none`). The supervisor
    /// leases the address before create and gives it back after a clean
    /// teardown, so a cell without one, a veth, a netns or a neighbour
    /// entry has no table either.
    pub fn detach_if_any(
        &self,
        id: &CellId,
        address: Option<Ipv4Addr>,
        report: &mut TeardownReport,
    ) {
        if address.is_some()
            || link_exists(&veth_name(id))
            || Path::new("/run/netns").join(netns_name(id)).exists()
            || !neighbours_with(&self.cfg.bridge, &mac_for(id)).is_empty()
        {
            self.detach(id, address, report);
        }
    }

    /// Every cell of this owner with a network object on this bridge: the
    /// tables carrying its comment, and (process cells) veth ports named
    /// `chv<id>`. (A tap cannot tell a vm from a microVM, so VM tiers skip
    /// the port scan; their tables are made with the tap.) Reconcile
    /// destroys those without a record.
    pub fn cells(&self) -> Result<Vec<CellId>, NetError> {
        let store = self.bridge_alias();
        let mut ids: Vec<CellId> = Vec::new();
        for (name, comment) in cellhost_table_comments() {
            if let Some(id) = subnet::id_in(&name, "cellhost_")
                && comment == CellRules::comment(&id, &self.cfg.bridge, &self.owner, &store)
            {
                ids.push(id);
            }
        }
        // Ports only on a bridge this store owns (another's cells are not
        // ours to sweep).
        if self.owner == "process" && self.bridge_is_ours() {
            let brif = Path::new("/sys/class/net")
                .join(&self.cfg.bridge)
                .join("brif");
            for e in std::fs::read_dir(brif).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_tap = Path::new("/sys/class/net")
                    .join(&name)
                    .join("tun_flags")
                    .exists();
                if let Some(id) = subnet::id_in(&name, "chv")
                    && !is_tap
                {
                    ids.push(id);
                }
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// The cell's counters, or `None` when it has no table.
    pub fn counters(&self, id: &CellId) -> Result<Option<Counters>, NetError> {
        let table = table_name(id);
        let out = run("nft", &["-j", "list", "counters"], None)?;
        let has_table = String::from_utf8_lossy(&out).contains(&format!("\"{table}\""));
        if !has_table {
            return Ok(None);
        }
        rules::parse_counters(&out, &table)
            .map(Some)
            .map_err(|detail| NetError::Command {
                command: "nft -j list counters".into(),
                detail,
            })
    }

    /// The cell's counters as live tier details: `{"network": {"counters":
    /// …}}`, or `None` when it has no table.
    pub fn live_details(&self, id: &CellId) -> Result<Option<serde_json::Value>, NetError> {
        Ok(self
            .counters(id)?
            .map(|c| serde_json::json!({ "network": { "counters": c } })))
    }

    /// Create the bridge if missing, give it the gateway address, and set
    /// what forwarding needs. Runs before every attach; a success is
    /// trusted for [`ENSURE_INTERVAL`], so a Docker started later (FORWARD
    /// policy DROP) is met within that.
    pub fn ensure_bridge(&self) -> Result<(), NetError> {
        let mut ensured = self.ensured.lock().unwrap_or_else(PoisonError::into_inner);
        // The alias is checked every time (one sysfs read): a bridge taken
        // over by another store since is refused at once.
        if ensured.is_some_and(|at| at.elapsed() < ENSURE_INTERVAL) && self.bridge_is_ours() {
            return Ok(());
        }
        self.ensure_bridge_now()?;
        *ensured = Some(std::time::Instant::now());
        Ok(())
    }

    fn ensure_bridge_now(&self) -> Result<(), NetError> {
        self.cfg.check()?;
        let br = &self.cfg.bridge;
        let gw = format!("{}/{}", self.cfg.subnet.gateway(), self.cfg.subnet.prefix());
        if !link_exists(br) {
            // Two creates racing: the loser's "File exists" is fine.
            if let Err(e) = run("ip", &["link", "add", br, "type", "bridge"], None)
                && !link_exists(br)
            {
                return Err(e);
            }
        }
        let sys = Path::new("/sys/class/net").join(br);
        if !sys.join("bridge").exists() {
            return Err(NetError::Config(format!(
                "{br} exists and is not a bridge: choose another --bridge"
            )));
        }
        // One bridge, one store: leases live in the store, so two state
        // dirs sharing a bridge would hand out one address twice and sweep
        // each other's cells. The bridge's alias names its store.
        let mine = self.bridge_alias();
        // Read and claim under a host-wide lock on the bridge's name: two
        // stores starting at once cannot both find it unclaimed.
        let _claim = claim_lock(br)?;
        let alias = std::fs::read_to_string(sys.join("ifalias")).unwrap_or_default();
        match alias.trim() {
            "" => {
                run("ip", &["link", "set", br, "alias", &mine], None)?;
            }
            a if a == mine => {}
            other => {
                return Err(NetError::Config(format!(
                    "bridge {br} belongs to another cellhost state dir ({other}, this one is {mine}): give this one its own --bridge and --bridge-subnet"
                )));
            }
        }
        let addrs = ipv4_addrs(br)?;
        if let Some(other) = addrs.iter().find(|a| **a != gw) {
            return Err(NetError::Config(format!(
                "bridge {br} has address {other}, not {gw}: another subnet was configured for it"
            )));
        }
        if addrs.is_empty() {
            // `replace`: a tier racing us to it is no error.
            run("ip", &["addr", "replace", &gw, "dev", br], None)?;
        }
        run("ip", &["link", "set", br, "up"], None)?;
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        write_sysctl(&format!("/proc/sys/net/ipv4/conf/{br}/route_localnet"), "1")?;
        self.forward_accepts(true)
    }

    /// Does the bridge exist with this store's alias?
    fn bridge_is_ours(&self) -> bool {
        std::fs::read_to_string(
            Path::new("/sys/class/net")
                .join(&self.cfg.bridge)
                .join("ifalias"),
        )
        .is_ok_and(|a| a.trim() == self.bridge_alias())
    }

    /// `cellhost:<hash of the store dir>`: whose bridge this is.
    fn bridge_alias(&self) -> String {
        let dir = std::fs::canonicalize(&self.cfg.store_dir)
            .or_else(|_| std::path::absolute(&self.cfg.store_dir))
            .unwrap_or_else(|_| self.cfg.store_dir.clone());
        // FNV-1a: stable across builds (std's hasher is not).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in dir.as_os_str().as_encoded_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("cellhost:{h:016x}")
    }

    /// Remove the bridge and its iptables accepts (tests and benchmarks
    /// that made their own bridge). Cells still attached lose their
    /// network.
    pub fn remove_bridge(&self) -> Result<(), NetError> {
        *self.ensured.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.forward_accepts(false)?;
        if link_exists(&self.cfg.bridge) {
            run("ip", &["link", "del", &self.cfg.bridge], None)?;
        }
        Ok(())
    }

    /// `-i/-o <bridge> -j ACCEPT` in DOCKER-USER (or FORWARD) where the
    /// FORWARD policy is DROP; removed with `add == false`.
    fn forward_accepts(&self, add: bool) -> Result<(), NetError> {
        if cellhost_host::probe::which("iptables").is_none() {
            return Ok(());
        }
        let br = self.cfg.bridge.as_str();
        let chains: Vec<&str> = if add {
            let docker = run("iptables", &["-S", "DOCKER-USER"], None).is_ok();
            let drop = run("iptables", &["-S", "FORWARD"], None)
                .map(|o| String::from_utf8_lossy(&o).contains("-P FORWARD DROP"))
                .unwrap_or(false);
            match (docker, drop) {
                (true, _) => vec!["DOCKER-USER"],
                (false, true) => vec!["FORWARD"],
                (false, false) => vec![],
            }
        } else {
            vec!["DOCKER-USER", "FORWARD"]
        };
        for chain in chains {
            for dir in ["-i", "-o"] {
                let rule = [dir, br, "-j", "ACCEPT"];
                let has =
                    |c: &str| run("iptables", &[&["-C", c][..], &rule[..]].concat(), None).is_ok();
                if add && !has(chain) {
                    run(
                        "iptables",
                        &[&["-I", chain, "1"][..], &rule[..]].concat(),
                        None,
                    )?;
                }
                while !add && has(chain) {
                    run("iptables", &[&["-D", chain][..], &rule[..]].concat(), None)?;
                }
            }
        }
        Ok(())
    }
}

/// Removes a bridge (and its iptables accepts) when dropped: for tests and
/// benchmarks that make a bridge of their own.
pub struct RemoveBridgeOnDrop(pub NetConfig);

impl Drop for RemoveBridgeOnDrop {
    fn drop(&mut self) {
        // remove_bridge does not look at the owner.
        if let Err(e) = Network::new(self.0.clone(), "").remove_bridge() {
            tracing::warn!("removing bridge {}: {e}", self.0.bridge);
        }
    }
}

/// Run `program args` through the shared tool runner (cleared env,
/// deadline, capped stderr), feeding `stdin`; its stdout, or an error
/// naming the command with its stderr.
fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>, NetError> {
    let argv: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    cellhost_host::tool::output(Path::new(program), &argv, stdin).map_err(|e| NetError::Command {
        command: format!("{program} {}", args.join(" ")),
        detail: e.to_string(),
    })
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The families a cell's tables have (both, or none).
const FAMILIES: [&str; 2] = ["netdev", "inet"];

/// `(family, name)` of every nftables table on the host.
fn all_tables() -> Result<Vec<(String, String)>, NetError> {
    let out = run("nft", &["-j", "list", "tables"], None)?;
    let unreadable = |detail: String| NetError::Command {
        command: "nft -j list tables".into(),
        detail,
    };
    let v: serde_json::Value =
        serde_json::from_slice(&out).map_err(|e| unreadable(format!("unreadable JSON: {e}")))?;
    let items = v["nftables"]
        .as_array()
        .ok_or_else(|| unreadable("no \"nftables\" array".into()))?;
    Ok(items
        .iter()
        .filter_map(|i| {
            let t = &i["table"];
            Some((
                t["family"].as_str()?.to_string(),
                t["name"].as_str()?.to_string(),
            ))
        })
        .collect())
}

/// Families in which `table` exists.
fn tables_of(table: &str) -> Result<Vec<String>, NetError> {
    Ok(all_tables()?
        .into_iter()
        .filter(|(f, n)| n == table && FAMILIES.contains(&f.as_str()))
        .map(|(f, _)| f)
        .collect())
}

/// `(name, comment)` of every table that looks like ours, from one `nft
/// list ruleset` (nft 1.0's JSON omits table comments; its text has them,
/// first inside the table). Empty when nft cannot say: then nothing is
/// swept, the safe side. Reconcile calls this every pass, so one process
/// for all tables.
fn cellhost_table_comments() -> Vec<(String, String)> {
    let Ok(out) = run("nft", &["list", "ruleset"], None) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&out);
    let mut found = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let mut words = line.strip_prefix("table ").unwrap_or("").split_whitespace();
        let (Some(family), Some(name)) = (words.next(), words.next()) else {
            continue;
        };
        if !FAMILIES.contains(&family) || !name.starts_with("cellhost_") {
            continue;
        }
        if let Some(comment) = lines
            .next()
            .and_then(|l| l.trim().strip_prefix("comment \""))
            .and_then(|c| c.strip_suffix('"'))
        {
            found.push((name.to_string(), comment.to_string()));
        }
    }
    found
}

/// IPv4 addresses of `dev` as `a.b.c.d/p`.
fn ipv4_addrs(dev: &str) -> Result<Vec<String>, NetError> {
    let out = run("ip", &["-j", "-4", "addr", "show", "dev", dev], None)?;
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| {
            Some(format!(
                "{}/{}",
                a["local"].as_str()?,
                a["prefixlen"].as_u64()?
            ))
        })
        .collect())
}

/// Addresses the bridge's neighbour table maps to `mac` (from
/// /proc/net/arp: no process to spawn).
fn neighbours_with(bridge: &str, mac: &str) -> Vec<String> {
    let arp = std::fs::read_to_string("/proc/net/arp").unwrap_or_default();
    arp.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[3].eq_ignore_ascii_case(mac) && f[5] == bridge)
                .then(|| f[0].to_string())
        })
        .collect()
}

/// Forget the host's tracked flows of `address` (`conntrack -D`, one run
/// per direction flag: `--orig-src`, `--reply-src`). "0 flow entries" is
/// success (conntrack exits 1 for it).
fn flush_conntrack(address: Ipv4Addr, flags: &[&str]) -> Result<(), NetError> {
    let a = address.to_string();
    for flag in flags {
        match run("conntrack", &["-D", "-f", "ipv4", flag, &a], None) {
            Ok(_) => {}
            Err(NetError::Command { detail, .. }) if detail.contains("0 flow entries") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An exclusive lock on `/run/cellhost/bridge-<name>.lock`, held while a
/// store claims the bridge.
fn claim_lock(bridge: &str) -> Result<nix::fcntl::Flock<std::fs::File>, NetError> {
    let dir = Path::new("/run/cellhost");
    let io = |context: String| move |source| NetError::Io { context, source };
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let path = dir.join(format!("bridge-{bridge}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| NetError::Io {
        context: format!("locking {}", path.display()),
        source: e.into(),
    })
}

/// What `ip netns del` does, without a process: detach the bind mount
/// that keeps the netns alive by name, then remove the file. The netns
/// itself ends with its last process.
fn remove_netns(path: &Path) -> Result<(), NetError> {
    if !path.exists() {
        return Ok(());
    }
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {} // not a mount point
        Err(e) => {
            return Err(NetError::Io {
                context: format!("unmounting {}", path.display()),
                source: e.into(),
            });
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(NetError::Io {
            context: format!("removing {}", path.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Configure the netns at `path`: IPv6 off (cells have IPv4 only; its
/// autoconf chatter would fill the `ipv6` counter), then `c`. A
/// short-lived thread joins the netns (setns affects only the calling
/// thread); /proc/sys/net resolves in the writer's netns.
fn configure_in(path: &Path, c: &cellhost_os::ifconfig::Ipv4Config) -> Result<(), NetError> {
    let (path, c) = (path.to_path_buf(), c.clone());
    std::thread::spawn(move || -> Result<(), NetError> {
        let io_err = |context: String| move |source| NetError::Io { context, source };
        let ns =
            std::fs::File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Io {
            context: format!("joining {}", path.display()),
            source: e.into(),
        })?;
        for conf in ["all", "default"] {
            write_sysctl(&format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")?;
        }
        cellhost_os::ifconfig::apply(&c).map_err(io_err(format!(
            "configuring {} in {}",
            c.interface,
            path.display()
        )))
    })
    .join()
    .map_err(|_| NetError::Config("the netns thread panicked".into()))?
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetError> {
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(path, value).map_err(|source| NetError::Io {
        context: format!("writing {path}"),
        source,
    })
}
