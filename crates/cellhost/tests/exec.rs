//! `exec` and `usage` of the process tier against the real kernel:
//! namespaces, cgroups, seccomp, pipes. Needs root and cgroup controllers;
//! skipped with a printed reason otherwise (see
//! `common::process_tier_missing`).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cellhost_core::ids::CellId;
use cellhost_core::{Backend, BackendError, CellHandle, CellState, ExecOutput, ExecRequest};

/// A cell whose workload just sleeps.
const SLEEPER: &str = "  command: [\"/bin/sleep\", \"300\"]\n";

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Create and start a cell and wait until its workload has exec'd sleep.
async fn running(t: &common::Tier, name: &str, spec: &str) -> (CellId, CellHandle) {
    let (id, h) = t.create(common::cell(name, spec), vec![]).await;
    t.backend.start(&h).await.expect("start");
    let pid = t.backend.init_pid(&id).expect("init pid");
    common::wait_exe(pid, "/usr/bin/sleep");
    (id, h)
}

async fn exec_ok(t: &common::Tier, h: &CellHandle, r: ExecRequest) -> ExecOutput {
    let argv = r.argv.clone();
    t.backend
        .exec(h, r)
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?}: {e}"))
}

/// Pids of the cell other than its init.
fn extra_pids(t: &common::Tier, id: &CellId) -> Vec<i32> {
    let init = t.backend.init_pid(id);
    let cg = t.backend.cgroups(id).expect("cgroups");
    cg.pids().into_iter().filter(|p| Some(*p) != init).collect()
}

#[test]
fn exec_returns_output_and_exit_codes() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let (_, h) = running(&t, "execout", SLEEPER).await;

        let t0 = Instant::now();
        let out = exec_ok(&t, &h, req(&["echo", "hi"])).await;
        eprintln!("exec echo hi: {:?} end to end", t0.elapsed());
        assert_eq!(text(&out.stdout), "hi\n");
        assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
        assert_eq!((out.exit.code, out.exit.signal), (Some(0), None));

        let out = exec_ok(
            &t,
            &h,
            req(&["/bin/sh", "-c", "echo out; echo err >&2; exit 7"]),
        )
        .await;
        assert_eq!(out.exit.code, Some(7));
        assert_eq!(text(&out.stdout), "out\n");
        assert_eq!(text(&out.stderr), "err\n");

        // The shell's convention for a missing command.
        let out = exec_ok(&t, &h, req(&["no-such-command-here"])).await;
        assert_eq!(out.exit.code, Some(127), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("not found"),
            "{}",
            text(&out.stderr)
        );

        // A working directory inside the cell.
        let mut r = req(&["pwd"]);
        r.cwd = Some("/tmp".into());
        assert_eq!(text(&exec_ok(&t, &h, r).await.stdout), "/tmp\n");

        // Output past the cap is dropped, and the command is not blocked.
        let out = exec_ok(
            &t,
            &h,
            req(&["/bin/sh", "-c", "head -c 20000000 /dev/zero; echo done >&2"]),
        )
        .await;
        assert_eq!(out.exit.code, Some(0));
        assert_eq!(out.stdout.len(), cellhost_process::exec::OUTPUT_CAP_BYTES);
        assert_eq!(text(&out.stderr), "done\n");

        // Invalid requests fail before anything runs.
        let e = t.backend.exec(&h, req(&[])).await.unwrap_err();
        assert!(matches!(e, BackendError::Invalid(_)), "{e}");

        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
}

#[test]
fn exec_env_is_exactly_the_request() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let (_, h) = running(
            &t,
            "execenv",
            &format!("{SLEEPER}  env:\n    CELL_ONLY: not-for-exec\n"),
        )
        .await;
        let mut r = req(&["env"]);
        r.env = vec![
            ("ZED".into(), "first".into()),
            ("A".into(), "two words".into()),
            ("EMPTY".into(), "".into()),
        ];
        let out = exec_ok(&t, &h, r).await;
        assert_eq!(text(&out.stdout), "ZED=first\nA=two words\nEMPTY=\n");

        // No environment at all is an empty one (no HOME, no PATH added).
        let out = exec_ok(&t, &h, req(&["env"])).await;
        assert_eq!(text(&out.stdout), "");
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
}

#[test]
fn exec_joins_the_cells_namespaces_cgroup_and_fd_set() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let (id, h) = running(&t, "execns", SLEEPER).await;

        // pid namespace: pid 1 is the cell's workload.
        let out = exec_ok(&t, &h, req(&["cat", "/proc/1/cmdline"])).await;
        assert_eq!(out.stdout, b"/bin/sleep\x00300\x00");
        // uts namespace and the cell's minimal /etc.
        let out = exec_ok(&t, &h, req(&["hostname"])).await;
        assert_eq!(text(&out.stdout), "execns\n");
        let out = exec_ok(&t, &h, req(&["ls", "/etc"])).await;
        assert!(
            !text(&out.stdout).contains("shadow"),
            "{}",
            text(&out.stdout)
        );
        // The cell's cgroup namespace: its own cgroup is its root, and the
        // host's tree above it is out of sight (the host side is checked
        // below).
        let out = exec_ok(&t, &h, req(&["cat", "/proc/self/cgroup"])).await;
        let cgroups = text(&out.stdout);
        let memory = cgroups
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == "memory"))
            })
            .unwrap_or_else(|| panic!("no memory line: {cgroups}"));
        assert!(memory.ends_with(":/"), "{cgroups}");
        assert!(!cgroups.contains("cellhost"), "{cgroups}");
        // SIGPIPE has its default action (the helper, a Rust program,
        // ignores it, and an ignored signal survives execve).
        let out = exec_ok(&t, &h, req(&["grep", "SigIgn", "/proc/self/status"])).await;
        let ignored = text(&out.stdout);
        let mask = u64::from_str_radix(ignored.trim().trim_start_matches("SigIgn:").trim(), 16)
            .unwrap_or_else(|e| panic!("{ignored:?}: {e}"));
        assert_eq!(
            mask & (1 << (libc::SIGPIPE - 1)),
            0,
            "SIGPIPE ignored: {ignored}"
        );
        // The seccomp filter: unshare of a user namespace is refused.
        let out = exec_ok(&t, &h, req(&["unshare", "-U", "true"])).await;
        assert_ne!(out.exit.code, Some(0), "unshare -U succeeded in an exec");

        // From the host: a long-running exec is in the cell's cgroup with
        // fds 0-2 only, stdin /dev/null, and exactly its environment.
        let backend = t.backend.clone();
        let h2 = h.clone();
        let mut r = req(&["sleep", "30"]);
        r.env = vec![("ONLY".into(), "me".into())];
        let task = tokio::spawn(async move { backend.exec(&h2, r).await });
        // libcontainer's intermediate process passes through the cgroup
        // first: wait for the one that became sleep.
        let until = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            let sleeper = extra_pids(&t, &id).into_iter().find(|p| {
                std::fs::read_link(format!("/proc/{p}/exe"))
                    .is_ok_and(|e| e == std::path::Path::new("/usr/bin/sleep"))
            });
            if let Some(p) = sleeper {
                break p;
            }
            assert!(
                Instant::now() < until,
                "exec'd sleep never showed in the cgroup"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let environ = loop {
            let e = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            if !e.is_empty() || Instant::now() > until {
                break e;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        assert_eq!(environ, b"ONLY=me\0");
        let fds: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(fds, BTreeSet::from(["0".into(), "1".into(), "2".into()]));
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/fd/0"))
                .unwrap()
                .to_str(),
            Some("/dev/null")
        );
        // Same namespaces as the cell's init.
        let init = t.backend.init_pid(&id).unwrap();
        for ns in ["pid", "mnt", "net", "uts", "ipc", "user", "cgroup"] {
            let a = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let b = std::fs::read_link(format!("/proc/{init}/ns/{ns}")).unwrap();
            assert_eq!(a, b, "{ns} namespace differs");
        }
        // seccomp mode 2 (filter) and no_new_privs, like the workload, and
        // the cell's own host uid: never host root.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let base = h.uids.unwrap().base.to_string();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid_line.split_whitespace().skip(1).all(|u| u == base),
            "{uid_line}"
        );
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        assert!(status.contains("Seccomp:\t2"), "{status}");

        // destroy kills it with the cell, and leaves nothing.
        let report = t.backend.destroy(&h).await.unwrap();
        assert!(report.is_clean(), "{}", report.summary());
        let out = task.await.unwrap().expect("exec ended by destroy");
        assert_eq!(out.exit.signal, Some(libc::SIGKILL), "{:?}", out.exit);
    });
}

#[test]
fn exec_needs_a_running_cell() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        // Created, not started.
        let (_, h) = t.create(common::cell("execcreated", SLEEPER), vec![]).await;
        match t.backend.exec(&h, req(&["true"])).await {
            Err(BackendError::WrongState { state, op, .. }) => {
                assert_eq!((state, op), (CellState::Created, "exec"));
            }
            other => panic!("exec on a created cell: {other:?}"),
        }
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());

        // Exited.
        let (h, st) = t
            .run(common::cell("execexited", "  command: [\"/bin/true\"]\n"))
            .await;
        assert_eq!(st.state, CellState::Exited);
        match t.backend.exec(&h, req(&["true"])).await {
            Err(BackendError::WrongState { state, .. }) => assert_eq!(state, CellState::Exited),
            other => panic!("exec on an exited cell: {other:?}"),
        }
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());

        // Destroyed.
        match t.backend.exec(&h, req(&["true"])).await {
            Err(BackendError::NotFound(id)) => assert_eq!(id, h.id),
            other => panic!("exec on a destroyed cell: {other:?}"),
        }
    });
}

#[test]
fn exec_timeout_kills_the_command_and_only_it() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let (id, h) = running(&t, "exectimeout", SLEEPER).await;
        // A shell with a background child: the whole group goes.
        let mut r = req(&["/bin/sh", "-c", "sleep 100 & sleep 100; echo never"]);
        r.timeout = Some(Duration::from_millis(300));
        let t0 = Instant::now();
        match t.backend.exec(&h, r).await {
            Err(BackendError::Timeout(d, _)) => assert_eq!(d, Duration::from_millis(300)),
            other => panic!("want a timeout: {other:?}"),
        }
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let until = Instant::now() + Duration::from_secs(5);
        while !extra_pids(&t, &id).is_empty() {
            assert!(
                Instant::now() < until,
                "left in the cell: {:?}",
                extra_pids(&t, &id)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A caller that gives up (drops the future) kills the command too.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(300),
            t.backend.exec(&h, req(&["sleep", "100"])),
        )
        .await;
        assert!(gave_up.is_err(), "sleep 100 finished: {gave_up:?}");
        let until = Instant::now() + Duration::from_secs(5);
        while !extra_pids(&t, &id).is_empty() {
            let left = extra_pids(&t, &id);
            assert!(
                Instant::now() < until,
                "left after the caller gave up: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The cell runs on.
        assert_eq!(
            t.backend.status(&h).await.unwrap().state,
            CellState::Running
        );
        let out = exec_ok(&t, &h, req(&["echo", "still"])).await;
        assert_eq!(text(&out.stdout), "still\n");
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
}

#[test]
fn concurrent_execs_all_run_and_leave_no_sockets() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let (id, h) = running(&t, "execmany", SLEEPER).await;
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let backend = t.backend.clone();
                let h = h.clone();
                tokio::spawn(async move {
                    backend
                        .exec(&h, req(&["echo", &i.to_string()]))
                        .await
                        .map(|o| (i, o))
                })
            })
            .collect();
        for task in tasks {
            let (i, out) = task.await.unwrap().expect("exec");
            assert_eq!(text(&out.stdout), format!("{i}\n"));
        }
        let lc = t.backend.paths(&id).lc_state();
        let left: Vec<String> = std::fs::read_dir(&lc)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("tenant-"))
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", lc.display());
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
}

#[test]
fn usage_reports_cpu_and_memory() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let busy = "  command: [\"/bin/sh\", \"-c\", \"while :; do :; done\"]\n";
        let (_, h) = t.create(common::cell("busy", busy), vec![]).await;
        t.backend.start(&h).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let u0 = t.backend.usage(&h).await.expect("usage");
        // The counter must grow by 0.1 s of CPU; how soon depends on the
        // machine's load, so this polls (deadline only against a hang).
        let deadline = Instant::now() + Duration::from_secs(20);
        let u1 = loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let u = t.backend.usage(&h).await.expect("usage");
            if u.cpu_ns > u0.cpu_ns + 100_000_000 || Instant::now() > deadline {
                break u;
            }
        };
        eprintln!("usage: {u0:?} -> {u1:?}");
        assert!(
            u1.cpu_ns > u0.cpu_ns + 100_000_000,
            "a busy loop used under 0.1 s of cpu in 20 s: {u0:?} -> {u1:?}"
        );
        assert!(u1.memory_bytes > 0, "{u1:?}");
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
        match t.backend.usage(&h).await {
            Err(BackendError::NotFound(id)) => assert_eq!(id, h.id),
            other => panic!("usage of a destroyed cell: {other:?}"),
        }
    });
}
