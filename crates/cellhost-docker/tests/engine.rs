//! The container tier against a real dockerd (see common for the skip
//! rule). Each test makes its own cells and checks the engine afterwards.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use cellhost_core::ids::CellId;
use cellhost_core::{Backend, BackendError, CellState, CreateRequest, ExecRequest, VolumeKey};
use cellhost_docker::Names;
use common::{cell, engine, engine_with, secret};

/// A TCP port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_to_completion_with_exit_code_and_log() {
    let Some(e) = engine().await else { return };
    let h = e
        .run(
            cell("  command: [\"/bin/sh\", \"-c\", \"echo to-out; echo to-err >&2; exit 7\"]\n"),
            vec![],
        )
        .await;
    let st = e.wait(&h).await;
    assert_eq!(st.exit.unwrap().code, Some(7), "{st:?}");
    let log = e.log(&h).await;
    assert!(log.contains("to-out") && log.contains("to-err"), "{log:?}");
    // Offsets continue where the last read ended.
    let all = e.backend.logs(&h, 0).await.unwrap();
    let rest = e.backend.logs(&h, all.next_offset).await.unwrap();
    assert!(rest.data.is_empty());
    e.destroy(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn published_port_answers_on_loopback() {
    let Some(e) = engine().await else { return };
    let port = free_port();
    let h = e
        .run(
            cell(&format!(
                "  command: [\"/bin/sh\", \"-c\", \"mkdir /www && echo served-by-cell > /www/index.html && exec httpd -f -p 8080 -h /www\"]\n  ports: [ {{ container: 8080, host: {port} }} ]\n  network: {{ mode: bridged }}\n"
            )),
            vec![],
        )
        .await;
    let mut body = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
            body.clear();
            let _ = s.read_to_string(&mut body);
            if body.contains("served-by-cell") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        body.contains("served-by-cell"),
        "no answer on 127.0.0.1:{port}: {body:?}"
    );
    e.destroy(&h).await;
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still answers after destroy"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_are_in_the_engine_and_enforced() {
    let Some(e) = engine().await else { return };
    let h = e
        .run(
            cell(
                "  command: [\"/bin/sh\", \"-c\", \"ulimit -n; ulimit -Hn; sleep 600\"]\n  resources: { cpus: 0.5, memoryMiB: 48, pids: 20, ulimits: [ { name: nofile, soft: 123, hard: 456 } ] }\n",
            ),
            vec![],
        )
        .await;
    let name = h.name.clone();
    let info = e.docker.inspect_container(&name, None).await.unwrap();
    let hc = info.host_config.unwrap();
    assert_eq!(hc.nano_cpus, Some(500_000_000));
    assert_eq!(hc.memory, Some(48 << 20));
    assert_eq!(hc.memory_swap, Some(48 << 20));
    assert_eq!(hc.pids_limit, Some(20));
    let u = &hc.ulimits.unwrap()[0];
    assert_eq!(
        (u.name.as_deref(), u.soft, u.hard),
        (Some("nofile"), Some(123), Some(456))
    );
    // Enforced: the workload sees the rlimit...
    let log = e.log_lines(&h, 2).await;
    assert_eq!(
        log.lines().take(2).collect::<Vec<_>>(),
        ["123", "456"],
        "{log:?}"
    );
    // ...and the pids limit stops a fork loop short of 20 processes.
    let out = e
        .backend
        .exec(
            &h,
            ExecRequest {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "n=0; while [ $n -lt 40 ]; do sleep 30 & n=$((n+1)); done 2>/dev/null; echo started".into(),
                ],
                timeout: Some(Duration::from_secs(30)),
                ..Default::default()
            },
        )
        .await;
    let pids: u64 = {
        let mut s = e.docker.stats(
            &name,
            Some(bollard::query_parameters::StatsOptions {
                stream: false,
                one_shot: true,
            }),
        );
        use futures_util::StreamExt;
        s.next()
            .await
            .unwrap()
            .unwrap()
            .pids_stats
            .unwrap()
            .current
            .unwrap()
    };
    assert!(pids <= 20, "pids {pids} > limit 20 (exec: {out:?})");
    e.destroy(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_hog_is_oom_killed() {
    let Some(e) = engine().await else { return };
    // busybox tail buffers a line that never ends.
    let h = e
        .run(
            cell("  command: [\"/bin/sh\", \"-c\", \"exec tail /dev/zero\"]\n  resources: { memoryMiB: 32 }\n"),
            vec![],
        )
        .await;
    let st = e.wait(&h).await;
    let exit = st.exit.unwrap();
    assert!(exit.oom_killed, "{exit:?}");
    e.destroy(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_is_exactly_the_declared_set() {
    let Some(e) = engine().await else { return };
    // env(1) directly, not a shell (which would add PWD, SHLVL).
    let h = e
        .run(
            cell(
                "  command: [\"/bin/env\"]\n  env: { ZED: last, ALPHA: \"a b=c\", EMPTY: \"\" }\n",
            ),
            vec![],
        )
        .await;
    e.wait(&h).await;
    let log = e.log(&h).await;
    let keys: BTreeSet<&str> = log
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    // The declared set, plus what the engine adds for an image without ENV
    // (documented in the crate header). Nothing of the host's.
    let want: BTreeSet<&str> = ["ZED", "ALPHA", "EMPTY", "HOSTNAME", "HOME", "PATH"].into();
    assert_eq!(keys, want, "{log}");
    assert!(log.lines().any(|l| l == "ALPHA=a b=c"), "{log}");
    assert!(log.lines().any(|l| l == "EMPTY="), "{log}");
    e.destroy(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_is_a_0600_file_and_absent_from_inspect() {
    let Some(e) = engine().await else { return };
    let value = format!("tok-{}", CellId::random());
    let h = e
        .run(
            cell(
                "  command: [\"/bin/sh\", \"-c\", \"stat -c '%a %u' /run/secrets/api; sleep 600\"]\n  secrets: [ { name: api, from: { file: ./unused } } ]\n",
            ),
            vec![secret("api", &value)],
        )
        .await;
    let log = e.log_lines(&h, 1).await;
    assert_eq!(log, "600 0\n");
    // The content, read through exec (so it is in no log).
    let cat = e
        .backend
        .exec(
            &h,
            ExecRequest {
                argv: vec!["/bin/cat".into(), "/run/secrets/api".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(cat.stdout, value.as_bytes());
    // Not in the engine's view of the container: inspect (API and CLI)
    // and the engine's own files for it.
    let name = h.name.clone();
    let info = e.docker.inspect_container(&name, None).await.unwrap();
    let json = serde_json::to_string(&info).unwrap();
    assert!(!json.contains(&value), "secret in the inspect JSON");
    let cli = std::process::Command::new("docker")
        .args(["inspect", &name])
        .output()
        .unwrap();
    assert!(cli.status.success());
    assert!(!String::from_utf8_lossy(&cli.stdout).contains(&value));
    let cid = info.id.unwrap();
    // The engine's data root is wherever dockerd was told (scripts/test
    // gives it a quota-enforcing one).
    let root = e.docker.info().await.unwrap().docker_root_dir.unwrap();
    let engine_dir = std::path::Path::new(&root).join("containers").join(&cid);
    let rd = std::fs::read_dir(&engine_dir)
        .unwrap_or_else(|err| panic!("{}: {err}", engine_dir.display()));
    {
        for f in rd.flatten() {
            if f.path().is_file() {
                let data = std::fs::read(f.path()).unwrap_or_default();
                assert!(
                    !data.windows(value.len()).any(|w| w == value.as_bytes()),
                    "secret in {}",
                    f.path().display()
                );
            }
        }
    }
    // The env holds no secret either.
    let env = e
        .backend
        .exec(
            &h,
            ExecRequest {
                argv: vec!["/bin/env".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(!String::from_utf8_lossy(&env.stdout).contains(&value));
    e.destroy(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_leaves_nothing_and_twice_is_fine() {
    let Some(e) = engine().await else { return };
    let h = e
        .run(
            cell(
                "  command: [\"/bin/sh\", \"-c\", \"echo data > /data/f; sleep 600\"]\n  volume: { path: /data, sizeGiB: 1 }\n  secrets: [ { name: s, from: { value: x } } ]\n  network: { mode: bridged }\n",
            ),
            vec![secret("s", "x")],
        )
        .await;
    let names = Names::of(&h.id);
    // The volume is the cell's own file system, not an engine volume.
    assert!(e.docker.inspect_volume(&names.volume).await.is_err());
    assert!(h.state_dir.join("volume.img").is_file());
    let listed = e.backend.list().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|c| c.id == h.id && c.state == CellState::Running),
        "{listed:?}"
    );

    let r = e.backend.destroy(&h).await.unwrap();
    assert!(r.is_clean(), "{}", r.summary());
    assert!(!r.already_gone);
    let names_checked: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
    for want in [
        "container",
        "volume",
        "anonymous-volumes",
        "network-endpoints",
        "secrets",
        "plain-volume-mount",
        "plain-volume-loop",
        "plain-volume-file",
        "state-dir",
    ] {
        assert!(names_checked.contains(&want), "{names_checked:?}");
    }
    // The engine agrees, independently of the report.
    assert!(
        e.docker
            .inspect_container(&names.container, None)
            .await
            .is_err()
    );
    assert!(e.docker.inspect_volume(&names.volume).await.is_err());
    assert!(!h.state_dir.exists());
    assert!(!e.backend.list().await.unwrap().iter().any(|c| c.id == h.id));

    let again = e.backend.destroy(&h).await.unwrap();
    assert!(again.is_clean() && again.already_gone, "{again:?}");
    let st = e.backend.status(&h).await.unwrap();
    assert_eq!(st.state, CellState::Gone);
}

/// Run the docker CLI for a test fixture; panics with its stderr.
fn docker_cli(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_volumes_of_the_image_are_removed() {
    let Some(e) = engine().await else { return };
    // An image that declares a VOLUME gets an anonymous volume per container.
    let suffix = CellId::random();
    let tag = format!("cellhost-test/with-volume:{suffix}");
    let scratch = format!("cellhost-test-scratch-{suffix}");
    docker_cli(&["create", "--name", &scratch, common::IMAGE, "/bin/true"]);
    docker_cli(&["commit", "--change", "VOLUME /anon", &scratch, &tag]);
    docker_cli(&["rm", &scratch]);

    let mut c = cell("  command: [\"/bin/sleep\", \"600\"]\n");
    c.spec.image = tag.clone();
    let h = e.run(c, vec![]).await;
    let info = e.docker.inspect_container(&h.name, None).await.unwrap();
    let anon: Vec<String> = info
        .mounts
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.destination.as_deref() == Some("/anon"))
        .filter_map(|m| m.name)
        .collect();
    assert_eq!(anon.len(), 1, "the image's VOLUME made no anonymous volume");
    let r = e.backend.destroy(&h).await.unwrap();
    assert!(r.is_clean(), "{}", r.summary());
    let check = r
        .checks
        .iter()
        .find(|c| c.name == "anonymous-volumes")
        .unwrap();
    assert!(check.target.starts_with("1 "), "{check:?}");
    assert!(e.docker.inspect_volume(&anon[0]).await.is_err());
    docker_cli(&["rmi", &tag]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_that_pulls_nothing_refuses_a_missing_image_before_the_engine_is_asked() {
    let Some(e) = engine_with(|c| c.policy.pull = false).await else {
        return;
    };
    let mut c = cell("  command: [\"/bin/true\"]\n");
    c.spec.image = "registry.example/anyone/miner:latest".into();
    let err = e
        .backend
        .create(CreateRequest::new(CellId::random(), c))
        .await
        .expect_err("no pull under this policy");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(err.to_string().contains("policy: images.pull"), "{err}");
    // An image the engine has still runs.
    let h = e.run(cell("  command: [\"/bin/true\"]\n"), vec![]).await;
    assert!(e.backend.destroy(&h).await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_image_fails_clearly_and_leaves_nothing() {
    let Some(e) = engine().await else { return };
    let id = CellId::random();
    let mut c = cell("  command: [\"/bin/true\"]\n  volume: { path: /data, sizeGiB: 1 }\n");
    c.spec.image = "cellhost-test/does-not-exist:never".into();
    let err = e
        .backend
        .create(CreateRequest {
            secrets: vec![secret("s", "x")],
            ..CreateRequest::new(id.clone(), c.clone())
        })
        .await
        .expect_err("a pull with no registry must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("spec.image") && msg.contains("cellhost-test/does-not-exist:never"),
        "{msg}"
    );
    assert!(matches!(err, BackendError::Engine { .. }), "{err:?}");
    let names = Names::of(&id);
    assert!(
        e.docker
            .inspect_container(&names.container, None)
            .await
            .is_err()
    );
    assert!(e.docker.inspect_volume(&names.volume).await.is_err());
    assert!(!e.backend.handle_for(&id, &c).state_dir.exists());
    assert!(!e.backend.list().await.unwrap().iter().any(|l| l.id == id));
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_usage_and_stop() {
    let Some(e) = engine().await else { return };
    let h = e
        .run(
            cell("  command: [\"/bin/sh\", \"-c\", \"i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 600\"]\n  workingDir: /tmp\n"),
            vec![],
        )
        .await;
    let out = e
        .backend
        .exec(
            &h,
            ExecRequest {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "pwd; echo $X; echo oops >&2; exit 4".into(),
                ],
                env: vec![("X".into(), "from-exec".into())],
                cwd: Some("/etc".into()),
                timeout: Some(Duration::from_secs(30)),
            },
        )
        .await
        .unwrap();
    assert_eq!(out.exit.code, Some(4));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/etc\nfrom-exec\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    let t = e
        .backend
        .exec(
            &h,
            ExecRequest {
                argv: vec!["/bin/sleep".into(), "30".into()],
                timeout: Some(Duration::from_millis(300)),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(t, Err(BackendError::Timeout(..))), "{t:?}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let u = e.backend.usage(&h).await.unwrap();
    assert!(u.cpu_ns > 0 && u.memory_bytes > 0, "{u:?}");

    e.backend.stop(&h, Duration::from_secs(2)).await.unwrap();
    let st = e.backend.status(&h).await.unwrap();
    assert_eq!(st.state, CellState::Exited, "{st:?}");
    let r = e
        .backend
        .exec(
            &h,
            ExecRequest {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(r, Err(BackendError::WrongState { .. })), "{r:?}");
    // A stopped cell starts again.
    e.backend.start(&h).await.unwrap();
    assert_eq!(
        e.backend.status(&h).await.unwrap().state,
        CellState::Running
    );
    e.destroy(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unsupported_combinations_are_refused_before_anything_is_made() {
    let Some(e) = engine().await else { return };
    for (body, needle) in [
        (
            "  command: [\"/bin/true\"]\n  ports: [ { container: 80, host: 18081 } ]\n",
            "spec.ports",
        ),
        (
            "  command: [\"/bin/true\"]\n  volume: { path: /d, sizeGiB: 1, encrypted: true }\n",
            "volume.encrypted",
        ),
        (
            "  command: [\"/bin/true\"]\n  network: { mode: bridged, egress: [ { cidr: 10.0.0.0/8 } ] }\n",
            "network.egress",
        ),
    ] {
        let id = CellId::random();
        let err = e
            .backend
            .create(CreateRequest::new(id.clone(), cell(body)))
            .await
            .expect_err(body);
        assert!(err.to_string().contains(needle), "{err}");
        assert!(
            e.docker
                .inspect_container(&Names::of(&id).container, None)
                .await
                .is_err()
        );
    }
}

/// An encrypted volume in a container: bind-mounted from the open volume,
/// closed on stop (start then refuses without the key, and a wrong key),
/// reopened with the key with the data intact, and torn down with the cell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_volume_persists_across_stop_start_only_with_its_key() {
    let Some(e) = engine().await else { return };
    let vols = e.backend.volumes();
    if let Err(why) = vols.engine() {
        eprintln!("SKIP: no encrypted-volume engine: {why}");
        return;
    }
    let cell = cell(
        "  command: [sh, -c, \"cat /data/runs 2>/dev/null; echo run >> /data/runs\"]\n  volume: { path: /data, sizeGiB: 1, encrypted: true }\n",
    );
    let key = VolumeKey::random();
    let h = e
        .backend
        .create(CreateRequest {
            volume_key: Some(key.duplicate()),
            ..CreateRequest::new(CellId::random(), cell)
        })
        .await
        .expect("create");
    let inspect = e
        .docker
        .inspect_container(&format!("cellhost-{}", h.id), None)
        .await
        .unwrap();
    let mount = inspect
        .mounts
        .unwrap_or_default()
        .into_iter()
        .find(|m| m.destination.as_deref() == Some("/data"))
        .expect("a mount at /data");
    assert_eq!(mount.typ.map(|t| t.to_string()).as_deref(), Some("bind"));
    assert_eq!(
        mount.source.as_deref(),
        Some(vols.paths(&h.id).data.to_str().unwrap())
    );
    e.backend.start(&h).await.unwrap();
    e.wait(&h).await;
    assert_eq!(e.log(&h).await, "");

    e.backend.stop(&h, Duration::from_secs(1)).await.unwrap();
    assert!(!vols.is_open(&h.id), "stop closes the volume");
    let err = e.backend.start(&h).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Invalid(m) if m.contains("closed")),
        "{err}"
    );
    let err = e
        .backend
        .open_volume(&h, &VolumeKey::random())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::Invalid(m) if m.contains("does not open")),
        "{err}"
    );
    assert!(!vols.is_open(&h.id));

    e.backend.open_volume(&h, &key).await.unwrap();
    e.backend.start(&h).await.unwrap();
    e.wait(&h).await;
    // The second run read what the first wrote (the log holds both runs'
    // output: the first printed nothing).
    assert_eq!(e.log(&h).await, "run\n");

    let r = e.backend.destroy(&h).await.unwrap();
    assert!(r.is_clean(), "{}", r.summary());
    assert!(r.checks.iter().any(|c| c.name == "volume-keyslots"));
    assert!(!vols.paths(&h.id).dir.exists());
}

/// Under an engine run with `--userns-remap`, a cell's root is not the
/// host's: the workload's host uid is the remapped one. (Secrets and an
/// encrypted volume work there too: the tests above read and write them.)
#[tokio::test(flavor = "multi_thread")]
async fn under_userns_remap_the_cells_root_is_not_the_hosts() {
    let Some(e) = engine().await else { return };
    let info = e.docker.info().await.unwrap();
    let remapped = info
        .security_options
        .unwrap_or_default()
        .iter()
        .any(|o| o.split(',').any(|kv| kv == "name=userns"));
    if !remapped {
        eprintln!("SKIP: dockerd runs without --userns-remap");
        return;
    }
    let h = e
        .run(cell("  command: [\"/bin/sleep\", \"600\"]\n"), vec![])
        .await;
    let pid = e.backend.status(&h).await.unwrap().pid.expect("a pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(uids.len(), 4, "{status}");
    assert!(uids.iter().all(|u| *u != 0), "host uids {uids:?}");
    // Inside, it is root.
    let out = e
        .backend
        .exec(
            &h,
            ExecRequest {
                argv: vec!["/bin/id".into(), "-u".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    e.destroy(&h).await;
}

/// `sh -c script` in the cell, which must exit 0; its stdout.
async fn sh(
    b: &cellhost_docker::DockerBackend,
    h: &cellhost_core::CellHandle,
    script: &str,
) -> String {
    let req = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let out = b.exec(h, req).await.expect("exec");
    assert_eq!(out.exit.code, Some(0), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A plain volume is adopted, not lost: after a stop, with its mount gone
/// (as after a host reboot) the engine cannot start the container (its
/// bind source is missing, so nothing lands on the host's disk under the
/// empty mount point); a fresh backend on the same state dir (a restarted
/// daemon) mounts it again at start with the data intact; and when the
/// container goes behind the daemon's back, the orphan listing still finds
/// the cell and destroy removes the volume.
#[tokio::test(flavor = "multi_thread")]
async fn a_plain_volume_is_adopted_after_restarts_and_found_as_an_orphan() {
    let Some(e) = engine().await else { return };
    let h = e
        .run(
            cell("  command: [\"/bin/sleep\", \"600\"]\n  volume: { path: /data, sizeGiB: 1 }\n"),
            vec![],
        )
        .await;
    sh(&e.backend, &h, "echo kept > /data/marker").await;
    e.backend.stop(&h, Duration::from_secs(1)).await.unwrap();

    let mnt = h.state_dir.join("volume");
    nix::mount::umount2(&mnt, nix::mount::MntFlags::empty()).expect("unmount the volume");
    let err = e
        .docker
        .start_container(&h.name, None)
        .await
        .expect_err("the engine started a container without its volume");
    println!("the engine without the volume: {err}");
    assert!(
        !mnt.join("data").exists(),
        "the engine made the bind source"
    );

    let state = h.state_dir.parent().unwrap().parent().unwrap();
    let fresh = cellhost_docker::DockerBackend::new(cellhost_docker::DockerConfig::new(
        state.to_path_buf(),
    ));
    fresh.start(&h).await.expect("start after the restarts");
    assert_eq!(sh(&fresh, &h, "cat /data/marker").await, "kept\n");

    e.docker
        .remove_container(
            &h.name,
            Some(bollard::query_parameters::RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    let listed = fresh.list().await.unwrap();
    assert!(listed.iter().any(|c| c.id == h.id), "{listed:?}");
    let r = fresh.destroy(&h).await.unwrap();
    assert!(r.is_clean(), "{}", r.summary());
    assert!(!r.already_gone);
    for want in [
        "plain-volume-mount",
        "plain-volume-loop",
        "plain-volume-file",
    ] {
        assert!(r.checks.iter().any(|c| c.name == want), "{:?}", r.checks);
    }
    assert!(!h.state_dir.exists());
    assert!(!fresh.list().await.unwrap().iter().any(|c| c.id == h.id));
}
