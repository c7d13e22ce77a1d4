//! What destroy checked, and what it found left.
//!
//! A [`TeardownReport`] is the proof that a cell left nothing behind. Each
//! [`Check`] names one kind of host object (process tree, cgroup, mounts,
//! state dir, secrets, ...), what was looked at, and how many of them were
//! still there *after* teardown. Zero everywhere is the only passing answer.

use serde::{Deserialize, Serialize};

/// One residue check made after teardown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Stable name of the check: `processes`, `cgroup`, `mounts`, ...
    pub name: String,
    /// What was inspected, e.g. the cgroup paths or the state dir.
    pub target: String,
    /// How many objects of this kind were found left after teardown.
    pub residue: u64,
    /// Human detail when residue is non-zero (which pids, which mounts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownReport {
    pub cell_id: String,
    pub checks: Vec<Check>,
    /// Teardown steps that failed (the report may still be clean if a later
    /// step removed the object anyway).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// True when the cell had already been destroyed before this call.
    #[serde(default)]
    pub already_gone: bool,
}

impl TeardownReport {
    pub fn new(cell_id: impl Into<String>) -> Self {
        TeardownReport {
            cell_id: cell_id.into(),
            ..Default::default()
        }
    }

    /// Record a check with its residue count.
    pub fn check(&mut self, name: &str, target: impl Into<String>, residue: u64) {
        self.checks.push(Check {
            name: name.to_string(),
            target: target.into(),
            residue,
            detail: None,
        });
    }

    /// Record a check whose residue comes with detail (only kept if non-zero).
    pub fn check_detail(
        &mut self,
        name: &str,
        target: impl Into<String>,
        residue: u64,
        detail: impl Into<String>,
    ) {
        self.checks.push(Check {
            name: name.to_string(),
            target: target.into(),
            residue,
            detail: (residue > 0).then(|| detail.into()),
        });
    }

    pub fn error(&mut self, msg: impl Into<String>) {
        self.errors.push(msg.into());
    }

    /// Total objects left across all checks.
    pub fn residue(&self) -> u64 {
        self.checks.iter().map(|c| c.residue).sum()
    }

    /// Clean means: at least one check was made and every count is zero.
    /// A report that checked nothing proves nothing and is not clean.
    pub fn is_clean(&self) -> bool {
        !self.checks.is_empty() && self.residue() == 0
    }

    /// One line: `teardown clean: 6 checks, 0 residue` or what was left.
    pub fn summary(&self) -> String {
        if self.is_clean() {
            format!(
                "teardown clean: {} checks ({}), 0 residue",
                self.checks.len(),
                self.checks
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else if self.checks.is_empty() {
            "teardown unverified: no checks were made".to_string()
        } else {
            let left: Vec<String> = self
                .checks
                .iter()
                .filter(|c| c.residue > 0)
                .map(|c| match &c.detail {
                    Some(d) => format!("{}={} ({d})", c.name, c.residue),
                    None => format!("{}={}", c.name, c.residue),
                })
                .collect();
            format!("teardown LEFT RESIDUE: {}", left.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_report_is_not_clean() {
        assert!(!TeardownReport::new("x").is_clean());
    }

    #[test]
    fn any_residue_makes_it_dirty() {
        let mut r = TeardownReport::new("x");
        r.check("processes", "cgroup", 0);
        assert!(r.is_clean());
        r.check_detail("mounts", "/proc/self/mountinfo", 2, "/a, /b");
        assert!(!r.is_clean());
        assert_eq!(r.residue(), 2);
        assert!(r.summary().contains("mounts=2 (/a, /b)"), "{}", r.summary());
    }

    #[test]
    fn detail_dropped_when_clean() {
        let mut r = TeardownReport::new("x");
        r.check_detail("files", "/tmp/x", 0, "nothing");
        assert_eq!(r.checks[0].detail, None);
        assert!(r.summary().starts_with("teardown clean: 1 checks (files)"));
    }
}
