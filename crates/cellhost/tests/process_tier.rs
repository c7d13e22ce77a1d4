//! The process tier against the real kernel: namespaces, cgroups, mounts.
//! Needs root and cgroup controllers; skipped with a printed reason
//! otherwise (see `common::process_tier_missing`).

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use cellhost_core::ids::CellId;
use cellhost_core::{Backend, BackendError, CellState, CreateRequest, SecretValue};
use zeroize::Zeroizing;

#[test]
fn env_is_exactly_declared_and_fds_are_0_1_2() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let cell = common::cell(
            "envcheck",
            "  command: [\"/bin/sleep\", \"30\"]\n  env:\n    ZED: last-declared-first\n    A: \"1\"\n    SPACES: \"two words\"\n    EMPTY: \"\"\n",
        );
        let (id, h) = t.create(cell, vec![]).await;
        t.backend.start(&h).await.unwrap();
        let pid = t.backend.init_pid(&id).expect("init pid");
        common::wait_exe(pid, "/usr/bin/sleep");

        // exec replaces /proc/<pid>/exe a moment before the new stack (and
        // so environ) is in place: wait for it to be non-empty.
        let until = Instant::now() + Duration::from_secs(10);
        let environ = loop {
            let e = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            if !e.is_empty() || Instant::now() > until {
                break e;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        assert_eq!(environ, b"ZED=last-declared-first\0A=1\0SPACES=two words\0EMPTY=\0", "environ differs");

        let fds: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(fds, BTreeSet::from(["0".into(), "1".into(), "2".into()]));
        assert_eq!(std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap().to_str(), Some("/dev/null"));
        // stdout and stderr are one pipe whose only reader is the shim,
        // which copies it into the cell log.
        let out = std::fs::metadata(format!("/proc/{pid}/fd/1")).unwrap();
        let err = std::fs::metadata(format!("/proc/{pid}/fd/2")).unwrap();
        assert_eq!((out.dev(), out.ino()), (err.dev(), err.ino()), "fd 1 and 2 differ");
        let pipe = std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap();
        assert!(pipe.to_string_lossy().starts_with("pipe:"), "{pipe:?}");
        let shim: i32 = std::fs::read_to_string(t.backend.paths(&id).shim_pid()).unwrap().trim().parse().unwrap();
        let shim_fds: Vec<_> = std::fs::read_dir(format!("/proc/{shim}/fd")).unwrap().map(|e| std::fs::read_link(e.unwrap().path()).unwrap()).collect();
        assert!(shim_fds.contains(&pipe), "the shim does not hold the output pipe: {shim_fds:?}");
        let report = t.backend.destroy(&h).await.unwrap();
        assert!(report.is_clean(), "{}", report.summary());
    });
}

#[test]
fn workload_sees_private_namespaces_and_read_only_host_root() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let script = "echo pid=$$; hostname; ls /etc | tr '\\n' ' '; echo; \
                      if touch /usr/cellhost-probe 2>/dev/null; then echo usr=rw; else echo usr=ro; fi; \
                      if touch /tmp/x; then echo tmp=rw; fi; \
                      cat /proc/net/dev | grep -c ':' ; \
                      cat /sys/class/net/lo/operstate";
        let cell = common::cell("nsview", &format!("  command: [\"/bin/sh\", \"-c\", {script:?}]\n"));
        let (h, st) = t.run(cell).await;
        assert_eq!(st.exit.unwrap().code, Some(0), "log: {}", t.log(&h).await);
        let log = t.log(&h).await;
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines[0], "pid=1", "{log}");
        assert_eq!(lines[1], "nsview", "{log}");
        assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["alternatives", "group", "hosts", "ld.so.cache", "nsswitch.conf", "passwd", "resolv.conf"], "{log}");
        assert_eq!(lines[3], "usr=ro", "{log}");
        assert_eq!(lines[4], "tmp=rw", "{log}");
        assert_eq!(lines[5], "1", "only loopback in the netns: {log}");
        assert_eq!(lines[6], "unknown", "lo is up (operstate unknown for loopback): {log}");
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
}

#[test]
fn exit_codes_are_reported() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let (h, st) = t
            .run(common::cell(
                "exit7",
                "  command: [\"/bin/sh\", \"-c\", \"echo out; echo err >&2; exit 7\"]\n",
            ))
            .await;
        let exit = st.exit.unwrap();
        assert_eq!(
            (exit.code, exit.signal, exit.oom_killed),
            (Some(7), None, false)
        );
        assert_eq!(t.log(&h).await, "out\nerr\n");
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
}

#[test]
fn log_is_capped_and_the_workload_runs_on() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        // Four times the cap, then a normal exit.
        let bytes = common::LOG_CAP * 4;
        let cell = common::cell(
            "chatty",
            &format!(
                "  command: [\"/bin/sh\", \"-c\", \"head -c {bytes} /dev/zero; echo done >&2\"]\n"
            ),
        );
        let (h, st) = t.run(cell).await;
        assert_eq!(
            st.exit.unwrap().code,
            Some(0),
            "workload must not be killed for talking"
        );
        let log = std::fs::read(t.backend.paths(&h.id).log()).unwrap();
        let size = log.len() as u64;
        assert!(
            size <= common::LOG_CAP + 200,
            "log is {size} bytes, cap {}",
            common::LOG_CAP
        );
        let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(200)..]).into_owned();
        assert!(tail.contains("[cellhost: log capped at"), "{tail:?}");
        assert!(!tail.contains("done"), "output after the cap was kept");
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
}

#[test]
fn memory_limit_ends_a_hog() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let cell = common::cell(
            "hog",
            "  command: [\"/bin/sh\", \"-c\", \"exec tail /dev/zero\"]\n  resources: { memoryMiB: 32 }\n",
        );
        let (h, st) = t.run(cell).await;
        let exit = st.exit.expect("exited");
        assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
        assert!(exit.oom_killed, "{exit:?}");
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        // A classic bomb; each level forks two more forever.
        let cell = common::cell(
            "bomb",
            "  command: [\"/bin/sh\", \"-c\", \"b() { b | b & }; b; sleep 3\"]\n  resources: { pids: 24, cpus: 0.5 }\n",
        );
        let (id, h) = t.create(cell, vec![]).await;
        t.backend.start(&h).await.unwrap();
        let cg = t.backend.cgroups(&id).unwrap();
        let pids_dir = cg.procs.clone().expect("pids cgroup");
        let mut peak = 0usize;
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            peak = peak.max(cg.pids().len());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(peak <= 24, "pids limit exceeded: {peak}");
        let events = std::fs::read_to_string(pids_dir.join("pids.events")).unwrap_or_default();
        let max_hits: u64 = events.lines().find_map(|l| l.strip_prefix("max ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        assert!(max_hits > 0, "fork bomb never hit the limit: {events:?} peak={peak}");
        let report = t.backend.destroy(&h).await.unwrap();
        assert!(report.is_clean(), "{}", report.summary());
    });
}

#[test]
fn destroy_leaves_nothing_and_is_idempotent() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let cell = common::cell(
            "victim",
            "  command: [\"/bin/sh\", \"-c\", \"sleep 100 & sleep 100 & sleep 100\"]\n  resources: { memoryMiB: 64, pids: 16, cpus: 1 }\n  secrets:\n    - name: tok\n      from: { value: s3cret }\n",
        );
        let secrets = vec![SecretValue { name: "tok".into(), value: Zeroizing::new(b"s3cret".to_vec()) }];
        let (id, h) = t.create(cell, secrets).await;
        t.backend.start(&h).await.unwrap();
        let cg = t.backend.cgroups(&id).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while cg.pids().len() < 4 {
            assert!(Instant::now() < until, "workload never started its children");
            std::thread::sleep(Duration::from_millis(10));
        }
        let pids = cg.pids();
        let dir = t.backend.paths(&id).dir;
        assert!(!common::mounts_under(&dir).is_empty(), "secrets tmpfs should be mounted while alive");
        assert!(!cg.existing().is_empty());

        let report = t.backend.destroy(&h).await.unwrap();
        assert!(report.is_clean(), "{}", report.summary());
        assert!(!report.already_gone);
        let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        for want in ["processes", "cgroup", "mounts", "secrets", "state_dir"] {
            assert!(names.contains(&want), "report lacks {want}: {names:?}");
        }
        // Independent checks, not the report's own word.
        for pid in pids {
            assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map(|c| !c.contains(&id.object_name())).unwrap_or(true), "pid {pid} survived");
        }
        assert!(cg.existing().is_empty(), "cgroup dirs left: {:?}", cg.existing());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(id.as_str()), "mount of the cell left in mountinfo");
        assert!(!dir.exists(), "state dir left");

        let again = t.backend.destroy(&h).await.unwrap();
        assert!(again.is_clean(), "{}", again.summary());
        assert!(again.already_gone);
        assert_eq!(t.backend.status(&h).await.unwrap().state, CellState::Gone);
    });
}

#[test]
fn failed_creates_roll_back_cleanly() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let cases = [
            (
                "norootfs",
                "  command: [\"/bin/true\"]\n",
                Some("nonexistent"),
            ),
            ("badcmd", "  command: [\"/nonexistent/cmd\"]\n", None),
            ("notexec", "  command: [\"/etc/passwd\"]\n", None),
        ];
        for (name, body, image) in cases {
            let mut cell = common::cell(name, body);
            if let Some(img) = image {
                cell.spec.image = img.to_string();
            }
            let id = CellId::random();
            let err = t
                .backend
                .create(CreateRequest {
                    uids: Some(common::lease_uids(&id)),
                    ..CreateRequest::new(id.clone(), cell)
                })
                .await
                .unwrap_err();
            eprintln!("{name}: {err}");
            match name {
                "norootfs" => assert!(
                    matches!(err, BackendError::Invalid(_))
                        && err.to_string().contains("spec.image")
                        && err.to_string().contains("nonexistent"),
                    "{err}"
                ),
                "badcmd" => assert!(err.to_string().contains("/nonexistent/cmd"), "{err}"),
                _ => assert!(err.to_string().contains("not executable"), "{err}"),
            }
            let dir = t.backend.paths(&id).dir;
            assert!(!dir.exists(), "{name}: state dir left");
            let cg = t.backend.cgroups(&id).unwrap();
            assert!(
                cg.existing().is_empty(),
                "{name}: cgroups left {:?}",
                cg.existing()
            );
            assert!(common::mounts_under(&dir).is_empty());
        }
    });
}

#[test]
fn secrets_are_0400_files_of_the_cells_root_in_a_tmpfs() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        let cell = common::cell(
            "secrets",
            "  command: [\"/bin/sh\", \"-c\", \"stat -c '%a %U %s' /run/secrets/api_token; awk '$2==\\\"/run/secrets\\\"{print $3, $4}' /proc/mounts | cut -d, -f1\"]\n  secrets:\n    - name: api_token\n      from: { env: CELLHOST_TEST_UNUSED }\n",
        );
        let secrets = vec![SecretValue { name: "api_token".into(), value: Zeroizing::new(b"tok-123456".to_vec()) }];
        let (_, h) = t.create(cell, secrets).await;
        t.backend.start(&h).await.unwrap();
        let st = t.wait_exit(&h, Duration::from_secs(30)).await;
        let log = t.log(&h).await;
        assert_eq!(st.exit.unwrap().code, Some(0), "{log}");
        let lines: Vec<&str> = log.lines().collect();
        // The cell's root (uid 0 in its namespace: its leased host uid)
        // owns them; nobody else on the host can read them.
        assert_eq!(lines[0], "400 root 10", "{log}");
        assert_eq!(lines[1], "tmpfs ro", "{log}");
        assert!(!log.contains("tok-123456"));
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
}

#[test]
fn list_finds_cells_by_name() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        // PID 1 of a pid namespace ignores signals it has no handler for,
        // so a workload that wants a graceful stop traps TERM.
        let (id, h) = t.create(common::cell("listed", "  command: [\"/bin/sh\", \"-c\", \"trap 'exit 143' TERM; echo ready; sleep 10 & wait\"]\n"), vec![]).await;
        let listed = t.backend.list().await.unwrap();
        let me = listed.iter().find(|l| l.id == id).expect("cell not listed");
        assert_eq!(me.state, CellState::Created);
        t.backend.start(&h).await.unwrap();
        assert_eq!(t.backend.status(&h).await.unwrap().state, CellState::Running);
        let until = Instant::now() + Duration::from_secs(10);
        while !t.log(&h).await.contains("ready") {
            assert!(Instant::now() < until, "workload never set its trap");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        t.backend.stop(&h, Duration::from_millis(200)).await.unwrap();
        let st = t.backend.status(&h).await.unwrap();
        assert_eq!(st.state, CellState::Exited);
        assert_eq!(st.exit.unwrap().code, Some(143), "graceful stop ran the TERM trap");
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
        assert!(!t.backend.list().await.unwrap().iter().any(|l| l.id == id));
    });
}

#[test]
fn stop_escalates_to_sigkill_after_grace() {
    require_process_tier!();
    let t = common::tier();
    common::rt().block_on(async {
        // sleep as PID 1 has no TERM handler: the kernel drops SIGTERM.
        let (_, h) = t
            .create(
                common::cell("stubborn", "  command: [\"/bin/sleep\", \"30\"]\n"),
                vec![],
            )
            .await;
        t.backend.start(&h).await.unwrap();
        t.backend
            .stop(&h, Duration::from_millis(100))
            .await
            .unwrap();
        let st = t.backend.status(&h).await.unwrap();
        assert_eq!(st.state, CellState::Exited);
        assert_eq!(st.exit.unwrap().signal, Some(libc::SIGKILL));
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
}

#[test]
fn runs_on_a_rootfs_image_that_stays_untouched() {
    require_process_tier!();
    let busybox = std::path::Path::new("/bin/busybox");
    if !busybox.exists() {
        eprintln!(
            "SKIP runs_on_a_rootfs_image_that_stays_untouched: /bin/busybox (Debian busybox-static) not installed"
        );
        return;
    }
    let t = common::tier();
    let rootfs = t.dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let store = cellhost_image::ImageStore::new(t.dir.path().join("images"));
    store
        .import(
            "tiny",
            &cellhost_image::ImportRequest {
                rootfs: Some(rootfs.clone()),
                ..Default::default()
            },
        )
        .unwrap();
    common::rt().block_on(async {
        let mut cell = common::cell(
            "rootfs",
            "  command: [\"/bin/sh\", \"-c\", \"/bin/busybox ls / | /bin/busybox tr '\\\\n' ' '; if /bin/busybox touch /bin/x 2>/dev/null; then echo rw; else echo ro; fi\"]\n",
        );
        cell.spec.image = "tiny".into();
        let (h, st) = t.run(cell).await;
        let log = t.log(&h).await;
        assert_eq!(st.exit.unwrap().code, Some(0), "{log}");
        // Only the rootfs's own entries plus the runtime's mount points;
        // nothing of the host's /usr or /etc.
        let entries: Vec<&str> = log.split_whitespace().collect();
        assert!(entries.contains(&"bin") && entries.contains(&"proc") && entries.contains(&"tmp"), "{log}");
        assert!(!entries.contains(&"usr") && !entries.contains(&"etc"), "{log}");
        assert_eq!(entries.last(), Some(&"ro"), "rootfs must be read-only: {log}");
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
    // Nothing was written into the image: its digest holds, and the mount
    // points the cell needed were made in the cell's own layer only.
    assert!(
        store.verify("tiny").unwrap().is_empty(),
        "the image changed"
    );
    let img = store.get("tiny").unwrap().rootfs().unwrap();
    let out = std::process::Command::new("debugfs")
        .args(["-R", "ls /"])
        .arg(&img)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("bin") && !listing.contains("proc"),
        "{listing}"
    );
    // A name that is not in the store is refused, naming the field.
    let mut cell = common::cell("nope", "  command: [\"/bin/true\"]\n");
    cell.spec.image = "missing".into();
    let id = CellId::random();
    let err = common::rt()
        .block_on(t.backend.create(CreateRequest {
            uids: Some(common::lease_uids(&id)),
            ..CreateRequest::new(id.clone(), cell)
        }))
        .unwrap_err();
    assert!(
        matches!(err, BackendError::Invalid(_)) && err.to_string().contains("spec.image"),
        "{err}"
    );
}

#[test]
fn seccomp_denies_user_namespaces_and_keyrings_that_the_host_allows() {
    require_process_tier!();
    let script = "if unshare -U /bin/true 2>/dev/null; then echo userns=ok; else echo userns=denied; fi; \
                  perl -e '$r = syscall(250, 0, -3, 0); print $r < 0 ? \"keyctl=$!\\n\" : \"keyctl=ok\\n\"'";
    // Control: the same commands on the host succeed, so a denial in the
    // cell is the cell's filter, not the host.
    let host = std::process::Command::new("/bin/sh")
        .args(["-c", script])
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout).into_owned();
    assert_eq!(host, "userns=ok\nkeyctl=ok\n", "host control");
    let t = common::tier();
    common::rt().block_on(async {
        let cell = common::cell(
            "sandboxed",
            &format!("  command: [\"/bin/sh\", \"-c\", {script:?}]\n"),
        );
        let (h, st) = t.run(cell).await;
        let log = t.log(&h).await;
        assert_eq!(st.exit.unwrap().code, Some(0), "{log}");
        assert_eq!(log, "userns=denied\nkeyctl=Operation not permitted\n");
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
}
