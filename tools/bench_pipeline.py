"""Measure the bubble of the pipeline ring schedule on CPU processes (docs/pipeline.md).

For P stages (gloo processes, one thread each) and M micro-batches all in flight, the forward ring
(no-grad solve forced to S iterations by a tiny tolerance, then k phantom steps) is timed on every
stage: compute time (stage layers, residual, damping), time blocked waiting for a message, and the
phase's wall time. Reported per stage and averaged over stages, next to the ideal
``(P-1) / (M*S' + P-1)`` with ``S' = S + k`` ring passes per micro-batch:

* ``idle`` (the bubble): ``wait / total``, time spent waiting for the previous stage;
* ``non-compute``: ``1 - compute / total``, which adds the communication overhead outside the
  waits (packing, isend, gloo's I/O thread sharing the core) and any preemption by other load.

Usage::

    python tools/bench_pipeline.py --json
    python tools/bench_pipeline.py --microbatches 2 4 8 --iters 8 --d-model 256 --seq-len 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_pipeline.py", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="llama", choices=("llama", "mamba2"))
    p.add_argument("--stages", type=int, default=2, help="P, pipeline stages (processes)")
    p.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8], help="M values")
    p.add_argument("--iters", type=int, default=8, help="S, forced solver iterations")
    p.add_argument("--phantom-steps", type=int, default=1, help="k")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="samples per micro-batch")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per M (median reported)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One stage: build the model from a seed, run the forward ring for every M, dump timings."""
    import torch
    import torch.distributed as dist

    from ilm_megatron.config import load_config
    from ilm_megatron.models.lm import ImplicitLM
    from ilm_megatron.parallel.pipeline import pipeline_forward_backward, split_model_into_stages

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    cfg = load_config(
        [REPO_ROOT / "configs" / "models" / f"implicit_{args.arch}_tiny.yaml"],
        [
            f"model.d_model={args.d_model}",
            f"model.n_layers={world}",
            f"model.ffn_hidden_size={4 * args.d_model}",
            f"solver.f_max_iter={args.iters}",
            "solver.f_tol=1e-12",
            f"solver.phantom_steps={args.phantom_steps}",
        ],
    )
    torch.manual_seed(0)
    model = ImplicitLM(cfg.model, cfg.solver).train()
    stage = split_model_into_stages(model, rank, world)
    g = torch.Generator().manual_seed(1)
    results: list[dict[str, Any]] = []
    for m in args.microbatches:
        ids = [
            torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len), generator=g)
            for _ in range(m)
        ]
        runs = []
        for rep in range(args.repeats + 1):  # the first run warms up
            dist.barrier()
            _, stats = pipeline_forward_backward(
                stage, ids, ids, cfg.solver, n_microbatches=m, in_flight=m, backward=False
            )
            if rep:
                runs.append(
                    {
                        "total_s": stats.total_s["forward"],
                        "compute_s": stats.compute_s["forward"],
                        "wait_s": stats.wait_s["forward"],
                        "bubble": stats.bubble("forward"),
                        "wait_frac": stats.wait_s["forward"] / stats.total_s["forward"],
                        "iters": stats.iters,
                    }
                )
        results.append({"M": m, "runs": runs})
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Spawn P processes, gather their timings, and compare with the ideal bubble."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.multiprocessing as mp

    P = args.stages
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(P, _free_port(), args, tmp), nprocs=P, join=True)
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(P)]
    rows = []
    for idx, m in enumerate(args.microbatches):
        iters = per_rank[0][idx]["runs"][0]["iters"]
        assert all(i == args.iters for i in iters), f"solve did not run {args.iters} iters: {iters}"
        s_eff = args.iters + args.phantom_steps
        ideal = (P - 1) / (m * s_eff + P - 1)
        stages = []
        for r in range(P):
            runs = per_rank[r][idx]["runs"]
            stages.append(
                {
                    "stage": r,
                    "idle_frac": statistics.median(x["wait_frac"] for x in runs),
                    "non_compute_frac": statistics.median(x["bubble"] for x in runs),
                    "total_s": statistics.median(x["total_s"] for x in runs),
                    "compute_s": statistics.median(x["compute_s"] for x in runs),
                    "wait_s": statistics.median(x["wait_s"] for x in runs),
                }
            )
        measured = statistics.mean(s["idle_frac"] for s in stages)
        non_compute = statistics.mean(s["non_compute_frac"] for s in stages)
        rows.append(
            {
                "P": P,
                "M": m,
                "S": args.iters,
                "k": args.phantom_steps,
                "ring_passes_per_mb": s_eff,
                "ideal_bubble": ideal,
                "measured_bubble_mean": measured,
                "measured_bubble_max": max(s["idle_frac"] for s in stages),
                "excess_pp": 100 * (measured - ideal),
                "within_10pp": measured - ideal <= 0.10,
                "non_compute_mean": non_compute,
                "non_compute_excess_pp": 100 * (non_compute - ideal),
                "stages": stages,
            }
        )
    return {
        "tool": "bench_pipeline",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_1min_after": os.getloadavg()[0],
        "arch": args.arch,
        "d_model": args.d_model,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "repeats": args.repeats,
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stages < 2 or args.iters < 1 or min(args.microbatches) < 1:
        print("bench_pipeline.py: error: need --stages >= 2, --iters >= 1, M >= 1", file=sys.stderr)
        return 2
    result = run_bench(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'P':>2} {'M':>2} {'S':>3} {'ideal':>7} {'idle':>7} {'max':>7} {'non-comp':>8}")
        for r in result["rows"]:
            print(
                f"{r['P']:>2} {r['M']:>2} {r['S']:>3} {r['ideal_bubble']:>7.3f} "
                f"{r['measured_bubble_mean']:>7.3f} {r['measured_bubble_max']:>7.3f} "
                f"{r['non_compute_mean']:>8.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
