//! `cellhost bench`: placeholder until the process bench lands.
use std::path::Path;

use crate::cli::BenchArgs;

pub async fn bench(_state_dir: &Path, _args: BenchArgs, _json: bool) -> anyhow::Result<u8> {
    anyhow::bail!("bench: not yet")
}
