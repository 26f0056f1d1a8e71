#!/usr/bin/env python3
"""A numpy re-implementation of slime's disk-delta encoder, the baseline for bench_weights.py.

It follows slime's trainer-side publisher (``UpdateWeightFromDiskDelta._encode_delta`` and
``_write_delta_files``, helpers in ``slime/utils/disk_delta.py``) step for step, in one
process:

* per tensor, on the raw bytes viewed as uint8: ``xor`` = ``new ^ old``; ``overwrite`` =
  u32 LE count, u32 LE positions of changed bytes, new values;
* unchanged tensors are skipped; changed ones are compressed with
  ``zstandard.ZstdCompressor(level=1).compress(diff)`` (one frame, content size recorded);
* the checksum of the tensor's new bytes (``xxhash.xxh3_128`` hexdigest by default);
* tensors are processed by a thread pool of ``min(32, cpu_count)`` workers (slime's
  ``NUM_WORKERS``; numpy and zstd release the GIL), and every compressed payload is held in
  memory until the end;
* one file ``model-00000-of-00001.safetensors`` (each entry dtype U8, 1-D, ``__metadata__``
  = name -> checksum) built in memory and written tmp -> fsync -> rename, then the index
  ``model.safetensors.index.json`` with the delta ``metadata`` block, written last.

Differences from slime, all in slime's favour or neutral: the old and new checkpoints are
read through mmap from the page cache (slime keeps the old version as an in-RAM uint8
snapshot, i.e. one more model-sized anonymous allocation, and copies the new tensor out of
a pinned GPU->CPU buffer); the ``--full`` publish and the hooks are not implemented.

Also provides ``open_checkpoint`` (mmap'd tensor views of an HF checkpoint dir) and
``verify_delta`` (decode a published delta with python zstandard/xxhash, check it against
OLD and NEW) which bench_weights.py uses to check the Rust tools' output for slime
compatibility.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from collections import deque

import numpy as np

NUM_WORKERS = min(32, (os.cpu_count() or 8))


# --------------------------------------------------------------------------------------------
# Reading HF checkpoints


class Tensor:
    __slots__ = ("name", "dtype", "shape", "file", "view")

    def __init__(self, name, dtype, shape, file, view):
        self.name, self.dtype, self.shape, self.file, self.view = name, dtype, shape, file, view


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header dict, data start offset) of one safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > 100 << 20:
            raise ValueError(f"{path}: header length {n} too large")
        hdr = json.loads(f.read(n))
    return hdr, 8 + n


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint dir (via its index when present) or a single file."""
    if os.path.isfile(path):
        return [path]
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
        return [os.path.join(path, fn) for fn in sorted(set(wm.values()))]
    return sorted(os.path.join(path, fn) for fn in os.listdir(path) if fn.endswith(".safetensors"))


def open_checkpoint(path: str) -> dict[str, Tensor]:
    """name -> Tensor whose ``view`` is a read-only uint8 numpy view over the mmap'd file."""
    out: dict[str, Tensor] = {}
    for fp in checkpoint_files(path):
        hdr, start = read_safetensors_header(fp)
        size = os.path.getsize(fp)
        if size == 0:
            continue
        with open(fp, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mm, dtype=np.uint8)
        for name, meta in hdr.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            out[name] = Tensor(name, meta["dtype"], tuple(meta["shape"]), fp, buf[start + a : start + b])
    return out


def file_metadata(path: str) -> dict:
    return read_safetensors_header(path)[0].get("__metadata__", {}) or {}


# --------------------------------------------------------------------------------------------
# slime's helpers


def overwrite_encode(new: np.ndarray, changed_mask: np.ndarray) -> np.ndarray:
    pos = np.flatnonzero(changed_mask).astype("<u4")
    return np.concatenate([np.array([pos.size], "<u4").view(np.uint8), pos.view(np.uint8), new[changed_mask]])


def checksum(algorithm: str, buf) -> str:
    if algorithm == "xxh3-128":
        import xxhash

        return xxhash.xxh3_128(buf).hexdigest()
    if algorithm == "blake3":
        import blake3  # optional

        return blake3.blake3(buf).hexdigest()
    if algorithm == "adler32":
        return f"{zlib.adler32(buf):08x}"
    raise KeyError(f"unknown checksum algorithm {algorithm!r}")


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """What ``safetensors.numpy.save`` returns for 1-D uint8 arrays: one blob in memory."""
    hdr: dict = {"__metadata__": metadata}
    off = 0
    for name, arr in tensors.items():
        hdr[name] = {"dtype": "U8", "shape": [int(arr.size)], "data_offsets": [off, off + int(arr.size)]}
        off += int(arr.size)
    js = json.dumps(hdr, separators=(",", ":")).encode()
    js += b" " * ((-len(js)) % 8)
    return b"".join([struct.pack("<Q", len(js)), js, *(memoryview(a) for a in tensors.values())])


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Encoder


def encode(old_dir, new_dir, publish, version, base_version=None, encoding="xor", checksum_alg="xxh3-128",
           workers=NUM_WORKERS) -> dict:
    import zstandard

    t0 = time.perf_counter()
    old, new = open_checkpoint(old_dir), open_checkpoint(new_dir)
    if set(old) != set(new):
        raise SystemExit(f"incompatible checkpoints: tensor sets differ ({len(old)} vs {len(new)})")
    for name, t in new.items():
        o = old[name]
        if (o.dtype, o.shape) != (t.dtype, t.shape):
            raise SystemExit(f"incompatible tensor {name}: {o.dtype}{o.shape} vs {t.dtype}{t.shape}")
    base_version = version - 1 if base_version is None else base_version
    vdir = os.path.join(publish, f"weight_v{version:06d}")
    os.makedirs(vdir, exist_ok=False)

    def diff_and_compress(name):
        n, o = new[name].view, old[name].view
        if encoding == "xor":
            diff = n ^ o
            changed = int(np.count_nonzero(diff))
        elif encoding == "overwrite":
            mask = n != o
            changed = int(np.count_nonzero(mask))
            diff = overwrite_encode(n, mask)
        else:
            raise ValueError(f"unknown delta encoding {encoding!r}")
        if not changed:
            return name, None, None, 0
        compressed = np.frombuffer(zstandard.ZstdCompressor(level=1).compress(diff), dtype=np.uint8)
        return name, compressed, checksum(checksum_alg, n), changed

    delta: dict[str, np.ndarray] = {}
    sums: dict[str, str] = {}
    changed_bytes = total_bytes = 0

    def collect(fut):
        nonlocal changed_bytes
        name, compressed, digest, changed = fut.result()
        if changed:
            changed_bytes += changed
            delta[name] = compressed
            sums[name] = digest

    pool = ThreadPoolExecutor(max_workers=workers)
    inflight: deque = deque()
    try:
        for name in new:
            total_bytes += new[name].view.size
            inflight.append(pool.submit(diff_and_compress, name))
            if len(inflight) >= 2 * workers:
                collect(inflight.popleft())
        while inflight:
            collect(inflight.popleft())
    finally:
        pool.shutdown()

    wire = 0
    fname = None
    if delta:
        fname = "model-00000-of-00001.safetensors"
        blob = safetensors_bytes(delta, sums)
        wire += len(blob)
        _atomic_write(os.path.join(vdir, fname), blob)
        del blob
    index = {
        "metadata": {
            "version": f"{version:06d}",
            "base_version": f"{base_version:06d}",
            "delta_encoding": encoding,
            "compression_format": "zstd",
            "checksum_format": checksum_alg,
        },
        "weight_map": {name: fname for name in delta},
    }
    idx_bytes = json.dumps(index).encode()
    _atomic_write(os.path.join(vdir, "model.safetensors.index.json"), idx_bytes)
    wire += len(idx_bytes)
    return {
        "version": version,
        "base_version": base_version,
        "encoding": encoding,
        "checksum": checksum_alg,
        "workers": workers,
        "total_bytes": total_bytes,
        "changed_bytes": changed_bytes,
        "density": changed_bytes / max(1, total_bytes),
        "tensors_total": len(new),
        "tensors_changed": len(delta),
        "wire_bytes": wire,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# Independent decoder used to check any publisher's output (ours or the Rust tools')


def verify_delta(old_dir: str, new_dir: str, version_dir: str) -> list[str]:
    """Decode a delta version with python zstandard/xxhash and check it reproduces NEW from OLD.

    Returns a list of problems (empty when the delta is slime-compatible and exact)."""
    import zstandard

    problems: list[str] = []
    with open(os.path.join(version_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    md = index.get("metadata", {})
    enc, alg = md.get("delta_encoding"), md.get("checksum_format")
    for key in ("version", "base_version", "delta_encoding", "compression_format", "checksum_format"):
        if key not in md:
            problems.append(f"index metadata lacks {key!r}")
    if md.get("compression_format") != "zstd":
        problems.append(f"compression_format {md.get('compression_format')!r}")
    old, new = open_checkpoint(old_dir), open_checkpoint(new_dir)
    wm = index.get("weight_map", {})
    dz = zstandard.ZstdDecompressor()
    by_file: dict[str, list[str]] = {}
    for name, fn in wm.items():
        by_file.setdefault(fn, []).append(name)
    for fn, names in sorted(by_file.items()):
        path = os.path.join(version_dir, fn)
        hdr, start = read_safetensors_header(path)
        sums = hdr.get("__metadata__", {}) or {}
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mm, dtype=np.uint8)
        for name in names:
            meta = hdr.get(name)
            if meta is None:
                problems.append(f"{fn}: weight_map names {name} but the file lacks it")
                continue
            if meta["dtype"] != "U8" or len(meta["shape"]) != 1:
                problems.append(f"{name}: entry is {meta['dtype']}{meta['shape']}, want U8 1-D")
            a, b = meta["data_offsets"]
            try:
                payload = np.frombuffer(dz.decompress(buf[start + a : start + b]), dtype=np.uint8)
            except zstandard.ZstdError as e:
                problems.append(f"{name}: zstd frame does not decode without max_output_size: {e}")
                continue
            o, n = old[name].view, new[name].view
            if enc == "xor":
                if payload.size != o.size:
                    problems.append(f"{name}: xor payload {payload.size} B, tensor {o.size} B")
                    continue
                got = payload ^ o
            elif enc == "overwrite":
                cnt = int(payload[:4].view("<u4")[0])
                pos = payload[4 : 4 + 4 * cnt].view("<u4")
                vals = payload[4 + 4 * cnt :]
                if vals.size != cnt or (cnt > 1 and not np.all(pos[1:] > pos[:-1])):
                    problems.append(f"{name}: malformed overwrite payload")
                    continue
                got = o.copy()
                got[pos] = vals
            else:
                problems.append(f"unknown delta_encoding {enc!r}")
                return problems
            if not np.array_equal(got, n):
                problems.append(f"{name}: decoded tensor differs from NEW")
            want = checksum(alg, n)
            if sums.get(name) != want:
                problems.append(f"{name}: checksum {sums.get(name)!r}, python {alg} says {want!r}")
    for name, t in new.items():
        if name not in wm and not np.array_equal(t.view, old[name].view):
            problems.append(f"{name}: changed but omitted from the delta")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="slime's disk-delta encoder in numpy (benchmark baseline)")
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--publish")
    ap.add_argument("--version", type=int)
    ap.add_argument("--base-version", type=int)
    ap.add_argument("--encoding", choices=("xor", "overwrite"), default="xor")
    ap.add_argument("--checksum", choices=("xxh3-128", "blake3", "adler32"), default="xxh3-128")
    ap.add_argument("--workers", type=int, default=NUM_WORKERS, help=f"thread pool size (slime: {NUM_WORKERS})")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--verify", metavar="VERSION_DIR", help="only check a published delta against OLD/NEW")
    a = ap.parse_args(argv)
    if a.verify:
        problems = verify_delta(a.old, a.new, a.verify)
        for p in problems:
            print("FAIL:", p)
        print("ok" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    if a.publish is None or a.version is None:
        ap.error("--publish and --version are required to encode")
    r = encode(a.old, a.new, a.publish, a.version, a.base_version, a.encoding, a.checksum, a.workers)
    print(json.dumps(r) if a.json else "\n".join(f"{k}: {v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
