//! `cellhost bench network`: what bridged networking adds to a process
//! cell, against `network.mode: none` measured in the same run,
//! interleaved so drift hits both alike.
//!
//! Both cells run `bash -c` and print `x`; the bridged one first sends a
//! UDP datagram to the host (`printf x >/dev/udp/<gateway>/<port>`, allowed
//! by its egress list). Measured from the start of `create`:
//! - bridged: until its first packet arrives at a socket on the host, and
//!   until its first output lands in its log (inotify);
//! - none: until its first output lands in its log.
//!
//! The ratio compares first output with first output (one method for
//! both); first packet is the figure. Also create and destroy of
//! each (bridged: + lease, netns, veth, tables / + 5 network checks).
//!
//! After each destroy the bench pauses 100 ms, uncounted, so the kernel's
//! deferred netns cleanup of one cell does not land in the next one's
//! numbers.
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
/// Pause after each destroy (see `one_cell`).
const SETTLE: Duration = Duration::from_millis(100);

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

pub async fn bench_network(state_dir: &Path, n: usize, json_out: bool) -> anyhow::Result<u8> {
    let n = n.clamp(1, MAX_CELLS);
    let root = state_dir.join(format!("bench-network-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(root.clone());
    let net = crate::cli::NetOpt {
        bridge: format!("chbench{}", std::process::id() % 100_000),
        bridge_subnet: "10.254.0.0/24".parse().map_err(anyhow::Error::msg)?,
        publish: None,
    };
    let _bridge = cellhost_net::RemoveBridgeOnDrop(
        crate::commands::run::tier_settings(&root, Default::default(), &net, &Default::default())?
            .net_config(),
    );
    let backend = crate::commands::run::backend_for(
        cellhost_spec::Isolation::Process,
        &root,
        Default::default(),
        &net,
        &Default::default(),
    )?;
    let _group = crate::bench::RemoveInstanceGroup(root.join("process"));
    // Addresses are leased as the supervisor leases them, in the store.
    let store = cellhost_store::Store::open(&root)?;
    let uids = crate::bench::BenchUids::new();
    let gateway = net.bridge_subnet.gateway();
    let sock = UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let port = sock.local_addr()?.port();
    let bridged_net = json!({"mode": "bridged",
        "egress": [{"cidr": format!("{gateway}/32"), "port": port, "protocol": "udp"}]});
    let bridged_script = format!("printf x >/dev/udp/{gateway}/{port}; printf x");

    let mut bridged = Times::default();
    let mut none = Times::default();
    // One of each first, not counted: page cache, host root, bridge.
    for round in 0..n + 1 {
        let cell = doc("bench-none", "printf x", json!({"mode": "none"}))?;
        let t = one_cell(&*backend, &store, &uids, cell, None).await?;
        if round > 0 {
            none.push(t);
        }
        let cell = doc("bench-bridged", &bridged_script, bridged_net.clone())?;
        let t = one_cell(&*backend, &store, &uids, cell, Some(&sock)).await?;
        if round > 0 {
            bridged.push(t);
        }
    }

    let ratio = bridged.output.p50_ratio(&none.output);
    let overhead_ms = match (bridged.output.ms(50.0), none.output.ms(50.0)) {
        (Some(a), Some(b)) => Some(a - b),
        _ => None,
    };
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "tier": "network", "cells": n,
                "bridged_create_to_first_packet": bridged.packet.json(),
                "bridged_create_to_first_output": bridged.output.json(),
                "bridged_create": bridged.create.json(),
                "bridged_destroy": bridged.destroy.json(),
                "none_create_to_first_output": none.output.json(),
                "none_create": none.create.json(),
                "none_destroy": none.destroy.json(),
                "ratio_first_output_p50": ratio,
                "overhead_first_output_p50_ms": overhead_ms,
            }))?
        );
        return Ok(0);
    }
    let row = |name: &str, s: &Series| s.print_row(name, 46);
    println!(
        "cellhost bench network: {n} cells per mode, interleaved, bridge {} ({})",
        net.bridge, net.bridge_subnet
    );
    println!("{:<46} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    row(
        "bridged: create -> first packet on the host",
        &bridged.packet,
    );
    row("bridged: create -> first output", &bridged.output);
    row(
        "  of which create (+ lease, netns, veth, fdb, nft)",
        &bridged.create,
    );
    row("bridged: destroy (+ 5 network checks)", &bridged.destroy);
    row("none: create -> first output", &none.output);
    row("  of which create", &none.create);
    row("none: destroy", &none.destroy);
    println!();
    println!(
        "bridged vs none, create -> first output p50: {} ({} ms more)",
        fmt_ratio(ratio),
        overhead_ms
            .map(|m| format!("{m:.1}"))
            .unwrap_or_else(|| "n/a".into())
    );
    Ok(0)
}

/// One mode's samples.
#[derive(Default)]
struct Times {
    create: Series,
    packet: Series,
    output: Series,
    destroy: Series,
}

/// One cell's figures.
struct Sample {
    create: Duration,
    packet: Option<Duration>,
    output: Duration,
    destroy: Duration,
}

impl Times {
    fn push(&mut self, s: Sample) {
        self.create.push(s.create);
        if let Some(p) = s.packet {
            self.packet.push(p);
        }
        self.output.push(s.output);
        self.destroy.push(s.destroy);
    }
}

/// Lease (bridged: the address, in `store`), create, start, wait for its
/// first packet on `sock` (bridged) and its first output, wait for the
/// exit, destroy (clean or an error), release.
async fn one_cell(
    backend: &dyn Backend,
    store: &cellhost_store::Store,
    uids: &crate::bench::BenchUids,
    cell: cellhost_spec::Cell,
    sock: Option<&UdpSocket>,
) -> anyhow::Result<Sample> {
    let t0 = Instant::now();
    let id = CellId::random();
    let address = match backend.address_pool(&cell) {
        Some(p) => match store.lease_address(&id, &p.pool, &p.owner, p.first..=p.last)? {
            cellhost_store::LeaseOutcome::Leased { address, .. } => Some(address),
            cellhost_store::LeaseOutcome::PoolExhausted => anyhow::bail!("{} is full", p.pool),
        },
        None => None,
    };
    let h = backend
        .create(CreateRequest {
            address,
            uids: Some(uids.lease(&id)?),
            ..CreateRequest::new(id.clone(), cell)
        })
        .await
        .map_err(|e| crate::commands::run::backend_err(e, "bench create"))?;
    let create = t0.elapsed();
    let log = h.state_dir.join("log");
    let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
    ino.add_watch(&log, AddWatchFlags::IN_MODIFY)?;
    backend
        .start(&h)
        .await
        .map_err(|e| crate::commands::run::backend_err(e, "bench start"))?;
    let packet = match sock {
        Some(sock) => {
            let want: std::net::Ipv4Addr = h.tier["network"]["address"]
                .as_str()
                .unwrap_or_default()
                .parse()?;
            let mut buf = [0u8; 16];
            loop {
                match sock.recv_from(&mut buf) {
                    Ok((_, from)) if from.ip() == std::net::IpAddr::V4(want) => break,
                    Ok(_) => {}
                    Err(e) => {
                        let said = std::fs::read_to_string(&log).unwrap_or_default();
                        anyhow::bail!(
                            "no packet from the bridged cell {want} ({e}); its log: {said:?} \
                             (a cell reaches the host itself only on its resolvers)"
                        );
                    }
                }
            }
            Some(t0.elapsed())
        }
        None => None,
    };
    if std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) == 0 {
        ino.read_events()?;
    }
    let output = t0.elapsed();
    drop(ino);
    wait_exited(backend, &h).await?;
    let td = Instant::now();
    let report = backend.destroy(&h).await?;
    let destroy = td.elapsed();
    anyhow::ensure!(
        report.is_clean(),
        "bench cell left residue: {}",
        report.summary()
    );
    store.release_lease(&id)?;
    uids.release(&h);
    // The kernel frees a destroyed cell's netns later, on a worker taking
    // the rtnl lock: let it finish, uncounted.
    tokio::time::sleep(SETTLE).await;
    Ok(Sample {
        create,
        packet,
        output,
        destroy,
    })
}
