//! User hooks for object-store-backed shared filesystems: `--post-write-hook` runs after a
//! version's files are written and before anyone is told; `--pre-read-hook` runs before a
//! version is read. Hooks run through `sh -c` with the version in their environment.

use crate::error::{Error, Result};
use std::path::Path;
use std::process::Command;

/// `sh -c COMMAND` for a user's command (hook, reload command), with the open-file limit the
/// tool started with ([`crate::fsio::start_with_original_open_file_limit`]).
pub fn shell(command: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(command);
    crate::fsio::start_with_original_open_file_limit(&mut c);
    c
}

/// Run `command` with `DISAGG_VERSION` (decimal), `DISAGG_VERSION_DIR` and `DISAGG_SOURCE`
/// set; a non-zero exit or a failure to start is [`Error::Hook`] (exit 8).
pub fn run_hook(command: &str, version: u64, version_dir: &Path, source: &Path) -> Result<()> {
    let status = shell(command)
        .env("DISAGG_VERSION", version.to_string())
        .env("DISAGG_VERSION_DIR", version_dir)
        .env("DISAGG_SOURCE", source)
        .status()
        .map_err(|e| Error::Hook { command: command.to_string(), reason: format!("could not start sh: {e}") })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Hook { command: command.to_string(), reason: format!("{status} (version {version}, {})", version_dir.display()) })
    }
}
