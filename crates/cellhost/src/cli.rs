//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cellhost",
    version,
    about = "Rent isolated compute cells: process, container, vm, microvm."
)]
pub struct Cli {
    /// Where cellhost keeps its store and per-cell state.
    #[arg(
        long,
        global = true,
        env = "CELLHOST_STATE_DIR",
        default_value = "/var/lib/cellhost"
    )]
    pub state_dir: PathBuf,
    /// Print data as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// More detail on errors and progress (-vv for debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a cell in the foreground: create, stream output, destroy.
    Run(RunArgs),
    /// Check a cell document and list every problem (exit 3 if invalid).
    Validate {
        /// Cell document (YAML or JSON); `-` for stdin.
        file: PathBuf,
    },
    /// Tell what this host can run, and why not.
    Doctor {
        /// Also boot a probe VM under KVM (takes seconds) to tell whether
        /// /dev/kvm really runs guests.
        #[arg(long)]
        kvm_boot: bool,
    },
    /// Measure the cost of cells against baselines in the same run.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Cell document (YAML or JSON); `-` for stdin.
    pub file: PathBuf,
    /// Owner recorded for the cell.
    #[arg(long, default_value = "local")]
    pub owner: String,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which tier to measure.
    #[arg(value_enum)]
    pub tier: BenchTier,
    /// Number of cells (and baseline runs) to measure.
    #[arg(long, default_value_t = 200)]
    pub cells: usize,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BenchTier {
    Process,
}
