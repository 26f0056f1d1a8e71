//! Per-tensor checksums of the new bytes, as slime writes them in a delta file's `__metadata__`.
//!
//! Text forms are lowercase hex exactly as Python prints them: `xxhash.xxh3_128(b).hexdigest()`
//! (32 digits, the canonical big-endian form of the 128-bit value), `blake3.blake3(b).hexdigest()`
//! (64 digits), and `f"{zlib.adler32(b):08x}"` (8 digits).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumAlg {
    #[default]
    Xxh3_128,
    Blake3,
    Adler32,
}

impl ChecksumAlg {
    pub const ALL: [ChecksumAlg; 3] = [ChecksumAlg::Xxh3_128, ChecksumAlg::Blake3, ChecksumAlg::Adler32];

    /// The name used in the index's `checksum_format` and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ChecksumAlg::Xxh3_128 => "xxh3-128",
            ChecksumAlg::Blake3 => "blake3",
            ChecksumAlg::Adler32 => "adler32",
        }
    }

    /// Number of hex digits of the text form.
    pub fn hex_len(self) -> usize {
        match self {
            ChecksumAlg::Xxh3_128 => 32,
            ChecksumAlg::Blake3 => 64,
            ChecksumAlg::Adler32 => 8,
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            ChecksumAlg::Xxh3_128 => Hasher::Xxh3(Box::new(twox_hash::XxHash3_128::new())),
            ChecksumAlg::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
            ChecksumAlg::Adler32 => Hasher::Adler32(adler2::Adler32::new()),
        }
    }

    /// Checksum of one buffer, in its text form.
    pub fn hex(self, bytes: &[u8]) -> String {
        match self {
            ChecksumAlg::Xxh3_128 => format!("{:032x}", twox_hash::XxHash3_128::oneshot(bytes)),
            ChecksumAlg::Blake3 if bytes.len() >= 1 << 20 => {
                // blake3 parallelises over rayon for large inputs.
                let mut h = blake3::Hasher::new();
                h.update_rayon(bytes);
                h.finalize().to_hex().to_string()
            }
            _ => {
                let mut h = self.hasher();
                h.update(bytes);
                h.finish_hex()
            }
        }
    }

    /// True if `s` is a well-formed text checksum for this algorithm.
    pub fn is_valid_hex(self, s: &str) -> bool {
        s.len() == self.hex_len() && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

impl fmt::Display for ChecksumAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ChecksumAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ChecksumAlg::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| format!("unknown checksum format {s:?} (expected xxh3-128, blake3 or adler32)"))
    }
}

/// A streaming checksum, for tensors checked chunk by chunk.
pub enum Hasher {
    Xxh3(Box<twox_hash::XxHash3_128>),
    Blake3(Box<blake3::Hasher>),
    Adler32(adler2::Adler32),
}

impl Hasher {
    /// A new, empty hasher of the same algorithm.
    pub fn fresh(&self) -> Hasher {
        match self {
            Hasher::Xxh3(_) => ChecksumAlg::Xxh3_128.hasher(),
            Hasher::Blake3(_) => ChecksumAlg::Blake3.hasher(),
            Hasher::Adler32(_) => ChecksumAlg::Adler32.hasher(),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Xxh3(h) => h.write(bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
            Hasher::Adler32(h) => h.write_slice(bytes),
        }
    }
    pub fn finish_hex(self) -> String {
        match self {
            Hasher::Xxh3(h) => format!("{:032x}", h.finish_128()),
            Hasher::Blake3(h) => h.finalize().to_hex().to_string(),
            Hasher::Adler32(h) => format!("{:08x}", h.checksum()),
        }
    }
}

/// xxh3-128 over a sequence of parts, each fed as its length (u64 little-endian) then its
/// bytes, so no two sequences of parts hash the same stream (docs/FORMATS.md §6, "Fingerprint",
/// and §4, "Content sample"). Text form: 32 lowercase hex digits.
pub struct PartHasher(twox_hash::XxHash3_128);

impl Default for PartHasher {
    fn default() -> Self {
        PartHasher(twox_hash::XxHash3_128::new())
    }
}

impl PartHasher {
    pub fn part(&mut self, bytes: &[u8]) {
        self.0.write(&(bytes.len() as u64).to_le_bytes());
        self.0.write(bytes);
    }
    /// A part made of several pieces written back to back (its length is their sum).
    pub fn part_of(&mut self, pieces: &[&[u8]]) {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        self.0.write(&(len as u64).to_le_bytes());
        for p in pieces {
            self.0.write(p);
        }
    }
    pub fn finish_hex(&self) -> String {
        format!("{:032x}", self.0.finish_128())
    }
}

/// True for 32 lowercase hex digits (a [`PartHasher`] value).
pub fn is_xxh3_128_hex(s: &str) -> bool {
    ChecksumAlg::Xxh3_128.is_valid_hex(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // Values printed by Python: xxhash.xxh3_128(b"abc").hexdigest(), zlib.adler32(b"abc"),
        // blake3.blake3(b"abc").hexdigest().
        assert_eq!(ChecksumAlg::Adler32.hex(b"abc"), "024d0127");
        assert_eq!(ChecksumAlg::Blake3.hex(b"abc"), "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85");
        assert_eq!(ChecksumAlg::Xxh3_128.hex(b""), "99aa06d3014798d86001c324468d497f");
    }

    #[test]
    fn streaming_equals_oneshot() {
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for alg in ChecksumAlg::ALL {
            let mut h = alg.hasher();
            for c in data.chunks(65_537) {
                h.update(c);
            }
            assert_eq!(h.finish_hex(), alg.hex(&data), "{alg}");
            assert!(alg.is_valid_hex(&alg.hex(&data)));
        }
    }
}
