//! Small argument helpers the binaries share (their `main`s stay argument parsing only).

use crate::error::Error;
use std::time::Duration;

/// A `--FLAG S` seconds value as a Duration; NaN, negative or huge values are a usage error.
pub fn seconds(flag: &str, s: f64) -> Result<Duration, Error> {
    Duration::try_from_secs_f64(s).map_err(|_| Error::Usage(format!("--{flag} {s}: expected a number of seconds >= 0")))
}
