//! The daemon as the tests drive it: `cellhost serve` on a temp state dir
//! and a plain HTTP/1.1 client written here (so the tests depend on no
//! client code of the binary). Shared by the daemon and hostile tests.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

// ------------------------------------------------------------ HTTP client

pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

#[derive(Clone)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

pub fn request(
    addr: &Addr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> std::io::Result<Resp> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut raw = Vec::new();
    let mut send = |s: &mut dyn ReadWrite| -> std::io::Result<()> {
        s.write_all(req.as_bytes())?;
        // A server refusing an oversized body answers and closes before
        // reading it all: the write fails, the answer is still there.
        let wrote = body.map_or(Ok(()), |b| s.write_all(b));
        let read = s.read_to_end(&mut raw);
        if raw.is_empty() {
            wrote?;
            read?;
        }
        Ok(())
    };
    match addr {
        Addr::Unix(p) => send(&mut UnixStream::connect(p)?)?,
        Addr::Tcp(a) => send(&mut std::net::TcpStream::connect(a)?)?,
    }
    parse_response(&raw)
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

pub fn parse_response(raw: &[u8]) -> std::io::Result<Resp> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v == "chunked")
    {
        body = dechunk(&body).ok_or_else(|| bad("chunked body"))?;
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

pub fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..nl]).ok()?.trim(), 16).ok()?;
        b = &b[nl + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

// ----------------------------------------------------------------- daemon

pub struct Daemon {
    pub child: Option<Child>,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub extra: Vec<String>,
    /// Where the daemon's stderr goes (appended across restarts); None:
    /// the test's stderr.
    pub log: Option<PathBuf>,
    /// RLIMIT_NOFILE the daemon is started with (None: the test's own).
    pub nofile: Option<u64>,
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    pub fn start(extra: &[&str]) -> Daemon {
        Daemon::start_with(extra, false)
    }

    /// Like [`Daemon::start`], with the daemon's log in a file.
    pub fn start_logged(extra: &[&str]) -> Daemon {
        Daemon::start_with(extra, true)
    }

    pub fn start_with(extra: &[&str], logged: bool) -> Daemon {
        Daemon::launch(extra, logged, None)
    }

    /// [`Daemon::start`], the daemon started with RLIMIT_NOFILE `n` (soft
    /// and hard) as if whoever started it had set it.
    pub fn start_with_nofile(extra: &[&str], n: u64) -> Daemon {
        Daemon::launch(extra, false, Some(n))
    }

    fn launch(extra: &[&str], logged: bool, nofile: Option<u64>) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("cellhost-daemon-")
            .tempdir()
            .unwrap();
        let mut d = Daemon {
            child: None,
            state: dir.path().join("state"),
            socket: dir.path().join("api.sock"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: logged.then(|| dir.path().join("daemon.log")),
            nofile,
            _dir: Some(dir),
        };
        d.spawn();
        d
    }

    pub fn spawn(&mut self) {
        let stderr = match &self.log {
            Some(p) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .unwrap(),
            ),
            None => Stdio::inherit(),
        };
        let mut cmd = super::serve_command(&self.state, &self.socket);
        cmd.args(&self.extra).stderr(stderr);
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().expect("spawn cellhost serve");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(30);
        while request(&self.addr(), "GET", "/healthz", None, &[])
            .map(|r| r.status != 200)
            .unwrap_or(true)
        {
            assert!(Instant::now() < until, "daemon did not answer in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> Addr {
        Addr::Unix(self.socket.clone())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let b = body.map(|v| serde_json::to_vec(&v).unwrap());
        request(&self.addr(), method, path, b.as_deref(), &[]).expect("request")
    }

    pub fn create(&self, doc: Value) -> String {
        let r = self.call("POST", "/v1/cells", Some(doc));
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        r.json()["id"].as_str().unwrap().to_string()
    }

    pub fn cells(&self) -> Vec<Value> {
        let r = self.call("GET", "/v1/cells", None);
        assert_eq!(r.status, 200);
        r.json().as_array().unwrap().clone()
    }

    pub fn events(&self) -> Vec<Value> {
        let r = self.call("GET", "/v1/events?limit=1000", None);
        assert_eq!(r.status, 200);
        r.json()["events"].as_array().unwrap().clone()
    }

    /// Through `/v1/cells/{id}/ports/{port}` (a WebSocket on the operator
    /// socket): send `request`, read until the cell's side closes. A
    /// refusal before the upgrade is `Err((status, body))`.
    pub fn port_stream(
        &self,
        id: &str,
        port: u16,
        request: &[u8],
    ) -> Result<Vec<u8>, (u16, String)> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{Error, Message};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sock = tokio::net::UnixStream::connect(&self.socket).await.unwrap();
            let url = format!("ws://cellhost/v1/cells/{id}/ports/{port}");
            let mut ws = match tokio_tungstenite::client_async(url, sock).await {
                Ok((ws, _)) => ws,
                Err(Error::Http(r)) => {
                    let body = String::from_utf8_lossy(r.body().as_deref().unwrap_or_default());
                    return Err((r.status().as_u16(), body.into_owned()));
                }
                Err(e) => panic!("websocket: {e}"),
            };
            ws.send(Message::Binary(request.to_vec().into()))
                .await
                .unwrap();
            let mut out = Vec::new();
            let read = async {
                while let Some(Ok(m)) = ws.next().await {
                    match m {
                        Message::Binary(b) => out.extend_from_slice(&b),
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(30), read)
                .await
                .expect("the port stream ended in 30 s");
            Ok(out)
        })
    }

    /// Wait for reconcile's `orphan.destroyed` event of `id`. It is
    /// written after the teardown returns, so a test that saw the host
    /// objects go must still wait for it.
    pub fn wait_orphan_event(&self, id: &str) {
        wait_until(
            &format!("the orphan event of {id}"),
            Duration::from_secs(30),
            || {
                self.events()
                    .iter()
                    .any(|e| e["subject"] == id && e["type"] == "cellhost.orphan.destroyed")
            },
        );
    }

    /// DELETE a cell: 200, and every check of its report has zero residue.
    /// Returns the report.
    pub fn destroy_clean(&self, id: &str) -> serde_json::Value {
        let r = self.call("DELETE", &format!("/v1/cells/{id}"), None);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let report = r.json();
        assert!(
            report["checks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["residue"] == 0),
            "{report}"
        );
        report
    }

    /// Wait until the cell has a metered interval with CPU and memory.
    pub fn wait_metered(&self, id: &str) {
        wait_until("a usage interval with cpu", Duration::from_secs(15), || {
            let u = self.call("GET", &format!("/v1/cells/{id}"), None).json()["usage"].clone();
            u["cpuSeconds"].as_f64().unwrap_or(0.0) > 0.0
                && u["memoryByteSeconds"].as_f64().unwrap_or(0.0) > 0.0
        });
    }

    /// Destroy every cell through the API and check the reports.
    pub fn destroy_all(&self) {
        for c in self.cells() {
            let id = c["id"].as_str().unwrap();
            let r = self.call("DELETE", &format!("/v1/cells/{id}"), None);
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            assert_eq!(
                r.json()["checks"].as_array().map(|c| c.is_empty()),
                Some(false)
            );
        }
    }

    pub fn backend(&self) -> cellhost_process::ProcessBackend {
        cellhost_process::ProcessBackend::new(cellhost_process::ProcessConfig::new(
            self.state.join("process"),
            cellhost_process::ShimCommand {
                program: super::cellhost_bin(),
                args: vec!["__shim".into()],
            },
        ))
    }

    /// Ids with any host object of this daemon's: a cell dir, or a cgroup
    /// under this state dir's cgroup parent.
    pub fn host_ids(&self) -> BTreeSet<String> {
        let mut ids = BTreeSet::new();
        if let Ok(rd) = std::fs::read_dir(self.state.join("process/cells")) {
            for e in rd.flatten() {
                ids.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
        let rt = super::rt();
        for l in rt
            .block_on(cellhost_core::Backend::list(&self.backend()))
            .unwrap()
        {
            ids.insert(l.id.to_string());
        }
        ids
    }

    /// Mounts under the state dir other than the shared host root.
    pub fn cell_mounts(&self) -> Vec<String> {
        let cells = self.state.join("process/cells");
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&*cells.to_string_lossy()))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Leave nothing for the next test: destroy what is left.
            for c in self.cells() {
                if let Some(id) = c["id"].as_str() {
                    let _ = self.call("DELETE", &format!("/v1/cells/{id}"), None);
                }
            }
            if let Some(c) = self.child.take() {
                super::terminate(c);
            }
        }
        cellhost_process::hostfs::remove_instance_group(self.backend().cgroup_instance());
        for tier in ["vm", "microvm"] {
            cellhost_host::cgroups::remove_instance_group(&cellhost_host::cgroups::instance_tag(
                &self.state.join(tier),
            ));
        }
    }
}

pub fn doc(name: &str, command: &[&str], ttl: u64) -> Value {
    json!({
        "apiVersion": "cellhost.dev/v1", "kind": "Cell",
        "metadata": {"name": name},
        "spec": {"isolation": "process", "command": command,
                 "resources": {"cpus": 0.1, "memoryMiB": 64, "pids": 32},
                 "lifetime": {"ttlSeconds": ttl}}
    })
}

pub fn wait_until(what: &str, max: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + max;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bearer tokens of the two tenants [`tenant_daemon`] knows.
pub const ALICE: &str = "alice-token-0123456789abcdef";
pub const BOB: &str = "bob-token-0123456789abcdef";

/// A daemon with the tenant API on TCP for `alice` and `bob` (tokens
/// [`ALICE`], [`BOB`]), plus `extra` flags; the tokens' dir lives as long
/// as the returned guard.
pub fn tenant_daemon(extra: &[&str]) -> (Daemon, Addr, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let tok_dir = tempfile::tempdir().unwrap();
    let tokens = tok_dir.path().join("tokens");
    std::fs::write(&tokens, format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = super::free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let mut args = vec!["--listen", &listen, "--tokens", tokens.to_str().unwrap()];
    args.extend_from_slice(extra);
    let d = Daemon::start(&args);
    (d, Addr::Tcp(format!("127.0.0.1:{port}")), tok_dir)
}

/// A request as the tenant holding `token`.
pub fn as_tenant(addr: &Addr, token: &str, method: &str, path: &str, body: Option<&Value>) -> Resp {
    let b = body.map(|v| serde_json::to_vec(v).unwrap());
    let auth = format!("Bearer {token}");
    request(
        addr,
        method,
        path,
        b.as_deref(),
        &[("Authorization", &auth)],
    )
    .expect("request")
}
