//! The static agent (`scripts/build-agent`, exported by `scripts/test` as
//! CELLHOST_AGENT_STATIC) has no program interpreter and runs alone in an
//! otherwise empty root: what an initramfs or a foreign rootfs offers.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cellhost_guest::proto::MainState;
use cellhost_guest::{Client, ConnectOptions, ExecRequest};

fn static_agent() -> Option<PathBuf> {
    match std::env::var_os("CELLHOST_AGENT_STATIC") {
        Some(p) if Path::new(&p).is_file() => Some(p.into()),
        _ => {
            println!(
                "skipped: CELLHOST_AGENT_STATIC is not set to a built file (scripts/test builds it with scripts/build-agent)"
            );
            None
        }
    }
}

/// True when an ELF64 file has a PT_INTERP program header (needs ld.so).
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == 3 // PT_INTERP
    })
}

#[test]
fn the_test_binary_is_dynamic_so_the_check_can_fail() {
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(
        has_interpreter(&me),
        "a normal test binary links dynamically"
    );
}

#[test]
fn static_agent_runs_alone_in_an_empty_root() {
    let Some(agent) = static_agent() else { return };
    let bytes = std::fs::read(&agent).unwrap();
    assert!(
        !has_interpreter(&bytes),
        "{} needs a program interpreter",
        agent.display()
    );
    if !nix::unistd::geteuid().is_root() {
        println!("skipped the chroot part: needs root");
        return;
    }
    // A root holding nothing but the agent.
    let root = tempfile::tempdir().unwrap();
    std::fs::copy(&agent, root.path().join("agent")).unwrap();
    let (host, guest) = UnixStream::pair().unwrap();
    let out: OwnedFd = guest.try_clone().unwrap().into();
    let mut child = Command::new("chroot")
        .arg(root.path())
        .args([
            "/agent",
            "--stdio",
            "--state-dir",
            "/state",
            "--",
            "/agent",
            "--version",
        ])
        .stdin(Stdio::from(OwnedFd::from(guest)))
        .stdout(Stdio::from(out))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = Client::from_unix_stream(host, "chroot", &ConnectOptions::default()).unwrap();
    c.set_secret("token", b"s3cret").unwrap();
    assert_eq!(
        std::fs::read(root.path().join("state/secrets/token")).unwrap(),
        b"s3cret"
    );
    let out = c
        .exec(ExecRequest {
            argv: vec!["/agent".into(), "--version".into()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cellhost-agent "));
    let mut st = c.status().unwrap();
    for _ in 0..100 {
        if matches!(st.main, MainState::Exited { .. }) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        st = c.status().unwrap();
    }
    assert!(
        matches!(
            st.main,
            MainState::Exited {
                exit_code: Some(0),
                ..
            }
        ),
        "{:?}",
        st.main
    );
    c.shutdown().unwrap();
    assert!(child.wait().unwrap().success());
}
