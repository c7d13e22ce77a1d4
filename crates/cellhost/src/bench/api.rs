//! `cellhost bench api`: create→running throughput and latency of process
//! cells through the daemon's HTTP API, against the library-direct paths in
//! the same run:
//!
//! - **backend**: `ProcessBackend::create` + `start`, nothing else (the
//!   floor: what the kernel and libcontainer cost);
//! - **supervisor**: `Supervisor::create` in-process: admission, the store
//!   commits (fsync'd), events, backend;
//! - **api**: `POST /v1/cells` to a `cellhost serve` child over its unix
//!   socket, one connection per request as the CLI does: HTTP, JSON, the
//!   document parse and validate, then the same supervisor path.
//!
//! Each mode runs the same number of cells with the same concurrency, in
//! interleaved batches so drift hits all alike; cells run `sleep` and are
//! destroyed after each batch (destroy is not timed here). The API's own
//! overhead is api vs supervisor; the daemon's total is api vs backend.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cellhost_core::ids::CellId;
use cellhost_core::{Backend, CreateRequest};
use cellhost_store::Store;
use cellhost_supervisor::{Caller, Supervisor, SupervisorConfig};
use hyper::Method;
use serde_json::{Value, json};

use crate::bench::Series;
use crate::client::{Client, Target};

const BATCH: usize = 25;

fn doc() -> Value {
    json!({
        "apiVersion": "cellhost.dev/v1", "kind": "Cell",
        "metadata": {"name": "bench"},
        "spec": {"isolation": "process", "image": "host", "command": ["/bin/sleep", "600"],
                 "resources": {"memoryMiB": 64, "pids": 8, "cpus": 0.5},
                 "lifetime": {"ttlSeconds": 600}}
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Backend,
    Supervisor,
    Api,
}

/// One mode's latencies and the wall time of its batches.
#[derive(Default)]
struct Throughput {
    lat: Series,
    wall: Duration,
}

impl Throughput {
    fn pct(&self, p: f64) -> f64 {
        self.lat.ms(p).unwrap_or(f64::NAN)
    }
    fn rate(&self) -> f64 {
        self.lat.0.len() as f64 / self.wall.as_secs_f64()
    }
    fn json(&self) -> Value {
        let mut v = self.lat.json();
        v["cells_per_s"] = json!(self.rate());
        v
    }
}

struct Daemon {
    child: std::process::Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

async fn spawn_daemon(dir: &Path) -> anyhow::Result<(Daemon, Client)> {
    let socket = dir.join("api.sock");
    let child = std::process::Command::new(std::env::current_exe()?)
        .arg("--state-dir")
        .arg(dir)
        .args([
            "serve",
            "--cpu-overcommit",
            "1024",
            "--reserve-memory-mib",
            "0",
            "--socket",
        ])
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("spawning cellhost serve")?;
    let d = Daemon { child, socket };
    let c = Client::new(Target::Unix(d.socket.clone()), None);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if c.json::<Value>(Method::GET, "/healthz", None).await.is_ok() {
            return Ok((d, c));
        }
        anyhow::ensure!(
            Instant::now() < until,
            "the bench daemon did not answer in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn bench_api(
    state_dir: &Path,
    n: usize,
    concurrency: usize,
    json_out: bool,
) -> anyhow::Result<u8> {
    let root = state_dir.join(format!("bench-api-{}", std::process::id()));
    // Process cells run as their own uid, which must pass through it.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&root)?;
    let _groups = ["backend", "supervisor", "daemon"]
        .map(|sub| crate::bench::RemoveInstanceGroup(root.join(sub).join("process")));
    let _cleanup = crate::bench::RemoveOnDrop(root.clone());
    let backend = crate::commands::run::backend_for(
        cellhost_spec::Isolation::Process,
        &root.join("backend"),
        Default::default(),
        &Default::default(),
        &Default::default(),
    )?;
    let lib_dir = root.join("supervisor");
    let store = Arc::new(Store::open(&lib_dir)?);
    let mut cfg = SupervisorConfig::new("bench", lib_dir.clone());
    cfg.admission.cpu_overcommit = 1024.0;
    cfg.admission.host_reserve_bytes = 0;
    let sup = Supervisor::new(
        store,
        vec![crate::commands::run::backend_for(
            cellhost_spec::Isolation::Process,
            &lib_dir,
            Default::default(),
            &Default::default(),
            &Default::default(),
        )?],
        cfg,
    )?;
    let (daemon, client) = spawn_daemon(&root.join("daemon")).await?;
    let client = Arc::new(client);
    let body = Arc::new(serde_json::to_vec(&doc())?);
    let direct = Arc::new(Direct {
        backend,
        uids: crate::bench::BenchUids::new(),
    });

    let mut results = [
        Throughput::default(),
        Throughput::default(),
        Throughput::default(),
    ];
    let modes = [Mode::Backend, Mode::Supervisor, Mode::Api];
    // Warm-up: one small batch of each, untimed.
    for m in modes {
        run_batch(m, 4, concurrency, &direct, &sup, &client, &body).await?;
    }
    let mut done = 0;
    while done < n {
        let k = BATCH.min(n - done);
        for (i, m) in modes.iter().enumerate() {
            let (lat, wall) = run_batch(*m, k, concurrency, &direct, &sup, &client, &body).await?;
            results[i].lat.0.extend(lat);
            results[i].wall += wall;
        }
        done += k;
    }
    drop(daemon);

    let [b, s, a] = &results;
    let overhead = |x: &Throughput, base: &Throughput| (base.rate() / x.rate() - 1.0) * 100.0;
    let api_vs_sup = overhead(a, s);
    let api_vs_backend = overhead(a, b);
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "bench": "api", "cells": n, "concurrency": concurrency,
                "backend_direct": b.json(), "supervisor_direct": s.json(), "api": a.json(),
                "api_overhead_vs_supervisor_pct": api_vs_sup,
                "api_overhead_vs_backend_pct": api_vs_backend,
                "targets_met": {"api_ge_200_cells_per_s": a.rate() >= 200.0,
                                "api_overhead_le_20pct": api_vs_sup <= 20.0},
            }))?
        );
        return Ok(0);
    }
    println!(
        "cellhost bench api: {n} process cells per mode, {concurrency} in flight, interleaved batches of {BATCH}"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "create -> running", "cells/s", "p50 ms", "p99 ms"
    );
    for (name, r) in [
        ("library: ProcessBackend create+start", b),
        ("library: Supervisor::create (store, events)", s),
        ("API: POST /v1/cells over the unix socket", a),
    ] {
        println!(
            "{name:<44} {:>9.1} {:>9.2} {:>9.2}",
            r.rate(),
            r.pct(50.0),
            r.pct(99.0)
        );
    }
    println!();
    println!(
        "API throughput {:.1} cells/s (target >= 200): {}",
        a.rate(),
        crate::bench::verdict(Some(a.rate() >= 200.0))
    );
    println!(
        "API overhead vs supervisor direct: {api_vs_sup:+.1}% (target <= 20%): {}",
        crate::bench::verdict(Some(api_vs_sup <= 20.0))
    );
    println!(
        "API overhead vs backend direct: {api_vs_backend:+.1}% (store commits + admission + API)"
    );
    Ok(0)
}

/// The backend-direct path: the tier, and uid ranges leased as the
/// supervisor would.
struct Direct {
    backend: Arc<dyn Backend>,
    uids: crate::bench::BenchUids,
}

/// Create `k` running cells in mode `m`, `conc` at a time; latencies and the
/// batch's wall time. Then destroy them (untimed).
async fn run_batch(
    m: Mode,
    k: usize,
    conc: usize,
    direct: &Arc<Direct>,
    sup: &Arc<Supervisor>,
    client: &Arc<Client>,
    body: &Arc<Vec<u8>>,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let sem = Arc::new(tokio::sync::Semaphore::new(conc.max(1)));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..k {
        let permit = sem.clone().acquire_owned().await?;
        let (direct, sup, client, body) =
            (direct.clone(), sup.clone(), client.clone(), body.clone());
        tasks.spawn(async move {
            let _p = permit;
            let t = Instant::now();
            let made: anyhow::Result<String> = match m {
                Mode::Backend => {
                    let cell: cellhost_spec::Cell = serde_json::from_slice(&body)?;
                    let id = CellId::random();
                    let req = CreateRequest {
                        uids: Some(direct.uids.lease(&id)?),
                        ..CreateRequest::new(id.clone(), cell)
                    };
                    let h = direct.backend.create(req).await?;
                    direct.backend.start(&h).await?;
                    Ok(id.to_string())
                }
                Mode::Supervisor => {
                    let cell = cellhost_spec::parse_and_validate(std::str::from_utf8(&body)?)?;
                    Ok(sup
                        .create(&Caller::operator(), cell, Default::default(), true)
                        .await?
                        .id)
                }
                Mode::Api => {
                    let v: Value = client
                        .json(
                            Method::POST,
                            "/v1/cells",
                            Some(("application/json", body.to_vec())),
                        )
                        .await?;
                    Ok(v["id"].as_str().unwrap_or_default().to_string())
                }
            };
            Ok::<_, anyhow::Error>((made.with_context(|| format!("{m:?} create"))?, t.elapsed()))
        });
    }
    let mut lat = Vec::with_capacity(k);
    let mut ids = Vec::with_capacity(k);
    while let Some(r) = tasks.join_next().await {
        let (id, d) = r??;
        lat.push(d);
        ids.push(id);
    }
    let wall = t0.elapsed();
    for id in ids {
        match m {
            Mode::Backend => {
                let id = CellId::parse(&id)?;
                let cell: cellhost_spec::Cell = serde_json::from_slice(body)?;
                let h = direct.backend.handle_for(&id, &cell);
                let r = direct.backend.destroy(&h).await?;
                anyhow::ensure!(
                    r.is_clean(),
                    "bench cell {id} left residue: {}",
                    r.summary()
                );
                direct.uids.release(&h);
            }
            Mode::Supervisor => {
                let r = sup.destroy(&Caller::operator(), &id).await?;
                anyhow::ensure!(
                    r.is_clean(),
                    "bench cell {id} left residue: {}",
                    r.summary()
                );
            }
            Mode::Api => {
                let _: Value = client
                    .json(Method::DELETE, &format!("/v1/cells/{id}"), None)
                    .await?;
            }
        }
    }
    Ok((lat, wall))
}
