#!/usr/bin/env bash
# `make demo`: the whole loop on one machine. Two "nodes" run as two separate process trees
# (own sessions, own working dirs) that share only DIR/shared:
#
#   node0 (trainer-node.sh):  Adam steps on a small fp32 model -> bf16 checkpoint -> delta-diff
#                             -> pointer-advance -> delta-gc; consumes refs with ref-tail
#                             (dropping refs more than --max-staleness versions old)
#   node1 (rollout-node.sh):  a fake sglang engine; delta-follow pulls, verifies, reloads it
#                             through /update_weights_from_disk; a producer publishes refs tagged
#                             with the engine's weight version (some are stale partial rollouts)
#
# Prints a per-step table and a verdict: the rollout host's checkpoint is bit-identical to the
# trainer's, and the engine loaded exactly those bytes. --kill-rollout-at N kills the rollout
# node with SIGKILL (the whole tree) once version N is out, and restarts it.
#
#   scripts/demo-pipeline.sh [--size-mb 64] [--steps 10] [--full-every 4] [--max-staleness 1]
#       [--step-interval 0] [--kill-rollout-at N (default steps/2; 0: never)] [--dir DIR]
#       [--timeout 300]
set -euo pipefail
cd "$(dirname "$0")/.."

size_mb=64 steps=10 full_every=4 max_staleness=1 step_interval=0 kill_at= dir=${DEMO_DIR:-target/demo} timeout=300
while [ $# -gt 0 ]; do
    case "$1" in
        --size-mb) size_mb=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --full-every) full_every=$2; shift 2 ;;
        --max-staleness) max_staleness=$2; shift 2 ;;
        --step-interval) step_interval=$2; shift 2 ;;
        --kill-rollout-at) kill_at=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "demo: unknown option $1" >&2; exit 2 ;;
    esac
done
kill_at=${kill_at:-$((steps / 2))}
export DISAGG_BIN_DIR=${DISAGG_BIN_DIR:-target/release}
export PYTHON=${PYTHON:-.venv/bin/python}
bin=$DISAGG_BIN_DIR
for b in delta-diff pointer-advance delta-follow delta-gc ref-publish ref-tail; do
    [ -x "$bin/$b" ] || { echo "demo: $bin/$b not built (make build)" >&2; exit 1; }
done

rm -rf "$dir"
mkdir -p "$dir/shared" "$dir/node0" "$dir/node1"
dir=$(cd "$dir" && pwd)
shared=$dir/shared src=$dir/shared/weights
# per-node.sh puts each role's files under WORK/trainer and WORK/rollout-RANK.
tw=$dir/node0/trainer rw=$dir/node1/rollout-1
start=$(date +%s.%N)

tpid= rpid=
cleanup() {
    [ -n "$rpid" ] && kill -TERM -- "-$rpid" 2>/dev/null || true
    [ -n "$tpid" ] && kill -TERM -- "-$tpid" 2>/dev/null || true
}
trap cleanup EXIT
start_rollout() {
    setsid scripts/per-node.sh --node-rank 1 --shared "$shared" --work "$dir/node1" >>"$dir/node1/node.log" 2>&1 &
    rpid=$!
}
echo "== two nodes sharing only $shared: trainer (node0) and rollout (node1); ${size_mb} MiB model, $steps steps"
setsid scripts/per-node.sh --node-rank 0 --shared "$shared" --work "$dir/node0" -- --steps "$steps" \
    --size-mb "$size_mb" --full-every "$full_every" --max-staleness "$max_staleness" \
    --step-interval "$step_interval" --wait-followers 1 --wait-timeout "$timeout" >"$dir/node0/node.log" 2>&1 &
tpid=$!
start_rollout

deadline=$(( $(date +%s) + timeout ))
killed=
if [ "$kill_at" -gt 0 ]; then
    while :; do
        cur=$(sed -n 's/.*weight_v0*\([0-9][0-9]*\).*/\1/p' "$src/latest" 2>/dev/null || true)
        [ "${cur:-0}" -ge "$kill_at" ] && break
        kill -0 "$tpid" 2>/dev/null || break
        [ "$(date +%s)" -lt "$deadline" ] || { echo "demo: timed out before version $kill_at" >&2; exit 1; }
        sleep 0.05
    done
    kill -KILL -- "-$rpid" 2>/dev/null || true
    wait "$rpid" 2>/dev/null || true
    killed=$cur
    echo "== kill -9 of the rollout node (its whole process tree) at version $cur; restarting it"
    start_rollout
fi
if ! wait "$tpid"; then
    tpid=
    echo "demo: the trainer node failed; its log:" >&2
    tail -n 20 "$dir/node0/node.log" >&2
    echo "--- rollout node log:" >&2
    tail -n 20 "$dir/node1/node.log" "$rw/follow.err" >&2 || true
    exit 1
fi
tpid=
engine=$(curl -sS --max-time 5 "http://127.0.0.1:$(cat "$rw/port")/get_weight_version" || true)
kill -TERM -- "-$rpid" 2>/dev/null || true
wait "$rpid" 2>/dev/null || true
rpid=
elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')

# ---- the table: trainer's steps.jsonl joined with the rollout's follow.jsonl by version.
first() { grep -o "\"$1\":$2" <<<"$3" | head -n 1 | sed "s/\"$1\"://"; }
follow_log=$rw/follow.jsonl
# version -> "apply_s reload_s note" from the follower's events (last successful one wins)
declare -A apply_s reload_s note
while IFS= read -r line; do
    case "$line" in *'"error":null'*) ;; *) continue ;; esac
    v=$(first version '[0-9]*' "$line")
    applied=$(first applied '\[[0-9,]*\]' "$line" | tr -d '[]' | tr ',' ' ')
    seeded=$(first seeded_from '[0-9]*' "$line")
    sa=$(first seconds_apply '[0-9.e-]*' "$line")
    sr=$(first seconds_reload '[0-9.e-]*' "$line")
    set -- $applied
    n=$#
    [ -n "$seeded" ] && [ "$seeded" != 0 ] && { set -- "$seeded" "$@"; n=$#; }
    for a in "$@"; do
        apply_s[$a]=$sa
        [ "$n" -gt 1 ] && note[$a]="one pull: ${*}" || note[$a]=""
    done
    [ -n "$v" ] && reload_s[$v]=$sr
    case "$line" in *'"repaired":true'*) note[$v]="${note[$v]:+${note[$v]}; }repaired after kill";; esac
done <"$follow_log"

printf '\n%-7s %-6s %-8s %-11s %-8s %-8s %-9s %-9s %-4s %s\n' version kind density wire_bytes apply_s reload_s refs_used refs_stale gc note
tot_used=0 tot_stale=0
while IFS= read -r line; do
    case "$line" in '{"step"'*) ;; *) continue ;; esac
    v=$(first step '[0-9]*' "$line")
    kind=$(first kind '"[a-z]*"' "$line" | tr -d '"')
    dens=$(first density '[0-9.e-]*' "$line")
    wire=$(first wire_bytes '[0-9]*' "$line")
    used=$(first delivered '[0-9]*' "$line")
    stale=$(first stale '[0-9]*' "$line")
    gcd=$(first deleted '\[[0-9,]*\]' "$line" | tr -d '[]' | tr ',' '\n' | grep -c . || true)
    tot_used=$((tot_used + ${used:-0})) tot_stale=$((tot_stale + ${stale:-0}))
    n=${note[$v]:-}
    [ "$v" = "$killed" ] && n="${n:+$n; }rollout node killed -9 here"
    [ -z "${reload_s[$v]:-}" ] && [ -n "${apply_s[$v]:-}" ] && n="${n:+$n; }not reloaded alone (a newer version was already out)"
    printf '%-7s %-6s %-8.4f %-11s %-8s %-8s %-9s %-9s %-4s %s\n' "$v" "$kind" "$dens" "$wire" \
        "${apply_s[$v]:+$(printf '%.3f' "${apply_s[$v]}")}" "${reload_s[$v]:+$(printf '%.3f' "${reload_s[$v]}")}" \
        "${used:-0}" "${stale:-0}" "$gcd" "$n"
done <"$tw/steps.jsonl"
final=$(grep '^{"final"' "$tw/steps.jsonl" || true)
fu=$(first delivered '[0-9]*' "$final") fs=$(first stale '[0-9]*' "$final")
tot_used=$((tot_used + ${fu:-0})) tot_stale=$((tot_stale + ${fs:-0}))

# ---- the verdict.
ok=yes
for f in "$tw/ckpt/step_$steps"/*.safetensors; do
    cmp -s "$f" "$rw/local/$(basename "$f")" || ok=NO
done
want=$("$PYTHON" scripts/fake_sglang.py --digest "$tw/ckpt/step_$steps")
ev=$(sed -n 's/.*"weight_version": *"\([0-9]*\)".*/\1/p' <<<"$engine")
ed=$(sed -n 's/.*"digest": *"\([0-9a-f]*\)".*/\1/p' <<<"$engine")
full=$(du -sb "$tw/ckpt/step_$steps" | cut -f1)
left=$(du -sb --exclude=.followers "$src" | cut -f1)
echo
echo "refs: $tot_used consumed by the trainer, $tot_stale dropped as stale (> $max_staleness versions old); versions left after gc: $(ls "$src" | grep -c weight_v) ($left bytes; one checkpoint is $full bytes)"
echo "rollout engine: version ${ev:-?}, digest ${ed:0:16}...; trainer's step_$steps digest ${want:0:16}...  (${elapsed}s)"
if [ "$ok" = yes ] && [ "$ev" = "$steps" ] && [ "$ed" = "$want" ]; then
    echo "verdict: PASS: the rollout host's checkpoint is bit-identical to the trainer's step_$steps, and its engine loaded exactly those bytes"
else
    echo "verdict: FAIL: checkpoint identical: $ok; engine version ${ev:-none} (want $steps); engine digest matches: $([ "$ed" = "$want" ] && echo yes || echo no)" >&2
    exit 1
fi
