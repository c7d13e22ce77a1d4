//! The two engines: choosing one, formatting, opening and closing.
//!
//! dm-crypt: `cryptsetup open` maps the container at
//! `/dev/mapper/cellhost-<id>`; `cryptsetup close` removes the mapping.
//! userspace: `qemu-storage-daemon --daemonize` (its own session, so it
//! outlives the caller) holds the container open and serves the decrypted
//! bytes as the FUSE file `plain`; SIGTERM makes it flush, unmount the
//! export and exit. Its pid is only trusted while `/proc/<pid>/cmdline`
//! still names qemu-storage-daemon and this volume's container, so a
//! recycled pid is never signalled.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use cellhost_core::{VolumeKey, ids::CellId};
use serde::{Deserialize, Serialize};

use crate::tools::{self, RunError, Tools, os, qemu_escape, run};
use crate::{VolumeError, VolumePaths};

/// PBKDF2 iterations for keyslots: the minimum cryptsetup accepts. The
/// passphrase is a 256-bit key, so stretching buys nothing.
const PBKDF2_ITERATIONS: &str = "1000";
/// How long a released loop device gets to detach.
const LOOP_GRACE: Duration = Duration::from_secs(2);
/// How long the storage daemon gets to flush and exit after SIGTERM.
const DAEMON_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// Kernel dm-crypt via cryptsetup; LUKS2.
    DmCrypt,
    /// qemu-storage-daemon + FUSE + loop; LUKS1.
    Userspace,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::DmCrypt => "dm-crypt",
            EngineKind::Userspace => "userspace",
        }
    }

    /// The LUKS version this engine formats.
    pub fn format(self) -> LuksFormat {
        match self {
            EngineKind::DmCrypt => LuksFormat::Luks2,
            EngineKind::Userspace => LuksFormat::Luks1,
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LuksFormat {
    Luks1,
    Luks2,
}

impl LuksFormat {
    /// `luks1` / `luks2`.
    pub fn as_str(self) -> &'static str {
        match self {
            LuksFormat::Luks1 => "luks1",
            LuksFormat::Luks2 => "luks2",
        }
    }
}

/// The operator's engine setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// dm-crypt where usable, else userspace.
    #[default]
    Auto,
    Force(EngineKind),
}

impl FromStr for EngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "dm-crypt" => Ok(EngineChoice::Force(EngineKind::DmCrypt)),
            "userspace" => Ok(EngineChoice::Force(EngineKind::Userspace)),
            other => Err(format!(
                "unknown volume engine {other:?}: auto, dm-crypt or userspace"
            )),
        }
    }
}

/// Which engines can run here: `Ok(what was found)` or `Err(what is
/// missing)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub dm_crypt: Result<String, String>,
    pub userspace: Result<String, String>,
}

impl Probe {
    pub fn get(&self, e: EngineKind) -> &Result<String, String> {
        match e {
            EngineKind::DmCrypt => &self.dm_crypt,
            EngineKind::Userspace => &self.userspace,
        }
    }

    /// The engine `choice` gives on this host, or why none.
    pub fn choose(&self, choice: EngineChoice) -> Result<EngineKind, String> {
        match choice {
            EngineChoice::Force(e) => match self.get(e) {
                Ok(_) => Ok(e),
                Err(why) => Err(format!("{e} engine (forced): {why}")),
            },
            EngineChoice::Auto => match (&self.dm_crypt, &self.userspace) {
                (Ok(_), _) => Ok(EngineKind::DmCrypt),
                (Err(_), Ok(_)) => Ok(EngineKind::Userspace),
                (Err(dm), Err(us)) => Err(format!("dm-crypt: {dm}; userspace: {us}")),
            },
        }
    }
}

/// Probe with the default tool names on `PATH`.
pub fn probe() -> Probe {
    probe_with(&Tools::default())
}

/// Cheap checks: device nodes, the kernel's misc devices, tools on `PATH`.
/// Nothing is run or made.
pub(crate) fn probe_with(t: &Tools) -> Probe {
    let need = |tools: &[&Path]| -> Result<Vec<String>, String> {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for tool in tools {
            match tools::find(tool) {
                Some(p) => found.push(p.display().to_string()),
                None => missing.push(tool.display().to_string()),
            }
        }
        if missing.is_empty() {
            Ok(found)
        } else {
            Err(format!("{} not found", missing.join(", ")))
        }
    };
    let common = [
        t.cryptsetup.as_path(),
        t.mkfs_ext4.as_path(),
        t.mount.as_path(),
    ];
    // The control node, not /proc/misc: inside a container /proc/misc
    // shows the host kernel's device-mapper without giving access to it.
    let dm_crypt = if !Path::new("/dev/mapper/control").exists() {
        Err("no device-mapper here (/dev/mapper/control is missing)".to_string())
    } else {
        need(&common).map(|f| format!("device-mapper; {}", f.join(", ")))
    };
    let userspace = if !Path::new("/dev/fuse").exists() {
        Err("/dev/fuse is missing".to_string())
    } else if !Path::new("/dev/loop-control").exists() {
        Err("/dev/loop-control is missing".to_string())
    } else {
        let mut all = common.to_vec();
        all.push(t.qemu_storage_daemon.as_path());
        need(&all).map(|f| format!("fuse, loop; {}", f.join(", ")))
    };
    Probe {
        dm_crypt,
        userspace,
    }
}

/// `cryptsetup luksFormat` the container, passphrase on stdin.
pub(crate) fn format(
    t: &Tools,
    id: &CellId,
    disk: &Path,
    fmt: LuksFormat,
    key: &VolumeKey,
) -> Result<(), VolumeError> {
    let pass = key.passphrase();
    let mut args = vec![
        os("luksFormat"),
        os("--batch-mode"),
        os("--type"),
        os(fmt.as_str()),
        os("--cipher"),
        os("aes-xts-plain64"),
        os("--key-size"),
        os("512"),
        os("--hash"),
        os("sha256"),
    ];
    if fmt == LuksFormat::Luks2 {
        args.extend([os("--pbkdf"), os("pbkdf2")]);
    }
    args.extend([
        os("--pbkdf-force-iterations"),
        os(PBKDF2_ITERATIONS),
        os("--key-file=-"),
        disk.as_os_str(),
    ]);
    run(&t.cryptsetup, &args, Some(pass.as_bytes())).map_err(|e| tools::step(id, "format", e))
}

/// Open the container; returns the plaintext block device or file.
pub(crate) fn open(
    t: &Tools,
    id: &CellId,
    p: &VolumePaths,
    engine: EngineKind,
    key: &VolumeKey,
) -> Result<PathBuf, VolumeError> {
    let pass = key.passphrase();
    match engine {
        EngineKind::DmCrypt => {
            let r = run(
                &t.cryptsetup,
                &[
                    os("open"),
                    os("--type"),
                    os("luks"),
                    os("--key-file=-"),
                    p.disk.as_os_str(),
                    os(&p.mapper),
                ],
                Some(pass.as_bytes()),
            );
            match r {
                Ok(()) => Ok(Path::new("/dev/mapper").join(&p.mapper)),
                // cryptsetup's documented exit code 2: no key available
                // with this passphrase.
                Err(RunError::Failed(Some(2), _)) => Err(VolumeError::WrongKey(id.clone())),
                Err(e) => Err(tools::step(id, "open", e)),
            }
        }
        EngineKind::Userspace => {
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p.plain)
                .map_err(|e| VolumeError::io(format!("creating {}", p.plain.display()), e))?;
            let mut file_opt =
                std::ffi::OsString::from("driver=file,node-name=file0,cache.direct=off,filename=");
            file_opt.push(qemu_escape(&p.disk));
            let mut export_opt = std::ffi::OsString::from(
                "type=fuse,id=exp0,node-name=luks0,writable=on,allow-other=off,mountpoint=",
            );
            export_opt.push(qemu_escape(&p.plain));
            let r = run(
                &t.qemu_storage_daemon,
                &[
                    os("--daemonize"),
                    os("--pidfile"),
                    p.pidfile.as_os_str(),
                    os("--object"),
                    os("secret,id=key0,file=/dev/stdin,format=raw"),
                    os("--blockdev"),
                    &file_opt,
                    os("--blockdev"),
                    os("driver=luks,node-name=luks0,file=file0,key-secret=key0"),
                    os("--export"),
                    &export_opt,
                ],
                Some(pass.as_bytes()),
            );
            match r {
                Ok(()) => Ok(p.plain.clone()),
                Err(RunError::Failed(_, msg)) if msg.contains("Invalid password") => {
                    let _ = fs::remove_file(&p.plain);
                    Err(VolumeError::WrongKey(id.clone()))
                }
                Err(e) => {
                    let _ = fs::remove_file(&p.plain);
                    Err(tools::step(id, "open", e))
                }
            }
        }
    }
}

/// Close whatever holds the container open: the storage daemon (SIGTERM,
/// then SIGKILL after a grace), a dead daemon's FUSE mount, leftover loop
/// devices, the dm mapping. Idempotent; `engine` None means "unknown, look
/// for both".
pub(crate) fn close(
    t: &Tools,
    id: &CellId,
    p: &VolumePaths,
    engine: Option<EngineKind>,
) -> Result<(), VolumeError> {
    let fail = |detail: String| VolumeError::Step {
        id: id.clone(),
        step: "close",
        detail,
    };
    let loop_errors = tools::detach_loops(&p.dir);
    if !loop_errors.is_empty() {
        return Err(fail(loop_errors.join("; ")));
    }
    // LOOP_CLR_FD on a device still in use only sets autoclear: the ext4
    // on it is alive (a cell's mount namespace holds it). Signalling the
    // storage daemon now would pull the disk from under it; wait, then
    // refuse.
    let deadline = Instant::now() + LOOP_GRACE;
    while !tools::loops_backed_by(&p.dir).is_empty() {
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "loop device(s) {} still in use after {LOOP_GRACE:?}; the storage daemon is left running",
                tools::loops_backed_by(&p.dir).join(",")
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if engine != Some(EngineKind::DmCrypt) {
        if let Some(pid) = daemon_pid(p) {
            stop_daemon(pid, p).map_err(fail)?;
        }
        // A daemon that died without unmounting leaves its FUSE mount.
        tools::unmount(&p.plain, true).map_err(fail)?;
        for f in [&p.plain, &p.pidfile] {
            match fs::remove_file(f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(fail(format!("removing {}: {e}", f.display())));
                }
                _ => {}
            }
        }
    }
    if engine != Some(EngineKind::Userspace) && mapper_exists(p) {
        run(&t.cryptsetup, &[os("close"), os(&p.mapper)], None)
            .map_err(|e| tools::step(id, "close", e))?;
    }
    Ok(())
}

/// SIGTERM, then SIGKILL after [`DAEMON_GRACE`]. "Still running" means
/// [`is_our_daemon`] still holds: a zombie (empty cmdline) has exited, and
/// a pid reused by another process is never signalled again.
fn stop_daemon(pid: i32, p: &VolumePaths) -> Result<(), String> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let target = Pid::from_raw(pid);
    let wait = |grace: Duration| {
        let deadline = Instant::now() + grace;
        while is_our_daemon(pid, p) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let _ = kill(target, Signal::SIGTERM);
    wait(DAEMON_GRACE);
    if is_our_daemon(pid, p) {
        tracing::warn!(pid, "qemu-storage-daemon ignored SIGTERM: SIGKILL");
        let _ = kill(target, Signal::SIGKILL);
        wait(Duration::from_secs(5));
    }
    if is_our_daemon(pid, p) {
        Err(format!("qemu-storage-daemon pid {pid} does not exit"))
    } else {
        Ok(())
    }
}

/// The volume's storage daemon, while it runs (and is really it).
pub(crate) fn daemon_pid(p: &VolumePaths) -> Option<i32> {
    let pid: i32 = fs::read_to_string(&p.pidfile).ok()?.trim().parse().ok()?;
    is_our_daemon(pid, p).then_some(pid)
}

/// Does `pid` run qemu-storage-daemon on this volume's container?
fn is_our_daemon(pid: i32, p: &VolumePaths) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let disk = qemu_escape(&p.disk);
    let text = String::from_utf8_lossy(&cmdline);
    text.contains("qemu-storage-daemon") && text.contains(disk.to_string_lossy().as_ref())
}

/// Does `key` unlock a keyslot of the container? (`cryptsetup open
/// --test-passphrase`: no mapping is made, so it works without
/// device-mapper, for LUKS1 and LUKS2.)
pub(crate) fn verify_key(
    t: &Tools,
    id: &CellId,
    p: &VolumePaths,
    key: &VolumeKey,
) -> Result<(), VolumeError> {
    let pass = key.passphrase();
    match run(
        &t.cryptsetup,
        &[
            os("open"),
            os("--test-passphrase"),
            os("--key-file=-"),
            p.disk.as_os_str(),
        ],
        Some(pass.as_bytes()),
    ) {
        Ok(()) => Ok(()),
        Err(RunError::Failed(Some(2), _)) => Err(VolumeError::WrongKey(id.clone())),
        Err(e) => Err(tools::step(id, "verify key", e)),
    }
}

pub(crate) fn mapper_exists(p: &VolumePaths) -> bool {
    Path::new("/dev/mapper").join(&p.mapper).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_parses_and_chooses() {
        assert_eq!("auto".parse::<EngineChoice>(), Ok(EngineChoice::Auto));
        assert_eq!(
            "userspace".parse::<EngineChoice>(),
            Ok(EngineChoice::Force(EngineKind::Userspace))
        );
        assert!(
            "luks"
                .parse::<EngineChoice>()
                .unwrap_err()
                .contains("dm-crypt")
        );
        let p = Probe {
            dm_crypt: Err("no device-mapper".into()),
            userspace: Ok("fuse".into()),
        };
        assert_eq!(p.choose(EngineChoice::Auto), Ok(EngineKind::Userspace));
        let e = p
            .choose(EngineChoice::Force(EngineKind::DmCrypt))
            .unwrap_err();
        assert!(
            e.contains("forced") && e.contains("no device-mapper"),
            "{e}"
        );
        let both = Probe {
            dm_crypt: Ok("dm".into()),
            userspace: Ok("fuse".into()),
        };
        assert_eq!(both.choose(EngineChoice::Auto), Ok(EngineKind::DmCrypt));
        let none = Probe {
            dm_crypt: Err("a".into()),
            userspace: Err("b".into()),
        };
        assert_eq!(
            none.choose(EngineChoice::Auto).unwrap_err(),
            "dm-crypt: a; userspace: b"
        );
    }

    #[test]
    fn formats_per_engine() {
        assert_eq!(EngineKind::Userspace.format(), LuksFormat::Luks1);
        assert_eq!(EngineKind::DmCrypt.format(), LuksFormat::Luks2);
        assert_eq!(
            serde_json::to_string(&EngineKind::DmCrypt).unwrap(),
            "\"dm-crypt\""
        );
    }
}
