//! The cellhost cell document: types, parsing and validation.
//!
//! A *cell* is one workload at one isolation tier, with a lease. This crate
//! turns the text a consumer hands cellhost (YAML or JSON) into a [`Cell`]
//! that the rest of the system can trust, or into errors the consumer can
//! act on. See DESIGN.md, "The cell document".
//!
//! ```
//! let doc = r#"
//! apiVersion: cellhost.dev/v1
//! kind: Cell
//! metadata: { name: hello }
//! spec:
//!   isolation: process
//!   command: ["/bin/echo", "hello"]
//!   resources: { memoryMiB: 8 }
//!   env: { 1BAD: x }
//! "#;
//! let err = cellhost_spec::parse_and_validate(doc).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "spec.env.1BAD: env key must match [A-Za-z_][A-Za-z0-9_]*\n\
//!      spec.resources.memoryMiB: must be >= 16",
//! );
//! ```
//!
//! # Why it is shaped this way
//!
//! - **Pure, no I/O.** Parsing and validation read a `&str` and return
//!   values. Nothing here opens a file, reads the environment or looks at
//!   the host: secret *references* (`from: { file: ... }`) are checked for
//!   form only and resolved by the caller at create time. So the crate is
//!   trivially testable and fuzzable, and the same check runs in the CLI,
//!   the HTTP API and the market front with the same answer.
//! - **Two steps: shape, then values.** [`parse`] only establishes that the
//!   text is a well-formed document with known fields of the right types;
//!   [`validate`] then checks the values (ranges, names, paths, CIDRs).
//!   [`parse_and_validate`] does both, and is what callers normally want.
//! - **Errors name the path.** Every error starts with the dotted path of
//!   the field it is about (`spec.resources.memoryMiB: must be >= 16`,
//!   `spec.resorces: unknown field ...`), plus line and column when the
//!   parser knows them. Keys that come from the document are escaped, so an
//!   error is always one line with no control characters.
//! - **All errors at once.** [`validate`] does not stop at the first
//!   problem: it returns every [`FieldError`], in document order, so a
//!   consumer fixes a document in one round trip. (Parse errors stop at the
//!   first: past a syntax or type error, the rest of the document has no
//!   reliable meaning.)
//! - **Strict.** Unknown fields, duplicate keys and multiple YAML documents
//!   are errors, never silently ignored settings.
//! - **Bounded against hostile input.** Input is capped at
//!   [`MAX_INPUT_BYTES`]; the YAML parser (`serde-saphyr`, panic-free by
//!   design) runs under a budget that stops alias bombs and deep nesting;
//!   collection sizes are bounded by [`limits`]. A property test and a
//!   cargo-fuzz target (`fuzz/`) check that no input makes
//!   [`parse_and_validate`] panic.
//! - **Secrets stay out of storage and logs.** [`redacted`] replaces inline
//!   secret values before a document is stored; `Debug` of a
//!   [`SecretSource::Value`] never prints the value.

#[cfg(test)]
mod fixtures;
pub mod limits;
mod parse;
mod path;
mod redact;
mod tiers;
mod types;
mod validate;

pub use parse::{Format, MAX_INPUT_BYTES, ParseError, Position, parse, parse_as};
pub use redact::{REDACTED, Redacted, has_inline_secrets, redacted};
pub use tiers::validate_for;
pub use types::*;
pub use validate::{
    Cidr, FieldError, ValidationErrors, is_image_name, is_posix_name, parse_cidr, validate,
};

/// Either kind of failure from [`parse_and_validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The text is not a well-formed cell document (one error).
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The document is well-formed but breaks value rules (all of them).
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
}

impl SpecError {
    /// The error as a list of `(path, message)` pairs, the same shape for
    /// both kinds: handy for an API response. A parse error becomes one
    /// entry whose message includes the position, if known.
    pub fn field_errors(&self) -> Vec<FieldError> {
        match self {
            SpecError::Invalid(v) => v.errors.clone(),
            SpecError::Parse(p) => {
                let path = p.path().unwrap_or_default().to_string();
                let text = p.to_string();
                let message = match text.strip_prefix(&format!("{path}: ")) {
                    Some(rest) if !path.is_empty() => rest.to_string(),
                    _ => text,
                };
                vec![FieldError { path, message }]
            }
        }
    }
}

/// [`parse`], then [`validate`]: the document as a [`Cell`] only if it is
/// well-formed and breaks no rule.
pub fn parse_and_validate(input: &str) -> Result<Cell, SpecError> {
    let cell = parse(input)?;
    validate(&cell)?;
    Ok(cell)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate_ok_and_both_error_kinds() {
        let cell = parse_and_validate(fixtures::FULL_YAML).unwrap();
        assert_eq!(cell.metadata.name, "hello");

        let bad_shape = fixtures::FULL_YAML.replace("memoryMiB", "memoryMB");
        let e = parse_and_validate(&bad_shape).unwrap_err();
        assert!(matches!(e, SpecError::Parse(_)));
        let fe = e.field_errors();
        assert_eq!(fe.len(), 1);
        assert_eq!(fe[0].path, "spec.resources.memoryMB");
        assert!(fe[0].message.starts_with("unknown field"), "{fe:?}");

        let bad_values = fixtures::FULL_YAML
            .replace("memoryMiB: 128", "memoryMiB: 8")
            .replace("ttlSeconds: 3600", "ttlSeconds: 0");
        let e = parse_and_validate(&bad_values).unwrap_err();
        assert!(matches!(e, SpecError::Invalid(_)));
        assert_eq!(
            e.to_string(),
            "spec.resources.memoryMiB: must be >= 16\nspec.lifetime.ttlSeconds: must be > 0"
        );
        assert_eq!(e.field_errors().len(), 2);
    }
}
