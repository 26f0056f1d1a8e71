//! Staleness: read the weight plane's `latest` pointer and decide whether a ref is too old.
//!
//! A ref is stale when its oldest weight version ([`SampleRef::oldest_weight_version`]) is
//! below `latest - K`; refs without a version are never stale.

use super::sample_ref::SampleRef;
use crate::error::{Error, Result};
use crate::pointer::{read_latest, POINTER_NAME};
use std::path::Path;

/// The version `SRC/latest` points at (the weight plane's own parser). Missing pointer: not
/// found (6); malformed: bad input (3).
pub fn read_latest_version(src: &Path) -> Result<u64> {
    read_latest(src)?.map(|p| p.version).ok_or_else(|| Error::not_found(src.join(POINTER_NAME), "no weight pointer has been published; staleness needs one"))
}

/// True when `r` was generated with weights older than `latest - max_staleness`.
pub fn is_stale(r: &SampleRef, latest: u64, max_staleness: u64) -> bool {
    is_stale_version(r.oldest_weight_version(), latest, max_staleness)
}

/// [`is_stale`] of a ref whose oldest weight version is `oldest` (None: unversioned).
pub fn is_stale_version(oldest: Option<u64>, latest: u64, max_staleness: u64) -> bool {
    match oldest {
        Some(v) => v < latest.saturating_sub(max_staleness),
        None => false,
    }
}
