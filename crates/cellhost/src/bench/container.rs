//! `cellhost bench container`: what a container cell costs through the
//! Engine API (bollard), against the docker CLI doing the same in the same
//! run, interleaved (one of each per round, order alternating) so drift
//! hits both alike.
//!
//! - create→running: `DockerBackend::create` + `start` until the engine
//!   answers the start, for `/bin/sleep 600`; the cell is then destroyed
//!   (untimed, its TeardownReport must be clean). Baseline: `docker run -d`
//!   of the same image and command, spawn to exit (the CLI returns once the
//!   engine answered its start), then `docker rm -f` (untimed).
//! - full lifecycle: create, start, wait for `/bin/true` to exit
//!   (`DockerBackend::wait`, no polling), destroy with its residue checks.
//!   Baseline: `docker run --rm` of `/bin/true`, spawn to exit (the CLI
//!   returns once the engine removed the container).
//!
//! The baseline runs with the flags of a cell's create body that change
//! what the engine does ([`cli_flags`]): docker-init, network none, the
//! json-file log cap, no-new-privileges, no NET_RAW, the stop timeout.
//! Not mirrored (no cost to speak of): the cell's labels and its empty
//! entrypoint (the bench image has none). The cell has no resources, no
//! secrets, no volume and no ports, so neither side sets limits or mounts.
//!
//! Numbers are reported, never asserted: the target (ours ≤ 0.8× the CLI
//! at p50) is printed as met or MISSED.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use cellhost_core::ids::CellId;
use cellhost_core::{Backend, CellHandle, CreateRequest};
use cellhost_docker::{DockerBackend, DockerConfig};
use serde_json::json;

use crate::bench::{Series, docker_image, docker_ready, fmt_ratio, verdict};

/// Target: ours / CLI at p50, for both measures.
const TARGET_RATIO: f64 = 0.8;
/// Untimed rounds before measuring: page cache, the engine's image and
/// layer caches, API version negotiation, the CLI binary.
const WARMUP: usize = 3;
/// Prefix of every baseline container's name; removed at the end by it.
const CLI_PREFIX: &str = "cellhost-bench-";

/// `docker run` flags for what the container tier puts in a cell's create
/// body (see `cellhost_docker::mapping::create_body`), the operator policy
/// taken from the bench backend's own config so the two cannot drift.
fn cli_flags(policy: &cellhost_docker::Policy) -> Vec<String> {
    let restart = if policy.restart_unless_stopped {
        "unless-stopped"
    } else {
        "no"
    };
    [
        "--network",
        "none",
        "--init",
        "--log-driver",
        "json-file",
        "--log-opt",
        &format!("max-size={}", policy.log_max_bytes),
        "--log-opt",
        "max-file=1",
        "--security-opt",
        "no-new-privileges:true",
        "--cap-drop",
        "NET_RAW",
        "--stop-timeout",
        &policy.stop_timeout_secs.to_string(),
        "--restart",
        restart,
    ]
    .map(str::to_string)
    .to_vec()
}

fn cell_doc(image: &str, argv: &[&str]) -> anyhow::Result<cellhost_spec::Cell> {
    let doc = json!({
        "apiVersion": "cellhost.dev/v1", "kind": "Cell",
        "metadata": {"name": "bench"},
        "spec": {"isolation": "container", "image": image, "command": argv,
                 "network": {"mode": "none"}}
    });
    Ok(cellhost_spec::parse_and_validate(&doc.to_string())?)
}

#[derive(Default)]
struct Results {
    /// create→running, ours, and its parts.
    running: Series,
    create: Series,
    start: Series,
    /// `docker run -d`.
    cli_d: Series,
    /// Full lifecycle, ours, and its parts.
    life: Series,
    life_create: Series,
    life_start: Series,
    life_wait: Series,
    life_destroy: Series,
    /// `docker run --rm`.
    cli_rm: Series,
}

pub async fn bench_container(state_dir: &Path, n: usize, json_out: bool) -> anyhow::Result<u8> {
    let image = docker_image();
    let root = state_dir.join(format!("bench-container-{}", std::process::id()));
    let _cleanup = crate::bench::RemoveOnDrop(root.clone());
    let cfg = DockerConfig::new(root.join("docker"));
    let flags = cli_flags(&cfg.policy);
    let backend = DockerBackend::new(cfg);
    // Skip cleanly (capability exit code) without an engine or the image.
    backend.client().await.map_err(|e| {
        crate::exit_err(
            crate::EXIT_CAPABILITY,
            format!("bench container: no docker engine answers: {e}"),
        )
    })?;
    docker_ready().map_err(|why| {
        crate::exit_err(
            crate::EXIT_CAPABILITY,
            format!(
                "bench container: the bench image {image} is not usable through the docker CLI: {why} (import a busybox rootfs as it, or name another local image with CELLHOST_BENCH_DOCKER_IMAGE)"
            ),
        )
    })?;
    let prefix = format!("{CLI_PREFIX}{}-", std::process::id());

    let mut res = Results::default();
    let measured = {
        let run = measure(&backend, &image, &flags, &prefix, n, &mut res);
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("bench container: interrupted")),
        }
    };
    // Whatever happened: no cell and no baseline container outlives the run.
    let cleaned = cleanup(&backend, &prefix).await;
    measured?;
    cleaned?;
    report(&res, n, &image, &flags, json_out)
}

/// Warm-up, then `n` interleaved rounds into `res`.
async fn measure(
    backend: &DockerBackend,
    image: &str,
    flags: &[String],
    prefix: &str,
    n: usize,
    res: &mut Results,
) -> anyhow::Result<()> {
    let sleep = cell_doc(image, &["/bin/sleep", "600"])?;
    let truth = cell_doc(image, &["/bin/true"])?;
    let mut scratch = Results::default();
    for i in 0..WARMUP + n {
        let r = if i < WARMUP { &mut scratch } else { &mut *res };
        let name_d = format!("{prefix}d{i}");
        let name_rm = format!("{prefix}rm{i}");
        if i % 2 == 0 {
            ours_running(backend, &sleep, r).await?;
            cli_run_d(image, flags, &name_d, r)?;
            ours_lifecycle(backend, &truth, r).await?;
            cli_run_rm(image, flags, &name_rm, r)?;
        } else {
            cli_run_d(image, flags, &name_d, r)?;
            ours_running(backend, &sleep, r).await?;
            cli_run_rm(image, flags, &name_rm, r)?;
            ours_lifecycle(backend, &truth, r).await?;
        }
    }
    Ok(())
}

async fn destroy_clean(backend: &DockerBackend, h: &CellHandle) -> anyhow::Result<()> {
    let report = backend
        .destroy(h)
        .await
        .map_err(|e| crate::commands::run::backend_err(e, "bench destroy"))?;
    anyhow::ensure!(
        report.is_clean(),
        "bench cell {} left residue: {}",
        h.id,
        report.summary()
    );
    Ok(())
}

/// Times since the create call began, for one of our cells.
struct Marks {
    created: Duration,
    started: Duration,
    /// After the workload exited (only when waited for).
    exited: Duration,
    destroyed: Duration,
}

/// create + start, then (when `wait`) wait for a zero exit, then destroy
/// with its checks; the time at each step.
async fn ours(
    backend: &DockerBackend,
    cell: &cellhost_spec::Cell,
    wait: bool,
) -> anyhow::Result<Marks> {
    let t0 = Instant::now();
    let h = backend
        .create(CreateRequest::new(CellId::random(), cell.clone()))
        .await
        .map_err(|e| crate::commands::run::backend_err(e, "bench create"))?;
    let created = t0.elapsed();
    let ran = async {
        backend
            .start(&h)
            .await
            .map_err(|e| crate::commands::run::backend_err(e, "bench start"))?;
        let started = t0.elapsed();
        if wait {
            let st = backend
                .wait(&h)
                .await
                .map_err(|e| crate::commands::run::backend_err(e, "bench wait"))?;
            anyhow::ensure!(
                st.exit.as_ref().and_then(|x| x.code) == Some(0),
                "bench cell did not exit 0: {st:?}"
            );
        }
        Ok(started)
    }
    .await;
    let started = match ran {
        Ok(t) => t,
        Err(e) => {
            let _ = backend.destroy(&h).await;
            return Err(e);
        }
    };
    let exited = t0.elapsed();
    destroy_clean(backend, &h).await?;
    Ok(Marks {
        created,
        started,
        exited,
        destroyed: t0.elapsed(),
    })
}

/// create→running of `sleep 600` (the destroy is not counted).
async fn ours_running(
    backend: &DockerBackend,
    cell: &cellhost_spec::Cell,
    r: &mut Results,
) -> anyhow::Result<()> {
    let m = ours(backend, cell, false).await?;
    r.create.push(m.created);
    r.start.push(m.started - m.created);
    r.running.push(m.started);
    Ok(())
}

/// The whole life of `/bin/true`, every step counted.
async fn ours_lifecycle(
    backend: &DockerBackend,
    cell: &cellhost_spec::Cell,
    r: &mut Results,
) -> anyhow::Result<()> {
    let m = ours(backend, cell, true).await?;
    r.life_create.push(m.created);
    r.life_start.push(m.started - m.created);
    r.life_wait.push(m.exited - m.started);
    r.life_destroy.push(m.destroyed - m.exited);
    r.life.push(m.destroyed);
    Ok(())
}

/// Run the docker CLI; its time from spawn to exit, and its stdout.
fn docker_cli(args: &[&str]) -> anyhow::Result<(Duration, String)> {
    let t0 = Instant::now();
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running the docker CLI")?;
    let took = t0.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "docker {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// `docker run -d ... sleep 600`, timed; `docker rm -f` untimed.
fn cli_run_d(image: &str, flags: &[String], name: &str, r: &mut Results) -> anyhow::Result<()> {
    let mut args = vec!["run", "-d", "--name", name];
    args.extend(flags.iter().map(String::as_str));
    args.extend_from_slice(&[image, "/bin/sleep", "600"]);
    let (took, _) = docker_cli(&args)?;
    docker_cli(&["rm", "-f", name])?;
    r.cli_d.push(took);
    Ok(())
}

/// `docker run --rm ... true`, timed.
fn cli_run_rm(image: &str, flags: &[String], name: &str, r: &mut Results) -> anyhow::Result<()> {
    let mut args = vec!["run", "--rm", "--name", name];
    args.extend(flags.iter().map(String::as_str));
    args.extend_from_slice(&[image, "/bin/true"]);
    let (took, _) = docker_cli(&args)?;
    r.cli_rm.push(took);
    Ok(())
}

/// Destroy every cell of this bench's backend instance and remove every
/// baseline container named with `prefix`.
async fn cleanup(backend: &DockerBackend, prefix: &str) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    match backend.list().await {
        Ok(cells) => {
            // Only the id matters to destroy; any bench cell will do.
            let doc = cell_doc(&docker_image(), &["/bin/true"])?;
            for c in cells {
                let h = backend.handle_for(&c.id, &doc);
                match backend.destroy(&h).await {
                    Ok(r) if r.is_clean() => {}
                    Ok(r) => problems.push(format!("cell {}: {}", c.id, r.summary())),
                    Err(e) => problems.push(format!("cell {}: {e}", c.id)),
                }
            }
        }
        Err(e) => problems.push(format!("listing the bench's cells: {e}")),
    }
    match docker_cli(&["ps", "-aq", "--filter", &format!("name=^/?{prefix}")]) {
        Ok((_, ids)) => {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                if let Err(e) = docker_cli(&args) {
                    problems.push(e.to_string());
                }
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    anyhow::ensure!(
        problems.is_empty(),
        "bench container: cleanup left things behind: {}",
        problems.join("; ")
    );
    Ok(())
}

fn report(
    r: &Results,
    n: usize,
    image: &str,
    flags: &[String],
    json_out: bool,
) -> anyhow::Result<u8> {
    let running_ratio = r.running.p50_ratio(&r.cli_d);
    let life_ratio = r.life.p50_ratio(&r.cli_rm);
    let met = |x: Option<f64>| x.map(|x| x <= TARGET_RATIO);
    let flags = flags.join(" ");
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "tier": "container", "cells": n, "image": image, "warmup_rounds": WARMUP,
                "create_to_running": r.running.json(),
                "create": r.create.json(),
                "start": r.start.json(),
                "docker_run_d": r.cli_d.json(),
                "lifecycle": r.life.json(),
                "lifecycle_create": r.life_create.json(),
                "lifecycle_start": r.life_start.json(),
                "lifecycle_wait": r.life_wait.json(),
                "lifecycle_destroy": r.life_destroy.json(),
                "docker_run_rm": r.cli_rm.json(),
                "baseline_flags": flags,
                "baseline_differences": "the CLI runs without the cell's labels; the CLI figures include its own process start and API version negotiation; ours include create's pre-clean and image check, and destroy's residue checks",
                "ratios": {"create_to_running_vs_docker_run_d": running_ratio,
                           "lifecycle_vs_docker_run_rm": life_ratio},
                "targets_met": {"create_to_running_le_0_8x_cli": met(running_ratio),
                                "lifecycle_le_0_8x_cli": met(life_ratio)},
            }))?
        );
        return Ok(0);
    }
    let row = |name: &str, s: &Series| s.print_row(name, 44);
    println!(
        "cellhost bench container: {n} rounds ({WARMUP} warm-up not counted), image {image}, the docker CLI interleaved in the same run"
    );
    println!("{:<44} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    row("cellhost create -> running (bollard)", &r.running);
    row("  of which create (pre-clean, image, create)", &r.create);
    row("  of which start", &r.start);
    row("baseline: docker run -d sleep", &r.cli_d);
    row("cellhost lifecycle (create,true,wait,destroy)", &r.life);
    row("  of which create", &r.life_create);
    row("  of which start", &r.life_start);
    row("  of which wait for exit", &r.life_wait);
    row(
        "  of which destroy (remove, residue checks)",
        &r.life_destroy,
    );
    row("baseline: docker run --rm true", &r.cli_rm);
    println!("baseline flags: {flags}");
    println!(
        "  (not mirrored: the cell's labels; the CLI's figures include its own start and version negotiation)"
    );
    println!();
    println!(
        "create -> running vs docker run -d (p50): {} (target <= {TARGET_RATIO}x): {}",
        fmt_ratio(running_ratio),
        verdict(met(running_ratio))
    );
    println!(
        "lifecycle vs docker run --rm (p50): {} (target <= {TARGET_RATIO}x): {}",
        fmt_ratio(life_ratio),
        verdict(met(life_ratio))
    );
    Ok(0)
}
