#!/usr/bin/env bash
# Launch ilm-train with the DeepSpeed launcher (pdsh/ssh over a hostfile for several nodes).
#
#   HOSTFILE=launchers/hostfile.example launchers/deepspeed.sh --config CFG parallel.zero_stage=2
#   NUM_GPUS=2 launchers/deepspeed.sh ...          # one node, no hostfile
#
# Environment: HOSTFILE (optional; "host slots=N" lines), NUM_GPUS (processes per node without a
# hostfile; defaults to the visible GPUs), MASTER_ADDR, MASTER_PORT=29500, PYTHON=python.
# On a CPU-only machine the launcher finds no GPU; DeepSpeed then counts one "slot" per process
# for its CPU accelerator, so NUM_GPUS=2 starts 2 CPU ranks (gloo).
# Every argument is passed through to `python -m ilm_megatron.train.cli`.
set -euo pipefail

MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
args=(--master_port "$MASTER_PORT" --no_local_rank)
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE")
else
    args+=(--num_nodes 1)
    [[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
fi

exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module ilm_megatron.train.cli "$@"
