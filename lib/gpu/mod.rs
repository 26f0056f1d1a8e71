//! GPU diff kernels (`delta-diff --device auto|cpu|cuda`); design in `docs/GPU.md`.
//!
//! One interface, two implementations (ripgrep's pattern for optional subsystems): with the
//! `cuda` cargo feature, `enabled.rs` drives CUDA through `cudarc`, loading `libcuda` and
//! `libnvrtc` at run time; without it, `disabled.rs` has the same signatures and answers
//! "GPU support not enabled in this build". Either way the build needs no CUDA toolkit.
//!
//! The GPU computes what the CPU computes in [`crate::codec`] — XOR with changed-byte count,
//! or the ascending changed positions with their new values — and hands the result, chunk by
//! chunk, to the same zstd frame settings ([`frame`]), so payloads are byte-identical to
//! [`codec::encode`]. zstd and checksums stay on the CPU.

use crate::codec::{self, PayloadError};
use crate::version::Encoding;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

pub mod frame;

#[cfg(feature = "cuda")]
#[path = "enabled.rs"]
mod imp;
#[cfg(not(feature = "cuda"))]
#[path = "disabled.rs"]
mod imp;

pub use imp::{driver_present, probe, DeviceBuffer, GpuDiffer};

/// `--device`: which processor computes the diffs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The GPU where one is found and it is faster for the tensor at hand, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The GPU for every tensor of at least [`CUDA_MIN_BYTES`]; an error if there is none.
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(format!("unknown device {other:?} (expected auto, cpu or cuda)")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`probe`] found.
#[derive(Debug, Clone)]
pub enum GpuStatus {
    Available(GpuInfo),
    /// Why there is no usable GPU ("GPU support not enabled in this build", "libcuda not found", ...).
    Unavailable(String),
}

impl fmt::Display for GpuStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuStatus::Available(i) => write!(f, "{i}"),
            GpuStatus::Unavailable(reason) => write!(f, "no GPU: {reason}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    /// Theoretical device memory bandwidth (memory clock × 2 × bus width), bytes/s, where the
    /// driver reports the attributes.
    pub memory_bandwidth: Option<f64>,
}

impl fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CUDA device 0: {} (sm_{}{})", self.name, self.compute_capability.0, self.compute_capability.1)?;
        if let Some(bw) = self.memory_bandwidth {
            write!(f, ", {:.0} GB/s theoretical memory bandwidth", bw / 1e9)?;
        }
        Ok(())
    }
}

/// Why the GPU path failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU: {0}")]
    Unavailable(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

impl From<io::Error> for GpuError {
    fn from(e: io::Error) -> Self {
        GpuError::Payload(PayloadError::Io(e))
    }
}

/// Transfer and compute rates the `auto` policy compares, bytes/s; measured once per process
/// when the GPU is first opened (`GpuDiffer::rates`).
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// Host → device over PCIe/NVLink from pinned memory.
    pub h2d: f64,
    /// Device → host into pinned memory.
    pub d2h: f64,
    /// Copying mmapped input into the pinned staging buffers (CPU memcpy, rayon-parallel).
    pub stage: f64,
    /// One CPU thread running the `xor` diff (compare + XOR + count), input bytes/s.
    pub cpu_xor: f64,
    /// One CPU thread running the `overwrite` diff (count pass + position/value passes).
    pub cpu_overwrite: f64,
}

/// Bytes of a tensor per GPU pipeline step (a multiple of `codec::CHUNK` and of 16).
pub const GPU_CHUNK: usize = 8 << 20;

/// Fixed cost of one tensor on the GPU (launches, pipeline fill and drain, syncs), seconds.
pub const GPU_TENSOR_OVERHEAD_S: f64 = 300e-6;
/// `auto` never sends a tensor under this size to the GPU.
pub const AUTO_MIN_BYTES: usize = 16 << 20;
/// `cuda` sends every tensor of at least this size to the GPU (tiny norms stay on the CPU).
pub const CUDA_MIN_BYTES: usize = 64 << 10;

/// The `auto` heuristic: host inputs must cross PCIe (old and new: 2·L bytes, and for `xor`
/// the L-byte XOR back), after a CPU copy into pinned buffers; those overlap in the pipeline,
/// so the GPU's time is the slowest of them plus a fixed overhead. The CPU's time is one
/// thread's diff of the same tensor. zstd runs on the CPU in both paths and cancels out.
/// The GPU wins only when `overhead + L·max(2/stage, 2/h2d, [1/d2h]) < L/cpu`.
pub fn gpu_faster(r: &Rates, encoding: Encoding, len: usize) -> bool {
    if len < AUTO_MIN_BYTES {
        return false;
    }
    let l = len as f64;
    let mut per_byte = (2.0 / r.stage).max(2.0 / r.h2d);
    if encoding == Encoding::Xor {
        per_byte = per_byte.max(1.0 / r.d2h);
    }
    let cpu = match encoding {
        Encoding::Xor => l / r.cpu_xor,
        Encoding::Overwrite => l / r.cpu_overwrite,
    };
    GPU_TENSOR_OVERHEAD_S + l * per_byte < cpu
}

/// What opening the GPU costs a publish before its first tensor: the CUDA context, NVRTC
/// compiling the kernels, measuring [`Rates`] and allocating the first pipeline's buffers.
/// Measured 0.42 s on an H200 host (driver 580, CUDA 13): `--device auto` took 0.50 s on a
/// 532 MiB pair that `--device cpu` diffed in 0.08 s, and then chose the CPU for every tensor.
pub const GPU_OPEN_COST_S: f64 = 0.5;

/// One CPU thread's rates, bytes/s, measured without touching CUDA: the `auto` pre-check.
#[derive(Debug, Clone, Copy)]
pub struct CpuCosts {
    /// Copying a buffer into another: what staging host inputs into pinned memory costs the
    /// CPU on the GPU path (bytes copied per second).
    pub copy: f64,
    /// Comparing two buffers ([`codec::count_changed`]): the CPU path's pass over OLD and NEW
    /// (tensor bytes per second).
    pub compare: f64,
}

/// Measure [`CpuCosts`] on 4 MiB buffers (best of 2; a few milliseconds).
pub fn measure_cpu_costs() -> CpuCosts {
    const N: usize = 4 << 20;
    // Filled a word at a time: making the inputs must cost less than measuring them.
    let mut old = vec![0u8; N];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for w in old.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let mut new = old.clone();
    for b in new.iter_mut().step_by(97) {
        *b = !*b;
    }
    let mut dst = vec![1u8; N];
    let best = |f: &mut dyn FnMut()| {
        let mut t = f64::MAX;
        for _ in 0..2 {
            let s = std::time::Instant::now();
            f();
            t = t.min(s.elapsed().as_secs_f64());
        }
        N as f64 / t.max(1e-9)
    };
    let copy = best(&mut || {
        dst.copy_from_slice(std::hint::black_box(&old));
        std::hint::black_box(&dst);
    });
    let compare = best(&mut || {
        std::hint::black_box(codec::count_changed(std::hint::black_box(&old), &new));
    });
    CpuCosts { copy, compare }
}

/// `auto`'s first question, asked before CUDA is touched: can the GPU repay opening it?
///
/// On host inputs (mmapped files, all `delta-diff` has) the GPU path still makes the CPU copy
/// OLD and NEW into pinned memory, 2 bytes copied per tensor byte, where the CPU path makes one
/// compare pass reading both; zstd and the frame are the same CPU work on either path. So the
/// GPU saves CPU time only if `2/copy < 1/compare`, and the saving over the tensors it could
/// take (`candidate_bytes`: tensors of at least [`AUTO_MIN_BYTES`]), shared by the `threads`
/// that would otherwise do it, must exceed [`GPU_OPEN_COST_S`]. `Err` says why not, in words
/// for `--json`'s `device_note`.
pub fn gpu_can_pay(c: &CpuCosts, candidate_bytes: u64, threads: usize) -> Result<(), String> {
    if candidate_bytes == 0 {
        return Err(format!("auto: no tensor of {} MiB or more, the GPU was not opened", AUTO_MIN_BYTES >> 20));
    }
    let (gpu_ns, cpu_ns) = (2.0 / c.copy * 1e9, 1.0 / c.compare * 1e9);
    if gpu_ns >= cpu_ns {
        return Err(format!(
            "auto: the GPU was not opened: staging host inputs for it costs the CPU {gpu_ns:.3} ns per tensor byte (copying OLD and NEW), the CPU diff's compare {cpu_ns:.3} ns"
        ));
    }
    let saved = candidate_bytes as f64 * (cpu_ns - gpu_ns) / 1e9 / threads.max(1) as f64;
    if saved <= GPU_OPEN_COST_S {
        return Err(format!("auto: the GPU was not opened: it could save about {saved:.3} s on this pair, opening it costs about {GPU_OPEN_COST_S} s"));
    }
    Ok(())
}

/// What `delta-diff` holds for one publish: the chosen device and, when the GPU is in play,
/// the differ. [`Engine::encode`] is a drop-in for [`codec::encode`].
pub struct Engine {
    device: Device,
    gpu: Option<GpuDiffer>,
    gpu_tensors: AtomicU64,
    /// Why `auto` left the GPU out, for `--json`'s `device_note`.
    note: Option<String>,
}

impl Engine {
    /// `cpu` never touches CUDA. `auto` opens the GPU only if [`gpu_can_pay`] for the pair at
    /// hand and a driver library is present (`candidate_bytes`: NEW's bytes in tensors of at
    /// least [`AUTO_MIN_BYTES`]; `threads`: the encoding pool), silently the CPU otherwise,
    /// noting why. `cuda` without a usable GPU is a usage error naming the reason.
    pub fn select(device: Device, candidate_bytes: u64, threads: usize) -> Result<Engine, crate::error::Error> {
        let mut note = None;
        let gpu = match device {
            Device::Cpu => None,
            Device::Auto => {
                // Cheapest question first: the CPU measurement takes milliseconds, the driver
                // library more, the device half a second; a build without CUDA measures nothing
                // (its `driver_present` answers at once).
                let pays = if cfg!(feature = "cuda") { gpu_can_pay(&measure_cpu_costs(), candidate_bytes, threads) } else { Ok(()) };
                let tried = pays.and_then(|()| driver_present().map_err(|why| format!("auto: {why}"))).and_then(|()| GpuDiffer::new().map_err(|e| format!("auto: {e}")));
                tried.map_err(|why| note = Some(why)).ok()
            }
            Device::Cuda => Some(GpuDiffer::new().map_err(|e| crate::error::Error::Usage(format!("--device cuda: {e}; use --device cpu or auto")))?),
        };
        Ok(Engine { device, gpu, gpu_tensors: AtomicU64::new(0), note })
    }

    /// A CPU-only engine (full versions, tests).
    pub fn cpu() -> Engine {
        Engine { device: Device::Cpu, gpu: None, gpu_tensors: AtomicU64::new(0), note: None }
    }

    /// Why `auto` did not use the GPU (`None` for `cpu`, `cuda`, or a GPU in use).
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// `"cuda"` once any tensor went through the GPU, else `"cpu"`.
    pub fn device_used(&self) -> &'static str {
        if self.gpu_tensors.load(Ordering::Relaxed) > 0 {
            "cuda"
        } else {
            "cpu"
        }
    }

    /// Encode one tensor's change exactly as [`codec::encode`] does, on the GPU when the policy
    /// says so (from the maps), else on this thread, reading as `read` says (resolved: `mmap`
    /// or `pread`; crate::inputmap).
    /// Under `auto` a tensor only goes to the GPU if a pipeline is free right now, so the GPU
    /// takes a share of the tensors alongside the CPU threads instead of queueing them. The new
    /// bytes also go to `hasher` (the tensor's checksum). Returns the changed byte count; 0 means
    /// the tensors are equal, and what `out` and `hasher` got is to be dropped.
    pub fn encode<W: Write>(
        &self,
        encoding: Encoding,
        read: crate::inputmap::InputRead,
        old: codec::TensorFile,
        new: codec::TensorFile,
        mut out: W,
        hasher: &mut crate::checksum::Hasher,
    ) -> Result<u64, PayloadError> {
        if let Some(gpu) = &self.gpu {
            let (ob, nb) = (old.mapped, new.mapped);
            let wanted = match self.device {
                Device::Cuda => nb.len() >= CUDA_MIN_BYTES,
                Device::Auto => gpu_faster(&gpu.rates(), encoding, nb.len()),
                Device::Cpu => false,
            };
            if wanted {
                // An unchanged tensor costs one compare here rather than a trip to the device.
                if ob == nb {
                    return Ok(0);
                }
                let attempt = match self.device {
                    Device::Cuda => Some(gpu.encode(encoding, ob, nb, &mut out)),
                    _ => gpu.try_encode(encoding, ob, nb, &mut out).transpose(),
                };
                if let Some(r) = attempt {
                    self.gpu_tensors.fetch_add(1, Ordering::Relaxed);
                    hasher.update(nb);
                    return r.map_err(|e| match e {
                        GpuError::Payload(p) => p,
                        other => PayloadError::Io(io::Error::other(format!("GPU diff failed ({other}); rerun with --device cpu"))),
                    });
                }
            }
        }
        match read {
            crate::inputmap::InputRead::Mmap => codec::encode_from(encoding, &mut codec::MappedPair::new(old, new), out, Some(hasher)),
            _ => codec::encode_from(encoding, &mut codec::PreadPair::new(old, new), out, Some(hasher)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parses() {
        assert_eq!("auto".parse::<Device>().unwrap(), Device::Auto);
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda);
        assert!("gpu".parse::<Device>().is_err());
        assert_eq!(Device::default(), Device::Auto);
    }

    fn rates(h2d: f64, stage: f64, cpu: f64) -> Rates {
        Rates { h2d, d2h: h2d, stage, cpu_xor: cpu, cpu_overwrite: cpu / 3.0 }
    }

    #[test]
    fn auto_heuristic() {
        let gb = 1e9;
        // PCIe 5 (50 GB/s), fast staging, a 10 GB/s CPU thread: 2 bytes cross per input byte,
        // so the GPU wins on big tensors, never on small ones.
        let r = rates(50.0 * gb, 40.0 * gb, 10.0 * gb);
        assert!(gpu_faster(&r, Encoding::Xor, 256 << 20));
        assert!(gpu_faster(&r, Encoding::Overwrite, 256 << 20));
        assert!(!gpu_faster(&r, Encoding::Xor, 1 << 20));
        // PCIe 3 (12 GB/s) against the same CPU: transfers alone take longer than the CPU diff
        // for xor; overwrite (three CPU passes) still wins on the GPU.
        let r = rates(12.0 * gb, 40.0 * gb, 10.0 * gb);
        assert!(!gpu_faster(&r, Encoding::Xor, 1 << 30));
        assert!(gpu_faster(&r, Encoding::Overwrite, 1 << 30));
        // Staging copies as slow as the CPU diff: the GPU never pays off.
        let r = rates(50.0 * gb, 10.0 * gb, 10.0 * gb);
        assert!(!gpu_faster(&r, Encoding::Xor, 1 << 30));
    }

    #[test]
    fn auto_opens_the_gpu_only_if_it_can_pay() {
        let gb = 1e9;
        // The H200 host's figures (one thread: copy ~7 GB/s, compare ~12 GB/s): copying OLD
        // and NEW costs the CPU more than comparing them, whatever the model size.
        let h200 = CpuCosts { copy: 7.0 * gb, compare: 12.0 * gb };
        let why = gpu_can_pay(&h200, 1 << 40, 16).unwrap_err();
        assert!(why.contains("staging host inputs") && why.contains("ns"), "{why}");
        // A CPU that compares slowly but copies fast: worth it for a big model, not a small one.
        let slow = CpuCosts { copy: 20.0 * gb, compare: 2.0 * gb };
        assert!(gpu_can_pay(&slow, 140 << 30, 16).is_ok());
        let why = gpu_can_pay(&slow, 512 << 20, 16).unwrap_err();
        assert!(why.contains("could save") && why.contains("opening it costs"), "{why}");
        // No tensor big enough: nothing to take.
        assert!(gpu_can_pay(&slow, 0, 16).unwrap_err().contains("no tensor of 16 MiB"));
        // The measurement itself returns finite, positive rates.
        let c = measure_cpu_costs();
        assert!(c.copy.is_finite() && c.copy > 0.0 && c.compare.is_finite() && c.compare > 0.0, "{c:?}");
    }

    #[test]
    fn cpu_engine_matches_codec() {
        let old: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut new = old.clone();
        new[5] ^= 1;
        new[99_999] ^= 0x80;
        for enc in [Encoding::Xor, Encoding::Overwrite] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let e = Engine::select(Device::Cpu, 0, 1).unwrap();
            let mut h = crate::checksum::ChecksumAlg::Xxh3_128.hasher();
            let dir = std::env::temp_dir().join(format!("disagg-engine-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let (po, pn) = (dir.join("old"), dir.join("new"));
            std::fs::write(&po, &old).unwrap();
            std::fs::write(&pn, &new).unwrap();
            let (fo, fnew) = (std::fs::File::open(&po).unwrap(), std::fs::File::open(&pn).unwrap());
            let (to, tn) =
                (codec::TensorFile { mapped: &old, map: None, file: &fo, path: &po, offset: 0 }, codec::TensorFile { mapped: &new, map: None, file: &fnew, path: &pn, offset: 0 });
            assert_eq!(e.encode(enc, crate::inputmap::InputRead::Pread, to, tn, &mut a, &mut h).unwrap(), 2);
            std::fs::remove_dir_all(&dir).unwrap();
            codec::encode(enc, &old, &new, &mut b).unwrap();
            assert_eq!(a, b);
            assert_eq!(h.finish_hex(), crate::checksum::ChecksumAlg::Xxh3_128.hex(&new));
            assert_eq!(e.device_used(), "cpu");
        }
    }
}
