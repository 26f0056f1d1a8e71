//! One error type for the whole toolkit, and the one table that maps it to exit codes.
//!
//! Every module has its own error enum naming the ways its inputs can be wrong; they all
//! convert into [`Error`], whose [`Error::exit_code`] is the single source of the exit
//! codes documented in `docs/FORMATS.md` ("Exit codes"). Binaries call [`run_main`], which
//! prints `PROGRAM: error: MESSAGE` on stderr and exits with that code.

use std::fmt;
use std::path::{Path, PathBuf};

/// Exit codes shared by every binary. Keep in sync with `docs/FORMATS.md` (a test checks).
pub mod exit {
    pub const OK: i32 = 0;
    /// A bug or an unexpected condition (never on bad input).
    pub const INTERNAL: i32 = 1;
    /// Bad command line (clap uses 2 as well).
    pub const USAGE: i32 = 2;
    /// An input file or directory is malformed: not safetensors, bad header, bad index, bad pointer.
    pub const BAD_INPUT: i32 = 3;
    /// Two checkpoints cannot be compared: tensor sets, shapes or dtypes differ.
    pub const INCOMPATIBLE: i32 = 4;
    /// The operation conflicts with what is on disk: version exists, pointer moved, backwards move,
    /// incomplete version, delta base mismatch, a ref producer that failed, a closed stream.
    pub const CONFLICT: i32 = 5;
    /// Something that must exist does not: version directory, tensor, base checkpoint.
    pub const NOT_FOUND: i32 = 6;
    /// Bytes do not match their checksum (or their content sample).
    pub const CHECKSUM: i32 = 7;
    /// A user hook (post-write, pre-read, reload) failed.
    pub const HOOK: i32 = 8;
    /// A lock could not be taken in time, or a channel tail timed out with no live producer.
    pub const LOCKED: i32 = 9;
    /// An operating-system I/O error (disk full, permission denied, ...), or the store quota.
    pub const IO: i32 = 10;
    /// Stopped at a clean point by SIGINT / SIGTERM (128 + the signal, the shell's convention).
    pub const SIGINT: i32 = 128 + 2;
    pub const SIGTERM: i32 = 128 + 15;

    /// (code, name) for every documented code, for docs conformance tests.
    pub const TABLE: &[(i32, &str)] = &[
        (OK, "ok"),
        (INTERNAL, "internal"),
        (USAGE, "usage"),
        (BAD_INPUT, "bad-input"),
        (INCOMPATIBLE, "incompatible"),
        (CONFLICT, "conflict"),
        (NOT_FOUND, "not-found"),
        (CHECKSUM, "checksum"),
        (HOOK, "hook"),
        (LOCKED, "locked"),
        (IO, "io"),
        (SIGINT, "sigint"),
        (SIGTERM, "sigterm"),
    ];
}

/// What went wrong, with the path it went wrong on where there is one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    BadInput { path: PathBuf, reason: String },
    #[error("{0}")]
    Incompatible(String),
    #[error("{path}: {reason}")]
    Conflict { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    NotFound { path: PathBuf, reason: String },
    #[error("{path}: checksum mismatch for tensor {tensor:?}: expected {expected}, got {actual}{note}")]
    Checksum { path: PathBuf, tensor: String, expected: String, actual: String, note: String },
    /// Weights whose content sample (docs/FORMATS.md §4) is not the one recorded for them: a
    /// seed or patched LOCAL, or a full version's files, that do not hold what was published.
    #[error("{path}: {reason}")]
    Content { path: PathBuf, reason: String },
    #[error("hook `{command}` failed: {reason}")]
    Hook { command: String, reason: String },
    #[error("{path}: lock busy: {reason}")]
    Locked { path: PathBuf, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("stopped by {} at a safe point (docs/FORMATS.md §8)", crate::stop::signal_name(*signal))]
    Interrupted { signal: i32 },
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Io { .. } => exit::IO,
            Error::BadInput { .. } => exit::BAD_INPUT,
            Error::Incompatible(_) => exit::INCOMPATIBLE,
            Error::Conflict { .. } => exit::CONFLICT,
            Error::NotFound { .. } => exit::NOT_FOUND,
            Error::Checksum { .. } | Error::Content { .. } => exit::CHECKSUM,
            Error::Hook { .. } => exit::HOOK,
            Error::Locked { .. } => exit::LOCKED,
            Error::Usage(_) => exit::USAGE,
            Error::Internal(_) => exit::INTERNAL,
            Error::Interrupted { signal } => 128 + signal,
        }
    }

    pub fn bad_input(path: impl AsRef<Path>, reason: impl fmt::Display) -> Self {
        Error::BadInput { path: path.as_ref().to_path_buf(), reason: reason.to_string() }
    }
    pub fn conflict(path: impl AsRef<Path>, reason: impl fmt::Display) -> Self {
        Error::Conflict { path: path.as_ref().to_path_buf(), reason: reason.to_string() }
    }
    pub fn not_found(path: impl AsRef<Path>, reason: impl fmt::Display) -> Self {
        Error::NotFound { path: path.as_ref().to_path_buf(), reason: reason.to_string() }
    }
    /// An I/O error on `path`; a missing file becomes [`Error::NotFound`] so callers get exit 6.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        let path = path.as_ref().to_path_buf();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path, reason: "no such file or directory".into() }
        } else {
            Error::Io { path, source }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path to an `io::Result`, the way coreutils' `map_err_context` does.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

/// The one place that prints errors and exits: binaries call this with their library entry point
/// (after raising the open-file limit, [`crate::fsio::raise_open_file_limit`], and installing
/// the handler that reports a SIGBUS on an input map as an error, [`crate::inputmap::guard_sigbus`]).
pub fn run_main(program: &'static str, f: impl FnOnce() -> Result<()>) -> ! {
    crate::fsio::raise_open_file_limit();
    crate::inputmap::guard_sigbus(program);
    match f() {
        Ok(()) => std::process::exit(exit::OK),
        Err(e) => {
            eprintln!("{program}: error: {e}");
            std::process::exit(e.exit_code())
        }
    }
}
