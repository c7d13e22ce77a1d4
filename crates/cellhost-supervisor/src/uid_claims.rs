//! Host-wide claims on uid ranges, beside each store's leases.
//!
//! A store's `uid_leases` keep two cells *of that store* apart. Several
//! stores may live on one host (a `cellhost run` with another state dir,
//! tests side by side), and the kernel has one uid space: so a range is
//! also claimed host-wide, by creating `<dir>/<base>` with `O_EXCL`
//! (default dir `/run/cellhost/uids`, 0700). The claim names its store and
//! cell. It is made before the store's lease is kept and removed after
//! the lease is gone; a claim another store holds makes the lease skip
//! that range.
//!
//! Idempotency: claiming a range this store and cell already hold
//! succeeds; releasing a missing or foreign claim does nothing.
//!
//! Concurrency: every change (claim, take-over, release) holds an
//! exclusive `flock` on `<dir>/.lock`, so a take-over never removes a
//! claim someone made a moment before.
//!
//! Staleness: a claim also names a path that exists while its holder does
//! (the store's database; a test's `/proc/<pid>`). A claim whose path is
//! gone and whose range no process runs as is stale: any store may take
//! it over, so a deleted state dir never holds ranges until reboot.
//!
//! Threat model: only root writes the dir. Claims live on a tmpfs (/run)
//! and go with a reboot, as every cell does.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cellhost_core::UidRange;
use cellhost_core::ids::CellId;

/// Default claims dir.
pub const CLAIMS_DIR: &str = "/run/cellhost/uids";

#[derive(Debug, Clone)]
pub struct UidClaims {
    dir: PathBuf,
    /// Names this store in claims (its state dir's instance tag).
    store: String,
    /// Exists while this holder does (see the module docs).
    alive: PathBuf,
}

/// What a claim file says.
fn content(store: &str, cell: &CellId, range: UidRange, alive: &Path) -> String {
    format!("{store} {cell} {} {}\n", range.size, alive.display())
}

impl UidClaims {
    /// Claims in `dir` for `store`, whose holder lives while `alive` exists.
    pub fn new(
        dir: impl Into<PathBuf>,
        store: impl Into<String>,
        alive: impl Into<PathBuf>,
    ) -> UidClaims {
        UidClaims {
            dir: dir.into(),
            store: store.into(),
            alive: alive.into(),
        }
    }

    fn path(&self, base: u32) -> PathBuf {
        self.dir.join(base.to_string())
    }

    /// The claims dir, made if missing, locked exclusively until the guard
    /// drops.
    fn lock(&self) -> io::Result<nix::fcntl::Flock<std::fs::File>> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join(".lock"))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e.into())
    }

    /// Claim `range` for `cell`: `Ok(true)` when it is ours now (made, or
    /// already ours), `Ok(false)` when someone else holds it.
    pub fn claim(&self, cell: &CellId, range: UidRange) -> io::Result<bool> {
        let _lock = self.lock()?;
        let want = content(&self.store, cell, range, &self.alive);
        let path = self.path(range.base);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(want.as_bytes())?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Ok(std::fs::read_to_string(&path).is_ok_and(|have| have == want))
            }
            Err(e) => Err(e),
        }
    }

    /// Claim for `cell` the first cell-sized slot of the `count` from
    /// `start` that nobody claims and no process runs as: how a holder
    /// without a store (a test, a bench) gets a range. Stale claims are
    /// swept first. `Ok(None)` when every slot is taken.
    pub fn claim_free(
        &self,
        cell: &CellId,
        start: u32,
        count: u32,
    ) -> io::Result<Option<UidRange>> {
        self.foreign();
        for slot in 0..count {
            let Some(base) = slot
                .checked_mul(UidRange::CELL_SIZE)
                .and_then(|o| start.checked_add(o))
            else {
                break;
            };
            let range = UidRange {
                base,
                size: UidRange::CELL_SIZE,
            };
            if crate::uids_free(range) && self.claim(cell, range)? {
                return Ok(Some(range));
            }
        }
        Ok(None)
    }

    /// Bases of ranges claimed by anyone but this store. Stale claims
    /// (see the module docs) are removed instead.
    pub fn foreign(&self) -> Vec<u32> {
        let _lock = self.lock();
        let mut out = Vec::new();
        for c in self.all() {
            if c.store == self.store {
                continue;
            }
            let range = UidRange {
                base: c.base,
                size: c.size,
            };
            let gone = c.alive.as_ref().is_some_and(|p| !p.exists());
            if gone && crate::uids_free(range) {
                let _ = std::fs::remove_file(self.path(c.base));
                continue;
            }
            out.push(c.base);
        }
        out
    }

    /// This store's claims: `(base, cell)`.
    pub fn ours(&self) -> Vec<(u32, CellId)> {
        self.all()
            .into_iter()
            .filter(|c| c.store == self.store)
            .filter_map(|c| Some((c.base, CellId::parse(&c.cell).ok()?)))
            .collect()
    }

    fn all(&self) -> Vec<Claim> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let Some(base) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // A claim being written is empty for a moment: foreign to all,
            // and never stale (it names no path yet).
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let mut words = text.split_whitespace();
            out.push(Claim {
                base,
                store: words.next().unwrap_or("").to_string(),
                cell: words.next().unwrap_or("").to_string(),
                size: words
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(UidRange::CELL_SIZE),
                alive: words.next().map(PathBuf::from),
            });
        }
        out
    }

    /// Give back `cell`'s claim on `range` (only if it is ours).
    pub fn release(&self, cell: &CellId, range: UidRange) {
        let _lock = self.lock();
        let path = self.path(range.base);
        if std::fs::read_to_string(&path)
            .is_ok_and(|have| have == content(&self.store, cell, range, &self.alive))
        {
            let _ = std::fs::remove_file(&path);
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// One claim file, read.
struct Claim {
    base: u32,
    store: String,
    cell: String,
    size: u32,
    alive: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_stores_never_hold_one_range() {
        let d = tempfile::tempdir().unwrap();
        let a = UidClaims::new(d.path().join("uids"), "store-a", d.path());
        let b = UidClaims::new(d.path().join("uids"), "store-b", d.path());
        let r = UidRange {
            base: 1 << 30,
            size: 65_536,
        };
        let (x, y) = (CellId::random(), CellId::random());
        assert!(a.claim(&x, r).unwrap());
        assert!(a.claim(&x, r).unwrap(), "idempotent for its holder");
        assert!(!a.claim(&y, r).unwrap(), "not for another cell");
        assert!(!b.claim(&y, r).unwrap(), "not for another store");
        assert_eq!(b.foreign(), vec![r.base]);
        assert!(a.foreign().is_empty());
        assert_eq!(a.ours(), vec![(r.base, x.clone())]);
        b.release(&y, r);
        assert_eq!(a.ours().len(), 1, "b cannot release a's claim");
        a.release(&x, r);
        assert!(a.ours().is_empty());
        assert!(b.claim(&y, r).unwrap());
    }

    #[test]
    fn a_claim_whose_holder_is_gone_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let gone = d.path().join("deleted-store");
        std::fs::create_dir(&gone).unwrap();
        let a = UidClaims::new(d.path().join("uids"), "store-a", &gone);
        let b = UidClaims::new(d.path().join("uids"), "store-b", d.path());
        // A range nothing runs as (far above any real one here).
        let r = UidRange {
            base: u32::MAX - 2 * 65_536,
            size: 65_536,
        };
        let x = CellId::random();
        assert!(a.claim(&x, r).unwrap());
        assert_eq!(b.foreign(), vec![r.base], "held while its store exists");
        std::fs::remove_dir(&gone).unwrap();
        assert!(b.foreign().is_empty(), "stale once it is gone");
        assert!(b.claim(&CellId::random(), r).unwrap());
    }
}
