//! The `cellhost` binary end to end: exit codes, run, ttl, Ctrl-C, secrets
//! hygiene across argv, log and store.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cellhost;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const HEAD: &str =
    "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata:\n  name: t\nspec:\n  isolation: process\n";

#[test]
fn validate_lists_every_problem_and_exits_3() {
    let dir = common::state_dir();
    let bad = write(
        dir.path(),
        "bad.yaml",
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata:\n  name: -bad\nspec:\n  isolation: process\n  command: [\"/bin/true\"]\n  env: { 1BAD: x }\n  resources: { memoryMiB: 1 }\n  lifetime: { ttlSeconds: 0 }\n",
    );
    let out = cellhost(dir.path())
        .arg("validate")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "metadata.name",
        "spec.env.1BAD",
        "spec.resources.memoryMiB",
        "spec.lifetime.ttlSeconds",
    ] {
        assert!(
            err.contains(&format!(": {path}: ")),
            "missing {path} in:\n{err}"
        );
    }
    let out = cellhost(dir.path())
        .args(["--json", "validate"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"].as_array().unwrap().len(), 4, "{v}");

    let good = write(
        dir.path(),
        "good.yaml",
        &format!("{HEAD}  command: [\"/bin/true\"]\n"),
    );
    let out = cellhost(dir.path())
        .arg("validate")
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = cellhost(dir.path())
        .arg("validate")
        .arg(dir.path().join("missing.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let out = cellhost(dir.path()).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn unavailable_tier_exits_4() {
    let dir = common::state_dir();
    let doc = write(
        dir.path(),
        "vm.yaml",
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata:\n  name: t\nspec:\n  isolation: microvm\n  image: x\n  command: [\"/bin/true\"]\n",
    );
    let out = cellhost(dir.path()).arg("run").arg(&doc).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    if cellhost_host::probe::which("qemu-system-x86_64").is_none() {
        // No qemu: the tier itself is missing.
        assert_eq!(out.status.code(), Some(4), "{err}");
        assert!(err.contains("microvm"), "{err}");
    } else {
        // The tier runs here; the document names an image the store lacks.
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains("spec.image") && err.contains("cellhost image ls"),
            "{err}"
        );
        // Ports on a microVM need bridged networking: the document is
        // refused naming the field.
        let doc = write(
            dir.path(),
            "mvports.yaml",
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata:\n  name: t\nspec:\n  isolation: microvm\n  image: x\n  command: [\"/bin/true\"]\n  ports: [ { container: 80, host: 18080 } ]\n",
        );
        let out = cellhost(dir.path()).arg("run").arg(&doc).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains("spec.ports") && err.contains("network.mode: bridged"),
            "{err}"
        );
    }

    // A process cell publishing ports without a network to publish from.
    let doc = write(
        dir.path(),
        "ports.yaml",
        &format!(
            "{HEAD}  command: [\"/bin/true\"]\n  ports: [ {{ container: 80, host: 18080 }} ]\n"
        ),
    );
    let out = cellhost(dir.path()).arg("run").arg(&doc).output().unwrap();
    if common::process_tier_missing().is_none() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains("spec.ports") && err.contains("network.mode: bridged"),
            "{err}"
        );
    }
}

#[test]
fn run_streams_output_and_returns_the_exit_code() {
    require_process_tier!();
    let dir = common::state_dir();
    let doc = write(
        dir.path(),
        "c.yaml",
        &format!("{HEAD}  command: [\"/bin/sh\", \"-c\", \"echo hello; exit 7\"]\n"),
    );
    let out = cellhost(dir.path()).arg("run").arg(&doc).output().unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exited with code 7") && err.contains("teardown clean"),
        "{err}"
    );

    let out = cellhost(dir.path())
        .args(["--json", "run"])
        .arg(&doc)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exitCode"], 7);
    assert_eq!(v["output"], "hello\n");
    assert_eq!(
        v["teardown"]["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["residue"].as_u64().unwrap())
            .sum::<u64>(),
        0
    );
    // A clean run leaves no record behind.
    let db = std::fs::read(dir.path().join("cellhost.db")).unwrap();
    assert!(!db.is_empty());
}

#[test]
fn lease_expiry_kills_the_cell() {
    require_process_tier!();
    let dir = common::state_dir();
    let doc = write(
        dir.path(),
        "c.yaml",
        &format!("{HEAD}  command: [\"/bin/sleep\", \"60\"]\n  lifetime: {{ ttlSeconds: 1 }}\n"),
    );
    let t0 = Instant::now();
    let out = cellhost(dir.path()).arg("run").arg(&doc).output().unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGKILL));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lease of 1s expired"), "{err}");
    assert!(err.contains("teardown clean"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the 60 s sleep was not cut short"
    );
}

#[test]
fn ctrl_c_destroys_the_cell_cleanly() {
    require_process_tier!();
    let dir = common::state_dir();
    let doc = write(
        dir.path(),
        "c.yaml",
        &format!("{HEAD}  command: [\"/bin/sh\", \"-c\", \"echo up; sleep 60\"]\n"),
    );
    let mut child = cellhost(dir.path())
        .arg("run")
        .arg(&doc)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 3];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"up\n");
    let (status, err) = common::interrupt(child);
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{err}");
    assert!(
        err.contains("interrupted") && err.contains("teardown clean"),
        "{err}"
    );
    let cells = dir.path().join("process/cells");
    assert_eq!(std::fs::read_dir(&cells).map(|d| d.count()).unwrap_or(0), 0);
}

/// Every /proc/*/cmdline on the host, concatenated.
fn all_cmdlines() -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
            && let Ok(c) = std::fs::read(e.path().join("cmdline"))
        {
            all.extend_from_slice(&c);
            all.push(b'\n');
        }
    }
    all
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn secrets_never_reach_argv_log_or_store() {
    require_process_tier!();
    let dir = common::state_dir();
    let from_file = "file-secret-7f3a9c1e";
    let from_env = "env-secret-55b2d0aa";
    let inline = "inline-secret-c0ffee42";
    write(dir.path(), "tok", from_file);
    let doc = write(
        dir.path(),
        "s.yaml",
        &format!(
            "{HEAD}  command: [\"/bin/sh\", \"-c\", \"for f in /run/secrets/*; do stat -c '%n %a' $f; done; echo ready; sleep 2\"]\n  secrets:\n    - {{ name: a, from: {{ file: tok }} }}\n    - {{ name: b, from: {{ env: CELLHOST_TEST_SECRET }} }}\n    - {{ name: c, from: {{ value: {inline} }} }}\n"
        ),
    );
    let mut child = cellhost(dir.path())
        .arg("run")
        .arg(&doc)
        .env("CELLHOST_TEST_SECRET", from_env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !contains(&seen, b"ready") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "cell ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    // While the cell runs: no process's argv holds any secret (the env
    // secret is in the cellhost run process's environment by the test's own
    // doing, not in argv).
    let cmdlines = all_cmdlines();
    for s in [from_file, from_env, inline] {
        assert!(
            !contains(&cmdlines, s.as_bytes()),
            "secret {s} in some /proc/*/cmdline"
        );
    }
    // The store, including its WAL, while the record exists.
    for f in ["cellhost.db", "cellhost.db-wal"] {
        let bytes = std::fs::read(dir.path().join(f)).unwrap_or_default();
        for s in [from_file, from_env, inline] {
            assert!(!contains(&bytes, s.as_bytes()), "secret {s} in {f}");
        }
    }
    let status = child.wait().unwrap();
    stdout.read_to_end(&mut seen).unwrap();
    let mut err = Vec::new();
    child.stderr.take().unwrap().read_to_end(&mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{}", String::from_utf8_lossy(&err));
    let out = String::from_utf8_lossy(&seen);
    assert!(
        out.contains("/run/secrets/a 400")
            && out.contains("/run/secrets/b 400")
            && out.contains("/run/secrets/c 400"),
        "{out}"
    );
    for s in [from_file, from_env, inline] {
        assert!(
            !contains(&seen, s.as_bytes()) && !contains(&err, s.as_bytes()),
            "secret {s} in the cell log or cellhost output"
        );
        for f in ["cellhost.db", "cellhost.db-wal"] {
            let bytes = std::fs::read(dir.path().join(f)).unwrap_or_default();
            assert!(
                !contains(&bytes, s.as_bytes()),
                "secret {s} in {f} after the run"
            );
        }
    }
}

#[test]
fn doctor_reports_every_capability_and_tier() {
    let dir = common::state_dir();
    let out = cellhost(dir.path())
        .args(["--json", "doctor"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for key in cellhost_host::probe::KEYS {
        assert!(names.contains(key), "doctor lacks {key}: {names:?}");
    }
    let tiers: Vec<&str> = v["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tier"].as_str().unwrap())
        .collect();
    assert_eq!(tiers, ["process", "container", "vm", "microvm"]);
    // The docker line must agree with whether the socket answers.
    let docker_ok = v["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "docker")
        .unwrap()["ok"]
        .as_bool()
        .unwrap();
    let sock = std::os::unix::net::UnixStream::connect("/var/run/docker.sock").is_ok();
    if std::env::var_os("DOCKER_HOST").is_none() {
        assert_eq!(
            docker_ok, sock,
            "doctor's docker line disagrees with a direct connect"
        );
    }
    let human = cellhost(dir.path()).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("yes") || l.starts_with("no")),
        "{text}"
    );
}

/// `bench api` measures its three paths (backend, supervisor, the API)
/// end to end, each cell under a leased uid range, and leaves nothing.
#[test]
fn bench_api_measures_three_paths_and_cleans_up() {
    require_process_tier!();
    let dir = common::state_dir();
    let out = cellhost(dir.path())
        .args(["--json", "bench", "api", "--cells", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for path in ["backend_direct", "supervisor_direct", "api"] {
        assert_eq!(v[path]["n"], 2, "{v}");
        assert!(v[path]["cells_per_s"].as_f64().unwrap() > 0.0, "{v}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bench-api"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn bench_guest_reports_pings_execs_and_cleans_up() {
    // The agent binary sits next to cellhost when the workspace is built
    // (cargo test --workspace builds every package's binaries first).
    let agent = common::cellhost_bin().with_file_name("cellhost-agent");
    if !agent.is_file() {
        println!(
            "skipped: {} not built (run the workspace tests)",
            agent.display()
        );
        return;
    }
    let dir = common::state_dir();
    let out = cellhost(dir.path())
        .args(["--json", "bench", "guest", "--cells", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pings = v["pings"].as_array().unwrap();
    assert!(!pings.is_empty(), "{v}");
    for p in pings {
        assert_eq!(p["ping"]["n"], 30, "{v}");
        assert_eq!(p["echo_baseline"]["n"], 30, "{v}");
        assert!(p["ping_ratio_vs_echo"].as_f64().unwrap() > 0.0, "{v}");
    }
    assert_eq!(v["exec_true"]["n"], 3, "{v}");
    assert!(v["exec_ratio_vs_spawn"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["ping_target_met"].is_boolean(), "{v}");
    // Its scratch dir (agent state, sockets) is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bench-guest"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A missing agent is a clear error, not a panic.
    let out = cellhost(dir.path())
        .args([
            "bench",
            "guest",
            "--cells",
            "1",
            "--agent",
            "/no/such/agent",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--agent /no/such/agent"),
        "{out:?}"
    );
}

/// A tier's refusals (`cellhost_spec::validate_for`) are document errors:
/// `validate` and `run` name the field and exit 3, before any tier is
/// built.
#[test]
fn tier_refusals_name_the_field_and_exit_3() {
    let dir = common::state_dir();
    let doc = write(
        dir.path(),
        "vol.yaml",
        &format!("{HEAD}  command: [\"/bin/true\"]\n  volume: {{ path: /data, sizeGiB: 1 }}\n"),
    );
    for cmd in ["validate", "run"] {
        let out = cellhost(dir.path()).arg(cmd).arg(&doc).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{cmd}: {err}");
        assert!(err.contains("spec.volume.encrypted"), "{cmd}: {err}");
    }
}

/// A document the operator's policy refuses (a host port below its
/// range) exits 4 and names the field and the policy line, before any
/// cell is made.
#[test]
fn a_policy_refusal_exits_4_naming_field_and_rule() {
    let dir = common::state_dir();
    let doc = write(
        dir.path(),
        "port.yaml",
        &format!(
            "{HEAD}  command: [\"/bin/true\"]\n  network: {{ mode: bridged }}\n  ports: [{{ container: 80, host: 80 }}]\n"
        ),
    );
    let out = cellhost(dir.path()).arg("run").arg(&doc).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("spec.ports.0.host"), "{err}");
    assert!(err.contains("policy: ports"), "{err}");
}

/// `cellhost doctor | head -1`: a reader that goes away ends a printing
/// command quietly (SIGPIPE), never with a panic's backtrace.
#[test]
fn a_closed_stdout_ends_a_printing_command_without_a_panic() {
    let dir = common::state_dir();
    let mut child = cellhost(dir.path())
        .arg("doctor")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before doctor prints
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {err}",
        out.status
    );
}
