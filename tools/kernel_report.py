"""Compile every Triton kernel for a GPU target on this machine and report its resource usage.

Drives the real launchers on ``meta`` tensors at the 1.3B implicit Mamba2's shapes (headdim 64,
d_state 128, chunk 256, 64 heads, L=2048, 8 sequences) in bf16 and fp32, and at d_state 256,
compiles each launched kernel with Triton for ``--arch`` (no GPU needed) and reads the bundled
``ptxas -v``. Prints::

    {"arch", "shared_limit_bytes", "kernels": [{"name", "group", "dtype", "shape",
     "registers", "spill_bytes", "shared_bytes", "mma", "num_warps", "num_stages"}], ...}

``mma`` is the tensor-core instruction and operand type (``wgmma.bf16``, ``wgmma.tf32``,
``mma.sync.f16``), or ``fma`` when the kernel has none. Usage::

    python tools/kernel_report.py --arch sm_90a --json
    python tools/kernel_report.py --json --dtypes bfloat16 --groups ssd_fwd,ssd_bwd
    python tools/kernel_report.py --json --output docs/benchmarks/kernel_report_sm90a.json

Runs with ``TRITON_INTERPRET`` removed from its own environment (it re-executes itself without
it when set). Exit status 1 when a kernel exceeds the shared-memory limit or fails to compile.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from _common import dump_json, fail, now_iso, write_atomic

PROG = "kernel_report.py"
GROUPS = (
    "ssd_fwd",
    "ssd_bwd",
    "conv1d_fwd",
    "conv1d_bwd",
    "norm_fwd",
    "norm_bwd",
    "conv1d_step",
    "ssd_step",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sm_90a", help="target, sm_<major><minor>[a] (default sm_90a)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--output", help="also write the JSON to this file")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated input dtypes")
    p.add_argument("--groups", default=",".join(GROUPS), help="comma-separated kernel groups")
    p.add_argument(
        "--dstate-256",
        default="ssd_fwd,ssd_bwd",
        help="groups also compiled at d_state 256 (comma-separated; '' for none)",
    )
    return p.parse_args(argv)


def _arch(value: str) -> int:
    text = value.lower().removeprefix("sm_").removesuffix("a")
    if not text.isdigit() or len(text) < 2:
        fail(PROG, f"--arch {value!r}: expected sm_<major><minor>[a], e.g. sm_90a")
    return int(text)


def _list(value: str, allowed: Sequence[str], flag: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad:
        fail(PROG, f"{flag}: unknown {bad}; choose from {', '.join(allowed)}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    os.environ.pop("ILM_KERNELS_AUTOTUNE", None)  # report the pinned launch configurations
    arch = _arch(args.arch)
    dtypes = _list(args.dtypes, ("bfloat16", "float16", "float32"), "--dtypes")
    groups = _list(args.groups, GROUPS, "--groups")
    wide = _list(args.dstate_256, GROUPS, "--dstate-256")

    import torch

    from ilm_kernels.report import SHAPES_1P3B, SHARED_LIMIT_SM90, kernel_report

    rows: list[dict[str, Any]] = []
    for name in dtypes:
        dtype = getattr(torch, name)
        rows += kernel_report(SHAPES_1P3B, dtype, arch, groups)
        if wide:
            rows += kernel_report({**SHAPES_1P3B, "dstate": 256}, dtype, arch, wide)
    over = [r for r in rows if r["shared_bytes"] > SHARED_LIMIT_SM90]
    import triton

    report = {
        "arch": args.arch,
        "date": now_iso(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "shared_limit_bytes": SHARED_LIMIT_SM90,
        "kernels": rows,
        "over_shared_limit": [f"{r['name']} {r['dtype']} {r['shape']}" for r in over],
        "spilling": [f"{r['name']} {r['dtype']} {r['shape']}" for r in rows if r["spill_bytes"]],
    }
    text = dump_json(report)
    if args.output:
        write_atomic(args.output, text + "\n")
    if args.json:
        print(text)
    else:
        for r in rows:
            n = r["shape"].split("dstate=")[1].split(",")[0]
            print(
                f"{r['name']:<28} {r['dtype']:<9} n={n:<4}"
                f" regs {r['registers']:>3}  spill {r['spill_bytes']:>4} B  "
                f"smem {r['shared_bytes']:>6} B  {r['mma']:<14} warps {r['num_warps']}"
                f" stages {r['num_stages']}"
            )
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
