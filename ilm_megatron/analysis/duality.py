"""``ilm-eval duality``: simultaneous against sequential mode of an implicit model, and how their
agreement depends on the solver tolerance.

    ilm-eval duality --checkpoint RUN_OR_FILE [--data DIR] [--samples 8] [--length N]
        [--tols 1e-1,3e-2,1e-2,1e-3,1e-4] [--out DIR] [--json]

Simultaneous mode solves the fixed point of the whole sequence at once; sequential mode solves it
token by token with caches (the RNN view). At the exact fixed point both give the same logits; at
a finite tolerance they differ by what each solve left. For each tolerance (the evaluation
tolerance ``solver.eval_tol``, in a new solver config: the configs are immutable) this reports,
over every position of the inputs:

* ``agreement``: the fraction of positions whose greedy token (argmax over the real vocabulary)
  is the same in both modes (the paper reports 97.6% at 1.3B);
* ``kl_mean``: the mean of ``KL(p_sim || p_seq)`` (softmax over the real vocabulary, float64);
* ``max_abs_logit_diff`` over the real vocabulary;
* ``iters_simultaneous`` (per sample) and ``iters_sequential`` (per token), and the fraction of
  solves that met the tolerance in each mode.

Inputs: the checkpoint's own word problem by default (its stored ``data.group``), or text from a
shards folder (``--data``, read as in :mod:`ilm_megatron.analysis.ppl_by_position`). The pieces
that compare two outputs are shared with ``tools/check_duality.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

from ilm_megatron.analysis import common
from ilm_megatron.argtypes import comma_list, positive_int
from ilm_megatron.errors import UserError

if TYPE_CHECKING:
    import torch

    from ilm_megatron.models.lm import ImplicitLM, LMOutput

NAME = "duality"
HELP = "simultaneous vs sequential mode: greedy agreement, KL and iterations against f_tol"
DEFAULT_TOLS = (1e-1, 3e-2, 1e-2, 1e-3, 1e-4)


# --------------------------------------------------------------------------- comparisons


def run_modes(
    model: ImplicitLM,
    ids: torch.Tensor,
    sim_max_iter: int | None = None,
    seq_max_iter: int | None = None,
) -> tuple[LMOutput, LMOutput]:
    """Both modes on ``ids`` (b, l) without autograd: ``(model(ids), forward_sequential(ids))``.

    ``sim_max_iter`` caps the whole-sequence solve, ``seq_max_iter`` each token's solve (None: the
    configured eval cap).
    """
    import torch

    with torch.no_grad():
        sim = model(ids, max_iter=sim_max_iter)
        seq = model.forward_sequential(ids, max_iter=seq_max_iter)
    return sim, seq


def greedy_agreement(a: torch.Tensor, b: torch.Tensor, vocab: int) -> torch.Tensor:
    """Whether the greedy tokens agree: logits (..., padded_vocab) twice -> (...) bool, the argmax
    taken over the first ``vocab`` (real) entries."""
    return a[..., :vocab].argmax(-1) == b[..., :vocab].argmax(-1)


def kl_per_position(p_logits: torch.Tensor, q_logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """``KL(softmax(p) || softmax(q))`` over the real vocabulary, in float64.

    Args:
        p_logits, q_logits: (..., padded_vocab) logits; the first ``vocab`` entries are used.

    Returns:
        (...) float64, non-negative up to rounding.
    """
    import torch

    lp = torch.log_softmax(p_logits[..., :vocab].double(), dim=-1)
    lq = torch.log_softmax(q_logits[..., :vocab].double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, vocab: int | None = None) -> float:
    """``max |a - b|`` in float64, over the first ``vocab`` entries of the last dim (None: all)."""
    if vocab is not None:
        a, b = a[..., :vocab], b[..., :vocab]
    return (a.double() - b.double()).abs().max().item()


def measure(
    model: ImplicitLM,
    batches: list[torch.Tensor],
    tols: list[float],
    sim_cap: int,
    seq_cap: int,
) -> list[dict[str, Any]]:
    """Both modes at each evaluation tolerance in ``tols`` on every batch (b, l) of ``batches``.

    The model's solver config is replaced for each tolerance and restored afterwards.

    Returns:
        One row per tolerance (see the module docstring for the keys).
    """
    import torch

    base = model.solver_config
    vocab = model.config.vocab_size
    rows = []
    model.eval()
    try:
        for tol in tols:
            model.solver_config = dataclasses.replace(base, eval_tol=tol)
            agree = kl = positions = 0.0
            diff = 0.0
            it_sim, it_seq, conv_sim, conv_seq = [], [], [], []
            for ids in batches:
                sim, seq = run_modes(model, ids, sim_cap, seq_cap)
                agree += greedy_agreement(sim.logits, seq.logits, vocab).sum().item()
                kl += kl_per_position(sim.logits, seq.logits, vocab).sum().item()
                positions += ids.numel()
                diff = max(diff, max_abs_diff(sim.logits, seq.logits, vocab))
                it_sim.append(sim.stats.sample_iters.double().flatten().cpu())
                it_seq.append(seq.stats.sample_iters.double().flatten().cpu())
                conv_sim.append(sim.stats.converged.double().flatten().cpu())
                conv_seq.append(seq.stats.converged.double().flatten().cpu())
            s, q = torch.cat(it_sim), torch.cat(it_seq)
            rows.append(
                {
                    "tol": tol,
                    "agreement": agree / positions,
                    "kl_mean": kl / positions,
                    "max_abs_logit_diff": diff,
                    "iters_simultaneous": s.mean().item(),
                    "iters_simultaneous_max": s.max().item(),
                    "iters_sequential": q.mean().item(),
                    "iters_sequential_max": q.max().item(),
                    "converged_frac_simultaneous": torch.cat(conv_sim).mean().item(),
                    "converged_frac_sequential": torch.cat(conv_seq).mean().item(),
                }
            )
    finally:
        model.solver_config = base
    return rows


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``ilm-eval duality``."""
    common.add_checkpoint_argument(p)
    common.add_data_arguments(p, required=False, default="the checkpoint's own word problem")
    p.add_argument("--samples", type=positive_int, default=8, help="sequences (8)")
    p.add_argument(
        "--length", type=positive_int, default=None, help="tokens per sequence (training length)"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch (8)")
    p.add_argument(
        "--tols",
        type=comma_list(float, lambda v: v > 0, "positive numbers"),
        default=list(DEFAULT_TOLS),
        help="evaluation tolerances (default 1e-1,3e-2,1e-2,1e-3,1e-4)",
    )
    common.add_cap_arguments(p, "fixed solver cap of both modes (overrides the rule)")
    common.add_solver_argument(p)
    p.add_argument("--seed", type=int, default=1234, help="seed of the word problems (1234)")
    common.add_output_arguments(p, NAME)


def _inputs(
    args: argparse.Namespace, ckpt: common.Checkpoint, vocab: int
) -> tuple[torch.Tensor, str, int]:
    """``(ids (samples, length), description, length)`` from ``--data`` or the word problem."""
    if args.data is not None:
        from ilm_megatron.data.loader import load_manifest

        length = args.length or ckpt.train_length or load_manifest(args.data).seq_len
        tokens, manifest = common.assemble_sequences(
            args.data, length, args.samples, args.val_fraction
        )
        common.check_vocabulary(ckpt, vocab, manifest, tokens)
        return tokens[:, :-1], str(args.data), length
    group, train_len = common.word_problem_group(
        ckpt, vocab, hint="pass --data with a shards folder"
    )
    length = args.length or train_len or 16
    ids, _ = common.word_problems(group, args.samples, length, args.seed)
    return ids, f"{group} word problem", length


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure both modes at every tolerance; write the report when ``--out`` is set."""
    from ilm_megatron.analysis.report import write_report

    ckpt = common.resolve(args.checkpoint)
    model = common.load_checkpoint(ckpt, args.device, args.solver)
    if not model.implicit:
        raise UserError(
            f"{ckpt.path}: the model is explicit (model.implicit=false): both modes run the "
            "stack once, there is no fixed point to compare"
        )
    ids, data, length = _inputs(args, ckpt, model.config.vocab_size)
    device = next(model.parameters()).device
    batches = [b.to(device) for b in ids.split(args.batch_size)]
    seq_cap, sim_cap = common.solver_caps(model, length, args.cap_mult, args.max_iter)
    rows = measure(model, batches, args.tols, sim_cap, seq_cap)
    s = model.solver_config
    result = {
        "analysis": "duality",
        "checkpoint": str(ckpt.path),
        "arch": model.config.arch,
        "n_layers": model.config.n_layers,
        "d_model": model.config.d_model,
        "data": data,
        "samples": int(ids.shape[0]),
        "length": length,
        "eval_solver": s.eval_solver,
        "seq_warm_start": s.seq_warm_start,
        "method": s.method,
        "early_exit": s.early_exit,
        "solver_overrides": list(args.solver),
        "solver": common.solver_in_force(model, args.solver),
        "cap_simultaneous": sim_cap,
        "cap_sequential": seq_cap,
        "rows": rows,
    }
    figures = {NAME: plot(result)} if args.out else {}
    return write_report(args.out, NAME, result, figures)


def plot(result: dict[str, Any]) -> Any:
    """Three panels against the tolerance (log x): greedy agreement, mean KL, solver iterations
    of each mode. Returns the (open) matplotlib figure."""
    rows = sorted(result["rows"], key=lambda r: r["tol"])
    tols = [r["tol"] for r in rows]
    fig, (ax_a, ax_kl, ax_it) = common.subplots(1, 3, figsize=(13, 4))
    ax_a.plot(tols, [r["agreement"] for r in rows], marker="o")
    ax_a.set_ylabel("greedy-token agreement")
    kls = [r["kl_mean"] for r in rows]
    ax_kl.plot(tols, kls, marker="o", color="C1")
    if all(k > 0 for k in kls):  # a log axis cannot show an exact zero
        ax_kl.set_yscale("log")
    ax_kl.set_ylabel("mean KL(simultaneous || sequential)")
    ax_it.plot(tols, [r["iters_simultaneous"] for r in rows], marker="o", label="simultaneous")
    ax_it.plot(tols, [r["iters_sequential"] for r in rows], marker="o", label="sequential")
    ax_it.set_ylabel("solver iterations (per sample / per token)")
    ax_it.legend(loc="best", fontsize=8)
    for ax in (ax_a, ax_kl, ax_it):
        ax.set_xscale("log")
        ax.set_xlabel("solver tolerance (eval_tol)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{result['arch']}: {result['data']}, {result['samples']} x {result['length']} "
                 "tokens")  # fmt: skip
    fig.tight_layout()
    return fig


def show(result: dict[str, Any]) -> None:
    """A table: one row per tolerance."""
    print(
        f"duality of {result['checkpoint']} ({result['arch']}): {result['data']}, "
        f"{result['samples']} sequences of {result['length']} tokens, caps "
        f"{result['cap_simultaneous']} (simultaneous) / {result['cap_sequential']} (per token)"
    )
    cols = ("tol", "agreement", "kl_mean", "max|dlogit|", "iters sim", "iters seq", "conv sim",
            "conv seq")  # fmt: skip
    print("  ".join(f"{c:>11}" for c in cols))
    for r in result["rows"]:
        cells = (
            f"{r['tol']:>11.0e}",
            f"{r['agreement']:>11.4f}",
            f"{r['kl_mean']:>11.3e}",
            f"{r['max_abs_logit_diff']:>11.3e}",
            f"{r['iters_simultaneous']:>11.1f}",
            f"{r['iters_sequential']:>11.2f}",
            f"{r['converged_frac_simultaneous']:>11.3f}",
            f"{r['converged_frac_sequential']:>11.3f}",
        )
        print("  ".join(cells))
    common.show_outputs(result)
