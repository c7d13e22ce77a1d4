//! Real boots under qemu (TCG here): a Debian kernel with the agent as
//! PID 1 of an initramfs (microvm), and a busybox ext4 disk with a
//! cloud-init NoCloud seed (vm). 256 MiB guests. Each cell gets a uid
//! range leased as the supervisor would (common::Lease); its qemu must
//! run as that range's base, sandboxed, in its own cgroup.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use cellhost_core::ids::CellId;
use cellhost_core::{Backend, CellState, CreateRequest, ExecRequest, SecretValue, VolumeKey};
use cellhost_qemu::QemuBackend;
use cellhost_qemu::image::ImageStore;
use cellhost_spec::Isolation;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn qemu_naming(dir: &std::path::Path) -> usize {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).into_owned();
                    c.starts_with("/usr/bin/qemu-system") && c.contains(&needle)
                })
                .unwrap_or(false)
        })
        .count()
}

const PATTERN: &str = "CELLHOST-PLAINTEXT-PATTERN-7f3a";

#[test]
fn microvm_boots_agent_runs_command_exec_volume_and_destroys_clean() {
    let (kernel, modules, agent) = require_boot!();
    let state = tempfile::tempdir().unwrap();
    let _vms = common::KillVmsOnDrop(state.path().to_path_buf());
    let store = ImageStore::new(state.path().join("images"));
    common::microvm_image(&store, "deb", &kernel, &modules, &agent);
    let backend = QemuBackend::new(common::config(Isolation::Microvm, state.path()));
    let cell = common::cell(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {name: mv}\nspec:\n  isolation: microvm\n  image: deb\n  command: [/bin/sh, -c, 'echo main says $GREETING; sleep 4; exit 5']\n  env: {GREETING: hi-env}\n  secrets: [{name: tok, from: {value: unused}}]\n  volume: {path: /data, sizeGiB: 1, encrypted: true}\n",
    );
    let id = CellId::random();
    let lease = common::Lease::new(&id);
    let mut req = common::request(&id, cell.clone(), &lease);
    req.secrets = vec![SecretValue {
        name: "tok".into(),
        value: b"s3cret-value".to_vec().into(),
    }];
    req.volume_key = Some(VolumeKey::random());
    let rt = rt();
    let h = rt.block_on(backend.create(req)).expect("create");
    let dir = h.state_dir.clone();
    assert_eq!(h.tier["accel"], "tcg");
    assert!(
        h.tier["digests"]["initrd"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(
        rt.block_on(backend.status(&h)).unwrap().state,
        CellState::Created
    );
    assert_eq!(h.uids, Some(lease.range), "the handle keeps the lease");
    let tier_dir = state.path().join("microvm");
    common::assert_confined(common::qemu_pid(&dir), &lease, &tier_dir, &id, &cell);
    // The volume qemu writes is its uid's (in the root-owned cell dir).
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir.join("volume.luks")).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o777),
        (lease.range.base, lease.range.base, 0o600)
    );
    // Nothing secret in what the host keeps.
    for f in ["qemu.json", "main.json"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        assert!(!text.contains("s3cret-value"), "{f}");
    }
    rt.block_on(backend.start(&h)).expect("start");
    assert_eq!(
        rt.block_on(backend.status(&h)).unwrap().state,
        CellState::Running
    );

    let exec = |argv: &[&str]| {
        rt.block_on(backend.exec(
            &h,
            ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        ))
        .expect("exec")
    };
    let out = exec(&[
        "/bin/sh",
        "-c",
        "echo out-$GREETING; cat /run/secrets/tok; exit 3",
    ]);
    assert_eq!(out.exit.code, Some(3));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "out-hi-env\ns3cret-value"
    );
    // The encrypted volume: plaintext in the guest, ciphertext on the host.
    let w = format!(
        "for i in 1 2 3 4 5 6 7 8; do printf {PATTERN}; done > /dev/vda; sync; head -c 31 /dev/vda"
    );
    let out = exec(&["/bin/sh", "-c", &w]);
    assert_eq!(
        out.exit.code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), PATTERN);
    let host = std::fs::read(dir.join("volume.luks")).unwrap();
    assert!(host.starts_with(b"LUKS\xba\xbe"), "qemu's LUKS header");
    assert!(
        !host.windows(PATTERN.len()).any(|w| w == PATTERN.as_bytes()),
        "plaintext on the host"
    );

    // A new backend (a restarted supervisor) adopts the running VM.
    drop(backend);
    let backend = QemuBackend::new(common::config(Isolation::Microvm, state.path()));
    let listed = rt.block_on(backend.list()).unwrap();
    assert!(
        listed
            .iter()
            .any(|c| c.id == id && c.state == CellState::Running),
        "{listed:?}"
    );
    let until = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = rt.block_on(backend.status(&h)).unwrap();
        if st.state == CellState::Exited || Instant::now() > until {
            break st;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(st.state, CellState::Exited);
    assert_eq!(
        st.exit.unwrap().code,
        Some(5),
        "the command's own exit status"
    );
    let logs = rt.block_on(backend.logs(&h, 0)).unwrap();
    assert!(String::from_utf8_lossy(&logs.data).contains("main says hi-env"));

    let report = rt.block_on(backend.destroy(&h)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    common::assert_cgroup_and_uids_gone(&report, &tier_dir, &id);
    assert!(!dir.exists());
    assert_eq!(qemu_naming(&dir), 0);
    let again = rt.block_on(backend.destroy(&h)).unwrap();
    assert!(again.is_clean() && again.already_gone);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The test vm's page on 127.0.0.1:`port`, within 120 s of booting
/// (TCG), or a panic showing the console.
fn wait_hello(port: u16, dir: &std::path::Path) -> String {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(b) = http_get(port).filter(|b| b.contains("hello from")) {
            return b;
        }
        assert!(
            Instant::now() < until,
            "no answer on 127.0.0.1:{port}; console: {}",
            String::from_utf8_lossy(&std::fs::read(dir.join("serial.log")).unwrap_or_default())
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn http_get(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

#[test]
fn vm_boots_with_seed_serves_hostfwd_powers_down_and_orphans_are_swept() {
    let (kernel, modules, _agent) = require_boot!();
    if cellhost_host::probe::which("genisoimage").is_none() {
        eprintln!("SKIP: genisoimage not installed (scripts/test installs it)");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let _vms = common::KillVmsOnDrop(state.path().to_path_buf());
    let store = ImageStore::new(state.path().join("images"));
    common::vm_image(&store, "busybox-vm", &kernel, &modules);
    let backend = QemuBackend::new(common::config(Isolation::Vm, state.path()));
    let port = free_port();
    let cell = common::cell(&format!(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{name: web-vm}}\nspec:\n  isolation: vm\n  image: busybox-vm\n  command: [/bin/true]\n  ports: [{{container: 8080, host: {port}}}]\n"
    ));
    let id = CellId::random();
    let lease = common::Lease::new(&id);
    let rt = rt();
    let h = rt
        .block_on(backend.create(common::request(&id, cell.clone(), &lease)))
        .expect("create");
    let dir = h.state_dir.clone();
    let tier_dir = state.path().join("vm");
    // Booted paused: created, not running.
    assert_eq!(
        rt.block_on(backend.status(&h)).unwrap().state,
        CellState::Created
    );
    rt.block_on(backend.start(&h)).expect("start");
    let body = wait_hello(port, &dir);
    let console =
        String::from_utf8_lossy(&std::fs::read(dir.join("serial.log")).unwrap()).into_owned();
    assert!(
        body.contains("hello from web-vm"),
        "hostname from the seed: {body}; console: {console}"
    );
    assert!(console.contains(&format!("instance-id={id}")), "{console}");
    common::assert_confined(common::qemu_pid(&dir), &lease, &tier_dir, &id, &cell);
    // The overlay is a qcow2 over the store's read-only base.
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(dir.join("disk.qcow2"))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        info["backing-filename"]
            .as_str()
            .unwrap()
            .ends_with("images/busybox-vm/disk")
    );

    // ACPI powerdown: the guest powers itself off (its kernel says so on
    // the console) well within the grace period.
    rt.block_on(backend.stop(&h, Duration::from_secs(60)))
        .unwrap();
    let st = rt.block_on(backend.status(&h)).unwrap();
    assert_eq!(st.state, CellState::Exited);
    let console =
        String::from_utf8_lossy(&std::fs::read(dir.join("serial.log")).unwrap()).into_owned();
    assert!(
        console.contains("reboot: Power down"),
        "guest did not power itself off: {console}"
    );
    assert_eq!(st.exit.unwrap().code, Some(0));

    // An orphan: a second VM whose record is lost; reconcile's path
    // (list → handle from a placeholder document → destroy) removes it.
    let cell2 = common::cell(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {name: orphan-vm}\nspec:\n  isolation: vm\n  image: busybox-vm\n  command: [/bin/true]\n",
    );
    let id2 = CellId::random();
    let lease2 = common::Lease::new(&id2);
    let h2 = rt
        .block_on(backend.create(common::request(&id2, cell2, &lease2)))
        .unwrap();
    let listed = rt.block_on(backend.list()).unwrap();
    assert!(
        listed
            .iter()
            .any(|c| c.id == id2 && c.state == CellState::Running)
    );
    // Reconcile's handle of an orphan knows no lease.
    let oh = backend.found_handle(&id2);
    let report = rt.block_on(backend.destroy(&oh)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    // Without the lease, the uid qemu ran as is read from qemu.json.
    common::assert_cgroup_and_uids_gone(&report, &tier_dir, &id2);
    assert_eq!(qemu_naming(&h2.state_dir), 0);

    let report = rt.block_on(backend.destroy(&h)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    common::assert_cgroup_and_uids_gone(&report, &tier_dir, &id);
    assert!(!dir.exists());
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "port still forwarded"
    );
    assert!(rt.block_on(backend.list()).unwrap().is_empty());
}

#[test]
fn what_a_vm_cannot_honour_is_refused_before_anything_is_made() {
    // No boot needed: these fail before any host object exists.
    let state = tempfile::tempdir().unwrap();
    let backend = QemuBackend::new(common::config(Isolation::Microvm, state.path()));
    let rt = rt();
    let cases = [
        ("  resources: {pids: 10}\n", "spec.resources.pids"),
        ("  ports: [{container: 80, host: 18080}]\n", "spec.ports"),
        ("  network: {mode: bridged}\n", "network.mode"),
        (
            "  volume: {path: /data, sizeGiB: 1, encrypted: true}\n",
            "volume key",
        ),
        ("", "spec.image"),
    ];
    assert!(
        backend.wants_uids(),
        "the supervisor leases VM cells a range"
    );
    let uids = cellhost_core::UidRange {
        base: 1 << 30,
        size: 65_536,
    };
    for (extra, field) in cases {
        let cell = common::cell(&format!(
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{name: x}}\nspec:\n  isolation: microvm\n  image: nope\n  command: [/bin/true]\n{extra}"
        ));
        let mut req = CreateRequest::new(CellId::random(), cell);
        req.uids = Some(uids);
        let e = rt.block_on(backend.create(req)).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    // No uid range, or one starting at root: refused, whatever else.
    for uids in [None, Some(cellhost_core::UidRange { base: 0, size: 1 })] {
        let cell = common::cell(
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {name: x}\nspec:\n  isolation: microvm\n  image: nope\n  command: [/bin/true]\n",
        );
        let mut req = CreateRequest::new(CellId::random(), cell);
        req.uids = uids;
        match rt.block_on(backend.create(req)) {
            Err(cellhost_core::BackendError::Invalid(m)) => {
                assert!(m.starts_with("uids:") && m.contains("never as root"), "{m}")
            }
            other => panic!("{uids:?}: {other:?}"),
        }
    }
    assert!(
        !state.path().join("microvm").exists()
            || std::fs::read_dir(state.path().join("microvm"))
                .unwrap()
                .next()
                .is_none()
    );

    // A vm overlay smaller than its base disk would cut the guest's
    // filesystem short: refused, naming the field.
    let vm = QemuBackend::new(common::config(Isolation::Vm, state.path()));
    // (qcow2: a 2 GiB raw file would be copied and hashed on import.)
    let disk = state.path().join("big.qcow2");
    let qemu_img =
        cellhost_host::probe::which("qemu-img").expect("qemu-img (scripts/test installs it)");
    let made = std::process::Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("2G")
        .status()
        .unwrap();
    assert!(made.success());
    ImageStore::new(state.path().join("images"))
        .import(
            "big",
            &cellhost_qemu::image::ImportRequest {
                disk: Some(disk),
                ..Default::default()
            },
        )
        .unwrap();
    let cell = common::cell(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {name: x}\nspec:\n  isolation: vm\n  image: big\n  command: [/bin/true]\n  resources: {diskGiB: 1}\n",
    );
    let mut req = CreateRequest::new(CellId::random(), cell);
    req.uids = Some(uids);
    let e = rt.block_on(vm.create(req)).unwrap_err().to_string();
    assert!(
        e.contains("spec.resources.diskGiB: 1 GiB is smaller than image big's disk (2.0 GiB)"),
        "{e}"
    );
    assert!(
        !state.path().join("vm").exists()
            || std::fs::read_dir(state.path().join("vm"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// A bridged vm: a tap on a bridge this test makes, the seed's
/// network-config applied by the guest, its published port reached by
/// DNAT (no user-mode networking), its table and tap gone after destroy.
/// (Egress filtering by the same table is tested with process cells and a
/// microVM against test hosts in cellhost's tests/network.rs.)
#[test]
fn bridged_vm_gets_its_lease_and_publishes_by_dnat() {
    let (kernel, modules, _agent) = require_boot!();
    if cellhost_host::probe::which("genisoimage").is_none()
        || cellhost_host::probe::which("nft").is_none()
    {
        eprintln!("SKIP: genisoimage or nft not installed (scripts/test installs them)");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let store = ImageStore::new(state.path().join("images"));
    common::vm_image(&store, "busybox-vm", &kernel, &modules);
    let tag = CellId::random().as_str()[..6].to_string();
    let n = 16 + u8::from_str_radix(&tag[..2], 16).unwrap() % 200;
    let net = cellhost_net::NetConfig {
        bridge: format!("chbv{tag}"),
        subnet: format!("10.249.{n}.0/24").parse().unwrap(),
        store_dir: state.path().to_path_buf(),
        publish: None,
        deny: Vec::new(),
        // The test hosts are networks this host is connected to.
        deny_connected: false,
    };
    struct Cleanup(cellhost_net::NetConfig, CellId);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let n = cellhost_net::Network::new(self.0.clone(), "vm");
            n.detach(
                &self.1,
                None,
                &mut cellhost_core::TeardownReport::new(self.1.as_str()),
            );
            let _ = n.remove_bridge();
        }
    }
    let id = CellId::random();
    let lease = common::Lease::new(&id);
    let _cleanup = Cleanup(net.clone(), id.clone());
    let _vms = common::KillVmsOnDrop(state.path().to_path_buf());
    let mut cfg = common::config(Isolation::Vm, state.path());
    cfg.network = Some(net.clone());
    let backend = QemuBackend::new(cfg);
    let port = free_port();
    let cell = common::cell(&format!(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{name: bridged-vm}}\nspec:\n  isolation: vm\n  image: busybox-vm\n  command: [/bin/true]\n  network: {{mode: bridged}}\n  ports: [{{container: 8080, host: {port}}}]\n"
    ));
    let rt = rt();
    // The pool's first address, as the supervisor's allocator would lease
    // the only cell of a new bridge.
    let mut req = common::request(&id, cell, &lease);
    req.address = backend.address_pool(&req.cell).map(|p| p.first);
    let h = rt.block_on(backend.create(req)).expect("create");
    assert_eq!(
        h.tier["network"]["address"],
        format!("10.249.{n}.2"),
        "{}",
        h.tier
    );
    let dir = h.state_dir.clone();
    // No user-mode networking: the port is the bridge's DNAT. qemu gets
    // the tap as a descriptor the shim attached (it could not open
    // /dev/net/tun), the tap owned by qemu's ids.
    let cmd: cellhost_qemu::vmm::QemuCommand =
        serde_json::from_slice(&std::fs::read(dir.join("qemu.json")).unwrap()).unwrap();
    assert!(!cmd.args.iter().any(|a| a.contains("hostfwd")), "{cmd:?}");
    let tap = cmd
        .fds
        .iter()
        .find(|f| {
            f.what
                == cellhost_qemu::vmm::FdSource::Tap {
                    name: cellhost_net::veth_name(&id),
                }
        })
        .expect("the tap is passed");
    assert!(
        cmd.args
            .iter()
            .any(|a| a == &format!("tap,id=net0,fd={}", tap.fd)),
        "{cmd:?}"
    );
    let sys = std::path::Path::new("/sys/class/net").join(cellhost_net::veth_name(&id));
    for f in ["owner", "group"] {
        let v = std::fs::read_to_string(sys.join(f)).unwrap();
        assert_eq!(v.trim(), lease.range.base.to_string(), "tap {f}");
    }
    rt.block_on(backend.start(&h)).expect("start");
    let body = wait_hello(port, &dir);
    assert!(body.contains("hello from bridged-vm"), "{body}");
    let console =
        String::from_utf8_lossy(&std::fs::read(dir.join("serial.log")).unwrap()).into_owned();
    assert!(
        console.contains(&format!("network-config 10.249.{n}.2/24 via 10.249.{n}.1")),
        "{console}"
    );
    let live = rt.block_on(backend.live_details(&h)).unwrap().unwrap();
    // Nothing forged; the guest's own IPv6 chatter is dropped and counted
    // apart (cells have IPv4 only).
    assert_eq!(
        live["network"]["counters"]["spoofed"]["packets"], 0,
        "{live}"
    );
    assert!(
        live["network"]["counters"]["ipv6"]["packets"].is_u64(),
        "{live}"
    );

    let report = rt.block_on(backend.destroy(&h)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    for check in ["net-table", "net-veth", "net-conntrack", "vm-process"] {
        assert!(
            report.checks.iter().any(|c| c.name == check),
            "{check}: {report:?}"
        );
    }
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(cellhost_net::veth_name(&id))
            .exists()
    );
    assert!(http_get(port).is_none());
}

/// Two microVMs at once: each qemu runs as its own lease's base, and with
/// one qemu's credentials neither cell's dir or volume can be opened by
/// path (qemu gets descriptors of its own files; the state dir is root's). Both tear down with no cgroup and no process of
/// their ids left.
#[test]
fn two_microvms_run_as_strangers_to_each_other() {
    let (kernel, modules, agent) = require_boot!();
    if cellhost_host::probe::which("setpriv").is_none() {
        eprintln!("SKIP: setpriv (util-linux) not installed");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let _vms = common::KillVmsOnDrop(state.path().to_path_buf());
    let store = ImageStore::new(state.path().join("images"));
    common::microvm_image(&store, "deb", &kernel, &modules, &agent);
    let backend = QemuBackend::new(common::config(Isolation::Microvm, state.path()));
    let tier_dir = state.path().join("microvm");
    let cell = common::cell(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {name: twin}\nspec:\n  isolation: microvm\n  image: deb\n  command: [/bin/sleep, '600']\n  volume: {path: /data, sizeGiB: 1}\n",
    );
    let rt = rt();
    let ids = [CellId::random(), CellId::random()];
    let leases = [common::Lease::new(&ids[0]), common::Lease::new(&ids[1])];
    let hs: Vec<_> = ids
        .iter()
        .zip(&leases)
        .map(|(id, lease)| {
            rt.block_on(backend.create(common::request(id, cell.clone(), lease)))
                .expect("create")
        })
        .collect();
    let pids: Vec<i32> = hs.iter().map(|h| common::qemu_pid(&h.state_dir)).collect();
    for i in 0..2 {
        common::assert_confined(pids[i], &leases[i], &tier_dir, &ids[i], &cell);
    }
    assert_ne!(
        common::status_field(pids[0], "Uid"),
        common::status_field(pids[1], "Uid")
    );
    // With exactly one qemu's credentials (its uid, gid and groups, read
    // from /proc), the other cell's dir cannot be listed and its volume
    // cannot be read or written; nor its own by path (qemu opens no path
    // there, it got descriptors).
    let as_qemu = |pid: i32, argv: &[&str]| {
        let first = |f: &str| {
            common::status_field(pid, f)
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        let groups = common::status_field(pid, "Groups")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(",");
        let groups = if groups.is_empty() {
            "--clear-groups".to_string()
        } else {
            format!("--groups={groups}")
        };
        std::process::Command::new("setpriv")
            .args([
                format!("--reuid={}", first("Uid")),
                format!("--regid={}", first("Gid")),
                groups,
                "--".into(),
            ])
            .args(argv)
            .output()
            .unwrap()
    };
    for (i, j) in [(0, 1), (1, 0), (0, 0)] {
        let dir = hs[j].state_dir.display().to_string();
        let vol = hs[j].state_dir.join("volume.qcow2").display().to_string();
        let append = format!("echo x >> {vol}");
        for argv in [
            vec!["ls", dir.as_str()],
            vec!["head", "-c", "1", vol.as_str()],
            vec!["sh", "-c", append.as_str()],
        ] {
            let out = as_qemu(pids[i], &argv);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("Permission denied"),
                "qemu {i} {argv:?}: {:?} {err}",
                out.status
            );
        }
    }

    for (i, h) in hs.iter().enumerate() {
        let report = rt.block_on(backend.destroy(h)).unwrap();
        assert!(report.is_clean(), "{report:?}");
        common::assert_cgroup_and_uids_gone(&report, &tier_dir, &ids[i]);
    }
}

/// A cgroup of this tier with no cell dir (a teardown cut short) is
/// listed, and destroying it removes it from every hierarchy.
#[test]
fn an_orphan_cgroup_is_listed_and_removed() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: not root");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let _cleanup = common::KillVmsOnDrop(state.path().to_path_buf());
    let backend = QemuBackend::new(common::config(Isolation::Vm, state.path()));
    let id = CellId::random();
    let object = cellhost_host::cgroups::cgroup_object(
        &cellhost_host::cgroups::instance_tag(&state.path().join("vm")),
        &id.object_name(),
    );
    let cg = cellhost_host::cgroups::CellCgroups::for_object(&object).unwrap();
    // Made the way the backend makes them: a microvm document's limits.
    let made = cellhost_qemu::limits::create(
        &object,
        &cellhost_qemu::limits::Limits {
            memory_bytes: 1 << 30,
            cpu_quota_us: 100_000,
            cpu_period_us: 100_000,
            pids: 10,
        },
    )
    .unwrap();
    assert!(
        !made.is_empty() && made.iter().all(|d| d.is_dir()),
        "{made:?}"
    );
    let rt = rt();
    let listed = rt.block_on(backend.list()).unwrap();
    assert!(
        listed
            .iter()
            .any(|c| c.id == id && c.state == CellState::Exited),
        "{listed:?}"
    );
    let report = rt
        .block_on(backend.destroy(&backend.found_handle(&id)))
        .unwrap();
    assert!(report.is_clean() && !report.already_gone, "{report:?}");
    assert!(cg.existing().is_empty(), "{:?}", cg.existing());
    assert!(rt.block_on(backend.list()).unwrap().is_empty());
}
