//! A plain (not encrypted) `spec.volume` of a container cell: a [`LoopFs`]
//! of its own, `sizeGiB` large, so the kernel enforces the size (the
//! engine's `local` driver cannot; see `docs/volumes.md`).
//!
//! Invariants (layout, lifecycle and reasons in `docs/volumes.md`):
//! - the file is reserved whole at create; a volume that does not fit is
//!   refused naming `spec.volume.sizeGiB`, never made smaller or sparse;
//! - the container binds `volume/data`, never `volume/`, so a cell never
//!   writes its volume onto the host's disk under an empty mount point;
//! - host code never walks what the tenant wrote;
//! - every path derives from the cell id and lies in the cell dir, and
//!   nothing is kept in memory: `list` finds an orphaned volume, and start,
//!   stop and destroy work from the paths alone, from a fresh process too.
//!
//! Design: `docs/volumes.md`.

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
