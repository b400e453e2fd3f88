"""``ilm-eval ppl-by-position``: perplexity per position on held-out text, beyond the training
context (the paper's length-extrapolation figure), for implicit and explicit models side by side.

    ilm-eval ppl-by-position --checkpoint runs/implicit --checkpoint runs/explicit \\
        --data data/pile-val [--val-fraction 0.01] [--length 8192] [--samples 8] \\
        [--buckets 1,64,512 | --bucket-width 256] [--mode simultaneous|sequential] \\
        [--out DIR] [--json]

The held-out samples of a shards folder (``tools/preprocess_data.py``; the last
``--val-fraction`` of them, or all) are read in their stored order and concatenated back to back
into ``--samples`` sequences of ``--length + 1`` tokens: inputs ``seq[:-1]``, next-token targets
``seq[1:]``. Position ``p`` (1-based) is the ``p``-th input token; its context holds ``p`` tokens.
Every model sees the same sequences. Per position bucket: the mean next-token NLL, its
perplexity, the number of predicted tokens and the solver iterations (per token in sequential
mode; in simultaneous mode the whole sequence is solved at once, so every position of a sample
reports that sample's iterations). The simultaneous solver cap scales with the length
(:func:`ilm_megatron.tasks.state_tracking.eval_cap`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ilm_megatron.analysis.common import (
    Checkpoint,
    add_cap_arguments,
    add_checkpoint_argument,
    add_data_arguments,
    add_output_arguments,
    add_solver_argument,
    assemble_sequences,
    check_vocabulary,
    load_checkpoint,
    resolve,
    show_outputs,
    solver_caps,
    solver_in_force,
    subplots,
)
from ilm_megatron.argtypes import comma_list, positive_int
from ilm_megatron.errors import UserError

if TYPE_CHECKING:
    import torch

    from ilm_megatron.implicit.solver import SolverStats
    from ilm_megatron.models.lm import ImplicitLM

NAME = "ppl_by_position"
HELP = "perplexity per position bucket on held-out text, beyond the training length"
MODES = ("simultaneous", "sequential")
#: default ``--length`` in multiples of the checkpoints' training length
LENGTH_MULT = 4


# --------------------------------------------------------------------------- buckets


def make_buckets(
    length: int, ends: list[int] | None = None, width: int | None = None
) -> list[tuple[int, int]]:
    """Position buckets ``[(first, last)]`` (1-based, inclusive) covering ``1..length``.

    Default: up to powers of two, ``[1, 1], [2, 2], [3, 4], [5, 8], ...`` (so a power-of-two
    training length ends a bucket); ``width``: equal-width buckets; ``ends``: the given last
    positions (the last bucket always ends at ``length``).

    Raises:
        UserError: ends not increasing or beyond ``length`` (naming ``--buckets``).
    """
    if width is not None:
        lasts = list(range(width, length, width))
    elif ends is not None:
        if sorted(set(ends)) != list(ends):
            raise UserError(f"--buckets: positions must be increasing, got {ends}")
        if ends and ends[-1] > length:
            raise UserError(f"--buckets: position {ends[-1]} is beyond --length {length}")
        lasts = [e for e in ends if e < length]
    else:
        lasts = [1 << k for k in range(length.bit_length()) if 1 << k < length]
    lasts.append(length)
    return [(first, last) for first, last in zip([1] + [e + 1 for e in lasts[:-1]], lasts)]


# --------------------------------------------------------------------------- evaluation


def position_nll(
    model: ImplicitLM, x: torch.Tensor, y: torch.Tensor, mode: str, cap: int | None
) -> tuple[torch.Tensor, SolverStats]:
    """Next-token NLL at every position of one batch, and the statistics of the solve behind it.

    Args:
        x, y: (b, l) inputs and next-token targets.
        mode: ``simultaneous`` (one solve of the whole sequence) or ``sequential``.
        cap: the solver cap (see :func:`~ilm_megatron.analysis.common.solver_caps`; None: the
            configured eval cap).

    Returns:
        ``(nll (b, l) float64, stats)``; ``stats.sample_iters`` is (b,) per sample (simultaneous
        mode, explicit models) or (b, l) per token (sequential mode).
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        if mode == "sequential":
            out = model.forward_sequential(x, max_iter=cap)
        else:
            out = model(x, max_iter=cap)
    logits = out.logits[..., : model.config.vocab_size].float()
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    return nll.double(), out.stats


def _finite(v: float) -> float | None:
    """``v``, or None when it is not finite (JSON has no NaN or infinity)."""
    return v if math.isfinite(v) else None


def _ppl(nll: float) -> float | None:
    return _finite(math.exp(nll)) if math.isfinite(nll) and nll < 700 else None


def evaluate_model(
    model: ImplicitLM,
    tokens: torch.Tensor,
    buckets: list[tuple[int, int]],
    mode: str = "simultaneous",
    batch_size: int = 4,
    cap_mult: float = 2.5,
    max_iter: int = 0,
) -> dict[str, Any]:
    """Per-bucket perplexity of ``model`` on ``tokens`` (samples, length + 1).

    Returns:
        ``cap`` (None for explicit models), ``nll``/``ppl`` over all positions,
        ``iters_mean``/``iters_max`` (per sample in simultaneous mode, per token in sequential
        mode), ``converged_frac`` and ``buckets``:
        per bucket ``start``, ``end``, ``tokens``, ``nll``, ``ppl``, ``iters_mean``.
    """
    import torch

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = next(model.parameters()).device
    length = tokens.shape[1] - 1
    seq_cap, sim_cap = solver_caps(model, length, cap_mult, max_iter)
    # explicit models run the stack once: no cap
    cap = (seq_cap if mode == "sequential" else sim_cap) if model.implicit else None
    nll_sum = torch.zeros(length, dtype=torch.float64)
    iter_sum = torch.zeros(length, dtype=torch.float64)
    # iterations and convergence of every solve: one per sample, or one per token (sequential)
    solves, converged = [], []
    model.eval()
    for rows in tokens.split(batch_size):
        rows = rows.to(device)
        nll, stats = position_nll(model, rows[:, :-1], rows[:, 1:], mode, cap)
        iters = stats.sample_iters.double().cpu()
        nll_sum += nll.sum(0).cpu()
        # a per-sample solve covers every position of its sample
        iter_sum += (iters if iters.dim() == 2 else iters[:, None].expand(-1, length)).sum(0)
        solves.append(iters.flatten())
        converged.append(stats.converged.flatten().cpu())
    n = tokens.shape[0]
    out_buckets = []
    for first, last in buckets:
        sl = slice(first - 1, last)
        count = n * (last - first + 1)
        nll = nll_sum[sl].sum().item() / count
        out_buckets.append(
            {
                "start": first,
                "end": last,
                "tokens": count,
                "nll": _finite(nll),
                "ppl": _ppl(nll),
                "iters_mean": iter_sum[sl].sum().item() / count,
            }
        )
    it = torch.cat(solves)
    total = nll_sum.sum().item() / (n * length)
    return {
        "cap": cap,
        "nll": _finite(total),
        "ppl": _ppl(total),
        "iters_mean": it.mean().item(),
        "iters_max": it.max().item(),
        "converged_frac": torch.cat(converged).float().mean().item(),
        "buckets": out_buckets,
    }


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``ilm-eval ppl-by-position``."""
    add_checkpoint_argument(p, repeatable=True)
    p.add_argument(
        "--label", action="append", default=None, help="name of each --checkpoint, in order"
    )
    add_data_arguments(p, required=True)
    p.add_argument(
        "--length",
        type=positive_int,
        default=None,
        help=f"tokens per sequence (default {LENGTH_MULT} x the training length)",
    )
    p.add_argument("--samples", type=positive_int, default=8, help="sequences (8)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per batch (4)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--buckets",
        type=comma_list(int, lambda v: v >= 1, "positive integers"),
        default=None,
        metavar="END,...",
        help="last position of each bucket (default: the powers of two up to --length)",
    )
    group.add_argument(
        "--bucket-width", type=positive_int, default=None, help="equal-width buckets"
    )
    p.add_argument("--mode", choices=MODES, default="simultaneous")
    add_cap_arguments(p, "fixed solver cap (overrides the rule)")
    add_solver_argument(p)
    add_output_arguments(p, NAME)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate every checkpoint on the same sequences; write the report when ``--out`` is set."""
    from ilm_megatron.analysis.report import write_report
    from ilm_megatron.data.loader import load_manifest

    labels = args.label or []
    if labels and len(labels) != len(args.checkpoint):
        raise UserError(
            f"--label given {len(labels)} time(s) for {len(args.checkpoint)} --checkpoint(s): "
            "give one label per checkpoint, in the same order"
        )
    ckpts = [resolve(c, labels[i] if labels else None) for i, c in enumerate(args.checkpoint)]
    ckpts = _unique_labels(ckpts)
    manifest = load_manifest(args.data)
    known = [c.train_length for c in ckpts if c.train_length]
    length = args.length or LENGTH_MULT * (max(known) if known else manifest.seq_len)
    buckets = make_buckets(length, args.buckets, args.bucket_width)
    tokens, manifest = assemble_sequences(args.data, length, args.samples, args.val_fraction)

    models = []
    for ckpt in ckpts:
        model = load_checkpoint(ckpt, args.device, args.solver)
        check_vocabulary(ckpt, model.config.vocab_size, manifest, tokens)
        row = evaluate_model(
            model, tokens, buckets, args.mode, args.batch_size, args.cap_mult, args.max_iter
        )
        models.append(
            {
                "label": ckpt.label,
                "checkpoint": str(ckpt.path),
                "arch": model.config.arch,
                "implicit": model.config.implicit,
                "n_layers": model.config.n_layers,
                "d_model": model.config.d_model,
                "train_length": ckpt.train_length,
                "solver": solver_in_force(model, args.solver),
                **row,
            }
        )
        del model
    result = {
        "analysis": "ppl-by-position",
        "data": str(args.data),
        "split": "val" if args.val_fraction > 0 else "all",
        "val_fraction": args.val_fraction,
        "tokenizer": manifest.tokenizer_name,
        "length": length,
        "samples": args.samples,
        "mode": args.mode,
        "buckets": [{"start": a, "end": b} for a, b in buckets],
        "models": models,
    }
    figures = {NAME: plot(result)} if args.out else {}
    return write_report(args.out, NAME, result, figures)


def _unique_labels(ckpts: list[Checkpoint]) -> list[Checkpoint]:
    """Suffix repeated labels (``run``, ``run-2``) so every line of the plot has its own name."""
    seen: dict[str, int] = {}
    out = []
    for c in ckpts:
        seen[c.label] = seen.get(c.label, 0) + 1
        if seen[c.label] > 1:
            c = dataclasses.replace(c, label=f"{c.label}-{seen[c.label]}")
        out.append(c)
    return out


def plot(result: dict[str, Any]) -> Any:
    """Perplexity against position (log x: bucket centres), one line per model, with a dashed
    vertical line at each training length. Returns the (open) matplotlib figure."""
    fig, ax = subplots(figsize=(7, 4.5))
    for m in result["models"]:
        pts = [(math.sqrt(b["start"] * b["end"]), b["ppl"]) for b in m["buckets"]]
        pts = [(x, y) for x, y in pts if y is not None]
        kind = "implicit" if m["implicit"] else "explicit"
        ax.plot(*zip(*pts), marker="o", label=f"{m['label']} ({kind})")
    for n in sorted({m["train_length"] for m in result["models"] if m["train_length"]}):
        ax.axvline(n, color="gray", ls="--", lw=1, label=f"train length {n}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{Path(result['data']).name}, {result['mode']} mode, {result['samples']} x "
                 f"{result['length']} tokens")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def show(result: dict[str, Any]) -> None:
    """A table: one row per bucket, one perplexity column per model."""
    print(
        f"perplexity by position: {result['data']} ({result['split']}), {result['samples']} "
        f"sequences of {result['length']} tokens, {result['mode']} mode"
    )
    models = result["models"]
    for m in models:
        line = f"  {m['label']}: {m['arch']}, trained at {m['train_length']}, ppl {_fmt(m['ppl'])}"
        if m["implicit"]:
            per = "per token" if result["mode"] == "sequential" else "per sample"
            line += (
                f", implicit: {m['iters_mean']:.1f} solver iterations {per} (max "
                f"{m['iters_max']:.0f}, cap {m['cap']}), converged {m['converged_frac']:.3f}"
            )
        print(line + ("" if m["implicit"] else ", explicit"))
    width = max(12, *(len(m["label"]) for m in models))
    print(f"{'positions':>13}  " + "  ".join(f"{m['label']:>{width}}" for m in models))
    for i, b in enumerate(result["buckets"]):
        cells = [f"{_fmt(m['buckets'][i]['ppl']):>{width}}" for m in models]
        print(f"{b['start']:>6}-{b['end']:<6}  " + "  ".join(cells))
    show_outputs(result)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
