#!/usr/bin/env bash
# Launch ilm-train under torchrun (one node or several), c10d rendezvous.
#
#   launchers/torchrun.sh --config configs/models/mamba2_1.3b_pretrain.yaml parallel.zero_stage=1
#
# Environment (defaults for one node):
#   NNODES=1  NODE_RANK=0  NPROC_PER_NODE=<GPUs, or 1 on CPU>  MASTER_ADDR=127.0.0.1
#   MASTER_PORT=29500  MAX_RESTARTS=0  RDZV_ID=ilm-train  PYTHON=python
# Every argument is passed through to `python -m ilm_megatron.train.cli`.
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        NPROC_PER_NODE=$(nvidia-smi --list-gpus | wc -l)
    else
        NPROC_PER_NODE=1
    fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_ID=${RDZV_ID:-ilm-train}
PYTHON=${PYTHON:-python}

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" \
    -m ilm_megatron.train.cli "$@"
