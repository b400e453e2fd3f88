"""Logits memory per TP rank: the vocab-parallel loss against gathering the whole logits.

Each TP rank (gloo processes on CPU) computes the LM head's logits for N = batch x seq tokens
from a replicated z (N, d) and its vocabulary shard of the tied weight, then the mean token
cross-entropy and its backward, one way per fresh set of processes:

* ``gathered`` (the old path): all-gather to (N, V) logits on every rank, ``F.cross_entropy``;
* ``vocab_parallel``: this rank's (N, V / tp) columns, ``vocab_parallel_cross_entropy``.

It reports each rank's peak resident-memory growth over the step (``ru_maxrss`` after minus
before, so allocator reuse counts as it does in practice) and the logits-sized bytes each way
computes analytically. Prints JSON::

    {"tp", "tokens", "vocab", "d", "ranks": {"gathered": [MiB...], "vocab_parallel": [...]},
     "analytic_mib": {...}, "ratio_peak": gathered / vocab_parallel (max over ranks)}

Usage::

    python tools/bench_vocab_parallel.py --json
    python tools/bench_vocab_parallel.py --json --tp 2 --tokens 8192 --vocab 50304
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

PROG = "bench_vocab_parallel.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--output", help="also write the JSON to this file")
    p.add_argument("--tp", type=positive_int, default=2)
    p.add_argument("--tokens", type=positive_int, default=8192, help="N = batch x seq")
    p.add_argument("--vocab", type=positive_int, default=50304, help="padded vocabulary")
    p.add_argument("--d", type=positive_int, default=256, help="model width")
    return p.parse_args(argv)


def _worker(rank: int, mode: str, n: int, vocab: int, d: int, out_dir: str) -> None:
    import torch
    import torch.nn.functional as F

    from ilm_megatron.core.parallel_state import tp_rank, tp_world_size
    from ilm_megatron.core.tensor_parallel import (
        vocab_parallel_cross_entropy,
        vocab_parallel_logits,
        vocab_parallel_logits_local,
    )

    gen = torch.Generator().manual_seed(0)
    vl = vocab // tp_world_size()
    z = torch.randn(n, d, generator=gen).requires_grad_()
    weight = torch.randn(vocab, d, generator=gen)[tp_rank() * vl : (tp_rank() + 1) * vl]
    weight = weight.clone().requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "gathered":
        loss = F.cross_entropy(vocab_parallel_logits(z, weight), targets)
    else:
        loss = vocab_parallel_cross_entropy(vocab_parallel_logits_local(z, weight), targets, vocab)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    Path(out_dir, f"{mode}_{rank}.json").write_text(
        json.dumps({"peak_growth_mib": (peak - before) / 1024, "loss": loss.item()})
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.vocab % args.tp:
        print(f"{PROG}: --vocab {args.vocab} is not divisible by --tp {args.tp}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ilm_megatron.core.parallel_state import spawn

    n, v, d, tp = args.tokens, args.vocab, args.d, args.tp
    ranks: dict[str, list[float]] = {}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("gathered", "vocab_parallel"):
            spawn(_worker, tp, args=(mode, n, v, d, tmp), tp=tp, backend="gloo", threads=1)
            rows = [json.loads(Path(tmp, f"{mode}_{r}.json").read_text()) for r in range(tp)]
            ranks[mode] = [round(r["peak_growth_mib"], 1) for r in rows]
            losses[mode] = rows[0]["loss"]
    f32 = 4 / 2**20
    report = {
        "tool": PROG,
        "date": now_iso(),
        "tp": tp,
        "tokens": n,
        "vocab": v,
        "d": d,
        "ranks": ranks,
        "loss": losses,
        "analytic_mib": {
            # gathered: local logits, the gathered (N, V), softmax/grad of (N, V)
            "gathered": round((n * v / tp + 2 * n * v) * f32, 1),
            # vocab-parallel: local logits and its fp32 softmax (reused for the gradient)
            "vocab_parallel": round(2 * n * v / tp * f32, 1),
        },
        "ratio_peak": round(max(ranks["gathered"]) / max(1e-9, max(ranks["vocab_parallel"])), 2),
        "machine": machine_info(),
    }
    emit_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
