//! Small argument helpers the binaries share (their `main`s stay argument parsing only).

use crate::error::Error;
use std::path::PathBuf;
use std::time::Duration;

/// The arguments every tool that keeps a host-local checkpoint takes (`delta-apply`,
/// `delta-follow`).
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// Host-local checkpoint directory, patched in place (state in LOCAL/.weight_sync/).
    #[arg(long)]
    pub local: PathBuf,
    /// The engine's base checkpoint (version 0).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Publish root holding weight_vNNNNNN directories and `latest`.
    #[arg(long, value_name = "SRC")]
    pub source: PathBuf,
}

/// `--threads N`, taken by every tool with a parallel stage (`delta-diff`, `delta-apply`,
/// `delta-follow`): the size of the process's worker pool, which encodes, copies and patches
/// that many tensors or files at once. A trainer or an engine on the same host keeps the other
/// cores, and peak memory (a few MiB of buffers per worker) shrinks with it.
#[derive(Debug, Clone, clap::Args)]
pub struct ThreadArgs {
    /// Worker threads (default: RAYON_NUM_THREADS if set, else one per CPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub threads: Option<u16>,
}

impl ThreadArgs {
    /// Size the process-wide worker pool; call once, before any parallel work.
    pub fn install(&self) -> Result<(), Error> {
        let Some(n) = self.threads else { return Ok(()) };
        rayon::ThreadPoolBuilder::new().num_threads(n.into()).build_global().map_err(|e| Error::Internal(format!("worker pool of {n} threads: {e}")))
    }
}

/// The size of the worker pool parallel stages run on (reported as `threads` in `--json`).
pub fn worker_threads() -> usize {
    rayon::current_num_threads()
}

/// A `--FLAG S` seconds value as a Duration; NaN, negative or huge values are a usage error.
pub fn seconds(flag: &str, s: f64) -> Result<Duration, Error> {
    Duration::try_from_secs_f64(s).map_err(|_| Error::Usage(format!("--{flag} {s}: expected a number of seconds >= 0")))
}
