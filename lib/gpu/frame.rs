//! The host half of the GPU path: turning what the kernels produce (XOR chunks; changed
//! positions and values) into the zstd frame [`codec::encode`] writes, byte for byte.
//!
//! `xor` frames come from the same sparse-frame encoder as the CPU's (`sparse_frame`, fed XOR
//! bytes instead of two tensors), `overwrite` frames from the same writer, so the output does
//! not depend on how the GPU chunked the tensor. The unit tests below check this
//! against `codec::encode` with pieces computed on the CPU, so drift is caught without a GPU.

use crate::codec;

/// An `xor` frame fed with the XOR of consecutive pieces of the tensor, in order: the CPU's
/// own streaming writer.
pub use crate::sparse_frame::XorStream as XorFrame;

pub use codec::write_overwrite_frame as write_overwrite;

/// CPU reference of what the GPU kernels compute, used by the tests here and in
/// `tests/gpu.rs`: (XOR bytes, changed count) and (positions, values).
pub mod reference {
    pub fn xor(old: &[u8], new: &[u8]) -> (Vec<u8>, u64) {
        let x: Vec<u8> = old.iter().zip(new).map(|(a, b)| a ^ b).collect();
        let n = x.iter().filter(|&&b| b != 0).count() as u64;
        (x, n)
    }

    pub fn compact(old: &[u8], new: &[u8]) -> (Vec<u32>, Vec<u8>) {
        let mut pos = Vec::new();
        let mut val = Vec::new();
        for (i, (a, b)) in old.iter().zip(new).enumerate() {
            if a != b {
                pos.push(i as u32);
                val.push(*b);
            }
        }
        (pos, val)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::Encoding;

    fn pair(len: usize, every: usize) -> (Vec<u8>, Vec<u8>) {
        let old: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let new: Vec<u8> = old.iter().enumerate().map(|(i, &b)| if every > 0 && i % every == 0 { b.wrapping_add(1 + (i % 7) as u8) } else { b }).collect();
        (old, new)
    }

    #[test]
    fn xor_frame_matches_codec_for_any_piece_size() {
        for len in [0usize, 1, 4095, codec::CHUNK, 3 * codec::CHUNK + 17] {
            for every in [0usize, 1, 3, 1000] {
                let (old, new) = pair(len, every);
                let mut want = Vec::new();
                let changed = codec::encode(Encoding::Xor, &old, &new, &mut want).unwrap();
                let (x, n) = reference::xor(&old, &new);
                assert_eq!(n, changed);
                for piece in [1usize << 12, codec::CHUNK, 8 << 20, 777_777] {
                    let mut f = XorFrame::new(Vec::new(), len as u64).unwrap();
                    for p in x.chunks(piece) {
                        f.push(p).unwrap();
                    }
                    let (got, nonzero) = f.finish().unwrap();
                    assert!(got == want, "len {len} every {every} piece {piece}");
                    assert_eq!(nonzero, changed);
                }
            }
        }
    }

    #[test]
    fn overwrite_frame_matches_codec() {
        for len in [0usize, 1, 4095, codec::CHUNK / 2 + 3, 2 * codec::CHUNK + 5] {
            for every in [0usize, 1, 2, 97] {
                let (old, new) = pair(len, every);
                let mut want = Vec::new();
                codec::encode(Encoding::Overwrite, &old, &new, &mut want).unwrap();
                let (p, v) = reference::compact(&old, &new);
                assert!(write_overwrite(Vec::new(), &p, &v).unwrap() == want, "len {len} every {every}");
            }
        }
    }
}
