//! Root and the device nodes the tiers open: /dev/mapper/control, /dev/fuse,
//! /dev/loop-control, /dev/net/tun, /dev/vhost-vsock.

use super::*;

pub(super) fn check_root() -> Capability {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Capability::new("root", true, "effective uid 0")
    } else {
        Capability::new(
            "root",
            false,
            format!("effective uid {euid}; the process tier needs root"),
        )
    }
}

pub(super) fn check_device_mapper() -> Capability {
    let control = Path::new("/dev/mapper/control");
    let listed = ["/proc/misc", "/proc/devices"].into_iter().find(|p| {
        fs::read_to_string(p).is_ok_and(|t| {
            t.lines()
                .any(|l| l.split_whitespace().nth(1) == Some("device-mapper"))
        })
    });
    let (ok, detail) = match (control.exists(), listed) {
        (true, Some(p)) => (true, format!("/dev/mapper/control exists, {p} lists device-mapper")),
        (true, None) => (
            false,
            "/dev/mapper/control exists but neither /proc/misc nor /proc/devices lists device-mapper".into(),
        ),
        (false, Some(p)) => (false, format!("{p} lists device-mapper but /dev/mapper/control is missing")),
        (false, None) => (
            false,
            "no /dev/mapper/control and the kernel lists no device-mapper (dm-crypt volumes cannot open)".into(),
        ),
    };
    Capability::new("device-mapper", ok, detail)
}

pub(super) fn check_fuse() -> Capability {
    let path = Path::new("/dev/fuse");
    if !path.exists() {
        return Capability::new("fuse", false, "/dev/fuse does not exist");
    }
    match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Capability::new("fuse", true, "/dev/fuse exists and opens read-write"),
        Err(e) => Capability::new(
            "fuse",
            false,
            format!("/dev/fuse exists but open fails: {e}"),
        ),
    }
}

pub(super) fn check_loop() -> Capability {
    node_exists("loop", "/dev/loop-control")
}

pub(super) fn check_tun() -> Capability {
    node_exists("tun", "/dev/net/tun")
}

pub(super) fn node_exists(name: &'static str, path: &str) -> Capability {
    match fs::metadata(path) {
        Ok(_) => Capability::new(name, true, format!("{path} exists")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Capability::new(name, false, format!("{path} does not exist"))
        }
        Err(e) => Capability::new(name, false, format!("{path}: {e}")),
    }
}

pub(super) fn check_vsock() -> Capability {
    let vhost = Path::new("/dev/vhost-vsock").exists();
    let guest = Path::new("/dev/vsock").exists();
    // SAFETY: socket() takes no pointers; a returned fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    let socket = if fd >= 0 {
        // SAFETY: fd is a fresh descriptor nothing else owns.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    let detail = format!(
        "/dev/vhost-vsock (host side, for guests): {}; AF_VSOCK socket: {}; /dev/vsock (guest side): {}",
        if vhost { "present" } else { "missing" },
        match &socket {
            Ok(()) => "creates".to_string(),
            Err(e) => format!("fails ({e})"),
        },
        if guest { "present" } else { "missing" },
    );
    Capability::new("vsock", vhost && socket.is_ok(), detail)
}
