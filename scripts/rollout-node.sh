#!/usr/bin/env bash
# A rollout node of the pipeline: an inference engine (here scripts/fake_sglang.py, which
# answers /update_weights_from_disk like sglang), `delta-follow` keeping the node's local
# checkpoint at SHARED/weights/latest and reloading the engine after every verified apply, and
# a producer publishing feature refs tagged with the engine's weight version into SHARED/refs.
#
#   scripts/rollout-node.sh --shared DIR --work DIR [--name rollout-0] [--poll 0.2]
#       [--refs-per-tick 4] [--tick 0.25] [--partial-pct 25] [--engine-url URL] [--close-on-exit]
#       [--no-fsync]
#
# With --engine-url, a real engine is used and no fake one is started. Killed at any instant
# (kill -9 of the whole tree), it is restarted with the same arguments: delta-follow repairs the
# local checkpoint, ref-publish resumes its stream. On SIGTERM it stops (and, with
# --close-on-exit, closes its ref stream for good: consumers then see it finished).
# --no-fsync: delta-follow records versions without waiting for the local disk (a reboot makes
# it reseed; docs/FORMATS.md §6), for nodes whose local checkpoint is on an ephemeral disk.
# Logs: WORK/follow.jsonl (one delta-follow event per line), WORK/engine.log.
# Env: DISAGG_BIN_DIR (default target/release), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

shared= work= name=rollout-0 poll=0.2 per_tick=4 tick=0.25 partial_pct=25 url= close=0 sync=()
while [ $# -gt 0 ]; do
    case "$1" in
        --shared) shared=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --poll) poll=$2; shift 2 ;;
        --refs-per-tick) per_tick=$2; shift 2 ;;
        --tick) tick=$2; shift 2 ;;
        --partial-pct) partial_pct=$2; shift 2 ;;
        --engine-url) url=$2; shift 2 ;;
        --close-on-exit) close=1; shift ;;
        --no-fsync) sync=(--no-fsync); shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "rollout-node: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -n "$shared" ] && [ -n "$work" ] || { echo "rollout-node: --shared and --work are required" >&2; exit 2; }
bin=${DISAGG_BIN_DIR:-target/release}
py=${PYTHON:-.venv/bin/python}
src=$shared/weights ch=$shared/refs
mkdir -p "$work"
work=$(cd "$work" && pwd)
log() { echo "rollout-node[$name]: $*" >&2; }

pids=()
stopping=0
stop() {
    stopping=1
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "$close" = 0 ] || "$bin/ref-publish" "$ch" --producer "$name" --close </dev/null >/dev/null 2>&1 || true
    log "stopped"
    exit 0
}
trap stop TERM INT

# The engine.
if [ -z "$url" ]; then
    rm -f "$work/port"
    "$py" scripts/fake_sglang.py --port-file "$work/port" >>"$work/engine.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 200); do [ -s "$work/port" ] && break; sleep 0.05; done
    [ -s "$work/port" ] || { log "engine did not start"; exit 1; }
    url=http://127.0.0.1:$(cat "$work/port")
fi
log "engine at $url"

# The model every node starts from (version 0).
for _ in $(seq 1 600); do [ -d "$shared/base" ] && break; sleep 0.1; done
[ -d "$shared/base" ] || { log "no $shared/base"; exit 1; }

# The follower: pull, verify, reload; status in SHARED/weights/.followers/NAME.json for delta-gc.
"$bin/delta-follow" --local "$work/local" --base "$shared/base" --source "$src" --poll "$poll" \
    --max-backoff 2 --name "$name" --json --reload-on-start --reload-cmd "scripts/sglang-reload.sh $url" "${sync[@]}" \
    >>"$work/follow.jsonl" 2>>"$work/follow.err" &
pids+=($!)

# The producer: every tick, a few refs tagged with the weight version the engine runs. Some are
# partial trajectories that span several versions (metadata.weight_versions = [start, now]);
# the trainer drops those that are too stale.
mkdir -p "$ch"
seq_no=0
while [ "$stopping" = 0 ]; do
    ans=$(curl -sS --max-time 5 "$url/get_weight_version" 2>/dev/null || true)
    v=$(sed -n 's/.*"weight_version": *"\([0-9]*\)".*/\1/p' <<<"$ans")
    if [ -n "$v" ]; then
        batch=
        for ((i = 0; i < per_tick; i++)); do
            seq_no=$((seq_no + 1))
            id="$name-$$-$seq_no"
            if [ $((RANDOM % 100)) -lt "$partial_pct" ] && [ "$v" -ge 3 ]; then
                meta=$(printf '{"weight_versions":[%d,%d]}' $((v - 2 - RANDOM % 2)) "$v")
            else
                meta=$(printf '{"weight_version":%d}' "$v")
            fi
            batch+=$(printf '{"sample_id":"%s","run_id":null,"source_task_id":"prompt-%d","feature_store_uri":"file://%s/store","feature_keys":{"hidden_state":"objects/%s/g00000001.safetensors#hidden_state"},"feature_specs":{},"strategy":"eagle3","schema_version":1,"target_model_version":"%s","draft_weight_version":null,"tokenizer_version":null,"num_tokens":256,"estimated_bytes":1048576,"metadata":%s}' \
                "$id" "$seq_no" "$shared" "$id" "$v" "$meta")$'\n'
        done
        printf '%s' "$batch" | "$bin/ref-publish" "$ch" --producer "$name" --max-in-flight 512 >/dev/null || log "ref-publish failed"
    fi
    sleep "$tick" &
    wait $! || true
done
