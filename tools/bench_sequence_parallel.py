"""Memory per TP rank of one training step with and without sequence parallelism (gloo, CPU).

Each TP rank (a fresh set of gloo processes per mode) builds an implicit model with the ``tp``
backend, runs one training forward (solve, phantom steps, vocab-parallel loss) and its backward
on a (batch, seq) micro-batch, and reports the growth of its peak resident set over the step
(``ru_maxrss`` after minus before, so allocator reuse counts as it does in practice), the
iterate's positions on the rank, the loss and the solver iterations (equal both ways: the modes
compute the same step). Prints JSON::

    {"tp", "arch", "batch", "seq", "d_model", "n_layers", "ranks": {"tp": [MiB...],
     "sequence_parallel": [MiB...]}, "iterate_positions": {...}, "loss": {...},
     "ratio_peak": tp / sequence_parallel (max over ranks)}

Usage::

    python tools/bench_sequence_parallel.py --json
    python tools/bench_sequence_parallel.py --json --arch llama --seq 2048 --d-model 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from _common import emit_report, machine_info, now_iso, positive_int

PROG = "bench_sequence_parallel.py"
MODES = ("tp", "sequence_parallel")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--output", help="also write the JSON to this file")
    p.add_argument("--tp", type=positive_int, default=2)
    p.add_argument("--arch", choices=("mamba2", "llama"), default="mamba2")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--seq", type=positive_int, default=1024)
    p.add_argument("--d-model", type=positive_int, default=256)
    p.add_argument("--n-layers", type=positive_int, default=4)
    p.add_argument("--iters", type=positive_int, default=4, help="solver.f_max_iter")
    p.add_argument("--phantom-steps", type=positive_int, default=2)
    return p.parse_args(argv)


def _worker(rank: int, mode: str, args: dict, out_dir: str) -> None:
    import torch

    from ilm_megatron.config import load_config
    from ilm_megatron.core.tensor_parallel import reduce_sequence_parallel_grads
    from ilm_megatron.models.lm import build_model
    from ilm_megatron.train.losses import token_loss

    tp = args["tp"]
    overrides = [
        f"model.arch={args['arch']}",
        f"model.d_model={args['d_model']}",
        f"model.n_layers={args['n_layers']}",
        f"model.ngroups={tp}",
        f"model.n_heads={max(tp, args['d_model'] // 64)}",
        f"solver.f_max_iter={args['iters']}",
        f"solver.phantom_steps={args['phantom_steps']}",
        "solver.f_tol=1e-12",
        f"parallel.tp={tp}",
        f"data.seq_len={args['seq']}",
        f"parallel.sequence_parallel={'true' if mode == 'sequence_parallel' else 'false'}",
    ]
    cfg = load_config([], overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver)
    model.train()
    gen = torch.Generator().manual_seed(1)
    vocab = cfg.model.vocab_size
    x = torch.randint(0, vocab, (args["batch"], args["seq"]), generator=gen)
    y = torch.randint(0, vocab, (args["batch"], args["seq"]), generator=gen)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = model(x, gather_logits=False)
    loss = token_loss(out.logits, y, vocab, True)
    loss.backward()
    if model.sequence_parallel:
        reduce_sequence_parallel_grads(model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    Path(out_dir, f"{mode}_{rank}.json").write_text(
        json.dumps(
            {
                "peak_growth_mib": round((peak - before) / 1024, 1),
                "positions": int(out.hidden.shape[1]),
                "loss": loss.item(),
                "iters": int(out.stats.iters),
            }
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seq % args.tp:
        print(f"{PROG}: --seq {args.seq} is not divisible by --tp {args.tp}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ilm_megatron.core.parallel_state import spawn

    wargs = {k: getattr(args, k) for k in ("tp", "arch", "batch", "seq", "d_model", "n_layers")}
    wargs.update(iters=args.iters, phantom_steps=args.phantom_steps)
    ranks: dict[str, list[float]] = {}
    positions: dict[str, int] = {}
    losses: dict[str, float] = {}
    iters: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            spawn(_worker, args.tp, args=(mode, wargs, tmp), tp=args.tp, backend="gloo", threads=1)
            rows = [json.loads(Path(tmp, f"{mode}_{r}.json").read_text()) for r in range(args.tp)]
            ranks[mode] = [r["peak_growth_mib"] for r in rows]
            positions[mode] = rows[0]["positions"]
            losses[mode] = rows[0]["loss"]
            iters[mode] = rows[0]["iters"]
    report = {
        "tool": PROG,
        "date": now_iso(),
        **{k: wargs[k] for k in ("tp", "arch", "batch", "seq", "d_model", "n_layers")},
        "f_max_iter": args.iters,
        "phantom_steps": args.phantom_steps,
        "ranks": ranks,
        "iterate_positions": positions,
        "loss": losses,
        "iters": iters,
        "ratio_peak": round(max(ranks["tp"]) / max(1e-9, max(ranks["sequence_parallel"])), 2),
        "machine": machine_info(),
    }
    emit_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
