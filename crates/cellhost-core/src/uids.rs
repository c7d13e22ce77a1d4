//! Host uid/gid ranges leased to cells.
//!
//! A process cell's user namespace maps its ids `0..size` onto the host ids
//! `base..base + size`; a VM cell's qemu runs as `base`. Ranges come from
//! the operator's subordinate range, one per live cell, leased in the state
//! store (never shared between live cells) and given back only after a
//! teardown found no process left running as any id of it
//! (`cellhost_host::uids::processes_in`).
//!
//! Threat model: the ids of a range belong to no host account, so a cell
//! root that escaped its namespaces would still be an unprivileged
//! stranger on the host: it owns no host file outside its own cell dirs
//! and can signal or ptrace no process but its own.

use serde::{Deserialize, Serialize};

/// A block of host uids and gids (the same numbers for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UidRange {
    /// The first host id: the cell's root.
    pub base: u32,
    /// How many ids (65 536 for a process cell: a full 16-bit id space).
    pub size: u32,
}

impl UidRange {
    /// The ids a full 16-bit user namespace needs.
    pub const CELL_SIZE: u32 = 65_536;

    /// Does host id `id` fall in the range?
    pub fn contains(&self, id: u32) -> bool {
        id >= self.base && u64::from(id) < u64::from(self.base) + u64::from(self.size)
    }

    /// The last host id of the range.
    pub fn last(&self) -> u32 {
        self.base.saturating_add(self.size.saturating_sub(1))
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.base, self.last())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_bounds() {
        let r = UidRange {
            base: 1_000_000,
            size: 65_536,
        };
        assert!(r.contains(1_000_000));
        assert!(r.contains(1_065_535));
        assert!(!r.contains(1_065_536));
        assert!(!r.contains(999_999));
        assert_eq!(r.to_string(), "1000000-1065535");
        let top = UidRange {
            base: u32::MAX - 1,
            size: 65_536,
        };
        assert!(top.contains(u32::MAX));
        assert_eq!(top.last(), u32::MAX);
    }
}
