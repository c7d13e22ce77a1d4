//! Host ports cells publish, across every tier (migration 5): the one
//! allocator of host ports.
//!
//! A cell's `spec.ports` are leased in one `BEGIN IMMEDIATE` transaction,
//! all or nothing, before anything of the cell is made. A port the
//! document names is the cell's unless another cell of this store
//! publishes it (whatever its tier: a bridged process cell's DNAT, a
//! container's docker-proxy, a vm's hostfwd) or the caller's check finds a
//! host service on it; port 0 gets the lowest port of the given range that
//! no cell holds, the request does not name, and the check finds free. The ports go with the cell's row
//! ([`Store::remove_with_event`]) or by [`Store::release_ports`] for a cell
//! that never got one.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;

use cellhost_core::ids::CellId;
use rusqlite::{TransactionBehavior, params};

use crate::{Store, StoreError};

/// Why [`Store::lease_ports`] leased nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRefusal {
    /// The port at `index` of the request is another cell's.
    Taken {
        index: usize,
        protocol: String,
        port: u16,
        by: CellId,
    },
    /// The port at `index` is one a host service binds now.
    InUse {
        index: usize,
        protocol: String,
        port: u16,
    },
    /// No port of the range is free for the request's `index` (port 0).
    Exhausted {
        index: usize,
        protocol: String,
        range: RangeInclusive<u16>,
    },
}

impl Store {
    /// Lease `ports` (`(protocol, port)`, port 0 for any port of `range`
    /// that no cell holds and `free` accepts) to `cell`, replacing what it
    /// held, and return the ports leased in request order. On a refusal
    /// nothing is leased.
    pub fn lease_ports(
        &self,
        cell: &CellId,
        ports: &[(&str, u16)],
        range: RangeInclusive<u16>,
        free: &dyn Fn(&str, u16) -> bool,
    ) -> Result<Result<Vec<u16>, PortRefusal>, StoreError> {
        self.ports_tx(cell, ports, range, free, true)
    }

    /// What [`Store::lease_ports`] would lease a new cell now, leasing
    /// nothing (a check before money is taken).
    pub fn fit_ports(
        &self,
        ports: &[(&str, u16)],
        range: RangeInclusive<u16>,
        free: &dyn Fn(&str, u16) -> bool,
    ) -> Result<Result<Vec<u16>, PortRefusal>, StoreError> {
        self.ports_tx(&CellId::random(), ports, range, free, false)
    }

    fn ports_tx(
        &self,
        cell: &CellId,
        ports: &[(&str, u16)],
        range: RangeInclusive<u16>,
        free: &dyn Fn(&str, u16) -> bool,
        commit: bool,
    ) -> Result<Result<Vec<u16>, PortRefusal>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM host_ports WHERE cell_id = ?1",
            params![cell.as_str()],
        )?;
        // Every held port of each protocol asked for, read once: a request
        // of many ports costs one query per protocol, not one per candidate.
        let mut held: HashMap<&str, HashSet<u16>> = HashMap::new();
        for (protocol, _) in ports {
            if held.contains_key(protocol) {
                continue;
            }
            let mut stmt = tx.prepare("SELECT port FROM host_ports WHERE protocol = ?1")?;
            let taken = stmt
                .query_map(params![protocol], |r| r.get::<_, u16>(0))?
                .collect::<Result<HashSet<_>, _>>()?;
            held.insert(protocol, taken);
        }
        let mut leased = vec![0u16; ports.len()];
        // Named ports first, so a port 0 never takes one the same request
        // names; then each port 0 from where the last one stopped.
        for (index, (protocol, port)) in ports.iter().enumerate() {
            if *port == 0 {
                continue;
            }
            let taken = held.entry(protocol).or_default();
            if taken.contains(port) {
                let by: String = tx.query_row(
                    "SELECT cell_id FROM host_ports WHERE protocol = ?1 AND port = ?2",
                    params![protocol, port],
                    |r| r.get(0),
                )?;
                let by = CellId::parse(&by).map_err(|e| StoreError::Invalid(e.to_string()))?;
                // Dropping the transaction leases nothing.
                return Ok(Err(PortRefusal::Taken {
                    index,
                    protocol: protocol.to_string(),
                    port: *port,
                    by,
                }));
            }
            if !free(protocol, *port) {
                return Ok(Err(PortRefusal::InUse {
                    index,
                    protocol: protocol.to_string(),
                    port: *port,
                }));
            }
            taken.insert(*port);
            leased[index] = *port;
        }
        let mut next: HashMap<&str, u16> = HashMap::new();
        for (index, (protocol, port)) in ports.iter().enumerate() {
            if *port != 0 {
                continue;
            }
            let taken = held.entry(protocol).or_default();
            let from = next.get(protocol).copied().unwrap_or(*range.start());
            let Some(p) = (from..=*range.end()).find(|c| !taken.contains(c) && free(protocol, *c))
            else {
                return Ok(Err(PortRefusal::Exhausted {
                    index,
                    protocol: protocol.to_string(),
                    range,
                }));
            };
            taken.insert(p);
            next.insert(protocol, p.saturating_add(1));
            leased[index] = p;
        }
        for ((protocol, _), port) in ports.iter().zip(&leased) {
            tx.execute(
                "INSERT INTO host_ports (protocol, port, cell_id) VALUES (?1, ?2, ?3)",
                params![protocol, port, cell.as_str()],
            )?;
        }
        if commit {
            tx.commit()?;
        }
        Ok(Ok(leased))
    }

    /// Give back `cell`'s ports (a cell that never got a row).
    pub fn release_ports(&self, cell: &CellId) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM host_ports WHERE cell_id = ?1",
            params![cell.as_str()],
        )?)
    }

    /// Cells holding host ports, each once.
    pub fn port_holders(&self) -> Result<Vec<CellId>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT DISTINCT cell_id FROM host_ports")?;
        let ids = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        ids.into_iter()
            .map(|id| CellId::parse(&id).map_err(|e| StoreError::Invalid(e.to_string())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY: RangeInclusive<u16> = 20000..=20003;

    fn lease(s: &Store, c: &CellId, p: &[(&str, u16)]) -> Result<Vec<u16>, PortRefusal> {
        s.lease_ports(c, p, ANY, &|_, _| true).unwrap()
    }

    #[test]
    fn one_port_one_cell_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (a, b) = (CellId::random(), CellId::random());
        assert_eq!(
            lease(&s, &a, &[("tcp", 20000), ("udp", 20000)]),
            Ok(vec![20000, 20000])
        );
        let taken = lease(&s, &b, &[("tcp", 20001), ("tcp", 20000)]).unwrap_err();
        assert_eq!(
            taken,
            PortRefusal::Taken {
                index: 1,
                protocol: "tcp".into(),
                port: 20000,
                by: a.clone()
            }
        );
        // b holds nothing, not even 20001.
        assert_eq!(lease(&s, &a, &[("tcp", 20001)]), Ok(vec![20001]));
        assert_eq!(s.port_holders().unwrap(), vec![a.clone()]);
        assert_eq!(s.release_ports(&a).unwrap(), 1);
        assert_eq!(lease(&s, &b, &[("tcp", 20000)]), Ok(vec![20000]));
    }

    #[test]
    fn port_zero_gets_the_lowest_free_port_of_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let ids: Vec<CellId> = (0..4).map(|_| CellId::random()).collect();
        // Named ports and other cells' ports are skipped; udp is its own space.
        assert_eq!(
            lease(&s, &ids[0], &[("tcp", 20001), ("tcp", 0), ("udp", 0)]),
            Ok(vec![20001, 20000, 20000])
        );
        assert_eq!(
            lease(&s, &ids[1], &[("tcp", 0), ("tcp", 0)]),
            Ok(vec![20002, 20003])
        );
        // The range is full for tcp: nothing is leased, not even udp.
        assert_eq!(
            lease(&s, &ids[2], &[("udp", 0), ("tcp", 0)]),
            Err(PortRefusal::Exhausted {
                index: 1,
                protocol: "tcp".into(),
                range: ANY
            })
        );
        assert_eq!(lease(&s, &ids[3], &[("udp", 0)]), Ok(vec![20001]));
        // A fit leases nothing.
        let fit = |p: &[(&str, u16)]| s.fit_ports(p, ANY, &|_, _| true).unwrap();
        assert_eq!(fit(&[("udp", 0)]), Ok(vec![20002]));
        assert_eq!(fit(&[("udp", 0)]), Ok(vec![20002]));
        // What the host check refuses is skipped (a port a host service binds).
        s.release_ports(&ids[1]).unwrap();
        let got = s
            .lease_ports(&ids[2], &[("tcp", 0)], ANY, &|_, p| p != 20002)
            .unwrap();
        assert_eq!(got, Ok(vec![20003]));
        // A port 0 never takes a port the same request names.
        let (x, y) = (CellId::random(), CellId::random());
        for c in &ids {
            s.release_ports(c).unwrap();
        }
        assert_eq!(
            lease(&s, &x, &[("udp", 0), ("udp", 20000)]),
            Ok(vec![20001, 20000])
        );
        // A named port a host service binds is refused.
        let busy = s
            .lease_ports(&y, &[("tcp", 20001)], ANY, &|_, p| p != 20001)
            .unwrap();
        assert_eq!(
            busy,
            Err(PortRefusal::InUse {
                index: 0,
                protocol: "tcp".into(),
                port: 20001
            })
        );
    }

    #[test]
    fn two_handles_never_hand_out_one_port() {
        let dir = tempfile::tempdir().unwrap();
        let (s1, s2) = (
            Store::open(dir.path()).unwrap(),
            Store::open(dir.path()).unwrap(),
        );
        let got = std::thread::scope(|sc| {
            let t = |s: Store| {
                sc.spawn(move || {
                    (0..30)
                        .map(|_| {
                            s.lease_ports(
                                &CellId::random(),
                                &[("tcp", 0)],
                                30000..=30100,
                                &|_, _| true,
                            )
                            .unwrap()
                            .unwrap()[0]
                        })
                        .collect::<Vec<_>>()
                })
            };
            let (h1, h2) = (t(s1), t(s2));
            let mut all = h1.join().unwrap();
            all.extend(h2.join().unwrap());
            all
        });
        let mut uniq = got.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), got.len());
    }
}
