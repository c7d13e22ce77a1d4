//! Erasing a LUKS container's keyslots before the file is deleted.
//!
//! Deleting a file frees its blocks but does not overwrite them; whoever
//! images the disk later could find the header and, with the key, the data.
//! Overwriting the header and keyslot area first makes the master key
//! unrecoverable: the ciphertext left in freed blocks is then noise to
//! everybody, the consumer included. [`ERASE_BYTES`] covers the LUKS1
//! (2 MiB with a 512-bit key) and default LUKS2 (16 MiB) header and keyslot
//! areas of the containers cellhost formats. Idempotent: a missing file is
//! nothing to erase.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Bytes overwritten at the start of the container.
pub const ERASE_BYTES: u64 = 16 << 20;

const CHUNK: usize = 1 << 20;

/// Overwrite the header area with zeros, fsync, and read it back. Returns
/// true when something non-zero is still there (the erase did not take).
pub fn erase_header(disk: &Path) -> io::Result<bool> {
    let mut f = match fs::OpenOptions::new().read(true).write(true).open(disk) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let n = f.metadata()?.len().min(ERASE_BYTES);
    let zeros = vec![0u8; CHUNK];
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        f.write_all(&zeros[..k])?;
        left -= k as u64;
    }
    f.sync_all()?;
    f.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; CHUNK];
    let mut read = 0u64;
    while read < n {
        let k = (n - read).min(CHUNK as u64) as usize;
        f.read_exact(&mut buf[..k])?;
        if buf[..k].iter().any(|b| *b != 0) {
            return Ok(true);
        }
        read += k as u64;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erases_the_header_area_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let mut data = vec![0xAAu8; (ERASE_BYTES + 4096) as usize];
        data[..6].copy_from_slice(b"LUKS\xba\xbe");
        fs::write(&p, &data).unwrap();
        assert!(!erase_header(&p).unwrap());
        let after = fs::read(&p).unwrap();
        assert!(after[..ERASE_BYTES as usize].iter().all(|b| *b == 0));
        assert!(after[ERASE_BYTES as usize..].iter().all(|b| *b == 0xAA));
        // small file, missing file
        fs::write(&p, b"LUKS\xba\xbe rest").unwrap();
        assert!(!erase_header(&p).unwrap());
        assert_eq!(fs::read(&p).unwrap(), vec![0u8; 11]);
        assert!(!erase_header(&dir.path().join("none")).unwrap());
    }
}
