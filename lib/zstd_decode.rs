//! A pure-Rust decoder for one zstd frame (RFC 8878), tuned for our sparse `xor` frames.
//!
//! Our xor frames (`sparse_frame`, docs/FORMATS.md §4.5) are ~1 sequence per 70 output bytes,
//! every match offset 1 (a zero run) after 1–2 literals. libzstd copies offset-1 matches with an
//! overlapping 8-byte loop; here an offset-1 match is a fill in 32-byte stores (256 at once), offsets 2..15
//! expand a 16-byte pattern, offsets ≥ 16 copy in 16-byte chunks (one memmove when the match
//! does not overlap itself and is longer than 32 bytes), and literals are copied in 16/32-byte
//! chunks — all using slack space after the block, so no copy needs an exact tail. On x86_64
//! the sequence loop and the Huffman literal decoder are also compiled with BMI2 (+AVX2 for the
//! sequence loop) and picked at run time; the portable versions are used elsewhere.
//!
//! Decoding goes block by block into one buffer holding `[history ≤ window | current block |
//! slack]`; `read` serves from it and the next block is decoded only once it is drained. When
//! the buffer is full the last `window` bytes slide to its front. The buffer is
//! `window + max(2 blocks, window) + slack` (so sliding moves at most one byte per byte
//! decoded; for our 128 KiB-window frames that is window + 2 blocks = 384 KiB), or the frame
//! content size plus slack when the header declares a smaller one. It is allocated zeroed on
//! the first block, so pages are only touched as output reaches them. Beyond it: 128 KiB of
//! literals and ~16 KiB of tables.
//!
//! An `xor` apply does not need the content itself, only its XOR into the tensor:
//! [`FrameReader::xor_into`] decodes our frames straight into the tensor's chunk, XORing each
//! literal in where it lands and skipping zero runs, so the ~98 % of the content that is zero is
//! never written or read. It takes frames whose matches are all offset 1 and whose blocks end
//! where the chunk does (ours); at the first sequence it cannot take it stops, having applied
//! exactly the bytes before it, and the caller decodes the frame again, materialized, from there.
//!
//! Input is untrusted: every length, table and offset is checked; malformed input gives a
//! [`DecodeError`], never a panic. The last block's bytes are only served after the content
//! size and checksum have been verified; after an error every later `read` fails too.
//!
//! Differences from libzstd (both refuse, or we refuse where libzstd is lenient): no
//! dictionaries, no skippable frames, Huffman tables at most 11 bits deep (RFC 8878's limit;
//! libzstd accepts 12), a match offset beyond the window is an error even if those bytes are
//! still buffered, and a window larger than `2^window_log_max` (capped at 2^31) is refused.

use std::io;

const MAGIC: u32 = 0xFD2F_B528;
/// The format's largest block.
const BLOCK_MAX: usize = 128 << 10;
/// Bytes after every region we write (and after the literals) that wide copies may touch
/// (offset-1 fills store 256 bytes unconditionally).
const SLACK: usize = 256;
/// Deepest Huffman code we decode (RFC 8878 §4.2.1).
const HUF_MAX_LOG: u32 = 11;
const HUF_TABLE: usize = 1 << HUF_MAX_LOG;
/// Sequence tables are stored at the largest accuracy (9 bits) and indexed with this mask.
const SEQ_TABLE: usize = 512;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DecodeError {
    #[error("not a zstd frame (magic {0:#010x})")]
    BadMagic(u32),
    #[error("skippable frames are not supported")]
    Skippable,
    #[error("zstd frame truncated in the {0}")]
    Truncated(&'static str),
    #[error("reserved bit set in the frame header descriptor")]
    ReservedBit,
    #[error("dictionaries not supported (frame needs dictionary {0})")]
    Dictionary(u32),
    #[error("window size {size} exceeds the limit 2^{log_max}")]
    WindowTooLarge { size: u64, log_max: u32 },
    #[error("reserved block type")]
    ReservedBlock,
    #[error("block of {size} bytes exceeds the block maximum {max}")]
    BlockTooLarge { size: usize, max: usize },
    #[error("corrupt literals section: {0}")]
    Literals(&'static str),
    #[error("corrupt Huffman table: {0}")]
    Huffman(&'static str),
    #[error("corrupt FSE table: {0}")]
    Fse(&'static str),
    #[error("corrupt sequences section: {0}")]
    Sequences(&'static str),
    #[error("match offset {0} reaches before the frame start or beyond the window")]
    BadOffset(u64),
    #[error("decoded content exceeds the frame content size {0}")]
    ContentTooLong(u64),
    #[error("decoded {actual} bytes but the frame content size is {expected}")]
    ContentSize { expected: u64, actual: u64 },
    #[error("content checksum mismatch: frame says {expected:#010x}, content hashes to {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
}

impl From<DecodeError> for io::Error {
    fn from(e: DecodeError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

#[inline(always)]
fn le64(s: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"))
}

/// Little-endian value of up to 8 bytes.
fn le_bytes(s: &[u8]) -> u64 {
    s.iter().rev().fold(0u64, |v, &b| (v << 8) | b as u64)
}

// ---------------------------------------------------------------------------------------------
// Backward bit reader (RFC 8878 §4.1): read from the end of a stream towards its start.

/// `container` holds the 8 bytes at `ptr`; `consumed` counts bits used from its top. Past the
/// stream's start `consumed` grows beyond 64 ("overflow"): reads then return garbage (never out
/// of bounds) and [`BitReader::finished`] is false, so the caller rejects the stream.
#[derive(Clone, Copy)]
struct BitReader<'a> {
    src: &'a [u8],
    ptr: usize,
    container: u64,
    consumed: u32,
}

impl<'a> BitReader<'a> {
    fn new(src: &'a [u8]) -> Option<Self> {
        let last = *src.last()?;
        if last == 0 {
            return None; // no end marker
        }
        let skip = last.leading_zeros() + 1;
        if src.len() >= 8 {
            let ptr = src.len() - 8;
            Some(BitReader { src, ptr, container: le64(src, ptr), consumed: skip })
        } else {
            let pad = 8 * (8 - src.len() as u32);
            Some(BitReader { src, ptr: 0, container: le_bytes(src), consumed: skip + pad })
        }
    }

    /// The next `n` bits (n ≤ 57 after a reload).
    #[inline(always)]
    fn peek(&self, n: u32) -> u64 {
        (self.container >> (64u32.wrapping_sub(self.consumed).wrapping_sub(n) & 63)) & ((1u64 << n) - 1)
    }

    #[inline(always)]
    fn read(&mut self, n: u32) -> u64 {
        let v = self.peek(n);
        self.consumed += n;
        v
    }

    /// Refill so at least 57 bits are available (fewer only at the stream's start).
    #[inline(always)]
    fn reload(&mut self) {
        // Overflow only happens at ptr == 0 (between reloads at most 57 bits are read), where
        // step is 0: an overflowed reader stays overflowed.
        let step = ((self.consumed >> 3) as usize).min(self.ptr);
        if step != 0 {
            self.ptr -= step;
            self.consumed -= 8 * step as u32;
            self.container = le64(self.src, self.ptr);
        }
    }

    fn overflowed(&self) -> bool {
        self.consumed > 64
    }

    /// Every bit consumed, exactly.
    fn finished(&mut self) -> bool {
        self.reload();
        self.ptr == 0 && self.consumed == 64
    }
}

// ---------------------------------------------------------------------------------------------
// FSE tables (RFC 8878 §4.1.1).

#[derive(Clone, Copy, Default)]
struct FseEntry {
    sym: u8,
    nb: u8,
    next: u16,
}

/// Parse an FSE table description: normalized counts into `norm`, returns (accuracy log,
/// number of symbols, bytes used).
fn read_ncount(src: &[u8], max_sym: usize, max_log: u32, norm: &mut [i16; 256]) -> Result<(u32, usize, usize), DecodeError> {
    // 32 bits at a bit position, bytes past the end read as zero (caught by the length check).
    let get = |bitpos: usize| -> u32 {
        let byte = bitpos >> 3;
        let mut v = 0u64;
        for i in 0..5 {
            if let Some(&b) = src.get(byte + i) {
                v |= (b as u64) << (8 * i);
            }
        }
        (v >> (bitpos & 7)) as u32
    };
    if src.is_empty() {
        return Err(DecodeError::Fse("empty table description"));
    }
    norm.fill(0);
    let acc = (get(0) & 15) + 5;
    if acc > max_log {
        return Err(DecodeError::Fse("accuracy log too large"));
    }
    let mut pos = 4usize;
    let mut remaining: i32 = (1 << acc) + 1;
    let mut threshold: i32 = 1 << acc;
    let mut nb = acc + 1;
    let mut sym = 0usize;
    let mut prev0 = false;
    while remaining > 1 {
        if prev0 {
            loop {
                let r = (get(pos) & 3) as usize;
                pos += 2;
                sym += r;
                if r != 3 {
                    break;
                }
                if sym > max_sym {
                    return Err(DecodeError::Fse("too many symbols"));
                }
            }
        }
        if sym > max_sym || pos > 8 * src.len() {
            return Err(DecodeError::Fse("too many symbols"));
        }
        let bits = get(pos) as i32;
        let max = 2 * threshold - 1 - remaining;
        let mut count;
        if bits & (threshold - 1) < max {
            count = bits & (threshold - 1);
            pos += nb as usize - 1;
        } else {
            count = bits & (2 * threshold - 1);
            if count >= threshold {
                count -= max;
            }
            pos += nb as usize;
        }
        count -= 1;
        remaining -= count.abs();
        if remaining < 1 {
            return Err(DecodeError::Fse("probabilities exceed the table"));
        }
        norm[sym] = count as i16;
        sym += 1;
        prev0 = count == 0;
        while remaining < threshold {
            nb -= 1;
            threshold >>= 1;
        }
    }
    if remaining != 1 {
        return Err(DecodeError::Fse("probabilities do not fill the table"));
    }
    let bytes = pos.div_ceil(8);
    if bytes > src.len() {
        return Err(DecodeError::Truncated("FSE table description"));
    }
    Ok((acc, sym, bytes))
}

/// Build the decoding table for normalized counts (whose absolute values sum to `1 << acc`).
fn build_fse(norm: &[i16], acc: u32, out: &mut Vec<FseEntry>) -> Result<(), DecodeError> {
    let size = 1usize << acc;
    out.clear();
    out.resize(size, FseEntry::default());
    let mut high = size; // slots [high, size) hold the "less than 1" symbols
    let mut next = [0u32; 256];
    for (s, &n) in norm.iter().enumerate() {
        if n == -1 {
            if high == 0 {
                return Err(DecodeError::Fse("table overfull"));
            }
            high -= 1;
            out[high].sym = s as u8;
            next[s] = 1;
        } else {
            next[s] = n.max(0) as u32;
        }
    }
    let step = (size >> 1) + (size >> 3) + 3;
    let mask = size - 1;
    let mut pos = 0usize;
    let mut placed = 0usize;
    for (s, &n) in norm.iter().enumerate() {
        for _ in 0..n.max(0) {
            placed += 1;
            if placed > high {
                return Err(DecodeError::Fse("table overfull"));
            }
            out[pos].sym = s as u8;
            loop {
                pos = (pos + step) & mask;
                if pos < high {
                    break;
                }
            }
        }
    }
    if pos != 0 || placed != high {
        return Err(DecodeError::Fse("table not filled"));
    }
    for e in out.iter_mut() {
        let x = next[e.sym as usize];
        next[e.sym as usize] += 1;
        let nb = acc - (31 - x.leading_zeros());
        e.nb = nb as u8;
        e.next = ((x << nb) as usize - size) as u16;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sequence tables with the length/offset base values and extra bits folded in.

#[derive(Clone, Copy, Default)]
struct SeqEntry {
    base: u32,
    extra: u8,
    nb: u8,
    next: u16,
}

struct SeqTable {
    e: Box<[SeqEntry; SEQ_TABLE]>,
    log: u32,
    valid: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    LiteralLength,
    Offset,
    MatchLength,
}

const LL_BASE: [u32; 36] =
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 24, 28, 32, 40, 48, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536];
const LL_BITS: [u8; 36] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
const ML_BASE: [u32; 53] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 37, 39, 41, 43, 47, 51, 59, 67, 83, 99, 131, 259,
    515, 1027, 2051, 4099, 8195, 16387, 32771, 65539,
];
const ML_BITS: [u8; 53] =
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
const LL_DEFAULT: [i16; 36] = [4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 2, 1, 1, 1, 1, 1, -1, -1, -1, -1];
const ML_DEFAULT: [i16; 53] =
    [1, 4, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1];
const OF_DEFAULT: [i16; 29] = [1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1];

impl Kind {
    fn max_sym(self) -> usize {
        match self {
            Kind::LiteralLength => 35,
            Kind::Offset => 31,
            Kind::MatchLength => 52,
        }
    }
    fn max_log(self) -> u32 {
        match self {
            Kind::Offset => 8,
            _ => 9,
        }
    }
    fn fold(self, sym: u8) -> (u32, u8) {
        let s = sym as usize;
        match self {
            Kind::LiteralLength => (LL_BASE[s], LL_BITS[s]),
            Kind::MatchLength => (ML_BASE[s], ML_BITS[s]),
            Kind::Offset => (1u32 << s, sym),
        }
    }
}

impl SeqTable {
    fn new() -> SeqTable {
        SeqTable { e: Box::new([SeqEntry::default(); SEQ_TABLE]), log: 0, valid: false }
    }

    fn fill(&mut self, kind: Kind, fse: &[FseEntry], log: u32) {
        for (d, s) in self.e.iter_mut().zip(fse) {
            let (base, extra) = kind.fold(s.sym);
            *d = SeqEntry { base, extra, nb: s.nb, next: s.next };
        }
        self.log = log;
        self.valid = true;
    }

    /// Set up the table for a compression mode; returns the bytes of `src` used.
    fn load(&mut self, kind: Kind, mode: u8, src: &[u8], scratch: &mut Vec<FseEntry>) -> Result<usize, DecodeError> {
        match mode {
            0 => {
                let (norm, log): (&[i16], u32) = match kind {
                    Kind::LiteralLength => (&LL_DEFAULT, 6),
                    Kind::MatchLength => (&ML_DEFAULT, 6),
                    Kind::Offset => (&OF_DEFAULT, 5),
                };
                build_fse(norm, log, scratch)?;
                self.fill(kind, scratch, log);
                Ok(0)
            }
            1 => {
                let &sym = src.first().ok_or(DecodeError::Truncated("sequences section"))?;
                if sym as usize > kind.max_sym() {
                    return Err(DecodeError::Sequences("RLE symbol out of range"));
                }
                self.fill(kind, &[FseEntry { sym, nb: 0, next: 0 }], 0);
                Ok(1)
            }
            2 => {
                let mut norm = [0i16; 256];
                let (log, n, used) = read_ncount(src, kind.max_sym(), kind.max_log(), &mut norm)?;
                build_fse(&norm[..n], log, scratch)?;
                self.fill(kind, scratch, log);
                Ok(used)
            }
            _ => {
                if !self.valid {
                    return Err(DecodeError::Sequences("repeat mode without a previous table"));
                }
                Ok(0)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Huffman literals (RFC 8878 §4.2).

struct HufTable {
    /// `symbol << 8 | bits`, indexed by the next `log` bits.
    e: Box<[u16; HUF_TABLE]>,
    log: u32,
    valid: bool,
}

impl HufTable {
    /// Parse a Huffman tree description; returns the bytes used.
    fn read(&mut self, src: &[u8], scratch: &mut Vec<FseEntry>) -> Result<usize, DecodeError> {
        let &h = src.first().ok_or(DecodeError::Truncated("Huffman tree description"))?;
        let mut w = [0u8; 256];
        let (n, used) = if h < 128 {
            let size = h as usize;
            let data = src.get(1..1 + size).ok_or(DecodeError::Truncated("Huffman tree description"))?;
            let mut norm = [0i16; 256];
            let (acc, nsym, hdr) = read_ncount(data, 12, 6, &mut norm)?;
            build_fse(&norm[..nsym], acc, scratch)?;
            let n = fse_weights(&data[hdr..], scratch, acc, &mut w)?;
            (n, 1 + size)
        } else {
            let n = h as usize - 127;
            let bytes = n.div_ceil(2);
            let data = src.get(1..1 + bytes).ok_or(DecodeError::Truncated("Huffman tree description"))?;
            for i in 0..n {
                let b = data[i / 2];
                w[i] = if i % 2 == 0 { b >> 4 } else { b & 15 };
            }
            (n, 1 + bytes)
        };
        self.build(&mut w, n)?;
        Ok(used)
    }

    /// Build the lookup table from `n` explicit weights (the last one is implied).
    fn build(&mut self, w: &mut [u8; 256], n: usize) -> Result<(), DecodeError> {
        self.valid = false;
        if n == 0 || n > 255 {
            return Err(DecodeError::Huffman("bad number of weights"));
        }
        let mut total = 0u32;
        for &x in &w[..n] {
            if x as u32 > HUF_MAX_LOG {
                return Err(DecodeError::Huffman("weight too large"));
            }
            if x > 0 {
                total += 1 << (x - 1);
            }
        }
        if total == 0 {
            return Err(DecodeError::Huffman("all weights zero"));
        }
        let log = 32 - total.leading_zeros();
        if log > HUF_MAX_LOG {
            return Err(DecodeError::Huffman("code deeper than 11 bits"));
        }
        let rest = (1u32 << log) - total;
        if !rest.is_power_of_two() {
            return Err(DecodeError::Huffman("weights do not form a prefix code"));
        }
        w[n] = (rest.trailing_zeros() + 1) as u8;
        let nsym = n + 1;
        let mut rank = [0u32; 13];
        for &x in &w[..nsym] {
            rank[x as usize] += 1;
        }
        let mut start = [0u32; 13];
        let mut cur = 0u32;
        for wt in 1..=log as usize {
            start[wt] = cur;
            cur += rank[wt] << (wt - 1);
        }
        debug_assert_eq!(cur, 1 << log);
        for (s, &wt) in w[..nsym].iter().enumerate() {
            if wt == 0 {
                continue;
            }
            let len = 1usize << (wt - 1);
            let entry = ((s as u16) << 8) | (log + 1 - wt as u32) as u16;
            let at = start[wt as usize] as usize;
            self.e[at..at + len].fill(entry);
            start[wt as usize] += len as u32;
        }
        self.log = log;
        self.valid = true;
        Ok(())
    }
}

/// Decode FSE-compressed Huffman weights (two interleaved states); returns how many.
fn fse_weights(src: &[u8], table: &[FseEntry], acc: u32, w: &mut [u8; 256]) -> Result<usize, DecodeError> {
    let mut br = BitReader::new(src).ok_or(DecodeError::Huffman("bad weight bitstream"))?;
    let mask = table.len() - 1;
    let mut s1 = br.read(acc) as usize & mask;
    let mut s2 = br.read(acc) as usize & mask;
    br.reload();
    let mut n = 0usize;
    let mut emit = |n: &mut usize, sym: u8| -> Result<(), DecodeError> {
        if *n >= 255 {
            return Err(DecodeError::Huffman("too many weights"));
        }
        w[*n] = sym;
        *n += 1;
        Ok(())
    };
    loop {
        let e = table[s1];
        emit(&mut n, e.sym)?;
        s1 = (e.next as usize + br.read(e.nb as u32) as usize) & mask;
        br.reload();
        if br.overflowed() {
            emit(&mut n, table[s2].sym)?;
            break;
        }
        let e = table[s2];
        emit(&mut n, e.sym)?;
        s2 = (e.next as usize + br.read(e.nb as u32) as usize) & mask;
        br.reload();
        if br.overflowed() {
            emit(&mut n, table[s1].sym)?;
            break;
        }
    }
    Ok(n)
}

#[inline(always)]
fn huf_sym(br: &mut BitReader, tab: &[u16; HUF_TABLE], shift: u32) -> u8 {
    let e = tab[(br.container.wrapping_shl(br.consumed) >> shift) as usize & (HUF_TABLE - 1)];
    br.consumed += (e & 0xFF) as u32;
    (e >> 8) as u8
}

#[inline(always)]
/// Decode `out.len()` symbols from stream `br`, starting at `out[from]`; the stream must end exactly.
fn huf_tail(mut br: BitReader, tab: &[u16; HUF_TABLE], shift: u32, out: &mut [u8], from: usize) -> Result<(), DecodeError> {
    let mut chunks = out[from..].chunks_exact_mut(4);
    for c in &mut chunks {
        br.reload();
        for b in c.iter_mut() {
            *b = huf_sym(&mut br, tab, shift);
        }
    }
    for b in chunks.into_remainder() {
        br.reload();
        *b = huf_sym(&mut br, tab, shift);
    }
    if !br.finished() {
        return Err(DecodeError::Literals("Huffman stream does not end where it should"));
    }
    Ok(())
}

/// Decode Huffman-coded literals from 1 or 4 streams into `out`.
fn huf_decode(tab: &HufTable, src: &[u8], out: &mut [u8], four: bool) -> Result<(), DecodeError> {
    #[cfg(target_arch = "x86_64")]
    if !portable_only() && std::is_x86_feature_detected!("bmi2") {
        // SAFETY: the CPU supports BMI2 (checked just above).
        return unsafe { huf_decode_bmi2(tab, src, out, four) };
    }
    if four {
        huf_4streams(tab, src, out)
    } else {
        huf_1stream(tab, src, out)
    }
}

/// The same compiled with BMI2 (two variable shifts per symbol).
///
/// # Safety
/// The CPU must support BMI2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "bmi2")]
unsafe fn huf_decode_bmi2(tab: &HufTable, src: &[u8], out: &mut [u8], four: bool) -> Result<(), DecodeError> {
    if four {
        huf_4streams(tab, src, out)
    } else {
        huf_1stream(tab, src, out)
    }
}

#[inline(always)]
fn huf_1stream(tab: &HufTable, src: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    let br = BitReader::new(src).ok_or(DecodeError::Literals("bad Huffman stream"))?;
    huf_tail(br, &tab.e, 64 - tab.log, out, 0)
}

#[inline(always)]
fn huf_4streams(tab: &HufTable, src: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    if src.len() < 6 {
        return Err(DecodeError::Literals("jump table truncated"));
    }
    let s1 = u16::from_le_bytes([src[0], src[1]]) as usize;
    let s2 = u16::from_le_bytes([src[2], src[3]]) as usize;
    let s3 = u16::from_le_bytes([src[4], src[5]]) as usize;
    let body = &src[6..];
    if s1 + s2 + s3 > body.len() {
        return Err(DecodeError::Literals("jump table exceeds the literals"));
    }
    let (i1, rest) = body.split_at(s1);
    let (i2, rest) = rest.split_at(s2);
    let (i3, i4) = rest.split_at(s3);
    let seg = out.len().div_ceil(4);
    if 3 * seg > out.len() {
        return Err(DecodeError::Literals("too few literals for 4 streams"));
    }
    let bad = || DecodeError::Literals("bad Huffman stream");
    let (mut b1, mut b2, mut b3, mut b4) =
        (BitReader::new(i1).ok_or_else(bad)?, BitReader::new(i2).ok_or_else(bad)?, BitReader::new(i3).ok_or_else(bad)?, BitReader::new(i4).ok_or_else(bad)?);
    let (o1, rest) = out.split_at_mut(seg);
    let (o2, rest) = rest.split_at_mut(seg);
    let (o3, o4) = rest.split_at_mut(seg);
    let shift = 64 - tab.log;
    let t = &*tab.e;
    // Interleaved: 4 symbols per stream per reload (4 × 11 ≤ 57 bits).
    let mut done = 0;
    for (((c1, c2), c3), c4) in o1.chunks_exact_mut(4).zip(o2.chunks_exact_mut(4)).zip(o3.chunks_exact_mut(4)).zip(o4.chunks_exact_mut(4)) {
        b1.reload();
        b2.reload();
        b3.reload();
        b4.reload();
        for k in 0..4 {
            c1[k] = huf_sym(&mut b1, t, shift);
            c2[k] = huf_sym(&mut b2, t, shift);
            c3[k] = huf_sym(&mut b3, t, shift);
            c4[k] = huf_sym(&mut b4, t, shift);
        }
        done += 4;
    }
    huf_tail(b1, t, shift, o1, done)?;
    huf_tail(b2, t, shift, o2, done)?;
    huf_tail(b3, t, shift, o3, done)?;
    huf_tail(b4, t, shift, o4, done)
}

// ---------------------------------------------------------------------------------------------
// Match copies into the output buffer. Every caller has checked `op + len + SLACK <= buf.len()`
// and `offset <= op`; the copies may write up to max(31, 256 - len) bytes past `op + len`.

#[inline(always)]
fn copy_match(buf: &mut [u8], op: usize, offset: usize, len: usize) {
    debug_assert!(offset >= 1 && offset <= op && op + len + SLACK <= buf.len());
    if offset >= 16 {
        assert!(op + len + 32 <= buf.len() && offset <= op);
        let p = buf.as_mut_ptr();
        if len <= 32 && offset >= 32 {
            // SAFETY: [op, op + 32) lies in buf (asserted op + len + 32 <= buf.len()); the
            // source [op - offset, op - offset + 32) starts at >= 0 (offset <= op) and ends at
            // or before op (offset >= 32): the ranges do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(p.add(op - offset), p.add(op), 32) };
        } else if len <= 32 {
            // SAFETY: [op, op + 32) lies in buf (asserted op + len + 32 <= buf.len()); each
            // 16-byte source range starts offset >= 16 bytes before its destination and at
            // >= 0 (offset <= op), so the two ranges of each copy do not overlap; the second
            // copy may read what the first wrote, which is the overlapping-match semantics.
            unsafe {
                std::ptr::copy_nonoverlapping(p.add(op - offset), p.add(op), 16);
                std::ptr::copy_nonoverlapping(p.add(op - offset + 16), p.add(op + 16), 16);
            }
        } else if offset >= len {
            // Source and destination do not overlap: one memmove (fast for long copies).
            buf.copy_within(op - offset..op - offset + len, op);
        } else {
            let mut i = 0;
            while i < len {
                // SAFETY: i < len, so [op + i, op + i + 16) lies in buf (asserted
                // op + len + 32 <= buf.len()); the source starts offset >= 16 bytes earlier,
                // at op - offset + i >= 0 (offset <= op asserted): no overlap.
                unsafe { std::ptr::copy_nonoverlapping(p.add(op - offset + i), p.add(op + i), 16) };
                i += 16;
            }
        }
    } else if offset == 1 {
        fill_run(buf, op, buf[op - 1], len);
    } else {
        // Repeat the period-`offset` pattern in 16-byte stores, advancing by a multiple of it.
        let mut pat = [0u8; 16];
        pat[..offset].copy_from_slice(&buf[op - offset..op]);
        for k in offset..16 {
            pat[k] = pat[k - offset];
        }
        let stride = 16 - 16 % offset;
        if stride == 16 {
            let n = (len + 15) & !15;
            for c in buf[op..op + n].chunks_exact_mut(16) {
                c.copy_from_slice(&pat);
            }
        } else {
            let end = op + len;
            let mut d = op;
            while d < end {
                buf[d..d + 16].copy_from_slice(&pat);
                d += stride;
            }
        }
    }
}

/// An offset-1 match: `len` copies of `b` (the byte before `op`) at `op`. A run of the
/// previous byte (our xor frames' zero runs, ~70 bytes on average): 256 bytes in 32-byte stores
/// unconditionally, which covers ~97 % of runs, so the one branch left is nearly always not
/// taken. Filling 64 and looping on, the "longer?" branch went either way as often;
/// sparse-xor decode went 4.3 -> 5.7 GB/s. Same slack contract as [`copy_match`].
#[inline(always)]
fn fill_run(buf: &mut [u8], op: usize, b: u8, len: usize) {
    buf[op..op + 256].copy_from_slice(&[b; 256]);
    if len > 256 {
        let n = (len + 31) & !31;
        for c in buf[op + 256..op + n].chunks_exact_mut(32) {
            c.copy_from_slice(&[b; 32]);
        }
    }
}

/// Copy `len` bytes from `src[sp..]` to `dst[dp..]` in 16-byte chunks (both sides need 15 bytes
/// of slack after the copy).
#[inline(always)]
fn wide_copy(dst: &mut [u8], dp: usize, src: &[u8], sp: usize, len: usize) {
    if len <= 16 {
        dst[dp..dp + 16].copy_from_slice(&src[sp..sp + 16]);
    } else if len <= 32 {
        dst[dp..dp + 32].copy_from_slice(&src[sp..sp + 32]);
    } else {
        dst[dp..dp + len].copy_from_slice(&src[sp..sp + len]);
    }
}

// ---------------------------------------------------------------------------------------------
// The frame reader.

/// A block header (RFC 8878 §3.1.1.2) and what the frame has room for.
struct BlockHeader {
    last: bool,
    btype: usize,
    /// Block_Size: the stored bytes (1 for RLE), or the content size for raw and RLE blocks.
    size: usize,
    /// Content the frame header still allows (unbounded without a content size).
    remaining: u64,
    /// Most content this block may produce: a block's maximum, capped by `remaining`.
    room: usize,
}

/// A frame decoder's entropy tables, kept from frame to frame by a per-thread pool: zeroing
/// 16 KiB of fresh tables per frame was most of what a small tensor's apply cost (a MoE model
/// has tens of thousands).
struct Tables {
    huf: HufTable,
    ll: SeqTable,
    of: SeqTable,
    ml: SeqTable,
    fse_scratch: Vec<FseEntry>,
}

impl Default for Tables {
    fn default() -> Self {
        Tables {
            huf: HufTable { e: Box::new([0u16; HUF_TABLE]), log: 0, valid: false },
            ll: SeqTable::new(),
            of: SeqTable::new(),
            ml: SeqTable::new(),
            fse_scratch: Vec::with_capacity(SEQ_TABLE),
        }
    }
}

thread_local! {
    static SPARE_TABLES: crate::pool::Pool<Tables> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Tables {
    /// Tables for a new frame, none of them valid: a frame may not repeat a table from a
    /// frame decoded before it (RFC 8878: treeless literals and repeat modes need a table of
    /// this frame's earlier blocks).
    fn for_new_frame() -> crate::pool::Pooled<Tables> {
        let mut t = crate::pool::Pooled::take(&SPARE_TABLES, |_| true);
        t.huf.valid = false;
        t.ll.valid = false;
        t.of.valid = false;
        t.ml.valid = false;
        t
    }
}

/// Reads the decoded content of one zstd frame.
pub struct FrameReader<'a> {
    src: &'a [u8],
    /// Next block header in `src`.
    pos: usize,
    content_size: Option<u64>,
    checksum: bool,
    window: usize,
    block_max: usize,
    /// Largest size of `buf`.
    cap: usize,
    /// `[history | decoded, unserved | slack]`.
    buf: Vec<u8>,
    out_start: usize,
    out_end: usize,
    /// Bytes decoded so far (verified ones only).
    total: u64,
    lits: Vec<u8>,
    /// Most literals a block of this frame can have: no block has more than it decodes to,
    /// which is at most `block_max` and at most the frame's content, so a 1 KiB tensor's frame
    /// zeroes a 1 KiB literal buffer, not 128 (tens of thousands in a MoE model's apply).
    lits_max: usize,
    t: crate::pool::Pooled<Tables>,
    rep: [usize; 3],
    /// The last content byte decoded ([`Self::xor_into`] only; 0 before any).
    prev: u8,
    hasher: Option<twox_hash::XxHash64>,
    done: bool,
    failed: Option<DecodeError>,
}

impl<'a> FrameReader<'a> {
    /// Parse the frame header of `frame` (exactly one zstd frame is expected to start at byte 0).
    pub fn new(frame: &'a [u8], window_log_max: u32) -> Result<Self, DecodeError> {
        let hdr = DecodeError::Truncated("frame header");
        let magic = u32::from_le_bytes(frame.get(..4).ok_or(hdr.clone())?.try_into().expect("4 bytes"));
        if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
            return Err(DecodeError::Skippable);
        }
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let &fhd = frame.get(4).ok_or(hdr.clone())?;
        let fcs_flag = fhd >> 6;
        let single = fhd & 0x20 != 0;
        if fhd & 0x08 != 0 {
            return Err(DecodeError::ReservedBit);
        }
        let checksum = fhd & 0x04 != 0;
        let dict_len = [0usize, 1, 2, 4][(fhd & 3) as usize];
        let fcs_len = match fcs_flag {
            0 => single as usize,
            1 => 2,
            2 => 4,
            _ => 8,
        };
        let mut p = 5;
        let mut window = 0u64;
        if !single {
            let &wd = frame.get(p).ok_or(hdr.clone())?;
            p += 1;
            let base = 1u64 << (10 + (wd >> 3));
            window = base + (base / 8) * (wd & 7) as u64;
        }
        let dict = le_bytes(frame.get(p..p + dict_len).ok_or(hdr.clone())?);
        p += dict_len;
        if dict != 0 {
            return Err(DecodeError::Dictionary(dict as u32));
        }
        let content_size = if fcs_len == 0 {
            None
        } else {
            let v = le_bytes(frame.get(p..p + fcs_len).ok_or(hdr)?);
            p += fcs_len;
            Some(if fcs_len == 2 { v + 256 } else { v })
        };
        if single {
            window = content_size.expect("single-segment frames have a content size");
        }
        let log_max = window_log_max.min(31);
        if window > 1u64 << log_max {
            return Err(DecodeError::WindowTooLarge { size: window, log_max });
        }
        let window = window as usize;
        let block_max = window.min(BLOCK_MAX);
        let mut cap = window + (2 * block_max).max(window);
        if let Some(n) = content_size {
            cap = cap.min(n.min(usize::MAX as u64 / 2) as usize);
        }
        Ok(FrameReader {
            src: frame,
            pos: p,
            content_size,
            checksum,
            window,
            block_max,
            cap: cap + SLACK,
            buf: Vec::new(),
            out_start: 0,
            out_end: 0,
            total: 0,
            lits: Vec::new(),
            lits_max: content_size.map_or(block_max, |n| block_max.min(n.min(BLOCK_MAX as u64) as usize)),
            t: Tables::for_new_frame(),
            rep: [1, 4, 8],
            prev: 0,
            hasher: checksum.then(|| twox_hash::XxHash64::with_seed(0)),
            done: false,
            failed: None,
        })
    }

    /// Frame_Content_Size if the header has one.
    pub fn content_size(&self) -> Option<u64> {
        self.content_size
    }

    /// Make `room + SLACK` bytes free after `out_end` (everything before it has been served).
    fn make_room(&mut self, room: usize) {
        let need = room + SLACK;
        if self.out_end + need <= self.buf.len() {
            return;
        }
        if self.buf.len() < self.cap {
            // Allocated once, zeroed by the allocator (calloc: large buffers are fresh pages
            // that cost nothing until written), so growth never copies.
            debug_assert_eq!(self.out_end, 0);
            self.buf = vec![0u8; self.cap];
        }
        if self.out_end + need > self.buf.len() {
            let keep = self.out_end.min(self.window);
            self.buf.copy_within(self.out_end - keep..self.out_end, 0);
            self.out_end = keep;
            self.out_start = keep;
        }
        debug_assert!(self.out_end + need <= self.buf.len());
    }

    /// Decode the next block into `buf[out_end..]` and expose it.
    fn decode_block(&mut self) -> Result<(), DecodeError> {
        let BlockHeader { last, btype, size, remaining, room } = self.block_header().ok_or(DecodeError::Truncated("block header"))?;
        self.pos += 3;
        let too_long = |s: &Self| match s.content_size {
            Some(n) if remaining < s.block_max as u64 => DecodeError::ContentTooLong(n),
            _ => DecodeError::BlockTooLarge { size, max: s.block_max },
        };
        if size > self.block_max {
            return Err(DecodeError::BlockTooLarge { size, max: self.block_max });
        }
        let (start, end) = match btype {
            0 | 1 => {
                if size > room {
                    return Err(too_long(self));
                }
                self.make_room(room);
                let start = self.out_end;
                if btype == 0 {
                    let data = self.src.get(self.pos..self.pos + size).ok_or(DecodeError::Truncated("raw block"))?;
                    self.buf[start..start + size].copy_from_slice(data);
                    self.pos += size;
                } else {
                    let &b = self.src.get(self.pos).ok_or(DecodeError::Truncated("RLE block"))?;
                    self.buf[start..start + size].fill(b);
                    self.pos += 1;
                }
                (start, start + size)
            }
            2 => {
                let data = self.src.get(self.pos..self.pos + size).ok_or(DecodeError::Truncated("compressed block"))?;
                self.make_room(room);
                let start = self.out_end;
                let end = self.compressed_block(data, start, start + room).map_err(|e| match e {
                    DecodeError::BlockTooLarge { .. } => too_long(self),
                    e => e,
                })?;
                self.pos += size;
                (start, end)
            }
            _ => return Err(DecodeError::ReservedBlock),
        };
        let produced = &self.buf[start..end];
        if let Some(hs) = self.hasher.as_mut() {
            std::hash::Hasher::write(hs, produced);
        }
        let total = self.total + produced.len() as u64;
        if last {
            if let Some(n) = self.content_size {
                if n != total {
                    return Err(DecodeError::ContentSize { expected: n, actual: total });
                }
            }
            if self.checksum {
                let c = self.src.get(self.pos..self.pos + 4).ok_or(DecodeError::Truncated("content checksum"))?;
                let expected = u32::from_le_bytes(c.try_into().expect("4 bytes"));
                let actual = self.hasher.as_ref().map_or(0, |h| std::hash::Hasher::finish(h) as u32);
                if expected != actual {
                    return Err(DecodeError::Checksum { expected, actual });
                }
                self.pos += 4;
            }
            self.done = true;
        }
        self.total = total;
        self.out_start = start;
        self.out_end = end;
        Ok(())
    }

    /// Decode a compressed block into `buf[op..]`, never past `limit`; returns the end.
    fn compressed_block(&mut self, src: &[u8], op: usize, limit: usize) -> Result<usize, DecodeError> {
        let (used, nlits) = self.literals(src)?;
        self.sequences(&src[used..], nlits, op, limit)
    }

    /// Decode the literals section into `lits[..n]`; returns (bytes used, n).
    fn literals(&mut self, src: &[u8]) -> Result<(usize, usize), DecodeError> {
        let lits_max = self.lits_max;
        if self.lits.is_empty() {
            self.lits = vec![0u8; lits_max + SLACK];
        }
        let trunc = DecodeError::Truncated("literals section");
        let &b0 = src.first().ok_or(trunc.clone())?;
        let ltype = b0 & 3;
        let sf = (b0 >> 2) & 3;
        if ltype < 2 {
            let (hs, n) = match sf {
                0 | 2 => (1, (b0 >> 3) as usize),
                1 => (2, (le_bytes(src.get(..2).ok_or(trunc.clone())?) >> 4) as usize),
                _ => (3, (le_bytes(src.get(..3).ok_or(trunc.clone())?) >> 4) as usize),
            };
            if n > lits_max {
                return Err(DecodeError::Literals("more literals than a block"));
            }
            if ltype == 0 {
                let data = src.get(hs..hs + n).ok_or(trunc)?;
                self.lits[..n].copy_from_slice(data);
                Ok((hs + n, n))
            } else {
                let &b = src.get(hs).ok_or(trunc)?;
                self.lits[..n].fill(b);
                Ok((hs + 1, n))
            }
        } else {
            let (hs, bits, four) = match sf {
                0 => (3, 10, false),
                1 => (3, 10, true),
                2 => (4, 14, true),
                _ => (5, 18, true),
            };
            let h = le_bytes(src.get(..hs).ok_or(trunc.clone())?);
            let mask = (1u64 << bits) - 1;
            let n = ((h >> 4) & mask) as usize;
            let csize = ((h >> (4 + bits)) & mask) as usize;
            if n > lits_max {
                return Err(DecodeError::Literals("more literals than a block"));
            }
            let data = src.get(hs..hs + csize).ok_or(trunc)?;
            let tree = if ltype == 2 {
                let t = &mut *self.t;
                t.huf.read(data, &mut t.fse_scratch)?
            } else if self.t.huf.valid {
                0
            } else {
                return Err(DecodeError::Literals("treeless literals without a previous Huffman table"));
            };
            let streams = &data[tree..];
            huf_decode(&self.t.huf, streams, &mut self.lits[..n], four)?;
            Ok((hs + csize, n))
        }
    }

    /// Parse a sequences section's header and load its tables: the number of sequences and
    /// where the bitstream starts (for none, the section must end there).
    fn sequences_header(&mut self, src: &[u8]) -> Result<(usize, usize), DecodeError> {
        let trunc = DecodeError::Truncated("sequences section");
        let &b0 = src.first().ok_or(trunc.clone())?;
        let (nseq, mut p) = if b0 < 128 {
            (b0 as usize, 1)
        } else if b0 < 255 {
            let &b1 = src.get(1).ok_or(trunc.clone())?;
            ((((b0 - 128) as usize) << 8) + b1 as usize, 2)
        } else {
            let b = src.get(1..3).ok_or(trunc.clone())?;
            (b[0] as usize + ((b[1] as usize) << 8) + 0x7F00, 3)
        };
        if nseq == 0 {
            if p != src.len() {
                return Err(DecodeError::Sequences("bytes after an empty sequences section"));
            }
            return Ok((0, p));
        }
        let &modes = src.get(p).ok_or(trunc)?;
        p += 1;
        if modes & 3 != 0 {
            return Err(DecodeError::Sequences("reserved bits set in the compression modes"));
        }
        let t = &mut *self.t;
        p += t.ll.load(Kind::LiteralLength, modes >> 6, &src[p..], &mut t.fse_scratch)?;
        p += t.of.load(Kind::Offset, (modes >> 4) & 3, &src[p..], &mut t.fse_scratch)?;
        p += t.ml.load(Kind::MatchLength, (modes >> 2) & 3, &src[p..], &mut t.fse_scratch)?;
        Ok((nseq, p))
    }

    /// Decode and execute the sequences section; returns the end of the block's output.
    fn sequences(&mut self, src: &[u8], nlits: usize, op: usize, limit: usize) -> Result<usize, DecodeError> {
        let (nseq, p) = self.sequences_header(src)?;
        if nseq == 0 {
            if op + nlits > limit {
                return Err(DecodeError::BlockTooLarge { size: 0, max: 0 });
            }
            self.buf[op..op + nlits].copy_from_slice(&self.lits[..nlits]);
            return Ok(op + nlits);
        }
        let (rep, window) = (self.rep, self.window);
        let seqs = SeqDecoder::of_section(&src[p..], [&self.t.ll, &self.t.of, &self.t.ml])?;
        let mut job = SeqJob { seqs, nseq, rep, window, buf: &mut self.buf[..limit + SLACK], lits: &self.lits[..], nlits, op, limit };
        #[cfg(target_arch = "x86_64")]
        let end = if fast_sequence_loops() {
            // SAFETY: the CPU supports BMI2 and AVX2 (fast_sequence_loops).
            unsafe { execute_bmi2(&mut job) }
        } else {
            execute(&mut job)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let end = execute(&mut job);
        let end = end?;
        self.rep = job.rep;
        Ok(end)
    }

    /// XOR the next `dst.len()` bytes of the content into `dst`, decoding straight into it: the
    /// fast path of an `xor` apply, for frames like ours (every match offset 1, blocks that
    /// end where `dst` does). Literals are XORed in where they land and a run of zeros costs
    /// nothing, so the content is never written out whole (the materializing decoder fills
    /// ~70 zero bytes per sequence and the apply then reads them back).
    ///
    /// `Ok`: all of `dst` holds its XOR. `Err(n)`: the frame needs what this path does not do
    /// (a match of another offset, a block running past `dst`, a content checksum, or anything
    /// the materializing decoder would refuse); `dst[..n]` holds exactly its XOR, and the
    /// rest is untouched unless the frame is invalid at that point, which the materializing
    /// decoder then reports. After `Err` the reader is spent: decode the frame again with
    /// [`std::io::BufRead`] from content position `n` on.
    ///
    /// Call it on a reader whose content nothing has read yet, and only it, until `Err`.
    pub fn xor_into(&mut self, dst: &mut [u8]) -> Result<(), usize> {
        if self.checksum || !self.buf.is_empty() || self.failed.is_some() {
            return Err(0);
        }
        let mut at = 0;
        while at < dst.len() {
            if self.done {
                return Err(at);
            }
            at = self.xor_block(dst, at)?;
        }
        Ok(())
    }

    /// The header of the next block (at `pos`), `None` if the frame ends before it.
    fn block_header(&self) -> Option<BlockHeader> {
        let h = le_bytes(self.src.get(self.pos..self.pos + 3)?) as usize;
        let remaining = self.content_size.map_or(u64::MAX, |n| n - self.total);
        let room = (self.block_max as u64).min(remaining) as usize;
        Some(BlockHeader { last: h & 1 != 0, btype: (h >> 1) & 3, size: h >> 3, remaining, room })
    }

    /// [`Self::xor_into`] for the next block, whose content lands at `dst[at..]`; returns its end.
    fn xor_block(&mut self, dst: &mut [u8], at: usize) -> Result<usize, usize> {
        let BlockHeader { last, btype, size, room, .. } = self.block_header().ok_or(at)?;
        if size > self.block_max || room > dst.len() - at {
            return Err(at);
        }
        let body = self.pos + 3;
        let end = match btype {
            0 if size <= room => {
                let data = self.src.get(body..body + size).ok_or(at)?;
                xor_bytes(&mut dst[at..at + size], data);
                self.prev = data.last().copied().unwrap_or(self.prev);
                self.pos = body + size;
                at + size
            }
            1 if size <= room => {
                let &b = self.src.get(body).ok_or(at)?;
                xor_byte(&mut dst[at..at + size], b);
                if size > 0 {
                    self.prev = b;
                }
                self.pos = body + 1;
                at + size
            }
            2 => {
                let data = self.src.get(body..body + size).ok_or(at)?;
                let (used, nlits) = self.literals(data).map_err(|_| at)?;
                let end = self.xor_sequences(&data[used..], nlits, dst, at, at + room)?;
                self.pos = body + size;
                end
            }
            _ => return Err(at),
        };
        let total = self.total + (end - at) as u64;
        if last && self.content_size.is_some_and(|n| n != total) {
            return Err(at);
        }
        self.total = total;
        self.done = last;
        Ok(end)
    }

    /// [`Self::sequences`] XORed into `dst[op..limit]`; returns the block's end.
    fn xor_sequences(&mut self, src: &[u8], nlits: usize, dst: &mut [u8], op: usize, limit: usize) -> Result<usize, usize> {
        let (nseq, p) = self.sequences_header(src).map_err(|_| op)?;
        if nseq == 0 {
            if op + nlits > limit {
                return Err(op);
            }
            xor_bytes(&mut dst[op..op + nlits], &self.lits[..nlits]);
            self.prev = self.lits[..nlits].last().copied().unwrap_or(self.prev);
            return Ok(op + nlits);
        }
        let (rep, prev, history) = (self.rep, self.prev, self.total > 0);
        let seqs = SeqDecoder::of_section(&src[p..], [&self.t.ll, &self.t.of, &self.t.ml]).map_err(|_| op)?;
        let mut job = XorJob { seqs, nseq, rep, prev, history, dst: &mut dst[..limit], lits: &self.lits[..], nlits, op };
        #[cfg(target_arch = "x86_64")]
        let end = if fast_sequence_loops() {
            // SAFETY: the CPU supports BMI2 and AVX2 (fast_sequence_loops).
            unsafe { execute_xor_bmi2(&mut job) }
        } else {
            execute_xor(&mut job)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let end = execute_xor(&mut job);
        let end = end?;
        (self.rep, self.prev) = (job.rep, job.prev);
        Ok(end)
    }
}

/// `dst[i] ^= b` (nothing to do for a zero byte: the zero runs of our frames).
#[inline(always)]
fn xor_byte(dst: &mut [u8], b: u8) {
    if b != 0 {
        dst.iter_mut().for_each(|x| *x ^= b);
    }
}

/// `dst[i] ^= src[i]` (same lengths).
pub(crate) fn xor_bytes(dst: &mut [u8], src: &[u8]) {
    for (x, y) in dst.iter_mut().zip(src) {
        *x ^= *y;
    }
}

/// Tests force the portable sequence loop with this (both loops must decode alike).
#[cfg(test)]
static PORTABLE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(all(test, target_arch = "x86_64"))]
fn portable_only() -> bool {
    PORTABLE_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(all(not(test), target_arch = "x86_64"))]
#[inline(always)]
fn portable_only() -> bool {
    false
}

/// Whether the sequence loops compiled with BMI2 and AVX2 may run (std caches the detection).
#[cfg(target_arch = "x86_64")]
fn fast_sequence_loops() -> bool {
    !portable_only() && std::is_x86_feature_detected!("bmi2") && std::is_x86_feature_detected!("avx2")
}

/// One block's sequences bitstream and FSE states, read one sequence at a time.
#[derive(Clone, Copy)]
struct SeqDecoder<'s, 'b> {
    br: BitReader<'s>,
    /// Literal length, offset, match length tables.
    tables: [&'b [SeqEntry; SEQ_TABLE]; 3],
    /// Literal length, offset, match length states.
    states: [usize; 3],
    /// Bits of the three state updates.
    state_bits: u32,
}

impl<'s, 'b> SeqDecoder<'s, 'b> {
    #[inline(always)]
    fn new(mut br: BitReader<'s>, tables: [&'b [SeqEntry; SEQ_TABLE]; 3], logs: [u32; 3]) -> Self {
        let states = logs.map(|log| br.read(log) as usize);
        SeqDecoder { br, tables, states, state_bits: logs.iter().sum() }
    }

    /// The decoder of a sequences section whose bitstream is `src`, with the tables loaded
    /// (literal length, offset, match length).
    fn of_section(src: &'s [u8], [ll, of, ml]: [&'b SeqTable; 3]) -> Result<Self, DecodeError> {
        let br = BitReader::new(src).ok_or(DecodeError::Sequences("bad bitstream"))?;
        Ok(SeqDecoder::new(br, [&*ll.e, &*of.e, &*ml.e], [ll.log, of.log, ml.log]))
    }

    /// The next sequence's (offset value, match length, literal length); `more`: another
    /// sequence follows (the last one updates no state).
    #[inline(always)]
    fn next(&mut self, more: bool) -> (usize, usize, usize) {
        let [ll_t, of_t, ml_t] = self.tables;
        let [s_ll, s_of, s_ml] = &mut self.states;
        let br = &mut self.br;
        br.reload();
        let le = ll_t[*s_ll & (SEQ_TABLE - 1)];
        let oe = of_t[*s_of & (SEQ_TABLE - 1)];
        let me = ml_t[*s_ml & (SEQ_TABLE - 1)];
        let (a, b, c) = (oe.extra as u32, me.extra as u32, le.extra as u32);
        let (n_ll, n_ml, n_of) = (le.nb as u32, me.nb as u32, oe.nb as u32);
        let all = a + b + c + n_ll + n_ml + n_of;
        let (ofv, ml, ll);
        if all <= 57 && more {
            // The common case: one read for the extra bits and the three state updates, in
            // stream order (offset, match length, literal length extras; LL, ML, OF states).
            let v = br.read(all);
            let mask = |n: u32| (1u64 << n) - 1;
            let mut sh = all - a;
            ofv = oe.base as usize + ((v >> sh) & mask(a)) as usize;
            sh -= b;
            ml = me.base as usize + ((v >> sh) & mask(b)) as usize;
            sh -= c;
            ll = le.base as usize + ((v >> sh) & mask(c)) as usize;
            sh -= n_ll;
            *s_ll = le.next as usize + ((v >> sh) & mask(n_ll)) as usize;
            sh -= n_ml;
            *s_ml = me.next as usize + ((v >> sh) & mask(n_ml)) as usize;
            *s_of = oe.next as usize + (v & mask(n_of)) as usize;
        } else {
            ofv = oe.base as usize + br.read(a) as usize;
            let mut used = a;
            if a + b + c > 57 {
                br.reload();
                used = 0;
            }
            ml = me.base as usize + br.read(b) as usize;
            ll = le.base as usize + br.read(c) as usize;
            used += b + c;
            if more {
                if used + self.state_bits > 57 {
                    br.reload();
                }
                *s_ll = le.next as usize + br.read(n_ll) as usize;
                *s_ml = me.next as usize + br.read(n_ml) as usize;
                *s_of = oe.next as usize + br.read(n_of) as usize;
            }
        }
        (ofv, ml, ll)
    }
}

/// The match offset an offset value means (RFC 8878 §3.1.1.5), updating the repeat offsets.
#[inline(always)]
fn match_offset(rep: &mut [usize; 3], ofv: usize, ll: usize) -> usize {
    if ofv > 3 {
        *rep = [ofv - 3, rep[0], rep[1]];
        ofv - 3
    } else {
        let idx = ofv - 1 + (ll == 0) as usize;
        if idx == 0 {
            rep[0]
        } else {
            let o = if idx == 3 { rep[0].wrapping_sub(1) } else { rep[idx] };
            if idx > 1 {
                rep[2] = rep[1];
            }
            rep[1] = rep[0];
            rep[0] = o;
            o
        }
    }
}

/// One block's sequences to decode and execute.
struct SeqJob<'s, 'b> {
    seqs: SeqDecoder<'s, 'b>,
    nseq: usize,
    rep: [usize; 3],
    window: usize,
    /// The output buffer up to `limit + SLACK`.
    buf: &'b mut [u8],
    lits: &'b [u8],
    nlits: usize,
    op: usize,
    limit: usize,
}

fn execute(job: &mut SeqJob) -> Result<usize, DecodeError> {
    execute_body(job)
}

/// The same, compiled with BMI2 (shifts by a variable count are one instruction) and AVX2
/// (32-byte fills).
///
/// # Safety
/// The CPU must support BMI2 and AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "bmi2,avx2")]
unsafe fn execute_bmi2(job: &mut SeqJob) -> Result<usize, DecodeError> {
    execute_body(job)
}

/// Decode the sequences and execute them into `buf[op..]`; returns the block's end.
#[inline(always)]
fn execute_body(job: &mut SeqJob) -> Result<usize, DecodeError> {
    let too_big = DecodeError::BlockTooLarge { size: 0, max: 0 };
    // A copy on the stack, so the loop keeps the bit reader and states in registers.
    let mut seqs = job.seqs;
    let mut rep = job.rep;
    let mut lp = 0usize;
    let mut op = job.op;
    let (window, limit, nlits, nseq) = (job.window, job.limit, job.nlits, job.nseq);
    let buf = &mut *job.buf;
    let lits = job.lits;
    for i in 0..nseq {
        let (ofv, ml, ll) = seqs.next(i + 1 < nseq);
        let offset = match_offset(&mut rep, ofv, ll);
        if ll > nlits - lp {
            return Err(DecodeError::Sequences("literal length exceeds the literals"));
        }
        if ll + ml > limit - op {
            return Err(too_big);
        }
        wide_copy(buf, op, lits, lp, ll);
        op += ll;
        lp += ll;
        if offset == 0 || offset > op.min(window) {
            return Err(DecodeError::BadOffset(offset as u64));
        }
        if offset == 1 && ll > 0 {
            // The byte to repeat is the last literal just copied: read it from the literals
            // rather than back from the store that wrote it a few instructions ago.
            fill_run(buf, op, lits[lp - 1], ml);
        } else {
            copy_match(buf, op, offset, ml);
        }
        op += ml;
    }
    if !seqs.br.finished() {
        return Err(DecodeError::Sequences("bitstream does not end where it should"));
    }
    let rest = nlits - lp;
    if rest > limit - op {
        return Err(too_big);
    }
    buf[op..op + rest].copy_from_slice(&lits[lp..nlits]);
    job.rep = rep;
    Ok(op + rest)
}

/// One block's sequences to XOR into the destination ([`FrameReader::xor_into`]).
struct XorJob<'s, 'b> {
    seqs: SeqDecoder<'s, 'b>,
    nseq: usize,
    rep: [usize; 3],
    /// The content byte before `dst[op]` (meaningful if `history`).
    prev: u8,
    /// Content precedes this block.
    history: bool,
    /// The destination, up to the block's limit.
    dst: &'b mut [u8],
    lits: &'b [u8],
    nlits: usize,
    op: usize,
}

fn execute_xor(job: &mut XorJob) -> Result<usize, usize> {
    execute_xor_body(job)
}

/// The same, compiled like [`execute_bmi2`].
///
/// # Safety
/// The CPU must support BMI2 and AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "bmi2,avx2")]
unsafe fn execute_xor_bmi2(job: &mut XorJob) -> Result<usize, usize> {
    execute_xor_body(job)
}

/// Decode the sequences and XOR their content into `dst[op..]`; returns the block's end, or
/// `Err(op)` where a sequence needs the materializing decoder (see [`FrameReader::xor_into`]).
/// Every check of [`execute_body`] is made here too, only answered with `Err`: a block this
/// accepts, that one decodes to the same bytes.
#[inline(always)]
fn execute_xor_body(job: &mut XorJob) -> Result<usize, usize> {
    // A copy on the stack, so the loop keeps the bit reader and states in registers.
    let mut seqs = job.seqs;
    let mut rep = job.rep;
    let mut prev = job.prev;
    let mut lp = 0usize;
    let mut op = job.op;
    let (nlits, nseq, start, history) = (job.nlits, job.nseq, job.op, job.history);
    let dst = &mut *job.dst;
    let limit = dst.len();
    let lits = job.lits;
    for i in 0..nseq {
        let (ofv, ml, ll) = seqs.next(i + 1 < nseq);
        // Offset 1 only, and a byte for it to repeat; anything else goes to the materializing
        // decoder, which also finds every error there (this sequence is not applied yet).
        if match_offset(&mut rep, ofv, ll) != 1 || ll > nlits - lp || ll + ml > limit - op || !(history || op + ll > start) {
            return Err(op);
        }
        xor_literals(dst, op, lits, lp, ll);
        op += ll;
        lp += ll;
        if ll > 0 {
            prev = lits[lp - 1];
        }
        xor_byte(&mut dst[op..op + ml], prev);
        op += ml;
    }
    let rest = nlits - lp;
    if !seqs.br.finished() || rest > limit - op {
        return Err(op);
    }
    xor_bytes(&mut dst[op..op + rest], &lits[lp..nlits]);
    if rest > 0 {
        prev = lits[nlits - 1];
    }
    job.rep = rep;
    job.prev = prev;
    Ok(op + rest)
}

/// `dst[op..op + len] ^= lits[lp..lp + len]`. Runs are mostly 1–2 bytes: one 16-byte XOR
/// masked to the run where both sides have 16 bytes (the literals always have slack).
#[inline(always)]
fn xor_literals(dst: &mut [u8], op: usize, lits: &[u8], lp: usize, len: usize) {
    if len <= 16 && op + 16 <= dst.len() && lp + 16 <= lits.len() {
        let d: &mut [u8; 16] = (&mut dst[op..op + 16]).try_into().expect("16 bytes");
        let l = u128::from_le_bytes(lits[lp..lp + 16].try_into().expect("16 bytes"));
        let mask = if len == 16 { u128::MAX } else { (1u128 << (8 * len)) - 1 };
        *d = (u128::from_le_bytes(*d) ^ (l & mask)).to_le_bytes();
    } else {
        xor_bytes(&mut dst[op..op + len], &lits[lp..lp + len]);
    }
}

impl io::Read for FrameReader<'_> {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        let src = io::BufRead::fill_buf(self)?;
        let n = dst.len().min(src.len());
        dst[..n].copy_from_slice(&src[..n]);
        io::BufRead::consume(self, n);
        Ok(n)
    }
}

/// The decoded bytes of the current block, without a copy (an `xor` apply folds them straight
/// into the tensor's chunk).
impl io::BufRead for FrameReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        loop {
            if self.out_start < self.out_end {
                return Ok(&self.buf[self.out_start..self.out_end]);
            }
            if let Some(e) = &self.failed {
                return Err(e.clone().into());
            }
            if self.done {
                return Ok(&[]);
            }
            if let Err(e) = self.decode_block() {
                self.failed = Some(e.clone());
                return Err(e.into());
            }
        }
    }
    fn consume(&mut self, n: usize) {
        self.out_start = (self.out_start + n).min(self.out_end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    use crate::sparse_frame::tests::rng;

    #[derive(Clone, Copy, Debug)]
    enum Data {
        Zeros,
        Random,
        Text,
        Pattern,
    }

    fn make(kind: Data, len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        match kind {
            Data::Zeros => vec![0; len],
            Data::Random => (0..len).map(|_| rng(&mut s) as u8).collect(),
            Data::Text => {
                const WORDS: [&str; 16] =
                    ["the ", "weight ", "delta ", "of ", "a ", "rollout ", "tensor\n", "step ", "is ", "zstd ", "frame, ", "and ", "bf16 ", "shard ", "file ", "x"];
                let mut v = Vec::with_capacity(len + 16);
                while v.len() < len {
                    let r = rng(&mut s);
                    if r.is_multiple_of(50) && v.len() > 100 {
                        // a long repeat from far back
                        let from = (rng(&mut s) as usize) % (v.len() - 50);
                        let n = 20 + (rng(&mut s) as usize) % 200;
                        for k in 0..n.min(v.len() - from) {
                            v.push(v[from + k]);
                        }
                    } else if r.is_multiple_of(7) {
                        v.push((r >> 20) as u8);
                    } else {
                        v.extend_from_slice(WORDS[(r >> 8) as usize % 16].as_bytes());
                    }
                }
                v.truncate(len);
                v
            }
            Data::Pattern => {
                let mut v = Vec::with_capacity(len);
                while v.len() < len {
                    let p = 2 + (rng(&mut s) as usize) % 14;
                    let pat: Vec<u8> = (0..p).map(|_| rng(&mut s) as u8).collect();
                    let n = 20 + (rng(&mut s) as usize) % 3000;
                    v.extend((0..n).map(|k| pat[k % p]));
                }
                v.truncate(len);
                v
            }
        }
    }

    fn bulk(data: &[u8], level: i32, checksum: bool, content_size: bool) -> Vec<u8> {
        use zstd::zstd_safe::CParameter;
        let mut c = zstd::bulk::Compressor::new(level).unwrap();
        c.set_parameter(CParameter::ChecksumFlag(checksum)).unwrap();
        c.set_parameter(CParameter::ContentSizeFlag(content_size)).unwrap();
        c.compress(data).unwrap()
    }

    /// Streaming encoder without a pledged size: no content size, a window smaller than the data.
    fn streamed(data: &[u8], level: i32, checksum: bool) -> Vec<u8> {
        let mut e = zstd::stream::Encoder::new(Vec::new(), level).unwrap();
        e.include_checksum(checksum).unwrap();
        for piece in data.chunks(100_000) {
            e.write_all(piece).unwrap();
        }
        e.finish().unwrap()
    }

    fn ours(frame: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
        let mut r = FrameReader::new(frame, 27)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    fn libzstd(frame: &[u8]) -> io::Result<Vec<u8>> {
        let mut d = zstd::stream::read::Decoder::with_buffer(frame)?.single_frame();
        d.window_log_max(27)?;
        let mut out = Vec::new();
        d.read_to_end(&mut out)?;
        Ok(out)
    }

    const CHUNKS: [usize; 4] = [1, 7, 4096, 256 << 10];

    /// One block of a frame, as [`blocks_of`] finds it.
    struct BlockInfo {
        /// Offset of its header in the frame.
        at: usize,
        kind: u8,
        size: usize,
        literals_type: u8,
        /// Sequence compression modes (0 without sequences).
        modes: u8,
    }

    /// The blocks of a frame that has no dictionary, and where the first one starts.
    fn blocks_of(frame: &[u8]) -> (usize, Vec<BlockInfo>) {
        let fhd = frame[4];
        let single = fhd & 0x20 != 0;
        let fcs = [usize::from(single), 2, 4, 8][(fhd >> 6) as usize];
        let mut p = 5 + usize::from(!single) + [0, 1, 2, 4][(fhd & 3) as usize] + fcs;
        let start = p;
        let mut out = Vec::new();
        loop {
            let h = le_bytes(&frame[p..p + 3]) as usize;
            let (last, kind, size) = (h & 1 == 1, ((h >> 1) & 3) as u8, h >> 3);
            let (mut lt, mut modes) = (0, 0);
            if kind == 2 {
                let b = &frame[p + 3..];
                lt = b[0] & 3;
                let sf = (b[0] >> 2) & 3;
                let lits_end = if lt < 2 {
                    let (hs, n) = match sf {
                        0 | 2 => (1, (b[0] >> 3) as usize),
                        1 => (2, (le_bytes(&b[..2]) >> 4) as usize),
                        _ => (3, (le_bytes(&b[..3]) >> 4) as usize),
                    };
                    hs + if lt == 0 { n } else { 1 }
                } else {
                    let (hs, bits) = [(3, 10), (3, 10), (4, 14), (5, 18)][sf as usize];
                    hs + ((le_bytes(&b[..hs]) >> (4 + bits)) & ((1 << bits) - 1)) as usize
                };
                let q = lits_end
                    + if b[lits_end] < 128 {
                        1
                    } else if b[lits_end] < 255 {
                        2
                    } else {
                        3
                    };
                if b[lits_end] != 0 {
                    modes = b[q];
                }
            }
            out.push(BlockInfo { at: p, kind, size, literals_type: lt, modes });
            p += 3 + if kind == 1 { 1 } else { size };
            if last {
                return (start, out);
            }
        }
    }

    #[test]
    fn a_frame_never_repeats_the_tables_of_an_earlier_frame() {
        // A level-19 frame of several blocks: later ones reuse the Huffman tree (treeless
        // literals) or a sequence table (repeat mode) of the blocks before them.
        let data = make(Data::Text, 1 << 20, 11);
        let full = bulk(&data, 19, false, false);
        let (start, blocks) = blocks_of(&full);
        let repeats = |b: &&BlockInfo| b.kind == 2 && (b.literals_type == 3 || [6, 4, 2].iter().any(|sh| (b.modes >> sh) & 3 == 3));
        let b = blocks.iter().skip(1).find(repeats).expect("a block that repeats a table");
        let (p, kind, size, lt, modes) = (b.at, b.kind, b.size, b.literals_type, b.modes);
        // That block alone, as the only block of a frame with the same header.
        let mut lone = full[..start].to_vec();
        lone.extend_from_slice(&(((size << 3) | ((kind as usize) << 1) | 1) as u32).to_le_bytes()[..3]);
        lone.extend_from_slice(&full[p + 3..p + 3 + size]);
        assert!(libzstd(&lone).is_err(), "libzstd refuses it too (literals type {lt}, modes {modes:#04x})");
        // Decoded right after the whole frame on this thread, whose tables are all valid and
        // go back to this thread's pool: they must not be taken for this frame's.
        for _ in 0..3 {
            assert!(ours(&full, 1 << 20).unwrap() == data);
            assert!(ours(&lone, 1 << 20).is_err(), "a table from another frame was used");
        }
        // The mechanism itself: the next frame gets those very tables back, none valid.
        let r = FrameReader::new(&full, 27).unwrap();
        let table = &*r.t.huf.e as *const _;
        drop(r);
        assert!(ours(&full, 1 << 20).unwrap() == data);
        let t = Tables::for_new_frame();
        assert_eq!(&*t.huf.e as *const _, table, "tables are reused from frame to frame");
        assert!(![t.huf.valid, t.ll.valid, t.of.valid, t.ml.valid].contains(&true), "a new frame starts with no valid table");
    }

    fn check(frame: &[u8], want: &[u8], i: usize, what: &str) {
        let chunk = if want.len() > (1 << 20) { CHUNKS[2 + i % 2] } else { CHUNKS[i % 4] };
        let got = ours(frame, chunk).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(got.len() == want.len() && got == want, "{what}: {} bytes decoded, {} expected", got.len(), want.len());
    }

    use crate::sparse_frame::tests::sparse;

    fn sparse_frame(len: usize, per_mille: u64, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let (old, new) = sparse(len, per_mille, seed);
        let mut frame = Vec::new();
        crate::sparse_frame::encode(&crate::sparse_frame::Pair(&old, &new), &mut frame).unwrap();
        (frame, old.iter().zip(&new).map(|(a, b)| a ^ b).collect())
    }

    #[test]
    fn libzstd_frames_round_trip() {
        let mut i = 0;
        for kind in [Data::Zeros, Data::Random, Data::Text, Data::Pattern] {
            for len in [0usize, 1, 100, BLOCK_MAX - 1, BLOCK_MAX, BLOCK_MAX + 1, 1 << 20, 5 << 20] {
                let data = make(kind, len, len as u64 * 31 + kind as u64);
                for level in [-5, 1, 3, 9, 19] {
                    if len == 5 << 20 && level > 3 {
                        continue; // slow to compress in a debug build; 1 MiB covers it
                    }
                    let (checksum, cs) = (i % 2 == 0, i % 4 < 2);
                    let frame = bulk(&data, level, checksum, cs);
                    check(&frame, &data, i, &format!("{kind:?} len {len} level {level} checksum {checksum} size {cs}"));
                    assert_eq!(FrameReader::new(&frame, 27).unwrap().content_size(), cs.then_some(len as u64));
                    i += 1;
                }
                for level in [1, 3] {
                    let frame = streamed(&data, level, i % 2 == 0);
                    check(&frame, &data, i, &format!("streamed {kind:?} len {len} level {level}"));
                    i += 1;
                }
            }
        }
    }

    #[test]
    fn long_window_slides() {
        // 20 MiB of text with far repeats through a 1 MiB window: the buffer slides many times.
        let data = make(Data::Text, 20 << 20, 5);
        let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        e.window_log(20).unwrap();
        e.include_checksum(true).unwrap();
        e.write_all(&data).unwrap();
        let frame = e.finish().unwrap();
        check(&frame, &data, 3, "20 MiB text, window 2^20");
        // Level 19 keeps a window bigger than the data's period of repeats.
        let data = make(Data::Pattern, 3 << 20, 6);
        let frame = streamed(&data, 19, false);
        check(&frame, &data, 2, "3 MiB patterns, level 19 streamed");
    }

    #[test]
    fn sparse_and_overwrite_frames_round_trip() {
        let mut i = 0;
        for len in [0usize, 1, 100, BLOCK_MAX - 1, BLOCK_MAX + 1, 1 << 20, crate::sparse_frame::SEGMENT + BLOCK_MAX + 5] {
            for per_mille in [0u64, 14, 30, 200, 1000] {
                let (frame, want) = sparse_frame(len, per_mille, len as u64 * 7 + per_mille);
                check(&frame, &want, i, &format!("sparse len {len} per mille {per_mille}"));
                assert_eq!(FrameReader::new(&frame, 27).unwrap().content_size(), Some(len as u64));
                i += 1;
            }
        }
        let mut s = 99u64;
        for n in [0usize, 1, 5, 1000, 300_000] {
            let mut positions: Vec<u32> = (0..n).map(|_| (rng(&mut s) % (1 << 30)) as u32).collect();
            positions.sort_unstable();
            let values: Vec<u8> = (0..n).map(|_| rng(&mut s) as u8).collect();
            let frame = crate::codec::write_overwrite_frame(Vec::new(), &positions, &values).unwrap();
            let want = libzstd(&frame).unwrap();
            check(&frame, &want, i, &format!("overwrite {n}"));
            i += 1;
        }
    }

    #[test]
    fn portable_sequence_loop_decodes_alike() {
        PORTABLE_ONLY.store(true, std::sync::atomic::Ordering::Relaxed);
        let text = make(Data::Text, 700_000, 12);
        let pat = make(Data::Pattern, 300_000, 13);
        let (sparse, want) = sparse_frame(5 * BLOCK_MAX + 3, 30, 14);
        check(&sparse, &want, 2, "sparse, portable loop");
        for level in [1, 19] {
            check(&bulk(&text, level, true, true), &text, 3, "text, portable loop");
            check(&streamed(&pat, level, false), &pat, 2, "patterns, portable loop");
        }
        PORTABLE_ONLY.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// A frame by hand: header with an 8-byte content size, then `blocks`.
    fn handmade(fcs: u64, checksum: bool, blocks: &[u8]) -> Vec<u8> {
        let mut f = MAGIC.to_le_bytes().to_vec();
        f.push(0xC0 | if checksum { 4 } else { 0 }); // 8-byte FCS, not single segment
        f.push(7 << 3); // window 2^17
        f.extend_from_slice(&fcs.to_le_bytes());
        f.extend_from_slice(blocks);
        f
    }

    fn block_header(last: bool, btype: u32, size: u32) -> [u8; 3] {
        let h = last as u32 | btype << 1 | size << 3;
        [h as u8, (h >> 8) as u8, (h >> 16) as u8]
    }

    #[test]
    fn header_and_size_errors() {
        let mut raw = block_header(true, 0, 5).to_vec();
        raw.extend_from_slice(b"hello");
        assert_eq!(ours(&handmade(5, false, &raw), 7).unwrap(), b"hello");
        for fcs in [4, 6, 0, 1 << 40] {
            let e = ours(&handmade(fcs, false, &raw), 7).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "fcs {fcs}");
        }
        // Reserved block type, RLE block beyond the block maximum.
        let bad = handmade(5, false, &block_header(true, 3, 5));
        assert!(matches!(FrameReader::new(&bad, 27).unwrap().decode_block(), Err(DecodeError::ReservedBlock)));
        let mut rle = block_header(true, 1, (BLOCK_MAX + 1) as u32).to_vec();
        rle.push(9);
        assert!(ours(&handmade(BLOCK_MAX as u64 + 1, false, &rle), 7).is_err());
        // Skippable frames, bad magic, dictionaries, reserved bit.
        let mut skip = 0x184D_2A53u32.to_le_bytes().to_vec();
        skip.extend_from_slice(&[0, 0, 0, 0]);
        assert!(matches!(FrameReader::new(&skip, 27), Err(DecodeError::Skippable)));
        assert!(matches!(FrameReader::new(b"hello world", 27), Err(DecodeError::BadMagic(_))));
        let mut dict = MAGIC.to_le_bytes().to_vec();
        dict.extend_from_slice(&[0x01, 7 << 3, 42]);
        let e = FrameReader::new(&dict, 27).err().unwrap();
        assert!(e.to_string().contains("dictionaries not supported"), "{e}");
        let mut dict0 = MAGIC.to_le_bytes().to_vec();
        dict0.extend_from_slice(&[0x01, 7 << 3, 0]);
        dict0.extend_from_slice(&block_header(true, 0, 0));
        assert_eq!(ours(&dict0, 1).unwrap(), b"");
        let mut reserved = handmade(5, false, &raw);
        reserved[4] |= 0x08;
        assert!(matches!(FrameReader::new(&reserved, 27), Err(DecodeError::ReservedBit)));
        // Trailing bytes after the frame are ignored.
        let mut trailing = handmade(5, false, &raw);
        trailing.extend_from_slice(b"garbage");
        assert_eq!(ours(&trailing, 4096).unwrap(), b"hello");
    }

    #[test]
    fn window_limit() {
        let data = make(Data::Text, 1 << 20, 1);
        let frame = bulk(&data, 3, false, true);
        assert!(matches!(FrameReader::new(&frame, 17), Err(DecodeError::WindowTooLarge { .. })));
        assert!(FrameReader::new(&frame, 20).is_ok());
        let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        e.window_log(22).unwrap();
        e.write_all(&data).unwrap();
        let frame = e.finish().unwrap();
        assert!(matches!(FrameReader::new(&frame, 21), Err(DecodeError::WindowTooLarge { .. })));
        check(&frame, &data, 2, "window 2^22");
        // A match reaching before the frame start: later blocks of a streamed frame, each
        // spliced in as the first block of a frame of its own, reference the missing history.
        // Random bytes (raw literals, so no Huffman table is reused) with far repeats.
        let mut data = make(Data::Random, 6 * BLOCK_MAX, 21);
        let mut s = 5u64;
        for at in (BLOCK_MAX..data.len() - 600).step_by(3000) {
            let from = (rng(&mut s) as usize) % (at - 600);
            data.copy_within(from..from + 600, at);
        }
        let frame = streamed(&data, 3, false);
        assert_eq!(frame[4], 0, "streamed frame: no content size, no checksum, a window byte");
        let mut at = 6;
        let mut bad_offsets = 0;
        while at + 3 <= frame.len() {
            let h = le_bytes(&frame[at..at + 3]) as usize;
            let len = if (h >> 1) & 3 == 1 { 1 } else { h >> 3 };
            if at > 6 && (h >> 1) & 3 == 2 {
                let mut alone = frame[..6].to_vec();
                alone.extend_from_slice(&[(h | 1) as u8, (h >> 8) as u8, (h >> 16) as u8]);
                alone.extend_from_slice(&frame[at + 3..at + 3 + len]);
                let mut r = FrameReader::new(&alone, 27).unwrap();
                match r.decode_block() {
                    Err(DecodeError::BadOffset(_)) => bad_offsets += 1,
                    Err(_) => {}
                    Ok(()) => panic!("block at {at} decodes without its history"),
                }
            }
            at += 3 + len;
        }
        assert!(bad_offsets > 0, "no block was refused for its offsets");
        let (frame, want) = sparse_frame(BLOCK_MAX * 3, 30, 3);
        assert_eq!(ours(&frame, 4096).unwrap(), want);
        assert!(FrameReader::new(&frame, 16).is_err());
    }

    #[test]
    fn checksum_mismatch_is_an_error() {
        let data = make(Data::Text, 300_000, 2);
        let mut frame = bulk(&data, 3, true, true);
        check(&frame, &data, 2, "checksummed");
        let n = frame.len();
        frame[n - 2] ^= 0x10;
        let e = ours(&frame, 4096).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn truncated_frames_are_errors() {
        let text = make(Data::Text, 400_000, 3);
        let (sparse, _) = sparse_frame(3 * BLOCK_MAX + 17, 30, 4);
        for frame in [bulk(&text, 3, true, true), bulk(&text, 19, false, false), streamed(&text, 1, false), sparse] {
            let step = (frame.len() / 300).max(1);
            for cut in (0..frame.len()).step_by(step).chain(frame.len().saturating_sub(8)..frame.len()) {
                assert!(ours(&frame[..cut], 4096).is_err(), "cut at {cut} of {}", frame.len());
            }
        }
    }

    #[test]
    fn corrupted_frames_never_panic_and_agree_with_libzstd() {
        let mut frames = Vec::new();
        for (k, kind) in [Data::Text, Data::Pattern, Data::Random, Data::Zeros].into_iter().enumerate() {
            let data = make(kind, 20_000 + k * 30_000, k as u64 + 11);
            frames.push(bulk(&data, 1, k % 2 == 0, true));
            frames.push(bulk(&data, 19, false, k % 2 == 1));
        }
        frames.push(sparse_frame(2 * BLOCK_MAX + 999, 30, 8).0);
        frames.push(sparse_frame(70_000, 200, 9).0);
        frames.push(crate::codec::write_overwrite_frame(Vec::new(), &[1, 5, 9, 1000, 70_000], &[1, 2, 3, 4, 5]).unwrap());
        let mut s = std::env::var("ZSTD_DECODE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x9E37_79B9_7F4A_7C15u64) | 1;
        let (mut both_ok, mut both_err) = (0, 0);
        // ZSTD_DECODE_FUZZ_ITERS / ZSTD_DECODE_FUZZ_SEED run a longer or different campaign.
        let iters: usize = std::env::var("ZSTD_DECODE_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
        for it in 0..iters {
            let mut f = frames[it % frames.len()].clone();
            let flips = 1 + rng(&mut s) % 4;
            for _ in 0..flips {
                let r = rng(&mut s);
                // Bias toward the header and the first block's tables, where damage is subtle.
                let at = if r.is_multiple_of(3) { (r >> 8) as usize % f.len().min(64) } else { (r >> 8) as usize % f.len() };
                match (r >> 40) % 3 {
                    0 => f[at] ^= 1 << ((r >> 50) % 8),
                    1 => f[at] = (r >> 52) as u8,
                    _ => f[at] = f[at].wrapping_add(1),
                }
            }
            let a = ours(&f, [1, 7, 4096, 256 << 10][it % 4]);
            let b = libzstd(&f);
            match (a, b) {
                (Ok(x), Ok(y)) => {
                    assert!(x == y, "iteration {it}: both decode but differ");
                    both_ok += 1;
                }
                (Err(_), Err(_)) => both_err += 1,
                _ => {}
            }
        }
        eprintln!("fuzz: {both_ok} both decode, {both_err} both refuse, of {iters}");
        assert!(both_ok > 10 && both_err > 1000, "{both_ok} {both_err}");
    }

    /// Speed against libzstd's streaming decoder (as codec.rs uses it), in 256 KiB reads:
    /// `cargo test --release --lib zstd_decode -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn speed_vs_libzstd() {
        /// Best MB/s of each over 7 alternating rounds (the machine is shared: alternate so
        /// both see the same load).
        fn race(mut a: impl FnMut() -> usize, mut b: impl FnMut() -> usize) -> (f64, f64) {
            let (mut ta, mut tb, mut n) = (f64::MAX, f64::MAX, 0);
            for _ in 0..7 {
                let t = std::time::Instant::now();
                n = a();
                ta = ta.min(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                b();
                tb = tb.min(t.elapsed().as_secs_f64());
            }
            (n as f64 / ta / 1e6, n as f64 / tb / 1e6)
        }
        fn drain(mut r: impl Read) -> usize {
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0;
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    return total;
                }
                total += n;
            }
        }
        fn xor_frame() -> Vec<u8> {
            let len = 64 << 20;
            let mut s = 7u64;
            let old: Vec<u8> = (0..len).map(|_| rng(&mut s) as u8).collect();
            let mut new = old.clone();
            for i in (0..len).step_by(2) {
                let r = rng(&mut s);
                if r.is_multiple_of(37) {
                    new[i] ^= ((r >> 32) as u8 & 0x0F) | 1;
                }
            }
            let mut xor = Vec::new();
            crate::sparse_frame::encode(&crate::sparse_frame::Pair(&old, &new), &mut xor).unwrap();
            xor
        }
        let text = || make(Data::Text, 64 << 20, 3);
        type MakeFrame<'a> = Box<dyn Fn() -> Vec<u8> + 'a>;
        let cases: [(&str, MakeFrame); 5] = [
            ("sparse xor 64 MiB", Box::new(xor_frame)),
            ("text level 1", Box::new(|| bulk(&text(), 1, false, true))),
            ("text level 3", Box::new(|| bulk(&text(), 3, false, true))),
            ("text level 3 streamed", Box::new(|| streamed(&text(), 3, false))),
            ("text level 19 (8 MiB)", Box::new(|| bulk(&make(Data::Text, 8 << 20, 3), 19, false, true))),
        ];
        let only = std::env::var("ZSTD_DECODE_CASE").unwrap_or_default();
        for (name, make_frame) in cases.iter().filter(|c| c.0.contains(only.as_str())) {
            let frame = &make_frame();
            let want = libzstd(frame).unwrap();
            assert!(ours(frame, 256 << 10).unwrap() == want, "{name} decodes wrong");
            let (o, l) = race(
                || drain(FrameReader::new(frame, 27).unwrap()),
                || {
                    let mut d = zstd::stream::read::Decoder::with_buffer(&frame[..]).unwrap().single_frame();
                    d.window_log_max(27).unwrap();
                    drain(d)
                },
            );
            println!("{name:24} ({:>9} B frame): ours {o:7.0} MB/s, libzstd {l:7.0} MB/s, ratio {:.2}", frame.len(), o / l);
        }
    }
}
