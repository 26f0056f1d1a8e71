//! Weight versions on the shared directory, in slime's layout (docs/FORMATS.md, "Weight versions").
//!
//! `SRC/weight_v{N:06d}/` is either a full HF checkpoint or a delta against `base_version`; a
//! version is a delta iff its index `metadata` has `delta_encoding`. The index is written last
//! and is the version's commit marker: a directory without it is incomplete.

use crate::checkpoint::{is_plain_file_name, IndexFile, SafetensorsFile, INDEX_NAME, SINGLE_NAME};
use crate::checksum::ChecksumAlg;
use crate::error::{Error, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Written first into a version directory by `delta-diff` and removed after the index: a
/// directory holding it and no index is an interrupted publish, even if it already holds a
/// whole `model.safetensors`.
pub const INCOMPLETE_MARKER: &str = ".incomplete";

/// Prefix of every version directory name.
pub const VERSION_PREFIX: &str = "weight_v";

/// `weight_v000007` for 7 (more digits past 999999, as Python's `{:06d}` prints).
pub fn version_dir_name(n: u64) -> String {
    format!("{VERSION_PREFIX}{n:06}")
}

/// The 6-digit text form used in index metadata and `state.json` (`"000007"`).
pub fn version_str(n: u64) -> String {
    format!("{n:06}")
}

/// Parse `"000007"` (at least one digit, decimal only).
pub fn parse_version_str(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parse `weight_v000007` (6 or more digits).
pub fn parse_version_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(VERSION_PREFIX)?;
    if digits.len() < 6 {
        return None;
    }
    parse_version_str(digits)
}

/// How a delta payload turns old bytes into new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// new ⊕ old over the whole tensor.
    #[default]
    Xor,
    /// u32 LE count, count u32 LE byte positions, count new byte values.
    Overwrite,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Xor => "xor",
            Encoding::Overwrite => "overwrite",
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "xor" => Ok(Encoding::Xor),
            "overwrite" => Ok(Encoding::Overwrite),
            _ => Err(format!("unknown delta encoding {s:?} (expected xor or overwrite)")),
        }
    }
}

/// The delta-specific part of a version's index metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaMeta {
    pub base_version: u64,
    pub encoding: Encoding,
    pub checksum: ChecksumAlg,
    /// Content sample of the checkpoint the delta was made against (`base_sample`, written by
    /// disagg; absent from slime's deltas): what LOCAL must hold before it is patched.
    pub base_sample: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionKind {
    Full,
    Delta(DeltaMeta),
}

/// A weight version directory whose index has been read and checked.
#[derive(Debug, Clone)]
pub struct VersionDir {
    pub number: u64,
    pub path: PathBuf,
    pub kind: VersionKind,
    /// None only for a full version written by another tool as a lone `model.safetensors`.
    pub index: Option<IndexFile>,
    /// The index file's bytes as read (for [`Self::fingerprint`]).
    index_text: Option<Vec<u8>>,
}

impl VersionDir {
    /// Read `ROOT/weight_v{N}`'s index and check its metadata. Does not open the data files
    /// (see [`VersionDir::validate_files`]).
    pub fn open(root: &Path, number: u64) -> Result<Self> {
        let path = root.join(version_dir_name(number));
        if !path.is_dir() {
            return Err(Error::not_found(&path, format!("weight version {number} does not exist")));
        }
        let index_path = path.join(INDEX_NAME);
        if !index_path.exists() {
            if path.join(SINGLE_NAME).exists() && !path.join(INCOMPLETE_MARKER).exists() {
                return Ok(VersionDir { number, path, kind: VersionKind::Full, index: None, index_text: None });
            }
            return Err(Error::conflict(&path, format!("incomplete weight version: no {INDEX_NAME} (its writer has not finished, or crashed)")));
        }
        let text = IndexFile::read_text(&index_path)?;
        let index = IndexFile::parse(&index_path, &text)?;
        let kind = Self::kind_of(&index_path, &index, number)?;
        Ok(VersionDir { number, path, kind, index: Some(index), index_text: Some(text) })
    }

    fn kind_of(index_path: &Path, index: &IndexFile, number: u64) -> Result<VersionKind> {
        let bad = |reason: String| Error::bad_input(index_path, reason);
        Self::sample_key(index_path, index, "sample")?;
        if let Some(v) = index.metadata.get("version") {
            let v = v.as_str().and_then(parse_version_str).ok_or_else(|| bad(format!("metadata.version {v} is not a decimal string")))?;
            if v != number {
                return Err(bad(format!("metadata.version says {v} but the directory is version {number}")));
            }
        }
        let Some(enc) = index.metadata.get("delta_encoding") else {
            return Ok(VersionKind::Full);
        };
        let encoding = enc.as_str().ok_or_else(|| bad("metadata.delta_encoding is not a string".into()))?.parse::<Encoding>().map_err(bad)?;
        let base = index.metadata_str("base_version").ok_or_else(|| bad("delta index has no metadata.base_version string".into()))?;
        let base_version = parse_version_str(base).ok_or_else(|| bad(format!("metadata.base_version {base:?} is not a decimal string")))?;
        if base_version >= number {
            return Err(bad(format!("delta version {number} has base_version {base_version}, which is not older")));
        }
        match index.metadata_str("compression_format") {
            Some("zstd") => {}
            other => return Err(bad(format!("metadata.compression_format is {other:?}; only \"zstd\" is defined"))),
        }
        let checksum = index.metadata_str("checksum_format").ok_or_else(|| bad("delta index has no metadata.checksum_format".into()))?.parse::<ChecksumAlg>().map_err(bad)?;
        let base_sample = Self::sample_key(index_path, index, "base_sample")?;
        Ok(VersionKind::Delta(DeltaMeta { base_version, encoding, checksum, base_sample }))
    }

    /// A content sample key of the index metadata (`sample`, `base_sample`): absent, or 32 hex
    /// digits; anything else is a damaged index.
    fn sample_key(index_path: &Path, index: &IndexFile, key: &str) -> Result<Option<String>> {
        match index.metadata.get(key) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) if crate::checksum::is_xxh3_128_hex(s) => Ok(Some(s.clone())),
            Some(v) => Err(Error::bad_input(index_path, format!("metadata.{key} {v} is not a content sample (32 lowercase hex digits)"))),
        }
    }

    /// The content sample of the checkpoint this version holds ([`crate::checkpoint::Checkpoint::content_sample`]),
    /// as its index records it (`sample`; absent in versions other tools or older disagg wrote).
    pub fn sample(&self) -> Option<&str> {
        self.index.as_ref()?.metadata_str("sample")
    }

    pub fn is_delta(&self) -> bool {
        matches!(self.kind, VersionKind::Delta(_))
    }
    pub fn delta(&self) -> Option<&DeltaMeta> {
        match &self.kind {
            VersionKind::Delta(d) => Some(d),
            VersionKind::Full => None,
        }
    }

    /// What identifies this publication of the version, cheaply (docs/FORMATS.md §6,
    /// "Fingerprint"): xxh3-128 over the index and, for each data file, its name, length and
    /// safetensors header (a delta's headers hold the checksum of every tensor it writes). LOCAL
    /// records it with the version it applied, so a version published again under the same
    /// number with other bytes is not taken for the one LOCAL holds. Content only, no inode or
    /// mtime: a pre-read hook that fetches the same version again gives the same fingerprint.
    /// Of the bytes already read, not read again: the index as [`Self::open`] read it and
    /// `files` as [`Self::validate_files`] returned them, so what is recorded is what was applied
    /// even if the directory is replaced meanwhile.
    pub fn fingerprint(&self, files: &[SafetensorsFile]) -> String {
        use std::os::unix::ffi::OsStrExt;
        let mut h = crate::checksum::PartHasher::default();
        if let Some(text) = &self.index_text {
            h.part(b"index");
            h.part(text);
        }
        for f in files {
            h.part(f.path().file_name().map(|n| n.as_bytes()).unwrap_or_default());
            h.part(&(f.len() as u64).to_le_bytes());
            h.part(f.header());
        }
        h.finish_hex()
    }

    /// Open every data file the index names and validate its header (and, for a delta, that
    /// every listed tensor is there with a well-formed checksum). This is what "complete"
    /// means for `pointer-advance` and what `delta-apply` checks before touching LOCAL.
    pub fn validate_files(&self) -> Result<Vec<SafetensorsFile>> {
        let Some(index) = &self.index else {
            return Ok(vec![SafetensorsFile::open(self.path.join(SINGLE_NAME))?]);
        };
        let names = index.files();
        let files = names.iter().map(|n| SafetensorsFile::open(self.path.join(n))).collect::<Result<Vec<_>>>()?;
        for (tensor, file) in &index.weight_map {
            let fi = names.iter().position(|n| n == file).expect("file listed by files()");
            let f = &files[fi];
            let Some(t) = f.tensor(tensor) else {
                return Err(Error::bad_input(f.path(), format!("index lists tensor {tensor:?} here but the file does not hold it")));
            };
            if let Some(d) = self.delta() {
                if t.dtype != "U8" || t.shape.len() != 1 {
                    return Err(Error::bad_input(f.path(), format!("delta entry {tensor:?} is {} {:?}, expected 1-D U8", t.dtype, t.shape)));
                }
                match f.metadata().get(tensor) {
                    Some(c) if d.checksum.is_valid_hex(c) => {}
                    Some(c) => return Err(Error::bad_input(f.path(), format!("checksum {c:?} of tensor {tensor:?} is not {} hex", d.checksum))),
                    None => return Err(Error::bad_input(f.path(), format!("no checksum for tensor {tensor:?} in __metadata__"))),
                }
            }
        }
        Ok(files)
    }
}

/// Every version number present under `root` (complete or not), ascending.
pub fn list_versions(root: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) => return Err(Error::io(root, e)),
    };
    for e in rd.flatten() {
        if let Some(n) = e.file_name().to_str().and_then(parse_version_dir_name) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// True if `name` may be used as a run id directory (one path component, no dot files).
pub fn is_valid_run_id(name: &str) -> bool {
    is_plain_file_name(name) && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A `--run-id` from the command line: it names a directory under SRC, so anything that is not
/// a valid run id (`../other`, `/tmp/x`, empty) is a usage error, never a path to follow.
pub fn check_run_id_arg(run_id: Option<&str>) -> crate::error::Result<()> {
    match run_id {
        Some(r) if !is_valid_run_id(r) => Err(crate::error::Error::Usage(format!("--run-id {r:?}: use letters, digits, '.', '_' or '-'"))),
        _ => Ok(()),
    }
}
