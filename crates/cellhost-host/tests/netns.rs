//! `netns::connect_in`: the caller's check decides, and the connection is
//! made in the named process's network namespace, not the caller's.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use cellhost_host::netns::connect_in;

const T: Duration = Duration::from_secs(5);

#[test]
fn a_process_the_check_refuses_is_never_joined() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let me = std::process::id() as i32;
    let e = connect_in(me, |_| false, addr, T).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    // The check sees the process's cgroup file.
    let mut seen = String::new();
    let check = |c: &str| {
        seen = c.to_string();
        true
    };
    connect_in(me, check, addr, T).unwrap();
    assert!(seen.contains(':'), "{seen:?}");
    // A pid that does not exist.
    assert!(connect_in(i32::MAX, |_| true, addr, T).is_err());
}

/// A process in a network namespace of its own (`unshare --net`, root
/// only): the host's listener on 127.0.0.1 is not there.
#[test]
fn the_connection_is_made_in_the_other_namespace() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: unshare --net needs root");
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    let mut child = std::process::Command::new("unshare")
        .args(["--net", "sleep", "30"])
        .spawn()
        .unwrap();
    // unshare execs sleep in the new namespace: wait until it has.
    let pid = child.id() as i32;
    let own = std::fs::read_link("/proc/self/ns/net").unwrap();
    let until = std::time::Instant::now() + T;
    while std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap() == own {
        assert!(std::time::Instant::now() < until, "unshare did not unshare");
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = connect_in(pid, |_| true, addr, T);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        r.is_err(),
        "reached the host's listener from another namespace"
    );
    // From our own namespace the same address answers.
    let me = std::process::id() as i32;
    assert!(connect_in(me, |_| true, addr, T).is_ok());
}
