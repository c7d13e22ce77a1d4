//! The host client against scripted servers: the cases a real agent does
//! not produce on demand (a legacy daemon, a refused version, a late
//! answer, an unknown error code, a peer that stops reading, a lying
//! file reader).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cellhost_guest::proto::ErrorCode;
use cellhost_guest::{Client, ClientError, ConnectOptions, Endpoint, ExecRequest};
use serde_json::{Value, json};

/// A server on `dir/s.sock` answering each request line with
/// `answer(request)`: `None` = say nothing, `Some((delay, reply))`.
fn scripted(
    dir: &Path,
    answer: impl Fn(&Value) -> Option<(Duration, Value)> + Send + 'static,
) -> PathBuf {
    let path = dir.join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let conn = conn.unwrap();
            let mut w = conn.try_clone().unwrap();
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if let Some((delay, reply)) = answer(&req) {
                    std::thread::sleep(delay);
                    let mut out = serde_json::to_vec(&reply).unwrap();
                    out.push(b'\n');
                    if w.write_all(&out).is_err() {
                        break;
                    }
                }
            }
        }
    });
    path
}

fn quick() -> ConnectOptions {
    ConnectOptions {
        deadline: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    }
}

fn ok(req: &Value, extra: Value) -> Option<(Duration, Value)> {
    let mut v = json!({"id": req["id"], "ok": true});
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    Some((Duration::ZERO, v))
}

fn hello(req: &Value) -> Option<(Duration, Value)> {
    ok(
        req,
        json!({"version": 1, "agent": "scripted", "ops": ["hello", "ping", "read_file", "write_file"], "max_line": 1048576}),
    )
}

#[test]
fn microvm_runtime_daemon_is_spoken_to_as_legacy() {
    let dir = tempfile::tempdir().unwrap();
    // As microvm-runtime's guest_metadata_daemon: string ids only, three
    // ops, errors without a code.
    let sock = scripted(dir.path(), |req| {
        let Some(id) = req["id"].as_str() else {
            return Some((
                Duration::ZERO,
                json!({"id": "", "ok": false, "error": "invalid request json"}),
            ));
        };
        match req["op"].as_str() {
            Some("ping") | Some("set_env") | Some("set_secret") => {
                Some((Duration::ZERO, json!({"id": id, "ok": true})))
            }
            _ => Some((
                Duration::ZERO,
                json!({"id": id, "ok": false, "error": "unknown op"}),
            )),
        }
    });
    let mut c = Client::connect(&Endpoint::Unix(sock), &quick()).unwrap();
    assert_eq!(c.agent().version, 0);
    c.ping().unwrap();
    c.set_secret("k", b"v").unwrap();
    c.set_env(&[("A".to_string(), "1".to_string())].into())
        .unwrap();
    // An op the legacy agent lacks is refused here, without a round trip.
    let e = c
        .exec(ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Unsupported { op: "exec", .. }),
        "{e}"
    );
}

#[test]
fn a_refused_version_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = counter.clone();
    let sock = scripted(dir.path(), move |req| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Some((
            Duration::ZERO,
            json!({"id": req["id"], "ok": false, "error": "version: too old", "code": "unsupported_version"}),
        ))
    });
    let e = Client::connect(&Endpoint::Unix(sock), &quick())
        .err()
        .unwrap();
    assert!(matches!(e, ClientError::Version { .. }), "{e}");
    assert_eq!(
        counter.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "retried"
    );
}

#[test]
fn an_unknown_error_code_is_still_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let sock = scripted(dir.path(), |req| match req["op"].as_str() {
        Some("hello") => hello(req),
        _ => Some((
            Duration::ZERO,
            json!({"id": req["id"], "ok": false, "error": "over quota", "code": "quota_exceeded"}),
        )),
    });
    let mut c = Client::connect(&Endpoint::Unix(sock), &quick()).unwrap();
    let e = c.ping().unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unknown), "{e}");
    assert!(e.to_string().contains("over quota"), "{e}");
}

#[test]
fn a_late_answer_is_dropped_and_the_next_call_works() {
    let dir = tempfile::tempdir().unwrap();
    let pings = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sock = scripted(dir.path(), move |req| match req["op"].as_str() {
        Some("hello") => hello(req),
        _ => {
            let n = pings.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // The first ping is answered late, with a marker.
            let delay = if n == 0 {
                Duration::from_millis(400)
            } else {
                Duration::ZERO
            };
            ok(req, json!({"n": n})).map(|(_, v)| (delay, v))
        }
    });
    let mut c = Client::connect(&Endpoint::Unix(sock), &quick()).unwrap();
    let e = c
        .call_within(cellhost_guest::proto::Op::Ping, Duration::from_millis(100))
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    // The late answer to ping 0 arrives first and is not taken for ping 1's.
    let fields = c.call(cellhost_guest::proto::Op::Ping).unwrap();
    assert_eq!(fields["n"], 1);
}

#[test]
fn a_request_cut_off_mid_write_breaks_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // Answers hello, then never reads again.
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut w = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let req: Value = serde_json::from_str(&line).unwrap();
        let mut out = serde_json::to_vec(&hello(&req).unwrap().1).unwrap();
        out.push(b'\n');
        w.write_all(&out).unwrap();
        std::thread::sleep(Duration::from_secs(30));
        drop(r);
    });
    let mut c = Client::connect(&Endpoint::Unix(path), &quick()).unwrap();
    let big = vec![7u8; 500 * 1024];
    let e = c
        .call_within(
            cellhost_guest::proto::Op::WriteFile(cellhost_guest::proto::WriteFileRequest {
                path: "/x".into(),
                content_b64: base64_of(&big),
                ..Default::default()
            }),
            Duration::from_millis(200),
        )
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    let e = c.ping().unwrap_err();
    assert!(matches!(e, ClientError::Broken { .. }), "{e}");
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn read_file_all_does_not_trust_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    // Claims an empty file that never ends.
    let sock = scripted(dir.path(), |req| match req["op"].as_str() {
        Some("hello") => hello(req),
        _ => ok(
            req,
            json!({"content_b64": base64_of(&[1u8; 1000]), "size": 0, "offset": req["offset"], "eof": false}),
        ),
    });
    let mut c = Client::connect(&Endpoint::Unix(sock), &quick()).unwrap();
    let e = c.read_file_all("/f", 5000).unwrap_err();
    assert!(e.to_string().contains("5000 byte limit"), "{e}");
}

#[test]
fn the_deadline_bounds_connect_against_a_silent_peer() {
    let dir = tempfile::tempdir().unwrap();
    let sock = scripted(dir.path(), |_| None);
    let o = ConnectOptions {
        deadline: Duration::from_millis(300),
        attempt_timeout: Duration::from_secs(60),
        ..quick()
    };
    let e = Client::connect(&Endpoint::Unix(sock), &o).err().unwrap();
    let ClientError::NotReady { waited, .. } = e else {
        panic!("{e}")
    };
    // The 60 s attempt timeout was cut to the 300 ms deadline: the wait is
    // below one attempt timeout (a bound on logic, not on speed).
    assert!(waited < Duration::from_secs(60), "{waited:?}");
}
