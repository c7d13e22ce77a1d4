//! `cellhost bench network`: what bridged networking adds to a process
//! cell, against `network.mode: none` measured in the same run,
//! interleaved so drift hits both alike.
//!
//! - bridged: from the start of `create` until the cell's first packet (a
//!   UDP datagram from `bash -c 'printf x >/dev/udp/<gateway>/<port>'`,
//!   allowed by its egress list) arrives at a socket on the host. Includes
//!   the lease, netns, veth, nft table and addresses.
//! - none: from the start of `create` until the same shell's first output
//!   (`printf x`) lands in the cell's log (inotify).
//! - destroy of each, with its verified teardown (bridged: + 5 network
//!   checks).
//!
//! Runs on its own bridge and subnet (`chbench<pid>`, 10.254.0.0/24) and
//! state dir, removed at the end. Numbers are reported, never asserted.

use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant};

use cellhost_core::ids::CellId;
use cellhost_core::{Backend, CreateRequest};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::json;

use crate::bench::{RemoveOnDrop, Series, fmt_ratio, wait_exited};

/// Most cells per mode (each bridged create runs `ip` and `nft`).
const MAX_CELLS: usize = 100;

fn doc(
    name: &str,
    script: &str,
    network: serde_json::Value,
) -> anyhow::Result<cellhost_spec::Cell> {
    let doc = json!({
        "apiVersion": "cellhost.dev/v1", "kind": "Cell",
        "metadata": {"name": name},
        "spec": {"isolation": "process", "image": "host",
                 "command": ["/bin/bash", "-c", script],
                 "resources": {"memoryMiB": 64, "pids": 16},
                 "network": network}
    });
    Ok(cellhost_spec::parse_and_validate(&doc.to_string())?)
}

/// Removes the bench bridge on drop.
struct BridgeDown(cellhost_net::NetConfig);

impl Drop for BridgeDown {
    fn drop(&mut self) {
        if let Err(e) = cellhost_net::Network::new(self.0.clone(), "process").remove_bridge() {
            eprintln!("cellhost: removing the bench bridge {}: {e}", self.0.bridge);
        }
    }
}

pub async fn bench_network(state_dir: &Path, n: usize, json_out: bool) -> anyhow::Result<u8> {
    let n = n.clamp(1, MAX_CELLS);
    let root = state_dir.join(format!("bench-network-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(root.clone());
    let net = crate::cli::NetOpt {
        bridge: format!("chbench{}", std::process::id() % 100_000),
        bridge_subnet: "10.254.0.0/24".parse().map_err(anyhow::Error::msg)?,
        publish: None,
    };
    let _bridge = BridgeDown(net.config(&root));
    let backend = crate::run::backend_for(
        cellhost_spec::Isolation::Process,
        &root,
        Default::default(),
        &net,
    )?;
    let _groups = RemoveGroup(root.join("process"));
    let gateway = net.bridge_subnet.gateway();
    let sock = UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let port = sock.local_addr()?.port();
    let bridged_net = json!({"mode": "bridged",
        "egress": [{"cidr": format!("{gateway}/32"), "port": port, "protocol": "udp"}]});
    let bridged_script = format!("printf x >/dev/udp/{gateway}/{port}");

    let (mut bridged, mut bridged_create, mut bridged_destroy) = Default::default();
    let (mut none, mut none_create, mut none_destroy) = Default::default();
    // One of each first, not counted: page cache, host root, bridge.
    for round in 0..n + 1 {
        let warm = round == 0;
        let cell = doc("bench-bridged", &bridged_script, bridged_net.clone())?;
        let t = one_cell(&*backend, cell, First::Packet(&sock)).await?;
        if !warm {
            push3([&mut bridged_create, &mut bridged, &mut bridged_destroy], t);
        }
        let cell = doc("bench-none", "printf x", json!({"mode": "none"}))?;
        let t = one_cell(&*backend, cell, First::Output).await?;
        if !warm {
            push3([&mut none_create, &mut none, &mut none_destroy], t);
        }
    }

    let ratio = bridged.p50_ratio(&none);
    let overhead_ms = match (bridged.ms(50.0), none.ms(50.0)) {
        (Some(a), Some(b)) => Some(a - b),
        _ => None,
    };
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "tier": "network", "cells": n,
                "bridged_create_to_first_packet": bridged.json(),
                "bridged_create": bridged_create.json(),
                "bridged_destroy": bridged_destroy.json(),
                "none_create_to_first_output": none.json(),
                "none_create": none_create.json(),
                "none_destroy": none_destroy.json(),
                "ratio_p50": ratio,
                "overhead_p50_ms": overhead_ms,
            }))?
        );
        return Ok(0);
    }
    let row = |name: &str, s: &Series| s.print_row(name, 44);
    println!(
        "cellhost bench network: {n} cells per mode, interleaved, bridge {} ({})",
        net.bridge, net.bridge_subnet
    );
    println!("{:<44} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    row("bridged: create -> first packet on the host", &bridged);
    row(
        "  of which create (+ lease, netns, veth, nft)",
        &bridged_create,
    );
    row("bridged: destroy (+ 5 network checks)", &bridged_destroy);
    row("none: create -> first output", &none);
    row("  of which create", &none_create);
    row("none: destroy", &none_destroy);
    println!();
    println!(
        "bridged vs none, create -> first packet/output p50: {} ({} ms more)",
        fmt_ratio(ratio),
        overhead_ms
            .map(|m| format!("{m:.1}"))
            .unwrap_or_else(|| "n/a".into())
    );
    Ok(0)
}

/// What marks a cell's first sign of life.
enum First<'a> {
    /// Its datagram on this socket, from its leased address.
    Packet(&'a UdpSocket),
    /// Its first output in its log.
    Output,
}

/// Create, start, wait for `first`, wait for the exit, destroy (clean or
/// an error): [create, create → first, destroy].
async fn one_cell(
    backend: &dyn Backend,
    cell: cellhost_spec::Cell,
    first: First<'_>,
) -> anyhow::Result<[Duration; 3]> {
    let t0 = Instant::now();
    let h = backend
        .create(CreateRequest::new(CellId::random(), cell))
        .await
        .map_err(|e| crate::run::backend_err(e, "bench create"))?;
    let created = t0.elapsed();
    let log = h.state_dir.join("log");
    let ino = match first {
        First::Output => {
            let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
            ino.add_watch(&log, AddWatchFlags::IN_MODIFY)?;
            Some(ino)
        }
        First::Packet(_) => None,
    };
    backend
        .start(&h)
        .await
        .map_err(|e| crate::run::backend_err(e, "bench start"))?;
    match (first, ino) {
        (First::Packet(sock), _) => {
            let want: std::net::Ipv4Addr = h.tier["network"]["address"]
                .as_str()
                .unwrap_or_default()
                .parse()?;
            let mut buf = [0u8; 16];
            while sock.recv_from(&mut buf)?.1.ip() != std::net::IpAddr::V4(want) {}
        }
        (First::Output, Some(ino)) => {
            if std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) == 0 {
                ino.read_events()?;
            }
        }
        (First::Output, None) => unreachable!("armed above"),
    }
    let first_at = t0.elapsed();
    wait_exited(backend, &h).await?;
    let td = Instant::now();
    let report = backend.destroy(&h).await?;
    let destroyed = td.elapsed();
    anyhow::ensure!(
        report.is_clean(),
        "bench cell left residue: {}",
        report.summary()
    );
    Ok([created, first_at, destroyed])
}

fn push3(series: [&mut Series; 3], t: [Duration; 3]) {
    for (s, d) in series.into_iter().zip(t) {
        s.push(d);
    }
}

/// Removes the bench's cgroup group on drop.
struct RemoveGroup(std::path::PathBuf);

impl Drop for RemoveGroup {
    fn drop(&mut self) {
        let tag = cellhost_process::hostfs::instance_tag(&self.0);
        cellhost_process::hostfs::remove_instance_group(&tag);
    }
}
