//! Dotted field paths as printed in errors: `spec.ports.0.host`,
//! `spec.env.1BAD`. Keys come from untrusted input, so they are escaped
//! (`str::escape_debug`) to keep every message on one line and free of
//! terminal control sequences.

/// Append `.key` (or `key` at the root), escaping control characters,
/// quotes and backslashes.
pub(crate) fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    if key.is_empty() {
        // Keep an empty key visible: `metadata.labels.""`.
        path.push_str("\"\"");
    } else {
        path.extend(key.escape_debug());
    }
}

/// Append `.index`.
pub(crate) fn push_index(path: &mut String, index: usize) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(&index.to_string());
}

/// `parent.key`, escaped as [`push_key`] does.
pub(crate) fn join(parent: &str, key: &str) -> String {
    let mut p = parent.to_string();
    push_key(&mut p, key);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_dotted_paths() {
        let mut p = String::new();
        push_key(&mut p, "spec");
        push_key(&mut p, "ports");
        push_index(&mut p, 3);
        push_key(&mut p, "host");
        assert_eq!(p, "spec.ports.3.host");
        assert_eq!(join("spec.env", "A\nB\u{1b}"), "spec.env.A\\nB\\u{1b}");
        assert_eq!(join("metadata.labels", ""), "metadata.labels.\"\"");
    }
}
