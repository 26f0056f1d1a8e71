"""Interop tests: disagg's Rust weight-plane CLIs vs an independent Python reference (disagg_ref.py).

Run:  .venv/bin/python -m pytest -p no:cacheprovider tests/python -q   (binaries from $DISAGG_BIN_DIR, default target/release)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard
from safetensors import safe_open

import disagg_ref as ref

BLAKE3_SKIP = pytest.mark.skipif(not ref.have_blake3(), reason="python package 'blake3' not installed")
ENCODINGS = ["xor", "overwrite"]
CHECKSUMS = ["xxh3-128", pytest.param("blake3", marks=BLAKE3_SKIP), "adler32"]
DATA_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def assert_tensors_equal(ckpt, expected: dict, what: str = "") -> None:
    got = ref.read_checkpoint(ckpt)
    assert sorted(got) == sorted(expected), f"{what}: tensor names differ"
    for name, t in expected.items():
        g = got[name]
        assert (g.dtype, tuple(g.shape)) == (t.dtype, tuple(t.shape)), f"{what}: {name} dtype/shape differ"
        if g.data != t.data:
            n = ref.changed_byte_count(g.data, t.data)
            pytest.fail(f"{what}: tensor {name} differs from expected in {n} of {len(t.data)} bytes", pytrace=False)


def state_version(local) -> str:
    p = Path(local) / ".weight_sync" / "state.json"
    assert p.is_file(), f"{p} missing"
    d = json.loads(p.read_text())
    assert isinstance(d, dict) and isinstance(d.get("version"), str), f"state.json malformed: {p.read_text()!r}"
    assert re.fullmatch(r"\d{6}", d["version"]), f"state.json version not 6 digits: {d!r}"
    return d["version"]


def as_int(v) -> int:
    """JSON summaries may print versions as numbers or 6-digit strings; both mean the same version."""
    return int(v)


def tree_digest(path) -> dict:
    path = Path(path)
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def check_delta_dir(src, version: int, base_version: int, old: dict, new: dict, encoding: str, ck: str,
                    ours: bool = True) -> dict:
    """Validate a published delta dir byte-for-byte against the spec, using only Python libraries.
    `ours`: written by delta-diff, so its frames also follow FORMATS.md §4.5 (any valid frame is
    readable; the Python reference writer's are plain level 1).
    Returns {"wire_bytes": .., "changed_bytes": ..}."""
    d = ref.vdir(src, version)
    index = json.loads((d / ref.INDEX).read_text())
    assert set(index) >= {"metadata", "weight_map"}, index
    want_meta = {
        "version": f"{version:06d}",
        "base_version": f"{base_version:06d}",
        "delta_encoding": encoding,
        "compression_format": "zstd",
        "checksum_format": ck,
    }
    if ours:
        # disagg's additions, which a slime reader ignores: the content samples of OLD and NEW.
        want_meta |= {"base_sample": ref.content_sample(old), "sample": ref.content_sample(new)}
    assert index["metadata"] == want_meta, f"index metadata not as in the spec: {index['metadata']}"
    wm = index["weight_map"]
    changed = {n for n in new if new[n].data != old[n].data}
    assert set(wm) == changed, (f"weight_map must list exactly the changed tensors; "
                                f"extra={sorted(set(wm) - changed)} missing={sorted(changed - set(wm))}")

    files = sorted(set(wm.values()))
    if files:
        nums = [DATA_RE.fullmatch(f) for f in files]
        assert all(nums), f"bad data file names: {files}"
        n = len(files)
        assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(n)], files
    on_disk = sorted(p.name for p in d.iterdir())
    st_files = sorted(n for n in on_disk if n.endswith(".safetensors"))
    assert st_files == files, f"safetensors files in {d} ({st_files}) != weight_map files ({files})"
    assert not [n for n in on_disk if "tmp" in n.lower()], f"leftover temporary files in {d}: {on_disk}"

    changed_bytes = 0
    for fname in files:
        names = {n for n, f in wm.items() if f == fname}
        header, _, _ = ref.read_header(d / fname)
        assert set(header) == names, f"{fname}: entries {sorted(header)} != weight_map {sorted(names)}"
        for name in names:
            assert header[name]["dtype"] == "U8" and len(header[name]["shape"]) == 1, header[name]
        with safe_open(str(d / fname), framework="numpy") as f:
            assert set(f.keys()) == names
            meta = f.metadata() or {}
            for name in sorted(names):
                arr = f.get_tensor(name)
                assert arr.dtype == np.uint8 and arr.ndim == 1, (name, arr.dtype, arr.shape)
                frame = arr.tobytes()
                nb, ob = new[name].data, old[name].data
                # one zstd frame with its content size in the header
                params = zstandard.get_frame_parameters(frame)
                payload = zstandard.ZstdDecompressor().decompress(frame)
                assert params.content_size == len(payload), (name, params.content_size, len(payload))
                # FORMATS.md §4.5: our 14-byte header (8-byte content size, no checksum, a 128 KiB
                # window), and a decoder limited to that window reads the whole frame
                if ours:
                    check_our_frame(name, frame, params)
                dobj = zstandard.ZstdDecompressor().decompressobj()
                assert dobj.decompress(frame) == payload
                assert dobj.eof and dobj.unused_data == b"", f"{name}: payload is not exactly one zstd frame"
                if encoding == "xor":
                    assert len(payload) == len(nb), f"{name}: xor payload {len(payload)} != tensor {len(nb)} bytes"
                    assert payload == ref.xor_payload(ob, nb), f"{name}: xor payload != new ^ old"
                else:
                    (count,) = struct.unpack_from("<I", payload, 0)
                    assert len(payload) == 4 + 5 * count, (name, len(payload), count)
                    pos = np.frombuffer(payload, "<u4", count, 4)
                    vals = np.frombuffer(payload, np.uint8, count, 4 + 4 * count)
                    want = np.flatnonzero(np.frombuffer(ob, np.uint8) != np.frombuffer(nb, np.uint8))
                    assert np.array_equal(pos.astype(np.int64), want), f"{name}: positions != changed bytes"
                    assert np.array_equal(vals, np.frombuffer(nb, np.uint8)[want]), f"{name}: values != new bytes"
                    assert payload == ref.overwrite_payload(ob, nb)
                assert ref.apply_payload(encoding, ob, payload) == nb
                want_ck = ref.checksum(ck, nb)
                assert len(want_ck) == ref.CHECKSUM_HEX_LEN[ck]
                assert meta.get(name) == want_ck, f"{name}: __metadata__ checksum {meta.get(name)!r} != {want_ck!r}"
                changed_bytes += ref.changed_byte_count(ob, nb)
    wire = sum(p.stat().st_size for p in d.iterdir())
    return {"wire_bytes": wire, "changed_bytes": changed_bytes}


def check_our_frame(name: str, frame: bytes, params) -> None:
    """FORMATS.md §4.5: the 14-byte header (magic, descriptor c0 = 8-byte content size, window
    descriptor 38 = 128 KiB, the size), no checksum, and a decoder limited to that window reads it."""
    payload = zstandard.ZstdDecompressor().decompress(frame)
    assert frame[:6] == bytes.fromhex("28b52ffdc038"), f"{name}: header {frame[:6].hex()}"
    assert frame[6:14] == struct.pack("<Q", len(payload)), f"{name}: content size field"
    assert params.window_size == 128 << 10 and not params.has_checksum, (name, params.window_size)
    small = zstandard.ZstdDecompressor(max_window_size=128 << 10).decompressobj()
    assert small.decompress(frame) == payload, f"{name}: needs more than a 128 KiB window"


def check_diff_summary(s: dict, version, base_version, encoding, ck, old, new, facts) -> None:
    total = sum(len(t.data) for t in new.values())
    changed_t = sum(1 for n in new if new[n].data != old[n].data)
    assert as_int(s["version"]) == version, s
    assert as_int(s["base_version"]) == base_version, s
    assert s["encoding"] == encoding and s["checksum"] == ck, s
    assert s["total_bytes"] == total, s
    assert s["changed_bytes"] == facts["changed_bytes"], s
    assert s["density"] == pytest.approx(facts["changed_bytes"] / total, rel=1e-6, abs=1e-12), s
    assert s["tensors_total"] == len(new) and s["tensors_changed"] == changed_t, s
    assert s["wire_bytes"] == facts["wire_bytes"], f"wire_bytes {s['wire_bytes']} != files in version dir {facts}"
    assert isinstance(s["seconds"], (int, float)) and s["seconds"] >= 0, s


def check_full_dir(src, version: int, tensors: dict, ours: bool = True) -> None:
    d = ref.vdir(src, version)
    index = json.loads((d / ref.INDEX).read_text())
    want = {"version": f"{version:06d}", "total_size": sum(len(t.data) for t in tensors.values())}
    if ours:
        want["sample"] = ref.content_sample(tensors)
    assert index["metadata"] == want, index["metadata"]
    assert set(index["weight_map"]) == set(tensors)
    assert "delta_encoding" not in index["metadata"]
    assert_tensors_equal(d, tensors, f"full version {version}")


# ------------------------------------------------------------------------------------------------
# Rust writer -> Python reader/applier
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checksum", CHECKSUMS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_rust_delta_python_apply(cli, make_ckpts, tmp_path, encoding, checksum):
    (c0, t0), (c1, t1) = make_ckpts(2, shards=[1, 2])  # sharding differs between OLD and NEW
    src = tmp_path / "src"
    s = cli.diff(c0, c1, src, 1, base_version=0, encoding=encoding, checksum=checksum)
    facts = check_delta_dir(src, 1, 0, t0, t1, encoding, checksum)
    check_diff_summary(s, 1, 0, encoding, checksum, t0, t1, facts)

    local = tmp_path / "local"
    r = ref.pull(local, c0, src, 1)
    assert r["applied"] == [1]
    assert_tensors_equal(local, t1, "python applier on rust delta")
    assert state_version(local) == "000001"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_rust_delta_large_tensors_python_apply(cli, make_ckpts, tmp_path, encoding):
    """Multi-MiB tensors: payloads span many zstd blocks; a frame must still carry its content size."""
    (c0, t0), (c1, t1) = make_ckpts(2, shards=[2, 2], scale=8, frac=0.02)
    src = tmp_path / "src"
    s = cli.diff(c0, c1, src, 1, base_version=0, encoding=encoding, checksum="xxh3-128")
    facts = check_delta_dir(src, 1, 0, t0, t1, encoding, "xxh3-128")
    check_diff_summary(s, 1, 0, encoding, "xxh3-128", t0, t1, facts)
    local = tmp_path / "local"
    ref.pull(local, c0, src, 1)
    assert_tensors_equal(local, t1, "python applier on large rust delta")
    # same sharding/layout on both sides: the patched files are byte-identical to NEW's
    for f in ref.checkpoint_files(c1):
        assert (local / f.name).read_bytes() == f.read_bytes(), f.name


def test_rust_delta_single_file_args(cli, make_ckpts, tmp_path):
    """OLD/NEW given as single .safetensors files."""
    (c0, t0), (c1, t1) = make_ckpts(2)
    src = tmp_path / "src"
    cli.diff(c0 / "model.safetensors", c1 / "model.safetensors", src, 1, base_version=0, encoding="xor",
             checksum="xxh3-128")
    check_delta_dir(src, 1, 0, t0, t1, "xor", "xxh3-128")
    local = tmp_path / "local"
    ref.pull(local, c0, src, 1)
    assert_tensors_equal(local, t1, "python applier on rust delta (file args)")


# ------------------------------------------------------------------------------------------------
# Python writer -> Rust applier
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checksum", CHECKSUMS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_python_delta_rust_apply(cli, make_ckpts, tmp_path, encoding, checksum):
    (c0, t0), (c1, t1) = make_ckpts(2, shards=[3, 1])  # sharded BASE (with index), single-file NEW
    src = tmp_path / "src"
    ref.write_delta(c0, c1, src, 1, 0, encoding, checksum, num_files=2)
    check_delta_dir(src, 1, 0, t0, t1, encoding, checksum, ours=False)  # self-check of the reference writer
    base_before = tree_digest(c0)

    local = tmp_path / "local"
    out = cli.apply(local, c0, src, 1)
    assert as_int(out["version"]) == 1, out
    assert [as_int(v) for v in out["applied"]] == [1], out
    assert_tensors_equal(local, t1, "rust applier on python delta")
    assert state_version(local) == "000001"
    assert tree_digest(c0) == base_before, "delta-apply modified BASE"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_python_delta_large_tensors_rust_apply(cli, make_ckpts, tmp_path, encoding):
    (c0, t0), (c1, t1) = make_ckpts(2, shards=[2, 2], scale=8, frac=0.02)
    src = tmp_path / "src"
    ref.write_delta(c0, c1, src, 1, 0, encoding, "xxh3-128", num_files=3)
    local = tmp_path / "local"
    cli.apply(local, c0, src, 1)
    assert_tensors_equal(local, t1, "rust applier on large python delta")
    for f in ref.checkpoint_files(c1):
        assert (local / f.name).read_bytes() == f.read_bytes(), f.name


def test_python_delta_bad_checksum_refused_by_rust(cli, make_ckpts, tmp_path):
    (c0, t0), (c1, t1) = make_ckpts(2)
    src = tmp_path / "src"
    victim = next(n for n in sorted(t1) if t1[n].data != t0[n].data)
    bad = ref.checksum("xxh3-128", t0[victim].data)  # a well-formed checksum of the wrong bytes
    ref.write_delta(c0, c1, src, 1, 0, "overwrite", "xxh3-128", checksum_override={victim: bad})
    local = tmp_path / "local"
    proc = cli.apply(local, c0, src, 1, expect_rc=7)
    assert proc.returncode == 7
    sp = local / ".weight_sync" / "state.json"
    if sp.exists():
        assert state_version(local) != "000001", "state recorded a version whose checksum failed"


def test_rebased_delta_reseeds_both_appliers(cli, make_ckpts, tmp_path):
    """Host at 1; version 2 is a delta on base 0 (c0 -> c2).  The spec's Pull seeds from the newest full
    version on target's chain (here BASE) and applies 2: both appliers must end bit-exact at c2."""
    (c0, t0), (c1, t1), (c2, t2) = make_ckpts(3)
    src = tmp_path / "src"
    ref.write_delta(c0, c1, src, 1, 0, "xor", "xxh3-128")
    ref.write_delta(c0, c2, src, 2, 0, "xor", "xxh3-128")
    lr, lp = tmp_path / "lr", tmp_path / "lp"
    cli.apply(lr, c0, src, 1)
    ref.pull(lp, c0, src, 1)
    out = cli.apply(lr, c0, src, 2)
    assert [as_int(v) for v in out["applied"]] == [2], out
    r = ref.pull(lp, c0, src, 2)
    assert r["seeded_from"] == 0 and r["applied"] == [2], r
    for l in (lr, lp):
        assert state_version(l) == "000002"
        assert_tensors_equal(l, t2, f"{l.name} after rebased delta")


# ------------------------------------------------------------------------------------------------
# mixed chains
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("full_writer", ["rust", "python"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_mixed_chain_both_appliers_converge(cli, make_ckpts, tmp_path, encoding, full_writer):
    """v1 python delta, v2 rust delta, v3 FULL, v4 rust delta, v5 python delta."""
    other = "overwrite" if encoding == "xor" else "xor"
    ck5 = "blake3" if ref.have_blake3() else "xxh3-128"
    ck = make_ckpts(6, shards=[2, 1, 3, 1, 2, 1])
    src = tmp_path / "src"
    ref.write_delta(ck[0][0], ck[1][0], src, 1, 0, encoding, "xxh3-128", num_files=2)
    cli.diff(ck[1][0], ck[2][0], src, 2, base_version=1, encoding=other, checksum="adler32")
    if full_writer == "rust":
        cli.diff(ck[2][0], ck[3][0], src, 3, full=True)
    else:
        ref.write_full(ck[3][0], src, 3)
    check_full_dir(src, 3, ck[3][1], ours=full_writer == "rust")
    cli.diff(ck[3][0], ck[4][0], src, 4, base_version=3, encoding=encoding, checksum="xxh3-128")
    ref.write_delta(ck[4][0], ck[5][0], src, 5, 4, other, ck5)
    for v, b, e, c in [(2, 1, other, "adler32"), (4, 3, encoding, "xxh3-128")]:
        check_delta_dir(src, v, b, ck[b][1], ck[v][1], e, c)  # both written by delta-diff
    base = ck[0][0]
    frozen = {"base": tree_digest(base), "src": tree_digest(src)}

    # fresh hosts straight to 5
    lp, lr = tmp_path / "local_py", tmp_path / "local_rs"
    r = ref.pull(lp, base, src, 5)
    assert r["seeded_from"] == 3 and r["applied"] == [4, 5]
    out = cli.apply(lr, base, src, 5)
    assert as_int(out["version"]) == 5 and [as_int(v) for v in out["applied"]] == [4, 5], out
    assert_tensors_equal(lp, ck[5][1], "python applier, fresh -> 5")
    assert_tensors_equal(lr, ck[5][1], "rust applier, fresh -> 5")
    assert state_version(lp) == state_version(lr) == "000005"

    # step by step, alternating appliers on ONE host: 0 -> 1 (rs) -> 2 (py) -> 4 (rs, reseeds at 3) -> 5 (py)
    la = tmp_path / "local_alt"
    cli.apply(la, base, src, 1)
    assert_tensors_equal(la, ck[1][1], "alt host at 1")
    r = ref.pull(la, base, src, 2)
    assert r["previous"] == 1 and r["applied"] == [2] and r["seeded_from"] is None
    assert_tensors_equal(la, ck[2][1], "alt host at 2")
    out = cli.apply(la, base, src, 4)
    assert as_int(out["previous"]) == 2 and [as_int(v) for v in out["applied"]] == [4], out
    assert_tensors_equal(la, ck[4][1], "alt host at 4")
    r = ref.pull(la, base, src, 5)
    assert r["previous"] == 4 and r["applied"] == [5]
    assert_tensors_equal(la, ck[5][1], "alt host at 5")

    # and the other way round: 0 -> 2 (py) -> 3 (rs, reseed) -> 5 (rs)
    lb = tmp_path / "local_alt2"
    ref.pull(lb, base, src, 2)
    out = cli.apply(lb, base, src, 3)
    assert as_int(out["version"]) == 3 and as_int(out["previous"]) == 2, out
    assert_tensors_equal(lb, ck[3][1], "alt2 host at 3")
    out = cli.apply(lb, base, src, 5)
    assert [as_int(v) for v in out["applied"]] == [4, 5], out
    assert_tensors_equal(lb, ck[5][1], "alt2 host at 5")

    assert tree_digest(base) == frozen["base"], "an applier modified BASE"
    assert tree_digest(src) == frozen["src"], "an applier modified the published versions"


# ------------------------------------------------------------------------------------------------
# empty delta, state.json, pointer
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["rust", "python"])
def test_empty_delta(cli, make_ckpts, tmp_path, writer):
    ((c0, t0),) = make_ckpts(1)
    src = tmp_path / "src"
    if writer == "rust":
        s = cli.diff(c0, c0, src, 1, base_version=0, encoding="xor", checksum="xxh3-128")
        assert s["tensors_changed"] == 0 and s["changed_bytes"] == 0 and s["density"] == 0, s
    else:
        ref.write_delta(c0, c0, src, 1, 0, "xor", "xxh3-128")
    d = ref.vdir(src, 1)
    assert not list(d.glob("*.safetensors")), "empty delta must have no data files"
    index = json.loads((d / ref.INDEX).read_text())
    assert index["weight_map"] == {}
    assert index["metadata"]["delta_encoding"] == "xor"
    check_delta_dir(src, 1, 0, t0, t0, "xor", "xxh3-128", ours=writer == "rust")

    lp, lr = tmp_path / "lp", tmp_path / "lr"
    ref.pull(lp, c0, src, 1)
    cli.apply(lr, c0, src, 1)
    for l in (lp, lr):
        assert state_version(l) == "000001"
        assert_tensors_equal(l, t0, "after empty delta")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_state_json_handoff(cli, make_ckpts, tmp_path, encoding):
    """Rust brings LOCAL to K; Python continues to K+1; Rust continues to K+2 (no reseed, no re-apply)."""
    ck = make_ckpts(5, shards=[2, 2, 2, 2, 2])
    src = tmp_path / "src"
    for v in range(1, 5):
        if v % 2:
            cli.diff(ck[v - 1][0], ck[v][0], src, v, base_version=v - 1, encoding=encoding, checksum="xxh3-128")
        else:
            ref.write_delta(ck[v - 1][0], ck[v][0], src, v, v - 1, encoding, "adler32")
    local = tmp_path / "local"
    base = ck[0][0]

    cli.apply(local, base, src, 2)
    raw = json.loads((local / ".weight_sync" / "state.json").read_text())
    assert raw["version"] == "000002", raw
    assert_tensors_equal(local, ck[2][1], "rust at 2")

    r = ref.pull(local, base, src, 3)
    assert r == {"version": 3, "previous": 2, "seeded_from": None, "applied": [3]}, r
    assert_tensors_equal(local, ck[3][1], "python continued to 3")
    assert json.loads((local / ".weight_sync" / "state.json").read_text()) == {"version": "000003"}

    out = cli.apply(local, base, src, 4)
    assert as_int(out["version"]) == 4 and as_int(out["previous"]) == 3, out
    assert [as_int(v) for v in out["applied"]] == [4], out
    assert_tensors_equal(local, ck[4][1], "rust continued to 4")
    assert state_version(local) == "000004"

    # pulling the applied version again is a no-op for both (an xor re-apply would corrupt the tensors)
    out = cli.apply(local, base, src, 4)
    assert [as_int(v) for v in out["applied"]] == [], out
    assert ref.pull(local, base, src, 4)["applied"] == []
    assert_tensors_equal(local, ck[4][1], "after no-op pulls")


def test_latest_pointer_interop(cli, make_ckpts, tmp_path):
    ck = make_ckpts(4)
    src = tmp_path / "src"
    for v in range(1, 4):
        ref.write_delta(ck[v - 1][0], ck[v][0], src, v, v - 1, "overwrite", "xxh3-128")
    base = ck[0][0]

    cli.run("pointer-advance", src, 1)
    assert (src / "latest").read_text() == "weight_v000001\n"
    cli.run("pointer-advance", src, "weight_v000002", "--expect", "weight_v000001")
    assert (src / "latest").read_text() == "weight_v000002\n"
    assert ref.read_pointer(src) == (None, 2)
    lp = tmp_path / "lp"
    assert ref.pull(lp, base, src, "latest")["version"] == 2
    assert_tensors_equal(lp, ck[2][1], "python pull latest")

    cli.run("pointer-advance", src, 1, expect_rc=5)  # moving backwards is refused
    assert (src / "latest").read_text() == "weight_v000002\n"

    ref.write_pointer(src, 3)
    lr = tmp_path / "lr"
    out = cli.apply(lr, base, src, "latest")
    assert as_int(out["version"]) == 3, out
    assert_tensors_equal(lr, ck[3][1], "rust apply latest (python pointer)")


# ------------------------------------------------------------------------------------------------
# self-check of the Python reference (no binaries needed)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checksum", CHECKSUMS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_reference_roundtrip(make_ckpts, tmp_path, encoding, checksum):
    ck = make_ckpts(4, shards=[1, 3, 2, 1])
    src = tmp_path / "src"
    ref.write_delta(ck[0][0], ck[1][0], src, 1, 0, encoding, checksum, num_files=2)
    ref.write_full(ck[2][0], src, 2)
    ref.write_delta(ck[2][0], ck[3][0], src, 3, 2, encoding, checksum)
    check_delta_dir(src, 1, 0, ck[0][1], ck[1][1], encoding, checksum, ours=False)
    check_full_dir(src, 2, ck[2][1], ours=False)
    local = tmp_path / "local"
    assert ref.pull(local, ck[0][0], src, 1)["applied"] == [1]
    assert_tensors_equal(local, ck[1][1], "ref at 1")
    r = ref.pull(local, ck[0][0], src, 3)
    assert r["seeded_from"] == 2 and r["applied"] == [3]
    assert_tensors_equal(local, ck[3][1], "ref at 3")
    with pytest.raises(ref.Conflict):
        ref.pull(local, ck[0][0], src, 1)


def test_lock_is_shared_with_python(cli, make_ckpts, tmp_path):
    """While a Python applier holds LOCAL/.weight_sync/lock (flock, exclusive), delta-apply must not apply:
    it either waits for the lock or exits 9 (locked)."""

    (c0, t0), (c1, t1) = make_ckpts(2)
    src = tmp_path / "src"
    ref.write_delta(c0, c1, src, 1, 0, "xor", "xxh3-128")
    local = tmp_path / "local"
    ref.pull(local, c0, src, 0)  # seed from BASE, state 000000
    assert state_version(local) == "000000"
    cmd = [str(cli.path("delta-apply")), "--local", str(local), "--base", str(c0), "--source", str(src),
           "--target", "1", "--json"]
    with open(local / ".weight_sync" / "lock", "a+") as lf:
        fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 2.0
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        rc_locked = proc.poll()
        assert state_version(local) == "000000", "delta-apply applied while another process held the lock"
        assert rc_locked in (None, 9), f"delta-apply under a held lock exited {rc_locked}: {proc.communicate()}"
    if rc_locked is None:  # it was waiting: now it must finish
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out, err)
    else:
        cli.apply(local, c0, src, 1)
    assert state_version(local) == "000001"
    assert_tensors_equal(local, t1, "after lock released")


def test_python_pointer_unparseable_is_an_error(cli, make_ckpts, tmp_path):
    ck = make_ckpts(2)
    src = tmp_path / "src"
    ref.write_delta(ck[0][0], ck[1][0], src, 1, 0, "xor", "xxh3-128")
    ref.atomic_write(src / "latest", b"weight_vABC\n")
    local = tmp_path / "local"
    proc = cli.apply(local, ck[0][0], src, "latest", expect_rc=3)  # never a silent fallback to BASE
    assert proc.returncode == 3
    with pytest.raises(ref.BadInput):
        ref.pull(tmp_path / "lp", ck[0][0], src, "latest")


def test_run_id_pointer_interop(cli, make_ckpts, tmp_path):
    """Pointer `RUN_ID/weight_vNNNNNN`: versions live under SRC/RUN_ID."""
    ck = make_ckpts(3)
    src = tmp_path / "src"
    run = src / "run-42"
    for v in (1, 2):
        cli.diff(ck[v - 1][0], ck[v][0], run, v, base_version=v - 1, encoding="overwrite", checksum="adler32")
    cli.run("pointer-advance", src, 2, "--run-id", "run-42")
    assert (src / "latest").read_text() == "run-42/weight_v000002\n"
    lp = tmp_path / "lp"
    assert ref.pull(lp, ck[0][0], src, "latest")["version"] == 2
    assert_tensors_equal(lp, ck[2][1], "python pull of run-id pointer")
    # and a Python-written run-id pointer followed by delta-apply
    ref.write_pointer(src, 2, run_id="run-42")
    lr = tmp_path / "lr"
    out = cli.apply(lr, ck[0][0], src, "latest")
    assert as_int(out["version"]) == 2, out
    assert_tensors_equal(lr, ck[2][1], "rust apply of python run-id pointer")
