//! Which processes run as a cell's leased uid range: teardown gives a
//! range back only when none does.

use cellhost_core::UidRange;

/// Live processes (zombies included: they still hold their ids) whose
/// real, effective, saved or filesystem uid or gid is in `range`, as
/// `(pid, first such id)`. Read from `/proc/<pid>/status`; a process that
/// ends while being read is skipped.
pub fn processes_in(range: UidRange) -> Vec<(i32, u32)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if let Some(id) = ids_in_status(&status).find(|id| range.contains(*id)) {
            out.push((pid, id));
        }
    }
    out
}

/// Every id on the `Uid:` and `Gid:` lines of a `/proc/<pid>/status`.
fn ids_in_status(status: &str) -> impl Iterator<Item = u32> + '_ {
    status
        .lines()
        .filter_map(|l| l.strip_prefix("Uid:").or_else(|| l.strip_prefix("Gid:")))
        .flat_map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse::<u32>().ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_ids_are_read() {
        let s = "Name:\tsh\nUid:\t0\t1000\t0\t0\nGid:\t5\t5\t5\t5\nGroups:\t7\n";
        let ids: Vec<u32> = ids_in_status(s).collect();
        assert_eq!(ids, vec![0, 1000, 0, 0, 5, 5, 5, 5]);
    }

    #[test]
    fn finds_this_process_by_its_uid() {
        let me = nix::unistd::getuid().as_raw();
        let found = processes_in(UidRange { base: me, size: 1 });
        let pid = std::process::id() as i32;
        assert!(found.iter().any(|(p, _)| *p == pid), "{found:?}");
    }
}
