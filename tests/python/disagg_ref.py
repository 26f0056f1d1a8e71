"""Independent Python reference for disagg's weight-plane format (slime's disk delta format).

Written from the spec (docs in the task brief), NOT from the Rust sources, so that the interop tests
compare two independent implementations:

* safetensors header parsing / writing (raw: 8-byte LE header length + JSON, data follows),
* small random HF checkpoints (BF16 kept as raw uint16, F16, F32, I64, ...), single file or sharded,
* a training-like "step" that perturbs a fraction of elements of some tensors,
* a delta writer (`write_delta`), a full-version writer (`write_full`), a `latest` pointer writer,
* a puller (`pull`) implementing the Pull algorithm: seed, apply chain, verify checksums, state.json.

Only numpy, zstandard, xxhash, zlib (stdlib) and optionally blake3 are used.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
import zstandard

try:  # optional: blake3 checksums
    import blake3 as _blake3
except ImportError:  # pragma: no cover - depends on the environment
    _blake3 = None

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
STATE_DIR = ".weight_sync"
ENCODINGS = ("xor", "overwrite")
CHECKSUMS = ("xxh3-128", "blake3", "adler32")
DELTA_META_KEYS = ("version", "base_version", "delta_encoding", "compression_format", "checksum_format")

# safetensors dtype name -> numpy storage dtype (BF16 is stored as raw uint16)
DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "I32": np.int32,
    "U32": np.uint32,
    "I64": np.int64,
    "U64": np.uint64,
    "F16": np.float16,
    "BF16": np.uint16,
    "F32": np.float32,
    "F64": np.float64,
}


class RefError(Exception):
    """Base error of the reference implementation."""


class BadInput(RefError):
    pass


class Incompatible(RefError):
    pass


class Conflict(RefError):
    pass


class NotFound(RefError):
    pass


class ChecksumMismatch(RefError):
    pass


def vstr(n: int) -> str:
    return f"{int(n):06d}"


def vdir(src, n: int) -> Path:
    return Path(src) / f"weight_v{int(n):06d}"


# --------------------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------------------

def have_blake3() -> bool:
    return _blake3 is not None


def checksum(kind: str, data: bytes) -> str:
    if kind == "xxh3-128":
        return xxhash.xxh3_128(data).hexdigest()
    if kind == "blake3":
        if _blake3 is None:
            raise RefError("blake3 module not installed")
        return _blake3.blake3(data).hexdigest()
    if kind == "adler32":
        return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"
    raise BadInput(f"unknown checksum format {kind!r}")


CHECKSUM_HEX_LEN = {"xxh3-128": 32, "blake3": 64, "adler32": 8}

# --------------------------------------------------------------------------------------------------
# raw safetensors I/O
# --------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    dtype: str
    shape: tuple
    start: int  # absolute byte offset in the file
    length: int


def read_header(path) -> tuple[dict, dict, int]:
    """Return (tensor entries dict, __metadata__ dict, data start offset)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise BadInput(f"{path}: truncated safetensors header")
        (hlen,) = struct.unpack("<Q", raw)
        hjson = f.read(hlen)
        if len(hjson) != hlen:
            raise BadInput(f"{path}: truncated safetensors header")
    header = json.loads(hjson.decode("utf-8"))
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + hlen
    return header, meta, data_start


def entries(path) -> dict[str, Entry]:
    header, _, data_start = read_header(path)
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        out[name] = Entry(name, info["dtype"], tuple(info["shape"]), data_start + b, e - b)
    return out


def read_tensor_bytes(path, entry: Entry) -> bytes:
    with open(path, "rb") as f:
        f.seek(entry.start)
        data = f.read(entry.length)
    if len(data) != entry.length:
        raise BadInput(f"{path}: truncated tensor {entry.name}")
    return data


def fsync_dir(path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def safetensors_bytes(tensors: list[tuple[str, str, tuple, bytes]], metadata: dict | None = None) -> bytes:
    """Serialise [(name, dtype, shape, raw bytes)] in the given order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    return struct.pack("<Q", len(hjson)) + hjson + b"".join(t[3] for t in tensors)


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass
class Tensor:
    dtype: str
    shape: tuple
    data: bytes


def content_sample(tensors: dict[str, Tensor]) -> str:
    """disagg's content sample of a checkpoint (FORMATS §4): xxh3-128 over parts, each its u64 LE
    length then its bytes; per tensor in byte order of names: name, dtype, byte length (8 bytes
    LE), and the bytes (whole up to 4096, else four 1024-byte windows at i*(L-1024)//3)."""
    h = xxhash.xxh3_128()

    def part(b: bytes) -> None:
        h.update(struct.pack("<Q", len(b)))
        h.update(b)

    for name in sorted(tensors, key=lambda n: n.encode()):
        t = tensors[name]
        data = t.data
        part(name.encode())
        part(t.dtype.encode())
        part(struct.pack("<Q", len(data)))
        if len(data) <= 4096:
            part(data)
        else:
            part(b"".join(data[i * (len(data) - 1024) // 3:][:1024] for i in range(4)))
    return h.hexdigest()


def checkpoint_files(ckpt) -> list[Path]:
    """The safetensors files of a checkpoint dir (through the index when present) or a single file."""
    ckpt = Path(ckpt)
    if ckpt.is_file():
        return [ckpt]
    idx = ckpt / INDEX
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return [ckpt / f for f in sorted(set(wm.values()))]
    if (ckpt / SINGLE).exists():
        return [ckpt / SINGLE]
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise NotFound(f"{ckpt}: no safetensors files")
    return files


def locate(ckpt) -> dict[str, tuple[Path, Entry]]:
    """tensor name -> (file, entry), for a checkpoint dir (single file or index) or a single file."""
    out = {}
    for f in checkpoint_files(ckpt):
        for name, e in entries(f).items():
            if name in out:
                raise BadInput(f"tensor {name} present twice in {ckpt}")
            out[name] = (f, e)
    return out


def read_checkpoint(ckpt) -> dict[str, Tensor]:
    out = {}
    for name, (f, e) in locate(ckpt).items():
        out[name] = Tensor(e.dtype, e.shape, read_tensor_bytes(f, e))
    return out


def write_checkpoint(path, tensors: dict[str, Tensor], n_shards: int = 1, index: bool | None = None,
                     config: dict | None = None) -> Path:
    """Write an HF checkpoint dir.  n_shards == 1 -> model.safetensors (index only if index=True);
    n_shards > 1 -> model-0000i-of-0000n.safetensors (HF numbering from 1) + index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if index is None:
        index = n_shards > 1
    chunks = [names[i::n_shards] for i in range(n_shards)] if n_shards > 1 else [names]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        fname = SINGLE if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        items = [(n, tensors[n].dtype, tensors[n].shape, tensors[n].data) for n in chunk]
        (path / fname).write_bytes(safetensors_bytes(items, {"format": "pt"}))
        for n in chunk:
            weight_map[n] = fname
    if index:
        total = sum(len(t.data) for t in tensors.values())
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "toy", "hidden_size": 64}))
    return path


def _bf16_from_f32(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


def random_tensors(seed: int = 0, scale: int = 1) -> dict[str, Tensor]:
    """A small random 'model': a mix of dtypes and shapes (BF16 stored as uint16)."""
    rng = np.random.default_rng(seed)
    h = 64 * scale
    spec = [
        ("model.embed_tokens.weight", "BF16", (257, h)),
        ("model.layers.0.self_attn.q_proj.weight", "BF16", (h, h)),
        ("model.layers.0.self_attn.k_proj.weight", "BF16", (h // 2, h)),
        ("model.layers.0.input_layernorm.weight", "F32", (h,)),
        ("model.layers.0.mlp.up_proj.weight", "F16", (3 * h, h)),
        ("model.layers.0.mlp.down_proj.weight", "BF16", (h, 3 * h)),
        ("model.layers.1.self_attn.q_proj.weight", "BF16", (h, h)),
        ("model.layers.1.input_layernorm.weight", "F32", (h,)),
        ("model.norm.weight", "BF16", (h,)),
        ("model.position_ids", "I64", (1, 128)),
        ("model.layers.0.counter", "I32", (7,)),
        ("model.rope.inv_freq", "F64", (h // 2,)),
        ("model.scale", "F32", ()),
        ("lm_head.weight", "BF16", (257, h)),
    ]
    out = {}
    for name, dtype, shape in spec:
        n = int(np.prod(shape, dtype=np.int64))
        if dtype == "BF16":
            base = 1.0 if "norm" in name else 0.0
            arr = _bf16_from_f32(base + rng.normal(0, 0.02, n).astype(np.float32))
        elif dtype == "F16":
            arr = rng.normal(0, 0.02, n).astype(np.float16)
        elif dtype in ("F32", "F64"):
            arr = (1.0 + rng.normal(0, 0.02, n)).astype(DTYPES[dtype])
        elif dtype in ("I64", "I32"):
            arr = rng.integers(-1000, 100000, n).astype(DTYPES[dtype])
        else:
            arr = rng.integers(0, 255, n).astype(DTYPES[dtype])
        out[name] = Tensor(dtype, tuple(shape), arr.reshape(shape).tobytes())
    return out


def step(tensors: dict[str, Tensor], seed: int, frac: float = 0.03, p_unchanged: float = 0.3) -> dict[str, Tensor]:
    """Perturb `frac` of the elements of each tensor chosen to change (about 1 - p_unchanged of them).
    At least one tensor changes and (when there are >= 2) at least one stays bit-identical."""
    rng = np.random.default_rng(seed)
    names = list(tensors)
    changing = [n for n in names if rng.random() >= p_unchanged]
    if not changing:
        changing = [names[int(rng.integers(len(names)))]]
    if len(changing) == len(names) and len(names) > 1:
        changing.remove(changing[int(rng.integers(len(changing)))])
    out = {}
    for name in names:
        t = tensors[name]
        if name not in changing:
            out[name] = t
            continue
        arr = np.frombuffer(t.data, dtype=DTYPES[t.dtype]).copy()
        n = arr.size
        if n == 0:
            out[name] = t
            continue
        k = max(1, int(round(frac * n)))
        idx = rng.choice(n, size=k, replace=False)
        if t.dtype in ("BF16",):  # one ulp up or down, as Adam does to bf16 weights
            arr[idx] = (arr[idx].astype(np.int32) + rng.choice([-1, 1], k)).astype(np.uint16)
        elif t.dtype == "F16":
            u = arr.view(np.uint16)
            u[idx] = (u[idx].astype(np.int32) + rng.choice([-1, 1], k)).astype(np.uint16)
        elif t.dtype in ("F32", "F64"):
            arr[idx] = arr[idx] * (1 + rng.uniform(1e-4, 1e-2, k) * rng.choice([-1, 1], k))
        elif t.dtype == "BOOL":
            arr[idx] = ~arr[idx]
        else:
            arr[idx] = arr[idx] + rng.integers(1, 300, k).astype(arr.dtype)
        data = arr.tobytes()
        if data == t.data:  # astronomically unlikely; force one change
            b = bytearray(data)
            b[0] ^= 1
            data = bytes(b)
        out[name] = Tensor(t.dtype, t.shape, data)
    return out


def changed_byte_count(old: bytes, new: bytes) -> int:
    a = np.frombuffer(old, dtype=np.uint8)
    b = np.frombuffer(new, dtype=np.uint8)
    return int(np.count_nonzero(a != b))


# --------------------------------------------------------------------------------------------------
# payloads
# --------------------------------------------------------------------------------------------------


def xor_payload(old: bytes, new: bytes) -> bytes:
    if len(old) != len(new):
        raise Incompatible("length mismatch")
    return (np.frombuffer(old, np.uint8) ^ np.frombuffer(new, np.uint8)).tobytes()


def overwrite_payload(old: bytes, new: bytes) -> bytes:
    if len(old) != len(new):
        raise Incompatible("length mismatch")
    if len(new) > 0xFFFFFFFF:
        raise Incompatible("tensor larger than 4 GiB cannot use overwrite")
    a = np.frombuffer(old, np.uint8)
    b = np.frombuffer(new, np.uint8)
    pos = np.flatnonzero(a != b).astype("<u4")
    return struct.pack("<I", pos.size) + pos.tobytes() + b[pos].tobytes()


def parse_overwrite(payload: bytes, length: int) -> tuple[np.ndarray, np.ndarray]:
    if len(payload) < 4:
        raise BadInput("overwrite payload shorter than its count")
    (count,) = struct.unpack_from("<I", payload, 0)
    if len(payload) != 4 + 5 * count:
        raise BadInput(f"overwrite payload length {len(payload)} != 4 + 5*{count}")
    pos = np.frombuffer(payload, dtype="<u4", count=count, offset=4).astype(np.int64)
    vals = np.frombuffer(payload, dtype=np.uint8, count=count, offset=4 + 4 * count)
    if count and (np.any(np.diff(pos) <= 0) or pos[-1] >= length):
        raise BadInput("overwrite positions not strictly ascending or out of range")
    return pos, vals


def apply_payload(encoding: str, old: bytes, payload: bytes) -> bytes:
    if encoding == "xor":
        if len(payload) != len(old):
            raise BadInput(f"xor payload length {len(payload)} != tensor length {len(old)}")
        return xor_payload(old, payload)
    if encoding == "overwrite":
        pos, vals = parse_overwrite(payload, len(old))
        out = np.frombuffer(old, np.uint8).copy()
        out[pos] = vals
        return out.tobytes()
    raise BadInput(f"unknown delta encoding {encoding!r}")


def compress(payload: bytes) -> bytes:
    # one zstd frame, level 1, content size in the frame header
    return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(payload)


def decompress(frame: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(frame)


# --------------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------------


def write_delta(old_dir, new_dir, src, version: int, base_version: int, encoding: str = "xor",
                checksum_format: str = "xxh3-128", num_files: int = 1, checksum_override: dict | None = None) -> dict:
    """Write SRC/weight_v{version:06d} as a delta NEW - OLD.  Returns a summary dict.
    `checksum_override` (name -> hex) lets tests publish deliberately wrong checksums."""
    if encoding not in ENCODINGS:
        raise BadInput(f"bad encoding {encoding}")
    old = read_checkpoint(old_dir)
    new = read_checkpoint(new_dir)
    if set(old) != set(new):
        raise Incompatible("tensor names differ")
    for n in new:
        if (old[n].dtype, old[n].shape) != (new[n].dtype, new[n].shape):
            raise Incompatible(f"{n}: dtype/shape differ")
    out = vdir(src, version)
    if out.exists():
        raise Conflict(f"{out} exists")
    out.mkdir(parents=True)
    changed = [n for n in sorted(new) if old[n].data != new[n].data]
    num_files = max(1, min(num_files, len(changed))) if changed else 0
    weight_map = {}
    for i in range(num_files):
        chunk = changed[i::num_files]
        fname = f"model-{i:05d}-of-{num_files:05d}.safetensors"
        items, meta = [], {}
        for n in chunk:
            if encoding == "xor":
                payload = xor_payload(old[n].data, new[n].data)
            else:
                payload = overwrite_payload(old[n].data, new[n].data)
            frame = compress(payload)
            items.append((n, "U8", (len(frame),), frame))
            meta[n] = checksum(checksum_format, new[n].data)
            if checksum_override and n in checksum_override:
                meta[n] = checksum_override[n]
            weight_map[n] = fname
        atomic_write(out / fname, safetensors_bytes(items, meta))
    index = {
        "metadata": {
            "version": vstr(version),
            "base_version": vstr(base_version),
            "delta_encoding": encoding,
            "compression_format": "zstd",
            "checksum_format": checksum_format,
        },
        "weight_map": weight_map,
    }
    atomic_write(out / INDEX, json.dumps(index, indent=2).encode())
    return {"version": version, "changed": changed, "files": num_files}


def write_full(new_dir, src, version: int) -> Path:
    """Publish a full version: copy the checkpoint's safetensors and config files, write our index last."""
    new_dir = Path(new_dir)
    out = vdir(src, version)
    if out.exists():
        raise Conflict(f"{out} exists")
    out.mkdir(parents=True)
    weight_map = {}
    total = 0
    if new_dir.is_file():
        files = [new_dir]
    else:
        files = checkpoint_files(new_dir)
        for extra in sorted(new_dir.iterdir()):
            if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name != INDEX:
                shutil.copyfile(extra, out / extra.name)
    for f in files:
        dest = out / (f.name if not new_dir.is_file() else SINGLE)
        atomic_write(dest, f.read_bytes())
        for name, e in entries(f).items():
            weight_map[name] = dest.name
            total += e.length
    index = {"metadata": {"version": vstr(version), "total_size": total}, "weight_map": weight_map}
    atomic_write(out / INDEX, json.dumps(index, indent=2).encode())
    return out


def write_pointer(src, version: int, run_id: str | None = None) -> None:
    name = f"weight_v{int(version):06d}"
    atomic_write(Path(src) / "latest", ((f"{run_id}/" if run_id else "") + name + "\n").encode())


# --------------------------------------------------------------------------------------------------
# reader / applier
# --------------------------------------------------------------------------------------------------


def read_index(src, version: int) -> dict:
    p = vdir(src, version) / INDEX
    if not p.exists():
        raise NotFound(f"{p} not found")
    return json.loads(p.read_text())


def is_delta(index: dict) -> bool:
    return "delta_encoding" in (index.get("metadata") or {})


def read_pointer(src) -> tuple[str | None, int]:
    """SRC/latest -> (run_id or None, version).  Text: `weight_v000007` or `RUN_ID/weight_v000007`."""
    p = Path(src) / "latest"
    if not p.exists():
        raise NotFound(f"{p} not found")
    text = p.read_text()
    m = re.fullmatch(r"(?:([^/\s]+)/)?weight_v(\d{6,})\n?", text)
    if not m:
        raise BadInput(f"unparseable pointer {text!r}")
    return m.group(1), int(m.group(2))


def read_state(local) -> int | None:
    p = Path(local) / STATE_DIR / "state.json"
    if not p.exists():
        return None
    return int(json.loads(p.read_text())["version"])


def write_state(local, version: int) -> None:
    d = Path(local) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / "state.json", json.dumps({"version": vstr(version)}).encode())


def _seed(local: Path, seed_dir: Path) -> None:
    """Make LOCAL a copy of seed_dir (keeping .weight_sync): copy every file, delete what the seed lacks."""
    local.mkdir(parents=True, exist_ok=True)
    seed_files = {p.relative_to(seed_dir) for p in seed_dir.rglob("*") if p.is_file()}
    for p in sorted(local.rglob("*"), reverse=True):
        rel = p.relative_to(local)
        if rel.parts[0] == STATE_DIR:
            continue
        if p.is_file() and rel not in seed_files:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    for rel in sorted(seed_files):
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(seed_dir / rel, dest)
        if dest.stat().st_size != (seed_dir / rel).stat().st_size:
            raise RefError(f"size mismatch copying {rel}")


def apply_delta(local, src, version: int) -> list[str]:
    """Apply SRC/weight_v{version} onto LOCAL in place, verifying checksums.  Returns patched tensor names."""
    local = Path(local)
    ddir = vdir(src, version)
    index = read_index(src, version)
    meta = index["metadata"]
    if meta.get("compression_format") != "zstd":
        raise BadInput(f"compression_format {meta.get('compression_format')!r}")
    encoding = meta["delta_encoding"]
    ck = meta["checksum_format"]
    where = locate(local)
    patched = []
    for fname in sorted(set(index["weight_map"].values())):
        header, file_meta, _ = read_header(ddir / fname)
        dents = entries(ddir / fname)
        for name in sorted(n for n, f in index["weight_map"].items() if f == fname):
            if name not in dents:
                raise BadInput(f"{name} missing from {fname}")
            de = dents[name]
            if de.dtype != "U8" or len(de.shape) != 1:
                raise BadInput(f"{name}: delta entry must be 1-D U8")
            if name not in where:
                raise Incompatible(f"{name} not in local checkpoint")
            lf, le = where[name]
            payload = decompress(read_tensor_bytes(ddir / fname, de))
            old = read_tensor_bytes(lf, le)
            new = apply_payload(encoding, old, payload)
            want = file_meta.get(name)
            if want is None:
                raise BadInput(f"no checksum for {name}")
            got = checksum(ck, new)
            if got != want:
                raise ChecksumMismatch(f"{name}: checksum {got} != {want}")
            with open(lf, "r+b") as f:
                f.seek(le.start)
                f.write(new)
                f.flush()
                os.fsync(f.fileno())
            patched.append(name)
    return patched


def pull(local, base, src, target) -> dict:
    """Bring LOCAL to `target` (int or 'latest').  Returns {version, previous, seeded_from, applied}."""
    local = Path(local)
    src = Path(src)
    if target == "latest":
        run_id, target = read_pointer(src)
        if run_id:  # versions of a run live under SRC/RUN_ID
            src = src / run_id
    target = int(target)
    (local / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with open(local / STATE_DIR / "lock", "a+") as lockf:
        fcntl.flock(lockf.fileno(), fcntl.LOCK_EX)
        applied = read_state(local)
        if applied is not None and target < applied:
            raise Conflict(f"target {target} is behind applied {applied}")
        if applied == target:
            return {"version": target, "previous": applied, "seeded_from": None, "applied": []}
        # walk down the chain of deltas from target (following base_version) until the applied
        # version (nothing to seed) or a full version / BASE (seed from it)
        chain, v, seed = [], target, None
        while True:
            if applied is not None and v == applied:
                break
            if v == 0:
                seed = 0
                break
            idx = read_index(src, v)
            if not is_delta(idx):
                seed = v
                break
            chain.append((v, idx))
            nv = int(idx["metadata"]["base_version"])
            if nv >= v:
                raise BadInput(f"version {v} has base_version {nv}")
            # a chain that passes below the applied version without meeting it: reseed from its
            # newest full version (spec: "seed LOCAL from the newest full version on the chain")
            v = nv
        previous = applied
        if seed is not None:
            _seed(local, Path(base) if seed == 0 else vdir(src, seed))
            write_state(local, seed)
            applied = seed
        done = []
        for v, idx in reversed(chain):
            b = int(idx["metadata"]["base_version"])
            if v == applied:
                continue
            if b != applied:
                raise Conflict(f"delta {v} base {b} != applied {applied}")
            apply_delta(local, src, v)
            write_state(local, v)
            applied = v
            done.append(v)
        return {"version": applied, "previous": previous, "seeded_from": seed, "applied": done}
