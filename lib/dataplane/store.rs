//! FeatureStore: SpecForge's shared-dir store with leases on disk and a byte quota.
//!
//! Layout (specified in `docs/FORMATS.md`, "Feature store"):
//!
//! ```text
//! STORE/objects/<xx>/<sample_id>/generation                     highest generation ever assigned (decimal)
//! STORE/objects/<xx>/<sample_id>/g<gen:08>.safetensors          one object per sample and generation
//! STORE/objects/<xx>/<sample_id>/g<gen:08>.retain               present: keep the object on release
//! STORE/objects/<xx>/<sample_id>/g<gen:08>.lease.<holder>       one lease: {"holder",..,"expires_unix_ms"}
//! ```
//!
//! `<xx>` is the first two hex digits of xxh3-64(sample_id). Objects are plain safetensors files
//! (`safetensors.safe_open` reads them), written with [`fsio::AtomicFile`]. Generations come
//! from the `generation` counter, advanced under a [`fsio::RefLock`] before the object is
//! written, so a generation is never reused even after its object is deleted or a writer crashed.

use crate::error::{Error, IoContext, Result};
use crate::fsio;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const OBJECTS_DIR: &str = "objects";
pub const GENERATION_FILE: &str = "generation";
/// Longest sample id (it is a directory name).
pub const MAX_SAMPLE_ID_BYTES: usize = 200;
/// Largest safetensors header we write or accept (the `safetensors` crate's limit).
pub const MAX_HEADER_BYTES: usize = 100_000_000;
/// Temp files older than this are swept by [`FeatureStore::gc`].
pub const TEMP_SWEEP_AGE: Duration = Duration::from_secs(3600);

/// Element types the store and the torch reader know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    BF16,
    F16,
    F32,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    pub const ALL: [Dtype; 10] = [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64, Dtype::I64, Dtype::I32, Dtype::I16, Dtype::I8, Dtype::U8, Dtype::Bool];

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::BF16 | Dtype::F16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
    /// The safetensors header name.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }
    /// The torch name without `torch.` (SampleRef `feature_specs[..].dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
            Dtype::I64 => "int64",
            Dtype::I32 => "int32",
            Dtype::I16 => "int16",
            Dtype::I8 => "int8",
            Dtype::U8 => "uint8",
            Dtype::Bool => "bool",
        }
    }
    /// The legacy storage class torch.save pickles (`torch.BFloat16Storage`, ...).
    pub fn torch_storage(self) -> &'static str {
        match self {
            Dtype::BF16 => "BFloat16Storage",
            Dtype::F16 => "HalfStorage",
            Dtype::F32 => "FloatStorage",
            Dtype::F64 => "DoubleStorage",
            Dtype::I64 => "LongStorage",
            Dtype::I32 => "IntStorage",
            Dtype::I16 => "ShortStorage",
            Dtype::I8 => "CharStorage",
            Dtype::U8 => "ByteStorage",
            Dtype::Bool => "BoolStorage",
        }
    }
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Dtype> {
        use safetensors::Dtype as S;
        Some(match d {
            S::BF16 => Dtype::BF16,
            S::F16 => Dtype::F16,
            S::F32 => Dtype::F32,
            S::F64 => Dtype::F64,
            S::I64 => Dtype::I64,
            S::I32 => Dtype::I32,
            S::I16 => Dtype::I16,
            S::I8 => Dtype::I8,
            S::U8 => Dtype::U8,
            S::BOOL => Dtype::Bool,
            _ => return None,
        })
    }
    pub fn from_torch_storage(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.torch_storage() == name)
    }

    /// Index of the first NaN element in little-endian `data`, if any (floats only).
    pub fn first_nan(self, data: &[u8]) -> Option<usize> {
        // Scan in blocks with a branch-free test the compiler vectorizes; locate the element
        // only in a block that has one.
        const BLOCK: usize = 8192;
        let size = self.size();
        let any_nan = |b: &[u8]| -> bool {
            match self {
                Dtype::BF16 => b.chunks_exact(2).fold(false, |a, c| a | (u16::from_le_bytes([c[0], c[1]]) & 0x7fff > 0x7f80)),
                Dtype::F16 => b.chunks_exact(2).fold(false, |a, c| a | (u16::from_le_bytes([c[0], c[1]]) & 0x7fff > 0x7c00)),
                Dtype::F32 => b.chunks_exact(4).fold(false, |a, c| a | (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7fff_ffff > 0x7f80_0000)),
                Dtype::F64 => b.chunks_exact(8).fold(false, |a, c| a | (u64::from_le_bytes(c.try_into().expect("8 bytes")) & 0x7fff_ffff_ffff_ffff > 0x7ff0_0000_0000_0000)),
                _ => false,
            }
        };
        for (i, block) in data.chunks(BLOCK).enumerate() {
            if any_nan(block) {
                return self.first_nan_slow(block).map(|p| i * (BLOCK / size) + p);
            }
        }
        None
    }

    fn first_nan_slow(self, data: &[u8]) -> Option<usize> {
        match self {
            Dtype::BF16 => data.chunks_exact(2).position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7fff > 0x7f80),
            Dtype::F16 => data.chunks_exact(2).position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7fff > 0x7c00),
            Dtype::F32 => data.chunks_exact(4).position(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_nan()),
            Dtype::F64 => data.chunks_exact(8).position(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")).is_nan()),
            _ => None,
        }
    }
}

/// One tensor to store: row-major, little-endian bytes.
#[derive(Debug, Clone)]
pub struct TensorData<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

/// A stored object: one sample at one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    pub sample_id: String,
    pub generation: u64,
    /// Path relative to the store root: `objects/<xx>/<sample_id>/g<gen:08>.safetensors`.
    pub key: String,
    pub path: PathBuf,
    pub bytes: u64,
}

/// Unexpired leases of one sample, per generation.
type LiveLeases = BTreeMap<u64, Vec<LeaseRecord>>;

/// A lease file's contents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseRecord {
    pub holder: String,
    pub host: String,
    pub pid: u32,
    pub generation: u64,
    pub acquired_unix_ms: u64,
    pub expires_unix_ms: u64,
}

/// A lease held on one object (on disk, not in memory: a crashed holder's lease expires).
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub object: StoredObject,
    pub record: LeaseRecord,
    pub lease_path: PathBuf,
}

/// How a file that already is safetensors enters the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaceMode {
    Copy,
    /// Hard link: no extra disk; the source must stay unmodified.
    Link,
    /// Rename (copy and remove across file systems).
    Move,
}

/// Store settings.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Refuse puts that would take the objects above this many bytes.
    pub quota_bytes: Option<u64>,
    /// How long a put waits for space under the quota before failing.
    pub quota_wait: Duration,
}

/// What [`FeatureStore::gc`] did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GcReport {
    pub leases_expired: u64,
    pub objects_freed: u64,
    pub bytes_freed: u64,
    pub temps_swept: u64,
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// True for ids usable as sample ids and lease holders: `[A-Za-z0-9._-]{1,200}`, not starting
/// with `.` (no colons: SpecForge's ids with colons break on some file systems).
pub fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_SAMPLE_ID_BYTES && !s.starts_with('.') && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The shard directory of a sample: two lowercase hex digits.
pub fn shard_of(sample_id: &str) -> String {
    format!("{:02x}", twox_hash::XxHash3_64::oneshot(sample_id.as_bytes()) >> 56)
}

/// The object key of (sample, generation), relative to the store root.
pub fn object_key(sample_id: &str, generation: u64) -> String {
    format!("{OBJECTS_DIR}/{}/{sample_id}/g{generation:08}.safetensors", shard_of(sample_id))
}

fn parse_object_name(name: &str) -> Option<u64> {
    let g = name.strip_prefix('g')?.strip_suffix(".safetensors")?;
    (g.len() >= 8 && g.bytes().all(|b| b.is_ascii_digit())).then(|| g.parse().ok()).flatten()
}

fn parse_lease_name(name: &str) -> Option<(u64, &str)> {
    let rest = name.strip_prefix('g')?;
    let (g, holder) = rest.split_once(".lease.")?;
    (g.len() >= 8 && g.bytes().all(|b| b.is_ascii_digit()) && !fsio::is_temp_name(name)).then(|| Some((g.parse().ok()?, holder))).flatten()
}

/// Build the safetensors header (length prefix included, padded with spaces to 8 bytes).
pub fn safetensors_header(tensors: &[TensorData<'_>], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map"));
    }
    let mut offset = 0usize;
    for t in tensors {
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let len = numel.and_then(|n| n.checked_mul(t.dtype.size()));
        if len != Some(t.data.len()) {
            return Err(Error::Internal(format!("tensor {}: {} bytes for shape {:?} {:?}", t.name, t.data.len(), t.shape, t.dtype)));
        }
        let end = offset + t.data.len();
        map.insert(t.name.clone(), serde_json::json!({"dtype": t.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let out = crate::checkpoint::header_bytes(&serde_json::Value::Object(map));
    if out.len() - 8 > MAX_HEADER_BYTES {
        return Err(Error::Internal(format!("safetensors header of {} bytes is over {MAX_HEADER_BYTES}", out.len() - 8)));
    }
    Ok(out)
}

/// Alignment and granularity of O_DIRECT writes (covers 512- and 4096-byte sectors).
const DIRECT_ALIGN: usize = 4096;
/// Bytes an [`ObjectWriter`] gathers per O_DIRECT write.
const DIRECT_CHUNK: usize = 4 << 20;

thread_local! {
    /// Aligned-buffer backing stores of finished [`ObjectWriter`]s, for reuse on this thread.
    static DIRECT_BUFS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes a new object file sequentially, with O_DIRECT when the file system takes it: the
/// bytes go through an aligned buffer, the last block is padded and the file then truncated to
/// its length. Any refusal (EINVAL at open or write, a short write) falls back to ordinary
/// buffered writes for the rest. The caller fsyncs the returned file either way.
struct ObjectWriter {
    file: fsio::AtomicFile,
    direct: bool,
    /// Backing store of the aligned buffer: `buf_off..buf_off + DIRECT_CHUNK` is aligned.
    buf: Vec<u8>,
    buf_off: usize,
    filled: usize,
    written: u64,
}

impl ObjectWriter {
    /// Start the object that will be committed under `target`.
    fn create(target: &Path) -> Result<Self> {
        let (file, direct) = fsio::AtomicFile::create_direct(target)?;
        let (buf, buf_off) = if direct {
            // One buffer per thread, reused across objects (no 4 MiB allocation and page
            // faults per object).
            let buf = DIRECT_BUFS.with(|b| b.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; DIRECT_CHUNK + DIRECT_ALIGN]);
            let off = buf.as_ptr().align_offset(DIRECT_ALIGN);
            (buf, off)
        } else {
            (Vec::new(), 0)
        };
        Ok(ObjectWriter { file, direct, buf, buf_off, filled: 0, written: 0 })
    }

    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while self.direct && !data.is_empty() {
            let n = (DIRECT_CHUNK - self.filled).min(data.len());
            let at = self.buf_off + self.filled;
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == DIRECT_CHUNK {
                self.flush_direct(DIRECT_CHUNK)?;
            }
        }
        if !data.is_empty() {
            self.file.write_all(data)?;
            self.written += data.len() as u64;
        }
        Ok(())
    }

    /// Write the first `len` buffered bytes (`len` a multiple of [`DIRECT_ALIGN`]) with O_DIRECT,
    /// or, if refused, the buffered bytes without it.
    fn flush_direct(&mut self, len: usize) -> io::Result<()> {
        let chunk = &self.buf[self.buf_off..self.buf_off + len];
        match self.file.file().write(chunk) {
            Ok(n) if n == len => {
                self.written += len as u64;
                self.filled = 0;
                Ok(())
            }
            Ok(n) => {
                // A short direct write: finish this and everything after without O_DIRECT.
                self.written += n as u64;
                self.fall_back(n)
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.fall_back(0),
            Err(e) => Err(e),
        }
    }

    /// Stop using O_DIRECT; write the buffered bytes from `from` on with ordinary writes.
    fn fall_back(&mut self, from: usize) -> io::Result<()> {
        self.stop_direct()?;
        let rest = self.buf[self.buf_off + from..self.buf_off + self.filled].to_vec();
        self.filled = 0;
        self.write_all(&rest)
    }

    fn stop_direct(&mut self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        self.direct = false;
        let fd = self.file.file().as_raw_fd();
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Write what is buffered (the last block padded, then cut back to length); the file, not
    /// yet committed.
    fn finish(mut self) -> io::Result<fsio::AtomicFile> {
        self.finish_writes()?;
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            DIRECT_BUFS.with(|b| b.borrow_mut().push(buf));
        }
        Ok(self.file)
    }

    fn finish_writes(&mut self) -> io::Result<()> {
        if self.direct && self.filled > 0 {
            let len = self.filled;
            let padded = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            self.buf[self.buf_off + len..self.buf_off + padded].fill(0);
            self.filled = padded;
            let before = self.written;
            self.flush_direct(padded)?;
            let end = before + len as u64;
            if self.written != end {
                self.file.file().set_len(end)?;
                self.written = end;
            }
        }
        Ok(())
    }
}

/// A shared-dir feature store.
pub struct FeatureStore {
    root: PathBuf,
    opts: StoreOptions,
    /// Bytes of objects as last counted plus what this process added since.
    usage: Mutex<Option<u64>>,
}

impl FeatureStore {
    /// Open (create) a store at `root`.
    pub fn open(root: &Path, opts: StoreOptions) -> Result<Self> {
        fsio::create_dir_durable(&root.join(OBJECTS_DIR))?;
        let root = fs::canonicalize(root).at(root)?;
        Ok(FeatureStore { root, opts, usage: Mutex::new(None) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `file://` + the absolute store root: a ref's `feature_store_uri`.
    pub fn uri(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn check_id(&self, what: &str, id: &str) -> Result<()> {
        if valid_id(id) {
            Ok(())
        } else {
            Err(Error::bad_input(&self.root, format!("{what} {id:?} must match [A-Za-z0-9._-]{{1,{MAX_SAMPLE_ID_BYTES}}} and not start with '.'")))
        }
    }

    pub fn sample_dir(&self, sample_id: &str) -> PathBuf {
        self.root.join(OBJECTS_DIR).join(shard_of(sample_id)).join(sample_id)
    }

    fn object(&self, sample_id: &str, generation: u64) -> StoredObject {
        let key = object_key(sample_id, generation);
        let path = self.root.join(&key);
        let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        StoredObject { sample_id: sample_id.to_string(), generation, key, path, bytes }
    }

    /// Generations of the sample that have an object, ascending.
    pub fn generations(&self, sample_id: &str) -> Result<Vec<u64>> {
        self.check_id("sample id", sample_id)?;
        let dir = self.sample_dir(sample_id);
        let mut gens = Vec::new();
        match fs::read_dir(&dir) {
            Ok(rd) => {
                for ent in rd {
                    let ent = ent.at(&dir)?;
                    if let Some(g) = parse_object_name(&ent.file_name().to_string_lossy()) {
                        gens.push(g);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&dir, e)),
        }
        gens.sort_unstable();
        Ok(gens)
    }

    /// The current (highest) generation's object, if any.
    pub fn current(&self, sample_id: &str) -> Result<Option<StoredObject>> {
        Ok(self.generations(sample_id)?.last().map(|&g| self.object(sample_id, g)))
    }

    fn count_usage(&self) -> Result<u64> {
        let mut total = 0u64;
        let objects = self.root.join(OBJECTS_DIR);
        for shard in fs::read_dir(&objects).at(&objects)? {
            let shard = shard.at(&objects)?.path();
            let Ok(samples) = fs::read_dir(&shard) else { continue };
            for sample in samples.flatten() {
                let Ok(files) = fs::read_dir(sample.path()) else { continue };
                for f in files.flatten() {
                    if parse_object_name(&f.file_name().to_string_lossy()).is_some() {
                        total += f.metadata().map(|m| m.len()).unwrap_or(0);
                    }
                }
            }
        }
        Ok(total)
    }

    /// Bytes held by objects now (counted from the files).
    pub fn usage(&self) -> Result<u64> {
        let n = self.count_usage()?;
        *self.usage.lock().expect("usage lock") = Some(n);
        Ok(n)
    }

    /// Wait until `bytes` more fit under the quota, then account for them.
    fn reserve(&self, bytes: u64) -> Result<()> {
        let Some(quota) = self.opts.quota_bytes else { return Ok(()) };
        let start = Instant::now();
        let mut recount = false;
        loop {
            {
                let mut usage = self.usage.lock().expect("usage lock");
                if usage.is_none() || recount {
                    *usage = Some(self.count_usage()?);
                }
                let used = usage.expect("counted");
                if used.saturating_add(bytes) <= quota {
                    *usage = Some(used + bytes);
                    return Ok(());
                }
                if start.elapsed() >= self.opts.quota_wait {
                    return Err(Error::io(
                        &self.root,
                        io::Error::new(
                            io::ErrorKind::StorageFull,
                            format!(
                                "store quota of {quota} bytes exceeded: {used} bytes held, object needs {bytes}; waited {:.1}s for consumers to release (raise the quota, release or gc samples)",
                                start.elapsed().as_secs_f64()
                            ),
                        ),
                    ));
                }
            }
            recount = true;
            // A stop signal (crate::stop, installed by feature-ingest) ends the wait: nothing
            // of this object is written yet.
            crate::stop::check()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn unreserve(&self, bytes: u64) {
        if let Some(u) = self.usage.lock().expect("usage lock").as_mut() {
            *u = u.saturating_sub(bytes);
        }
    }

    /// Advance the sample's generation counter (never reused, even after a crash), writing the
    /// retain marker of the new generation first when asked.
    fn next_generation_in(&self, sample_id: &str, retain_on_release: bool, dirs: &fsio::DirSync) -> Result<u64> {
        let dir = self.sample_dir(sample_id);
        fsio::create_dir_deferred(&dir, dirs)?;
        let path = dir.join(GENERATION_FILE);
        let lock = fsio::RefLock::acquire(&path, fsio::REF_LOCK_TIMEOUT)?;
        let listed = self.generations(sample_id)?.last().copied().unwrap_or(0);
        let stored = match lock.read_current()? {
            Some(t) => t.trim().parse::<u64>().map_err(|_| Error::bad_input(&path, format!("{:?} is not a generation", t.trim())))?,
            None => 0,
        };
        let next = stored.max(listed) + 1;
        if retain_on_release {
            // The counter's commit below fsyncs this directory, so the marker is durable
            // before the new generation is.
            fsio::AtomicFile::create(self.retain_path(sample_id, next))?.commit_deferred(dirs)?;
        }
        lock.commit(format!("{next}\n").as_bytes())?;
        Ok(next)
    }

    /// Store tensors as a new generation of `sample_id`; older unleased generations are removed.
    /// Durable when it returns.
    pub fn put(&self, sample_id: &str, tensors: &[TensorData<'_>], metadata: &BTreeMap<String, String>, retain_on_release: bool) -> Result<StoredObject> {
        let dirs = fsio::DirSync::default();
        let obj = self.put_in(sample_id, tensors, metadata, retain_on_release, &dirs)?;
        dirs.sync()?;
        Ok(obj)
    }

    /// [`Self::put`] for batches: the object's bytes, counter and marker are durable when it
    /// returns, but the directory fsyncs that make the new names durable (the object's rename,
    /// new sample and shard directories) are added to `dirs`; call [`fsio::DirSync::sync`] before
    /// anything reports the object (manifest, channel). Within the sample directory the order
    /// of the old protocol holds: counter and marker are durable before the object's name
    /// appears. The object is written with O_DIRECT where the file system allows it (no page
    /// cache copy, no writeback storm at fsync), else with ordinary writes.
    pub fn put_in(&self, sample_id: &str, tensors: &[TensorData<'_>], metadata: &BTreeMap<String, String>, retain_on_release: bool, dirs: &fsio::DirSync) -> Result<StoredObject> {
        self.check_id("sample id", sample_id)?;
        let mut names = std::collections::HashSet::new();
        for t in tensors {
            if t.name.is_empty() || t.name == "__metadata__" || !names.insert(&t.name) {
                return Err(Error::bad_input(&self.root, format!("sample {sample_id}: bad or duplicate tensor name {:?}", t.name)));
            }
        }
        let mut metadata = metadata.clone();
        metadata.entry("format".into()).or_insert_with(|| "pt".into());
        let header = safetensors_header(tensors, &metadata)?;
        let bytes = header.len() as u64 + tensors.iter().map(|t| t.data.len() as u64).sum::<u64>();
        self.reserve(bytes)?;
        let res = (|| {
            let generation = self.next_generation_in(sample_id, retain_on_release, dirs)?;
            let key = object_key(sample_id, generation);
            let path = self.root.join(&key);
            let mut w = ObjectWriter::create(&path)?;
            let written = (|| {
                w.write_all(&header)?;
                for t in tensors {
                    w.write_all(&t.data)?;
                }
                w.finish()
            })();
            // Dropped on error, the AtomicFile removes its temp.
            let file = written.map_err(|e| Error::io(&path, e))?;
            crate::failpoint!("store.before_commit");
            file.commit_deferred(dirs)?;
            Ok(StoredObject { sample_id: sample_id.to_string(), generation, key, path, bytes })
        })();
        match res {
            Ok(obj) => {
                // Older generations go only once the new object's name is durable.
                if self.generations(sample_id)?.iter().any(|&g| g < obj.generation) {
                    fsio::fsync_dir(&self.sample_dir(sample_id))?;
                    self.drop_superseded(sample_id, obj.generation)?;
                }
                Ok(obj)
            }
            Err(e) => {
                self.unreserve(bytes);
                Err(e)
            }
        }
    }

    /// Place an existing, already validated safetensors file as a new generation.
    pub fn put_file(&self, sample_id: &str, src: &Path, mode: PlaceMode, retain_on_release: bool) -> Result<StoredObject> {
        self.check_id("sample id", sample_id)?;
        let len = fs::metadata(src).at(src)?.len();
        let extra = if mode == PlaceMode::Copy { len } else { 0 };
        self.reserve(extra)?;
        let dirs = fsio::DirSync::default();
        let generation = self.next_generation_in(sample_id, retain_on_release, &dirs)?;
        dirs.sync()?;
        let obj = self.object(sample_id, generation);
        let placed = match mode {
            PlaceMode::Copy => fsio::copy_atomic(src, &obj.path).map(|_| ()),
            PlaceMode::Link => fs::hard_link(src, &obj.path).at(&obj.path).and_then(|_| fsio::fsync_dir(obj.path.parent().expect("in a dir"))),
            PlaceMode::Move => match fs::rename(src, &obj.path) {
                Ok(()) => fsio::fsync_dir(obj.path.parent().expect("in a dir")).and_then(|_| fsio::fsync_dir(src.parent().unwrap_or(Path::new(".")))),
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => fsio::copy_atomic(src, &obj.path).and_then(|_| fsio::remove_durable(src)),
                Err(e) => Err(Error::io(&obj.path, e)),
            },
        };
        if let Err(e) = placed {
            self.unreserve(extra);
            return Err(e);
        }
        self.drop_superseded(sample_id, generation)?;
        Ok(StoredObject { bytes: len, ..obj })
    }

    fn retain_path(&self, sample_id: &str, generation: u64) -> PathBuf {
        self.sample_dir(sample_id).join(format!("g{generation:08}.retain"))
    }

    fn lease_path(&self, sample_id: &str, generation: u64, holder: &str) -> PathBuf {
        self.sample_dir(sample_id).join(format!("g{generation:08}.lease.{holder}"))
    }

    /// Live (unexpired) leases per generation, and the paths of expired ones.
    fn leases(&self, sample_id: &str, now_ms: u64) -> Result<(LiveLeases, Vec<(u64, PathBuf)>)> {
        let dir = self.sample_dir(sample_id);
        let mut live = LiveLeases::new();
        let mut expired = Vec::new();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((live, expired)),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        for ent in rd {
            let ent = ent.at(&dir)?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let Some((g, _)) = parse_lease_name(&name) else { continue };
            let path = ent.path();
            let rec: LeaseRecord = match fs::read(&path) {
                Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::bad_input(&path, format!("not a lease: {e}")))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, e)),
            };
            if rec.expires_unix_ms <= now_ms {
                expired.push((g, path));
            } else {
                live.entry(g).or_default().push(rec);
            }
        }
        Ok((live, expired))
    }

    /// Remove generations older than `current` that nobody holds.
    fn drop_superseded(&self, sample_id: &str, current: u64) -> Result<()> {
        let (live, _) = self.leases(sample_id, unix_ms())?;
        for g in self.generations(sample_id)? {
            if g < current && !live.contains_key(&g) {
                self.delete_object(sample_id, g)?;
            }
        }
        Ok(())
    }

    fn delete_object(&self, sample_id: &str, generation: u64) -> Result<u64> {
        let obj = self.object(sample_id, generation);
        fsio::remove_durable(&obj.path)?;
        fsio::remove_durable(&self.retain_path(sample_id, generation))?;
        self.unreserve(obj.bytes);
        Ok(obj.bytes)
    }

    /// Lease the current generation of `sample_id` for `holder` until `ttl` from now.
    pub fn get(&self, sample_id: &str, holder: &str, ttl: Duration) -> Result<Lease> {
        self.check_id("sample id", sample_id)?;
        self.check_id("lease holder", holder)?;
        let obj = self.current(sample_id)?.ok_or_else(|| Error::not_found(self.sample_dir(sample_id), format!("sample {sample_id} has no object")))?;
        let now = unix_ms();
        let record = LeaseRecord {
            holder: holder.to_string(),
            host: fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default(),
            pid: std::process::id(),
            generation: obj.generation,
            acquired_unix_ms: now,
            expires_unix_ms: now.saturating_add(ttl.as_millis() as u64),
        };
        let lease_path = self.lease_path(sample_id, obj.generation, holder);
        fsio::write_atomic(&lease_path, format!("{}\n", serde_json::to_string(&record).expect("serializes")).as_bytes())?;
        if !obj.path.exists() {
            fsio::remove_durable(&lease_path)?;
            return Err(Error::not_found(&obj.path, "released by another holder while leasing"));
        }
        Ok(Lease { object: obj, record, lease_path })
    }

    /// Drop a lease. The object is deleted when this was the last live lease of its generation
    /// and the generation is superseded or not retained. Returns whether it was deleted.
    pub fn release(&self, lease: &Lease) -> Result<bool> {
        fsio::remove_durable(&lease.lease_path)?;
        let o = &lease.object;
        let (live, _) = self.leases(&o.sample_id, unix_ms())?;
        if live.contains_key(&o.generation) || !o.path.exists() {
            return Ok(false);
        }
        let current = self.generations(&o.sample_id)?.last().copied().unwrap_or(0);
        let retained = self.retain_path(&o.sample_id, o.generation).exists();
        if o.generation < current || !retained {
            self.delete_object(&o.sample_id, o.generation)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Evict a sample now: every generation, lease and marker (the counter stays).
    pub fn abort(&self, sample_id: &str) -> Result<()> {
        self.check_id("sample id", sample_id)?;
        let dir = self.sample_dir(sample_id);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        for ent in rd {
            let ent = ent.at(&dir)?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(g) = parse_object_name(&name) {
                self.delete_object(sample_id, g)?;
            } else if name != GENERATION_FILE && !name.ends_with(".lock") {
                fsio::remove_durable(&ent.path())?;
            }
        }
        Ok(())
    }

    /// Remove expired leases; free objects whose holder's lease expired (consume-once, not
    /// retained), and any unleased object older than `max_unleased_age`; sweep old temp files.
    pub fn gc(&self, max_unleased_age: Option<Duration>) -> Result<GcReport> {
        let mut report = GcReport::default();
        let now = unix_ms();
        let objects = self.root.join(OBJECTS_DIR);
        for shard in fs::read_dir(&objects).at(&objects)? {
            let shard = shard.at(&objects)?.path();
            let Ok(samples) = fs::read_dir(&shard) else { continue };
            for sample in samples.flatten() {
                let sample_id = sample.file_name().to_string_lossy().into_owned();
                if !valid_id(&sample_id) {
                    continue;
                }
                for f in fs::read_dir(sample.path()).at(sample.path())?.flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    let old = f.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a > TEMP_SWEEP_AGE);
                    if fsio::is_temp_name(&name) && old {
                        fsio::remove_durable(&f.path())?;
                        report.temps_swept += 1;
                    }
                }
                let (live, expired) = self.leases(&sample_id, now)?;
                let mut freed_by_expiry = std::collections::BTreeSet::new();
                for (g, path) in expired {
                    fsio::remove_durable(&path)?;
                    report.leases_expired += 1;
                    freed_by_expiry.insert(g);
                }
                for g in self.generations(&sample_id)? {
                    if live.contains_key(&g) {
                        continue;
                    }
                    let obj = self.object(&sample_id, g);
                    let retained = self.retain_path(&sample_id, g).exists();
                    let too_old =
                        max_unleased_age.is_some_and(|max| fs::metadata(&obj.path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a > max));
                    if (freed_by_expiry.contains(&g) && !retained) || too_old {
                        report.bytes_freed += self.delete_object(&sample_id, g)?;
                        report.objects_freed += 1;
                    }
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockwise_nan_scan_finds_the_first_nan() {
        let cases: [(Dtype, &[u8], &[u8]); 4] = [
            (Dtype::BF16, &0x7fc0u16.to_le_bytes(), &0x7f80u16.to_le_bytes()),
            (Dtype::F16, &0xfe00u16.to_le_bytes(), &0x7c00u16.to_le_bytes()),
            (Dtype::F32, &f32::NAN.to_le_bytes(), &f32::INFINITY.to_le_bytes()),
            (Dtype::F64, &(-f64::NAN).to_le_bytes(), &f64::NEG_INFINITY.to_le_bytes()),
        ];
        for (dtype, nan, inf) in cases {
            let size = dtype.size();
            let n = 3 * 8192 / size + 7;
            let mut data: Vec<u8> = (0..n).flat_map(|i| if i % 5 == 0 { inf.to_vec() } else { vec![0x11; size] }).collect();
            assert_eq!(dtype.first_nan(&data), None);
            for at in [n - 1, 2 * 8192 / size, 8192 / size, 8192 / size - 1, 3, 0] {
                data[at * size..(at + 1) * size].copy_from_slice(nan);
                assert_eq!(dtype.first_nan(&data), Some(at), "{dtype:?} at {at}");
                assert_eq!(dtype.first_nan(&data), dtype.first_nan_slow(&data));
            }
        }
        assert_eq!(Dtype::I64.first_nan(&[0xff; 64]), None);
    }

    fn roundtrip(root: &Path) {
        let store = FeatureStore::open(root, StoreOptions::default()).unwrap();
        for (i, len) in [0usize, 1, 4095, 4096, 4097, DIRECT_CHUNK - 600, DIRECT_CHUNK + 12_345].into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|k| (k * 7 + i) as u8).collect();
            let tensors = [
                TensorData { name: "a".into(), dtype: Dtype::U8, shape: vec![len], data: Cow::Borrowed(&data) },
                TensorData { name: "b".into(), dtype: Dtype::I16, shape: vec![3], data: Cow::Owned(vec![1, 2, 3, 4, 5, 6]) },
            ];
            let id = format!("s{i}");
            let dirs = fsio::DirSync::default();
            let obj = store.put_in(&id, &tensors, &BTreeMap::new(), i % 2 == 0, &dirs).unwrap();
            dirs.sync().unwrap();
            let bytes = fs::read(&obj.path).unwrap();
            assert_eq!(bytes.len() as u64, obj.bytes);
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.tensor("a").unwrap().data(), &data[..]);
            assert_eq!(st.tensor("b").unwrap().data(), &[1, 2, 3, 4, 5, 6]);
            assert_eq!(store.retain_path(&id, obj.generation).exists(), i % 2 == 0);
            assert_eq!(fs::read_to_string(store.sample_dir(&id).join(GENERATION_FILE)).unwrap(), "1\n");
            // A second put supersedes the first (unleased: deleted) and takes generation 2.
            let again = store.put(&id, &tensors, &BTreeMap::new(), false).unwrap();
            assert_eq!(again.generation, 2);
            assert_eq!(store.generations(&id).unwrap(), vec![2]);
            assert!(!store.retain_path(&id, 1).exists());
            let names: Vec<String> = fs::read_dir(store.sample_dir(&id)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            assert!(names.iter().all(|n| !fsio::is_temp_name(n)), "{names:?}");
        }
    }

    #[test]
    fn object_writer_falls_back_midway() {
        let d = std::env::temp_dir().join(format!("disagg-store-fallback-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let data: Vec<u8> = (0..DIRECT_CHUNK * 2 + 777).map(|k| (k * 13) as u8).collect();
        for (cut, fail_at) in [(DIRECT_CHUNK + 10_000, 8192usize), (10, 0), (DIRECT_CHUNK * 2 + 777, 0), (DIRECT_CHUNK + 5000, 4096)] {
            let path = d.join(format!("f{cut}"));
            let mut w = ObjectWriter::create(&path).unwrap();
            w.write_all(&data[..cut]).unwrap();
            if w.direct && w.filled > fail_at {
                // As if the kernel had taken only `fail_at` (aligned) bytes of the next direct
                // write, or refused it (0).
                let (file, buf) = (w.file.file(), &w.buf);
                (&*file).write_all(&buf[w.buf_off..w.buf_off + fail_at]).unwrap();
                w.written += fail_at as u64;
                w.fall_back(fail_at).unwrap();
                assert!(!w.direct);
            }
            w.write_all(&data[cut..]).unwrap();
            w.finish().unwrap().commit().unwrap();
            assert_eq!(fs::read(&path).unwrap(), data, "cut {cut}");
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn objects_roundtrip_through_direct_and_buffered_writes() {
        let base = std::env::temp_dir().join(format!("disagg-store-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        roundtrip(&base);
        fs::remove_dir_all(&base).unwrap();
        // tmpfs refuses O_DIRECT on older kernels: the buffered fallback.
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let d = shm.join(format!("disagg-store-unit-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            roundtrip(&d);
            fs::remove_dir_all(&d).unwrap();
        }
    }
}
