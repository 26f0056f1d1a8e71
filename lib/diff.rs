//! `delta-diff`: publish NEW as weight version N under SRC, either as a delta against OLD
//! (only the changed tensors, one zstd frame each) or, with `full`, as a full checkpoint.
//!
//! Tensors are encoded in parallel, workers taking them in schedule order, each read from OLD
//! and NEW a 256 KiB window at a time, through the inputs' maps (`codec::MappedPair`) or with
//! pread (`codec::PreadPair`), whichever this kernel makes cheaper ([`resolve_input_read`],
//! crate::inputmap; the GPU path reads the maps). Each payload
//! is built in a [`SpillArea`]: in memory while the process-wide budget (`--payload-memory`)
//! lasts, in shared nameless scratch files after that, so memory and descriptors stay bounded
//! whatever the model size. As soon as
//! every payload before it in the file is done, it goes into its data file ([`DeltaFiles`]),
//! still under a temp name, and the kernel is asked to start writing it back, so the write
//! and most of the final fsync overlap the encode. The files are fsynced and renamed at the
//! end; the index goes last and is the version's commit marker.

use crate::checkpoint::{Checkpoint, INDEX_NAME, SINGLE_NAME};
use crate::checksum::ChecksumAlg;
use crate::codec::PayloadError;
use crate::error::{Error, IoContext, Result};
use crate::fsio::{self, AtomicFile};
use crate::inputmap::InputRead;
use crate::version::{version_dir_name, version_str, Encoding, VersionDir, INCOMPLETE_MARKER};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Payload bytes all threads together may hold in memory before payloads spill to scratch
    /// files in the version directory (`--payload-memory`; default [`IN_MEMORY_BUDGET`]).
    pub payload_memory: usize,
    /// Which processor computes the diffs (`--device`; lib/gpu, docs/GPU.md).
    pub device: crate::gpu::Device,
    /// How the CPU reads OLD's and NEW's tensors (`--input-read`; crate::inputmap).
    pub input_read: InputRead,
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
    /// Payloads that outgrew the in-memory budget and went through a scratch file.
    pub payloads_spilled: usize,
    /// `cuda` if any tensor was diffed on the GPU, else `cpu`.
    pub device: &'static str,
    /// Why `--device auto` left the GPU out (`null` otherwise).
    pub device_note: Option<String>,
    /// Worker threads the tensors were encoded on (`--threads`).
    pub threads: usize,
    /// How the CPU read the tensors: `mmap` or `pread` (`--input-read`, what `auto` chose);
    /// `null` for a full version, whose files are copied.
    pub input_read: Option<&'static str>,
    /// Ride-along files (config, tokenizer, …) NEW holds differently from OLD, which a delta
    /// does not carry ([`ride_along_changes`]); empty for a full version.
    pub ride_along_changed: Vec<String>,
    /// What was printed to stderr as a warning.
    pub warnings: Vec<String>,
}

/// Publish version `opts.version`; see the module docs.
pub fn publish(opts: &DiffOptions) -> Result<DiffReport> {
    let start = Instant::now();
    if opts.version == 0 {
        return Err(Error::Usage("version 0 is the engine's base checkpoint and cannot be published".into()));
    }
    let full_by_period = opts.full_every.is_some_and(|k| k > 0 && opts.version.is_multiple_of(k));
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
    let mut ride_along_changed = Vec::new();
    let mut old_sample = None;
    if let Some(old) = &old {
        check_compatible(old, &new, &opts.old, &opts.new)?;
        let sample = old.content_sample();
        check_old_is_published_base(&opts.publish, base_version.expect("delta has a base"), &sample, &opts.old)?;
        old_sample = Some(sample);
        ride_along_changed = ride_along_changes(old, &new)?;
    }
    // GPU or CPU per tensor (lib/gpu); chosen before anything is written, `--device cuda` with no GPU is a usage error.
    let engine = if opts.full {
        crate::gpu::Engine::cpu()
    } else {
        let candidates = new.files().iter().flat_map(|f| f.tensors()).map(|t| t.len as u64).filter(|&l| l >= crate::gpu::AUTO_MIN_BYTES as u64).sum();
        crate::gpu::Engine::select(opts.device, candidates, crate::cli::worker_threads())?
    };
    if opts.full {
        // A full version is a copy of NEW: refuse one that cannot fit before the version
        // directory exists, rather than fill the shared disk under the other writers on it.
        let needed = full_version_files(&new, opts)?.iter().map(|(src, _)| std::fs::metadata(src).map(|m| m.len()).unwrap_or(0)).sum();
        fsio::check_room_for_copy(&opts.new, &opts.publish, needed, &format!("publish version {} in full", opts.version))?;
    }
    let dir = create_version_dir(&opts.publish, opts.version, opts.replace_incomplete)?;
    let unpublished = Unpublished(&dir);
    let mut report = match &old {
        Some(old) => write_delta(old, &new, &dir, opts, base_version.expect("delta has a base"), old_sample.as_deref().expect("sampled with OLD"), &engine)?,
        None => write_full(&new, &dir, opts)?,
    };
    std::mem::forget(unpublished);
    let hook_start = Instant::now();
    if let Some(cmd) = &opts.post_write_hook {
        crate::hooks::run_hook(cmd, opts.version, &dir, &opts.publish)?;
    }
    report.seconds_hook = hook_start.elapsed().as_secs_f64();
    report.seconds = start.elapsed().as_secs_f64();
    report.throughput_gbps = report.total_bytes as f64 / report.seconds.max(1e-9) / 1e9;
    report.threads = crate::cli::worker_threads();
    if !ride_along_changed.is_empty() {
        let w = format!(
            "{} of NEW {} from OLD's, and a delta version carries tensors only: rollout hosts keep the copies of their last full version (publish a --full version to ship them)",
            ride_along_changed.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", "),
            if ride_along_changed.len() == 1 { "differs" } else { "differ" },
        );
        eprintln!("delta-diff: warning: {w}");
        report.warnings.push(w);
    }
    report.ride_along_changed = ride_along_changed.into_iter().map(|c| c.name).collect();
    Ok(report)
}

/// Refuse, before anything is written, a delta whose OLD is not version `base` as published in
/// `src`: one made against other weights would be applied onto version `base` on every host
/// and fail its checksums there (xor) or leave its unchanged tensors wrong (overwrite). Compared
/// by content sample (docs/FORMATS.md §4) with the `sample` the base version's index records;
/// a base that is 0 (the engine's own checkpoint), not in `src` (collected, or published
/// elsewhere), unreadable, or written without a sample (slime, older disagg) is not checked.
fn check_old_is_published_base(src: &Path, base: u64, old_sample: &str, old_path: &Path) -> Result<()> {
    if base == 0 {
        return Ok(());
    }
    let Ok(published) = VersionDir::open(src, base) else { return Ok(()) };
    match published.sample() {
        Some(s) if s != old_sample => Err(Error::conflict(
            old_path,
            format!(
                "holds other weights than version {base} as published in {} (content sample {old_sample}; version {base} records {s}): a delta against it would not apply to what the hosts hold. Pass the checkpoint version {base} was published from as OLD, or the version OLD is as --base-version",
                published.path.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// Ride-along files are compared byte for byte up to this size and by length above it: a
/// trainer's directory may hold optimizer state of several times the model's size.
pub const RIDE_ALONG_COMPARE_BYTES: u64 = 64 << 20;

/// A ride-along file that NEW holds differently from OLD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RideAlongChange {
    pub name: String,
    /// `None`: in both, with other bytes; `Some(true)`: only in NEW; `Some(false)`: only in OLD.
    pub only_in_new: Option<bool>,
}

impl std::fmt::Display for RideAlongChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.only_in_new {
            None => write!(f, "{}", self.name),
            Some(true) => write!(f, "{} (only in NEW)", self.name),
            Some(false) => write!(f, "{} (only in OLD)", self.name),
        }
    }
}

/// The ride-along files (`Checkpoint::ride_along_files`) in which two checkpoint directories
/// differ. A delta carries tensors only, so a changed `config.json` or tokenizer never reaches
/// hosts that apply it; `publish` warns. Nothing when either side is a lone file.
pub fn ride_along_changes(old: &Checkpoint, new: &Checkpoint) -> Result<Vec<RideAlongChange>> {
    if !(old.is_dir() && new.is_dir()) {
        return Ok(Vec::new());
    }
    let (olds, news) = (old.ride_along_files()?, new.ride_along_files()?);
    let mut changes = Vec::new();
    for name in &news {
        if !olds.contains(name) {
            changes.push(RideAlongChange { name: name.clone(), only_in_new: Some(true) });
        } else if !same_bytes(&old.root().join(name), &new.root().join(name))? {
            changes.push(RideAlongChange { name: name.clone(), only_in_new: None });
        }
    }
    for name in olds.iter().filter(|n| !news.contains(n)) {
        changes.push(RideAlongChange { name: name.clone(), only_in_new: Some(false) });
    }
    changes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(changes)
}

/// Whether two files hold the same bytes (length only above [`RIDE_ALONG_COMPARE_BYTES`]).
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (File::open(a).at(a)?, File::open(b).at(b)?);
    let len = fa.metadata().at(a)?.len();
    if len != fb.metadata().at(b)?.len() {
        return Ok(false);
    }
    if len > RIDE_ALONG_COMPARE_BYTES {
        return Ok(true);
    }
    let (mut ba, mut bb) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(ba.len());
        fa.read_exact(&mut ba[..n]).at(a)?;
        fb.read_exact(&mut bb[..n]).at(b)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        left -= n;
    }
    Ok(true)
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

/// The version directory this run created, until its index is written: a run that fails with
/// an error (or panics) removes it, so nothing half-written is left and a plain rerun of the
/// same command publishes. Only a killed run leaves an incomplete directory (refused until
/// `--replace-incomplete`).
struct Unpublished<'a>(&'a Path);

impl Drop for Unpublished<'_> {
    fn drop(&mut self) {
        // With the index in place the version may already be visible: never remove it then.
        // A failed removal leaves the incomplete directory, which readers refuse as before.
        if !self.0.join(INDEX_NAME).exists() {
            let _ = fsio::remove_tree_durable(self.0);
        }
    }
}

fn create_version_dir(src: &Path, version: u64, replace_incomplete: bool) -> Result<PathBuf> {
    fsio::create_dir_durable(src)?;
    let dir = src.join(version_dir_name(version));
    if dir.exists() {
        if dir.join(INDEX_NAME).exists() {
            return Err(Error::conflict(&dir, format!("version {version} is already published; versions are immutable, publish a new number")));
        }
        if !replace_incomplete {
            return Err(Error::conflict(
                &dir,
                format!("an incomplete version {version} exists (a publisher crashed or is still writing); rerun with --replace-incomplete if no publisher is running"),
            ));
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

/// Where the payloads of one delta are built: in memory while the shared budget lasts, after
/// that in a few nameless scratch files in the version directory ([`fsio::scratch_file`]; they
/// vanish if the process dies), payloads back to back. A payload under construction has a
/// scratch file to itself, taken from `free` and given back with its new end once the payload
/// is complete, so the files (and descriptors) are bounded by the payloads under construction
/// at once, about one per worker, not by the payloads waiting their turn to be written: those
/// are thousands on a model with many small tensors behind a large one.
struct SpillArea<'a> {
    dir: &'a Path,
    /// Payload bytes that may still be reserved in memory.
    budget: AtomicUsize,
    /// Scratch files no payload is being built in, each with the end of its data.
    free: Mutex<Vec<(Arc<File>, u64)>>,
    /// Complete payloads that went to a scratch file.
    spilled: AtomicUsize,
}

impl<'a> SpillArea<'a> {
    fn new(dir: &'a Path, budget: usize) -> Self {
        SpillArea { dir, budget: AtomicUsize::new(budget), free: Mutex::default(), spilled: AtomicUsize::new(0) }
    }

    /// A scratch file to build a payload in, and where its free space starts.
    fn take_file(&self) -> io::Result<(Arc<File>, u64)> {
        match self.free.lock().map_err(|_| io::Error::other("spill area poisoned"))?.pop() {
            Some(f) => Ok(f),
            None => Ok((Arc::new(fsio::scratch_file(self.dir)?), 0)),
        }
    }

    fn give_back(&self, file: Arc<File>, end: u64) {
        if let Ok(mut free) = self.free.lock() {
            free.push((file, end));
        }
    }

    fn try_reserve(&self, n: usize) -> bool {
        let mut cur = self.budget.load(Ordering::Relaxed);
        loop {
            if cur < n {
                return false;
            }
            match self.budget.compare_exchange_weak(cur, cur - n, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    fn unreserve(&self, n: usize) {
        self.budget.fetch_add(n, Ordering::AcqRel);
    }
}

/// A payload's bytes: in memory, or `len` bytes at `start` of a scratch file (`building`: the
/// file is still this payload's alone, not yet given back to the area).
enum Spill {
    Mem(Vec<u8>),
    File { file: Arc<File>, start: u64, len: u64, building: bool },
}

struct SpillWriter<'a> {
    area: &'a SpillArea<'a>,
    /// Budget bytes this payload holds.
    reserved: usize,
    state: Spill,
}

impl<'a> SpillWriter<'a> {
    fn new(area: &'a SpillArea<'a>) -> Self {
        SpillWriter { area, reserved: 0, state: Spill::Mem(Vec::new()) }
    }

    #[cfg(test)]
    fn spilled(&self) -> bool {
        matches!(self.state, Spill::File { .. })
    }

    /// Move what is in memory to a scratch file and go on there.
    fn spill(&mut self) -> io::Result<()> {
        let (file, start) = self.area.take_file()?;
        let moved = match std::mem::replace(&mut self.state, Spill::File { file, start, len: 0, building: true }) {
            Spill::Mem(v) => v,
            Spill::File { .. } => unreachable!("spilled twice"),
        };
        self.area.unreserve(std::mem::take(&mut self.reserved));
        self.write_all(&moved)
    }

    /// The payload is complete: its scratch file, if any, goes back to the area for the next.
    fn into_payload(mut self) -> Payload<'a> {
        let len = match &mut self.state {
            Spill::Mem(v) => v.len() as u64,
            Spill::File { file, start, len, building } => {
                *building = false;
                self.area.give_back(file.clone(), *start + *len);
                self.area.spilled.fetch_add(1, Ordering::Relaxed);
                *len
            }
        };
        Payload { len, writer: self }
    }
}

impl Write for SpillWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Spill::Mem(v) = &self.state {
            let need = v.len() + data.len();
            if need > self.reserved {
                // Doubling steps from 16 KiB: few atomic operations for a large payload, and
                // a small one holds little more than it uses.
                let want = (need - self.reserved).max(self.reserved).max(16 << 10);
                if self.area.try_reserve(want) {
                    self.reserved += want;
                } else {
                    self.spill()?;
                }
            }
        }
        match &mut self.state {
            Spill::Mem(v) => v.extend_from_slice(data),
            Spill::File { file, start, len, .. } => {
                file.write_all_at(data, *start + *len)?;
                *len += data.len() as u64;
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SpillWriter<'_> {
    fn drop(&mut self) {
        self.area.unreserve(self.reserved);
        // Abandoned while being built (an error, or an unchanged tensor's frame): its space in
        // the file is free again.
        if let Spill::File { file, start, building: true, .. } = &self.state {
            self.area.give_back(file.clone(), *start);
        }
    }
}

struct Payload<'a> {
    len: u64,
    writer: SpillWriter<'a>,
}

impl Payload<'_> {
    fn copy_to(&self, out: &mut impl Write) -> io::Result<()> {
        match &self.writer.state {
            Spill::Mem(v) => out.write_all(v),
            Spill::File { file, start, len, .. } => {
                let mut buf = vec![0u8; (*len).min(1 << 20) as usize];
                let mut at = 0u64;
                while at < *len {
                    let n = (*len - at).min(buf.len() as u64) as usize;
                    file.read_exact_at(&mut buf[..n], start + at)?;
                    out.write_all(&buf[..n])?;
                    at += n as u64;
                }
                // Written where it belongs: its disk space goes back (where the file system can).
                fsio::release_range(file, *start, *len);
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

/// What `mode` comes to for this pair: `auto` probes the largest data file of NEW and of OLD
/// ([`crate::inputmap::probe_reads`]) and reads through the maps only if, for both, faulting
/// pages in costs well under what copying them does.
pub fn resolve_input_read(mode: InputRead, old: &Checkpoint, new: &Checkpoint) -> InputRead {
    if mode != InputRead::Auto {
        return mode;
    }
    let probe = |c: &Checkpoint| {
        let f = c.files().iter().max_by_key(|f| f.len())?;
        crate::inputmap::probe_reads(f.map(), f.file(), f.tensors().first()?.offset..f.len())
    };
    match (probe(new), probe(old)) {
        (Some(n), Some(o)) if n.prefers_map() && o.prefers_map() => InputRead::Mmap,
        _ => InputRead::Pread,
    }
}

fn write_delta(old: &Checkpoint, new: &Checkpoint, dir: &Path, opts: &DiffOptions, base: u64, old_sample: &str, engine: &crate::gpu::Engine) -> Result<DiffReport> {
    let encode_start = Instant::now();
    let read = resolve_input_read(opts.input_read, old, new);
    // Tests change the inputs here, after they are opened and before they are read.
    crate::failpoint!("diff.before_encode");
    // Data order of NEW, so the reads walk each file front to back.
    let mut order: Vec<_> = new.tensors().map(|(n, l)| (n.to_string(), l)).collect();
    order.sort_by_key(|(_, l)| (l.file, new.entry(*l).1.offset));
    let total_bytes = new.total_bytes();
    let bar = crate::progress::bytes_bar(total_bytes, "diff");
    let area = SpillArea::new(dir, opts.payload_memory);
    // Largest tensors first, one task each: the last tensors to finish are small ones, so no
    // core idles behind a late embedding matrix. The stable sort keeps NEW's data order among
    // equals, so the schedule, and with it the data files' layout, is deterministic.
    let mut schedule: Vec<usize> = (0..order.len()).collect();
    schedule.sort_by_key(|&i| std::cmp::Reverse(new.entry(order[i].1).1.len));
    let names: Vec<&str> = schedule.iter().map(|&i| order[i].0.as_str()).collect();
    let files = DeltaFiles::new(dir, opts.max_file_bytes, names, opts.checksum.hex_len(), header_number_bound(total_bytes, order.len()));
    // Every worker takes the next tensor of the schedule from one counter, so tensors finish
    // about in schedule order, which is file order: a parallel iterator would split the schedule
    // in halves, and every payload of the second half would wait, in memory or in a scratch
    // file, for the whole first half to be written.
    let next = AtomicUsize::new(0);
    let encode_one = |j: usize, i: usize| -> Result<()> {
        // A stop signal ends the publish between tensors; `Unpublished` removes the version.
        crate::stop::check()?;
        let (name, loc) = &order[i];
        let (nf, nt) = new.entry(*loc);
        let (of, ot) = old.get(name).expect("compatibility checked");
        let mut w = SpillWriter::new(&area);
        let mut hasher = opts.checksum.hasher();
        // Encoded whole, then dropped if nothing changed: the scan is what finds out, and
        // a frame of an unchanged tensor costs little more than that scan.
        let changed = engine.encode(opts.encoding, read, of.input(ot), nf.input(nt), &mut w, &mut hasher).map_err(|e| match e {
            PayloadError::Io(io) => Error::io(dir, io),
            PayloadError::Source { path, source } => Error::io(path, source),
            other => Error::bad_input(nf.path(), format!("tensor {name:?}: {other}")),
        })?;
        let out = (changed > 0).then(|| Encoded { name: name.clone(), checksum: hasher.finish_hex(), changed, payload: w.into_payload() });
        files.complete(j, out)?;
        bar.inc(nt.len as u64);
        Ok(())
    };
    rayon::broadcast(|_| -> Result<()> {
        loop {
            let j = next.fetch_add(1, Ordering::Relaxed);
            let Some(&i) = schedule.get(j) else { return Ok(()) };
            if let Err(e) = encode_one(j, i) {
                // The others stop at their next tensor.
                next.store(schedule.len(), Ordering::Relaxed);
                return Err(e);
            }
        }
    })
    .into_iter()
    .collect::<Result<Vec<()>>>()?;
    bar.finish_and_clear();
    let seconds_encode = encode_start.elapsed().as_secs_f64();

    let write_start = Instant::now();
    let written = files.finish()?;
    let mut weight_map = Map::new();
    for (file, tensors) in &written.files {
        for t in tensors {
            weight_map.insert(t.clone(), Value::String(file.clone()));
        }
    }
    let index = json!({
        "metadata": {
            "version": version_str(opts.version),
            "base_version": version_str(base),
            "delta_encoding": opts.encoding.name(),
            "compression_format": "zstd",
            "checksum_format": opts.checksum.name(),
            "base_sample": old_sample,
            "sample": new.content_sample(),
        },
        "weight_map": weight_map,
    });
    let wire_bytes = written.bytes + write_index(dir, &index)?;
    Ok(DiffReport {
        version: opts.version,
        kind: "delta",
        base_version: Some(base),
        encoding: Some(opts.encoding.name().into()),
        checksum: Some(opts.checksum.name().into()),
        path: dir.to_path_buf(),
        tensors_total: new.len(),
        tensors_changed: written.tensors_changed,
        total_bytes,
        changed_bytes: written.changed_bytes,
        density: if total_bytes == 0 { 0.0 } else { written.changed_bytes as f64 / total_bytes as f64 },
        files: written.files.len(),
        wire_bytes,
        seconds: 0.0,
        seconds_encode,
        seconds_write: write_start.elapsed().as_secs_f64(),
        seconds_hook: 0.0,
        throughput_gbps: 0.0,
        payloads_spilled: area.spilled.load(Ordering::Relaxed),
        threads: 0,
        device: engine.device_used(),
        device_note: engine.note().map(str::to_string),
        input_read: Some(read.as_str()),
        ride_along_changed: Vec::new(),
        warnings: Vec::new(),
    })
}

/// Bytes of payload written between two early-writeback requests.
const WRITEBACK_BATCH: u64 = 1 << 20;

/// Header padding beyond 8-byte alignment that a data file may keep (docs/FORMATS.md §4.2):
/// at most this many bytes, or 1/[`HEADER_SLACK_RATIO`] of its payload if that is more.
/// Beyond that the file is rewritten with a compact header.
pub const HEADER_SLACK_BYTES: u64 = 4 << 10;
pub const HEADER_SLACK_RATIO: u64 = 256;

/// The largest number (payload length or offset) a delta header could hold, for the room
/// reserved for it: no payload takes more than 5 bytes per tensor byte (`overwrite` of a
/// tensor that changed everywhere) plus framing. Only the digit count matters, and a header
/// that outgrows its room anyway is rewritten, not cut.
fn header_number_bound(total_bytes: u64, tensors: usize) -> u64 {
    total_bytes.saturating_mul(6).saturating_add(4096u64.saturating_mul(tensors as u64 + 1))
}

/// The delta's data files, written while the encode still runs, so that writing and most of
/// the disk's writeback overlap the scan instead of following it.
///
/// Payloads go in schedule order (largest tensor first, ties in NEW's data order), each as soon
/// as every payload before it is done: a file's layout does not depend on thread timing. Each
/// file starts with room reserved for its header, sized for every tensor still to come with
/// the longest numbers possible; the header, written into that room at the end, is padded with
/// spaces to fill it. A file whose padding would exceed [`HEADER_SLACK_BYTES`] (or
/// 1/[`HEADER_SLACK_RATIO`] of its payload), or whose header outgrew the room, is rewritten
/// compactly instead. Files stay under temp names until [`DeltaFiles::finish`], which alone
/// knows how many there are (`model-I-of-N`).
struct DeltaFiles<'a> {
    dir: &'a Path,
    max_file_bytes: u64,
    /// Tensor names in schedule order.
    names: Vec<&'a str>,
    checksum_hex: usize,
    max_number: u64,
    /// Finished tensors not written yet, by schedule position (`None`: unchanged).
    pending: Mutex<BTreeMap<usize, Option<Encoded<'a>>>>,
    writer: Mutex<FilesWriter>,
}

#[derive(Default)]
struct FilesWriter {
    /// Schedule position of the next payload to write.
    next: usize,
    files: Vec<DataFile>,
    changed_bytes: u64,
    tensors_changed: usize,
}

struct DataFile {
    file: AtomicFile,
    /// Bytes at the start of the file kept for the header.
    room: u64,
    /// (name, checksum, payload length) in file order.
    entries: Vec<(String, String, u64)>,
    /// Payload bytes after the room (gathered ones included).
    size: u64,
    /// Small payloads gathered for one write: one system call per MiB rather than per tensor,
    /// which on a model of many small tensors is what the encoders would wait for.
    gathered: Vec<u8>,
    /// Payload bytes handed to the kernel.
    written: u64,
    /// Of those, bytes written since the last early-writeback request.
    unsynced: u64,
}

impl DataFile {
    /// Hand the gathered bytes to the kernel, and start writeback once a batch is written.
    fn flush(&mut self) -> Result<()> {
        if !self.gathered.is_empty() {
            self.file.file().write_all(&self.gathered).map_err(|e| self.file.io_error(e))?;
            self.wrote(self.gathered.len() as u64);
            self.gathered.clear();
        }
        Ok(())
    }

    fn wrote(&mut self, n: u64) {
        self.written += n;
        self.unsynced += n;
        if self.unsynced >= WRITEBACK_BATCH {
            fsio::start_writeback(self.file.file(), self.room + self.written - self.unsynced, self.unsynced);
            self.unsynced = 0;
        }
    }
}

/// What [`DeltaFiles::finish`] committed.
struct WrittenFiles {
    /// Each data file's name and its tensors.
    files: Vec<(String, Vec<String>)>,
    /// Data file bytes, headers included.
    bytes: u64,
    changed_bytes: u64,
    tensors_changed: usize,
}

impl<'a> DeltaFiles<'a> {
    fn new(dir: &'a Path, max_file_bytes: u64, names: Vec<&'a str>, checksum_hex: usize, max_number: u64) -> Self {
        DeltaFiles { dir, max_file_bytes, names, checksum_hex, max_number, pending: Mutex::default(), writer: Mutex::default() }
    }

    /// Tensor `position` (in schedule order) is done. Writes what has become writable unless
    /// another thread is writing already; that one, or a later call, or `finish` picks it up.
    fn complete(&self, position: usize, tensor: Option<Encoded<'a>>) -> Result<()> {
        self.pending.lock().expect("pending payloads").insert(position, tensor);
        match self.writer.try_lock() {
            Ok(mut w) => self.drain(&mut w),
            Err(std::sync::TryLockError::WouldBlock) => Ok(()),
            Err(std::sync::TryLockError::Poisoned(p)) => Err(poisoned(p)),
        }
    }

    /// Write every pending payload whose predecessors are all written.
    fn drain(&self, w: &mut FilesWriter) -> Result<()> {
        loop {
            let tensor = {
                let mut pending = self.pending.lock().expect("pending payloads");
                match pending.first_key_value() {
                    Some((&k, _)) if k == w.next => pending.pop_first().expect("just seen").1,
                    _ => return Ok(()),
                }
            };
            w.next += 1;
            if let Some(e) = tensor {
                self.append(w, w.next - 1, e)?;
            }
        }
    }

    fn append(&self, w: &mut FilesWriter, position: usize, e: Encoded<'a>) -> Result<()> {
        crate::stop::check()?;
        let len = e.payload.len;
        let roll = w.files.last().is_none_or(|f| !f.entries.is_empty() && f.size + len > self.max_file_bytes);
        if roll {
            let room = self.header_room(&self.names[position..]);
            // Named for real in finish, once the number of files is known.
            let file = AtomicFile::create(self.dir.join(format!("model-{:05}.safetensors", w.files.len())))?;
            let mut f = file.file();
            f.seek(io::SeekFrom::Start(room)).map_err(|e| file.io_error(e))?;
            if let Some(last) = w.files.last_mut() {
                last.flush()?;
            }
            w.files.push(DataFile { file, room, entries: Vec::new(), size: 0, gathered: Vec::new(), written: 0, unsynced: 0 });
        }
        let f = w.files.last_mut().expect("a file is open");
        if f.gathered.len() as u64 + len > WRITEBACK_BATCH {
            f.flush()?;
        }
        if len >= WRITEBACK_BATCH {
            e.payload.copy_to(&mut f.file.file()).map_err(|e| f.file.io_error(e))?;
            f.wrote(len);
        } else {
            e.payload.copy_to(&mut f.gathered).map_err(|e| f.file.io_error(e))?;
        }
        f.entries.push((e.name, e.checksum, len));
        f.size += len;
        w.changed_bytes += e.changed;
        w.tensors_changed += 1;
        // Killed here, a publisher leaves temp data files in an incomplete version.
        crate::failpoint!("diff.after_payload");
        Ok(())
    }

    /// Bytes a header naming all of `names` could need, numbers at their longest.
    fn header_room(&self, names: &[&str]) -> u64 {
        let checksum = "0".repeat(self.checksum_hex);
        let n = self.max_number;
        let entries: Vec<HeaderEntry> = names.iter().map(|&name| HeaderEntry { name, checksum: &checksum, len: n, begin: n, end: n }).collect();
        delta_file_header(&entries).len() as u64
    }

    /// Write the headers, rename every file to `model-I-of-N` and fsync the directory.
    fn finish(self) -> Result<WrittenFiles> {
        let mut w = std::mem::take(&mut *self.writer.lock().map_err(poisoned)?);
        self.drain(&mut w)?;
        let left = self.pending.lock().map_err(poisoned)?.len();
        if left != 0 || w.next != self.names.len() {
            return Err(Error::Internal(format!("{left} payloads left unwritten, {} of {} tensors seen", w.next, self.names.len())));
        }
        let n = w.files.len();
        let dirs = fsio::DirSync::default();
        let mut out = WrittenFiles { files: Vec::new(), bytes: 0, changed_bytes: w.changed_bytes, tensors_changed: w.tensors_changed };
        for (k, mut f) in w.files.into_iter().enumerate() {
            f.flush()?;
            let name = format!("model-{k:05}-of-{n:05}.safetensors");
            let mut offset = 0u64;
            let entries: Vec<HeaderEntry> = f
                .entries
                .iter()
                .map(|(name, checksum, len)| {
                    offset += len;
                    HeaderEntry { name, checksum, len: *len, begin: offset - len, end: offset }
                })
                .collect();
            let head = delta_file_header(&entries);
            let compact = head.len() as u64;
            let slack_ok = compact <= f.room && f.room - compact <= HEADER_SLACK_BYTES.max(f.size / HEADER_SLACK_RATIO);
            let mut file = if slack_ok {
                let head = crate::checkpoint::pad_header_bytes(head, f.room as usize).expect("fits: checked");
                f.file.file().write_all_at(&head, 0).map_err(|e| f.file.io_error(e))?;
                f.file
            } else {
                rewrite_compact(&f, &head, &self.dir.join(&name))?
            };
            file.set_target(self.dir.join(&name));
            file.commit_deferred(&dirs)?;
            out.bytes += f.size + if slack_ok { f.room } else { compact };
            out.files.push((name, f.entries.into_iter().map(|(t, _, _)| t).collect()));
        }
        dirs.sync()?;
        Ok(out)
    }
}

/// The error for a lock a panicking writer thread left poisoned.
fn poisoned<T>(_: T) -> Error {
    Error::Internal("a delta writer thread panicked".into())
}

/// One payload's entry in a delta data file's header.
#[derive(Clone, Copy)]
struct HeaderEntry<'e> {
    name: &'e str,
    /// Checksum of the tensor's new bytes.
    checksum: &'e str,
    /// Payload bytes, and where they lie in the data section.
    len: u64,
    begin: u64,
    end: u64,
}

/// A delta data file's header, framed ([`crate::checkpoint::header_frame`]): `__metadata__`
/// (tensor → checksum of its new bytes), then one 1-D `U8` entry per payload, in file order;
/// the bytes serde_json writes for that object. Written directly rather than through a
/// `serde_json::Value`: a MoE model has tens of thousands of tensors, and the tree of maps cost
/// about 3 µs an entry, spent by the writer while the encoders' payloads piled up behind it.
fn delta_file_header(entries: &[HeaderEntry]) -> Vec<u8> {
    use std::io::Write as _;
    let string = |out: &mut Vec<u8>, s: &str| serde_json::to_writer(out, s).expect("JSON of a string");
    let mut json = Vec::with_capacity(entries.iter().map(|e| 2 * e.name.len() + e.checksum.len() + 80).sum::<usize>() + 32);
    json.extend_from_slice(br#"{"__metadata__":{"#);
    for (k, e) in entries.iter().enumerate() {
        if k > 0 {
            json.push(b',');
        }
        string(&mut json, e.name);
        json.push(b':');
        string(&mut json, e.checksum);
    }
    json.push(b'}');
    for e in entries {
        json.push(b',');
        string(&mut json, e.name);
        write!(json, r#":{{"dtype":"U8","shape":[{}],"data_offsets":[{},{}]}}"#, e.len, e.begin, e.end).expect("writes to a Vec");
    }
    json.push(b'}');
    crate::checkpoint::header_frame(json)
}

/// Copy `f`'s payloads into a new temp file behind the compact header bytes `head` (the
/// reserved room was too small or too large); `f`'s temp file goes when it is dropped.
fn rewrite_compact(f: &DataFile, head: &[u8], target: &Path) -> Result<AtomicFile> {
    let out = AtomicFile::create(target)?;
    let mut dst = out.file();
    dst.write_all(head).map_err(|e| out.io_error(e))?;
    let mut src = f.file.file();
    src.seek(io::SeekFrom::Start(f.room)).map_err(|e| f.file.io_error(e))?;
    let copied = io::copy(&mut src.take(f.size), &mut dst).map_err(|e| out.io_error(e))?;
    if copied != f.size {
        return Err(f.file.io_error(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{copied} of {} payload bytes read back", f.size))));
    }
    Ok(out)
}

fn write_index(dir: &Path, index: &Value) -> Result<u64> {
    let mut text = serde_json::to_vec_pretty(index).expect("JSON of plain values");
    text.push(b'\n');
    crate::failpoint!("diff.before_index");
    // The last point a stop signal can take back the publish; past it the version is complete.
    crate::stop::check()?;
    fsio::write_atomic(dir.join(INDEX_NAME), &text)?;
    fsio::remove_durable(&dir.join(INCOMPLETE_MARKER))?;
    Ok(text.len() as u64)
}

/// What a full version of `new` is made of: (file to copy, its name in the version directory),
/// data files first, in `new`'s file order.
fn full_version_files(new: &Checkpoint, opts: &DiffOptions) -> Result<Vec<(PathBuf, String)>> {
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
    // Config and tokenizer files ride along, so the version is a loadable HF checkpoint.
    for name in new.ride_along_files()? {
        copies.push((opts.new.join(&name), name));
    }
    Ok(copies)
}

fn write_full(new: &Checkpoint, dir: &Path, opts: &DiffOptions) -> Result<DiffReport> {
    let write_start = Instant::now();
    let total_bytes = new.total_bytes();
    let copies = full_version_files(new, opts)?;
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
    metadata.remove("base_sample");
    metadata.insert("version".into(), Value::String(version_str(opts.version)));
    metadata.insert("total_size".into(), json!(total_bytes));
    metadata.insert("sample".into(), Value::String(new.content_sample()));
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
        payloads_spilled: 0,
        threads: 0,
        device: "cpu",
        device_note: None,
        input_read: None,
        ride_along_changed: Vec::new(),
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::SafetensorsFile;

    /// A fresh directory under the temp dir, removed when dropped (the tests ran 7 times left
    /// 70 of them behind otherwise).
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("disagg-diff-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn encoded<'a>(area: &'a SpillArea<'a>, name: &str, payload: &[u8]) -> Encoded<'a> {
        let mut w = SpillWriter::new(area);
        w.write_all(payload).unwrap();
        Encoded { name: name.into(), checksum: format!("{:032x}", payload.len()), changed: payload.len() as u64, payload: w.into_payload() }
    }

    /// Tensors `t000…` with payloads of decreasing length (schedule order); `None` entries
    /// are unchanged tensors.
    fn payloads(n: usize, skip: impl Fn(usize) -> bool) -> Vec<(String, Option<Vec<u8>>)> {
        (0..n).map(|i| (format!("model.layers.{i}.weight"), (!skip(i)).then(|| vec![i as u8 + 1; 3000 - 10 * i]))).collect()
    }

    /// Run DeltaFiles over `tensors`, completing them in `completion` order; returns each
    /// file's bytes and the report.
    fn write(dir: &Path, tensors: &[(String, Option<Vec<u8>>)], completion: &[usize], max_file: u64, max_number: u64) -> (Vec<(String, Vec<u8>)>, u64) {
        let (files, bytes, spilled) = write_within(IN_MEMORY_BUDGET, dir, tensors, completion, max_file, max_number);
        assert_eq!(spilled, 0);
        (files, bytes)
    }

    /// [`write`] with `budget` bytes for payloads in memory; also returns how many spilled.
    fn write_within(
        budget: usize,
        dir: &Path,
        tensors: &[(String, Option<Vec<u8>>)],
        completion: &[usize],
        max_file: u64,
        max_number: u64,
    ) -> (Vec<(String, Vec<u8>)>, u64, usize) {
        let area = SpillArea::new(dir, budget);
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        let files = DeltaFiles::new(dir, max_file, names, 32, max_number);
        let mut spilled = 0;
        for &j in completion {
            let (name, p) = &tensors[j];
            let e = p.as_ref().map(|p| encoded(&area, name, p));
            spilled += e.as_ref().is_some_and(|e| e.payload.writer.spilled()) as usize;
            files.complete(j, e).unwrap();
        }
        let out = files.finish().unwrap();
        assert_eq!(area.budget.load(Ordering::Relaxed), budget, "every reservation returned");
        assert_eq!(area.spilled.load(Ordering::Relaxed), spilled);
        let mut got = Vec::new();
        for (f, names) in &out.files {
            let path = dir.join(f);
            // Our parser (every §2 check) takes it, and it holds exactly these tensors, in
            // schedule order, with their payloads.
            let st = SafetensorsFile::open(&path).unwrap();
            let in_file: Vec<&str> = st.tensors().iter().map(|t| t.name.as_str()).collect();
            assert_eq!(in_file, names.iter().map(String::as_str).collect::<Vec<_>>());
            for t in st.tensors() {
                let (_, p) = tensors.iter().find(|(n, _)| *n == t.name).unwrap();
                assert_eq!(st.bytes(t), p.as_deref().unwrap(), "{}", t.name);
                assert_eq!(st.metadata()[&t.name], format!("{:032x}", t.len));
            }
            got.push((f.clone(), std::fs::read(&path).unwrap()));
        }
        let names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().all(|n| !fsio::is_temp_name(n)), "no temp file left: {names:?}");
        assert_eq!(got.iter().map(|(_, b)| b.len() as u64).sum::<u64>(), out.bytes);
        (got, out.bytes, spilled)
    }

    /// Spaces after the header JSON beyond 8-byte alignment.
    fn header_slack(file: &[u8]) -> usize {
        let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        let json = &file[8..8 + n];
        let text = json.iter().rposition(|&b| b != b' ').unwrap() + 1;
        n - text.next_multiple_of(8)
    }

    #[test]
    fn layout_is_schedule_order_whatever_the_completion_order() {
        let tensors = payloads(40, |i| i % 7 == 3);
        let in_order: Vec<usize> = (0..40).collect();
        let mut shuffled = in_order.clone();
        shuffled.reverse();
        shuffled.swap(3, 20);
        let (a, _) = write(&scratch("order-a"), &tensors, &in_order, DEFAULT_MAX_FILE_BYTES, 1 << 40);
        let (b, _) = write(&scratch("order-b"), &tensors, &shuffled, DEFAULT_MAX_FILE_BYTES, 1 << 40);
        assert_eq!(a.len(), 1);
        assert_eq!(a, b, "same bytes whichever thread finished first");
        // Six unchanged names and long-number room: padding kept, within the documented slack.
        let slack = header_slack(&a[0].1);
        assert!(slack > 0 && slack as u64 <= HEADER_SLACK_BYTES, "slack {slack}");
    }

    #[test]
    fn too_much_padding_is_rewritten_compactly() {
        // One changed tensor among 300 unchanged: its room would be mostly spaces.
        let tensors = payloads(300, |i| i != 150);
        let (files, _) = write(&scratch("compact"), &tensors, &(0..300).collect::<Vec<_>>(), DEFAULT_MAX_FILE_BYTES, 1 << 40);
        assert_eq!(files.len(), 1);
        assert_eq!(header_slack(&files[0].1), 0, "compact header");
    }

    #[test]
    fn a_header_that_outgrows_its_room_is_rewritten() {
        // Room sized for 1-digit numbers: the real offsets do not fit.
        let tensors = payloads(12, |_| false);
        let (files, _) = write(&scratch("outgrown"), &tensors, &(0..12).rev().collect::<Vec<_>>(), DEFAULT_MAX_FILE_BYTES, 1);
        assert_eq!(files.len(), 1);
        assert_eq!(header_slack(&files[0].1), 0);
    }

    #[test]
    fn files_roll_over_at_the_cap_and_are_numbered_at_the_end() {
        let tensors = payloads(10, |i| i == 4);
        // Cap below two payloads: one tensor per file; nine files.
        let (files, bytes) = write(&scratch("roll"), &tensors, &[9, 0, 8, 1, 7, 2, 6, 3, 5, 4], 4000, 1 << 40);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<String> = (0..9).map(|i| format!("model-{i:05}-of-00009.safetensors")).collect();
        assert_eq!(names, want);
        assert!(bytes > 9 * 2900);
    }

    #[test]
    fn payloads_past_the_memory_budget_spill_and_are_written_alike() {
        // Completed out of order, so payloads wait for their predecessors while others spill.
        let tensors = payloads(30, |i| i % 5 == 2);
        let completion: Vec<usize> = (0..30).rev().collect();
        let (want, bytes) = write(&scratch("spill-mem"), &tensors, &completion, 20_000, 1 << 40);
        // Room for four payloads (a small one reserves 16 KiB), then none at all.
        for budget in [64 << 10, 0] {
            let dir = scratch(&format!("spill-{budget}"));
            let (got, got_bytes, spilled) = write_within(budget, &dir, &tensors, &completion, 20_000, 1 << 40);
            assert!(spilled > 0, "budget {budget}: nothing spilled");
            assert_eq!((&got, got_bytes), (&want, bytes), "budget {budget}: same files as from memory");
        }
    }

    /// How many scratch files hold these payloads.
    fn scratch_files(held: &[Payload]) -> usize {
        let files: std::collections::BTreeSet<*const File> = held
            .iter()
            .filter_map(|p| match &p.writer.state {
                Spill::File { file, .. } => Some(Arc::as_ptr(file)),
                Spill::Mem(_) => None,
            })
            .collect();
        files.len()
    }

    #[test]
    fn spilled_payloads_share_a_few_scratch_files() {
        let dir = scratch("spill-files");
        let area = SpillArea::new(&dir, 0);
        // Thousands of payloads waiting to be written (a MoE model behind its embedding): one
        // scratch file holds them all, since each was complete before the next began.
        let contents: Vec<Vec<u8>> = (0..3000).map(|i| vec![(i % 251) as u8; 1 + i % 700]).collect();
        let mut held: Vec<Payload> = contents
            .iter()
            .map(|c| {
                let mut w = SpillWriter::new(&area);
                w.write_all(c).unwrap();
                assert!(w.spilled());
                w.into_payload()
            })
            .collect();
        assert_eq!(scratch_files(&held), 1, "scratch files for 3000 spilled payloads");
        // Two under construction at once get a file each; one abandoned gives its space back.
        let (mut a, mut b) = (SpillWriter::new(&area), SpillWriter::new(&area));
        a.write_all(b"first").unwrap();
        b.write_all(b"second").unwrap();
        let Spill::File { start: abandoned, .. } = b.state else { panic!("b spilled") };
        held.push(a.into_payload());
        drop(b);
        let mut c = SpillWriter::new(&area);
        c.write_all(b"third").unwrap();
        let Spill::File { start, .. } = c.state else { panic!("c spilled") };
        assert_eq!(start, abandoned, "the abandoned payload's space is reused");
        held.push(c.into_payload());
        assert_eq!(scratch_files(&held), 2);
        for (p, want) in held.iter().zip(contents.iter().map(Vec::as_slice).chain([&b"first"[..], b"third"])) {
            let mut got = Vec::new();
            p.copy_to(&mut got).unwrap();
            assert!(got == want, "payload of {} bytes read back wrong", want.len());
        }
        assert_eq!(area.spilled.load(Ordering::Relaxed), 3002);
        drop(held);
        assert_eq!(area.budget.load(Ordering::Relaxed), 0);
        assert!(std::fs::read_dir(&*dir).unwrap().next().is_none(), "scratch files have no name");
    }

    #[test]
    fn delta_file_headers_are_what_serde_json_writes() {
        let names = ["model.embed_tokens.weight", "with \"quotes\" and \\", "tab\tnew\nline\u{1}", "ünïcödé ✓", ""];
        let sums: Vec<String> = (0..names.len()).map(|i| format!("{i:032x}")).collect();
        let entries: Vec<HeaderEntry> = names
            .iter()
            .zip(&sums)
            .enumerate()
            .map(|(i, (name, checksum))| HeaderEntry { name, checksum, len: 10 * i as u64 + 1, begin: 100 * i as u64, end: 100 * i as u64 + 10 * i as u64 + 1 })
            .collect();
        let mut header = Map::new();
        header.insert("__metadata__".into(), Value::Object(entries.iter().map(|e| (e.name.to_string(), Value::String(e.checksum.to_string()))).collect()));
        header.extend(entries.iter().map(|e| (e.name.to_string(), json!({"dtype": "U8", "shape": [e.len], "data_offsets": [e.begin, e.end]}))));
        let want = crate::checkpoint::header_bytes(&Value::Object(header));
        assert_eq!(String::from_utf8_lossy(&delta_file_header(&entries)), String::from_utf8_lossy(&want));
        assert!(delta_file_header(&entries) == want);
    }

    #[test]
    fn no_changed_tensor_writes_no_file() {
        let tensors = payloads(5, |_| true);
        let (files, bytes) = write(&scratch("none"), &tensors, &[4, 3, 2, 1, 0], DEFAULT_MAX_FILE_BYTES, 1 << 40);
        assert!(files.is_empty());
        assert_eq!(bytes, 0);
    }
}
