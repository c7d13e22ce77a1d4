//! Removing secret values from a document before it is stored or logged.

use crate::types::{Cell, SecretSource};

/// What [`redacted`] puts in place of every inline secret value.
pub const REDACTED: &str = "<redacted>";

/// A copy of `cell` in which every `SecretSource::Value` reads
/// [`REDACTED`]. File and env sources are references, not secrets, and are
/// kept. The store holds only redacted documents: the invariant is that a
/// secret value never reaches the store, a log line, or argv.
pub fn redacted(cell: &Cell) -> Cell {
    let mut out = cell.clone();
    for secret in &mut out.spec.secrets {
        if let SecretSource::Value(v) = &mut secret.from {
            *v = REDACTED.to_string();
        }
    }
    out
}

/// A document whose inline secret values read [`REDACTED`]: the only kind
/// of document the state store accepts. Made only by [`Redacted::of`], so
/// "already redacted" is a type, not a promise in a doc comment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct Redacted(Cell);

impl Redacted {
    /// A redacted copy of `cell` (see [`redacted`]).
    pub fn of(cell: &Cell) -> Redacted {
        Redacted(redacted(cell))
    }

    pub fn into_inner(self) -> Cell {
        self.0
    }
}

impl std::ops::Deref for Redacted {
    type Target = Cell;
    fn deref(&self) -> &Cell {
        &self.0
    }
}

/// Whether `cell` carries any inline secret value (redacted or not).
pub fn has_inline_secrets(cell: &Cell) -> bool {
    cell.spec
        .secrets
        .iter()
        .any(|s| matches!(s.from, SecretSource::Value(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_redacted_references_kept() {
        let cell = crate::parse(crate::fixtures::FULL_YAML).unwrap();
        assert!(has_inline_secrets(&cell));
        let r = redacted(&cell);
        assert_eq!(r.spec.secrets[0].from, SecretSource::File("./token".into()));
        assert_eq!(
            r.spec.secrets[1].from,
            SecretSource::Env("DB_PASSWORD".into())
        );
        assert_eq!(r.spec.secrets[2].from, SecretSource::Value(REDACTED.into()));
        assert_eq!(r.spec.secrets[2].name, "inline");
        // Nothing else changed, and the original is untouched.
        let mut expect = cell.clone();
        expect.spec.secrets[2].from = SecretSource::Value(REDACTED.into());
        assert_eq!(r, expect);
        assert_eq!(
            cell.spec.secrets[2].from,
            SecretSource::Value("s3cret".into())
        );
        // The serialized forms no longer hold the value anywhere.
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("s3cret"), "{json}");
        // Still a valid document, and redaction is idempotent.
        crate::validate(&r).unwrap();
        assert_eq!(redacted(&r), r);
    }

    #[test]
    fn debug_output_never_shows_secret_values() {
        let cell = crate::parse(crate::fixtures::FULL_YAML).unwrap();
        let dbg = format!("{cell:?} {:#?}", cell.spec.secrets);
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("./token"), "references stay visible: {dbg}");
    }
}
