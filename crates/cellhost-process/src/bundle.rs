//! The OCI bundle of a cell and the shared `image: host` root.
//!
//! Layout on the host (under the backend's state dir, all 0700 root):
//!
//! ```text
//! <state>/host-root/          shared read-only skeleton for `image: host`:
//!   usr/ etc/ proc/ dev/ sys/ tmp/ run/   empty mount points
//!   bin -> usr/bin ...                    mirrors of the host's /bin, /lib* symlinks
//! <state>/host-etc/           minimal /etc shown to every host-image cell
//!   passwd group hosts nsswitch.conf resolv.conf ld.so.cache
//!   alternatives/                         mount point: host's, read-only
//! <state>/cells/<id>/config.json   this cell's OCI runtime spec
//! ```
//!
//! Lifecycle: the skeleton and etc are made once, atomically (built in a
//! temp dir, renamed into place), and reused; they hold no cell data. The
//! cell's rootfs is that skeleton mounted read-only inside the cell's own
//! mount namespace, with the host's /usr (and /lib*, /bin, /sbin where they
//! are real dirs) bind-mounted read-only, and private /tmp, /run, /proc,
//! /dev. Nothing of a cell's mounts is visible in the host namespace.
//!
//! Idempotency: making the skeleton twice is a no-op; a racing maker loses
//! the rename and uses the winner's.
//!
//! Threat model: the cell sees the host's programs and libraries (read-only,
//! nodev, nosuid) but none of the host's /etc, /home, /root, /var or /run;
//! its /etc is a fixed minimal set. It runs as uid 0 in its namespaces
//! with the OCI default capability set, no_new_privileges, masked /proc
//! paths and a read-only root. No user namespace yet: uid 0 in a cell is
//! uid 0 on the host for files it can reach (all read-only or its own tmpfs).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use cellhost_spec::Cell;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount,
    MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

/// Top-level host entries mirrored into the `image: host` root: bound
/// read-only when they are directories, re-created when they are symlinks
/// (Debian's merged /usr makes most of them symlinks into /usr).
const HOST_TREES: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Host dir of symlinks that many host programs resolve through.
const ALTERNATIVES: &str = "/etc/alternatives";

/// Empty mount points every root needs.
const MOUNT_POINTS: &[&str] = &["proc", "dev", "sys", "tmp", "run", "etc"];

/// CPU bandwidth period (100 ms, the kernel default).
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("building the OCI spec: {0}")]
    Spec(String),
    #[error("spec.image: {0}")]
    Image(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> BundleError {
    let context = context.into();
    move |source| BundleError::Io { context, source }
}

fn spec_err(e: impl std::fmt::Display) -> BundleError {
    BundleError::Spec(e.to_string())
}

/// The shared host-image root, made on first use.
#[derive(Debug, Clone)]
pub struct HostRoot {
    pub root: PathBuf,
    pub etc: PathBuf,
    /// Host trees that are real directories and are bind-mounted.
    pub binds: Vec<String>,
}

impl HostRoot {
    /// Make (or reuse) the skeleton and /etc under `state_dir`.
    pub fn ensure(state_dir: &Path) -> Result<HostRoot, BundleError> {
        let root = state_dir.join("host-root");
        let etc = state_dir.join("host-etc");
        let mut binds = Vec::new();
        for t in HOST_TREES {
            let host = Path::new("/").join(t);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => binds.push(t.to_string()),
                _ => {}
            }
        }
        if !root.exists() {
            atomic_dir(&root, |tmp| {
                for d in MOUNT_POINTS {
                    mkdir(&tmp.join(d), 0o755)?;
                }
                for t in HOST_TREES {
                    let host = Path::new("/").join(t);
                    let Ok(m) = fs::symlink_metadata(&host) else {
                        continue;
                    };
                    if m.file_type().is_symlink() {
                        let target = fs::read_link(&host)?;
                        symlink(target, tmp.join(t))?;
                    } else if m.is_dir() {
                        mkdir(&tmp.join(t), 0o755)?;
                    }
                }
                Ok(())
            })
            .map_err(io_err(format!("making host root {}", root.display())))?;
        }
        if !etc.exists() {
            atomic_dir(&etc, |tmp| {
                write_file(
                    &tmp.join("passwd"),
                    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
                )?;
                write_file(&tmp.join("group"), "root:x:0:\nnogroup:x:65534:\n")?;
                write_file(
                    &tmp.join("hosts"),
                    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
                )?;
                write_file(&tmp.join("nsswitch.conf"), "passwd: files\ngroup: files\nhosts: files dns\n")?;
                write_file(&tmp.join("resolv.conf"), "")?;
                if let Ok(cache) = fs::read("/etc/ld.so.cache") {
                    fs::write(tmp.join("ld.so.cache"), cache)?;
                }
                // Mount point for the host's /etc/alternatives (Debian's
                // awk, editor, ... are symlinks through it).
                if Path::new(ALTERNATIVES).is_dir() {
                    mkdir(&tmp.join("alternatives"), 0o755)?;
                }
                Ok(())
            })
            .map_err(io_err(format!("making host etc {}", etc.display())))?;
        }
        Ok(HostRoot { root, etc, binds })
    }
}

fn mkdir(p: &Path, mode: u32) -> io::Result<()> {
    fs::DirBuilder::new().mode(mode).create(p)
}

fn write_file(p: &Path, s: &str) -> io::Result<()> {
    fs::write(p, s)?;
    fs::set_permissions(p, fs::Permissions::from_mode(0o644))
}

/// Build `dir` in a sibling temp dir and rename it into place; if someone
/// else won the race, keep theirs.
fn atomic_dir(dir: &Path, fill: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent)?;
    // Unique per maker (threads of one process included).
    let tmp = parent.join(format!(
        ".{}.tmp-{}-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("dir"),
        std::process::id(),
        cellhost_core::ids::CellId::random()
    ));
    let _ = fs::remove_dir_all(&tmp);
    mkdir(&tmp, 0o755)?;
    let filled = fill(&tmp);
    if let Err(e) = filled {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        Err(_) if dir.exists() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Where the cell's root comes from.
#[derive(Debug, Clone)]
pub enum RootSource {
    Host(HostRoot),
    Dir(PathBuf),
}

impl RootSource {
    pub fn resolve(cell: &Cell, state_dir: &Path) -> Result<RootSource, BundleError> {
        let image = cell.spec.image.as_str();
        if image == "host" {
            return Ok(RootSource::Host(HostRoot::ensure(state_dir)?));
        }
        let p = PathBuf::from(image);
        if !p.is_absolute() {
            return Err(BundleError::Image(format!(
                "{image:?} is neither `host` nor an absolute rootfs path"
            )));
        }
        match fs::metadata(&p) {
            Ok(m) if m.is_dir() => Ok(RootSource::Dir(p)),
            Ok(_) => Err(BundleError::Image(format!("{image} is not a directory"))),
            Err(e) => Err(BundleError::Image(format!("rootfs {image}: {e}"))),
        }
    }

    fn root_path(&self) -> &Path {
        match self {
            RootSource::Host(h) => &h.root,
            RootSource::Dir(p) => p,
        }
    }
}

/// Inputs to [`oci_spec`] beyond the document.
pub struct SpecInputs<'a> {
    pub cell: &'a Cell,
    pub root: &'a RootSource,
    /// Host dir (a tmpfs) holding the secret files, if the cell has secrets.
    pub secrets_dir: Option<&'a Path>,
    /// The opened encrypted volume: (`spec.volume.path`, host data dir).
    pub volume: Option<(&'a str, &'a Path)>,
    /// Relative cgroup path (`/cellhost/cellhost-<id>`).
    pub cgroup_path: &'a str,
    /// Bridged cells: the netns cellhost-net made (joined, not created),
    /// and the cell's resolv.conf (bound over /etc/resolv.conf where the
    /// root has one).
    pub netns: Option<&'a Path>,
    pub resolv_conf: Option<&'a Path>,
}

fn mount(dest: &str, typ: &str, source: &str, opts: &[&str]) -> Result<Mount, BundleError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(spec_err)
}

fn bind(dest: &str, source: &Path, opts: &[&str]) -> Result<Mount, BundleError> {
    MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(source)
        .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(spec_err)
}

fn bind_ro(dest: &str, source: &Path) -> Result<Mount, BundleError> {
    bind(dest, source, &["rbind", "ro", "nosuid", "nodev"])
}

/// The OCI runtime spec for a cell.
pub fn oci_spec(inp: &SpecInputs<'_>) -> Result<Spec, BundleError> {
    let spec = &inp.cell.spec;
    let tmp_size = spec
        .resources
        .memory_mib
        .map(|m| format!("size={m}m"))
        .unwrap_or_else(|| "size=256m".to_string());

    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/tmp",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=1777", &tmp_size],
        )?,
        mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=755", "size=16m"],
        )?,
    ];
    if let RootSource::Host(h) = inp.root {
        for t in &h.binds {
            mounts.push(bind_ro(&format!("/{t}"), &Path::new("/").join(t))?);
        }
        mounts.push(bind_ro("/etc", &h.etc)?);
        if h.etc.join("alternatives").is_dir() {
            mounts.push(bind_ro(ALTERNATIVES, Path::new(ALTERNATIVES))?);
        }
    }
    if let Some(conf) = inp.resolv_conf {
        let has_target = match inp.root {
            RootSource::Host(_) => true,
            // Not followed: a symlink in the image names a path of the
            // cell's root, not the host's.
            RootSource::Dir(d) => {
                std::fs::symlink_metadata(d.join("etc/resolv.conf")).is_ok_and(|m| m.is_file())
            }
        };
        if has_target {
            mounts.push(bind_ro("/etc/resolv.conf", conf)?);
        }
    }
    if let Some(dir) = inp.secrets_dir {
        mounts.push(bind(
            "/run/secrets",
            dir,
            &["bind", "ro", "nosuid", "nodev", "noexec"],
        )?);
    }
    if let Some((dest, source)) = inp.volume {
        mounts.push(bind(dest, source, &["rbind", "rw", "nosuid", "nodev"])?);
    }

    let caps: std::collections::HashSet<Capability> = [
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Mknod,
        Capability::NetRaw,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
    .into_iter()
    .collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(std::collections::HashSet::<Capability>::new())
        .ambient(std::collections::HashSet::<Capability>::new())
        .build()
        .map_err(spec_err)?;

    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(spec_err)?,
        )
        .args(spec.command.clone())
        .env(env)
        .cwd(spec.working_dir.clone().unwrap_or_else(|| "/".to_string()))
        .capabilities(capabilities)
        .no_new_privileges(true)
        .rlimits(rlimits(&spec.resources.ulimits)?)
        .build()
        .map_err(spec_err)?;

    let mut resources = LinuxResourcesBuilder::default();
    if let Some(mib) = spec.resources.memory_mib {
        let bytes = (mib as i64).saturating_mul(1024 * 1024);
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(bytes)
                .build()
                .map_err(spec_err)?,
        );
    }
    if let Some(cpus) = spec.resources.cpus {
        let quota = (cpus * CPU_PERIOD_US as f64).round().max(1000.0) as i64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD_US)
                .build()
                .map_err(spec_err)?,
        );
    }
    if let Some(pids) = spec.resources.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(pids as i64)
                .build()
                .map_err(spec_err)?,
        );
    }

    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Network,
    ]
    .into_iter()
    .map(|t| {
        let mut ns = LinuxNamespaceBuilder::default().typ(t);
        if let (LinuxNamespaceType::Network, Some(path)) = (t, inp.netns) {
            ns = ns.path(path.to_path_buf());
        }
        ns.build().map_err(spec_err)
    })
    .collect::<Result<Vec<_>, _>>()?;

    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(inp.cgroup_path))
        .resources(resources.build().map_err(spec_err)?)
        .masked_paths(
            [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        )
        .readonly_paths(
            [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        )
        .build()
        .map_err(spec_err)?;

    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(inp.root.root_path())
                .readonly(true)
                .build()
                .map_err(spec_err)?,
        )
        .hostname(inp.cell.metadata.name.clone())
        .mounts(mounts)
        .process(process)
        .linux(linux)
        .build()
        .map_err(spec_err)
}
/// `spec.resources.ulimits` as OCI rlimits (`nofile` -> `RLIMIT_NOFILE`).
/// The names were checked by the spec crate against the same list.
fn rlimits(
    ulimits: &[cellhost_spec::Ulimit],
) -> Result<Vec<oci_spec::runtime::PosixRlimit>, BundleError> {
    ulimits
        .iter()
        .map(|u| {
            serde_json::from_value(serde_json::json!({
                "type": format!("RLIMIT_{}", u.name.to_ascii_uppercase()),
                "soft": u.soft,
                "hard": u.hard,
            }))
            .map_err(|e| BundleError::Spec(format!("spec.resources.ulimits {}: {e}", u.name)))
        })
        .collect()
}
