//! qemu's argv for a cell, from the document, the image and the config,
//! with the descriptors qemu inherits from its shim. Pure: no host access,
//! so the layout can be unit-tested.
//!
//! qemu runs as the cell's unprivileged uid and opens no path of the
//! state dir (which it could not traverse): every file it uses is a
//! descriptor the shim opened as root ([`PassFd`]). Block devices and the
//! console are in fdsets (`-add-fd fd=N,set=N,opaque=<path>`, opened as
//! `/dev/fdset/N`: qemu dups them and never reopens a path), and each
//! fdset's `opaque` names the file it stands for, so qemu's argv still
//! names the cell dir (how the backend finds a VM's qemu again). What
//! qemu's loaders read by plain path once at start (kernel, initrd) is
//! `/proc/self/fd/N`. QMP is a listening socket and the agent channel a
//! connected one, both by number (`fd=N`), never in an fdset (qemu closes
//! an fdset's descriptors that no device uses while no monitor is
//! connected).

use std::path::{Path, PathBuf};

use cellhost_host::probe::{Accel, QEMU_SANDBOX};
use cellhost_spec::{Cell, Protocol};

use crate::image::{AGENT_PATH, Image};
use crate::vmm::{FdSource, PassFd};

/// The virtio-serial port name the agent serves.
pub const AGENT_PORT: &str = "cellhost.agent";
pub const QMP_SOCK: &str = "qmp.sock";
pub const AGENT_SOCK: &str = crate::vmm::AGENT_SOCK;
pub const OVERLAY: &str = "disk.qcow2";
pub const VOLUME_LUKS: &str = "volume.luks";
pub const VOLUME_QCOW2: &str = "volume.qcow2";
/// The serial number the data volume shows in the guest
/// (`/dev/disk/by-id/virtio-cellhost-volume` under udev).
pub const VOLUME_SERIAL: &str = "cellhost-volume";
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// The first descriptor number handed to qemu beyond stdio.
pub const FIRST_FD: i32 = 3;

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
    /// The seed ISO (vm): the spawner's read-only descriptor of its
    /// memfd, which the shim inherits at this number.
    pub seed: Option<i32>,
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
    /// TCG's translation buffer, MiB (`-accel tcg,tb-size=`): bounds
    /// qemu's own memory (see [`crate::limits`]).
    pub tb_mib: u64,
}

/// Descriptor numbers for what qemu inherits, in order from [`FIRST_FD`].
struct Fds(Vec<PassFd>);

impl Fds {
    fn add(&mut self, what: FdSource) -> i32 {
        let fd = FIRST_FD + self.0.len() as i32;
        self.0.push(PassFd { fd, what });
        fd
    }

    /// A file the shim opens, put in an fdset named after it: the path
    /// qemu opens it by.
    fn fdset(&mut self, a: &mut Vec<String>, path: &Path, write: bool) -> String {
        let fd = self.add(FdSource::File {
            path: path.to_path_buf(),
            write,
        });
        add_fd(a, fd, &path.display().to_string());
        format!("/dev/fdset/{fd}")
    }

    /// A file the shim opens, read by qemu through `/proc/self/fd`.
    fn proc_fd(&mut self, path: &Path) -> String {
        let fd = self.add(FdSource::File {
            path: path.to_path_buf(),
            write: false,
        });
        format!("/proc/self/fd/{fd}")
    }
}

fn add_fd(a: &mut Vec<String>, fd: i32, opaque: &str) {
    // qemu's option syntax doubles a comma inside a value.
    let opaque = opaque.replace(',', ",,");
    a.extend([
        "-add-fd".into(),
        format!("fd={fd},set={fd},opaque={opaque}"),
    ]);
}

impl Plan<'_> {
    /// qemu's argv (without the program) and what it inherits.
    pub fn command(&self) -> (Vec<String>, Vec<PassFd>) {
        let spec = &self.cell.spec;
        let mut a: Vec<String> = Vec::new();
        let mut fds = Fds(Vec::new());
        let push = |a: &mut Vec<String>, xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        let mem = spec.resources.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        let cpus = vcpus(self.cell);
        push(
            &mut a,
            &["-name", &format!("guest={},debug-threads=off", self.name)],
        );
        push(&mut a, &["-sandbox", QEMU_SANDBOX]);
        push(
            &mut a,
            &[
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ],
        );
        let machine = if self.microvm { MICROVM_MACHINE } else { "q35" };
        push(&mut a, &["-machine", machine]);
        match self.accel {
            Accel::Kvm => push(&mut a, &["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(
                &mut a,
                &[
                    "-accel",
                    &format!("tcg,tb-size={}", self.tb_mib),
                    "-cpu",
                    "max",
                ],
            ),
        }
        push(&mut a, &["-m", &mem.to_string(), "-smp", &cpus.to_string()]);
        let qmp = fds.add(FdSource::Listen {
            path: self.dir.join(QMP_SOCK),
        });
        push(
            &mut a,
            &[
                "-chardev",
                &format!("socket,id=qmp,fd={qmp},server=on,wait=off"),
                "-mon",
                "chardev=qmp,mode=control",
            ],
        );
        // The console is a pipe the shim copies into serial.log, capped
        // (see vmm.rs); its fdset is named after that file.
        let console = fds.add(FdSource::Console);
        add_fd(
            &mut a,
            console,
            &self.dir.join(crate::vmm::SERIAL_LOG).display().to_string(),
        );
        push(
            &mut a,
            &[
                "-chardev",
                &format!("file,id=console,path=/dev/fdset/{console},append=on"),
                "-serial",
                "chardev:console",
            ],
        );
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
            // The shim attaches to the tap (cellhost-net made it, owned
            // by qemu's uid) and qemu gets the descriptor.
            let fd = fds.add(FdSource::Tap { name: tap.clone() });
            push(&mut a, &["-netdev", &format!("tap,id=net0,fd={fd}")]);
            push(
                &mut a,
                &["-device", &format!("{nic},netdev=net0,mac={mac}")],
            );
        }
        if self.microvm {
            let kernel = self.image.kernel().unwrap_or_default();
            let initrd = self.image.initrd().unwrap_or_default();
            push(&mut a, &["-kernel", &fds.proc_fd(&kernel)]);
            push(&mut a, &["-initrd", &fds.proc_fd(&initrd)]);
            push(&mut a, &["-append", &self.microvm_cmdline()]);
            push(&mut a, &["-device", serial_bus]);
            // A socket pair, connected from the start: the guest sees a
            // host on the port before it boots (see vmm.rs).
            let agent = fds.add(FdSource::Agent);
            push(
                &mut a,
                &["-chardev", &format!("socket,id=agent,fd={agent}")],
            );
            push(
                &mut a,
                &[
                    "-device",
                    &format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
                ],
            );
        } else {
            // The overlay's backing file is the image's base disk, opened
            // read-only by the shim and named here (qemu could not open
            // the path the overlay records).
            let base = self.image.disk().unwrap_or_default();
            let fmt = self
                .image
                .manifest
                .disk_format
                .clone()
                .unwrap_or_else(|| "raw".into());
            let base_file = fds.fdset(&mut a, &base, false);
            push(
                &mut a,
                &[
                    "-blockdev",
                    &format!(
                        "driver={fmt},node-name=base,read-only=on,file.driver=file,file.filename={base_file}"
                    ),
                ],
            );
            let overlay = fds.fdset(&mut a, &self.dir.join(OVERLAY), true);
            push(
                &mut a,
                &[
                    "-blockdev",
                    &format!(
                        "driver=qcow2,node-name=disk0,backing=base,file.driver=file,file.filename={overlay}"
                    ),
                ],
            );
            // Firmware boots the disk; with direct kernel boot the
            // kernel takes boot index 0.
            let boot = if self.image.kernel().is_some() {
                ""
            } else {
                ",bootindex=0"
            };
            push(&mut a, &["-device", &format!("{blk},drive=disk0{boot}")]);
            if let Some(from) = self.seed {
                let fd = fds.add(FdSource::Inherited { from });
                add_fd(&mut a, fd, "cidata (memfd)");
                push(
                    &mut a,
                    &[
                        "-blockdev",
                        &format!(
                            "driver=raw,node-name=seed,read-only=on,file.driver=file,file.filename=/dev/fdset/{fd},file.locking=off"
                        ),
                    ],
                );
                push(
                    &mut a,
                    &["-device", &format!("{blk},drive=seed,serial=cidata")],
                );
            }
            if let Some(kernel) = self.image.kernel() {
                push(&mut a, &["-kernel", &fds.proc_fd(&kernel)]);
                if let Some(initrd) = self.image.initrd() {
                    push(&mut a, &["-initrd", &fds.proc_fd(&initrd)]);
                }
                let extra = self.image.manifest.cmdline.as_deref().unwrap_or("");
                push(
                    &mut a,
                    &[
                        "-append",
                        &format!("console=ttyS0 root=/dev/vda rw panic=-1 {extra}"),
                    ],
                );
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
                push(&mut a, &["-netdev", &net]);
                push(&mut a, &["-device", "virtio-net-pci,netdev=net0"]);
            }
        }
        if let Some((file, luks)) = &self.volume {
            let path = fds.fdset(&mut a, file, true);
            let node = if *luks {
                format!(
                    "driver=luks,node-name=vol,key-secret=volkey,file.driver=file,file.filename={path}"
                )
            } else {
                format!("driver=qcow2,node-name=vol,file.driver=file,file.filename={path}")
            };
            if *luks {
                // The key arrives on stdin, a pipe the spawner closed (and
                // gave qemu's uid, so that it may open /dev/stdin).
                push(
                    &mut a,
                    &["-object", "secret,id=volkey,file=/dev/stdin,format=raw"],
                );
            }
            push(&mut a, &["-blockdev", &node]);
            push(
                &mut a,
                &[
                    "-device",
                    &format!("{blk},drive=vol,serial={VOLUME_SERIAL}"),
                ],
            );
        }
        // A vm boots paused (`-S`): its created-not-started state.
        if !self.microvm {
            push(&mut a, &["-S"]);
        }
        (a, fds.0)
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

/// The vCPUs a cell gets: its `resources.cpus` rounded up, at least 1.
pub fn vcpus(cell: &Cell) -> u64 {
    cell.spec
        .resources
        .cpus
        .map(|c| c.ceil().max(1.0) as u64)
        .unwrap_or(1)
}

/// `tsc_early_khz=N ` under TCG with a known rate, else nothing (see
/// [`Plan::tsc_khz`]).
pub fn tsc_arg(accel: Accel, tsc_khz: Option<u64>) -> String {
    match (accel, tsc_khz) {
        (Accel::Tcg, Some(khz)) => format!("tsc_early_khz={khz} "),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ImageKind, Manifest};

    fn image(kind: ImageKind) -> Image {
        Image {
            dir: PathBuf::from("/state/images/img"),
            manifest: Manifest {
                name: "img".into(),
                kind,
                kernel: Some("vmlinuz".into()),
                initrd: Some("initrd".into()),
                disk: (kind == ImageKind::Vm).then(|| "disk".into()),
                rootfs: None,
                disk_format: Some("qcow2".into()),
                cmdline: None,
                digests: Default::default(),
                created_unix: 0,
            },
        }
    }

    fn plan_for(microvm: bool) -> (Vec<String>, Vec<PassFd>) {
        let tier = if microvm { "microvm" } else { "vm" };
        let cell = cellhost_spec::parse_and_validate(&format!(
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{name: x}}\nspec:\n  isolation: {tier}\n  image: img\n  command: [/bin/true]\n  network: {{mode: bridged}}\n  volume: {{path: /data, sizeGiB: 1, encrypted: true}}\n"
        ))
        .unwrap();
        let img = image(if microvm {
            ImageKind::Microvm
        } else {
            ImageKind::Vm
        });
        let dir = PathBuf::from("/state/vm/0123456789ab");
        Plan {
            microvm,
            dir: &dir,
            name: "cellhost-0123456789ab".into(),
            cell: &cell,
            image: &img,
            accel: Accel::Tcg,
            publish_address: "127.0.0.1",
            seed: (!microvm).then_some(17),
            volume: Some((dir.join(VOLUME_LUKS), true)),
            tsc_khz: None,
            tap: Some(("chv0123456789ab".into(), "02:00:00:00:00:01".into())),
            tb_mib: 128,
        }
        .command()
    }

    /// qemu is given descriptors, never a path of the state dir to open:
    /// every state path in the argv is an fdset's description, every
    /// fdset and `/proc/self/fd` number is one qemu inherits, numbers run
    /// from 3 without a gap, and the cell dir is named (how qemu is found).
    #[test]
    fn qemu_opens_no_state_path() {
        for microvm in [true, false] {
            let (args, fds) = plan_for(microvm);
            let nums: Vec<i32> = fds.iter().map(|f| f.fd).collect();
            assert_eq!(
                nums,
                (FIRST_FD..FIRST_FD + nums.len() as i32).collect::<Vec<_>>()
            );
            let text = args.join(" ");
            assert!(text.contains(&format!("-sandbox {QEMU_SANDBOX}")), "{text}");
            assert!(text.contains("-accel tcg,tb-size=128"), "{text}");
            assert!(
                text.contains("opaque=/state/vm/0123456789ab/serial.log"),
                "{text}"
            );
            for a in &args {
                for part in a.split(',') {
                    if part.contains("/state/") {
                        assert!(part.starts_with("opaque=/state/"), "{a}");
                    }
                }
            }
            let referenced = |prefix: &str| -> Vec<i32> {
                text.match_indices(prefix)
                    .map(|(i, _)| {
                        text[i + prefix.len()..]
                            .chars()
                            .take_while(char::is_ascii_digit)
                            .collect::<String>()
                            .parse()
                            .unwrap()
                    })
                    .collect()
            };
            for n in referenced("/dev/fdset/") {
                assert!(text.contains(&format!("-add-fd fd={n},set={n},")), "{n}");
            }
            for n in referenced("/dev/fdset/")
                .into_iter()
                .chain(referenced("/proc/self/fd/"))
                .chain(referenced(",fd="))
            {
                assert!(nums.contains(&n), "{n} is not passed: {text}");
            }
            let kinds: Vec<&FdSource> = fds.iter().map(|f| &f.what).collect();
            assert!(kinds.contains(&&FdSource::Tap {
                name: "chv0123456789ab".into()
            }));
            assert!(kinds.contains(&&FdSource::File {
                path: "/state/vm/0123456789ab/volume.luks".into(),
                write: true
            }));
            assert_eq!(
                kinds.contains(&&FdSource::Agent),
                microvm,
                "the agent pair is a microVM's"
            );
            assert_eq!(
                kinds.contains(&&FdSource::Inherited { from: 17 }),
                !microvm,
                "the seed is a vm's"
            );
            if !microvm {
                assert!(kinds.contains(&&FdSource::File {
                    path: "/state/images/img/disk".into(),
                    write: false
                }));
                assert!(text.contains("backing=base"), "{text}");
            }
        }
    }
}
