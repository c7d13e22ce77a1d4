//! `cellhost run` on the container tier, end to end through the binary:
//! exit codes, output, the shipped example, and a failed pull.
//! Skipped (printed) without a dockerd and the local test image, which
//! `scripts/test` sets up.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{DOCKER_TEST_IMAGE as IMAGE, docker_ready};

fn run(state: &Path, doc: &str) -> std::process::Output {
    run_with(state, doc, &[])
}

fn run_with(state: &Path, doc: &str, extra: &[&str]) -> std::process::Output {
    let file = state.join("doc.yaml");
    std::fs::write(&file, doc).unwrap();
    common::cellhost(state)
        .arg("run")
        .args(extra)
        .arg(&file)
        .output()
        .unwrap()
}

fn doc(image: &str, body: &str) -> String {
    format!(
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{ name: c }}\nspec:\n  isolation: container\n  image: {image}\n{body}"
    )
}

/// Containers of this state dir's instance still in the engine.
fn leftover_containers(state: &Path) -> String {
    let tag = cellhost_core::ids::instance_tag(&state.join("docker"));
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=cellhost.instance={tag}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn run_streams_output_and_exits_with_the_workload_code() {
    if !docker_ready() {
        return;
    }
    let dir = common::state_dir();
    let out = run(
        dir.path(),
        &doc(
            IMAGE,
            "  command: [\"/bin/sh\", \"-c\", \"echo hello-from-container; exit 5\"]\n",
        ),
    );
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello-from-container\n"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("teardown clean"), "{err}");
    assert!(leftover_containers(dir.path()).is_empty());
}

#[test]
fn failed_pull_exits_1_naming_the_image_and_leaves_nothing() {
    if !docker_ready() {
        return;
    }
    let dir = common::state_dir();
    let missing = doc(
        "cellhost-test/no-such-image:none",
        "  command: [\"/bin/true\"]\n",
    );
    // The default policy pulls nothing: refused at admission (exit 3),
    // before the engine is asked.
    let out = run(dir.path(), &missing);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy: images.pull"), "{err}");
    assert!(!err.contains("pulling image"), "{err}");
    // An operator who allows pulls gets the engine's failure, named.
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "images:\n  pull: true\n").unwrap();
    let out = run_with(
        dir.path(),
        &missing,
        &["--policy", policy.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pulling image cellhost-test/no-such-image:none"),
        "no progress line: {err}"
    );
    assert!(err.contains("spec.image: pulling"), "{err}");
    assert!(leftover_containers(dir.path()).is_empty());
}

#[test]
fn the_shipped_example_serves_its_secret_on_the_published_port() {
    if !docker_ready() {
        return;
    }
    let dir = common::state_dir();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/container.yaml");
    let child = common::cellhost(dir.path())
        .arg("run")
        .arg(&example)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut body = String::new();
    for _ in 0..200 {
        body.clear();
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", 18080)) {
            use std::io::Write;
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n");
            let _ = s.read_to_string(&mut body);
            if body.contains("hello from a container cell") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Ctrl-C: the cell is destroyed cleanly.
    let (status, err) = common::interrupt(child);
    assert!(
        body.contains("hello from a container cell"),
        "{body:?}\n{err}"
    );
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("teardown clean"), "{err}");
    assert!(leftover_containers(dir.path()).is_empty());
}

/// A Ctrl-C that lands while the cell is still being made (the container
/// exists, `create` has not returned) is not fatal: the cell is finished or
/// rolled back, then destroyed, and `run` exits 130. Before the fix the
/// default SIGINT action killed `run` and the container was left behind.
#[test]
fn ctrl_c_during_create_destroys_the_half_made_cell() {
    if !docker_ready() {
        return;
    }
    let dir = common::state_dir();
    let file = dir.path().join("doc.yaml");
    std::fs::write(&file, doc(IMAGE, "  command: [\"sleep\", \"600\"]\n")).unwrap();
    let child = common::cellhost(dir.path())
        .arg("run")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while leftover_containers(dir.path()).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no container made");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (status, err) = common::interrupt(child);
    assert_eq!(status.code(), Some(130), "{status:?}\n{err}");
    assert!(err.contains("teardown clean"), "{err}");
    assert!(leftover_containers(dir.path()).is_empty());
}

#[test]
fn bench_container_reports_both_ratios_and_cleans_up() {
    if !docker_ready() {
        return;
    }
    let dir = common::state_dir();
    let out = common::cellhost(dir.path())
        .args(["--json", "bench", "container", "--cells", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for series in [
        "create_to_running",
        "docker_run_d",
        "lifecycle",
        "docker_run_rm",
    ] {
        assert_eq!(v[series]["n"], 2, "{series}: {v}");
        assert!(v[series]["p50_ms"].as_f64().unwrap() > 0.0, "{series}: {v}");
    }
    for ratio in [
        "create_to_running_vs_docker_run_d",
        "lifecycle_vs_docker_run_rm",
    ] {
        let r = v["ratios"][ratio].as_f64().unwrap();
        assert!(r.is_finite() && r > 0.0, "{ratio}: {v}");
    }
    let left = Command::new("docker")
        .args(["ps", "-aq", "--filter", "name=cellhost-bench-"])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "baseline containers left");
}
