//! A rootfs image: a directory tree (or a tarball of one) copied into a
//! read-only ext4 filesystem in one file.
//!
//! Why a filesystem image and not a directory: a cell mounts it (loop,
//! read-only, `noload`) as the lower layer of an overlay of its own, so
//! - nothing a cell does reaches the image (the mount is read-only, the
//!   file 0444, and the cell's writes go to its own upper layer);
//! - the cell's mountinfo shows the image's own root (`/`), never a host
//!   path of the state dir, as a bind mount of a store directory would;
//! - the digest covers exactly what every cell sees.
//!
//! Build: extract the tarball (plain or gzip) with the `tar` crate into a
//! scratch dir beside the output (paths with `..` or leading `/` stay
//! inside it; owners and modes kept), size the filesystem from the tree
//! (blocks + an inode's worth per entry + slack), `mkfs.ext4 -d` it without
//! a journal (read-only: nothing to replay), check it and shrink it to its
//! minimum with `resize2fs -M`. The tools are shelled out because they are
//! the interface to ext4 (e2fsprogs), with a cleared environment and a
//! deadline (`cellhost_host::tool`).

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cellhost_host::tool::{self, RunError};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{tool}: {error}")]
    Tool { tool: &'static str, error: String },
    #[error("{0} is neither a directory nor a tar archive (plain or gzip)")]
    NotATree(PathBuf),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> RootfsError {
    let context = context.into();
    move |source| RootfsError::Io { context, source }
}

fn tool_err(tool: &'static str) -> impl FnOnce(RunError) -> RootfsError {
    move |e| RootfsError::Tool {
        tool,
        error: e.to_string(),
    }
}

/// Build the ext4 image of `src` (a directory, or a `.tar`/`.tar.gz`
/// file) at `out`, using `scratch` (an empty dir on the same filesystem,
/// removed by the caller) to unpack a tarball.
pub fn build_rootfs_image(src: &Path, out: &Path, scratch: &Path) -> Result<(), RootfsError> {
    let meta = fs::metadata(src).map_err(io_err(format!("reading {}", src.display())))?;
    let tree = if meta.is_dir() {
        src.to_path_buf()
    } else if meta.is_file() {
        let dir = scratch.join("tree");
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        unpack(src, &dir)?;
        dir
    } else {
        return Err(RootfsError::NotATree(src.to_path_buf()));
    };
    let bytes = tree_bytes(&tree)?;
    // Room for ext4's own metadata (inode tables, group descriptors) on top
    // of the data: resize2fs -M takes the slack back afterwards.
    let size = (bytes + bytes / 4 + (64 << 20)).div_ceil(4096) * 4096;
    let f = fs::File::create(out).map_err(io_err(format!("creating {}", out.display())))?;
    f.set_len(size)
        .map_err(io_err(format!("sizing {}", out.display())))?;
    drop(f);
    let os = OsStr::new;
    tool::run(
        Path::new("mkfs.ext4"),
        &[
            os("-q"),
            os("-F"),
            os("-t"),
            os("ext4"),
            os("-O"),
            os("^has_journal"),
            os("-m"),
            os("0"),
            os("-b"),
            os("4096"),
            os("-L"),
            os("cellhost-rootfs"),
            os("-d"),
            tree.as_os_str(),
            out.as_os_str(),
        ],
        None,
    )
    .map_err(tool_err("mkfs.ext4"))?;
    // resize2fs wants a freshly checked filesystem. e2fsck exits 1 when it
    // "fixed" something (it may optimise directories): not a failure.
    match tool::run(
        Path::new("e2fsck"),
        &[os("-f"), os("-y"), out.as_os_str()],
        None,
    ) {
        Ok(()) | Err(RunError::Failed(Some(1), _)) => {}
        Err(e) => return Err(tool_err("e2fsck")(e)),
    }
    tool::run(Path::new("resize2fs"), &[os("-M"), out.as_os_str()], None)
        .map_err(tool_err("resize2fs"))
}

/// Unpack a tar archive (gzip by its magic) into `dir`, owners and modes
/// kept. The `tar` crate keeps every entry inside `dir` (it refuses to
/// write through a symlink or outside the destination).
fn unpack(archive: &Path, dir: &Path) -> Result<(), RootfsError> {
    let mut f =
        fs::File::open(archive).map_err(io_err(format!("reading {}", archive.display())))?;
    let mut magic = [0u8; 2];
    let n = f
        .read(&mut magic)
        .map_err(io_err(format!("reading {}", archive.display())))?;
    let f = fs::File::open(archive).map_err(io_err(format!("reading {}", archive.display())))?;
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut a = tar::Archive::new(reader);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_unpack_xattrs(false);
    a.set_overwrite(true);
    a.unpack(dir).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::Other | io::ErrorKind::UnexpectedEof => {
            RootfsError::NotATree(archive.to_path_buf())
        }
        _ => io_err(format!("unpacking {}", archive.display()))(e),
    })
}

/// Bytes the tree's files take in 4 KiB blocks, plus a block per entry
/// (inodes, directory blocks). Symlinks are not followed.
fn tree_bytes(dir: &Path) -> Result<u64, RootfsError> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).map_err(io_err(format!("reading {}", d.display())))? {
            let e = e.map_err(io_err(format!("reading {}", d.display())))?;
            let m = e
                .path()
                .symlink_metadata()
                .map_err(io_err(format!("reading {}", e.path().display())))?;
            total = total.saturating_add(m.size().div_ceil(4096) * 4096 + 4096);
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have_e2fsprogs() -> bool {
        ["mkfs.ext4", "e2fsck", "resize2fs", "debugfs"]
            .iter()
            .all(|t| tool::find(Path::new(t)).is_some())
    }

    /// `debugfs -R <cmd> <image>`'s output.
    fn debugfs(img: &Path, cmd: &str) -> String {
        let out = std::process::Command::new("debugfs")
            .args(["-R", cmd])
            .arg(img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn a_directory_and_its_tarball_make_the_same_tree() {
        if !have_e2fsprogs() {
            eprintln!("SKIP: e2fsprogs (mkfs.ext4, e2fsck, resize2fs, debugfs) missing");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
        std::os::unix::fs::symlink("hello", src.join("bin/hi")).unwrap();
        fs::write(src.join("big"), vec![7u8; 3 << 20]).unwrap();

        let img = t.path().join("dir.img");
        let scratch = t.path().join("s1");
        fs::create_dir(&scratch).unwrap();
        build_rootfs_image(&src, &img, &scratch).unwrap();
        let listing = debugfs(&img, "ls -l /bin");
        assert!(
            listing.contains("hello") && listing.contains("hi"),
            "{listing}"
        );
        assert!(debugfs(&img, "stat /big").contains("Size: 3145728"));
        // Shrunk to about what it holds, not the 64 MiB of slack.
        let len = fs::metadata(&img).unwrap().len();
        assert!(len < 16 << 20, "image is {len} bytes");

        // The same tree as a gzip tarball, with an entry that tries to
        // climb out of the scratch dir.
        let tgz = t.path().join("tree.tar.gz");
        {
            let f = fs::File::create(&tgz).unwrap();
            let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            let mut b = tar::Builder::new(gz);
            b.append_dir_all(".", &src).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(4);
            h.set_mode(0o644);
            h.set_cksum();
            // `append_data` refuses `..`; write the raw name the way a
            // hostile archive would.
            let name = b"../escaped";
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, &b"evil"[..]).unwrap();
            b.into_inner().unwrap().finish().unwrap();
        }
        let img2 = t.path().join("tar.img");
        let scratch2 = t.path().join("s2");
        fs::create_dir(&scratch2).unwrap();
        build_rootfs_image(&tgz, &img2, &scratch2).unwrap();
        assert!(debugfs(&img2, "ls -l /bin").contains("hello"));
        assert!(!t.path().join("escaped").exists());
        assert!(!scratch2.join("escaped").exists());
    }

    #[test]
    fn garbage_is_not_a_tree() {
        let t = tempfile::tempdir().unwrap();
        let junk = t.path().join("junk");
        fs::write(&junk, vec![0x42u8; 10_000]).unwrap();
        let e = build_rootfs_image(&junk, &t.path().join("x.img"), t.path()).unwrap_err();
        assert!(matches!(e, RootfsError::NotATree(_)), "{e}");
    }
}
