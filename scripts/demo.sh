#!/usr/bin/env bash
# The weight plane end to end on one machine: a "trainer" publishes K RL steps of a generated
# model as delta versions and advances `latest`; a "rollout host" with its own local directory
# follows `latest` with delta-apply after every step. Prints a per-step table and checks that
# the rollout host's checkpoint ends bit-identical to the trainer's.
#
#   scripts/demo.sh [--size-mb 64] [--steps 5] [--encoding xor|overwrite] [--dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

size_mb=64 steps=5 encoding=xor dir=${DEMO_DIR:-target/demo}
while [ $# -gt 0 ]; do
    case "$1" in
        --size-mb) size_mb=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --encoding) encoding=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "demo.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
bin=${DISAGG_BIN_DIR:-target/release}
py=${PYTHON:-.venv/bin/python}

rm -rf "$dir"
mkdir -p "$dir/trainer" "$dir/shared/weights" "$dir/rollout"
echo "== generating a ${size_mb} MiB model and ${steps} RL steps (fp32 master weights, bf16 checkpoints)"
"$py" testdata/gen_rl_pair.py --out "$dir/trainer/ckpt" --size-mb "$size_mb" --steps "$steps" --quiet

field() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

printf '\n%-8s %-9s %-10s %-12s %-10s %-10s %-9s\n' version kind density wire_bytes diff_s apply_s verified
prev=none
for ((v = 1; v <= steps; v++)); do
    # Trainer node: diff the new checkpoint against the previous one, publish, advance.
    kind_flag=()
    [ $((v % 4)) -eq 0 ] && kind_flag=(--full)   # a periodic full version cuts the chain
    d=$("$bin/delta-diff" "$dir/trainer/ckpt/step_$((v - 1))" "$dir/trainer/ckpt/step_$v" \
        --publish "$dir/shared/weights" --version "$v" --encoding "$encoding" "${kind_flag[@]}" --json)
    "$bin/pointer-advance" "$dir/shared/weights" "$v" --expect "$prev" >/dev/null
    prev=weight_v$(printf '%06d' "$v")
    # Rollout node: follow `latest` into its own local checkpoint.
    a=$("$bin/delta-apply" --local "$dir/rollout/local" --base "$dir/trainer/ckpt/step_0" \
        --source "$dir/shared/weights" --target latest --json)
    ok=yes
    for f in "$dir/trainer/ckpt/step_$v"/*.safetensors; do
        cmp -s "$f" "$dir/rollout/local/$(basename "$f")" || ok=NO
    done
    printf '%-8s %-9s %-10.4f %-12s %-10.3f %-10.3f %-9s\n' "$v" "$(field "$d" kind)" "$(field "$d" density)" \
        "$(field "$d" wire_bytes)" "$(field "$d" seconds)" "$(field "$a" seconds)" "$ok"
    [ "$ok" = yes ] || { echo "demo: rollout checkpoint differs from the trainer's at version $v" >&2; exit 1; }
done
full=$(du -sb "$dir/trainer/ckpt/step_0" | cut -f1)
wire=$(du -sb "$dir/shared/weights" | cut -f1)
echo
echo "checkpoint: $full bytes; everything published for $steps versions: $wire bytes"
echo "verdict: rollout host's checkpoint is bit-identical to the trainer's step_$steps (state: $(cat "$dir/rollout/local/.weight_sync/state.json"))"
