//! Real boots under qemu (TCG here): a Debian kernel with the agent as
//! PID 1 of an initramfs (microvm), and a busybox ext4 disk with a
//! cloud-init NoCloud seed (vm). 256 MiB guests.

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
    let mut req = CreateRequest::new(id.clone(), cell);
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
    if cellhost_core::probe::which("genisoimage").is_none() {
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
    let rt = rt();
    let h = rt
        .block_on(backend.create(CreateRequest::new(id.clone(), cell)))
        .expect("create");
    let dir = h.state_dir.clone();
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
    let h2 = rt
        .block_on(backend.create(CreateRequest::new(id2.clone(), cell2)))
        .unwrap();
    let listed = rt.block_on(backend.list()).unwrap();
    assert!(
        listed
            .iter()
            .any(|c| c.id == id2 && c.state == CellState::Running)
    );
    let placeholder = common::cell(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {name: orphan}\nspec:\n  isolation: vm\n  command: [/bin/true]\n",
    );
    let oh = backend.handle_for(&id2, &placeholder);
    let report = rt.block_on(backend.destroy(&oh)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(qemu_naming(&h2.state_dir), 0);

    let report = rt.block_on(backend.destroy(&h)).unwrap();
    assert!(report.is_clean(), "{report:?}");
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
    for (extra, field) in cases {
        let cell = common::cell(&format!(
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{name: x}}\nspec:\n  isolation: microvm\n  image: nope\n  command: [/bin/true]\n{extra}"
        ));
        let e = rt
            .block_on(backend.create(CreateRequest::new(CellId::random(), cell)))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    assert!(
        !state.path().join("microvm").exists()
            || std::fs::read_dir(state.path().join("microvm"))
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
    if cellhost_core::probe::which("genisoimage").is_none()
        || cellhost_core::probe::which("nft").is_none()
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
                &mut cellhost_core::TeardownReport::new(self.1.as_str()),
            );
            let _ = n.remove_bridge();
        }
    }
    let id = CellId::random();
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
    let h = rt
        .block_on(backend.create(CreateRequest::new(id.clone(), cell)))
        .expect("create");
    assert_eq!(
        h.tier["network"]["address"],
        format!("10.249.{n}.2"),
        "{}",
        h.tier
    );
    let dir = h.state_dir.clone();
    // No user-mode networking: the port is the bridge's DNAT.
    let argv = std::fs::read_to_string(dir.join("qemu.json")).unwrap_or_default();
    assert!(!argv.contains("hostfwd"), "{argv}");
    assert!(
        argv.contains(&format!("ifname={}", cellhost_net::veth_name(&id))),
        "{argv}"
    );
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
    for check in ["net-table", "net-veth", "net-lease", "vm-process"] {
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
