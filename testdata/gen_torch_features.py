#!/usr/bin/env python3
"""Generate small SpecForge-style offline feature files for disagg's tests.

    python3 testdata/gen_torch_features.py testdata/features

torch could not be imported on the machine that made the committed fixtures (the PyPI wheel
needs the CUDA libraries), so this script writes torch.save archives itself with zipfile and
pickle, following torch's serialization layout exactly (torch/serialization.py `_save`):

* a zip archive, entries stored uncompressed, each entry's data aligned to 64 bytes by a padding
  extra field (id 'FB'), in torch's order: `archive/data.pkl`, `archive/.format_version`,
  `archive/.storage_alignment`, `archive/byteorder`, `archive/data/<key>`..., `archive/version`,
  `archive/.data/serialization_id`;
* `data.pkl` is pickle protocol 2 of the saved dict; every tensor reduces to
  `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
  collections.OrderedDict())` and every storage is the persistent id
  `('storage', torch.<Type>Storage, key, 'cpu', numel)`.

`torch.load(path, weights_only=True)` (torch 2.15) of the valid files gives exactly the tensors
described in `expected.json`, and refuses the truncated and forbidden-global ones (checked once
by hand). Files written by real `torch.save` are under testdata/features_torch/, made by
gen_torch_real.py. Only the standard library is used. `expected.json` lists, per file, whether it
is valid and, for valid files, every tensor's dtype, shape and raw little-endian bytes (hex),
which the Rust and Python tests compare with what ingest stored.
"""

import collections
import gzip
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

# --- stand-ins that pickle exactly like torch's objects ---------------------------------------

torch_mod = types.ModuleType("torch")
utils_mod = types.ModuleType("torch._utils")
sys.modules.setdefault("torch", torch_mod)
sys.modules.setdefault("torch._utils", utils_mod)

DTYPES = {
    # torch name: (storage class, struct format, element size)
    "bfloat16": ("BFloat16Storage", None, 2),
    "float16": ("HalfStorage", "e", 2),
    "float32": ("FloatStorage", "f", 4),
    "int64": ("LongStorage", "q", 8),
    "int32": ("IntStorage", "i", 4),
    "uint8": ("ByteStorage", "B", 1),
    "bool": ("BoolStorage", "?", 1),
}
STORAGE_CLASSES = {}
for _tname, (_cls, _, _) in DTYPES.items():
    c = type(_cls, (), {"__module__": "torch"})
    c.__qualname__ = _cls
    setattr(torch_mod, _cls, c)
    STORAGE_CLASSES[_tname] = c


def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
    raise RuntimeError("stand-in")


_rebuild_tensor_v2.__module__ = "torch._utils"
utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2


class Storage:
    def __init__(self, key, dtype, raw):
        self.key, self.dtype, self.raw = key, dtype, raw
        self.numel = len(raw) // DTYPES[dtype][2]


class Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def __reduce_ex__(self, proto):
        return (_rebuild_tensor_v2, (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", STORAGE_CLASSES[obj.dtype], obj.key, "cpu", obj.numel)
        return None


def bf16_bytes(values):
    out = bytearray()
    for v in values:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        if v != v:
            h = 0x7FC0
        else:
            h = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
        out += struct.pack("<H", h & 0xFFFF)
    return bytes(out)


def raw_bytes(dtype, values):
    if dtype == "bfloat16":
        return bf16_bytes(values)
    fmt = DTYPES[dtype][1]
    return struct.pack("<%d%s" % (len(values), fmt), *values)


def contiguous_strides(shape):
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return list(reversed(strides))


def row_major(storage_raw, esize, offset, shape, stride):
    """Bytes of a (possibly strided) view in row-major order: what a reader must produce."""
    n = 1
    for d in shape:
        n *= d
    out = bytearray()
    idx = [0] * len(shape)
    for _ in range(n):
        e = offset + sum(i * s for i, s in zip(idx, stride))
        out += storage_raw[e * esize:(e + 1) * esize]
        for k in reversed(range(len(shape))):
            idx[k] += 1
            if idx[k] < shape[k]:
                break
            idx[k] = 0
    return bytes(out)


def write_torch_zip(tensors_spec):
    """tensors_spec: list of (name, Tensor). Returns the archive bytes."""
    obj = {name: t for name, t in tensors_spec}
    pkl = io.BytesIO()
    TorchPickler(pkl, protocol=2).dump(obj)
    storages = {}
    for _, t in tensors_spec:
        storages[t.storage.key] = t.storage
    entries = [("archive/data.pkl", pkl.getvalue()), ("archive/.format_version", b"1"),
               ("archive/.storage_alignment", b"64"), ("archive/byteorder", b"little")]
    for key in sorted(storages, key=int):
        entries.append(("archive/data/%s" % key, storages[key].raw))
    entries += [("archive/version", b"3\n"), ("archive/.data/serialization_id", b"0123456789012345678901234567890123456789")]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            header_end = buf.tell() + 30 + len(name.encode())
            pad = (-(header_end + 4)) % 64
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            z.writestr(info, data)
    return buf.getvalue()


def tensor(key, dtype, values, shape, offset=0, stride=None, storage=None):
    st = storage or Storage(str(key), dtype, raw_bytes(dtype, values))
    return Tensor(st, offset, shape, stride or contiguous_strides(shape))


def expected_of(tensors_spec):
    out = {}
    for name, t in tensors_spec:
        esize = DTYPES[t.storage.dtype][2]
        out[name] = {"dtype": t.storage.dtype, "shape": list(t.shape),
                     "hex": row_major(t.storage.raw, esize, t.offset, t.shape, t.stride).hex()}
    return out


def specforge_sample(seed, S=16, H=8, nan=False):
    ids = [(seed * 131 + i * 7) % 32000 for i in range(S)]
    mask = [1 if i >= 3 else 0 for i in range(S)]
    hs = [((seed + i) % 23 - 11) / 8.0 for i in range(S * H)]
    if nan:
        hs[5] = float("nan")
    aux = [((seed * 3 + i) % 29 - 14) / 16.0 for i in range(S * 3 * H)]
    return [("input_ids", tensor(0, "int64", ids, [S])),
            ("loss_mask", tensor(1, "int64", mask, [S])),
            ("hidden_state", tensor(2, "bfloat16", hs, [1, S, H])),
            ("aux_hidden_state", tensor(3, "bfloat16", aux, [1, S, 3 * H]))]


def all_dtypes_sample():
    base = Storage("4", "float32", raw_bytes("float32", [float(i) / 4 for i in range(12)]))
    return [("f16", tensor(0, "float16", [0.5, -1.25, 3.0, 65504.0, -0.0, 1e-3], [2, 3])),
            ("f32", tensor(1, "float32", [1.5, -2.0, 3.25, 1e30], [4])),
            ("i32", tensor(2, "int32", [-7, 0, 2147483647, -2147483648], [2, 2])),
            ("u8", tensor(3, "uint8", list(range(0, 250, 25)), [10])),
            ("bool", tensor(5, "bool", [True, False, False, True, True], [5])),
            ("i64", tensor(6, "int64", [-(2**63), 2**63 - 1, 0], [3])),
            ("bf16", tensor(7, "bfloat16", [1.0, -2.5, 0.15625, 3.0e38], [2, 2])),
            # a transposed view (non-contiguous) and an offset view sharing one storage
            ("f32_transposed", Tensor(base, 0, (4, 3), (1, 4))),
            ("f32_offset_view", Tensor(base, 6, (2, 3), (3, 1))),
            ("empty", tensor(8, "float32", [], [0, 4]))]


def safetensors_bytes(tensors_spec):
    header, data, off = {}, b"", 0
    names = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "int64": "I64", "int32": "I32", "uint8": "U8", "bool": "BOOL"}
    for name, t in tensors_spec:
        raw = row_major(t.storage.raw, DTYPES[t.storage.dtype][2], t.offset, t.shape, t.stride)
        header[name] = {"dtype": names[t.storage.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main(out_dir):
    rows = os.path.join(out_dir, "rows_0-2000")
    os.makedirs(rows, exist_ok=True)
    expected = {}

    def put(rel, data, exp):
        with open(os.path.join(out_dir, rel), "wb") as f:
            f.write(data)
        expected[rel] = exp

    s0 = specforge_sample(0)
    put("rows_0-2000/data_0.ckpt", write_torch_zip(s0), {"valid": True, "tensors": expected_of(s0)})
    s1 = all_dtypes_sample()
    put("rows_0-2000/data_1.ckpt", write_torch_zip(s1), {"valid": True, "tensors": expected_of(s1)})
    s2 = specforge_sample(2)
    put("rows_0-2000/data_2.ckpt.gz", gzip.compress(write_torch_zip(s2), mtime=0), {"valid": True, "tensors": expected_of(s2)})
    s3 = specforge_sample(3)
    put("rows_0-2000/data_3.safetensors", safetensors_bytes(s3), {"valid": True, "tensors": expected_of(s3)})
    full = write_torch_zip(specforge_sample(4))
    put("rows_0-2000/data_4.ckpt", full[: len(full) * 6 // 10], {"valid": False, "reason": "zip"})
    put("rows_0-2000/data_5.ckpt", write_torch_zip(specforge_sample(5, nan=True)), {"valid": False, "reason": "NaN"})
    # A pickle that would run os.system if unpickled by Python: must be refused, never executed.
    bad = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(write_torch_zip(specforge_sample(6)))) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"ctorch._utils\n_rebuild_tensor_v2\n", b"cposix\nsystem\n", 1)
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data)
    put("rows_0-2000/data_7.ckpt", bad.getvalue(), {"valid": False, "reason": "posix.system"})
    gz = gzip.compress(write_torch_zip(specforge_sample(8)), mtime=0)
    put("rows_0-2000/data_8.ckpt.gz", gz[: len(gz) // 2], {"valid": False, "reason": "gzip"})
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "features"))
