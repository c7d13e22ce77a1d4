//! Bridged process cells against real test hosts: network namespaces this
//! test makes (`ip netns add`, a veth to the host), with an "allowed" and a
//! "denied" TCP server and two UDP "resolvers" on private addresses inside
//! them. No packet goes to an address outside what the test made.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cellhost_core::ids::CellId;
use cellhost_core::{Backend, CellHandle, ExecRequest};
use cellhost_net::{NetConfig, Network, RemoveBridgeOnDrop};

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why bridged networking cannot be tested here, or None.
fn network_missing() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root".into());
    }
    for tool in ["ip", "bridge", "nft", "conntrack"] {
        if cellhost_host::probe::which(tool).is_none() {
            return Some(format!("{tool} not installed (scripts/test installs it)"));
        }
    }
    None
}

macro_rules! require_network {
    () => {
        if let Some(why) = network_missing() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

/// A process tier with bridged networking on a bridge of its own; the
/// bridge goes after the tier's cells (drop order: tier, config, bridge).
fn bridged_tier(n: u8) -> (RemoveBridgeOnDrop, NetConfig, common::Tier) {
    bridged_tier_with(n, false)
}

/// [`bridged_tier`] whose cells keep CAP_NET_RAW: an operator who allows
/// raw sockets (policy `netRaw`). The bridge's own defences are tested
/// against such cells: they must hold without the capability's absence.
fn bridged_tier_raw(n: u8) -> (RemoveBridgeOnDrop, NetConfig, common::Tier) {
    bridged_tier_with(n, true)
}

fn bridged_tier_with(n: u8, net_raw: bool) -> (RemoveBridgeOnDrop, NetConfig, common::Tier) {
    let mut cfg = None;
    let tier = common::tier_with(
        |dir| {
            cfg = Some(net_config(dir, n));
            cfg.clone()
        },
        net_raw,
    );
    let cfg = cfg.expect("set by tier_with_network");
    (RemoveBridgeOnDrop(cfg.clone()), cfg, tier)
}

/// A random byte in 16..=250, so concurrent runs pick different subnets.
fn octet() -> u8 {
    let id = CellId::random();
    16 + u8::from_str_radix(&id.as_str()[..2], 16).unwrap() % 235
}

/// A "remote" network: a netns joined to the host by a veth,
/// `10.251.<n>.0/24`, the host at .1; removed on drop.
struct TestHosts {
    ns: String,
    host_if: String,
    n: u8,
}

impl TestHosts {
    fn new(n: u8) -> TestHosts {
        let tag = CellId::random().as_str()[..6].to_string();
        let t = TestHosts {
            ns: format!("chtest-{tag}"),
            host_if: format!("chth{tag}"),
            n,
        };
        sh(&["ip", "netns", "add", &t.ns]);
        sh(&[
            "ip", "link", "add", &t.host_if, "type", "veth", "peer", "name", "eth0", "netns", &t.ns,
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.251.{n}.1/24"),
            "dev",
            &t.host_if,
        ]);
        sh(&["ip", "link", "set", &t.host_if, "up"]);
        for last in [2, 3, 4, 5] {
            sh(&[
                "ip",
                "-n",
                &t.ns,
                "addr",
                "add",
                &format!("10.251.{n}.{last}/24"),
                "dev",
                "eth0",
            ]);
        }
        sh(&["ip", "-n", &t.ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &t.ns, "link", "set", "lo", "up"]);
        t
    }

    fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.n, last)
    }

    /// Run `f` on a thread inside the test netns.
    fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(path).unwrap();
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// A TCP server in the netns answering one line per connection;
    /// counts connections.
    fn tcp_server(&self, at: SocketAddr, line: &'static str) -> Arc<AtomicUsize> {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let l = self.in_ns(move || TcpListener::bind(at).unwrap());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                c.fetch_add(1, Ordering::SeqCst);
                let _ = (&s).write_all(line.as_bytes());
            }
        });
        count
    }

    /// A TCP server in the netns that reads everything; counts bytes.
    fn tcp_sink(&self, at: SocketAddr) -> Arc<AtomicUsize> {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let l = self.in_ns(move || TcpListener::bind(at).unwrap());
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 4096];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    c.fetch_add(k, Ordering::SeqCst);
                }
            }
        });
        count
    }

    /// A UDP socket in the netns counting datagrams.
    fn udp_server(&self, at: SocketAddr) -> Arc<AtomicUsize> {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let s = self.in_ns(move || UdpSocket::bind(at).unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while s.recv(&mut buf).is_ok() {
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
        count
    }
}

impl Drop for TestHosts {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn net_config(dir: &std::path::Path, n: u8) -> NetConfig {
    NetConfig {
        bridge: format!("chbt{}", &CellId::random().as_str()[..6]),
        subnet: format!("10.252.{n}.0/24").parse().unwrap(),
        store_dir: dir.to_path_buf(),
        publish: None,
        deny: Vec::new(),
        // The test hosts are networks this host is connected to.
        deny_connected: false,
    }
}

async fn exec(backend: &dyn Backend, h: &CellHandle, script: &str) -> (i32, String, String) {
    let out = backend
        .exec(
            h,
            ExecRequest {
                argv: vec!["/bin/bash".into(), "-c".into(), script.into()],
                env: vec![],
                cwd: None,
                timeout: Some(Duration::from_secs(20)),
            },
        )
        .await
        .expect("exec");
    (
        out.exit.shell_code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    http_get_path(addr, "/")
}

fn http_get_path(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// Poll `f` until it is Ok or 20 s pass (the cell's server starting).
fn eventually<T>(mut f: impl FnMut() -> std::io::Result<T>) -> T {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > until => panic!("never succeeded: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn bridged_cell_reaches_only_its_allow_list_publishes_ports_and_leaves_nothing() {
    require_process_tier!();
    require_network!();
    let n = octet();
    let hosts = TestHosts::new(n);
    let allowed = hosts.tcp_server(SocketAddr::from((hosts.addr(2), 8080)), "allowed\n");
    let allowed_other_port =
        hosts.tcp_server(SocketAddr::from((hosts.addr(2), 9090)), "other port\n");
    let denied = hosts.tcp_server(SocketAddr::from((hosts.addr(3), 8080)), "denied\n");
    let resolver = hosts.udp_server(SocketAddr::from((hosts.addr(4), 53)));
    let not_resolver = hosts.udp_server(SocketAddr::from((hosts.addr(5), 53)));
    // A service of the host itself, on every host address.
    let host_listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();

    let (_bridge, cfg, tier) = bridged_tier(n);
    let published = common::free_port();
    let cell = common::cell(
        "net",
        &format!(
            "  command: [/usr/bin/python3, -m, http.server, '8000', --bind, 0.0.0.0, --directory, /etc]\n  network:\n    mode: bridged\n    egress: [{{cidr: 10.251.{n}.2/32, port: 8080, protocol: tcp}}]\n    dns: [10.251.{n}.4]\n  ports: [{{container: 8000, host: {published}}}]\n"
        ),
    );
    let rt = common::rt();
    let (id, h) = rt.block_on(tier.create(cell, vec![]));
    rt.block_on(tier.backend.start(&h)).unwrap();
    let b: &dyn Backend = &tier.backend;

    // The handle says where the cell is.
    let addr = h.tier["network"]["address"].as_str().unwrap().to_string();
    assert_eq!(addr, format!("10.252.{n}.2"), "{}", h.tier);
    assert_eq!(h.tier["network"]["bridge"], cfg.bridge.as_str());

    // Allowed: the declared address and port.
    let (code, out, err) = rt.block_on(exec(
        b,
        &h,
        &format!("exec 3<>/dev/tcp/10.251.{n}.2/8080 && head -1 <&3"),
    ));
    assert_eq!((code, out.as_str()), (0, "allowed\n"), "{err}");
    assert_eq!(allowed.load(Ordering::SeqCst), 1);

    // Denied: another address, the allowed address on another port, and
    // the host itself; each refused at once (admin-prohibited), never
    // reaching the server.
    for target in [
        format!("10.251.{n}.3/8080"),
        format!("10.251.{n}.2/9090"),
        format!("10.252.{n}.1/{host_port}"),
        format!("10.251.{n}.1/{host_port}"),
    ] {
        let (code, _, err) = rt.block_on(exec(
            b,
            &h,
            &format!("timeout 10 bash -c 'exec 3<>/dev/tcp/{target}'"),
        ));
        assert_ne!(code, 0, "{target} was reachable");
        assert!(err.contains("No route to host"), "{target}: {err}");
    }
    assert_eq!(denied.load(Ordering::SeqCst), 0);
    assert_eq!(allowed_other_port.load(Ordering::SeqCst), 0);
    host_listener.set_nonblocking(true).unwrap();
    assert!(host_listener.accept().is_err(), "the cell reached the host");

    // DNS: only to the declared resolver, which resolv.conf names.
    let (code, out, _) = rt.block_on(exec(b, &h, "cat /etc/resolv.conf"));
    assert_eq!(code, 0);
    assert!(out.contains(&format!("nameserver 10.251.{n}.4\n")), "{out}");
    let (code, _, err) = rt.block_on(exec(
        b,
        &h,
        &format!(
            "printf q >/dev/udp/10.251.{n}.4/53; printf q >/dev/udp/10.251.{n}.5/53; sleep 0.3; printf q >/dev/udp/10.251.{n}.4/53"
        ),
    ));
    assert_eq!(code, 0, "{err}");
    let until = Instant::now() + Duration::from_secs(5);
    while resolver.load(Ordering::SeqCst) < 2 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    // (The second datagram to the resolver went out after the one to the
    // other address, so a count of zero there is not a race.)
    assert!(resolver.load(Ordering::SeqCst) >= 2);
    assert_eq!(not_resolver.load(Ordering::SeqCst), 0);

    // The published port answers on the host: on 127.0.0.1 (local connect
    // path), and from the test network on the host's address there.
    let body = eventually(|| http_get(SocketAddr::from(([127, 0, 0, 1], published))));
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(body.contains("resolv.conf"), "{body}");
    let host_side = SocketAddr::from((hosts.addr(1), published));
    let body = hosts.in_ns(move || http_get(host_side)).unwrap();
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");

    // Counters for inspect.
    let net = Network::new(cfg.clone(), "process");
    let c = net.counters(&id).unwrap().unwrap();
    assert!(c.egress_allowed.packets >= 3, "{c:?}"); // tcp + 2 dns
    assert!(c.egress_denied.packets >= 5, "{c:?}");
    // (127.0.0.1 goes out through the host's output path; the test
    // network's connection is forwarded, and counted.)
    assert!(c.ingress_published.packets >= 1, "{c:?}");
    assert_eq!(c.spoofed.packets, 0, "{c:?}");

    // Destroy: every network object is checked and gone.
    let report = rt.block_on(tier.backend.destroy(&h)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    for check in [
        "net-table",
        "net-veth",
        "net-neighbour",
        "net-netns",
        "net-conntrack",
    ] {
        assert!(
            report.checks.iter().any(|c| c.name == check),
            "{check} missing from {report:?}"
        );
    }
    // The host tracks no flow of the address any more (it had several:
    // the allowed connection, DNS, the published port), so the next holder
    // of the address rides none of them.
    for flag in ["--orig-src", "--reply-src"] {
        let out = Command::new("conntrack")
            .args(["-L", "-f", "ipv4", flag, &addr])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("0 flow entries"), "{flag} {addr}: {err}");
    }
    assert!(!common::nft_table_exists(&id));
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(cellhost_net::veth_name(&id))
            .exists()
    );
    assert!(
        !std::path::Path::new("/run/netns")
            .join(cellhost_net::netns_name(&id))
            .exists()
    );
    assert!(net.cells().unwrap().is_empty());
    assert!(http_get(SocketAddr::from(([127, 0, 0, 1], published))).is_err());
}

#[test]
fn orphaned_network_objects_are_swept_and_conflicts_are_refused_first() {
    require_process_tier!();
    require_network!();
    let n = octet();
    let (_bridge, cfg, tier) = bridged_tier(n);
    let rt = common::rt();
    let net = Network::new(cfg.clone(), "process");

    // An orphan: network objects of a cell with no dir and no record (a
    // crash after attach). list() reports it; destroy removes it all.
    let orphan = CellId::random();
    let _detach = DetachOnDrop(cfg.clone(), "process", orphan.clone());
    let doc = common::cell(
        "orphan",
        "  command: [/bin/true]\n  network: {mode: bridged}\n",
    );
    let address = |id: &CellId| {
        common::lease_address(&cfg.store_dir, id, Some(net.pool())).expect("an address")
    };
    let a = net.attach(&orphan, &doc, address(&orphan)).unwrap();
    assert!(common::nft_table_exists(&orphan));
    let listed = rt.block_on(tier.backend.list()).unwrap();
    assert!(listed.iter().any(|c| c.id == orphan), "{listed:?}");
    let handle = CellHandle {
        id: orphan.clone(),
        name: "orphan".into(),
        isolation: cellhost_spec::Isolation::Process,
        state_dir: tier.backend.paths(&orphan).dir,
        tier: serde_json::Value::Null,
        uids: None,
        address: None,
    };
    let report = rt.block_on(tier.backend.destroy(&handle)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(report.checks.iter().any(|c| c.name == "net-table"));
    assert!(!common::nft_table_exists(&orphan));
    assert!(!a.netns.unwrap().exists());
    assert!(net.cells().unwrap().is_empty());

    // Worse: only the veth is left (the table is gone, and the handle
    // names no address). It is still found by its name on the bridge.
    let bare = CellId::random();
    let _detach_bare = DetachOnDrop(cfg.clone(), "process", bare.clone());
    net.attach(&bare, &doc, address(&bare)).unwrap();
    let t = cellhost_net::table_name(&bare);
    assert!(
        Command::new("nft")
            .args(["delete", "table", "inet", &t])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(net.cells().unwrap(), vec![bare.clone()]);
    let handle = CellHandle {
        id: bare.clone(),
        ..handle
    };
    let report = rt.block_on(tier.backend.destroy(&handle)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(cellhost_net::veth_name(&bare))
            .exists()
    );
    assert!(net.cells().unwrap().is_empty());

    // A host port in use on the host is refused before anything is made,
    // naming the field. (One another cell publishes is the supervisor's
    // allocator's to refuse: `daemon.rs`.)
    let port = common::free_port();
    let with_port = |p: u16| {
        common::cell(
            "p",
            &format!(
                "  command: [/bin/sleep, '30']\n  network: {{mode: bridged}}\n  ports: [{{container: 80, host: {p}}}]\n"
            ),
        )
    };
    let (_, first) = rt.block_on(tier.create(with_port(port), vec![]));
    let busy = TcpListener::bind("0.0.0.0:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let third = rt.block_on(tier.backend.create(tier.request(with_port(busy_port))));
    let e = third.unwrap_err().to_string();
    assert!(
        e.contains("spec.ports.0.host") && e.contains("not free on the host"),
        "{e}"
    );
    // Only the first cell holds network objects.
    let cells = net.cells().unwrap();
    assert_eq!(cells, vec![first.id.clone()]);
    let report = rt.block_on(tier.backend.destroy(&first)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(net.cells().unwrap().is_empty());
}

/// A raw IPv4/UDP datagram from `src` to `dst`:53, sent with IP_HDRINCL
/// (the cell has CAP_NET_RAW, as the OCI default set gives it).
fn raw_udp_script(src: &str, dst: &str) -> String {
    format!(
        "import socket, struct\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)\n\
         ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 29, 0, 0, 64, 17, 0, socket.inet_aton('{src}'), socket.inet_aton('{dst}'))\n\
         udp = struct.pack('!HHHH', 40000, 53, 9, 0) + b'q'\n\
         s.sendto(ip + udp, ('{dst}', 0))\n"
    )
}

#[test]
fn forged_sources_are_dropped_and_the_egress_rate_is_capped() {
    require_process_tier!();
    require_network!();
    let n = octet();
    let hosts = TestHosts::new(n);
    let resolver = hosts.udp_server(SocketAddr::from((hosts.addr(4), 53)));
    let sink = hosts.tcp_sink(SocketAddr::from((hosts.addr(2), 8080)));
    let (_bridge, cfg, tier) = bridged_tier_raw(n);
    let cell = common::cell(
        "spoof",
        &format!(
            "  command: [/bin/sleep, '60']\n  network:\n    mode: bridged\n    egress: [{{cidr: 10.251.{n}.2/32, port: 8080, protocol: tcp}}]\n    dns: [10.251.{n}.4]\n    egressBytesPerSecond: 4096\n"
        ),
    );
    let rt = common::rt();
    let (id, h) = rt.block_on(tier.create(cell, vec![]));
    rt.block_on(tier.backend.start(&h)).unwrap();
    let b: &dyn Backend = &tier.backend;
    let own = h.tier["network"]["address"].as_str().unwrap().to_string();
    let net = Network::new(cfg.clone(), "process");
    let wait_count = |c: &AtomicUsize, want: usize| {
        let until = Instant::now() + Duration::from_secs(5);
        while c.load(Ordering::SeqCst) < want && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        c.load(Ordering::SeqCst)
    };

    // Control: a raw datagram with the cell's own source arrives.
    let send = |src: &str| {
        let script = raw_udp_script(src, &format!("10.251.{n}.4"));
        rt.block_on(exec(b, &h, &format!("/usr/bin/python3 -c \"{script}\"")))
    };
    let (code, _, err) = send(&own);
    assert_eq!(code, 0, "{err}");
    assert_eq!(wait_count(&resolver, 1), 1);
    // Forged: another cell's address on the bridge, and an address of the
    // test network itself. Neither arrives; both are counted.
    for forged in [format!("10.252.{n}.3"), format!("10.251.{n}.9")] {
        let (code, _, err) = send(&forged);
        assert_eq!(code, 0, "{err}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        resolver.load(Ordering::SeqCst),
        1,
        "a forged datagram arrived"
    );
    let c = net.counters(&id).unwrap().unwrap();
    assert_eq!(c.spoofed.packets, 2, "{c:?}");

    // The rate: 256 KiB to an allowed server at 4 KiB/s cannot go through
    // in 3 s; the excess is dropped and counted.
    let (code, _, _) = rt.block_on(exec(
        b,
        &h,
        &format!("timeout 3 bash -c 'head -c 262144 /dev/zero >/dev/tcp/10.251.{n}.2/8080'"),
    ));
    assert_eq!(code, 124, "256 KiB went out within 3 s at 4 KiB/s");
    let got = wait_count(&sink, 1);
    assert!(got > 0 && got < 128 * 1024, "{got} bytes arrived");
    let c = net.counters(&id).unwrap().unwrap();
    assert!(c.rate_limited.packets > 0, "{c:?}");

    let report = rt.block_on(tier.backend.destroy(&h)).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// A bridged microVM: qemu on a tap on the cellhost bridge, the agent
/// configuring eth0 from the lease, the same per-cell table as a process
/// cell. Boots the Debian kernel under TCG (scripts/test fetches it).
#[test]
fn bridged_microvm_reaches_only_its_allow_list_and_publishes_ports() {
    require_microvm!();
    require_network!();
    let n = octet();
    let hosts = TestHosts::new(n);
    let allowed = hosts.tcp_server(SocketAddr::from((hosts.addr(2), 8080)), "allowed\n");
    let denied = hosts.tcp_server(SocketAddr::from((hosts.addr(3), 8080)), "denied\n");
    let state = tempfile::tempdir().unwrap();
    common::microvm_image(state.path(), "mv-net");
    let net = net_config(state.path(), n);
    let _bridge = RemoveBridgeOnDrop(net.clone());
    let mut cfg = cellhost_qemu::QemuConfig::new(
        cellhost_spec::Isolation::Microvm,
        state.path(),
        common::cellhost_bin(),
    );
    cfg.network = Some(net.clone());
    let backend = cellhost_qemu::QemuBackend::new(cfg);
    let published = common::free_port();
    let cell = cellhost_spec::parse_and_validate(&format!(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{name: mvnet}}\nspec:\n  isolation: microvm\n  image: mv-net\n  command: [/bin/httpd, -f, -p, '8000', -h, /etc]\n  network:\n    mode: bridged\n    egress: [{{cidr: 10.251.{n}.2/32, port: 8080, protocol: tcp}}]\n    dns: [10.251.{n}.4]\n  ports: [{{container: 8000, host: {published}}}]\n"
    ))
    .unwrap();
    let rt = common::rt();
    let id = CellId::random();
    // Dropped in reverse order: qemu is killed before its tap goes.
    let _detach = DetachOnDrop(net.clone(), "microvm", id.clone());
    let _kill = KillQemuOnDrop(state.path().join("microvm"));
    // qemu runs as a leased uid range's base, as under the supervisor.
    let uids = ClaimedUids::new(&id);
    let mut req = cellhost_core::CreateRequest::new(id.clone(), cell);
    req.uids = Some(uids.range);
    // The address the supervisor's allocator would lease it, in the store.
    let pool = backend.address_pool(&req.cell);
    req.address = common::lease_address(state.path(), &id, pool);
    let h = rt.block_on(backend.create(req)).unwrap();
    assert_eq!(
        h.tier["network"]["address"],
        format!("10.252.{n}.2"),
        "{}",
        h.tier
    );
    assert!(h.tier["network"].get("netns").is_none());
    rt.block_on(backend.start(&h)).unwrap();
    let b: &dyn Backend = &backend;
    let sh = |script: &str| {
        let out = rt
            .block_on(b.exec(
                &h,
                ExecRequest {
                    argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                    env: vec![],
                    cwd: None,
                    timeout: Some(Duration::from_secs(30)),
                },
            ))
            .expect("exec");
        (
            out.exit.shell_code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = sh(&format!("nc 10.251.{n}.2 8080 </dev/null"));
    assert_eq!((code, out.as_str()), (0, "allowed\n"), "{err}");
    assert_eq!(allowed.load(Ordering::SeqCst), 1);
    let (code, _, _) = sh(&format!("nc -w 5 10.251.{n}.3 8080 </dev/null"));
    assert_ne!(code, 0, "the denied server was reachable");
    assert_eq!(denied.load(Ordering::SeqCst), 0);
    let (_, resolv, _) = sh("cat /etc/resolv.conf");
    assert!(
        resolv.contains(&format!("nameserver 10.251.{n}.4")),
        "{resolv}"
    );

    // The published port, by DNAT to the guest, on the host and from the
    // test network.
    // (busybox httpd serves the guest's /etc: its resolv.conf.)
    let get = |a| http_get_path(a, "/resolv.conf");
    let body = eventually(|| get(SocketAddr::from(([127, 0, 0, 1], published))));
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("nameserver"), "{body}");
    let host_side = SocketAddr::from((hosts.addr(1), published));
    let body = hosts.in_ns(move || get(host_side)).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let live = rt.block_on(b.live_details(&h)).unwrap().unwrap();
    let c = &live["network"]["counters"];
    assert!(
        c["egressAllowed"]["packets"].as_u64().unwrap() >= 1,
        "{live}"
    );
    assert!(
        c["egressDenied"]["packets"].as_u64().unwrap() >= 1,
        "{live}"
    );
    assert_eq!(c["spoofed"]["packets"], 0, "{live}");

    let report = rt.block_on(backend.destroy(&h)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    for check in ["net-table", "net-veth", "net-conntrack", "vm-process"] {
        assert!(
            report.checks.iter().any(|c| c.name == check),
            "{check}: {report:?}"
        );
    }
    assert!(!common::nft_table_exists(&id));
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(cellhost_net::veth_name(&id))
            .exists()
    );
    assert!(http_get(SocketAddr::from(([127, 0, 0, 1], published))).is_err());
}

/// A uid range for a cell this test creates without a supervisor,
/// claimed host-wide ([`common::lease_uids`]); released on drop.
struct ClaimedUids {
    cell: CellId,
    range: cellhost_core::UidRange,
}

impl ClaimedUids {
    fn new(cell: &CellId) -> ClaimedUids {
        ClaimedUids {
            cell: cell.clone(),
            range: common::lease_uids(cell),
        }
    }
}

impl Drop for ClaimedUids {
    fn drop(&mut self) {
        common::release_uid_range(&self.cell, self.range);
    }
}

/// Removes a cell's network objects on drop (a failed assertion must not
/// leave a tap, a table or a netns behind).
struct DetachOnDrop(NetConfig, &'static str, CellId);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        let mut report = cellhost_core::TeardownReport::new(self.2.as_str());
        Network::new(self.0.clone(), self.1).detach(&self.2, None, &mut report);
    }
}

/// Kills every qemu whose argv names `dir`, so a failed assertion leaves
/// no VM running.
struct KillQemuOnDrop(std::path::PathBuf);

impl Drop for KillQemuOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-9", "-f", &self.0.to_string_lossy()])
            .status();
        // The tier's (empty) cgroup group, qemu's cgroups' parent.
        cellhost_host::cgroups::remove_instance_group(&cellhost_host::cgroups::instance_tag(
            &self.0,
        ));
    }
}

/// Two cells on one bridge: neither sees frames meant for the other (the
/// ports neither learn nor flood; each MAC is pinned to its port), and a
/// cell cannot reach the host's loopback by sending to 127.0.0.1 through
/// its gateway's MAC (the bridge has route_localnet on for the
/// local-connect path).
#[test]
fn cells_on_one_bridge_see_nothing_of_each_other_nor_the_hosts_loopback() {
    require_process_tier!();
    require_network!();
    let n = octet();
    let (_bridge, cfg, tier) = bridged_tier_raw(n);
    let doc = |name: &str| {
        common::cell(
            name,
            "  command: [/bin/sleep, '60']\n  network: {mode: bridged}\n",
        )
    };
    let rt = common::rt();
    let (_, a) = rt.block_on(tier.create(doc("a"), vec![]));
    let (_, b) = rt.block_on(tier.create(doc("b"), vec![]));
    for h in [&a, &b] {
        rt.block_on(tier.backend.start(h)).unwrap();
    }
    let addr = |h: &CellHandle| h.tier["network"]["address"].as_str().unwrap().to_string();
    let mac = |h: &CellHandle| h.tier["network"]["mac"].as_str().unwrap().to_string();
    let (a_ip, b_ip, a_mac, b_mac) = (addr(&a), addr(&b), mac(&a), mac(&b));

    // The host knocks on both cells for as long as b listens to its link
    // (a burst at a fixed moment missed a sniffer that started late on a
    // loaded machine).
    let listening = Arc::new(AtomicBool::new(true));
    let knock = {
        let (a_ip, b_ip) = (a_ip.clone(), b_ip.clone());
        let listening = listening.clone();
        std::thread::spawn(move || {
            while listening.load(Ordering::SeqCst) {
                for ip in [&a_ip, &b_ip] {
                    let to = SocketAddr::new(ip.parse().unwrap(), 9);
                    let _ = TcpStream::connect_timeout(&to, Duration::from_millis(30));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let sniff = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))\n\
         s.settimeout(0.2)\n\
         mine = theirs = 0\n\
         end = time.time() + 3\n\
         while time.time() < end:\n\
         \x20   try:\n\
         \x20       f = s.recv(2048)\n\
         \x20   except socket.timeout:\n\
         \x20       continue\n\
         \x20   dst = f[:6].hex(':')\n\
         \x20   mine += dst == '{b_mac}'\n\
         \x20   theirs += dst == '{a_mac}'\n\
         print(mine, theirs)\n"
    );
    let b_dyn: &dyn Backend = &tier.backend;
    let (code, out, err) =
        rt.block_on(exec(b_dyn, &b, &format!("/usr/bin/python3 -c \"{sniff}\"")));
    listening.store(false, Ordering::SeqCst);
    knock.join().unwrap();
    assert_eq!(code, 0, "{err}");
    let counts: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert!(
        counts[0] > 0,
        "b saw none of its own frames: the sniffer is blind ({out})"
    );
    assert_eq!(counts[1], 0, "b saw frames meant for a ({out})");

    // 127.0.0.1 through the gateway: dropped on the link, counted.
    let lo = UdpSocket::bind("127.0.0.1:0").unwrap();
    lo.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let lo_port = lo.local_addr().unwrap().port();
    let gw_mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", cfg.bridge))
        .unwrap()
        .trim()
        .to_string();
    let frame = format!(
        "import socket, struct\n\
         def csum(b):\n\
         \x20   t = sum(struct.unpack('!10H', b))\n\
         \x20   t = (t & 0xffff) + (t >> 16)\n\
         \x20   return ~((t & 0xffff) + (t >> 16)) & 0xffff\n\
         ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 29, 0, 0, 64, 17, 0, socket.inet_aton('{a_ip}'), socket.inet_aton('127.0.0.1'))\n\
         ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]\n\
         udp = struct.pack('!HHHH', 40000, {lo_port}, 9, 0) + b'q'\n\
         eth = bytes.fromhex('{gw}') + bytes.fromhex('{src}') + b'\\x08\\x00'\n\
         s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
         s.bind(('eth0', 0))\n\
         s.send(eth + ip + udp)\n",
        gw = gw_mac.replace(':', ""),
        src = a_mac.replace(':', ""),
    );
    let a_dyn: &dyn Backend = &tier.backend;
    let net = Network::new(cfg.clone(), "process");
    let before = net.counters(&a.id).unwrap().unwrap().spoofed.packets;
    let (code, _, err) = rt.block_on(exec(a_dyn, &a, &format!("/usr/bin/python3 -c \"{frame}\"")));
    assert_eq!(code, 0, "{err}");
    let mut buf = [0u8; 64];
    assert!(
        lo.recv(&mut buf).is_err(),
        "a cell reached the host's 127.0.0.1"
    );
    let after = net.counters(&a.id).unwrap().unwrap().spoofed.packets;
    assert_eq!(after, before + 1);
}
