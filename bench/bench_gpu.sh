#!/usr/bin/env bash
# GPU diff benchmark (docs/GPU.md). Builds with the `cuda` feature (no CUDA toolkit needed)
# and runs bench/bench_gpu.rs; on a machine without a usable GPU it prints
# "no GPU: skipped (<reason>)" and exits 0.
#   bash bench/bench_gpu.sh              # 256 MiB tensor, densities 0.1 %, 2 %, 50 %
#   bash bench/bench_gpu.sh 1024 1 100   # 1 GiB tensor, densities 1 % and 100 %
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --quiet --release --locked --features cuda --example bench_gpu -- "$@"
