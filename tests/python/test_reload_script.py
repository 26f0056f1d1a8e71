"""scripts/sglang-reload.sh (the `delta-follow --reload-cmd` recipe) against the fake sglang server.

The request body must be valid JSON whatever the host-local path is called, and the script must
fail (non-zero, a message on stderr) whenever the engine does not answer {"success": true}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "sglang-reload.sh"
FAKE = REPO / "scripts" / "fake_sglang.py"


@pytest.fixture
def engine(tmp_path):
    """Start the fake engine; yields a function (fail_reloads) -> base URL."""
    procs = []

    def start(fail_reloads: int = 0) -> str:
        port_file = tmp_path / f"port-{len(procs)}"
        p = subprocess.Popen([sys.executable, str(FAKE), "--port-file", str(port_file), "--fail-reloads", str(fail_reloads)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert p.poll() is None, p.stderr.read().decode()
            assert time.monotonic() < deadline, "fake engine did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port_file.read_text().strip()}"

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True)
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(directory / "model.safetensors"))
    return directory


def reload(url: str, local: Path | str, version: str = "7") -> subprocess.CompletedProcess:
    env = dict(os.environ, DISAGG_LOCAL=str(local), DISAGG_VERSION=version)
    return subprocess.run(["bash", str(SCRIPT), url], env=env, capture_output=True, text=True, timeout=60)


def engine_state(url: str) -> dict:
    with urllib.request.urlopen(url + "/get_weight_version", timeout=10) as r:
        return json.load(r)


@pytest.mark.parametrize("name", ["plain", 'with "quotes"', "back\\slash", "both \\\" and '"])
def test_the_engine_loads_the_path_it_is_given_whatever_its_name(engine, tmp_path, name):
    url = engine()
    local = checkpoint(tmp_path / name)
    r = reload(url, local)
    assert r.returncode == 0, r.stderr
    state = engine_state(url)
    assert (state["model_path"], state["weight_version"], state["reloads"]) == (str(local), "7", 1)


def test_a_refused_reload_fails_the_script(engine, tmp_path):
    url = engine(fail_reloads=1)
    local = checkpoint(tmp_path / "ckpt")
    r = reload(url, local)
    assert r.returncode == 1 and "engine refused version 7" in r.stderr, (r.returncode, r.stderr)
    assert engine_state(url)["weight_version"] is None, "nothing loaded"
    # The retry delta-follow makes then succeeds.
    assert reload(url, local).returncode == 0
    assert engine_state(url)["weight_version"] == "7"
    # A path the engine cannot load: 400 from the engine, exit 1 here.
    r = reload(url, tmp_path / "missing", "8")
    assert r.returncode == 1 and "refused version 8" in r.stderr, r.stderr
    assert engine_state(url)["weight_version"] == "7", "the engine kept what it had"


def test_a_path_with_a_control_character_is_not_sent(engine, tmp_path):
    url = engine()
    local = checkpoint(tmp_path / "new\nline")
    r = reload(url, local)
    assert r.returncode == 2 and "DISAGG_LOCAL contains a control character" in r.stderr, (r.returncode, r.stderr)
    assert engine_state(url)["reloads"] == 0


def test_an_unreachable_engine_fails_the_script(tmp_path):
    r = reload("http://127.0.0.1:9", checkpoint(tmp_path / "ckpt"))
    assert r.returncode == 1 and "POST failed" in r.stderr, r.stderr
