//! The consumer's volume key: 32 bytes that encrypt a cell's persistent
//! data, held in memory only.
//!
//! A [`VolumeKey`] is zeroed on drop, never serialized, never printed (its
//! `Debug` says `VolumeKey(<redacted>)`). It reaches the host as a key file
//! (`cellhost run --volume-key-file`) or an API field, in any of three
//! spellings ([`VolumeKey::parse`]): 32 raw bytes, 64 hex digits, or
//! standard base64 of 32 bytes.
//!
//! LUKS takes a *passphrase*, and qemu insists its secrets be UTF-8, so the
//! passphrase given to every engine is [`VolumeKey::passphrase`]: the key
//! as 64 lowercase hex digits. It still carries the key's 256 bits, which
//! is why a minimal PBKDF (PBKDF2, 1000 iterations) is the right setting:
//! stretching defends low-entropy passwords, and this is not one.
//!
//! Consumers who hold a secret rather than a key use [`VolumeKey::derive`]:
//! HKDF-SHA256 (RFC 5869) with the cell id as salt and
//! `cellhost-volume-v1` as info, so one secret gives a different key per
//! cell and the derivation is a standard construction any client can
//! reproduce.

use base64::Engine as _;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::ids::CellId;

/// Key length in bytes (AES-256 keyslot passphrase material).
pub const VOLUME_KEY_LEN: usize = 32;

/// HKDF `info` for volume keys; bump the version to change derivations.
pub const HKDF_INFO: &[u8] = b"cellhost-volume-v1";

/// A 256-bit volume key. Zeroed on drop; no `Clone`, so copies are explicit
/// ([`VolumeKey::duplicate`]).
pub struct VolumeKey(Zeroizing<[u8; VOLUME_KEY_LEN]>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VolumeKeyError {
    #[error(
        "a volume key is 32 bytes: raw, 64 hex digits or base64; got {0} bytes that are none of these"
    )]
    Shape(usize),
    #[error("a volume key of all zero bytes is refused")]
    AllZero,
}

impl VolumeKey {
    pub fn from_bytes(bytes: [u8; VOLUME_KEY_LEN]) -> Result<VolumeKey, VolumeKeyError> {
        let k = VolumeKey(Zeroizing::new(bytes));
        if k.0.iter().all(|b| *b == 0) {
            return Err(VolumeKeyError::AllZero);
        }
        Ok(k)
    }

    /// A fresh random key from the kernel's CSPRNG (tests, benches, and
    /// operators who want the host to pick one).
    pub fn random() -> VolumeKey {
        let mut b = [0u8; VOLUME_KEY_LEN];
        crate::ids::fill_random(&mut b);
        let k = VolumeKey(Zeroizing::new(b));
        b.zeroize();
        k
    }

    /// Read a key from a file's or field's content: exactly 32 raw bytes,
    /// or 64 hex digits, or base64 of 32 bytes (text forms may end in one
    /// newline). The input is not kept.
    pub fn parse(input: &[u8]) -> Result<VolumeKey, VolumeKeyError> {
        if input.len() == VOLUME_KEY_LEN {
            let mut b = [0u8; VOLUME_KEY_LEN];
            b.copy_from_slice(input);
            let r = VolumeKey::from_bytes(b);
            b.zeroize();
            return r;
        }
        let text = input.strip_suffix(b"\n").unwrap_or(input);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let mut b = [0u8; VOLUME_KEY_LEN];
        let ok = if text.len() == 2 * VOLUME_KEY_LEN {
            hex::decode_to_slice(text, &mut b).is_ok()
        } else {
            let mut out = Zeroizing::new(Vec::with_capacity(48));
            base64::engine::general_purpose::STANDARD
                .decode_vec(text, &mut out)
                .is_ok()
                && out.len() == VOLUME_KEY_LEN
                && {
                    b.copy_from_slice(&out);
                    true
                }
        };
        let r = if ok {
            VolumeKey::from_bytes(b)
        } else {
            Err(VolumeKeyError::Shape(input.len()))
        };
        b.zeroize();
        r
    }

    /// HKDF-SHA256(ikm = `secret`, salt = cell id, info =
    /// `cellhost-volume-v1`) → 32 bytes.
    pub fn derive(secret: &[u8], cell: &CellId) -> VolumeKey {
        let hk = Hkdf::<Sha256>::new(Some(cell.as_str().as_bytes()), secret);
        let mut okm = Zeroizing::new([0u8; VOLUME_KEY_LEN]);
        hk.expand(HKDF_INFO, okm.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        VolumeKey(okm)
    }

    /// The LUKS passphrase for this key: 64 lowercase hex digits.
    pub fn passphrase(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(2 * VOLUME_KEY_LEN));
        for b in self.0.iter() {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }

    pub fn as_bytes(&self) -> &[u8; VOLUME_KEY_LEN] {
        &self.0
    }

    /// An explicit copy (the CLI keeps one for a later reopen).
    pub fn duplicate(&self) -> VolumeKey {
        VolumeKey(Zeroizing::new(*self.0))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hexs(k: &VolumeKey) -> String {
        k.passphrase().to_string()
    }

    #[test]
    fn hkdf_vectors() {
        // Computed independently (Python hmac/hashlib, RFC 5869 steps; the
        // same code reproduces RFC 5869 test case 1).
        let id = CellId::parse("0123456789ab").unwrap();
        assert_eq!(
            hexs(&VolumeKey::derive(b"correct horse battery staple", &id)),
            "340eb1f6d32042a420430c36e1eb8c5178b4b8f476fa01904f545b9d64e1b873"
        );
        let other = CellId::parse("ba9876543210").unwrap();
        assert_eq!(
            hexs(&VolumeKey::derive(b"correct horse battery staple", &other)),
            "f5b864b4044308f1828e4aba8718106022f1064bc9e25170d2a6046da923ab24"
        );
        let ikm: Vec<u8> = (0u8..32).collect();
        assert_eq!(
            hexs(&VolumeKey::derive(&ikm, &id)),
            "6a0208781a5f73c4108d1e0eb404b59d6fafcda439f594574aa7d48fa1f4894a"
        );
    }

    #[test]
    fn hkdf_crate_matches_rfc5869_case_1() {
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0u8..=0x0c).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        let mut okm = [0u8; 42];
        Hkdf::<Sha256>::new(Some(&salt), &ikm)
            .expand(&info, &mut okm)
            .unwrap();
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn parse_spellings() {
        let raw: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
        let want = hex::encode(raw);
        assert_eq!(hexs(&VolumeKey::parse(&raw).unwrap()), want);
        assert_eq!(hexs(&VolumeKey::parse(want.as_bytes()).unwrap()), want);
        let with_nl = format!("{want}\n");
        assert_eq!(hexs(&VolumeKey::parse(with_nl.as_bytes()).unwrap()), want);
        let upper = want.to_uppercase();
        assert_eq!(hexs(&VolumeKey::parse(upper.as_bytes()).unwrap()), want);
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        assert_eq!(hexs(&VolumeKey::parse(b64.as_bytes()).unwrap()), want);
    }

    #[test]
    fn parse_refuses_wrong_shapes() {
        for bad in [
            &b""[..],
            b"abc",
            &[1u8; 31],
            &[1u8; 33],
            &[b'g'; 64],
            b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n",
        ] {
            assert!(
                matches!(VolumeKey::parse(bad), Err(VolumeKeyError::Shape(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            VolumeKey::parse(&[0u8; 32]).unwrap_err(),
            VolumeKeyError::AllZero
        );
    }

    proptest::proptest! {
        /// Hostile input (it arrives in an API header): never a panic, and
        /// anything accepted is one of the three spellings of 32 bytes.
        #[test]
        fn parse_never_panics(input in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            if let Ok(k) = VolumeKey::parse(&input) {
                let t = input.strip_suffix(b"\n").unwrap_or(&input);
                let t = t.strip_suffix(b"\r").unwrap_or(t);
                proptest::prop_assert!(input.len() == 32 || t.len() == 64 || t.len() == 44);
                proptest::prop_assert!(k.as_bytes().iter().any(|b| *b != 0));
            }
        }

        #[test]
        fn hex_and_base64_round_trip(raw in proptest::array::uniform32(proptest::num::u8::ANY)) {
            proptest::prop_assume!(raw.iter().any(|b| *b != 0));
            let k = VolumeKey::from_bytes(raw).unwrap();
            let hex = k.passphrase();
            let from_hex = VolumeKey::parse(hex.as_bytes()).unwrap();
            proptest::prop_assert_eq!(from_hex.as_bytes(), &raw);
            let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
            let from_b64 = VolumeKey::parse(b64.as_bytes()).unwrap();
            proptest::prop_assert_eq!(from_b64.as_bytes(), &raw);
        }
    }

    #[test]
    fn debug_redacts_and_random_differs() {
        let a = VolumeKey::random();
        let b = VolumeKey::random();
        assert_ne!(a.as_bytes(), b.as_bytes());
        let d = format!("{a:?}");
        assert_eq!(d, "VolumeKey(<redacted>)");
        assert!(!d.contains(&hexs(&a)[..8]));
        assert_eq!(a.duplicate().as_bytes(), a.as_bytes());
    }
}
