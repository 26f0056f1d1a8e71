#!/usr/bin/env bash
# The trainer node of the pipeline: each step writes a checkpoint, publishes it as a weight
# version (delta-diff, a full version every K steps), advances `latest` (pointer-advance), and
# consumes the refs the rollout fleet produced (ref-tail, dropping refs more than S versions
# stale). Shares only SHARED with the fleet:
#
#   SHARED/base/      the model every node starts from (version 0; written once, atomically)
#   SHARED/weights/   weight versions, `latest`, follower status files (.followers/)
#   SHARED/refs/      the ref channel (one producer per rollout node)
#
#   scripts/trainer-node.sh --shared DIR --work DIR [--steps 8] [--size-mb 16] [--full-every 4]
#       [--max-staleness 1] [--lr 1e-6] [--step-interval S] [--gc-keep N] [--no-gc]
#       [--wait-followers N] [--wait-timeout S]
#
# Writes one JSON line per step to WORK/steps.jsonl: {"step", "diff": <delta-diff --json>,
# "tail": <ref-tail summary>, "gc": <delta-gc --json>, "seconds_train"}. The model update is
# scripts/toy_trainer.py (fp32 master weights, Adam, bf16 checkpoints); replace it with your
# trainer's checkpoint writer. Env: DISAGG_BIN_DIR (default target/release), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

shared= work= steps=8 size_mb=16 full_every=4 max_staleness=1 lr=1e-6 step_interval=0
gc_keep=2 gc=1 wait_followers=0 wait_timeout=120
while [ $# -gt 0 ]; do
    case "$1" in
        --shared) shared=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --size-mb) size_mb=$2; shift 2 ;;
        --full-every) full_every=$2; shift 2 ;;
        --max-staleness) max_staleness=$2; shift 2 ;;
        --lr) lr=$2; shift 2 ;;
        --step-interval) step_interval=$2; shift 2 ;;
        --gc-keep) gc_keep=$2; shift 2 ;;
        --no-gc) gc=0; shift ;;
        --wait-followers) wait_followers=$2; shift 2 ;;
        --wait-timeout) wait_timeout=$2; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "trainer-node: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -n "$shared" ] && [ -n "$work" ] || { echo "trainer-node: --shared and --work are required" >&2; exit 2; }
bin=${DISAGG_BIN_DIR:-target/release}
py=${PYTHON:-.venv/bin/python}
src=$shared/weights ch=$shared/refs
mkdir -p "$work/ckpt" "$work/refs" "$src" "$ch"
log() { echo "trainer-node: $*" >&2; }

# Step 0: the model everyone starts from. Published once into SHARED/base by rename, so a
# rollout node never sees half of it.
"$py" scripts/toy_trainer.py init --state "$work/state" --out "$work/ckpt/step_0" --size-mb "$size_mb" >/dev/null
if [ ! -d "$shared/base" ]; then
    rm -rf "$shared/.base.tmp"
    cp -r "$work/ckpt/step_0" "$shared/.base.tmp"
    sync -f "$shared/.base.tmp" 2>/dev/null || true
    mv "$shared/.base.tmp" "$shared/base"
fi
log "model: $(du -sb "$work/ckpt/step_0" | cut -f1) bytes of bf16 checkpoint"

# Consume what the fleet produced so far; prints the ref-tail summary (one JSON object).
consume() {
    local out=$1 err
    err=$("$bin/ref-tail" "$ch" --cursor trainer --max-staleness "$max_staleness" --pointer "$src" \
        --stale-out "$work/stale.jsonl" --json 2>&1 >>"$out") || { log "ref-tail failed: $err"; echo '{}'; return 0; }
    printf '%s\n' "$err" | tail -n 1
}
num() { sed -n "s/.*\"$1\":\([0-9][0-9]*\).*/\1/p" <<<"$2" | head -n 1; }

prev=none batch=1
: >"$work/steps.jsonl"
for ((v = 1; v <= steps; v++)); do
    t0=$(date +%s.%N)
    "$py" scripts/toy_trainer.py step --state "$work/state" --out "$work/ckpt/step_$v" --lr "$lr" --batch "$batch" >/dev/null
    t1=$(date +%s.%N)
    d=$("$bin/delta-diff" "$work/ckpt/step_$((v - 1))" "$work/ckpt/step_$v" --publish "$src" --version "$v" \
        --full-every "$full_every" --json)
    "$bin/pointer-advance" "$src" "$v" --expect "$prev" >/dev/null
    prev=weight_v$(printf '%06d' "$v")
    g='{}'
    if [ "$gc" = 1 ]; then
        # What cron does (README): here after every step, with no grace period, to show the cut.
        g=$("$bin/delta-gc" "$src" --keep "$gc_keep" --min-age 0 --json) || { log "delta-gc failed"; g='{}'; }
    fi
    tail_summary=$(consume "$work/refs/consumed.jsonl")
    batch=$(( $(num delivered "$tail_summary") + 1 ))
    printf '{"step":%d,"seconds_train":%s,"diff":%s,"tail":%s,"gc":%s}\n' "$v" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')" "$d" "$tail_summary" "$g" >>"$work/steps.jsonl"
    [ "$v" -ge 2 ] && rm -rf "$work/ckpt/step_$((v - 2))"
    log "step $v published"
    [ "$step_interval" = 0 ] || sleep "$step_interval"
done

# Optionally wait until N followers report the final version reloaded, consuming refs meanwhile.
if [ "$wait_followers" -gt 0 ]; then
    deadline=$(( $(date +%s) + wait_timeout ))
    while :; do
        n=0
        for f in "$src"/.followers/*.json; do
            [ -e "$f" ] || continue
            r=$(num reloaded "$(cat "$f")")
            [ "${r:-0}" -ge "$steps" ] && n=$((n + 1))
        done
        [ "$n" -ge "$wait_followers" ] && break
        [ "$(date +%s)" -lt "$deadline" ] || { log "timed out waiting for $wait_followers followers at version $steps"; exit 1; }
        sleep 0.2
    done
fi
printf '{"final":%s}\n' "$(consume "$work/refs/consumed.jsonl")" >>"$work/steps.jsonl"
log "done: $steps steps"
