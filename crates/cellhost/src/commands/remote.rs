//! The detached commands: `create`, `start`, `stop`, `rm`, `ls`, `inspect`,
//! `logs`, `exec`, `extend`, `events`, `node`, each one API call (or a
//! stream) to `cellhost serve`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::Value;
use zeroize::Zeroizing;

use crate::cli::Command;
use crate::client::{Client, Target, api_error};
use crate::{EXIT_INVALID, EXIT_RUNTIME, exit_err};

pub fn client(api: &str, token_file: Option<&Path>) -> anyhow::Result<Client> {
    let token = match token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("reading the token file {}", p.display()))?;
            Some(Zeroizing::new(t.trim().to_string()))
        }
        None => None,
    };
    Ok(Client::new(Target::parse(api)?, token))
}

/// Check an id before putting it in a URL path.
/// `/v1/cells/<id><suffix>`, refusing an id that is not a cell id (exit 2).
fn cell_path(id: &str, suffix: &str) -> anyhow::Result<String> {
    cellhost_core::ids::CellId::parse(id)
        .map_err(|e| exit_err(crate::EXIT_USAGE, format!("{id:?}: {e}")))?;
    Ok(format!("/v1/cells/{id}{suffix}"))
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn secs_human(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

pub async fn dispatch(c: &Client, cmd: Command, json: bool) -> anyhow::Result<u8> {
    match cmd {
        Command::Create {
            file,
            no_start,
            volume_key_file,
        } => create(c, &file, !no_start, volume_key_file.as_deref(), json).await,
        Command::Start {
            id,
            volume_key_file,
        } => {
            let key = volume_key_file
                .as_deref()
                .map(crate::commands::run::read_volume_key)
                .transpose()?;
            let v: Value = c
                .json_with(Method::POST, &cell_path(&id, "/start")?, None, key.as_ref())
                .await?;
            show_state(&v, json)
        }
        Command::Stop { id, grace } => {
            let q = grace
                .map(|g| format!("?graceSeconds={g}"))
                .unwrap_or_default();
            let v: Value = c
                .json(Method::POST, &cell_path(&id, &format!("/stop{q}"))?, None)
                .await?;
            show_state(&v, json)
        }
        Command::Rm { id } => {
            let v: Value = c.json(Method::DELETE, &cell_path(&id, "")?, None).await?;
            let report: cellhost_core::TeardownReport =
                serde_json::from_value(v.clone()).context("decoding the TeardownReport")?;
            if json {
                print_json(&v)?;
            } else {
                println!("{id}: {}", report.summary());
                for ch in &report.checks {
                    println!("  {:<10} {:>3}  {}", ch.name, ch.residue, ch.target);
                }
            }
            Ok(if report.is_clean() { 0 } else { EXIT_RUNTIME })
        }
        Command::Ls => {
            let v: Vec<Value> = c.json(Method::GET, "/v1/cells", None).await?;
            if json {
                print_json(&Value::Array(v))?;
            } else {
                println!(
                    "{:<12}  {:<20}  {:<8}  {:<10}  {:<16}  LEASE",
                    "ID", "NAME", "TIER", "STATE", "OWNER"
                );
                for c in v {
                    let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
                    println!(
                        "{:<12}  {:<20}  {:<8}  {:<10}  {:<16}  {}",
                        s("id"),
                        s("name"),
                        s("isolation"),
                        s("observed"),
                        s("owner"),
                        secs_human(c["expiresInSeconds"].as_u64().unwrap_or(0))
                    );
                }
            }
            Ok(0)
        }
        Command::Inspect { id } => {
            let v: Value = c.json(Method::GET, &cell_path(&id, "")?, None).await?;
            print_json(&v)?;
            Ok(0)
        }
        Command::Logs { id, follow } => {
            let path = cell_path(&id, &format!("/logs?follow={follow}"))?;
            let resp = c.send(Method::GET, &path, None).await?;
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let bytes = body.collect().await?.to_bytes();
                return Err(api_error(status, &bytes));
            }
            let mut out = std::io::stdout().lock();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    out.write_all(&data)?;
                    out.flush()?;
                }
            }
            Ok(0)
        }
        Command::Exec {
            id,
            env,
            timeout,
            cwd,
            command,
        } => {
            let mut envmap = serde_json::Map::new();
            for kv in env {
                let Some((k, v)) = kv.split_once('=') else {
                    return Err(exit_err(
                        crate::EXIT_USAGE,
                        format!("--env {kv:?}: expected KEY=VALUE"),
                    ));
                };
                envmap.insert(k.into(), Value::String(v.into()));
            }
            let body = serde_json::json!({
                "argv": command, "env": envmap, "cwd": cwd,
                "timeoutMs": timeout.saturating_mul(1000),
            });
            let v: Value = c
                .json(
                    Method::POST,
                    &cell_path(&id, "/exec")?,
                    Some(("application/json", serde_json::to_vec(&body)?)),
                )
                .await?;
            if json {
                print_json(&v)?;
            } else {
                print!("{}", v["stdout"].as_str().unwrap_or(""));
                eprint!("{}", v["stderr"].as_str().unwrap_or(""));
            }
            Ok(v["exitCode"].as_i64().unwrap_or(1).clamp(0, 255) as u8)
        }
        Command::Extend { id, seconds } => {
            let body = serde_json::to_vec(&serde_json::json!({ "seconds": seconds }))?;
            let v: Value = c
                .json(
                    Method::POST,
                    &cell_path(&id, "/extend")?,
                    Some(("application/json", body)),
                )
                .await?;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "{id}: lease ends {}",
                    v["expiresAt"].as_str().unwrap_or("?")
                );
            }
            Ok(0)
        }
        Command::Events { follow } => events(c, follow).await,
        Command::Node => {
            let v: Value = c.json(Method::GET, "/v1/node", None).await?;
            if json {
                print_json(&v)?;
            } else {
                let g = |p: &str| v.pointer(p).cloned().unwrap_or(Value::Null);
                let mib = |p: &str| g(p).as_u64().unwrap_or(0) >> 20;
                println!(
                    "node     {} (cellhost {})",
                    g("/name").as_str().unwrap_or("?"),
                    g("/version").as_str().unwrap_or("?")
                );
                println!(
                    "cpu      {} logical, {:.1}% busy, load {}",
                    g("/cpu/logical"),
                    g("/cpu/usagePercent").as_f64().unwrap_or(0.0),
                    g("/cpu/loadAverage")
                );
                println!(
                    "memory   {} MiB total, {} MiB available",
                    mib("/memory/totalBytes"),
                    mib("/memory/availableBytes")
                );
                if !g("/disk").is_null() {
                    println!(
                        "disk     {} MiB free of {} MiB on {}",
                        mib("/disk/availableBytes"),
                        mib("/disk/totalBytes"),
                        g("/disk/mountPoint").as_str().unwrap_or("?")
                    );
                }
                println!(
                    "capacity {:.2} CPUs, {} MiB",
                    g("/capacity/cpus").as_f64().unwrap_or(0.0),
                    mib("/capacity/memoryBytes")
                );
                println!(
                    "reserved {:.2} CPUs, {} MiB",
                    g("/reserved/cpus").as_f64().unwrap_or(0.0),
                    mib("/reserved/memoryBytes")
                );
                println!(
                    "cells    {} ({} running); tiers: {}",
                    g("/cells/total"),
                    g("/cells/running"),
                    g("/tiers")
                );
            }
            Ok(0)
        }
        _ => unreachable!("not a detached command"),
    }
}

fn show_state(v: &Value, json: bool) -> anyhow::Result<u8> {
    if json {
        print_json(v)?;
    } else {
        println!(
            "{}: {}",
            v["id"].as_str().unwrap_or("?"),
            v["observed"].as_str().unwrap_or("?")
        );
    }
    Ok(0)
}

/// Read the document, resolve `file`/`env` secrets here (the daemon accepts
/// only inline values), send it.
async fn create(
    c: &Client,
    file: &Path,
    start: bool,
    volume_key_file: Option<&Path>,
    json: bool,
) -> anyhow::Result<u8> {
    let key = volume_key_file
        .map(crate::commands::run::read_volume_key)
        .transpose()?;
    let body = inline_document(file, json)?;
    let v: Value = c
        .json_with(
            Method::POST,
            &format!("/v1/cells?start={start}"),
            Some(("application/json", body.to_vec())),
            key.as_ref(),
        )
        .await?;
    if json {
        print_json(&v)?;
    } else {
        println!("{}", v["id"].as_str().unwrap_or("?"));
    }
    Ok(0)
}

/// Read a document for a remote daemon or provider: its `file` and `env`
/// secrets are read here and inlined (a remote side may take only inline
/// values). The result holds secret values: zeroed on drop.
pub fn inline_document(file: &Path, json: bool) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let (mut cell, base) = crate::commands::run::load_cell(file, json)?;
    let values =
        cellhost_core::secrets::resolve(&cell.spec, &base, cellhost_core::secrets::process_env)
            .map_err(|e| exit_err(EXIT_INVALID, e.to_string()))?;
    for (s, v) in cell.spec.secrets.iter_mut().zip(values) {
        let text = String::from_utf8(v.value.to_vec()).map_err(|_| {
            exit_err(
                EXIT_INVALID,
                format!("secret {:?}: only UTF-8 secrets can be sent", s.name),
            )
        })?;
        s.from = cellhost_spec::SecretSource::Value(text);
    }
    Ok(Zeroizing::new(serde_json::to_vec(&cell)?))
}

async fn events(c: &Client, follow: bool) -> anyhow::Result<u8> {
    if !follow {
        let mut after = 0i64;
        loop {
            let page: Value = c
                .json(
                    Method::GET,
                    &format!("/v1/events?after={after}&limit=1000"),
                    None,
                )
                .await?;
            let events = page["events"].as_array().cloned().unwrap_or_default();
            for e in &events {
                println!("{e}");
            }
            let next = page["next"].as_i64().unwrap_or(after);
            if next == after {
                return Ok(0);
            }
            after = next;
        }
    }
    let resp = c.send(Method::GET, "/v1/events?follow=true", None).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body.collect().await?.to_bytes();
        return Err(api_error(status, &bytes));
    }
    // SSE: print each `data:` line (one CloudEvent JSON each).
    let mut buf = Vec::new();
    let mut out = std::io::stdout().lock();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if let Some(d) = line
                .strip_prefix(b"data: ")
                .or_else(|| line.strip_prefix(b"data:"))
            {
                out.write_all(d)?;
                out.flush()?;
            }
        }
    }
    Ok(0)
}
