#!/usr/bin/env bash
# Start an entry script on this node: one process per GPU, or 2 processes on a CPU-only machine.
#   bash launch/torchrun.sh [--script launch/train_digits.py] [script arguments...]
# NPROC overrides the process count.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
script="$here/train_digits.py"
if [[ "${1:-}" == "--script" ]]; then script=$2; shift 2; fi
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
nproc=${NPROC:-$(( gpus > 0 ? gpus : 2 ))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nnodes=1 --nproc_per_node="$nproc" "$script" "$@"
