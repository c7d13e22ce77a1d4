//! `cellhost bench process`: what a process cell costs, against baselines
//! measured in the same run, interleaved so drift hits both alike.
//!
//! - create→first instruction: from the start of `create` until the
//!   workload's first write lands in its log (inotify on the log file), for
//!   `/bin/echo`; baseline: `unshare -pf -m -u -i -n /bin/echo` until its
//!   first byte arrives on a pipe. Both include exec and echo's own start.
//! - what the user namespace costs: the same create→first instruction by a
//!   backend whose cells get none (a mode only this bench uses), in the
//!   same loop; cells are leased host uid ranges as the supervisor leases
//!   them (claimed host-wide, given back after each clean destroy).
//! - full lifecycle: create, run `/bin/true`, wait for its exit, destroy;
//!   baselines: `unshare ... /bin/true` spawn to reap, and `docker run --rm`
//!   of a local image when a Docker daemon answers.
//! - shim exec cost: `cellhost --version`, the price of re-executing this
//!   binary, which every process cell pays once for its shim.
//!
//! Numbers are reported, never asserted: targets are printed with met or
//! missed.

pub mod api;
pub mod container;
pub mod guest;
pub mod microvm;
pub mod network;
pub mod volume;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use cellhost_core::ids::CellId;
use cellhost_core::{Backend, CellState, CreateRequest};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::json;

use crate::cli::{BenchArgs, BenchTier};

const UNSHARE: &[&str] = &["-pf", "-m", "-u", "-i", "-n"];
/// Local image the docker baseline runs: any image with /bin/true (no
/// registry is reachable here; `docker import` a busybox rootfs, or name
/// another with CELLHOST_BENCH_DOCKER_IMAGE).
const DOCKER_IMAGE_ENV: &str = "CELLHOST_BENCH_DOCKER_IMAGE";
const DOCKER_IMAGE_DEFAULT: &str = "cellhost-test/busybox:latest";

/// `0.93x`, or `n/a` when the ratio was not measured.
pub(crate) fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x"))
        .unwrap_or_else(|| "n/a".into())
}

/// A target's verdict as printed: met, MISSED, or not measured.
pub(crate) fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "not measured",
    }
}

/// Latency samples; percentiles by nearest rank.
#[derive(Debug, Default, Clone)]
pub(crate) struct Series(pub(crate) Vec<Duration>);

impl Series {
    pub(crate) fn push(&mut self, d: Duration) {
        self.0.push(d);
    }
    fn pct(&self, p: f64) -> Option<Duration> {
        if self.0.is_empty() {
            return None;
        }
        let mut v = self.0.clone();
        v.sort();
        let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        Some(v[idx.min(v.len() - 1)])
    }
    pub(crate) fn ms(&self, p: f64) -> Option<f64> {
        self.pct(p).map(|d| d.as_secs_f64() * 1000.0)
    }
    /// p50 of `self` over p50 of `base`, when both were measured.
    pub(crate) fn p50_ratio(&self, base: &Series) -> Option<f64> {
        match (self.ms(50.0), base.ms(50.0)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        }
    }
    /// `name  p50  p99  (n=…)` in a column `width` wide, or dashes.
    pub(crate) fn print_row(&self, name: &str, width: usize) {
        match (self.ms(50.0), self.ms(99.0)) {
            (Some(a), Some(b)) => {
                println!("{name:<width$} {a:>9.2} {b:>9.2}  (n={})", self.0.len())
            }
            _ => println!("{name:<width$} {:>9} {:>9}", "-", "-"),
        }
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        json!({"n": self.0.len(), "p50_ms": self.ms(50.0), "p99_ms": self.ms(99.0)})
    }
}

fn cell_doc(name: &str, argv: &[&str]) -> anyhow::Result<cellhost_spec::Cell> {
    let doc = json!({
        "apiVersion": "cellhost.dev/v1", "kind": "Cell",
        "metadata": {"name": name},
        "spec": {"isolation": "process", "image": "host", "command": argv,
                 "resources": {"memoryMiB": 64, "pids": 16, "cpus": 1}}
    });
    Ok(cellhost_spec::parse_and_validate(&doc.to_string())?)
}

pub(crate) fn docker_image() -> String {
    std::env::var(DOCKER_IMAGE_ENV).unwrap_or_else(|_| DOCKER_IMAGE_DEFAULT.to_string())
}

/// Is a Docker daemon reachable with the bench image present? Why not.
pub(crate) fn docker_ready() -> Result<(), String> {
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", &docker_image()])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("docker CLI: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or("docker failed")
            .to_string())
    }
}

/// Spawn `unshare ... argv`; time to the first stdout byte (or to EOF, for
/// a command that prints nothing) and to reap.
fn unshare_run(argv: &[&str]) -> anyhow::Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let mut child = Command::new("unshare")
        .args(UNSHARE)
        .args(argv)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning unshare")?;
    let mut out = child.stdout.take().context("unshare stdout")?;
    let mut b = [0u8; 1];
    // 0 bytes is EOF: the command ended without output (`true`).
    let _first_bytes: usize = out.read(&mut b)?;
    let first = t0.elapsed();
    let st = child.wait()?;
    anyhow::ensure!(st.success(), "unshare baseline failed: {st}");
    Ok((first, t0.elapsed()))
}

/// The bench's own state dir, removed on drop (CELLHOST_BENCH_KEEP keeps it).
pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if std::env::var_os("CELLHOST_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Removes, on drop, the (by then empty) cgroup group of the process tier
/// whose state dir this is, unless CELLHOST_BENCH_KEEP is set.
pub(crate) struct RemoveInstanceGroup(pub(crate) PathBuf);

impl Drop for RemoveInstanceGroup {
    fn drop(&mut self) {
        if std::env::var_os("CELLHOST_BENCH_KEEP").is_none() {
            let tag = cellhost_process::hostfs::instance_tag(&self.0);
            cellhost_process::hostfs::remove_instance_group(&tag);
        }
    }
}

/// Run `cmd` with null stdio to its exit; how long it took.
pub(crate) fn timed_command(cmd: &mut Command) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let st = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "{cmd:?} failed: {st}");
    Ok(t0.elapsed())
}

pub async fn bench(state_dir: &Path, args: BenchArgs, json_out: bool) -> anyhow::Result<u8> {
    match args.tier {
        BenchTier::Process => bench_process(state_dir, args.cells.max(1), json_out).await,
        BenchTier::Api => {
            crate::bench::api::bench_api(state_dir, args.cells.max(1), args.concurrency, json_out)
                .await
        }
        BenchTier::Container => {
            crate::bench::container::bench_container(state_dir, args.cells.max(1), json_out).await
        }
        BenchTier::Volume => {
            crate::bench::volume::bench_volume(state_dir, args.cells, json_out).await
        }
        BenchTier::Microvm => {
            crate::bench::microvm::bench_microvm(state_dir, &args, json_out).await
        }
        BenchTier::Network => {
            crate::bench::network::bench_network(state_dir, args.cells, json_out).await
        }
        BenchTier::Guest => {
            crate::bench::guest::bench_guest(state_dir, args.cells, args.agent.as_deref(), json_out)
                .await
        }
    }
}

/// Uid ranges for cells this bench makes through a backend directly,
/// claimed host-wide like the supervisor's (so no other store's live cell
/// shares one) and given back after each clean destroy.
pub(crate) struct BenchUids {
    claims: cellhost_supervisor::uid_claims::UidClaims,
    held: std::sync::Mutex<std::collections::HashMap<CellId, cellhost_core::UidRange>>,
}

impl BenchUids {
    pub(crate) fn new() -> BenchUids {
        BenchUids {
            claims: cellhost_supervisor::uid_claims::UidClaims::new(
                cellhost_supervisor::uid_claims::CLAIMS_DIR,
                format!("bench-{}", std::process::id()),
                format!("/proc/{}", std::process::id()),
            ),
            held: Default::default(),
        }
    }

    pub(crate) fn lease(&self, id: &CellId) -> anyhow::Result<cellhost_core::UidRange> {
        let pool = cellhost_policy::Uids::default();
        let r = self
            .claims
            .claim_free(id, pool.start, pool.count)?
            .context("no free uid range for a bench cell")?;
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), r);
        Ok(r)
    }

    /// Give back the range of a cell that is gone.
    pub(crate) fn release(&self, h: &cellhost_core::CellHandle) {
        let held = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&h.id);
        if let Some(r) = held {
            self.claims.release(&h.id, r);
        }
    }
}

async fn bench_process(state_dir: &Path, n: usize, json_out: bool) -> anyhow::Result<u8> {
    let backend = crate::commands::run::backend_for(
        cellhost_spec::Isolation::Process,
        state_dir,
        Default::default(),
        &Default::default(),
        &Default::default(),
    )?;
    // The same tier without user namespaces: what they cost, measured in
    // the same loop. Its cells live in a state dir of their own.
    let bare_dir = state_dir.join(format!("bench-no-userns-{}", std::process::id()));
    let _bare_cleanup = RemoveOnDrop(bare_dir.clone());
    let _bare_group = RemoveInstanceGroup(bare_dir.join("process"));
    let bare: std::sync::Arc<dyn Backend> = {
        let shim = cellhost_process::ShimCommand::current_exe()?;
        let mut cfg = cellhost_process::ProcessConfig::new(bare_dir.join("process"), shim);
        cfg.user_namespace = false;
        std::sync::Arc::new(cellhost_process::ProcessBackend::new(cfg))
    };
    let uids = BenchUids::new();
    let docker = docker_ready();
    let exe = std::env::current_exe()?;

    let mut first = Series::default();
    let mut first_bare = Series::default();
    let mut create_s = Series::default();
    let mut start_s = Series::default();
    let mut destroy_s = Series::default();
    let mut life = Series::default();
    let mut un_first = Series::default();
    let mut un_life = Series::default();
    let mut dock = Series::default();
    let mut shim_exec = Series::default();
    let docker_n = n.min(20); // docker run is slow; 20 samples bound the run

    // Warm-up: page cache, host root skeleton, cgroup parents.
    for _ in 0..3 {
        for b in [&backend, &bare] {
            let h = one_cell(&**b, &uids, &["/bin/true"]).await?;
            wait_exited(&**b, &h).await?;
            if b.destroy(&h).await?.is_clean() {
                uids.release(&h);
            }
        }
        unshare_run(&["/bin/true"])?;
    }

    for i in 0..n {
        // create → first instruction, without a user namespace (baseline)
        first_bare.push(first_output(&*bare, &uids, i).await?.first);

        // create → first instruction
        let t = first_output(&*backend, &uids, i).await?;
        first.push(t.first);
        create_s.push(t.create);
        start_s.push(t.start);

        // full lifecycle
        let t0 = Instant::now();
        let h = one_cell(&*backend, &uids, &["/bin/true"]).await?;
        wait_exited(&*backend, &h).await?;
        let td = Instant::now();
        let report = backend.destroy(&h).await?;
        destroy_s.push(td.elapsed());
        life.push(t0.elapsed());
        anyhow::ensure!(
            report.is_clean(),
            "bench cell left residue: {}",
            report.summary()
        );
        uids.release(&h);

        let (f, _) = unshare_run(&["/bin/echo", "x"])?;
        un_first.push(f);
        let (_, l) = unshare_run(&["/bin/true"])?;
        un_life.push(l);
        shim_exec.push(timed_command(Command::new(&exe).arg("--version"))?);
        if docker.is_ok() && i < docker_n {
            dock.push(timed_command(Command::new("docker").args([
                "run",
                "--rm",
                "--network",
                "none",
                &docker_image(),
                "/bin/true",
            ]))?);
        }
    }

    let first_vs_unshare = first.p50_ratio(&un_first);
    let userns_ratio = first.p50_ratio(&first_bare);
    let userns_ms = match (first.ms(50.0), first_bare.ms(50.0)) {
        (Some(a), Some(b)) => Some(a - b),
        _ => None,
    };
    let docker_vs_life = dock.p50_ratio(&life);
    let p50_first = first.ms(50.0).unwrap_or(f64::NAN);
    let targets = json!({
        "first_instruction_p50_le_3ms": p50_first <= 3.0,
        "first_instruction_le_1_5x_unshare": first_vs_unshare.map(|r| r <= 1.5),
        "lifecycle_ge_20x_faster_than_docker": docker_vs_life.map(|r| r >= 20.0),
    });

    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "tier": "process", "cells": n,
                "create_to_first_instruction": first.json(),
                "create_to_first_instruction_without_userns": first_bare.json(),
                "user_namespace_cost_ms_p50": userns_ms,
                "create": create_s.json(),
                "start": start_s.json(),
                "unshare_first_output": un_first.json(),
                "lifecycle": life.json(),
                "destroy": destroy_s.json(),
                "unshare_lifecycle": un_life.json(),
                "docker_run_rm": if docker.is_ok() { dock.json() } else { json!({"skipped": docker.as_ref().err()}) },
                "shim_exec": shim_exec.json(),
                "ratios": {"first_instruction_vs_unshare": first_vs_unshare, "docker_vs_lifecycle": docker_vs_life, "userns_vs_none": userns_ratio},
                "targets_met": targets,
            }))?
        );
        return Ok(0);
    }
    let row = |name: &str, s: &Series| s.print_row(name, 40);
    println!("cellhost bench process: {n} cells, baselines interleaved in the same run");
    println!("{:<40} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    row("cellhost create -> first instruction", &first);
    row("  the same without a user namespace", &first_bare);
    row("  of which create (shim, libcontainer)", &create_s);
    row("  of which start (libcontainer signal)", &start_s);
    row("baseline: unshare -pf -m -u -i -n echo", &un_first);
    row("cellhost lifecycle (create,true,destroy)", &life);
    row("  of which destroy (kill, delete, verify)", &destroy_s);
    row("baseline: unshare -pf -m -u -i -n true", &un_life);
    match &docker {
        Ok(()) => row("baseline: docker run --rm true", &dock),
        Err(why) => println!("{:<40} skipped: {why}", "baseline: docker run --rm true"),
    }
    row("shim exec cost (cellhost --version)", &shim_exec);
    println!();
    println!(
        "first instruction p50 {p50_first:.2} ms (target <= 3 ms): {}",
        verdict(Some(p50_first <= 3.0))
    );
    println!(
        "the user namespace costs {} ms p50 on create -> first instruction ({})",
        userns_ms.map_or_else(|| "n/a".to_string(), |d| format!("{d:.2}")),
        fmt_ratio(userns_ratio)
    );
    println!(
        "first instruction vs unshare: {} (target <= 1.5x): {}",
        fmt_ratio(first_vs_unshare),
        verdict(first_vs_unshare.map(|r| r <= 1.5))
    );
    println!(
        "docker run --rm vs cellhost lifecycle: {} (target >= 20x): {}",
        fmt_ratio(docker_vs_life),
        verdict(docker_vs_life.map(|r| r >= 20.0))
    );
    Ok(0)
}

/// One cell's way to its first output.
struct FirstOutput {
    /// create → the first byte of output in the log.
    first: Duration,
    /// Of which create, and start.
    create: Duration,
    start: Duration,
}

/// Create → the first byte of `/bin/echo x` in the log, for one cell of
/// `backend`; destroyed (and its uids given back) before returning.
async fn first_output(
    backend: &dyn Backend,
    uids: &BenchUids,
    i: usize,
) -> anyhow::Result<FirstOutput> {
    let cell = cell_doc(&format!("bench{i}"), &["/bin/echo", "x"])?;
    let id = CellId::random();
    let t0 = Instant::now();
    let h = backend
        .create(CreateRequest {
            uids: Some(uids.lease(&id)?),
            ..CreateRequest::new(id.clone(), cell)
        })
        .await
        .map_err(|e| crate::commands::run::backend_err(e, "bench create"))?;
    let create = t0.elapsed();
    let log = h.state_dir.join("log");
    let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
    ino.add_watch(&log, AddWatchFlags::IN_MODIFY)?;
    let t_start = Instant::now();
    backend
        .start(&h)
        .await
        .map_err(|e| crate::commands::run::backend_err(e, "bench start"))?;
    let start = t_start.elapsed();
    if std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) == 0 {
        ino.read_events()?;
    }
    let first = t0.elapsed();
    drop(ino);
    wait_exited(backend, &h).await?;
    let report = backend.destroy(&h).await?;
    anyhow::ensure!(
        report.is_clean(),
        "bench cell left residue: {}",
        report.summary()
    );
    uids.release(&h);
    Ok(FirstOutput {
        first,
        create,
        start,
    })
}

async fn one_cell(
    backend: &dyn Backend,
    uids: &BenchUids,
    argv: &[&str],
) -> anyhow::Result<cellhost_core::CellHandle> {
    let id = CellId::random();
    let h = backend
        .create(CreateRequest {
            uids: Some(uids.lease(&id)?),
            ..CreateRequest::new(id, cell_doc("bench", argv)?)
        })
        .await
        .map_err(|e| crate::commands::run::backend_err(e, "bench create"))?;
    backend
        .start(&h)
        .await
        .map_err(|e| crate::commands::run::backend_err(e, "bench start"))?;
    Ok(h)
}

pub(crate) async fn wait_exited(
    backend: &dyn Backend,
    h: &cellhost_core::CellHandle,
) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let st = backend.status(h).await?;
        if matches!(st.state, CellState::Exited | CellState::Gone) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < until,
            "bench cell did not exit within 30 s"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}
