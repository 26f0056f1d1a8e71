//! Delta payloads (docs/FORMATS.md, "Delta payloads"): how one tensor's new bytes are encoded
//! against its old bytes, and decoded in place into a local checkpoint.
//!
//! Every payload is one zstd frame whose header records the decompressed size, so Python's
//! `zstandard.ZstdDecompressor().decompress(frame)` reads it. We write frames from our own
//! sequences ([`crate::sparse_frame`], docs/FORMATS.md §4.5) and read any valid frame (slime's
//! level 1 included). Encoding and decoding stream in bounded pieces: memory does not grow
//! with tensor size.
//!
//! * `xor`: new ⊕ old over the whole tensor.
//! * `overwrite`: `u32 LE count`, `count × u32 LE` strictly ascending byte positions, then
//!   `count` new byte values. Positions are `u32`, so tensors over 4 GiB must use `xor`.

use crate::version::Encoding;
use crate::zstd_decode::xor_bytes;
use std::io::{self, Read, Write};
use std::ops::Range;

/// Streaming granularity: small enough that a chunk of the tensor, the decoded payload and
/// the decoder's window stay in L2 together (5 % faster applies than 1 MiB).
pub const CHUNK: usize = 256 << 10;
/// Largest tensor the `overwrite` encoding can address.
pub const MAX_OVERWRITE_TENSOR: usize = 1 << 32;
/// Largest zstd window a payload may ask for (2^27 = 128 MiB), bounding decoder memory.
pub const MAX_WINDOW_LOG: u32 = 27;

/// Why a payload could not be decoded; the caller adds the file and tensor.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("not a single zstd frame: {0}")]
    Frame(String),
    #[error("frame header has no decompressed size")]
    NoContentSize,
    #[error("payload decodes to {actual} bytes, expected {expected}")]
    Length { expected: u64, actual: u64 },
    #[error("overwrite position {pos} is out of range for a {len}-byte tensor or not ascending")]
    Position { pos: u64, len: usize },
    #[error("overwrite count {count} is larger than the tensor ({len} bytes)")]
    Count { count: u64, len: usize },
    #[error("tensor of {0} bytes is too large for the overwrite encoding (u32 positions and count: under 4 GiB, or 4 GiB with a byte unchanged); use xor")]
    TooLarge(usize),
    #[error("zstd: {0}")]
    Io(#[from] io::Error),
    /// Reading OLD or NEW (the encoders' input) failed.
    #[error("reading {}: {source}", path.display())]
    Source { path: std::path::PathBuf, source: io::Error },
    /// Reading or writing the tensor being patched (not the payload) failed.
    #[error("{0}")]
    Target(io::Error),
}

/// Number of bytes that differ between `old` and `new` (same length).
pub fn count_changed(old: &[u8], new: &[u8]) -> u64 {
    debug_assert_eq!(old.len(), new.len());
    let mut n = 0u64;
    for (o, w) in old.chunks(4096).zip(new.chunks(4096)) {
        if o != w {
            // Vectorizes: byte compares summed in u8 lanes per 255-byte run.
            for (a, b) in o.chunks(255).zip(w.chunks(255)) {
                n += a.iter().zip(b).fold(0u8, |acc, (x, y)| acc + (x != y) as u8) as u64;
            }
        }
    }
    n
}

/// One tensor of OLD and NEW as the encoders read it: a window of both at a time.
// Only the length is ever asked for (a zero-length tensor is encoded like any other).
#[allow(clippy::len_without_is_empty)]
pub trait PairSource {
    /// The tensor's length (OLD's and NEW's).
    fn len(&self) -> usize;
    /// OLD's and NEW's bytes `at..at + n` (`n` ≤ [`CHUNK`]), valid until the next call.
    fn window(&mut self, at: usize, n: usize) -> Result<(&[u8], &[u8]), PayloadError>;
}

/// Both tensors in memory (a slice each, e.g. mapped): windows are sub-slices, nothing is copied.
pub struct Slices<'a>(pub &'a [u8], pub &'a [u8]);

impl PairSource for Slices<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn window(&mut self, at: usize, n: usize) -> Result<(&[u8], &[u8]), PayloadError> {
        Ok((&self.0[at..at + n], &self.1[at..at + n]))
    }
}

/// One tensor of a safetensors data file (of OLD or NEW): its bytes as mapped, and where they
/// lie in the file, for [`PreadPair`].
#[derive(Clone, Copy)]
pub struct TensorFile<'a> {
    pub mapped: &'a [u8],
    /// The map of the whole file that `mapped` lies in (at `offset`), where it is one: a
    /// [`MappedPair`] unmaps what it has scanned through it.
    pub map: Option<&'a crate::inputmap::InputMap>,
    pub file: &'a std::fs::File,
    /// For errors.
    pub path: &'a std::path::Path,
    pub offset: u64,
}

/// OLD and NEW through their maps: windows are sub-slices, nothing is copied. Every
/// [`RELEASE_STEP`], and at the end, what has been scanned is handed back to the maps
/// ([`crate::inputmap::InputMap::done_with`]), which unmap each 2 MiB piece once all of it has
/// been read: a diff's resident set stays the pieces in flight whatever the model size.
///
/// Cheaper than [`PreadPair`] where the page cache holds large folios and one fault maps
/// hundreds of KiB; `delta-diff` picks between them (crate::inputmap, `--input-read`).
pub struct MappedPair<'a> {
    old: TensorFile<'a>,
    new: TensorFile<'a>,
    /// Bytes from the tensor's start already handed back (by the first pass over them).
    released: usize,
    /// Where the last window started: a window before it starts another pass (the overwrite
    /// encoder makes up to four over a dense tensor).
    last_at: usize,
    /// In a later pass, how far the pages it mapped again have been unmapped again.
    swept: usize,
}

/// How far a [`MappedPair`] scans between two hand-backs of what it has read.
pub const RELEASE_STEP: usize = 32 << 20;

impl<'a> MappedPair<'a> {
    /// The tensors `old` and `new`, of the same length.
    pub fn new(old: TensorFile<'a>, new: TensorFile<'a>) -> Self {
        assert_eq!(old.mapped.len(), new.mapped.len(), "encode of tensors of different sizes");
        MappedPair { old, new, released: 0, last_at: 0, swept: 0 }
    }

    /// Call `f` with the map of OLD and of NEW (where they are maps) and where the tensor's
    /// bytes `range` lie in it.
    fn each_map(&self, range: Range<usize>, f: impl Fn(&crate::inputmap::InputMap, Range<usize>)) {
        for t in [self.old, self.new] {
            if let Some(map) = t.map {
                let at = t.offset as usize;
                f(map, at + range.start..at + range.end);
            }
        }
    }

    /// Hand `[released, to)` back to the maps: read for the last time by this pair's first pass.
    fn release_to(&mut self, to: usize) {
        if to > self.released {
            self.each_map(self.released..to, |m, r| m.done_with(r));
            self.released = to;
        }
    }

    /// A later pass has read `[swept, to)` (within what was handed back) again: unmap it again.
    fn sweep_to(&mut self, to: usize) {
        let to = to.min(self.released);
        if to > self.swept {
            self.each_map(self.swept..to, |m, r| m.unmap_done(r));
            self.swept = to;
        }
    }
}

impl PairSource for MappedPair<'_> {
    fn len(&self) -> usize {
        self.new.mapped.len()
    }
    fn window(&mut self, at: usize, n: usize) -> Result<(&[u8], &[u8]), PayloadError> {
        if at < self.last_at {
            // Another pass: finish unmapping what the one before mapped again.
            self.sweep_to(self.released);
            self.swept = at;
        }
        self.last_at = at;
        if at >= self.released + RELEASE_STEP {
            self.release_to(at);
        } else if at < self.released && at >= self.swept + RELEASE_STEP {
            self.sweep_to(at);
        }
        Ok((&self.old.mapped[at..at + n], &self.new.mapped[at..at + n]))
    }
}

impl Drop for MappedPair<'_> {
    fn drop(&mut self) {
        // Also for a tensor whose encode stopped early (an error): its bytes are not read again.
        self.sweep_to(self.released);
        let len = self.len();
        self.release_to(len);
    }
}

/// OLD and NEW read with `pread` into two per-thread [`CHUNK`] buffers, a window at a time.
///
/// Can be cheaper than [`MappedPair`] where the page cache holds 4 KiB folios: a fault then
/// maps at most 64 KiB, and on an earlier host faulting in and unmapping every page of both
/// checkpoints cost more than copying it into a buffer that stays in L2 for the scan (a 1.1 GB
/// pair on 2 cores: 0.076 s mapped, unmap included, 0.042 s read). A file shrunk under us is a
/// clean read error here; through a map it is a SIGBUS, which crate::inputmap reports.
pub struct PreadPair<'a> {
    old: TensorFile<'a>,
    new: TensorFile<'a>,
    old_buf: ChunkBuf,
    new_buf: ChunkBuf,
}

impl<'a> PreadPair<'a> {
    /// The tensors `old` and `new`, of the same length.
    pub fn new(old: TensorFile<'a>, new: TensorFile<'a>) -> Self {
        assert_eq!(old.mapped.len(), new.mapped.len(), "encode of tensors of different sizes");
        PreadPair { old, new, old_buf: ChunkBuf::take(), new_buf: ChunkBuf::take() }
    }
}

impl PairSource for PreadPair<'_> {
    fn len(&self) -> usize {
        self.new.mapped.len()
    }
    fn window(&mut self, at: usize, n: usize) -> Result<(&[u8], &[u8]), PayloadError> {
        use std::os::unix::fs::FileExt;
        assert!(n <= CHUNK && at + n <= self.len());
        let (o, w) = (self.old_buf.get(n), self.new_buf.get(n));
        for (t, buf) in [(self.old, &mut *o), (self.new, &mut *w)] {
            t.file.read_exact_at(buf, t.offset + at as u64).map_err(|e| PayloadError::Source { path: t.path.to_path_buf(), source: shrunk(e) })?;
        }
        Ok((o, w))
    }
}

/// A read that ended early: the file is shorter than the header it was opened with said.
fn shrunk(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(e.kind(), format!("{}: {}", crate::inputmap::SHRANK, crate::inputmap::SHRANK_WHY))
    } else {
        e
    }
}

// Windows are whole blocks of the xor frame (but the last), as `FrameStream::push` requires.
const _: () = assert!(CHUNK.is_multiple_of(crate::sparse_frame::BLOCK));

/// Call `f(at, old, new)` for consecutive windows covering the tensor, while it returns
/// `Ok(true)`; returns whether every window was seen.
fn for_each_window(src: &mut impl PairSource, mut f: impl FnMut(usize, &[u8], &[u8]) -> Result<bool, PayloadError>) -> Result<bool, PayloadError> {
    let len = src.len();
    let mut at = 0;
    while at < len {
        let n = CHUNK.min(len - at);
        let (o, w) = src.window(at, n)?;
        if !f(at, o, w)? {
            return Ok(false);
        }
        at += n;
    }
    Ok(true)
}

/// Encode one tensor's change as a zstd frame into `out`; returns the number of changed bytes
/// (0: the tensors are equal, and the caller drops the frame).
pub fn encode<W: Write>(encoding: Encoding, old: &[u8], new: &[u8], out: W) -> Result<u64, PayloadError> {
    assert_eq!(old.len(), new.len(), "encode of tensors of different sizes");
    encode_from(encoding, &mut Slices(old, new), out, None)
}

/// [`encode`], also feeding the new bytes to `hasher`.
pub fn encode_hashed<W: Write>(encoding: Encoding, old: &[u8], new: &[u8], out: W, hasher: &mut crate::checksum::Hasher) -> Result<u64, PayloadError> {
    assert_eq!(old.len(), new.len(), "encode of tensors of different sizes");
    encode_from(encoding, &mut Slices(old, new), out, Some(hasher))
}

/// [`encode`] from any [`PairSource`]; the new bytes also go to `hasher` if there is one, each
/// piece right after it was scanned, while it is in cache.
pub fn encode_from<W: Write>(encoding: Encoding, src: &mut impl PairSource, out: W, hasher: Option<&mut crate::checksum::Hasher>) -> Result<u64, PayloadError> {
    match encoding {
        Encoding::Xor => encode_xor(src, out, hasher),
        Encoding::Overwrite => encode_overwrite_capped(src, out, ONE_PASS_MAX_CHANGES, hasher),
    }
}

fn encode_xor<W: Write>(src: &mut impl PairSource, out: W, mut hasher: Option<&mut crate::checksum::Hasher>) -> Result<u64, PayloadError> {
    use crate::sparse_frame::{FrameStream, Pair};
    let mut frame = FrameStream::new(out, src.len() as u64)?;
    for_each_window(src, |_, o, w| {
        frame.push(&Pair(o, w), |r| {
            if let Some(h) = hasher.as_deref_mut() {
                h.update(&w[r]);
            }
        })?;
        Ok(true)
    })?;
    Ok(frame.finish()?.1)
}

/// Call `f(base, offsets, new)` for every block of the tensor, in order, while it returns
/// `Ok(true)`: `offsets` are the ascending offsets from `base` of the block's differing bytes
/// and `new` is NEW's bytes from `base` (index it with an offset). This is the scan behind the
/// `overwrite` encoder (the first pass of sparse_frame's xor scan), handing over a block at a
/// time so the callers' loops stay tight. `seen(new)` gets each window's new bytes after its
/// scan. Returns whether the whole tensor was scanned.
fn for_each_diff_block(
    src: &mut impl PairSource,
    mut f: impl FnMut(usize, &[u32], &[u8]) -> Result<bool, PayloadError>,
    mut seen: impl FnMut(&[u8]),
) -> Result<bool, PayloadError> {
    use crate::sparse_frame::BLOCK;
    let mut scan = crate::sparse_frame::NonzeroScan::default();
    for_each_window(src, |at, o, w| {
        let pair = crate::sparse_frame::Pair(o, w);
        for b0 in (0..o.len()).step_by(BLOCK) {
            let b1 = (b0 + BLOCK).min(o.len());
            if !f(at + b0, scan.block(&pair, b0, b1), &w[b0..b1])? {
                return Ok(false);
            }
        }
        seen(w);
        Ok(true)
    })
}

/// Tensors with at most this many changed bytes are encoded from one scan, with positions and
/// values gathered in memory (5 bytes a change: 20 MiB at the cap); denser ones take three
/// streaming scans (count, positions, values) so memory stays bounded.
pub const ONE_PASS_MAX_CHANGES: usize = 4 << 20;

/// The changes of one tensor gathered for its `overwrite` frame, already laid out as the
/// payload: `head` is the u32 LE count followed by the u32 LE positions, `values` the new
/// bytes. Both buffers come from this thread's pool, so the next tensor reuses their pages.
struct Gathered {
    head: crate::pool::Pooled<Vec<u8>>,
    values: crate::pool::Pooled<Vec<u8>>,
}

thread_local! {
    static GATHER_BUFS: crate::pool::Pool<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Positions and new values of every changed byte, if there are at most `cap`. The new bytes
/// also go to `hasher`, a window at a time right after it is scanned; if the cap is hit,
/// `hasher` has seen a prefix only and the caller starts it afresh. The tensor is at most
/// [`MAX_OVERWRITE_TENSOR`] bytes (checked by the caller), so every position fits a u32.
fn collect_diffs(src: &mut impl PairSource, cap: usize, mut hasher: Option<&mut crate::checksum::Hasher>) -> Result<Option<Gathered>, PayloadError> {
    // Buffers grown up to the cap are kept: at most 20 MiB a thread, reused tensor after tensor.
    let take = || {
        let mut b = crate::pool::Pooled::take(&GATHER_BUFS, |_| true);
        b.clear();
        b
    };
    let (mut head, mut values) = (take(), take());
    head.extend_from_slice(&[0; 4]);
    let whole = for_each_diff_block(
        src,
        |base, offsets, new| {
            if values.len() + offsets.len() > cap {
                return Ok(false);
            }
            head.reserve(4 * offsets.len());
            values.reserve(offsets.len());
            for &q in offsets {
                head.extend_from_slice(&(base as u32 + q).to_le_bytes());
                values.push(new[q as usize]);
            }
            Ok(true)
        },
        |w| {
            if let Some(h) = hasher.as_deref_mut() {
                h.update(w);
            }
        },
    )?;
    let count = values.len() as u32;
    head[..4].copy_from_slice(&count.to_le_bytes());
    Ok(whole.then_some(Gathered { head, values }))
}

/// Stream what `emit(position, new value, buf)` makes of every differing byte into `out`, in
/// CHUNK-sized writes.
fn write_diffs(src: &mut impl PairSource, out: &mut impl Write, emit: impl Fn(u32, u8, &mut Vec<u8>)) -> Result<(), PayloadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + 4 * crate::sparse_frame::BLOCK);
    for_each_diff_block(
        src,
        |base, offsets, new| {
            for &q in offsets {
                emit(base as u32 + q, new[q as usize], &mut buf);
            }
            if buf.len() >= CHUNK {
                out.write_all(&buf)?;
                buf.clear();
            }
            Ok(true)
        },
        |_| {},
    )?;
    Ok(out.write_all(&buf)?)
}

/// Write an `overwrite` frame from gathered changes: `u32 LE count`, the positions (ascending),
/// the values. The GPU path and the tests end here; the CPU encoder gathers the payload's
/// bytes directly ([`collect_diffs`]).
pub fn write_overwrite_frame<W: Write>(out: W, positions: &[u32], values: &[u8]) -> io::Result<W> {
    assert_eq!(positions.len(), values.len(), "one value per position");
    let count = u32::try_from(positions.len()).map_err(|_| io::Error::other(format!("{} changes overflow the overwrite encoding's u32 count; use xor", positions.len())))?;
    let mut head = Vec::with_capacity(4 + 4 * positions.len());
    head.extend_from_slice(&count.to_le_bytes());
    head.extend(positions.iter().flat_map(|p| p.to_le_bytes()));
    write_gathered(out, &head, values)
}

/// The `overwrite` frame of `head` (count and positions, as in the payload) and `values`:
/// two large writes, which the frame codes in place, segment by segment.
fn write_gathered<W: Write>(out: W, head: &[u8], values: &[u8]) -> io::Result<W> {
    let mut enc = crate::sparse_frame::OverwriteFrame::new(out, values.len() as u64)?;
    enc.write_all(head)?;
    enc.write_all(values)?;
    enc.finish()
}

fn encode_overwrite_capped<W: Write>(src: &mut impl PairSource, out: W, one_pass_cap: usize, mut hasher: Option<&mut crate::checksum::Hasher>) -> Result<u64, PayloadError> {
    if src.len() > MAX_OVERWRITE_TENSOR {
        return Err(PayloadError::TooLarge(src.len()));
    }
    if let Some(Gathered { head, values }) = collect_diffs(src, one_pass_cap, hasher.as_deref_mut())? {
        write_gathered(out, &head, &values)?;
        return Ok(values.len() as u64);
    }
    // Dense: count (and hash the whole tensor afresh: the one-pass attempt fed it a prefix),
    // then positions, then values, so memory stays bounded.
    let mut hasher = hasher.map(|h| {
        *h = h.fresh();
        h
    });
    let mut count = 0u64;
    for_each_window(src, |_, o, w| {
        count += count_changed(o, w);
        if let Some(h) = hasher.as_deref_mut() {
            h.update(w);
        }
        Ok(true)
    })?;
    // The count is a u32: only a tensor of exactly 4 GiB with every byte changed overflows it.
    let count32 = u32::try_from(count).map_err(|_| PayloadError::TooLarge(src.len()))?;
    let mut enc = crate::sparse_frame::OverwriteFrame::new(out, count)?;
    enc.write_all(&count32.to_le_bytes())?;
    write_diffs(src, &mut enc, |p, _, buf| buf.extend_from_slice(&p.to_le_bytes()))?;
    write_diffs(src, &mut enc, |_, v, buf| buf.push(v))?;
    enc.finish()?;
    Ok(count)
}

/// Check that `frame` is exactly one zstd frame and return its declared decompressed size.
pub fn frame_content_size(frame: &[u8]) -> Result<u64, PayloadError> {
    let compressed = zstd::zstd_safe::find_frame_compressed_size(frame).map_err(|c| PayloadError::Frame(zstd::zstd_safe::get_error_name(c).to_string()))?;
    if compressed != frame.len() {
        return Err(PayloadError::Frame(format!("{} trailing bytes after the frame", frame.len() - compressed)));
    }
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(PayloadError::NoContentSize),
        Err(_) => Err(PayloadError::Frame("unreadable frame header".into())),
    }
}

/// The decoder for one payload frame. `xor` frames we wrote (recognised by their header,
/// [`crate::sparse_frame::has_our_header`]) go to our own decoder ([`crate::zstd_decode`]),
/// about 1.2–1.5× libzstd's streaming decoder on them (its offset-1 match copy dominated
/// delta-apply); any other frame goes to libzstd, which is faster on general-purpose frames
/// (slime's level 1) and on our `overwrite` frames (short offset-4 matches between literals,
/// where our decoder measured ~15 % more CPU). Both decode every valid frame identically and
/// refuse bad ones, so the choice only affects speed.
enum FrameDecoder<'a> {
    Ours(Box<crate::zstd_decode::FrameReader<'a>>),
    Libzstd(zstd::stream::read::Decoder<'static, &'a [u8]>),
}

impl Read for FrameDecoder<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            FrameDecoder::Ours(d) => d.read(buf),
            FrameDecoder::Libzstd(d) => d.read(buf),
        }
    }
}

fn decoder(frame: &[u8], encoding: Encoding) -> Result<FrameDecoder<'_>, PayloadError> {
    if encoding == Encoding::Xor && crate::sparse_frame::has_our_header(frame) {
        return crate::zstd_decode::FrameReader::new(frame, MAX_WINDOW_LOG).map(|r| FrameDecoder::Ours(Box::new(r))).map_err(|e| PayloadError::Frame(e.to_string()));
    }
    let mut d = zstd::stream::read::Decoder::with_buffer(frame)?.single_frame();
    d.window_log_max(MAX_WINDOW_LOG)?;
    Ok(FrameDecoder::Libzstd(d))
}

/// Read exactly `buf.len()` bytes or report a short payload.
fn read_full(r: &mut impl Read, buf: &mut [u8], expected: u64) -> Result<(), PayloadError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => PayloadError::Length { expected, actual: 0 },
        _ => PayloadError::Io(e),
    })
}

/// Apply a payload in place: `target` holds the old bytes on entry and the new bytes on success.
/// On error `target` may be partly patched; the caller treats the checkpoint as dirty.
pub fn apply(encoding: Encoding, frame: &[u8], target: &mut [u8]) -> Result<(), PayloadError> {
    apply_folded(&[(encoding, frame)], target).map_err(|(_, e)| e)
}

/// Apply several payloads of one tensor, oldest first, in a single pass over `target`: each
/// [`CHUNK`] of the tensor is patched by every payload in order before the next chunk is
/// touched, so a host catching up over K versions reads and writes each tensor once instead
/// of K times. Composition is exact: payload k was computed against the bytes payload k−1
/// produced, and within a chunk the payloads are applied in that order.
///
/// On error, returns the index of the payload at fault.
pub fn apply_folded(payloads: &[(Encoding, &[u8])], target: &mut [u8]) -> Result<(), (usize, PayloadError)> {
    apply_folded_to(payloads, &mut SliceTarget(target), |_| {})
}

/// Where [`apply_folded_to`] patches a tensor, chunk by chunk in order.
// Only the length is ever asked for (a zero-length tensor is patched like any other).
#[allow(clippy::len_without_is_empty)]
pub trait PatchTarget {
    fn len(&self) -> usize;
    /// Run `f` on bytes `[base, base + len)`, holding the old bytes on entry; what `f` leaves
    /// there is the new content of that range.
    fn patch(&mut self, base: usize, len: usize, f: &mut dyn FnMut(&mut [u8]) -> Result<(), PayloadError>) -> Result<(), PayloadError>;
}

/// A tensor in memory, patched in place.
pub struct SliceTarget<'a>(pub &'a mut [u8]);

impl PatchTarget for SliceTarget<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn patch(&mut self, base: usize, len: usize, f: &mut dyn FnMut(&mut [u8]) -> Result<(), PayloadError>) -> Result<(), PayloadError> {
        f(&mut self.0[base..base + len])
    }
}

/// A tensor inside a file, patched with `pread`/`pwrite` through one chunk-sized buffer.
///
/// Not through a writable mmap on purpose: writing back pages that are mapped writable makes
/// the kernel write-protect every page again and flush the TLB of every CPU the process runs
/// on (one IPI per page), which measured at two thirds of an apply's time.
pub struct FileRangeTarget<'a> {
    file: &'a std::fs::File,
    offset: u64,
    len: usize,
    buf: ChunkBuf,
}

impl<'a> FileRangeTarget<'a> {
    /// Bytes `[offset, offset + len)` of `file` (open for reading and writing).
    pub fn new(file: &'a std::fs::File, offset: u64, len: usize) -> Self {
        FileRangeTarget { file, offset, len, buf: ChunkBuf::take() }
    }
}

/// A [`CHUNK`]-sized buffer from a per-thread pool ([`crate::pool`]), returned to it on drop:
/// one apply patches hundreds of tensors, and a fresh zeroed buffer per tensor and payload
/// showed up as memset in profiles.
pub struct ChunkBuf(crate::pool::Pooled<Vec<u8>>);

thread_local! {
    static SPARE_CHUNKS: crate::pool::Pool<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl ChunkBuf {
    fn take() -> ChunkBuf {
        ChunkBuf(crate::pool::Pooled::take(&SPARE_CHUNKS, |v| v.capacity() > 0 && v.capacity() <= 2 * CHUNK))
    }
    /// The first `len` bytes (contents unspecified: callers overwrite them).
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.0.len() < len {
            self.0.resize(len, 0);
        }
        &mut self.0[..len]
    }
}

impl PatchTarget for FileRangeTarget<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn patch(&mut self, base: usize, len: usize, f: &mut dyn FnMut(&mut [u8]) -> Result<(), PayloadError>) -> Result<(), PayloadError> {
        use std::os::unix::fs::FileExt;
        let buf = self.buf.get(len);
        let at = self.offset + base as u64;
        self.file.read_exact_at(buf, at).map_err(PayloadError::Target)?;
        f(buf)?;
        self.file.write_all_at(buf, at).map_err(PayloadError::Target)
    }
}

/// [`apply_folded`] into any [`PatchTarget`], calling `seen(bytes)` on each chunk's new bytes
/// in order (the checksum, computed while the chunk is in cache).
pub fn apply_folded_to(payloads: &[(Encoding, &[u8])], target: &mut impl PatchTarget, seen: impl FnMut(&[u8])) -> Result<(), (usize, PayloadError)> {
    apply_folded_capped(payloads, target, seen, OVERWRITE_POSITIONS_IN_MEMORY)
}

fn apply_folded_capped(payloads: &[(Encoding, &[u8])], target: &mut impl PatchTarget, mut seen: impl FnMut(&[u8]), positions_cap: u64) -> Result<(), (usize, PayloadError)> {
    let len = target.len();
    let mut cursors =
        payloads.iter().enumerate().map(|(i, (enc, frame))| PayloadCursor::new(*enc, frame, len, positions_cap).map_err(|e| (i, e))).collect::<Result<Vec<_>, _>>()?;
    let mut fault = None;
    let mut base = 0;
    while base < len {
        let n = CHUNK.min(len - base);
        target
            .patch(base, n, &mut |chunk| {
                for (i, c) in cursors.iter_mut().enumerate() {
                    c.apply_range(chunk, base).inspect_err(|_| fault = Some(i))?;
                }
                seen(chunk);
                Ok(())
            })
            .map_err(|e| (fault.unwrap_or(0), e))?;
        base += n;
    }
    cursors.into_iter().enumerate().try_for_each(|(i, c)| c.finish().map_err(|e| (i, e)))
}

/// Largest position list (bytes) an `overwrite` cursor holds in memory to decode its frame
/// once (4 Mi changes); tensors with more changes decode the positions twice instead.
pub const OVERWRITE_POSITIONS_IN_MEMORY: u64 = 16 << 20;

/// A payload being applied front to back, one range of the tensor at a time.
enum PayloadCursor<'a> {
    /// Our decoder XORs our frames straight into the chunk (`fused`: the content bytes
    /// applied so far that way); a frame it cannot take that way is decoded again,
    /// materialized, and its blocks are XORed in where they lie (`fused` is `None`).
    XorOurs { dec: Box<crate::zstd_decode::FrameReader<'a>>, size: u64, frame: &'a [u8], fused: Option<u64> },
    /// libzstd's decoder reads into `buf` first.
    XorLibzstd { dec: FrameDecoder<'a>, buf: ChunkBuf, size: u64 },
    Overwrite {
        /// The positions: held in memory when they fit [`OVERWRITE_POSITIONS_IN_MEMORY`], so
        /// the frame is decoded once; else a second decoder over the same frame.
        positions: Box<dyn Read + 'a>,
        values: FrameDecoder<'a>,
        /// Entries read but not yet applied: (positions bytes, values), from `next`.
        pbuf: Vec<u8>,
        vbuf: Vec<u8>,
        next: usize,
        /// Entries not yet read from the frame.
        unread: u64,
        next_min: u64,
        len: usize,
        size: u64,
    },
}

impl<'a> PayloadCursor<'a> {
    fn new(encoding: Encoding, frame: &'a [u8], len: usize, positions_cap: u64) -> Result<Self, PayloadError> {
        let size = frame_content_size(frame)?;
        match encoding {
            Encoding::Xor => {
                if size != len as u64 {
                    return Err(PayloadError::Length { expected: len as u64, actual: size });
                }
                Ok(match decoder(frame, Encoding::Xor)? {
                    FrameDecoder::Ours(dec) => PayloadCursor::XorOurs { dec, size, frame, fused: Some(0) },
                    dec => PayloadCursor::XorLibzstd { dec, buf: ChunkBuf::take(), size },
                })
            }
            Encoding::Overwrite => {
                if len > MAX_OVERWRITE_TENSOR {
                    return Err(PayloadError::TooLarge(len));
                }
                let mut positions = decoder(frame, Encoding::Overwrite)?;
                let mut head = [0u8; 4];
                read_full(&mut positions, &mut head, size)?;
                let count = u32::from_le_bytes(head) as u64;
                if count > len as u64 {
                    return Err(PayloadError::Count { count, len });
                }
                if size != 4 + 5 * count {
                    return Err(PayloadError::Length { expected: 4 + 5 * count, actual: size });
                }
                let (positions, values): (Box<dyn Read + 'a>, _) = if 4 * count <= positions_cap {
                    // One decoder: all positions first, then it goes on with the values.
                    let mut all = vec![0u8; 4 * count as usize];
                    read_full(&mut positions, &mut all, size)?;
                    (Box::new(io::Cursor::new(all)), positions)
                } else {
                    // A second decoder over the same frame reads the values, so neither list is
                    // held in memory whole (decoding the positions twice).
                    let mut values = decoder(frame, Encoding::Overwrite)?;
                    io::copy(&mut (&mut values).take(4 + 4 * count), &mut io::sink())?;
                    (Box::new(positions), values)
                };
                Ok(PayloadCursor::Overwrite { positions, values, pbuf: Vec::new(), vbuf: Vec::new(), next: 0, unread: count, next_min: 0, len, size })
            }
        }
    }

    /// Apply every change that falls in `[base, base + chunk.len())`; ranges come in order.
    fn apply_range(&mut self, chunk: &mut [u8], base: usize) -> Result<(), PayloadError> {
        match self {
            PayloadCursor::XorOurs { dec, size, frame, fused } => {
                let mut at = 0;
                if let Some(done) = fused {
                    match dec.xor_into(chunk) {
                        Ok(()) => {
                            *done += chunk.len() as u64;
                            return Ok(());
                        }
                        Err(n) => {
                            // Not a frame for the fused path (after `n` bytes of this chunk):
                            // decode it again, materialized, from there on.
                            let from = *done + n as u64;
                            **dec = crate::zstd_decode::FrameReader::new(frame, MAX_WINDOW_LOG).map_err(|e| PayloadError::Frame(e.to_string()))?;
                            *fused = None;
                            serve(dec, from, *size, |_| {})?;
                            at = n;
                        }
                    }
                }
                // Straight from our decoder's block buffer: no copy into `buf` first.
                serve(dec, (chunk.len() - at) as u64, *size, |src| {
                    xor_bytes(&mut chunk[at..at + src.len()], src);
                    at += src.len();
                })
            }
            PayloadCursor::XorLibzstd { dec, buf, size } => {
                let b = buf.get(chunk.len());
                read_full(dec, b, *size)?;
                xor_bytes(chunk, b);
                Ok(())
            }
            PayloadCursor::Overwrite { positions, values, pbuf, vbuf, next, unread, next_min, len, size } => {
                let end = (base + chunk.len()) as u64;
                loop {
                    if *next == vbuf.len() {
                        if *unread == 0 {
                            return Ok(());
                        }
                        let n = (*unread).min((CHUNK / 4) as u64) as usize;
                        pbuf.resize(4 * n, 0);
                        vbuf.resize(n, 0);
                        read_full(positions, pbuf, *size)?;
                        read_full(values, vbuf, *size)?;
                        *unread -= n as u64;
                        *next = 0;
                    }
                    while *next < vbuf.len() {
                        let p = &pbuf[4 * *next..4 * *next + 4];
                        let pos = u32::from_le_bytes(p.try_into().expect("4 bytes")) as u64;
                        if pos < *next_min || pos >= *len as u64 {
                            return Err(PayloadError::Position { pos, len: *len });
                        }
                        if pos >= end {
                            return Ok(());
                        }
                        chunk[(pos - base as u64) as usize] = vbuf[*next];
                        *next_min = pos + 1;
                        *next += 1;
                    }
                }
            }
        }
    }

    /// After the last range: the payload must have been used up exactly.
    fn finish(self) -> Result<(), PayloadError> {
        match self {
            PayloadCursor::XorOurs { dec, size, .. } => expect_end(*dec, size),
            PayloadCursor::XorLibzstd { dec, size, .. } => expect_end(dec, size),
            PayloadCursor::Overwrite { next, vbuf, unread, pbuf, len, .. } => {
                if unread == 0 && next == vbuf.len() {
                    Ok(())
                } else {
                    let pos = u32::from_le_bytes(pbuf[4 * next..4 * next + 4].try_into().expect("4 bytes")) as u64;
                    Err(PayloadError::Position { pos, len })
                }
            }
        }
    }
}

/// Hand the next `n` bytes `dec` decodes to `f`, block by block, without a copy (a payload
/// of `size` bytes: a shorter one is an error).
fn serve(dec: &mut crate::zstd_decode::FrameReader, mut n: u64, size: u64, mut f: impl FnMut(&[u8])) -> Result<(), PayloadError> {
    while n > 0 {
        let src = io::BufRead::fill_buf(dec)?;
        if src.is_empty() {
            return Err(PayloadError::Length { expected: size, actual: 0 });
        }
        let k = (src.len() as u64).min(n) as usize;
        f(&src[..k]);
        io::BufRead::consume(dec, k);
        n -= k as u64;
    }
    Ok(())
}

/// A frame's decoder must be at its end once its tensor is whole.
fn expect_end(mut dec: impl Read, size: u64) -> Result<(), PayloadError> {
    let mut extra = [0u8; 1];
    match dec.read(&mut extra)? {
        0 => Ok(()),
        _ => Err(PayloadError::Length { expected: size, actual: size + 1 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(len: usize, every: usize) -> (Vec<u8>, Vec<u8>) {
        let old: Vec<u8> = (0..len).map(|i| (i * 31 % 256) as u8).collect();
        let mut new = old.clone();
        for i in (0..len).step_by(every) {
            new[i] = new[i].wrapping_add(1);
        }
        (old, new)
    }

    #[test]
    fn round_trip_both_encodings() {
        for len in [1usize, 7, 4096, CHUNK + 13, 3 * CHUNK] {
            let (old, new) = pair(len, 37);
            for enc in [Encoding::Xor, Encoding::Overwrite] {
                let mut frame = Vec::new();
                let changed = encode(enc, &old, &new, &mut frame).unwrap();
                assert_eq!(changed, count_changed(&old, &new));
                let mut t = old.clone();
                apply(enc, &frame, &mut t).unwrap();
                assert_eq!(t, new, "{enc} len {len}");
                let expected = if enc == Encoding::Xor { len as u64 } else { 4 + 5 * changed };
                assert_eq!(frame_content_size(&frame).unwrap(), expected);
            }
        }
    }

    #[test]
    fn our_frames_and_slime_frames_take_their_decoders_and_agree() {
        let (old, new) = pair(3 * CHUNK + 5, 37);
        let xor: Vec<u8> = old.iter().zip(&new).map(|(a, b)| a ^ b).collect();
        let mut ours = Vec::new();
        encode(Encoding::Xor, &old, &new, &mut ours).unwrap();
        // slime's writer: one level-1 frame with the content size.
        let slime = zstd::bulk::compress(&xor, 1).unwrap();
        assert!(matches!(decoder(&ours, Encoding::Xor).unwrap(), FrameDecoder::Ours(_)));
        assert!(matches!(decoder(&slime, Encoding::Xor).unwrap(), FrameDecoder::Libzstd(_)));
        assert!(matches!(decoder(&ours, Encoding::Overwrite).unwrap(), FrameDecoder::Libzstd(_)));
        for frame in [&ours, &slime] {
            let mut t = old.clone();
            apply(Encoding::Xor, frame, &mut t).unwrap();
            assert!(t == new);
        }
    }

    #[test]
    fn folded_equals_sequential() {
        let len = 2 * CHUNK + 777;
        let (v0, v1) = pair(len, 41);
        let mut v2 = v1.clone();
        for i in (5..len).step_by(97) {
            v2[i] = v2[i].wrapping_mul(3).wrapping_add(7);
        }
        let mut v3 = v2.clone();
        v3[len - 1] ^= 0x80;
        let versions = [&v0, &v1, &v2, &v3];
        for encs in [[Encoding::Xor; 3], [Encoding::Overwrite; 3], [Encoding::Xor, Encoding::Overwrite, Encoding::Xor]] {
            let frames: Vec<Vec<u8>> = (0..3)
                .map(|k| {
                    let mut f = Vec::new();
                    encode(encs[k], versions[k], versions[k + 1], &mut f).unwrap();
                    f
                })
                .collect();
            let payloads: Vec<(Encoding, &[u8])> = encs.iter().zip(&frames).map(|(e, f)| (*e, &f[..])).collect();
            let mut t = v0.clone();
            apply_folded(&payloads, &mut t).unwrap();
            assert!(t == v3, "{encs:?}");
            // Overwrite positions decoded twice instead of held in memory: same result.
            let mut t = v0.clone();
            apply_folded_capped(&payloads, &mut SliceTarget(&mut t), |_| {}, 0).unwrap();
            assert!(t == v3, "{encs:?}, positions streamed");
        }
    }

    #[test]
    fn file_range_target_patches_only_its_range_and_reports_io_errors() {
        let len = 2 * CHUNK + 999;
        let (old, new) = pair(len, 29);
        let dir = std::env::temp_dir().join(format!("disagg-codec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.bin");
        // The tensor sits between 100 bytes of header and 50 bytes of a neighbour.
        let mut file_bytes = vec![0xeeu8; 100];
        file_bytes.extend_from_slice(&old);
        file_bytes.extend_from_slice(&[0x77; 50]);
        std::fs::write(&path, &file_bytes).unwrap();
        for enc in [Encoding::Xor, Encoding::Overwrite] {
            std::fs::write(&path, &file_bytes).unwrap();
            let mut frame = Vec::new();
            encode(enc, &old, &new, &mut frame).unwrap();
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let mut hasher = crate::checksum::ChecksumAlg::Xxh3_128.hasher();
            let mut t = FileRangeTarget::new(&file, 100, len);
            apply_folded_to(&[(enc, &frame)], &mut t, |b| hasher.update(b)).unwrap();
            let after = std::fs::read(&path).unwrap();
            assert!(after[100..100 + len] == new[..], "{enc}");
            assert!(after[..100].iter().all(|&b| b == 0xee) && after[100 + len..].iter().all(|&b| b == 0x77), "{enc}: neighbours touched");
            assert_eq!(hasher.finish_hex(), crate::checksum::ChecksumAlg::Xxh3_128.hex(&new));
            // A read-only descriptor: the write fails as a target error, not a payload error.
            let ro = std::fs::File::open(&path).unwrap();
            let mut t = FileRangeTarget::new(&ro, 100, len);
            assert!(matches!(apply_folded_to(&[(enc, &frame)], &mut t, |_| {}), Err((0, PayloadError::Target(_)))));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pread_and_mapped_inputs_encode_what_slices_do_and_pread_reports_short_files() {
        let dir = std::env::temp_dir().join(format!("disagg-codec-pread-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (len, every) in [(0usize, 1usize), (1, 1), (CHUNK - 1, 5), (CHUNK, 3), (3 * CHUNK + 17, 41), (CHUNK + 5, 1)] {
            let (old, new) = pair(len, every);
            // Each tensor sits at a different offset of its file, after another's bytes.
            let (po, pn) = (dir.join("old.bin"), dir.join("new.bin"));
            std::fs::write(&po, [&[1u8; 13][..], &old].concat()).unwrap();
            std::fs::write(&pn, [&[2u8; 7][..], &new, &[3u8; 5]].concat()).unwrap();
            let (fo, fnew) = (std::fs::File::open(&po).unwrap(), std::fs::File::open(&pn).unwrap());
            let (to, tn) = (TensorFile { mapped: &old, map: None, file: &fo, path: &po, offset: 13 }, TensorFile { mapped: &new, map: None, file: &fnew, path: &pn, offset: 7 });
            for enc in [Encoding::Xor, Encoding::Overwrite] {
                let (mut want, mut got) = (Vec::new(), Vec::new());
                let (mut h1, mut h2) = (crate::checksum::ChecksumAlg::Xxh3_128.hasher(), crate::checksum::ChecksumAlg::Xxh3_128.hasher());
                let a = encode_hashed(enc, &old, &new, &mut want, &mut h1).unwrap();
                let b = encode_from(enc, &mut PreadPair::new(to, tn), &mut got, Some(&mut h2)).unwrap();
                assert_eq!((a, h1.finish_hex()), (b, h2.finish_hex()), "{enc} len {len}");
                assert!(want == got, "{enc} len {len}: frames differ");
                assert_eq!(a, count_changed(&old, &new));
                // Through the files' maps, handing back what was scanned: the same frame, and
                // the maps read the same after.
                let (mo, mn) = (crate::inputmap::InputMap::new(&fo, &po).unwrap(), crate::inputmap::InputMap::new(&fnew, &pn).unwrap());
                let (mto, mtn) = (TensorFile { mapped: &mo[13..13 + len], map: Some(&mo), ..to }, TensorFile { mapped: &mn[7..7 + len], map: Some(&mn), ..tn });
                let (mut mapped, mut h3) = (Vec::new(), crate::checksum::ChecksumAlg::Xxh3_128.hasher());
                assert_eq!(encode_from(enc, &mut MappedPair::new(mto, mtn), &mut mapped, Some(&mut h3)).unwrap(), a);
                assert!(mapped == want && h3.finish_hex() == crate::checksum::ChecksumAlg::Xxh3_128.hex(&new), "{enc} len {len}: mapped frame differs");
                if enc == Encoding::Overwrite {
                    // Past a tiny one-pass cap: four passes over the maps, the same frame.
                    let mut passes = Vec::new();
                    encode_overwrite_capped(&mut MappedPair::new(mto, mtn), &mut passes, 1, None).unwrap();
                    assert!(passes == want, "len {len}: multi-pass mapped frame differs");
                }
                assert!(mo[13..] == old[..] && mn[7..7 + len] == new[..]);
            }
            if len > 0 {
                // OLD shorter than the tensor claims: a read error naming the file, not a panic.
                std::fs::write(&po, &old[..len - 1]).unwrap();
                let fo = std::fs::File::open(&po).unwrap();
                let to = TensorFile { mapped: &old, map: None, file: &fo, path: &po, offset: 0 };
                for enc in [Encoding::Xor, Encoding::Overwrite] {
                    match encode_from(enc, &mut PreadPair::new(to, tn), io::sink(), None) {
                        Err(PayloadError::Source { path, .. }) => assert_eq!(path, po),
                        other => panic!("{enc} len {len}: {other:?}"),
                    }
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A mapped pair leaves nothing of its tensors mapped once done, however many passes the
    /// encoder made (the dense overwrite encoder makes four; the later ones map pages again).
    #[test]
    fn mapped_pairs_unmap_what_every_pass_mapped() {
        let dir = std::env::temp_dir().join(format!("disagg-codec-unmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Past RELEASE_STEP, so the first pass hands pieces back before the later ones read them.
        let len = 2 * RELEASE_STEP + 3 * crate::inputmap::PIECE;
        let (old, new) = pair(len, 97);
        let (po, pn) = (dir.join("old.bin"), dir.join("new.bin"));
        std::fs::write(&po, &old).unwrap();
        std::fs::write(&pn, &new).unwrap();
        let (fo, fnew) = (std::fs::File::open(&po).unwrap(), std::fs::File::open(&pn).unwrap());
        for (name, cap) in [("one pass", usize::MAX), ("four passes", 1)] {
            let (mo, mn) = (crate::inputmap::InputMap::new(&fo, &po).unwrap(), crate::inputmap::InputMap::new(&fnew, &pn).unwrap());
            let to = TensorFile { mapped: &mo[..], map: Some(&mo), file: &fo, path: &po, offset: 0 };
            let tn = TensorFile { mapped: &mn[..], map: Some(&mn), file: &fnew, path: &pn, offset: 0 };
            let mut out = Vec::new();
            encode_overwrite_capped(&mut MappedPair::new(to, tn), &mut out, cap, None).unwrap();
            let mut want = Vec::new();
            encode(Encoding::Overwrite, &old, &new, &mut want).unwrap();
            assert!(out == want, "{name}: frame differs");
            for m in [&mo, &mn] {
                let mapped: Vec<usize> = (0..len).step_by(4096).filter(|&at| crate::inputmap::tests::mapped(m.as_ptr() as usize + at) == Some(true)).collect();
                if crate::inputmap::tests::mapped(m.as_ptr() as usize).is_none() {
                    eprintln!("skipped: no /proc/self/pagemap");
                    return;
                }
                assert!(mapped.is_empty(), "{name}: {} pages still mapped, first at {}", mapped.len(), mapped[0]);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overwrite_one_pass_and_streaming_frames_are_identical() {
        for (len, every) in [(3 * CHUNK + 5, 3), (100_003, 1), (77, 7)] {
            let (old, new) = pair(len, every);
            let (mut one, mut streamed) = (Vec::new(), Vec::new());
            let (mut h1, mut h2) = (crate::checksum::ChecksumAlg::Xxh3_128.hasher(), crate::checksum::ChecksumAlg::Xxh3_128.hasher());
            let a = encode_overwrite_capped(&mut Slices(&old, &new), &mut one, usize::MAX, Some(&mut h1)).unwrap();
            // Capped at half the changes: the one-pass attempt gives up midway, after hashing a prefix.
            let b = encode_overwrite_capped(&mut Slices(&old, &new), &mut streamed, (count_changed(&old, &new) / 2) as usize, Some(&mut h2)).unwrap();
            assert_eq!(h1.finish_hex(), crate::checksum::ChecksumAlg::Xxh3_128.hex(&new));
            assert_eq!(h2.finish_hex(), crate::checksum::ChecksumAlg::Xxh3_128.hex(&new), "hash after an abandoned one-pass attempt");
            assert_eq!(a, b);
            assert!(one == streamed, "len {len}");
        }
    }

    #[test]
    fn overwrite_layout_is_count_positions_values() {
        let old = vec![0u8; 10];
        let mut new = old.clone();
        new[2] = 0xaa;
        new[9] = 0xbb;
        let mut frame = Vec::new();
        encode(Encoding::Overwrite, &old, &new, &mut frame).unwrap();
        let raw = zstd::stream::decode_all(&frame[..]).unwrap();
        assert_eq!(raw, [2, 0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0, 0xaa, 0xbb]);
    }

    /// A tensor of `len` bytes whose every byte changed (OLD zeros, NEW 0xff), served from
    /// two CHUNK buffers: a 4 GiB tensor without 8 GiB of memory.
    struct AllChanged(usize, Vec<u8>, Vec<u8>);

    impl PairSource for AllChanged {
        fn len(&self) -> usize {
            self.0
        }
        fn window(&mut self, _at: usize, n: usize) -> Result<(&[u8], &[u8]), PayloadError> {
            Ok((&self.1[..n], &self.2[..n]))
        }
    }

    /// Overwrite's u32 count cannot hold 2^32 changes: a 4 GiB tensor with every byte changed
    /// is refused (before any payload byte is written), not written with a wrapped count.
    /// Scans 4 GiB, so it runs only in optimized builds (`cargo test --release`).
    #[test]
    #[cfg_attr(debug_assertions, ignore = "scans 4 GiB; run with --release")]
    fn overwrite_refuses_a_count_that_overflows_u32() {
        let mut src = AllChanged(MAX_OVERWRITE_TENSOR, vec![0; CHUNK], vec![0xff; CHUNK]);
        let mut out = Vec::new();
        let e = encode_overwrite_capped(&mut src, &mut out, ONE_PASS_MAX_CHANGES, None).unwrap_err();
        assert!(matches!(e, PayloadError::TooLarge(n) if n == MAX_OVERWRITE_TENSOR), "{e}");
        assert!(out.is_empty(), "nothing written, got {} bytes", out.len());
        let mut src = AllChanged(MAX_OVERWRITE_TENSOR + 1, vec![0; CHUNK], vec![0xff; CHUNK]);
        assert!(matches!(encode_overwrite_capped(&mut src, &mut Vec::new(), ONE_PASS_MAX_CHANGES, None), Err(PayloadError::TooLarge(_))));
    }

    /// One block of a hand-made frame.
    enum Piece {
        /// Sequences over literals, coded by our block encoder (raw if it declines).
        Seqs(crate::zstd_block::tests::Block),
        Raw(Vec<u8>),
        Rle(u8, usize),
    }

    /// What a decoder makes of `pieces`, and the frame with our header that holds them.
    fn our_frame(pieces: &[Piece]) -> (Vec<u8>, Vec<u8>) {
        let mut enc = crate::zstd_block::BlockEncoder::new();
        let (mut content, mut body) = (Vec::new(), Vec::new());
        for (i, p) in pieces.iter().enumerate() {
            let (start, last) = (content.len(), i + 1 == pieces.len());
            match p {
                Piece::Seqs(b) => {
                    crate::zstd_block::tests::execute(&mut content, b);
                    if !enc.encode_block(&b.seqs, &b.lits, content.len() - start, last, &mut body).unwrap() {
                        enc.raw_block(&content[start..], last, &mut body);
                    }
                }
                Piece::Raw(bytes) => {
                    content.extend_from_slice(bytes);
                    enc.raw_block(bytes, last, &mut body);
                }
                &Piece::Rle(b, n) => {
                    content.resize(start + n, b);
                    body.extend_from_slice(&((n as u32) << 3 | 1 << 1 | u32::from(last)).to_le_bytes()[..3]);
                    body.push(b);
                }
            }
        }
        let mut frame = crate::sparse_frame::frame_header(content.len() as u64).to_vec();
        frame.extend_from_slice(&body);
        (content, frame)
    }

    /// A block of `len` bytes as our xor frames make them: 1–3 literals, then an offset-1
    /// match; `odd` makes every 50th match another offset, `nonzero` makes some runs repeat a
    /// nonzero byte.
    fn sparse_piece(s: &mut u64, len: usize, odd: bool, nonzero: bool) -> Piece {
        use crate::sparse_frame::tests::rng;
        let (mut lits, mut seqs, mut at) = (Vec::new(), Vec::new(), 0usize);
        loop {
            let r = rng(s);
            let (ll, ml) = (1 + r as usize % 3, 3 + (r >> 8) as usize % 150);
            if at + ll + ml > len {
                break;
            }
            lits.extend((0..ll).map(|k| if k + 1 < ll || (nonzero && (r >> 20).is_multiple_of(5)) { (rng(s) as u8) | 1 } else { 0 }));
            let offset = if odd && seqs.len() % 50 == 49 { 2 + (r >> 24) as u32 % 7 } else { 1 };
            seqs.push(crate::zstd_block::Sequence { lit_len: ll as u32, match_len: ml as u32, offset });
            at += ll + ml;
        }
        lits.extend((at..len).map(|_| rng(s) as u8));
        Piece::Seqs(crate::zstd_block::tests::Block { seqs, lits })
    }

    /// `old` patched by an `xor` frame the way the cursor did before it had a fused path (the
    /// decoder [`decoder`] picks, materializing): `None` where that refuses the frame.
    fn materialized_xor(frame: &[u8], old: &[u8]) -> Option<Vec<u8>> {
        if frame_content_size(frame).ok()? != old.len() as u64 {
            return None;
        }
        let mut dec = decoder(frame, Encoding::Xor).ok()?;
        let mut content = vec![0u8; old.len()];
        dec.read_exact(&mut content).ok()?;
        expect_end(dec, old.len() as u64).ok()?;
        Some(old.iter().zip(&content).map(|(a, b)| a ^ b).collect())
    }

    #[test]
    fn fused_xor_apply_takes_our_frames_and_hands_the_rest_to_the_materializing_decoder() {
        use crate::sparse_frame::BLOCK;
        let mut s = 0x5EED_F00Du64;
        let sparse = |s: &mut u64, n: usize, len: usize, odd_at: Option<usize>, nonzero: bool| -> Vec<Piece> {
            (0..n).map(|i| sparse_piece(s, if i + 1 == n { len } else { BLOCK }, odd_at == Some(i), nonzero)).collect()
        };
        // (pieces, where (in bytes from the start) the fused path hands over, if it does)
        let cases: Vec<(Vec<Piece>, Option<std::ops::Range<usize>>)> = vec![
            (sparse(&mut s, 5, 1000, None, false), None),
            (sparse(&mut s, 4, BLOCK, None, true), None),
            (vec![Piece::Raw(vec![7; BLOCK]), Piece::Rle(0, BLOCK), Piece::Rle(9, BLOCK), sparse_piece(&mut s, 5000, false, true)], None),
            // In block 3, at its 50th sequence.
            (sparse(&mut s, 6, 77, Some(3), false), Some(3 * BLOCK + 1000..4 * BLOCK)),
            (
                vec![Piece::Rle(0, BLOCK), sparse_piece(&mut s, 100_000, false, false), sparse_piece(&mut s, 100_000, false, false), sparse_piece(&mut s, 9, false, false)],
                Some(BLOCK + 100_000..BLOCK + 100_001),
            ),
        ];
        for (i, (pieces, handover)) in cases.iter().enumerate() {
            let (content, frame) = our_frame(pieces);
            assert!(zstd::stream::decode_all(&frame[..]).unwrap() == content, "case {i}: libzstd disagrees with the reference");
            let mut rng = i as u64 + 1;
            let old: Vec<u8> = (0..content.len()).map(|_| crate::sparse_frame::tests::rng(&mut rng) as u8).collect();
            let want: Vec<u8> = old.iter().zip(&content).map(|(a, b)| a ^ b).collect();
            // The fused path itself: Ok chunk after chunk, or its hand-over point.
            let mut dec = crate::zstd_decode::FrameReader::new(&frame, MAX_WINDOW_LOG).unwrap();
            let mut t = old.clone();
            let mut stopped = None;
            for (k, c) in t.chunks_mut(CHUNK).enumerate() {
                if let Err(n) = dec.xor_into(c) {
                    stopped = Some(k * CHUNK + n);
                    break;
                }
            }
            assert_eq!(stopped.is_some(), handover.is_some(), "case {i}");
            let upto = stopped.unwrap_or(content.len());
            assert!(handover.as_ref().is_none_or(|h| h.contains(&upto)), "case {i}: handed over at {upto}, not in {handover:?}");
            assert!(t[..upto] == want[..upto], "case {i}: fused bytes wrong");
            // The cursor: the same bytes as the materializing decoder, whichever path.
            let mut t = old.clone();
            apply(Encoding::Xor, &frame, &mut t).unwrap();
            assert!(t == want, "case {i}: apply differs");
            assert!(materialized_xor(&frame, &old) == Some(want), "case {i}");
        }
    }

    #[test]
    fn fused_xor_apply_of_a_damaged_frame_agrees_with_the_materializing_decoder() {
        use crate::sparse_frame::tests::rng;
        let mut s = 0xBAD_F4A3u64;
        let mut frames = Vec::new();
        for (len, every) in [(CHUNK + 2 * crate::sparse_frame::BLOCK + 999, 37), (70_000, 5)] {
            let (old, new) = pair(len, every);
            let mut f = Vec::new();
            encode(Encoding::Xor, &old, &new, &mut f).unwrap();
            frames.push((old, f));
        }
        let (content, f) = our_frame(&[sparse_piece(&mut s, crate::sparse_frame::BLOCK, false, true), sparse_piece(&mut s, 40_000, true, true)]);
        frames.push((vec![0x5A; content.len()], f));
        let (mut same_ok, mut same_err) = (0, 0);
        let iters: usize = std::env::var("FUSED_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
        for it in 0..iters {
            let (old, frame) = &frames[it % frames.len()];
            let mut f = frame.clone();
            for _ in 0..1 + rng(&mut s) % 3 {
                let r = rng(&mut s);
                let at = if r.is_multiple_of(3) { (r >> 8) as usize % f.len().min(80) } else { (r >> 8) as usize % f.len() };
                f[at] ^= 1 << ((r >> 50) % 8);
            }
            let mut t = old.clone();
            let got = apply(Encoding::Xor, &f, &mut t).ok().map(|()| t);
            let want = materialized_xor(&f, old);
            assert!(
                got == want,
                "iteration {it}: fused apply {} where the materializing decoder {}",
                if got.is_some() { "succeeds" } else { "fails" },
                if want.is_some() { "succeeds" } else { "fails" }
            );
            if want.is_some() {
                same_ok += 1;
            } else {
                same_err += 1;
            }
        }
        assert!(same_ok > iters / 30 && same_err > iters / 3, "{same_ok} {same_err}");
    }

    #[test]
    fn rejects_bad_payloads() {
        let (old, new) = pair(1000, 10);
        let mut frame = Vec::new();
        encode(Encoding::Xor, &old, &new, &mut frame).unwrap();
        let mut short = old[..999].to_vec();
        assert!(matches!(apply(Encoding::Xor, &frame, &mut short), Err(PayloadError::Length { .. })));
        let mut t = old.clone();
        assert!(matches!(apply(Encoding::Xor, &frame[..frame.len() - 3], &mut t), Err(PayloadError::Frame(_))));
        let mut trailing = frame.clone();
        trailing.push(0);
        assert!(matches!(apply(Encoding::Xor, &trailing, &mut t), Err(PayloadError::Frame(_))));
        // Descending positions.
        let raw = [2u8, 0, 0, 0, 5, 0, 0, 0, 3, 0, 0, 0, 1, 2];
        let f = zstd::bulk::compress(&raw, 1).unwrap();
        assert!(matches!(apply(Encoding::Overwrite, &f, &mut t), Err(PayloadError::Position { pos: 3, .. })));
        // Out of range.
        let raw = [1u8, 0, 0, 0, 0xe8, 0x03, 0, 0, 1];
        let f = zstd::bulk::compress(&raw, 1).unwrap();
        assert!(matches!(apply(Encoding::Overwrite, &f, &mut t), Err(PayloadError::Position { pos: 1000, .. })));
    }
}
