//! `delta-diff`: publish NEW as weight version N under SRC, either as a delta against OLD
//! (only the changed tensors, one zstd frame each) or, with `full`, as a full checkpoint.
//!
//! Tensors are encoded in parallel (rayon), each read from OLD and NEW with pread a 256 KiB
//! window at a time (`codec::PreadPair`: cheaper than faulting in and unmapping every page of
//! the mapped inputs, which only the GPU path reads). Each payload is
//! built in a [`Spill`]: in memory while the process-wide in-memory budget lasts, in an
//! unnamed temp file after that, so memory stays bounded whatever the model size. Data files
//! are written tmp → fsync → rename; the index goes last and is the version's commit marker.

use crate::checkpoint::{is_plain_file_name, Checkpoint, INDEX_NAME, SINGLE_NAME};
use crate::checksum::ChecksumAlg;
use crate::codec::PayloadError;
use crate::error::{Error, IoContext, Result};
use crate::fsio::{self, AtomicFile};
use crate::version::{version_dir_name, version_str, Encoding, INCOMPLETE_MARKER};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Payload bytes kept in memory across all threads before payloads spill to temp files.
pub const IN_MEMORY_BUDGET: usize = 96 << 20;
/// Default cap on the payload bytes of one delta data file.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 4 << 30;

#[derive(Debug, Clone)]
pub struct DiffOptions {
    pub old: PathBuf,
    pub new: PathBuf,
    pub publish: PathBuf,
    pub version: u64,
    pub base_version: Option<u64>,
    pub encoding: Encoding,
    pub checksum: ChecksumAlg,
    pub full: bool,
    /// Publish a full version whenever the version number is a multiple of this, so the chain
    /// a fresh host replays stays short and `delta-gc` can cut it.
    pub full_every: Option<u64>,
    pub post_write_hook: Option<String>,
    pub replace_incomplete: bool,
    pub max_file_bytes: u64,
    /// Which processor computes the diffs (`--device`; lib/gpu, docs/GPU.md).
    pub device: crate::gpu::Device,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiffReport {
    pub version: u64,
    pub kind: &'static str,
    pub base_version: Option<u64>,
    pub encoding: Option<String>,
    pub checksum: Option<String>,
    pub path: PathBuf,
    pub tensors_total: usize,
    pub tensors_changed: usize,
    pub total_bytes: u64,
    pub changed_bytes: u64,
    pub density: f64,
    pub files: usize,
    pub wire_bytes: u64,
    pub seconds: f64,
    pub seconds_encode: f64,
    pub seconds_write: f64,
    pub seconds_hook: f64,
    pub throughput_gbps: f64,
    /// `cuda` if any tensor was diffed on the GPU, else `cpu`.
    pub device: &'static str,
}

/// Publish version `opts.version`; see the module docs.
pub fn publish(opts: &DiffOptions) -> Result<DiffReport> {
    let start = Instant::now();
    if opts.version == 0 {
        return Err(Error::Usage("version 0 is the engine's base checkpoint and cannot be published".into()));
    }
    let full_by_period = opts.full_every.is_some_and(|k| k > 0 && opts.version % k == 0);
    let opts = &DiffOptions { full: opts.full || full_by_period, ..opts.clone() };
    if opts.full && opts.base_version.is_some() && !full_by_period {
        return Err(Error::Usage("--base-version does not apply to --full (a full version has no base)".into()));
    }
    let new = Checkpoint::open(&opts.new)?;
    let old = if opts.full { None } else { Some(Checkpoint::open(&opts.old)?) };
    let base_version = if opts.full { None } else { Some(opts.base_version.unwrap_or(opts.version - 1)) };
    if let Some(b) = base_version {
        if b >= opts.version {
            return Err(Error::Usage(format!("--base-version {b} must be older than --version {}", opts.version)));
        }
    }
    if let Some(old) = &old {
        check_compatible(old, &new, &opts.old, &opts.new)?;
    }
    // GPU or CPU per tensor (lib/gpu); chosen before anything is written, `--device cuda` with no GPU is a usage error.
    let engine = if opts.full { crate::gpu::Engine::cpu() } else { crate::gpu::Engine::select(opts.device)? };
    let dir = create_version_dir(&opts.publish, opts.version, opts.replace_incomplete)?;
    let mut report = match &old {
        Some(old) => write_delta(old, &new, &dir, opts, base_version.expect("delta has a base"), &engine)?,
        None => write_full(&new, &dir, opts)?,
    };
    let hook_start = Instant::now();
    if let Some(cmd) = &opts.post_write_hook {
        crate::hooks::run_hook(cmd, opts.version, &dir, &opts.publish)?;
    }
    report.seconds_hook = hook_start.elapsed().as_secs_f64();
    report.seconds = start.elapsed().as_secs_f64();
    report.throughput_gbps = report.total_bytes as f64 / report.seconds.max(1e-9) / 1e9;
    Ok(report)
}

/// Tensor sets, dtypes and shapes must agree; lists the first differences.
fn check_compatible(old: &Checkpoint, new: &Checkpoint, old_path: &Path, new_path: &Path) -> Result<()> {
    let mut problems = Vec::new();
    for (name, loc) in new.tensors() {
        let (_, n) = new.entry(loc);
        match old.get(name) {
            None => problems.push(format!("tensor {name:?} is in NEW only")),
            Some((_, o)) if o.dtype != n.dtype => problems.push(format!("tensor {name:?}: dtype {} in OLD, {} in NEW", o.dtype, n.dtype)),
            Some((_, o)) if o.shape != n.shape => problems.push(format!("tensor {name:?}: shape {:?} in OLD, {:?} in NEW", o.shape, n.shape)),
            Some(_) => {}
        }
    }
    for (name, _) in old.tensors() {
        if new.get(name).is_none() {
            problems.push(format!("tensor {name:?} is in OLD only"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(5);
    Err(Error::Incompatible(format!(
        "{} and {} are not versions of the same model ({n} differences): {}{}",
        old_path.display(),
        new_path.display(),
        problems.join("; "),
        if n > 5 { "; ..." } else { "" }
    )))
}

fn create_version_dir(src: &Path, version: u64, replace_incomplete: bool) -> Result<PathBuf> {
    fsio::create_dir_durable(src)?;
    let dir = src.join(version_dir_name(version));
    if dir.exists() {
        if dir.join(INDEX_NAME).exists() {
            return Err(Error::conflict(&dir, format!("version {version} is already published; versions are immutable, publish a new number")));
        }
        if !replace_incomplete {
            return Err(Error::conflict(&dir, format!("an incomplete version {version} exists (a publisher crashed or is still writing); rerun with --replace-incomplete if no publisher is running")));
        }
        std::fs::remove_dir_all(&dir).at(&dir)?;
    }
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::conflict(&dir, "another publisher created this version concurrently"));
        }
        Err(e) => return Err(Error::io(&dir, e)),
    }
    fsio::fsync_dir(src)?;
    // Marks the directory as ours and unfinished until the index is written (see VersionDir::open).
    fsio::write_atomic(dir.join(INCOMPLETE_MARKER), b"")?;
    Ok(dir)
}

/// A payload under construction: in memory while the shared budget allows, then in an unnamed
/// temp file (O_TMPFILE) in the version directory, which vanishes if the process dies.
enum Spill {
    Mem(Vec<u8>),
    File(File),
}

struct SpillWriter<'a> {
    budget: &'a AtomicUsize,
    reserved: usize,
    dir: &'a Path,
    state: Spill,
}

impl<'a> SpillWriter<'a> {
    fn new(budget: &'a AtomicUsize, dir: &'a Path) -> Self {
        SpillWriter { budget, reserved: 0, dir, state: Spill::Mem(Vec::new()) }
    }

    fn try_reserve(&mut self, n: usize) -> bool {
        let mut cur = self.budget.load(Ordering::Relaxed);
        loop {
            if cur < n {
                return false;
            }
            match self.budget.compare_exchange_weak(cur, cur - n, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    self.reserved += n;
                    return true;
                }
                Err(c) => cur = c,
            }
        }
    }

    fn into_payload(self) -> Payload<'a> {
        let len = match &self.state {
            Spill::Mem(v) => v.len() as u64,
            Spill::File(f) => f.metadata().map(|m| m.len()).unwrap_or(0),
        };
        Payload { len, writer: self }
    }
}

impl Write for SpillWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let in_mem = match &self.state {
            Spill::Mem(v) => Some(v.len()),
            Spill::File(_) => None,
        };
        if let Some(len) = in_mem {
            if len + data.len() > self.reserved {
                let want = (len + data.len() - self.reserved).max(256 << 10);
                if !self.try_reserve(want) {
                    let mut f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).mode(0o600).open(self.dir)?;
                    if let Spill::Mem(v) = &self.state {
                        f.write_all(v)?;
                    }
                    self.state = Spill::File(f);
                    self.budget.fetch_add(self.reserved, Ordering::AcqRel);
                    self.reserved = 0;
                }
            }
        }
        match &mut self.state {
            Spill::Mem(v) => {
                v.extend_from_slice(data);
                Ok(data.len())
            }
            Spill::File(f) => f.write(data),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SpillWriter<'_> {
    fn drop(&mut self) {
        self.budget.fetch_add(self.reserved, Ordering::AcqRel);
    }
}

struct Payload<'a> {
    len: u64,
    writer: SpillWriter<'a>,
}

impl Payload<'_> {
    fn copy_to(&mut self, out: &mut impl Write) -> io::Result<()> {
        match &mut self.writer.state {
            Spill::Mem(v) => out.write_all(v),
            Spill::File(f) => {
                f.seek(io::SeekFrom::Start(0))?;
                let n = io::copy(f, out)?;
                if n != self.len {
                    return Err(io::Error::other("spill file changed size"));
                }
                Ok(())
            }
        }
    }
}

struct Encoded<'a> {
    name: String,
    checksum: String,
    changed: u64,
    payload: Payload<'a>,
}

fn write_delta(old: &Checkpoint, new: &Checkpoint, dir: &Path, opts: &DiffOptions, base: u64, engine: &crate::gpu::Engine) -> Result<DiffReport> {
    let encode_start = Instant::now();
    // Data order of NEW, so the reads walk each file front to back.
    let mut order: Vec<_> = new.tensors().map(|(n, l)| (n.to_string(), l)).collect();
    order.sort_by_key(|(_, l)| (l.file, new.entry(*l).1.offset));
    let total_bytes = new.total_bytes();
    let bar = crate::progress::bytes_bar(total_bytes, "diff");
    let budget = AtomicUsize::new(IN_MEMORY_BUDGET);
    // Largest tensors first, one task each: the last tensors to finish are small ones, so no
    // core idles behind a late embedding matrix. Results go back into data order below.
    let mut schedule: Vec<usize> = (0..order.len()).collect();
    schedule.sort_by_key(|&i| std::cmp::Reverse(new.entry(order[i].1).1.len));
    let mut scheduled: Vec<(usize, Option<Encoded>)> = schedule
        .into_par_iter()
        .with_max_len(1)
        .map(|i| {
            let (name, loc) = &order[i];
            let (nf, nt) = new.entry(*loc);
            let (of, ot) = old.get(name).expect("compatibility checked");
            let mut w = SpillWriter::new(&budget, dir);
            let mut hasher = opts.checksum.hasher();
            // Encoded whole, then dropped if nothing changed: the scan is what finds out, and
            // a frame of an unchanged tensor costs little more than that scan.
            let changed = engine.encode(opts.encoding, of.input(ot), nf.input(nt), &mut w, &mut hasher).map_err(|e| match e {
                PayloadError::Io(io) => Error::io(dir, io),
                PayloadError::Source { path, source } => Error::io(path, source),
                other => Error::bad_input(nf.path(), format!("tensor {name:?}: {other}")),
            })?;
            let out = (changed > 0).then(|| Encoded { name: name.clone(), checksum: hasher.finish_hex(), changed, payload: w.into_payload() });
            bar.inc(nt.len as u64);
            Ok((i, out))
        })
        .collect::<Result<_>>()?;
    scheduled.sort_by_key(|(i, _)| *i);
    let results = scheduled.into_iter().map(|(_, e)| e);
    bar.finish_and_clear();
    let seconds_encode = encode_start.elapsed().as_secs_f64();

    let write_start = Instant::now();
    let mut changed: Vec<Encoded> = results.flatten().collect();
    let changed_bytes: u64 = changed.iter().map(|e| e.changed).sum();
    let tensors_changed = changed.len();
    // Group into data files of at most max_file_bytes of payload (at least one tensor each).
    let mut groups: Vec<Vec<Encoded>> = Vec::new();
    let mut size = 0u64;
    for e in changed.drain(..) {
        if groups.is_empty() || (size + e.payload.len > opts.max_file_bytes && !groups.last().expect("non-empty").is_empty()) {
            groups.push(Vec::new());
            size = 0;
        }
        size += e.payload.len;
        groups.last_mut().expect("just pushed").push(e);
    }
    let n_files = groups.len();
    let mut weight_map = Map::new();
    let mut wire_bytes = 0u64;
    for (i, group) in groups.iter_mut().enumerate() {
        let name = format!("model-{i:05}-of-{n_files:05}.safetensors");
        wire_bytes += write_delta_file(&dir.join(&name), group)?;
        for e in group.iter() {
            weight_map.insert(e.name.clone(), Value::String(name.clone()));
        }
    }
    drop(groups);
    let index = json!({
        "metadata": {
            "version": version_str(opts.version),
            "base_version": version_str(base),
            "delta_encoding": opts.encoding.name(),
            "compression_format": "zstd",
            "checksum_format": opts.checksum.name(),
        },
        "weight_map": weight_map,
    });
    wire_bytes += write_index(dir, &index)?;
    Ok(DiffReport {
        version: opts.version,
        kind: "delta",
        base_version: Some(base),
        encoding: Some(opts.encoding.name().into()),
        checksum: Some(opts.checksum.name().into()),
        path: dir.to_path_buf(),
        tensors_total: new.len(),
        tensors_changed,
        total_bytes,
        changed_bytes,
        density: if total_bytes == 0 { 0.0 } else { changed_bytes as f64 / total_bytes as f64 },
        files: n_files,
        wire_bytes,
        seconds: 0.0,
        seconds_encode,
        seconds_write: write_start.elapsed().as_secs_f64(),
        seconds_hook: 0.0,
        throughput_gbps: 0.0,
        device: engine.device_used(),
    })
}

fn write_delta_file(path: &Path, group: &mut [Encoded]) -> Result<u64> {
    let mut header = Map::new();
    let checksums: Map<String, Value> = group.iter().map(|e| (e.name.clone(), Value::String(e.checksum.clone()))).collect();
    header.insert("__metadata__".into(), Value::Object(checksums));
    let mut offset = 0u64;
    for e in group.iter() {
        header.insert(e.name.clone(), json!({"dtype": "U8", "shape": [e.payload.len], "data_offsets": [offset, offset + e.payload.len]}));
        offset += e.payload.len;
    }
    let head = crate::checkpoint::header_bytes(&Value::Object(header));
    let file = AtomicFile::create(path)?;
    let temp = file.temp_path().to_path_buf();
    let mut out = io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&head).at(&temp)?;
    for e in group.iter_mut() {
        e.payload.copy_to(&mut out).at(&temp)?;
    }
    let file = out.into_inner().map_err(|e| Error::io(&temp, e.into_error()))?;
    file.commit()?;
    Ok(head.len() as u64 + offset)
}

fn write_index(dir: &Path, index: &Value) -> Result<u64> {
    let mut text = serde_json::to_vec_pretty(index).expect("JSON of plain values");
    text.push(b'\n');
    crate::failpoint!("diff.before_index");
    fsio::write_atomic(dir.join(INDEX_NAME), &text)?;
    fsio::remove_durable(&dir.join(INCOMPLETE_MARKER))?;
    Ok(text.len() as u64)
}

fn write_full(new: &Checkpoint, dir: &Path, opts: &DiffOptions) -> Result<DiffReport> {
    let write_start = Instant::now();
    let total_bytes = new.total_bytes();
    // Data files keep their names; a lone file given by path becomes model.safetensors.
    let single_path = opts.new.is_file();
    let mut copies: Vec<(PathBuf, String)> = new
        .files()
        .iter()
        .map(|f| {
            let name = if single_path { SINGLE_NAME.to_string() } else { f.path().file_name().expect("file").to_string_lossy().into_owned() };
            (f.path().to_path_buf(), name)
        })
        .collect();
    if !single_path {
        // Config and tokenizer files ride along, so the version is a loadable HF checkpoint.
        for e in std::fs::read_dir(&opts.new).at(&opts.new)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
            if is_file && is_plain_file_name(&name) && name != INDEX_NAME && !copies.iter().any(|(_, n)| *n == name) {
                copies.push((e.path(), name));
            }
        }
    }
    let bar = crate::progress::bytes_bar(total_bytes, "copy");
    let wire: u64 = copies
        .par_iter()
        .map(|(src, name)| {
            let n = fsio::copy_atomic(src, &dir.join(name))?;
            bar.inc(n);
            Ok(n)
        })
        .collect::<Result<Vec<u64>>>()?
        .into_iter()
        .sum();
    bar.finish_and_clear();
    let mut weight_map = Map::new();
    let mut names: Vec<(&str, &str)> = new
        .tensors()
        .map(|(n, l)| {
            let fi = l.file;
            (n, copies[fi].1.as_str())
        })
        .collect();
    names.sort();
    for (n, f) in names {
        weight_map.insert(n.to_string(), Value::String(f.to_string()));
    }
    let mut metadata = new.index().map(|i| i.metadata.clone()).unwrap_or_default();
    metadata.remove("delta_encoding");
    metadata.insert("version".into(), Value::String(version_str(opts.version)));
    metadata.insert("total_size".into(), json!(total_bytes));
    let index = json!({"metadata": metadata, "weight_map": weight_map});
    let wire_bytes = wire + write_index(dir, &index)?;
    Ok(DiffReport {
        version: opts.version,
        kind: "full",
        base_version: None,
        encoding: None,
        checksum: None,
        path: dir.to_path_buf(),
        tensors_total: new.len(),
        tensors_changed: new.len(),
        total_bytes,
        changed_bytes: total_bytes,
        density: 1.0,
        files: copies.len(),
        wire_bytes,
        seconds: 0.0,
        seconds_encode: 0.0,
        seconds_write: write_start.elapsed().as_secs_f64(),
        seconds_hook: 0.0,
        throughput_gbps: 0.0,
        device: "cpu",
    })
}
