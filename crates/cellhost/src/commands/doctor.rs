//! `cellhost doctor`: what this host can run, and why not.

pub fn doctor(state_dir: &std::path::Path, kvm_boot: bool, json: bool) -> anyhow::Result<u8> {
    // With --kvm-boot: the probe boots a kernel of the image store when
    // there is one (what the VM tiers do at start), else its own search.
    let report = cellhost_host::probe::probe(&cellhost_host::probe::ProbeOptions {
        kvm_boot,
        probe_kernel: cellhost_supervisor::tiers::store_kernel(state_dir).map(|(k, _)| k),
        ..Default::default()
    });
    let volumes = cellhost_volume::probe();
    let chosen = volumes.choose(cellhost_volume::EngineChoice::Auto);
    if json {
        let mut v = serde_json::to_value(&report)?;
        let row = |r: &Result<String, String>| match r {
            Ok(d) => serde_json::json!({"ok": true, "detail": d}),
            Err(d) => serde_json::json!({"ok": false, "detail": d}),
        };
        v["volumeEngines"] = serde_json::json!({
            "dm-crypt": row(&volumes.dm_crypt),
            "userspace": row(&volumes.userspace),
            "auto": chosen.as_ref().ok().map(|k| k.as_str()),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{report}");
        println!("encrypted volumes:");
        for kind in [
            cellhost_volume::EngineKind::DmCrypt,
            cellhost_volume::EngineKind::Userspace,
        ] {
            let (ok, detail) = match volumes.get(kind) {
                Ok(d) => ("yes", d.as_str()),
                Err(d) => ("no ", d.as_str()),
            };
            println!(
                "  {ok}  {:<10} {}  {detail}",
                kind.as_str(),
                kind.format().as_str()
            );
        }
        match chosen {
            Ok(k) => println!("  auto picks {k}"),
            Err(_) => println!("  no engine: spec.volume.encrypted cells are refused"),
        }
    }
    Ok(0)
}
