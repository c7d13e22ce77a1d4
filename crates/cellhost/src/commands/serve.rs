//! `cellhost serve`: the supervisor daemon.
//!
//! # Layout on the host
//!
//! ```text
//! <state>/serve.lock        flock: exclusive while a daemon runs; `cellhost
//!                           run` holds it shared, so the two never drive the
//!                           same store at once
//! <state>/cellhost.db       the store (cellhost-store)
//! <state>/process/          process-tier cells (cellhost-process)
//! <state>/market/           with --market: the provider's Nostr key, wallet
//!                           and request ledger (cellhost-market)
//! /run/cellhost/api.sock    0600, the operator's API (dir 0700 if we make it)
//! ```
//!
//! # Lifecycle
//!
//! Take the lock, open the store, build the backends this host can run,
//! bind the socket (a stale socket file from a killed daemon is replaced:
//! the lock proves nobody serves it), start the supervisor's loops (the
//! first reconcile pass runs at once), serve until SIGTERM/SIGINT. Cells
//! outlive the daemon (their shims are nobody's children); the next start
//! adopts them.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use cellhost_access::nip98::Verifier;
use cellhost_access::tls::{TlsIdentity, TlsListener};
use cellhost_core::Backend;
use cellhost_market::proto::TenantApi;
use cellhost_store::Store;
use cellhost_supervisor::api::TenantAuth;
use cellhost_supervisor::node::AdmissionPolicy;
use cellhost_supervisor::tokens::Tokens;
use cellhost_supervisor::{Supervisor, api};
use nix::fcntl::{Flock, FlockArg};

use crate::cli::{ContainerRestart, ServeArgs};
use crate::{EXIT_USAGE, exit_err};

pub const LOCK_FILE: &str = "serve.lock";

/// Hold `<state>/serve.lock` exclusively (daemon) or shared (`run`).
pub fn lock_state_dir(state_dir: &Path, exclusive: bool) -> anyhow::Result<Flock<std::fs::File>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let path = state_dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let arg = if exclusive {
        FlockArg::LockExclusiveNonblock
    } else {
        FlockArg::LockSharedNonblock
    };
    Flock::lock(f, arg).map_err(|(_, e)| {
        let who = if exclusive {
            "another `cellhost serve` or a `cellhost run`"
        } else {
            "a `cellhost serve` daemon"
        };
        exit_err(
            crate::EXIT_RUNTIME,
            format!(
                "{} is in use by {who} ({e}); talk to the daemon with `cellhost create`, or use another --state-dir",
                state_dir.display()
            ),
        )
    })
}

/// The backends this host can run now, under the operator's policy.
pub fn backends(
    state_dir: &Path,
    args: &ServeArgs,
    policy: &cellhost_policy::Policy,
) -> anyhow::Result<Vec<Arc<dyn Backend>>> {
    // Bridged cells publish where containers do (every address for
    // 0.0.0.0, the default).
    let mut net = args.net.clone();
    net.publish = match args.publish_address {
        std::net::IpAddr::V4(a) if a.is_unspecified() => None,
        std::net::IpAddr::V4(a) => Some(a),
        std::net::IpAddr::V6(a) if a.is_unspecified() => None,
        std::net::IpAddr::V6(a) => {
            // Bridged cells are IPv4 only: the narrowest IPv4 reading.
            tracing::warn!(
                "--publish-address {a} is IPv6; bridged cells publish on 127.0.0.1 only"
            );
            Some(std::net::Ipv4Addr::LOCALHOST)
        }
    };
    let mut tiers =
        crate::commands::run::tier_settings(state_dir, args.volume.volume_engine.0, &net, policy)?;
    tiers.publish_address = Some(args.publish_address.to_string());
    tiers.container_restart_unless_stopped =
        args.container_restart == ContainerRestart::UnlessStopped;
    // One probe for every tier (with the VM tiers' KVM verdict).
    let (backends, unavailable) = tiers.backends();
    for u in unavailable {
        tracing::warn!("{} tier unavailable: {}", u.tier, u.detail);
    }
    Ok(backends)
}

fn bind_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?,
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(l)
}

/// The tenant API's TLS side, ready to serve.
struct TenantTls {
    listener: TlsListener,
    url: String,
    fingerprint: cellhost_access::Fingerprint,
    verifier: Arc<Verifier>,
}

/// Bind `addr`, load (or make) the certificate in `<state>/tls/`, and fix
/// the URL signed requests must name.
async fn tenant_tls(
    state_dir: &Path,
    addr: std::net::SocketAddr,
    url: Option<&str>,
) -> anyhow::Result<TenantTls> {
    let url = match url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None if addr.ip().is_unspecified() => {
            return Err(exit_err(
                EXIT_USAGE,
                format!("--tenant-listen {addr} needs --tenant-url: the address consumers reach"),
            ));
        }
        None => format!("https://{addr}"),
    };
    let verifier = Arc::new(
        Verifier::new(&url).map_err(|e| exit_err(EXIT_USAGE, format!("--tenant-url {e}")))?,
    );
    let host = verifier.host();
    let identity =
        TlsIdentity::load_or_create(&state_dir.join("tls"), &[host, "localhost".to_string()])?;
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let listener = TlsListener::new(tcp, identity.server_config()?)?;
    Ok(TenantTls {
        listener,
        url,
        fingerprint: identity.fingerprint(),
        verifier,
    })
}

pub async fn serve(state_dir: &Path, args: ServeArgs) -> anyhow::Result<u8> {
    let _lock = lock_state_dir(state_dir, true)?;
    let tokens = match (&args.listen, &args.tokens) {
        (Some(_), None) => {
            return Err(exit_err(EXIT_USAGE, "--listen needs --tokens FILE"));
        }
        (None, Some(_)) if args.tenant_listen.is_none() => {
            return Err(exit_err(
                EXIT_USAGE,
                "--tokens needs --listen or --tenant-listen",
            ));
        }
        (_, Some(f)) => Some(Arc::new(Tokens::load(f)?)),
        (_, None) => None,
    };
    let tenant_tls = match args.tenant_listen {
        Some(addr) => Some(tenant_tls(state_dir, addr, args.tenant_url.as_deref()).await?),
        None if args.tenant_url.is_some() => {
            return Err(exit_err(EXIT_USAGE, "--tenant-url needs --tenant-listen"));
        }
        None => None,
    };
    let tcp = match &args.listen {
        Some(l) => {
            let Some(addr) = l.strip_prefix("tcp:") else {
                return Err(exit_err(
                    EXIT_USAGE,
                    format!("--listen {l:?}: expected tcp:HOST:PORT"),
                ));
            };
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?,
            )
        }
        None => None,
    };
    let policy = crate::commands::run::load_policy(args.policy.as_deref())?;
    for (flag, v) in [
        ("--cpu-overcommit", args.cpu_overcommit),
        ("--memory-overcommit", args.memory_overcommit),
    ] {
        if !(v.is_finite() && v > 0.0 && v <= 1024.0) {
            return Err(exit_err(
                EXIT_USAGE,
                format!("{flag} must be > 0 and <= 1024"),
            ));
        }
    }
    if args.reconcile_interval == 0 || args.meter_interval == 0 {
        return Err(exit_err(EXIT_USAGE, "intervals must be at least 1 second"));
    }

    let store = Arc::new(
        Store::open(state_dir)
            .with_context(|| format!("opening the store in {}", state_dir.display()))?,
    );
    let backends = backends(state_dir, &args, &policy)?;
    let mut cfg = crate::commands::run::supervisor_config(state_dir, policy, &args.net);
    if let Some(n) = &args.node_name {
        cfg.node_name = n.clone();
    }
    cfg.admission = AdmissionPolicy {
        cpu_overcommit: args.cpu_overcommit,
        memory_overcommit: args.memory_overcommit,
        host_reserve_bytes: args.reserve_memory_mib << 20,
    };
    cfg.reconcile_interval = Duration::from_secs(args.reconcile_interval);
    cfg.meter_interval = Duration::from_secs(args.meter_interval);
    // The market config is read before anything starts: a bad one is a
    // usage error naming its field, not a half-started daemon.
    let market_cfg = match &args.market {
        Some(f) => Some(
            cellhost_market::MarketConfig::load(f)
                .map_err(|e| exit_err(EXIT_USAGE, e.to_string()))?,
        ),
        None => None,
    };
    let sup = Supervisor::new(store, backends, cfg)?;
    cellhost_market::arm_failpoints();
    let offer_api = tenant_tls.as_ref().map(|t| TenantApi {
        url: t.url.clone(),
        tls_sha256: t.fingerprint.to_string(),
    });
    let market = match market_cfg {
        Some(c) => Some(
            cellhost_market::provider::Provider::open(sup.clone(), c, state_dir, offer_api)
                .await
                .map_err(|e| exit_err(EXIT_USAGE, e.to_string()))?,
        ),
        None => None,
    };

    let unix = bind_socket(&args.socket)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let loops = tokio::spawn(sup.clone().run(stop_rx.clone()));

    let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let unix_server = axum::serve(unix, api::operator_router(sup.clone()))
        .with_graceful_shutdown(shutdown(stop_rx.clone()));
    let unix_task = tokio::spawn(async move { unix_server.await });
    let tcp_task = match (tcp, &tokens) {
        (Some(l), Some(t)) => {
            tracing::info!("tenant API on tcp:{}", l.local_addr()?);
            let auth = TenantAuth {
                tokens: Some(t.clone()),
                nostr: None,
            };
            let server = axum::serve(l, api::tenant_router(sup.clone(), auth))
                .with_graceful_shutdown(shutdown(stop_rx.clone()));
            Some(tokio::spawn(async move { server.await }))
        }
        _ => None,
    };
    let tls_task = tenant_tls.map(|t| {
        eprintln!(
            "cellhost: tenant API on {} (certificate sha256 {})",
            t.url, t.fingerprint
        );
        let auth = TenantAuth {
            tokens: tokens.clone(),
            nostr: Some(t.verifier),
        };
        let server = axum::serve(t.listener, api::tenant_router(sup.clone(), auth))
            .with_graceful_shutdown(shutdown(stop_rx.clone()));
        tokio::spawn(async move { server.await })
    });
    let market_task = market.map(|m| {
        eprintln!(
            "cellhost: market provider {}",
            cellhost_market::keys::npub(&m.public_key())
        );
        tokio::spawn(m.run(stop_rx.clone()))
    });
    eprintln!(
        "cellhost: serving on {} (tiers: {})",
        args.socket.display(),
        sup.tiers()
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("cellhost: shutting down; cells keep running and are adopted at the next start");
    let _ = stop_tx.send(true);
    let _ = loops.await;
    // Streams (logs -f, events -f) may hold connections: do not wait long.
    let _ = tokio::time::timeout(Duration::from_secs(2), unix_task).await;
    for t in [tcp_task, tls_task].into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    if let Some(t) = market_task {
        // It finishes requests under way first (a paid one ends in a cell
        // or a refund), for up to its own grace.
        let grace = cellhost_market::provider::SHUTDOWN_GRACE + Duration::from_secs(10);
        let _ = tokio::time::timeout(grace, t).await;
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(0)
}
