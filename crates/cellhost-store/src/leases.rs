//! Address leases for bridged cells (migration 3; its port table went in
//! migration 6, host ports are `host_ports`).
//!
//! The supervisor takes a lease before create, in one `BEGIN IMMEDIATE`
//! transaction: the lowest free address of the pool's range. Taking a
//! lease for a cell that has one returns the same address; releasing is
//! idempotent, and a cell's row removal releases it too. Several processes
//! may share the file: SQLite's write lock serialises them, so two cells
//! never get one address.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use cellhost_core::ids::CellId;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::{Store, StoreError};

/// One cell's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub cell: CellId,
    pub pool: String,
    /// The tier that took it (each lists only its own cells).
    pub owner: String,
    pub address: Ipv4Addr,
}

/// What [`Store::lease_address`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// `fresh`: leased just now (the cell held none, so none of its
    /// objects can exist yet); otherwise the address it already held.
    Leased { address: Ipv4Addr, fresh: bool },
    /// Every address of the range is leased.
    PoolExhausted,
}

impl Store {
    /// Lease `cell` the lowest free address of `range` in `pool`. A cell
    /// that already holds a lease in `pool` gets the same address back.
    pub fn lease_address(
        &self,
        cell: &CellId,
        pool: &str,
        owner: &str,
        range: RangeInclusive<Ipv4Addr>,
    ) -> Result<LeaseOutcome, StoreError> {
        let now = (self.clock)();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let held: Option<(String, i64)> = tx
            .query_row(
                "SELECT pool, address FROM net_leases WHERE cell_id = ?1",
                params![cell.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let fresh = held.is_none();
        let address = match held {
            Some((p, a)) if p == pool => a,
            Some((p, _)) => {
                return Err(StoreError::Invalid(format!(
                    "cell {cell} already holds an address in pool {p:?}, not {pool:?}"
                )));
            }
            None => {
                let (first, last) = (
                    i64::from(u32::from(*range.start())),
                    i64::from(u32::from(*range.end())),
                );
                let mut stmt = tx.prepare(
                    "SELECT address FROM net_leases
                     WHERE pool = ?1 AND address BETWEEN ?2 AND ?3 ORDER BY address",
                )?;
                let taken = stmt
                    .query_map(params![pool, first, last], |r| r.get::<_, i64>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                drop(stmt);
                // The first gap in the sorted list of taken addresses.
                let mut next = first;
                for a in taken {
                    if a != next {
                        break;
                    }
                    next += 1;
                }
                if next > last {
                    return Ok(LeaseOutcome::PoolExhausted);
                }
                tx.execute(
                    "INSERT INTO net_leases (cell_id, pool, owner, address, leased_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![cell.as_str(), pool, owner, next, now],
                )?;
                next
            }
        };
        tx.commit()?;
        Ok(LeaseOutcome::Leased {
            address: to_addr(address)?,
            fresh,
        })
    }

    /// Give back `cell`'s address. `Ok(false)` if it held none.
    pub fn release_lease(&self, cell: &CellId) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM net_leases WHERE cell_id = ?1",
            params![cell.as_str()],
        )?;
        Ok(n > 0)
    }

    /// `cell`'s lease, if it holds one (in any pool).
    pub fn lease_of(&self, cell: &CellId) -> Result<Option<Lease>, StoreError> {
        let conn = self.conn();
        let row: Option<(String, String, i64)> = conn
            .query_row(
                "SELECT pool, owner, address FROM net_leases WHERE cell_id = ?1",
                params![cell.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((pool, owner, address)) = row else {
            return Ok(None);
        };
        Ok(Some(Lease {
            cell: cell.clone(),
            pool,
            owner,
            address: to_addr(address)?,
        }))
    }

    /// Every lease, by pool and address.
    pub fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT cell_id, pool, owner, address FROM net_leases ORDER BY pool, address",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, pool, owner, address)| {
                Ok(Lease {
                    cell: CellId::parse(&id).map_err(|e| StoreError::Invalid(e.to_string()))?,
                    pool,
                    owner,
                    address: to_addr(address)?,
                })
            })
            .collect()
    }
}

fn to_addr(a: i64) -> Result<Ipv4Addr, StoreError> {
    u32::try_from(a)
        .map(Ipv4Addr::from)
        .map_err(|_| StoreError::Invalid(format!("net_leases: address {a} is not IPv4")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        (dir, s)
    }

    fn range(a: [u8; 4], b: [u8; 4]) -> RangeInclusive<Ipv4Addr> {
        Ipv4Addr::from(a)..=Ipv4Addr::from(b)
    }

    #[test]
    fn lowest_free_address_reused_after_release_and_same_for_a_retry() {
        let (_d, s) = store();
        let r = || range([10, 0, 0, 2], [10, 0, 0, 4]);
        let ids: Vec<CellId> = (0..4).map(|_| CellId::random()).collect();
        let lease = |i: usize| match s.lease_address(&ids[i], "br0", "process", r()).unwrap() {
            LeaseOutcome::Leased { address, .. } => Some(address),
            _ => None,
        };
        assert_eq!(lease(0), Some([10, 0, 0, 2].into()));
        assert_eq!(lease(1), Some([10, 0, 0, 3].into()));
        assert_eq!(lease(1), Some([10, 0, 0, 3].into()));
        assert_eq!(lease(2), Some([10, 0, 0, 4].into()));
        assert_eq!(lease(3), None);
        assert_eq!(
            s.lease_address(&ids[3], "br0", "process", r()).unwrap(),
            LeaseOutcome::PoolExhausted
        );
        // A retry is the same address, and not fresh.
        assert_eq!(
            s.lease_address(&ids[1], "br0", "process", r()).unwrap(),
            LeaseOutcome::Leased {
                address: [10, 0, 0, 3].into(),
                fresh: false
            }
        );
        assert_eq!(
            s.lease_of(&ids[0]).unwrap().map(|l| l.address),
            Some([10, 0, 0, 2].into())
        );
        assert!(s.release_lease(&ids[0]).unwrap());
        assert!(!s.release_lease(&ids[0]).unwrap());
        assert_eq!(s.lease_of(&ids[0]).unwrap(), None);
        assert_eq!(lease(3), Some([10, 0, 0, 2].into()));
        // Another pool is another address space.
        let other = CellId::random();
        assert_eq!(
            s.lease_address(&other, "br1", "process", r()).unwrap(),
            LeaseOutcome::Leased {
                address: [10, 0, 0, 2].into(),
                fresh: true
            }
        );
        assert!(matches!(
            s.lease_address(&other, "br0", "process", r()),
            Err(StoreError::Invalid(m)) if m.contains("br1")
        ));
    }

    #[test]
    fn two_handles_never_hand_out_one_address() {
        let (d, s) = store();
        let s2 = Store::open(d.path()).unwrap();
        let r = || range([10, 0, 0, 2], [10, 0, 0, 250]);
        let got = std::thread::scope(|sc| {
            let t = move |s: &Store| {
                (0..40)
                    .map(
                        |_| match s.lease_address(&CellId::random(), "p", "process", r()) {
                            Ok(LeaseOutcome::Leased { address, .. }) => address,
                            other => panic!("{other:?}"),
                        },
                    )
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
