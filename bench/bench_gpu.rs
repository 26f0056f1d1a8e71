//! GPU diff benchmark (docs/GPU.md): GB/s of the GPU path on host inputs and on
//! device-resident buffers, against the CPU path on the same machine and the device's
//! theoretical memory bandwidth. Prints `no GPU: skipped (<reason>)` and exits 0 where there is
//! no usable GPU or the build lacks the `cuda` feature.
//!
//!   cargo run --release --features cuda --example bench_gpu -- [MIB] [DENSITY%...]
//!   bash bench/bench_gpu.sh 512 0.1 2 50
//!
//! GB/s is tensor bytes (L) per second. "end-to-end" includes zstd (the published frame);
//! "kernels" is the device-resident diff alone (xor moves 3·L bytes through device memory).

use disagg::codec;
use disagg::gpu::{self, GpuDiffer, GpuError, GpuStatus};
use disagg::version::Encoding;
use rayon::prelude::*;
use std::time::Instant;

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e9
}

fn best<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut t = f64::MAX;
    let mut last = None;
    for _ in 0..reps {
        let s = Instant::now();
        let v = f();
        t = t.min(s.elapsed().as_secs_f64());
        last = Some(v);
    }
    (t, last.expect("reps >= 1"))
}

fn pair(len: usize, density: f64) -> (Vec<u8>, Vec<u8>) {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let old: Vec<u8> = (0..len).map(|_| (next() >> 56) as u8).collect();
    let cut = (density * u32::MAX as f64) as u64;
    let new: Vec<u8> = old.iter().map(|&b| if (next() >> 32) < cut { b ^ (1 + (next() >> 60) as u8) } else { b }).collect();
    (old, new)
}

fn main() -> Result<(), GpuError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(256);
    let densities: Vec<f64> = if args.len() > 1 { args[1..].iter().filter_map(|a| a.parse::<f64>().ok()).map(|p| p / 100.0).collect() } else { vec![0.001, 0.02, 0.5] };
    // `--device auto`'s pre-check (gpu::gpu_can_pay), measured on the CPU alone.
    let s = Instant::now();
    let c = gpu::measure_cpu_costs();
    let t_measure = s.elapsed().as_secs_f64();
    let s = Instant::now();
    let driver = gpu::driver_present();
    let t_driver = s.elapsed().as_secs_f64();
    let threads = rayon::current_num_threads();
    println!(
        "auto pre-check (one CPU thread, measured in {:.1} ms; driver library {} in {:.1} ms): copy {:.1} GB/s, compare {:.1} GB/s; for a 16 GiB model on {threads} threads: {}",
        t_measure * 1e3,
        if driver.is_ok() { "opened" } else { "absent" },
        t_driver * 1e3,
        c.copy / 1e9,
        c.compare / 1e9,
        match gpu::gpu_can_pay(&c, 16 << 30, threads) {
            Ok(()) => "would open the GPU".to_string(),
            Err(why) => why,
        }
    );
    let info = match gpu::probe() {
        GpuStatus::Available(info) => info,
        GpuStatus::Unavailable(reason) => {
            println!("no GPU: skipped ({reason})");
            return Ok(());
        }
    };
    let s = Instant::now();
    let g = GpuDiffer::new()?;
    let r = g.rates();
    println!("opening the GPU (context, NVRTC, rates): {:.0} ms", s.elapsed().as_secs_f64() * 1e3);
    println!("device: {info}");
    println!(
        "rates: host->device {:.1} GB/s, device->host {:.1} GB/s, staging copy {:.1} GB/s, CPU thread xor {:.1} GB/s, overwrite {:.1} GB/s",
        r.h2d / 1e9,
        r.d2h / 1e9,
        r.stage / 1e9,
        r.cpu_xor / 1e9,
        r.cpu_overwrite / 1e9
    );
    let len = mib << 20;
    for &d in &densities {
        let (old, new) = pair(len, d);
        let (dold, dnew) = (g.upload(&old)?, g.upload(&new)?);
        println!("\ntensor {mib} MiB, density {:.2}%  (GB/s of tensor bytes; best of 3)", d * 100.0);
        for enc in [Encoding::Xor, Encoding::Overwrite] {
            let (t_cpu1, want) = best(3, || {
                let mut v = Vec::new();
                codec::encode(enc, &old, &new, &mut v).expect("cpu encode");
                v
            });
            // The CPU path on many tensors: `threads` equal pieces encoded in parallel.
            let piece = len.div_ceil(threads).max(1);
            let (t_cpun, _) =
                best(3, || old.par_chunks(piece).zip(new.par_chunks(piece)).map(|(o, w)| codec::encode(enc, o, w, std::io::sink()).expect("cpu encode")).sum::<u64>());
            let (t_host, got) = best(3, || {
                let mut v = Vec::new();
                g.encode(enc, &old, &new, &mut v).map(|_| v)
            });
            let (t_dev, got_dev) = best(3, || {
                let mut v = Vec::new();
                g.encode_device(enc, &dold, &dnew, &mut v).map(|_| v)
            });
            let kernels = g.bench_kernels(enc, &dold, &dnew, 5)?;
            let identical = got? == want && got_dev? == want;
            let traffic = if enc == Encoding::Xor { 3.0 } else { 4.0 };
            let share = info.memory_bandwidth.map(|bw| format!(" = {:.0}% of memory bandwidth", kernels * traffic / bw * 100.0)).unwrap_or_default();
            println!(
                "  {:<9} CPU 1 thread {:>6.2} | CPU {threads} threads {:>6.2} | GPU host inputs {:>6.2} | GPU device-resident {:>6.2} | kernels only {:>7.1}{share} | auto picks {} | identical: {}",
                enc.name(),
                gbps(len, t_cpu1),
                gbps(len, t_cpun),
                gbps(len, t_host),
                gbps(len, t_dev),
                kernels / 1e9,
                if gpu::gpu_faster(&r, enc, len) { "GPU" } else { "CPU" },
                if identical { "yes" } else { "NO" }
            );
            if !identical {
                eprintln!("bench_gpu: GPU frame differs from codec::encode");
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
