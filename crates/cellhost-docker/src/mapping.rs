//! A cell document as a Docker container: names, labels and the create
//! body. Pure: nothing here talks to the engine, so every rule is unit
//! tested.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount, MountType, PortBinding,
    ResourcesUlimits, RestartPolicy, RestartPolicyNameEnum,
};
use cellhost_core::ids::CellId;
use cellhost_spec::{Cell, NetworkMode};

/// Label keys every cellhost object carries.
pub const LABEL_CELL: &str = "cellhost.cell";
pub const LABEL_OWNER: &str = "cellhost.owner";
pub const LABEL_NAME: &str = "cellhost.name";
/// The backend instance (see [`cellhost_core::ids::instance_tag`]): one
/// daemon never lists another's containers.
pub const LABEL_INSTANCE: &str = "cellhost.instance";
/// Document labels are carried as `cellhost.label.<key>`.
pub const LABEL_USER_PREFIX: &str = "cellhost.label.";

/// Where secrets appear inside the container.
pub const SECRETS_TARGET: &str = "/run/secrets";

/// The engine-side names of one cell's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub container: String,
    /// The engine volume that backed a plain `spec.volume` before it was a
    /// file system of its own (see [`crate::volume`]): no longer made;
    /// destroy and the orphan listing still look for it, for cells made by
    /// earlier versions.
    pub volume: String,
}

impl Names {
    pub fn of(id: &CellId) -> Names {
        Names {
            container: id.object_name(),
            volume: format!("{}-data", id.object_name()),
        }
    }
}

/// What the operator decides for every container (not the document).
#[derive(Debug, Clone)]
pub struct Policy {
    /// `unless-stopped` instead of `no`: dockerd restarts the cell after
    /// a crash or a daemon restart.
    pub restart_unless_stopped: bool,
    /// Host address published ports bind to.
    pub publish_address: String,
    /// The engine network bridged cells join.
    pub network: String,
    /// json-file log cap per container, bytes.
    pub log_max_bytes: u64,
    /// Seconds dockerd waits after the stop signal when it stops a
    /// container by itself (its own shutdown).
    pub stop_timeout_secs: i64,
    /// May a missing image be pulled? Off: only images the engine already
    /// has run (the operator's policy `images.pull`).
    pub pull: bool,
}

/// `repo[:tag]` / `repo@digest` as the pull API wants it: `fromImage` and
/// `tag` (the digest goes in `tag`). No tag means `latest`: an empty tag
/// would pull every tag of the repository.
pub fn split_image(image: &str) -> (&str, &str) {
    if let Some((repo, digest)) = image.split_once('@') {
        return (repo, digest);
    }
    let last = image.rfind('/').map_or(0, |i| i + 1);
    match image[last..].rfind(':') {
        Some(i) => (&image[..last + i], &image[last + i + 1..]),
        None => (image, "latest"),
    }
}

pub fn labels(
    id: &CellId,
    instance: &str,
    owner: Option<&str>,
    name: &str,
) -> HashMap<String, String> {
    let mut l = HashMap::from([
        (LABEL_CELL.to_string(), id.to_string()),
        (LABEL_INSTANCE.to_string(), instance.to_string()),
        (LABEL_NAME.to_string(), name.to_string()),
    ]);
    if let Some(o) = owner {
        l.insert(LABEL_OWNER.to_string(), o.to_string());
    }
    l
}

/// How `spec.resources.diskGiB` reaches the engine (see [`crate::disk`]).
#[derive(Debug, Clone)]
pub enum DiskLimit<'a> {
    /// `StorageOpt size` on the writable layer, with the cell's own
    /// read-only network files (`(source, target)`) and `hostname`.
    StorageOpt {
        gib: u64,
        net_files: &'a [(PathBuf, String)],
        hostname: &'a str,
    },
    /// A read-only root; these host dirs bound read-write at these targets.
    Scratch { binds: &'a [(PathBuf, String)] },
}

/// The create body. `secrets_dir` is the host tmpfs holding the secret
/// files (bind-mounted read-only at [`SECRETS_TARGET`]); `volume` is the
/// host dir bound read-write at `spec.volume.path` (the plain volume's or
/// the open encrypted volume's data dir); `disk` enforces
/// `spec.resources.diskGiB` (none: the writable layer is not limited).
pub fn create_body(
    cell: &Cell,
    labels: HashMap<String, String>,
    policy: &Policy,
    secrets_dir: Option<&Path>,
    volume: Option<&Path>,
    disk: Option<&DiskLimit<'_>>,
) -> ContainerCreateBody {
    let spec = &cell.spec;
    let mut labels = labels;
    for (k, v) in &cell.metadata.labels {
        labels.insert(format!("{LABEL_USER_PREFIX}{k}"), v.clone());
    }

    let mut mounts = Vec::new();
    if let Some(dir) = secrets_dir {
        mounts.push(Mount {
            target: Some(SECRETS_TARGET.to_string()),
            source: Some(dir.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Default::default()
        });
    }
    if let (Some(v), Some(dir)) = (&spec.volume, volume) {
        // A bind (not `Binds`): the engine refuses a missing source rather
        // than creating an empty dir, so a closed or unmounted volume
        // cannot start.
        mounts.push(Mount {
            target: Some(v.path.clone()),
            source: Some(dir.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(false),
            ..Default::default()
        });
    }

    let bind = |(src, target): &(PathBuf, String), read_only: bool| Mount {
        target: Some(target.clone()),
        source: Some(src.display().to_string()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Default::default()
    };
    let (mut storage_opt, mut readonly_rootfs, mut hostname) = (None, None, None);
    match disk {
        None => {}
        Some(DiskLimit::StorageOpt {
            gib,
            net_files,
            hostname: h,
        }) => {
            storage_opt = Some(crate::disk::storage_opt(*gib));
            mounts.extend(net_files.iter().map(|f| bind(f, true)));
            hostname = Some(h.to_string());
        }
        Some(DiskLimit::Scratch { binds }) => {
            readonly_rootfs = Some(true);
            mounts.extend(binds.iter().map(|b| bind(b, false)));
        }
    }

    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &spec.ports {
        let key = format!("{}/{}", p.container, p.protocol.as_str());
        exposed.push(key.clone());
        bindings
            .entry(key)
            .or_default()
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: Some(policy.publish_address.clone()),
                host_port: Some(p.host.to_string()),
            });
    }

    let r = &spec.resources;
    let memory = r.memory_mib.map(|m| (m as i64).saturating_mul(1 << 20));
    let ulimits: Vec<ResourcesUlimits> = r
        .ulimits
        .iter()
        .map(|u| ResourcesUlimits {
            name: Some(u.name.clone()),
            // Validated <= i64::MAX by the spec crate.
            soft: Some(u.soft.min(i64::MAX as u64) as i64),
            hard: Some(u.hard.min(i64::MAX as u64) as i64),
        })
        .collect();

    let host_config = HostConfig {
        nano_cpus: r.cpus.map(|c| (c * 1e9).round() as i64),
        memory,
        // No swap beyond the limit: the limit is the limit.
        memory_swap: memory,
        pids_limit: r.pids.map(|p| p as i64),
        ulimits: (!ulimits.is_empty()).then_some(ulimits),
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        mounts: (!mounts.is_empty()).then_some(mounts),
        network_mode: Some(match spec.network.mode {
            NetworkMode::None => "none".to_string(),
            NetworkMode::Bridged => policy.network.clone(),
        }),
        restart_policy: Some(RestartPolicy {
            name: Some(if policy.restart_unless_stopped {
                RestartPolicyNameEnum::UNLESS_STOPPED
            } else {
                RestartPolicyNameEnum::NO
            }),
            maximum_retry_count: None,
        }),
        // docker-init (tini) as PID 1: signals reach the workload and
        // zombies are reaped, as in the process tier's stop semantics.
        init: Some(true),
        security_opt: Some(vec!["no-new-privileges:true".to_string()]),
        // Raw sockets would let a cell spoof traffic on the bridge.
        cap_drop: Some(vec!["NET_RAW".to_string()]),
        storage_opt,
        readonly_rootfs,
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".to_string()),
            config: Some(HashMap::from([
                ("max-size".to_string(), policy.log_max_bytes.to_string()),
                ("max-file".to_string(), "1".to_string()),
            ])),
        }),
        ..Default::default()
    };

    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: Some(spec.command.clone()),
        // Exactly the declared set. The engine adds HOSTNAME, and PATH/HOME
        // when neither the image nor the document sets them; image ENV is
        // the image's own. Nothing of the host's environment is passed.
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        // An empty entrypoint would keep the image's; the document's
        // command is the whole argv, as in every other tier.
        entrypoint: Some(vec![]),
        working_dir: spec.working_dir.clone(),
        hostname,
        labels: Some(labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        stop_timeout: Some(policy.stop_timeout_secs),
        attach_stdin: Some(false),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        tty: Some(false),
        open_stdin: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            restart_unless_stopped: false,
            publish_address: "0.0.0.0".into(),
            network: "cellhost".into(),
            log_max_bytes: 1 << 20,
            stop_timeout_secs: 5,
            pull: true,
        }
    }

    #[test]
    fn image_references() {
        assert_eq!(split_image("busybox"), ("busybox", "latest"));
        assert_eq!(split_image("busybox:1.36"), ("busybox", "1.36"));
        assert_eq!(
            split_image("localhost:5000/team/app"),
            ("localhost:5000/team/app", "latest")
        );
        assert_eq!(
            split_image("localhost:5000/team/app:v2"),
            ("localhost:5000/team/app", "v2")
        );
        assert_eq!(split_image("alpine@sha256:abcd"), ("alpine", "sha256:abcd"));
    }

    #[test]
    fn document_maps_to_engine_fields() {
        let cell = cellhost_spec::parse(
            r#"
apiVersion: cellhost.dev/v1
kind: Cell
metadata: { name: web, labels: { team: a } }
spec:
  isolation: container
  image: busybox
  command: ["httpd", "-f"]
  workingDir: /srv
  env: { B: "2", A: "1" }
  resources:
    cpus: 0.5
    memoryMiB: 64
    pids: 32
    ulimits: [ { name: nofile, soft: 100, hard: 200 } ]
  ports: [ { container: 80, host: 18080 }, { container: 53, host: 10053, protocol: udp } ]
  volume: { path: /data, sizeGiB: 1 }
  network: { mode: bridged }
"#,
        )
        .unwrap();
        let id = CellId::random();
        let body = create_body(
            &cell,
            labels(&id, "inst", Some("alice"), "web"),
            &policy(),
            Some(Path::new("/run/x/secrets")),
            Some(Path::new("/s/cells/x/volume/data")),
            None,
        );
        assert_eq!(body.env.as_deref().unwrap(), ["B=2", "A=1"]);
        assert_eq!(body.entrypoint.as_deref(), Some(&[][..]));
        assert_eq!(body.working_dir.as_deref(), Some("/srv"));
        let l = body.labels.as_ref().unwrap();
        assert_eq!(l[LABEL_CELL], id.to_string());
        assert_eq!(l[LABEL_OWNER], "alice");
        assert_eq!(l["cellhost.label.team"], "a");
        let h = body.host_config.as_ref().unwrap();
        assert_eq!(h.nano_cpus, Some(500_000_000));
        assert_eq!(h.memory, Some(64 << 20));
        assert_eq!(h.memory_swap, Some(64 << 20));
        assert_eq!(h.pids_limit, Some(32));
        assert_eq!(h.network_mode.as_deref(), Some("cellhost"));
        let u = &h.ulimits.as_ref().unwrap()[0];
        assert_eq!(
            (u.name.as_deref(), u.soft, u.hard),
            (Some("nofile"), Some(100), Some(200))
        );
        let b = h.port_bindings.as_ref().unwrap();
        let tcp = b["80/tcp"].as_ref().unwrap();
        assert_eq!(tcp[0].host_port.as_deref(), Some("18080"));
        assert_eq!(tcp[0].host_ip.as_deref(), Some("0.0.0.0"));
        assert!(b.contains_key("53/udp"));
        let m = h.mounts.as_ref().unwrap();
        assert_eq!(m[0].target.as_deref(), Some(SECRETS_TARGET));
        assert_eq!(m[0].read_only, Some(true));
        assert_eq!(m[1].source.as_deref(), Some("/s/cells/x/volume/data"));
        assert_eq!(m[1].target.as_deref(), Some("/data"));
        assert_eq!(m[1].typ, Some(MountType::BIND));
        assert_eq!(m[1].read_only, Some(false));
        assert_eq!(
            h.restart_policy.as_ref().unwrap().name,
            Some(RestartPolicyNameEnum::NO)
        );
    }

    #[test]
    fn loopback_only_and_operator_restart() {
        let cell = cellhost_spec::parse(
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: { name: a }\nspec:\n  isolation: container\n  image: x\n  command: [\"true\"]\n",
        )
        .unwrap();
        let mut p = policy();
        p.restart_unless_stopped = true;
        let body = create_body(&cell, HashMap::new(), &p, None, None, None);
        let h = body.host_config.unwrap();
        assert_eq!(h.network_mode.as_deref(), Some("none"));
        assert!(h.mounts.is_none() && h.port_bindings.is_none());
        assert_eq!(h.nano_cpus, None);
        assert_eq!(
            h.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::UNLESS_STOPPED)
        );
        assert_eq!(body.env, Some(vec![]));
        assert!(h.storage_opt.is_none() && h.readonly_rootfs.is_none());
        assert!(body.hostname.is_none());
    }

    fn cell_with_volume() -> Cell {
        cellhost_spec::parse(
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: { name: a }\nspec:\n  isolation: container\n  image: x\n  command: [\"true\"]\n  volume: { path: /data, sizeGiB: 1 }\n  resources: { diskGiB: 2 }\n",
        )
        .unwrap()
    }

    #[test]
    fn disk_by_storage_opt_makes_the_network_files_read_only() {
        let net = vec![
            (PathBuf::from("/c/net/hosts"), "/etc/hosts".to_string()),
            (
                PathBuf::from("/c/net/hostname"),
                "/etc/hostname".to_string(),
            ),
        ];
        let disk = DiskLimit::StorageOpt {
            gib: 2,
            net_files: &net,
            hostname: "abc",
        };
        let body = create_body(
            &cell_with_volume(),
            HashMap::new(),
            &policy(),
            None,
            Some(Path::new("/c/volume/data")),
            Some(&disk),
        );
        assert_eq!(body.hostname.as_deref(), Some("abc"));
        let h = body.host_config.unwrap();
        assert_eq!(h.storage_opt.unwrap()["size"], "2G");
        assert_eq!(h.readonly_rootfs, None);
        let m = h.mounts.unwrap();
        let hosts = m
            .iter()
            .find(|m| m.target.as_deref() == Some("/etc/hosts"))
            .unwrap();
        assert_eq!(hosts.source.as_deref(), Some("/c/net/hosts"));
        assert_eq!(hosts.read_only, Some(true));
        assert_eq!(hosts.typ, Some(MountType::BIND));
        assert!(m.iter().any(|m| m.target.as_deref() == Some("/data")));
    }

    #[test]
    fn disk_by_scratch_is_a_read_only_root_with_writable_binds() {
        let binds = vec![(PathBuf::from("/c/disk/tmp"), "/tmp".to_string())];
        let disk = DiskLimit::Scratch { binds: &binds };
        let body = create_body(
            &cell_with_volume(),
            HashMap::new(),
            &policy(),
            None,
            None,
            Some(&disk),
        );
        assert!(body.hostname.is_none());
        let h = body.host_config.unwrap();
        assert_eq!(h.readonly_rootfs, Some(true));
        assert!(h.storage_opt.is_none());
        let m = h.mounts.unwrap();
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m[0].target.as_deref(), Some("/tmp"));
        assert_eq!(m[0].source.as_deref(), Some("/c/disk/tmp"));
        assert_eq!(m[0].read_only, Some(false));
    }
}
