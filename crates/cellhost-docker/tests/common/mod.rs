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

impl Engine {
    /// Where the engine keeps btrfs subvolumes whose quota accounting is
    /// inconsistent (the kernel then enforces no `storage_opt size`, and
    /// the backend gives sized cells scratch instead), rescan them first,
    /// as an operator would, so a test of storage-opt tests storage-opt.
    /// Printed when it does.
    pub async fn repair_qgroups(&self) {
        let info = self.docker.info().await.expect("docker info");
        if info.driver.as_deref() != Some("btrfs") {
            return;
        }
        let root = std::path::PathBuf::from(info.docker_root_dir.unwrap_or_default());
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        if let Err(why) =
            cellhost_docker::disk::btrfs_qgroups_hold(&mi, std::path::Path::new("/sys"), &root)
        {
            eprintln!("{why}: rescanning");
            let st = std::process::Command::new("btrfs")
                .args(["quota", "rescan", "-w"])
                .arg(&root)
                .status()
                .expect("btrfs");
            assert!(st.success(), "btrfs quota rescan -w {}", root.display());
        }
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
