#!/usr/bin/env python3
"""A stand-in for an sglang server's weight-reload endpoints, for `make demo` and the tests.

Listens on 127.0.0.1 only (a free port unless --port), writes the port to --port-file once it
is listening, and answers like sglang:

* ``POST /update_weights_from_disk`` with ``{"model_path", "weight_version", "flush_cache",
  ...}``: loads the checkpoint at ``model_path`` the way an engine would — parses every
  ``*.safetensors`` header (8-byte LE length, JSON, contiguous data ending at the end of the
  file), reads every tensor's bytes and digests them (blake3 over name + dtype + shape + bytes,
  in name order) — then answers ``200 {"success": true, "message": ..., "num_paused_requests":
  0}``; on any failure ``400 {"success": false, "message": REASON, ...}`` and keeps the weights
  it had.
* ``GET /get_weight_version``: ``{"weight_version": "7" | null, "digest": HEX | null,
  "model_path": ..., "reloads": N, "seconds_last_reload": S}``.
* ``GET /health``: 200.

``--fail-reloads N`` answers 400 to the first N reloads (to test retries). Exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import blake3

    def _hasher():
        return blake3.blake3()
except ImportError:  # pragma: no cover - the venv has blake3
    import hashlib

    def _hasher():
        return hashlib.blake2b()


MAX_HEADER = 100 << 20


def load_checkpoint(path: str) -> tuple[str, int]:
    """Read and check every tensor of the checkpoint at ``path``; return (digest, bytes)."""
    if not os.path.isdir(path):
        raise ValueError(f"model_path {path!r} is not a directory")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and not f.startswith("."))
    if not files:
        raise ValueError(f"no *.safetensors files in {path!r}")
    tensors = {}
    total = 0
    for f in files:
        with open(os.path.join(path, f), "rb") as fh:
            data = fh.read()
        if len(data) < 8:
            raise ValueError(f"{f}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", data[:8])
        if n > MAX_HEADER or 8 + n > len(data):
            raise ValueError(f"{f}: header length {n} out of range")
        header = json.loads(data[8 : 8 + n])
        body = memoryview(data)[8 + n :]
        end = 0
        for name, t in sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = t["data_offsets"]
            if a != end or b < a or b > len(body):
                raise ValueError(f"{f}: tensor {name} has bad offsets {a}..{b}")
            end = b
            if name in tensors:
                raise ValueError(f"tensor {name} appears twice")
            tensors[name] = (t["dtype"], t["shape"], body[a:b])
        if end != len(body):
            raise ValueError(f"{f}: {len(body) - end} bytes after the last tensor")
    h = _hasher()
    for name in sorted(tensors):
        dtype, shape, b = tensors[name]
        h.update(f"{name}|{dtype}|{shape}|".encode())
        h.update(b)
        total += len(b)
    return h.hexdigest(), total


class State:
    def __init__(self, fail_reloads: int):
        self.lock = threading.Lock()
        self.version = None
        self.digest = None
        self.model_path = None
        self.reloads = 0
        self.fail_reloads = fail_reloads
        self.seconds = None


class Handler(BaseHTTPRequestHandler):
    state: State = None  # set in main
    server_version = "fake-sglang/0.1"

    def log_message(self, fmt, *args):  # quiet unless --verbose
        if self.server.verbose:
            sys.stderr.write("fake_sglang: " + (fmt % args) + "\n")

    def _answer(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        s = self.state
        if self.path == "/health":
            return self._answer(200, {"ok": True})
        if self.path == "/get_weight_version":
            with s.lock:
                return self._answer(200, {"weight_version": s.version, "digest": s.digest, "model_path": s.model_path, "reloads": s.reloads, "seconds_last_reload": s.seconds})
        self._answer(404, {"success": False, "message": f"no route {self.path}"})

    def do_POST(self):
        s = self.state
        if self.path != "/update_weights_from_disk":
            return self._answer(404, {"success": False, "message": f"no route {self.path}"})
        try:
            n = int(self.headers.get("Content-Length", "0"))
            req = json.loads(self.rfile.read(n) or b"{}")
            model_path = req["model_path"]
            version = req.get("weight_version")
        except Exception as e:  # noqa: BLE001 - any bad request is a 400, like sglang
            return self._answer(400, {"success": False, "message": f"bad request: {e}", "num_paused_requests": 0})
        with s.lock:
            if s.fail_reloads > 0:
                s.fail_reloads -= 1
                return self._answer(400, {"success": False, "message": "injected failure (--fail-reloads)", "num_paused_requests": 0})
            t = time.perf_counter()
            try:
                digest, nbytes = load_checkpoint(model_path)
            except Exception as e:  # noqa: BLE001
                return self._answer(400, {"success": False, "message": f"Failed to update weights: {e}. Rolled back to the previous weights.", "num_paused_requests": 0})
            s.version, s.digest, s.model_path = (str(version) if version is not None else None), digest, model_path
            s.reloads += 1
            s.seconds = time.perf_counter() - t
        self._answer(200, {"success": True, "message": f"Succeeded to update model weights ({nbytes} bytes, version {version}).", "num_paused_requests": 0})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--port-file", help="write the port here (atomically) once listening")
    ap.add_argument("--fail-reloads", type=int, default=0, help="answer 400 to the first N reloads")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--digest", metavar="DIR", help="print the digest the server would compute for DIR and exit")
    args = ap.parse_args(argv)
    if args.digest:
        print(load_checkpoint(args.digest)[0])
        return 0
    Handler.state = State(args.fail_reloads)
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.verbose = args.verbose
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown, daemon=True).start())
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{srv.server_address[1]}\n")
        os.replace(tmp, args.port_file)
    srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
