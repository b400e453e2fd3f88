"""Device and precision of a run (a leaf module: the loop, the engines and the launcher
helpers import it)."""

from __future__ import annotations

import torch

from ilm_megatron.config import Config


def resolve_device(name: str) -> torch.device:
    """``train.device`` ("auto" | "cpu" | "cuda") as a torch device; "auto" picks CUDA when
    available. Raises RuntimeError for "cuda" on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available on this machine")
    return torch.device(name)


def use_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether training steps run in bf16 (``train.precision``; ``auto``: on CUDA only)."""
    p = cfg.train.precision
    return p == "bf16" or (p == "auto" and device.type == "cuda")
