//! The client's transports against real agent processes: a socketpair to
//! `--stdio`, Firecracker's hybrid vsock handshake, a virtio-serial port's
//! byte stream that outlives host clients, AF_VSOCK, retries, and the
//! agent as PID 1 of a pid namespace.

mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cellhost_guest::proto::MainState;
use cellhost_guest::{Client, ClientError, ConnectOptions, Endpoint, ExecRequest};
use common::*;

/// `cellhost-agent --stdio` with both stdin and stdout on `end`.
fn stdio_agent(end: UnixStream, state: &Path) -> Child {
    let out: OwnedFd = end.try_clone().unwrap().into();
    Command::new(AGENT)
        .arg("--stdio")
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::from(OwnedFd::from(end)))
        .stdout(Stdio::from(out))
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn echo(c: &mut Client, text: &str) -> String {
    let out = c
        .exec(ExecRequest {
            argv: vec!["echo".into(), text.into()],
            ..Default::default()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn socketpair_to_a_stdio_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (host, guest) = UnixStream::pair().unwrap();
    let mut child = stdio_agent(guest, &dir.path().join("state"));
    let mut c = Client::from_unix_stream(host, "socketpair", &opts()).unwrap();
    c.ping().unwrap();
    assert_eq!(echo(&mut c, "over a socketpair"), "over a socketpair\n");
    c.set_secret("k", b"v").unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("state/secrets/k")).unwrap(),
        b"v"
    );
    // End of stream ends a stdio agent, successfully.
    drop(c);
    assert!(child.wait().unwrap().success());

    // And shutdown ends it too.
    let (host, guest) = UnixStream::pair().unwrap();
    let mut child = stdio_agent(guest, &dir.path().join("state"));
    let mut c = Client::from_unix_stream(host, "socketpair", &opts()).unwrap();
    c.shutdown().unwrap();
    assert!(child.wait().unwrap().success());
}

/// A listener that speaks Firecracker's host side of hybrid vsock: the
/// first `refuse` connections are closed after CONNECT (nothing listens
/// in the guest yet), later ones answer `OK <port>` and are handed to a
/// fresh stdio agent. Returns the CONNECT lines it saw.
fn hybrid_vsock_device(
    path: &Path,
    refuse: usize,
    state: &Path,
) -> std::thread::JoinHandle<Vec<String>> {
    let listener = UnixListener::bind(path).unwrap();
    let state = state.to_path_buf();
    std::thread::spawn(move || {
        let mut seen = vec![];
        for (n, conn) in listener.incoming().enumerate() {
            let mut conn = conn.unwrap();
            let mut line = vec![];
            let mut b = [0u8; 1];
            while conn.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            seen.push(String::from_utf8(line).unwrap());
            if n < refuse {
                continue; // dropped: the device closes the connection
            }
            conn.write_all(b"OK 1073741824\n").unwrap();
            let mut child = stdio_agent(conn, &state);
            child.wait().unwrap();
            return seen;
        }
        seen
    })
}

#[test]
fn hybrid_vsock_connect_handshake_with_retries() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let device = hybrid_vsock_device(&uds, 2, &dir.path().join("state"));
    let ep = Endpoint::HybridVsock { uds, port: 5555 };
    let mut c = Client::connect(&ep, &opts()).unwrap();
    c.ping().unwrap();
    assert_eq!(echo(&mut c, "through CONNECT"), "through CONNECT\n");
    drop(c);
    let seen = device.join().unwrap();
    assert_eq!(
        seen,
        ["CONNECT 5555", "CONNECT 5555", "CONNECT 5555"],
        "two refusals, then the handshake"
    );
}

#[test]
fn hybrid_vsock_bad_answer_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(&uds).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let _ = conn.write_all(b"NOPE\n");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let o = ConnectOptions {
        deadline: Duration::from_millis(300),
        ..opts()
    };
    let e = Client::connect(&Endpoint::HybridVsock { uds, port: 52 }, &o)
        .err()
        .unwrap();
    assert!(matches!(e, ClientError::NotReady { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("expected \"OK <port>\", got \"NOPE\""),
        "{e}"
    );
}

#[test]
fn connect_retries_until_the_agent_appears() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("late.sock");
    // Nothing there: the deadline passes and the error says why.
    let o = ConnectOptions {
        deadline: Duration::from_millis(200),
        ..opts()
    };
    let e = Client::connect(&Endpoint::Unix(sock.clone()), &o)
        .err()
        .unwrap();
    let ClientError::NotReady { attempts, .. } = &e else {
        panic!("{e}")
    };
    assert!(*attempts > 1, "{e}");
    assert!(e.to_string().contains("late.sock"), "{e}");

    // The agent starts while the client is already trying.
    let connecting = {
        let sock = sock.clone();
        std::thread::spawn(move || Client::connect(&Endpoint::Unix(sock), &opts()).map(|_| ()))
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = Command::new(AGENT)
        .arg("--unix")
        .arg(&sock)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    connecting.join().unwrap().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
}

/// What qemu does with `-chardev socket,server=on` on a virtserialport:
/// one guest byte stream, host clients attach one at a time.
fn virtio_serial_chardev(path: &Path, guest: UnixStream) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let conn = conn.unwrap();
            let (mut g_r, mut g_w) = (guest.try_clone().unwrap(), guest.try_clone().unwrap());
            let (mut c_r, mut c_w) = (conn.try_clone().unwrap(), conn);
            // guest -> client until the client goes; then the next client.
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_r, &mut g_w);
            });
            let mut buf = [0u8; 4096];
            g_r.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            loop {
                match g_r.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if c_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(_) if up.is_finished() => break,
                    Err(_) => {}
                }
            }
        }
    });
}

#[test]
fn virtio_serial_stream_outlives_host_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (chardev_end, guest_end) = UnixStream::pair().unwrap();
    let mut agent = stdio_agent(guest_end, &dir.path().join("state"));
    let path = dir.path().join("virtio.sock");
    virtio_serial_chardev(&path, chardev_end);

    // A first host client leaves a half-written line and an exec whose
    // answer arrives after it is gone.
    {
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(b"{\"op\":\"exec\",\"id\":1,\"argv\":[\"sleep\",\"0.3\"]}\n{\"op\":\"pi")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    // The next client starts clean: the partial line is ended and
    // answered with an error, the late exec answer is not taken for its
    // own, and its calls work.
    let mut c = Client::connect(&Endpoint::VirtioSerial(path.clone()), &opts()).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    for _ in 0..3 {
        c.ping().unwrap();
    }
    assert_eq!(echo(&mut c, "virtio"), "virtio\n");
    drop(c);
    let mut c = Client::connect(&Endpoint::VirtioSerial(path), &opts()).unwrap();
    c.ping().unwrap();
    c.shutdown().unwrap();
    assert!(agent.wait().unwrap().success());
}

#[test]
fn af_vsock_listener() {
    let a = AgentProc::start(&["--vsock-port", "15555"]);
    a.client().ping().unwrap();
    let log = a.log();
    if !log.contains("listening on vsock port 15555") {
        println!("skipped: this kernel has no AF_VSOCK transport for the agent to bind ({log})");
        return;
    }
    // A round trip needs a transport to ourselves (vsock_loopback, CID 1).
    let o = ConnectOptions {
        deadline: Duration::from_millis(1500),
        attempt_timeout: Duration::from_millis(500),
        ..opts()
    };
    match Client::connect(
        &Endpoint::Vsock {
            cid: 1,
            port: 15555,
        },
        &o,
    ) {
        Ok(mut c) => {
            c.ping().unwrap();
            assert_eq!(echo(&mut c, "vsock"), "vsock\n");
        }
        Err(e) => println!(
            "AF_VSOCK round trip skipped: no loopback transport (vsock_loopback) on this host: {e}; \
             the listener bound, which is the guest side"
        ),
    }
}

#[test]
fn pid1_in_a_pid_namespace_mounts_and_reaps() {
    if !is_root() {
        println!("skipped: needs root for a pid + mount namespace");
        return;
    }
    let Some(unshare) = ["/usr/bin/unshare", "/bin/unshare"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        println!("skipped: no unshare(1) (util-linux)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("init.sock");
    let mut ns = Command::new(unshare)
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--propagation",
            "private",
            AGENT,
            "--unix",
        ])
        .arg(&sock)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        // The main command leaves an orphan that PID 1 must reap.
        .args(["--", "/bin/sh", "-c", "sleep 0.2 & exit 0"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = Client::connect(&Endpoint::Unix(sock), &opts()).unwrap();
    let st = c.status().unwrap();
    assert!(st.pid1, "agent should be PID 1 in the new namespace");
    // proc was mounted for this namespace: PID 1 is the agent.
    let out = c
        .exec(ExecRequest {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "cat /proc/1/comm; sleep 0.2 & exit 0".into(),
            ],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cellhost-agent\n");
    // Both orphans (main's and the exec's sleep) die and are reaped.
    let mut zombies = String::new();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        let out = c
            .exec(ExecRequest {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "for s in /proc/[0-9]*/stat; do read l < $s && echo \"$l\"; done".into(),
                ],
                ..Default::default()
            })
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let sleeping = text.contains("(sleep)");
        zombies = text
            .lines()
            .filter(|l| l.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .collect::<Vec<_>>()
            .join("\n");
        if !sleeping && zombies.is_empty() {
            break;
        }
    }
    assert!(zombies.is_empty(), "zombies in the namespace: {zombies}");
    assert!(matches!(
        c.status().unwrap().main,
        MainState::Exited {
            exit_code: Some(0),
            ..
        }
    ));
    // Shutdown as PID 1 is a poweroff: in a pid namespace the kernel ends
    // the namespace's init, so unshare returns.
    c.shutdown().unwrap();
    let mut ended = None;
    for _ in 0..100 {
        if let Some(st) = ns.try_wait().unwrap() {
            ended = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if ended.is_none() {
        let _ = ns.kill();
    }
    let _ = ns.wait();
    let st = ended.expect("PID 1 agent did not power the namespace off");
    // reboot(POWER_OFF) in a pid namespace ends its init with SIGINT,
    // which unshare passes on: not an exit or a crash.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGINT), "{st:?}");
}

/// `--virtio-port` with a real character device: a pty slave stands in
/// for `/dev/vportNpM` (no virtio-serial device without a VM); the test
/// speaks on the master like qemu's chardev.
#[test]
fn virtio_port_on_a_character_device() {
    use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
    use std::io::{BufRead, BufReader};
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut t = tcgetattr(&pty.slave).unwrap();
    cfmakeraw(&mut t);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &t).unwrap();
    let slave_path = nix::unistd::ttyname(&pty.slave).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = Command::new(AGENT)
        .arg("--virtio-port")
        .arg(&slave_path)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut agent = KillOnDrop(agent);
    let master = std::fs::File::from(pty.master);
    let mut w = master.try_clone().unwrap();
    let mut r = BufReader::new(master);
    let mut ask = |line: &str| -> serde_json::Value {
        w.write_all(line.as_bytes()).unwrap();
        let mut resp = String::new();
        r.read_line(&mut resp).unwrap();
        serde_json::from_str(&resp).unwrap_or_else(|e| panic!("{resp:?}: {e}"))
    };
    // The agent opens the port when it starts; until then writes sit in
    // the pty. Requests are answered in order.
    let v = ask("{\"op\":\"ping\",\"id\":\"1\"}\n");
    assert_eq!(v["pong"], true, "{v}");
    let v = ask("{\"op\":\"set_env\",\"id\":\"2\",\"env\":{\"PORT\":\"virtio\"}}\n");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("state/env")).unwrap(),
        "PORT=virtio\n"
    );
    let v = ask("{\"op\":\"shutdown\",\"id\":\"3\"}\n");
    assert_eq!(v["ok"], true, "{v}");
    assert!(agent.0.wait().unwrap().success());
    drop(pty.slave);
}
