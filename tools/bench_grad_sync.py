"""Gradient-sync bytes, time and transient memory per step over the data-parallel group (gloo).

Each data-parallel rank (a gloo process on CPU, a fresh set per mode) holds gradients shaped
like an implicit Mamba2's parameters (``--d-model``, ``--n-layers``, tied embedding) and
synchronises them one way:

* ``flat``: the engine's former path: every gradient concatenated into one flat buffer, one
  all-reduce, then each gradient cloned back out of it;
* ``bucketed``: :func:`ilm_megatron.parallel.grad_sync.all_reduce_bucketed` in
  ``--bucket-mb`` buckets (``parallel.zero_stage=0``);
* ``zero1`` / ``zero2``: DeepSpeed's ZeRO optimizer (:class:`DeepSpeedZero`): the one
  coalesced, bucketed reduction of a step into each rank's partition (``reduce``), then the
  update and the all-gather of the new weights (``step``).

Bytes are the payload of every collective this rank enters during the sync (the tensors passed
to ``torch.distributed``, by operation) and the bytes it moves under the ring algorithms
(``bus_bytes``: all-reduce 2(n-1)/n of its input, reduce and broadcast 1, all-gather (n-1) of
its input, reduce-scatter (n-1)/n); time is the median over ``--repeats``; memory is the
growth of the process's peak resident set over the first sync, from just before it with the
gradients in place (``ru_maxrss``); for ZeRO it includes the AdamW moments of the rank's
partition, created at its first step (2 x 4 bytes x params / dp, ``zero_moments_mib``).
Prints JSON::

    {"dp", "params", "grad_bytes", "modes": {mode: {"bytes": {op: n}, "bytes_total",
     "bus_bytes", "seconds", "peak_growth_mib", ...}}, "bytes_over_flat": {...},
     "bus_bytes_over_flat": {...}, "time_over_flat": {...}}

Usage::

    python tools/bench_grad_sync.py --json
    python tools/bench_grad_sync.py --json --dp 2 --d-model 512 --n-layers 8 --bucket-mb 16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _common import emit_report, machine_info, now_iso, positive_int

PROG = "bench_grad_sync.py"
MODES = ("flat", "bucketed", "zero1", "zero2")
# collective -> (position, keyword) of the tensor(s) this rank contributes
_INPUT = {
    "all_reduce": (0, "tensor"),
    "reduce": (0, "tensor"),
    "broadcast": (0, "tensor"),
    "all_gather": (1, "tensor"),
    "all_gather_into_tensor": (1, "input_tensor"),
    "all_gather_single": (1, "input"),
    "_all_gather_base": (1, "input_tensor"),
    "reduce_scatter": (1, "input_list"),
    "reduce_scatter_tensor": (1, "input"),
    "_reduce_scatter_base": (1, "input"),
}


def bus_bytes(op: str, payload: int, n: int) -> float:
    """Bytes one rank moves for ``op`` with ``payload`` input bytes over ``n`` ranks under the
    bandwidth-optimal ring algorithms (NCCL's bus-bandwidth factors)."""
    if op == "all_reduce":
        return 2 * (n - 1) / n * payload
    if "all_gather" in op:
        return (n - 1) * payload  # the output is n inputs; (n - 1) / n of it arrives
    if "reduce_scatter" in op:
        return (n - 1) / n * payload
    return float(payload)  # reduce, broadcast


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--output", help="also write the JSON to this file")
    p.add_argument("--dp", type=positive_int, default=2, help="data-parallel ranks")
    p.add_argument("--d-model", type=positive_int, default=512)
    p.add_argument("--n-layers", type=positive_int, default=8)
    p.add_argument("--vocab", type=positive_int, default=50304)
    p.add_argument("--bucket-mb", type=float, default=16.0)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {MODES}")
    return p.parse_args(argv)


def _count_collectives() -> dict[str, int]:
    """Patch ``torch.distributed``'s collectives to add their payload bytes to the result."""
    import torch
    import torch.distributed as dist

    sent: dict[str, int] = {}

    def nbytes(obj: object) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(o) for o in obj)
        return 0

    for name, (pos, key) in _INPUT.items():
        orig = getattr(dist, name, None)
        if orig is None:
            continue

        def wrapped(*a: object, _orig=orig, _name=name, _pos=pos, _key=key, **kw: object) -> object:
            src = kw.get(_key, a[_pos] if len(a) > _pos else None)
            sent[_name] = sent.get(_name, 0) + nbytes(src)
            return _orig(*a, **kw)

        setattr(dist, name, wrapped)
    return sent


def _worker(rank: int, mode: str, args: dict, out_dir: str) -> None:
    import torch

    from ilm_megatron.config import load_config
    from ilm_megatron.models.lm import build_model

    os.environ["LOCAL_RANK"] = str(rank)
    overrides = [
        f"model.d_model={args['d_model']}",
        f"model.n_layers={args['n_layers']}",
        f"model.vocab_size={args['vocab']}",
        f"parallel.bucket_mb={args['bucket_mb']}",
        f"parallel.zero_stage={2 if mode == 'zero2' else 1}",
    ]
    cfg = load_config([], overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    gen = torch.Generator().manual_seed(rank)

    def fill() -> None:
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)

    sent = _count_collectives()  # before DeepSpeed's backend captures the functions
    zero = None
    if mode.startswith("zero"):
        from ilm_megatron.train.engines.zero import DeepSpeedZero

        zero = DeepSpeedZero(model, named, cfg, per_rank_batch=1)
    bucket = int(args["bucket_mb"] * 2**20)
    group = None

    def sync() -> dict[str, float]:
        """One step's gradient sync; returns phase seconds."""
        t0 = time.perf_counter()
        if mode == "flat":
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            torch.distributed.all_reduce(flat, group=group)
            flat /= args["dp"]
            off = 0
            for p in params:
                p.grad = flat[off : off + p.numel()].view_as(p).clone()
                off += p.numel()
            return {"reduce": time.perf_counter() - t0}
        if mode == "bucketed":
            from ilm_megatron.parallel.grad_sync import all_reduce_bucketed

            all_reduce_bucketed([p.grad for p in params], group, bucket)
            return {"reduce": time.perf_counter() - t0}
        assert zero is not None
        with zero.accumulate():
            pass  # the gradients are already on the parameters; the exit reduces them
        t1 = time.perf_counter()
        zero.step()
        return {"reduce": t1 - t0, "step": time.perf_counter() - t1}

    fill()
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # gradients in place
    sync()  # the first sync: DeepSpeed allocates its buffers and AdamW moments here
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    sent.clear()
    times: list[dict[str, float]] = []
    for _ in range(args["repeats"]):
        fill()
        times.append(sync())
    per_step = {k: v // args["repeats"] for k, v in sent.items()}
    bus = sum(bus_bytes(k, v, args["dp"]) for k, v in per_step.items())
    phases = {k: statistics.median(t[k] for t in times) for k in times[0]}
    Path(out_dir, f"{mode}_{rank}.json").write_text(
        json.dumps(
            {
                "bytes": per_step,
                "bytes_total": sum(per_step.values()),
                "bus_bytes": int(bus),
                "seconds": round(sum(phases.values()), 4),
                "phases_s": {k: round(v, 4) for k, v in phases.items()},
                "peak_growth_mib": round((peak - before) / 1024, 1),
                "zero_moments_mib": round(
                    2 * 4 * sum(p.numel() for p in params) / args["dp"] / 2**20, 1
                )
                if zero is not None
                else 0.0,
                "params": sum(p.numel() for p in params),
            }
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"{PROG}: unknown --modes {bad}; choose from {MODES}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ilm_megatron.core.parallel_state import spawn

    wargs = {
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "vocab": args.vocab,
        "bucket_mb": args.bucket_mb,
        "repeats": args.repeats,
        "dp": args.dp,
    }
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            spawn(_worker, args.dp, args=(mode, wargs, tmp), tp=1, backend="gloo", threads=1)
            rows = [json.loads(Path(tmp, f"{mode}_{r}.json").read_text()) for r in range(args.dp)]
            results[mode] = {
                **{
                    k: rows[0][k]
                    for k in ("bytes", "bytes_total", "bus_bytes", "phases_s", "params")
                },
                "seconds": max(r["seconds"] for r in rows),
                "peak_growth_mib": max(r["peak_growth_mib"] for r in rows),
                "zero_moments_mib": rows[0]["zero_moments_mib"],
            }
    params = next(iter(results.values()))["params"]
    flat = results.get("flat")
    report = {
        "tool": PROG,
        "date": now_iso(),
        "dp": args.dp,
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "vocab": args.vocab,
        "bucket_mb": args.bucket_mb,
        "params": params,
        "grad_bytes": params * 4,
        "modes": {m: {k: v for k, v in r.items() if k != "params"} for m, r in results.items()},
        "machine": machine_info(),
    }
    if flat:
        report["bytes_over_flat"] = {
            m: round(r["bytes_total"] / flat["bytes_total"], 3) for m, r in results.items()
        }
        report["bus_bytes_over_flat"] = {
            m: round(r["bus_bytes"] / flat["bus_bytes"], 3) for m, r in results.items()
        }
        report["time_over_flat"] = {
            m: round(r["seconds"] / flat["seconds"], 3) for m, r in results.items()
        }
    emit_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
