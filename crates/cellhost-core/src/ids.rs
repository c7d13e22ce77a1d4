//! Cell ids.
//!
//! A cell id is 12 lowercase hex characters, random. Every host object
//! cellhost makes carries it (`cellhost-<id>`), so reconcile can find what a
//! crash left behind.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Length of a cell id in characters.
pub const CELL_ID_LEN: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CellId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid cell id {0:?}: must be {CELL_ID_LEN} lowercase hex characters")]
pub struct InvalidCellId(pub String);

impl CellId {
    /// A fresh random id from the kernel's CSPRNG.
    pub fn random() -> CellId {
        let mut bytes = [0u8; CELL_ID_LEN / 2];
        fill_random(&mut bytes);
        let mut s = String::with_capacity(CELL_ID_LEN);
        for b in bytes {
            s.push_str(&format!("{b:02x}"));
        }
        CellId(s)
    }

    pub fn parse(s: &str) -> Result<CellId, InvalidCellId> {
        if s.len() == CELL_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(CellId(s.to_string()))
        } else {
            Err(InvalidCellId(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name host objects of this cell carry: `cellhost-<id>`.
    pub fn object_name(&self) -> String {
        format!("cellhost-{}", self.0)
    }
}

impl fmt::Display for CellId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for CellId {
    type Error = InvalidCellId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        CellId::parse(&s)
    }
}

impl From<CellId> for String {
    fn from(id: CellId) -> String {
        id.0
    }
}

/// Fill `buf` from the kernel's CSPRNG (getrandom(2)); panics only if the kernel refuses.
pub fn fill_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`,
        // which is valid writable memory for the duration of the call.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// The tag of one backend instance: 8 hex digits of a hash of its
/// (absolute) state dir. Cgroups, containers and networks are host-global,
/// state dirs are not: two instances (a daemon and a test, two daemons on
/// two state dirs) must never take each other's cells for orphans. The
/// process tier groups cgroups by it, the container tier labels by it.
pub fn instance_tag(state_dir: &Path) -> String {
    let abs = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    // FNV-1a 64, folded to 32 bits: stable across builds and processes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in abs.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:08x}", (h ^ (h >> 32)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let a = CellId::random();
        let b = CellId::random();
        assert_ne!(a, b);
        assert_eq!(CellId::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.object_name(), format!("cellhost-{a}"));
    }

    #[test]
    fn parse_rejects_bad_ids() {
        for bad in [
            "",
            "ABCDEF012345",
            "abc",
            "0123456789abc",
            "../../etc/pa",
            "0123456789ag",
        ] {
            assert!(CellId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
