"""Solver benchmark: plain iteration, Anderson acceleration, warm starts and per-sample early exit.

For each model (trained checkpoints given with ``--checkpoint``, and random initialisations of
``--config``) on one batch of inputs (the run's word problem when it has one, else random tokens;
half of the rows made easy so the samples need different numbers of iterations):

* ``iters_plain`` / ``iters_anderson``: evaluations of ``F`` each sample needs to reach the
  tolerance in simultaneous mode (mean over samples of the first evaluation below ``--tol``),
  with ``solver.method`` picard and anderson;
* ``iters_sequential`` / ``iters_warm_start``: mean inner iterations per token in sequential
  mode, every token started from zeros / from the previous token's fixed point;
* ``time_early_exit_over_plain``: wall time of the simultaneous solve with
  ``solver.early_exit`` (stopped samples leave the batch) over the plain solve, next to
  ``early_exit_ideal_ratio`` = sum of per-sample iterations / (batch x slowest), what early exit
  saves when the time of ``F`` is proportional to the rows evaluated;
* ``quality``: accuracy on the word problem (when there is one) for every variant, the
  fraction of samples (tokens in sequential mode) that reached the tolerance, and duality: the
  greedy agreement and largest logit difference of every variant with sequential mode started
  from zeros (the RNN reading of the model, whose per-token solves converge most easily).

The top-level keys repeat the first trained model's numbers (else the first random one's).
Usage::

    python tools/bench_solver.py --checkpoint runs/demo/implicit --json
    python tools/bench_solver.py --quick --json        # random tiny models, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _common import (
    REPO_ROOT,
    ToolError,
    display_path,
    emit_report,
    fail,
    machine_info,
    median_time,
    now_iso,
    positive_float,
    positive_int,
)

from ilm_megatron.argtypes import comma_list

if TYPE_CHECKING:
    import torch

    from ilm_megatron.models.lm import ImplicitLM

PROG = "bench_solver.py"
DEFAULT_CONFIGS = ("configs/models/implicit_mamba2_tiny.yaml",)


def _inputs(
    model: ImplicitLM, group: str | None, length: int, batch: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids (b, l), targets (b, l) or None): the word problem with every other row made easy
    (90% identity tokens), or random tokens with every other row a repeated token."""
    import torch

    from ilm_megatron.data.word_problem import sample_word_problem

    g = torch.Generator().manual_seed(seed)
    if group is not None:
        hard_x, hard_y = sample_word_problem(group, batch, length, g, 0.0)
        easy_x, easy_y = sample_word_problem(group, batch, length, g, 0.9)
        rows = torch.arange(batch) % 2 == 1
        x = torch.where(rows[:, None], easy_x, hard_x)
        y = torch.where(rows[:, None], easy_y, hard_y)
        return x, y
    x = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    x[1::2] = x[1::2, :1]
    return x, None


def _with(model: ImplicitLM, **solver: Any) -> ImplicitLM:
    model.solver_config = dataclasses.replace(model.solver_config, **solver)
    return model


def bench_case(
    name: str,
    model: ImplicitLM,
    group: str | None,
    length: int,
    batch: int,
    tol: float,
    cap: int,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    """Every measurement of the module docstring for one model."""
    import torch

    model.eval()
    base = dataclasses.replace(model.solver_config, eval_solver="train", eval_tol=tol)
    ids, targets = _inputs(model, group, length, batch, seed)
    vocab = model.config.vocab_size

    def run(mode: str = "simultaneous", **solver: Any):
        model.solver_config = dataclasses.replace(base, **solver)
        with torch.no_grad():
            if mode == "sequential":
                return model.forward_sequential(ids, max_iter=cap)
            return model(ids, max_iter=cap)

    outs = {
        "plain": run(),
        "anderson": run(method="anderson"),
        "early_exit": run(early_exit=True),
        "sequential": run("sequential"),
        "warm_start": run("sequential", seq_warm_start=True),
    }
    t_plain = median_time(lambda: run(), repeats)
    t_early = median_time(lambda: run(early_exit=True), repeats)
    t_anderson = median_time(lambda: run(method="anderson"), repeats)
    model.solver_config = base
    it = {k: o.stats.sample_iters.float() for k, o in outs.items()}
    plain_it = it["plain"]
    logits = {k: o.logits[..., :vocab].float() for k, o in outs.items()}
    ref = logits["sequential"]  # token by token: the RNN reading every variant must match
    quality: dict[str, Any] = {
        "max_logit_diff_from_sequential": {
            k: (v - ref).abs().max().item() for k, v in logits.items() if k != "sequential"
        },
        "agreement_with_sequential": {
            k: (v.argmax(-1) == ref.argmax(-1)).float().mean().item()
            for k, v in logits.items()
            if k != "sequential"
        },
        "converged_frac": {k: o.stats.converged_frac for k, o in outs.items()},
    }
    if targets is not None:
        quality["accuracy"] = {
            k: (v.argmax(-1) == targets).float().mean().item() for k, v in logits.items()
        }
    return {
        "model": name,
        "arch": model.config.arch,
        "task": f"{group} word problem" if group else "random tokens",
        "length": length,
        "batch": batch,
        "tol": tol,
        "cap": cap,
        "iters_plain": plain_it.mean().item(),
        "iters_plain_batch": outs["plain"].stats.iters,
        "iters_anderson": it["anderson"].mean().item(),
        "iters_anderson_batch": outs["anderson"].stats.iters,
        "anderson_restarts": int(outs["anderson"].stats.restarts.sum()),
        "iters_sequential": it["sequential"].mean().item(),
        "iters_warm_start": it["warm_start"].mean().item(),
        "iters_per_sample_plain": plain_it.tolist(),
        "time_plain_s": t_plain,
        "time_anderson_s": t_anderson,
        "time_early_exit_s": t_early,
        "time_early_exit_over_plain": t_early / t_plain,
        "time_anderson_over_plain": t_anderson / t_plain,
        "early_exit_ideal_ratio": (plain_it.sum() / (plain_it.numel() * plain_it.max())).item(),
        "quality": quality,
    }


def _load(source: str, is_checkpoint: bool, seed: int) -> tuple[str, ImplicitLM, str | None, int]:
    """(name, float64 model, word-problem group or None, the run's sequence length)."""
    import torch

    from ilm_megatron.config import load_config
    from ilm_megatron.models.lm import build_model
    from ilm_megatron.tasks.state_tracking import resolve_checkpoint, run_config_group
    from ilm_megatron.train.checkpoint import load_model

    if is_checkpoint:
        try:
            path, run_dir = resolve_checkpoint(source)
            model = load_model(path)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ToolError(f"--checkpoint {source}: {e}") from None
        group, seq_len = run_config_group(run_dir, path)
        name = f"trained:{display_path(run_dir or path)}"
        return name, model.double(), group, seq_len or 16
    cfg_path = Path(source)
    if not cfg_path.is_file():
        cfg_path = REPO_ROOT / source
    if not cfg_path.is_file():
        raise ToolError(f"--config {source}: no such file")
    cfg = load_config([cfg_path])
    if not cfg.model.implicit:
        raise ToolError(f"--config {source}: an explicit model has no solver to compare")
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.solver).double()
    return f"random:{cfg_path.stem}", model, None, cfg.data.seq_len


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", default=[], help="trained run (repeatable)")
    p.add_argument(
        "--config",
        action="append",
        default=None,
        help=f"random-init model config (repeatable; default {', '.join(DEFAULT_CONFIGS)})",
    )
    p.add_argument("--length-mult", type=positive_float, default=2.0, help="x the run's length")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument(
        "--tols",
        type=comma_list(float, lambda v: v > 0, "positive numbers"),
        default=[1e-3, 5e-2],
        help="solver tolerances, one case per model and tolerance (the first heads the report)",
    )
    p.add_argument("--cap", type=positive_int, default=1000, help="solver cap")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: short inputs, one repeat")
    p.add_argument("--output", default=None, help="also write the JSON here")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    configs = args.config if args.config is not None else list(DEFAULT_CONFIGS)
    sources = [(c, True) for c in args.checkpoint] + [(c, False) for c in configs]
    if not sources:
        fail(PROG, "nothing to benchmark: give --checkpoint or --config")
    try:
        loaded = [_load(s, ck, args.seed) for s, ck in sources]
    except ToolError as e:
        fail(PROG, str(e))
    cases = []
    for name, model, group, seq_len in loaded:
        length = 8 if args.quick else max(2, round(args.length_mult * seq_len))
        for tol in args.tols:
            cases.append(
                bench_case(
                    name,
                    model,
                    group,
                    length,
                    4 if args.quick else args.batch,
                    tol,
                    args.cap,
                    1 if args.quick else args.repeats,
                    args.seed,
                )
            )
    head = cases[0]
    keys = ("iters_plain", "iters_anderson", "iters_sequential", "iters_warm_start")
    report = {
        **{k: head[k] for k in keys},
        "time_early_exit_over_plain": head["time_early_exit_over_plain"],
        "early_exit_ideal_ratio": head["early_exit_ideal_ratio"],
        "anderson_iters_saved": 1 - head["iters_anderson"] / head["iters_plain"],
        "quality": head["quality"],
        "cases": cases,
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "date": now_iso(),
    }
    emit_report(report, args.output, show=args.json)
    if not args.json:
        for c in cases:
            ratio, ideal = c["time_early_exit_over_plain"], c["early_exit_ideal_ratio"]
            print(
                f"{c['model']} tol {c['tol']:g}: iters plain {c['iters_plain']:.1f}, anderson "
                f"{c['iters_anderson']:.1f}, sequential {c['iters_sequential']:.2f} -> warm "
                f"{c['iters_warm_start']:.2f}; early exit time x{ratio:.2f} (ideal x{ideal:.2f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
