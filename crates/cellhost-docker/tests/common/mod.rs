//! Shared helpers for the tests against a real Docker Engine.
//!
//! Every test first asks [`engine`]: it returns `None`, after printing why,
//! when no dockerd answers or the local test image is missing
//! (`scripts/test` starts dockerd and imports the image, so CI runs them).

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use cellhost_core::ids::CellId;
use cellhost_core::{Backend, CellHandle, CellState, CellStatus, CreateRequest, SecretValue};
use cellhost_docker::{DockerBackend, DockerConfig};
use cellhost_spec::Cell;
use zeroize::Zeroizing;

/// Imported by scripts/test from a busybox-static rootfs (no registry).
pub const IMAGE: &str = "cellhost-test/busybox:latest";

pub struct Engine {
    pub backend: Arc<DockerBackend>,
    pub docker: bollard::Docker,
    _dir: tempfile::TempDir,
}

/// A backend on a fresh state dir, or `None` (printed) when this host has
/// no engine or no test image.
pub async fn engine() -> Option<Engine> {
    engine_with(|_| {}).await
}

pub async fn engine_with(tune: impl FnOnce(&mut DockerConfig)) -> Option<Engine> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: not root (the container tier mounts secrets tmpfs)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DockerConfig::new(dir.path().join("docker"));
    tune(&mut cfg);
    let backend = Arc::new(DockerBackend::new(cfg));
    let docker = match backend.client().await {
        Ok(d) => d.clone(),
        Err(e) => {
            eprintln!("SKIP: no docker engine answers ({e}); scripts/test starts one");
            return None;
        }
    };
    if docker.inspect_image(IMAGE).await.is_err() {
        eprintln!("SKIP: test image {IMAGE} missing; scripts/test imports it");
        return None;
    }
    Some(Engine {
        backend,
        docker,
        _dir: dir,
    })
}

/// Held by the tests that opt in to btrfs storage-opt, so one's quota
/// reset never lands in another's fill.
pub static QGROUPS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Engine {
    /// On a btrfs engine, reset its quotas (disable, enable, rescan), as
    /// an operator who opted in to btrfs storage-opt must: the kernel
    /// stopped enforcing limits mid-suite here, and a rescan that cleared
    /// the inconsistent flag did not bring enforcement back (a container
    /// wrote 3 GiB under `size=1G`); only disabling and enabling did. The
    /// returned guard keeps other opt-in tests from resetting meanwhile.
    pub async fn reset_qgroups(&self) -> tokio::sync::MutexGuard<'static, ()> {
        let guard = QGROUPS.lock().await;
        let info = self.docker.info().await.expect("docker info");
        if info.driver.as_deref() == Some("btrfs") {
            let root = info.docker_root_dir.unwrap_or_default();
            for args in [
                &["quota", "disable"][..],
                &["quota", "enable"],
                &["quota", "rescan", "-w"],
            ] {
                let out = std::process::Command::new("btrfs")
                    .args(args)
                    .arg(&root)
                    .output()
                    .expect("btrfs");
                assert!(out.status.success(), "btrfs {args:?} {root}: {out:?}");
            }
        }
        guard
    }
}

pub fn cell(body: &str) -> Cell {
    let doc = format!(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{ name: t }}\nspec:\n  isolation: container\n  image: {IMAGE}\n{body}"
    );
    cellhost_spec::parse_and_validate(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"))
}

pub fn secret(name: &str, value: &str) -> SecretValue {
    SecretValue {
        name: name.into(),
        value: Zeroizing::new(value.as_bytes().to_vec()),
    }
}

impl Engine {
    pub async fn create(&self, cell: Cell, secrets: Vec<SecretValue>) -> CellHandle {
        self.backend
            .create(CreateRequest {
                id: CellId::random(),
                cell,
                secrets,
                owner: Some("tester".into()),
                volume_key: None,
                uids: None,
                address: None,
            })
            .await
            .expect("create")
    }

    /// Create and start.
    pub async fn run(&self, cell: Cell, secrets: Vec<SecretValue>) -> CellHandle {
        let h = self.create(cell, secrets).await;
        self.backend.start(&h).await.expect("start");
        h
    }

    /// Wait for the workload to end.
    pub async fn wait(&self, h: &CellHandle) -> CellStatus {
        let st = tokio::time::timeout(Duration::from_secs(60), self.backend.wait(h))
            .await
            .expect("workload did not end within 60 s")
            .expect("wait");
        assert_eq!(st.state, CellState::Exited, "{st:?}");
        st
    }

    pub async fn log(&self, h: &CellHandle) -> String {
        String::from_utf8(self.backend.logs(h, 0).await.unwrap().data).unwrap()
    }

    /// The log once it has `lines` lines (or whatever it has after 5 s).
    pub async fn log_lines(&self, h: &CellHandle, lines: usize) -> String {
        let mut log = String::new();
        for _ in 0..250 {
            log = self.log(h).await;
            if log.lines().count() >= lines {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        log
    }

    /// Destroy and insist on a clean report.
    pub async fn destroy(&self, h: &CellHandle) {
        let r = self.backend.destroy(h).await.expect("destroy");
        assert!(r.is_clean(), "{}", r.summary());
    }
}
