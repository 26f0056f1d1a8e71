#!/usr/bin/env bash
# Check lib/gpu/kernels.cu without a GPU or CUDA toolkit (needs clang with the NVPTX target):
#  1. compile it to PTX for sm_80 with clang, NVRTC's predefinitions supplied by nvrtc_shim.h;
#  2. run it on the CPU (scripts/emulate_kernels.cpp) against a plain reference.
# NVRTC itself and the Rust pipeline are only exercised by tests/gpu.rs on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
CLANG=${CLANG:-$(command -v clang-14 || command -v clang)}
CLANGXX=${CLANGXX:-$(command -v clang++-14 || command -v clang++)}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$CLANG" -x cuda --cuda-device-only --cuda-gpu-arch=sm_80 -nocudainc -nocudalib \
    -Xclang -target-feature -Xclang +ptx70 -O2 -Wall -Wextra -Werror \
    -include scripts/nvrtc_shim.h -S -o "$out/kernels.ptx" lib/gpu/kernels.cu
echo "ok: kernels.cu compiles to PTX ($(grep -c '^.visible .entry' "$out/kernels.ptx") kernels)"
"$CLANGXX" -std=c++20 -O1 -pthread -Wall -o "$out/emulate" scripts/emulate_kernels.cpp
"$out/emulate"
