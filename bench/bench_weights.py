#!/usr/bin/env python3
"""Weight-plane benchmark: disagg's delta-diff / delta-apply against slime's encoder (numpy),
xdelta3 and zstd --patch-from, on one realistic RL-step checkpoint pair, in one run.

What it measures (see bench/README.md for the method):

* density and wire bytes of each publisher on the same OLD -> NEW pair;
* encode throughput in GB/s of NEW tensor bytes per wall second, page cache warm;
* delta-apply time (seed from a full version, then one delta) against ``cp -r`` of the
  checkpoint;
* peak anonymous memory (RssAnon sampled every ~5 ms from /proc) and VmHWM of each child;
* correctness: every delta is decoded independently (python zstandard/xxhash, i.e. the
  way slime's engine side reads it) and must rebuild NEW; after delta-apply the local
  checkpoint's tensors must equal NEW byte for byte. Any failure prints FAIL and exits 1.

Targets are printed as PASS/MISS; a MISS is information, not a failure.

Usage: bench/run.sh [--size-mb 512] [--bin-dir target/release] [--quick] [--skip-baselines]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import slime_numpy  # noqa: E402

MIB = 1 << 20
GB = 1e9

TARGETS = {
    "diff_speedup_vs_numpy": 8.0,  # disagg xor GB/s / numpy xor GB/s, >=
    "diff_gbps": 4.0,  # disagg delta-diff GB/s, >=
    "apply_over_cp": 1.0,  # delta-apply (one delta) seconds / cp -r seconds, <=
    "peak_anon_mib": 256.0,  # disagg tools, <=
}


class Failure(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Running a child with wall time and memory sampling


def _read_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


class Run:
    """Result of one measured child process."""

    def __init__(self, cmd, rc, seconds, stdout, stderr, peak_anon, peak_hwm, samples):
        self.cmd, self.rc, self.seconds = cmd, rc, seconds
        self.stdout, self.stderr = stdout, stderr
        self.peak_anon, self.peak_hwm, self.samples = peak_anon, peak_hwm, samples

    def json(self) -> dict:
        for line in reversed(self.stdout.strip().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
        raise Failure(f"no JSON object on stdout of {' '.join(self.cmd)}:\n{self.stdout}\n{self.stderr}")


def run_measured(cmd: list[str], check: bool = True, interval: float = 0.005, cwd=None) -> Run:
    """Run cmd; sample RssAnon/VmHWM every `interval` s; wall time from fork to reap."""
    out_path = os.path.join(WORK, f".stdout.{os.getpid()}")
    err_path = os.path.join(WORK, f".stderr.{os.getpid()}")
    with open(out_path, "w+b") as out, open(err_path, "w+b") as err:
        peak = {"RssAnon": 0, "VmHWM": 0}
        samples = [0]
        done = threading.Event()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd)

        def sampler():
            while not done.is_set():
                st = _read_status(p.pid)
                if st:
                    samples[0] += 1
                    peak["RssAnon"] = max(peak["RssAnon"], st.get("RssAnon", 0))
                    peak["VmHWM"] = max(peak["VmHWM"], st.get("VmHWM", 0))
                done.wait(interval)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        _, status, _ru = os.wait4(p.pid, 0)
        t1 = time.perf_counter()
        done.set()
        th.join()
        p.returncode = os.waitstatus_to_exitcode(status)
        # (ru.ru_maxrss is no use here: on Linux a child's maxrss starts from the RSS of this
        # parent at fork time, so it reports this big Python process instead of the tool)
        hwm = peak["VmHWM"]
        out.seek(0)
        err.seek(0)
        r = Run(cmd, p.returncode, t1 - t0, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                peak["RssAnon"], hwm, samples[0])
    os.remove(out_path)
    os.remove(err_path)
    if check and r.rc != 0:
        raise Failure(f"command failed (exit {r.rc}): {' '.join(cmd)}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")
    return r


# --------------------------------------------------------------------------------------------
# Helpers


def rmtree(p: str) -> None:
    shutil.rmtree(p, ignore_errors=True)


def dir_bytes(p: str) -> int:
    tot = 0
    for dp, _, fns in os.walk(p):
        for fn in fns:
            tot += os.path.getsize(os.path.join(dp, fn))
    return tot


def warm(paths: list[str]) -> None:
    """Read files so they are in the page cache."""
    for p in paths:
        files = [p] if os.path.isfile(p) else [os.path.join(dp, f) for dp, _, fs in os.walk(p) for f in fs]
        for fp in files:
            with open(fp, "rb", buffering=0) as f:
                while f.read(16 * MIB):
                    pass


def flush_dirty() -> None:
    """Write back dirty pages left by earlier steps so they are not billed to the next timing."""
    os.sync()


def compare_checkpoints(local: str, new: str) -> list[str]:
    """Tensor-by-tensor byte comparison (sharding may differ)."""
    a, b = slime_numpy.open_checkpoint(local), slime_numpy.open_checkpoint(new)
    problems = []
    if set(a) != set(b):
        problems.append(f"tensor sets differ: {sorted(set(a) ^ set(b))[:5]}")
    for name in sorted(set(a) & set(b)):
        ta, tb = a[name], b[name]
        if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
            problems.append(f"{name}: {ta.dtype}{ta.shape} vs {tb.dtype}{tb.shape}")
        elif not (ta.view.size == tb.view.size and (ta.view == tb.view).all()):
            problems.append(f"{name}: bytes differ from NEW")
    return problems


def files_equal(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 * MIB), fb.read(16 * MIB)
            if x != y:
                return False
            if not x:
                return True


def tool_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({e.__class__.__name__})"


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / GB / seconds if seconds > 0 else float("inf")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --------------------------------------------------------------------------------------------
# The benchmark


def ensure_pair(args) -> tuple[str, str, dict]:
    tag = f"pair-{args.size_mb:g}mb-seed{args.seed}-lr{args.lr:g}-shards{args.shards}"
    d = os.path.join(args.data_dir, tag)
    stats = os.path.join(d, "gen_stats.json")
    if not os.path.exists(stats):
        print(f"generating {args.size_mb:g} MiB checkpoint pair in {d} ...", flush=True)
        rmtree(d)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "testdata", "gen_rl_pair.py"), "--out", d,
                        "--size-mb", str(args.size_mb), "--steps", "1", "--shards", str(args.shards),
                        "--lr", str(args.lr), "--seed", str(args.seed), "--quiet"], check=True)
        print(f"  generated in {time.perf_counter() - t0:.1f} s", flush=True)
    else:
        print(f"reusing checkpoint pair {d}", flush=True)
    with open(stats) as f:
        return os.path.join(d, "step_0"), os.path.join(d, "step_1"), json.load(f)


def entropy_bound(old: str, new: str) -> dict:
    """Order-0 entropy estimate of the change, for bf16 pairs: per tensor, changed positions as
    Bernoulli(density of that tensor), plus the new value given the old one as the empirical
    distribution of (new bits - old bits) over all changed elements. Cached beside the pair."""
    import math

    import numpy as np

    cache = os.path.join(os.path.dirname(new), "entropy_bound.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    a, b = slime_numpy.open_checkpoint(old), slime_numpy.open_checkpoint(new)
    pos_bits = 0.0
    hist: dict[int, int] = {}
    changed = total = 0
    for name, t in b.items():
        if t.dtype != "BF16":
            continue
        x, y = a[name].view.view(np.uint16), t.view.view(np.uint16)
        n = x.size
        mask = x != y
        c = int(np.count_nonzero(mask))
        total += n
        changed += c
        if 0 < c < n:
            p = c / n
            pos_bits += n * (-p * math.log2(p) - (1 - p) * math.log2(1 - p))
        if c:
            d = y[mask].astype(np.int32) - x[mask].astype(np.int32)
            vals, cnts = np.unique(d, return_counts=True)
            for v, k in zip(vals.tolist(), cnts.tolist()):
                hist[v] = hist.get(v, 0) + k
    val_bits = 0.0
    for k in hist.values():
        val_bits -= k * math.log2(k / changed)
    out = {"bytes": int((pos_bits + val_bits) / 8), "position_bytes": int(pos_bits / 8),
           "value_bytes": int(val_bits / 8), "changed_elements": changed, "elements": total,
           "distinct_deltas": len(hist)}
    with open(cache, "w") as f:
        json.dump(out, f, indent=2)
    return out


def attempts(args) -> list[str]:
    return ["warmup"] + [f"rep{i}" for i in range(args.repeat)]


def bench_disagg_diff(args, old, new, res) -> None:
    diff = os.path.join(args.bin_dir, "delta-diff")
    # The default (--input-read auto) for both encodings, then xor with each read mode forced, so
    # the report shows what auto chose against the other in the same run (same bytes, tested).
    for enc, mode in (("xor", "auto"), ("overwrite", "auto"), ("xor", "mmap"), ("xor", "pread")):
        name = f"disagg-{enc}" if mode == "auto" else f"disagg-{enc}/{mode}"
        times, best, anon, hwm = [], None, 0, 0
        for attempt in attempts(args):
            pub = os.path.join(WORK, f"diff-{enc}-{attempt}")
            rmtree(pub)
            flush_dirty()
            r = run_measured([diff, old, new, "--publish", pub, "--version", "2", "--base-version", "1",
                              "--encoding", enc, "--input-read", mode, "--json"])
            if attempt != "warmup":
                times.append(r.seconds)
                anon, hwm = max(anon, r.peak_anon), max(hwm, r.peak_hwm)
                if best is None or r.seconds < best[0].seconds:
                    best = (r, pub)
        r, pub = best
        j = r.json()
        vdir = os.path.join(pub, "weight_v000002")
        problems = slime_numpy.verify_delta(old, new, vdir) if mode == "auto" else []
        if problems:
            raise Failure(f"delta-diff --encoding {enc} output does not decode to NEW "
                          f"(python zstandard/xxhash):\n  " + "\n  ".join(problems[:10]))
        res["diff"][name] = {
            "seconds": r.seconds, "all_seconds": times, "tool_json": j, "gbps": gbps(j["total_bytes"], r.seconds),
            "wire_bytes": j["wire_bytes"], "wire_bytes_on_disk": dir_bytes(vdir), "density": j["density"],
            "changed_bytes": j["changed_bytes"], "total_bytes": j["total_bytes"],
            "tensors_changed": j.get("tensors_changed"), "tensors_total": j.get("tensors_total"),
            "peak_anon": anon, "peak_hwm": hwm, "verified": mode == "auto", "input_read": j.get("input_read"),
        }
        for attempt in attempts(args):
            rmtree(os.path.join(WORK, f"diff-{enc}-{attempt}"))


def bench_read_ceiling(args, old, new, res) -> None:
    """Reading OLD and NEW once on every core, nothing else (bench/read_ceiling.rs), through
    mmap and through pread into small buffers (how delta-diff reads): the faster of the two is
    the memory-system ceiling any diff of this pair runs under on this host."""
    tool = os.path.join(args.bin_dir, "examples", "read_ceiling")
    if not os.access(tool, os.X_OK):
        print(f"note: {tool} not built (cargo build --release --example read_ceiling); no read ceiling", flush=True)
        return
    by_mode = {}
    for mode in ("mmap", "pread"):
        # Timed like delta-diff: wall seconds of a child process (start and exit included), best run.
        runs = [run_measured([tool, old, new, "1", mode]) for _ in attempts(args)][1:]  # the first is the warm-up
        best = min(runs, key=lambda r: r.seconds)
        j = json.loads(best.stdout)
        by_mode[mode] = {"seconds": best.seconds, "gbps": gbps(j["bytes"], best.seconds), "differing": j["differing"],
                         "all_seconds": [r.seconds for r in runs]}
    mode = min(by_mode, key=lambda m: by_mode[m]["seconds"])
    res["ceiling"] = dict(by_mode[mode], mode=mode, modes=by_mode)


def bench_numpy(args, old, new, res) -> None:
    for enc in ("xor", "overwrite"):
        times, best, anon, hwm = [], None, 0, 0
        for attempt in attempts(args):
            pub = os.path.join(WORK, f"numpy-{enc}-{attempt}")
            rmtree(pub)
            flush_dirty()
            r = run_measured([sys.executable, os.path.join(HERE, "slime_numpy.py"), old, new, "--publish", pub,
                              "--version", "2", "--base-version", "1", "--encoding", enc, "--json"])
            if attempt != "warmup":
                sec = r.json()["seconds"]
                times.append(sec)
                anon, hwm = max(anon, r.peak_anon), max(hwm, r.peak_hwm)
                if best is None or sec < best[2]:
                    best = (r, pub, sec)
        r, pub, _ = best
        j = r.json()
        vdir = os.path.join(pub, "weight_v000002")
        problems = slime_numpy.verify_delta(old, new, vdir)
        if problems:
            raise Failure(f"numpy encoder ({enc}) output does not decode to NEW:\n  " + "\n  ".join(problems[:10]))
        # GB/s from the encoder's own clock: slime encodes inside a long-lived trainer process, so
        # interpreter start-up and imports (~0.1-0.2 s here) are not billed to it
        res["diff"][f"numpy-{enc}"] = {
            "seconds": j["seconds"], "all_seconds": times, "process_seconds": r.seconds,
            "gbps": gbps(j["total_bytes"], j["seconds"]),
            "wire_bytes": j["wire_bytes"], "wire_bytes_on_disk": dir_bytes(vdir), "density": j["density"],
            "changed_bytes": j["changed_bytes"], "total_bytes": j["total_bytes"],
            "tensors_changed": j["tensors_changed"], "tensors_total": j["tensors_total"], "workers": j["workers"],
            "peak_anon": anon, "peak_hwm": hwm, "verified": True,
        }
        for attempt in attempts(args):
            rmtree(os.path.join(WORK, f"numpy-{enc}-{attempt}"))


def _shard_files(d: str) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))


def bench_generic(args, old, new, res) -> None:
    """xdelta3 and zstd --patch-from, one patch per safetensors file (same names in OLD/NEW)."""
    names = _shard_files(new)
    if names != _shard_files(old):
        raise Failure("OLD and NEW have different file names; generic tools need file pairs")
    out = os.path.join(WORK, "generic")
    rmtree(out)
    os.makedirs(out)
    total_new = sum(os.path.getsize(os.path.join(new, n)) for n in names)
    tools = {}
    if shutil.which("xdelta3"):
        def xd_enc(o, n, p):
            # source window covering the whole reference (xdelta3's default is 64 MiB)
            b = 1 << max(24, (os.path.getsize(o) - 1).bit_length())
            return ["xdelta3", "-e", "-f", "-B", str(min(b, 1 << 31)), "-s", o, n, p]

        def xd_dec(o, p, x):
            b = 1 << max(24, (os.path.getsize(o) - 1).bit_length())
            return ["xdelta3", "-d", "-f", "-B", str(min(b, 1 << 31)), "-s", o, p, x]

        tools["xdelta3"] = (xd_enc, xd_dec)
    else:
        print("  xdelta3 not installed: skipped (bench/run.sh installs it)")
    if shutil.which("zstd"):
        # --patch-from sizes the window to the reference itself; --long=31 keeps long-distance
        # matching on and lets files up to the 2 GiB reference cap work; decode needs the
        # same --long (or --memory) to accept the large window.
        def zs_enc(o, n, p):
            return ["zstd", "-q", "-f", "--long=31", f"--patch-from={o}", n, "-o", p]

        def zs_dec(o, p, x):
            return ["zstd", "-q", "-d", "-f", "--long=31", f"--patch-from={o}", p, "-o", x]

        tools["zstd-patch-from"] = (zs_enc, zs_dec)
    else:
        print("  zstd not installed: skipped")
    big = [n for n in names if os.path.getsize(os.path.join(old, n)) >= 2 << 30]
    for tool, (enc, dec) in tools.items():
        secs = 0.0
        wire = 0
        anon = hwm = 0
        for n in names:
            o, nw = os.path.join(old, n), os.path.join(new, n)
            patch = os.path.join(out, n + "." + tool)
            flush_dirty()
            r = run_measured(enc(o, nw, patch))
            secs += r.seconds
            wire += os.path.getsize(patch)
            anon, hwm = max(anon, r.peak_anon), max(hwm, r.peak_hwm)
            x = os.path.join(out, n + ".decoded")
            run_measured(dec(o, patch, x))
            if not files_equal(x, nw):
                raise Failure(f"{tool} patch of {n} does not decode to NEW")
            os.remove(x)
            os.remove(patch)
        res["diff"][tool] = {
            "seconds": secs, "gbps": gbps(total_new, secs), "wire_bytes": wire, "total_bytes": total_new,
            "peak_anon": anon, "peak_hwm": hwm, "files": len(names), "verified": True,
            "note": ("files >= 2 GiB exceed zstd's --patch-from reference cap: " + ", ".join(big)) if big and tool.startswith("zstd") else "",
        }
    rmtree(out)


def bench_apply(args, old, new, res) -> None:
    diff = os.path.join(args.bin_dir, "delta-diff")
    apply = os.path.join(args.bin_dir, "delta-apply")
    # Durable (the default) for both encodings, and xor with --no-fsync: the version recorded
    # once LOCAL's bytes are in the page cache, which is what `cp -r` waits for too.
    for enc, extra in (("xor", []), ("overwrite", []), ("xor", ["--no-fsync"])):
        name = enc + "".join(" " + e for e in extra)
        src = os.path.join(WORK, f"src-{enc}")
        rmtree(src)
        # v1 = full copy of OLD, v2 = delta OLD -> NEW on top of it
        run_measured([diff, old, old, "--publish", src, "--version", "1", "--full", "--json"])
        run_measured([diff, old, new, "--publish", src, "--version", "2", "--base-version", "1",
                      "--encoding", enc, "--json"])
        seeds, steps = [], []
        for attempt in attempts(args):
            local = os.path.join(WORK, f"local-{enc}")
            rmtree(local)
            flush_dirty()
            seed = run_measured([apply, "--local", local, "--base", old, "--source", src, "--target", "1", "--json"] + extra)
            flush_dirty()
            step = run_measured([apply, "--local", local, "--base", old, "--source", src, "--target", "2", "--json"] + extra)
            problems = compare_checkpoints(local, new)
            if problems:
                raise Failure(f"after delta-apply --target 2 ({enc}) LOCAL differs from NEW:\n  "
                              + "\n  ".join(problems[:10]))
            with open(os.path.join(local, ".weight_sync", "state.json")) as f:
                state = json.load(f)
            if state.get("version") != "000002":
                raise Failure(f"state.json after apply says {state!r}, want version 000002")
            if attempt != "warmup":
                seeds.append(seed)
                steps.append(step)
        seed = min(seeds, key=lambda r: r.seconds)
        step = min(steps, key=lambda r: r.seconds)
        res["apply"][name] = {
            "seed_seconds": seed.seconds, "seed_all_seconds": [r.seconds for r in seeds], "seed_json": seed.json(),
            "seed_peak_anon": max(r.peak_anon for r in seeds), "seed_peak_hwm": max(r.peak_hwm for r in seeds),
            "apply_seconds": step.seconds, "apply_all_seconds": [r.seconds for r in steps], "apply_json": step.json(),
            "apply_peak_anon": max(r.peak_anon for r in steps), "apply_peak_hwm": max(r.peak_hwm for r in steps),
            "verified": True,
        }
        rmtree(local)
        rmtree(src)


def bench_cp(args, new, res) -> None:
    dst = os.path.join(WORK, "cp-dst")
    plain, durable = [], []
    for attempt in attempts(args):
        rmtree(dst)
        flush_dirty()
        r = run_measured(["cp", "-r", new, dst])
        if attempt != "warmup":
            plain.append(r.seconds)
        res["cp"]["bytes"] = dir_bytes(dst)
        # the durable variant: cp -r then fsync every file (what an apply that fsyncs has to pay)
        rmtree(dst)
        flush_dirty()
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", new, dst], check=True)
        for dp, _, fns in os.walk(dst):
            for fn in fns:
                fd = os.open(os.path.join(dp, fn), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        if attempt != "warmup":
            durable.append(time.perf_counter() - t0)
    # What the disk takes to absorb every byte of NEW, which a durable apply must write when
    # every page changes, as it does on RL deltas: overwrite a preallocated file of NEW's size
    # in place with O_DIRECT writes, 16 MiB each, 4 in flight (deeper queues gained nothing
    # here), then fsync; no page cache, no CPU work besides submitting. Plain `cp` writes
    # nothing to disk at all. A reference, not a hard floor: the kernel's own writeback can
    # drive a virtual disk somewhat harder than this.
    device = device_write_seconds(args, dir_bytes(new))
    res["cp"].update(cp_seconds=min(plain), cp_all_seconds=plain, cp_fsync_seconds=min(durable),
                     cp_fsync_all_seconds=durable, device_write_seconds=device)
    rmtree(dst)


def device_write_seconds(args, nbytes: int):
    """Seconds (best of the attempts) to overwrite `nbytes` in place with O_DIRECT, or None where
    the file system refuses O_DIRECT (tmpfs, some network mounts)."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor
    block = 16 << 20
    n = (nbytes + block - 1) // block * block
    path = os.path.join(WORK, "device-floor.bin")
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(block))
    with open(path, "wb") as f:  # allocate every block first: the apply overwrites in place
        for _ in range(n // block):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except (OSError, AttributeError):  # AttributeError: a platform without O_DIRECT
        os.unlink(path)
        return None
    times = []
    try:
        for attempt in attempts(args):
            flush_dirty()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(4) as ex:
                list(ex.map(lambda off: os.pwrite(fd, buf, off), range(0, n, block)))
            os.fsync(fd)
            if attempt != "warmup":
                times.append(time.perf_counter() - t0)
    except OSError:
        return None
    finally:
        os.close(fd)
        os.unlink(path)
    return min(times) * nbytes / n
# --------------------------------------------------------------------------------------------
# Report


def fmt_s(s) -> str:
    return "no O_DIRECT here" if s is None else f"{s:.3f} s"


def fmt_mib(b) -> str:
    return "-" if b in (None, 0) else f"{b / MIB:7.1f}"


def report(res: dict) -> list[str]:
    lines = []
    p = res["pair"]
    lines.append(f"pair: {p['total_bytes'] / MIB:.1f} MiB bf16 ({p['total_bytes'] / GB:.3f} GB), "
                 f"{p['tensors']} tensors, {p['shards']} shards, hidden {p['config']['hidden']}, "
                 f"{p['config']['layers']} layers, lr {p['lr']:g}; generator element density "
                 f"{p['element_density'] * 100:.2f} %, byte density {p['byte_density'] * 100:.2f} %")
    la = res["env"].get("loadavg_start", (0, 0, 0))[0], res["env"].get("loadavg_end", (0, 0, 0))[0]
    lines.append(f"host: {res['env']['cpus']} CPUs, {res['env']['cpu_model']}; load average {la[0]:.2f} at start, "
                 f"{la[1]:.2f} at end; times are the fastest of {res['env']['repeat']} after a warm-up")
    lines.append("")
    hdr = f"{'encoder':<20} {'density':>8} {'wire MiB':>9} {'wire %':>7} {'secs':>7} {'GB/s':>7} {'anon MiB':>9} {'HWM MiB':>8}"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for name, d in res["diff"].items():
        dens = f"{d['density'] * 100:6.2f} %" if d.get("density") is not None else "      - "
        if name == "entropy-bound":
            lines.append(f"{'(order-0 entropy)':<20} {'':>8} {d['wire_bytes'] / MIB:9.2f} "
                         f"{100 * d['wire_bytes'] / d['total_bytes']:6.2f}%   (positions + new|old value, estimate)")
            continue
        lines.append(f"{name:<20} {dens:>8} {d['wire_bytes'] / MIB:9.2f} {100 * d['wire_bytes'] / d['total_bytes']:6.2f}% "
                     f"{d['seconds']:7.3f} {d['gbps']:7.2f} {fmt_mib(d['peak_anon']):>9} {fmt_mib(d['peak_hwm']):>8}")
    if res.get("ceiling"):
        c = res["ceiling"]
        lines.append(f"{'(read ceiling)':<20} {'':>8} {'':>9} {'':>7} {c['seconds']:7.3f} {c['gbps']:7.2f}   "
                     f"(read + compare OLD and NEW once on every core, nothing else; best of "
                     + ", ".join(f"{m} {v['seconds']:.3f} s" for m, v in c.get("modes", {}).items()) + ")")
    for name, d in res["diff"].items():
        ph = {k[8:]: v for k, v in (d.get("tool_json") or {}).items() if k.startswith("seconds_")}
        if ph:
            lines.append(f"  {name} phases (tool clock, s): " + ", ".join(f"{k} {v:.3f}" for k, v in ph.items())
                         + (f"; input read {d['input_read']}" if d.get("input_read") else ""))
    if res["apply"]:
        lines.append("")
        hdr = f"{'apply':<20} {'seed s':>8} {'delta s':>8} {'anon MiB':>9} {'HWM MiB':>8}   (delta step; seed anon/HWM)"
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for enc, a in res["apply"].items():
            lines.append(f"delta-apply {enc:<8} {a['seed_seconds']:8.3f} {a['apply_seconds']:8.3f} "
                         f"{fmt_mib(a['apply_peak_anon']):>9} {fmt_mib(a['apply_peak_hwm']):>8}   "
                         f"seed {fmt_mib(a['seed_peak_anon']).strip()}/{fmt_mib(a['seed_peak_hwm']).strip()}")
        for enc, a in res["apply"].items():
            for part in ("seed", "apply"):
                ph = {k[8:]: v for k, v in (a.get(f"{part}_json") or {}).items() if k.startswith("seconds_")}
                if ph:
                    lines.append(f"  {enc} --target {1 if part == 'seed' else 2} phases (tool clock, s): "
                                 + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()))
        c = res["cp"]
        lines.append(f"{'cp -r NEW':<20} {c['cp_seconds']:8.3f}   (cp -r + fsync of every file: {c['cp_fsync_seconds']:.3f} s; "
                     f"O_DIRECT write of NEW's bytes + fsync: {fmt_s(c.get('device_write_seconds'))})")
    lines.append("")
    lines.append("ratios and targets")
    for t in res["targets"]:
        lines.append(f"  {t['name']:<52} {t['value']:>9.3f} {t['op']} {t['target']:<6g} {t['verdict']}")
    for k, v in res.get("ratios", {}).items():
        lines.append(f"  {k:<52} {v:>9.3f}")
    return lines


def compute_targets(res) -> None:
    d, a, c = res["diff"], res["apply"], res["cp"]
    t = []
    r = res["ratios"] = {}

    def add(name, value, op, target):
        ok = value >= target if op == ">=" else value <= target
        t.append({"name": name, "value": value, "op": op, "target": target, "verdict": verdict(ok)})

    if "disagg-xor" in d:
        if "numpy-xor" in d:
            add("delta-diff xor GB/s / numpy xor GB/s", d["disagg-xor"]["gbps"] / d["numpy-xor"]["gbps"], ">=",
                TARGETS["diff_speedup_vs_numpy"])
        if "numpy-overwrite" in d and "disagg-overwrite" in d:
            add("delta-diff overwrite GB/s / numpy overwrite GB/s",
                d["disagg-overwrite"]["gbps"] / d["numpy-overwrite"]["gbps"], ">=", TARGETS["diff_speedup_vs_numpy"])
        for enc in ("xor", "overwrite"):
            if f"disagg-{enc}" in d:
                add(f"delta-diff {enc} GB/s", d[f"disagg-{enc}"]["gbps"], ">=", TARGETS["diff_gbps"])
        for enc in ("xor", "overwrite", "xor --no-fsync"):
            if enc in a:
                add(f"delta-apply {enc} s / cp -r s", a[enc]["apply_seconds"] / c["cp_seconds"], "<=",
                    TARGETS["apply_over_cp"])
        for enc in ("xor", "overwrite"):
            if f"disagg-{enc}" in d:
                add(f"delta-diff {enc} peak RssAnon MiB", d[f"disagg-{enc}"]["peak_anon"] / MIB, "<=",
                    TARGETS["peak_anon_mib"])
            if enc in a:
                add(f"delta-apply {enc} peak RssAnon MiB (delta / seed)",
                    max(a[enc]["apply_peak_anon"], a[enc]["seed_peak_anon"]) / MIB, "<=", TARGETS["peak_anon_mib"])
        for enc in ("xor", "overwrite"):
            if f"numpy-{enc}" in d and f"disagg-{enc}" in d:
                r[f"wire bytes disagg-{enc} / numpy-{enc}"] = d[f"disagg-{enc}"]["wire_bytes"] / d[f"numpy-{enc}"]["wire_bytes"]
        r["wire bytes disagg-xor / order-0 entropy estimate"] = d["disagg-xor"]["wire_bytes"] / d["entropy-bound"]["wire_bytes"]
        if res.get("ceiling"):
            for enc in ("xor", "overwrite"):
                if f"disagg-{enc}" in d:
                    r[f"delta-diff {enc} GB/s / read ceiling GB/s"] = d[f"disagg-{enc}"]["gbps"] / res["ceiling"]["gbps"]
            if "numpy-xor" in d:
                r["read ceiling GB/s / numpy xor GB/s (the most any diff can gain)"] = res["ceiling"]["gbps"] / d["numpy-xor"]["gbps"]
        if "disagg-xor/mmap" in d and "disagg-xor/pread" in d:
            r["delta-diff xor s, --input-read pread / mmap (auto chose "
              + str(d["disagg-xor"].get("input_read")) + ")"] = d["disagg-xor/pread"]["seconds"] / d["disagg-xor/mmap"]["seconds"]
        for tool in ("xdelta3", "zstd-patch-from"):
            if tool in d:
                r[f"wire bytes {tool} / disagg-xor"] = d[tool]["wire_bytes"] / d["disagg-xor"]["wire_bytes"]
                r[f"GB/s disagg-xor / {tool}"] = d["disagg-xor"]["gbps"] / d[tool]["gbps"]
        if c.get("device_write_seconds"):
            r["O_DIRECT write of NEW s / cp -r s"] = c["device_write_seconds"] / c["cp_seconds"]
        for enc in ("xor", "overwrite"):
            if enc in a:
                r[f"delta-apply {enc} s / (cp -r + fsync) s"] = a[enc]["apply_seconds"] / c["cp_fsync_seconds"]
                if c.get("device_write_seconds"):
                    r[f"delta-apply {enc} s / O_DIRECT write of NEW s"] = a[enc]["apply_seconds"] / c["device_write_seconds"]
    res["targets"] = t


def main(argv=None) -> int:
    global WORK
    ap = argparse.ArgumentParser(description="disagg weight-plane benchmark")
    ap.add_argument("--size-mb", type=float, default=512, help="checkpoint size in MiB (default 512)")
    ap.add_argument("--bin-dir", default="target/release", help="where delta-diff/delta-apply are (default target/release)")
    ap.add_argument("--quick", action="store_true", help="smoke run on a 16 MiB pair")
    ap.add_argument("--skip-baselines", action="store_true", help="skip xdelta3 and zstd --patch-from")
    ap.add_argument("--skip-disagg", action="store_true", help="only the numpy/generic baselines (no Rust tools)")
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "bench-data"))
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed runs per measurement after one warm-up; the fastest is reported (default 3)")
    ap.add_argument("--json-out", help="results file (default DATA_DIR/results-weights.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_mb = 16
    args.bin_dir = os.path.abspath(os.path.join(ROOT, args.bin_dir))
    args.data_dir = os.path.abspath(args.data_dir)
    os.makedirs(args.data_dir, exist_ok=True)
    WORK = os.path.join(args.data_dir, "work")
    rmtree(WORK)
    os.makedirs(WORK)
    if not args.skip_disagg:
        for b in ("delta-diff", "delta-apply"):
            if not os.access(os.path.join(args.bin_dir, b), os.X_OK):
                print(f"FAIL: {os.path.join(args.bin_dir, b)} not found; build with `cargo build --release` "
                      f"or pass --bin-dir", file=sys.stderr)
                return 2

    old, new, gen = ensure_pair(args)
    step = gen["per_step"][0]
    res = {
        "pair": {**{k: gen[k] for k in ("total_bytes", "tensors", "shards", "config", "lr", "seed")},
                 "element_density": step["element_density"], "byte_density": step["byte_density"],
                 "old": old, "new": new},
        "env": {
            "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "kernel": platform.release(),
            "python": platform.python_version(), "numpy": __import__("numpy").__version__,
            "zstandard": __import__("zstandard").__version__,
            "xdelta3": tool_version(["xdelta3", "-V"]), "zstd": tool_version(["zstd", "--version"]),
            "bin_dir": args.bin_dir, "git": _git_rev(), "repeat": args.repeat,
        },
        "diff": {}, "apply": {}, "cp": {},
    }
    t0 = time.perf_counter()
    res["env"]["loadavg_start"] = os.getloadavg()
    if res["env"]["loadavg_start"][0] > 0.5:
        print(f"note: 1-min load average is {res['env']['loadavg_start'][0]:.2f}; timings will be noisy", flush=True)
    try:
        warm([old, new])
        eb = entropy_bound(old, new)
        res["diff"]["entropy-bound"] = {"seconds": None, "gbps": None, "wire_bytes": eb["bytes"],
                                        "total_bytes": res["pair"]["total_bytes"], "peak_anon": 0, "peak_hwm": 0,
                                        "detail": eb}
        if not args.skip_disagg:
            print("read ceiling ...", flush=True)
            bench_read_ceiling(args, old, new, res)
            print("delta-diff ...", flush=True)
            bench_disagg_diff(args, old, new, res)
        print("numpy (slime) encoder ...", flush=True)
        bench_numpy(args, old, new, res)
        if not args.skip_baselines:
            print("xdelta3 / zstd --patch-from ...", flush=True)
            bench_generic(args, old, new, res)
        if not args.skip_disagg:
            print("delta-apply and cp -r ...", flush=True)
            bench_apply(args, old, new, res)
            bench_cp(args, new, res)
    except Failure as e:
        print(f"FAIL: {e}", file=sys.stderr)
        res["failure"] = str(e)
        _write(args, res)
        return 1
    finally:
        rmtree(WORK)
    res["bench_seconds"] = time.perf_counter() - t0
    res["env"]["loadavg_end"] = os.getloadavg()
    compute_targets(res)
    dens = {k: v["density"] for k, v in res["diff"].items() if v.get("density") is not None}
    if len({round(v, 12) for v in dens.values()}) > 1:
        print(f"note: publishers disagree on density: {dens}")
    print()
    print("\n".join(report(res)))
    path = _write(args, res)
    print(f"\nresults: {path}")
    return 0


def _write(args, res) -> str:
    path = args.json_out or os.path.join(args.data_dir, "results-weights.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


WORK = ""

if __name__ == "__main__":
    sys.exit(main())
