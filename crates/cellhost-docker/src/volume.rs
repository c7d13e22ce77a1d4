//! A plain (not encrypted) `spec.volume` of a container cell: a file
//! system of its own, `sizeGiB` large, so the kernel enforces the size.
//!
//! # Why not an engine volume
//!
//! The engine's `local` driver has no size that holds here: it accepts
//! `size` only when its data root is xfs mounted with project quotas (on
//! this host's btrfs data root it refuses with "quota size requested but
//! no quota support"), and a local volume of `type`/`o` options passes
//! them to mount(2), which for a bind limits nothing. A cell with an
//! engine volume could fill the host's disk through it. So the volume is a
//! [`LoopFs`], like the scratch disk of `diskGiB` (see [`crate::disk`]).
//!
//! # Layout on the host
//!
//! ```text
//! <state>/docker/cells/<id>/volume.img   sizeGiB, fallocated, ext4 (label
//!                                        cellhost-volume), no discard
//! <state>/docker/cells/<id>/volume/      its loop mount (nosuid, nodev)
//!   data/                                bound read-write at
//!                                        spec.volume.path; mode 0755, owned
//!                                        by the container's root (the
//!                                        remapped uid under --userns-remap)
//! ```
//!
//! # Invariants
//!
//! - Writes past `sizeGiB` fail with ENOSPC in the cell (ext4 keeps its
//!   journal and tables inside, so a little less than `sizeGiB` is usable).
//!   The host's share is the file, reserved whole at create: tenants cannot
//!   overcommit the host's disk, and a volume that does not fit is refused
//!   at create naming `spec.volume.sizeGiB`, never made smaller or sparse.
//! - The container binds `volume/data`, never `volume/`: while the file
//!   system is not mounted `data` does not exist, and the engine refuses a
//!   missing bind source, so a cell never writes its volume onto the host's
//!   disk under an empty mount point.
//! - Host code never walks what the tenant wrote: `data` is made before the
//!   container exists, and teardown unmounts, detaches and deletes the file.
//! - Every path derives from the cell id and lies in the cell dir, so the
//!   orphan listing (`list`, which lists cell dirs) finds a volume whose
//!   container is gone, and destroy from a fresh process removes it.
//! - It starts empty: the image's files at `spec.volume.path` are hidden,
//!   not copied in as an engine volume would (as for an encrypted volume).
//!
//! # Lifecycle
//!
//! - **create**: made after the secrets, before the container; a failure
//!   removes it with the rest of the cell.
//! - **stop/start**: the file system stays mounted on the host while the
//!   container is stopped, and the restarted container binds the same data.
//!   start mounts it again when the file is there and its mount is not
//!   (after a host reboot, or anything else that unmounted it), so the data
//!   persists from create to destroy. Until then the engine cannot start
//!   the container (its bind source is missing), with any restart policy.
//! - **daemon restart**: the mount and its loop device are the kernel's and
//!   outlive the cellhost process; nothing about them is kept in memory, so
//!   a restarted daemon adopts them as they are (start, stop and destroy
//!   work from the paths alone). A dockerd restart leaves host mounts alone.
//! - **destroy** (after the container is removed): unmount (lazily if
//!   busy), detach the loop device if autoclear has not, delete the file;
//!   checks `plain-volume-mount`, `plain-volume-loop`, `plain-volume-file`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::disk::{DiskError, LoopFs};

/// The document field this module enforces (errors name it).
const FIELD: &str = "spec.volume.sizeGiB";

/// The plain volume of the cell whose dir is `cell_dir`.
pub fn of(cell_dir: &Path) -> LoopFs {
    LoopFs::new(
        cell_dir,
        "volume",
        "cellhost-volume",
        FIELD,
        [
            "plain-volume-mount",
            "plain-volume-loop",
            "plain-volume-file",
        ],
    )
}

/// What the container binds at `spec.volume.path`.
pub fn data_dir(v: &LoopFs) -> PathBuf {
    v.mnt.join("data")
}

/// Make the volume of `gib` GiB with its `data` dir owned by `owner` (the
/// container's root on the host; `None`: uid 0). Blocking. The caller
/// tears down on error ([`LoopFs::teardown`]).
pub fn make(v: &LoopFs, gib: u64, owner: Option<(u32, u32)>) -> Result<PathBuf, DiskError> {
    let data = data_dir(v);
    v.make(gib, std::slice::from_ref(&data), 0o755)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(&data, Some(uid), Some(gid)).map_err(|source| DiskError::Io {
            field: FIELD,
            context: format!("chown {uid}:{gid} {}", data.display()),
            source,
        })?;
    }
    Ok(data)
}

/// Before a start: mount the volume again if its file is there and its
/// mount is not, and check that it holds its `data` dir. Cells without a
/// plain volume pass. Blocking.
pub fn ensure_mounted(v: &LoopFs) -> Result<(), DiskError> {
    if !v.img.exists() {
        return Ok(());
    }
    if !v.is_mounted() {
        tracing::info!("mounting {} again on {}", v.img.display(), v.mnt.display());
        v.mount()?;
    }
    // The mount's own `data`, not a dir of the host's under the mount
    // point: on another device than the cell dir.
    let data = data_dir(v);
    let cell_dir = v.mnt.parent().unwrap_or(Path::new("/"));
    let on_volume = match (
        std::fs::symlink_metadata(cell_dir),
        std::fs::symlink_metadata(&data),
    ) {
        (Ok(host), Ok(d)) => d.is_dir() && d.dev() != host.dev(),
        _ => false,
    };
    if !v.is_mounted() || !on_volume {
        return Err(DiskError::Step {
            field: FIELD,
            step: "mount",
            detail: format!(
                "{} is not a directory of the mounted volume {}",
                data.display(),
                v.img.display()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_volume_is_named_from_the_cell_dir_apart_from_the_scratch_disk() {
        let cell = Path::new("/nonexistent/cells/abc");
        let v = of(cell);
        assert_eq!(v.img, cell.join("volume.img"));
        assert_eq!(v.mnt, cell.join("volume"));
        assert_eq!(data_dir(&v), cell.join("volume").join("data"));
        let s = LoopFs::scratch(cell);
        assert_ne!(s.img, v.img);
        assert!(!s.mnt.starts_with(&v.mnt) && !v.mnt.starts_with(&s.mnt));
    }

    #[test]
    fn a_cell_without_a_plain_volume_starts_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure_mounted(&of(dir.path())).is_ok());
    }
}
