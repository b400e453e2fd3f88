#!/usr/bin/env bash
# GPU check: one command on a bare GPU box (the repository plus a built environment or the
# image; no network). Every step has a timeout and a PASS/FAIL line; a summary table ends the
# run and the record goes to docs/benchmarks/gpu_<device>.{json,md} (see tools/gpu_check.py).
#
#     bash tools/gpu_check.sh                                  # on the GPU box
#     bash tools/gpu_check.sh --cpu --out-dir /tmp/gpu_check   # CPU plumbing run (CI)
# Exit status: 0 if every step passed, 1 if one failed, 2 if CUDA is missing without --cpu.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
exec "${PYTHON:-python}" tools/gpu_check.py "$@"
