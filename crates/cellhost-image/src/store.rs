//! The local image store: rootfs images process cells run from; kernels,
//! initramfs and base disks that vm and microvm cells boot from; each
//! file with a sha256 digest.
//!
//! # Layout on the host
//!
//! ```text
//! <state>/images/                       0755 (cells' qemu uids read images)
//! <state>/images/<name>/manifest.json   kind, files, digests, cmdline
//! <state>/images/<name>/rootfs          (0444) rootfs: a read-only ext4 image
//! <state>/images/<name>/kernel          (0444)
//! <state>/images/<name>/initrd          (0444)
//! <state>/images/<name>/disk            (0444) qcow2 or raw base disk
//! ```
//!
//! # Lifecycle
//!
//! Images enter the store only through `cellhost image import` (files the
//! operator has) or `cellhost image initramfs` (built here from a rootfs
//! dir, the static agent and kernel modules); cell creation never
//! downloads. An image is written to `<name>.tmp-<pid>` and renamed into
//! place, so a half-written image is never visible; `remove` renames it
//! away before deleting. Files are made read-only: base disks are only
//! ever the read-only backing file of a per-cell overlay.
//!
//! # Idempotency
//!
//! Importing under a name that exists is refused (`--replace` removes the
//! old one first); removing a missing image is not an error.
//!
//! # Threat model
//!
//! The operator chooses what goes in; documents only name an image, and
//! names are checked ([`check_name`]) so a document cannot point outside
//! the store. Digests let a consumer see exactly what their cell booted
//! (the handle carries them) and `verify` detects a store edited on disk.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cpio::CpioWriter;

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image name {0:?}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit")]
    BadName(String),
    #[error("image {0} not found in the store (see `cellhost image ls`)")]
    NotFound(String),
    #[error("image {0} exists already (pass --replace to overwrite it)")]
    Exists(String),
    #[error("image {name}: {what}")]
    Invalid { name: String, what: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Modules(#[from] crate::modules::ModuleError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// A base disk (booted by firmware, or by `kernel`+`initrd` when given).
    Vm,
    /// A kernel and an initramfs carrying cellhost-agent as PID 1.
    Microvm,
    /// A root filesystem for process cells (an ext4 image, see
    /// [`crate::build_rootfs_image`]).
    Rootfs,
}

impl ImageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Vm => "vm",
            ImageKind::Microvm => "microvm",
            ImageKind::Rootfs => "rootfs",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub kind: ImageKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// `qcow2` or `raw`, when there is a disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_format: Option<String>,
    /// Extra kernel command line (direct kernel boot only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// File name → `sha256:<hex>`.
    pub digests: BTreeMap<String, String>,
    pub created_unix: u64,
}

/// An image resolved to paths in the store.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    pub fn kernel(&self) -> Option<PathBuf> {
        self.manifest.kernel.as_ref().map(|f| self.dir.join(f))
    }
    pub fn initrd(&self) -> Option<PathBuf> {
        self.manifest.initrd.as_ref().map(|f| self.dir.join(f))
    }
    pub fn disk(&self) -> Option<PathBuf> {
        self.manifest.disk.as_ref().map(|f| self.dir.join(f))
    }
    pub fn rootfs(&self) -> Option<PathBuf> {
        self.manifest.rootfs.as_ref().map(|f| self.dir.join(f))
    }

    /// The size in bytes the guest sees of the base disk: a raw file's
    /// length, or the size in a qcow2 header (big-endian u64 at byte 24,
    /// after the `QFI\xfb` magic). `None` without a disk.
    pub fn disk_size(&self) -> Result<Option<u64>, ImageError> {
        let Some(path) = self.disk() else {
            return Ok(None);
        };
        let ctx = || path.display().to_string();
        let mut f = std::fs::File::open(&path).map_err(io_err(ctx()))?;
        if self.manifest.disk_format.as_deref() != Some("qcow2") {
            return Ok(Some(f.metadata().map_err(io_err(ctx()))?.len()));
        }
        let mut head = [0u8; 32];
        f.read_exact(&mut head).map_err(io_err(ctx()))?;
        if &head[..4] != b"QFI\xfb" {
            return Err(ImageError::Invalid {
                name: self.manifest.name.clone(),
                what: "disk is not qcow2 (bad magic)".into(),
            });
        }
        let size = u64::from_be_bytes(head[24..32].try_into().expect("8 bytes"));
        Ok(Some(size))
    }
}

/// What `import` copies in.
#[derive(Debug, Clone, Default)]
pub struct ImportRequest {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub disk: Option<PathBuf>,
    /// A directory or a tarball (plain or gzip): a `rootfs` image.
    pub rootfs: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub replace: bool,
}

/// What `build_initramfs` puts in.
#[derive(Debug, Clone, Default)]
pub struct InitramfsRequest {
    /// Copied in first (busybox, the workload's files...).
    pub rootfs: Option<PathBuf>,
    /// The static agent, installed as `/sbin/cellhost-agent`.
    pub agent: Option<PathBuf>,
    /// `lib/modules/<version>` of the guest kernel.
    pub modules_dir: Option<PathBuf>,
    /// Module names to load at boot (their dependencies are added).
    pub modules: Vec<String>,
}

/// Modules a stock distribution kernel needs for a microVM's devices:
/// virtio-mmio transport, the guest channel, block devices, the NIC of a
/// bridged cell.
pub const MICROVM_MODULES: &[&str] = &["virtio_mmio", "virtio_console", "virtio_blk", "virtio_net"];

/// The store's own path of the agent inside an initramfs.
pub const AGENT_PATH: &str = "/sbin/cellhost-agent";

/// A store name, as documents must write it ([`cellhost_spec::is_image_name`]).
pub fn check_name(name: &str) -> Result<(), ImageError> {
    if cellhost_spec::is_image_name(name) {
        Ok(())
    } else {
        Err(ImageError::BadName(name.to_string()))
    }
}

/// `sha256:<hex>` of a file, streamed.
pub fn digest_file(path: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(path).map_err(io_err(format!("reading {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    pub fn new(root: impl Into<PathBuf>) -> ImageStore {
        ImageStore { root: root.into() }
    }

    /// The store of a cellhost state dir: `<state>/images`, the one place
    /// every tier, command and bench finds it.
    pub fn of_state_dir(state_dir: &Path) -> ImageStore {
        ImageStore::new(state_dir.join("images"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        check_name(name)?;
        let dir = self.root.join(name);
        let text = match std::fs::read_to_string(dir.join(MANIFEST)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound(name.to_string()));
            }
            Err(e) => return Err(io_err(format!("image {name}"))(e)),
        };
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| ImageError::Invalid {
            name: name.to_string(),
            what: format!("{MANIFEST}: {e}"),
        })?;
        Ok(Image { dir, manifest })
    }

    pub fn list(&self) -> Result<Vec<Manifest>, ImageError> {
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("image store {}", self.root.display()))(e)),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_ok()
                && let Ok(img) = self.get(&name)
            {
                out.push(img.manifest);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Recompute every digest; the files whose content changed.
    pub fn verify(&self, name: &str) -> Result<Vec<String>, ImageError> {
        let img = self.get(name)?;
        let mut bad = Vec::new();
        for (file, want) in &img.manifest.digests {
            if digest_file(&img.dir.join(file))? != *want {
                bad.push(file.clone());
            }
        }
        Ok(bad)
    }

    pub fn remove(&self, name: &str) -> Result<bool, ImageError> {
        check_name(name)?;
        let dir = self.root.join(name);
        if !dir.exists() {
            return Ok(false);
        }
        let gone = self.root.join(format!(".{name}.rm-{}", std::process::id()));
        std::fs::rename(&dir, &gone).map_err(io_err(format!("removing image {name}")))?;
        std::fs::remove_dir_all(&gone).map_err(io_err(format!("removing image {name}")))?;
        Ok(true)
    }

    /// Copy the operator's files in. A disk makes a `vm` image; a kernel
    /// and initrd without a disk make a `microvm` image.
    pub fn import(&self, name: &str, req: &ImportRequest) -> Result<Manifest, ImageError> {
        check_name(name)?;
        if let Some(src) = &req.rootfs {
            if req.disk.is_some() || req.kernel.is_some() || req.initrd.is_some() {
                return Err(ImageError::Invalid {
                    name: name.into(),
                    what: "--rootfs makes a process image: give it alone".into(),
                });
            }
            return self.install(name, req.replace, ImageKind::Rootfs, None, |tmp| {
                let scratch = tmp.join(".scratch");
                std::fs::create_dir(&scratch).map_err(io_err("scratch dir"))?;
                let built = crate::build_rootfs_image(src, &tmp.join("rootfs"), &scratch);
                let _ = std::fs::remove_dir_all(&scratch);
                built.map_err(|e| ImageError::Invalid {
                    name: name.into(),
                    what: e.to_string(),
                })?;
                Ok((vec!["rootfs"], None))
            });
        }
        let kind = match (&req.disk, &req.kernel, &req.initrd) {
            (Some(_), _, _) => ImageKind::Vm,
            (None, Some(_), Some(_)) => ImageKind::Microvm,
            _ => {
                return Err(ImageError::Invalid {
                    name: name.into(),
                    what: "give --rootfs (a process image), --disk (a vm image) or --kernel and \
                           --initrd (a microvm image)"
                        .into(),
                });
            }
        };
        if req.initrd.is_some() && req.kernel.is_none() {
            return Err(ImageError::Invalid {
                name: name.into(),
                what: "--initrd needs --kernel".into(),
            });
        }
        let disk_format = match &req.disk {
            Some(d) => Some(disk_format(d)?),
            None => None,
        };
        self.install(name, req.replace, kind, req.cmdline.clone(), |tmp| {
            let mut files = Vec::new();
            for (src, dst) in [
                (&req.kernel, "kernel"),
                (&req.initrd, "initrd"),
                (&req.disk, "disk"),
            ] {
                if let Some(src) = src {
                    std::fs::copy(src, tmp.join(dst))
                        .map_err(io_err(format!("copying {}", src.display())))?;
                    files.push(dst);
                }
            }
            Ok((files, disk_format.clone()))
        })
    }

    /// Build a microvm image: `kernel` copied in, an initramfs made from
    /// `req` (see [`build_initramfs`]).
    pub fn build_microvm(
        &self,
        name: &str,
        kernel: &Path,
        req: &InitramfsRequest,
        cmdline: Option<String>,
        replace: bool,
    ) -> Result<Manifest, ImageError> {
        check_name(name)?;
        let initrd = build_initramfs(req)?;
        self.install(name, replace, ImageKind::Microvm, cmdline, |tmp| {
            std::fs::copy(kernel, tmp.join("kernel"))
                .map_err(io_err(format!("copying {}", kernel.display())))?;
            std::fs::write(tmp.join("initrd"), &initrd).map_err(io_err("writing the initramfs"))?;
            Ok((vec!["kernel", "initrd"], None))
        })
    }

    fn install(
        &self,
        name: &str,
        replace: bool,
        kind: ImageKind,
        cmdline: Option<String>,
        fill: impl FnOnce(&Path) -> Result<(Vec<&'static str>, Option<String>), ImageError>,
    ) -> Result<Manifest, ImageError> {
        let dir = self.root.join(name);
        if dir.exists() && !replace {
            return Err(ImageError::Exists(name.to_string()));
        }
        std::fs::create_dir_all(&self.root)
            .map_err(io_err(format!("image store {}", self.root.display())))?;
        // Readable by the unprivileged uids VM cells' qemu runs as: images
        // are not secret, and every file in them is 0444.
        set_mode(&self.root, 0o755)?;
        let tmp = self
            .root
            .join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(io_err(format!("image store {}", tmp.display())))?;
        set_mode(&tmp, 0o755)?;
        let result = (|| {
            let (files, disk_format) = fill(&tmp)?;
            let mut digests = BTreeMap::new();
            for f in &files {
                let p = tmp.join(f);
                digests.insert(f.to_string(), digest_file(&p)?);
                set_mode(&p, 0o444)?;
            }
            let has = |f: &str| files.contains(&f).then(|| f.to_string());
            let manifest = Manifest {
                name: name.to_string(),
                kind,
                kernel: has("kernel"),
                initrd: has("initrd"),
                disk: has("disk"),
                rootfs: has("rootfs"),
                disk_format,
                cmdline,
                digests,
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            let mut f = std::fs::File::create(tmp.join(MANIFEST)).map_err(io_err("manifest"))?;
            f.write_all(
                serde_json::to_string_pretty(&manifest)
                    .unwrap_or_default()
                    .as_bytes(),
            )
            .and_then(|_| f.sync_all())
            .map_err(io_err("manifest"))?;
            if replace {
                self.remove(name)?;
            }
            std::fs::rename(&tmp, &dir).map_err(io_err(format!("installing image {name}")))?;
            Ok(manifest)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }
}

fn set_mode(p: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", p.display())))
}

/// `qcow2` or `raw`, from the file's first bytes (qcow2 magic `QFI\xfb`).
/// Probing the format from content is what qemu does with `format=` unset;
/// recording it once here means cells never let qemu guess.
pub fn disk_format(path: &Path) -> Result<String, ImageError> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(io_err(format!("reading {}", path.display())))?;
    let n = f
        .read(&mut magic)
        .map_err(io_err(format!("reading {}", path.display())))?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    }
    .to_string())
}

/// An initramfs (newc cpio, uncompressed): the rootfs dir, then the agent
/// at [`AGENT_PATH`], the kernel modules under `/lib/modules/cellhost/`
/// with their load order in `/etc/cellhost/modules` (the agent loads them
/// as PID 1), the mount points the agent needs and `/dev/console`.
pub fn build_initramfs(req: &InitramfsRequest) -> Result<Vec<u8>, ImageError> {
    let mut w = CpioWriter::new(Vec::new());
    let cpio = |e: std::io::Error| ImageError::Io {
        context: "writing the initramfs".into(),
        source: e,
    };
    let mut dirs = std::collections::BTreeSet::new();
    if let Some(root) = &req.rootfs {
        add_tree(&mut w, root, Path::new(""), &mut dirs)?;
    }
    for d in [
        "dev", "proc", "sys", "run", "tmp", "root", "etc", "sbin", "lib",
    ] {
        if dirs.insert(d.to_string()) {
            w.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })
                .map_err(cpio)?;
        }
    }
    w.char_dev("dev/console", 0o600, 5, 1).map_err(cpio)?;
    if let Some(agent) = &req.agent {
        let bytes = std::fs::read(agent).map_err(io_err(format!("agent {}", agent.display())))?;
        w.file(AGENT_PATH, 0o755, &bytes).map_err(cpio)?;
    }
    if !req.modules.is_empty() {
        let dir = req
            .modules_dir
            .as_ref()
            .ok_or_else(|| ImageError::Invalid {
                name: "initramfs".into(),
                what: "modules named but no modules dir given".into(),
            })?;
        let order = crate::modules::resolve(dir, &req.modules)?;
        for d in ["lib/modules", "lib/modules/cellhost", "etc/cellhost"] {
            if dirs.insert(d.to_string()) {
                w.dir(d, 0o755).map_err(cpio)?;
            }
        }
        let mut list = String::new();
        for m in &order {
            let file = m
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let bytes = std::fs::read(m).map_err(io_err(format!("module {}", m.display())))?;
            let at = format!("/lib/modules/cellhost/{file}");
            w.file(&at, 0o644, &bytes).map_err(cpio)?;
            list.push_str(&at);
            list.push('\n');
        }
        w.file("etc/cellhost/modules", 0o644, list.as_bytes())
            .map_err(cpio)?;
    }
    w.finish().map_err(cpio)
}

/// Add `root` recursively (directories before their entries, sorted),
/// owned by root; sockets, fifos and devices are skipped.
fn add_tree(
    w: &mut CpioWriter<Vec<u8>>,
    root: &Path,
    rel: &Path,
    dirs: &mut std::collections::BTreeSet<String>,
) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let here = root.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&here)
        .map_err(io_err(format!("rootfs {}", here.display())))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    let cpio = |e: std::io::Error| ImageError::Io {
        context: "writing the initramfs".into(),
        source: e,
    };
    for e in entries {
        let rel_path = rel.join(e.file_name());
        let name = rel_path.to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(e.path())
            .map_err(io_err(format!("rootfs {}", e.path().display())))?;
        let perm = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            dirs.insert(name.clone());
            w.dir(&name, perm).map_err(cpio)?;
            add_tree(w, root, &rel_path, dirs)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(e.path())
                .map_err(io_err(format!("rootfs {}", e.path().display())))?;
            w.symlink(&name, &target.to_string_lossy()).map_err(cpio)?;
        } else if ft.is_file() {
            let bytes = std::fs::read(e.path())
                .map_err(io_err(format!("rootfs {}", e.path().display())))?;
            w.file(&name, perm, &bytes).map_err(cpio)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["debian-12", "a", "x.y_z", "0abc"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "-a", "A", "a/b", "..", ".hidden", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn import_digests_and_replace() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("base.img");
        std::fs::write(&disk, b"raw disk bytes").unwrap();
        let store = ImageStore::new(d.path().join("images"));
        let req = ImportRequest {
            disk: Some(disk.clone()),
            ..Default::default()
        };
        let m = store.import("base", &req).unwrap();
        assert_eq!(m.kind, ImageKind::Vm);
        assert_eq!(m.disk_format.as_deref(), Some("raw"));
        // Checked against coreutils' sha256sum, not our own code.
        let out = std::process::Command::new("sha256sum")
            .arg(&disk)
            .output()
            .unwrap();
        let want = String::from_utf8(out.stdout).unwrap()[..64].to_string();
        assert_eq!(m.digests["disk"], format!("sha256:{want}"));
        assert!(matches!(
            store.import("base", &req),
            Err(ImageError::Exists(_))
        ));
        assert!(store.verify("base").unwrap().is_empty());
        let stored = store.get("base").unwrap().disk().unwrap();
        set_mode(&stored, 0o644).unwrap();
        std::fs::write(&stored, b"edited on disk").unwrap();
        assert_eq!(store.verify("base").unwrap(), ["disk"]);
        let again = ImportRequest {
            replace: true,
            ..req.clone()
        };
        store.import("base", &again).unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(store.remove("base").unwrap());
        assert!(!store.remove("base").unwrap());
        assert!(matches!(store.get("base"), Err(ImageError::NotFound(_))));
        let e = store
            .import("x", &ImportRequest::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--disk"), "{e}");
    }

    /// The size a guest sees, checked against what qemu-img wrote.
    #[test]
    fn disk_size_of_raw_and_qcow2() {
        let d = tempfile::tempdir().unwrap();
        let store = ImageStore::new(d.path().join("images"));
        let raw = d.path().join("raw.img");
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        let req = |p: &Path| ImportRequest {
            disk: Some(p.to_path_buf()),
            ..Default::default()
        };
        store.import("raw", &req(&raw)).unwrap();
        assert_eq!(
            store.get("raw").unwrap().disk_size().unwrap(),
            Some(3 << 20)
        );
        let Some(qemu_img) = cellhost_host::probe::which("qemu-img") else {
            eprintln!("skipping the qcow2 half: qemu-img is not installed");
            return;
        };
        let q = d.path().join("q.qcow2");
        let ok = std::process::Command::new(qemu_img)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&q)
            .arg("5G")
            .status()
            .unwrap()
            .success();
        assert!(ok);
        store.import("q", &req(&q)).unwrap();
        assert_eq!(store.get("q").unwrap().disk_size().unwrap(), Some(5 << 30));
    }
}
