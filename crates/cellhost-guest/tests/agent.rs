//! The agent as a real process on a unix socket: every op and every rule.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use cellhost_guest::proto::{ErrorCode, MainState};
use cellhost_guest::{ExecRequest, PROTOCOL_VERSION};
use common::*;
use serde_json::{Value, json};

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn hello_ping_status() {
    let a = AgentProc::start(&[]);
    let mut c = a.client();
    assert_eq!(c.agent().version, PROTOCOL_VERSION);
    assert!(c.agent().agent.starts_with("cellhost-agent/"));
    for op in [
        "ping",
        "set_env",
        "set_secret",
        "exec",
        "write_file",
        "read_file",
        "start",
        "configure_net",
        "status",
        "shutdown",
    ] {
        assert!(
            c.agent().ops.iter().any(|o| o == op),
            "{op} missing from hello"
        );
    }
    c.ping().unwrap();
    let st = c.status().unwrap();
    assert!(!st.pid1);
    assert_eq!(st.main, MainState::NotStarted);
    // State dirs are private.
    assert_eq!(mode(&a.state()), 0o700);
    assert_eq!(mode(&a.state().join("secrets")), 0o700);
}

#[test]
fn set_env_merges_and_deletes() {
    let a = AgentProc::start(&[]);
    let mut c = a.client();
    assert_eq!(
        c.set_env(&env(&[("A", "1"), ("B", "two words"), ("C", "x=y")]))
            .unwrap(),
        3
    );
    // Keys not in the request are kept; an empty value deletes.
    assert_eq!(c.set_env(&env(&[("B", ""), ("D", "4")])).unwrap(), 3);
    let file = std::fs::read_to_string(a.state().join("env")).unwrap();
    assert_eq!(file, "A=1\nC=x=y\nD=4\n");
    assert_eq!(mode(&a.state().join("env")), 0o600);
    // Deleting a key that is not there is fine.
    assert_eq!(c.set_env(&env(&[("NOPE", "")])).unwrap(), 3);

    // Execs see the env file, then the request's env on top, and nothing
    // of the agent's own environment.
    let mut req = exec(&[
        "/bin/sh",
        "-c",
        "echo \"$A|$C|$D|$E|${CELLHOST_TEST_AGENT_ENV:-unset}\"",
    ]);
    req.env = env(&[("D", "override"), ("E", "5")]);
    let out = c.exec(req).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1|x=y|override|5|unset\n"
    );
}

#[test]
fn set_env_validates_everything_before_writing() {
    let a = AgentProc::start(&[]);
    let mut c = a.client();
    c.set_env(&env(&[("KEEP", "1")])).unwrap();
    let before = std::fs::read(a.state().join("env")).unwrap();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("GOOD", "x"), ("1BAD", "x")], "env.1BAD"),
        (&[("GOOD", "x"), ("A-B", "x")], "env.A-B"),
        (&[("GOOD", "x"), ("", "x")], "env."),
        (&[("GOOD", "x"), ("NL", "a\nb")], "env.NL"),
        (&[("GOOD", "x"), ("NUL", "a\0b")], "env.NUL"),
        (&[("GOOD", "x"), ("CR", "a\rb")], "env.CR"),
    ];
    for (pairs, field) in cases {
        let e = c.set_env(&env(pairs)).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
        assert!(e.to_string().contains(field), "{e} should name {field}");
    }
    // Nothing of any refused request landed, GOOD included.
    assert_eq!(std::fs::read(a.state().join("env")).unwrap(), before);
}

#[test]
fn set_secret_writes_0600_files() {
    let a = AgentProc::start_env(&[], &[], &[("CELLHOST_AGENT_LOG", "trace")]);
    let mut c = a.client();
    let value: Vec<u8> = (0..=255u8).collect();
    c.set_secret("db-password_1", &value).unwrap();
    let path = a.state().join("secrets/db-password_1");
    assert_eq!(std::fs::read(&path).unwrap(), value);
    assert_eq!(mode(&path), 0o600);
    // Replacing is atomic and keeps the mode.
    c.set_secret("db-password_1", b"new").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"new");
    assert_eq!(mode(&path), 0o600);

    for bad in ["", ".", "..", "../x", "a/b", "a.b", "a b", "é"] {
        let e = c.set_secret(bad, b"x").unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{bad}: {e}");
        assert!(e.to_string().contains("name"), "{e}");
    }
    let e = c.set_secret(&"x".repeat(256), b"x").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest));
    // The longest allowed name works (the temp file's name does not grow
    // with it).
    c.set_secret(&"y".repeat(255), b"long").unwrap();
    std::fs::remove_file(a.state().join("secrets").join("y".repeat(255))).unwrap();
    // Nothing escaped the secrets dir and no temp file stayed.
    let names: Vec<String> = std::fs::read_dir(a.state().join("secrets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["db-password_1"]);
    assert!(!a.dir.path().join("x").exists());
    // The secret never shows in the agent's log, even at trace level.
    drop(c);
    let log = a.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG") || log.contains("INFO"),
        "{log}"
    );
    for form in ["\\x00\\x01\\x02", "AAECAwQF", "bmV3"] {
        assert!(!log.contains(form), "{form} in {log}");
    }

    // Bad base64 is refused by field.
    let mut raw = a.raw();
    raw.write_all(b"{\"op\":\"set_secret\",\"id\":1,\"name\":\"k\",\"value_b64\":\"***\"}\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(&raw).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().starts_with("value_b64"), "{v}");
}

#[test]
fn exec_exit_codes_streams_stdin_cwd() {
    let a = AgentProc::start(&[]);
    let mut c = a.client();
    let out = c
        .exec(exec(&["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]))
        .unwrap();
    assert_eq!(
        (out.exit_code, out.signal, out.timed_out),
        (Some(3), None, false)
    );
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    let out = c.exec(exec(&["true"])).unwrap();
    assert_eq!(out.exit_code, Some(0), "argv[0] is looked up in PATH");

    let mut req = exec(&["/bin/sh", "-c", "kill -TERM $$"]);
    req.timeout_ms = Some(10_000);
    let out = c.exec(req).unwrap();
    assert_eq!((out.exit_code, out.signal), (None, Some(15)));

    let mut req = exec(&["cat"]);
    req.stdin_b64 = Some("aGVsbG8gc3RkaW4=".into()); // "hello stdin"
    assert_eq!(c.exec(req).unwrap().stdout, b"hello stdin");

    let mut req = exec(&["pwd"]);
    req.cwd = Some(a.files().display().to_string());
    assert_eq!(
        c.exec(req).unwrap().stdout,
        format!("{}\n", a.files().display()).into_bytes()
    );

    // Output beyond max_output is read and counted, not kept.
    let mut req = exec(&[
        "/bin/sh",
        "-c",
        "head -c 300000 /dev/zero; head -c 10 /dev/zero >&2",
    ]);
    req.max_output = Some(1000);
    let out = c.exec(req).unwrap();
    assert_eq!((out.stdout.len(), out.stdout_dropped), (1000, 299_000));
    assert_eq!((out.stderr.len(), out.stderr_dropped), (10, 0));
    assert_eq!(out.exit_code, Some(0));
}

#[test]
fn exec_timeout_kills_the_process_group() {
    let a = AgentProc::start(&[]);
    let mut c = a.client();
    let marker = a.dir.path().join("still-running");
    let mut req = exec(&[
        "/bin/sh",
        "-c",
        &format!("(sleep 2; touch {}) & sleep 30", marker.display()),
    ]);
    req.timeout_ms = Some(300);
    let out = c.exec(req).unwrap();
    assert!(out.timed_out);
    assert_eq!((out.exit_code, out.signal), (None, Some(9)));
    // The background child was in the group and died with it.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!marker.exists(), "a child of the timed-out exec survived");

    // A command that exits but leaves a child holding its stdout: the
    // exec answers soon after the command's exit, with its exit code and
    // what was written, not at its deadline (timed_out stays false).
    let mut req = exec(&["/bin/sh", "-c", "sleep 3 & echo started; exit 4"]);
    req.timeout_ms = Some(60_000);
    let out = c.exec(req).unwrap();
    assert_eq!((out.exit_code, out.timed_out), (Some(4), false));
    assert_eq!(out.stdout, b"started\n");

    // Processes that left the group survive a timeout (documented), but
    // the exec still ends and leaves no thread or descriptor behind.
    let pid = a.child.id();
    let threads_before = proc_field(pid, "Threads:");
    let fds_before = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    for _ in 0..3 {
        let mut req = exec(&["setsid", "-w", "sleep", "3"]);
        req.timeout_ms = Some(200);
        let out = c.exec(req).unwrap();
        assert!(out.timed_out);
    }
    assert_eq!(
        proc_field(pid, "Threads:"),
        threads_before,
        "exec threads leaked"
    );
    assert_eq!(
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count(),
        fds_before,
        "exec descriptors leaked"
    );
    // The agent reaps what it started: no zombies under it.
    let mut zombies = zombie_children(pid);
    for _ in 0..50 {
        if zombies.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        zombies = zombie_children(pid);
    }
    assert!(zombies.is_empty(), "zombies under the agent: {zombies:?}");
}

fn proc_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap()
}

fn zombie_children(parent: u32) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 1 && f[1] == parent.to_string() && f[0] == "Z" {
            out.push(stat);
        }
    }
    out
}

#[test]
fn exec_validation() {
    let a = AgentProc::start(&[]);
    let mut c = a.client();
    let check = |c: &mut cellhost_guest::Client, req: ExecRequest, code: ErrorCode, field: &str| {
        let e = c.exec(req).unwrap_err();
        assert_eq!(e.code(), Some(code), "{e}");
        assert!(e.to_string().contains(field), "{e} should name {field}");
    };
    check(&mut c, exec(&[]), ErrorCode::InvalidRequest, "argv");
    check(
        &mut c,
        exec(&["/no/such/program"]),
        ErrorCode::SpawnFailed,
        "argv[0]",
    );
    check(
        &mut c,
        exec(&["a", "b\0"]),
        ErrorCode::InvalidRequest,
        "argv[1]",
    );
    let mut r = exec(&["true"]);
    r.cwd = Some("relative".into());
    check(&mut c, r, ErrorCode::InvalidRequest, "cwd");
    let mut r = exec(&["true"]);
    r.cwd = Some("/no/such/dir".into());
    check(&mut c, r, ErrorCode::SpawnFailed, "argv[0]");
    let mut r = exec(&["true"]);
    r.timeout_ms = Some(0);
    check(&mut c, r, ErrorCode::InvalidRequest, "timeout_ms");
    let mut r = exec(&["true"]);
    r.max_output = Some(10 << 20);
    check(&mut c, r, ErrorCode::InvalidRequest, "max_output");
    let mut r = exec(&["true"]);
    r.env = env(&[("BAD-NAME", "x")]);
    check(&mut c, r, ErrorCode::InvalidRequest, "env.BAD-NAME");
    let mut r = exec(&["true"]);
    r.stdin_b64 = Some("!!".into());
    check(&mut c, r, ErrorCode::InvalidRequest, "stdin_b64");
    // Still usable.
    c.ping().unwrap();
}

#[test]
fn exec_can_be_turned_off() {
    let a = AgentProc::start(&["--no-exec"]);
    let e = a.client().exec(exec(&["true"])).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Disabled), "{e}");
}

#[test]
fn files_round_trip_and_confinement() {
    let a = AgentProc::start(&[]);
    let mut c = a.client();
    let root = a.files();
    let p = format!("{}/sub/dir/data.bin", root.display());
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    c.write_file(&p, &data, Some(0o640), true).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    assert_eq!(mode(std::path::Path::new(&p)), 0o640);
    assert_eq!(mode(&root.join("sub")), 0o700);
    assert_eq!(c.read_file_all(&p, 1 << 20).unwrap(), data);
    let (chunk, reply) = c.read_file(&p, 199_990, Some(100)).unwrap();
    assert_eq!((chunk.len(), reply.size, reply.eof), (10, 200_000, true));
    let (chunk, reply) = c.read_file(&p, 0, Some(100)).unwrap();
    assert_eq!((chunk.len(), reply.eof), (100, false));

    // A file bigger than one chunk is read in chunks.
    let big = root.join("big");
    let out = c
        .exec(exec(&[
            "/bin/sh",
            "-c",
            &format!("head -c 1300000 /dev/urandom > {}", big.display()),
        ]))
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    let got = c
        .read_file_all(&big.display().to_string(), 2 << 20)
        .unwrap();
    assert_eq!(got, std::fs::read(&big).unwrap());
    let e = c
        .read_file_all(&big.display().to_string(), 1000)
        .unwrap_err();
    assert!(
        e.to_string().contains("more than the 1000 byte limit"),
        "{e}"
    );

    // Confinement.
    std::fs::create_dir(a.dir.path().join("outside")).unwrap();
    std::os::unix::fs::symlink(a.dir.path().join("outside"), root.join("escape")).unwrap();
    let refused = |c: &mut cellhost_guest::Client, path: &str| {
        let e = c.write_file(path, b"x", None, true).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::PathNotAllowed), "{path}: {e}");
        let e = c.read_file(path, 0, None).unwrap_err();
        assert!(
            matches!(e.code(), Some(ErrorCode::PathNotAllowed)),
            "{path}: {e}"
        );
    };
    refused(&mut c, &format!("{}/escape/f", root.display()));
    refused(&mut c, &format!("{}/../outside/f", root.display()));
    refused(&mut c, "/etc/passwd");
    refused(&mut c, &a.state().join("env").display().to_string());
    assert_eq!(
        std::fs::read_dir(a.dir.path().join("outside"))
            .unwrap()
            .count(),
        0
    );

    let e = c
        .read_file(&format!("{}/missing", root.display()), 0, None)
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    let e = c
        .write_file("relative/path", b"x", None, false)
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    // Over the body cap: refused, nothing written.
    let e = c
        .write_file(
            &format!("{}/huge", root.display()),
            &vec![0u8; 600 * 1024],
            None,
            false,
        )
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    assert!(!root.join("huge").exists());
    let e = c.read_file(&p, 0, Some(10 << 20)).unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
}

#[test]
fn files_off_without_roots() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let mut child = std::process::Command::new(AGENT)
        .arg("--unix")
        .arg(&sock)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut c =
        cellhost_guest::Client::connect(&cellhost_guest::Endpoint::Unix(sock), &opts()).unwrap();
    let e = c.read_file("/etc/hostname", 0, None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Disabled), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Send raw lines, read one answer per line.
fn exchange(raw: &std::os::unix::net::UnixStream, lines: &[Vec<u8>]) -> Vec<Value> {
    let mut w = raw.try_clone().unwrap();
    let mut r = BufReader::new(raw.try_clone().unwrap());
    let mut out = vec![];
    for l in lines {
        w.write_all(l).unwrap();
        let mut resp = String::new();
        r.read_line(&mut resp).unwrap();
        out.push(serde_json::from_str(&resp).unwrap_or_else(|e| panic!("{resp:?}: {e}")));
    }
    out
}

#[test]
fn hostile_lines_get_errors_and_the_connection_stays_usable() {
    let a = AgentProc::start(&[]);
    let raw = a.raw();
    let mut big = vec![b'x'; 3 << 20];
    big.push(b'\n');
    let lines: Vec<Vec<u8>> = vec![
        b"not json\n".to_vec(),
        b"{\n".to_vec(),
        b"[1,2]\n".to_vec(),
        b"\xff\xfe\n".to_vec(),
        b"{\"op\":\"launch_missiles\",\"id\":5}\n".to_vec(),
        b"{\"id\":6}\n".to_vec(),
        b"{\"op\":7,\"id\":7}\n".to_vec(),
        b"{\"op\":\"ping\",\"id\":{\"x\":1}}\n".to_vec(),
        b"{\"op\":\"ping\",\"id\":9,\"extra\":1}\n".to_vec(),
        b"{\"op\":\"set_env\",\"id\":10,\"env\":[1]}\n".to_vec(),
        big,
        b"{\"op\":\"ping\",\"id\":\"after\"}\r\n".to_vec(),
    ];
    let got = exchange(&raw, &lines);
    let codes: Vec<&str> = got
        .iter()
        .map(|v| v["code"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(
        codes,
        [
            "bad_json",
            "bad_json",
            "bad_json",
            "bad_json",
            "unknown_op",
            "unknown_op",
            "unknown_op",
            "bad_id",
            "invalid_request",
            "invalid_request",
            "line_too_long",
            "-"
        ]
    );
    assert_eq!(got[4]["id"], 5, "the id comes back on an unknown op");
    assert_eq!(got[8]["id"], 9);
    assert!(got[8]["error"].as_str().unwrap().contains("extra"));
    assert_eq!(got[11], json!({"id": "after", "ok": true, "pong": true}));
}

#[test]
fn an_endless_line_does_not_grow_the_agent() {
    let a = AgentProc::start(&[]);
    let raw = a.raw();
    let mut w = raw.try_clone().unwrap();
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..64 {
        w.write_all(&chunk).unwrap();
    }
    w.write_all(b"\n{\"op\":\"ping\",\"id\":1}\n").unwrap();
    let mut r = BufReader::new(raw);
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    let v: Value = serde_json::from_str(&l).unwrap();
    assert_eq!(v["code"], "line_too_long");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains(&(64usize << 20).to_string()),
        "{v}"
    );
    l.clear();
    r.read_line(&mut l).unwrap();
    assert!(l.contains("\"pong\":true"), "{l}");
    // 64 MiB went through; the agent's peak RSS stayed a few MiB.
    let status = std::fs::read_to_string(format!("/proc/{}/status", a.child.id())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 32 * 1024,
        "agent peak RSS {hwm_kib} KiB after a 64 MiB line"
    );
}

#[test]
fn env_file_is_never_seen_half_written() {
    let a = AgentProc::start(&[]);
    let mut c = a.client();
    let big_a = "a".repeat(100_000);
    let big_b = "b".repeat(100_000);
    c.set_env(&env(&[("V", &big_a), ("W", "w")])).unwrap();
    let path = a.state().join("env");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (path, stop) = (path.clone(), stop.clone());
        let (want_a, want_b) = (format!("V={big_a}\nW=w\n"), format!("V={big_b}\nW=w\n"));
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let got = std::fs::read_to_string(&path).unwrap();
                assert!(
                    got == want_a || got == want_b,
                    "torn env file of {} bytes",
                    got.len()
                );
                reads += 1;
            }
            reads
        })
    };
    for i in 0..300 {
        let v = if i % 2 == 0 { &big_b } else { &big_a };
        c.set_env(&env(&[("V", v)])).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("reader saw a torn file");
    assert!(reads > 0);
}

#[test]
fn concurrent_set_env_loses_no_key() {
    let a = AgentProc::start(&[]);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let mut c = a.client();
            std::thread::spawn(move || {
                for i in 0..25 {
                    c.set_env(&env(&[(&format!("T{t}_{i}"), "1")])).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let file = std::fs::read_to_string(a.state().join("env")).unwrap();
    assert_eq!(file.lines().count(), 100, "{file}");
}

#[test]
fn main_command_status_and_shutdown() {
    let mut a = AgentProc::start_with(&[], &["/bin/sh", "-c", "sleep 0.2; exit 7"]);
    let mut c = a.client();
    let mut st = c.status().unwrap();
    for _ in 0..300 {
        if matches!(st.main, MainState::Exited { .. }) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        st = c.status().unwrap();
    }
    assert_eq!(
        st.main,
        MainState::Exited {
            exit_code: Some(7),
            signal: None
        }
    );
    c.shutdown().unwrap();
    assert!(a.wait_exit().success());
    assert!(!a.sock.exists() || std::os::unix::net::UnixStream::connect(&a.sock).is_err());
}

#[test]
fn shutdown_kills_a_running_main_command() {
    let mut a = AgentProc::start_with(&[], &["sleep", "300"]);
    let mut c = a.client();
    let MainState::Running { pid } = c.status().unwrap().main else {
        panic!("main not running")
    };
    c.shutdown().unwrap();
    assert!(a.wait_exit().success());
    // The main command's group got SIGKILL; the agent process is gone so
    // init reaps it (or it is a zombie under a sandbox's init).
    let mut gone = false;
    for _ in 0..100 {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        if state.is_none_or(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        }) {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gone, "main command {pid} survived shutdown");
}

#[test]
fn main_command_that_cannot_start_is_reported() {
    let a = AgentProc::start_with(&[], &["/no/such/binary"]);
    let st = a.client().status().unwrap();
    match st.main {
        MainState::SpawnFailed { error } => assert!(error.contains("/no/such/binary"), "{error}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn inherited_descriptors_do_not_reach_execs() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let leak = dir.path().join("leak");
    // fd 7 is open (without close-on-exec) when the agent starts.
    let child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg("exec 7>\"$1\"; exec \"$2\" --unix \"$3\" --state-dir \"$4\"")
        .arg("sh")
        .arg(&leak)
        .arg(AGENT)
        .arg(&sock)
        .arg(dir.path().join("state"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    let mut c =
        cellhost_guest::Client::connect(&cellhost_guest::Endpoint::Unix(sock), &opts()).unwrap();
    let agent_fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", child.0.id()))
        .unwrap()
        .map(|e| {
            std::fs::read_link(e.unwrap().path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert!(
        agent_fds.iter().any(|l| l.ends_with("/leak")),
        "the agent should hold fd 7: {agent_fds:?}"
    );
    let out = c
        .exec(exec(&["/bin/sh", "-c", "ls -l /proc/self/fd/"]))
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        !listing.contains("/leak"),
        "inherited fd reached the exec:\n{listing}"
    );
}

#[test]
fn start_runs_the_main_command_once_after_env_and_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let out = dir.path().join("out");
    let a = AgentProc::start(&["--secrets-dir", secrets.to_str().unwrap()]);
    let mut c = a.client();
    assert_eq!(c.status().unwrap().main, MainState::NotStarted);
    c.set_env(&common::env(&[("WHO", "cell")])).unwrap();
    c.set_secret("tok", b"t0ken").unwrap();
    assert_eq!(common::mode(&secrets), 0o700);
    assert_eq!(common::mode(&secrets.join("tok")), 0o600);
    // Field errors name the field, and nothing starts.
    let e = c.start(&[], None).unwrap_err().to_string();
    assert!(e.contains("argv"), "{e}");
    let e = c
        .start(&["/bin/true".into()], Some("rel"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cwd"), "{e}");
    assert_eq!(c.status().unwrap().main, MainState::NotStarted);
    let script = format!(
        "echo \"$WHO $(cat {}) $(pwd)\" > {}; exit 6",
        secrets.join("tok").display(),
        out.display()
    );
    let pid = c
        .start(&["/bin/sh".into(), "-c".into(), script], Some("/tmp"))
        .unwrap();
    assert!(pid > 0);
    // Once only.
    let e = c.start(&["/bin/true".into()], None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Busy), "{e}");
    let mut st = c.status().unwrap();
    for _ in 0..300 {
        if matches!(st.main, MainState::Exited { .. }) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        st = c.status().unwrap();
    }
    assert_eq!(
        st.main,
        MainState::Exited {
            exit_code: Some(6),
            signal: None
        }
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "cell t0ken /tmp\n");
}

/// `configure_net` in a network namespace this test makes, with a veth
/// peer as eth0: address, netmask, up, default route and resolv.conf land; an
/// agent that is neither PID 1 nor started with --configure-net refuses.
#[test]
fn configure_net_sets_address_route_and_resolvers_only_when_allowed() {
    use cellhost_guest::proto::NetRequest;
    let a = AgentProc::start(&[]);
    let e = a
        .client()
        .configure_net(NetRequest {
            interface: None,
            address: "10.9.8.7/24".into(),
            gateway: None,
            dns: vec![],
        })
        .unwrap_err();
    assert!(e.to_string().contains("disabled"), "{e}");
    if !nix::unistd::Uid::effective().is_root()
        || !std::path::Path::new("/usr/sbin/ip").exists()
            && !std::path::Path::new("/sbin/ip").exists()
    {
        eprintln!("SKIP the netns half: needs root and ip");
        return;
    }
    let ns = format!("chagent-{}", std::process::id());
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    ip(&["netns", "add", &ns]);
    let _del = DelNs(ns.clone());
    // (This kernel has no dummy driver: a veth whose peer is the netns's
    // eth0; the pair goes with the netns.)
    let host_end = format!("chag{}", std::process::id() % 100_000_000);
    ip(&[
        "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ]);
    ip(&["link", "set", &host_end, "up"]);
    let resolv = tempfile::tempdir().unwrap();
    let resolv_dir = resolv.path().join("etc");
    let a = AgentProc::start_wrapped(
        &["ip", "netns", "exec", &ns],
        &[
            "--configure-net",
            "--resolv-dir",
            resolv_dir.to_str().unwrap(),
        ],
        &[],
        &[],
    );
    let mut c = a.client();
    let bad = c
        .configure_net(NetRequest {
            interface: None,
            address: "10.9.8.7/24".into(),
            gateway: Some("10.9.9.1".into()),
            dns: vec![],
        })
        .unwrap_err();
    assert!(
        bad.to_string().contains("gateway: 10.9.9.1 is not on"),
        "{bad}"
    );
    for _ in 0..2 {
        // Twice: the second is a no-op that succeeds (route exists).
        c.configure_net(NetRequest {
            interface: None,
            address: "10.9.8.7/24".into(),
            gateway: Some("10.9.8.1".into()),
            dns: vec!["10.9.8.53".into()],
        })
        .unwrap();
    }
    let addrs = ip(&["-n", &ns, "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("inet 10.9.8.7/24"), "{addrs}");
    let link = ip(&["-n", &ns, "-o", "link", "show", "dev", "eth0"]);
    assert!(link.contains(",UP"), "{link}");
    let lo = ip(&["-n", &ns, "-o", "link", "show", "dev", "lo"]);
    assert!(lo.contains(",UP"), "{lo}");
    let routes = ip(&["-n", &ns, "-4", "route"]);
    assert!(routes.contains("default via 10.9.8.1 dev eth0"), "{routes}");
    assert_eq!(
        std::fs::read_to_string(resolv_dir.join("resolv.conf")).unwrap(),
        "# spec.network.dns\nnameserver 10.9.8.53\n"
    );
    let missing = c
        .configure_net(NetRequest {
            interface: Some("eth9".into()),
            address: "10.9.8.7/24".into(),
            gateway: None,
            dns: vec![],
        })
        .unwrap_err();
    assert!(missing.to_string().contains("eth9"), "{missing}");
}
