"""Fixtures for the Python interop tests of disagg's weight plane.

Binaries come from $DISAGG_BIN_DIR, else <repo>/target/release if it exists, else <repo>/target/debug.
A missing binary FAILS the test that needs it (never a skip).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import disagg_ref as ref  # noqa: E402


def bin_dir() -> Path:
    env = os.environ.get("DISAGG_BIN_DIR")
    if env:
        return Path(env)
    rel = REPO / "target" / "release"
    return rel if rel.is_dir() else REPO / "target" / "debug"


class Cli:
    """Runs disagg's binaries; failures carry the command, exit code, stdout and stderr."""

    def __init__(self, directory: Path):
        self.dir = directory

    def path(self, name: str) -> Path:
        p = self.dir / name
        if not (p.is_file() and os.access(p, os.X_OK)):
            pytest.fail(f"binary {name!r} not found at {p} (set DISAGG_BIN_DIR or build with cargo build --release)",
                        pytrace=False)
        return p

    def run(self, name: str, *args, expect_rc: int | None = 0, timeout: int = 300) -> subprocess.CompletedProcess:
        cmd = [str(self.path(name))] + [str(a) for a in args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if expect_rc is not None and proc.returncode != expect_rc:
            pytest.fail(f"`{' '.join(cmd)}` exited {proc.returncode}, expected {expect_rc}\n"
                        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}", pytrace=False)
        return proc

    def run_json(self, name: str, *args) -> dict:
        proc = self.run(name, *args, "--json")
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        out, err = None, None
        if len(lines) != 1:
            err = f"expected exactly one JSON line on stdout, got {len(lines)}"
        else:
            try:
                out = json.loads(lines[0])
            except json.JSONDecodeError as e:
                err = str(e)
            if err is None and not isinstance(out, dict):
                err = "not a JSON object"
        if err is not None:
            pytest.fail(f"`{name} {' '.join(map(str, args))} --json` printed bad stdout ({err}):\n{proc.stdout}\n"
                        f"--- stderr ---\n{proc.stderr}", pytrace=False)
        return out

    # convenience wrappers ---------------------------------------------------------------------
    def diff(self, old, new, src, version, base_version=None, encoding=None, checksum=None, full=False):
        args = [old, new, "--publish", src, "--version", version]
        if base_version is not None:
            args += ["--base-version", base_version]
        if encoding:
            args += ["--encoding", encoding]
        if checksum:
            args += ["--checksum", checksum]
        if full:
            args += ["--full"]
        return self.run_json("delta-diff", *args)

    def apply(self, local, base, src, target, expect_rc=0):
        args = ["--local", local, "--base", base, "--source", src, "--target", target]
        if expect_rc == 0:
            return self.run_json("delta-apply", *args)
        return self.run("delta-apply", *args, expect_rc=expect_rc)


def pytest_report_header(config):
    d = bin_dir()
    lines = [f"disagg binaries: {d}"]
    for name in ("delta-diff", "delta-apply", "pointer-advance"):
        p = d / name
        lines.append(f"  {name}: " + ("built " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(p))) if p.exists() else "MISSING"))
    return lines


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli(bin_dir())


@pytest.fixture
def make_ckpts(tmp_path):
    """make_ckpts(n, shards=[...], seed=.., scale=..) -> list of (dir, tensors) for versions 0..n-1,
    each a `ref.step` of the previous one."""

    def _make(n: int, shards=None, seed: int = 0, scale: int = 1, frac: float = 0.03):
        shards = shards or [1] * n
        t = ref.random_tensors(seed, scale=scale)
        out = []
        for i in range(n):
            if i:
                t = ref.step(t, seed * 1000 + i, frac=frac)
            d = ref.write_checkpoint(tmp_path / f"ckpt{i}", t, n_shards=shards[i])
            out.append((d, t))
        return out

    return _make
