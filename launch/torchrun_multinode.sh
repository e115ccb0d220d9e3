#!/usr/bin/env bash
# Start an entry script on one of several nodes with c10d rendezvous. Run it on every node:
#   NNODES=2 RDZV_HOST=node0 bash launch/torchrun_multinode.sh [--script S] [script arguments...]
# RDZV_HOST: a host every node can reach (usually the first node); RDZV_PORT (29400) must be open.
# RDZV_ID names the run: nodes with the same id join the same job. NPROC: processes per node.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
script="$here/train_digits.py"
if [[ "${1:-}" == "--script" ]]; then script=$2; shift 2; fi
: "${NNODES:?set NNODES to the number of nodes}"
: "${RDZV_HOST:?set RDZV_HOST to the first node (reachable from every node)}"
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
nproc=${NPROC:-$(( gpus > 0 ? gpus : 2 ))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Restarts (MAX_RESTARTS > 0) need a fresh store per attempt: a store shared with the agent keeps the
# previous attempt's addresses and the new group connects to dead workers (pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec torchrun --nnodes="$NNODES" --nproc_per_node="$nproc" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv_id="${RDZV_ID:-anndist}" \
  --max-restarts="${MAX_RESTARTS:-0}" "$script" "$@"
