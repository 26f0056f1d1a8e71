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
    /// Do not wait for LOCAL's new bytes to reach the disk: the version is recorded once they
    /// are in the page cache, which a killed process cannot tear. A reboot can: the mark in
    /// LOCAL/.weight_sync/unsynced.json (with the boot id) makes the next run after one reseed
    /// LOCAL. For LOCAL on ephemeral disks, or where waiting on fsync costs more than a rare
    /// reseed.
    #[arg(long)]
    pub no_fsync: bool,
}

/// `--threads N`, taken by every tool with a parallel stage (`delta-diff`, `delta-apply`,
/// `delta-follow`): the size of the process's worker pool, which encodes, copies and patches
/// that many tensors or files at once. A trainer or an engine on the same host keeps the other
/// cores, and peak memory (a few MiB of buffers per worker) shrinks with it.
#[derive(Debug, Clone, clap::Args)]
pub struct ThreadArgs {
    /// Worker threads (default: RAYON_NUM_THREADS if set, else one per CPU, at most 32).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub threads: Option<u16>,
}

/// The most workers a tool starts unless told otherwise (`--threads`, `RAYON_NUM_THREADS`).
/// Each worker holds a few MiB of buffers (`overwrite` diff: ~3 MiB, measured at 16 and 32
/// threads), so one per CPU on a 128-core trainer node would take ~400 MiB, past the 256 MiB
/// the tools keep to; and 32 workers already read faster than a node's page cache serves.
pub const MAX_DEFAULT_THREADS: usize = 32;

/// The default pool size on a host with `cpus` CPUs.
pub fn default_threads(cpus: usize) -> usize {
    cpus.clamp(1, MAX_DEFAULT_THREADS)
}

impl ThreadArgs {
    /// Size the process-wide worker pool; call once, before any parallel work.
    pub fn install(&self) -> Result<(), Error> {
        // RAYON_NUM_THREADS as rayon reads it: a positive count, else ignored.
        let from_env = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0);
        let n = match (self.threads, from_env) {
            (Some(n), _) => usize::from(n),
            (None, Some(_)) => return Ok(()),
            (None, None) => default_threads(std::thread::available_parallelism().map_or(1, |n| n.get())),
        };
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| Error::Internal(format!("worker pool of {n} threads: {e}")))
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_pool_is_one_worker_per_cpu_up_to_the_cap() {
        use super::{default_threads, MAX_DEFAULT_THREADS};
        assert_eq!(default_threads(0), 1);
        assert_eq!(default_threads(2), 2);
        assert_eq!(default_threads(MAX_DEFAULT_THREADS), MAX_DEFAULT_THREADS);
        assert_eq!(default_threads(128), MAX_DEFAULT_THREADS);
    }
}
