//! Text to [`Cell`]: YAML or JSON, with errors that name the field path.
//!
//! # What this module guarantees
//!
//! - **Bounded.** Input larger than [`MAX_INPUT_BYTES`] is refused before any
//!   parsing. The YAML parser runs with a tight [`serde_saphyr::Budget`]
//!   (nesting depth, node, event, alias and anchor counts), so an alias bomb
//!   or a deeply nested document fails fast instead of eating memory.
//! - **Panic-free.** Both parsers are documented and fuzzed as panic-free; a
//!   property test and a cargo-fuzz target in this repository check the
//!   whole `parse_and_validate` path.
//! - **Strict.** Every struct denies unknown fields, duplicate mapping keys
//!   are errors, only one YAML document is accepted, and booleans must be
//!   spelled the YAML 1.2 way (`true`/`false`, not `yes`/`no`).
//! - **Errors name the path.** [`ParseError`] displays as one line such as
//!   `spec.resources.memoryMiB: invalid u64 at line 8, column 16`. An unknown key is reported at its own path
//!   (`spec.resorces: unknown field, expected one of ...`), a missing one at
//!   the path it should have had (`spec.command: missing field`).
//!
//! JSON is a subset of YAML 1.2, so the YAML parser alone would do; a
//! document whose first non-blank character is `{` is handed to
//! `serde_json` instead because its errors (line, column) are more precise
//! for JSON syntax.

use std::fmt;

use serde_path_to_error::{Path, Segment, Track};
use serde_saphyr::MessageFormatter;

use crate::types::Cell;

/// Largest document [`parse`] accepts, in bytes (1 MiB). A cell document is
/// a few hundred bytes; the limit is there to bound work on hostile input.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;

/// The syntax a document was parsed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// Which parser [`parse`] uses for `input`: JSON when the first
    /// non-whitespace character (after an optional BOM) is `{`, else YAML.
    pub fn detect(input: &str) -> Format {
        let trimmed = input.trim_start_matches('\u{feff}').trim_start();
        if trimmed.starts_with('{') {
            Format::Json
        } else {
            Format::Yaml
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Yaml => "YAML",
            Format::Json => "JSON",
        })
    }
}

/// A 1-based position in the input text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

/// Why a document could not be turned into a [`Cell`].
///
/// `Display` is always a single line; when the problem belongs to a field,
/// the line starts with that field's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The input is over [`MAX_INPUT_BYTES`].
    #[error("document is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    /// The input is empty or only whitespace.
    #[error("document is empty")]
    Empty,
    /// Syntax error, type mismatch, unknown or missing field, budget breach.
    #[error("{}", render_invalid(path, message, position))]
    Invalid {
        format: Format,
        /// Dotted field path (`spec.ports.0.host`); empty when the problem
        /// is not inside any field (e.g. a syntax error before the root).
        path: String,
        /// What is wrong, without path or position.
        message: String,
        /// Where in the input, when the parser knows.
        position: Option<Position>,
    },
}

impl ParseError {
    /// The dotted path of the offending field, if the error has one.
    pub fn path(&self) -> Option<&str> {
        match self {
            ParseError::Invalid { path, .. } if !path.is_empty() => Some(path),
            _ => None,
        }
    }

    /// Where in the input the error is, if known.
    pub fn position(&self) -> Option<Position> {
        match self {
            ParseError::Invalid { position, .. } => *position,
            _ => None,
        }
    }
}

fn render_invalid(path: &str, message: &str, position: &Option<Position>) -> String {
    let mut out = String::new();
    if !path.is_empty() {
        out.push_str(path);
        out.push_str(": ");
    }
    out.push_str(message);
    if let Some(p) = position {
        out.push_str(&format!(" at line {}, column {}", p.line, p.column));
    }
    out
}

/// Parse a cell document (YAML, or JSON when it starts with `{`).
///
/// This checks only shape: that the text is well-formed and every field has
/// the right type and a known name. Call [`crate::validate`] (or use
/// [`crate::parse_and_validate`]) for the value rules.
pub fn parse(input: &str) -> Result<Cell, ParseError> {
    parse_as(input)
}

/// [`parse`] for any strict serde type: the same size bound, YAML budget,
/// duplicate-key and path-naming errors. Other cellhost files (the market's
/// config) read through here, so they fail the way documents do.
pub fn parse_as<T: serde::de::DeserializeOwned>(input: &str) -> Result<T, ParseError> {
    if input.len() > MAX_INPUT_BYTES {
        return Err(ParseError::TooLarge {
            size: input.len(),
            limit: MAX_INPUT_BYTES,
        });
    }
    if input.trim_start_matches('\u{feff}').trim().is_empty() {
        return Err(ParseError::Empty);
    }
    match Format::detect(input) {
        Format::Json => parse_json(input),
        Format::Yaml => parse_yaml(input),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(input: &str) -> Result<T, ParseError> {
    let input = input.trim_start_matches('\u{feff}');
    let mut de = serde_json::Deserializer::from_str(input);
    let cell = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().clone();
        let inner = e.into_inner();
        let position = (inner.line() > 0).then(|| Position {
            line: inner.line() as u64,
            column: inner.column() as u64,
        });
        invalid(
            Format::Json,
            render_path(&path),
            strip_json_position(&inner),
            position,
        )
    })?;
    // Trailing characters after the object are an error, as in serde_json::from_str.
    de.end().map_err(|e| {
        invalid(
            Format::Json,
            String::new(),
            strip_json_position(&e),
            Some(Position {
                line: e.line() as u64,
                column: e.column() as u64,
            }),
        )
    })?;
    Ok(cell)
}

/// serde_json's `Display` appends " at line L column C"; we print the
/// position ourselves, uniformly for both formats.
fn strip_json_position(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&suffix) {
        Some(s) => s.to_string(),
        None => full,
    }
}

fn yaml_options() -> serde_saphyr::Options {
    // A cell document is a few dozen nodes; these limits are far above any
    // honest document and far below what hurts the host.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = 32;
    budget.max_events = 200_000;
    budget.max_nodes = 100_000;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    // 2, not 1: the single-document check then reports a second document
    // in plain words instead of as a budget breach.
    budget.max_documents = 2;
    budget.max_merge_keys = 100;
    budget.max_recorded_anchor_events = 100_000;
    budget.max_recorded_anchor_bytes = MAX_INPUT_BYTES;
    budget.max_total_scalar_bytes = 2 * MAX_INPUT_BYTES;
    budget.max_reader_input_bytes = Some(MAX_INPUT_BYTES);
    serde_saphyr::options! {
        budget: Some(budget),
        with_snippet: false,
        strict_booleans: true,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
    }
}

fn parse_yaml<T: serde::de::DeserializeOwned>(input: &str) -> Result<T, ParseError> {
    // The tracked path must outlive the closure, which can only return a
    // saphyr error; stash it here.
    let mut failed_path: Option<Path> = None;
    let result =
        serde_saphyr::with_deserializer_from_str_with_options(input, yaml_options(), |de| {
            let mut track = Track::new();
            let tracked = serde_path_to_error::Deserializer::new(de, &mut track);
            match T::deserialize(tracked) {
                Ok(cell) => Ok(cell),
                Err(e) => {
                    failed_path = Some(track.path());
                    Err(e)
                }
            }
        });
    result.map_err(|e| {
        let path = failed_path.as_ref().map(render_path).unwrap_or_default();
        let position = e.location().map(|l| Position {
            line: l.line(),
            column: l.column(),
        });
        let message = match duplicate_key(&e) {
            // Same wording as the JSON side (see `types::unique_map`), so
            // `invalid` moves the key into the path.
            Some(key) => format!("duplicate key `{key}`"),
            None => saphyr_message(&e),
        };
        invalid(Format::Yaml, path, message, position)
    })
}

fn duplicate_key(err: &serde_saphyr::Error) -> Option<&str> {
    let mut e = err;
    while let serde_saphyr::Error::AliasError { error, .. }
    | serde_saphyr::Error::WithSnippet { error, .. } = e
    {
        e = error;
    }
    match e {
        serde_saphyr::Error::DuplicateMappingKey { key: Some(k), .. } => Some(k),
        _ => None,
    }
}

/// The message of a saphyr error, without its location suffix (we add our
/// own) and on one line.
fn saphyr_message(err: &serde_saphyr::Error) -> String {
    let mut e = err;
    while let serde_saphyr::Error::AliasError { error, .. }
    | serde_saphyr::Error::WithSnippet { error, .. } = e
    {
        e = error;
    }
    // The "user" formatter words budget and structure errors for the
    // person who wrote the document, not for the programmer calling saphyr.
    let msg = serde_saphyr::UserMessageFormatter.format_message(e);
    one_line(&msg)
}

/// Replace control characters (newlines included) so a message is one line.
fn one_line(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars()
            .flat_map(|c| {
                if c.is_control() {
                    c.escape_debug().collect::<Vec<_>>()
                } else {
                    vec![c]
                }
            })
            .collect()
    } else {
        s.to_string()
    }
}

/// Build `ParseError::Invalid`, moving the key named by serde's
/// "unknown field `x`" / "missing field `x`" messages into the path (if it
/// is not there already), so the path points at the offending key rather
/// than at its parent, and the message does not repeat it.
fn invalid(
    format: Format,
    mut path: String,
    mut message: String,
    position: Option<Position>,
) -> ParseError {
    for (prefix, replacement) in [
        ("unknown field `", "unknown field"),
        ("missing field `", "missing field"),
        ("duplicate field `", "duplicate key"),
        ("duplicate key `", "duplicate key"),
    ] {
        let Some(rest) = message.strip_prefix(prefix) else {
            continue;
        };
        // The key ends at the backtick before serde's ", expected ..." tail
        // (unknown field) or at the last backtick (the others). A key that
        // itself contains "`, expected" only garbles its own message.
        let key_end = ["`, expected", "`, there are no"]
            .iter()
            .filter_map(|t| rest.find(t))
            .min()
            .or_else(|| rest.ends_with('`').then(|| rest.len() - 1));
        if let Some(end) = key_end {
            let (key, tail) = (&rest[..end], &rest[end + 1..]);
            // serde_path_to_error already records an unknown key (it sees
            // the key before the struct rejects it), but not a missing one.
            let leaf = crate::path::join("", key);
            if path != leaf && !path.ends_with(&format!(".{leaf}")) {
                crate::path::push_key(&mut path, key);
            }
            message = format!("{replacement}{tail}");
            break;
        }
    }
    ParseError::Invalid {
        format,
        path,
        message,
        position,
    }
}

fn render_path(path: &Path) -> String {
    let mut out = String::new();
    let segments: Vec<&Segment> = path.iter().collect();
    // A trailing Unknown is a map key that failed while being read (e.g. a
    // duplicate); the caller puts the key in the path itself.
    let keep = segments
        .iter()
        .rposition(|s| !matches!(s, Segment::Unknown))
        .map_or(0, |i| i + 1);
    for seg in &segments[..keep] {
        match seg {
            Segment::Seq { index } => crate::path::push_index(&mut out, *index),
            Segment::Map { key } => crate::path::push_key(&mut out, key),
            Segment::Enum { variant } => crate::path::push_key(&mut out, variant),
            Segment::Unknown => crate::path::push_key(&mut out, "?"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::FULL_YAML;
    use crate::types::*;

    fn yaml_err(doc: &str) -> ParseError {
        parse(doc).expect_err("expected a parse error")
    }

    fn with_spec_line(extra: &str) -> String {
        format!(
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{ name: x }}\nspec:\n  isolation: process\n  command: [/bin/true]\n{extra}"
        )
    }

    #[test]
    fn parses_full_yaml() {
        let cell = parse(FULL_YAML).unwrap();
        assert_eq!(cell.api_version, "cellhost.dev/v1");
        assert_eq!(cell.metadata.labels["team"], "a");
        assert_eq!(cell.spec.isolation, Isolation::Process);
        assert_eq!(cell.spec.command, ["/bin/echo", "hello"]);
        assert_eq!(
            cell.spec.env.keys().collect::<Vec<_>>(),
            ["GREETING", "OTHER"]
        );
        assert_eq!(
            cell.spec.secrets[0].from,
            SecretSource::File("./token".into())
        );
        assert_eq!(
            cell.spec.secrets[1].from,
            SecretSource::Env("DB_PASSWORD".into())
        );
        assert_eq!(cell.spec.resources.memory_mib, Some(128));
        assert_eq!(cell.spec.resources.cpus, Some(0.5));
        assert_eq!(cell.spec.ports[0].protocol, Protocol::Tcp);
        assert!(cell.spec.volume.as_ref().unwrap().encrypted);
        assert_eq!(cell.spec.network.mode, NetworkMode::Bridged);
        assert_eq!(cell.spec.network.egress[0].port, Some(443));
        assert_eq!(cell.spec.lifetime.ttl_seconds, Some(3600));
    }

    #[test]
    fn defaults_apply() {
        let cell = parse(&with_spec_line("")).unwrap();
        assert_eq!(cell.spec.image, "host");
        assert_eq!(cell.spec.lifetime.ttl(), DEFAULT_TTL_SECONDS);
        assert_eq!(cell.spec.network.mode, NetworkMode::None);
        assert_eq!(cell.spec.resources, Resources::default());
        assert!(cell.spec.volume.is_none());
    }

    #[test]
    fn yaml_and_json_round_trip_to_the_same_cell() {
        let from_yaml = parse(FULL_YAML).unwrap();
        let json = serde_json::to_string_pretty(&from_yaml).unwrap();
        assert!(json.starts_with('{'));
        let from_json = parse(&json).unwrap();
        assert_eq!(from_yaml, from_json);
        // And the compact form, with leading whitespace.
        let compact = format!("  \n{}", serde_json::to_string(&from_yaml).unwrap());
        assert_eq!(parse(&compact).unwrap(), from_yaml);
    }

    #[test]
    fn json_detected_by_leading_brace() {
        assert_eq!(Format::detect("  {\"a\":1}"), Format::Json);
        assert_eq!(Format::detect("\u{feff}{}"), Format::Json);
        assert_eq!(Format::detect("apiVersion: x"), Format::Yaml);
        assert_eq!(Format::detect("[1]"), Format::Yaml);
    }

    #[test]
    fn unknown_field_top_level() {
        let doc = format!(
            "{}bogus: 1\n",
            with_spec_line("").replacen("spec:\n", "", 0)
        );
        let doc = doc.replacen("kind: Cell\n", "kind: Cell\nbogus: 1\n", 1);
        let e = yaml_err(&doc);
        assert_eq!(e.path(), Some("bogus"), "{e}");
        assert!(e.to_string().starts_with("bogus: unknown field"), "{e}");
    }

    #[test]
    fn unknown_field_in_spec() {
        let e = yaml_err(&with_spec_line("  resorces: { cpus: 1 }\n"));
        assert_eq!(e.path(), Some("spec.resorces"), "{e}");
        let s = e.to_string();
        assert!(s.starts_with("spec.resorces: unknown field"), "{s}");
        assert!(s.contains("resources, ports"), "lists allowed keys: {s}");
        assert!(s.contains("line 7"), "{s}");
    }

    #[test]
    fn unknown_field_with_backtick_in_name() {
        let e = yaml_err(&with_spec_line("  resources: { \"a`b\": 1 }\n"));
        assert_eq!(e.path(), Some("spec.resources.a`b"), "{e}");
        let s = e.to_string();
        assert!(
            s.starts_with("spec.resources.a`b: unknown field, expected one of cpus"),
            "{s}"
        );
    }

    #[test]
    fn unknown_field_in_resources() {
        let e = yaml_err(&with_spec_line("  resources: { cpus: 1, memoryMb: 5 }\n"));
        assert_eq!(e.path(), Some("spec.resources.memoryMb"), "{e}");
    }

    #[test]
    fn unknown_field_in_list_item() {
        let e = yaml_err(&with_spec_line(
            "  ports:\n    - { container: 1, host: 2 }\n    - { container: 1, hots: 2 }\n",
        ));
        assert_eq!(e.path(), Some("spec.ports.1.hots"), "{e}");
        let e = yaml_err(&with_spec_line(
            "  network: { egress: [ { cidr: 1.2.3.4/32, prot: 1 } ] }\n",
        ));
        assert_eq!(e.path(), Some("spec.network.egress.0.prot"), "{e}");
    }

    #[test]
    fn unknown_field_in_metadata_json() {
        let e = parse(
            r#"{"apiVersion":"cellhost.dev/v1","kind":"Cell","metadata":{"name":"x","lables":{}}}"#,
        )
        .unwrap_err();
        assert_eq!(e.path(), Some("metadata.lables"), "{e}");
        assert!(matches!(
            e,
            ParseError::Invalid {
                format: Format::Json,
                ..
            }
        ));
        assert!(e.to_string().contains("line 1, column"), "{e}");
    }

    #[test]
    fn unknown_secret_source() {
        let e = yaml_err(&with_spec_line(
            "  secrets: [ { name: a, from: { fiel: x } } ]\n",
        ));
        assert_eq!(e.path(), Some("spec.secrets.0.from"), "{e}");
        let s = e.to_string();
        assert!(
            s.contains("`fiel`, expected one of file, env, value"),
            "{s}"
        );
    }

    #[test]
    fn type_error_names_path_and_position() {
        let e = yaml_err(&with_spec_line("  resources:\n    memoryMiB: lots\n"));
        assert_eq!(e.path(), Some("spec.resources.memoryMiB"), "{e}");
        let s = e.to_string();
        assert_eq!(
            s,
            "spec.resources.memoryMiB: invalid u64 at line 8, column 16"
        );
        assert_eq!(e.position().unwrap().line, 8);
    }

    #[test]
    fn type_error_json() {
        let doc = r#"{"apiVersion":"cellhost.dev/v1","kind":"Cell","metadata":{"name":"x"},
"spec":{"isolation":"process","command":["a"],"resources":{"memoryMiB":"lots"}}}"#;
        let e = parse(doc).unwrap_err();
        assert_eq!(e.path(), Some("spec.resources.memoryMiB"), "{e}");
        let s = e.to_string();
        assert!(
            s.starts_with("spec.resources.memoryMiB: invalid type"),
            "{s}"
        );
        assert!(s.ends_with("at line 2, column 77"), "{s}");
    }

    #[test]
    fn negative_port_is_type_error() {
        let e = yaml_err(&with_spec_line("  ports: [ { container: -1, host: 2 } ]\n"));
        assert_eq!(e.path(), Some("spec.ports.0.container"), "{e}");
    }

    #[test]
    fn unknown_isolation_lists_allowed_values() {
        let doc = with_spec_line("").replace("isolation: process", "isolation: docker");
        let e = yaml_err(&doc);
        assert_eq!(e.path(), Some("spec.isolation"), "{e}");
        let s = e.to_string();
        assert!(
            s.contains("unknown variant `docker`, expected one of process, container, vm, microvm"),
            "{s}"
        );
        let e = parse(r#"{"apiVersion":"a","kind":"b","metadata":{"name":"x"},"spec":{"isolation":"kvm","command":["a"]}}"#).unwrap_err();
        assert_eq!(e.path(), Some("spec.isolation"), "{e}");
        assert!(e.to_string().contains("`microvm`"), "{e}");
    }

    #[test]
    fn missing_field_names_its_path() {
        let doc = with_spec_line("").replace("  command: [/bin/true]\n", "");
        let e = yaml_err(&doc);
        assert_eq!(e.path(), Some("spec.command"), "{e}");
        assert!(
            e.to_string().starts_with("spec.command: missing field"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_keys_rejected_with_path() {
        let e = yaml_err(&with_spec_line("  image: host\n  image: /srv/root\n"));
        assert_eq!(e.path(), Some("spec.image"), "{e}");
        assert!(
            e.to_string()
                .starts_with("spec.image: duplicate key at line 8"),
            "{e}"
        );
        let e = yaml_err(&with_spec_line("  env: { A: x, B: y, A: z }\n"));
        assert_eq!(e.path(), Some("spec.env.A"), "{e}");
        assert!(
            e.to_string().starts_with("spec.env.A: duplicate key"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_keys_rejected_in_json_too() {
        let doc = r#"{"apiVersion":"cellhost.dev/v1","kind":"Cell","kind":"Cell"}"#;
        let e = parse(doc).unwrap_err();
        assert_eq!(e.path(), Some("kind"), "{e}");
        assert!(e.to_string().starts_with("kind: duplicate key"), "{e}");
        // serde_json alone would silently keep the last value of a map key.
        let doc = r#"{"apiVersion":"cellhost.dev/v1","kind":"Cell","metadata":{"name":"x"},
            "spec":{"isolation":"vm","command":["a"],"env":{"A":"1","A":"2"}}}"#;
        let e = parse(doc).unwrap_err();
        assert_eq!(e.path(), Some("spec.env.A"), "{e}");
        assert!(
            e.to_string()
                .starts_with("spec.env.A: duplicate key at line 2"),
            "{e}"
        );
        let doc = r#"{"apiVersion":"cellhost.dev/v1","kind":"Cell","metadata":{"name":"x",
            "labels":{"a`b":"1","a`b":"2"}}}"#;
        let e = parse(doc).unwrap_err();
        assert_eq!(e.path(), Some("metadata.labels.a`b"), "{e}");
    }

    #[test]
    fn yes_is_not_a_boolean() {
        let e = yaml_err(&with_spec_line(
            "  volume: { path: /d, sizeGiB: 1, encrypted: yes }\n",
        ));
        assert_eq!(e.path(), Some("spec.volume.encrypted"), "{e}");
    }

    #[test]
    fn empty_and_oversized() {
        assert_eq!(parse(""), Err(ParseError::Empty));
        assert_eq!(parse(" \n\t\n"), Err(ParseError::Empty));
        let big = "#".repeat(MAX_INPUT_BYTES + 1);
        let e = parse(&big).unwrap_err();
        assert!(matches!(e, ParseError::TooLarge { .. }));
        assert!(e.to_string().contains("1048576"), "{e}");
    }

    #[test]
    fn syntax_errors_are_one_line_with_position() {
        for doc in [
            "apiVersion: [unclosed\n",
            "{\"apiVersion\": ",
            "a: b: c\n",
            "\t- x\n",
            "{} trailing",
        ] {
            let e = parse(doc).unwrap_err();
            let s = e.to_string();
            assert!(!s.contains('\n'), "{s:?}");
            assert!(e.position().is_some(), "{doc:?} -> {s}");
        }
    }

    #[test]
    fn multiple_documents_rejected() {
        for n in [2, 3] {
            let doc = vec![with_spec_line(""); n].join("---\n");
            let e = parse(&doc).unwrap_err();
            assert!(e.to_string().contains("multiple"), "{e}");
        }
    }

    #[test]
    fn aliases_work_within_budget() {
        let doc = with_spec_line("  env: { A: &v hello, B: *v }\n");
        let cell = parse(&doc).unwrap();
        assert_eq!(cell.spec.env["B"], "hello");
    }

    #[test]
    fn alias_bomb_rejected_quickly() {
        // Billion laughs under a field that takes a list of strings: each
        // level multiplies by ten.
        let mut doc = String::from("x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..12 {
            let p = i - 1;
            doc.push_str(&format!(
                "x{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let wrapped = with_spec_line(&format!(
            "  env:\n{}",
            doc.lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        ));
        // And many aliases of one long string: linear in input, but over
        // the alias budget.
        let many = with_spec_line(&format!(
            "  env: {{ A: &s {} }}\n  command: [{}]\n",
            "x".repeat(1000),
            vec!["*s"; 5000].join(", ")
        ));
        for doc in [doc, wrapped, many] {
            let start = std::time::Instant::now();
            let e = parse(&doc).unwrap_err();
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "{e}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn deep_nesting_rejected() {
        let doc = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse(&doc).is_err());
        let doc = format!("{}{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
        assert!(parse(&doc).is_err());
        let mut doc = String::new();
        for depth in 0..500 {
            doc.push_str(&" ".repeat(depth));
            doc.push_str("a:\n");
        }
        assert!(parse(&doc).is_err());
    }

    #[test]
    fn odd_keys_are_escaped_in_paths() {
        let e = yaml_err(&with_spec_line("  env: { \"A\\nB\": [1] }\n"));
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s:?}");
        assert_eq!(e.path(), Some("spec.env.A\\nB"), "{s}");
    }
}
