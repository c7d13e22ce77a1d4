//! Kernel modules for a guest initramfs: find them in an unpacked
//! distribution kernel's `lib/modules/<version>` tree and order them so
//! every module comes after what it depends on.
//!
//! Dependencies are read from each module's own `.modinfo` ELF section
//! (`depends=a,b`), the same data `depmod` turns into `modules.dep`: a
//! tree unpacked with `dpkg-deb -x` has no `modules.dep` (the package's
//! postinst makes it), and kmod's tools need not be installed.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("modules dir {dir}: {source}")]
    Walk {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module {name}: not found under {dir}")]
    NotFound { name: String, dir: PathBuf },
    #[error("module {path}: {what}")]
    Bad { path: PathBuf, what: String },
}

/// `virtio-blk` and `virtio_blk` are one module.
pub fn canonical(name: &str) -> String {
    name.trim_end_matches(".ko").replace('-', "_")
}

/// Every `*.ko` under `dir`, by canonical name.
pub fn index(dir: &Path) -> Result<BTreeMap<String, PathBuf>, ModuleError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|source| ModuleError::Walk {
            dir: d.clone(),
            source,
        })?;
        for e in rd.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str())
                && n.ends_with(".ko")
            {
                out.insert(canonical(n), p);
            }
        }
    }
    Ok(out)
}

/// The `depends=` list of one module file.
pub fn depends(path: &Path) -> Result<Vec<String>, ModuleError> {
    let bad = |what: String| ModuleError::Bad {
        path: path.to_path_buf(),
        what,
    };
    let data = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let file = object::File::parse(&*data).map_err(|e| bad(format!("not an ELF module: {e}")))?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| bad("no .modinfo section".into()))?;
    let info = section.data().map_err(|e| bad(e.to_string()))?;
    for entry in info.split(|b| *b == 0) {
        if let Some(list) = entry.strip_prefix(b"depends=") {
            let list =
                std::str::from_utf8(list).map_err(|_| bad("depends= is not UTF-8".into()))?;
            return Ok(list
                .split(',')
                .filter(|s| !s.is_empty())
                .map(canonical)
                .collect());
        }
    }
    Ok(Vec::new())
}

/// `wanted` and everything they depend on, dependencies first, each once.
pub fn resolve(dir: &Path, wanted: &[String]) -> Result<Vec<PathBuf>, ModuleError> {
    let idx = index(dir)?;
    let mut order = Vec::new();
    let mut done = HashSet::new();
    let mut visiting = HashSet::new();
    for w in wanted {
        visit(
            &canonical(w),
            dir,
            &idx,
            &mut done,
            &mut visiting,
            &mut order,
        )?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    dir: &Path,
    idx: &BTreeMap<String, PathBuf>,
    done: &mut HashSet<String>,
    visiting: &mut HashSet<String>,
    order: &mut Vec<PathBuf>,
) -> Result<(), ModuleError> {
    if done.contains(name) {
        return Ok(());
    }
    let path = idx.get(name).ok_or_else(|| ModuleError::NotFound {
        name: name.to_string(),
        dir: dir.to_path_buf(),
    })?;
    if !visiting.insert(name.to_string()) {
        return Err(ModuleError::Bad {
            path: path.clone(),
            what: "dependency cycle".into(),
        });
    }
    for d in depends(path)? {
        visit(&d, dir, idx, done, visiting, order)?;
    }
    visiting.remove(name);
    done.insert(name.to_string());
    order.push(path.clone());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names() {
        assert_eq!(canonical("virtio-blk"), "virtio_blk");
        assert_eq!(canonical("virtio_blk.ko"), "virtio_blk");
    }

    #[test]
    fn not_elf_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.ko");
        std::fs::write(&p, b"not elf").unwrap();
        let e = depends(&p).unwrap_err().to_string();
        assert!(e.contains("x.ko") && e.contains("not an ELF"), "{e}");
        let e = resolve(d.path(), &["nope".into()]).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("not found"), "{e}");
    }
}
