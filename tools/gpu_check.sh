#!/usr/bin/env bash
# GPU check of the Triton SSD kernels: the tests compiled on CUDA, then the benchmark.
#
# Usage (repository root, CUDA machine, environment already installed; no network needed):
#     bash tools/gpu_check.sh            # writes docs/benchmarks/ssd_kernels_<host>_<date>.json
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
"$PY" tools/bench_kernels.py --json --output "$out" || status=1

echo "== done: tests rc=$test_rc, benchmark JSON $out, pytest log $log, status $status"
exit $status
