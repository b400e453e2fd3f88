"""Bytes per rank of a training layout, from the model built on ``meta`` (nothing allocated).

For each pipeline stage (as its TP rank 0, on a fake process group of ``tp * pp * dp`` ranks) the
rank's model is built on ``meta`` and its parameters counted; one micro-batch of the stage's
training work (embedding, ``k`` phantom steps, head and loss) runs on ``meta`` tensors and every
tensor autograd saves is counted. The largest stage is reported
(``ilm_megatron.parallel.memory_plan``; docs/parallelism.md, "Memory per rank")::

    python tools/plan_memory.py --config configs/models/mamba2_7b_implicit.yaml \
        --tp 2 --pp 4 --dp 8 --zero 1 --microbatches 8 --json

Prints ``{"per_rank": {"params", "grads", "optimizer", "activations", "total"},
"params_total_bytes", "params_meta_max_rank_bytes", "stages": [...], ...}`` (bytes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from _common import ToolError, emit_report, fail, load_run_config, positive_int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="plan_memory.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="model or training config (YAML)")
    p.add_argument("--tp", type=positive_int, default=1)
    p.add_argument("--pp", type=positive_int, default=1)
    p.add_argument("--dp", type=positive_int, default=1)
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=0, help="ZeRO stage")
    p.add_argument("--microbatches", type=positive_int, default=1, help="per step per DP rank")
    p.add_argument("--in-flight", type=positive_int, default=None, help="default: all")
    p.add_argument(
        "--micro-batch-size",
        type=positive_int,
        default=None,
        help="sequences per micro-batch (default: train.batch_size / dp / microbatches)",
    )
    p.add_argument(
        "--kernels",
        choices=("gpu", "reference"),
        default="gpu",
        help="activations as the GPU path saves them (Triton, flash-attn) or the CPU reference",
    )
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ToolError as e:
        fail("plan_memory.py", str(e))
    from ilm_megatron.parallel.memory_plan import plan_memory

    try:
        plan = plan_memory(
            cfg,
            args.tp,
            args.pp,
            args.dp,
            args.zero,
            args.microbatches,
            args.in_flight,
            args.micro_batch_size,
            args.kernels,
        )
    except ValueError as e:
        fail("plan_memory.py", str(e))
    if args.json or args.output:
        emit_report(plan, args.output, show=args.json)
    if not args.json:
        lay = plan["layout"]
        print(
            f"TP={lay['tp']} PP={lay['pp']} DP={lay['dp']} ZeRO-{lay['zero']}: largest rank "
            f"(stage {plan['per_rank_stage']}) "
            + ", ".join(f"{k} {v:.2f} GiB" for k, v in plan["gib"].items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
