//! Property tests: no input makes `parse_and_validate` panic, and any
//! document it accepts survives a JSON round trip unchanged.

use cellhost_spec::{Cell, ParseError, SpecError, parse, parse_and_validate, redacted, validate};
use proptest::prelude::*;

/// Every field of the v1 document, valid.
const VALID: &str = r#"apiVersion: cellhost.dev/v1
kind: Cell
metadata: { name: hello, labels: { team: a, "app.example/tier": web } }
spec:
  isolation: process
  image: host
  command: ["/bin/echo", "hello", 'single', plain]
  workingDir: /tmp
  env: { GREETING: hi, NUM: 2, &anchor QUOTED: "a\tb" }
  secrets:
    - { name: api_token, from: { file: ./token } }
    - name: db
      from:
        env: DB_PASSWORD
    - { name: inline, from: { value: s3cret } }
  resources: { cpus: 0.5, memoryMiB: 128, pids: 64, diskGiB: 1 }
  ports:
    - { container: 8080, host: 18080, protocol: tcp }
    - { container: 53, host: 5353, protocol: udp }
  volume: { path: /data, sizeGiB: 1, encrypted: true }
  network:
    mode: bridged
    egress:
      - { cidr: 10.0.0.0/8, port: 443, protocol: tcp }
      - cidr: "2001:db8::/32"
  lifetime: { ttlSeconds: 3600 }
"#;

/// One edit to a document, applied at a relative position (0.0..1.0) so the
/// strategy does not depend on the document's length.
#[derive(Debug, Clone)]
enum Edit {
    Delete {
        at: f64,
        len: usize,
    },
    Insert {
        at: f64,
        text: String,
    },
    Replace {
        at: f64,
        with: char,
    },
    DuplicateLine {
        at: f64,
    },
    SwapLines {
        a: f64,
        b: f64,
    },
    Truncate {
        at: f64,
    },
    /// Replace one scalar-looking word (`[A-Za-z0-9./_:-]+`): keeps the
    /// YAML well-formed more often, so the value rules get exercised.
    ReplaceWord {
        at: f64,
        with: String,
    },
}

/// Fragments that mean something to YAML or to this schema, so mutations
/// reach deep paths instead of dying at the first byte.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ": ",
    ",",
    "-",
    "- ",
    "&a ",
    "*a",
    "!!str ",
    "!!binary ",
    "<<: ",
    "? ",
    "|",
    ">",
    "'",
    "\"",
    "#",
    "\n",
    "\n  ",
    "\t",
    "---\n",
    "...\n",
    "~",
    "null",
    "0",
    "-1",
    "1e999",
    ".nan",
    "0x10",
    "99999999999999999999",
    "true",
    "yes",
    "\\0",
    "\\u0000",
    "\u{0}",
    "é",
    "\u{feff}",
    "memoryMiB",
    "isolation",
    "vm",
    "env",
    "value",
    "file",
    "cidr",
    "/",
    "..",
];

fn edit() -> impl Strategy<Value = Edit> {
    let token = prop::sample::select(TOKENS).prop_map(str::to_string);
    let text = prop_oneof![
        token,
        "\\PC{0,8}",
        any::<String>().prop_map(|s| s.chars().take(8).collect())
    ];
    prop_oneof![
        1 => (0.0..1.0, 1usize..16).prop_map(|(at, len)| Edit::Delete { at, len }),
        1 => (0.0..1.0, text).prop_map(|(at, text)| Edit::Insert { at, text }),
        1 => (0.0..1.0, any::<char>()).prop_map(|(at, with)| Edit::Replace { at, with }),
        1 => (0.0..1.0).prop_map(|at| Edit::DuplicateLine { at }),
        1 => (0.0..1.0, 0.0..1.0).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        1 => (0.0..1.0).prop_map(|at| Edit::Truncate { at }),
        6 => (0.0..1.0, word()).prop_map(|(at, with)| Edit::ReplaceWord { at, with }),
    ]
}

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(TOKENS).prop_map(str::to_string),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        (0u32..70_000).prop_map(|n| n.to_string()),
        "[A-Za-z0-9_./:-]{0,12}",
        "\\PC{0,6}".prop_map(|s| format!("{s:?}")),
    ]
}

fn index(at: f64, len: usize) -> usize {
    ((at * len as f64) as usize).min(len)
}

fn apply(doc: &str, edit: &Edit) -> String {
    let mut chars: Vec<char> = doc.chars().collect();
    let mut lines: Vec<String> = doc.lines().map(str::to_string).collect();
    match edit {
        Edit::Delete { at, len } => {
            let i = index(*at, chars.len());
            let end = (i + len).min(chars.len());
            chars.drain(i..end);
        }
        Edit::Insert { at, text } => {
            let i = index(*at, chars.len());
            chars.splice(i..i, text.chars());
        }
        Edit::Replace { at, with } => {
            if !chars.is_empty() {
                let i = index(*at, chars.len() - 1);
                chars[i] = *with;
            }
        }
        Edit::DuplicateLine { at } => {
            if !lines.is_empty() {
                let i = index(*at, lines.len() - 1);
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            return lines.join("\n");
        }
        Edit::SwapLines { a, b } => {
            if !lines.is_empty() {
                let (i, j) = (index(*a, lines.len() - 1), index(*b, lines.len() - 1));
                lines.swap(i, j);
            }
            return lines.join("\n");
        }
        Edit::Truncate { at } => {
            let i = index(*at, chars.len());
            chars.truncate(i);
        }
        Edit::ReplaceWord { at, with } => {
            let is_word = |c: &char| c.is_ascii_alphanumeric() || "./_:-".contains(*c);
            let starts: Vec<usize> = (0..chars.len())
                .filter(|&i| is_word(&chars[i]) && (i == 0 || !is_word(&chars[i - 1])))
                .collect();
            if !starts.is_empty() {
                let s = starts[index(*at, starts.len() - 1)];
                let e = (s..chars.len())
                    .find(|&i| !is_word(&chars[i]))
                    .unwrap_or(chars.len());
                chars.splice(s..e, with.chars());
            }
        }
    }
    chars.into_iter().collect()
}

/// What must hold for every input: no panic (proptest reports one as a
/// failure), one-line parse errors, and an accepted document that is
/// valid and round-trips through JSON unchanged.
fn check(input: &str) -> Result<(), TestCaseError> {
    match parse_and_validate(input) {
        Ok(cell) => {
            let json = serde_json::to_string(&cell).expect("serialize");
            let back: Cell =
                parse(&json).map_err(|e| TestCaseError::fail(format!("{e}\n{json}")))?;
            prop_assert_eq!(&back, &cell);
            prop_assert!(validate(&back).is_ok());
            prop_assert!(validate(&redacted(&cell)).is_ok());
        }
        Err(SpecError::Parse(e)) => {
            let s = e.to_string();
            prop_assert!(
                !s.contains('\n') && !s.contains('\r'),
                "multi-line: {:?}",
                s
            );
            if let ParseError::Invalid { path, .. } = &e {
                prop_assert!(!path.chars().any(char::is_control), "path {:?}", path);
            }
        }
        Err(SpecError::Invalid(errs)) => {
            prop_assert!(!errs.is_empty());
            for fe in &errs {
                prop_assert!(!fe.path.is_empty());
                let line = fe.to_string();
                prop_assert!(!line.chars().any(char::is_control), "{:?}", line);
            }
        }
    }
    Ok(())
}

#[test]
fn the_base_document_is_valid() {
    let cell = parse_and_validate(VALID).unwrap();
    assert_eq!(cell.spec.secrets.len(), 3);
    check(VALID).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_strings_never_panic(input in any::<String>()) {
        check(&input)?;
    }

    #[test]
    fn yaml_ish_strings_never_panic(input in "[a-zA-Z0-9:{}\\[\\],&*!|>'\"#~ \n\t./_-]{0,300}") {
        check(&input)?;
    }

    #[test]
    fn json_ish_strings_never_panic(input in "\\{[a-zA-Z0-9:{}\\[\\],\"\\\\ ./_-]{0,300}") {
        check(&input)?;
    }

    #[test]
    fn mutated_documents_never_panic(edits in prop::collection::vec(edit(), 1..4)) {
        let mut doc = VALID.to_string();
        for e in &edits {
            doc = apply(&doc, e);
        }
        check(&doc)?;
    }

    #[test]
    fn mutated_json_documents_never_panic(edits in prop::collection::vec(edit(), 1..4)) {
        let cell = parse(VALID).unwrap();
        let mut doc = serde_json::to_string_pretty(&cell).unwrap();
        for e in &edits {
            doc = apply(&doc, e);
        }
        check(&doc)?;
    }
}
