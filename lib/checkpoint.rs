//! Hugging Face safetensors checkpoints: one validated parser for files we did not write.
//!
//! Files on a shared directory are untrusted. Every header goes through the `safetensors`
//! crate's validator (header size cap, UTF-8, JSON, offsets contiguous from 0, no overflow in
//! shape × dtype, data ending exactly at the end of the file) before any offset is used, and
//! index files are checked here: `weight_map` values must be plain file names inside the
//! checkpoint directory, every listed tensor must exist in the file named, and no tensor may
//! appear twice.

use crate::error::{Error, IoContext, Result};
use crate::inputmap::InputMap;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Name of the sharded-checkpoint index (also the commit marker of a weight version).
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint.
pub const SINGLE_NAME: &str = "model.safetensors";
/// Refuse index files larger than this (a 1T-parameter model's index is a few MB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// The bytes that start every safetensors file we write: the `u64` LE header length, then the
/// header JSON padded with spaces so the data starts 8-byte aligned (docs/FORMATS.md §2).
pub fn header_bytes(header: &Value) -> Vec<u8> {
    header_frame(serde_json::to_vec(header).expect("JSON of plain values"))
}

/// A header's JSON text as [`header_bytes`] frames it: padded with spaces to a multiple of 8,
/// behind its u64 LE length.
pub fn header_frame(mut json: Vec<u8>) -> Vec<u8> {
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// [`header_bytes`]' output padded with more spaces to exactly `total` bytes (length prefix
/// included), for a writer that reserved room for the header before knowing it; `None` if it
/// does not fit or `total` is not a multiple of 8.
pub fn pad_header_bytes(mut head: Vec<u8>, total: usize) -> Option<Vec<u8>> {
    if !total.is_multiple_of(8) || head.len() > total {
        return None;
    }
    head.resize(total, b' ');
    head[..8].copy_from_slice(&(total as u64 - 8).to_le_bytes());
    Some(head)
}

/// [`Checkpoint::content_sample`] reads this many windows of each tensor larger than all of them
/// together, spread evenly from its first byte to its last, of [`SAMPLE_WINDOW`] bytes each.
pub const SAMPLE_WINDOWS: usize = 4;
pub const SAMPLE_WINDOW: usize = 1024;

/// One tensor of a safetensors file: where its bytes are, and what they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    /// safetensors dtype name, e.g. `BF16`, `F32`, `U8`.
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: usize,
    pub len: usize,
}

/// A validated, memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    /// Kept open for [`Self::input`]: the diff may read tensors with pread (codec::PreadPair).
    file: File,
    map: InputMap,
    /// Bytes of the header JSON, after the 8-byte length.
    header_len: usize,
    /// Tensors in data order.
    tensors: Vec<TensorEntry>,
    /// Tensor name → its position in `tensors`: MoE checkpoints hold tens of thousands of
    /// tensors per file, and every tool looks each of them up.
    by_name: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).at(&path)?;
        let len = file.metadata().at(&path)?.len();
        if len < 8 {
            return Err(Error::bad_input(&path, format!("not a safetensors file: {len} bytes, shorter than the 8-byte header length")));
        }
        let mut map = InputMap::new(&file, &path).at(&path)?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| Error::bad_input(&path, format!("not a valid safetensors file: {e}")))?;
        let data_start = 8 + header_len;
        map.set_data_start(data_start);
        let mut tensors: Vec<TensorEntry> = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| TensorEntry {
                name,
                dtype: info.dtype.to_string(),
                shape: info.shape.clone(),
                offset: data_start + info.data_offsets.0,
                len: info.data_offsets.1 - info.data_offsets.0,
            })
            .collect();
        tensors.sort_by_key(|t| t.offset);
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(SafetensorsFile { path, file, map, header_len, tensors, by_name, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The header JSON as it is in the file (validated), without the 8-byte length.
    pub fn header(&self) -> &[u8] {
        &self.map[8..8 + self.header_len]
    }
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// The bytes of a tensor of this file (offsets were validated against the file length).
    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.map[t.offset..t.offset + t.len]
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
    /// A tensor of this file as the encoders take it: mapped, and where it lies in the file.
    pub fn input<'a>(&'a self, t: &'a TensorEntry) -> crate::codec::TensorFile<'a> {
        crate::codec::TensorFile { mapped: self.bytes(t), map: Some(&self.map), file: &self.file, path: &self.path, offset: t.offset as u64 }
    }
    /// The file's map and the open file (for [`crate::inputmap::probe_reads`]).
    pub fn map(&self) -> &InputMap {
        &self.map
    }
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Where a tensor of a [`Checkpoint`] lives.
#[derive(Debug, Clone, Copy)]
pub struct TensorLoc {
    pub file: usize,
    pub entry: usize,
}

/// An HF checkpoint: a single `.safetensors` file, or a directory with `model.safetensors`, or
/// shards listed by `model.safetensors.index.json`.
pub struct Checkpoint {
    root: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Parsed index, if the checkpoint has one.
    index: Option<IndexFile>,
    by_name: BTreeMap<String, TensorLoc>,
    /// Opened from a directory, not from a lone `.safetensors` file given by path.
    is_dir: bool,
}

/// Names of the plain files of a checkpoint directory, sorted: regular files, and symbolic links
/// to regular files, which is how the Hugging Face hub cache lays out a snapshot (every file a
/// link into `blobs/`); they are read through the link, and copies of them are regular files.
/// A link to nothing (a download cut short) is an error naming it, not a file left out: a
/// checkpoint copied without its `config.json` would not load.
pub fn plain_files(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).at(dir)? {
        let e = e.at(dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_plain_file_name(&name) {
            continue;
        }
        let kind = e.file_type().at(e.path())?;
        if crate::fsio::regular_file_through_links(&e.path(), kind)?.is_some() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// A parsed `model.safetensors.index.json`.
#[derive(Debug, Clone)]
pub struct IndexFile {
    pub metadata: Map<String, Value>,
    /// tensor name → file name, in the order of the file.
    pub weight_map: Vec<(String, String)>,
}

/// True for a file name that stays inside its directory (no separators, not `.`/`..`, not hidden).
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.contains('\\') && !name.starts_with('.') && !name.contains('\0')
}

impl IndexFile {
    pub fn read(path: &Path) -> Result<Self> {
        Self::parse(path, &Self::read_text(path)?)
    }

    /// The index file's bytes, refused past [`MAX_INDEX_BYTES`].
    pub fn read_text(path: &Path) -> Result<Vec<u8>> {
        let meta = std::fs::metadata(path).at(path)?;
        if meta.len() > MAX_INDEX_BYTES {
            return Err(Error::bad_input(path, format!("index is {} bytes, over the {MAX_INDEX_BYTES}-byte cap", meta.len())));
        }
        std::fs::read(path).at(path)
    }

    pub fn parse(path: &Path, text: &[u8]) -> Result<Self> {
        let v: Value = serde_json::from_slice(text).map_err(|e| Error::bad_input(path, format!("index is not valid JSON: {e}")))?;
        let Value::Object(mut obj) = v else {
            return Err(Error::bad_input(path, "index is not a JSON object"));
        };
        let metadata = match obj.remove("metadata") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(Error::bad_input(path, "index `metadata` is not an object")),
        };
        let Some(Value::Object(wm)) = obj.remove("weight_map") else {
            return Err(Error::bad_input(path, "index has no `weight_map` object"));
        };
        let mut weight_map = Vec::with_capacity(wm.len());
        for (name, file) in wm {
            let Value::String(file) = file else {
                return Err(Error::bad_input(path, format!("weight_map entry {name:?} is not a string")));
            };
            if !is_plain_file_name(&file) {
                return Err(Error::bad_input(path, format!("weight_map entry {name:?} names {file:?}, which is not a plain file name in the checkpoint directory")));
            }
            weight_map.push((name, file));
        }
        Ok(IndexFile { metadata, weight_map })
    }

    /// Distinct file names, in first-mention order.
    pub fn files(&self) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        self.weight_map.iter().filter(|(_, f)| seen.insert(f.clone())).map(|(_, f)| f.clone()).collect()
    }

    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }
}

impl Checkpoint {
    /// Open and validate a checkpoint; `path` is a directory or a single `.safetensors` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).at(path)?;
        if meta.is_file() {
            let root = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Self::from_files(root, None, vec![SafetensorsFile::open(path)?], false);
        }
        let index_path = path.join(INDEX_NAME);
        if index_path.exists() {
            let index = IndexFile::read(&index_path)?;
            let files = index.files().iter().map(|f| SafetensorsFile::open(path.join(f))).collect::<Result<Vec<_>>>()?;
            return Self::from_files(path.to_path_buf(), Some(index), files, true);
        }
        let single = path.join(SINGLE_NAME);
        if single.exists() {
            return Self::from_files(path.to_path_buf(), None, vec![SafetensorsFile::open(&single)?], true);
        }
        let names: Vec<String> = plain_files(path)?.into_iter().filter(|n| n.ends_with(".safetensors")).collect();
        if names.is_empty() {
            return Err(Error::not_found(path, format!("no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors file: not a checkpoint directory")));
        }
        let files = names.iter().map(|n| SafetensorsFile::open(path.join(n))).collect::<Result<Vec<_>>>()?;
        Self::from_files(path.to_path_buf(), None, files, true)
    }

    fn from_files(root: PathBuf, index: Option<IndexFile>, files: Vec<SafetensorsFile>, is_dir: bool) -> Result<Self> {
        let mut by_name = BTreeMap::new();
        for (fi, f) in files.iter().enumerate() {
            for (ei, t) in f.tensors.iter().enumerate() {
                if by_name.insert(t.name.clone(), TensorLoc { file: fi, entry: ei }).is_some() {
                    return Err(Error::bad_input(f.path(), format!("tensor {:?} appears in more than one file of the checkpoint", t.name)));
                }
            }
        }
        if let Some(index) = &index {
            let index_path = root.join(INDEX_NAME);
            for (name, file) in &index.weight_map {
                match by_name.get(name) {
                    Some(loc) if files[loc.file].path().file_name().is_some_and(|n| n == file.as_str()) => {}
                    Some(loc) => return Err(Error::bad_input(&index_path, format!("index puts tensor {name:?} in {file}, but it is in {}", files[loc.file].path().display()))),
                    None => return Err(Error::bad_input(&index_path, format!("index lists tensor {name:?} in {file}, which does not hold it"))),
                }
            }
            if index.weight_map.len() != by_name.len() {
                return Err(Error::bad_input(&index_path, format!("index lists {} tensors but its files hold {}", index.weight_map.len(), by_name.len())));
            }
        }
        Ok(Checkpoint { root, files, index, by_name, is_dir })
    }

    /// The plain files of the checkpoint's directory besides its data files and index: config,
    /// generation config, tokenizer, chat template. A full version carries them along; none for
    /// a checkpoint opened from a lone file.
    pub fn ride_along_files(&self) -> Result<Vec<String>> {
        if !self.is_dir {
            return Ok(Vec::new());
        }
        let data: Vec<&std::ffi::OsStr> = self.files.iter().filter_map(|f| f.path().file_name()).collect();
        let mut names = plain_files(&self.root)?;
        names.retain(|n| n != INDEX_NAME && !data.iter().any(|d| *d == n.as_str()));
        Ok(names)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Opened from a directory (else from a lone `.safetensors` file, whose directory is `root`).
    pub fn is_dir(&self) -> bool {
        self.is_dir
    }
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }
    pub fn index(&self) -> Option<&IndexFile> {
        self.index.as_ref()
    }
    pub fn len(&self) -> usize {
        self.by_name.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
    /// Tensor names in sorted order with their locations.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, TensorLoc)> {
        self.by_name.iter().map(|(n, l)| (n.as_str(), *l))
    }
    pub fn get(&self, name: &str) -> Option<(&SafetensorsFile, &TensorEntry)> {
        self.by_name.get(name).map(|l| {
            let f = &self.files[l.file];
            (f, &f.tensors[l.entry])
        })
    }
    pub fn loc(&self, name: &str) -> Option<TensorLoc> {
        self.by_name.get(name).copied()
    }
    pub fn entry(&self, loc: TensorLoc) -> (&SafetensorsFile, &TensorEntry) {
        let f = &self.files[loc.file];
        (f, &f.tensors[loc.entry])
    }
    /// Sum of tensor byte lengths.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().flat_map(|f| f.tensors.iter()).map(|t| t.len as u64).sum()
    }

    /// The checkpoint's content sample (docs/FORMATS.md §4, "Content sample"): a cheap identity
    /// of its weights, read from at most 4 KiB per tensor. `delta-diff` records it for OLD
    /// (`base_sample`) and NEW (`sample`), so a trainer diffing against the wrong OLD, and a
    /// host whose LOCAL or `--base` holds other weights than a delta was made against, are
    /// refused before a byte is patched, and a chain applied folded is checked end to end,
    /// tensors it never touched included. A real RL step changes ~1 % of the elements of
    /// nearly every tensor, so four 1 KiB windows per tensor tell consecutive versions apart.
    pub fn content_sample(&self) -> String {
        let mut h = crate::checksum::PartHasher::default();
        for (name, loc) in &self.by_name {
            let (f, t) = self.entry(*loc);
            let bytes = f.bytes(t);
            h.part(name.as_bytes());
            h.part(t.dtype.as_bytes());
            h.part(&(t.len as u64).to_le_bytes());
            if bytes.len() <= SAMPLE_WINDOWS * SAMPLE_WINDOW {
                h.part(bytes);
            } else {
                let span = (bytes.len() - SAMPLE_WINDOW) as u128;
                let at = |i: usize| (i as u128 * span / (SAMPLE_WINDOWS as u128 - 1)) as usize;
                let windows: Vec<&[u8]> = (0..SAMPLE_WINDOWS).map(|i| &bytes[at(i)..at(i) + SAMPLE_WINDOW]).collect();
                h.part_of(&windows);
            }
        }
        h.finish_hex()
    }
}
