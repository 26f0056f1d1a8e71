//! RefChannel: a stream of SampleRefs through files, safe on NFS and object-store FUSE.
//!
//! Layout of a channel directory (specified byte by byte in `docs/FORMATS.md`, "Ref channel"):
//!
//! ```text
//! CHANNEL/producers/<producer>/seg-<first_seq:016>-<epoch:08>.jsonl   one writer per file
//! CHANNEL/producers/<producer>/heartbeat                             {"pid":..,"host":..,"unix_ms":..,"published":..}
//! CHANNEL/producers/<producer>/closed                                {"published":N}
//! CHANNEL/producers/<producer>/failed                                reason text
//! CHANNEL/cursors/<name>[.r<rank>of<world>].json                     consumer positions and counts
//! ```
//!
//! Every line is a compact SampleRef whose `metadata` ends with
//! `"disagg":{"producer":"P","seq":N,"xxh3":"HHHHHHHHHHHHHHHH"}`; the checksum is the xxh3-64 of
//! the line's bytes before the 16 hex digits, so a line is checked without re-serializing it.
//! A restarted producer derives its published count from its last segment and starts a new
//! segment (new epoch) at the next sequence number; a partial line left by a killed writer is
//! torn only once a later segment exists or the producer closed.
//!
//! SpecForge's single-file layout (`refs.jsonl`, `.closed`, `.failed`, `.consumed_count`,
//! `.consumer_done`, `.consumer_failed`) is read and written with [`Layout::SingleFile`]; there a
//! restarted producer cuts a torn last line off (under the file's lock) before it appends.

use super::sample_ref::{oldest_weight_version_in, sample_id_and_keys_in, sample_id_in, SampleRef, MAX_REF_BYTES, MAX_REF_TEXT_BYTES};
use super::staleness;
use crate::error::{Error, IoContext, Result};
use crate::fsio;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const PRODUCERS_DIR: &str = "producers";
pub const CURSORS_DIR: &str = "cursors";
pub const HEARTBEAT_FILE: &str = "heartbeat";
pub const CLOSED_FILE: &str = "closed";
pub const FAILED_FILE: &str = "failed";
/// SpecForge's single-file layout.
pub const SINGLE_FILE: &str = "refs.jsonl";
/// Single-file layout: refs acknowledged by the consumer group, decimal + `\n`.
pub const CONSUMED_COUNT: &str = ".consumed_count";
/// Single-file layout: cursor files are `CHANNEL/.cursor-<name>[.r<rank>of<world>].json`.
const SINGLE_FILE_CURSOR_PREFIX: &str = ".cursor-";
/// A producer starts a new segment once its current one is this large.
pub const SEGMENT_MAX_BYTES: u64 = 64 << 20;
/// A line longer than this is corrupt (a ref is at most [`MAX_REF_BYTES`] plus our metadata).
pub const MAX_LINE_BYTES: usize = MAX_REF_BYTES + 512;
/// Most bytes the stamp adds to a compact ref: `,"disagg":{"producer":"` + name + `","seq":` +
/// 20 digits + `,"xxh3":"` + 16 digits + `"}}}`, less the `}}` it replaces.
pub const MAX_STAMP_BYTES: usize = 58 + MAX_NAME_BYTES + 20;
// Every ref the publisher accepts must fit a line the reader accepts, stamp included: a ref at
// the cap that became a "corrupt" line would be lost after `ref-publish` said it was published.
const _: () = assert!(MAX_REF_BYTES + MAX_STAMP_BYTES <= MAX_LINE_BYTES);
/// How often a running producer rewrites its heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Longest producer, cursor or consumer name.
pub const MAX_NAME_BYTES: usize = 128;
/// Most lines a tail handles per producer in one round (bounds memory and keeps rounds fair).
pub const MAX_LINES_PER_ROUND: usize = 16_384;
/// The bytes after the checksum digits at the end of every channel line.
const LINE_END: &[u8] = b"\"}}}";
const TAIL_MARK: &[u8] = b"\"disagg\":{\"producer\":\"";

/// Which on-disk layout a channel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Per-producer segments (the default).
    Segments,
    /// SpecForge's `refs.jsonl` plus sidecars, one producer.
    SingleFile,
}

/// True for names usable as producer and cursor names: `[A-Za-z0-9._-]{1,128}`, not starting with `.`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_BYTES && !s.starts_with('.') && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn check_name(what: &str, s: &str) -> Result<()> {
    if valid_name(s) {
        Ok(())
    } else {
        Err(Error::Usage(format!("{what} {s:?} must match [A-Za-z0-9._-]{{1,{MAX_NAME_BYTES}}} and not start with '.'")))
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Append the channel line of `r` (stamped with producer, seq and checksum) and a newline to `out`.
/// Same bytes as [`encode_line`], serialized once into `out` without cloning the ref.
pub fn encode_line_into(out: &mut Vec<u8>, r: &SampleRef, producer: &str, seq: u64) {
    if r.metadata.contains_key("disagg") || !valid_name(producer) {
        // Rare: the input carries its own stamp (replaced) or the name would need escaping.
        out.extend_from_slice(encode_line(r, producer, seq).as_bytes());
        out.push(b'\n');
        return;
    }
    let start = out.len();
    serde_json::to_writer(&mut *out, r).expect("a SampleRef always serializes");
    // The ref ends with its metadata object and the ref's own brace: `...}}` (or `{}}`).
    debug_assert!(out.ends_with(b"}}"));
    out.truncate(out.len() - 2);
    if !r.metadata.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(b"\"disagg\":{\"producer\":\"");
    out.extend_from_slice(producer.as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(b",\"xxh3\":\"");
    let sum = twox_hash::XxHash3_64::oneshot(&out[start..]);
    out.extend_from_slice(format!("{sum:016x}").as_bytes());
    out.extend_from_slice(LINE_END);
    out.push(b'\n');
}

/// Encode a ref as one channel line (without the newline), stamping producer, seq and checksum.
pub fn encode_line(r: &SampleRef, producer: &str, seq: u64) -> String {
    let mut r = r.clone();
    r.metadata.remove("disagg");
    r.metadata.insert("disagg".into(), serde_json::json!({"producer": producer, "seq": seq, "xxh3": "0000000000000000"}));
    let mut line = r.to_json();
    let digits_at = line.len() - LINE_END.len() - 16;
    let sum = twox_hash::XxHash3_64::oneshot(&line.as_bytes()[..digits_at]);
    line.replace_range(digits_at..digits_at + 16, &format!("{sum:016x}"));
    line
}

/// What a checked channel line says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineStamp {
    pub producer: String,
    pub seq: u64,
}

/// Why a line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LineError {
    #[error("line is {0} bytes, more than {MAX_LINE_BYTES}")]
    TooLong(usize),
    #[error("no disagg stamp at the end of the line")]
    NoStamp,
    #[error("checksum mismatch: line says {stated}, bytes hash to {actual}")]
    Checksum { stated: String, actual: String },
    #[error("not valid JSON: {0}")]
    Json(String),
}

/// Check a line's stamp and checksum and that it is JSON; returns producer and seq.
pub fn check_line(line: &[u8]) -> std::result::Result<LineStamp, LineError> {
    check_line_ref(line).map(|(producer, seq)| LineStamp { producer: producer.to_string(), seq })
}

/// [`check_line`] without allocating: the producer is borrowed from the line.
fn check_line_ref(line: &[u8]) -> std::result::Result<(&str, u64), LineError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(LineError::TooLong(line.len()));
    }
    let stamp = parse_stamp_ref(line).ok_or(LineError::NoStamp)?;
    let digits_at = line.len() - LINE_END.len() - 16;
    let digits = &line[digits_at..digits_at + 16];
    let actual = twox_hash::XxHash3_64::oneshot(&line[..digits_at]);
    // parse_stamp checked the 16 digits are lowercase hex.
    let stated = digits.iter().fold(0u64, |a, &b| (a << 4) | (if b.is_ascii_digit() { b - b'0' } else { b - b'a' + 10 }) as u64);
    if stated != actual {
        return Err(LineError::Checksum { stated: String::from_utf8_lossy(digits).into_owned(), actual: format!("{actual:016x}") });
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(line).map_err(|e| LineError::Json(e.to_string()))?;
    Ok(stamp)
}

/// Parse `"disagg":{"producer":"P","seq":N,"xxh3":"H16"}}}` at the end of a line.
fn parse_stamp_ref(line: &[u8]) -> Option<(&str, u64)> {
    if !line.ends_with(LINE_END) || line.len() < TAIL_MARK.len() + 40 {
        return None;
    }
    let start = line.windows(TAIL_MARK.len()).rposition(|w| w == TAIL_MARK)? + TAIL_MARK.len();
    let rest = line.get(start..)?;
    let q = rest.iter().position(|&b| b == b'"')?;
    let producer = std::str::from_utf8(rest.get(..q)?).ok()?;
    let rest = rest.get(q..)?.strip_prefix(b"\",\"seq\":")?;
    let d = rest.iter().position(|b| !b.is_ascii_digit())?;
    if d == 0 || d > 20 {
        return None;
    }
    let seq: u64 = std::str::from_utf8(rest.get(..d)?).ok()?.parse().ok()?;
    let rest = rest.get(d..)?.strip_prefix(b",\"xxh3\":\"")?;
    if rest.len() != 16 + LINE_END.len() || !rest[..16].iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
        return None;
    }
    valid_name(producer).then_some((producer, seq))
}

/// Segment file name for a producer's segment starting at `first_seq`, written by `epoch`.
pub fn segment_name(first_seq: u64, epoch: u64) -> String {
    format!("seg-{first_seq:016}-{epoch:08}.jsonl")
}

/// Parse a segment name into (first_seq, epoch).
pub fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let core = name.strip_prefix("seg-")?.strip_suffix(".jsonl")?;
    let (a, b) = core.split_once('-')?;
    if a.len() != 16 || b.len() != 8 || !a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A producer's segments, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<(u64, u64, String)>> {
    let mut segs = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(segs),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for ent in rd {
        let ent = ent.at(dir)?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if let Some((first, epoch)) = parse_segment_name(&name) {
            segs.push((first, epoch, name));
        }
    }
    segs.sort();
    Ok(segs)
}

/// Position of the first `\n` in `buf` (libc's vectorized memchr).
fn find_newline(buf: &[u8]) -> Option<usize> {
    if buf.is_empty() {
        return None;
    }
    // SAFETY: the pointer and length describe `buf`; memchr reads at most `buf.len()` bytes.
    let p = unsafe { libc::memchr(buf.as_ptr().cast(), b'\n' as libc::c_int, buf.len()) };
    (!p.is_null()).then(|| p as usize - buf.as_ptr() as usize)
}

/// Split a buffer into complete lines; returns the lines and the length consumed.
fn complete_lines(buf: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut lines = Vec::new();
    let mut at = 0;
    while let Some(nl) = find_newline(&buf[at..]) {
        lines.push(&buf[at..at + nl]);
        at += nl + 1;
    }
    (lines, at)
}

/// Bytes [`count_complete_lines`] reads at a time.
const COUNT_CHUNK: usize = 1 << 20;

/// Complete lines of the file open as `f`, read from its start `chunk` bytes at a time (memory
/// bounded whatever its size): (lines, bytes up to and including the last newline, bytes read).
fn count_complete_lines(f: &File, chunk: usize) -> io::Result<(u64, u64, u64)> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; chunk];
    let (mut lines, mut used, mut at) = (0u64, 0u64, 0u64);
    loop {
        let n = match f.read_at(&mut buf, at) {
            Ok(0) => return Ok((lines, used, at)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let got = &buf[..n];
        lines += got.iter().filter(|&&b| b == b'\n').count() as u64;
        if let Some(last) = got.iter().rposition(|&b| b == b'\n') {
            used = at + last as u64 + 1;
        }
        at += n as u64;
    }
}

/// The last valid sequence number in a segment (None if it holds no valid line).
fn last_valid_seq(path: &Path, producer: &str) -> Result<Option<u64>> {
    let bytes = fs::read(path).at(path)?;
    let (lines, _) = complete_lines(&bytes);
    Ok(lines.iter().rev().filter_map(|l| check_line(l).ok()).find(|s| s.producer == producer).map(|s| s.seq))
}

/// Sample ids of the refs `producer` has published into `channel` (segments layout), in seq
/// order, each seq once: what a tail of its stream would deliver (torn and corrupt lines are
/// not published; a line whose seq was already seen is a duplicate). Empty for a producer
/// that has not started. A resumed writer that cannot feed the same input again (`feature-ingest`,
/// whose INPUT may have changed) appends only what is not among them.
pub fn published_sample_ids(channel: &Path, producer: &str) -> Result<Vec<String>> {
    published_in(channel, producer, sample_id_in)
}

/// [`published_sample_ids`] with each ref's `feature_keys`: which stored object it names. A
/// resumed `feature-ingest` that stored a sample again (a new generation) publishes its new
/// ref; one whose sample id and keys are both there is published already.
pub fn published_sample_keys(channel: &Path, producer: &str) -> Result<Vec<(String, BTreeMap<String, String>)>> {
    published_in(channel, producer, sample_id_and_keys_in)
}

/// `read(line)` for each ref `producer` has published into `channel`, in seq order, each seq once.
fn published_in<T>(channel: &Path, producer: &str, read: impl Fn(&[u8]) -> std::result::Result<T, super::sample_ref::RefError>) -> Result<Vec<T>> {
    check_name("producer", producer)?;
    let dir = channel.join(PRODUCERS_DIR).join(producer);
    let mut ids = Vec::new();
    let mut next = 0u64;
    for (_, _, seg) in list_segments(&dir)? {
        let path = dir.join(&seg);
        let bytes = fs::read(&path).at(&path)?;
        for line in complete_lines(&bytes).0 {
            let Ok((p, seq)) = check_line_ref(line) else { continue };
            if p != producer || seq < next {
                continue;
            }
            // Not SampleRef::parse: a ref at MAX_REF_BYTES is over it once stamped.
            ids.push(read(line).map_err(|e| Error::bad_input(&path, format!("line with seq {seq}: {e}")))?);
            next = seq + 1;
        }
    }
    Ok(ids)
}

/// Open a single-file channel's `refs.jsonl` for appending (created if missing) and count its
/// lines, every complete one (what the channel has published). Bytes after the last `\n` are a
/// line whose writer was killed in the middle of it: never committed (no reader takes a line
/// before its newline), so they are cut off, under the file's lock (no write of a live producer
/// of ours is in progress then), before anything is appended. Cutting them keeps every complete
/// byte where it is, which readers rely on (their offsets stay valid); a kill before the cut is
/// durable leaves the tail for the next producer to cut. The file's lock is also held while a
/// batch is written ([`RefProducer::append`]); where the file system has no locks (some FUSE
/// mounts), that one producer runs at a time is the operator's promise alone, as for a
/// SpecForge producer (which takes no lock).
fn open_single_file(path: &Path) -> Result<(File, u64)> {
    let f = OpenOptions::new().read(true).append(true).create(true).open(path).at(path)?;
    let locked = fsio::lock_where_supported(&f, path)?;
    let counted = (|| {
        // Streamed: the file grows with every ref the channel ever carried.
        let (lines, used, len) = count_complete_lines(&f, COUNT_CHUNK).at(path)?;
        if used != len {
            eprintln!(
                "ref-publish: warning: {}: cutting a torn last line ({} bytes after the last newline, at byte {used}; its writer was killed mid-write)",
                path.display(),
                len - used
            );
            crate::failpoint!("publish.before_repair");
            f.set_len(used).at(path)?;
            f.sync_data().at(path)?;
        }
        Ok(lines)
    })();
    if locked {
        f.unlock().at(path)?;
    }
    Ok((f, counted?))
}

/// Heartbeat file contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub pid: u32,
    pub host: String,
    pub unix_ms: u64,
    pub published: u64,
}

/// `closed` file contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Closed {
    pub published: u64,
}

/// The published count in the `closed` marker of the segments producer at `dir`, if it closed.
pub fn read_closed_marker(dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(CLOSED_FILE);
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice::<Closed>(&b).map(|c| Some(c.published)).map_err(|e| Error::bad_input(&path, format!("not a closed marker: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// The writing end of a channel for one producer.
pub struct RefProducer {
    channel: PathBuf,
    dir: PathBuf,
    name: String,
    layout: Layout,
    next_seq: u64,
    epoch: u64,
    segment: Option<(File, PathBuf, u64)>,
    fsync: bool,
    published: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl RefProducer {
    /// Open (or resume) producer `name`: its published count is derived from its files.
    pub fn open(channel: &Path, name: &str, layout: Layout, fsync: bool) -> Result<Self> {
        check_name("producer", name)?;
        fsio::create_dir_durable(channel)?;
        let (dir, next_seq, epoch, segment) = match layout {
            Layout::Segments => {
                let dir = channel.join(PRODUCERS_DIR).join(name);
                fsio::create_dir_durable(&dir)?;
                for marker in [CLOSED_FILE, FAILED_FILE] {
                    if dir.join(marker).exists() {
                        return Err(Error::conflict(dir.join(marker), format!("producer {name} already ended its stream")));
                    }
                }
                let segs = list_segments(&dir)?;
                let epoch = segs.iter().map(|s| s.1).max().map_or(0, |e| e + 1);
                let mut next = 0;
                for (first, _, seg) in segs.iter().rev() {
                    if let Some(last) = last_valid_seq(&dir.join(seg), name)? {
                        next = last + 1;
                        break;
                    }
                    // A segment with no valid line still says where its writer meant to start.
                    next = next.max(*first);
                }
                (dir, next, epoch, None)
            }
            Layout::SingleFile => {
                for marker in [".closed", ".failed"] {
                    if channel.join(marker).exists() {
                        return Err(Error::conflict(channel.join(marker), "the stream has already ended"));
                    }
                }
                let path = channel.join(SINGLE_FILE);
                let (file, count) = open_single_file(&path)?;
                (channel.to_path_buf(), count, 0, Some((file, path, 0)))
            }
        };
        let published = Arc::new(AtomicU64::new(next_seq));
        let stop = Arc::new(AtomicBool::new(false));
        let heartbeat = (layout == Layout::Segments).then(|| {
            let (path, published, stop) = (dir.join(HEARTBEAT_FILE), published.clone(), stop.clone());
            let host = hostname();
            // A stop signal must reach the thread reading stdin, never this one.
            crate::stop::spawn_unsignalled(move || {
                while !stop.load(Ordering::Relaxed) {
                    let hb = Heartbeat { pid: std::process::id(), host: host.clone(), unix_ms: unix_ms(), published: published.load(Ordering::Relaxed) };
                    let _ = fsio::write_atomic(&path, format!("{}\n", serde_json::to_string(&hb).unwrap_or_default()).as_bytes());
                    let mut slept = Duration::ZERO;
                    while slept < HEARTBEAT_INTERVAL && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                        slept += Duration::from_millis(20);
                    }
                }
            })
        });
        Ok(RefProducer { channel: channel.to_path_buf(), dir, name: name.to_string(), layout, next_seq, epoch, segment, fsync, published, stop, heartbeat })
    }

    /// Refs durably published so far by this producer (over all its runs).
    pub fn published(&self) -> u64 {
        self.next_seq
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Refs of this producer acknowledged by consumers (cursors, or `.consumed_count`).
    pub fn consumed(&self) -> Result<u64> {
        match self.layout {
            Layout::Segments => consumed_by_cursors(&self.channel, &self.name),
            Layout::SingleFile => {
                let path = self.channel.join(CONSUMED_COUNT);
                let count: u64 = match fs::read_to_string(&path) {
                    Ok(s) => s.trim().parse().map_err(|_| Error::bad_input(&path, format!("{:?} is not a count", s.trim())))?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                    Err(e) => return Err(Error::io(&path, e)),
                };
                // `.consumed_count` is what a SpecForge consumer writes. ref-tail's ranks write it
                // too, as their group's total, but their writes race: it can miss a rank's last
                // batch until a later write. Their cursors are exact, so take whichever says more
                // (one consumer group per channel: they never both count).
                Ok(count.max(consumed_by_single_file_cursors(&self.channel)?))
            }
        }
    }

    /// Append refs (already checked) as one write, then fsync if asked.
    pub fn append(&mut self, refs: &[SampleRef]) -> Result<()> {
        if refs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(refs.len() * 700);
        for (i, r) in refs.iter().enumerate() {
            let start = buf.len();
            encode_line_into(&mut buf, r, &self.name, self.next_seq + i as u64);
            check_encoded_len(buf.len() - start).map_err(|e| Error::bad_input(&self.dir, format!("ref {}: {e}", r.sample_id)))?;
        }
        self.append_encoded(&buf, refs.len() as u64)
    }

    fn append_encoded(&mut self, bytes: &[u8], count: u64) -> Result<()> {
        if self.layout == Layout::Segments && self.segment.as_ref().is_some_and(|s| s.2 >= SEGMENT_MAX_BYTES) {
            self.segment = None;
        }
        if self.segment.is_none() {
            let (path, file) = match self.layout {
                Layout::Segments => {
                    let path = self.dir.join(segment_name(self.next_seq, self.epoch));
                    self.epoch += 1;
                    let f = OpenOptions::new().write(true).create_new(true).open(&path).at(&path)?;
                    fsio::fsync_dir(&self.dir)?;
                    (path, f)
                }
                // Opened (and its torn tail cut) by RefProducer::open, and never rotated.
                Layout::SingleFile => unreachable!("a single-file producer's file is opened by RefProducer::open"),
            };
            self.segment = Some((file, path, 0));
        }
        let (file, path, len) = self.segment.as_mut().expect("segment opened above");
        // Single file: the batch is written under the file's lock, so that a producer starting
        // meanwhile never takes a write in progress for a torn tail (open_single_file).
        let locked = self.layout == Layout::SingleFile && fsio::lock_where_supported(file, path)?;
        crate::failpoint!("publish.before_write");
        let written = file.write_all(bytes);
        if locked {
            file.unlock().at(&*path)?;
        }
        written.at(&*path)?;
        crate::failpoint!("publish.after_write");
        if self.fsync {
            file.sync_data().at(&*path)?;
        }
        *len += bytes.len() as u64;
        self.next_seq += count;
        self.published.store(self.next_seq, Ordering::Relaxed);
        Ok(())
    }

    /// End the stream: `closed` with the published count (single file: `.closed`).
    pub fn close(mut self) -> Result<()> {
        self.stop_heartbeat();
        match self.layout {
            Layout::Segments => {
                fsio::write_atomic(self.dir.join(CLOSED_FILE), format!("{}\n", serde_json::to_string(&Closed { published: self.next_seq }).expect("serializes")).as_bytes())
            }
            Layout::SingleFile => fsio::write_atomic(self.channel.join(".closed"), b""),
        }
    }

    /// Fail the stream with a reason (`failed`; single file: `.failed`).
    pub fn fail(mut self, reason: &str) -> Result<()> {
        self.stop_heartbeat();
        let path = match self.layout {
            Layout::Segments => self.dir.join(FAILED_FILE),
            Layout::SingleFile => self.channel.join(".failed"),
        };
        fsio::write_atomic(path, format!("{}\n", reason.trim_end()).as_bytes())
    }

    fn stop_heartbeat(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
    }
}

impl Drop for RefProducer {
    fn drop(&mut self) {
        self.stop_heartbeat();
    }
}

/// Sum of `consumed` for `producer` over every cursor file of the channel.
pub fn consumed_by_cursors(channel: &Path, producer: &str) -> Result<u64> {
    sum_consumed(&channel.join(CURSORS_DIR), |name| !fsio::is_temp_name(name) && name.ends_with(".json"), producer)
}

/// Sum of `consumed` over every cursor file (`CHANNEL/.cursor-*.json`) of a single-file channel.
/// (A temp file of a cursor is named `..cursor-…` and never ends in `.json`.)
pub fn consumed_by_single_file_cursors(channel: &Path) -> Result<u64> {
    sum_consumed(channel, |name| name.starts_with(SINGLE_FILE_CURSOR_PREFIX) && name.ends_with(".json"), SINGLE_FILE)
}

/// Sum of `consumed` for `producer` over the cursor files in `dir` whose names `is_cursor` takes.
fn sum_consumed(dir: &Path, is_cursor: impl Fn(&str) -> bool, producer: &str) -> Result<u64> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut total = 0u64;
    for ent in rd {
        let ent = ent.at(dir)?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if !is_cursor(&name) {
            continue;
        }
        let c = match read_cursor(&ent.path())? {
            Some(c) => c,
            None => continue,
        };
        total = total.saturating_add(c.producers.get(producer).map_or(0, |p| p.consumed));
    }
    Ok(total)
}

/// A cursor file; None if there is none.
fn read_cursor(path: &Path) -> Result<Option<Cursor>> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_slice(&text).map(Some).map_err(|e| Error::bad_input(path, format!("not a cursor: {e}")))
}

/// The file name of cursor `name` for `rank` of `world` (in `cursors/`; single file: after `.cursor-`).
fn cursor_file_name(name: &str, rank: u64, world: u64) -> String {
    if world > 1 {
        format!("{name}.r{rank}of{world}.json")
    } else {
        format!("{name}.json")
    }
}

/// How many tries [`write_consumed_count`] makes to write a total no other rank changed meanwhile.
const CONSUMED_COUNT_TRIES: usize = 4;
/// How often an idle, following rank re-derives its group's `.consumed_count` (world > 1).
const CONSUMED_COUNT_REFRESH: Duration = Duration::from_millis(100);

/// Write a single-file channel's `.consumed_count`: the total over the ranks of the cursor group,
/// `own` (this rank's committed count) plus what the other ranks' cursor files say. Each rank
/// writes it, so a SpecForge producer (which reads only this file) sees the group's progress,
/// not one rank's. Ranks' writes race (read the others, then write): after writing, the others
/// are read again and the total rewritten if they moved, so the last write of all is the true
/// total unless a rank gave up after [`CONSUMED_COUNT_TRIES`] (a busy rank writes again itself;
/// idle ones re-derive it every [`CONSUMED_COUNT_REFRESH`], with `only_if_changed`: no write
/// when the file already says it).
fn write_consumed_count(opts: &TailOptions, name: &str, own: u64, only_if_changed: bool) -> Result<()> {
    let others = || -> Result<u64> {
        let mut total = 0u64;
        for rank in (0..opts.world).filter(|&r| r != opts.rank) {
            let path = opts.channel.join(format!("{SINGLE_FILE_CURSOR_PREFIX}{}", cursor_file_name(name, rank, opts.world)));
            if let Some(c) = read_cursor(&path)? {
                total = total.saturating_add(c.producers.values().map(|p| p.consumed).sum());
            }
        }
        Ok(total)
    };
    let path = opts.channel.join(CONSUMED_COUNT);
    let mut seen = others()?;
    if only_if_changed && fs::read(&path).is_ok_and(|b| b == format!("{}\n", own.saturating_add(seen)).as_bytes()) {
        return Ok(());
    }
    for _ in 0..CONSUMED_COUNT_TRIES {
        fsio::write_atomic(&path, format!("{}\n", own.saturating_add(seen)).as_bytes())?;
        let now = others()?;
        if now == seen {
            break;
        }
        seen = now;
    }
    Ok(())
}

/// Options of `ref-publish`.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub channel: PathBuf,
    pub producer: String,
    pub max_in_flight: Option<u64>,
    pub close: bool,
    pub fail: Option<String>,
    /// Skip the first `published` input lines (a restarted producer fed the same input resumes).
    pub resume: bool,
    pub layout: Layout,
    pub fsync: bool,
    pub json: bool,
}

/// What `ref-publish` did.
#[derive(Debug, Clone, Serialize)]
pub struct PublishSummary {
    pub producer: String,
    pub published_before: u64,
    pub published_now: u64,
    pub published_total: u64,
    pub skipped_resumed: u64,
    pub waited_ms: u64,
    pub closed: bool,
}

/// Low watermark for a high watermark `n`: producers resume below 3/4 of it.
pub fn low_watermark(n: u64) -> u64 {
    n - n / 4
}

/// Refuse an encoded line (`len` bytes with its newline) that readers would reject as too long.
/// A checked ref always fits (see [`MAX_STAMP_BYTES`]); this holds the writer to the reader's
/// bound, before anything is written, whatever a future field or check changes.
fn check_encoded_len(len: usize) -> std::result::Result<(), String> {
    if len - 1 > MAX_LINE_BYTES {
        return Err(format!("its channel line would be {} bytes, more than the {MAX_LINE_BYTES} readers accept", len - 1));
    }
    Ok(())
}

/// Lines one worker parses and encodes at a time.
const ENCODE_CHUNK: usize = 512;

/// Parse and encode input lines `(line number, bytes)` as channel lines with seqs `base`,
/// `base + 1`, ...; returns the bytes and the end offset of each line. Chunks of lines are
/// encoded in parallel and joined in order. The first bad line (in input order) fails the batch.
fn encode_batch(todo: &[(u64, &[u8])], producer: &str, base: u64) -> Result<(Vec<u8>, Vec<usize>)> {
    use rayon::prelude::*;
    let encode = |ci: usize, chunk: &[(u64, &[u8])]| -> std::result::Result<(Vec<u8>, Vec<usize>), (u64, String)> {
        let mut buf = Vec::with_capacity(chunk.iter().map(|l| l.1.len() + 128).sum());
        let mut ends = Vec::with_capacity(chunk.len());
        for (k, (line_no, l)) in chunk.iter().enumerate() {
            let r = SampleRef::parse(l).map_err(|e| (*line_no, e.to_string()))?;
            let start = buf.len();
            encode_line_into(&mut buf, &r, producer, base + (ci * ENCODE_CHUNK + k) as u64);
            check_encoded_len(buf.len() - start).map_err(|e| (*line_no, e))?;
            ends.push(buf.len());
        }
        Ok((buf, ends))
    };
    let bad = |(line_no, e): (u64, String)| Error::bad_input("<stdin>", format!("line {line_no}: {e}"));
    if todo.len() <= ENCODE_CHUNK {
        return encode(0, todo).map_err(bad);
    }
    let parts: Vec<_> = todo.par_chunks(ENCODE_CHUNK).enumerate().map(|(ci, chunk)| encode(ci, chunk)).collect();
    let mut encoded = Vec::with_capacity(parts.iter().map(|p| p.as_ref().map_or(0, |p| p.0.len())).sum());
    let mut ends = Vec::with_capacity(todo.len());
    for part in parts {
        let (buf, part_ends) = part.map_err(bad)?;
        let off = encoded.len();
        encoded.extend_from_slice(&buf);
        ends.extend(part_ends.into_iter().map(|e| e + off));
    }
    Ok((encoded, ends))
}

/// Most input bytes `ref-publish` gathers into one batch (one write, one fdatasync).
pub const PUBLISH_BATCH_BYTES: usize = 8 << 20;
/// Longest `ref-publish` keeps gathering input that is already waiting before it writes.
pub const PUBLISH_BATCH_WAIT: Duration = Duration::from_millis(5);

/// `ref-publish`: read refs (JSON lines) from `input`, check, append; then close or fail.
/// Each read from `input` is one batch.
pub fn publish(opts: &PublishOptions, input: &mut dyn BufRead) -> Result<PublishSummary> {
    publish_with(opts, input, &mut || false)
}

/// [`publish`] with group commit: after a read, keep reading into the same batch while
/// `more_ready()` says more input is waiting (up to [`PUBLISH_BATCH_BYTES`] and
/// [`PUBLISH_BATCH_WAIT`]), so a fast writer gets one write + fdatasync per large batch while
/// a slow one still gets each ref out at once.
pub fn publish_with(opts: &PublishOptions, input: &mut dyn BufRead, more_ready: &mut dyn FnMut() -> bool) -> Result<PublishSummary> {
    if opts.max_in_flight == Some(0) {
        return Err(Error::Usage("--max-in-flight must be at least 1".into()));
    }
    let mut p = RefProducer::open(&opts.channel, &opts.producer, opts.layout, opts.fsync)?;
    let before = p.published();
    let mut summary =
        PublishSummary { producer: opts.producer.clone(), published_before: before, published_now: 0, published_total: before, skipped_resumed: 0, waited_ms: 0, closed: false };
    if let Some(reason) = &opts.fail {
        p.fail(reason)?;
        return Ok(summary);
    }
    let mut to_skip = if opts.resume { before } else { 0 };
    let mut line_no = 0u64;
    let mut pending = Vec::<u8>::new();
    let mut paused = false;
    // A stop signal (crate::stop) ends the input here: the complete lines read so far are
    // published, a partial last line is not, and the stream stays open (not closed).
    loop {
        let gather_start = Instant::now();
        let mut eof = false;
        let mut stopped;
        loop {
            let n = match input.fill_buf() {
                Ok(chunk) => {
                    eof = chunk.is_empty();
                    pending.extend_from_slice(chunk);
                    chunk.len()
                }
                // A read interrupted by a stop signal (installed without SA_RESTART).
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(Error::io("<stdin>", e)),
            };
            input.consume(n);
            stopped = crate::stop::requested();
            if eof || stopped.is_some() || pending.len() >= PUBLISH_BATCH_BYTES || gather_start.elapsed() >= PUBLISH_BATCH_WAIT || !more_ready() {
                break;
            }
        }
        if eof && stopped.is_none() && !pending.is_empty() && *pending.last().expect("nonempty") != b'\n' {
            pending.push(b'\n');
        }
        let (lines, used) = complete_lines(&pending);
        // Parse and encode each ref as it comes (no batch of owned refs): line k of the batch
        // gets seq published + k, as the batch is appended in order, in pieces of `room`.
        let mut todo: Vec<(u64, &[u8])> = Vec::with_capacity(lines.len());
        for l in lines {
            line_no += 1;
            if l.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            if to_skip > 0 {
                to_skip -= 1;
                summary.skipped_resumed += 1;
                continue;
            }
            todo.push((line_no, l));
        }
        let base = p.published();
        let (encoded, ends) = encode_batch(&todo, &p.name, base)?;
        pending.drain(..used);
        // An input line is bounded by the text a ref may be read from, not by the channel line:
        // whitespace does not count against a ref (its compact form is what is checked).
        if stopped.is_none() && pending.len() > MAX_REF_TEXT_BYTES {
            return Err(Error::bad_input("<stdin>", format!("line {} is longer than {MAX_REF_TEXT_BYTES} bytes", line_no + 1)));
        }
        let mut done = 0usize;
        while done < ends.len() {
            let left = ends.len() - done;
            let room = match opts.max_in_flight {
                None => left as u64,
                Some(high) => {
                    let started = Instant::now();
                    let mut sleep = Duration::from_micros(200);
                    let room = loop {
                        let in_flight = p.published().saturating_sub(p.consumed()?);
                        if paused && in_flight < low_watermark(high) {
                            paused = false;
                        } else if !paused && in_flight >= high {
                            paused = true;
                        }
                        if !paused {
                            break high - in_flight;
                        }
                        // Stopped while held back: the rest of this batch is not published
                        // (an upstream that replays its output with --resume gets it again).
                        crate::stop::check()?;
                        std::thread::sleep(sleep);
                        sleep = (sleep * 2).min(Duration::from_millis(20));
                    };
                    summary.waited_ms += started.elapsed().as_millis() as u64;
                    room
                }
            };
            let take = (room as usize).min(left).max(1);
            let from = if done == 0 { 0 } else { ends[done - 1] };
            debug_assert_eq!(p.published(), base + done as u64);
            p.append_encoded(&encoded[from..ends[done + take - 1]], take as u64)?;
            summary.published_now += take as u64;
            done += take;
        }
        if let Some(signal) = stopped {
            return Err(Error::Interrupted { signal });
        }
        if eof {
            break;
        }
        // Between a batch and the next read (tests stop the publisher here).
        crate::failpoint!("publish.after_batch");
    }
    summary.published_total = p.published();
    if opts.close {
        p.close()?;
        summary.closed = true;
    }
    Ok(summary)
}

/// A consumer's position in one producer's stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Position {
    pub segment: String,
    pub offset: u64,
    pub next_seq: u64,
    pub consumed: u64,
    /// Segments: corrupt lines skipped since the last valid line (absent: none). Their seqs are
    /// only known from the next valid line (a jump), or, when the producer closed with none
    /// after them, from its `closed` count.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub corrupt_after: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A cursor file: positions per producer plus counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Cursor {
    pub schema_version: u64,
    pub name: String,
    pub rank: u64,
    pub world: u64,
    pub producers: BTreeMap<String, Position>,
    pub delivered: u64,
    pub stale: u64,
    /// Stale refs already in a `--stale-out` file beyond what the positions cover (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_out: Option<StaleOutMark>,
}

/// The stale refs a tail appended to its `--stale-out` file: per producer, every stale ref with
/// a seq below `through[P]` is in `path` (canonical). A run whose write to stdout failed
/// acknowledges nothing of its batch, but that batch's stale refs are out: a rerun that handles
/// the batch again appends those below the mark to the same file only once.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StaleOutMark {
    pub path: PathBuf,
    pub through: BTreeMap<String, u64>,
}

/// The rank (of `world`) that owns the ref stamped (producer, seq): `xxh3_64("P:SEQ") % world`.
pub fn shard_of(producer: &str, seq: u64, world: u64) -> u64 {
    if world <= 1 {
        return 0;
    }
    // "P:SEQ" on the stack: a name is at most 128 bytes, a u64 at most 20 digits.
    let mut key = [0u8; MAX_NAME_BYTES + 1 + 20];
    let cap = key.len();
    let mut w = &mut key[..];
    if write!(w, "{producer}:{seq}").is_err() {
        return twox_hash::XxHash3_64::oneshot(format!("{producer}:{seq}").as_bytes()) % world;
    }
    let len = cap - w.len();
    twox_hash::XxHash3_64::oneshot(&key[..len]) % world
}

/// Options of `ref-tail`.
#[derive(Debug, Clone)]
pub struct TailOptions {
    pub channel: PathBuf,
    pub cursor: Option<String>,
    pub follow: bool,
    pub idle_timeout: Option<Duration>,
    pub rank: u64,
    pub world: u64,
    pub max_staleness: Option<u64>,
    pub pointer: Option<PathBuf>,
    pub stale_out: Option<PathBuf>,
    pub expect_producers: usize,
    pub json: bool,
}

/// What `ref-tail` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TailSummary {
    pub delivered: u64,
    pub stale: u64,
    pub other_shards: u64,
    pub torn: u64,
    pub corrupt: u64,
    /// Seqs skipped by a jump that no corrupt line accounts for (segments).
    pub missing: u64,
    pub duplicates: u64,
    pub producers: usize,
    pub latest_version: Option<u64>,
}

struct Stream {
    name: String,
    dir: PathBuf,
    pos: Position,
    /// Bytes read past `pos.offset` that do not yet end in a newline.
    partial: Vec<u8>,
    /// `pos.offset` is inside a line longer than [`MAX_LINE_BYTES`], skipped (and counted) up
    /// to there: what follows up to its newline is the rest of it, not a line of its own. Holds
    /// the position at the start of that line, which is what a cursor commits: a restarted tail
    /// knows nothing of the skip, and would read the rest of the line as a line of its own.
    long_line: Option<Position>,
    closed: Option<u64>,
    done: bool,
}

impl Stream {
    /// Where a cursor may resume: never inside a line, so that what it reads next starts one.
    fn committable(&self) -> &Position {
        self.long_line.as_ref().unwrap_or(&self.pos)
    }
}

/// `ref-tail`: print complete, checked refs on `out`, in order per producer.
pub fn tail(opts: &TailOptions, out: &mut dyn Write) -> Result<TailSummary> {
    if opts.world == 0 || opts.rank >= opts.world {
        return Err(Error::Usage(format!("--rank {} must be below --world {}", opts.rank, opts.world)));
    }
    if opts.max_staleness.is_some() != opts.pointer.is_some() {
        return Err(Error::Usage("--max-staleness and --pointer go together".into()));
    }
    if let Some(c) = &opts.cursor {
        check_name("cursor", c)?;
    }
    let layout = if opts.channel.join(SINGLE_FILE).exists() && !opts.channel.join(PRODUCERS_DIR).exists() { Layout::SingleFile } else { Layout::Segments };
    if !opts.channel.is_dir() {
        return Err(Error::not_found(&opts.channel, "no such channel directory"));
    }
    let cursor_path = opts.cursor.as_ref().map(|c| {
        let file = cursor_file_name(c, opts.rank, opts.world);
        match layout {
            Layout::Segments => opts.channel.join(CURSORS_DIR).join(file),
            Layout::SingleFile => opts.channel.join(format!("{SINGLE_FILE_CURSOR_PREFIX}{file}")),
        }
    });
    let mut cursor = Cursor { schema_version: 1, rank: opts.rank, world: opts.world, ..Default::default() };
    if let Some(path) = &cursor_path {
        match fs::read(path) {
            Ok(b) => {
                cursor = serde_json::from_slice(&b).map_err(|e| Error::bad_input(path, format!("not a cursor: {e}")))?;
                if cursor.rank != opts.rank || cursor.world != opts.world {
                    return Err(Error::conflict(path, format!("cursor was written for rank {} of {}", cursor.rank, cursor.world)));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if layout == Layout::Segments {
                    fsio::create_dir_durable(&opts.channel.join(CURSORS_DIR))?;
                }
            }
            Err(e) => return Err(Error::io(path, e)),
        }
        cursor.name = opts.cursor.clone().unwrap_or_default();
    }
    let mut stale_out = match &opts.stale_out {
        Some(p) => Some(StaleOut::open(p)?),
        None => None,
    };
    if let Some(p) = &opts.stale_out {
        // A mark for another file says nothing of this one.
        let path = fs::canonicalize(p).at(p)?;
        if cursor.stale_out.as_ref().is_none_or(|m| m.path != path) {
            cursor.stale_out = Some(StaleOutMark { path, through: BTreeMap::new() });
        }
    }
    let mut streams: BTreeMap<String, Stream> = BTreeMap::new();
    let mut summary = TailSummary::default();
    let mut latest: Option<(u64, Instant)> = None;
    let mut last_activity = Instant::now();
    let mut sleep = Duration::from_micros(250);
    let mut outbuf: Vec<u8> = Vec::with_capacity(1 << 20);
    // Single file: when this rank last wrote (or checked) `.consumed_count`; None: never.
    let mut consumed_count: Option<Instant> = None;
    // Lines handled (acknowledged) since the cursor was last committed.
    let mut unacked = false;
    // A write to stdout failed: what it held is not printed, and never acknowledged.
    let mut stdout_failed = false;
    let run = (|| loop {
        // A stop signal (crate::stop) ends the tail here, where everything printed is covered
        // by the committed cursor: a stopped tail never prints a ref again when it restarts.
        if let Some(signal) = crate::stop::requested() {
            flush_marking(out, &mut outbuf, &mut stdout_failed)?;
            return Err(Error::Interrupted { signal });
        }
        // Discover producers.
        match layout {
            Layout::Segments => {
                let pdir = opts.channel.join(PRODUCERS_DIR);
                if let Ok(rd) = fs::read_dir(&pdir) {
                    for ent in rd {
                        let ent = ent.at(&pdir)?;
                        let name = ent.file_name().to_string_lossy().into_owned();
                        if valid_name(&name) && !streams.contains_key(&name) {
                            let pos = cursor.producers.get(&name).cloned().unwrap_or_default();
                            streams.insert(name.clone(), Stream { dir: ent.path(), name, pos, partial: Vec::new(), long_line: None, closed: None, done: false });
                        }
                    }
                }
            }
            Layout::SingleFile => {
                if streams.is_empty() {
                    let name = SINGLE_FILE.to_string();
                    let mut pos = cursor.producers.get(&name).cloned().unwrap_or_default();
                    pos.segment = SINGLE_FILE.into();
                    streams.insert(name.clone(), Stream { dir: opts.channel.clone(), name, pos, partial: Vec::new(), long_line: None, closed: None, done: false });
                }
            }
        }
        summary.producers = streams.len();
        // Pointer for staleness, re-read at most every 100 ms.
        if let (Some(src), Some(_)) = (&opts.pointer, opts.max_staleness) {
            if latest.is_none_or(|(_, at)| at.elapsed() > Duration::from_millis(100)) {
                let v = staleness::read_latest_version(src)?;
                latest = Some((v, Instant::now()));
                summary.latest_version = Some(v);
            }
        }
        let mut progressed = false;
        for s in streams.values_mut() {
            if s.done {
                continue;
            }
            // Failure wins over everything.
            let failed_path = match layout {
                Layout::Segments => s.dir.join(FAILED_FILE),
                Layout::SingleFile => s.dir.join(".failed"),
            };
            if let Ok(reason) = fs::read_to_string(&failed_path) {
                // What the streams before this one gave in this round is printed and committed
                // on the way out (below).
                if layout == Layout::SingleFile {
                    let _ = fsio::write_atomic(opts.channel.join(".consumer_failed"), reason.as_bytes());
                }
                return Err(Error::conflict(&failed_path, format!("producer {} failed: {}", s.name, reason.trim_end())));
            }
            // Read `closed` before the data so that everything written before it is seen.
            if s.closed.is_none() {
                s.closed = match layout {
                    // A marker that cannot be read yet is looked for again next round.
                    Layout::Segments => match read_closed_marker(&s.dir) {
                        Err(Error::Io { .. }) => None,
                        r => r?,
                    },
                    Layout::SingleFile => s.dir.join(".closed").exists().then_some(u64::MAX),
                };
            }
            let closed_now = s.closed.is_some();
            let r = read_stream(s, layout, opts, latest.map(|l| l.0), &mut cursor, &mut summary, &mut outbuf, &mut stale_out, closed_now, &mut unacked)?;
            progressed |= r.0;
            if closed_now && r.1 {
                if let Some(n) = s.closed.filter(|&n| n != u64::MAX) {
                    if s.pos.next_seq < n && n - s.pos.next_seq <= s.pos.corrupt_after {
                        // The last seqs are the corrupt lines skipped after the last valid one:
                        // published, lost, acknowledged as a jump to them would have been.
                        let (first, missing) = (s.pos.next_seq, n - s.pos.next_seq);
                        eprintln!("ref-tail: warning: {}: the last {missing} seqs of producer {} (from {first}) were corrupt lines: acknowledged as lost", s.dir.display(), s.name);
                        ack_lost(s, opts, first, n);
                        s.pos.next_seq = n;
                        s.pos.corrupt_after = 0;
                        unacked = true;
                    }
                    if s.pos.next_seq < n {
                        return Err(Error::bad_input(&s.dir, format!("producer {} closed with {n} refs published but its segments end at {}", s.name, s.pos.next_seq)));
                    }
                }
                s.done = true;
            }
        }
        if unacked {
            // Cleared first: a commit that fails is not tried again on the way out.
            unacked = false;
            commit(out, &mut outbuf, &mut stdout_failed, cursor_path.as_deref(), &mut cursor, &streams, &mut stale_out, opts, layout)?;
            if cursor_path.is_some() && layout == Layout::SingleFile {
                consumed_count = Some(Instant::now());
            }
        }
        let all_done = !streams.is_empty() && streams.len() >= opts.expect_producers && streams.values().all(|s| s.done);
        if all_done {
            flush_marking(out, &mut outbuf, &mut stdout_failed)?;
            if layout == Layout::SingleFile && opts.follow {
                fsio::write_atomic(opts.channel.join(".consumer_done"), b"")?;
            }
            return Ok(summary.clone());
        }
        if progressed {
            last_activity = Instant::now();
            sleep = Duration::from_micros(250);
            continue;
        }
        if !opts.follow {
            flush_marking(out, &mut outbuf, &mut stdout_failed)?;
            return Ok(summary.clone());
        }
        // Idle while other ranks may still be acknowledging: a write of theirs that raced with
        // this rank's last one can leave `.consumed_count` short, which would hold a SpecForge
        // producer back for good. Only a rank that wrote it once re-derives it.
        if consumed_count.is_some_and(|at| opts.world > 1 && at.elapsed() >= CONSUMED_COUNT_REFRESH) {
            let own: u64 = cursor.producers.values().map(|p| p.consumed).sum();
            write_consumed_count(opts, &cursor.name, own, true)?;
            consumed_count = Some(Instant::now());
        }
        if let Some(limit) = opts.idle_timeout {
            if last_activity.elapsed() > limit {
                let fresh: Vec<String> = streams.values().filter(|s| !s.done && heartbeat_age(&s.dir).is_some_and(|a| a < limit)).map(|s| s.name.clone()).collect();
                if fresh.is_empty() {
                    let open: Vec<String> = streams
                        .values()
                        .filter(|s| !s.done)
                        .map(|s| match heartbeat_age(&s.dir) {
                            Some(a) => format!("{} (last heartbeat {:.1}s ago)", s.name, a.as_secs_f64()),
                            None => format!("{} (no heartbeat)", s.name),
                        })
                        .collect();
                    let what = if open.is_empty() { format!("no producer closed (expected {})", opts.expect_producers.max(1)) } else { open.join(", ") };
                    if layout == Layout::SingleFile {
                        let _ = fsio::write_atomic(opts.channel.join(".consumer_failed"), b"idle timeout\n");
                    }
                    return Err(Error::Locked {
                        path: opts.channel.clone(),
                        reason: format!("idle for {:.1}s with streams still open: {what}; producer dead?", limit.as_secs_f64()),
                    });
                }
                // Alive but slow: keep waiting.
                last_activity = Instant::now();
            }
        }
        flush_marking(out, &mut outbuf, &mut stdout_failed)?;
        std::thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(10));
    })();
    // A run that ends in an error (a producer failed, bad input, an I/O error, a stop) still
    // prints what it handled and commits the cursor for it: a rerun does not deliver it again,
    // nor append its stale refs to --stale-out again. Not when writing to stdout failed: what
    // that write held may not be out, and nothing of it is acknowledged.
    let Err(e) = run else { return run };
    if stdout_failed {
        // The committed cursor stays as it was, but learns which stale refs are out already.
        if let (Some(path), Some(mark)) = (&cursor_path, &cursor.stale_out) {
            if let Err(m) = commit_stale_mark(path, &cursor, mark, &mut stale_out) {
                eprintln!("ref-tail: warning: the stale refs appended to --stale-out in this batch are not recorded: {m}");
            }
        }
        return Err(e);
    }
    let flushed = flush_marking(out, &mut outbuf, &mut stdout_failed);
    if let Err(f) = flushed {
        // The output is incomplete: that is the error reported (exit 10, as it was when the
        // failed producer's path flushed first), the other one a warning.
        eprintln!("ref-tail: warning: {e}");
        return Err(f);
    }
    if unacked {
        if let Err(c) = commit(out, &mut outbuf, &mut stdout_failed, cursor_path.as_deref(), &mut cursor, &streams, &mut stale_out, opts, layout) {
            eprintln!("ref-tail: warning: the refs handled before the error are not acknowledged: {c}");
        }
    }
    Err(e)
}

/// Record `mark` in the committed cursor at `path` (or in a new one at the start of every
/// stream, when none was committed yet), its positions and counts left as they are; the stale
/// refs it covers are synced first.
fn commit_stale_mark(path: &Path, live: &Cursor, mark: &StaleOutMark, stale_out: &mut Option<StaleOut>) -> Result<()> {
    let mut committed = read_cursor(path)?.unwrap_or_else(|| Cursor { schema_version: 1, name: live.name.clone(), rank: live.rank, world: live.world, ..Default::default() });
    if committed.stale_out.as_ref() == Some(mark) {
        return Ok(());
    }
    committed.stale_out = Some(mark.clone());
    sync_stale_out(stale_out)?;
    fsio::write_atomic(path, format!("{}\n", serde_json::to_string(&committed).expect("serializes")).as_bytes())
}

/// [`flush_out`], recording in `failed` that a write to stdout failed.
fn flush_marking(out: &mut dyn Write, buf: &mut Vec<u8>, failed: &mut bool) -> Result<()> {
    let r = flush_out(out, buf);
    *failed |= r.is_err();
    r
}

/// Acknowledge what the streams handled: print the lines buffered for stdout, then (with a
/// cursor) make the stale refs appended to `--stale-out` durable and commit the cursor and,
/// single file, `.consumed_count`. A ref is acknowledged only once it was written to stdout
/// and flushed, or (stale) synced in the stale-out file.
#[allow(clippy::too_many_arguments)]
fn commit(
    out: &mut dyn Write,
    outbuf: &mut Vec<u8>,
    stdout_failed: &mut bool,
    cursor_path: Option<&Path>,
    cursor: &mut Cursor,
    streams: &BTreeMap<String, Stream>,
    stale_out: &mut Option<StaleOut>,
    opts: &TailOptions,
    layout: Layout,
) -> Result<()> {
    flush_marking(out, outbuf, stdout_failed)?;
    let Some(path) = cursor_path else { return Ok(()) };
    sync_stale_out(stale_out)?;
    for s in streams.values() {
        cursor.producers.insert(s.name.clone(), s.committable().clone());
    }
    fsio::write_atomic(path, format!("{}\n", serde_json::to_string(&cursor).expect("serializes")).as_bytes())?;
    if layout == Layout::SingleFile {
        let own: u64 = cursor.producers.values().map(|p| p.consumed).sum();
        write_consumed_count(opts, &cursor.name, own, false)?;
    }
    Ok(())
}

/// A write of at most this many bytes to a pipe is atomic (POSIX `PIPE_BUF`, 4096 on Linux).
const PIPE_BUF: usize = 4096;

/// Write the buffered lines to `out` in writes of whole lines, each at most [`PIPE_BUF`]
/// bytes where the lines fit: a reader of a pipe then never sees half a line, even when
/// `ref-tail` is killed while blocked on a full pipe in the middle of a flush (one large write
/// could end mid-line). A line longer than `PIPE_BUF` goes out alone.
fn flush_out(out: &mut dyn Write, buf: &mut Vec<u8>) -> Result<()> {
    let mut rest = &buf[..];
    while !rest.is_empty() {
        let cut = if rest.len() <= PIPE_BUF {
            rest.len()
        } else {
            match rest[..PIPE_BUF].iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |i| i + 1),
            }
        };
        out.write_all(&rest[..cut]).at("<stdout>")?;
        out.flush().at("<stdout>")?;
        rest = &rest[cut..];
    }
    buf.clear();
    out.flush().at("<stdout>")
}

fn heartbeat_age(dir: &Path) -> Option<Duration> {
    let b = fs::read(dir.join(HEARTBEAT_FILE)).ok()?;
    let hb: Heartbeat = serde_json::from_slice(&b).ok()?;
    Some(Duration::from_millis(unix_ms().saturating_sub(hb.unix_ms)))
}

/// The `--stale-out` file of one tail (its only writer): stale lines are appended whole, one
/// `write` each, and made durable before any cursor write that acknowledges them.
struct StaleOut {
    file: File,
    path: PathBuf,
    /// A regular file, which can be cut back and synced (not a pipe or a terminal).
    regular: bool,
    /// Its length after the last whole line: what a failed append is cut back to.
    len: u64,
    /// Lines were appended since the last sync.
    unsynced: bool,
}

impl StaleOut {
    /// Open (create) `path` for appending. A regular file that does not end in a newline holds
    /// a line whose write a crash cut short: never acknowledged (a stale line is synced before
    /// the cursor that covers it is written), so it is cut off, warned, before anything is
    /// appended; otherwise the next line would be glued to it.
    fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new().read(true).append(true).create(true).open(path).at(path)?;
        let meta = file.metadata().at(path)?;
        let regular = meta.file_type().is_file();
        let mut len = 0;
        if regular {
            len = meta.len();
            let used = last_line_end(&file, len).at(path)?;
            if used != len {
                eprintln!("ref-tail: warning: {}: cutting a torn last line ({} bytes after the last newline, at byte {used}; its write was cut short)", path.display(), len - used);
                file.set_len(used).at(path)?;
                file.sync_data().at(path)?;
                len = used;
            }
        }
        Ok(StaleOut { file, path: path.to_path_buf(), regular, len, unsynced: false })
    }

    /// Append `line` and its newline in one write. On a failure (a full disk, EFBIG) the file
    /// is cut back to its length before the line, so it only ever holds whole lines.
    fn append_line(&mut self, line: &[u8]) -> Result<()> {
        let mut l = Vec::with_capacity(line.len() + 1);
        l.extend_from_slice(line);
        l.push(b'\n');
        if let Err(e) = self.file.write_all(&l) {
            if self.regular {
                if let Err(c) = self.file.set_len(self.len) {
                    return Err(Error::io(&self.path, io::Error::new(e.kind(), format!("{e}; cutting the partial line back to byte {} failed too: {c}", self.len))));
                }
            }
            return Err(Error::io(&self.path, e));
        }
        if self.regular {
            self.len += l.len() as u64;
            self.unsynced = true;
        }
        Ok(())
    }

    /// fdatasync what was appended since the last sync (nothing to do when nothing was).
    fn sync(&mut self) -> Result<()> {
        if !self.unsynced {
            return Ok(());
        }
        // Tests stand in for a failing fsync with `tail.stale_out_sync:error` (failpoints build).
        crate::failpoint::hit("tail.stale_out_sync").and_then(|()| self.file.sync_data()).at(&self.path)?;
        self.unsynced = false;
        Ok(())
    }
}

/// [`StaleOut::sync`] when there is a `--stale-out` file.
fn sync_stale_out(stale_out: &mut Option<StaleOut>) -> Result<()> {
    stale_out.as_mut().map_or(Ok(()), StaleOut::sync)
}

/// The length of the first `len` bytes of `f` up to and including their last newline (0 if
/// there is none), read backwards from the end a chunk at a time.
fn last_line_end(f: &File, len: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 16];
    let mut end = len;
    while end > 0 {
        let n = (buf.len() as u64).min(end) as usize;
        let at = end - n as u64;
        f.read_exact_at(&mut buf[..n], at)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(at + i as u64 + 1);
        }
        end = at;
    }
    Ok(0)
}

/// Most seqs of one gap [`ack_lost`] checks one by one for their rank (world > 1); a longer
/// gap is no run of skipped lines but a producer's bug, and is not acknowledged.
const MAX_LOST_GAP: u64 = 1 << 24;

/// Acknowledge the seqs `first..end` of `s` that were published but will never be delivered
/// (corrupt lines): those of this rank's shard count as consumed, so that over the ranks each is
/// counted once and published − consumed drains. True if any was this rank's.
fn ack_lost(s: &mut Stream, opts: &TailOptions, first: u64, end: u64) -> bool {
    let n = if opts.world <= 1 {
        end - first
    } else if end - first > MAX_LOST_GAP {
        eprintln!("ref-tail: warning: {}: {} seqs missing from {first}: not acknowledged", s.dir.display(), end - first);
        0
    } else {
        (first..end).filter(|&q| shard_of(&s.name, q, opts.world) == opts.rank).count() as u64
    };
    s.pos.consumed += n;
    n > 0
}

/// Read what is new in one stream. Returns (progressed, at end of data); sets `acked` when it
/// acknowledged something. On an error, `s.pos` and `cursor` cover exactly the lines handled
/// before it (delivered lines are in `out`, stale ones in `--stale-out`), so that what was
/// handled can still be committed.
#[allow(clippy::too_many_arguments)]
fn read_stream(
    s: &mut Stream,
    layout: Layout,
    opts: &TailOptions,
    latest: Option<u64>,
    cursor: &mut Cursor,
    summary: &mut TailSummary,
    out: &mut Vec<u8>,
    stale_out: &mut Option<StaleOut>,
    closed: bool,
    acked: &mut bool,
) -> Result<(bool, bool)> {
    let mut progressed = false;
    let mut budget = MAX_LINES_PER_ROUND;
    loop {
        // Which segment are we in, and is there a later one?
        let (cur, later) = match layout {
            Layout::SingleFile => (Some(SINGLE_FILE.to_string()), None),
            Layout::Segments => {
                let segs = list_segments(&s.dir)?;
                let cur = if s.pos.segment.is_empty() { segs.first().map(|x| x.2.clone()) } else { Some(s.pos.segment.clone()) };
                let later = cur.as_ref().and_then(|c| segs.iter().map(|x| &x.2).find(|n| *n > c).cloned());
                (cur, later)
            }
        };
        let Some(cur) = cur else { return Ok((progressed, true)) };
        if s.pos.segment != cur {
            s.pos.segment = cur.clone();
            s.pos.offset = 0;
            s.partial.clear();
            s.long_line = None;
        }
        let path = s.dir.join(&cur);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && layout == Layout::SingleFile => return Ok((progressed, true)),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let mut want = (budget * 1024).clamp(1 << 16, 16 << 20) as u64;
        // A partial line is waited for. Segments: a segment is never rewritten, so its bytes are
        // kept and only what follows them is read. Single file: a restarted producer cuts a torn
        // tail and appends in its place, so the partial bytes are read again from the last line
        // boundary (`pos.offset`, which no cut goes below): kept, they would be glued to the
        // lines written after the cut.
        let mut buf = std::mem::take(&mut s.partial);
        if layout == Layout::SingleFile {
            want += buf.len() as u64;
            buf.clear();
        }
        let start = s.pos.offset + buf.len() as u64;
        f.seek(SeekFrom::Start(start)).at(&path)?;
        let read_n = f.take(want).read_to_end(&mut buf).at(&path)? as u64;
        let (lines, used) = complete_lines(&buf);
        let n_lines = lines.len().min(budget);
        let mut consumed_bytes = 0usize;
        for line in lines.into_iter().take(n_lines) {
            let line_at = consumed_bytes;
            consumed_bytes += line.len() + 1;
            if s.long_line.take().is_some() {
                // The end of the over-long line skipped below, counted corrupt there. Single
                // file: the line is one of the file's, and takes its index now.
                if layout == Layout::SingleFile {
                    let seq = s.pos.next_seq;
                    s.pos.next_seq += 1;
                    *acked |= ack_lost(s, opts, seq, seq + 1);
                }
                progressed = true;
                continue;
            }
            let stamp = match layout {
                Layout::Segments => check_line_ref(line).and_then(|(producer, seq)| {
                    if producer == s.name {
                        Ok(seq)
                    } else {
                        Err(LineError::Json(format!("line is stamped by producer {producer:?}, not {:?}", s.name)))
                    }
                }),
                Layout::SingleFile => {
                    if line.ends_with(LINE_END) && parse_stamp_ref(line).is_some() {
                        check_line_ref(line).map(|_| s.pos.next_seq)
                    } else {
                        SampleRef::parse(line).map(|_| s.pos.next_seq).map_err(|e| LineError::Json(e.to_string()))
                    }
                }
            };
            let seq = match stamp {
                Ok(seq) => seq,
                Err(e) => {
                    eprintln!("ref-tail: warning: {}: skipping corrupt line at byte {}: {e}", path.display(), s.pos.offset + line_at as u64);
                    summary.corrupt += 1;
                    if layout == Layout::SingleFile {
                        // Its producer counted it as published: it is a line of the file, and
                        // takes its line index as seq (segments: the gap it leaves, below).
                        let seq = s.pos.next_seq;
                        s.pos.next_seq += 1;
                        *acked |= ack_lost(s, opts, seq, seq + 1);
                        progressed = true;
                    } else {
                        s.pos.corrupt_after += 1;
                    }
                    continue;
                }
            };
            if seq < s.pos.next_seq {
                summary.duplicates += 1;
                continue;
            }
            let mine = shard_of(&s.name, seq, opts.world) == opts.rank;
            // Staleness first: a stale line is appended to --stale-out before anything counts it
            // as handled, so a failed write leaves the position before it (not acknowledged).
            let mut stale = false;
            if let (true, Some(latest), Some(k)) = (mine, latest, opts.max_staleness) {
                // Only the version fields are read: the line passed its checks above, and
                // SampleRef::parse would refuse a ref at MAX_REF_BYTES once stamped (the stamp
                // is what MAX_LINE_BYTES leaves room for). A version that cannot be read is not
                // fatal either (the line would be delivered without --max-staleness): the ref
                // is delivered as unversioned, with a warning.
                let oldest = oldest_weight_version_in(line).unwrap_or_else(|e| {
                    eprintln!("ref-tail: warning: {}: line with seq {seq}: weight version unreadable, delivered as unversioned: {e}", path.display());
                    None
                });
                stale = staleness::is_stale_version(oldest, latest, k);
                if let (true, Some(so), Some(mark)) = (stale, stale_out.as_mut(), cursor.stale_out.as_mut()) {
                    // Below the mark: appended by a run that acknowledged nothing of its batch.
                    if mark.through.get(&s.name).is_none_or(|&t| seq >= t) {
                        if let Err(e) = so.append_line(line) {
                            s.pos.offset += line_at as u64;
                            return Err(e);
                        }
                        match mark.through.get_mut(&s.name) {
                            Some(t) => *t = seq + 1,
                            None => {
                                mark.through.insert(s.name.clone(), seq + 1);
                            }
                        }
                    }
                }
            }
            let corrupt_before = std::mem::take(&mut s.pos.corrupt_after);
            if seq > s.pos.next_seq {
                // Seqs the corrupt lines skipped since the last valid line cannot account for
                // were never seen at all: lost by the producer, or a segment cut.
                let missing = (seq - s.pos.next_seq).saturating_sub(corrupt_before);
                summary.missing += missing;
                let why = if missing > 0 { format!(" ({missing} of them in no line read)") } else { String::new() };
                eprintln!("ref-tail: warning: {}: sequence jumps from {} to {seq}{why}", path.display(), s.pos.next_seq);
                // The missing seqs were published (a corrupt line, skipped above, or lost):
                // acknowledged as lost, or in-flight backpressure would never drain.
                *acked |= ack_lost(s, opts, s.pos.next_seq, seq);
            }
            s.pos.next_seq = seq + 1;
            progressed = true;
            if !mine {
                summary.other_shards += 1;
                continue;
            }
            *acked = true;
            s.pos.consumed += 1;
            if stale {
                summary.stale += 1;
                cursor.stale += 1;
                continue;
            }
            out.extend_from_slice(line);
            out.push(b'\n');
            summary.delivered += 1;
            cursor.delivered += 1;
        }
        budget -= n_lines;
        s.pos.offset += consumed_bytes as u64;
        let rest = &buf[consumed_bytes..];
        if budget == 0 {
            s.partial = if consumed_bytes == used { rest.to_vec() } else { Vec::new() };
            return Ok((progressed, false));
        }
        if rest.len() > MAX_LINE_BYTES {
            // No newline in `rest` (the complete lines were all taken): skipped up to here, the
            // rest of the line up to its newline is skipped when it is read (above). Warned and
            // counted once, here, however many reads it spans.
            if s.long_line.is_none() {
                s.long_line = Some(s.pos.clone());
                eprintln!("ref-tail: warning: {}: skipping a line longer than {MAX_LINE_BYTES} bytes at byte {}", path.display(), s.pos.offset);
                summary.corrupt += 1;
                if layout == Layout::Segments {
                    s.pos.corrupt_after += 1;
                }
            }
            s.pos.offset += rest.len() as u64;
            progressed = true;
            continue;
        }
        if read_n == want {
            // There may be more on disk: keep the partial line and read on.
            s.partial = rest.to_vec();
            continue;
        }
        // At the end of the bytes written so far.
        match later {
            Some(next) => {
                // The rest of a skipped over-long line was counted (corrupt) already.
                if !rest.is_empty() && s.long_line.is_none() {
                    eprintln!("ref-tail: warning: {}: skipping torn line at byte {} ({} bytes; its writer was restarted)", path.display(), s.pos.offset, rest.len());
                    summary.torn += 1;
                }
                s.pos.segment = next;
                s.pos.offset = 0;
                s.partial.clear();
                s.long_line = None;
                progressed = true;
                continue;
            }
            None => {
                if closed && !rest.is_empty() && s.long_line.is_some() {
                    // The producer closed inside the line: nothing of it is left to read.
                    s.pos.offset += rest.len() as u64;
                    s.long_line = None;
                    progressed = true;
                } else if closed && !rest.is_empty() {
                    eprintln!("ref-tail: warning: {}: skipping torn line at byte {} ({} bytes; the producer closed)", path.display(), s.pos.offset, rest.len());
                    summary.torn += 1;
                    s.pos.offset += rest.len() as u64;
                    progressed = true;
                } else {
                    s.partial = rest.to_vec();
                }
                return Ok((progressed, closed));
            }
        }
    }
}

/// Stdin for `ref-publish`: each read first waits until there is input or a stop signal
/// ([`crate::stop::wait_readable`]), so a signal that arrives while a batch is being appended
/// is not left waiting behind the next blocking read.
struct StoppableStdin(io::StdinLock<'static>);

impl io::Read for StoppableStdin {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !crate::stop::wait_readable(libc::STDIN_FILENO) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        self.0.read(buf)
    }
}

/// `ref-publish` on stdin, with its summary printed when `--json`.
pub fn run_publish(opts: &PublishOptions) -> Result<()> {
    let mut input = io::BufReader::with_capacity(1 << 20, StoppableStdin(io::stdin().lock()));
    // More input is waiting when stdin polls readable (a file always is; EOF counts too).
    let mut more_ready = || {
        let mut fd = libc::pollfd { fd: libc::STDIN_FILENO, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut fd, 1, 0) > 0 }
    };
    let s = publish_with(opts, &mut input, &mut more_ready)?;
    if opts.json {
        println!("{}", serde_json::to_string(&s).expect("serializes"));
    }
    Ok(())
}

/// `ref-tail` to stdout, with its summary on stderr when `--json`.
pub fn run_tail(opts: &TailOptions) -> Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let s = tail(opts, &mut out)?;
    if opts.json {
        eprintln!("{}", serde_json::to_string(&s).expect("serializes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_lines_are_counted_across_chunks_as_complete_lines_counts_them() {
        let path = std::env::temp_dir().join(format!("disagg-count-lines-{}", std::process::id()));
        for text in [&b""[..], b"a\n", b"a\nbb\nccc", b"\n\n\n", b"torn", b"x\nyy\nzzz\n"] {
            fs::write(&path, text).unwrap();
            let f = File::open(&path).unwrap();
            let (lines, used) = complete_lines(text);
            for chunk in [1, 2, 3, 64] {
                assert_eq!(count_complete_lines(&f, chunk).unwrap(), (lines.len() as u64, used as u64, text.len() as u64), "{text:?} in chunks of {chunk}");
            }
        }
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn flush_out_writes_whole_lines_of_at_most_pipe_buf() {
        /// Records each write it gets.
        struct Writes(Vec<Vec<u8>>);
        impl Write for Writes {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.push(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut text = Vec::new();
        for i in 0..500 {
            text.extend_from_slice(format!("{{\"line\": {i}, \"pad\": \"{}\"}}\n", "x".repeat(i % 97)).as_bytes());
        }
        let long = format!("{}\n", "y".repeat(3 * PIPE_BUF));
        text.extend_from_slice(long.as_bytes());
        text.extend_from_slice(b"tail\n");
        let mut w = Writes(Vec::new());
        let mut buf = text.clone();
        flush_out(&mut w, &mut buf).unwrap();
        assert!(buf.is_empty());
        assert_eq!(w.0.concat(), text);
        for piece in &w.0 {
            assert!(piece.ends_with(b"\n"), "a write ends mid-line");
            assert!(piece.len() <= PIPE_BUF || piece[..piece.len() - 1].iter().all(|&b| b != b'\n'), "an over-long write holds more than one line");
        }
        assert!(w.0.iter().any(|p| p.len() == long.len()), "the long line went out alone");
    }

    fn parse(s: &str) -> SampleRef {
        SampleRef::parse(s.as_bytes()).unwrap()
    }

    /// The single-pass encoder writes exactly the bytes of `encode_line`.
    #[test]
    fn encode_into_matches_encode_line() {
        let base = r#""sample_id":"s0","feature_store_uri":"file:///x","feature_keys":{"h":"k","a":"\"q\"\u00e9\n"},"schema_version":1"#;
        let refs = [
            format!("{{{base}}}"),
            format!("{{{base},\"metadata\":{{\"weight_version\":3}}}}"),
            format!("{{{base},\"metadata\":{{\"disagg\":{{\"producer\":\"x\",\"seq\":9,\"xxh3\":\"0\"}},\"w\":[1,2],\"z\":null}}}}"),
            format!("{{{base},\"metadata\":{{\"a\":1,\"disagg\":1}},\"num_tokens\":7,\"run_id\":\"r\\u0001\"}}"),
            format!(
                r#"{{{base},"feature_specs":{{"h":{{"name":"h","shape":[1,-2],"dtype":"bfloat16","target_meta":{{"k":[1.5,"x"]}}}}}},"metadata":{{"weight_versions":[1,2]}}}}"#
            ),
        ];
        for (i, text) in refs.iter().enumerate() {
            let r = parse(text);
            for (producer, seq) in [("p0", 0u64), ("host-3.a_b", 18_446_744_073_709_551_615), ("x", i as u64)] {
                let mut out = b"prefix\n".to_vec();
                encode_line_into(&mut out, &r, producer, seq);
                let want = format!("prefix\n{}\n", encode_line(&r, producer, seq));
                assert_eq!(String::from_utf8(out).unwrap(), want);
                let line = want.trim_end().strip_prefix("prefix\n").unwrap().as_bytes();
                assert_eq!(check_line(line).unwrap(), LineStamp { producer: producer.to_string(), seq });
            }
        }
    }

    /// A ref at MAX_REF_BYTES stamped with the longest name and seq is a line readers accept,
    /// and its version reads from the line (the stamped line is over the ref cap).
    #[test]
    fn a_ref_at_the_cap_fits_a_line() {
        let mut r = parse(r#"{"sample_id":"s0","feature_store_uri":"file:///x","feature_keys":{},"schema_version":1,"metadata":{"weight_version":7,"pad":""}}"#);
        r.metadata.insert("pad".into(), "x".repeat(MAX_REF_BYTES - r.compact_len()).into());
        assert_eq!(r.to_json().len(), MAX_REF_BYTES);
        r.check().unwrap();
        let line = encode_line(&r, &"p".repeat(MAX_NAME_BYTES), u64::MAX);
        assert_eq!(line.len(), MAX_REF_BYTES + MAX_STAMP_BYTES, "MAX_STAMP_BYTES is the stamp's exact worst case");
        assert!(check_line(line.as_bytes()).is_ok());
        assert!(check_encoded_len(line.len() + 1).is_ok());
        assert!(check_encoded_len(MAX_LINE_BYTES + 2).is_err());
        assert_eq!(oldest_weight_version_in(line.as_bytes()), Ok(Some(7)));
        assert_eq!(sample_id_in(line.as_bytes()), Ok("s0".to_string()));
        assert!(matches!(SampleRef::parse(line.as_bytes()), Err(super::super::sample_ref::RefError::TooLarge(_))));
        // Published, it is read back by a resumed writer (feature-ingest) like any other ref.
        let ch = std::env::temp_dir().join(format!("disagg-channel-cap-{}", std::process::id()));
        let _ = fs::remove_dir_all(&ch);
        let mut p = RefProducer::open(&ch, "p", Layout::Segments, false).unwrap();
        p.append(&[r]).unwrap();
        assert_eq!(published_sample_ids(&ch, "p").unwrap(), vec!["s0".to_string()]);
        fs::remove_dir_all(&ch).unwrap();
    }

    #[test]
    fn checksum_mismatch_and_sharding() {
        let r = parse(r#"{"sample_id":"s0","feature_store_uri":"file:///x","feature_keys":{},"schema_version":1}"#);
        let mut line = encode_line(&r, "p0", 5).into_bytes();
        let at = line.len() - LINE_END.len() - 1;
        line[at] = if line[at] == b'0' { b'1' } else { b'0' };
        assert!(matches!(check_line(&line), Err(LineError::Checksum { .. })));
        for world in [1u64, 2, 3, 8] {
            for seq in [0u64, 1, 77, u64::MAX] {
                let name = "p".repeat(MAX_NAME_BYTES);
                for producer in ["p0", name.as_str()] {
                    let want = twox_hash::XxHash3_64::oneshot(format!("{producer}:{seq}").as_bytes()) % world;
                    assert_eq!(shard_of(producer, seq, world), want);
                }
            }
        }
    }

    #[test]
    fn newline_search() {
        let (lines, used) = complete_lines(b"a\nbb\n\nccc");
        assert_eq!(lines, vec![&b"a"[..], b"bb", b""]);
        assert_eq!(used, 6);
        assert_eq!(complete_lines(b"").1, 0);
    }
}
