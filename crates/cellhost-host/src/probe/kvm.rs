//! KVM: the device's API version and an empty VM by ioctls, and (with
//! `kvm_boot`) a probe boot of a guest kernel under `-accel kvm`.

use super::*;

/// What the ioctl part of the KVM check found.
#[derive(Debug, thiserror::Error)]
pub(super) enum KvmError {
    #[error("/dev/kvm does not exist")]
    NoDevice,
    #[error("/dev/kvm exists but does not open read-write: {0}")]
    Open(io::Error),
    #[error("KVM_GET_API_VERSION failed: {0}")]
    ApiVersionCall(io::Error),
    #[error("KVM_GET_API_VERSION is {0}, not {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("/dev/kvm opens but KVM_CREATE_VM fails: {0}")]
    CreateVm(io::Error),
}

/// Open /dev/kvm, check the API version, create (and close) an empty VM.
pub(super) fn kvm_ioctls() -> Result<(), KvmError> {
    let path = Path::new("/dev/kvm");
    if !path.exists() {
        return Err(KvmError::NoDevice);
    }
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(KvmError::Open)?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and touches no memory.
    let v = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if v < 0 {
        return Err(KvmError::ApiVersionCall(io::Error::last_os_error()));
    }
    if v != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(v));
    }
    // SAFETY: KVM_CREATE_VM takes the machine type (0) by value and returns
    // a new fd, which is owned (and closed) right away.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    if vm < 0 {
        return Err(KvmError::CreateVm(io::Error::last_os_error()));
    }
    // SAFETY: vm is a fresh descriptor nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    Ok(())
}

/// The guest kernel for the probe boot.
pub(super) fn find_probe_kernel(opts: &ProbeOptions) -> Option<PathBuf> {
    if let Some(k) = &opts.probe_kernel {
        return Some(k.clone());
    }
    if let Some(k) = std::env::var_os("CELLHOST_PROBE_KERNEL").filter(|k| !k.is_empty()) {
        return Some(PathBuf::from(k));
    }
    let images = Path::new("/var/lib/cellhost/images/kernel");
    if images.is_file() {
        return Some(images.to_path_buf());
    }
    let mut boot: Vec<PathBuf> = fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    boot.sort_by(|a, b| version_cmp(a, b));
    boot.pop()
}

/// Compare paths by their digit runs as numbers (`6.10` after `6.9`).
pub(super) fn version_cmp(a: &Path, b: &Path) -> std::cmp::Ordering {
    pub(super) fn key(p: &Path) -> Vec<u64> {
        p.to_string_lossy()
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect()
    }
    key(a).cmp(&key(b)).then_with(|| a.cmp(b))
}

/// Serial lines a kernel prints only once it has finished initialising and
/// turns to the root filesystem or init. (A bare "VFS:" is not enough:
/// "VFS: Disk quotas" appears early in boot.)
pub(super) const BOOT_MARKERS: [&str; 7] = [
    "Run /init",
    "Run /sbin/init",
    "Freeing unused kernel image",
    "VFS: Cannot open root device",
    "VFS: Unable to mount root",
    "No filesystem could mount root",
    "Kernel panic - not syncing: VFS",
];

/// Boot serial output shows the kernel got past early boot: "Linux version"
/// and, after it, init starting or the root mount attempt (a VFS panic for
/// lack of a root disk still proves the kernel ran under KVM).
pub(super) fn boot_got_far(serial: &[u8]) -> bool {
    let text = String::from_utf8_lossy(serial);
    let Some(start) = text.find("Linux version") else {
        return false;
    };
    let after = &text[start..];
    BOOT_MARKERS.iter().any(|m| after.contains(m))
}

/// Drop terminal escape sequences (SeaBIOS and the kernel clear the screen).
pub(super) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // CSI: parameters and intermediates up to a final byte @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// Boot `kernel` under `-accel kvm` on q35 (SeaBIOS, present wherever
/// qemu-system-x86 is) with no disk and no network.
pub(super) fn kvm_probe_boot(
    qemu: &Path,
    kernel: &Path,
    deadline: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let kernel_arg = kernel.as_os_str();
    let args: [&OsStr; 17] = [
        OsStr::new("-accel"),
        OsStr::new("kvm"),
        OsStr::new("-M"),
        OsStr::new("q35"),
        OsStr::new("-m"),
        OsStr::new("256M"),
        OsStr::new("-smp"),
        OsStr::new("1"),
        OsStr::new("-nographic"),
        OsStr::new("-no-reboot"),
        OsStr::new("-nic"),
        OsStr::new("none"),
        OsStr::new("-kernel"),
        kernel_arg,
        OsStr::new("-append"),
        OsStr::new("console=ttyS0 panic=-1"),
        OsStr::new("-no-user-config"),
    ];
    let o = run_until(qemu, &args, deadline, boot_got_far).map_err(|e| e.to_string())?;
    if boot_got_far(&o.stdout) {
        return Ok(started.elapsed());
    }
    let serial = strip_ansi(&String::from_utf8_lossy(&o.stdout));
    let last_serial = serial.lines().map(str::trim).rfind(|l| !l.is_empty());
    let stderr = String::from_utf8_lossy(&o.stderr);
    let last_err = stderr.lines().map(str::trim).rfind(|l| !l.is_empty());
    let how = if o.timed_out {
        format!("no sign of boot within {deadline:?}")
    } else {
        format!("qemu ended ({})", o.status)
    };
    let stage = if serial.contains("Linux version") {
        "the guest kernel started but did not reach its root mount or init"
    } else {
        "no kernel banner (\"Linux version\") on the serial console"
    };
    let mut why = format!("{how}; {stage}");
    if let Some(l) = last_serial {
        why.push_str(&format!("; last serial line: {l:?}"));
    }
    if let Some(l) = last_err {
        why.push_str(&format!("; qemu stderr: {l}"));
    }
    Err(why)
}

pub(super) fn check_kvm(opts: &ProbeOptions, qemu: Option<&Path>) -> Capability {
    if let Err(e) = kvm_ioctls() {
        return Capability::new("kvm", false, e.to_string());
    }
    let base = "/dev/kvm opens and KVM_CREATE_VM works";
    let no_boot = |why: &str| {
        Capability::new(
            "kvm",
            false,
            format!(
                "{base}, but no probe boot ran ({why}); guest kernels may still fail on this host"
            ),
        )
    };
    let Some(qemu) = qemu else {
        return no_boot("qemu-system-x86_64 not found");
    };
    let Some(kernel) = find_probe_kernel(opts) else {
        return no_boot(
            "no guest kernel: set CELLHOST_PROBE_KERNEL or install /var/lib/cellhost/images/kernel",
        );
    };
    if !opts.kvm_boot {
        return no_boot("not requested: `cellhost doctor --kvm-boot` runs one");
    }
    match kvm_probe_boot(qemu, &kernel, opts.kvm_boot_deadline) {
        Ok(took) => Capability::new(
            "kvm",
            true,
            format!(
                "{base}; probe boot of {} under KVM reached init/root mount in {:.1}s",
                kernel.display(),
                took.as_secs_f64()
            ),
        ),
        Err(why) => Capability::new(
            "kvm",
            false,
            format!(
                "{base}, but the probe boot of {} under KVM failed: {why}",
                kernel.display()
            ),
        ),
    }
}
