//! Host ports cells publish, across every tier (migration 5).
//!
//! A cell's `spec.ports` are leased in one `BEGIN IMMEDIATE` transaction,
//! all or nothing, before anything of the cell is made: a port another
//! cell of this store publishes (whatever its tier: a bridged process
//! cell's DNAT, a container's docker-proxy, a vm's hostfwd) refuses the
//! whole lease. The ports go with the cell's row ([`Store::remove_with_event`])
//! or by [`Store::release_ports`] for a cell that never got one.

use cellhost_core::ids::CellId;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::{Store, StoreError};

/// A port another cell holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortTaken {
    /// Index of the port in the request.
    pub index: usize,
    pub protocol: String,
    pub port: u16,
    pub by: CellId,
}

impl Store {
    /// Lease `ports` (`(protocol, port)`) to `cell`, replacing what it
    /// held; `Ok(Err(..))` names the first one another cell holds, and
    /// then nothing is leased.
    pub fn lease_ports(
        &self,
        cell: &CellId,
        ports: &[(&str, u16)],
    ) -> Result<Result<(), PortTaken>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM host_ports WHERE cell_id = ?1",
            params![cell.as_str()],
        )?;
        for (index, (protocol, port)) in ports.iter().enumerate() {
            let by: Option<String> = tx
                .query_row(
                    "SELECT cell_id FROM host_ports WHERE protocol = ?1 AND port = ?2",
                    params![protocol, port],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(by) = by {
                let by = CellId::parse(&by).map_err(|e| StoreError::Invalid(e.to_string()))?;
                // Dropping the transaction leases nothing.
                return Ok(Err(PortTaken {
                    index,
                    protocol: protocol.to_string(),
                    port: *port,
                    by,
                }));
            }
            tx.execute(
                "INSERT INTO host_ports (protocol, port, cell_id) VALUES (?1, ?2, ?3)",
                params![protocol, port, cell.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(Ok(()))
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

    #[test]
    fn one_port_one_cell_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (a, b) = (CellId::random(), CellId::random());
        assert_eq!(
            s.lease_ports(&a, &[("tcp", 20000), ("udp", 20000)])
                .unwrap(),
            Ok(())
        );
        let taken = s
            .lease_ports(&b, &[("tcp", 20001), ("tcp", 20000)])
            .unwrap()
            .unwrap_err();
        assert_eq!((taken.index, taken.port, taken.by), (1, 20000, a.clone()));
        // b holds nothing, not even 20001.
        assert_eq!(s.lease_ports(&a, &[("tcp", 20001)]).unwrap(), Ok(()));
        assert_eq!(s.port_holders().unwrap(), vec![a.clone()]);
        assert_eq!(s.release_ports(&a).unwrap(), 1);
        assert_eq!(s.lease_ports(&b, &[("tcp", 20000)]).unwrap(), Ok(()));
    }
}
