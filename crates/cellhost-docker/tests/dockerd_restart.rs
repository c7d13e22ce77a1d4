//! dockerd restarted under running cells: while it is down, status is an
//! engine error (never "gone", which would make the daemon drop the
//! record); once it is back, status recovers: a cell with the operator's
//! `unless-stopped` policy runs again, one with the default `no` policy
//! reports how it ended. Both are then destroyed cleanly.
//!
//! Restarts the host's dockerd: runs only as root, when dockerd's pidfile
//! names a live process, and not when systemd manages it (the operator's
//! service manager would race this test).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cellhost_core::{Backend, CellState};
use common::{cell, engine, engine_with};

const PIDFILE: &str = "/var/run/docker.pid";

/// dockerd's pid, argv and environment: it is restarted exactly as it
/// ran, not with this test's environment (whose TMPDIR, a scratch dir
/// that scripts/test removes afterwards, would break every later exec).
type Dockerd = (i32, Vec<String>, Vec<(String, String)>);

fn dockerd_argv() -> Result<Dockerd, String> {
    if Path::new("/run/systemd/system").exists() {
        return Err("systemd manages services here; not restarting its dockerd".into());
    }
    let pid: i32 = std::fs::read_to_string(PIDFILE)
        .map_err(|e| format!("{PIDFILE}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{PIDFILE}: {e}"))?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| format!("dockerd pid {pid}: {e}"))?;
    let argv: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if argv.first().is_none_or(|a| !a.ends_with("dockerd")) {
        return Err(format!("pid {pid} is not dockerd: {argv:?}"));
    }
    let env = std::fs::read(format!("/proc/{pid}/environ"))
        .map_err(|e| format!("dockerd pid {pid}: {e}"))?
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    Ok((pid, argv, env))
}

fn wait_for(what: &str, max: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < max,
            "timed out after {max:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_recovers_after_dockerd_restart() {
    let Some(keep) = engine_with(|c| c.policy.restart_unless_stopped = true).await else {
        return;
    };
    let Some(plain) = engine().await else { return };
    let (pid, argv, env) = match dockerd_argv() {
        Ok(x) => x,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let sleeper = || cell("  command: [\"/bin/sleep\", \"600\"]\n");
    let a = keep.run(sleeper(), vec![]).await;
    let b = plain.run(sleeper(), vec![]).await;
    let pid_a = keep.backend.status(&a).await.unwrap().pid;
    assert!(pid_a.is_some());

    // Down.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("dockerd to exit", Duration::from_secs(60), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    let down = keep.backend.status(&a).await;
    assert!(
        down.is_err(),
        "status with dockerd down must be an error, got {down:?}"
    );
    let listed = keep.backend.list().await;
    assert!(
        listed.is_err(),
        "list with dockerd down must be an error, got {listed:?}"
    );

    // Up again, as it was started.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/var/log/cellhost-dockerd.log")
        .unwrap();
    // setsid -f: dockerd is detached from this test and outlives it.
    let started = Command::new("setsid")
        .arg("-f")
        .args(&argv)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .expect("restarting dockerd");
    assert!(started.success(), "setsid -f dockerd: {started}");
    let t = Instant::now();
    loop {
        if keep.docker.ping().await.is_ok() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "dockerd did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // unless-stopped: running again, a new process.
    let t = Instant::now();
    let st = loop {
        let st = keep.backend.status(&a).await.expect("status after restart");
        if st.state == CellState::Running && st.pid.is_some() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "cell a not running again: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(st.pid, pid_a, "same pid: the workload was not restarted?");
    // no: it ended with the engine, and says how.
    let st = plain
        .backend
        .status(&b)
        .await
        .expect("status after restart");
    assert_eq!(st.state, CellState::Exited, "{st:?}");
    assert!(st.exit.is_some(), "{st:?}");
    assert!(
        keep.backend
            .list()
            .await
            .unwrap()
            .iter()
            .any(|c| c.id == a.id)
    );

    keep.destroy(&a).await;
    plain.destroy(&b).await;
}
