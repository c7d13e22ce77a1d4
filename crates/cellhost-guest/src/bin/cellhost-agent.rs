//! `cellhost-agent`: the in-guest helper (see the `cellhost_guest::agent`
//! docs). Build it static to drop it into any rootfs or initramfs:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" \
//!   cargo build --release --target x86_64-unknown-linux-gnu -p cellhost-guest --bin cellhost-agent
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use cellhost_guest::agent::{self, Agent, Config, init, serve};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "cellhost-agent",
    version,
    about = "cellhost's in-guest agent: env, secrets, exec and files over NDJSON"
)]
struct Args {
    /// Listen on this AF_VSOCK port (the default listener: 5555).
    #[arg(long, value_name = "PORT")]
    vsock_port: Option<u32>,
    /// Serve a virtio-serial port: its name (found under /dev/virtio-ports
    /// or /sys/class/virtio-ports) or a device path.
    #[arg(long, value_name = "NAME|PATH")]
    virtio_port: Option<String>,
    /// Listen on a unix socket (made 0600).
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Serve one connection on stdin/stdout and exit at its end.
    #[arg(long, conflicts_with_all = ["vsock_port", "virtio_port", "unix"])]
    stdio: bool,
    /// Where the env file and secrets go (made 0700).
    #[arg(long, default_value = "/run/cellhost", value_name = "DIR")]
    state_dir: PathBuf,
    /// Where secrets go (made 0700); default `<state-dir>/secrets`.
    #[arg(long, value_name = "DIR")]
    secrets_dir: Option<PathBuf>,
    /// Kernel modules to load first, one `.ko` path per line (as PID 1 the
    /// default is /etc/cellhost/modules when it exists).
    #[arg(long, value_name = "FILE")]
    modules: Option<PathBuf>,
    /// Allow write_file/read_file beneath this directory (repeatable; none
    /// turns file operations off).
    #[arg(long = "file-root", value_name = "DIR")]
    file_roots: Vec<PathBuf>,
    /// Refuse exec requests.
    #[arg(long)]
    no_exec: bool,
    /// Accept configure_net although not PID 1 (a PID 1 agent, in a
    /// microVM, always does): only in a network namespace of its own.
    #[arg(long)]
    configure_net: bool,
    /// Where configure_net writes resolv.conf.
    #[arg(long, default_value = "/etc", value_name = "DIR")]
    resolv_dir: PathBuf,
    /// The cell's main command, started once the agent listens.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELLHOST_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let pid1 = std::process::id() == 1;
    // Descriptors we inherited must not reach execs and the main command.
    init::cloexec_inherited();
    // PID 1 must never exit (the kernel panics): the kernel passes stray
    // command-line words to init, so a parse error there means defaults.
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if pid1 => {
            tracing::error!("arguments: {e}; going on with the defaults");
            Args::parse_from(["cellhost-agent"])
        }
        Err(e) => e.exit(),
    };
    init::setup(pid1);
    let modules = args
        .modules
        .clone()
        .or_else(|| pid1.then(|| PathBuf::from(init::MODULES_LIST)));
    if let Some(list) = modules {
        let n = init::load_modules(&list);
        tracing::info!("loaded {n} kernel modules from {}", list.display());
    }

    let mut config = Config::new(&args.state_dir);
    config.secrets_dir = args.secrets_dir.clone();
    config.file_roots = args.file_roots.clone();
    config.exec = !args.no_exec;
    config.configure_net = args.configure_net;
    config.resolv_dir = args.resolv_dir.clone();
    let agent = match Agent::new(config) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            return fail(
                pid1,
                &format!("state dir {}: {e}", args.state_dir.display()),
            );
        }
    };
    let on_shutdown: serve::OnShutdown = {
        let agent = agent.clone();
        Arc::new(move || {
            tracing::info!("shutdown requested");
            if agent.is_pid1() {
                init::poweroff();
            }
            agent.kill_main();
            std::process::exit(0);
        })
    };

    if args.stdio {
        if !args.command.is_empty() {
            agent.start_main(&args.command);
        }
        let stdin = std::io::stdin().lock();
        let stdout = std::io::stdout().lock();
        return match serve::serve_stream(&agent, stdin, stdout) {
            Ok(agent::Control::Shutdown) => {
                on_shutdown();
                ExitCode::SUCCESS
            }
            Ok(agent::Control::Continue) if pid1 => {
                tracing::info!("stdin ended");
                init::poweroff()
            }
            Ok(agent::Control::Continue) => ExitCode::SUCCESS,
            Err(e) => fail(pid1, &format!("stdio: {e}")),
        };
    }

    // Bind here, so a failure is known before the main command starts and
    // the command starts only once the agent listens.
    let mut listeners: Vec<std::thread::JoinHandle<()>> = Vec::new();
    if let Some(path) = args.unix.clone() {
        match serve::bind_unix(&path) {
            Ok(l) => {
                tracing::info!("listening on unix:{}", path.display());
                let (a, s) = (agent.clone(), on_shutdown.clone());
                listeners.push(std::thread::spawn(move || serve::listen_unix(a, l, s)));
            }
            Err(e) => tracing::error!("unix socket {}: {e}", path.display()),
        }
    }
    if let Some(name) = args.virtio_port.clone() {
        let (a, s) = (agent.clone(), on_shutdown.clone());
        listeners.push(std::thread::spawn(move || {
            serve::serve_virtio_port(a, &name, s)
        }));
    }
    let vsock_port = match args.vsock_port {
        Some(p) => Some(p),
        None if args.unix.is_none() && args.virtio_port.is_none() => Some(5555),
        None => None,
    };
    if let Some(port) = vsock_port {
        match serve::bind_vsock(port) {
            Ok(l) => {
                tracing::info!("listening on vsock port {port}");
                let (a, s) = (agent.clone(), on_shutdown.clone());
                listeners.push(std::thread::spawn(move || serve::listen_vsock(a, l, s)));
            }
            Err(e) => tracing::error!("vsock port {port}: {e}"),
        }
    }
    if listeners.is_empty() {
        return fail(pid1, "no listener could start");
    }
    if !args.command.is_empty() {
        agent.start_main(&args.command);
    }
    // Listeners run forever; a thread that ends did so by panicking.
    for l in listeners {
        let _ = l.join();
    }
    fail(pid1, "a listener stopped")
}

/// Exit with an error — or, as PID 1 (whose exit panics the kernel),
/// power off.
fn fail(pid1: bool, msg: &str) -> ExitCode {
    tracing::error!("{msg}");
    if pid1 {
        init::poweroff();
    }
    ExitCode::FAILURE
}
