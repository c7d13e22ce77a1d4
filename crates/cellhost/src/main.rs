//! `cellhost`: the command-line front of the cellhost runtime.
//!
//! Thin by design: documents are parsed by `cellhost-spec`, cells are made
//! by the tier crates, state lives in `cellhost-store`. This binary wires
//! them, maps errors to exit codes, and doubles as the per-cell shim
//! (`cellhost __shim`, see `cellhost_process::shim`).
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 usage, 3 invalid document,
//! 4 host lacks a capability the document needs. `cellhost run` exits with
//! the workload's code (128 + signal when it was killed).

mod bench;
mod cli;
mod client;
mod commands;

use commands::{doctor, image, market, remote, run, serve};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

/// An error that carries its exit code. Everything else is code 1.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_INVALID: u8 = 3;
pub const EXIT_CAPABILITY: u8 = 4;

pub fn exit_err(code: u8, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Exit {
        code,
        message: message.into(),
    })
}

fn main() -> ExitCode {
    // The shim must fork before anything starts a thread: handle it first,
    // without clap or a runtime.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "__shim") {
        return shim(&args[2..]);
    }
    if args.get(1).is_some_and(|a| a == "__vmm") {
        return vmm(&args[2..]);
    }
    if args.get(1).is_some_and(|a| a == "__exec") {
        return cellhost_process::exec::exec_main(&args[2..]);
    }
    if args.get(1).is_some_and(|a| a == "__bench-echo") && args.len() == 3 {
        return match bench::guest::echo_server(std::path::Path::new(&args[2])) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cellhost __bench-echo: {e:#}");
                ExitCode::FAILURE
            }
        };
    }

    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_tracing(cli.verbose);
    let verbose = cli.verbose;
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e
                .downcast_ref::<Exit>()
                .map(|x| x.code)
                .unwrap_or(EXIT_RUNTIME);
            if verbose > 0 {
                eprintln!("cellhost: {e:#}");
            } else {
                eprintln!("cellhost: {e}");
            }
            ExitCode::from(code)
        }
    }
}

/// libcontainer and libcgroups warn about every cgroup controller the host
/// lacks; that is `cellhost doctor`'s job, not every command's.
const QUIET_ENGINES: &str = "libcontainer=error,libcgroups=error";

fn init_tracing(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CELLHOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},{QUIET_ENGINES}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn shim(args: &[std::ffi::OsString]) -> ExitCode {
    let cap = args
        .get(2)
        .and_then(|c| c.to_str())
        .and_then(|c| c.parse::<u64>().ok());
    let (Some(dir), Some(id), Some(cap)) = (args.first(), args.get(1), cap) else {
        eprintln!("usage: cellhost __shim <cell-dir> <container-id> <log-cap-bytes>");
        return ExitCode::from(EXIT_USAGE);
    };
    // The shim's stderr is the cell's shim.log (set by the backend). Log
    // through a dup of it, not fd 2: libcontainer's init process logs after
    // it has pointed fd 2 at the cell log, and the workload's log must hold
    // only the workload's output. The dup is close-on-exec.
    if let Ok(fd) = nix::fcntl::fcntl(2, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3)) {
        // SAFETY: `fd` was just returned by F_DUPFD_CLOEXEC, is open, and is
        // owned by nothing else.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
                "warn,{QUIET_ENGINES}"
            )))
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .try_init();
    }
    let code = cellhost_process::shim::main(&PathBuf::from(dir), &id.to_string_lossy(), cap);
    ExitCode::from(code as u8)
}

/// `cellhost __vmm <cell-dir> <log-cap-bytes>`: the qemu tiers' shim.
fn vmm(args: &[std::ffi::OsString]) -> ExitCode {
    let cap = args
        .get(1)
        .and_then(|c| c.to_str())
        .and_then(|c| c.parse::<u64>().ok());
    let (Some(dir), Some(cap)) = (args.first(), cap) else {
        eprintln!("usage: cellhost __vmm <cell-dir> <log-cap-bytes>");
        return ExitCode::from(EXIT_USAGE);
    };
    // stderr is the cell's shim.log (set by the backend).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    ExitCode::from(cellhost_qemu::vmm::main(&PathBuf::from(dir), cap) as u8)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Commands that only read and print die quietly, as Unix tools do, when
/// their reader goes away (`cellhost doctor | head -1`); Rust's runtime
/// ignores SIGPIPE, and `println!` then panics. Not for commands that
/// hold cells, money or a daemon (run, bench, serve, image, market): they
/// must get to their cleanup.
fn die_on_sigpipe() {
    // SAFETY: called before any thread starts, and SIG_DFL installs no
    // handler, so no Rust code runs in signal context.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let state_dir = cli.state_dir.clone();
    match cli.command {
        Command::Run(args) => runtime()?.block_on(run::run(&state_dir, args, cli.json)),
        Command::Validate { file } => {
            die_on_sigpipe();
            run::validate(&file, cli.json)
        }
        Command::Doctor { kvm_boot } => {
            die_on_sigpipe();
            doctor::doctor(&state_dir, kvm_boot, cli.json)
        }
        Command::Bench(b) => runtime()?.block_on(bench::bench(&state_dir, b, cli.json)),
        Command::Serve(args) => runtime()?.block_on(serve::serve(&state_dir, args)),
        Command::Image(cmd) => image::image(&state_dir, cmd, cli.json),
        Command::Market(cmd) => runtime()?.block_on(market::market(cmd, cli.json)),
        cmd => {
            die_on_sigpipe();
            let client = remote::client(&cli.api, cli.token_file.as_deref())?;
            runtime()?.block_on(remote::dispatch(&client, cmd, cli.json))
        }
    }
}
