//! cgroups: the hierarchy layout (v1, v2 or hybrid) and a child cgroup per
//! controller that takes a limit, made and removed again.

use super::*;

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hierarchy {
    pub(super) mount_point: PathBuf,
    pub(super) v2: bool,
    pub(super) controllers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct CgroupLayout {
    pub(super) version: Option<CgroupVersion>,
    pub(super) v1: Vec<Hierarchy>,
    pub(super) v2: Vec<Hierarchy>,
}

/// v1 controller names the kernel knows (first column of `/proc/cgroups`),
/// or the usual set when that file is missing.
pub(super) fn known_v1_controllers() -> BTreeSet<String> {
    let from_proc: BTreeSet<String> = fs::read_to_string("/proc/cgroups")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    if !from_proc.is_empty() {
        return from_proc;
    }
    cellhost_os::mountinfo::V1_CONTROLLERS
        .iter()
        .map(|c| c.to_string())
        .collect()
}

/// Work out the cgroup layout from parsed mountinfo. v2 controllers come
/// from `read_controllers(mount_point)` (the file `cgroup.controllers`).
pub(super) fn cgroup_layout(
    mounts: &[MountEntry],
    known_v1: &BTreeSet<String>,
    read_controllers: impl Fn(&Path) -> Vec<String>,
) -> CgroupLayout {
    let mut layout = CgroupLayout::default();
    let mut seen_v1: BTreeSet<Vec<String>> = BTreeSet::new();
    for m in mounts {
        match m.fs_type.as_str() {
            "cgroup" => {
                let mut controllers: Vec<String> = m
                    .super_options
                    .split(',')
                    .filter(|o| known_v1.contains(*o))
                    .map(str::to_string)
                    .collect();
                if let Some(name) = m
                    .super_options
                    .split(',')
                    .find_map(|o| o.strip_prefix("name="))
                {
                    controllers.push(format!("name={name}"));
                }
                // The same hierarchy mounted twice (bind mounts, nested
                // containers): keep the first.
                if seen_v1.insert(controllers.clone()) {
                    layout.v1.push(Hierarchy {
                        mount_point: m.mount_point.clone(),
                        v2: false,
                        controllers,
                    });
                }
            }
            // There is one v2 hierarchy; further mounts of it are views of
            // the same tree: keep the first.
            "cgroup2" if layout.v2.is_empty() => {
                layout.v2.push(Hierarchy {
                    mount_point: m.mount_point.clone(),
                    v2: true,
                    controllers: read_controllers(&m.mount_point),
                });
            }
            _ => {}
        }
    }
    layout.version = match (layout.v1.is_empty(), layout.v2.is_empty()) {
        (true, true) => None,
        (false, true) => Some(CgroupVersion::V1),
        (true, false) => Some(CgroupVersion::V2),
        (false, false) => Some(CgroupVersion::Hybrid),
    };
    layout
}

pub(super) fn read_v2_controllers(mount_point: &Path) -> Vec<String> {
    fs::read_to_string(mount_point.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

impl CgroupLayout {
    /// The hierarchy that carries `controller`: a v1 hierarchy first (in
    /// hybrid mode v1 owns it), else the v2 one that lists it.
    pub(super) fn hierarchy_for(&self, controller: &str) -> Option<&Hierarchy> {
        self.v1
            .iter()
            .chain(self.v2.iter())
            .find(|h| h.controllers.iter().any(|c| c == controller))
    }

    pub(super) fn summary(&self) -> String {
        let list = |hs: &[Hierarchy]| {
            hs.iter()
                .map(|h| {
                    let c = if h.controllers.is_empty() {
                        "no controllers".to_string()
                    } else {
                        h.controllers.join(" ")
                    };
                    if h.v2 {
                        format!("{} [{c}]", h.mount_point.display())
                    } else {
                        c
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.version {
            None => "no cgroup filesystem mounted".to_string(),
            Some(CgroupVersion::V1) => format!("v1: {}", list(&self.v1)),
            Some(CgroupVersion::V2) => format!("v2: {}", list(&self.v2)),
            Some(CgroupVersion::Hybrid) => {
                format!("hybrid: v1 {}; v2 {}", list(&self.v1), list(&self.v2))
            }
        }
    }
}

pub(super) struct CgroupCheck {
    pub(super) version: Option<CgroupVersion>,
    /// `cgroup`, `cgroup.cpu`, `cgroup.memory`, `cgroup.pids`.
    pub(super) caps: Vec<Capability>,
}

/// The limit a probe child cgroup gets written, per controller and version.
pub(super) fn limit_file(controller: &str, v2: bool) -> Option<(&'static str, &'static str)> {
    Some(match (controller, v2) {
        ("cpu", false) => ("cpu.cfs_quota_us", "50000"),
        ("cpu", true) => ("cpu.max", "50000 100000"),
        ("memory", false) => ("memory.limit_in_bytes", "67108864"),
        ("memory", true) => ("memory.max", "67108864"),
        ("pids", _) => ("pids.max", "64"),
        _ => return None,
    })
}

pub(super) static PROBE_SEQ: AtomicU64 = AtomicU64::new(0);

/// Why a probe child cgroup could not be made to enforce a limit.
#[derive(Debug, thiserror::Error)]
pub(super) enum CgroupProbeError {
    #[error("mkdir {path}: {source}")]
    Mkdir { path: String, source: io::Error },
    #[error("write {file}: {source}")]
    Write { file: String, source: io::Error },
    #[error("{controller} not enabled in {path}/cgroup.subtree_control")]
    NotDelegated { controller: String, path: String },
    #[error("rmdir {path}: {source} (probe cgroup LEFT BEHIND)")]
    Rmdir { path: String, source: io::Error },
}

/// Make `<base>/cellhost-probe-<pid>-<n>`, write a limit, remove it.
pub(super) fn try_child_cgroup(
    h: &Hierarchy,
    controller: &str,
) -> Result<String, CgroupProbeError> {
    let name = format!(
        "{PROBE_CGROUP_PREFIX}{}-{}",
        std::process::id(),
        PROBE_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let dir = h.mount_point.join(&name);
    fs::create_dir(&dir).map_err(|source| CgroupProbeError::Mkdir {
        path: dir.display().to_string(),
        source,
    })?;
    let wrote = match limit_file(controller, h.v2) {
        None => Ok(String::new()),
        Some((file, value)) => {
            let path = dir.join(file);
            if h.v2 && !path.exists() {
                Err(CgroupProbeError::NotDelegated {
                    controller: controller.to_string(),
                    path: h.mount_point.display().to_string(),
                })
            } else {
                fs::write(&path, value)
                    .map(|()| format!("{file}={value}"))
                    .map_err(|source| CgroupProbeError::Write {
                        file: path.display().to_string(),
                        source,
                    })
            }
        }
    };
    remove_cgroup_dir(&dir)?;
    wrote
}

/// rmdir a cgroup directory, retrying briefly while the kernel still calls
/// it busy. "Already gone" is success.
pub(super) fn remove_cgroup_dir(dir: &Path) -> Result<(), CgroupProbeError> {
    let mut tries = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 20 => {
                tries += 1;
                thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(CgroupProbeError::Rmdir {
                    path: dir.display().to_string(),
                    source,
                });
            }
        }
    }
}

/// Remove probe cgroups a killed probe left: pid gone, older than a minute.
pub(super) fn remove_stale_probe_cgroups(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PROBE_CGROUP_PREFIX))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old {
            let _ = fs::remove_dir(entry.path());
        }
    }
}

pub(super) fn check_cgroups() -> CgroupCheck {
    let mountinfo = match fs::read_to_string("/proc/self/mountinfo") {
        Ok(t) => t,
        Err(e) => {
            let why = format!("cannot read /proc/self/mountinfo: {e}");
            return CgroupCheck {
                version: None,
                caps: vec![
                    Capability::new("cgroup", false, &why),
                    Capability::new("cgroup.cpu", false, &why),
                    Capability::new("cgroup.memory", false, &why),
                    Capability::new("cgroup.pids", false, &why),
                ],
            };
        }
    };
    let layout = cgroup_layout(
        &cellhost_os::mountinfo::parse(&mountinfo),
        &known_v1_controllers(),
        read_v2_controllers,
    );
    let mut per = Vec::new();
    let mut brief = Vec::new();
    for (key, controller) in [
        ("cgroup.cpu", "cpu"),
        ("cgroup.memory", "memory"),
        ("cgroup.pids", "pids"),
    ] {
        let cap = match layout.hierarchy_for(controller) {
            None => Capability::new(
                key,
                false,
                format!("no mounted cgroup hierarchy offers the {controller} controller"),
            ),
            Some(h) => {
                remove_stale_probe_cgroups(&h.mount_point);
                match try_child_cgroup(h, controller) {
                    Ok(wrote) => Capability::new(
                        key,
                        true,
                        format!(
                            "child cgroup under {} created, {wrote} written, removed",
                            h.mount_point.display()
                        ),
                    ),
                    Err(e) => Capability::new(
                        key,
                        false,
                        format!("cannot enforce a {controller} limit: {e}"),
                    ),
                }
            }
        };
        brief.push(format!("{controller} {}", if cap.ok { "ok" } else { "NO" }));
        per.push(cap);
    }
    let all = per.iter().all(|c| c.ok);
    let detail = format!("{}; child cgroups: {}", layout.summary(), brief.join(", "));
    let mut caps = vec![Capability::new(
        "cgroup",
        layout.version.is_some() && all,
        detail,
    )];
    caps.extend(per);
    CgroupCheck {
        version: layout.version,
        caps,
    }
}
