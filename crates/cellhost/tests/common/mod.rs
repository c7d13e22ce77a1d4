//! Shared helpers for the real (root, cgroups, namespaces) tier tests.
#![allow(dead_code)]

pub mod daemon;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellhost_core::ids::CellId;
use cellhost_core::{Backend, CellHandle, CellState, CellStatus, CreateRequest, SecretValue};
use cellhost_process::{ProcessBackend, ProcessConfig, ShimCommand};
use cellhost_spec::Cell;

/// Why this host cannot run process cells, or None when it can. Tests that
/// need the process tier print this and return (a capability probe, never a
/// silent skip).
pub fn process_tier_missing() -> Option<String> {
    let report = cellhost_host::probe::probe(&Default::default());
    let tier = report.tier(cellhost_spec::Isolation::Process);
    (!tier.ok).then(|| tier.detail.clone())
}

#[macro_export]
macro_rules! require_process_tier {
    () => {
        if let Some(why) = common::process_tier_missing() {
            eprintln!(
                "SKIP {}: process tier unavailable on this host: {why}",
                module_path!()
            );
            return;
        }
    };
}

/// Why this host cannot make encrypted volumes (no engine), or None.
pub fn volume_engine_missing() -> Option<String> {
    cellhost_volume::probe()
        .choose(cellhost_volume::EngineChoice::Auto)
        .err()
}

#[macro_export]
macro_rules! require_volume_engine {
    () => {
        if let Some(why) = common::volume_engine_missing() {
            eprintln!("SKIP {}: no encrypted-volume engine: {why}", module_path!());
            return;
        }
    };
}

/// A temp state dir for the `cellhost` binary. On drop it also removes the
/// (by then empty) cgroup group the binary's process tier made for it, so
/// tests leave no cgroup directories behind.
pub struct StateDir(tempfile::TempDir);

impl StateDir {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let tag = cellhost_process::hostfs::instance_tag(&self.path().join("process"));
        cellhost_process::hostfs::remove_instance_group(&tag);
    }
}

pub fn state_dir() -> StateDir {
    StateDir(tempfile::tempdir().expect("tempdir"))
}

/// The local image the container tests run (scripts/test imports it from
/// busybox-static; no registry is reachable).
pub const DOCKER_TEST_IMAGE: &str = "cellhost-test/busybox:latest";

/// Is a dockerd with [`DOCKER_TEST_IMAGE`] here (and are we root)? Prints
/// why not: container tests skip on that.
pub fn docker_ready() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: not root");
        return false;
    }
    let ok = std::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", DOCKER_TEST_IMAGE])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: no dockerd with {DOCKER_TEST_IMAGE} (scripts/test sets both up)");
    }
    ok
}

/// Ctrl-C a `cellhost run` child: its exit status and all it wrote on
/// stderr (which must be piped).
pub fn interrupt(mut child: std::process::Child) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

/// `cellhost --state-dir <state>`, ready for more arguments.
pub fn cellhost(state: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(cellhost_bin());
    c.arg("--state-dir").arg(state);
    c
}

/// `cellhost --state-dir <state> serve` as the daemon tests run it: fast
/// reconcile and metering ticks, the API on `socket`, quiet libcontainer
/// logs, stdin and stdout closed. Add flags, stderr, then spawn.
pub fn serve_command(state: &Path, socket: &Path) -> std::process::Command {
    let mut c = cellhost(state);
    c.args([
        "serve",
        "--reconcile-interval",
        "1",
        "--meter-interval",
        "1",
        "--socket",
    ])
    .arg(socket)
    .env("CELLHOST_LOG", "info,libcontainer=error,libcgroups=error")
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null());
    c
}

/// SIGTERM `child` (a daemon's clean shutdown) and reap it.
pub fn terminate(mut child: std::process::Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

/// A two-worker runtime, for tests whose servers (relay, mint) run in the
/// test process while it waits on them.
pub fn rt_multi() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn cellhost_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cellhost"))
}

/// The tests' log cap: small, so the cap test stays quick.
pub const LOG_CAP: u64 = 256 * 1024;

/// A backend with its own state dir under a temp dir.
pub struct Tier {
    pub backend: ProcessBackend,
    pub dir: tempfile::TempDir,
    /// Every cell this test made: destroyed on drop, so a failing test
    /// leaves no processes, cgroups or mounts behind for the next one.
    made: std::sync::Mutex<Vec<CellHandle>>,
}

impl Drop for Tier {
    fn drop(&mut self) {
        let made = std::mem::take(&mut *self.made.lock().unwrap_or_else(|e| e.into_inner()));
        let instance = self.backend.cgroup_instance().to_string();
        if made.is_empty() {
            cellhost_process::hostfs::remove_instance_group(&instance);
            return;
        }
        let backend = self.backend.clone();
        // A fresh thread: drop may run inside a test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = rt();
            for h in made {
                if rt.block_on(backend.destroy(&h)).is_ok_and(|r| r.is_clean()) {
                    release_uids(&h);
                }
            }
        })
        .join();
        cellhost_process::hostfs::remove_instance_group(&instance);
    }
}

/// The host-wide uid claims the tests' own cells take, as the supervisor's
/// do (`/run/cellhost/uids`), under a store name of this test process.
fn claims() -> &'static cellhost_supervisor::uid_claims::UidClaims {
    static CLAIMS: std::sync::OnceLock<cellhost_supervisor::uid_claims::UidClaims> =
        std::sync::OnceLock::new();
    CLAIMS.get_or_init(|| {
        cellhost_supervisor::uid_claims::UidClaims::new(
            cellhost_supervisor::uid_claims::CLAIMS_DIR,
            format!("test-{}-{}", std::process::id(), CellId::random()),
            format!("/proc/{}", std::process::id()),
        )
    })
}

/// A uid range of the policy's default pool for a cell a test makes
/// through a backend directly (the supervisor leases them otherwise),
/// claimed host-wide so no other store's cell shares it.
pub fn lease_uids(id: &CellId) -> cellhost_core::UidRange {
    let pool = cellhost_policy::Uids::default();
    claims()
        .claim_free(id, pool.start, pool.count)
        .expect("claiming a uid range")
        .expect("no free uid range for a test cell")
}

/// Give back the range of a test cell that is gone.
pub fn release_uids(h: &CellHandle) {
    if let Some(r) = h.uids {
        release_uid_range(&h.id, r);
    }
}

/// Give back `range`, leased for `id` by [`lease_uids`].
pub fn release_uid_range(id: &CellId, range: cellhost_core::UidRange) {
    claims().release(id, range);
}

/// A busybox rootfs (every applet linked) imported as `name` into the
/// image store under `state` (`<state>/images`): what process cells that
/// are not `image: host` run from.
pub fn busybox_image(state: &Path, name: &str) {
    let root = tempfile::tempdir().unwrap();
    for d in ["bin", "etc", "tmp", "root"] {
        std::fs::create_dir_all(root.path().join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.path().join("bin/busybox")).unwrap();
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let _ = std::os::unix::fs::symlink("busybox", root.path().join("bin").join(applet));
    }
    std::fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh
",
    )
    .unwrap();
    std::fs::write(root.path().join("etc/resolv.conf"), "").unwrap();
    cellhost_image::ImageStore::new(state.join("images"))
        .import(
            name,
            &cellhost_image::ImportRequest {
                rootfs: Some(root.path().to_path_buf()),
                replace: true,
                ..Default::default()
            },
        )
        .expect("importing the busybox rootfs");
}

pub fn tier() -> Tier {
    tier_with_network(|_| None)
}

/// A tier whose bridged networking is `net(state dir)`.
pub fn tier_with_network(net: impl FnOnce(&Path) -> Option<cellhost_net::NetConfig>) -> Tier {
    tier_with(net, false)
}

/// A create request for a new cell with a uid range of its own (what the
/// supervisor would lease it).
pub fn request(cell: Cell) -> CreateRequest {
    let id = CellId::random();
    CreateRequest {
        uids: Some(lease_uids(&id)),
        ..CreateRequest::new(id, cell)
    }
}

/// [`tier_with_network`], with CAP_NET_RAW for its cells when `net_raw`
/// (an operator's policy that allows raw sockets).
pub fn tier_with(
    net: impl FnOnce(&Path) -> Option<cellhost_net::NetConfig>,
    net_raw: bool,
) -> Tier {
    let dir = tempfile::Builder::new()
        .prefix("cellhost-test-")
        .tempdir()
        .expect("tempdir");
    let backend = ProcessBackend::new(ProcessConfig {
        state_dir: dir.path().join("process"),
        shim: ShimCommand {
            program: cellhost_bin(),
            args: vec!["__shim".into()],
        },
        log_cap_bytes: LOG_CAP,
        volume_engine: Default::default(),
        network: net(dir.path()),
        net_raw,
        user_namespace: true,
        images_dir: dir.path().join("images"),
    });
    Tier {
        backend,
        dir,
        made: Default::default(),
    }
}

/// A valid process cell document with `spec_body` (YAML lines indented by 2
/// under `spec:`) appended after isolation/image.
pub fn cell(name: &str, spec_body: &str) -> Cell {
    let doc = format!(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata:\n  name: {name}\nspec:\n  isolation: process\n  image: host\n{spec_body}"
    );
    cellhost_spec::parse_and_validate(&doc)
        .unwrap_or_else(|e| panic!("test document invalid: {e}\n{doc}"))
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The address the supervisor would lease a cell from `pool` (a bridged
/// cell's), taken in the store under `state` for a cell a test makes
/// through a backend directly.
pub fn lease_address(
    state: &Path,
    id: &CellId,
    pool: Option<cellhost_core::AddressPool>,
) -> Option<std::net::Ipv4Addr> {
    let pool = pool?;
    let store = cellhost_store::Store::open(state).expect("opening the test's store");
    match store
        .lease_address(id, &pool.pool, &pool.owner, pool.first..=pool.last)
        .expect("leasing an address")
    {
        cellhost_store::LeaseOutcome::Leased { address, .. } => Some(address),
        cellhost_store::LeaseOutcome::PoolExhausted => panic!("{} is full", pool.pool),
    }
}

impl Tier {
    /// [`request`] with the address the supervisor would lease a bridged
    /// cell from this tier's pool.
    pub fn request(&self, cell: Cell) -> CreateRequest {
        let mut req = request(cell);
        let pool = self.backend.address_pool(&req.cell);
        req.address = lease_address(self.dir.path(), &req.id, pool);
        req
    }

    pub async fn create(&self, cell: Cell, secrets: Vec<SecretValue>) -> (CellId, CellHandle) {
        let req = CreateRequest {
            secrets,
            ..self.request(cell)
        };
        let id = req.id.clone();
        let h = self.backend.create(req).await.expect("create");
        self.made.lock().unwrap().push(h.clone());
        (id, h)
    }

    pub async fn run(&self, cell: Cell) -> (CellHandle, CellStatus) {
        let (_, h) = self.create(cell, vec![]).await;
        self.backend.start(&h).await.expect("start");
        let st = self.wait_exit(&h, Duration::from_secs(60)).await;
        (h, st)
    }

    pub async fn wait_exit(&self, h: &CellHandle, max: Duration) -> CellStatus {
        let until = Instant::now() + max;
        loop {
            let st = self.backend.status(h).await.expect("status");
            if st.state == CellState::Exited || Instant::now() > until {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn log(&self, h: &CellHandle) -> String {
        let c = self.backend.logs(h, 0).await.expect("logs");
        String::from_utf8_lossy(&c.data).into_owned()
    }
}

/// Wait until `pid` has exec'd `exe` (the workload replaced the init).
pub fn wait_exe(pid: i32, exe: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(p) = std::fs::read_link(format!("/proc/{pid}/exe"))
            && p == Path::new(exe)
        {
            return;
        }
        if Instant::now() >= until {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            let link = std::fs::read_link(format!("/proc/{pid}/exe"));
            panic!("pid {pid} never exec'd {exe}: exe={link:?} wchan={wchan} status={status}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Mount points under `dir` in this process's mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    cellhost_process::hostfs::mounts_under(dir).expect("mountinfo")
}

/// What a real microVM boot needs here, or why it cannot run: root, qemu,
/// the unpacked Debian kernel (CELLHOST_TEST_KERNEL_DIR) and the static
/// agent (CELLHOST_AGENT_STATIC), both set by scripts/test.
pub fn microvm_missing() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root".into());
    }
    if cellhost_host::probe::which("qemu-system-x86_64").is_none() {
        return Some("qemu-system-x86_64 not installed (scripts/test installs it)".into());
    }
    for var in ["CELLHOST_TEST_KERNEL_DIR", "CELLHOST_AGENT_STATIC"] {
        if std::env::var_os(var).is_none() {
            return Some(format!("{var} unset (scripts/test sets it)"));
        }
    }
    None
}

#[macro_export]
macro_rules! require_microvm {
    () => {
        if let Some(why) = common::microvm_missing() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

/// Build the microvm image `name` in `state`'s store with `cellhost image
/// initramfs`: the Debian kernel, busybox and the static agent.
pub fn microvm_image(state: &Path, name: &str) {
    let kdir = PathBuf::from(std::env::var_os("CELLHOST_TEST_KERNEL_DIR").unwrap());
    let kernel = std::fs::read_dir(kdir.join("boot"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .expect("vmlinuz in the kernel package");
    let modules = std::fs::read_dir(kdir.join("lib/modules"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.path().join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "sleep", "printf", "head", "ls", "nc", "httpd",
    ] {
        std::os::unix::fs::symlink("busybox", root.path().join("bin").join(applet)).unwrap();
    }
    let out = cellhost(state)
        .args(["image", "initramfs", name, "--kernel"])
        .arg(&kernel)
        .arg("--rootfs")
        .arg(root.path())
        .arg("--modules-dir")
        .arg(&modules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Does the cell's nftables table exist? (Asked of `nft` itself, not of
/// cellhost-net.)
pub fn nft_table_exists(id: &CellId) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", &cellhost_net::table_name(id)])
        .output()
        .unwrap()
        .status
        .success()
}

/// A TCP port free on 127.0.0.1 just now, inside the default policy's
/// range for published ports (10000-32767), below the kernel's ephemeral
/// range.
pub fn free_port() -> u16 {
    let policy = cellhost_policy::PortRange::default();
    let span = u32::from(policy.max - policy.min) + 1;
    let seed = u32::from_str_radix(&CellId::random().as_str()[..8], 16).unwrap();
    (0..span)
        .map(|i| policy.min + ((seed + i * 7919) % span) as u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in the policy's range")
}
