//! The `latest` pointer (stitch's format): `SRC/latest` holds one line naming the newest
//! published version directory relative to `SRC`: `weight_v000007\n`, or with a run id
//! `RUN_ID/weight_v000007\n`. Moves follow git's `update-ref`: `latest.lock` with O_EXCL,
//! compare with the expected old value, write, fsync, rename, fsync the directory. A pointer
//! that does not parse is an error, never a silent fallback to the base model.

use crate::error::{Error, Result};
use crate::fsio::{RefLock, REF_LOCK_TIMEOUT};
use crate::version::{is_valid_run_id, parse_version_dir_name, version_dir_name, VersionDir};
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// File name of the pointer inside the publish root.
pub const POINTER_NAME: &str = "latest";
/// Refuse pointer files larger than this.
pub const MAX_POINTER_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pointer {
    pub run_id: Option<String>,
    pub version: u64,
}

impl Pointer {
    /// Parse the pointer text: one line, optional trailing newline (and other trailing
    /// whitespace), `weight_vNNNNNN` or `RUN_ID/weight_vNNNNNN`.
    pub fn parse(text: &str) -> Option<Pointer> {
        let line = text.trim_end();
        if line.is_empty() || line.contains('\n') || line.len() > MAX_POINTER_BYTES {
            return None;
        }
        let (run_id, dir) = match line.split_once('/') {
            Some((run, dir)) if is_valid_run_id(run) => (Some(run.to_string()), dir),
            Some(_) => return None,
            None => (None, line),
        };
        Some(Pointer { run_id, version: parse_version_dir_name(dir)? })
    }

    /// Parse a version given on the command line: `7`, `weight_v000007` or `RUN/weight_v000007`.
    pub fn parse_arg(arg: &str, run_id: Option<&str>) -> Option<Pointer> {
        if let Some(v) = crate::version::parse_version_str(arg) {
            return Some(Pointer { run_id: run_id.map(str::to_string), version: v });
        }
        let p = Pointer::parse(arg)?;
        match (run_id, &p.run_id) {
            (Some(r), None) => Some(Pointer { run_id: Some(r.to_string()), version: p.version }),
            (Some(r), Some(pr)) if r != pr => None,
            _ => Some(p),
        }
    }

    /// The directory holding this run's versions.
    pub fn root(&self, src: &Path) -> PathBuf {
        match &self.run_id {
            Some(r) => src.join(r),
            None => src.to_path_buf(),
        }
    }

    pub fn version_path(&self, src: &Path) -> PathBuf {
        self.root(src).join(version_dir_name(self.version))
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.run_id {
            Some(r) => write!(f, "{r}/{}", version_dir_name(self.version)),
            None => f.write_str(&version_dir_name(self.version)),
        }
    }
}

fn parse_file(path: &Path, text: &str) -> Result<Pointer> {
    Pointer::parse(text).ok_or_else(|| {
        let shown: String = text.chars().take(80).collect();
        Error::bad_input(path, format!("unparseable pointer {shown:?}: expected `weight_vNNNNNN` or `RUN_ID/weight_vNNNNNN`"))
    })
}

/// Read `SRC/latest`; `Ok(None)` if no pointer has been written yet.
pub fn read_latest(src: &Path) -> Result<Option<Pointer>> {
    let path = src.join(POINTER_NAME);
    let read = std::fs::File::open(&path).and_then(|f| {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_POINTER_BYTES as u64 + 1), &mut bytes).map(|_| bytes)
    });
    match read {
        Ok(bytes) if bytes.len() > MAX_POINTER_BYTES => Err(Error::bad_input(&path, format!("over {MAX_POINTER_BYTES} bytes: not a weight pointer"))),
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|_| Error::bad_input(&path, "pointer is not UTF-8"))?;
            parse_file(&path, &text).map(Some)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// What the caller expects the pointer to hold before the move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No check (still refuses to move backwards within a run).
    Any,
    /// No pointer yet.
    Absent,
    Is(Pointer),
}

#[derive(Debug, Clone, Serialize)]
pub struct AdvanceReport {
    pub previous: Option<String>,
    pub current: String,
    pub changed: bool,
}

/// Check that a version and the chain below it are there and complete.
pub fn check_publishable(src: &Path, target: &Pointer) -> Result<()> {
    let root = target.root(src);
    let v = VersionDir::open(&root, target.version)?;
    v.validate_files()?;
    // The chain of bases must exist down to a full version or the engine's base (0), or a
    // fresh host could never reach this version.
    let mut cur = v;
    while let Some(d) = cur.delta() {
        if d.base_version == 0 {
            break;
        }
        let base = d.base_version;
        cur = VersionDir::open(&root, base).map_err(|e| match e {
            Error::NotFound { .. } | Error::Conflict { .. } => Error::conflict(&cur.path, format!("its base version {base} is missing or incomplete: {e}")),
            other => other,
        })?;
    }
    Ok(())
}

/// Move `SRC/latest` to `target` (compare-and-advance).
pub fn advance(src: &Path, target: &Pointer, expect: &Expect) -> Result<AdvanceReport> {
    check_publishable(src, target)?;
    let path = src.join(POINTER_NAME);
    let lock = RefLock::acquire(&path, REF_LOCK_TIMEOUT)?;
    let current = match lock.read_current()? {
        Some(text) => Some(parse_file(&path, &text)?),
        None => None,
    };
    match (expect, &current) {
        (Expect::Any, _) => {}
        (Expect::Absent, None) => {}
        (Expect::Is(e), Some(c)) if e == c => {}
        (_, c) => {
            let found = c.as_ref().map_or("no pointer".to_string(), |p| p.to_string());
            let wanted = match expect {
                Expect::Absent => "no pointer".to_string(),
                Expect::Is(p) => p.to_string(),
                Expect::Any => unreachable!(),
            };
            return Err(Error::conflict(&path, format!("expected {wanted}, found {found}: another publisher moved it")));
        }
    }
    if let Some(c) = &current {
        if c.run_id == target.run_id {
            if target.version < c.version {
                return Err(Error::conflict(&path, format!("refusing to move backwards from {c} to {target} within a run")));
            }
            if target.version == c.version {
                return Ok(AdvanceReport { previous: Some(c.to_string()), current: target.to_string(), changed: false });
            }
        }
    }
    lock.commit(format!("{target}\n").as_bytes())?;
    Ok(AdvanceReport { previous: current.map(|c| c.to_string()), current: target.to_string(), changed: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        assert_eq!(Pointer::parse("weight_v000007\n"), Some(Pointer { run_id: None, version: 7 }));
        assert_eq!(Pointer::parse("run-a/weight_v000012"), Some(Pointer { run_id: Some("run-a".into()), version: 12 }));
        assert_eq!(Pointer::parse("weight_v1234567\n"), Some(Pointer { run_id: None, version: 1234567 }));
        for bad in ["", "\n", "weight_v7", "weight_v00000x", "../weight_v000001", "a/b/weight_v000001", "weight_v000001\nweight_v000002", "latest"] {
            assert_eq!(Pointer::parse(bad), None, "{bad:?}");
        }
        let p = Pointer { run_id: Some("r1".into()), version: 3 };
        assert_eq!(Pointer::parse(&p.to_string()), Some(p));
    }
}
