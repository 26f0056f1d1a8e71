//! Staleness: read the weight plane's pointer and decide whether a ref is too old.
//!
//! `SRC/latest` holds `weight_vNNNNNN` or `RUN_ID/weight_vNNNNNN` (6 or more digits) and a
//! newline. A ref is stale when its oldest weight version ([`SampleRef::oldest_weight_version`])
//! is below `latest - K`; refs without a version are never stale.

use super::sample_ref::SampleRef;
use crate::error::{Error, IoContext, Result};
use std::path::Path;

/// The pointer is a few bytes; anything longer is not a pointer.
pub const MAX_POINTER_BYTES: u64 = 4096;

/// Parse the text of a `latest` pointer into its version number.
pub fn parse_pointer(text: &str) -> Option<u64> {
    let t = text.trim_end();
    let (run, name) = match t.rsplit_once('/') {
        Some((run, name)) => (Some(run), name),
        None => (None, t),
    };
    if let Some(run) = run {
        if run.is_empty() || !run.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
            return None;
        }
    }
    let digits = name.strip_prefix("weight_v")?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The version `SRC/latest` points at. Missing pointer: not found (6); malformed: bad input (3).
pub fn read_latest_version(src: &Path) -> Result<u64> {
    let path = src.join("latest");
    let meta = std::fs::metadata(&path).at(&path)?;
    if meta.len() > MAX_POINTER_BYTES {
        return Err(Error::bad_input(&path, format!("{} bytes is too long for a weight pointer", meta.len())));
    }
    let text = std::fs::read_to_string(&path).at(&path)?;
    parse_pointer(&text).ok_or_else(|| {
        Error::bad_input(&path, format!("{:?} is not a weight pointer (expected [RUN_ID/]weight_vNNNNNN)", text.trim_end()))
    })
}

/// True when `r` was generated with weights older than `latest - max_staleness`.
pub fn is_stale(r: &SampleRef, latest: u64, max_staleness: u64) -> bool {
    match r.oldest_weight_version() {
        Some(v) => v < latest.saturating_sub(max_staleness),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn pointer_forms() {
        assert_eq!(parse_pointer("weight_v000007\n"), Some(7));
        assert_eq!(parse_pointer("run-1.a/weight_v1234567  \n"), Some(1234567));
        assert_eq!(parse_pointer("weight_v00007"), None);
        assert_eq!(parse_pointer("a/b/weight_v000007"), None);
        assert_eq!(parse_pointer("/weight_v000007"), None);
        assert_eq!(parse_pointer("weight_v00000x7"), None);
    }
}
