//! Built with the `cuda` feature: the diff on an NVIDIA GPU through `cudarc`.
//!
//! * `libcuda` and `libnvrtc` are loaded at run time. A missing library or driver makes
//!   cudarc panic rather than return an error, so [`probe`] checks for the libraries first and
//!   opens the device inside `catch_unwind`, once per process; failure becomes
//!   `GpuStatus::Unavailable(reason)` and `delta-diff` stays on the CPU.
//! * The kernels (`kernels.cu`) are embedded as source and compiled by NVRTC for the device's
//!   architecture when the device is first opened (candle's approach), then cached for the
//!   process.
//! * A tensor streams through a [`Pipeline`] in [`GPU_CHUNK`] pieces over [`SLOTS`] slots,
//!   each with its own stream, pinned staging buffers and device buffers: while the CPU copies
//!   chunk i+2 into pinned memory and compresses chunk i's result, chunk i+1's copies and
//!   kernels run on the GPU. Results are consumed in chunk order, so the frame is the same as
//!   the CPU's ([`super::frame`]).
//! * Several pipelines (up to [`MAX_PIPELINES`]) let several rayon threads use the GPU at
//!   once, each compressing its own tensor on its own core.

use super::{frame, GpuError, GpuInfo, GpuStatus, Rates, GPU_CHUNK};
use crate::codec::{self, PayloadError};
use crate::version::Encoding;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, LaunchConfig, PinnedHostSlice, PushKernelArg};
use cudarc::nvrtc;
use rayon::prelude::*;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::time::Instant;

/// CUDA C source of the kernels, compiled at run time by NVRTC.
pub const KERNELS: &str = include_str!("kernels.cu");
const _: () = assert!(GPU_CHUNK.is_multiple_of(codec::CHUNK) && GPU_CHUNK.is_multiple_of(16));
/// Chunks in flight per pipeline (one stream each).
pub const SLOTS: usize = 3;
/// Pipelines (threads using the GPU at once).
pub const MAX_PIPELINES: usize = 4;
const TILE_THREADS: u32 = 256;
const TILE_BYTES: usize = TILE_THREADS as usize * 16;
const SCAN_THREADS: u32 = 1024;

fn cuda_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> GpuError {
    move |e| GpuError::Cuda(format!("{what}: {e}"))
}

struct Kernels {
    xor_count: CudaFunction,
    tile_count: CudaFunction,
    tile_scan: CudaFunction,
    scatter: CudaFunction,
}

/// The opened device and its compiled kernels, one per process.
struct Shared {
    ctx: Arc<CudaContext>,
    info: GpuInfo,
    kernels: Kernels,
}

static SHARED: OnceLock<Result<Arc<Shared>, String>> = OnceLock::new();

fn shared() -> Result<Arc<Shared>, String> {
    SHARED
        .get_or_init(|| {
            driver_present()?;
            if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                return Err("NVRTC library (libnvrtc.so) not found; install the CUDA runtime's NVRTC".into());
            }
            match std::panic::catch_unwind(open) {
                Ok(r) => r,
                Err(p) => {
                    let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                    Err(format!("CUDA initialization failed: {msg}"))
                }
            }
        })
        .clone()
}

fn open() -> Result<Arc<Shared>, String> {
    let n = CudaContext::device_count().map_err(|e| format!("CUDA driver: {e}"))?;
    if n < 1 {
        return Err("the CUDA driver reports no device".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("cannot open CUDA device 0: {e}"))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown".into());
    let cc = ctx.compute_capability().map_err(|e| format!("CUDA device 0: {e}"))?;
    let clock_khz = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE).ok();
    let bus_bits = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH).ok();
    let memory_bandwidth = match (clock_khz, bus_bits) {
        // Double data rate: two transfers per clock over the whole bus.
        (Some(c), Some(b)) if c > 0 && b > 0 => Some(c as f64 * 1e3 * 2.0 * b as f64 / 8.0),
        _ => None,
    };
    let module = ctx.load_module(compile(cc)?).map_err(|e| format!("loading the diff kernels: {e}"))?;
    let f = |name: &str| module.load_function(name).map_err(|e| format!("kernel {name}: {e}"));
    let kernels = Kernels { xor_count: f("xor_count")?, tile_count: f("tile_count")?, tile_scan: f("tile_scan")?, scatter: f("scatter")? };
    Ok(Arc::new(Shared { ctx, info: GpuInfo { name, compute_capability: cc, memory_bandwidth }, kernels }))
}

/// NVRTC for the device's own architecture; an NVRTC older than the device does not know it,
/// and then generic PTX (which the driver JIT-compiles) is the fallback.
fn compile(cc: (i32, i32)) -> Result<nvrtc::Ptx, String> {
    let arch: &'static str = Box::leak(format!("compute_{}{}", cc.0, cc.1).into_boxed_str());
    let opts = |arch| nvrtc::CompileOptions { arch, name: Some("disagg_diff.cu".into()), ..Default::default() };
    match nvrtc::compile_ptx_with_opts(KERNELS, opts(Some(arch))) {
        Ok(ptx) => Ok(ptx),
        Err(first) => nvrtc::compile_ptx_with_opts(KERNELS, opts(None)).map_err(|e| format!("NVRTC could not compile the diff kernels: {e} (for {arch}: {first})")),
    }
}

/// Whether the CUDA driver library can be opened (a dlopen only; no device is touched).
pub fn driver_present() -> Result<(), String> {
    // SAFETY: only tries to dlopen the library names.
    match unsafe { cudarc::driver::sys::is_culib_present() } {
        true => Ok(()),
        false => Err("CUDA driver library (libcuda.so) not found".into()),
    }
}

/// Look for a usable GPU (device 0), opening it and compiling the kernels on first use.
pub fn probe() -> GpuStatus {
    match shared() {
        Ok(s) => GpuStatus::Available(s.info.clone()),
        Err(reason) => GpuStatus::Unavailable(reason),
    }
}

/// A tensor's bytes in device memory (for callers whose weights already live on the GPU, and
/// for the device-resident benchmark).
pub struct DeviceBuffer {
    buf: CudaSlice<u8>,
}

impl DeviceBuffer {
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.len() == 0
    }
}

/// Where a tensor pair comes from.
enum Src<'a> {
    Host(&'a [u8], &'a [u8]),
    Device(&'a CudaSlice<u8>, &'a CudaSlice<u8>),
}

/// The GPU differ: the process's device plus a pool of pipelines, created on first use.
pub struct GpuDiffer {
    shared: Arc<Shared>,
    pipes: Vec<Mutex<Option<Pipeline>>>,
    next: AtomicUsize,
    rates: OnceLock<Rates>,
}

impl GpuDiffer {
    pub fn new() -> Result<GpuDiffer, GpuError> {
        let shared = shared().map_err(GpuError::Unavailable)?;
        let n = rayon::current_num_threads().clamp(1, MAX_PIPELINES);
        Ok(GpuDiffer { shared, pipes: (0..n).map(|_| Mutex::new(None)).collect(), next: AtomicUsize::new(0), rates: OnceLock::new() })
    }

    pub fn info(&self) -> &GpuInfo {
        &self.shared.info
    }

    /// Transfer and CPU rates for the `auto` policy, measured on first call.
    pub fn rates(&self) -> Rates {
        *self.rates.get_or_init(|| {
            measure(&self.shared).unwrap_or(
                // A GPU that cannot even copy: make `auto` never choose it.
                Rates { h2d: 1.0, d2h: 1.0, stage: 1.0, cpu_xor: 1e12, cpu_overwrite: 1e12 },
            )
        })
    }

    /// Encode on the GPU, waiting for a pipeline if all are busy. Same frame as `codec::encode`.
    pub fn encode<W: Write>(&self, encoding: Encoding, old: &[u8], new: &[u8], out: W) -> Result<u64, GpuError> {
        assert_eq!(old.len(), new.len(), "encode of tensors of different sizes");
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pipes.len();
        let mut guard = match self.try_pipe() {
            Some(g) => g,
            None => self.pipes[i].lock().unwrap_or_else(|p| p.into_inner()),
        };
        self.run(&mut guard, encoding, Src::Host(old, new), new.len(), out)
    }

    /// Encode on the GPU if a pipeline is free now; `Ok(None)` (nothing written) if not.
    pub fn try_encode<W: Write>(&self, encoding: Encoding, old: &[u8], new: &[u8], out: W) -> Result<Option<u64>, GpuError> {
        assert_eq!(old.len(), new.len(), "encode of tensors of different sizes");
        match self.try_pipe() {
            Some(mut guard) => self.run(&mut guard, encoding, Src::Host(old, new), new.len(), out).map(Some),
            None => Ok(None),
        }
    }

    /// Copy a tensor into device memory.
    pub fn upload(&self, bytes: &[u8]) -> Result<DeviceBuffer, GpuError> {
        let st = self.shared.ctx.default_stream();
        let buf = if bytes.is_empty() { st.null() } else { st.clone_htod(bytes) }.map_err(cuda_err("upload"))?;
        st.synchronize().map_err(cuda_err("upload"))?;
        Ok(DeviceBuffer { buf })
    }

    /// Encode a pair already in device memory (no host → device copies).
    pub fn encode_device<W: Write>(&self, encoding: Encoding, old: &DeviceBuffer, new: &DeviceBuffer, out: W) -> Result<u64, GpuError> {
        assert_eq!(old.len(), new.len(), "encode of tensors of different sizes");
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pipes.len();
        let mut guard = self.pipes[i].lock().unwrap_or_else(|p| p.into_inner());
        self.run(&mut guard, encoding, Src::Device(&old.buf, &new.buf), new.len(), out)
    }

    /// Benchmark: kernels alone over a device-resident pair (no copies to the host, no zstd),
    /// input bytes per second. Compare with [`GpuInfo::memory_bandwidth`]: `xor` moves 3·L
    /// bytes (two reads, one write), `overwrite` reads 2·L twice.
    pub fn bench_kernels(&self, encoding: Encoding, old: &DeviceBuffer, new: &DeviceBuffer, reps: usize) -> Result<f64, GpuError> {
        assert_eq!(old.len(), new.len(), "pair of different sizes");
        let mut guard = self.pipes[0].lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(Pipeline::new(&self.shared)?);
        }
        let pipe = guard.as_mut().expect("just created");
        let src = Src::Device(&old.buf, &new.buf);
        let len = old.len();
        let mut run = || -> Result<(), GpuError> {
            for (ci, off) in (0..len).step_by(GPU_CHUNK).enumerate() {
                pipe.submit(ci % SLOTS, &self.shared.kernels, encoding, &src, off, GPU_CHUNK.min(len - off), false)?;
            }
            for s in &pipe.slots {
                s.stream.synchronize().map_err(cuda_err("bench"))?;
            }
            Ok(())
        };
        run()?;
        let start = Instant::now();
        for _ in 0..reps.max(1) {
            run()?;
        }
        Ok(len as f64 * reps.max(1) as f64 / start.elapsed().as_secs_f64().max(1e-9))
    }

    fn try_pipe(&self) -> Option<std::sync::MutexGuard<'_, Option<Pipeline>>> {
        self.pipes.iter().find_map(|m| match m.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        })
    }

    fn run<W: Write>(&self, slot: &mut Option<Pipeline>, encoding: Encoding, src: Src<'_>, len: usize, out: W) -> Result<u64, GpuError> {
        if encoding == Encoding::Overwrite && len > codec::MAX_OVERWRITE_TENSOR {
            return Err(PayloadError::TooLarge(len).into());
        }
        if slot.is_none() {
            *slot = Some(Pipeline::new(&self.shared)?);
        }
        let pipe = slot.as_mut().expect("just created");
        // Host inputs: an `overwrite` tensor with more changes than the CPU gathers in one pass
        // goes to the CPU's streaming encoder (same frame, bounded memory) instead of having
        // its positions and values gathered in host memory without limit. Device-resident
        // inputs (benchmarks) have no host copy to stream from and keep gathering.
        let cap = match src {
            Src::Host(..) => codec::ONE_PASS_MAX_CHANGES,
            Src::Device(..) => usize::MAX,
        };
        let mut out = out;
        let r = pipe.run(&self.shared.kernels, encoding, &src, len, &mut out, cap);
        if !matches!(r, Ok(Some(_))) {
            // Leave no copy or kernel running on the buffers (ours or the caller's).
            for s in &pipe.slots {
                let _ = s.stream.synchronize();
            }
        }
        match (r?, src) {
            (Some(changed), _) => Ok(changed),
            // Nothing was written: an overwrite frame is written only after its last chunk.
            (None, Src::Host(old, new)) => Ok(codec::encode(encoding, old, new, &mut out)?),
            (None, Src::Device(..)) => unreachable!("no cap on device-resident inputs"),
        }
    }
}

/// One chunk's buffers and stream.
struct Slot {
    stream: Arc<CudaStream>,
    /// Pinned staging for host inputs (write-combined: the CPU only writes them).
    h_old: PinnedHostSlice<u8>,
    h_new: PinnedHostSlice<u8>,
    /// Pinned landing buffers for results (cached: the CPU reads them).
    h_out: PinnedHostSlice<u8>,
    h_count: PinnedHostSlice<u64>,
    d_old: CudaSlice<u8>,
    d_new: CudaSlice<u8>,
    d_out: CudaSlice<u8>,
    d_pos: CudaSlice<u32>,
    d_val: CudaSlice<u8>,
    d_tiles: CudaSlice<u32>,
    d_count: CudaSlice<u64>,
}

struct Pipeline {
    slots: Vec<Slot>,
}

/// Where finished chunks go: the xor frame directly, or the overwrite lists (the frame header
/// needs the total count, known only after the last chunk).
enum Sink<W: Write> {
    Xor(frame::XorFrame<W>),
    Overwrite { out: W, positions: Vec<u32>, values: Vec<u8> },
}

fn launch_cfg(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks.max(1), 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Copy `src` into `dst` with every idle core helping (the pinned staging copy).
fn stage(dst: &mut [u8], src: &[u8]) {
    dst.par_chunks_mut(1 << 20).zip(src.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s));
}

impl Pipeline {
    fn new(shared: &Shared) -> Result<Pipeline, GpuError> {
        let ctx = &shared.ctx;
        let tiles = GPU_CHUNK.div_ceil(TILE_BYTES);
        let slots = (0..SLOTS)
            .map(|_| {
                let stream = ctx.new_stream().map_err(cuda_err("new stream"))?;
                // SAFETY: the buffers are written (by copies or kernels) before they are read.
                unsafe {
                    Ok(Slot {
                        h_old: ctx.alloc_pinned_with_flags(GPU_CHUNK, sys::CU_MEMHOSTALLOC_WRITECOMBINED).map_err(cuda_err("pinned alloc"))?,
                        h_new: ctx.alloc_pinned_with_flags(GPU_CHUNK, sys::CU_MEMHOSTALLOC_WRITECOMBINED).map_err(cuda_err("pinned alloc"))?,
                        h_out: ctx.alloc_pinned_with_flags(GPU_CHUNK, 0).map_err(cuda_err("pinned alloc"))?,
                        h_count: ctx.alloc_pinned_with_flags(1, 0).map_err(cuda_err("pinned alloc"))?,
                        d_old: stream.alloc(GPU_CHUNK).map_err(cuda_err("device alloc"))?,
                        d_new: stream.alloc(GPU_CHUNK).map_err(cuda_err("device alloc"))?,
                        d_out: stream.alloc(GPU_CHUNK).map_err(cuda_err("device alloc"))?,
                        d_pos: stream.alloc(GPU_CHUNK).map_err(cuda_err("device alloc"))?,
                        d_val: stream.alloc(GPU_CHUNK).map_err(cuda_err("device alloc"))?,
                        d_tiles: stream.alloc(tiles).map_err(cuda_err("device alloc"))?,
                        d_count: stream.alloc(1).map_err(cuda_err("device alloc"))?,
                        stream,
                    })
                }
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        Ok(Pipeline { slots })
    }

    /// Encode the tensor chunk by chunk; `Ok(None)`, with nothing written, once an `overwrite`
    /// tensor shows more than `max_changes` changed bytes.
    fn run<W: Write>(&mut self, k: &Kernels, encoding: Encoding, src: &Src<'_>, len: usize, out: W, max_changes: usize) -> Result<Option<u64>, GpuError> {
        let mut sink = match encoding {
            Encoding::Xor => Sink::Xor(frame::XorFrame::new(out, len as u64)?),
            Encoding::Overwrite => Sink::Overwrite { out, positions: Vec::new(), values: Vec::new() },
        };
        let mut inflight: VecDeque<(usize, usize)> = VecDeque::with_capacity(SLOTS);
        let mut changed = 0u64;
        // Only overwrite gathers (an xor frame streams, and is partly written by now): host
        // memory stays within the cap plus one chunk's changes.
        let max_changes = if encoding == Encoding::Overwrite { max_changes } else { usize::MAX };
        for (ci, off) in (0..len).step_by(GPU_CHUNK).enumerate() {
            let n = GPU_CHUNK.min(len - off);
            let s = ci % SLOTS;
            if inflight.len() == SLOTS {
                let (ps, pn) = inflight.pop_front().expect("full");
                changed += self.finish(ps, pn, &mut sink)?;
                if changed > max_changes as u64 {
                    return Ok(None);
                }
            }
            self.submit(s, k, encoding, src, off, n, true)?;
            inflight.push_back((s, n));
        }
        while let Some((ps, pn)) = inflight.pop_front() {
            changed += self.finish(ps, pn, &mut sink)?;
            if changed > max_changes as u64 {
                return Ok(None);
            }
        }
        match sink {
            Sink::Xor(f) => {
                f.finish()?;
            }
            Sink::Overwrite { out, positions, values } => {
                frame::write_overwrite(out, &positions, &values)?;
            }
        }
        Ok(Some(changed))
    }

    /// Queue chunk [off, off+n) on slot `s`: staging and copies in (host inputs), kernels,
    /// copies out (unless `copy_out` is false: benchmarks). Slot `s`'s previous chunk has been
    /// finished.
    #[allow(clippy::too_many_arguments)]
    fn submit(&mut self, s: usize, k: &Kernels, encoding: Encoding, src: &Src<'_>, off: usize, n: usize, copy_out: bool) -> Result<(), GpuError> {
        let slot = &mut self.slots[s];
        let st = slot.stream.clone();
        if let Src::Host(old, new) = src {
            let ho = slot.h_old.as_mut_slice().map_err(cuda_err("pinned buffer"))?;
            let hn = slot.h_new.as_mut_slice().map_err(cuda_err("pinned buffer"))?;
            rayon::join(|| stage(&mut ho[..n], &old[off..off + n]), || stage(&mut hn[..n], &new[off..off + n]));
            st.memcpy_htod(&ho[..n], &mut slot.d_old.slice_mut(..n)).map_err(cuda_err("copy to device"))?;
            st.memcpy_htod(&hn[..n], &mut slot.d_new.slice_mut(..n)).map_err(cuda_err("copy to device"))?;
        }
        let (a, b): (CudaView<'_, u8>, CudaView<'_, u8>) = match src {
            Src::Host(..) => (slot.d_old.slice(..n), slot.d_new.slice(..n)),
            Src::Device(o, w) => (o.slice(off..off + n), w.slice(off..off + n)),
        };
        let len = n as u64;
        let tiles = n.div_ceil(TILE_BYTES) as u32;
        match encoding {
            Encoding::Xor => {
                st.memset_zeros(&mut slot.d_count).map_err(cuda_err("memset"))?;
                let mut l = st.launch_builder(&k.xor_count);
                l.arg(&a).arg(&b).arg(&mut slot.d_out).arg(&len).arg(&mut slot.d_count);
                // SAFETY: argument types match the kernel; every buffer holds at least n bytes.
                unsafe { l.launch(launch_cfg(tiles, TILE_THREADS)) }.map_err(cuda_err("xor_count"))?;
                if copy_out {
                    let ho = slot.h_out.as_mut_slice().map_err(cuda_err("pinned buffer"))?;
                    st.memcpy_dtoh(&slot.d_out.slice(..n), &mut ho[..n]).map_err(cuda_err("copy to host"))?;
                }
            }
            Encoding::Overwrite => {
                // Chunks start below 4 GiB: run() refused larger overwrite tensors.
                let base = off as u32;
                let mut l = st.launch_builder(&k.tile_count);
                l.arg(&a).arg(&b).arg(&len).arg(&mut slot.d_tiles);
                // SAFETY: as above; d_tiles holds GPU_CHUNK / TILE_BYTES counts.
                unsafe { l.launch(launch_cfg(tiles, TILE_THREADS)) }.map_err(cuda_err("tile_count"))?;
                let mut l = st.launch_builder(&k.tile_scan);
                l.arg(&mut slot.d_tiles).arg(&tiles).arg(&mut slot.d_count);
                // SAFETY: as above.
                unsafe { l.launch(launch_cfg(1, SCAN_THREADS)) }.map_err(cuda_err("tile_scan"))?;
                let mut l = st.launch_builder(&k.scatter);
                l.arg(&a).arg(&b).arg(&len).arg(&slot.d_tiles).arg(&base).arg(&mut slot.d_pos).arg(&mut slot.d_val);
                // SAFETY: as above; d_pos and d_val hold one entry per byte of the chunk.
                unsafe { l.launch(launch_cfg(tiles, TILE_THREADS)) }.map_err(cuda_err("scatter"))?;
            }
        }
        if copy_out {
            let hc = slot.h_count.as_mut_slice().map_err(cuda_err("pinned buffer"))?;
            st.memcpy_dtoh(&slot.d_count, hc).map_err(cuda_err("copy to host"))?;
        }
        Ok(())
    }

    /// Wait for slot `s`'s chunk and hand its result to the sink; returns its changed bytes.
    fn finish<W: Write>(&mut self, s: usize, n: usize, sink: &mut Sink<W>) -> Result<u64, GpuError> {
        let slot = &mut self.slots[s];
        slot.stream.synchronize().map_err(cuda_err("chunk"))?;
        let count = slot.h_count.as_slice().map_err(cuda_err("pinned buffer"))?[0];
        match sink {
            Sink::Xor(f) => f.push(&slot.h_out.as_slice().map_err(cuda_err("pinned buffer"))?[..n])?,
            Sink::Overwrite { positions, values, .. } => {
                let c = count as usize;
                if c > n {
                    return Err(GpuError::Cuda(format!("kernel reported {c} changed bytes in a {n}-byte chunk")));
                }
                if c > 0 {
                    let (p0, v0) = (positions.len(), values.len());
                    positions.resize(p0 + c, 0);
                    values.resize(v0 + c, 0);
                    slot.stream.memcpy_dtoh(&slot.d_pos.slice(..c), &mut positions[p0..]).map_err(cuda_err("copy to host"))?;
                    slot.stream.memcpy_dtoh(&slot.d_val.slice(..c), &mut values[v0..]).map_err(cuda_err("copy to host"))?;
                    slot.stream.synchronize().map_err(cuda_err("copy to host"))?;
                }
            }
        }
        Ok(count)
    }
}

/// Measure the rates the `auto` policy compares, on 16 MiB buffers (best of 3 each).
fn measure(shared: &Shared) -> Result<Rates, GpuError> {
    const N: usize = 16 << 20;
    let best = |f: &mut dyn FnMut() -> Result<(), GpuError>| -> Result<f64, GpuError> {
        let mut t = f64::MAX;
        for _ in 0..3 {
            let s = Instant::now();
            f()?;
            t = t.min(s.elapsed().as_secs_f64());
        }
        Ok(N as f64 / t.max(1e-9))
    };
    let ctx = &shared.ctx;
    let st = ctx.new_stream().map_err(cuda_err("new stream"))?;
    // SAFETY: filled before use.
    let mut pinned: PinnedHostSlice<u8> = unsafe { ctx.alloc_pinned_with_flags(N, 0) }.map_err(cuda_err("pinned alloc"))?;
    let mut wc: PinnedHostSlice<u8> = unsafe { ctx.alloc_pinned_with_flags(N, sys::CU_MEMHOSTALLOC_WRITECOMBINED) }.map_err(cuda_err("pinned alloc"))?;
    let mut dev: CudaSlice<u8> = unsafe { st.alloc(N) }.map_err(cuda_err("device alloc"))?;
    let old: Vec<u8> = (0..N).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    let new: Vec<u8> = old.iter().enumerate().map(|(i, &b)| if i % 97 == 0 { !b } else { b }).collect();
    pinned.as_mut_slice().map_err(cuda_err("pinned buffer"))?.copy_from_slice(&old);
    let h2d = best(&mut || {
        let src = pinned.as_slice().map_err(cuda_err("pinned buffer"))?;
        st.memcpy_htod(src, &mut dev).map_err(cuda_err("copy to device"))?;
        st.synchronize().map_err(cuda_err("copy to device"))
    })?;
    let d2h = best(&mut || {
        let dst = pinned.as_mut_slice().map_err(cuda_err("pinned buffer"))?;
        st.memcpy_dtoh(&dev, dst).map_err(cuda_err("copy to host"))?;
        st.synchronize().map_err(cuda_err("copy to host"))
    })?;
    let stage_rate = best(&mut || {
        stage(wc.as_mut_slice().map_err(cuda_err("pinned buffer"))?, &old);
        Ok(())
    })?;
    let mut buf = vec![0u8; N];
    let cpu_xor = best(&mut || {
        // The inner loop of codec's xor encoder, without zstd.
        let mut changed = 0u64;
        for ((b, o), w) in buf.chunks_mut(codec::CHUNK).zip(old.chunks(codec::CHUNK)).zip(new.chunks(codec::CHUNK)) {
            for ((x, p), q) in b.iter_mut().zip(o).zip(w) {
                *x = p ^ q;
            }
            changed += b.chunks(255).map(|c| c.iter().fold(0u8, |acc, &x| acc + (x != 0) as u8) as u64).sum::<u64>();
        }
        std::hint::black_box(changed);
        Ok(())
    })?;
    // codec's overwrite encoder makes three compare passes (count, positions, values).
    let cpu_compare = best(&mut || {
        std::hint::black_box(codec::count_changed(&old, &new));
        Ok(())
    })?;
    Ok(Rates { h2d, d2h, stage: stage_rate, cpu_xor, cpu_overwrite: cpu_compare / 3.0 })
}
