#!/usr/bin/env python3
"""A small trainer for the demo: fp32 master weights updated by real Adam steps, bf16 checkpoints.

    toy_trainer.py init --state DIR --out CKPT [--size-mb 16] [--shards 2] [--seed 0]
    toy_trainer.py step --state DIR --out CKPT [--lr 1e-6] [--batch N]

``init`` creates the fp32 master weights (matrices ~ N(0, 0.02), norms ~ 1 + N(0, 0.05), shapes
of a llama/qwen2 decoder from ``testdata/gen_rl_pair.py``), zero Adam moments, and writes the
bf16 checkpoint of step 0. ``step`` takes one Adam step (β1 0.9, β2 0.999, ε 1e-8, bias
correction) on a synthetic policy-gradient-like objective — gradient = pull toward a fixed
random target plus minibatch noise whose scale shrinks with ``--batch`` (the number of refs the
trainer consumed) — and writes the bf16 checkpoint of the new step (round to nearest even), so
about 1-3 % of the bf16 elements change per step at lr 1e-6, as in real RL runs.

State (``--state DIR``): ``w.f32``, ``m.f32``, ``v.f32`` (flat float32, memory-mapped and
updated in place), ``layout.json`` (config, tensor specs, shards, step). A checkpoint is
written under a temp name and renamed into place, config and index last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata"))
from gen_rl_pair import assign_shards, f32_to_bf16_bits, hf_config, model_config, safetensors_header, tensor_specs  # noqa: E402

CHUNK = 1 << 21


def _layout_path(state: str) -> str:
    return os.path.join(state, "layout.json")


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_checkpoint(w: np.ndarray, layout: dict, out: str) -> None:
    """bf16 checkpoint of ``w`` (flat fp32) in HF layout under ``out``."""
    specs, groups = layout["specs"], layout["groups"]
    os.makedirs(out, exist_ok=True)
    offs = [0]
    for _, shape, _ in specs:
        offs.append(offs[-1] + math.prod(shape))
    weight_map = {}
    n_sh = len(groups)
    for si, group in enumerate(groups):
        fname = f"model-{si + 1:05d}-of-{n_sh:05d}.safetensors"
        header = safetensors_header([(specs[i][0], tuple(specs[i][1])) for i in group], {"format": "pt"})
        tmp = os.path.join(out, "." + fname + ".tmp")
        with open(tmp, "wb") as f:
            f.write(header)
            a, b = offs[group[0]], offs[group[-1] + 1]
            for s in range(a, b, CHUNK):
                f.write(f32_to_bf16_bits(w[s : min(b, s + CHUNK)]).tobytes())
        os.replace(tmp, os.path.join(out, fname))
        for i in group:
            weight_map[specs[i][0]] = fname
    _write_json(os.path.join(out, "config.json"), hf_config(layout["config"]))
    _write_json(os.path.join(out, "model.safetensors.index.json"), {"metadata": {"total_size": 2 * offs[-1]}, "weight_map": weight_map})


def _maps(state: str, n: int, mode: str):
    return [np.memmap(os.path.join(state, f"{k}.f32"), dtype=np.float32, mode=mode, shape=(n,)) for k in ("w", "m", "v")]


def init(args) -> None:
    cfg = model_config(args.size_mb)
    specs = tensor_specs(cfg)
    groups = assign_shards(specs, args.shards)
    n = sum(math.prod(s) for _, s, _ in specs)
    os.makedirs(args.state, exist_ok=True)
    w, m, v = _maps(args.state, n, "w+")
    off = 0
    for i, (_, shape, kind) in enumerate(specs):
        k = math.prod(shape)
        rng = np.random.default_rng([args.seed, i])
        x = rng.standard_normal(k, dtype=np.float32)
        w[off : off + k] = (1.0 + 0.05 * x) if kind == "norm" else 0.02 * x
        off += k
    m[:] = 0
    v[:] = 0
    for a in (w, m, v):
        a.flush()
    layout = {"config": cfg, "specs": [[nm, list(s), kd] for nm, s, kd in specs], "groups": groups, "n": n, "step": 0, "seed": args.seed}
    _write_json(_layout_path(args.state), layout)
    write_checkpoint(w, layout, args.out)
    print(json.dumps({"step": 0, "params": n, "bytes": 2 * n, "tensors": len(specs)}))


def step(args) -> None:
    with open(_layout_path(args.state)) as f:
        layout = json.load(f)
    n, t = layout["n"], layout["step"] + 1
    w, m, v = _maps(args.state, n, "r+")
    b1, b2, eps = 0.9, 0.999, 1e-8
    c1, c2 = 1 - b1**t, 1 - b2**t
    noise = 1.0 / math.sqrt(max(1, args.batch))
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        ws = w[s:e]
        # target: a fixed random point near the init; noise: a fresh minibatch each step
        tgt = np.random.default_rng([layout["seed"], 7, s]).standard_normal(e - s, dtype=np.float32) * np.float32(0.02)
        g = (ws - tgt) + np.random.default_rng([layout["seed"], t, s]).standard_normal(e - s, dtype=np.float32) * np.float32(noise)
        ms, vs = m[s:e], v[s:e]
        ms *= b1
        ms += (1 - b1) * g
        vs *= b2
        vs += (1 - b2) * g * g
        ws -= np.float32(args.lr) * (ms / c1) / (np.sqrt(vs / c2) + np.float32(eps))
    for a in (w, m, v):
        a.flush()
    write_checkpoint(w, layout, args.out)
    layout["step"] = t
    _write_json(_layout_path(args.state), layout)
    print(json.dumps({"step": t}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("init")
    a.add_argument("--state", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--size-mb", type=float, default=16)
    a.add_argument("--shards", type=int, default=2)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("step")
    b.add_argument("--state", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--lr", type=float, default=1e-6)
    b.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    (init if args.cmd == "init" else step)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
