//! `cellhost image …`: the image store (cellhost-image): rootfs images for
//! process cells, kernels, initramfs and disks for the VM tiers.

use std::path::Path;

use anyhow::Context;
use cellhost_image::{ImageStore, ImportRequest, InitramfsRequest, MICROVM_MODULES, Manifest};

use crate::cli::ImageCommand;

fn show(m: &Manifest, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(m)?);
    } else {
        println!("{} ({})", m.name, m.kind.as_str());
        for (file, digest) in &m.digests {
            println!("  {file:<7} {digest}");
        }
        if let Some(c) = &m.cmdline {
            println!("  cmdline {c}");
        }
    }
    Ok(())
}

pub fn image(state_dir: &Path, cmd: ImageCommand, json: bool) -> anyhow::Result<u8> {
    let store = ImageStore::of_state_dir(state_dir);
    match cmd {
        ImageCommand::Import {
            name,
            rootfs,
            kernel,
            initrd,
            disk,
            append,
            replace,
        } => {
            let m = store.import(
                &name,
                &ImportRequest {
                    kernel,
                    initrd,
                    disk,
                    rootfs,
                    cmdline: append,
                    replace,
                },
            )?;
            show(&m, json)?;
        }
        ImageCommand::Initramfs {
            name,
            kernel,
            agent,
            rootfs,
            modules_dir,
            mut modules,
            append,
            replace,
        } => {
            if modules.is_empty() && modules_dir.is_some() {
                modules = MICROVM_MODULES.iter().map(|s| s.to_string()).collect();
            }
            let req = InitramfsRequest {
                rootfs,
                agent: Some(agent),
                modules_dir,
                modules,
            };
            let m = store
                .build_microvm(&name, &kernel, &req, append, replace)
                .with_context(|| format!("building image {name}"))?;
            show(&m, json)?;
        }
        ImageCommand::Ls => {
            let all = store.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for m in all {
                    let main = m
                        .digests
                        .get("disk")
                        .or_else(|| m.digests.get("initrd"))
                        .or_else(|| m.digests.get("rootfs"))
                        .map(|d| &d[..d.len().min(19)])
                        .unwrap_or("");
                    println!("{:<24} {:<8} {main}", m.name, m.kind.as_str());
                }
            }
        }
        ImageCommand::Inspect { name } => show(&store.get(&name)?.manifest, json)?,
        ImageCommand::Verify { name } => {
            let bad = store.verify(&name)?;
            if bad.is_empty() {
                println!("{name}: every digest matches");
            } else {
                println!("{name}: changed on disk: {}", bad.join(", "));
                return Ok(1);
            }
        }
        ImageCommand::Rm { name } => {
            if !store.remove(&name)? {
                println!("{name}: no such image");
            }
        }
    }
    Ok(0)
}
