#!/usr/bin/env python3
"""Data-plane benchmark: refs/s publish -> tail, publish-to-visible latency, ingest GB/s vs cp.

    DISAGG_BIN_DIR=target/release .venv/bin/python bench/bench_dataplane.py [--work DIR]

Targets (issue): >= 100k refs/s batched, p50 <= 5 ms, ingest >= 1 GB/s warm.
Needs numpy (bench inputs). Work files go under bench-data/ (git-ignored) unless --work.

Every measurement runs --repeat times (default 3); the best and the spread (min..max) are printed.
Ingest is durable when feature-ingest exits (objects fsynced, their directories fsynced), so
it is compared with both plain `cp -r` (page cache only, not durable) and `cp -r` + `sync` (the
same bytes made durable): the second is the fair baseline. Inputs are warm (read once before),
and dirty data is flushed (`sync`) before each timed run so no run pays for an earlier one's
writeback.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "testdata"))
import gen_torch_features as gen  # noqa: E402

BIN = Path(os.environ.get("DISAGG_BIN_DIR", ROOT / "target" / "release"))


def ref_line(i, extra=None):
    meta = {"weight_version": i % 50}
    if extra:
        meta.update(extra)
    return json.dumps({"sample_id": f"s{i}", "run_id": "bench", "feature_store_uri": "file:///shared/store",
                       "feature_keys": {"hidden_state": f"objects/00/s{i}/g00000001.safetensors#hidden_state",
                                        "input_ids": f"objects/00/s{i}/g00000001.safetensors#input_ids"},
                       "feature_specs": {"input_ids": {"name": "input_ids", "shape": [2048], "dtype": "int64", "device_hint": "cpu",
                                                       "required": True, "target_repr": None, "target_meta": None}},
                       "strategy": "eagle3", "schema_version": 1, "num_tokens": 2048, "estimated_bytes": 67125248,
                       "metadata": meta}, separators=(",", ":"))


def bench_throughput(work, n):
    ch = work / "ch-throughput"
    shutil.rmtree(ch, ignore_errors=True)
    ch.mkdir(parents=True)
    src = work / "refs.jsonl"
    src.write_text("\n".join(ref_line(i) for i in range(n)) + "\n")
    t0 = time.perf_counter()
    tail = subprocess.Popen([BIN / "ref-tail", ch, "--cursor", "b", "--follow"], stdout=subprocess.PIPE)
    counted = [0]

    def count():
        for _ in tail.stdout:
            counted[0] += 1

    th = threading.Thread(target=count)
    th.start()
    with open(src) as f:
        subprocess.run([BIN / "ref-publish", ch, "--producer", "p0", "--close"], stdin=f, check=True)
    tail.wait()
    th.join()
    dt = time.perf_counter() - t0
    assert counted[0] == n, counted[0]
    return n / dt


def bench_latency(work, n):
    ch = work / "ch-latency"
    shutil.rmtree(ch, ignore_errors=True)
    ch.mkdir(parents=True)
    tail = subprocess.Popen([BIN / "ref-tail", ch, "--cursor", "l", "--follow"], stdout=subprocess.PIPE, bufsize=0)
    pub = subprocess.Popen([BIN / "ref-publish", ch, "--producer", "p0", "--close"], stdin=subprocess.PIPE, bufsize=0)
    lat = []

    def read():
        f = tail.stdout
        buf = b""
        while len(lat) < n:
            chunk = f.read1(65536) if hasattr(f, "read1") else os.read(f.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            now = time.perf_counter_ns()
            for l in lines:
                lat.append((now - json.loads(l)["metadata"]["t_ns"]) / 1e6)

    th = threading.Thread(target=read)
    th.start()
    time.sleep(0.3)
    for i in range(n):
        pub.stdin.write((ref_line(i, {"t_ns": time.perf_counter_ns()}) + "\n").encode())
        time.sleep(0.01)
    pub.stdin.close()
    pub.wait()
    th.join()
    tail.wait()
    lat.sort()
    return lat[len(lat) // 2], lat[min(len(lat) - 1, len(lat) * 99 // 100)]


def make_inputs(dir_, files, tokens, hidden):
    dir_.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0
    for k in range(files):
        ids = rng.integers(0, 32000, tokens, dtype=np.int64)
        mask = np.ones(tokens, dtype=np.int64)
        hs = (rng.standard_normal(tokens * hidden, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        aux = (rng.standard_normal(tokens * 3 * hidden, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        spec = [("input_ids", gen.Tensor(gen.Storage("0", "int64", ids.tobytes()), 0, (tokens,), (1,))),
                ("loss_mask", gen.Tensor(gen.Storage("1", "int64", mask.tobytes()), 0, (tokens,), (1,))),
                ("hidden_state", gen.Tensor(gen.Storage("2", "bfloat16", hs.tobytes()), 0, (1, tokens, hidden), (tokens * hidden, hidden, 1))),
                ("aux_hidden_state", gen.Tensor(gen.Storage("3", "bfloat16", aux.tobytes()), 0, (1, tokens, 3 * hidden), (tokens * 3 * hidden, 3 * hidden, 1)))]
        data = gen.write_torch_zip(spec)
        (dir_ / f"data_{k}.ckpt").write_bytes(data)
        total += len(data)
    return total


def prepare_ingest(work, files, tokens, hidden):
    inp = work / "ingest-in" / "rows_0-2000"
    shutil.rmtree(work / "ingest-in", ignore_errors=True)
    total = make_inputs(inp, files, tokens, hidden)
    for p in inp.iterdir():  # warm the page cache
        p.read_bytes()
    return inp, total


def bench_ingest(work, inp, total, files):
    """One round: (ingest GB/s, cp GB/s, cp + sync GB/s), each from a clean, synced start."""
    cp_dst = work / "cp-out"
    store = work / "store"
    shutil.rmtree(cp_dst, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", inp, cp_dst], check=True)
    cp_s = time.perf_counter() - t0
    os.sync()
    cp_sync_s = time.perf_counter() - t0
    shutil.rmtree(cp_dst, ignore_errors=True)
    os.sync()
    t0 = time.perf_counter()
    r = subprocess.run([BIN / "feature-ingest", work / "ingest-in", "--store", store, "--manifest", work / "refs.json", "--json"],
                       capture_output=True, text=True, check=True)
    ing_s = time.perf_counter() - t0
    s = json.loads(r.stdout)
    assert s["ingested"] == files, s
    shutil.rmtree(store, ignore_errors=True)
    # The disk's ceiling for these bytes: dd with O_DIRECT from /dev/zero (no reads, no CPU work), fsynced.
    dd_out = work / "dd-ceiling"
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={dd_out}", "bs=4M", f"count={max(1, total >> 22)}", "oflag=direct", "conv=fsync"],
                   check=True, capture_output=True)
    dd_s = time.perf_counter() - t0
    dd_out.unlink()
    return total / 1e9 / ing_s, total / 1e9 / cp_s, total / 1e9 / cp_sync_s, (max(1, total >> 22) << 22) / 1e9 / dd_s


def best_spread(xs, higher_is_better=True):
    best = max(xs) if higher_is_better else min(xs)
    return best, min(xs), max(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "bench-data"))
    ap.add_argument("--refs", type=int, default=200_000)
    ap.add_argument("--latency-refs", type=int, default=300)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; best and spread are reported")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    n = max(1, a.repeat)
    rps_runs = [bench_throughput(work, a.refs) for _ in range(n)]
    lat_runs = [bench_latency(work, a.latency_refs) for _ in range(n)]
    inp, total = prepare_ingest(work, a.files, a.tokens, a.hidden)
    ing_runs = [bench_ingest(work, inp, total, a.files) for _ in range(n)]
    rps, rps_lo, rps_hi = best_spread(rps_runs)
    p50, p50_lo, p50_hi = best_spread([l[0] for l in lat_runs], higher_is_better=False)
    p99 = min(l[1] for l in lat_runs)
    ing, ing_lo, ing_hi = best_spread([r[0] for r in ing_runs])
    cp, cp_lo, cp_hi = best_spread([r[1] for r in ing_runs])
    cps, cps_lo, cps_hi = best_spread([r[2] for r in ing_runs])
    dd, dd_lo, dd_hi = best_spread([r[3] for r in ing_runs])
    print(f"best of {n} runs (spread min..max)")
    print(f"refs/s publish->tail (batched, fsync per batch): {rps:,.0f} ({rps_lo:,.0f}..{rps_hi:,.0f})  (target >= 100,000: {rps / 100_000:.2f}x)")
    print(f"publish-to-visible latency: p50 {p50:.2f} ms ({p50_lo:.2f}..{p50_hi:.2f}), p99 {p99:.2f} ms  (target p50 <= 5 ms)")
    print(f"ingest {total / 1e6:.0f} MB in {a.files} .ckpt files, durable at exit (fsync + dir fsync): {ing:.2f} GB/s ({ing_lo:.2f}..{ing_hi:.2f})  (target >= 1 GB/s warm)")
    print(f"  vs cp -r + sync (durable, fair): {cps:.2f} GB/s ({cps_lo:.2f}..{cps_hi:.2f}) = {ing / cps:.2f}x")
    print(f"  vs cp -r (page cache only, not durable): {cp:.2f} GB/s ({cp_lo:.2f}..{cp_hi:.2f}) = {ing / cp:.2f}x")
    print(f"  disk ceiling (dd O_DIRECT from /dev/zero + fsync, same bytes): {dd:.2f} GB/s ({dd_lo:.2f}..{dd_hi:.2f}) = {ing / dd:.2f}x")
    print(json.dumps({"refs_per_s": rps, "latency_p50_ms": p50, "latency_p99_ms": p99, "ingest_gb_s": ing, "cp_gb_s": cp,
                      "cp_sync_gb_s": cps, "dd_direct_gb_s": dd, "ingest_vs_cp": ing / cp, "ingest_vs_cp_sync": ing / cps, "repeat": n,
                      "runs": {"refs_per_s": rps_runs, "latency_ms": lat_runs, "ingest_cp_cpsync_dd_gb_s": ing_runs}}))


if __name__ == "__main__":
    main()
