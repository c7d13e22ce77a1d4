//! `cellhost bench volume`: what an encrypted volume costs, per engine,
//! against a plain loop-mounted ext4 of the same size made with the same
//! mkfs and mount options, in the same run, interleaved (engine order
//! rotates every round) so drift hits all alike.
//!
//! - ready: from nothing to a mounted 1 GiB file system. Encrypted:
//!   `Volumes::create` (sparse file, luksFormat, open, mkfs, mount, data
//!   dir). Plain: sparse file, mkfs, loop mount.
//! - sequential write: 256 MiB in 1 MiB writes to a new file, then fsync;
//!   MB/s over the write and the fsync.
//! - teardown is untimed; an encrypted volume's report must be clean.
//!
//! Numbers are reported, never asserted: the target (ready ≤ 1 s at p50) is
//! printed as met or MISSED, throughput as a ratio to plain.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use cellhost_core::ids::CellId;
use cellhost_core::{TeardownReport, VolumeKey};
use cellhost_volume::{EngineChoice, EngineKind, Tools, VolumeConfig, Volumes, baseline};
use serde_json::json;

use crate::bench::{Series, fmt_ratio, verdict};

/// Target: a mounted encrypted volume within this, p50.
const READY_TARGET: Duration = Duration::from_secs(1);
const SIZE_GIB: u64 = 1;
const WRITE_MIB: usize = 256;
/// Most rounds (each makes a 1 GiB file per engine).
const MAX_ROUNDS: usize = 20;

#[derive(Default)]
struct Measure {
    ready: Series,
    /// MB/s per round.
    write: Vec<f64>,
}

impl Measure {
    fn write_median(&self) -> Option<f64> {
        let mut v = self.write.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    }

    fn json(&self) -> serde_json::Value {
        json!({"ready": self.ready.json(), "write_mb_s_median": self.write_median(), "rounds": self.write.len()})
    }
}

/// Write `WRITE_MIB` MiB to `dir/f` and fsync; MB/s.
fn write_rate(dir: &Path) -> anyhow::Result<f64> {
    let block = vec![0x5au8; 1 << 20];
    let path = dir.join("bench-write");
    let t0 = Instant::now();
    let mut f = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
    for _ in 0..WRITE_MIB {
        f.write_all(&block)?;
    }
    f.sync_all()?;
    let secs = t0.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok((WRITE_MIB as f64 * 1.048_576) / secs)
}

enum Side {
    Plain,
    Engine(EngineKind, Volumes),
}

impl Side {
    fn name(&self) -> String {
        match self {
            Side::Plain => "plain ext4 (loop)".into(),
            Side::Engine(k, _) => format!("{k} ({})", k.format().as_str()),
        }
    }

    /// One round: (ready time, MB/s); everything removed after.
    fn round(&self, root: &Path, n: usize) -> anyhow::Result<(Duration, f64)> {
        match self {
            Side::Plain => {
                let dir = root.join(format!("plain-{n}"));
                let t0 = Instant::now();
                let mnt = baseline::create(&Tools::default(), &dir, SIZE_GIB)?;
                let ready = t0.elapsed();
                let rate = write_rate(&mnt);
                baseline::remove(&dir)?;
                Ok((ready, rate?))
            }
            Side::Engine(_, vols) => {
                let id = CellId::random();
                let key = VolumeKey::random();
                let t0 = Instant::now();
                let open = vols.create(&id, SIZE_GIB, &key)?;
                let ready = t0.elapsed();
                let rate = write_rate(&open.data_dir);
                let mut r = TeardownReport::new(id.as_str());
                vols.destroy_into(&id, &mut r);
                anyhow::ensure!(r.is_clean(), "volume teardown: {}", r.summary());
                Ok((ready, rate?))
            }
        }
    }
}

pub async fn bench_volume(state_dir: &Path, n: usize, json_out: bool) -> anyhow::Result<u8> {
    // Every step is a blocking tool run or file write.
    tokio::task::block_in_place(|| bench_blocking(state_dir, n, json_out))
}

fn bench_blocking(state_dir: &Path, n: usize, json_out: bool) -> anyhow::Result<u8> {
    let rounds = n.clamp(1, MAX_ROUNDS);
    let root = state_dir.join(format!("bench-volume-{}", std::process::id()));
    let _cleanup = crate::bench::RemoveOnDrop(root.clone());
    let probe = cellhost_volume::probe();
    let mut sides = vec![Side::Plain];
    let mut skipped = Vec::new();
    for kind in [EngineKind::DmCrypt, EngineKind::Userspace] {
        match probe.get(kind) {
            Ok(_) => {
                let mut cfg = VolumeConfig::new(root.join(kind.as_str()));
                cfg.engine = EngineChoice::Force(kind);
                sides.push(Side::Engine(kind, Volumes::new(cfg)));
            }
            Err(why) => skipped.push(format!("{kind}: {why}")),
        }
    }
    anyhow::ensure!(
        sides.len() > 1,
        "no encrypted-volume engine on this host: {}",
        skipped.join("; ")
    );
    let mut results: Vec<Measure> = sides.iter().map(|_| Measure::default()).collect();
    // One untimed warm-up round per side (binaries, page cache).
    for s in &sides {
        s.round(&root, 0)?;
    }
    for r in 0..rounds {
        for k in 0..sides.len() {
            let i = (r + k) % sides.len();
            let (ready, rate) = sides[i].round(&root, r + 1)?;
            results[i].ready.push(ready);
            results[i].write.push(rate);
        }
    }
    let measured = results;
    let plain = measured[0].write_median();
    let ratios: Vec<Option<f64>> = measured
        .iter()
        .map(|m| match (m.write_median(), plain) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        })
        .collect();
    let rows: Vec<serde_json::Value> = sides
        .iter()
        .zip(&measured)
        .zip(&ratios)
        .map(|((s, m), ratio)| {
            json!({"engine": s.name(), "measure": m.json(), "write_ratio_vs_plain": ratio})
        })
        .collect();
    let encrypted_ready_ok: Vec<bool> = measured[1..]
        .iter()
        .filter_map(|m| m.ready.ms(50.0))
        .map(|ms| ms <= READY_TARGET.as_secs_f64() * 1000.0)
        .collect();
    let ready_ok = (!encrypted_ready_ok.is_empty()).then(|| encrypted_ready_ok.iter().all(|b| *b));
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "bench": "volume",
                "size_gib": SIZE_GIB,
                "write_mib": WRITE_MIB,
                "rounds": rounds,
                "engines": rows,
                "skipped": skipped,
                "ready_target_ms": READY_TARGET.as_millis() as u64,
                "ready_target_met": ready_ok,
            }))?
        );
    } else {
        println!(
            "cellhost bench volume: {rounds} rounds, {SIZE_GIB} GiB volumes, {WRITE_MIB} MiB sequential write + fsync"
        );
        println!(
            "  {:<22} {:>12} {:>12} {:>12} {:>10}",
            "engine", "ready p50", "ready p99", "write MB/s", "vs plain"
        );
        for ((s, m), ratio) in sides.iter().zip(&measured).zip(&ratios) {
            println!(
                "  {:<22} {:>9.1} ms {:>9.1} ms {:>12.1} {:>10}",
                s.name(),
                m.ready.ms(50.0).unwrap_or(f64::NAN),
                m.ready.ms(99.0).unwrap_or(f64::NAN),
                m.write_median().unwrap_or(f64::NAN),
                fmt_ratio(*ratio)
            );
        }
        for s in &skipped {
            println!("  skipped {s}");
        }
        println!(
            "  target: encrypted volume ready <= {} ms at p50: {}",
            READY_TARGET.as_millis(),
            verdict(ready_ok)
        );
    }
    Ok(0)
}
