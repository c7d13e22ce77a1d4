//! Host binaries the tiers run: cryptsetup, qemu (and its sandbox), nft.

use super::*;

pub(super) fn check_cryptsetup() -> Capability {
    let Some(bin) = which("cryptsetup") else {
        return Capability::new("cryptsetup", false, "cryptsetup not found on PATH");
    };
    match run_with_timeout(&bin, &[OsStr::new("--version")], CMD_TIMEOUT) {
        Ok(o) if o.success() => Capability::new(
            "cryptsetup",
            true,
            format!("{} ({})", o.first_line(), bin.display()),
        ),
        Ok(o) => Capability::new(
            "cryptsetup",
            false,
            format!("{} --version: {}", bin.display(), o.failure(CMD_TIMEOUT)),
        ),
        Err(e) => Capability::new("cryptsetup", false, e.to_string()),
    }
}

pub(super) struct QemuFacts {
    pub(super) cap: Capability,
    /// `qemu.sandbox`: qemu runs under [`QEMU_SANDBOX`].
    pub(super) sandbox: Capability,
    pub(super) system: Option<PathBuf>,
    pub(super) microvm: bool,
}

impl QemuFacts {
    pub(super) fn failed() -> Self {
        QemuFacts {
            cap: Capability::new("qemu", false, "the check panicked"),
            sandbox: Capability::new("qemu.sandbox", false, "the check panicked"),
            system: None,
            microvm: false,
        }
    }
}

/// Does `qemu` run under [`QEMU_SANDBOX`]? It is started with no machine
/// and QMP on stdout: qemu installs its seccomp filter while it starts,
/// before the monitor greets, and exits if it cannot (a build without
/// seccomp refuses `-sandbox` outright). A greeting means the filter is in
/// place; the child is then killed.
pub(super) fn check_qemu_sandbox(qemu: &Path) -> Capability {
    let args: Vec<&OsStr> = [
        "-sandbox",
        QEMU_SANDBOX,
        "-machine",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-qmp",
        "stdio",
    ]
    .into_iter()
    .map(OsStr::new)
    .collect();
    let greeted = |out: &[u8]| out.windows(6).any(|w| w == b"\"QMP\":");
    match run_until(qemu, &args, CMD_TIMEOUT, greeted) {
        Ok(o) if o.stopped => Capability::new(
            "qemu.sandbox",
            true,
            format!("qemu starts under -sandbox {QEMU_SANDBOX}"),
        ),
        Ok(o) => Capability::new(
            "qemu.sandbox",
            false,
            format!(
                "qemu -sandbox {QEMU_SANDBOX}: {} (VM cells never run without it)",
                o.failure(CMD_TIMEOUT)
            ),
        ),
        Err(e) => Capability::new("qemu.sandbox", false, e.to_string()),
    }
}

pub(super) fn check_qemu() -> QemuFacts {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    let mut system = None;
    for name in ["qemu-system-x86_64", "qemu-img", "qemu-storage-daemon"] {
        let Some(bin) = which(name) else {
            missing.push(format!("{name} not found"));
            continue;
        };
        match run_with_timeout(&bin, &[OsStr::new("--version")], CMD_TIMEOUT) {
            Ok(o) if o.success() => {
                found.push(format!("{name} {}", version_of(&o.first_line())));
                if name == "qemu-system-x86_64" {
                    system = Some(bin);
                }
            }
            Ok(o) => missing.push(format!("{name} --version: {}", o.failure(CMD_TIMEOUT))),
            Err(e) => missing.push(e.to_string()),
        }
    }
    let microvm = system.as_deref().is_some_and(|q| {
        run_with_timeout(
            q,
            &[OsStr::new("-machine"), OsStr::new("help")],
            CMD_TIMEOUT,
        )
        .is_ok_and(|o| {
            o.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some("microvm"))
        })
    });
    let mut detail = found.join(", ");
    if system.is_some() {
        detail.push_str(if microvm {
            " (microvm machine available)"
        } else {
            " (no microvm machine)"
        });
    }
    if !missing.is_empty() {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str(&missing.join(", "));
    }
    let sandbox = match &system {
        Some(q) => check_qemu_sandbox(q),
        None => Capability::new("qemu.sandbox", false, "qemu-system-x86_64 not found"),
    };
    QemuFacts {
        cap: Capability::new("qemu", missing.is_empty(), detail),
        sandbox,
        system,
        microvm,
    }
}

pub(super) fn check_nftables() -> Capability {
    let module = if fs::read_to_string("/proc/modules").is_ok_and(|t| {
        t.lines()
            .any(|l| l.split_whitespace().next() == Some("nf_tables"))
    }) {
        Some("nf_tables in /proc/modules")
    } else if Path::new("/sys/module/nf_tables").exists() {
        Some("/sys/module/nf_tables exists")
    } else {
        None
    };
    let nft = match which("nft") {
        None => Err("nft not found on PATH".to_string()),
        Some(bin) => match run_with_timeout(
            &bin,
            &[OsStr::new("list"), OsStr::new("tables")],
            CMD_TIMEOUT,
        ) {
            Ok(o) if o.success() => Ok(format!("{} list tables runs", bin.display())),
            Ok(o) => Err(format!(
                "{} list tables: {}",
                bin.display(),
                o.failure(CMD_TIMEOUT)
            )),
            Err(e) => Err(e.to_string()),
        },
    };
    match (nft, module) {
        (Ok(n), Some(m)) => Capability::new("nftables", true, format!("{n}; {m}")),
        (Ok(n), None) => Capability::new("nftables", true, n),
        (Err(n), Some(m)) => Capability::new("nftables", true, format!("{m}; {n}")),
        (Err(n), None) => Capability::new(
            "nftables",
            false,
            format!("{n}; nf_tables neither in /proc/modules nor /sys/module"),
        ),
    }
}
