//! qemu's argv for a cell, from the document, the image and the config.
//! Pure: no host access, so the layout can be unit-tested.

use std::path::{Path, PathBuf};

use cellhost_core::probe::Accel;
use cellhost_spec::{Cell, Protocol};

use crate::image::{AGENT_PATH, Image};

/// The virtio-serial port name the agent serves.
pub const AGENT_PORT: &str = "cellhost.agent";
pub const QMP_SOCK: &str = "qmp.sock";
pub const AGENT_SOCK: &str = crate::vmm::AGENT_SOCK;
/// qemu's end of the agent channel, held by the shim (vmm.rs).
pub const AGENT_CHARDEV: &str = "agent-qemu.sock";
pub const OVERLAY: &str = "disk.qcow2";
pub const VOLUME_LUKS: &str = "volume.luks";
pub const VOLUME_QCOW2: &str = "volume.qcow2";
/// The serial number the data volume shows in the guest
/// (`/dev/disk/by-id/virtio-cellhost-volume` under udev).
pub const VOLUME_SERIAL: &str = "cellhost-volume";
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// Everything the argv depends on.
pub struct Plan<'a> {
    pub microvm: bool,
    pub dir: &'a Path,
    pub name: String,
    pub cell: &'a Cell,
    pub image: &'a Image,
    pub accel: Accel,
    /// Address published ports bind on the host.
    pub publish_address: &'a str,
    /// `/proc/<pid>/fd/<n>` of the seed memfd (vm).
    pub seed: Option<String>,
    /// The data volume's file and whether it is qemu LUKS.
    pub volume: Option<(PathBuf, bool)>,
    /// Under TCG the guest's TSC is the host's, and a guest kernel that
    /// calibrates it against the emulated PIT while the host is busy gets
    /// no answer ("Unable to calibrate against PIT") and then hangs before
    /// userspace (seen here in 2 of 3 boots with both cores loaded). With
    /// the rate given (`tsc_early_khz=`, direct kernel boot only) it never
    /// calibrates. Unused under KVM (kvmclock).
    pub tsc_khz: Option<u64>,
    /// Bridged: the tap on the cellhost bridge (`chv<id>`) and the guest
    /// NIC's MAC (the one the host's rules accept). Replaces user-mode
    /// networking: published ports are the bridge's DNAT, not hostfwd.
    pub tap: Option<(String, String)>,
}

impl Plan<'_> {
    pub fn argv(&self) -> Vec<String> {
        let spec = &self.cell.spec;
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        let mem = spec.resources.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        let cpus = spec
            .resources
            .cpus
            .map(|c| c.ceil().max(1.0) as u64)
            .unwrap_or(1);
        push(&["-name", &format!("guest={},debug-threads=off", self.name)]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        let machine = if self.microvm { MICROVM_MACHINE } else { "q35" };
        push(&["-machine", machine]);
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
        }
        push(&["-m", &mem.to_string(), "-smp", &cpus.to_string()]);
        let qmp = self.dir.join(QMP_SOCK);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
        // The console is the shim's pipe (see vmm.rs); it caps the log.
        push(&["-chardev", "file,id=console,path=/dev/stdout,append=on"]);
        push(&["-serial", "chardev:console"]);
        let (blk, serial_bus) = if self.microvm {
            ("virtio-blk-device", "virtio-serial-device")
        } else {
            ("virtio-blk-pci", "virtio-serial-pci")
        };
        if let Some((tap, mac)) = &self.tap {
            let nic = if self.microvm {
                "virtio-net-device"
            } else {
                "virtio-net-pci"
            };
            // script=no: cellhost-net made and attached the tap already.
            push(&[
                "-netdev",
                &format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            ]);
            push(&["-device", &format!("{nic},netdev=net0,mac={mac}")]);
        }
        if self.microvm {
            let kernel = self.image.kernel().unwrap_or_default();
            let initrd = self.image.initrd().unwrap_or_default();
            push(&["-kernel", &kernel.to_string_lossy()]);
            push(&["-initrd", &initrd.to_string_lossy()]);
            push(&["-append", &self.microvm_cmdline()]);
            push(&["-device", serial_bus]);
            let sock = self.dir.join(AGENT_CHARDEV);
            push(&[
                "-chardev",
                &format!("socket,id=agent,path={},server=on,wait=on", sock.display()),
            ]);
            push(&[
                "-device",
                &format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
            ]);
        } else {
            let overlay = self.dir.join(OVERLAY);
            push(&[
                "-blockdev",
                &format!(
                    "driver=qcow2,node-name=disk0,file.driver=file,file.filename={}",
                    overlay.display()
                ),
            ]);
            // Firmware boots the disk; with direct kernel boot the
            // kernel takes boot index 0.
            let boot = if self.image.kernel().is_some() {
                ""
            } else {
                ",bootindex=0"
            };
            push(&["-device", &format!("{blk},drive=disk0{boot}")]);
            if let Some(seed) = &self.seed {
                push(&[
                    "-blockdev",
                    &format!(
                        "driver=raw,node-name=seed,read-only=on,file.driver=file,file.filename={seed},file.locking=off"
                    ),
                ]);
                push(&["-device", &format!("{blk},drive=seed,serial=cidata")]);
            }
            if let Some(kernel) = self.image.kernel() {
                push(&["-kernel", &kernel.to_string_lossy()]);
                if let Some(initrd) = self.image.initrd() {
                    push(&["-initrd", &initrd.to_string_lossy()]);
                }
                let extra = self.image.manifest.cmdline.as_deref().unwrap_or("");
                push(&[
                    "-append",
                    &format!("console=ttyS0 root=/dev/vda rw panic=-1 {extra}"),
                ]);
            }
            if !spec.ports.is_empty() && self.tap.is_none() {
                // restrict=on: no traffic from the guest reaches the host or
                // beyond (deny-by-default egress); forwards still work.
                let mut net = "user,id=net0,restrict=on".to_string();
                for p in &spec.ports {
                    let proto = match p.protocol {
                        Protocol::Tcp => "tcp",
                        Protocol::Udp => "udp",
                    };
                    net.push_str(&format!(
                        ",hostfwd={proto}:{}:{}-:{}",
                        self.publish_address, p.host, p.container
                    ));
                }
                push(&["-netdev", &net]);
                push(&["-device", "virtio-net-pci,netdev=net0"]);
            }
        }
        if let Some((file, luks)) = &self.volume {
            let node = if *luks {
                format!(
                    "driver=luks,node-name=vol,key-secret=volkey,file.driver=file,file.filename={}",
                    file.display()
                )
            } else {
                format!(
                    "driver=qcow2,node-name=vol,file.driver=file,file.filename={}",
                    file.display()
                )
            };
            if *luks {
                // The key arrives on stdin, a pipe the spawner closed.
                push(&["-object", "secret,id=volkey,file=/dev/stdin,format=raw"]);
            }
            push(&["-blockdev", &node]);
            push(&[
                "-device",
                &format!("{blk},drive=vol,serial={VOLUME_SERIAL}"),
            ]);
        }
        // A vm boots paused (`-S`): its created-not-started state.
        if !self.microvm {
            push(&["-S"]);
        }
        a
    }

    /// The microVM kernel command line: serial console, quiet, exit on
    /// panic, the agent as PID 1 serving the virtio-serial port.
    pub fn microvm_cmdline(&self) -> String {
        let extra = self.image.manifest.cmdline.as_deref().unwrap_or("");
        format!(
            "{MICROVM_CMDLINE_BASE} {}rdinit={AGENT_PATH} CELLHOST_AGENT_LOG=warn {extra} -- --virtio-port {AGENT_PORT} --secrets-dir /run/secrets",
            tsc_arg(self.accel, self.tsc_khz)
        )
    }
}

/// The microVM machine type and options (also the bench's bare baseline).
pub const MICROVM_MACHINE: &str = "microvm,x-option-roms=off,rtc=on";
/// The start of a microVM's kernel command line: serial console, quiet,
/// exit on panic.
pub const MICROVM_CMDLINE_BASE: &str = "console=ttyS0 quiet loglevel=1 panic=-1";

/// `tsc_early_khz=N ` under TCG with a known rate, else nothing (see
/// [`Plan::tsc_khz`]).
pub fn tsc_arg(accel: Accel, tsc_khz: Option<u64>) -> String {
    match (accel, tsc_khz) {
        (Accel::Tcg, Some(khz)) => format!("tsc_early_khz={khz} "),
        _ => String::new(),
    }
}
