#!/usr/bin/env bash
# GPU check: the Triton kernels' tests compiled on CUDA and their benchmark, the model on compiled
# kernels, a short ilm-train run on CUDA (bf16), and training throughput / MFU of 130M models.
#
# Usage (repository root, CUDA machine, environment already installed; no network needed):
#     bash tools/gpu_check.sh            # writes docs/benchmarks/{ssd_kernels,train_gpu}_<host>_<date>.json
# Exit status: non-zero if CUDA is missing, the tests fail or the benchmark fails.
set -uo pipefail

cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
PY="${PYTHON:-python}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: CUDA is not available" >&2
    exit 2
fi

stamp="$(date +%Y%m%d_%H%M%S)"
outdir="docs/benchmarks"
mkdir -p "$outdir"
out="$outdir/ssd_kernels_$(hostname -s)_${stamp}.json"
log="$outdir/ssd_kernels_$(hostname -s)_${stamp}_pytest.txt"

status=0
echo "== pytest tests/test_triton_ssd.py (compiled Triton, TRITON_INTERPRET unset)"
"$PY" -m pytest tests/test_triton_ssd.py -q -rs -p no:cacheprovider 2>&1 | tee "$log"
test_rc=${PIPESTATUS[0]}
[ "$test_rc" -eq 0 ] || status=1

echo "== tools/bench_kernels.py -> $out"
timeout 240 "$PY" tools/bench_kernels.py --json --output "$out" || status=1

echo "== pytest: Triton ops and the model on compiled kernels"
timeout 300 "$PY" -m pytest tests/test_triton_ops.py tests/test_model_triton.py -q -rs \
    -p no:cacheprovider 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== ilm-train on CUDA (bf16 autocast), 30 steps of the built-in default"
run="$(mktemp -d)"
if timeout 180 "$PY" -m ilm_megatron.train.cli --quiet train.max_steps=30 train.device=cuda \
    train.tensorboard=false run_dir="$run" && [ -f "$run/final.json" ]; then
    cat "$run/final.json"
else
    echo "ilm-train on CUDA failed" >&2
    status=1
fi

train_out="$outdir/train_gpu_$(hostname -s)_${stamp}.json"
echo "== tools/bench_train.py, 130M implicit Mamba2 and Llama -> $train_out"
{
    echo "["
    timeout 240 "$PY" tools/bench_train.py --json --steps 5 --warmup 2 \
        --config configs/models/mamba2_130m_implicit.yaml train.batch_size=8 data.seq_len=2048 ||
        status=1
    echo ","
    timeout 240 "$PY" tools/bench_train.py --json --steps 5 --warmup 2 \
        --config configs/models/llama_130m_implicit.yaml train.batch_size=8 data.seq_len=2048 ||
        status=1
    echo "]"
} >"$train_out"

echo "== done: status $status; kernels $out, training $train_out, pytest log $log"
exit $status
