//! Value rules for a parsed [`Cell`]: the checks serde's types can't express.
//!
//! [`validate`] walks the whole document and collects every problem, each as
//! a [`FieldError`] naming its dotted path, so a user fixes a document in one
//! round trip instead of one error at a time. The rules are checked in
//! document order, so the list reads top to bottom.
//!
//! Character classes are hand-written predicates (no regex engine): each
//! rule is a few lines and its pattern is spelled out in its message.
//! Numeric bounds live in [`crate::limits`].

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::limits::*;
use crate::path::{join, push_index};
use crate::types::*;

/// One problem, at one field.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldError {
    /// Dotted path of the field: `spec.ports.1.host`, `spec.env.1BAD`.
    /// Keys from the document are escaped (`str::escape_debug`).
    pub path: String,
    /// What is wrong, one line, without the path.
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem [`validate`] found; never empty when returned as an error.
///
/// `Display` prints one `path: message` per line, in document order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationErrors {
    pub errors: Vec<FieldError>,
}

impl ValidationErrors {
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, FieldError> {
        self.errors.iter()
    }

    /// Whether some error is at exactly `path`.
    pub fn has_path(&self, path: &str) -> bool {
        self.errors.iter().any(|e| e.path == path)
    }

    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(path, message));
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

impl IntoIterator for ValidationErrors {
    type Item = FieldError;
    type IntoIter = std::vec::IntoIter<FieldError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

impl<'a> IntoIterator for &'a ValidationErrors {
    type Item = &'a FieldError;
    type IntoIter = std::slice::Iter<'a, FieldError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

/// Check every value rule of the v1 document; report all failures at once.
pub fn validate(cell: &Cell) -> Result<(), ValidationErrors> {
    let mut errs = ValidationErrors::default();
    if cell.api_version != API_VERSION {
        errs.push(
            "apiVersion",
            format!("must be {API_VERSION:?}, got {}", quote(&cell.api_version)),
        );
    }
    if cell.kind != KIND {
        errs.push(
            "kind",
            format!("must be {KIND:?}, got {}", quote(&cell.kind)),
        );
    }
    check_metadata(&cell.metadata, &mut errs);
    check_spec(&cell.spec, &mut errs);
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

fn check_metadata(m: &Metadata, errs: &mut ValidationErrors) {
    if !is_name(&m.name) {
        errs.push(
            "metadata.name",
            format!(
                "must match [A-Za-z0-9][A-Za-z0-9._-]{{0,{}}}, got {}",
                MAX_NAME_LEN - 1,
                quote(&m.name)
            ),
        );
    }
    if m.labels.len() > MAX_LABELS {
        errs.push(
            "metadata.labels",
            format!("at most {MAX_LABELS} labels, got {}", m.labels.len()),
        );
    }
    for (key, value) in &m.labels {
        let path = join("metadata.labels", key);
        if key.is_empty() {
            errs.push(&path, "label key must not be empty");
        } else if key.len() > MAX_LABEL_KEY_LEN {
            errs.push(
                &path,
                format!("label key must be at most {MAX_LABEL_KEY_LEN} bytes"),
            );
        } else if !key.bytes().all(is_label_key_byte) {
            errs.push(&path, "label key must match [A-Za-z0-9._/-]+");
        }
        if value.chars().count() > MAX_LABEL_VALUE_LEN {
            errs.push(
                &path,
                format!("label value must be at most {MAX_LABEL_VALUE_LEN} characters"),
            );
        }
        if value.chars().any(char::is_control) {
            errs.push(&path, "label value must not contain control characters");
        }
    }
}

fn check_spec(s: &CellSpec, errs: &mut ValidationErrors) {
    check_image(s, errs);
    check_command(&s.command, errs);
    if let Some(dir) = &s.working_dir
        && let Err(msg) = check_abs_path(dir)
    {
        errs.push("spec.workingDir", msg);
    }
    check_env(s, errs);
    check_secrets(&s.secrets, errs);
    check_resources(&s.resources, errs);
    check_ports(&s.ports, errs);
    if let Some(v) = &s.volume {
        check_volume(v, errs);
    }
    check_network(&s.network, errs);
    let ttl = s.lifetime.ttl_seconds;
    if ttl == Some(0) {
        errs.push("spec.lifetime.ttlSeconds", "must be > 0");
    } else if ttl.is_some_and(|t| t > MAX_TTL_SECONDS) {
        errs.push(
            "spec.lifetime.ttlSeconds",
            format!("must be <= {MAX_TTL_SECONDS} (30 days)"),
        );
    }
}

fn check_image(s: &CellSpec, errs: &mut ValidationErrors) {
    let image = &s.image;
    if image.is_empty() {
        errs.push("spec.image", "must not be empty");
        return;
    }
    if image.contains('\0') {
        errs.push("spec.image", "must not contain NUL");
        return;
    }
    match s.isolation {
        Isolation::Process if image == "host" => {}
        Isolation::Process => {
            if !is_image_name(image) {
                errs.push(
                    "spec.image",
                    format!(
                        "for isolation process, must be \"host\" or the name of an image in the \
                         store ([a-z0-9][a-z0-9._-]{{0,63}}; import a rootfs with `cellhost image \
                         import NAME --rootfs DIR`), never a host path; got {}",
                        quote(image)
                    ),
                );
            }
        }
        Isolation::Vm | Isolation::Microvm => {
            if !is_image_name(image) {
                errs.push(
                    "spec.image",
                    format!(
                        "for isolation {}, must name an image in the store \
                         ([a-z0-9][a-z0-9._-]{{0,63}}), never a host path; got {}",
                        s.isolation,
                        quote(image)
                    ),
                );
            }
        }
        Isolation::Container => {
            if let Err(msg) = check_image_reference(image) {
                errs.push("spec.image", msg);
            }
        }
    }
}

/// The name of an image in the local store: `[a-z0-9][a-z0-9._-]{0,63}`.
/// No `/`, so never a path; `.` and `..` cannot be names (they start
/// with `.`).
pub fn is_image_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

/// A container engine image reference, `[host[:port]/]path[:tag][@digest]`,
/// checked for form only: the engine resolves it. Never path-like.
fn check_image_reference(r: &str) -> Result<(), String> {
    const MAX: usize = 255;
    let ok_byte =
        |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/' | b':' | b'@');
    if r.len() > MAX {
        Err(format!("must be at most {MAX} bytes"))
    } else if !r.bytes().all(ok_byte) {
        Err(format!(
            "must be an image reference like registry.example/app:1.2 ([A-Za-z0-9._/:@-]), got {}",
            quote(r)
        ))
    } else if r.starts_with(['/', '.', '-', ':', '@']) {
        Err(format!(
            "must start with a letter or digit (an image reference, never a host path), got {}",
            quote(r)
        ))
    } else if r.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        Err(format!(
            "must not contain empty, . or .. components, got {}",
            quote(r)
        ))
    } else {
        Ok(())
    }
}

fn check_command(cmd: &[String], errs: &mut ValidationErrors) {
    if cmd.is_empty() {
        errs.push("spec.command", "must not be empty");
        return;
    }
    if cmd.len() > MAX_COMMAND_ARGS {
        errs.push(
            "spec.command",
            format!("at most {MAX_COMMAND_ARGS} arguments, got {}", cmd.len()),
        );
    }
    let total: usize = cmd.iter().map(|a| a.len() + 1).sum();
    if total > MAX_COMMAND_BYTES {
        errs.push(
            "spec.command",
            format!("total size must be at most {MAX_COMMAND_BYTES} bytes, got {total}"),
        );
    }
    if cmd[0].is_empty() {
        errs.push("spec.command.0", "program must not be empty");
    }
    for (i, arg) in cmd.iter().enumerate() {
        if arg.contains('\0') {
            let mut p = String::from("spec.command");
            push_index(&mut p, i);
            errs.push(p, "must not contain NUL");
        }
    }
}

fn check_env(s: &CellSpec, errs: &mut ValidationErrors) {
    if s.env.len() > MAX_ENV_VARS {
        errs.push(
            "spec.env",
            format!("at most {MAX_ENV_VARS} entries, got {}", s.env.len()),
        );
    }
    let total: usize = s.env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if total > MAX_ENV_BYTES {
        errs.push(
            "spec.env",
            format!(
                "total size (KEY=VALUE\\0 each) must be at most {MAX_ENV_BYTES} bytes, got {total}"
            ),
        );
    }
    for (key, value) in &s.env {
        let path = join("spec.env", key);
        if !is_posix_name(key) {
            errs.push(&path, "env key must match [A-Za-z_][A-Za-z0-9_]*");
        }
        if value.contains('\0') {
            errs.push(&path, "env value must not contain NUL");
        }
    }
}

fn check_secrets(secrets: &[SecretRef], errs: &mut ValidationErrors) {
    if secrets.len() > MAX_SECRETS {
        errs.push(
            "spec.secrets",
            format!("at most {MAX_SECRETS} secrets, got {}", secrets.len()),
        );
    }
    let mut first_use: HashMap<&str, usize> = HashMap::new();
    for (i, secret) in secrets.iter().enumerate() {
        let mut base = String::from("spec.secrets");
        push_index(&mut base, i);
        let name_path = join(&base, "name");
        let name = secret.name.as_str();
        if name.is_empty()
            || name.len() > MAX_SECRET_NAME_LEN
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            errs.push(
                &name_path,
                format!(
                    "must match [A-Za-z0-9_-]{{1,{MAX_SECRET_NAME_LEN}}}, got {}",
                    quote(name)
                ),
            );
        } else if let Some(first) = first_use.get(name) {
            errs.push(
                &name_path,
                format!("duplicate secret name {name:?} (first at spec.secrets.{first}.name)"),
            );
        } else {
            first_use.insert(name, i);
        }
        match &secret.from {
            SecretSource::File(file) => {
                let p = join(&base, "from.file");
                if file.is_empty() {
                    errs.push(p, "must not be empty");
                } else if file.contains('\0') {
                    errs.push(p, "must not contain NUL");
                }
            }
            SecretSource::Env(var) => {
                let p = join(&base, "from.env");
                if var.is_empty() {
                    errs.push(p, "must not be empty");
                } else if !is_posix_name(var) {
                    // Also rules out NUL.
                    errs.push(p, "env name must match [A-Za-z_][A-Za-z0-9_]*");
                }
            }
            SecretSource::Value(_) => {}
        }
    }
}

fn check_resources(r: &Resources, errs: &mut ValidationErrors) {
    if let Some(cpus) = r.cpus {
        let p = "spec.resources.cpus";
        if !cpus.is_finite() {
            errs.push(p, "must be a finite number");
        } else if cpus < MIN_CPUS {
            errs.push(p, format!("must be >= {MIN_CPUS}"));
        } else if cpus > MAX_CPUS {
            errs.push(p, format!("must be <= {MAX_CPUS}"));
        }
    }
    check_range(
        errs,
        "spec.resources.memoryMiB",
        r.memory_mib,
        MIN_MEMORY_MIB,
        MAX_MEMORY_MIB,
    );
    check_range(errs, "spec.resources.pids", r.pids, MIN_PIDS, MAX_PIDS);
    check_range(
        errs,
        "spec.resources.diskGiB",
        r.disk_gib,
        MIN_DISK_GIB,
        MAX_DISK_GIB,
    );
    check_ulimits(&r.ulimits, errs);
}

fn check_ulimits(ulimits: &[Ulimit], errs: &mut ValidationErrors) {
    if ulimits.len() > MAX_ULIMITS {
        errs.push(
            "spec.resources.ulimits",
            format!("at most {MAX_ULIMITS} entries, got {}", ulimits.len()),
        );
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, u) in ulimits.iter().enumerate() {
        let mut base = String::from("spec.resources.ulimits");
        push_index(&mut base, i);
        if !ULIMIT_NAMES.contains(&u.name.as_str()) {
            errs.push(
                join(&base, "name"),
                format!(
                    "unknown rlimit {:?}; one of {}",
                    u.name,
                    ULIMIT_NAMES.join(", ")
                ),
            );
        } else if let Some(first) = seen.insert(u.name.as_str(), i) {
            errs.push(
                join(&base, "name"),
                format!("{} already set by spec.resources.ulimits.{first}", u.name),
            );
        }
        if u.soft > u.hard {
            errs.push(join(&base, "soft"), format!("must be <= hard ({})", u.hard));
        }
        // The kernel's RLIM_INFINITY is u64::MAX; docker takes i64.
        if u.hard > i64::MAX as u64 {
            errs.push(join(&base, "hard"), format!("must be <= {}", i64::MAX));
        }
    }
}

fn check_range(errs: &mut ValidationErrors, path: &str, value: Option<u64>, min: u64, max: u64) {
    match value {
        Some(v) if v < min => errs.push(path, format!("must be >= {min}")),
        Some(v) if v > max => errs.push(path, format!("must be <= {max}")),
        _ => {}
    }
}

fn check_port_number(errs: &mut ValidationErrors, path: &str, port: u32) {
    check_range(errs, path, Some(u64::from(port)), 1, 65_535);
}

fn check_ports(ports: &[Port], errs: &mut ValidationErrors) {
    if ports.len() > MAX_PORTS {
        errs.push(
            "spec.ports",
            format!("at most {MAX_PORTS} ports, got {}", ports.len()),
        );
    }
    let mut first_use: HashMap<(u32, Protocol), usize> = HashMap::new();
    for (i, port) in ports.iter().enumerate() {
        let mut base = String::from("spec.ports");
        push_index(&mut base, i);
        check_port_number(errs, &join(&base, "container"), port.container);
        let host_path = join(&base, "host");
        if port.host == 0 {
            // Any free port of the operator's range: the supervisor's
            // allocator picks one per entry.
            continue;
        }
        check_port_number(errs, &host_path, port.host);
        match first_use.get(&(port.host, port.protocol)) {
            Some(first) => errs.push(
                host_path,
                format!(
                    "host port {}/{} already used by spec.ports.{first}",
                    port.host,
                    port.protocol.as_str()
                ),
            ),
            None => {
                first_use.insert((port.host, port.protocol), i);
            }
        }
    }
}

fn check_volume(v: &Volume, errs: &mut ValidationErrors) {
    match check_abs_path(&v.path) {
        Err(msg) => errs.push("spec.volume.path", msg),
        Ok(()) if is_root_path(&v.path) => errs.push("spec.volume.path", "must not be /"),
        Ok(()) => {}
    }
    check_range(
        errs,
        "spec.volume.sizeGiB",
        Some(v.size_gib),
        MIN_DISK_GIB,
        MAX_DISK_GIB,
    );
}

fn check_network(n: &Network, errs: &mut ValidationErrors) {
    if n.egress.len() > MAX_EGRESS_RULES {
        errs.push(
            "spec.network.egress",
            format!("at most {MAX_EGRESS_RULES} rules, got {}", n.egress.len()),
        );
    }
    for (i, rule) in n.egress.iter().enumerate() {
        let mut base = String::from("spec.network.egress");
        push_index(&mut base, i);
        if let Err(msg) = parse_cidr(&rule.cidr) {
            errs.push(join(&base, "cidr"), msg);
        }
        if let Some(port) = rule.port {
            check_port_number(errs, &join(&base, "port"), port);
        }
    }
    if n.dns.len() > MAX_DNS {
        errs.push(
            "spec.network.dns",
            format!("at most {MAX_DNS} resolvers, got {}", n.dns.len()),
        );
    }
    for (i, addr) in n.dns.iter().enumerate() {
        let mut path = String::from("spec.network.dns");
        push_index(&mut path, i);
        match addr.parse::<Ipv4Addr>() {
            Ok(a) if a.is_unspecified() || a.is_broadcast() || a.is_multicast() => errs.push(
                path,
                format!("must be a unicast IPv4 address, got {}", quote(addr)),
            ),
            Ok(_) => {}
            Err(_) => errs.push(
                path,
                format!(
                    "must be an IPv4 address like 10.0.0.53 (cells have no IPv6), got {}",
                    quote(addr)
                ),
            ),
        }
    }
    check_range(
        errs,
        "spec.network.egressBytesPerSecond",
        n.egress_bytes_per_second,
        MIN_EGRESS_BYTES_PER_SECOND,
        MAX_EGRESS_BYTES_PER_SECOND,
    );
    if n.mode == NetworkMode::None {
        let bridged_only = [
            ("spec.network.egress", !n.egress.is_empty()),
            ("spec.network.dns", !n.dns.is_empty()),
            (
                "spec.network.egressBytesPerSecond",
                n.egress_bytes_per_second.is_some(),
            ),
        ];
        for (path, set) in bridged_only {
            if set {
                errs.push(
                    path,
                    "needs spec.network.mode: bridged (mode none is loopback only)",
                );
            }
        }
    }
}

/// A parsed CIDR block: address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cidr {
    V4(Ipv4Addr, u8),
    V6(Ipv6Addr, u8),
}

/// Parse `addr/prefix` (IPv4 or IPv6) the way validation does: the prefix is
/// required, at most 32 / 128, written in plain decimal, and the address
/// must have no bits set past the prefix (`10.0.0.0/8`, not `10.1.2.3/8`).
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let Some((addr, prefix)) = s.split_once('/') else {
        return Err(format!(
            "must be a CIDR block like 10.0.0.0/8 or 2001:db8::/32, got {}",
            quote(s)
        ));
    };
    if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "prefix length must be a decimal number, got {}",
            quote(prefix)
        ));
    }
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| format!("prefix length out of range: {}", quote(prefix)))?;
    if let Ok(v4) = addr.parse::<Ipv4Addr>() {
        if prefix > 32 {
            return Err(format!("IPv4 prefix length must be <= 32, got {prefix}"));
        }
        let bits = u32::from(v4);
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        if bits & !mask != 0 {
            return Err(format!(
                "address has bits set past the /{prefix} prefix (did you mean {}/{prefix}?)",
                Ipv4Addr::from(bits & mask)
            ));
        }
        Ok(Cidr::V4(v4, prefix))
    } else if let Ok(v6) = addr.parse::<Ipv6Addr>() {
        if prefix > 128 {
            return Err(format!("IPv6 prefix length must be <= 128, got {prefix}"));
        }
        let bits = u128::from(v6);
        let mask = if prefix == 0 {
            0
        } else {
            u128::MAX << (128 - prefix)
        };
        if bits & !mask != 0 {
            return Err(format!(
                "address has bits set past the /{prefix} prefix (did you mean {}/{prefix}?)",
                Ipv6Addr::from(bits & mask)
            ));
        }
        Ok(Cidr::V6(v6, prefix))
    } else {
        Err(format!("not an IPv4 or IPv6 address: {}", quote(addr)))
    }
}

/// `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`
fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// `[A-Za-z0-9._/-]`
fn is_label_key_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'/' | b'-')
}

/// POSIX portable environment name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_posix_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Absolute, no NUL, no `..` component.
fn check_abs_path(p: &str) -> Result<(), String> {
    if p.contains('\0') {
        Err("must not contain NUL".into())
    } else if !p.starts_with('/') {
        Err(format!("must be an absolute path, got {}", quote(p)))
    } else if p.split('/').any(|c| c == "..") {
        Err("must not contain a .. component".into())
    } else {
        Ok(())
    }
}

/// `/`, `//`, `/./`, ...: a path that names the root directory.
fn is_root_path(p: &str) -> bool {
    p.split('/').all(|c| c.is_empty() || c == ".")
}

/// A user value for an error message: quoted, escaped, and cut to 64 chars
/// so one hostile field can't make a huge or multi-line message.
fn quote(s: &str) -> String {
    const MAX: usize = 64;
    let mut out = String::from("\"");
    let mut chars = s.chars();
    for c in chars.by_ref().take(MAX) {
        out.extend(c.escape_debug());
    }
    out.push('"');
    if chars.next().is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use indexmap::IndexMap;

    /// A minimal valid cell.
    fn base() -> Cell {
        Cell {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: Metadata {
                name: "hello".into(),
                labels: IndexMap::new(),
            },
            spec: CellSpec {
                isolation: Isolation::Process,
                image: "host".into(),
                command: vec!["/bin/echo".into(), "hi".into()],
                working_dir: None,
                env: IndexMap::new(),
                secrets: vec![],
                resources: Resources::default(),
                ports: vec![],
                volume: None,
                network: Network::default(),
                lifetime: Lifetime::default(),
            },
        }
    }

    /// Validate, expecting failure; return the errors.
    fn errors(cell: &Cell) -> ValidationErrors {
        validate(cell).expect_err("expected validation errors")
    }

    /// Assert that `cell` fails with exactly one error at `path` whose
    /// message contains `needle`.
    #[track_caller]
    fn assert_one(cell: &Cell, path: &str, needle: &str) {
        let e = errors(cell);
        assert_eq!(e.len(), 1, "expected one error, got:\n{e}");
        assert_eq!(e.errors[0].path, path, "{e}");
        assert!(
            e.errors[0].message.contains(needle),
            "message {:?} lacks {needle:?}",
            e.errors[0].message
        );
    }

    #[track_caller]
    fn assert_ok(cell: &Cell) {
        if let Err(e) = validate(cell) {
            panic!("expected valid, got:\n{e}");
        }
    }

    fn with(f: impl FnOnce(&mut Cell)) -> Cell {
        let mut c = base();
        f(&mut c);
        c
    }

    #[test]
    fn base_and_full_documents_are_valid() {
        assert_ok(&base());
        assert_ok(&crate::parse(crate::fixtures::FULL_YAML).unwrap());
    }

    #[test]
    fn api_version() {
        assert_one(
            &with(|c| c.api_version = "cellhost.dev/v2".into()),
            "apiVersion",
            "must be \"cellhost.dev/v1\", got \"cellhost.dev/v2\"",
        );
    }

    #[test]
    fn kind() {
        assert_one(&with(|c| c.kind = "Pod".into()), "kind", "must be \"Cell\"");
    }

    #[test]
    fn metadata_name() {
        for bad in ["", "-x", ".x", "_x", "a b", "a/b", "é", &"a".repeat(64)] {
            assert_one(
                &with(|c| c.metadata.name = bad.into()),
                "metadata.name",
                "must match",
            );
        }
        for good in ["a", "A.b_c-1", "0", &"a".repeat(63)] {
            assert_ok(&with(|c| c.metadata.name = good.into()));
        }
    }

    #[test]
    fn label_keys() {
        let set = |k: &str| with(|c| _ = c.metadata.labels.insert(k.into(), "v".into()));
        assert_one(&set(""), "metadata.labels.\"\"", "must not be empty");
        assert_one(
            &set(&"k".repeat(64)),
            &format!("metadata.labels.{}", "k".repeat(64)),
            "at most 63",
        );
        assert_one(&set("a b"), "metadata.labels.a b", "[A-Za-z0-9._/-]+");
        assert_one(&set("a\nb"), "metadata.labels.a\\nb", "[A-Za-z0-9._/-]+");
        assert_ok(&set("app.example/tier-1_x"));
        assert_ok(&set(&"k".repeat(63)));
    }

    #[test]
    fn label_values() {
        let set = |v: &str| with(|c| _ = c.metadata.labels.insert("k".into(), v.into()));
        assert_one(&set(&"é".repeat(257)), "metadata.labels.k", "at most 256");
        assert_ok(&set(&"é".repeat(256)));
        assert_one(&set("a\tb"), "metadata.labels.k", "control");
        assert_one(&set("\u{1b}[31m"), "metadata.labels.k", "control");
        assert_ok(&set(""));
        assert_ok(&set("any text, with spaces: fine"));
    }

    #[test]
    fn label_count() {
        let c = with(|c| {
            for i in 0..65 {
                c.metadata.labels.insert(format!("k{i}"), "v".into());
            }
        });
        assert_one(&c, "metadata.labels", "at most 64");
        let c = with(|c| {
            for i in 0..64 {
                c.metadata.labels.insert(format!("k{i}"), "v".into());
            }
        });
        assert_ok(&c);
    }

    #[test]
    fn command_empty() {
        assert_one(
            &with(|c| c.spec.command.clear()),
            "spec.command",
            "must not be empty",
        );
        assert_one(
            &with(|c| c.spec.command = vec!["".into(), "x".into()]),
            "spec.command.0",
            "must not be empty",
        );
        // Empty later arguments are fine (`sh -c ''`).
        assert_ok(&with(|c| {
            c.spec.command = vec!["sh".into(), "-c".into(), "".into()]
        }));
    }

    #[test]
    fn command_nul() {
        assert_one(
            &with(|c| c.spec.command.push("a\0b".into())),
            "spec.command.2",
            "NUL",
        );
    }

    #[test]
    fn command_limits() {
        let c = with(|c| c.spec.command = vec!["x".into(); MAX_COMMAND_ARGS + 1]);
        assert_one(&c, "spec.command", "at most 1024 arguments");
        assert_ok(&with(|c| {
            c.spec.command = vec!["x".into(); MAX_COMMAND_ARGS]
        }));
        // Two args of 64 KiB: over the limit once NUL terminators count.
        let c = with(|c| c.spec.command = vec!["x".repeat(64 * 1024); 2]);
        assert_one(&c, "spec.command", "at most 131072 bytes");
        let c = with(|c| c.spec.command = vec!["x".repeat(64 * 1024 - 1); 2]);
        assert_ok(&c);
    }

    #[test]
    fn working_dir() {
        let set = |d: &str| with(|c| c.spec.working_dir = Some(d.into()));
        assert_one(&set("tmp"), "spec.workingDir", "absolute");
        assert_one(&set(""), "spec.workingDir", "absolute");
        assert_one(&set("/a/../b"), "spec.workingDir", "..");
        assert_one(&set("/a/.."), "spec.workingDir", "..");
        assert_one(&set("/a\0"), "spec.workingDir", "NUL");
        assert_ok(&set("/"));
        assert_ok(&set("/srv/app/..x/.hidden"));
    }

    #[test]
    fn image() {
        let set = |i: &str, iso: Isolation| {
            with(|c| {
                c.spec.image = i.into();
                c.spec.isolation = iso;
            })
        };
        assert_one(
            &set("", Isolation::Container),
            "spec.image",
            "must not be empty",
        );
        assert_one(&set("a\0", Isolation::Vm), "spec.image", "NUL");
        assert_one(
            &set("alpine:3", Isolation::Process),
            "spec.image",
            "\"host\"",
        );
        // Host paths are refused in every tier, `..` included.
        for (p, tier) in [
            ("/srv/../etc", Isolation::Process),
            ("/srv/rootfs", Isolation::Process),
            ("/var/lib/cellhost", Isolation::Process),
            ("..", Isolation::Process),
            ("../etc", Isolation::Process),
            ("/var/lib/docker", Isolation::Container),
            ("./x", Isolation::Container),
            ("a/../b", Isolation::Container),
            ("a//b", Isolation::Container),
            ("/images/k", Isolation::Vm),
            ("../k", Isolation::Microvm),
            ("Debian", Isolation::Microvm),
        ] {
            let errs = errors(&set(p, tier));
            assert!(errs.has_path("spec.image"), "{p} {tier}: {errs}");
        }
        assert_ok(&set("host", Isolation::Process));
        assert_ok(&set("busybox-1.36", Isolation::Process));
        assert_ok(&set("alpine:3", Isolation::Container));
        assert_ok(&set(
            "registry.example:5000/team/app:1.2@sha256:ab",
            Isolation::Container,
        ));
        assert_ok(&set("debian.qcow2", Isolation::Microvm));
    }

    #[test]
    fn env_key_posix() {
        let c = with(|c| _ = c.spec.env.insert("1BAD".into(), "v".into()));
        let e = errors(&c);
        assert_eq!(
            e.errors,
            [FieldError::new(
                "spec.env.1BAD",
                "env key must match [A-Za-z_][A-Za-z0-9_]*"
            )]
        );
        assert_eq!(
            e.to_string(),
            "spec.env.1BAD: env key must match [A-Za-z_][A-Za-z0-9_]*"
        );
        for bad in ["", "A-B", "A=B", "A B", "É", "A\0"] {
            let c = with(|c| _ = c.spec.env.insert(bad.into(), "v".into()));
            assert_one(&c, &join("spec.env", bad), "env key must match");
        }
        for good in ["_", "A", "a_1", "_X9"] {
            assert_ok(&with(|c| _ = c.spec.env.insert(good.into(), "v".into())));
        }
    }

    #[test]
    fn env_key_escaped_in_path() {
        let c = with(|c| _ = c.spec.env.insert("A\nB\u{1b}[2J".into(), "v".into()));
        let e = errors(&c);
        assert_eq!(e.errors[0].path, "spec.env.A\\nB\\u{1b}[2J");
        assert!(!e.to_string().contains('\n'));
        assert!(!e.to_string().contains('\u{1b}'));
    }

    #[test]
    fn env_value_nul() {
        let c = with(|c| _ = c.spec.env.insert("K".into(), "a\0b".into()));
        let e = errors(&c);
        assert_eq!(e.to_string(), "spec.env.K: env value must not contain NUL");
        assert_ok(&with(|c| _ = c.spec.env.insert("K".into(), "".into())));
    }

    #[test]
    fn env_limits() {
        let c = with(|c| {
            for i in 0..=MAX_ENV_VARS {
                c.spec.env.insert(format!("K{i}"), String::new());
            }
        });
        let e = errors(&c);
        assert!(e.has_path("spec.env"), "{e}");
        assert!(e.errors[0].message.contains("at most 4096 entries"), "{e}");
        // "K=" + value + NUL = 128 KiB + 1.
        let c = with(|c| _ = c.spec.env.insert("K".into(), "v".repeat(MAX_ENV_BYTES - 2)));
        assert_one(&c, "spec.env", "at most 131072 bytes");
        let c = with(|c| _ = c.spec.env.insert("K".into(), "v".repeat(MAX_ENV_BYTES - 3)));
        assert_ok(&c);
    }

    fn secret(name: &str, from: SecretSource) -> SecretRef {
        SecretRef {
            name: name.into(),
            from,
        }
    }

    #[test]
    fn secret_names() {
        for bad in ["", "a.b", "../x", "a/b", "a b", &"n".repeat(129)] {
            let c = with(|c| {
                c.spec
                    .secrets
                    .push(secret(bad, SecretSource::Value("v".into())))
            });
            assert_one(&c, "spec.secrets.0.name", "must match [A-Za-z0-9_-]");
        }
        let c = with(|c| {
            c.spec
                .secrets
                .push(secret(&"n".repeat(128), SecretSource::Value("".into())))
        });
        assert_ok(&c);
    }

    #[test]
    fn secret_names_unique() {
        let c = with(|c| {
            c.spec.secrets = vec![
                secret("a", SecretSource::File("/f".into())),
                secret("b", SecretSource::Env("B".into())),
                secret("a", SecretSource::Value("x".into())),
            ]
        });
        assert_one(
            &c,
            "spec.secrets.2.name",
            "duplicate secret name \"a\" (first at spec.secrets.0.name)",
        );
    }

    #[test]
    fn secret_sources() {
        let one = |from: SecretSource| with(|c| c.spec.secrets.push(secret("s", from)));
        assert_one(
            &one(SecretSource::File("".into())),
            "spec.secrets.0.from.file",
            "must not be empty",
        );
        assert_one(
            &one(SecretSource::File("a\0".into())),
            "spec.secrets.0.from.file",
            "NUL",
        );
        assert_one(
            &one(SecretSource::Env("".into())),
            "spec.secrets.0.from.env",
            "must not be empty",
        );
        assert_one(
            &one(SecretSource::Env("A\0".into())),
            "spec.secrets.0.from.env",
            "[A-Za-z_]",
        );
        assert_one(
            &one(SecretSource::Env("MY-VAR".into())),
            "spec.secrets.0.from.env",
            "[A-Za-z_]",
        );
        assert_ok(&one(SecretSource::File("./token".into())));
        assert_ok(&one(SecretSource::Env("TOKEN".into())));
        assert_ok(&one(SecretSource::Value("anything\0at all".into())));
    }

    #[test]
    fn secret_count() {
        let c = with(|c| {
            for i in 0..=MAX_SECRETS {
                c.spec
                    .secrets
                    .push(secret(&format!("s{i}"), SecretSource::Env("X".into())));
            }
        });
        assert_one(&c, "spec.secrets", "at most 64 secrets");
    }

    #[test]
    fn resources_cpus() {
        let set = |v: f64| with(|c| c.spec.resources.cpus = Some(v));
        assert_one(&set(f64::NAN), "spec.resources.cpus", "finite");
        assert_one(&set(f64::INFINITY), "spec.resources.cpus", "finite");
        assert_one(&set(0.0), "spec.resources.cpus", "must be >= 0.01");
        assert_one(&set(-1.0), "spec.resources.cpus", "must be >= 0.01");
        assert_one(&set(1024.5), "spec.resources.cpus", "must be <= 1024");
        assert_ok(&set(0.01));
        assert_ok(&set(1024.0));
    }

    #[test]
    fn resources_memory() {
        let set = |v: u64| with(|c| c.spec.resources.memory_mib = Some(v));
        assert_one(&set(15), "spec.resources.memoryMiB", "must be >= 16");
        assert_one(&set(0), "spec.resources.memoryMiB", "must be >= 16");
        assert_one(
            &set(1_048_577),
            "spec.resources.memoryMiB",
            "must be <= 1048576",
        );
        assert_ok(&set(16));
        assert_ok(&set(1_048_576));
        assert_eq!(
            errors(&set(8)).to_string(),
            "spec.resources.memoryMiB: must be >= 16"
        );
    }

    #[test]
    fn resources_pids() {
        let set = |v: u64| with(|c| c.spec.resources.pids = Some(v));
        assert_one(&set(0), "spec.resources.pids", "must be >= 1");
        assert_one(&set(4_194_305), "spec.resources.pids", "must be <= 4194304");
        assert_ok(&set(1));
        assert_ok(&set(4_194_304));
    }

    #[test]
    fn resources_disk() {
        let set = |v: u64| with(|c| c.spec.resources.disk_gib = Some(v));
        assert_one(&set(0), "spec.resources.diskGiB", "must be >= 1");
        assert_one(&set(65_537), "spec.resources.diskGiB", "must be <= 65536");
        assert_ok(&set(1));
        assert_ok(&set(65_536));
    }

    fn port(container: u32, host: u32, protocol: Protocol) -> Port {
        Port {
            container,
            host,
            protocol,
        }
    }

    #[test]
    fn ulimits() {
        let u = |name: &str, soft, hard| Ulimit {
            name: name.into(),
            soft,
            hard,
        };
        assert_ok(&with(|c| {
            c.spec.resources.ulimits = vec![u("nofile", 1024, 4096), u("core", 0, 0)]
        }));
        assert_one(
            &with(|c| c.spec.resources.ulimits = vec![u("files", 1, 1)]),
            "spec.resources.ulimits.0.name",
            "unknown rlimit",
        );
        assert_one(
            &with(|c| c.spec.resources.ulimits = vec![u("nofile", 8, 4)]),
            "spec.resources.ulimits.0.soft",
            "must be <= hard (4)",
        );
        assert_one(
            &with(|c| c.spec.resources.ulimits = vec![u("nproc", 1, 1), u("nproc", 2, 2)]),
            "spec.resources.ulimits.1.name",
            "already set by spec.resources.ulimits.0",
        );
        assert_one(
            &with(|c| c.spec.resources.ulimits = vec![u("stack", 1, u64::MAX)]),
            "spec.resources.ulimits.0.hard",
            "must be <=",
        );
    }

    #[test]
    fn port_ranges() {
        let one = |p: Port| with(|c| c.spec.ports.push(p));
        assert_one(
            &one(port(0, 80, Protocol::Tcp)),
            "spec.ports.0.container",
            "must be >= 1",
        );
        assert_one(
            &one(port(65_536, 80, Protocol::Tcp)),
            "spec.ports.0.container",
            "must be <= 65535",
        );
        // Host 0: any port of the operator's range, as often as wanted.
        assert_ok(&with(|c| {
            c.spec.ports = vec![port(80, 0, Protocol::Tcp), port(81, 0, Protocol::Tcp)]
        }));
        assert_one(
            &one(port(80, 70_000, Protocol::Udp)),
            "spec.ports.0.host",
            "must be <= 65535",
        );
        assert_ok(&one(port(1, 65_535, Protocol::Udp)));
    }

    #[test]
    fn port_duplicates() {
        let c = with(|c| {
            c.spec.ports = vec![
                port(80, 8080, Protocol::Tcp),
                port(81, 8080, Protocol::Udp), // same host port, other protocol: fine
                port(82, 8080, Protocol::Tcp),
            ]
        });
        assert_one(
            &c,
            "spec.ports.2.host",
            "host port 8080/tcp already used by spec.ports.0",
        );
    }

    #[test]
    fn port_count() {
        let c = with(|c| {
            c.spec.ports = (0..=MAX_PORTS as u32)
                .map(|i| port(80, 10_000 + i, Protocol::Tcp))
                .collect()
        });
        assert_one(&c, "spec.ports", "at most 256 ports");
    }

    #[test]
    fn volume() {
        let set = |p: &str, size: u64| {
            with(|c| {
                c.spec.volume = Some(Volume {
                    path: p.into(),
                    size_gib: size,
                    encrypted: true,
                })
            })
        };
        assert_one(&set("data", 1), "spec.volume.path", "absolute");
        assert_one(&set("/data/../etc", 1), "spec.volume.path", "..");
        assert_one(&set("/", 1), "spec.volume.path", "must not be /");
        assert_one(&set("//./", 1), "spec.volume.path", "must not be /");
        assert_one(&set("/d\0", 1), "spec.volume.path", "NUL");
        assert_one(&set("/data", 0), "spec.volume.sizeGiB", "must be >= 1");
        assert_one(
            &set("/data", 65_537),
            "spec.volume.sizeGiB",
            "must be <= 65536",
        );
        assert_ok(&set("/data", 1));
        assert_ok(&set("/var/lib/app", 65_536));
    }

    fn egress(cidr: &str, port: Option<u32>) -> Cell {
        with(|c| {
            c.spec.network.mode = NetworkMode::Bridged;
            c.spec.network.egress.push(EgressRule {
                cidr: cidr.into(),
                port,
                protocol: None,
            })
        })
    }

    #[test]
    fn egress_cidr() {
        let p = "spec.network.egress.0.cidr";
        for bad in [
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/0008",
            "10.0.0/8",
            "300.0.0.0/8",
            "::/129",
            "fe80::1%eth0/64",
            "host/8",
            "",
            "/8",
            "10.0.0.0/8/8",
            " 10.0.0.0/8",
        ] {
            assert_one(&egress(bad, None), p, "");
        }
        assert_one(&egress("10.1.2.3/8", None), p, "did you mean 10.0.0.0/8?");
        assert_one(
            &egress("2001:db8::1/32", None),
            p,
            "did you mean 2001:db8::/32?",
        );
        for good in [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "1.2.3.4/32",
            "::/0",
            "2001:db8::/32",
            "::1/128",
        ] {
            assert_ok(&egress(good, Some(443)));
        }
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Ok(Cidr::V4(Ipv4Addr::new(10, 0, 0, 0), 8))
        );
    }

    #[test]
    fn egress_port() {
        assert_one(
            &egress("10.0.0.0/8", Some(0)),
            "spec.network.egress.0.port",
            "must be >= 1",
        );
        assert_one(
            &egress("10.0.0.0/8", Some(65_536)),
            "spec.network.egress.0.port",
            "must be <= 65535",
        );
        assert_ok(&egress("10.0.0.0/8", Some(65_535)));
    }

    #[test]
    fn dns_and_rate() {
        let net = |f: &dyn Fn(&mut Network)| {
            with(|c| {
                c.spec.network.mode = NetworkMode::Bridged;
                f(&mut c.spec.network)
            })
        };
        assert_ok(&net(&|n| {
            n.dns = vec!["10.0.0.53".into(), "1.1.1.1".into()]
        }));
        assert_one(
            &net(&|n| n.dns = vec!["10.0.0.53".into(), "2001:db8::53".into()]),
            "spec.network.dns.1",
            "must be an IPv4 address",
        );
        assert_one(
            &net(&|n| n.dns = vec!["0.0.0.0".into()]),
            "spec.network.dns.0",
            "must be a unicast IPv4 address",
        );
        assert_one(
            &net(&|n| n.dns = vec!["10.0.0.1".into(); MAX_DNS + 1]),
            "spec.network.dns",
            "at most 3 resolvers",
        );
        assert_ok(&net(&|n| n.egress_bytes_per_second = Some(1 << 20)));
        assert_one(
            &net(&|n| n.egress_bytes_per_second = Some(10)),
            "spec.network.egressBytesPerSecond",
            "must be >= 1024",
        );
    }

    #[test]
    fn network_settings_need_bridged_mode() {
        let c = with(|c| {
            c.spec.network.dns = vec!["10.0.0.53".into()];
            c.spec.network.egress_bytes_per_second = Some(4096);
        });
        let e = errors(&c);
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["spec.network.dns", "spec.network.egressBytesPerSecond"]
        );
        assert!(e.to_string().contains("needs spec.network.mode: bridged"));
    }

    #[test]
    fn egress_count() {
        let c = with(|c| {
            c.spec.network.mode = NetworkMode::Bridged;
            for _ in 0..=MAX_EGRESS_RULES {
                c.spec.network.egress.push(EgressRule {
                    cidr: "10.0.0.0/8".into(),
                    port: None,
                    protocol: None,
                });
            }
        });
        assert_one(&c, "spec.network.egress", "at most 256 rules");
    }

    #[test]
    fn lifetime() {
        let set = |t: u64| with(|c| c.spec.lifetime.ttl_seconds = Some(t));
        assert_one(&set(0), "spec.lifetime.ttlSeconds", "must be > 0");
        assert_one(
            &set(MAX_TTL_SECONDS + 1),
            "spec.lifetime.ttlSeconds",
            "must be <= 2592000",
        );
        assert_ok(&set(1));
        assert_ok(&set(MAX_TTL_SECONDS));
    }

    #[test]
    fn isolation_error_names_field_and_values() {
        // Isolation is an enum, so serde rejects unknown tiers at parse time.
        let doc = "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {name: x}\nspec: {isolation: jail, command: [a]}\n";
        let e = crate::parse(doc).unwrap_err();
        assert_eq!(e.path(), Some("spec.isolation"));
        let s = e.to_string();
        assert!(
            s.starts_with("spec.isolation: unknown variant `jail`"),
            "{s}"
        );
        assert!(s.contains("process, container, vm, microvm"), "{s}");
    }

    #[test]
    fn reports_all_errors_at_once_in_document_order() {
        let mut c = base();
        c.api_version = "v0".into();
        c.kind = "Pod".into();
        c.metadata.name = "-bad".into();
        c.spec.command.clear();
        c.spec.env.insert("1BAD".into(), "x\0".into());
        c.spec.resources.memory_mib = Some(8);
        c.spec.resources.cpus = Some(0.0);
        c.spec.ports = vec![port(0, 80, Protocol::Tcp), port(1, 80, Protocol::Tcp)];
        c.spec.volume = Some(Volume {
            path: "/".into(),
            size_gib: 0,
            encrypted: false,
        });
        c.spec.network.egress.push(EgressRule {
            cidr: "nope".into(),
            port: Some(0),
            protocol: None,
        });
        c.spec.lifetime.ttl_seconds = Some(0);
        let e = errors(&c);
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "apiVersion",
                "kind",
                "metadata.name",
                "spec.command",
                "spec.env.1BAD",
                "spec.env.1BAD",
                "spec.resources.cpus",
                "spec.resources.memoryMiB",
                "spec.ports.0.container",
                "spec.ports.1.host",
                "spec.volume.path",
                "spec.volume.sizeGiB",
                "spec.network.egress.0.cidr",
                "spec.network.egress.0.port",
                "spec.network.egress",
                "spec.lifetime.ttlSeconds",
            ]
        );
        let text = e.to_string();
        assert_eq!(text.lines().count(), e.len());
        assert!(
            text.contains("spec.resources.memoryMiB: must be >= 16\n"),
            "{text}"
        );
    }

    #[test]
    fn user_values_in_messages_are_bounded_and_escaped() {
        let c = with(|c| c.kind = format!("{}\n", "x".repeat(1000)));
        let e = errors(&c);
        let s = e.to_string();
        assert!(s.len() < 200, "{s}");
        assert!(!s.contains('\n'), "{s}");
    }
}
