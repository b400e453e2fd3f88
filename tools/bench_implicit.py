"""Micro-benchmark of the implicit model on the CPU: training memory, solver cost, decoding latency.

Three measurements, each on the model built from ``--config`` with random weights:

* ``saved_bytes``: bytes of the tensors autograd saves for backward during one training-mode
  forward ``model(ids)``, with the no-grad solve forced to run exactly ``f_max_iter`` = 4, 8, 16
  and 32 iterations (tolerance 1e-30) and ``phantom_steps`` fixed. Every distinct storage is
  counted once (by its ``data_ptr``), parameters included (``saved_bytes_activations`` leaves them
  out). The phantom gradient keeps only the phantom steps' graph, so this must not grow with the
  number of solver iterations: ``saved_bytes_ratio_32_4`` ~ 1.
* ``iter_time_over_explicit_forward``: median time of one no-grad solver iteration (``solve`` run
  for ``--solve-iters`` iterations, divided by that number: one ``model.stack(z, u)`` plus the
  residual and best-iterate bookkeeping) over the median time of one explicit forward of the same
  stack with autograd recording (``model.stack(e, None)`` in grad mode). Both are timed
  alternately so that load from other processes affects them alike.
* ``seq_token_latency_ratio_<hi>_<lo>``: per-token latency of sequential mode (``model.step``,
  batch 1) at position ``hi`` over position ``lo`` (4096 and 256; 512 and 64 with ``--quick``),
  the caches built by ``model.prefill(ids[:, :pos])``. The inner solve runs exactly
  ``--step-iters`` iterations, so the ratio measures how the cost of one step grows with the
  position (constant for Mamba2, linear in the KV cache for Llama), not how fast a token happens to
  converge; ``seq_token_latency_converged`` repeats it with the model's own tolerance.
* ``saved_bytes_weight_norm``: the activation bytes saved (at the largest solver cap) by the same
  model with ``model.weight_norm=true``, with each reparametrised weight computed once per solve
  (``cached``, the default) and once per solver iteration and phantom step (``uncached``).

Times are ``time.perf_counter`` medians after a warm-up. Usage::

    python tools/bench_implicit.py --json
    python tools/bench_implicit.py --config configs/models/implicit_llama_tiny.yaml --json
    python tools/bench_implicit.py --quick --repeats 1 --seq-len 16 --json   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from _common import (
    REPO_ROOT,
    ToolError,
    build_from_config,
    display_path,
    dump_json,
    fail,
    load_run_config,
    machine_info,
    now_iso,
    positive_int,
)

if TYPE_CHECKING:
    import torch

    from ilm_megatron.models.lm import ImplicitLM

PROG = "bench_implicit.py"
DEFAULT_CONFIG = "configs/models/implicit_mamba2_tiny.yaml"
SOLVER_ITERS = (4, 8, 16, 32)
NO_STOP_TOL = 1e-30  # a tolerance no solve reaches: every solve runs its full cap


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; exits with code 2 on invalid ones."""
    p = argparse.ArgumentParser(prog=PROG, description="Benchmark an implicit model on the CPU.")
    p.add_argument(
        "--config", default=str(REPO_ROOT / DEFAULT_CONFIG), help=f"model config ({DEFAULT_CONFIG})"
    )
    p.add_argument("--batch", type=positive_int, default=8, help="training/solver batch (8)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="training/solver length (512)")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed repeats (20)")
    p.add_argument(
        "--solve-iters", type=positive_int, default=8, help="iterations per timed solve (8)"
    )
    p.add_argument(
        "--step-iters",
        type=positive_int,
        default=4,
        help="inner iterations of each timed sequential step (4)",
    )
    p.add_argument(
        "--positions",
        type=positive_int,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="sequential-mode positions compared (256 4096; --quick: 64 512)",
    )
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (positions 64 and 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and token ids (0)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = p.parse_intermixed_args(argv)
    if args.positions is None:
        args.positions = [64, 512] if args.quick else [256, 4096]
    if args.positions[0] >= args.positions[1]:
        p.error(f"--positions LO HI needs LO < HI, got {args.positions}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    for ov in args.overrides:
        if "=" not in ov:
            p.error(f"override {ov!r} is not of the form key=value")
    return args


# ---------------------------------------------------------------------------------------- memory
def saved_tensor_bytes(model: ImplicitLM, ids: torch.Tensor, iters: int) -> dict[str, int]:
    """Bytes saved for backward by one training-mode forward whose solve runs ``iters`` steps.

    Returns:
        ``{"bytes", "activation_bytes" (parameters left out), "storages", "solver_iters"}``.
    """
    import torch

    solver = dataclasses.replace(model.solver_config, f_max_iter=iters, f_tol=NO_STOP_TOL)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages.setdefault((st.device.type, st.data_ptr()), st.nbytes())
        return t  # keeps the storage alive, so no address is reused within the forward

    model.train()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, solver=solver)
    total = sum(storages.values())
    param_bytes = sum(n for (_, ptr), n in storages.items() if ptr in params)
    result = {
        "bytes": total,
        "activation_bytes": total - param_bytes,
        "storages": len(storages),
        "solver_iters": int(out.stats.iters),
    }
    del out
    return result


def explicit_forward_saved_bytes(model: ImplicitLM, e: torch.Tensor) -> int:
    """Bytes saved for backward by one explicit stack forward ``model.stack(e, None)``."""
    import torch

    storages: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages.setdefault((st.device.type, st.data_ptr()), st.nbytes())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.stack(e, None)
    del out
    return sum(storages.values())


# ---------------------------------------------------------------------------------------- timing
def interleaved_medians(
    fns: Sequence[Callable[[], Any]], repeats: int, warmup: int = 2
) -> list[float]:
    """Median seconds of each of ``fns``, timed in turn within every repeat (after a warm-up)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def solver_iteration_timing(
    model: ImplicitLM, ids: torch.Tensor, solve_iters: int, repeats: int
) -> dict[str, float]:
    """Median time of one no-grad solver iteration vs one explicit forward with autograd."""
    import torch

    from ilm_megatron.implicit.solver import solve

    model.train()
    with torch.no_grad():
        e, u = model.embed(ids)
    if u is None:
        raise ToolError("the model is explicit (model.implicit=false): there is no solver")
    f = model.stack_fn(u)
    z0 = torch.zeros_like(e)
    iters_run = []

    def one_solve() -> None:
        _, st = solve(f, z0, solve_iters, NO_STOP_TOL)
        iters_run.append(st.iters)

    def explicit_forward() -> None:
        with torch.enable_grad():
            out, _ = model.stack(e, None)
        assert out.requires_grad

    def nograd_stack() -> None:
        with torch.no_grad():
            model.stack(z0, u)

    t_solve, t_explicit, t_eval = interleaved_medians(
        [one_solve, explicit_forward, nograd_stack], repeats
    )
    if min(iters_run) != solve_iters:
        raise RuntimeError(f"a timed solve stopped early: {min(iters_run)} < {solve_iters} iters")
    t_iter = t_solve / solve_iters
    return {
        "iter_time_over_explicit_forward": t_iter / t_explicit,
        "iter_ms": 1e3 * t_iter,
        "explicit_forward_grad_ms": 1e3 * t_explicit,
        "stack_nograd_ms": 1e3 * t_eval,
        "solver_overhead_over_stack_nograd": t_iter / t_eval,
    }


def sequential_latency(
    model: ImplicitLM,
    positions: Sequence[int],
    step_iters: int,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    """Per-token latency of ``model.step`` (batch 1) after prefilling ``positions`` tokens.

    Every timed step runs exactly ``step_iters`` inner iterations; a second pass uses the model's
    own tolerance (``converged``) and records the iterations it took.
    """
    import torch

    model.eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + 1)
    n_steps = 2 * (2 + repeats) + 2
    ids = torch.randint(0, vocab, (1, max(positions) + n_steps), generator=gen)
    prefill_s, caches, cursor = {}, {}, {}
    for pos in positions:
        t0 = time.perf_counter()
        caches[pos] = model.prefill(ids[:, :pos]).caches
        prefill_s[pos] = time.perf_counter() - t0
        cursor[pos] = pos

    s = model.solver_config
    iters: dict[int, list[int]] = {pos: [] for pos in positions}

    def stepper(pos: int, max_iter: int | None) -> Callable[[], None]:
        def run() -> None:
            t = cursor[pos]
            _, _, st = model.step(ids[:, t], caches[pos], max_iter=max_iter)
            cursor[pos] = t + 1
            iters[pos].append(int(st.iters))

        return run

    try:
        model.solver_config = dataclasses.replace(s, eval_tol=NO_STOP_TOL)
        fixed = interleaved_medians([stepper(p, step_iters) for p in positions], repeats)
        bad = [p for p in positions if min(iters[p]) != step_iters]
        if bad:
            raise RuntimeError(f"a timed step stopped early at positions {bad}")
        model.solver_config = s
        for p in positions:
            iters[p].clear()
        conv = interleaved_medians([stepper(p, None) for p in positions], repeats)
    finally:
        model.solver_config = s
    lo, hi = positions[0], positions[-1]
    return {
        "fixed": {str(p): 1e3 * t for p, t in zip(positions, fixed)},
        "ratio": fixed[-1] / fixed[0],
        "converged": {
            str(p): {
                "ms": 1e3 * t,
                "mean_iters": statistics.mean(iters[p]),
                "ms_per_iter": 1e3 * t / max(1e-9, statistics.mean(iters[p])),
            }
            for p, t in zip(positions, conv)
        },
        "converged_ratio": conv[-1] / conv[0],
        "prefill_s": {str(p): prefill_s[p] for p in positions},
        "lo": lo,
        "hi": hi,
    }


# ---------------------------------------------------------------------------------------- driver
def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement and return the result dict (see the module docstring)."""
    cfg = load_run_config(args.config, args.overrides)
    if not cfg.model.implicit:
        raise ToolError("the model is explicit (model.implicit=false): nothing to benchmark")

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    torch.manual_seed(args.seed)
    model = build_from_config(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len), generator=gen)

    # 1. training memory vs solver iterations
    mem = {str(n): saved_tensor_bytes(model, ids, n) for n in SOLVER_ITERS}
    with torch.no_grad():
        e, _ = model.embed(ids)
    explicit_bytes = explicit_forward_saved_bytes(model, e)

    # 1b. weight normalisation: bytes saved with each weight computed once per solve (the
    # default) and once per solver iteration / phantom step (cache_parametrizations=False)
    wn_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weight_norm=True))
    torch.manual_seed(args.seed)
    wn_model = build_from_config(wn_cfg)
    wn = {}
    for name, cached in (("cached", True), ("uncached", False)):
        wn_model.cache_parametrizations = cached
        wn[name] = saved_tensor_bytes(wn_model, ids, SOLVER_ITERS[-1])["activation_bytes"]
    del wn_model

    # 2. cost of one solver iteration vs one explicit forward with autograd
    timing = solver_iteration_timing(model, ids, args.solve_iters, args.repeats)

    # 3. sequential-mode latency vs position
    lo, hi = args.positions
    seq = sequential_latency(model, (lo, hi), args.step_iters, max(5, 2 * args.repeats), args.seed)

    first, last = str(SOLVER_ITERS[0]), str(SOLVER_ITERS[-1])
    return {
        "config": display_path(args.config),
        "arch": cfg.model.arch,
        "overrides": list(args.overrides),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "phantom_steps": cfg.solver.phantom_steps,
        "saved_bytes": {k: v["bytes"] for k, v in mem.items()},
        "saved_bytes_ratio_32_4": mem[last]["bytes"] / mem[first]["bytes"],
        "saved_bytes_activations": {k: v["activation_bytes"] for k, v in mem.items()},
        "saved_storages": {k: v["storages"] for k, v in mem.items()},
        "solver_iters_run": {k: v["solver_iters"] for k, v in mem.items()},
        "saved_bytes_explicit_forward": explicit_bytes,
        "saved_bytes_weight_norm": wn,  # activations (parameters left out), largest solver cap
        "solve_iters_timed": args.solve_iters,
        **timing,
        f"seq_token_latency_ratio_{hi}_{lo}": seq["ratio"],
        "seq_token_latency_ratio": seq["ratio"],
        "seq_positions": [lo, hi],
        "seq_step_iters": args.step_iters,
        "seq_token_latency_ms": seq["fixed"],
        "seq_token_latency_converged": seq["converged"],
        "seq_token_latency_converged_ratio": seq["converged_ratio"],
        "seq_prefill_s": seq["prefill_s"],
        "machine": machine_info(),
        "loadavg_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "date": now_iso(),
        "wall_s": time.perf_counter() - t_start,
    }


def format_summary(r: dict[str, Any]) -> str:
    """A readable multi-line summary of a result dict."""
    lo, hi = r["seq_positions"]
    mib = {k: f"{v / 2**20:.2f}" for k, v in r["saved_bytes"].items()}
    conv = r["seq_token_latency_converged"]
    return "\n".join(
        [
            f"bench: {r['config']} ({r['arch']}), batch {r['batch']} x seq_len {r['seq_len']}, "
            f"{r['machine']['threads']} threads, {r['date']}",
            f"  saved for backward (MiB) by solver iterations: {mib}",
            f"    ratio 32/4 = {r['saved_bytes_ratio_32_4']:.4f} "
            f"(one explicit forward: {r['saved_bytes_explicit_forward'] / 2**20:.2f} MiB)",
            f"  weight norm, activations saved (MiB): "
            f"{r['saved_bytes_weight_norm']['cached'] / 2**20:.2f} with the per-solve cache, "
            f"{r['saved_bytes_weight_norm']['uncached'] / 2**20:.2f} without",
            f"  one solver iteration {r['iter_ms']:.3f} ms, explicit forward with autograd "
            f"{r['explicit_forward_grad_ms']:.3f} ms: ratio "
            f"{r['iter_time_over_explicit_forward']:.3f} "
            f"(no-grad stack {r['stack_nograd_ms']:.3f} ms)",
            f"  sequential step ({r['seq_step_iters']} inner iterations): "
            f"{r['seq_token_latency_ms'][str(lo)]:.3f} ms at {lo}, "
            f"{r['seq_token_latency_ms'][str(hi)]:.3f} ms at {hi}: ratio "
            f"{r['seq_token_latency_ratio']:.3f}",
            f"  converged step: {conv[str(lo)]['ms']:.3f} ms ({conv[str(lo)]['mean_iters']:.2f} "
            f"iters) at {lo}, {conv[str(hi)]['ms']:.3f} ms ({conv[str(hi)]['mean_iters']:.2f} "
            f"iters) at {hi}",
            f"  wall time {r['wall_s']:.1f} s",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    try:
        result = run_bench(args)
    except ToolError as e:
        fail(PROG, str(e))
    print(dump_json(result) if args.json else format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
