//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cellhost",
    version,
    about = "Rent isolated compute cells: process, container, vm, microvm."
)]
pub struct Cli {
    /// Where cellhost keeps its store and per-cell state.
    #[arg(
        long,
        global = true,
        env = "CELLHOST_STATE_DIR",
        default_value = "/var/lib/cellhost"
    )]
    pub state_dir: PathBuf,
    /// Print data as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// The daemon's API for detached commands: unix:/path or tcp:host:port.
    #[arg(
        long,
        global = true,
        env = "CELLHOST_API",
        default_value = "unix:/run/cellhost/api.sock"
    )]
    pub api: String,
    /// File holding the bearer token for a tcp: API (never pass the token
    /// itself on the command line).
    #[arg(long, global = true, env = "CELLHOST_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// More detail on errors and progress (-vv for debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a cell in the foreground: create, stream output, destroy.
    Run(RunArgs),
    /// Check a cell document and list every problem (exit 3 if invalid).
    Validate {
        /// Cell document (YAML or JSON); `-` for stdin.
        file: PathBuf,
    },
    /// Tell what this host can run, and why not.
    Doctor {
        /// Also boot a probe VM under KVM (takes seconds) to tell whether
        /// /dev/kvm really runs guests.
        #[arg(long)]
        kvm_boot: bool,
    },
    /// Measure the cost of cells against baselines in the same run.
    Bench(BenchArgs),
    /// Manage the local image store of the vm and microvm tiers.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Run the supervisor daemon: store, leases, reconcile, metering, API.
    Serve(ServeArgs),
    /// Create (and start) a cell on the daemon; prints its id.
    Create {
        /// Cell document (YAML or JSON); `-` for stdin. `file`/`env`
        /// secrets are read here and sent inline over the API.
        file: PathBuf,
        /// Create without starting (start later with `cellhost start`).
        #[arg(long)]
        no_start: bool,
        /// Key of the document's encrypted volume (see `run`).
        #[arg(long, value_name = "FILE")]
        volume_key_file: Option<PathBuf>,
    },
    /// Start a created cell (or a stopped one, where the tier can).
    Start {
        id: String,
        /// Reopen the cell's encrypted volume with this key (it is closed
        /// while the cell is stopped).
        #[arg(long, value_name = "FILE")]
        volume_key_file: Option<PathBuf>,
    },
    /// Stop a cell's workload (SIGTERM, then SIGKILL after the grace).
    Stop {
        id: String,
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(long)]
        grace: Option<u64>,
    },
    /// Destroy a cell and print its TeardownReport.
    Rm { id: String },
    /// List cells.
    Ls,
    /// Show one cell, with its metered usage.
    Inspect { id: String },
    /// Print a cell's output.
    Logs {
        id: String,
        /// Keep printing new output until the cell ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command in a running cell: `cellhost exec ID -- CMD ARGS...`.
    Exec {
        id: String,
        /// Environment of the command, KEY=VALUE (repeatable); nothing else
        /// is passed.
        #[arg(short, long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Seconds before the command is killed.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Working directory inside the cell.
        #[arg(long)]
        cwd: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Extend a cell's lease by SECONDS.
    Extend { id: String, seconds: u64 },
    /// Print the event log (CloudEvents JSON, one a line).
    Events {
        /// Keep streaming new events.
        #[arg(short, long)]
        follow: bool,
    },
    /// Show this node's resources, capacity and reservations.
    Node,
    /// Rent cells from providers over Nostr, paying with Cashu tokens.
    #[command(subcommand)]
    Market(MarketCommand),
}

/// Where a consumer talks, and as whom.
#[derive(Debug, Clone, Args)]
pub struct MarketOpt {
    /// Relay to use (repeatable; ws:// or wss://).
    #[arg(
        long = "relay",
        value_name = "URL",
        env = "CELLHOST_MARKET_RELAYS",
        value_delimiter = ','
    )]
    pub relays: Vec<String>,
    /// Your Nostr secret key (hex or nsec, file mode 0600); generated there
    /// on first use. Default: $XDG_CONFIG_HOME/cellhost/nostr.key (or
    /// ~/.config/...). Cells you rent belong to this key.
    #[arg(long, value_name = "FILE", env = "CELLHOST_MARKET_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// Seconds to wait for relays and for the provider's reply.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum MarketCommand {
    /// List offers (signed by the key they name), live ones first.
    Offers {
        #[command(flatten)]
        opt: MarketOpt,
        /// Only providers with this tier available.
        #[arg(long)]
        tier: Option<String>,
        /// Only tiers at most this price, msat per second.
        #[arg(long, value_name = "MSAT")]
        max_price: Option<u64>,
    },
    /// Rent a cell: pay with a token, wait for the access details.
    Rent {
        #[command(flatten)]
        opt: MarketOpt,
        /// The provider (npub1… or hex), as `market offers` lists it.
        offer: String,
        #[arg(long)]
        tier: String,
        /// File holding the Cashu token (`-` for stdin); tokens are money,
        /// so never on the command line.
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
        /// Cell document to run (default: the provider's template).
        #[arg(long, value_name = "FILE")]
        doc: Option<PathBuf>,
        /// Key of the document's encrypted volume.
        #[arg(long, value_name = "FILE")]
        volume_key_file: Option<PathBuf>,
        /// An SSH public key file, installed as the secret ssh_authorized_keys.
        #[arg(long, value_name = "FILE")]
        ssh_key_file: Option<PathBuf>,
        /// A password file, installed as the secret `password`.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Pay for more time on a cell you rented.
    Topup {
        #[command(flatten)]
        opt: MarketOpt,
        offer: String,
        cell: String,
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
    },
    /// Show a cell you rented.
    Status {
        #[command(flatten)]
        opt: MarketOpt,
        offer: String,
        cell: String,
    },
    /// Destroy a cell you rented (unused time is not refunded).
    Stop {
        #[command(flatten)]
        opt: MarketOpt,
        offer: String,
        cell: String,
    },
    /// Show a cell you rented, through the provider's tenant API (your key
    /// signs the request; the offer pins the certificate).
    Inspect {
        #[command(flatten)]
        opt: MarketOpt,
        offer: String,
        cell: String,
    },
    /// Print a rented cell's output (stdout and stderr, as written).
    Logs {
        #[command(flatten)]
        opt: MarketOpt,
        offer: String,
        cell: String,
        /// Keep printing new output until the cell ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command in a rented cell; exits with its exit code.
    Exec {
        #[command(flatten)]
        opt: MarketOpt,
        offer: String,
        cell: String,
        /// Killed after this many seconds.
        #[arg(long, default_value_t = 30)]
        exec_timeout: u64,
        /// The program and its arguments (after `--`).
        #[arg(required = true, last = true)]
        argv: Vec<String>,
    },
    /// Reach a port inside a rented cell from a local port: each local
    /// connection is a TCP stream to the cell's port, carried over the
    /// tenant API (a WebSocket). No host port is published. Runs until
    /// interrupted.
    PortForward {
        #[command(flatten)]
        opt: MarketOpt,
        offer: String,
        cell: String,
        /// `[LOCAL_ADDR:]LOCAL_PORT:CELL_PORT` (the local address defaults
        /// to 127.0.0.1; local port 0 picks a free one, printed).
        forward: String,
    },
    /// Wait for the answer to a request sent earlier (the id a timed-out
    /// rent, topup, status or stop printed). A provider that crashed
    /// mid-request sends it when it is back: the cell, or a refund.
    Reply {
        #[command(flatten)]
        opt: MarketOpt,
        offer: String,
        request: String,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The operator's unix socket (created 0600; its directory 0700 when
    /// cellhost creates it).
    #[arg(long, default_value = "/run/cellhost/api.sock")]
    pub socket: PathBuf,
    /// Also listen on TCP for tenants, e.g. tcp:127.0.0.1:7070 (needs
    /// --tokens).
    #[arg(long, value_name = "tcp:HOST:PORT")]
    pub listen: Option<String>,
    /// Bearer tokens for --listen (and --tenant-listen): lines of `owner
    /// token`, file mode 0600.
    #[arg(long, value_name = "FILE")]
    pub tokens: Option<PathBuf>,
    /// Serve the tenant API over TLS here, e.g. 0.0.0.0:7443. Tenants are
    /// Nostr keys signing each request (NIP-98), plus --tokens' owners.
    /// The certificate is self-signed, made on first start in
    /// `<state>/tls/`; the market's offer carries its fingerprint.
    #[arg(long, value_name = "HOST:PORT")]
    pub tenant_listen: Option<std::net::SocketAddr>,
    /// The URL consumers reach --tenant-listen at, which signed requests
    /// must name (default https://HOST:PORT of --tenant-listen; required
    /// when that host is 0.0.0.0 or ::).
    #[arg(long, value_name = "URL")]
    pub tenant_url: Option<String>,
    /// Name of this node in events and /v1/node (default: hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    /// CPUs cells may reserve = logical CPUs × this.
    #[arg(long, default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Memory cells may reserve = (total − reserve) × this.
    #[arg(long, default_value_t = 1.0)]
    pub memory_overcommit: f64,
    /// Memory kept for the host, MiB.
    #[arg(long, default_value_t = 256)]
    pub reserve_memory_mib: u64,
    /// The operator's policy: what a tenant may ask for (tiers, images,
    /// default and maximum resources, lease, ports, egress, per-tenant
    /// caps); default /etc/cellhost/policy.yaml when it exists, else
    /// built-in defaults (see README, "Operator policy").
    #[arg(long, value_name = "FILE", env = "CELLHOST_POLICY")]
    pub policy: Option<PathBuf>,
    /// Seconds between reconcile passes.
    #[arg(long, default_value_t = 3)]
    pub reconcile_interval: u64,
    /// Seconds per metering interval.
    #[arg(long, default_value_t = 5)]
    pub meter_interval: u64,
    /// Restart policy of container cells: `no` (the cell ends when its
    /// workload does) or `unless-stopped` (dockerd restarts it after a
    /// crash or its own restart).
    #[arg(long, value_enum, default_value = "no")]
    pub container_restart: ContainerRestart,
    /// Host address container cells publish their ports on.
    #[arg(long, default_value = "0.0.0.0")]
    pub publish_address: std::net::IpAddr,
    #[command(flatten)]
    pub volume: VolumeEngineOpt,
    #[command(flatten)]
    pub net: NetOpt,
    /// Also sell cells over Nostr for Cashu, as this market config says
    /// (relays, mints, per-tier size and price). Keys and the wallet live
    /// in `<state>/market/`.
    #[arg(long, value_name = "FILE")]
    pub market: Option<PathBuf>,
}

/// Where bridged process cells attach, shared by `run` and `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct NetOpt {
    /// Bridge for `network.mode: bridged` cells (created when missing).
    #[arg(long, env = "CELLHOST_BRIDGE", default_value = cellhost_net::DEFAULT_BRIDGE)]
    pub bridge: String,
    /// The bridge's IPv4 subnet: its first address is the bridge's (the
    /// cells' gateway); cells lease the rest.
    #[arg(long, env = "CELLHOST_BRIDGE_SUBNET", default_value = cellhost_net::DEFAULT_SUBNET)]
    pub bridge_subnet: cellhost_net::Subnet,
    /// Where bridged cells' ports are published from outside (`serve`'s
    /// `--publish-address`); `None`: every host address.
    #[arg(skip)]
    pub publish: Option<std::net::Ipv4Addr>,
}

impl Default for NetOpt {
    fn default() -> NetOpt {
        NetOpt {
            bridge: cellhost_net::DEFAULT_BRIDGE.into(),
            bridge_subnet: cellhost_net::DEFAULT_SUBNET
                .parse()
                .expect("default subnet parses"),
            publish: None,
        }
    }
}

impl NetOpt {
    /// The tiers' bridge settings.
    pub fn bridge(&self) -> cellhost_supervisor::tiers::BridgeSettings {
        cellhost_supervisor::tiers::BridgeSettings {
            bridge: self.bridge.clone(),
            subnet: self.bridge_subnet,
            publish: self.publish,
        }
    }
}

/// `--volume-engine`, shared by `run` and `serve`.
#[derive(Debug, clap::Args)]
pub struct VolumeEngineOpt {
    /// Encrypted-volume engine: auto (dm-crypt where the kernel has
    /// device-mapper, else userspace), dm-crypt or userspace.
    #[arg(long, env = "CELLHOST_VOLUME_ENGINE", default_value = "auto", value_parser = clap::value_parser!(VolumeEngineArg))]
    pub volume_engine: VolumeEngineArg,
}

/// `--volume-engine`, parsed by the volume crate.
#[derive(Debug, Clone, Copy)]
pub struct VolumeEngineArg(pub cellhost_volume::EngineChoice);

impl std::str::FromStr for VolumeEngineArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(VolumeEngineArg)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ContainerRestart {
    No,
    UnlessStopped,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Cell document (YAML or JSON); `-` for stdin.
    pub file: PathBuf,
    /// Key of the document's encrypted volume (`spec.volume.encrypted`):
    /// a file holding 32 bytes, raw, as 64 hex digits or as base64. Read
    /// once, held in memory only.
    #[arg(long, value_name = "FILE")]
    pub volume_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub volume: VolumeEngineOpt,
    #[command(flatten)]
    pub net: NetOpt,
    /// Owner recorded for the cell.
    #[arg(long, default_value = "local")]
    pub owner: String,
    /// The operator's policy (what a document may ask for); default
    /// /etc/cellhost/policy.yaml when it exists, else built-in defaults.
    #[arg(long, value_name = "FILE", env = "CELLHOST_POLICY")]
    pub policy: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which tier to measure.
    #[arg(value_enum)]
    pub tier: BenchTier,
    /// Number of cells (and baseline runs) to measure.
    #[arg(long, default_value_t = 200)]
    pub cells: usize,
    /// Creates in flight at once (bench api).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// The cellhost-agent binary (bench guest); default: next to this
    /// executable.
    #[arg(long, env = "CELLHOST_AGENT", value_name = "PATH")]
    pub agent: Option<std::path::PathBuf>,
    /// An unpacked Debian kernel package (boot/vmlinuz-*,
    /// `lib/modules/<v>`) for bench microvm.
    #[arg(long, env = "CELLHOST_TEST_KERNEL_DIR", value_name = "DIR")]
    pub kernel_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BenchTier {
    /// Process cells against `unshare` and `docker run` baselines.
    Process,
    /// Process cells through the daemon's API against the library-direct
    /// path.
    Api,
    /// Container cells through the Engine API (bollard) against `docker
    /// run -d` / `docker run --rm` via the CLI.
    Container,
    /// Encrypted volumes per engine (ready time, write MB/s) against a
    /// plain loop-mounted ext4; `--cells` is the rounds (at most 20).
    Volume,
    /// The guest channel: ping and exec of /bin/true to a cellhost-agent
    /// over a unix socket against a raw unix-socket echo; `--cells` × 10
    /// pings, `--cells` execs.
    Guest,
    /// microVM boot to a ready agent (create: launch, boot, hello, env)
    /// against a bare `qemu -M microvm` boot of the same kernel to an init
    /// that powers off, interleaved; `--cells` boots each (at most 50).
    /// Needs --kernel-dir and the static agent (--agent or
    /// CELLHOST_AGENT_STATIC).
    Microvm,
    /// A bridged process cell from create to its first packet on the host
    /// against a `network.mode: none` cell to its first output, interleaved
    /// (at most 100 each); its own bridge and subnet, removed at the end.
    Network,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Copy a rootfs (process), a kernel/initrd (microvm) or a base disk
    /// (vm) into the store.
    Import {
        name: String,
        /// A root filesystem for process cells: a directory or a tarball
        /// (plain or gzip), copied into a read-only ext4 image.
        #[arg(long, value_name = "DIR|TARBALL", conflicts_with_all = ["kernel", "initrd", "disk", "append"])]
        rootfs: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        kernel: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        initrd: Option<PathBuf>,
        /// Base disk (qcow2 or raw); cells get a qcow2 overlay on it.
        #[arg(long, value_name = "FILE")]
        disk: Option<PathBuf>,
        /// Extra kernel command line (direct kernel boot).
        #[arg(long)]
        append: Option<String>,
        /// Replace an image of the same name.
        #[arg(long)]
        replace: bool,
    },
    /// Build a microvm image: the kernel plus an initramfs holding the
    /// static cellhost-agent as PID 1, the rootfs dir and kernel modules.
    Initramfs {
        name: String,
        #[arg(long, value_name = "FILE")]
        kernel: PathBuf,
        /// The static agent (scripts/build-agent; env CELLHOST_AGENT_STATIC).
        #[arg(long, value_name = "FILE", env = "CELLHOST_AGENT_STATIC")]
        agent: PathBuf,
        /// A directory copied into the initramfs (busybox, the workload).
        #[arg(long, value_name = "DIR")]
        rootfs: Option<PathBuf>,
        /// The guest kernel's `lib/modules/<version>` (for modular kernels).
        #[arg(long, value_name = "DIR")]
        modules_dir: Option<PathBuf>,
        /// Modules to load at boot, dependencies added (default with
        /// --modules-dir: virtio_mmio virtio_console virtio_blk).
        #[arg(long = "module", value_name = "NAME")]
        modules: Vec<String>,
        #[arg(long)]
        append: Option<String>,
        #[arg(long)]
        replace: bool,
    },
    /// List the store's images.
    Ls,
    /// Show one image's manifest (files, digests).
    Inspect { name: String },
    /// Recompute an image's digests (exit 1 when a file changed).
    Verify { name: String },
    /// Remove an image.
    Rm { name: String },
}
