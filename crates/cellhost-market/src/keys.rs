//! Key files: a Nostr secret key (the provider's identity, or a consumer's)
//! and the provider's wallet seed.
//!
//! # Layout on the host
//!
//! ```text
//! <state>/market/            0700
//!   nostr.key                0600  the provider's secret key, hex (nsec accepted)
//!   wallet.seed              0600  64 random bytes, hex: the wallet's seed
//!   wallet.sqlite            0600  the provider's proofs (cdk's wallet db)
//!   ledger.sqlite            0600  requests seen (see `ledger`)
//! ```
//!
//! # Lifecycle and idempotency
//!
//! Generated on first use with `O_CREAT|O_EXCL` and mode 0600 (so two
//! starts racing cannot both write one), read on every later start.
//!
//! # Threat model
//!
//! Whoever reads `nostr.key` can answer as this provider; whoever reads
//! `wallet.seed` and the wallet db can spend what it earned. A file that
//! group or others can read is refused, not silently used. Keys never go
//! to argv or logs; `Debug` of the seed is redacted.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use nostr_sdk::{Keys, SecretKey, ToBech32};
use zeroize::Zeroizing;

use crate::MarketError;

/// Create `dir` 0700 (and its parents) if missing.
pub fn private_dir(dir: &Path) -> Result<(), MarketError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| MarketError::Io {
            what: format!("creating {}", dir.display()),
            source: e,
        })
}

/// Read a private file's text, refusing one others can read. `None` when
/// it does not exist.
fn read_private(path: &Path) -> Result<Option<Zeroizing<String>>, MarketError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(MarketError::Io {
                what: format!("reading {}", path.display()),
                source: e,
            });
        }
    };
    if meta.mode() & 0o077 != 0 {
        return Err(MarketError::Permissions {
            path: path.display().to_string(),
            mode: meta.mode() & 0o7777,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| MarketError::Io {
        what: format!("reading {}", path.display()),
        source: e,
    })?;
    Ok(Some(Zeroizing::new(text)))
}

/// Write a new private file; fails if one appeared meanwhile.
fn write_new_private(path: &Path, text: &str) -> Result<(), MarketError> {
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    let io = |e| MarketError::Io {
        what: format!("writing {}", path.display()),
        source: e,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The Nostr keys in `path`, generated there on first use.
pub fn nostr_keys(path: &Path) -> Result<Keys, MarketError> {
    if let Some(text) = read_private(path)? {
        let sk = SecretKey::parse(text.trim()).map_err(|_| MarketError::BadKeyFile {
            path: path.display().to_string(),
            message: "expected a secret key as 64 hex digits or nsec1…".into(),
        })?;
        return Ok(Keys::new(sk));
    }
    let keys = Keys::generate();
    let text = Zeroizing::new(format!("{}\n", keys.secret_key().to_secret_hex()));
    match write_new_private(path, &text) {
        Ok(()) => Ok(keys),
        // Another start won the race: use its key.
        Err(MarketError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::AlreadyExists =>
        {
            nostr_keys(path)
        }
        Err(e) => Err(e),
    }
}

/// The wallet seed in `path`, generated there on first use.
pub fn wallet_seed(path: &Path) -> Result<Zeroizing<[u8; 64]>, MarketError> {
    let bad = || MarketError::BadKeyFile {
        path: path.display().to_string(),
        message: "expected 128 hex digits".into(),
    };
    if let Some(text) = read_private(path)? {
        let hex = text.trim();
        if hex.len() != 128 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut seed = Zeroizing::new([0u8; 64]);
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        return Ok(seed);
    }
    let mut seed = Zeroizing::new([0u8; 64]);
    cellhost_core::ids::fill_random(&mut seed[..]);
    let mut text = Zeroizing::new(String::with_capacity(129));
    for b in seed.iter() {
        text.push_str(&format!("{b:02x}"));
    }
    text.push('\n');
    match write_new_private(path, &text) {
        Ok(()) => Ok(seed),
        Err(MarketError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::AlreadyExists =>
        {
            wallet_seed(path)
        }
        Err(e) => Err(e),
    }
}

/// `npub1…` of a public key.
pub fn npub(pk: &nostr_sdk::PublicKey) -> String {
    pk.to_bech32().unwrap_or_else(|_| pk.to_hex())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_generated_once_0600_and_reused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m/nostr.key");
        let a = nostr_keys(&p).unwrap();
        let b = nostr_keys(&p).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::metadata(p.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        let s = d.path().join("m/wallet.seed");
        let s1 = wallet_seed(&s).unwrap();
        assert_eq!(*s1, *wallet_seed(&s).unwrap());
        assert_ne!(*s1, [0u8; 64]);
    }

    #[test]
    fn readable_or_garbled_key_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nostr.key");
        nostr_keys(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            nostr_keys(&p),
            Err(MarketError::Permissions { mode: 0o644, .. })
        ));
        std::fs::write(&p, "not a key\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = nostr_keys(&p).unwrap_err().to_string();
        assert!(e.contains("nostr.key") && !e.contains("not a key"), "{e}");
        let s = d.path().join("wallet.seed");
        std::fs::write(&s, "abcd\n").unwrap();
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            wallet_seed(&s),
            Err(MarketError::BadKeyFile { .. })
        ));
    }
}
