#!/usr/bin/env python3
"""Generate realistic RL-step checkpoint chains as HF safetensors directories (numpy only).

Model of one RL step (docs: shared BRIEF §1, "What real RL deltas look like"):

* fp32 master weights: matrices and biases ~ N(0, 0.02), norm weights ~ 1 + N(0, 0.05);
* one Adam-like step adds ``±lr·U(0.2, 1)`` to every element (independent sign and
  magnitude per element and per step);
* the checkpoint of step k is the bf16 cast (round to nearest, ties to even) of the
  master weights after k steps.

With the default ``lr = 1e-6`` about 1-3 % of the bf16 elements change per step, and most
of them by exactly one ulp, as in published measurements of real RL runs.

Layout written under ``--out DIR``::

    DIR/step_0/ ... DIR/step_K/       one HF checkpoint per step
        config.json                   a tiny llama/qwen2-like config
        model-00001-of-0000N.safetensors
        model.safetensors.index.json  {"metadata": {"total_size": ...}, "weight_map": {...}}
    DIR/gen_stats.json                sizes and measured per-step densities (written last:
                                      its presence means the chain is complete)

Shapes follow a llama/qwen2 decoder (GQA with 4 query heads per kv head, q/k/v biases,
SwiGLU MLP of 2.75×hidden, untied embeddings); the hidden size, vocabulary and layer
count are chosen so the checkpoint is at least ``--size-mb`` MiB.

Memory stays bounded: each tensor is produced in chunks of ``CHUNK`` elements from an RNG
seeded by (seed, tensor index, chunk index), and every chunk of every step is written
straight to its file, so the output is deterministic for a given seed and the resident
set is a few tens of MiB whatever the model size.

The safetensors files are written by hand: 8-byte little-endian header length, the JSON
header padded with spaces to a multiple of 8 bytes, then the raw tensor bytes in header
order. Every tensor has dtype "BF16".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

MIB = 1 << 20
# Elements per generated chunk (4 MiB of fp32); bounds memory and fixes the RNG stream layout.
CHUNK = 1 << 20
HIDDEN_CHOICES = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 5120, 8192)
MAX_VOCAB = 32000
HEAD_DIM = 64


# --------------------------------------------------------------------------------------------
# fp32 -> bf16 (round to nearest, ties to even) with uint32 bit operations


def f32_to_bf16_bits(x: np.ndarray, out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """Return the bf16 bit patterns (uint16) of float32 array ``x``, rounded to nearest even.

    ``bits + 0x7FFF + ((bits >> 16) & 1)`` then ``>> 16``: adding just under half an ulp,
    plus one when the kept part is odd, rounds ties to even; a carry out of the mantissa
    correctly bumps the exponent (and overflows to infinity at the top). NaNs become quiet
    NaNs with their sign kept (0x7FC0 / 0xFFC0), as torch does. ``out`` (uint16) and
    ``scratch`` (uint32), of x's size, avoid allocations in hot loops.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    if scratch is None:
        scratch = np.empty(bits.shape, dtype=np.uint32)
    if out is None:
        out = np.empty(bits.shape, dtype=np.uint16)
    np.right_shift(bits, 16, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)
    np.add(scratch, 0x7FFF, out=scratch)
    np.add(scratch, bits, out=scratch)  # wraps only for NaN payloads, fixed below
    np.right_shift(scratch, 16, out=scratch)
    np.copyto(out, scratch, casting="unsafe")
    # NaN check on the raw bits: exponent all ones and a non-zero mantissa.
    np.bitwise_and(bits, 0x7FFFFFFF, out=scratch)
    nan = scratch > 0x7F800000
    if nan.any():
        out[nan] = (0x7FC0 | ((bits[nan] >> 16) & 0x8000)).astype(np.uint16)
    return out


def bf16_bits_to_f32(h: np.ndarray) -> np.ndarray:
    """Exact widening of bf16 bit patterns (uint16) to float32."""
    return (h.astype(np.uint32) << 16).view(np.float32)


def _bf16_reference(u: int) -> int:
    """Pure-Python fp32 -> bf16 round-to-nearest-even of one fp32 bit pattern (for --self-test)."""
    from fractions import Fraction
    import struct

    if (u & 0x7FFFFFFF) > 0x7F800000:
        return 0x7FC0 | ((u >> 16) & 0x8000)
    if (u & 0x7FFFFFFF) == 0x7F800000:
        return u >> 16

    def val(b16: int) -> Fraction:
        return Fraction(struct.unpack("<f", struct.pack("<I", b16 << 16))[0])

    x = Fraction(struct.unpack("<f", struct.pack("<I", u))[0])
    lo = u >> 16
    hi = lo + 1
    if (hi & 0x7FFF) == 0x7F80:  # rounding up would give infinity: compare with the halfway point
        half = val(lo) + (val(lo) - val(lo - 1)) / 2
        return hi if abs(x) > abs(half) or (abs(x) == abs(half) and lo & 1) else lo
    dl, dh = abs(x - val(lo)), abs(val(hi) - x)
    if dl != dh:
        return lo if dl < dh else hi
    return lo if lo % 2 == 0 else hi


def self_test() -> int:
    """Check f32_to_bf16_bits against the pure-Python reference on edge cases and random bits."""
    rng = np.random.default_rng(12345)
    rand = rng.integers(0, 1 << 32, size=20000, dtype=np.uint64).astype(np.uint32)
    tops = rng.integers(0, 1 << 16, size=2000, dtype=np.uint64).astype(np.uint32) << 16
    edges = np.array([0, 0x80000000, 1, 0x8000, 0x18000, 0x7FFF, 0x8001, 0x3F808000, 0x3F818000, 0x3F80FFFF,
                      0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000,
                      0x7F800001, 0xFFFFFFFF, 0x00FF8000, 0x807F8000], dtype=np.uint32)
    bits = np.concatenate([edges, rand, tops | 0x8000, tops | 0x7FFF, tops | 0x8001])
    got = f32_to_bf16_bits(bits.view(np.float32))
    bad = [(int(b), int(g), _bf16_reference(int(b))) for b, g in zip(bits, got) if int(g) != _bf16_reference(int(b))]
    for b, g, r in bad[:10]:
        print(f"FAIL: fp32 0x{b:08x} -> 0x{g:04x}, reference 0x{r:04x}")
    print(f"bf16 rounding: {len(bits) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------
# Model shapes


def _round_up(v: float, m: int) -> int:
    return int(math.ceil(v / m) * m)


def _dims(hidden: int, target_params: int) -> dict:
    heads = max(1, hidden // HEAD_DIM)
    kv_heads = max(1, heads // 4)
    inter = _round_up(hidden * 2.75, 64)
    vocab = min(MAX_VOCAB, max(256, _round_up(target_params * 0.12 / hidden, 64)))
    kv = kv_heads * HEAD_DIM
    per_layer = (
        2 * hidden * hidden  # q_proj, o_proj
        + 2 * kv * hidden  # k_proj, v_proj
        + hidden + 2 * kv  # q/k/v biases
        + 3 * hidden * inter  # gate, up, down
        + 2 * hidden  # two norms
    )
    return dict(hidden=hidden, heads=heads, kv_heads=kv_heads, kv=kv, inter=inter, vocab=vocab, per_layer=per_layer)


def model_config(size_mb: float) -> dict:
    """Pick hidden size, vocabulary and depth so the bf16 checkpoint has >= size_mb MiB."""
    target_params = max(1, int(size_mb * MIB / 2))
    best = _dims(HIDDEN_CHOICES[0], target_params)
    for h in HIDDEN_CHOICES:
        d = _dims(h, target_params)
        # the largest hidden size that still leaves room for >= 16 layers beside the embeddings
        if 2 * d["vocab"] * h + 16 * d["per_layer"] <= target_params:
            best = d
    d = best
    rest = target_params - 2 * d["vocab"] * d["hidden"] - d["hidden"]
    d["layers"] = max(1, math.ceil(rest / d["per_layer"]))
    return d


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init kind) in checkpoint order; kind is "normal" or "norm"."""
    h, kv, inter, v = cfg["hidden"], cfg["kv"], cfg["inter"], cfg["vocab"]
    specs = [("model.embed_tokens.weight", (v, h), "normal")]
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (h, h), "normal"),
            (p + "self_attn.q_proj.bias", (h,), "normal"),
            (p + "self_attn.k_proj.weight", (kv, h), "normal"),
            (p + "self_attn.k_proj.bias", (kv,), "normal"),
            (p + "self_attn.v_proj.weight", (kv, h), "normal"),
            (p + "self_attn.v_proj.bias", (kv,), "normal"),
            (p + "self_attn.o_proj.weight", (h, h), "normal"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (inter, h), "normal"),
            (p + "mlp.up_proj.weight", (inter, h), "normal"),
            (p + "mlp.down_proj.weight", (h, inter), "normal"),
        ]
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "normal")]
    return specs


def hf_config(cfg: dict) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": cfg["hidden"],
        "intermediate_size": cfg["inter"],
        "num_hidden_layers": cfg["layers"],
        "num_attention_heads": cfg["heads"],
        "num_key_value_heads": cfg["kv_heads"],
        "vocab_size": cfg["vocab"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "_generator": "disagg testdata/gen_rl_pair.py",
    }


# --------------------------------------------------------------------------------------------
# Sharding and safetensors writing


def assign_shards(specs, n_shards: int) -> list[list[int]]:
    """Split tensors (in order) into n contiguous, non-empty groups of roughly equal byte size."""
    sizes = [2 * math.prod(s) for _, s, _ in specs]
    n = max(1, min(n_shards, len(specs)))
    total = sum(sizes)
    groups: list[list[int]] = []
    i = acc = 0
    for g in range(n):
        group = [i]
        acc += sizes[i]
        i += 1
        left = len(specs) - i
        bound = total * (g + 1) / n
        # take the next tensor while its midpoint falls in this shard's share and every
        # later shard still gets at least one tensor
        while left > n - g - 1 and (g == n - 1 or acc + sizes[i] / 2 <= bound):
            group.append(i)
            acc += sizes[i]
            i += 1
            left -= 1
        groups.append(group)
    return groups


def safetensors_header(entries: list[tuple[str, tuple[int, ...]]], metadata: dict | None = None) -> bytes:
    """Header bytes (length prefix + JSON padded with spaces to 8 bytes) for BF16 tensors stored
    contiguously in the given order."""
    hdr: dict = {}
    if metadata:
        hdr["__metadata__"] = metadata
    off = 0
    for name, shape in entries:
        nbytes = 2 * math.prod(shape)
        hdr[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    js = json.dumps(hdr, separators=(",", ":")).encode()
    js += b" " * ((-len(js)) % 8)
    return len(js).to_bytes(8, "little") + js


def _fsync_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Generation


class _StepStats:
    def __init__(self, steps: int):
        self.changed_elems = [0] * (steps + 1)  # index k: step k-1 -> k
        self.changed_bytes = [0] * (steps + 1)
        self.changed_vs0 = [0] * (steps + 1)  # step 0 -> k (folded steps)
        self.one_ulp = [0] * (steps + 1)
        self.tensors_changed = [0] * (steps + 1)


def _gen_tensor(idx: int, shape, kind: str, args, files, stats: _StepStats, bufs) -> None:
    n = math.prod(shape)
    steps = args.steps
    changed_tensor = [False] * (steps + 1)
    for c, start in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - start)
        rng = np.random.default_rng([args.seed, idx, c])
        w = bufs["w"][:m]
        rng.standard_normal(out=w, dtype=np.float32)
        if kind == "norm":
            w *= np.float32(0.05)
            w += np.float32(1.0)
        else:
            w *= np.float32(0.02)
        h0 = f32_to_bf16_bits(w, out=bufs["h0"][:m], scratch=bufs["s"][:m])
        files[0].write(h0.data)
        prev = bufs["hp"][:m]
        np.copyto(prev, h0)
        cur = bufs["hc"][:m]
        u = bufs["u"][:m]
        for k in range(1, steps + 1):
            # step: w += lr * (0.2 + 0.8|u|) * sign(u), u ~ U(-1, 1)
            rng.random(out=u, dtype=np.float32)
            u *= np.float32(2.0)
            u -= np.float32(1.0)
            np.add(np.copysign(np.float32(0.2), u), u * np.float32(0.8), out=u)
            u *= np.float32(args.lr)
            w += u
            f32_to_bf16_bits(w, out=cur, scratch=bufs["s"][:m])
            files[k].write(cur.data)
            if not args.no_stats:
                ne = prev != cur
                ce = int(np.count_nonzero(ne))
                if ce:
                    changed_tensor[k] = True
                    stats.changed_elems[k] += ce
                    pb, cb = prev.view(np.uint8), cur.view(np.uint8)
                    stats.changed_bytes[k] += int(np.count_nonzero(pb != cb))
                    d = cur[ne].astype(np.int32) - prev[ne].astype(np.int32)
                    stats.one_ulp[k] += int(np.count_nonzero(np.abs(d) == 1))
                stats.changed_vs0[k] += int(np.count_nonzero(h0 != cur))
            prev, cur = cur, prev
    for k in range(1, steps + 1):
        stats.tensors_changed[k] += int(changed_tensor[k])


def generate(args) -> dict:
    t0 = time.perf_counter()
    cfg = model_config(args.size_mb)
    specs = tensor_specs(cfg)
    groups = assign_shards(specs, args.shards)
    n_sh = len(groups)
    total_bytes = sum(2 * math.prod(s) for _, s, _ in specs)
    os.makedirs(args.out, exist_ok=True)
    stats_path = os.path.join(args.out, "gen_stats.json")
    if os.path.exists(stats_path):
        os.remove(stats_path)
    step_dirs = [os.path.join(args.out, f"step_{k}") for k in range(args.steps + 1)]
    for d in step_dirs:
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            if f.endswith(".safetensors") or f.endswith(".json") or f.endswith(".tmp"):
                os.remove(os.path.join(d, f))

    bufs = {
        "w": np.empty(CHUNK, np.float32),
        "u": np.empty(CHUNK, np.float32),
        "s": np.empty(CHUNK, np.uint32),
        "h0": np.empty(CHUNK, np.uint16),
        "hp": np.empty(CHUNK, np.uint16),
        "hc": np.empty(CHUNK, np.uint16),
    }
    stats = _StepStats(args.steps)
    weight_map: dict[str, str] = {}
    for si, group in enumerate(groups):
        fname = f"model-{si + 1:05d}-of-{n_sh:05d}.safetensors"
        header = safetensors_header([(specs[i][0], specs[i][1]) for i in group], {"format": "pt"})
        files = []
        for d in step_dirs:
            f = open(os.path.join(d, fname + ".tmp"), "wb", buffering=0)
            f.write(header)
            files.append(f)
        for i in group:
            name, shape, kind = specs[i]
            weight_map[name] = fname
            _gen_tensor(i, shape, kind, args, files, stats, bufs)
        for d, f in zip(step_dirs, files):
            if args.fsync:
                os.fsync(f.fileno())
            f.close()
            os.replace(os.path.join(d, fname + ".tmp"), os.path.join(d, fname))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    for d in step_dirs:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(hf_config(cfg), f, indent=2)
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    n_elems = total_bytes // 2
    out = {
        "size_mb_requested": args.size_mb,
        "seed": args.seed,
        "lr": args.lr,
        "steps": args.steps,
        "shards": n_sh,
        "config": {k: cfg[k] for k in ("hidden", "inter", "layers", "heads", "kv_heads", "vocab")},
        "tensors": len(specs),
        "total_bytes": total_bytes,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if not args.no_stats:
        out["per_step"] = [
            {
                "from": k - 1,
                "to": k,
                "element_density": stats.changed_elems[k] / n_elems,
                "byte_density": stats.changed_bytes[k] / total_bytes,
                "one_ulp_fraction": stats.one_ulp[k] / max(1, stats.changed_elems[k]),
                "tensors_changed": stats.tensors_changed[k],
                "element_density_from_step0": stats.changed_vs0[k] / n_elems,
            }
            for k in range(1, args.steps + 1)
        ]
    _fsync_write(stats_path, (json.dumps(out, indent=2) + "\n").encode())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output dir; step_0 .. step_K are written inside")
    ap.add_argument("--size-mb", type=float, default=8, help="checkpoint size in MiB (lower bound; default 8)")
    ap.add_argument("--steps", type=int, default=1, help="number of RL steps K (writes K+1 checkpoints)")
    ap.add_argument("--shards", type=int, default=2, help="safetensors shards per checkpoint (default 2)")
    ap.add_argument("--lr", type=float, default=1e-6, help="Adam-like step size (default 1e-6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fsync", action="store_true", help="fsync data files before renaming them")
    ap.add_argument("--no-stats", action="store_true", help="skip the density statistics (a little faster)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--self-test", action="store_true", help="check the bf16 rounding against a reference and exit")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test()
    if not args.out:
        ap.error("--out is required")
    if args.steps < 1 or args.shards < 1 or args.size_mb <= 0:
        ap.error("--steps and --shards must be >= 1 and --size-mb > 0")
    out = generate(args)
    if not args.quiet:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
