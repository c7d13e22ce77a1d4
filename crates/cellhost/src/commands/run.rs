//! `cellhost run` and `cellhost validate`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cellhost_core::ids::CellId;
use cellhost_core::{Backend, BackendError, CellState, ExitInfo, VolumeKey};
use cellhost_spec::{Cell, Isolation};
use cellhost_store::Store;
use cellhost_supervisor::events::kinds;
use cellhost_supervisor::tiers::TierSettings;
use cellhost_supervisor::{Caller, Confidential, Supervisor, SupervisorError};
use cellhost_volume::EngineChoice;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::RunArgs;
use crate::{EXIT_CAPABILITY, EXIT_INVALID, EXIT_RUNTIME, exit_err};

/// Largest document read (the spec crate enforces its own cap too).
const MAX_DOC_BYTES: u64 = 4 << 20;
/// How often the foreground run polls the log and status.
const POLL: Duration = Duration::from_millis(20);
/// The same for container cells.
const CONTAINER_POLL: Duration = Duration::from_millis(100);

/// Read a document from a path or `-` (stdin).
pub fn read_doc(file: &Path) -> anyhow::Result<(String, PathBuf)> {
    let mut text = String::new();
    if file == Path::new("-") {
        std::io::stdin()
            .take(MAX_DOC_BYTES)
            .read_to_string(&mut text)
            .context("reading document from stdin")?;
        return Ok((text, std::env::current_dir()?));
    }
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_DOC_BYTES).read_to_string(&mut text))
        .map_err(|e| exit_err(EXIT_INVALID, format!("{}: {e}", file.display())))?;
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((text, base))
}

/// Parse and validate, tier rules included (`validate_for`), or exit 3
/// listing every problem.
pub fn load_cell(file: &Path, json_out: bool) -> anyhow::Result<(Cell, PathBuf)> {
    let (text, base) = read_doc(file)?;
    let checked = cellhost_spec::parse_and_validate(&text).and_then(|c| {
        cellhost_spec::validate_for(c.spec.isolation, &c)
            .map(|()| c)
            .map_err(cellhost_spec::SpecError::from)
    });
    match checked {
        Ok(c) => Ok((c, base)),
        Err(e) => {
            let errs = e.field_errors();
            if json_out {
                let list: Vec<_> = errs
                    .iter()
                    .map(|f| json!({"path": f.path, "message": f.message}))
                    .collect();
                println!(
                    "{}",
                    json!({"valid": false, "file": file.display().to_string(), "errors": list})
                );
            } else {
                for f in &errs {
                    if f.path.is_empty() {
                        eprintln!("{}: {}", file.display(), f.message);
                    } else {
                        eprintln!("{}: {}: {}", file.display(), f.path, f.message);
                    }
                }
            }
            Err(exit_err(
                EXIT_INVALID,
                format!(
                    "{}: invalid cell document ({} problem{})",
                    file.display(),
                    errs.len(),
                    if errs.len() == 1 { "" } else { "s" }
                ),
            ))
        }
    }
}

pub fn validate(file: &Path, json_out: bool) -> anyhow::Result<u8> {
    let (cell, _) = load_cell(file, json_out)?;
    if json_out {
        println!(
            "{}",
            json!({"valid": true, "file": file.display().to_string(), "name": cell.metadata.name, "isolation": cell.spec.isolation})
        );
    } else {
        println!(
            "{}: valid ({} cell {:?})",
            file.display(),
            cell.spec.isolation,
            cell.metadata.name
        );
    }
    Ok(0)
}

/// The tiers' settings for this binary (it is also the shims' program).
pub fn tier_settings(
    state_dir: &Path,
    volume_engine: EngineChoice,
    net: &crate::cli::NetOpt,
    policy: &cellhost_policy::Policy,
) -> anyhow::Result<TierSettings> {
    let exe = std::env::current_exe().context("locating the cellhost binary for the shims")?;
    let mut s = TierSettings::new(state_dir, exe, Arc::new(policy.clone()));
    s.volume_engine = volume_engine;
    s.bridge = net.bridge();
    Ok(s)
}

/// The backend for a tier on this host, or exit 4 saying why not.
pub fn backend_for(
    isolation: Isolation,
    state_dir: &Path,
    volume_engine: EngineChoice,
    net: &crate::cli::NetOpt,
    policy: &cellhost_policy::Policy,
) -> anyhow::Result<Arc<dyn Backend>> {
    tier_settings(state_dir, volume_engine, net, policy)?
        .backend(isolation)
        .map_err(|e| exit_err(EXIT_CAPABILITY, e.to_string()))
}

/// Read a volume key file (32 bytes raw, 64 hex digits or base64). The
/// file's bytes are zeroed after parsing; a malformed key exits 3 naming
/// the file, never quoting it.
pub fn read_volume_key(path: &Path) -> anyhow::Result<VolumeKey> {
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| {
        exit_err(
            EXIT_INVALID,
            format!("--volume-key-file {}: {e}", path.display()),
        )
    })?);
    VolumeKey::parse(&bytes).map_err(|e| {
        exit_err(
            EXIT_INVALID,
            format!("--volume-key-file {}: {e}", path.display()),
        )
    })
}

/// Map a backend error to an exit code.
pub fn backend_err(e: BackendError, what: &str) -> anyhow::Error {
    let code = match e {
        BackendError::MissingCapability { .. } | BackendError::Unsupported { .. } => {
            EXIT_CAPABILITY
        }
        BackendError::Invalid(_) => EXIT_INVALID,
        _ => EXIT_RUNTIME,
    };
    let hint = match &e {
        BackendError::MissingCapability { capability, .. } => doctor_says(capability),
        _ => String::new(),
    };
    exit_err(code, format!("{what}: {e}{hint}"))
}

/// `; doctor: no  cgroup.memory  <why>` for a capability key, so a refusal
/// shows what `cellhost doctor` shows for the same thing.
fn doctor_says(capability: &str) -> String {
    if !cellhost_host::probe::KEYS.contains(&capability) {
        return "; see `cellhost doctor`".to_string();
    }
    let report = cellhost_host::probe::probe(&Default::default());
    match report.get(capability) {
        Some(c) => format!(
            "; doctor: {} {} ({})",
            if c.ok { "yes" } else { "no" },
            c.name,
            c.detail
        ),
        None => "; see `cellhost doctor`".to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    Exited,
    Expired,
    Interrupted,
}

/// The operator's policy: `--policy FILE`, else [`DEFAULT_POLICY`] when it
/// exists, else the built-in defaults (see cellhost-policy). `serve` and
/// `run` read it the same way. A bad file is a usage error naming the
/// line.
pub fn load_policy(path: Option<&Path>) -> anyhow::Result<cellhost_policy::Policy> {
    let default = Path::new(DEFAULT_POLICY);
    let path = match path {
        Some(p) => p,
        None if default.exists() => default,
        None => return Ok(cellhost_policy::Policy::default()),
    };
    cellhost_policy::Policy::load(path).map_err(|e| exit_err(crate::EXIT_USAGE, e.to_string()))
}

/// Where the operator's policy lives when `--policy` is not given.
pub const DEFAULT_POLICY: &str = "/etc/cellhost/policy.yaml";

/// A supervisor config for a state dir under `policy` (shared by `run`
/// and `serve`).
pub fn supervisor_config(
    state_dir: &Path,
    policy: cellhost_policy::Policy,
    net: &crate::cli::NetOpt,
) -> cellhost_supervisor::SupervisorConfig {
    let node = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "cellhost".into());
    let mut cfg = cellhost_supervisor::SupervisorConfig::new(node, state_dir.to_path_buf());
    cfg.bridge_subnet = Some(cellhost_policy::Net::new(
        net.bridge_subnet.network(),
        net.bridge_subnet.prefix(),
    ));
    cfg.policy = Arc::new(policy);
    cfg
}

/// Map a supervisor error to an exit code: 3 for a document the tier
/// refuses, 4 for what this host or its policy will not give, 1 otherwise.
pub fn supervisor_err(e: SupervisorError, what: &str) -> anyhow::Error {
    match e {
        SupervisorError::Backend(b) => backend_err(b, what),
        SupervisorError::Invalid { .. } => exit_err(EXIT_INVALID, format!("{what}: {e}")),
        SupervisorError::Policy(_)
        | SupervisorError::Capacity(_)
        | SupervisorError::Unavailable(_)
        | SupervisorError::TooMany { .. }
        | SupervisorError::PortTaken { .. } => exit_err(EXIT_CAPABILITY, format!("{what}: {e}")),
        _ => exit_err(EXIT_RUNTIME, format!("{what}: {e}")),
    }
}

/// `cellhost run`: the same lifecycle as the daemon's (an in-process
/// supervisor over the state dir's store: the policy, admission, uid
/// leases, events), in the foreground: stream the output, end with the
/// workload or the lease, destroy, exit with the workload's code.
pub async fn run(state_dir: &Path, args: RunArgs, json_out: bool) -> anyhow::Result<u8> {
    // Listen before anything is built: a Ctrl-C that lands while the cell
    // is being created must not kill us with the cell half made. It is
    // acted on once `create` returns (finished or rolled back).
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let (cell, base) = load_cell(&args.file, json_out)?;
    let policy = load_policy(args.policy.as_deref())?;
    let volume_key = args
        .volume_key_file
        .as_deref()
        .map(read_volume_key)
        .transpose()?;
    let mut tiers = tier_settings(state_dir, args.volume.volume_engine.0, &args.net, &policy)?;
    tiers.progress = Some(Arc::new(|line: &str| eprintln!("cellhost: {line}")));
    let backend = tiers
        .backend(cell.spec.isolation)
        .map_err(|e| exit_err(EXIT_CAPABILITY, e.to_string()))?;
    // A daemon on this state dir would reconcile our in-flight cell away.
    let _lock = crate::commands::serve::lock_state_dir(state_dir, false)?;
    let secrets =
        cellhost_core::secrets::resolve(&cell.spec, &base, cellhost_core::secrets::process_env)
            .map_err(|e| exit_err(EXIT_INVALID, e.to_string()))?;

    let store = Arc::new(
        Store::open(state_dir)
            .with_context(|| format!("opening the store in {}", state_dir.display()))?,
    );
    let sup = Supervisor::new(
        store,
        vec![backend.clone()],
        supervisor_config(state_dir, policy, &args.net),
    )?;
    let caller = Caller::tenant(args.owner.clone());
    let name = cell.metadata.name.clone();
    let view = sup
        .create(
            &caller,
            cell,
            Confidential {
                secrets,
                volume_key,
            },
            true,
        )
        .await
        .map_err(|e| supervisor_err(e, &format!("creating cell {name:?}")))?;
    let id = CellId::parse(&view.id).map_err(|e| anyhow::anyhow!("cell id: {e}"))?;
    let handle = sup
        .handle(&id)
        .await
        .map_err(|e| supervisor_err(e, "reading the cell"))?;
    // The lease the policy settled on (the document as stored), from now:
    // the store's end is a few milliseconds earlier, and the reaper's.
    let ttl = Duration::from_secs(view.document.spec.lifetime.ttl());
    if !json_out {
        eprintln!(
            "cellhost: cell {id} ({name}) running, lease {}s",
            ttl.as_secs()
        );
    }

    let deadline = tokio::time::Instant::now() + ttl;
    let mut offset = 0u64;
    let mut captured: Vec<u8> = Vec::new();
    // Each container poll is two engine API calls (the whole log, an
    // inspect): poll less often.
    let poll = if handle.isolation == Isolation::Container {
        CONTAINER_POLL
    } else {
        POLL
    };
    let (outcome, mut exit) = loop {
        tokio::select! {
            _ = tokio::time::sleep(poll) => {
                offset = pump_logs(&*backend, &handle, offset, json_out, &mut captured).await;
                let st = backend.status(&handle).await.map_err(|e| backend_err(e, "status"))?;
                match st.state {
                    CellState::Exited => break (Outcome::Exited, st.exit),
                    CellState::Gone => break (Outcome::Exited, None),
                    _ => {}
                }
            }
            _ = sigint.recv() => break (Outcome::Interrupted, None),
            _ = sigterm.recv() => break (Outcome::Interrupted, None),
            _ = tokio::time::sleep_until(deadline) => break (Outcome::Expired, None),
        }
    };
    pump_logs(&*backend, &handle, offset, json_out, &mut captured).await;
    match outcome {
        Outcome::Expired => {
            if !json_out {
                eprintln!(
                    "cellhost: lease of {}s expired; killing cell {id}",
                    ttl.as_secs()
                );
            }
        }
        Outcome::Interrupted => {
            if !json_out {
                eprintln!("cellhost: interrupted; destroying cell {id}");
            }
        }
        Outcome::Exited => {}
    }
    let kind = match outcome {
        Outcome::Exited => kinds::EXITED,
        Outcome::Expired => kinds::EXPIRED,
        Outcome::Interrupted => kinds::INTERRUPTED,
    };
    let report = sup
        .end(&caller, &id, kind, exit)
        .await
        .map_err(|e| supervisor_err(e, "destroying cell"))?;
    if outcome != Outcome::Exited {
        // Killed by us: SIGKILL, or SIGINT-style for an interrupt.
        exit = Some(ExitInfo::signaled(if outcome == Outcome::Interrupted {
            libc::SIGINT
        } else {
            libc::SIGKILL
        }));
    }

    let exit = exit.unwrap_or_else(ExitInfo::unknown);
    if json_out {
        println!(
            "{}",
            json!({
                "id": id, "name": name, "outcome": outcome, "exit": exit,
                "exitCode": exit.shell_code(), "teardown": report,
                "output": String::from_utf8_lossy(&captured),
            })
        );
    } else {
        let how = match outcome {
            Outcome::Exited => exit.describe(),
            Outcome::Expired => "killed at lease expiry".to_string(),
            Outcome::Interrupted => "interrupted".to_string(),
        };
        eprintln!("cellhost: cell {id} {how}; {}", report.summary());
    }
    if !report.is_clean() {
        return Err(exit_err(
            EXIT_RUNTIME,
            format!("cell {id} left residue: {}", report.summary()),
        ));
    }
    Ok(exit.shell_code().clamp(0, 255) as u8)
}

async fn pump_logs(
    backend: &dyn Backend,
    handle: &cellhost_core::CellHandle,
    mut offset: u64,
    json_out: bool,
    captured: &mut Vec<u8>,
) -> u64 {
    loop {
        let Ok(chunk) = backend.logs(handle, offset).await else {
            return offset;
        };
        offset = chunk.next_offset;
        if json_out {
            captured.extend_from_slice(&chunk.data);
        } else if !chunk.data.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&chunk.data);
            let _ = out.flush();
        }
        if !chunk.more {
            return offset;
        }
    }
}
