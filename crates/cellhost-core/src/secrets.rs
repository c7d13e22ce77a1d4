//! Resolving `spec.secrets` on the host, at create time.
//!
//! Values come from a file (path relative to the document's directory), an
//! environment variable of the caller, or inline. They go straight into
//! [`SecretValue`]s (zeroed on drop); nothing here logs or stores them.
//!
//! [`write_tmpfs`] is how tiers deliver them: a private tmpfs per cell (so
//! values never reach a disk), one 0600 file per secret (0400 and owned by
//! the cell's own root when it runs under leased ids), which the tier
//! bind-mounts read-only at `/run/secrets`. The tier unmounts it at
//! destroy and checks the mount is gone.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use cellhost_spec::{CellSpec, SecretSource};
use zeroize::Zeroizing;

use crate::{BackendError, SecretValue};

/// Size of a cell's secrets tmpfs: [`MAX_SECRET_BYTES`] × a few.
const TMPFS_OPTIONS: &str = "mode=0700,size=4m";

/// Largest secret value accepted (1 MiB): secrets are tokens and keys, not
/// data sets, and they live in a tmpfs charged to the host.
pub const MAX_SECRET_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("spec.secrets.{name}.from.file: cannot read {path}: {source}")]
    File {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("spec.secrets.{name}.from.env: variable {var} is not set in the caller's environment")]
    EnvMissing { name: String, var: String },
    #[error("spec.secrets.{name}: value is larger than {MAX_SECRET_BYTES} bytes")]
    TooLarge { name: String },
}

/// Resolve every secret of `spec`. `base_dir` anchors relative file paths
/// (the directory of the document); `env` looks up the caller's variables.
pub fn resolve(
    spec: &CellSpec,
    base_dir: &Path,
    env: impl Fn(&str) -> Option<Vec<u8>>,
) -> Result<Vec<SecretValue>, SecretError> {
    let mut out = Vec::with_capacity(spec.secrets.len());
    for s in &spec.secrets {
        let value: Zeroizing<Vec<u8>> = match &s.from {
            SecretSource::File(p) => {
                let path = base_dir.join(p);
                let read = || -> std::io::Result<Zeroizing<Vec<u8>>> {
                    use std::io::Read;
                    let f = std::fs::File::open(&path)?;
                    let mut buf = Zeroizing::new(Vec::new());
                    f.take(MAX_SECRET_BYTES + 1).read_to_end(&mut buf)?;
                    Ok(buf)
                };
                read().map_err(|source| SecretError::File {
                    name: s.name.clone(),
                    path: path.display().to_string(),
                    source,
                })?
            }
            SecretSource::Env(var) => {
                Zeroizing::new(env(var).ok_or_else(|| SecretError::EnvMissing {
                    name: s.name.clone(),
                    var: var.clone(),
                })?)
            }
            SecretSource::Value(v) => Zeroizing::new(v.as_bytes().to_vec()),
        };
        if value.len() as u64 > MAX_SECRET_BYTES {
            return Err(SecretError::TooLarge {
                name: s.name.clone(),
            });
        }
        out.push(SecretValue {
            name: s.name.clone(),
            value,
        });
    }
    Ok(out)
}

/// The caller's environment as a lookup for [`resolve`].
pub fn process_env(var: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    std::env::var_os(var).map(|v| v.into_vec())
}

/// Mount a private tmpfs at `dir` (made 0700) and write each secret as a
/// 0600 file in it. The caller unmounts it at teardown.
pub fn write_tmpfs(
    dir: &Path,
    secrets: &[SecretValue],
    owner: Option<crate::UidRange>,
) -> Result<(), BackendError> {
    use nix::mount::{MsFlags, mount};
    let ctx = |what: &str, p: &Path| format!("{what} {}", p.display());
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| BackendError::io(ctx("creating", dir), e))?;
    // Owned by the cell's root when its tier runs it under leased ids (a
    // user namespace): readable by it and by nobody else on the host.
    let options = match owner {
        Some(r) => format!("mode=0500,uid={0},gid={0},size=4m", r.base),
        None => TMPFS_OPTIONS.to_string(),
    };
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    )
    .map_err(|e| BackendError::io(ctx("mounting the secrets tmpfs at", dir), e.into()))?;
    for s in secrets {
        let path = dir.join(&s.name);
        let mode = if owner.is_some() { 0o400 } else { 0o600 };
        let mut f = fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| BackendError::io(ctx("writing secret file", &path), e))?;
        if let Some(r) = owner {
            std::os::unix::fs::fchown(&f, Some(r.base), Some(r.base))
                .map_err(|e| BackendError::io(ctx("chown of secret file", &path), e))?;
        }
        f.write_all(&s.value)
            .map_err(|e| BackendError::io(ctx("writing secret file", &path), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellhost_spec::{Isolation, SecretRef};

    fn spec_with(secrets: Vec<SecretRef>) -> CellSpec {
        CellSpec {
            isolation: Isolation::Process,
            image: "host".into(),
            command: vec!["/bin/true".into()],
            working_dir: None,
            env: Default::default(),
            secrets,
            resources: Default::default(),
            ports: vec![],
            volume: None,
            network: Default::default(),
            lifetime: Default::default(),
        }
    }

    #[test]
    fn resolves_all_sources() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), b"from-file").unwrap();
        let spec = spec_with(vec![
            SecretRef {
                name: "a".into(),
                from: SecretSource::File("tok".into()),
            },
            SecretRef {
                name: "b".into(),
                from: SecretSource::Env("X".into()),
            },
            SecretRef {
                name: "c".into(),
                from: SecretSource::Value("inline".into()),
            },
        ]);
        let got = resolve(&spec, dir.path(), |v| {
            (v == "X").then(|| b"from-env".to_vec())
        })
        .unwrap();
        let vals: Vec<&[u8]> = got.iter().map(|s| s.value.as_slice()).collect();
        assert_eq!(vals, [&b"from-file"[..], b"from-env", b"inline"]);
    }

    #[test]
    fn errors_name_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_with(vec![SecretRef {
            name: "k".into(),
            from: SecretSource::Env("NOPE".into()),
        }]);
        let e = resolve(&spec, dir.path(), |_| None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("spec.secrets.k.from.env"), "{e}");
        let spec = spec_with(vec![SecretRef {
            name: "f".into(),
            from: SecretSource::File("missing".into()),
        }]);
        let e = resolve(&spec, dir.path(), |_| None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("spec.secrets.f.from.file"), "{e}");
    }

    #[test]
    fn oversized_secret_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("big"),
            vec![b'x'; MAX_SECRET_BYTES as usize + 1],
        )
        .unwrap();
        let spec = spec_with(vec![SecretRef {
            name: "big".into(),
            from: SecretSource::File("big".into()),
        }]);
        assert!(matches!(
            resolve(&spec, dir.path(), |_| None),
            Err(SecretError::TooLarge { .. })
        ));
    }
}
