"""Measure the pipeline ring on CPU processes: bubble, bytes per message, memory, step time.

P stages (gloo processes, one thread each; ``--tp 2`` adds a TP group inside each stage, 2P
processes) build the same model from a seed. Reported (docs/pipeline.md, "Benchmarks"):

* ``rows``: for each M in ``--microbatches`` (all in flight), the forward ring (no-grad solve
  forced to S iterations by a tiny tolerance, then k phantom steps), and its idle fraction
  ``1 - compute / total`` per stage against the ideal bubble ``(P-1) / (M*S' + P-1)`` with
  ``S' = S + k`` ring passes per micro-batch; ``within_10pp`` says whether it stays within
  +10 points.
* ``comm_bytes_over_ideal``: iterate bytes a stage sends per forward message over the ideal
  ``b * L * d / tp`` fp32 values (headers reported apart), for the training ring.
* ``saved_bytes_by_in_flight``: the largest stage's peak bytes held for backward (autograd's
  saved tensors), with the total micro-batches fixed (``--total``) and the in-flight count
  varied; it should grow with the in-flight count.
* ``step_s``: wall time of one training ring call (solve, phantom steps, backward) of
  ``--total`` micro-batches, all in flight (median of ``--repeats``).
* ``bf16_wire``: a bf16 wire against fp32 with the solve run to ``f_tol`` 0.05, 0.01 and 1e-3
  (cap ``4 S``): iterations, loss and logits difference.

``--ring-module FILE`` times another implementation of ``pipeline_forward_backward`` (e.g. an
older ``ilm_megatron/parallel/pipeline.py``) with the rest of the package unchanged; what it does
not report is left out.

Usage::

    python tools/bench_pipeline.py --json
    python tools/bench_pipeline.py --tp 2 --d-model 256 --seq-len 128 --output out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from _common import REPO_ROOT, emit_report, machine_info, now_iso


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_pipeline.py", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="llama", choices=("llama", "mamba2"))
    p.add_argument("--stages", type=int, default=2, help="P, pipeline stages")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size inside each stage")
    p.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8], help="M values")
    p.add_argument("--total", type=int, default=4, help="micro-batches of the training runs")
    p.add_argument("--iters", type=int, default=8, help="S, forced solver iterations")
    p.add_argument("--phantom-steps", type=int, default=2, help="k")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="samples per micro-batch")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--ring-module", default=None, help="file defining pipeline_forward_backward")
    p.add_argument("--output", default=None, help="also write the JSON report here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def _ring_module(path: str | None) -> ModuleType:
    if path is None:
        from ilm_megatron.parallel import pipeline

        return pipeline
    spec = importlib.util.spec_from_file_location("bench_ring_impl", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _worker(rank: int, args: argparse.Namespace, out: str) -> None:
    """One rank: build the model from a seed, run every measurement, dump the numbers."""
    import dataclasses

    import torch

    from ilm_megatron.config import load_config
    from ilm_megatron.core.parallel_state import pp_global_ranks, pp_group, pp_rank
    from ilm_megatron.models.lm import build_model
    from ilm_megatron.parallel.checkpoint import load_full_state_dict
    from ilm_megatron.parallel.pipeline import SavedTensorBytes

    ring_mod = _ring_module(args.ring_module)
    P, tp = args.stages, args.tp
    cfg = load_config(
        [REPO_ROOT / "configs" / "models" / f"implicit_{args.arch}_tiny.yaml"],
        [
            f"model.d_model={args.d_model}",
            f"model.n_layers={P}",
            f"model.ffn_hidden_size={4 * args.d_model}",
            f"solver.f_max_iter={args.iters}",
            "solver.f_tol=1e-12",
            f"solver.phantom_steps={args.phantom_steps}",
        ],
    )
    torch.manual_seed(0)
    ref = build_model(dataclasses.replace(cfg.model, backend="local"), cfg.solver)
    model = build_model(dataclasses.replace(cfg.model, backend="tp" if tp > 1 else "local"))
    load_full_state_dict(model, ref.state_dict())
    del ref
    model.train()
    stage = ring_mod.split_model_into_stages(model, pp_rank(), P)
    ring_kw: dict[str, Any] = {"pp_ranks": pp_global_ranks()}
    if args.ring_module is None:
        ring_kw["group"] = pp_group()
    g = torch.Generator().manual_seed(1)
    vocab = cfg.model.vocab_size

    def batches(n: int) -> list[torch.Tensor]:
        return [torch.randint(0, vocab, (args.batch, args.seq_len), generator=g) for _ in range(n)]

    def ring(
        ids: list[torch.Tensor], m: int, backward: bool, solver: Any = None, **kw: Any
    ) -> tuple[Any, Any]:
        torch.distributed.barrier()
        for p in model.parameters():
            p.grad = None
        return ring_mod.pipeline_forward_backward(
            stage, ids, ids, solver or cfg.solver, n_microbatches=len(ids), in_flight=m,
            backward=backward, **ring_kw, **kw,
        )  # fmt: skip

    res: dict[str, Any] = {"bubble": [], "saved": {}}
    for m in args.microbatches:  # forward ring, all in flight
        ids = batches(m)
        runs = []
        for rep in range(args.repeats + 1):  # the first run warms up
            _, st = ring(ids, m, backward=False)
            if rep:
                total = sum(st.total_s.values())
                runs.append(
                    (
                        1.0 - sum(st.compute_s.values()) / total,
                        st.wait_s.get("ring", sum(st.wait_s.values())) / total,
                        st.wait_s.get("header", 0.0) / total,
                    )
                )
        res["bubble"].append(
            {
                "M": m,
                "non_compute": statistics.median(r[0] for r in runs),
                "wait": statistics.median(r[1] for r in runs),
                "header_wait": statistics.median(r[2] for r in runs),
                "iters": st.iters,
            }
        )
    ids = batches(args.total)
    times = []
    for rep in range(args.repeats + 1):
        _, st = ring(ids, args.total, backward=True)
        if rep:
            times.append(sum(st.total_s.values()))
    res["step_s"] = statistics.median(times)
    sent, msgs = getattr(st, "sent_bytes", {}), getattr(st, "messages", {})
    if msgs.get("iterate"):
        res["iterate_bytes_per_message"] = sent["iterate"] / msgs["iterate"]
        res["header_bytes_per_message"] = sent.get("header", 0) / msgs["iterate"]
        res["sent_bytes"] = sent
    for m in sorted({1, 2, args.total // 2, args.total} - {0}):
        with SavedTensorBytes(list(model.parameters())) as saved:
            ring(ids, m, backward=True)
        res["saved"][m] = saved.peak
    if args.ring_module is None:  # the bf16 wire against fp32, solving to a tolerance
        res["bf16_wire"] = []
        for tol in (0.05, 0.01, 1e-3):
            solver = dataclasses.replace(cfg.solver, f_tol=tol, f_max_iter=4 * args.iters)
            outs = {}
            for name, wire in (("fp32", None), ("bf16", torch.bfloat16)):
                losses, st = ring(ids, args.total, False, solver, keep_logits=True, wire_dtype=wire)
                outs[name] = (losses, st.logits, st.iters)
            (l32, g32, i32), (l16, g16, i16) = outs["fp32"], outs["bf16"]
            row: dict[str, Any] = {"f_tol": tol, "iters_fp32": i32, "iters_bf16": i16}
            if stage.is_last:
                row["max_loss_diff"] = max(abs(float(a - b)) for a, b in zip(l32, l16))
                row["max_logits_rel_diff"] = max(
                    float((a - b).norm() / a.norm()) for a, b in zip(g32, g16)
                )
            res["bf16_wire"].append(row)
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))


def _entry(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch

    from ilm_megatron.core.parallel_state import init_worker, shutdown_worker

    torch.set_num_threads(1)
    init_worker(rank, world, port, tp=args.tp, pp=args.stages, backend="gloo")
    try:
        _worker(rank, args, out)
    finally:
        shutdown_worker()


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Spawn ``tp * P`` processes and combine their numbers."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.multiprocessing as mp

    from ilm_megatron.core.parallel_state import free_port

    P, tp = args.stages, args.tp
    world = P * tp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, free_port(), args, tmp), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    k = args.phantom_steps
    rows = []
    for idx, m in enumerate(args.microbatches):
        iters = ranks[0]["bubble"][idx]["iters"]
        assert all(i == args.iters for i in iters), f"solve did not run {args.iters} iters: {iters}"
        ideal = (P - 1) / (m * (args.iters + k) + P - 1)
        measured = statistics.mean(r["bubble"][idx]["non_compute"] for r in ranks)
        rows.append(
            {
                "M": m,
                "ideal_bubble": ideal,
                "measured_bubble_mean": measured,
                "measured_bubble_max": max(r["bubble"][idx]["non_compute"] for r in ranks),
                "excess_pp": 100 * (measured - ideal),
                "wait_frac_mean": statistics.mean(r["bubble"][idx]["wait"] for r in ranks),
                "header_wait_frac_mean": statistics.mean(
                    r["bubble"][idx]["header_wait"] for r in ranks
                ),
                "within_10pp": measured - ideal <= 0.10,
            }
        )
    ideal_bytes = args.batch * args.seq_len * args.d_model * 4 / tp
    report: dict[str, Any] = {
        "tool": "bench_pipeline",
        "date": now_iso(),
        "machine": machine_info(),
        "ring_module": args.ring_module or "ilm_megatron/parallel/pipeline.py",
        "P": P,
        "tp": tp,
        "arch": args.arch,
        "d_model": args.d_model,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "S": args.iters,
        "k": k,
        "total_microbatches": args.total,
        "rows": rows,
        "step_s": statistics.median(r["step_s"] for r in ranks),
        "saved_bytes_by_in_flight": {
            m: max(r["saved"][m] for r in ranks) for m in ranks[0]["saved"]
        },
    }
    if "iterate_bytes_per_message" in ranks[0]:
        report["comm_bytes_over_ideal"] = max(
            r["iterate_bytes_per_message"] / ideal_bytes for r in ranks
        )
        report["header_bytes_over_ideal"] = max(
            r["header_bytes_per_message"] / ideal_bytes for r in ranks
        )
        report["sent_bytes_per_rank"] = [r["sent_bytes"] for r in ranks]
    if "bf16_wire" in ranks[-1]:  # the last stage has the losses
        report["bf16_wire"] = ranks[-1]["bf16_wire"]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stages < 2 or args.iters < 1 or min(args.microbatches) < 1 or args.total < 1:
        print(
            "bench_pipeline.py: error: need --stages >= 2, --iters >= 1, M >= 1, --total >= 1",
            file=sys.stderr,
        )
        return 2
    if args.ring_module is not None and not Path(args.ring_module).is_file():
        print(f"bench_pipeline.py: error: no such file: {args.ring_module}", file=sys.stderr)
        return 2
    report = run_bench(args)
    emit_report(report, args.output, show=args.json)
    if not args.json:
        print(f"{'M':>3} {'ideal':>7} {'bubble':>7} {'max':>7}")
        for r in report["rows"]:
            print(
                f"{r['M']:>3} {r['ideal_bubble']:>7.3f} {r['measured_bubble_mean']:>7.3f} "
                f"{r['measured_bubble_max']:>7.3f}"
            )
        print(f"step {report['step_s']:.3f} s; saved {report['saved_bytes_by_in_flight']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
