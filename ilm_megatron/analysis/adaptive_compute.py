"""``ilm-eval adaptive-compute``: solver iterations per token against position, loss and
difficulty.

In sequential mode (:meth:`~ilm_megatron.models.lm.ImplicitLM.forward_sequential`) every token
has its own fixed-point solve, so ``stats.sample_iters`` is (b, l) iterations per token; in
simultaneous mode (``model(ids)``) there is one solve per sample, (b,). An implicit model should
spend more iterations on harder tokens ("adaptive compute"). This tool measures both on a
checkpoint, on one of two data sources:

- word problems (the default for a word-problem run): the difficulty is the fraction of hard,
  non-identity tokens, ``1 - easy_frac`` of
  :func:`~ilm_megatron.data.word_problem.sample_word_problem`; per token also whether it is hard;
- CatbAbI (``--catbabi DIR``): the difficulty is the story length, bucketed as in ``ilm-eval
  catbabi``, and the task. Each window continues from the state the previous one left on its
  rows (``--carry-state``, the default for runs trained with ``data.carry_state``), as
  ``ilm-eval catbabi`` does.

Per token it records the iterations, the cross-entropy of the logits against the target and
whether the argmax is right (accuracy is scored at every token of a word problem, at the answer
after each ``?`` of CatbAbI), and reports mean iterations per position and per difficulty bucket
(with the accuracy there), the Spearman rank correlation of iterations and loss, iteration
histograms, and the simultaneous per-sample iterations per bucket.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ilm_megatron.analysis import common
from ilm_megatron.argtypes import comma_list, non_negative_int, positive_int
from ilm_megatron.errors import UserError

if TYPE_CHECKING:
    import torch

    from ilm_megatron.models.lm import ImplicitLM

HELP = "solver iterations per token against position, token loss and difficulty"
NAME = "adaptive_compute"
DEFAULT_HARD_FRACS = (0.1, 0.25, 0.5, 1.0)
DEFAULT_CATBABI_LENGTH = 200  # the window of ilm-eval catbabi and of the FWM setup
CAP_MULT = 2.5  # simultaneous cap: max(eval cap, ceil(CAP_MULT * length)), as ilm-eval uses
LOSS_BINS = 10  # equal-count loss bins of panel (b)
SCATTER_POINTS = 2000  # tokens drawn in the scatter of panel (b)


# --------------------------------------------------------------------------- arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``ilm-eval adaptive-compute``."""
    common.add_checkpoint_argument(p)
    p.add_argument(
        "--catbabi",
        metavar="DIR",
        default=None,
        help="measure on this CatbAbI folder (tools/make_catbabi.py) instead of a word problem",
    )
    p.add_argument(
        "--split", choices=("valid", "test"), default="test", help="CatbAbI split (test)"
    )
    p.add_argument(
        "--carry-state",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CatbAbI: carry each row's state from one window to the next (default: as the run "
        "was trained, data.carry_state)",
    )
    p.add_argument(
        "--group", default=None, help="word problem (S3, S5, A5, ...); default: the run's"
    )
    p.add_argument(
        "--hard-fracs",
        type=comma_list(float, lambda v: 0.0 <= v <= 1.0, "hard fractions in [0, 1]"),
        default=list(DEFAULT_HARD_FRACS),
        help="word problem: chance that a token is random, not the identity; one bucket each "
        "(0.1,0.25,0.5,1.0)",
    )
    p.add_argument(
        "--length",
        type=positive_int,
        default=None,
        help="word-problem length (default: the run's data.seq_len) or CatbAbI window (200)",
    )
    p.add_argument(
        "--samples", type=positive_int, default=64, help="word problems per hard fraction (64)"
    )
    p.add_argument(
        "--length-bins",
        type=comma_list(int, lambda v: v >= 1, "increasing positive integers", increasing=True),
        default=None,
        help="CatbAbI story-length buckets, upper bounds (default 50,100,200,400)",
    )
    p.add_argument(
        "--max-windows", type=non_negative_int, default=0, help="CatbAbI: first N windows (0: all)"
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per batch (16)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the word problems (1234)")
    p.add_argument(
        "--max-iter",
        type=positive_int,
        default=None,
        help="solver cap of both modes (default: the eval cap per token, "
        f"max(eval cap, ceil({CAP_MULT} * length)) per sample)",
    )
    p.add_argument(
        "--no-simultaneous", action="store_true", help="skip the simultaneous (per-sample) part"
    )
    common.add_solver_argument(p)
    common.add_output_arguments(p, NAME)


# --------------------------------------------------------------------------- statistics


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of the values of x (n,), ties given the mean of the ranks they span.

    Returns:
        (n,) float64.
    """
    import torch

    sorted_x, order = torch.sort(x.flatten(), stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    # a group of c equal values sorted into ranks end-c+1..end gets their mean, end - (c-1)/2
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty(order.numel(), dtype=torch.float64, device=x.device)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman rank correlation of x and y (n,): Pearson correlation of their average ranks.

    Returns None when it is undefined: fewer than two values, or either side constant (an
    explicit model's iterations, all 1).
    """
    if x.numel() != y.numel():
        raise ValueError(f"spearman: {x.numel()} values against {y.numel()}")
    if x.numel() < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.square().sum() * ry.square().sum()).sqrt().item()
    if den == 0.0:
        return None
    return (rx * ry).sum().item() / den


def group_means(
    values: torch.Tensor, keys: torch.Tensor, n: int
) -> tuple[list[float | None], list[int]]:
    """Mean of ``values`` (N,) per key 0..n-1 of ``keys`` (N,) and the count of each key.

    Returns:
        ``(means, counts)``, each a list of n; the mean of a key without values is None.
    """
    import torch

    keys = keys.long().flatten()
    sums = torch.bincount(keys, weights=values.double().flatten(), minlength=n)[:n]
    counts = torch.bincount(keys, minlength=n)[:n]
    means = [float(s) / int(c) if c else None for s, c in zip(sums.tolist(), counts.tolist())]
    return means, counts.tolist()


def histogram(iters: torch.Tensor, size: int = 0) -> list[int]:
    """Token counts per iteration value: ``counts[k]`` tokens took ``k`` iterations.

    Args:
        iters: (N,) non-negative integers.
        size: at least this many entries (to align the histograms of several buckets).
    """
    import torch

    return torch.bincount(iters.long().flatten(), minlength=size).tolist()


def _mean(x: torch.Tensor) -> float | None:
    return x.double().mean().item() if x.numel() else None


def iters_by_loss(
    loss: torch.Tensor, iters: torch.Tensor, bins: int = LOSS_BINS
) -> list[dict[str, Any]]:
    """Mean iterations in equal-count bins of increasing token loss (panel (b)).

    Args:
        loss, iters: (N,) per token.
    Returns:
        Up to ``bins`` rows ``{"loss": mean loss, "iters": mean iterations, "tokens": count}``.
    """
    import torch

    if loss.numel() == 0:
        return []
    order = torch.argsort(loss.flatten(), stable=True)
    rows = []
    for part in torch.tensor_split(order, min(bins, order.numel())):
        rows.append(
            {
                "loss": _mean(loss.flatten()[part]),
                "iters": _mean(iters.flatten()[part]),
                "tokens": part.numel(),
            }
        )
    return rows


# --------------------------------------------------------------------------- measurement


class _Collector:
    """Per-batch tensors of the same fields, concatenated at the end (on the CPU)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, **fields: torch.Tensor) -> None:
        for k, v in fields.items():
            self.parts.setdefault(k, []).append(v.detach().cpu())

    def cat(self) -> dict[str, torch.Tensor]:
        import torch

        return {k: torch.cat(v) for k, v in self.parts.items()}


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each token: logits (b, l, V), targets (b, l) -> (b, l) float32."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return ce.view_as(targets)


def measure_batch(
    model: ImplicitLM,
    ids: torch.Tensor,
    targets: torch.Tensor,
    seq_cap: int,
    sim_cap: int | None,
    carry: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``ids`` (b, l) in sequential and (unless ``sim_cap`` is None) simultaneous mode.

    ``carry``: the state each mode left on these rows after the previous window
    (``{"sequential": caches or None, "simultaneous": caches or None}``), read and replaced
    here; None solves the window from an empty state.

    Returns:
        ``iters`` (b, l) per-token iterations (1 for an explicit model), ``loss`` (b, l) token
        cross-entropy against ``targets`` (b, l), ``correct`` (b, l) argmax hits, ``converged``
        (b, l); with the simultaneous part ``sim_iters`` (b,), ``sim_correct`` (b, l) and
        ``sim_converged`` (b,).
    """
    import torch

    vocab = model.config.vocab_size
    with torch.no_grad():
        before = carry.get("sequential") if carry is not None else None
        seq = model.forward_sequential(ids, caches=before, max_iter=seq_cap)
        if carry is not None:
            carry["sequential"] = seq.caches
        logits = seq.logits[..., :vocab].float()
        if model.implicit:
            iters, converged = seq.stats.sample_iters, seq.stats.converged
        else:  # one pass per token; the stats of an explicit pass are per sample
            iters = torch.ones_like(ids)
            converged = torch.ones_like(ids, dtype=torch.bool)
        out = {
            "iters": iters.long(),
            "loss": token_losses(logits, targets),
            "correct": logits.argmax(-1) == targets,
            "converged": converged.expand_as(ids),
        }
        if sim_cap is not None:
            if carry is not None:
                before = carry.get("simultaneous")
                sim = model(ids, max_iter=sim_cap, caches=before, return_caches=True)
                carry["simultaneous"] = sim.caches
            else:
                sim = model(ids, max_iter=sim_cap)
            out["sim_iters"] = sim.stats.sample_iters.long()
            out["sim_correct"] = sim.logits[..., :vocab].argmax(-1) == targets
            out["sim_converged"] = sim.stats.converged
    return out


def word_problem_batches(
    group: str,
    hard_fracs: Sequence[float],
    length: int,
    samples: int,
    batch_size: int,
    seed: int,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(bucket, x, y)`` batches (x, y each (b, length)): ``samples`` word problems per hard
    fraction, each token drawn at random with probability ``hard_fracs[bucket]`` and the
    identity otherwise; a pure function of its arguments."""
    import torch

    from ilm_megatron.data.word_problem import sample_word_problem

    for i, frac in enumerate(hard_fracs):
        gen = torch.Generator().manual_seed(seed + i)
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            x, y = sample_word_problem(group, n, length, gen, easy_frac=1.0 - frac)
            yield i, x, y


@dataclass
class _Batch:
    """One batch of inputs and what is known about its tokens.

    Attributes:
        x, y: (b, l) inputs and next-token targets.
        keep: (b, l) bool, the tokens to record (CatbAbI: not padding); a row without any is not
            a sample.
        fields: per-token fields (b, l) recorded with the measurements (``position``,
            ``bucket``, ``scored`` and ``hard`` or ``task``/``story_pos``); ``scored`` also
            marks the tokens a sample's simultaneous accuracy counts.
        row_bucket: (b,) the difficulty bucket of each sample.
    """

    x: torch.Tensor
    y: torch.Tensor
    keep: torch.Tensor
    fields: dict[str, torch.Tensor]
    row_bucket: torch.Tensor


def _measure(
    model: ImplicitLM,
    batches: Iterable[_Batch],
    length: int,
    max_iter: int | None,
    simultaneous: bool,
    carry_state: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """:func:`measure_batch` on every batch, collected per kept token and per sample (see
    :func:`measure_word_problem`); with ``carry_state`` each batch continues the rows of the
    previous one (a stream's windows). ``info`` holds the caps and the number of batches."""
    device = next(model.parameters()).device
    seq_cap, sim_cap = common.solver_caps(model, length, CAP_MULT, max_iter or 0)
    toks, samps = _Collector(), _Collector()
    n_batches = 0
    carry: dict[str, Any] | None = {} if carry_state else None
    for batch in batches:
        n_batches += 1
        m = measure_batch(
            model,
            batch.x.to(device),
            batch.y.to(device),
            seq_cap,
            sim_cap if simultaneous else None,
            carry,
        )
        m = {k: v.cpu() for k, v in m.items()}
        keep = batch.keep
        measured = {k: m[k][keep] for k in ("iters", "loss", "correct", "converged")}
        toks.add(**measured, **{k: v[keep] for k, v in batch.fields.items()})
        if simultaneous:
            rows, scored = keep.any(1), batch.fields["scored"]
            samps.add(
                iters=m["sim_iters"][rows],
                bucket=batch.row_bucket[rows],
                hits=(m["sim_correct"] & scored).sum(1)[rows],
                scored=scored.sum(1)[rows],
                converged=m["sim_converged"][rows],
            )
    info = {"seq_cap": seq_cap, "sim_cap": sim_cap if simultaneous else None, "batches": n_batches}
    return toks.cat(), samps.cat() if simultaneous else None, info


def measure_word_problem(
    model: ImplicitLM,
    group: str,
    hard_fracs: Sequence[float],
    length: int,
    samples: int,
    batch_size: int,
    seed: int,
    max_iter: int | None = None,
    simultaneous: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Per-token and per-sample measurements on :func:`word_problem_batches`.

    Returns:
        ``(tokens, samples, info)``: ``tokens`` (N,) each over all N = samples * len(hard_fracs)
        * length tokens, fields ``iters, loss, correct, converged, position, bucket, scored,
        hard``; ``samples`` (S,) per sample, ``iters, bucket, hits, scored, converged`` (None
        without the simultaneous part); ``info`` the caps.
    """
    import torch

    def batches() -> Iterator[_Batch]:
        for bucket, x, y in word_problem_batches(
            group, hard_fracs, length, samples, batch_size, seed
        ):
            every = torch.ones_like(x, dtype=torch.bool)  # every token is scored
            fields = {
                "position": torch.arange(length).expand_as(x),
                "bucket": torch.full_like(x, bucket),
                "scored": every,
                "hard": x != 0,  # the identity is symbol 0 of every word problem
            }
            yield _Batch(x, y, every, fields, torch.full((x.shape[0],), bucket))

    tokens, samps, info = _measure(model, batches(), length, max_iter, simultaneous)
    del info["batches"]
    return tokens, samps, info


def measure_catbabi(
    model: ImplicitLM,
    data_dir: str,
    split: str,
    length: int,
    length_bins: Sequence[int],
    batch_size: int,
    max_windows: int = 0,
    max_iter: int | None = None,
    simultaneous: bool = True,
    carry_state: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Per-token and per-window-row measurements on a CatbAbI folder's ``split``.

    The stream (:func:`ilm_megatron.data.catbabi.load_stream`, ``batch_size`` rows) is walked in
    ``length`` windows, each solved from the state the previous window left on its rows
    (``carry_state``, as a model trained with ``data.carry_state`` reads the stream) or from an
    empty state. Tokens are the non-pad positions; a token's
    bucket is its story's length bucketized by ``length_bins`` (upper bounds, inclusive), and a
    row's simultaneous bucket is that of the longest story it holds in the window.

    Returns:
        ``(tokens, samples, info)`` as :func:`measure_word_problem`, ``scored`` marking the
        answer positions, with ``task`` and ``story_pos`` per token instead of ``hard``; ``info``
        has the caps and the number of windows.
    """
    import torch

    from ilm_megatron.data.catbabi import iter_batches, load_stream

    try:
        stream = load_stream(data_dir, split, batch_size, length)
    except (OSError, ValueError) as e:
        raise UserError(f"--catbabi {data_dir}: {e}") from None
    if not bool(stream.story_len.gt(0).any()):
        raise UserError(f"--catbabi {data_dir}: {split}.txt holds no story")
    bins = torch.tensor(list(length_bins))

    def batches() -> Iterator[_Batch]:
        for w, batch in enumerate(iter_batches(stream)):
            if max_windows and w >= max_windows:
                break
            story_len = batch.story_len.contiguous()  # a window is a strided view of the stream
            fields = {
                "position": torch.arange(length).expand_as(batch.x),
                "bucket": torch.bucketize(story_len, bins),
                "scored": batch.is_answer,
                "task": batch.task_id,
                "story_pos": batch.story_pos,
            }
            keep = batch.story_pos >= 0  # padding carries no story
            longest = story_len.amax(1)  # padding has story_len 0
            yield _Batch(batch.x, batch.y, keep, fields, torch.bucketize(longest, bins))

    tokens, samps, info = _measure(model, batches(), length, max_iter, simultaneous, carry_state)
    info["windows"] = info.pop("batches")
    info["carry_state"] = carry_state
    return tokens, samps, info


# --------------------------------------------------------------------------- summaries


def _subset(t: dict[str, torch.Tensor], mask: torch.Tensor, size: int) -> dict[str, Any]:
    """Iterations, loss, accuracy (over the scored tokens) and histogram of the tokens in
    ``mask`` (N,) bool."""
    it, loss = t["iters"][mask], t["loss"][mask]
    scored = mask & t["scored"]
    return {
        "tokens": int(mask.sum()),
        "iters_mean": _mean(it),
        "iters_max": int(it.max()) if it.numel() else None,
        "loss_mean": _mean(loss),
        "scored": int(scored.sum()),
        "accuracy": _mean(t["correct"][scored]),
        "converged_frac": _mean(t["converged"][mask]),
        "spearman_iters_loss": spearman(it, loss),
        "histogram": histogram(it, size),
    }


def _curve(values: torch.Tensor, keys: torch.Tensor, n: int) -> dict[str, list]:
    means, counts = group_means(values, keys, n)
    return {"mean": means, "count": counts}


def summarize_tokens(
    t: dict[str, torch.Tensor], names: Sequence[str], length: int
) -> dict[str, Any]:
    """The sequential (per-token) report of :func:`measure_word_problem` /
    :func:`measure_catbabi` tokens: overall, per position (0..length-1), per bucket ``names``,
    iterations binned by loss, hard/easy tokens (word problem) or answers and tasks (CatbAbI)."""
    import torch

    every = torch.ones_like(t["scored"])
    size = int(t["iters"].max()) + 1 if t["iters"].numel() else 0
    out = _subset(t, every, size)
    out["per_position"] = _curve(t["iters"], t["position"], length)
    out["iters_by_loss"] = iters_by_loss(t["loss"], t["iters"])
    buckets = []
    for i, name in enumerate(names):
        mask = t["bucket"] == i
        row = {"name": name, **_subset(t, mask, size)}
        row["per_position"] = _curve(t["iters"][mask], t["position"][mask], length)
        if "hard" in t:
            row["iters_hard"] = _mean(t["iters"][mask & t["hard"]])
            row["iters_easy"] = _mean(t["iters"][mask & ~t["hard"]])
        buckets.append(row)
    out["buckets"] = buckets
    if "hard" in t:
        out["hard"] = _subset(t, t["hard"], size)
        out["easy"] = _subset(t, ~t["hard"], size)
    if "task" in t:
        out["answers"] = _subset(t, t["scored"], size)
        n_story = int(t["story_pos"].max()) + 1 if t["story_pos"].numel() else 0
        out["per_story_position"] = _curve(t["iters"], t["story_pos"], n_story)
        out["per_task"] = {
            str(k): _subset(t, t["task"] == k, size) for k in sorted(set(t["task"].tolist()))
        }
    return out


def summarize_samples(s: dict[str, torch.Tensor], names: Sequence[str]) -> dict[str, Any]:
    """The simultaneous (per-sample) report: iterations overall and per bucket ``names``, with
    the accuracy of the simultaneous logits over each bucket's scored tokens."""
    size = int(s["iters"].max()) + 1 if s["iters"].numel() else 0

    def part(mask: torch.Tensor) -> dict[str, Any]:
        it, scored = s["iters"][mask], int(s["scored"][mask].sum())
        return {
            "samples": int(mask.sum()),
            "iters_mean": _mean(it),
            "iters_max": int(it.max()) if it.numel() else None,
            "accuracy": int(s["hits"][mask].sum()) / scored if scored else None,
            "converged_frac": _mean(s["converged"][mask]),
            "histogram": histogram(it, size),
        }

    out = part(s["iters"] >= 0)
    out["buckets"] = [{"name": n, **part(s["bucket"] == i)} for i, n in enumerate(names)]
    return out


# --------------------------------------------------------------------------- the tool


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, summarise, and write ``adaptive_compute.json``/``.png`` under ``--out``."""
    from ilm_megatron.analysis.report import write_report

    ckpt = common.resolve(args.checkpoint)
    path, model = ckpt.path, common.load_checkpoint(ckpt, args.device, args.solver)
    simultaneous = not args.no_simultaneous
    if args.catbabi is not None:
        from ilm_megatron.data.catbabi import read_vocab
        from ilm_megatron.tasks.catbabi import DEFAULT_LENGTH_BINS, AccuracyMeter

        try:
            n_vocab = len(read_vocab(args.catbabi))
        except (OSError, ValueError) as e:
            raise UserError(f"--catbabi {args.catbabi}: {e}") from None
        if n_vocab > model.config.vocab_size:
            raise UserError(
                f"--catbabi {args.catbabi}: its {n_vocab} tokens do not fit the model's "
                f"vocabulary ({model.config.vocab_size}) in {path}"
            )
        bins = args.length_bins or list(DEFAULT_LENGTH_BINS)
        length = args.length or DEFAULT_CATBABI_LENGTH
        names = AccuracyMeter(bins).bin_names()  # the buckets of ilm-eval catbabi
        carry_state = args.carry_state
        if carry_state is None:  # as the run was trained
            stored = common.stored_run_config(ckpt.path, ckpt.run_dir)
            data_cfg = stored.get("data", {}) if stored is not None else {}
            carry_state = bool(data_cfg.get("carry_state", False))
        tokens, samples, info = measure_catbabi(
            model, args.catbabi, args.split, length, bins, args.batch_size,
            args.max_windows, args.max_iter, simultaneous, carry_state,
        )  # fmt: skip
        data = {
            "source": "catbabi",
            "path": str(args.catbabi),
            "split": args.split,
            "length": length,
            "windows": info["windows"],
            "carry_state": carry_state,
            "length_bins": bins,
            "difficulty": "story length",
        }
    else:
        group, train_len = common.word_problem_group(
            ckpt, model.config.vocab_size, args.group, hint="pass --catbabi DIR or --group"
        )
        length = args.length or train_len
        if length is None:
            raise UserError(f"--length: no data.seq_len stored with {path}; pass --length")
        names = [f"{f:g}" for f in args.hard_fracs]
        tokens, samples, info = measure_word_problem(
            model, group, args.hard_fracs, length, args.samples, args.batch_size, args.seed,
            args.max_iter, simultaneous,
        )  # fmt: skip
        data = {
            "source": "word_problem",
            "group": group,
            "length": length,
            "samples_per_bucket": args.samples,
            "hard_fracs": list(args.hard_fracs),
            "seed": args.seed,
            "difficulty": "hard-token fraction",
        }
    seq = summarize_tokens(tokens, names, length)
    seq["cap"] = info["seq_cap"]
    sim = None
    if samples is not None:
        sim = summarize_samples(samples, names)
        sim["cap"] = info["sim_cap"]
    cfg = model.config
    result = {
        "task": "adaptive-compute",
        "checkpoint": str(path),
        "model": {
            "arch": cfg.arch,
            "implicit": cfg.implicit,
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
        },
        "tol": model.eval_tol(),
        "solver": common.solver_in_force(model, args.solver),
        "data": data,
        "note": None
        if cfg.implicit
        else "explicit model: one pass per token, so iterations are 1 everywhere",
        "sequential": seq,
        "simultaneous": sim,
    }
    figures = {}
    if args.out is not None:
        figures[NAME] = plot(result, _scatter_sample(tokens))
    return write_report(args.out, NAME, result, figures)


def _scatter_sample(t: dict[str, torch.Tensor]) -> tuple[list[float], list[int]]:
    """At most :data:`SCATTER_POINTS` (loss, iterations) pairs, evenly strided over the tokens."""
    n = t["loss"].numel()
    step = max(1, math.ceil(n / SCATTER_POINTS))
    return t["loss"][::step].tolist(), t["iters"][::step].tolist()


def plot(result: dict[str, Any], scatter: tuple[list[float], list[int]] | None = None) -> Any:
    """The four-panel figure of a :func:`run` result: (a) mean iterations vs position, (b)
    iterations vs token loss, (c) mean iterations per difficulty bucket, (d) iteration
    histograms per bucket. Returns the (open) matplotlib figure."""
    seq, sim = result["sequential"], result["simultaneous"]
    diff = result["data"]["difficulty"]
    fig, axes = common.subplots(2, 2, figsize=(12, 8.5))
    (ax_pos, ax_loss), (ax_bucket, ax_hist) = axes

    def nan(xs: list) -> list[float]:  # None (no token there) -> a gap in the line
        return [float("nan") if v is None else v for v in xs]

    # one colour per bucket in panels (a) and (d); empty buckets are left out of both
    for i, row in enumerate(seq["buckets"]):
        if row["tokens"]:
            ys = nan(row["per_position"]["mean"])
            ax_pos.plot(range(len(ys)), ys, color=f"C{i}", lw=1, label=f"{diff} {row['name']}")
    ys = nan(seq["per_position"]["mean"])
    ax_pos.plot(range(len(ys)), ys, color="black", lw=2, label="all")
    ax_pos.set_xlabel("position in the sequence")
    ax_pos.set_ylabel("solver iterations per token (mean)")
    ax_pos.set_title("(a) iterations vs position (sequential)")
    ax_pos.legend(fontsize=7, loc="best")

    if scatter is not None and scatter[0]:
        ax_loss.scatter(scatter[0], scatter[1], s=4, alpha=0.15, color="tab:blue", label="tokens")
    bins = seq["iters_by_loss"]
    ax_loss.plot(
        [b["loss"] for b in bins], [b["iters"] for b in bins], "o-", color="tab:red",
        label="mean per loss decile",
    )  # fmt: skip
    rho = seq["spearman_iters_loss"]
    ax_loss.set_title(
        "(b) iterations vs token loss, Spearman " + ("undefined" if rho is None else f"{rho:.3f}")
    )
    ax_loss.set_xlabel("token cross-entropy")
    ax_loss.set_ylabel("solver iterations")
    ax_loss.legend(fontsize=7, loc="best")

    names = [r["name"] for r in seq["buckets"]]
    xs = list(range(len(names)))
    means = nan([r["iters_mean"] for r in seq["buckets"]])
    bars = ax_bucket.bar(xs, means, color="tab:blue", alpha=0.7, label="per token (sequential)")
    for bar, row in zip(bars, seq["buckets"]):
        if row["accuracy"] is not None:
            ax_bucket.annotate(
                f"acc {row['accuracy']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=7,
            )  # fmt: skip
    ax_bucket.set_xticks(xs)
    ax_bucket.set_xticklabels(names)
    ax_bucket.set_xlabel(diff)
    ax_bucket.set_ylabel("iterations per token (mean)")
    ax_bucket.set_title("(c) iterations per difficulty bucket")
    handles, labels = ax_bucket.get_legend_handles_labels()
    top = max((v for v in means if v == v), default=1.0)
    ax_bucket.set_ylim(0, 1.35 * top)  # headroom for the legend and the accuracy labels
    if sim is not None:
        twin = ax_bucket.twinx()
        sim_means = nan([r["iters_mean"] for r in sim["buckets"]])
        twin.plot(xs, sim_means, "s--", color="tab:orange", label="per sample (simultaneous)")
        twin.set_ylim(0, 1.35 * max((v for v in sim_means if v == v), default=1.0))
        twin.set_ylabel("iterations per sample (mean)", color="tab:orange")
        more_h, more_l = twin.get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    ax_bucket.legend(handles, labels, fontsize=7, loc="upper left")

    for i, row in enumerate(seq["buckets"]):
        counts = row["histogram"]
        total = sum(counts)
        if total:
            ax_hist.step(
                range(len(counts)), [c / total for c in counts], where="mid", color=f"C{i}",
                label=f"{diff} {row['name']}",
            )  # fmt: skip
    ax_hist.set_xlabel("solver iterations of a token")
    ax_hist.set_ylabel("fraction of tokens")
    ax_hist.set_title("(d) iteration histograms per bucket")
    ax_hist.legend(fontsize=7, loc="best")

    m = result["model"]
    kind = "implicit" if m["implicit"] else "explicit"
    fig.suptitle(
        f"adaptive compute: {kind} {m['arch']}, {m['n_layers']} layer(s), {_source(result)}"
    )
    fig.tight_layout()
    return fig


def _source(result: dict[str, Any]) -> str:
    d = result["data"]
    if d["source"] == "catbabi":
        return f"CatbAbI {d['split']}, windows of {d['length']}"
    return f"{d['group']} word problem, length {d['length']}"


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def show(result: dict[str, Any]) -> None:
    """Print the result as a few lines and a table of the difficulty buckets."""
    m, seq, sim = result["model"], result["sequential"], result["simultaneous"]
    kind = "implicit" if m["implicit"] else "explicit"
    print(
        f"adaptive compute of {kind} {m['arch']} ({m['n_layers']} layer(s), d_model "
        f"{m['d_model']}) on {_source(result)}"
    )
    if result["note"]:
        print(f"note: {result['note']}")
    print(
        f"sequential: {seq['tokens']} tokens, iterations mean {_fmt(seq['iters_mean'])} max "
        f"{seq['iters_max']} (cap {seq['cap']}), Spearman(iterations, loss) "
        f"{_fmt(seq['spearman_iters_loss'], '.3f')}"
    )
    if sim is not None:
        print(
            f"simultaneous: {sim['samples']} samples, iterations mean {_fmt(sim['iters_mean'])} "
            f"max {sim['iters_max']} (cap {sim['cap']})"
        )
    head = (
        f"{result['data']['difficulty']:>20}  {'tokens':>7}  {'iters':>6}  {'loss':>6}  {'acc':>5}"
    )
    if sim is not None:
        head += f"  {'sim iters':>9}  {'sim acc':>7}"
    print(head)
    for i, row in enumerate(seq["buckets"]):
        line = (
            f"{row['name']:>20}  {row['tokens']:>7}  {_fmt(row['iters_mean']):>6}  "
            f"{_fmt(row['loss_mean']):>6}  {_fmt(row['accuracy']):>5}"
        )
        if sim is not None:
            s = sim["buckets"][i]
            line += f"  {_fmt(s['iters_mean']):>9}  {_fmt(s['accuracy']):>7}"
        print(line)
    if "hard" in seq:
        print(
            f"hard tokens: iterations {_fmt(seq['hard']['iters_mean'])} ({seq['hard']['tokens']}), "
            f"easy tokens: {_fmt(seq['easy']['iters_mean'])} ({seq['easy']['tokens']})"
        )
    if "answers" in seq:
        a = seq["answers"]
        print(
            f"answers: {a['tokens']}, iterations {_fmt(a['iters_mean'])}, accuracy "
            f"{_fmt(a['accuracy'])}, Spearman {_fmt(a['spearman_iters_loss'], '.3f')}"
        )
        for task, row in seq["per_task"].items():
            print(
                f"  task {int(task):2d}: iterations {_fmt(row['iters_mean'])}, accuracy "
                f"{_fmt(row['accuracy'])} ({row['scored']} answers)"
            )
    common.show_outputs(result)
