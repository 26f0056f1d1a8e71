//! GPU diff (`lib/gpu`, docs/GPU.md): payloads byte-identical to the CPU's, and the
//! `delta-diff --device` switch.
//!
//! One body checks identity for every generated pair; the CPU test runs it on the CPU
//! reference of the kernels plus the GPU path's frame assembly, the `*_or_skip` tests run it on
//! the GPU. Where no GPU is usable (or the build lacks the `cuda` feature) a GPU test writes
//! `skipped: no GPU (<reason>)` straight to stderr, past the test harness's capture, and
//! returns without asserting anything: it did not run, and must not be read as passed.

// Without the `cuda` feature no GpuDiffer can exist, so the GPU test bodies are unreachable.
#![cfg_attr(not(feature = "cuda"), allow(unreachable_code, unused_variables))]

mod common;

use common::*;
use disagg::codec;
use disagg::gpu::{self, frame, GpuDiffer, GpuError, GpuStatus};
use disagg::version::Encoding;
use std::io::Write;

/// Report a GPU test that did not run, visibly (not through the captured `eprintln!`).
fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{test}: skipped: no GPU ({reason})");
}

fn gpu_or_skip(test: &str) -> Option<GpuDiffer> {
    match GpuDiffer::new() {
        Ok(g) => Some(g),
        Err(e) => {
            let reason = match e {
                GpuError::Unavailable(r) => r,
                other => other.to_string(),
            };
            skip(test, &reason);
            None
        }
    }
}

/// Whether byte `i` of a test pair changes.
type ChangePattern<'a> = dyn Fn(usize, &mut Rng) -> bool + 'a;

/// Old/new pairs, generated one at a time: lengths around the vector (16), tile (4096) and
/// pipeline chunk sizes, and densities 0 %, 100 %, sparse, clustered at chunk edges, random.
fn for_each_pair(max_len: usize, mut f: impl FnMut(&str, &[u8], &[u8])) {
    let c = gpu::GPU_CHUNK;
    let lens = [0usize, 1, 15, 16, 17, 4095, 4096, 4097, 1 << 20, c - 1, c + 1, 2 * c + 12_345];
    let mut rng = Rng::new(7);
    for &len in lens.iter().filter(|&&l| l <= max_len) {
        let old: Vec<u8> = (0..len.div_ceil(8)).flat_map(|_| rng.next_u64().to_le_bytes()).take(len).collect();
        let patterns: [(&str, &ChangePattern<'_>); 5] = [
            ("none", &|_, _| false),
            ("all", &|_, _| true),
            ("every97", &|i, _| i % 97 == 3),
            ("edges", &|i, _| i % c < 20 || i % c >= c - 20 || i % 4096 == 4095 || i + 1 == len),
            ("random30", &|_, r| r.below(10) < 3),
        ];
        for (name, hit) in patterns {
            let new: Vec<u8> = old.iter().enumerate().map(|(i, &b)| if hit(i, &mut rng) { b ^ (1 + rng.below(255) as u8) } else { b }).collect();
            f(&format!("len {len} {name}"), &old, &new);
        }
    }
}

/// `produce(encoding, old, new)` must return the frame and changed count `codec::encode` does.
fn check_identity(what: &str, max_len: usize, mut produce: impl FnMut(Encoding, &[u8], &[u8]) -> (Vec<u8>, u64)) {
    for_each_pair(max_len, |case, old, new| {
        for enc in [Encoding::Xor, Encoding::Overwrite] {
            let mut want = Vec::new();
            let want_changed = codec::encode(enc, old, new, &mut want).unwrap();
            let (got, changed) = produce(enc, old, new);
            assert_eq!(changed, want_changed, "{what}: {case} {enc}: changed bytes");
            assert!(got == want, "{what}: {case} {enc}: frame differs from codec::encode ({} vs {} bytes)", got.len(), want.len());
        }
    });
}

#[test]
fn cpu_reference_and_frame_assembly_identity() {
    // Up to 1 MiB (quick in a debug build), fed in odd-sized pieces to exercise re-chunking.
    check_identity("cpu reference", 1 << 20, |enc, old, new| match enc {
        Encoding::Xor => {
            let (x, n) = frame::reference::xor(old, new);
            let mut f = frame::XorFrame::new(Vec::new(), x.len() as u64).unwrap();
            for piece in x.chunks(3 * 4096 + 16) {
                f.push(piece).unwrap();
            }
            let (frame, nonzero) = f.finish().unwrap();
            assert_eq!(nonzero, n, "the stream's nonzero count");
            (frame, n)
        }
        Encoding::Overwrite => {
            let (p, v) = frame::reference::compact(old, new);
            (frame::write_overwrite(Vec::new(), &p, &v).unwrap(), p.len() as u64)
        }
    });
}

/// The dense `overwrite` pairs of two chunks and more (16 Mi changes) pass the CPU's one-pass
/// cap, so with host inputs they take the GPU path's hand-off to the CPU's streaming encoder.
#[test]
fn gpu_byte_identity_host_inputs_or_skip() {
    let Some(g) = gpu_or_skip("gpu_byte_identity_host_inputs_or_skip") else { return };
    check_identity("gpu host", usize::MAX, |enc, old, new| {
        let mut out = Vec::new();
        let n = g.encode(enc, old, new, &mut out).unwrap();
        (out, n)
    });
}

#[test]
fn gpu_byte_identity_device_resident_or_skip() {
    let Some(g) = gpu_or_skip("gpu_byte_identity_device_resident_or_skip") else { return };
    check_identity("gpu device-resident", usize::MAX, |enc, old, new| {
        let (o, w) = (g.upload(old).unwrap(), g.upload(new).unwrap());
        let mut out = Vec::new();
        let n = g.encode_device(enc, &o, &w, &mut out).unwrap();
        (out, n)
    });
}

#[test]
fn gpu_byte_identity_many_threads_or_skip() {
    let Some(g) = gpu_or_skip("gpu_byte_identity_many_threads_or_skip") else { return };
    let mut cases = Vec::new();
    for_each_pair(gpu::GPU_CHUNK + 1, |case, old, new| cases.push((case.to_string(), old.to_vec(), new.to_vec())));
    std::thread::scope(|s| {
        for t in 0..8 {
            let (g, cases) = (&g, &cases);
            s.spawn(move || {
                for (case, old, new) in cases.iter().skip(t).step_by(3) {
                    let enc = if t % 2 == 0 { Encoding::Xor } else { Encoding::Overwrite };
                    let mut want = Vec::new();
                    codec::encode(enc, old, new, &mut want).unwrap();
                    let mut got = Vec::new();
                    // Half the threads wait for a pipeline, half only take a free one.
                    let done = if t < 4 { Some(g.encode(enc, old, new, &mut got).unwrap()) } else { g.try_encode(enc, old, new, &mut got).unwrap() };
                    if done.is_some() {
                        assert!(got == want, "thread {t}: {case} {enc}");
                    } else {
                        assert!(got.is_empty(), "try_encode wrote although no pipeline was free");
                    }
                }
            });
        }
    });
}

#[test]
fn probe_reports_a_reason_or_a_device() {
    match gpu::probe() {
        GpuStatus::Available(info) => {
            assert!(!info.name.is_empty());
            let _ = writeln!(std::io::stderr().lock(), "probe: {info}");
        }
        GpuStatus::Unavailable(reason) => {
            assert!(!reason.is_empty());
            if !cfg!(feature = "cuda") {
                assert!(reason.contains("not enabled in this build"), "{reason}");
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// delta-diff --device
// ------------------------------------------------------------------------------------------------

/// A model with tensors large enough for `--device cuda` (≥ 64 KiB), one crossing a pipeline
/// chunk, plus a small one that stays on the CPU; and a step that changes ~2 % of each.
fn big_pair(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut r = Rng::new(11);
    let old: Model = vec![
        tensor("model.embed_tokens.weight", "BF16", &[512, 1024], &mut r),
        tensor("model.layers.0.mlp.up_proj.weight", "BF16", &[4608, 1000], &mut r),
        tensor("model.layers.0.input_layernorm.weight", "F32", &[64], &mut r),
    ];
    let mut new = old.clone();
    for t in new.iter_mut() {
        for b in t.data.iter_mut() {
            if r.below(50) == 0 {
                *b ^= 1 + r.below(255) as u8;
            }
        }
    }
    let (a, b) = (dir.join("old"), dir.join("new"));
    write_checkpoint(&a, &old, 1);
    write_checkpoint(&b, &new, 1);
    (a, b)
}

fn publish_with(old: &std::path::Path, new: &std::path::Path, src: &std::path::Path, encoding: &str, device: Option<&str>) -> Run {
    let mut args =
        vec![old.s().to_string(), new.s().to_string(), "--publish".into(), src.s().into(), "--version".into(), "1".into(), "--encoding".into(), encoding.into(), "--json".into()];
    if let Some(d) = device {
        args.extend(["--device".to_string(), d.to_string()]);
    }
    run(DIFF, args)
}

fn data_files(src: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    snapshot(&src.join("weight_v000001")).into_iter().filter(|(p, _)| p.to_string_lossy().ends_with(".safetensors")).collect()
}

#[test]
fn device_cpu_and_auto_publish_the_same_bytes() {
    let t = TestDir::new("device_cpu_auto");
    let (old, new) = big_pair(&t.path);
    for enc in ["xor", "overwrite"] {
        let cpu = t.join(format!("cpu-{enc}"));
        let r = publish_with(&old, &new, &cpu, enc, Some("cpu")).ok().json();
        assert_eq!(r["device"], "cpu");
        assert!(r["device_note"].is_null(), "--device cpu needs no note: {}", r["device_note"]);
        let reference = data_files(&cpu);
        assert!(!reference.is_empty());
        for device in [None, Some("auto")] {
            let src = t.join(format!("{enc}-{}", device.unwrap_or("default")));
            let j = publish_with(&old, &new, &src, enc, device).ok().json();
            let d = j["device"].as_str().unwrap().to_string();
            assert!(d == "cpu" || d == "cuda", "device {d}");
            // auto says why it left the GPU out; a GPU it opened leaves no note.
            match (d.as_str(), j["device_note"].as_str()) {
                ("cpu", Some(note)) => assert!(note.starts_with("auto: "), "{note}"),
                ("cuda", None) => {}
                (d, note) => panic!("device {d} with device_note {note:?}"),
            }
            assert!(data_files(&src) == reference, "{enc} --device {device:?}: data files differ from --device cpu");
        }
    }
}

#[test]
fn device_cuda_without_gpu_is_a_usage_error() {
    let t = TestDir::new("device_cuda");
    let (old, new) = big_pair(&t.path);
    let src = t.join("src");
    match gpu::probe() {
        GpuStatus::Unavailable(reason) => {
            let r = publish_with(&old, &new, &src, "xor", Some("cuda"));
            r.code(2).stderr_contains("--device cuda").stderr_contains("no GPU").stderr_contains(&reason);
            assert!(!src.join("weight_v000001").exists(), "nothing is written when the device is refused");
        }
        GpuStatus::Available(info) => {
            // On a GPU machine the same command must succeed on the GPU, byte-identical to the CPU.
            let _ = writeln!(std::io::stderr().lock(), "device_cuda_without_gpu_is_a_usage_error: GPU present ({info}); checking --device cuda instead");
            for enc in ["xor", "overwrite"] {
                let (g, c) = (t.join(format!("gpu-{enc}")), t.join(format!("cpu-{enc}")));
                assert_eq!(publish_with(&old, &new, &g, enc, Some("cuda")).ok().json()["device"], "cuda");
                publish_with(&old, &new, &c, enc, Some("cpu")).ok();
                assert!(data_files(&g) == data_files(&c), "{enc}: --device cuda data files differ from --device cpu");
            }
        }
    }
}

#[test]
fn device_unknown_is_refused() {
    let t = TestDir::new("device_unknown");
    let (old, new) = big_pair(&t.path);
    publish_with(&old, &new, &t.join("src"), "xor", Some("gpu")).code(2).stderr_contains("gpu");
}
