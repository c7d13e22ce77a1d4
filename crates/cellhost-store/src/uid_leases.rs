//! Host uid ranges leased to cells (migration 4).
//!
//! The operator's subordinate range is cut into slots of one cell's size;
//! a lease is the lowest free slot, taken in one `BEGIN IMMEDIATE`
//! transaction, so two cells (of any process sharing the file) never get
//! one range. Leasing for a cell that holds one returns the same range (a
//! retried create). A lease goes away with its cell's row
//! ([`Store::remove_with_event`], after a clean teardown that checked no
//! process still runs as the range) or by [`Store::release_uids`] for a
//! lease whose cell never got a row.

use cellhost_core::UidRange;
use cellhost_core::ids::CellId;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::{Store, StoreError};

/// The operator's subordinate range: `count` slots of `size` ids from
/// `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidPool {
    pub start: u32,
    pub size: u32,
    pub count: u32,
}

impl UidPool {
    /// The range of slot `i`, if the pool has it.
    pub fn slot(&self, i: u32) -> Option<UidRange> {
        if i >= self.count {
            return None;
        }
        let base = u64::from(self.start) + u64::from(i) * u64::from(self.size);
        let end = base + u64::from(self.size);
        (end <= u64::from(u32::MAX)).then_some(UidRange {
            base: base as u32,
            size: self.size,
        })
    }
}

/// One cell's uid lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidLease {
    pub cell: CellId,
    pub range: UidRange,
}

impl Store {
    /// Lease `cell` the lowest free slot of `pool`; the same range again if
    /// it holds one. `Ok(None)` when every slot is taken.
    pub fn lease_uids(&self, cell: &CellId, pool: UidPool) -> Result<Option<UidRange>, StoreError> {
        let now = (self.clock)();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let held: Option<(i64, i64)> = tx
            .query_row(
                "SELECT base, size FROM uid_leases WHERE cell_id = ?1",
                params![cell.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((base, size)) = held {
            return Ok(Some(to_range(base, size)?));
        }
        let first = i64::from(pool.start);
        let mut stmt = tx.prepare("SELECT base FROM uid_leases WHERE base >= ?1 ORDER BY base")?;
        let taken = stmt
            .query_map(params![first], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        let mut slot = 0u32;
        let mut chosen = None;
        let mut taken = taken.into_iter().peekable();
        while let Some(range) = pool.slot(slot) {
            // Skip leases below this slot (a pool of another slot size).
            while taken.next_if(|b| *b < i64::from(range.base)).is_some() {}
            if taken.peek() != Some(&i64::from(range.base)) {
                chosen = Some(range);
                break;
            }
            slot += 1;
        }
        let Some(range) = chosen else {
            return Ok(None);
        };
        tx.execute(
            "INSERT INTO uid_leases (cell_id, base, size, leased_at) VALUES (?1, ?2, ?3, ?4)",
            params![cell.as_str(), range.base, range.size, now],
        )?;
        tx.commit()?;
        Ok(Some(range))
    }

    /// `cell`'s uid lease, if it holds one.
    pub fn uid_lease_of(&self, cell: &CellId) -> Result<Option<UidRange>, StoreError> {
        let row: Option<(i64, i64)> = self
            .conn()
            .query_row(
                "SELECT base, size FROM uid_leases WHERE cell_id = ?1",
                params![cell.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(b, s)| to_range(b, s)).transpose()
    }

    /// Every uid lease, by base.
    pub fn uid_leases(&self) -> Result<Vec<UidLease>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT cell_id, base, size FROM uid_leases ORDER BY base")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, b, s)| {
                Ok(UidLease {
                    cell: CellId::parse(&id).map_err(|e| StoreError::Invalid(e.to_string()))?,
                    range: to_range(b, s)?,
                })
            })
            .collect()
    }

    /// Give back `cell`'s range. Only for a cell that has no row (a create
    /// that failed before its row was written, or a lease reconcile found
    /// orphaned): a cell's row takes its lease with it when it is removed.
    /// `Ok(false)` if it held none.
    pub fn release_uids(&self, cell: &CellId) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM uid_leases WHERE cell_id = ?1",
            params![cell.as_str()],
        )?;
        Ok(n > 0)
    }
}

fn to_range(base: i64, size: i64) -> Result<UidRange, StoreError> {
    match (u32::try_from(base), u32::try_from(size)) {
        (Ok(base), Ok(size)) => Ok(UidRange { base, size }),
        _ => Err(StoreError::Invalid(format!(
            "uid_leases: range {base}+{size} is not 32-bit"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        (dir, s)
    }

    const POOL: UidPool = UidPool {
        start: 1_000_000,
        size: 65_536,
        count: 3,
    };

    #[test]
    fn lowest_free_slot_same_for_a_retry_and_exhaustion() {
        let (_d, s) = store();
        let ids: Vec<CellId> = (0..4).map(|_| CellId::random()).collect();
        let base = |i: usize| s.lease_uids(&ids[i], POOL).unwrap().map(|r| r.base);
        assert_eq!(base(0), Some(1_000_000));
        assert_eq!(base(1), Some(1_065_536));
        assert_eq!(base(1), Some(1_065_536), "a retry gets the same range");
        assert_eq!(base(2), Some(1_131_072));
        assert_eq!(base(3), None, "three slots");
        assert!(s.release_uids(&ids[1]).unwrap());
        assert!(!s.release_uids(&ids[1]).unwrap());
        assert_eq!(base(3), Some(1_065_536), "the freed slot is reused");
        assert_eq!(
            s.uid_lease_of(&ids[3]).unwrap(),
            Some(UidRange {
                base: 1_065_536,
                size: 65_536
            })
        );
        assert_eq!(s.uid_leases().unwrap().len(), 3);
    }

    #[test]
    fn a_slot_past_u32_is_never_offered() {
        let pool = UidPool {
            start: u32::MAX - 65_536 * 2 + 1,
            size: 65_536,
            count: 10,
        };
        assert!(pool.slot(0).is_some());
        assert!(pool.slot(1).is_none());
    }

    #[test]
    fn two_handles_never_hand_out_one_range() {
        let (d, s) = store();
        let s2 = Store::open(d.path()).unwrap();
        let pool = UidPool { count: 100, ..POOL };
        let got = std::thread::scope(|sc| {
            let t = move |s: &Store| {
                (0..40)
                    .map(|_| s.lease_uids(&CellId::random(), pool).unwrap().unwrap().base)
                    .collect::<Vec<_>>()
            };
            let h1 = sc.spawn(move || t(&s));
            let h2 = sc.spawn(move || t(&s2));
            let mut all = h1.join().unwrap();
            all.extend(h2.join().unwrap());
            all
        });
        let mut uniq = got.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), got.len());
    }
}
