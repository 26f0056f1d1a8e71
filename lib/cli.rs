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

/// A `--FLAG S` seconds value as a Duration; NaN, negative or huge values are a usage error.
pub fn seconds(flag: &str, s: f64) -> Result<Duration, Error> {
    Duration::try_from_secs_f64(s).map_err(|_| Error::Usage(format!("--{flag} {s}: expected a number of seconds >= 0")))
}
