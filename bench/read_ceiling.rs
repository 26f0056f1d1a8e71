//! The memory ceiling of any diff on this host, measured in the same run as the tools: read
//! OLD and NEW once, comparing them 32 bytes at a time on every core, and do nothing else.
//! Two ways to read: `mmap` (map both, compare in place; the unmap is timed too) and `pread`
//! (256 KiB windows of both into per-thread buffers, as `delta-diff` reads). No diff can beat
//! the faster of the two; bench/bench_weights.py prints each encoder's GB/s as a fraction of it.
//!
//!   read_ceiling OLD_DIR NEW_DIR [REPEAT [mmap|pread]]
//!     → {"seconds": best, "bytes": NEW bytes, "differing": n, "mode": ...}

use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;

fn count_differing(a: &[u8], b: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: the features were just detected; both slices have the same length.
        return unsafe { count_avx2(a, b) };
    }
    a.iter().zip(b).filter(|(x, y)| x != y).count() as u64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn count_avx2(a: &[u8], b: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let mut n = 0u64;
    let mut i = 0;
    while i + 32 <= a.len() {
        // SAFETY: i + 32 <= len of both slices; loadu needs no alignment.
        let (x, y) = unsafe { (_mm256_loadu_si256(a.as_ptr().add(i).cast()), _mm256_loadu_si256(b.as_ptr().add(i).cast())) };
        n += u64::from((!(_mm256_movemask_epi8(_mm256_cmpeq_epi8(x, y)) as u32)).count_ones());
        i += 32;
    }
    n + a[i..].iter().zip(&b[i..]).filter(|(x, y)| x != y).count() as u64
}

fn one_pass(old: &Path, new: &Path, pread: bool) -> std::io::Result<(u64, u64)> {
    if pread {
        return one_pass_pread(old, new);
    }
    let mut maps = Vec::new();
    for (fo, fnew, _) in open_pairs(old, new)? {
        // SAFETY: read-only maps of files nobody writes during the benchmark.
        maps.push(unsafe { (memmap2::Mmap::map(&fo)?, memmap2::Mmap::map(&fnew)?) });
    }
    let bytes = maps.iter().map(|(_, m)| m.len() as u64).sum();
    const PIECE: usize = 4 << 20;
    let differing = maps.par_iter().flat_map(|(o, n)| o.par_chunks(PIECE).zip(n.par_chunks(PIECE))).map(|(a, b)| count_differing(a, b)).sum();
    Ok((bytes, differing))
}

/// The data files of NEW (sorted), each opened in OLD and NEW, with their length.
fn open_pairs(old: &Path, new: &Path) -> std::io::Result<Vec<(std::fs::File, std::fs::File, u64)>> {
    let mut names: Vec<_> = std::fs::read_dir(new)?.flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().ends_with(".safetensors")).collect();
    names.sort();
    let mut files = Vec::new();
    for n in &names {
        let (fo, fnew) = (std::fs::File::open(old.join(n))?, std::fs::File::open(new.join(n))?);
        let len = fnew.metadata()?.len();
        if fo.metadata()?.len() != len {
            return Err(std::io::Error::other(format!("{n:?} differs in size between OLD and NEW")));
        }
        files.push((fo, fnew, len));
    }
    Ok(files)
}

fn one_pass_pread(old: &Path, new: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    const PIECE: u64 = 4 << 20;
    const WINDOW: usize = 256 << 10;
    let files = open_pairs(old, new)?;
    let bytes = files.iter().map(|f| f.2).sum();
    let jobs: Vec<(usize, u64)> = files.iter().enumerate().flat_map(|(i, f)| (0..f.2).step_by(PIECE as usize).map(move |at| (i, at))).collect();
    let differing = jobs
        .par_iter()
        .map_init(
            || (vec![0u8; WINDOW], vec![0u8; WINDOW]),
            |(a, b), &(i, at)| -> std::io::Result<u64> {
                let (fo, fnew, len) = &files[i];
                let end = (at + PIECE).min(*len);
                let mut n = 0;
                let mut p = at;
                while p < end {
                    let k = ((end - p) as usize).min(WINDOW);
                    fo.read_exact_at(&mut a[..k], p)?;
                    fnew.read_exact_at(&mut b[..k], p)?;
                    n += count_differing(&a[..k], &b[..k]);
                    p += k as u64;
                }
                Ok(n)
            },
        )
        .sum::<std::io::Result<u64>>()?;
    Ok((bytes, differing))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: read_ceiling OLD_DIR NEW_DIR [REPEAT]");
        std::process::exit(2);
    }
    let repeat: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let mode = args.get(4).map(String::as_str).unwrap_or("mmap");
    if mode != "mmap" && mode != "pread" {
        eprintln!("read_ceiling: mode must be mmap or pread, not {mode:?}");
        std::process::exit(2);
    }
    let mut best = f64::INFINITY;
    let mut result = (0, 0);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        match one_pass(Path::new(&args[1]), Path::new(&args[2]), mode == "pread") {
            Ok(r) => result = r,
            Err(e) => {
                eprintln!("read_ceiling: {e}");
                std::process::exit(1);
            }
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{{\"seconds\": {best}, \"bytes\": {}, \"differing\": {}, \"mode\": \"{mode}\"}}", result.0, result.1);
}
