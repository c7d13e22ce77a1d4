//! `cellhost bench microvm`: how long a microVM cell takes to be ready,
//! against qemu booting the same kernel with nothing of ours, in the same
//! run, interleaved (one of each per round).
//!
//! - cellhost: `QemuBackend::create` of a microvm cell — cell dir, the
//!   vmm shim, qemu started, QMP answering, the kernel booted, the agent
//!   (PID 1 of the initramfs) loading its modules and answering `hello`
//!   over virtio-serial, env pushed — until it returns. Destroy is not
//!   timed.
//! - bare: `qemu-system-x86_64 -M microvm -kernel … -initrd …` of the same
//!   kernel, same machine options and kernel command line, with a busybox
//!   initramfs whose /init is `poweroff -f`, from spawn to exit.
//!
//! Under TCG most of both is emulated kernel boot, so the ratio says what
//! cellhost adds on top of a boot; the 150 ms KVM target cannot be
//! measured on this host (its KVM does not boot stock kernels) and is
//! reported as such. Numbers are reported, never asserted.
//!
//! The cells run as a supervisor's would: qemu as the base of a uid range
//! leased here host-wide (the first free slot of the default policy's
//! range, claimed in /run/cellhost/uids and given back at the end), under
//! its sandbox and in its cgroup. The bare boot is plain qemu as root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use cellhost_core::ids::CellId;
use cellhost_core::{Backend, CreateRequest};
use cellhost_host::probe::Accel;
use cellhost_qemu::image::{ImageStore, InitramfsRequest, MICROVM_MODULES, build_initramfs};
use cellhost_spec::Isolation;
use serde_json::json;

use crate::bench::{RemoveOnDrop, Series, fmt_ratio, timed_command, verdict};
use crate::cli::BenchArgs;

/// Target: cellhost's boot-to-ready p50 within 1.2× a bare boot (TCG).
const TARGET_RATIO: f64 = 1.2;

fn busybox_root(dir: &Path, init: Option<&str>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).context("/bin/busybox")?;
    for a in ["sh", "poweroff", "echo", "sleep", "cat"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a))?;
    }
    if let Some(script) = init {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(dir.join("init"), script)?;
        std::fs::set_permissions(dir.join("init"), std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// One uid range for the bench's cells (one at a time), claimed
/// host-wide as the supervisor claims its leases; released on drop.
struct BenchUids {
    claims: cellhost_supervisor::uid_claims::UidClaims,
    holder: CellId,
    range: cellhost_core::UidRange,
}

impl BenchUids {
    fn claim() -> anyhow::Result<BenchUids> {
        let pool = cellhost_policy::Uids::default();
        let claims = cellhost_supervisor::uid_claims::UidClaims::new(
            cellhost_supervisor::uid_claims::CLAIMS_DIR,
            format!("bench-microvm-{}", std::process::id()),
            format!("/proc/{}", std::process::id()),
        );
        let holder = CellId::random();
        let range = claims
            .claim_free(&holder, pool.start, pool.count)?
            .with_context(|| {
                format!(
                    "no free uid range in {}",
                    cellhost_supervisor::uid_claims::CLAIMS_DIR
                )
            })?;
        Ok(BenchUids {
            claims,
            holder,
            range,
        })
    }
}

impl Drop for BenchUids {
    fn drop(&mut self) {
        self.claims.release(&self.holder, self.range);
    }
}

fn kernel_files(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let vmlinuz = std::fs::read_dir(dir.join("boot"))
        .with_context(|| format!("{}/boot", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no boot/vmlinuz-* in --kernel-dir")?;
    let modules = std::fs::read_dir(dir.join("lib/modules"))
        .context("no lib/modules in --kernel-dir")?
        .flatten()
        .next()
        .context("no lib/modules/<version> in --kernel-dir")?
        .path();
    Ok((vmlinuz, modules))
}

pub async fn bench_microvm(
    state_dir: &Path,
    args: &BenchArgs,
    json_out: bool,
) -> anyhow::Result<u8> {
    let rounds = args.cells.clamp(1, 50);
    let kdir = args.kernel_dir.clone().context(
        "--kernel-dir (or CELLHOST_TEST_KERNEL_DIR) is needed: an unpacked linux-image-*-amd64",
    )?;
    let agent = args
        .agent
        .clone()
        .or_else(|| std::env::var_os("CELLHOST_AGENT_STATIC").map(PathBuf::from))
        .context(
            "the static agent is needed: --agent or CELLHOST_AGENT_STATIC (scripts/build-agent)",
        )?;
    let (kernel, modules) = kernel_files(&kdir)?;
    let root = state_dir.join(format!("bench-microvm-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(root.clone());
    std::fs::create_dir_all(&root)?;

    // The cellhost image: busybox + the agent + virtio modules.
    let rootfs = root.join("rootfs");
    busybox_root(&rootfs, None)?;
    let store = ImageStore::of_state_dir(&root);
    store.build_microvm(
        "bench",
        &kernel,
        &InitramfsRequest {
            rootfs: Some(rootfs),
            agent: Some(agent),
            modules_dir: Some(modules),
            modules: MICROVM_MODULES.iter().map(|s| s.to_string()).collect(),
        },
        None,
        false,
    )?;
    // The bare one: busybox whose /init powers off at once.
    let bare_root = root.join("bare-root");
    busybox_root(&bare_root, Some("#!/bin/sh\npoweroff -f\n"))?;
    let bare_initrd = root.join("bare-initrd");
    std::fs::write(
        &bare_initrd,
        build_initramfs(&InitramfsRequest {
            rootfs: Some(bare_root),
            ..Default::default()
        })?,
    )?;

    let exe = std::env::current_exe()?;
    let mut cfg = cellhost_qemu::QemuConfig::new(Isolation::Microvm, &root, exe);
    cfg.accel = Accel::Tcg;
    let tsc = cellhost_qemu::args::tsc_arg(cfg.accel, cfg.tsc_khz);
    let backend = cellhost_qemu::QemuBackend::new(cfg.clone());
    let cell = cellhost_spec::parse_and_validate(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {name: bench}\nspec:\n  isolation: microvm\n  image: bench\n  command: [/bin/true]\n  env: {A: b}\n",
    )?;
    let bare = |initrd: &Path| {
        let mut c = Command::new(&cfg.qemu);
        c.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-machine",
            cellhost_qemu::args::MICROVM_MACHINE,
            "-accel",
            "tcg",
            "-cpu",
            "max",
        ])
        .args(["-m", "256", "-smp", "1", "-serial", "null", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "{} {tsc}rdinit=/init",
            cellhost_qemu::args::MICROVM_CMDLINE_BASE
        ));
        c
    };

    let uids = BenchUids::claim()?;
    // The tier's cgroup group goes at the end (its cells' went with them).
    struct RemoveGroup(String);
    impl Drop for RemoveGroup {
        fn drop(&mut self) {
            cellhost_host::cgroups::remove_instance_group(&self.0);
        }
    }
    let _group = RemoveGroup(cellhost_host::cgroups::instance_tag(&cfg.state_dir));
    let (mut ours, mut base) = (Series(Vec::new()), Series(Vec::new()));
    // One of each to warm the page cache, not counted.
    timed_command(&mut bare(&bare_initrd))?;
    for i in 0..=rounds {
        let id = CellId::random();
        let t0 = Instant::now();
        let mut req = CreateRequest::new(id, cell.clone());
        req.uids = Some(uids.range);
        let h = backend.create(req).await.context("microvm create")?;
        let took = t0.elapsed();
        let report = backend.destroy(&h).await?;
        anyhow::ensure!(
            report.is_clean(),
            "teardown left residue: {}",
            report.summary()
        );
        let b = timed_command(&mut bare(&bare_initrd))?;
        if i > 0 {
            ours.push(took);
            base.push(b);
        }
    }
    let ratio = ours.p50_ratio(&base);
    let ok = ratio.map(|r| r <= TARGET_RATIO);
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "bench": "microvm",
                "accel": "tcg",
                "boots": rounds,
                "cellhost_ready": ours.json(),
                "bare_qemu_poweroff": base.json(),
                "ratio_p50": ratio,
                "target_ratio": TARGET_RATIO,
                "target_met": ok,
                "kvm_target_ms": 150,
                "kvm_measured": false,
            }))?
        );
    } else {
        println!("microvm boot, TCG, {rounds} boots each, interleaved (256 MiB, 1 vCPU)");
        let row = |name: &str, s: &Series| {
            println!(
                "  {name:<34} p50 {:>8.1} ms   p99 {:>8.1} ms",
                s.ms(50.0).unwrap_or(0.0),
                s.ms(99.0).unwrap_or(0.0)
            )
        };
        row("cellhost create → agent ready", &ours);
        row("bare qemu -M microvm → poweroff", &base);
        println!(
            "  ratio {} (target ≤ {TARGET_RATIO}x under TCG: {})",
            fmt_ratio(ratio),
            verdict(ok)
        );
        println!(
            "  KVM target ≤ 150 ms: not measurable here (this host's KVM does not boot stock guest kernels)"
        );
    }
    Ok(0)
}
