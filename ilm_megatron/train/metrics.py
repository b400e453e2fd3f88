"""Where training metrics go: console, ``metrics.jsonl`` and TensorBoard (rank 0 only).

TensorBoard tags are stable: ``train/loss``, ``train/acc``, ``train/lr``, ``train/grad_norm``,
``perf/tokens_per_s``, ``perf/mem_gb``, ``perf/model_tflops``, ``perf/mfu`` (on
known accelerators), ``solver/iters_mean``, ``solver/iters_max``,
``solver/residual_mean``, ``solver/residual_max``, ``solver/converged_frac``, ``solver/phase``,
``solver/unconverged_steps``, ``train/nan_skipped``, ``val/loss``, ``val/acc``, ``val/iters_mean``;
the histogram ``solver/iters_per_sample``; the resolved config as text under ``config``.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
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
    "phase": "solver/phase",
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


def flops_per_token(model, cfg) -> Callable[[float], float]:
    """Model FLOPs per training token as a function of the mean solver iterations.

    With ``P`` the parameters applied per token (stack + injection + head) and ``A`` the
    attention score/value FLOPs per token and layer, one forward of the stack costs
    ``f = 2P + A``; an explicit training step costs ``3f`` (forward + backward), an implicit one
    ``(iters + 3k) f`` — every solver iteration is a forward without backward, every phantom step
    a forward with its backward.
    """
    c = cfg.model
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embedding"))
    n += c.padded_vocab_size * c.d_model  # the (tied) head is applied per token
    attn = 2 * 2 * c.n_layers * cfg.data.seq_len * c.d_model if c.arch == "llama" else 0
    fwd = 2.0 * n + attn

    def per_token(iters: float) -> float:
        if not c.implicit:
            return 3.0 * fwd
        return (iters + 3.0 * cfg.solver.phantom_steps) * fwd

    return per_token


def memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Console lines, a JSON-lines file and TensorBoard event files for one run directory."""

    def __init__(
        self, run_dir: Path, quiet: bool, tensorboard: bool, config_text: str, total_steps: int
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.quiet = quiet
        self.bar = None
        if not quiet and sys.stdout.isatty():  # a progress bar for people, plain lines for logs
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.tb.add_text("config", "```\n" + config_text + "\n```", 0)

    flops: Callable[[float], float] | None = None
    peak: float = 0.0

    def set_flops(self, flops: Callable[[float], float], peak: float) -> None:
        """Report ``model_tflops`` (and ``mfu`` when the peak is known) with every record."""
        self.flops, self.peak = flops, peak

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

    def record(self, rec: dict[str, Any], iters_per_sample: torch.Tensor | None = None) -> None:
        if self.flops is not None and "tokens_per_s" in rec:
            # model FLOPs counted with the solver iterations actually run
            rec["model_tflops"] = (
                rec["tokens_per_s"] * self.flops(rec.get("iters_mean", 1.0)) / 1e12
            )
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
