#!/usr/bin/env bash
# Weight-plane benchmark: installs what it needs (Debian tools, a venv), then runs
# bench/bench_weights.py with the given arguments (see --help). Non-interactive; as root
# it uses apt-get directly, otherwise sudo.
#   bench/run.sh                 # 512 MiB pair, all baselines
#   bench/run.sh --quick         # smoke run on a 16 MiB pair
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v xdelta3 >/dev/null 2>&1 || need+=(xdelta3)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    echo "bench/run.sh: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

VENV=${BENCH_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import numpy, zstandard, xxhash' >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r bench/requirements.txt
fi

# The read-ceiling baseline (bench/read_ceiling.rs), built like the tools.
cargo build --quiet --release --locked --example read_ceiling

exec "$VENV/bin/python" bench/bench_weights.py "$@"
