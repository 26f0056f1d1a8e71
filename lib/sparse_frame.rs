//! zstd frames for sparse `xor` payloads, built from sequences we find ourselves.
//!
//! An RL step changes ~1–3 % of bf16 elements, nearly always in the low byte, so `new ⊕ old` is
//! zero runs (mean ~70 bytes) between single nonzero bytes. libzstd's level-1 match finder spends
//! ~70 % of slime's encode time rediscovering that structure by hashing. Here one linear scan
//! over the two tensors finds it directly: every zero run of at least [`MIN_RUN`] bytes becomes a
//! zstd sequence "literals ending in one zero byte, then a match of offset 1" (offset 1 repeats
//! the zero), and everything else stays literal. Our own entropy stage ([`crate::zstd_block`]:
//! Huffman literals, FSE sequence codes) turns each block's sequences into a compressed block,
//! so the frame is ordinary zstd that any decoder (python-zstandard, slime, sglang) reads.
//!
//! ## Frame layout (docs/FORMATS.md §4.5)
//! We write the frame header ourselves: magic, a descriptor with an 8-byte content size, no
//! checksum, no dictionary, and a 128 KiB window (the only back-reference is offset 1, so the
//! decoder needs no more history than one block). Blocks follow in order, each coded by the
//! frame's one [`BlockEncoder`], which carries the repeat offsets and the entropy tables a later
//! block may reuse; a block that would not shrink is stored raw. The scan works one
//! [`SEGMENT`] at a time (the streaming writers buffer at most one), so memory is bounded
//! whatever the tensor size and the bytes do not depend on how the input arrives.

use crate::zstd_block::{BlockEncoder, Sequence};
use std::io::{self, Write};

/// Bytes of content per zstd block (the format's maximum).
pub const BLOCK: usize = 128 << 10;
/// Bytes of content scanned and written out at a time (the streaming writers buffer one).
pub const SEGMENT: usize = 32 * BLOCK;
/// Shortest zero run coded as a match (one literal zero, then a match of at least 3, zstd's
/// minimum). Measured on a 531 MiB RL-step pair (with libzstd's entropy stage): 4 gives the
/// smallest frames (12.19 MB; 10 gives 12.53, 32 gives 16.25) at the same speed, since FSE codes the short, repetitive
/// sequence lengths in a few bits.
pub const MIN_RUN: usize = 4;
/// The frame's window: one block (log2).
pub(crate) const WINDOW_LOG: u32 = 17;
const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// How far ahead of the scan (bytes) the AVX2 path prefetches.
pub const PREFETCH: usize = 1024;

/// Where the XOR bytes come from: two tensors (CPU path) or an XOR already computed (GPU path).
// Only the length is ever asked for (an empty source still makes a valid frame).
#[allow(clippy::len_without_is_empty)]
pub trait XorSource {
    fn len(&self) -> usize;
    /// XOR byte `i` (`i < len`).
    fn byte(&self, i: usize) -> u8;
    /// XOR bytes `i..i + 16` (`i + 16 <= len`).
    fn bytes16(&self, i: usize) -> [u8; 16];
    /// Bit k set iff XOR byte `i + k` is nonzero, for the 64 bytes from `i` (`i + 64 <= len`).
    fn mask64(&self, i: usize) -> u64;
    /// Where the 64 bytes at `i` lie, for the SIMD masks: the first operand and, when the XOR
    /// is computed here, the second. The caller reads only `i..i + 64` through them.
    ///
    /// Panics (debug builds) unless `i + 64 <= len`.
    fn operands64(&self, i: usize) -> (*const u8, Option<*const u8>);
}

/// Nonzero-byte bits of one little-endian word.
#[inline(always)]
fn word_mask(x: u64) -> u64 {
    // Folding each byte onto its low bit, then gathering the eight low bits.
    let mut y = x | (x >> 4);
    y |= y >> 2;
    y |= y >> 1;
    y &= 0x0101_0101_0101_0101;
    y.wrapping_mul(0x0102_0408_1020_4080) >> 56
}

#[inline(always)]
fn word_at(s: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes"))
}

#[inline(always)]
fn u128_at(s: &[u8], i: usize) -> u128 {
    u128::from_le_bytes(s[i..i + 16].try_into().expect("16 bytes"))
}

/// Nonzero-byte mask of the 64 bytes at `a` (XOR `b` if given), with AVX2 and a prefetch.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nonzero_mask64_avx2((a, b): (*const u8, Option<*const u8>)) -> u64 {
    use std::arch::x86_64::*;
    // Prefetch ahead: the per-change work between loads leaves the memory system idle
    // otherwise. A prefetch never faults, and wrapping_add computes the address without
    // claiming it is in bounds.
    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(PREFETCH).cast());
    // SAFETY (all loads): the caller guarantees 64 readable bytes at `a` and at `b`; loadu
    // needs no alignment.
    let (x0, x1) = unsafe { (_mm256_loadu_si256(a.cast()), _mm256_loadu_si256(a.add(32).cast())) };
    let (y0, y1) = match b {
        Some(b) => {
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH).cast());
            unsafe { (_mm256_loadu_si256(b.cast()), _mm256_loadu_si256(b.add(32).cast())) }
        }
        None => (_mm256_setzero_si256(), _mm256_setzero_si256()),
    };
    let lo = _mm256_movemask_epi8(_mm256_cmpeq_epi8(x0, y0)) as u32;
    let hi = _mm256_movemask_epi8(_mm256_cmpeq_epi8(x1, y1)) as u32;
    !(u64::from(lo) | u64::from(hi) << 32)
}

/// [`nonzero_mask64_avx2`] with AVX-512: a byte compare writes the 64-bit mask directly (no
/// movemask, shift and merge of two halves), which the profile of the scan showed as its
/// largest cost.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn nonzero_mask64_avx512((a, b): (*const u8, Option<*const u8>)) -> u64 {
    use std::arch::x86_64::*;
    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(PREFETCH).cast());
    // SAFETY (both loads): the caller guarantees 64 readable bytes at `a` and at `b`; loadu
    // needs no alignment.
    let x = unsafe { _mm512_loadu_si512(a.cast()) };
    match b {
        Some(b) => {
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH).cast());
            let y = unsafe { _mm512_loadu_si512(b.cast()) };
            _mm512_cmpneq_epi8_mask(x, y)
        }
        None => _mm512_test_epi8_mask(x, x),
    }
}

/// `old ⊕ new`, computed on the fly.
pub struct Pair<'a>(pub &'a [u8], pub &'a [u8]);

impl XorSource for Pair<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn byte(&self, i: usize) -> u8 {
        self.0[i] ^ self.1[i]
    }
    #[inline(always)]
    fn bytes16(&self, i: usize) -> [u8; 16] {
        (u128_at(self.0, i) ^ u128_at(self.1, i)).to_le_bytes()
    }
    #[inline(always)]
    fn mask64(&self, i: usize) -> u64 {
        (0..8).fold(0, |m, k| m | word_mask(word_at(self.0, i + 8 * k) ^ word_at(self.1, i + 8 * k)) << (8 * k))
    }
    #[inline(always)]
    fn operands64(&self, i: usize) -> (*const u8, Option<*const u8>) {
        debug_assert!(i + 64 <= self.0.len() && self.0.len() == self.1.len());
        (self.0.as_ptr().wrapping_add(i), Some(self.1.as_ptr().wrapping_add(i)))
    }
}

/// XOR bytes computed elsewhere.
pub struct Xored<'a>(pub &'a [u8]);

impl XorSource for Xored<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn byte(&self, i: usize) -> u8 {
        self.0[i]
    }
    #[inline(always)]
    fn bytes16(&self, i: usize) -> [u8; 16] {
        self.0[i..i + 16].try_into().expect("16 bytes")
    }
    #[inline(always)]
    fn mask64(&self, i: usize) -> u64 {
        (0..8).fold(0, |m, k| m | word_mask(word_at(self.0, i + 8 * k)) << (8 * k))
    }
    #[inline(always)]
    fn operands64(&self, i: usize) -> (*const u8, Option<*const u8>) {
        debug_assert!(i + 64 <= self.0.len());
        (self.0.as_ptr().wrapping_add(i), None)
    }
}

/// Working buffers of one encoder, kept per thread between tensors.
#[derive(Default)]
struct Buffers {
    seqs: Vec<Sequence>,
    lits: Vec<u8>,
    frame: Vec<u8>,
    xor: Vec<u8>,
    /// Nonzero offsets of the block being scanned.
    pos: Vec<u32>,
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::new(Buffers::default());
}

/// The frame header we write: magic, descriptor (8-byte content size, no single segment, no
/// checksum, no dictionary), a one-block window, the content size.
pub fn frame_header(content_size: u64) -> [u8; 14] {
    let mut h = [0u8; 14];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = 0b1100_0000; // Frame_Content_Size_flag = 3 (8 bytes)
    h[5] = ((WINDOW_LOG - 10) as u8) << 3; // Window_Descriptor: exponent, mantissa 0
    h[6..14].copy_from_slice(&content_size.to_le_bytes());
    h
}

/// Sequences and literals of one block `[b0, b1)` of `src`; returns its nonzero byte count.
/// `mask(i)` is [`XorSource::mask64`] or its AVX2 form; `pos` is scratch of at least
/// `BLOCK + 64` entries.
///
/// Two passes, because the changes sit at random places: a single loop that branches on
/// "does this 64-byte window hold a change" mispredicts about every other window. The first
/// pass only lists the block's nonzero offsets, with four unconditional stores per window (a
/// window rarely holds more); the second walks that list, where the one branch left ("is the
/// zero run long enough") nearly always goes the same way.
#[inline(always)]
fn scan_block<S: XorSource>(src: &S, b0: usize, b1: usize, seqs: &mut Vec<Sequence>, lits: &mut Vec<u8>, pos: &mut [u32], mask: impl Fn(usize) -> u64) -> u64 {
    let n = list_nonzero(src, b0, b1, pos, mask);
    let mut lit_start = b0;
    // One past the last nonzero byte seen (b0 at the start: the block's first byte is then
    // the literal zero that a leading zero run's match repeats, so every block opens with a
    // literal).
    let mut end_nz = b0;
    // A zero run from end_nz to p (exclusive) long enough for a match: literals up to and
    // including its first zero, then the match repeating that zero.
    let emit = |p: usize, end_nz: usize, lit_start: &mut usize, seqs: &mut Vec<Sequence>, lits: &mut Vec<u8>| {
        let lit_end = end_nz + 1;
        push_literals(src, *lit_start, lit_end, lits);
        seqs.push(Sequence { lit_len: (lit_end - *lit_start) as u32, match_len: (p - lit_end) as u32, offset: 1 });
        *lit_start = p;
    };
    for &q in &pos[..n] {
        let p = b0 + q as usize;
        if p - end_nz >= MIN_RUN {
            emit(p, end_nz, &mut lit_start, seqs, lits);
        }
        end_nz = p + 1;
    }
    if b1 - end_nz >= MIN_RUN {
        emit(b1, end_nz, &mut lit_start, seqs, lits);
    }
    push_literals(src, lit_start, b1, lits);
    n as u64
}

/// Offsets (from `b0`) of the nonzero XOR bytes in `[b0, b1)` into `pos`, ascending; returns
/// how many. `pos` holds at least `BLOCK + 64` entries.
#[inline(always)]
fn list_nonzero<S: XorSource>(src: &S, b0: usize, b1: usize, pos: &mut [u32], mask: impl Fn(usize) -> u64) -> usize {
    debug_assert!(b1 - b0 <= BLOCK && pos.len() >= BLOCK + 64);
    let mut n = 0usize;
    let mut i = b0;
    while i + 64 <= b1 {
        let mut m = mask(i);
        let count = m.count_ones() as usize;
        let off = (i - b0) as u32;
        // n <= i - b0 (at most one entry a byte), so n + 64 <= BLOCK + 64: in bounds. A store
        // past the count holds garbage (trailing_zeros(0) = 64) that the next window overwrites.
        for k in 0..4 {
            pos[n + k] = off + m.trailing_zeros();
            m &= m.wrapping_sub(1);
        }
        let mut k = 4;
        while m != 0 {
            pos[n + k] = off + m.trailing_zeros();
            m &= m - 1;
            k += 1;
        }
        n += count;
        i += 64;
    }
    for p in i..b1 {
        pos[n] = (p - b0) as u32;
        n += usize::from(src.byte(p) != 0);
    }

    n
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt,bmi1")]
unsafe fn list_nonzero_avx2<S: XorSource>(src: &S, b0: usize, b1: usize, pos: &mut [u32]) -> usize {
    // SAFETY: AVX2 is present (this function's contract); list_nonzero asks only for masks of
    // 64 bytes inside the range, which lies inside the source.
    list_nonzero(src, b0, b1, pos, |i| unsafe { nonzero_mask64_avx2(src.operands64(i)) })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,popcnt,bmi1")]
unsafe fn list_nonzero_avx512<S: XorSource>(src: &S, b0: usize, b1: usize, pos: &mut [u32]) -> usize {
    // SAFETY: as list_nonzero_avx2, with AVX-512F/BW present.
    list_nonzero(src, b0, b1, pos, |i| unsafe { nonzero_mask64_avx512(src.operands64(i)) })
}

/// Which compiled scan the CPU runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ScanIsa {
    Portable,
    /// AVX2, POPCNT, BMI1.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The same plus AVX-512F and AVX-512BW.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The fastest scan this CPU supports (feature detection is cached by std).
pub(crate) fn scan_isa() -> ScanIsa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("popcnt") && has!("bmi1") {
            return if has!("avx512f") && has!("avx512bw") { ScanIsa::Avx512 } else { ScanIsa::Avx2 };
        }
    }
    ScanIsa::Portable
}

/// The first pass of the scan on its own, for the `overwrite` encoder: the offsets of the
/// nonzero XOR bytes, one block at a time, from scratch reused across blocks and, through a
/// per-thread pool, across tensors (a fresh 512 KiB of zeros per tensor showed in profiles).
pub struct NonzeroScan {
    pos: crate::pool::Pooled<Vec<u32>>,
}

thread_local! {
    static SCAN_OFFSETS: crate::pool::Pool<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Default for NonzeroScan {
    fn default() -> Self {
        let mut pos = crate::pool::Pooled::take(&SCAN_OFFSETS, |_| true);
        pos.resize(BLOCK + 64, 0);
        NonzeroScan { pos }
    }
}

impl NonzeroScan {
    /// Offsets from `b0` of the nonzero bytes of `src[b0..b1]` (at most [`BLOCK`] bytes), ascending.
    pub fn block<S: XorSource>(&mut self, src: &S, b0: usize, b1: usize) -> &[u32] {
        assert!(b0 <= b1 && b1 <= src.len() && b1 - b0 <= BLOCK);
        // SAFETY (both SIMD calls): scan_isa detected the features; the range is inside the
        // source (asserted).
        let n = match scan_isa() {
            #[cfg(target_arch = "x86_64")]
            ScanIsa::Avx512 => unsafe { list_nonzero_avx512(src, b0, b1, &mut self.pos) },
            #[cfg(target_arch = "x86_64")]
            ScanIsa::Avx2 => unsafe { list_nonzero_avx2(src, b0, b1, &mut self.pos) },
            ScanIsa::Portable => list_nonzero(src, b0, b1, &mut self.pos, |i| src.mask64(i)),
        };
        &self.pos[..n]
    }
}

/// Append XOR bytes `from..to` to `lits`. A literal run is mostly 1–2 bytes: one 16-byte
/// copy trimmed back costs less than a loop of unpredictable length.
#[inline(always)]
fn push_literals<S: XorSource>(src: &S, from: usize, to: usize, lits: &mut Vec<u8>) {
    if to - from <= 16 && from + 16 <= src.len() {
        let at = lits.len();
        lits.extend_from_slice(&src.bytes16(from));
        lits.truncate(at + (to - from));
    } else {
        push_literals_long(src, from, to, lits);
    }
}

#[inline(never)]
fn push_literals_long<S: XorSource>(src: &S, mut from: usize, to: usize, lits: &mut Vec<u8>) {
    while from + 16 <= to {
        lits.extend_from_slice(&src.bytes16(from));
        from += 16;
    }
    lits.extend((from..to).map(|j| src.byte(j)));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt,bmi1")]
unsafe fn scan_block_avx2<S: XorSource>(src: &S, b0: usize, b1: usize, seqs: &mut Vec<Sequence>, lits: &mut Vec<u8>, pos: &mut [u32]) -> u64 {
    // SAFETY: AVX2 is present (this function's contract); scan_block asks only for masks of
    // 64 bytes inside the block, which lies inside the source.
    scan_block(src, b0, b1, seqs, lits, pos, |i| unsafe { nonzero_mask64_avx2(src.operands64(i)) })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,popcnt,bmi1")]
unsafe fn scan_block_avx512<S: XorSource>(src: &S, b0: usize, b1: usize, seqs: &mut Vec<Sequence>, lits: &mut Vec<u8>, pos: &mut [u32]) -> u64 {
    // SAFETY: as scan_block_avx2, with AVX-512F/BW present.
    scan_block(src, b0, b1, seqs, lits, pos, |i| unsafe { nonzero_mask64_avx512(src.operands64(i)) })
}

/// [`scan_block`] with the fastest mask the CPU has.
pub(crate) fn scan_block_dispatch<S: XorSource>(src: &S, b0: usize, b1: usize, seqs: &mut Vec<Sequence>, lits: &mut Vec<u8>, pos: &mut Vec<u32>) -> u64 {
    assert!(b0 <= b1 && b1 <= src.len() && b1 - b0 <= BLOCK);
    if pos.len() < BLOCK + 64 {
        pos.resize(BLOCK + 64, 0);
    }
    // SAFETY (both SIMD calls): scan_isa detected the features; the block is inside the
    // source (asserted).
    match scan_isa() {
        #[cfg(target_arch = "x86_64")]
        ScanIsa::Avx512 => unsafe { scan_block_avx512(src, b0, b1, seqs, lits, pos) },
        #[cfg(target_arch = "x86_64")]
        ScanIsa::Avx2 => unsafe { scan_block_avx2(src, b0, b1, seqs, lits, pos) },
        ScanIsa::Portable => scan_block(src, b0, b1, seqs, lits, pos, |i| src.mask64(i)),
    }
}

/// Encode `src[from..to]` (a whole number of blocks, or the tensor's tail) as blocks written
/// to `out`; returns its nonzero byte count. `last`: this range ends the frame.
#[allow(clippy::too_many_arguments)]
fn encode_segment<S: XorSource>(
    src: &S,
    from: usize,
    to: usize,
    last: bool,
    enc: &mut BlockEncoder,
    bufs: &mut Buffers,
    out: &mut impl Write,
    seen: &mut impl FnMut(std::ops::Range<usize>),
) -> io::Result<u64> {
    bufs.frame.clear();
    let mut nonzero = 0;
    let mut b0 = from;
    while b0 < to {
        let b1 = (b0 + BLOCK).min(to);
        bufs.seqs.clear();
        bufs.lits.clear();
        nonzero += scan_block_dispatch(src, b0, b1, &mut bufs.seqs, &mut bufs.lits, &mut bufs.pos);
        // While the block is still in cache (the checksum of the new bytes, in diff).
        seen(b0..b1);
        let last_block = last && b1 == to;
        if !enc.encode_block(&bufs.seqs, &bufs.lits, b1 - b0, last_block, &mut bufs.frame)? {
            // Dense XOR: the block would not shrink, so it is stored raw.
            bufs.xor.clear();
            bufs.xor.extend((b0..b1).map(|j| src.byte(j)));
            enc.raw_block(&bufs.xor, last_block, &mut bufs.frame);
        }
        b0 = b1;
    }
    out.write_all(&bufs.frame)?;
    Ok(nonzero)
}

/// Run `f` with this thread's scratch buffers.
fn with_buffers<T>(f: impl FnOnce(&mut Buffers) -> io::Result<T>) -> io::Result<T> {
    BUFFERS.with(|b| f(&mut b.borrow_mut()))
}

thread_local! {
    /// Block encoders not in use by a frame on this thread (their tables cost allocations).
    static ENCODERS: crate::pool::Pool<Box<BlockEncoder>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The block encoder of one frame: it carries the frame's state from block to block (repeat
/// offsets, the entropy tables a block may reuse), so every frame being written has its own,
/// taken from this thread's pool and reset.
type FrameEncoder = crate::pool::Pooled<Box<BlockEncoder>>;

fn frame_encoder() -> FrameEncoder {
    let mut enc = crate::pool::Pooled::take(&ENCODERS, |_| true);
    enc.reset();
    enc
}

/// Whether `frame` starts with the header [`frame_header`] writes (magic, descriptor and
/// window byte; any content size): a frame of ours, which [`crate::codec`] hands to our own
/// decoder.
pub fn has_our_header(frame: &[u8]) -> bool {
    frame.len() >= 14 && frame[..6] == frame_header(0)[..6]
}

/// The last block of an empty frame: raw, size 0, marked last.
const EMPTY_LAST_BLOCK: [u8; 3] = [1, 0, 0];

/// Write the whole frame for `src` to `out`; returns the number of nonzero XOR bytes.
pub fn encode<S: XorSource>(src: &S, out: impl Write) -> io::Result<u64> {
    encode_observed(src, out, |_| {})
}

/// [`encode`], calling `seen(range)` for each range of the tensor, in order, right after it
/// was scanned, so a caller can checksum the same bytes while they are in cache.
pub fn encode_observed<S: XorSource>(src: &S, out: impl Write, seen: impl FnMut(std::ops::Range<usize>)) -> io::Result<u64> {
    let mut frame = FrameStream::new(out, src.len() as u64)?;
    frame.push(src, seen)?;
    Ok(frame.finish()?.1)
}

/// The frame [`encode`] writes, fed one source at a time: consecutive windows of the tensor,
/// each a whole number of blocks but the last (`delta-diff` reads OLD and NEW into small
/// buffers with pread: cheaper than mapping them, whose page tables cost more to fill and
/// tear down than the copy). The blocks, and so the bytes, are those of one [`encode`].
pub struct FrameStream<W: Write> {
    out: W,
    enc: FrameEncoder,
    len: u64,
    done: u64,
    nonzero: u64,
}

impl<W: Write> FrameStream<W> {
    /// Start the frame of a `len`-byte tensor (writes its header).
    pub fn new(mut out: W, len: u64) -> io::Result<Self> {
        usize::try_from(len).map_err(|_| io::Error::other("tensor too large for this platform"))?;
        out.write_all(&frame_header(len))?;
        Ok(FrameStream { out, enc: frame_encoder(), len, done: 0, nonzero: 0 })
    }

    /// The next `src.len()` bytes of the tensor; `seen(range)` as for [`encode_observed`],
    /// with ranges of `src`.
    pub fn push<S: XorSource>(&mut self, src: &S, mut seen: impl FnMut(std::ops::Range<usize>)) -> io::Result<()> {
        let n = src.len();
        let end = self.done + n as u64;
        if end > self.len {
            return Err(io::Error::other("more payload bytes than the frame's content size"));
        }
        if end < self.len && !n.is_multiple_of(BLOCK) {
            return Err(io::Error::other(format!("a piece that does not end the frame must be whole {BLOCK}-byte blocks, not {n} bytes")));
        }
        let (enc, out) = (&mut self.enc, &mut self.out);
        self.nonzero += with_buffers(|bufs| {
            let mut nonzero = 0;
            let mut from = 0;
            while from < n {
                let to = (from + SEGMENT).min(n);
                nonzero += encode_segment(src, from, to, end == self.len && to == n, enc, bufs, out, &mut seen)?;
                from = to;
            }
            Ok(nonzero)
        })?;
        self.done = end;
        Ok(())
    }

    /// Finish the frame once all `len` bytes were pushed; returns the writer and the number
    /// of nonzero XOR bytes.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        if self.done != self.len {
            return Err(io::Error::other(format!("frame got {} of {} payload bytes", self.done, self.len)));
        }
        if self.len == 0 {
            self.out.write_all(&EMPTY_LAST_BLOCK)?;
        }
        Ok((self.out, self.nonzero))
    }
}

/// The part both streaming writers share: a frame of `len` payload bytes arriving in pieces
/// of any size, cut into [`SEGMENT`]s counted from the payload's start (so the bytes do not
/// depend on the pieces), each handed to `code(segment, offset, last)` once complete. At most
/// one segment is buffered; whole segments inside a piece are coded without a copy.
struct Segmenter<W: Write> {
    out: W,
    enc: FrameEncoder,
    len: u64,
    /// Payload bytes coded so far (excluding `pending`).
    done: u64,
    pending: Vec<u8>,
}

impl<W: Write> Segmenter<W> {
    fn new(mut out: W, len: u64) -> io::Result<Self> {
        out.write_all(&frame_header(len))?;
        Ok(Segmenter { out, enc: frame_encoder(), len, done: 0, pending: Vec::new() })
    }

    fn segment_len(&self) -> usize {
        (SEGMENT as u64).min(self.len - self.done) as usize
    }

    fn code_one(&mut self, seg: &[u8], code: &mut impl FnMut(&[u8], u64, bool, &mut BlockEncoder, &mut W) -> io::Result<()>) -> io::Result<()> {
        let last = self.done + seg.len() as u64 == self.len;
        code(seg, self.done, last, &mut self.enc, &mut self.out)?;
        self.done += seg.len() as u64;
        Ok(())
    }

    fn push(&mut self, mut piece: &[u8], mut code: impl FnMut(&[u8], u64, bool, &mut BlockEncoder, &mut W) -> io::Result<()>) -> io::Result<()> {
        if self.done + (self.pending.len() + piece.len()) as u64 > self.len {
            return Err(io::Error::other("more payload bytes than the frame's content size"));
        }
        if !self.pending.is_empty() {
            let take = (self.segment_len() - self.pending.len()).min(piece.len());
            self.pending.extend_from_slice(&piece[..take]);
            piece = &piece[take..];
            if self.pending.len() == self.segment_len() {
                let full = std::mem::take(&mut self.pending);
                self.code_one(&full, &mut code)?;
                self.pending = full;
                self.pending.clear();
            }
        }
        while !piece.is_empty() && piece.len() >= self.segment_len() {
            let n = self.segment_len();
            self.code_one(&piece[..n], &mut code)?;
            piece = &piece[n..];
        }
        self.pending.extend_from_slice(piece);
        Ok(())
    }

    /// The writer, once exactly `len` bytes were pushed (every segment, the last included, is
    /// coded as soon as it is complete).
    fn finish(mut self) -> io::Result<W> {
        if self.done + self.pending.len() as u64 != self.len {
            return Err(io::Error::other(format!("frame got {} of {} payload bytes", self.done + self.pending.len() as u64, self.len)));
        }
        if self.len == 0 {
            self.out.write_all(&EMPTY_LAST_BLOCK)?;
        }
        Ok(self.out)
    }
}

/// The same frame as [`encode`], fed with the XOR of consecutive pieces of the tensor (the
/// GPU path, whose pieces arrive from the device). Pieces of any size give the same bytes;
/// at most one segment is buffered.
pub struct XorStream<W: Write> {
    seg: Segmenter<W>,
    nonzero: u64,
}

impl<W: Write> XorStream<W> {
    pub fn new(out: W, len: u64) -> io::Result<Self> {
        usize::try_from(len).map_err(|_| io::Error::other("tensor too large for this platform"))?;
        Ok(XorStream { seg: Segmenter::new(out, len)?, nonzero: 0 })
    }

    /// The XOR of the next `piece.len()` bytes of the tensor.
    pub fn push(&mut self, piece: &[u8]) -> io::Result<()> {
        let nonzero = &mut self.nonzero;
        self.seg.push(piece, |xor, _, last, enc, out| {
            *nonzero += with_buffers(|bufs| encode_segment(&Xored(xor), 0, xor.len(), last, enc, bufs, out, &mut |_| {}))?;
            Ok(())
        })
    }

    /// Finish the frame; returns the writer and the number of nonzero XOR bytes.
    pub fn finish(self) -> io::Result<(W, u64)> {
        Ok((self.seg.finish()?, self.nonzero))
    }
}

// ---------------------------------------------------------------------------------------------
// `overwrite` frames

/// An `overwrite` frame (`u32 count`, `count` u32 LE positions, `count` values), written as a
/// byte stream in payload order and coded with our own sequences: each position whose upper
/// three bytes equal the previous position's (the next change is in the same 256-byte window,
/// ~70 % of changes on RL deltas) is one literal byte and a 3-byte match of offset 4; the
/// values stay literal. No match search, and far smaller than level 1 on positions, which
/// look like noise to a general-purpose match finder. Segments and blocks as for `xor` frames.
pub struct OverwriteFrame<W: Write> {
    seg: Segmenter<W>,
    count: u64,
}

impl<W: Write> OverwriteFrame<W> {
    /// A frame for `count` changes: the caller then writes exactly `4 + 5 * count` bytes.
    pub fn new(out: W, count: u64) -> io::Result<Self> {
        Ok(OverwriteFrame { seg: Segmenter::new(out, 4 + 5 * count)?, count })
    }

    /// Finish the frame; an error if the payload was not exactly `4 + 5 * count` bytes.
    pub fn finish(self) -> io::Result<W> {
        self.seg.finish()
    }
}

impl<W: Write> Write for OverwriteFrame<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let positions_end = 4 + 4 * self.count;
        self.seg.push(data, |seg, from, last, enc, out| {
            with_buffers(|bufs| {
                bufs.frame.clear();
                let mut b0 = 0;
                while b0 < seg.len() {
                    let b1 = (b0 + BLOCK).min(seg.len());
                    bufs.seqs.clear();
                    bufs.lits.clear();
                    overwrite_block_sequences(seg, from, b0, b1, positions_end, &mut bufs.seqs, &mut bufs.lits);
                    let last_block = last && b1 == seg.len();
                    if !enc.encode_block(&bufs.seqs, &bufs.lits, b1 - b0, last_block, &mut bufs.frame)? {
                        enc.raw_block(&seg[b0..b1], last_block, &mut bufs.frame);
                    }
                    b0 = b1;
                }
                out.write_all(&bufs.frame)
            })
        })?;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sequences of block `[b0, b1)` of segment `seg`, which starts at payload offset `from`.
/// Matches: at each position entry (payload offset `q = 4 + 4i`, `i >= 1`), bytes `q+1..` equal
/// to the four bytes before, extended while equal; their source lies in this segment, so a
/// segment's first sequence starts with literals.
pub(crate) fn overwrite_block_sequences(seg: &[u8], from: u64, b0: usize, b1: usize, positions_end: u64, seqs: &mut Vec<Sequence>, lits: &mut Vec<u8>) {
    let mut lit_start = b0;
    // Segment index of the first match candidate at or after max(b0, 4): q + 1 with q ≡ 0 mod 4
    // in payload terms, q >= 8, q - 3 >= segment start.
    let first = |at: usize| -> usize {
        let abs = (from + at as u64).max(9);
        let q = (abs - 1).div_ceil(4) * 4; // smallest entry start q with q + 1 >= abs
        (q + 1 - from) as usize
    };
    let mut m = first(b0.max(3));
    let word = |i: usize| u32::from_le_bytes(seg[i..i + 4].try_into().expect("4 bytes"));
    // About one sequence and one literal per position entry.
    seqs.reserve((b1 - b0) / 4 + 1);
    lits.reserve(b1 - b0 + 16);
    while m + 3 <= b1 && from + (m as u64) < positions_end {
        // Bytes m..m+3 against m-4..m-1, as the upper three bytes of two 4-byte words.
        if word(m - 1) >> 8 == word(m - 5) >> 8 {
            let mut x = m + 3;
            while x < b1 && seg[x] == seg[x - 4] {
                x += 1;
            }
            // The literals are mostly one byte (an entry's low byte): one 16-byte copy
            // trimmed back costs less than a copy of unpredictable length.
            if m - lit_start <= 16 && lit_start + 16 <= seg.len() {
                let at = lits.len();
                lits.extend_from_slice(&seg[lit_start..lit_start + 16]);
                lits.truncate(at + (m - lit_start));
            } else {
                lits.extend_from_slice(&seg[lit_start..m]);
            }
            seqs.push(Sequence { lit_len: (m - lit_start) as u32, match_len: (x - m) as u32, offset: 4 });
            lit_start = x;
            m = first(x);
        } else {
            m += 4;
        }
    }
    lits.extend_from_slice(&seg[lit_start..b1]);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// Tensors whose XOR has a given share of nonzero bytes, scattered, with some long runs.
    pub(crate) fn sparse(len: usize, per_mille: u64, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let mut s = seed | 1;
        let old: Vec<u8> = (0..len).map(|_| rng(&mut s) as u8).collect();
        let mut new = old.clone();
        for b in new.iter_mut() {
            if rng(&mut s) % 1000 < per_mille {
                *b ^= (rng(&mut s) as u8) | 1;
            }
        }
        (old, new)
    }

    fn check_round_trip(old: &[u8], new: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        let nz = encode(&Pair(old, new), &mut frame).unwrap();
        let want: Vec<u8> = old.iter().zip(new).map(|(a, b)| a ^ b).collect();
        assert_eq!(nz, want.iter().filter(|&&b| b != 0).count() as u64);
        let got = zstd::stream::decode_all(&frame[..]).unwrap();
        assert!(got == want, "len {} decodes wrong", old.len());
        assert_eq!(zstd::zstd_safe::get_frame_content_size(&frame).unwrap(), Some(old.len() as u64));
        assert_eq!(zstd::zstd_safe::find_frame_compressed_size(&frame).unwrap(), frame.len());
        let mut same = Vec::new();
        let xor: Vec<u8> = want.clone();
        encode(&Xored(&xor), &mut same).unwrap();
        assert!(same == frame, "pair and xored sources make different frames");
        frame
    }

    #[test]
    fn round_trips_at_every_density_and_boundary() {
        for len in [0usize, 1, 7, 8, 31, 32, 33, 100, BLOCK - 1, BLOCK, BLOCK + 1, SEGMENT - 3, SEGMENT, SEGMENT + BLOCK + 5, 2 * SEGMENT + 77] {
            for per_mille in [0u64, 1, 14, 30, 200, 1000] {
                let (old, new) = sparse(len, per_mille, len as u64 * 7919 + per_mille);
                check_round_trip(&old, &new);
            }
        }
    }

    #[test]
    fn stream_of_any_pieces_equals_one_shot() {
        for len in [0usize, 5, BLOCK + 3, SEGMENT, 2 * SEGMENT + 4097] {
            let (old, new) = sparse(len, 20, len as u64 + 1);
            let want = check_round_trip(&old, &new);
            let xor: Vec<u8> = old.iter().zip(&new).map(|(a, b)| a ^ b).collect();
            for piece in [1usize << 12, 777_777, SEGMENT, 3 * SEGMENT] {
                let mut st = XorStream::new(Vec::new(), len as u64).unwrap();
                for p in xor.chunks(piece) {
                    st.push(p).unwrap();
                }
                let (got, nz) = st.finish().unwrap();
                assert!(got == want, "len {len} piece {piece}");
                assert_eq!(nz, xor.iter().filter(|&&b| b != 0).count() as u64);
            }
        }
        let mut st = XorStream::new(Vec::new(), 10).unwrap();
        st.push(&[0; 4]).unwrap();
        assert!(st.push(&[0; 7]).is_err(), "too many bytes");
        assert!(XorStream::new(Vec::new(), 10).unwrap().finish().is_err(), "too few bytes");
    }

    #[test]
    fn frame_stream_of_block_windows_equals_one_shot() {
        for len in [0usize, 5, BLOCK, BLOCK + 3, 2 * SEGMENT + 4097] {
            let (old, new) = sparse(len, 20, len as u64 + 7);
            let want = check_round_trip(&old, &new);
            for window in [BLOCK, 2 * BLOCK, SEGMENT + BLOCK, 3 * SEGMENT] {
                let mut st = FrameStream::new(Vec::new(), len as u64).unwrap();
                let mut seen = Vec::new();
                for (o, w) in old.chunks(window).zip(new.chunks(window)) {
                    st.push(&Pair(o, w), |r| seen.extend_from_slice(&w[r])).unwrap();
                }
                let (got, nz) = st.finish().unwrap();
                assert!(got == want, "len {len} window {window}");
                assert!(seen == new, "len {len} window {window}: seen ranges cover NEW in order");
                assert_eq!(nz, old.iter().zip(&new).filter(|(a, b)| a != b).count() as u64);
            }
        }
        let (old, new) = sparse(3 * BLOCK, 20, 3);
        let mut st = FrameStream::new(Vec::new(), old.len() as u64).unwrap();
        assert!(st.push(&Pair(&old[..100], &new[..100]), |_| {}).is_err(), "a piece of part of a block, not at the end");
        st.push(&Pair(&old[..BLOCK], &new[..BLOCK]), |_| {}).unwrap();
        assert!(st.push(&Pair(&old, &new), |_| {}).is_err(), "more bytes than the frame holds");
        assert!(st.finish().is_err(), "too few bytes");
    }

    #[test]
    fn runs_at_the_threshold_and_at_block_edges() {
        // Nonzero bytes exactly MIN_RUN-1, MIN_RUN and MIN_RUN+1 apart, at block starts and ends.
        let len = 3 * BLOCK + 19;
        for gap in [MIN_RUN - 1, MIN_RUN, MIN_RUN + 1, 1, 2, 3, 4] {
            let old = vec![0u8; len];
            let mut new = old.clone();
            let mut p = 0;
            while p < len {
                new[p] = 0x5a;
                p += gap + 1;
            }
            for edge in [BLOCK - 1, BLOCK, 2 * BLOCK - 1, 2 * BLOCK, len - 1] {
                new[edge] = 0xa5;
            }
            check_round_trip(&old, &new);
        }
        // All zero but the very last byte; all zero but the very first.
        let old = vec![0u8; 2 * SEGMENT];
        let mut new = old.clone();
        new[2 * SEGMENT - 1] = 1;
        check_round_trip(&old, &new);
        new[2 * SEGMENT - 1] = 0;
        new[0] = 1;
        check_round_trip(&old, &new);
    }

    #[test]
    fn sparse_frames_are_no_larger_than_level_1() {
        // ~1.4 % of bytes changed at random places to random values (about 16 bits of entropy
        // a change): our sequences must not lose to libzstd's own level-1 match finder.
        let (old, new) = sparse(4 << 20, 14, 3);
        let frame = check_round_trip(&old, &new);
        let xor: Vec<u8> = old.iter().zip(&new).map(|(a, b)| a ^ b).collect();
        let level1 = zstd::bulk::compress(&xor, 1).unwrap();
        assert!(frame.len() <= level1.len(), "{} bytes, level 1 makes {}", frame.len(), level1.len());
    }

    #[test]
    fn portable_and_avx2_masks_agree() {
        let (old, new) = sparse(4096, 300, 11);
        let xor: Vec<u8> = old.iter().zip(&new).map(|(a, b)| a ^ b).collect();
        for i in 0..4096 - 64 {
            let want = (0..64).fold(0u64, |m, k| m | u64::from(xor[i + k] != 0) << k);
            assert_eq!(Pair(&old, &new).mask64(i), want);
            assert_eq!(Xored(&xor).mask64(i), want);
            assert_eq!(Pair(&old, &new).bytes16(i), xor[i..i + 16]);
            assert_eq!(Xored(&xor).bytes16(i), xor[i..i + 16]);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 detected, i + 64 <= len.
                unsafe {
                    assert_eq!(nonzero_mask64_avx2(Pair(&old, &new).operands64(i)), want);
                    assert_eq!(nonzero_mask64_avx2(Xored(&xor).operands64(i)), want);
                }
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: AVX-512F/BW detected, i + 64 <= len.
                unsafe {
                    assert_eq!(nonzero_mask64_avx512(Pair(&old, &new).operands64(i)), want);
                    assert_eq!(nonzero_mask64_avx512(Xored(&xor).operands64(i)), want);
                }
            }
        }
    }

    #[test]
    fn portable_and_dispatched_scans_agree() {
        for (len, per_mille) in [(BLOCK, 14u64), (BLOCK, 300), (BLOCK - 13, 1000), (100, 50), (63, 500)] {
            let (old, new) = sparse(len, per_mille, len as u64 + per_mille);
            let src = Pair(&old, &new);
            let mut pos = vec![0u32; BLOCK + 64];
            let (mut s1, mut l1, mut s2, mut l2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let n1 = scan_block(&src, 0, len, &mut s1, &mut l1, &mut pos, |i| src.mask64(i));
            let n2 = scan_block_dispatch(&src, 0, len, &mut s2, &mut l2, &mut pos);
            assert_eq!(n1, n2);
            assert!(l1 == l2, "literals differ at len {len}");
            assert_eq!(s1, s2);
            let want: Vec<u32> = (0..len as u32).filter(|&p| old[p as usize] != new[p as usize]).collect();
            assert_eq!(NonzeroScan::default().block(&src, 0, len), &want[..]);
            // Every compiled scan the CPU runs, not only the one dispatch picks.
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                let mut runs: Vec<(&str, u64, Vec<Sequence>, Vec<u8>)> = Vec::new();
                let mut listed = vec![0u32; BLOCK + 64];
                if has!("avx2") && has!("popcnt") && has!("bmi1") {
                    let (mut s, mut l) = (Vec::new(), Vec::new());
                    // SAFETY: the features were just detected; the block is the whole source.
                    let n = unsafe { scan_block_avx2(&src, 0, len, &mut s, &mut l, &mut pos) };
                    let k = unsafe { list_nonzero_avx2(&src, 0, len, &mut listed) };
                    assert_eq!(&listed[..k], &want[..], "avx2 list at len {len}");
                    runs.push(("avx2", n, s, l));
                }
                if has!("avx2") && has!("popcnt") && has!("bmi1") && has!("avx512f") && has!("avx512bw") {
                    let (mut s, mut l) = (Vec::new(), Vec::new());
                    // SAFETY: as above.
                    let n = unsafe { scan_block_avx512(&src, 0, len, &mut s, &mut l, &mut pos) };
                    let k = unsafe { list_nonzero_avx512(&src, 0, len, &mut listed) };
                    assert_eq!(&listed[..k], &want[..], "avx512 list at len {len}");
                    runs.push(("avx512", n, s, l));
                }
                for (isa, n, s, l) in runs {
                    assert_eq!((n, &s, &l), (n1, &s1, &l1), "{isa} scan at len {len}");
                }
            }
        }
    }

    /// The overwrite payload of a change set, written in pieces of `piece` bytes.
    fn overwrite_frame(positions: &[u32], values: &[u8], piece: usize) -> Vec<u8> {
        let mut payload = (positions.len() as u32).to_le_bytes().to_vec();
        payload.extend(positions.iter().flat_map(|p| p.to_le_bytes()));
        payload.extend_from_slice(values);
        let mut f = OverwriteFrame::new(Vec::new(), positions.len() as u64).unwrap();
        for c in payload.chunks(piece.max(1)) {
            f.write_all(c).unwrap();
        }
        let frame = f.finish().unwrap();
        let got = zstd::stream::decode_all(&frame[..]).unwrap();
        assert!(got == payload, "{} changes decode wrong", positions.len());
        assert_eq!(zstd::zstd_safe::get_frame_content_size(&frame).unwrap(), Some(payload.len() as u64));
        assert_eq!(zstd::zstd_safe::find_frame_compressed_size(&frame).unwrap(), frame.len());
        frame
    }

    #[test]
    fn overwrite_frames_round_trip_in_any_pieces() {
        let mut s = 7u64;
        for n in [0usize, 1, 2, 3, 5, 1000, 30_000, 300_000, 1_000_000] {
            // Gaps like an RL delta (mostly < 256, some far), plus runs of adjacent positions.
            let mut p = 0u32;
            let positions: Vec<u32> = (0..n)
                .map(|_| {
                    let r = rng(&mut s);
                    p += 1 + match r % 10 {
                        0 => (r >> 8) as u32 % 10_000,
                        1 => 0,
                        _ => (r >> 8) as u32 % 150,
                    };
                    p
                })
                .collect();
            let values: Vec<u8> = (0..n).map(|_| rng(&mut s) as u8).collect();
            let whole = overwrite_frame(&positions, &values, usize::MAX);
            for piece in [1usize, 3, 4096, 777_777] {
                if n <= 30_000 || piece > 4096 {
                    assert!(overwrite_frame(&positions, &values, piece) == whole, "n {n} piece {piece}");
                }
            }
            if n == 1_000_000 {
                let mut raw = (n as u32).to_le_bytes().to_vec();
                raw.extend(positions.iter().flat_map(|p| p.to_le_bytes()));
                raw.extend_from_slice(&values);
                let level1 = zstd::bulk::compress(&raw, 1).unwrap();
                assert!(whole.len() < level1.len(), "{} bytes, level 1 makes {}", whole.len(), level1.len());
            }
        }
        // Wrong lengths are refused.
        let mut f = OverwriteFrame::new(Vec::new(), 1).unwrap();
        assert!(f.write_all(&[0; 10]).is_err());
        let mut f = OverwriteFrame::new(Vec::new(), 1).unwrap();
        f.write_all(&[0; 8]).unwrap();
        assert!(f.finish().is_err());
    }

    #[test]
    fn header_is_what_formats_md_says() {
        let h = frame_header(0x0102_0304_0506);
        assert_eq!(h, [0x28, 0xb5, 0x2f, 0xfd, 0xc0, 0x38, 6, 5, 4, 3, 2, 1, 0, 0]);
    }
}
