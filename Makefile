# disagg: `make demo` runs the main job on an embedded default, `make test` runs every test.
# Both set up what they need on a fresh machine (a Python venv for the generators and the
# interop tests; the Rust toolchain is the machine's).

CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PY_PKGS := numpy safetensors zstandard xxhash blake3 pytest

.PHONY: build venv test test-rust test-python fmt-check crash bench bench-quick demo clean check-kernels

build:
	$(CARGO) build --release --locked

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PY_PKGS)
	touch $@

venv: $(VENV)/.ready

# Unit, CLI, format-conformance and (bounded) crash tests; failpoints are compiled into the
# debug test build only, never into the release binaries.
test-rust:
	$(CARGO) test --locked --features failpoints
	# Tests that scan gigabytes, skipped in the debug build above, run optimized here.
	$(CARGO) test --release --locked --lib overwrite_refuses_a_count_that_overflows_u32
	# The `cuda` feature builds with no CUDA toolkit; without a GPU its tests print "skipped: no GPU".
	$(CARGO) build --locked --features cuda
	$(CARGO) test --locked --features cuda --test gpu

# Compile lib/gpu/kernels.cu to PTX with clang and run it on a CPU emulator (no GPU needed).
check-kernels:
	bash scripts/check_kernels.sh

test-python: build venv
	DISAGG_BIN_DIR=target/release $(PY) -m pytest -q tests/python

# Formatting (rustfmt.toml), where the toolchain has rustfmt.
fmt-check:
	@if $(CARGO) fmt --version >/dev/null 2>&1; then $(CARGO) fmt --check; else echo "fmt-check: no rustfmt in this toolchain: skipped"; fi

test: fmt-check test-rust test-python

# The crash loop with many more random kills than `make test` runs.
crash:
	DISAGG_CRASH_TRIALS=$${DISAGG_CRASH_TRIALS:-500} $(CARGO) test --locked --features failpoints --test crash -- --nocapture

# Weight plane (vs numpy/slime, xdelta3, zstd --patch-from, cp), data plane (refs/s, latency,
# ingest vs cp + sync), codec components vs libzstd, GPU diff (prints "no GPU: skipped" without
# one). Ratios, not assertions.
bench: build venv
	bash bench/run.sh $(BENCH_ARGS)
	# Our entropy stage and decoder against libzstd on the same input (MB/s, bytes).
	$(CARGO) test --release --locked --lib -- --ignored --nocapture speed_vs_libzstd
	DISAGG_BIN_DIR=target/release $(PY) bench/bench_dataplane.py
	bash bench/bench_gpu.sh

bench-quick: build venv
	bash bench/run.sh --quick

# The whole pipeline: trainer node + rollout node (delta-follow, fake sglang) sharing one dir.
demo: build venv
	PYTHON=$(PY) bash scripts/demo-pipeline.sh

# The weight plane alone (diff -> advance -> apply, no fleet).
.PHONY: demo-weights
demo-weights: build venv
	PYTHON=$(PY) bash scripts/demo.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV) bench-data

# tests/fleet.rs runs the two-node demo end to end (toy trainer, fake sglang engine): it needs the venv.
test-rust: venv
