"""Length-generalisation evaluation on word problems (state tracking).

A model trained on word problems of length ``L`` is evaluated at longer lengths. The target at
position ``t`` is the running product of ``x_1..x_t`` (``data/word_problem.py``), so the last
positions of a long sequence are the hard ones: ``acc_last10`` is the accuracy over the last ten
positions, ``acc_all`` over all of them.

In simultaneous mode the fixed-point solve propagates the state about one position per
iteration or two, so it needs roughly ``2 * length`` iterations: the cap used here is
``max(configured eval cap, ceil(cap_mult * length))``. In sequential mode (token by token) each
token has the configured eval cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ilm_megatron.data.word_problem import group_order, sample_word_problem
from ilm_megatron.models.lm import ImplicitLM

MODES = ("simultaneous", "sequential")


@dataclass
class EvalSpec:
    """What to evaluate: the word problem and how many samples at each length."""

    group: str
    batches: int = 4
    batch_size: int = 64
    seed: int = 1234
    easy_frac: float = 0.0
    mode: str = "simultaneous"
    cap_mult: float = 2.5  # simultaneous cap = max(configured, ceil(cap_mult * length))
    max_iter: int = 0  # > 0: use this cap at every length instead


def eval_cap(model: ImplicitLM, length: int, cap_mult: float, max_iter: int = 0) -> int:
    """Solver cap at ``length`` in simultaneous mode (see the module docstring)."""
    if max_iter > 0:
        return max_iter
    return max(model.eval_max_iter(), math.ceil(cap_mult * length))


@torch.no_grad()
def evaluate_length(model: ImplicitLM, spec: EvalSpec, length: int) -> dict[str, Any]:
    """Accuracy and adaptive-compute statistics of ``model`` on ``spec.group`` at ``length``.

    Returns:
        ``length``, ``acc_last10``, ``acc_all``, ``loss``, ``iters_mean``, ``iters_max`` (solver
        iterations per sample in simultaneous mode, per token in sequential mode; 1 for explicit
        models), ``converged_frac`` and the ``cap`` used.
    """
    if spec.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {spec.mode!r}")
    vocab = model.config.vocab_size
    n_sym = group_order(spec.group)
    if n_sym > vocab:
        raise ValueError(
            f"the model's vocabulary ({vocab}) is smaller than the {spec.group} word problem's "
            f"{n_sym} symbols: wrong --group for this checkpoint?"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(spec.seed + length)
    sequential = spec.mode == "sequential"
    cap = (
        (spec.max_iter or model.eval_max_iter())
        if sequential
        else eval_cap(model, length, spec.cap_mult, spec.max_iter)
    )
    correct = last = total = total_last = 0
    loss_sum = 0.0
    iters: list[torch.Tensor] = []
    conv: list[torch.Tensor] = []
    k = min(10, length)
    for _ in range(spec.batches):
        x, y = sample_word_problem(spec.group, spec.batch_size, length, gen, spec.easy_frac)
        x, y = x.to(device), y.to(device)
        out = model.forward_sequential(x, max_iter=cap) if sequential else model(x, max_iter=cap)
        logits = out.logits[..., :vocab].float()
        pred = logits.argmax(-1)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        correct += int((pred == y).sum())
        total += y.numel()
        last += int((pred[:, -k:] == y[:, -k:]).sum())
        total_last += y[:, -k:].numel()
        iters.append(out.stats.sample_iters.float().flatten().cpu())
        conv.append(out.stats.converged.float().flatten().cpu())
    model.train(was_training)
    it = torch.cat(iters)
    return {
        "length": length,
        "acc_last10": last / total_last,
        "acc_all": correct / total,
        "loss": loss_sum / spec.batches,
        "iters_mean": it.mean().item(),
        "iters_max": it.max().item(),
        "converged_frac": torch.cat(conv).mean().item(),
        "cap": cap,
    }


def evaluate_lengths(model: ImplicitLM, spec: EvalSpec, lengths: list[int]) -> list[dict[str, Any]]:
    """:func:`evaluate_length` at each of ``lengths``."""
    return [evaluate_length(model, spec, n) for n in lengths]


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """``(model.safetensors, run_dir or None)`` for a checkpoint file or a run directory.

    Accepts ``run_dir``, ``run_dir/model.safetensors``, or a training checkpoint folder
    ``run_dir/checkpoints/step-N`` (whose run directory is two levels up).

    Raises:
        FileNotFoundError: nothing loadable at ``path``; the message says what was looked for.
    """
    p = Path(path)
    if p.is_dir():
        f = p / "model.safetensors"
        if not f.is_file():
            raise FileNotFoundError(
                f"checkpoint not found: {p} is a folder without model.safetensors "
                "(pass a run directory written by ilm-train, or the .safetensors file)"
            )
    elif p.is_file():
        f = p
    else:
        raise FileNotFoundError(f"checkpoint not found: {p} does not exist")
    for cand in (f.parent, f.parent.parent.parent):
        if (cand / "config.yaml").is_file():
            return f, cand
    return f, None


def run_config_group(
    run_dir: Path | None, checkpoint: Path | None = None
) -> tuple[str | None, int | None]:
    """``(data.group, data.seq_len)`` of the run that wrote ``checkpoint`` (None when unknown).

    The config stored in the checkpoint itself rules (its safetensors metadata, or the
    ``config.yaml`` of its checkpoint folder); ``run_dir/config.yaml`` is the fallback for files
    written before configs were stored with the weights.
    """
    from omegaconf import OmegaConf

    from ilm_megatron.train.checkpoint import stored_config_text

    text = None
    if checkpoint is not None:
        try:
            text = stored_config_text(checkpoint)
        except Exception:  # not a safetensors file: load_model reports it
            text = None
        beside = Path(checkpoint).parent / "config.yaml"
        if text is None and beside.is_file() and beside.parent.name.startswith("step-"):
            text = beside.read_text()
    if text is None and run_dir is not None and (run_dir / "config.yaml").is_file():
        text = (run_dir / "config.yaml").read_text()
    if text is None:
        return None, None
    data = OmegaConf.create(text).get("data", {})
    if data.get("task", "word_problem") != "word_problem":
        return None, None
    return data.get("group"), data.get("seq_len")
