//! PID 1 duties, for an agent booted as a microVM's init.
//!
//! # Layout in the guest
//!
//! ```text
//! /proc      proc       (mounted when this is PID 1: always, a new pid
//!                        namespace needs its own)
//! /sys       sysfs      (when nothing is mounted there)
//! /dev       devtmpfs   (when /dev/null is missing)
//! /dev/pts   devpts     (when /dev/pts is empty)
//! /run       tmpfs 0755 (when nothing is mounted there)
//! ```
//!
//! # Lifecycle
//!
//! [`setup`] runs first, before any listener. Reaping is the reaper
//! thread's job ([`super::exec::Reaper`]): as PID 1 every orphan in the
//! guest is our child; outside PID 1 the agent makes itself a child
//! subreaper so orphans of its execs still come back to it. [`poweroff`]
//! ends the machine: SIGTERM to everything, a grace period, SIGKILL,
//! sync, `reboot(POWER_OFF)`.
//!
//! # Idempotency
//!
//! Each mount is skipped when something is already there, so an initramfs
//! that mounted some of them itself is fine.
//!
//! # Threat model
//!
//! None of its own: PID 1 in a guest the cell owns. Mounts use `nosuid`
//! and `noexec` where the file system never holds programs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MsFlags, mount};

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = mount(Some(fstype), target, Some(fstype), flags, data) {
        tracing::warn!("mount {fstype} on {target}: {e}");
    }
}

/// Mount what a bare initramfs lacks. A no-op outside PID 1 except that
/// it makes the agent a child subreaper.
pub fn setup(pid1: bool) {
    if !pid1 {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer
        // argument and touches no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            tracing::warn!(
                "PR_SET_CHILD_SUBREAPER: {}",
                std::io::Error::last_os_error()
            );
        }
        return;
    }
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", common, None);
    // One read of the table (through our own /proc now), for the rest.
    let mounted: Vec<PathBuf> = cellhost_os::mountinfo::read_self()
        .map(|t| t.into_iter().map(|m| m.mount_point).collect())
        .unwrap_or_default();
    let absent = |p: &str| !mounted.iter().any(|m| m == Path::new(p));
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let wanted: [(&str, &str, MsFlags, Option<&str>, bool); 4] = [
        ("sysfs", "/sys", common, None, absent("/sys")),
        (
            "devtmpfs",
            "/dev",
            nosuid_noexec,
            Some("mode=0755"),
            !Path::new("/dev/null").exists(),
        ),
        (
            "devpts",
            "/dev/pts",
            nosuid_noexec,
            Some("newinstance,ptmxmode=0666,mode=0620"),
            absent("/dev/pts"),
        ),
        (
            "tmpfs",
            "/run",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
            absent("/run"),
        ),
    ];
    for (fstype, target, flags, data, missing) in wanted {
        if missing {
            mount_fs(fstype, target, flags, data);
        }
    }
}

/// Any user process besides us (PID 1) in /proc (kernel threads have an
/// empty cmdline and are not waited for).
fn others_alive() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let pid = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok());
        pid.is_some_and(|p| p != 1)
            && std::fs::read(e.path().join("cmdline")).is_ok_and(|c| !c.is_empty())
    })
}

/// The module list a microVM initramfs carries (see `cellhost image
/// initramfs`): one `.ko` path per line, dependencies first.
pub const MODULES_LIST: &str = "/etc/cellhost/modules";

/// Load the kernel modules named in `list` (PID 1, before the listeners:
/// a stock distribution kernel has virtio-mmio, virtio-console and
/// virtio-blk as modules). A module already loaded is fine; any other
/// failure is logged and the next one tried, so one bad entry cannot keep
/// the guest channel down when the driver it needs loaded. Returns how
/// many loaded.
pub fn load_modules(list: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(list) else {
        return 0;
    };
    let mut loaded = 0;
    for path in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("module {path}: {e}");
                continue;
            }
        };
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) => loaded += 1,
            Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => tracing::warn!("module {path}: {e}"),
        }
    }
    loaded
}

/// Mark every descriptor above stderr close-on-exec: whatever the agent
/// inherited (a leaked fd of whatever started it) must not reach the
/// processes it starts.
pub fn cloexec_inherited() {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // The listing's own fd is closed by now: EBADF, ignored.
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

/// End the guest (PID 1) — never returns.
pub fn poweroff() -> ! {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    // -1: every process but us.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    for _ in 0..20 {
        if !others_alive() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    tracing::error!("poweroff: {e:?}");
    // PID 1 must not exit (the kernel panics); wait to be killed.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
