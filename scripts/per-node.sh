#!/usr/bin/env bash
# rcli-style per-node entry point: the same command line runs on every node of a job and picks
# the node's role from its rank — rank 0 is the trainer, every other rank a rollout node named
# rollout-RANK. The rank comes from --node-rank, else NODE_RANK, GROUP_RANK, SLURM_NODEID or
# OMPI_COMM_WORLD_RANK (first one set). Everything after `--` goes to the role's script.
#
#   scripts/per-node.sh --shared /shared/job42 --work /local/job42 -- --steps 100
#   srun --nodes 9 scripts/per-node.sh --shared /shared/job42 --work /tmp/job42    (SLURM)
#
# A cron line on any one host keeps the shared directory from growing without bound:
#   */10 * * * *  delta-gc /shared/job42/weights --keep 3 >> /var/log/delta-gc.log 2>&1
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared= work= rank=${NODE_RANK:-${GROUP_RANK:-${SLURM_NODEID:-${OMPI_COMM_WORLD_RANK:-}}}}
while [ $# -gt 0 ]; do
    case "$1" in
        --shared) shared=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --node-rank) rank=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "per-node: unknown option $1 (role options go after --)" >&2; exit 2 ;;
    esac
done
[ -n "$shared" ] && [ -n "$work" ] || { echo "per-node: --shared and --work are required" >&2; exit 2; }
[ -n "$rank" ] || { echo "per-node: no node rank (--node-rank, NODE_RANK, GROUP_RANK, SLURM_NODEID)" >&2; exit 2; }
case "$rank" in ''|*[!0-9]*) echo "per-node: node rank $rank is not a number" >&2; exit 2 ;; esac
if [ "$rank" -eq 0 ]; then
    exec "$here/trainer-node.sh" --shared "$shared" --work "$work/trainer" "$@"
else
    exec "$here/rollout-node.sh" --shared "$shared" --work "$work/rollout-$rank" --name "rollout-$rank" "$@"
fi
