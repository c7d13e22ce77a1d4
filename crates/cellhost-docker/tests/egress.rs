//! Bridged container cells cannot open connections out: not to a test host
//! in a network namespace this test makes, not to the host's own services
//! through the bridge gateway. Controls in the same test show both targets
//! are reachable from the host and from a plain container on the engine's
//! default bridge, so the guard (not routing) is what stops the cell.
//!
//! Only addresses this test creates are contacted (10.213.77.0/30 inside
//! its own namespace, and the engine's bridge gateways on this host).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use cellhost_core::ids::CellId;
use common::{IMAGE, cell, engine};
use futures_util::StreamExt;

const HOST_ADDR: &str = "10.213.77.1/30";
const PEER: &str = "10.213.77.2";
const PEER_ADDR: &str = "10.213.77.2/30";
const PORT: u16 = 9000;
const MARK: &str = "egress-target-answered";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A namespace with a veth to the host and an httpd on PEER:PORT.
struct TestHost {
    ns: String,
    veth: String,
    server: Option<Child>,
    _www: tempfile::TempDir,
}

impl TestHost {
    fn new() -> Result<TestHost, String> {
        let tag = std::process::id();
        let ns = format!("chte{tag}");
        let veth = format!("chte{tag}h");
        let peer = format!("chte{tag}n");
        let www = tempfile::tempdir().map_err(|e| e.to_string())?;
        std::fs::write(www.path().join("index.html"), MARK).map_err(|e| e.to_string())?;
        let mut h = TestHost {
            ns: ns.clone(),
            veth: veth.clone(),
            server: None,
            _www: www,
        };
        ip(&["netns", "add", &ns])?;
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &ns])?;
        ip(&["addr", "add", HOST_ADDR, "dev", &veth])?;
        ip(&["link", "set", &veth, "up"])?;
        ip(&["-n", &ns, "addr", "add", PEER_ADDR, "dev", &peer])?;
        ip(&["-n", &ns, "link", "set", &peer, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "route", "add", "default", "via", "10.213.77.1"])?;
        let dir = h._www.path().display().to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "busybox", "httpd", "-f", "-p"])
            .arg(format!("{PEER}:{PORT}"))
            .args(["-h", &dir])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        h.server = Some(child);
        Ok(h)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// GET / from this host; the body when it answers.
fn get_from_host(addr: (&str, u16)) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &format!("{}:{}", addr.0, addr.1).parse().ok()?,
        Duration::from_secs(3),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    Some(body)
}

/// The shell a container runs to try PEER and the host gateway.
fn probe_script(gateway: &str, host_port: u16) -> String {
    format!(
        "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {PEER} {PORT}; echo peer-rc=$?; \
         echo ping | nc -w 3 {gateway} {host_port}; echo gw-rc=$?"
    )
}

/// The gateway address of an engine network.
async fn gateway(docker: &bollard::Docker, network: &str) -> String {
    let net = docker.inspect_network(network, None).await.unwrap();
    net.ipam
        .and_then(|i| i.config)
        .and_then(|c| c.into_iter().find_map(|c| c.gateway))
        .unwrap_or_else(|| panic!("network {network} has no gateway"))
}

#[tokio::test(flavor = "multi_thread")]
async fn bridged_cells_have_no_egress() {
    let Some(e) = engine().await else { return };
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("SKIP: iproute2 missing (scripts/test installs it)");
        return;
    }
    let host = TestHost::new().expect("building the test host namespace");
    // A service on the host itself, as the API or sshd would be.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            let mut c = c;
            let _ = c.write_all(b"host-service-answered\n");
        }
    });
    // Control 1: the test host answers from here.
    let mut ok = false;
    for _ in 0..50 {
        if get_from_host((PEER, PORT)).is_some_and(|b| b.contains(MARK)) {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ok, "test host {PEER}:{PORT} does not answer from the host");

    // A fresh engine has no cellhost network until a bridged cell is
    // made; the probe script needs its gateway first.
    let warm = e
        .create(
            cell("  command: [\"/bin/true\"]\n  network: { mode: bridged }\n"),
            vec![],
        )
        .await;
    e.destroy(&warm).await;

    // The cell: bridged, a published port, no egress rules.
    let docker = e.docker.clone();
    let probe_cell = async {
        let h = e
            .run(
                cell(&format!(
                    "  command: [\"/bin/sh\", \"-c\", \"sleep 1; {}\"]\n  network: {{ mode: bridged }}\n",
                    probe_script(&gateway(&docker, "cellhost").await, host_port).replace('"', "\\\"")
                )),
                vec![],
            )
            .await;
        e.wait(&h).await;
        let log = e.log(&h).await;
        e.destroy(&h).await;
        log
    };
    // Control 2: a plain container on the default bridge.
    let control = async {
        let name = format!("cellhost-test-egress-{}", CellId::random());
        let gw = gateway(&docker, "bridge").await;
        docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                ContainerCreateBody {
                    image: Some(IMAGE.into()),
                    cmd: Some(vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        probe_script(&gw, host_port),
                    ]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        docker.start_container(&name, None).await.unwrap();
        let _ = docker.wait_container(&name, None).next().await;
        let mut log = Vec::new();
        let mut s = docker.logs(
            &name,
            Some(bollard::query_parameters::LogsOptions {
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        );
        while let Some(Ok(l)) = s.next().await {
            log.extend_from_slice(&l.into_bytes());
        }
        let _ = docker
            .remove_container(
                &name,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
        String::from_utf8_lossy(&log).into_owned()
    };
    let control_log = control.await;
    assert!(
        control_log.contains(MARK) && control_log.contains("host-service-answered"),
        "control container could not reach the targets, so the test proves nothing: {control_log}"
    );
    let cell_log = probe_cell.await;
    assert!(
        !cell_log.contains(MARK),
        "bridged cell reached the test host: {cell_log}"
    );
    assert!(
        !cell_log.contains("host-service-answered"),
        "bridged cell reached a host service via the gateway: {cell_log}"
    );
    assert!(
        cell_log.contains("peer-rc=") && cell_log.contains("gw-rc="),
        "{cell_log}"
    );
    drop(host);
}
