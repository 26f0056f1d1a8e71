"""A reader of disagg's data-plane files written from docs/FORMATS.md alone.

Runs the real binaries (DISAGG_BIN_DIR, default target/debug) and reads what they wrote with
numpy, safetensors and xxhash only: the manifest, store objects through their refs, channel
segments with their checksums, cursors, and the sharding rule.
"""

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import xxhash
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("DISAGG_BIN_DIR", ROOT / "target" / "debug"))
FIXTURES = ROOT / "testdata" / "features"


def run(name, *args, stdin=""):
    return subprocess.run([str(BIN / name), *map(str, args)], input=stdin, capture_output=True, text=True)


def check_line(line: bytes):
    """The spec: line ends with '"disagg":{"producer":"P","seq":N,"xxh3":"H16"}}}'; H covers all but the last 20 bytes."""
    assert line.endswith(b'"}}}')
    stated = line[-20:-4].decode()
    assert stated == "%016x" % xxhash.xxh3_64_intdigest(line[:-20]), "checksum"
    ref = json.loads(line)
    stamp = ref["metadata"]["disagg"]
    assert list(stamp) == ["producer", "seq", "xxh3"] and stamp["xxh3"] == stated
    return ref, stamp["producer"], stamp["seq"]


def read_tensor(ref, name):
    root = ref["feature_store_uri"][len("file://"):]
    path, tensor = ref["feature_keys"][name].rsplit("#", 1)
    with safe_open(os.path.join(root, path), "np") as f:
        if ref["feature_specs"][name]["dtype"] == "bfloat16":
            raise AssertionError("numpy has no bf16")
        return f.get_tensor(tensor)


def raw_tensor(ref, name):
    """Raw bytes via the safetensors layout (works for bf16 too)."""
    root = ref["feature_store_uri"][len("file://"):]
    path, tensor = ref["feature_keys"][name].rsplit("#", 1)
    data = Path(root, path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    s, e = header[tensor]["data_offsets"]
    return data[8 + n + s:8 + n + e], header[tensor]


def max_array_len(v):
    if isinstance(v, list):
        return max([len(v)] + [max_array_len(x) for x in v])
    if isinstance(v, dict):
        return max([0] + [max_array_len(x) for x in v.values()])
    return 0


def test_manifest_and_store_objects(tmp_path):
    inp = tmp_path / "in"
    shutil.copytree(FIXTURES, inp)
    (inp / "expected.json").unlink()
    r = run("feature-ingest", inp, "--store", tmp_path / "store", "--manifest", tmp_path / "refs.json", "--json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "refs.json.done").exists()
    manifest = json.loads((tmp_path / "refs.json").read_text())
    assert manifest["schema_version"] == 1
    expected = json.loads((FIXTURES / "expected.json").read_text())
    assert len(manifest["refs"]) == sum(1 for v in expected.values() if v["valid"])
    np_dtypes = {"float16": np.float16, "float32": np.float32, "int64": np.int64, "int32": np.int32, "uint8": np.uint8, "bool": np.bool_}
    for ref in manifest["refs"]:
        assert ref["schema_version"] == 1 and max_array_len(ref) <= 64, "refs carry no tensor data"
        want = expected[ref["source_task_id"]]["tensors"]
        assert set(ref["feature_keys"]) == set(want)
        for name, w in want.items():
            raw, hdr = raw_tensor(ref, name)
            assert raw.hex() == w["hex"] and hdr["shape"] == w["shape"]
            assert ref["feature_specs"][name]["dtype"] == w["dtype"]
            if w["dtype"] in np_dtypes:
                arr = read_tensor(ref, name)
                np.testing.assert_array_equal(arr, np.frombuffer(bytes.fromhex(w["hex"]), np_dtypes[w["dtype"]]).reshape(w["shape"]))
        key = ref["metadata"]["store_key"]
        parts = key.split("/")
        assert parts[0] == "objects" and parts[1] == "%02x" % (xxhash.xxh3_64_intdigest(ref["sample_id"].encode()) >> 56)
        assert parts[3] == "g%08d.safetensors" % ref["metadata"]["generation"]


def test_channel_segments_cursor_and_shards(tmp_path):
    ch = tmp_path / "ch"
    refs = [json.dumps({"sample_id": f"s{i}", "feature_store_uri": "file:///x", "feature_keys": {"h": "k"},
                        "schema_version": 1, "metadata": {"weight_version": i}}) for i in range(300)]
    for prod, chunk in (("p0", refs[:150]), ("p1", refs[150:])):
        r = run("ref-publish", ch, "--producer", prod, "--close", stdin="\n".join(chunk) + "\n")
        assert r.returncode == 0, r.stderr
    # Read the segments ourselves, per the spec.
    mine = {}
    for pdir in sorted((ch / "producers").iterdir()):
        segs = sorted(p for p in pdir.iterdir() if p.name.startswith("seg-"))
        seqs = []
        for seg in segs:
            for line in seg.read_bytes().split(b"\n")[:-1]:
                ref, prod, seq = check_line(line)
                assert prod == pdir.name
                seqs.append(seq)
                mine[(prod, seq)] = ref["sample_id"]
        assert seqs == list(range(len(seqs)))
        assert json.loads((pdir / "closed").read_text())["published"] == len(seqs)
    # The tail prints the same lines; shards follow xxh3("P:N") % W.
    got = {}
    for rank in range(2):
        r = run("ref-tail", ch, "--cursor", "py", "--follow", "--rank", rank, "--world", 2)
        assert r.returncode == 0, r.stderr
        for line in r.stdout.encode().splitlines():
            ref, prod, seq = check_line(line)
            assert xxhash.xxh3_64_intdigest(f"{prod}:{seq}".encode()) % 2 == rank
            got[(prod, seq)] = ref["sample_id"]
        cur = json.loads((ch / "cursors" / f"py.r{rank}of2.json").read_text())
        assert cur["rank"] == rank and cur["world"] == 2
    assert got == mine and len(got) == 300
    consumed = sum(json.loads(p.read_text())["producers"][prod]["consumed"]
                   for p in (ch / "cursors").glob("*.json") for prod in ("p0", "p1"))
    assert consumed == 300


def test_staleness_pointer(tmp_path):
    ch, w = tmp_path / "ch", tmp_path / "w"
    w.mkdir()
    (w / "latest").write_text("weight_v000020\n")
    lines = [json.dumps({"sample_id": f"s{v}", "feature_store_uri": "file:///x", "feature_keys": {},
                         "schema_version": 1, "metadata": {"weight_version": v}}) for v in range(10, 21)]
    assert run("ref-publish", ch, "--producer", "a", "--close", stdin="\n".join(lines) + "\n").returncode == 0
    r = run("ref-tail", ch, "--follow", "--cursor", "c", "--max-staleness", 4, "--pointer", w, "--stale-out", tmp_path / "stale")
    assert r.returncode == 0, r.stderr
    kept = [json.loads(l)["metadata"]["weight_version"] for l in r.stdout.splitlines()]
    assert kept == list(range(16, 21))
    assert len((tmp_path / "stale").read_text().splitlines()) == 6
