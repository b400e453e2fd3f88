"""Where training metrics go: console, ``metrics.jsonl`` and TensorBoard (rank 0 only).

TensorBoard tags are stable: ``train/loss``, ``train/acc``, ``train/lr``, ``train/grad_norm``,
``perf/tokens_per_s``, ``perf/mem_gb``, ``perf/model_tflops``, ``perf/mfu`` (on
known accelerators), ``solver/iters_mean``, ``solver/iters_max``,
``solver/residual_mean``, ``solver/residual_max``, ``solver/converged_frac``, ``solver/phase``,
``solver/unconverged_steps``, ``solver/restarts`` (Anderson or divergence detection),
``solver/evaluated_frac`` (early exit), ``train/nan_skipped``, ``val/loss``, ``val/acc``,
``val/iters_mean``;
the histogram ``solver/iters_per_sample``; the resolved config as text under ``config``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TB_TAGS = {
    "loss": "train/loss",
    "acc": "train/acc",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "mem_gb": "perf/mem_gb",
    "model_tflops": "perf/model_tflops",
    "mfu": "perf/mfu",
    "iters_mean": "solver/iters_mean",
    "iters_max": "solver/iters_max",
    "residual_mean": "solver/residual_mean",
    "residual_max": "solver/residual_max",
    "converged_frac": "solver/converged_frac",
    "restarts": "solver/restarts",  # Anderson restarts and divergence fallbacks
    "evaluated_frac": "solver/evaluated_frac",  # < 1 when early exit left samples out
    "phase": "solver/phase",
    "f_max_iter": "solver/f_max_iter",  # the settings in force at the logged step
    "phantom_steps": "solver/phantom_steps",
    "unconverged_steps": "solver/unconverged_steps",
    "nan_skipped": "train/nan_skipped",
    "val_loss": "val/loss",
    "val_acc_all": "val/acc",
    "val_iters_mean": "val/iters_mean",
}


# Dense bf16 peak TFLOP/s of common accelerators, by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def peak_tflops(device: torch.device, configured: float = 0.0) -> float:
    """The accelerator's peak for MFU: ``train.peak_tflops`` if set, else a lookup; 0 if unknown."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def flops_per_token(model, cfg) -> TokenFlops:
    """Model FLOPs of one training token: ``per_token(iters, phantom_steps)``.

    With ``P_F``, ``P_inj`` the weight-matrix entries of the stack and of the injection, ``V`` the
    (padded) vocabulary, ``d`` the width, ``l`` the sequence length and ``L`` the layers, one
    forward per token costs

    * stack ``F``: ``f = 2 P_F + A``, with ``A = 4 L l d`` the attention score and value FLOPs
      for Llama (0 for Mamba2),
    * injection (norm + linear): ``2 P_inj``; head: ``2 V d``; embedding lookup: 0,

    and a training step, forward + backward (= 3 forwards),

    * explicit: ``3 (f + 2 V d)``,
    * implicit: ``3 (2 P_inj) + iters f + 3 k f + 3 (2 V d)``: the injection and the head run once
      per step, each of the ``iters`` no-grad solver iterations is one forward of ``F``, each of
      the ``k`` phantom steps a forward and its backward.

    Only matrix multiplications are counted: norms, biases, activations, Mamba2's depthwise
    convolution and SSD scan, and the recomputation of ``solver.phantom_impl=recompute`` are not.
    ``k`` is an argument because the curriculum changes it per phase (bounded: 1, free: 4).
    """
    c = cfg.model
    p_stack = p_inj = 0
    for name, p in model.named_parameters():
        # weight matrices only: not norm gains, biases, conv filters, weight-norm gains (original0)
        if p.dim() != 2 or name.endswith("original0"):
            continue
        if name.startswith("stack."):
            p_stack += p.numel()
        elif name.startswith("injection."):
            p_inj += p.numel()
    attn = 4 * c.n_layers * cfg.data.seq_len * c.d_model if c.arch == "llama" else 0
    return TokenFlops(
        stack=2.0 * p_stack + attn,
        injection=2.0 * p_inj,
        head=2.0 * c.padded_vocab_size * c.d_model,  # tied or not, one (d x V) matrix per token
        implicit=c.implicit,
        default_phantom_steps=cfg.solver.phantom_steps,
    )


@dataclass(frozen=True)
class TokenFlops:
    """Forward FLOPs per token of each part; called as ``per_token(iters, phantom_steps)``.

    ``default_phantom_steps`` is the config's ``solver.phantom_steps`` (the free phase's ``k``),
    for callers that do not know the phase.
    """

    stack: float
    injection: float
    head: float
    implicit: bool
    default_phantom_steps: int

    def __call__(self, iters: float, phantom_steps: int) -> float:
        """Training FLOPs per token: ``iters`` solver iterations, ``phantom_steps`` = k."""
        if not self.implicit:
            return 3.0 * (self.stack + self.head)
        return 3.0 * self.injection + (iters + 3.0 * phantom_steps) * self.stack + 3.0 * self.head


def memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _after_earlier_event_files(folder: Path) -> None:
    """Wait until this attempt's event file will sort after every earlier one.

    TensorBoard reads a run's event files in name order, and the name starts with the creation
    time in whole seconds; an attempt restarted within the same second as the one before would
    sort by pid and have its purge of the dead attempt's steps applied in the wrong order.
    """
    stamps = []
    for f in folder.glob("events.out.tfevents.*"):
        try:
            stamps.append(int(f.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class MetricsLogger:
    """Console lines, a JSON-lines file and TensorBoard event files for one run directory."""

    def __init__(
        self,
        run_dir: Path,
        quiet: bool,
        tensorboard: bool,
        config_text: str,
        total_steps: int,
        purge_step: int | None = None,
    ) -> None:
        """``purge_step``: the first step this attempt logs; TensorBoard hides events of that step
        and later that an earlier attempt wrote before it died (a resume from a checkpoint)."""
        self.path = run_dir / "metrics.jsonl"
        self.quiet = quiet
        self.bar = None
        if not quiet and sys.stdout.isatty():  # a progress bar for people, plain lines for logs
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _after_earlier_event_files(run_dir / "tensorboard")
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)
            self.tb.add_text("config", "```\n" + config_text + "\n```", 0)

    flops: Callable[[float, int], float] | None = None
    peak: float = 0.0
    phantom_steps: int | None = None

    def set_flops(
        self, flops: Callable[[float, int], float], peak: float, phantom_steps: int | None = None
    ) -> None:
        """Report ``model_tflops`` (and ``mfu`` when the peak is known) with every record.

        ``flops`` is :func:`flops_per_token`'s ``per_token(iters, phantom_steps)``;
        ``phantom_steps`` the ``k`` for records that carry none (default: ``flops``'s
        ``default_phantom_steps``, the config's value).
        """
        if phantom_steps is None:
            phantom_steps = getattr(flops, "default_phantom_steps", None)
        self.flops, self.peak, self.phantom_steps = flops, peak, phantom_steps

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def record(
        self,
        rec: dict[str, Any],
        iters_per_sample: torch.Tensor | None = None,
        phantom_steps: int | None = None,
    ) -> None:
        """Write one record; with :meth:`set_flops`, add ``model_tflops`` (and ``mfu``).

        The FLOPs use the solver iterations actually run, ``rec["iters"]`` (the no-grad solve
        evaluates ``F`` on the whole batch until its last sample converges), and the phase's
        phantom steps: ``phantom_steps`` if given, else ``rec["phantom_steps"]``, else the
        :meth:`set_flops` default (the config's ``solver.phantom_steps``).
        """
        if self.flops is not None and "tokens_per_s" in rec:
            k = phantom_steps if phantom_steps is not None else rec.get("phantom_steps")
            k = self.phantom_steps if k is None else k
            if k is None:
                raise ValueError("record: the phase's phantom_steps is unknown")
            # early exit evaluates F on fewer samples: the rows actually computed
            iters = rec.get("iters", rec.get("iters_mean", 1.0)) * rec.get("evaluated_frac", 1.0)
            rec["model_tflops"] = rec["tokens_per_s"] * self.flops(iters, int(k)) / 1e12
            if self.peak > 0:
                rec["mfu"] = rec["model_tflops"] / self.peak
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            step = int(rec["step"])
            for key, tag in TB_TAGS.items():
                if key in rec:
                    self.tb.add_scalar(tag, float(rec[key]), step)
            if iters_per_sample is not None and iters_per_sample.numel():
                self.tb.add_histogram("solver/iters_per_sample", iters_per_sample.float(), step)
            self.tb.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
