//! Test fixtures: a Debian guest kernel (unpacked by scripts/test from
//! `apt-get download linux-image-*-amd64`), busybox rootfs images built
//! here, and backends on a temp state dir. Nothing is downloaded from the
//! internet; tests skip with a printed reason when a piece is missing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cellhost_qemu::image::{ImageStore, InitramfsRequest, MICROVM_MODULES};

/// `<dir>/boot/vmlinuz-*` and `<dir>/lib/modules/<v>` of the unpacked
/// kernel package, from CELLHOST_TEST_KERNEL_DIR.
pub fn kernel() -> Option<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(std::env::var_os("CELLHOST_TEST_KERNEL_DIR")?);
    let vmlinuz = std::fs::read_dir(dir.join("boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })?;
    let modules = std::fs::read_dir(dir.join("lib/modules"))
        .ok()?
        .flatten()
        .next()?
        .path();
    Some((vmlinuz, modules))
}

pub fn agent() -> Option<PathBuf> {
    std::env::var_os("CELLHOST_AGENT_STATIC").map(PathBuf::from)
}

/// The `cellhost` binary (the vmm shim lives in it).
pub fn cellhost_bin() -> PathBuf {
    let mut p = std::env::current_exe().unwrap();
    p.pop();
    if p.ends_with("deps") {
        p.pop();
    }
    p.join("cellhost")
}

/// Everything a real boot needs, or why not.
pub fn boot_ready() -> Result<(PathBuf, PathBuf, PathBuf), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("not root".into());
    }
    if cellhost_host::probe::which("qemu-system-x86_64").is_none() {
        return Err("qemu-system-x86_64 not installed (scripts/test installs it)".into());
    }
    let (k, m) = kernel().ok_or("CELLHOST_TEST_KERNEL_DIR unset (scripts/test sets it)")?;
    let a = agent().ok_or("CELLHOST_AGENT_STATIC unset (scripts/test builds it)")?;
    if !cellhost_bin().exists() {
        return Err(format!("{} not built", cellhost_bin().display()));
    }
    Ok((k, m, a))
}

#[macro_export]
macro_rules! require_boot {
    () => {
        match common::boot_ready() {
            Ok(x) => x,
            Err(why) => {
                eprintln!("SKIP: {why}");
                return;
            }
        }
    };
}

/// A busybox rootfs: /bin/busybox plus every applet as a symlink.
pub fn busybox_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    let out = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    for d in [
        "etc", "tmp", "root", "proc", "sys", "dev", "run", "sbin", "newroot",
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
}

/// A microvm image `name` in `store`: the kernel + busybox + the agent.
pub fn microvm_image(store: &ImageStore, name: &str, kernel: &Path, modules: &Path, agent: &Path) {
    let root = tempfile::tempdir().unwrap();
    busybox_rootfs(root.path());
    let req = InitramfsRequest {
        rootfs: Some(root.path().to_path_buf()),
        agent: Some(agent.to_path_buf()),
        modules_dir: Some(modules.to_path_buf()),
        modules: MICROVM_MODULES.iter().map(|s| s.to_string()).collect(),
    };
    store
        .build_microvm(name, kernel, &req, None, false)
        .unwrap();
}

/// The vm test image's init: reads the NoCloud seed (the real files
/// cloud-init reads; cloud-init itself needs Python, not in busybox),
/// names the host after it, applies its network-config when there is one
/// (bridged), serves it over HTTP on :8080 and powers off on the ACPI power
/// button (busybox acpid).
const VM_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /seed && mount -t iso9660 -o ro /dev/vdb /seed || echo "cellhost-test-vm: no seed on vdb: $(ls /dev/vd* /seed)"
hn=$(sed -n 's/^local-hostname: //p' /seed/meta-data)
id=$(sed -n 's/^instance-id: //p' /seed/meta-data)
hostname "$hn"
echo "cellhost-test-vm: seed instance-id=$id hostname=$hn"
ip link set lo up; ip link set eth0 up 2>/dev/null
if [ -f /seed/network-config ]; then
  # bridged: the seed's network-config (version 2) names address and route
  addr=$(sed -n 's/^      - \([0-9.]*\/[0-9]*\)$/\1/p' /seed/network-config)
  gw=$(sed -n 's/^        via: //p' /seed/network-config)
  ip addr add "$addr" dev eth0; ip route add default via "$gw"
  echo "cellhost-test-vm: network-config $addr via $gw"
else
  ip addr add 10.0.2.15/24 dev eth0 2>/dev/null
fi
mkdir -p /www && echo "hello from $hn" > /www/index.html && httpd -p 8080 -h /www
mkdir -p /etc/acpi/PWRF && printf '#!/bin/sh\necho cellhost-test-vm: power button\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
mkdir -p /var/log; acpid -f &
echo "cellhost-test-vm: ready"
while true; do sleep 3600; done
"#;

/// The vm test image's initrd init: load modules, switch to /dev/vda.
const VM_INITRD_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /etc/cellhost/modules); do insmod $m; done
mount -t ext4 /dev/vda /newroot || { echo "cellhost-test-vm: no root"; poweroff -f; }
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
"#;

/// A vm image `name`: a busybox ext4 base disk (qcow2) booted directly
/// with the Debian kernel and a module-loading initrd.
pub fn vm_image(store: &ImageStore, name: &str, kernel: &Path, modules: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    busybox_rootfs(&root);
    std::fs::write(root.join("sbin/init"), VM_INIT).unwrap();
    std::fs::set_permissions(
        root.join("sbin/init"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let raw = work.path().join("disk.raw");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&raw)
        .arg("64M")
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.ext4 -d");
    let qcow = work.path().join("disk.qcow2");
    let ok = Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .unwrap()
        .success();
    assert!(ok, "qemu-img convert");
    let iroot = work.path().join("iroot");
    busybox_rootfs(&iroot);
    std::fs::write(iroot.join("init"), VM_INITRD_INIT).unwrap();
    std::fs::set_permissions(iroot.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let initrd = cellhost_qemu::image::build_initramfs(&InitramfsRequest {
        rootfs: Some(iroot),
        agent: None,
        modules_dir: Some(modules.to_path_buf()),
        modules: [
            "virtio_pci",
            "virtio_blk",
            "virtio_net",
            "ext4",
            "crc32c_generic",
            "isofs",
            "button",
            "evdev",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    })
    .unwrap();
    let initrd_path = work.path().join("initrd");
    std::fs::write(&initrd_path, initrd).unwrap();
    store
        .import(
            name,
            &cellhost_qemu::image::ImportRequest {
                kernel: Some(kernel.to_path_buf()),
                initrd: Some(initrd_path),
                disk: Some(qcow),
                cmdline: Some("quiet".into()),
                ..Default::default()
            },
        )
        .unwrap();
}

/// A uid range leased for one cell, as the supervisor would: the first
/// slot of the policy's default range (2^30, 65 536 ids per cell) that no
/// store on this host claims (`/run/cellhost/uids`), with no process
/// running as any of its ids. Released on drop.
pub struct Lease {
    claims: cellhost_supervisor::uid_claims::UidClaims,
    cell: cellhost_core::ids::CellId,
    pub range: cellhost_core::UidRange,
}

impl Lease {
    pub fn new(cell: &cellhost_core::ids::CellId) -> Lease {
        let pool = cellhost_policy::Uids::default();
        let claims = cellhost_supervisor::uid_claims::UidClaims::new(
            cellhost_supervisor::uid_claims::CLAIMS_DIR,
            format!("cellhost-qemu-tests-{}", std::process::id()),
            format!("/proc/{}", std::process::id()),
        );
        let range = claims
            .claim_free(cell, pool.start, pool.count)
            .expect("claiming a uid range")
            .expect("no free uid range in the policy's default range");
        Lease {
            claims,
            cell: cell.clone(),
            range,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.claims.release(&self.cell, self.range);
    }
}

/// A create request for `cell` as `id` with `lease`'s range.
pub fn request(
    id: &cellhost_core::ids::CellId,
    cell: cellhost_spec::Cell,
    lease: &Lease,
) -> cellhost_core::CreateRequest {
    let mut r = cellhost_core::CreateRequest::new(id.clone(), cell);
    r.uids = Some(lease.range);
    r
}

/// `/proc/<pid>/status` field `name` (after the colon, trimmed).
pub fn status_field(pid: i32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The cell's qemu, by the pid file its shim wrote.
pub fn qemu_pid(dir: &Path) -> i32 {
    std::fs::read_to_string(dir.join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The cell's qemu runs confined: as the base of its lease (real,
/// effective, saved and filesystem uid and gid), no supplementary group,
/// under a seccomp filter with no_new_privs, without capabilities, in the
/// cell's cgroup in every hierarchy, whose memory limit is the one
/// computed for the cell.
pub fn assert_confined(
    pid: i32,
    lease: &Lease,
    tier_dir: &Path,
    id: &cellhost_core::ids::CellId,
    cell: &cellhost_spec::Cell,
) {
    let base = lease.range.base;
    let four = format!("{base}\t{base}\t{base}\t{base}");
    let uid = status_field(pid, "Uid").replace(char::is_whitespace, "\t");
    let gid = status_field(pid, "Gid").replace(char::is_whitespace, "\t");
    assert_eq!(uid, four, "qemu's uids");
    assert_eq!(gid, four, "qemu's gids");
    assert_eq!(status_field(pid, "Groups"), "", "supplementary groups");
    // -sandbox: qemu installs one seccomp filter (mode 2); libseccomp sets
    // no_new_privs to load it, and the shim set it before exec as well.
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    let object = cellhost_host::cgroups::cgroup_object(
        &cellhost_host::cgroups::instance_tag(tier_dir),
        &id.object_name(),
    );
    let want = format!("/cellhost/{object}");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let cg = cellhost_host::cgroups::CellCgroups::for_object(&object).unwrap();
    for controller in ["memory", "cpu", "pids"] {
        let line = cgroups
            .lines()
            .find(|l| {
                let mut f = l.splitn(3, ':');
                let (_, c) = (f.next(), f.next().unwrap_or(""));
                if cg.unified {
                    c.is_empty()
                } else {
                    c.split(',').any(|x| x == controller)
                }
            })
            .unwrap_or_else(|| panic!("no {controller} line in {cgroups}"));
        assert!(line.ends_with(&want), "{controller}: {line} (want {want})");
    }
    let (file, mem_dir) = if cg.unified {
        ("memory.max", cg.memory.clone().unwrap())
    } else {
        ("memory.limit_in_bytes", cg.memory.clone().unwrap())
    };
    let limit: u64 = std::fs::read_to_string(mem_dir.join(file))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let want = cellhost_qemu::limits::Limits::for_cell(
        cell,
        cellhost_host::probe::Accel::Tcg,
        cellhost_qemu::limits::TB_MIB,
    );
    assert_eq!(limit, want.memory_bytes, "{}", mem_dir.display());
}

/// Everything `report` says about the cell's cgroup and uids: both
/// checked, nothing left, and the cgroup dirs gone from the host.
pub fn assert_cgroup_and_uids_gone(
    report: &cellhost_core::TeardownReport,
    tier_dir: &Path,
    id: &cellhost_core::ids::CellId,
) {
    for name in ["vm-cgroup", "uids"] {
        let c = report
            .checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no {name} check in {report:?}"));
        assert_eq!(c.residue, 0, "{c:?}");
    }
    let object = cellhost_host::cgroups::cgroup_object(
        &cellhost_host::cgroups::instance_tag(tier_dir),
        &id.object_name(),
    );
    let cg = cellhost_host::cgroups::CellCgroups::for_object(&object).unwrap();
    assert!(cg.existing().is_empty(), "{:?}", cg.existing());
}

pub fn config(tier: cellhost_spec::Isolation, state: &Path) -> cellhost_qemu::QemuConfig {
    cellhost_qemu::QemuConfig::new(tier, state, cellhost_bin())
}

pub fn cell(yaml: &str) -> cellhost_spec::Cell {
    cellhost_spec::parse_and_validate(yaml).unwrap()
}

/// Kills every process whose argv names `dir` (qemu and its shim) when
/// dropped, so a failed assertion leaves no VM running in its own session;
/// then removes the VM cgroups of the state dir `dir` and the tiers'
/// (empty) cgroup groups.
pub struct KillVmsOnDrop(pub PathBuf);

impl Drop for KillVmsOnDrop {
    fn drop(&mut self) {
        self.kill();
        for tier in ["vm", "microvm"] {
            let instance = cellhost_host::cgroups::instance_tag(&self.0.join(tier));
            for name in cellhost_host::cgroups::cell_cgroup_names(&instance).unwrap_or_default() {
                cellhost_qemu::limits::remove(&cellhost_host::cgroups::cgroup_object(
                    &instance, &name,
                ));
            }
            cellhost_host::cgroups::remove_instance_group(&instance);
        }
    }
}

impl KillVmsOnDrop {
    fn kill(&self) {
        let needle = self.0.to_string_lossy().into_owned();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == std::process::id() as i32 {
                continue;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
