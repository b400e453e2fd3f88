"""Check that simultaneous and sequential mode of an implicit model compute the same function.

Simultaneous mode solves the fixed point of the whole sequence at once (``model(ids)`` in eval
mode); sequential mode solves it token by token with caches (``model.forward_sequential(ids)``,
the RNN view). At convergence both give the same logits. This tool builds the model of a config
(random weights from ``--seed``) or loads a checkpoint, draws random token ids, runs both modes with
a tight tolerance and reports the largest logit difference, the argmax agreement, the iteration
counts and the final residuals.

Usage::

    python tools/check_duality.py --config configs/models/implicit_mamba2_tiny.yaml --json
    python tools/check_duality.py --checkpoint run/model.safetensors --seq-len 64 solver.f_tol=0.01

Exit codes: 0 when the check ran (and, with ``--max-diff``, passed), 1 when ``--max-diff`` was given
and the logits differ by more or an argmax disagrees, 2 on bad arguments or missing/invalid files.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from _common import (
    DTYPES,
    ToolError,
    build_from_config,
    display_path,
    dump_json,
    fail,
    load_run_config,
    positive_float,
    positive_int,
)

PROG = "check_duality.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; exits with code 2 on invalid ones."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Compare simultaneous and sequential mode of an implicit model.",
    )
    p.add_argument("--config", help="model config YAML (e.g. configs/models/implicit_*_tiny.yaml)")
    p.add_argument(
        "--checkpoint",
        help="safetensors checkpoint; its stored model config wins over --config's model section",
    )
    p.add_argument("--seq-len", type=positive_int, default=32, help="tokens per sequence (32)")
    p.add_argument("--batch", type=positive_int, default=2, help="sequences (2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and token ids (0)")
    p.add_argument(
        "--tol", type=positive_float, default=1e-6, help="solver tolerance of both modes (1e-6)"
    )
    p.add_argument(
        "--max-iter", type=positive_int, default=400, help="solver cap of both modes (400)"
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (float32)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    p.add_argument(
        "--max-diff",
        type=positive_float,
        default=None,
        help="exit 1 if max |logit diff| exceeds this or an argmax disagrees",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = p.parse_intermixed_args(argv)
    if args.config is None and args.checkpoint is None:
        p.error("give --config or --checkpoint")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    for ov in args.overrides:
        if "=" not in ov:
            p.error(f"override {ov!r} is not of the form key=value")
    return args


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, run both modes and return the result dict (see the module docstring).

    Raises:
        ToolError: missing or invalid config/checkpoint.
    """
    cfg = load_run_config(args.config, args.overrides, args.checkpoint)
    if not cfg.model.implicit:
        raise ToolError("the model is explicit (model.implicit=false): nothing to solve")

    import torch

    from ilm_megatron.analysis.duality import greedy_agreement, max_abs_diff, run_modes

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_from_config(cfg, args.checkpoint, args.dtype).eval()
    model.solver_config = dataclasses.replace(model.solver_config, eval_tol=args.tol)
    vocab = cfg.model.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)

    sim, seq = run_modes(model, ids, args.max_iter, args.max_iter)
    diff = max_abs_diff(sim.logits, seq.logits)  # every logit, padded vocabulary included
    agree = greedy_agreement(sim.logits, seq.logits, vocab).double().mean().item()
    seq_iters = seq.stats.sample_iters.double()
    return {
        "max_abs_logit_diff": diff,
        "token_agreement": agree,
        "mean_iters_simultaneous": sim.stats.sample_iters.float().mean().item(),
        "max_iters_simultaneous": int(sim.stats.iters),
        "mean_iters_sequential": seq_iters.mean().item(),
        "max_iters_sequential": int(seq_iters.max().item()),
        "residual_max_simultaneous": sim.stats.residual.double().max().item(),
        "residual_max_sequential": seq.stats.residual.double().max().item(),
        "config": display_path(args.config) if args.config else None,
        "checkpoint": display_path(args.checkpoint) if args.checkpoint else None,
        "arch": cfg.model.arch,
        "eval_solver": cfg.solver.eval_solver,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "tol": args.tol,
        "max_iter": args.max_iter,
        "dtype": args.dtype,
        "seed": args.seed,
        "max_abs_logit": sim.logits.double().abs().max().item(),
    }


def format_summary(r: dict[str, Any]) -> str:
    """A readable multi-line summary of a result dict."""
    src = r["checkpoint"] or r["config"]
    conv_sim = r["residual_max_simultaneous"] < r["tol"]
    conv_seq = r["residual_max_sequential"] < r["tol"]
    return "\n".join(
        [
            f"duality check: {src} ({r['arch']}, {r['dtype']}, seed {r['seed']})",
            f"  batch {r['batch']} x seq_len {r['seq_len']}, tol {r['tol']:g}, "
            f"max_iter {r['max_iter']}",
            f"  max |logit diff|     {r['max_abs_logit_diff']:.3e}  "
            f"(max |logit| {r['max_abs_logit']:.3e})",
            f"  argmax agreement     {r['token_agreement']:.4f}",
            f"  simultaneous         {r['mean_iters_simultaneous']:.1f} iterations per sample, "
            f"max residual {r['residual_max_simultaneous']:.2e}"
            + ("" if conv_sim else "  (NOT converged)"),
            f"  sequential           {r['mean_iters_sequential']:.2f} iterations/token "
            f"(max {r['max_iters_sequential']}), max residual "
            f"{r['residual_max_sequential']:.2e}" + ("" if conv_seq else "  (NOT converged)"),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    try:
        result = run_check(args)
    except ToolError as e:
        fail(PROG, str(e))
    print(dump_json(result) if args.json else format_summary(result))
    if args.max_diff is not None and (
        not result["max_abs_logit_diff"] <= args.max_diff or result["token_agreement"] < 1.0
    ):
        print(
            f"{PROG}: FAILED: max |logit diff| {result['max_abs_logit_diff']:.3e} "
            f"(limit {args.max_diff:g}), argmax agreement {result['token_agreement']:.4f}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
