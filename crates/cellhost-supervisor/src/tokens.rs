//! Bearer tokens for the TCP listener.
//!
//! # File format (`--tokens FILE`)
//!
//! ```text
//! # owner      token (>= 16 characters; e.g. `openssl rand -hex 32`)
//! alice        3f9c...e1
//! operator     9a1b...77        # the owner `operator` manages every cell
//! ```
//!
//! One `owner token` pair a line, `#` starts a comment. Owners are
//! `[A-Za-z0-9._@:-]{1,128}` (a name, an email, a Nostr npub/hex key).
//!
//! # Threat model
//!
//! The file holds secrets: it must be a regular file not readable or
//! writable by group or others (like ssh's key files), or loading refuses
//! it. In memory only SHA-256 digests are kept; a request's token is hashed
//! and looked up, so comparison time does not depend on how many leading
//! characters of a real token were guessed. Tokens never reach logs: errors
//! name the line number, never its content.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: mode {mode:o} lets group or others read it; chmod 600 it")]
    Permissions { path: String, mode: u32 },
    #[error("{path}:{line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: no tokens")]
    Empty { path: String },
}

/// Token digests → owner.
#[derive(Clone, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens(<{} redacted>)", self.by_digest.len())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub fn valid_owner(owner: &str) -> bool {
    (1..=128).contains(&owner.len())
        && owner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@:-".contains(c))
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, TokenError> {
        let shown = path.display().to_string();
        let io = |source| TokenError::Io {
            path: shown.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.mode() & 0o077 != 0 {
            return Err(TokenError::Permissions {
                path: shown,
                mode: meta.mode() & 0o7777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let t = Tokens::parse(&text).map_err(|(line, message)| TokenError::Line {
            path: shown.clone(),
            line,
            message,
        })?;
        if t.by_digest.is_empty() {
            return Err(TokenError::Empty { path: shown });
        }
        Ok(t)
    }

    /// Parse the file's text; `Err((line, message))`.
    pub fn parse(text: &str) -> Result<Tokens, (usize, String)> {
        let mut by_digest = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(owner), Some(token), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err((i + 1, "expected `owner token`".into()));
            };
            if !valid_owner(owner) {
                return Err((i + 1, "owner must be 1..128 of [A-Za-z0-9._@:-]".into()));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err((
                    i + 1,
                    format!("token shorter than {MIN_TOKEN_LEN} characters"),
                ));
            }
            if by_digest.insert(digest(token), owner.to_string()).is_some() {
                return Err((i + 1, "token listed twice".into()));
            }
        }
        Ok(Tokens { by_digest })
    }

    /// The owner of `token`, if it is one of ours.
    pub fn owner(&self, token: &str) -> Option<&str> {
        self.by_digest.get(&digest(token)).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_owners_and_tokens() {
        let t = Tokens::parse(
            "# comment\nalice 0123456789abcdef0123\n\nbob   fedcba9876543210fedc # trailing\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.owner("0123456789abcdef0123"), Some("alice"));
        assert_eq!(t.owner("fedcba9876543210fedc"), Some("bob"));
        assert_eq!(t.owner("0123456789abcdef012"), None);
    }

    #[test]
    fn errors_name_the_line_not_the_token() {
        let e = Tokens::parse("alice 0123456789abcdef0123\nbob tiny-tok\n").unwrap_err();
        assert_eq!(e.0, 2);
        assert!(!e.1.contains("tiny-tok"), "{}", e.1);
        assert_eq!(Tokens::parse("a b c\n").unwrap_err().0, 1);
        assert_eq!(
            Tokens::parse("al/ice 0123456789abcdef0123\n")
                .unwrap_err()
                .0,
            1
        );
        let dup = "a 0123456789abcdef0123\nb 0123456789abcdef0123\n";
        assert_eq!(Tokens::parse(dup).unwrap_err().0, 2);
    }

    #[test]
    fn refuses_a_world_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(&p, "alice 0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Tokens::load(&p),
            Err(TokenError::Permissions { .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Tokens::load(&p).unwrap().len(), 1);
        assert!(!format!("{:?}", Tokens::load(&p).unwrap()).contains("0123"));
    }
}
