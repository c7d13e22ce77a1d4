//! Reading a policy file: YAML or JSON, strict (unknown fields are
//! errors), every error naming its line's path (`resources.maximums.cpus:
//! must be > 0`).

use std::path::Path;

use crate::Policy;

#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: cellhost_spec::ParseError,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
}

impl Policy {
    /// Read and check a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
            path: shown.clone(),
            source,
        })?;
        Policy::parse(&text).map_err(|e| match e {
            PolicyFileError::Parse { source, .. } => PolicyFileError::Parse {
                path: shown.clone(),
                source,
            },
            PolicyFileError::Invalid { field, message, .. } => PolicyFileError::Invalid {
                path: shown.clone(),
                field,
                message,
            },
            other => other,
        })
    }

    /// Parse and check policy text.
    pub fn parse(text: &str) -> Result<Policy, PolicyFileError> {
        let p: Policy = cellhost_spec::parse_as(text).map_err(|source| PolicyFileError::Parse {
            path: "<policy>".into(),
            source,
        })?;
        p.check()?;
        Ok(p)
    }

    /// The values a file could get wrong; the first problem, by its path.
    pub fn check(&self) -> Result<(), PolicyFileError> {
        let bad = |field: &str, message: String| {
            Err(PolicyFileError::Invalid {
                path: "<policy>".into(),
                field: field.into(),
                message,
            })
        };
        for (which, l) in [
            ("defaults", &self.resources.defaults),
            ("maximums", &self.resources.maximums),
        ] {
            if !(l.cpus.is_finite() && l.cpus >= 0.01) {
                return bad(
                    &format!("resources.{which}.cpus"),
                    format!("must be >= 0.01, got {}", l.cpus),
                );
            }
            for (f, v, min) in [
                ("memoryMiB", l.memory_mib, 16),
                ("pids", l.pids, 1),
                ("nofile", l.nofile, 16),
                ("diskGiB", l.disk_gib, 1),
            ] {
                if v < min {
                    return bad(
                        &format!("resources.{which}.{f}"),
                        format!("must be >= {min}, got {v}"),
                    );
                }
            }
        }
        let (d, m) = (&self.resources.defaults, &self.resources.maximums);
        for (f, over) in [
            ("cpus", d.cpus > m.cpus),
            ("memoryMiB", d.memory_mib > m.memory_mib),
            ("pids", d.pids > m.pids),
            ("nofile", d.nofile > m.nofile),
            ("diskGiB", d.disk_gib > m.disk_gib),
        ] {
            if over {
                return bad(
                    &format!("resources.defaults.{f}"),
                    format!("must not exceed resources.maximums.{f}"),
                );
            }
        }
        if self.lease.default_seconds == 0 || self.lease.default_seconds > self.lease.max_seconds {
            return bad(
                "lease.defaultSeconds",
                "must be 1..=lease.maxSeconds".into(),
            );
        }
        if self.lease.max_seconds > cellhost_spec::limits::MAX_TTL_SECONDS {
            return bad(
                "lease.maxSeconds",
                format!(
                    "must be <= {} (what a document may ask)",
                    cellhost_spec::limits::MAX_TTL_SECONDS
                ),
            );
        }
        if self.ports.min == 0 || self.ports.min > self.ports.max {
            return bad("ports", "min must be 1..=max".into());
        }
        if self.log_bytes < 4096 {
            return bad("logBytes", "must be >= 4096".into());
        }
        let end = u64::from(self.uids.start) + u64::from(self.uids.count) * 65_536;
        if self.uids.count == 0 || end > u64::from(u32::MAX) {
            return bad(
                "uids",
                "count must be >= 1 and start + count × 65536 must fit in 32 bits".into(),
            );
        }
        if !self.uids.start.is_multiple_of(65_536) {
            return bad(
                "uids.start",
                "must be a multiple of 65536: every store cuts the host's ids into the same slots, \
                 so two stores' ranges are either one or apart"
                    .into(),
            );
        }
        if self.uids.start < 65_536 * 16 {
            return bad(
                "uids.start",
                "must be >= 1048576: below that are the host's own accounts".into(),
            );
        }
        for r in &self.egress.resolvers {
            if r.is_loopback() || r.is_unspecified() {
                return bad(
                    "egress.resolvers",
                    format!("{r} is the host's loopback: a cell's 127.0.0.1 is its own"),
                );
            }
        }
        let t = &self.tenants;
        if t.max_cells == 0 || t.max_streams == 0 || t.burst == 0 {
            return bad(
                "tenants",
                "maxCells, maxStreams and burst must be >= 1".into(),
            );
        }
        if !(t.requests_per_second.is_finite() && t.requests_per_second > 0.0) {
            return bad("tenants.requestsPerSecond", "must be > 0".into());
        }
        if let Some(names) = &self.images.names {
            for (i, n) in names.iter().enumerate() {
                if !cellhost_spec::is_image_name(n) {
                    return bad(
                        &format!("images.names.{i}"),
                        format!("{n:?} is not an image name ([a-z0-9][a-z0-9._-]{{0,63}})"),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_checks_and_a_file_overrides_parts() {
        Policy::default().check().unwrap();
        let p = Policy::parse(
            "tiers: [process]\nresources:\n  defaults: { cpus: 0.25, memoryMiB: 64, pids: 32, nofile: 256, diskGiB: 1 }\n  maximums: { cpus: 1, memoryMiB: 512, pids: 128, nofile: 1024, diskGiB: 2 }\nports: { min: 20000, max: 20100 }\negress:\n  resolvers: [10.1.0.53]\n  deny: [192.0.2.0/24]\n",
        )
        .unwrap();
        assert_eq!(p.tiers, Some(vec![cellhost_spec::Isolation::Process]));
        assert_eq!(p.resources.defaults.pids, 32);
        assert_eq!(p.ports.max, 20100);
        assert_eq!(
            p.lease,
            crate::Lease::default(),
            "unset sections keep defaults"
        );
        assert_eq!(p.egress.allow, vec![crate::Net::ANY]);
    }

    #[test]
    fn errors_name_the_line() {
        let e = |t: &str| Policy::parse(t).unwrap_err().to_string();
        assert!(e("tierz: []").contains("tierz"), "{}", e("tierz: []"));
        assert!(
            e("resources: { defaults: { cpus: 9, memoryMiB: 64, pids: 1, nofile: 64, diskGiB: 1 } }")
                .contains("resources.defaults.cpus: must not exceed"),
        );
        assert!(e("ports: { min: 30000, max: 20000 }").contains("ports"));
        assert!(e("egress: { resolvers: [127.0.0.53] }").contains("egress.resolvers"));
        assert!(e("egress: { allow: [10.1.2.3/8] }").contains("egress.allow"));
        assert!(e("uids: { start: 1000, count: 1 }").contains("uids.start"));
        assert!(e("uids: { start: 1073745920, count: 1 }").contains("multiple of 65536"));
        assert!(e("images: { names: [\"../x\"] }").contains("images.names.0"));
        assert!(e("lease: { defaultSeconds: 0 }").contains("lease.defaultSeconds"));
    }

    #[test]
    fn load_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("policy.yaml");
        std::fs::write(&p, "netRaw: maybe\n").unwrap();
        let e = Policy::load(&p).unwrap_err().to_string();
        assert!(e.contains("policy.yaml") && e.contains("netRaw"), "{e}");
        assert!(Policy::load(&d.path().join("none")).is_err());
    }
}
