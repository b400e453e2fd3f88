"""PyTorch reference RMS norms: plain and Mamba2's gated variant.

Both compute in at least float32 and return in the dtype of ``x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dtype import compute_dtype as _compute_dtype

__all__ = ["gated_rms_norm", "rms_norm"]


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMS normalisation over the last dimension.

    ``y = x / sqrt(mean(x**2, -1) + eps) * weight``.

    Args:
        x: (..., d) inputs.
        weight: (d,) scale.
        eps: added to the mean square.

    Returns:
        (..., d) in ``x.dtype``.
    """
    dtype = _compute_dtype(x, weight)
    # 1. Compute dtype.
    xf = x.to(dtype)
    # 2. Normalise by the root mean square, then scale.
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(dtype)).to(x.dtype)


def gated_rms_norm(
    x: Tensor,
    gate: Tensor,
    weight: Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
) -> Tensor:
    """Mamba2's ``RMSNormGated`` with ``norm_before_gate=False``.

    ``y = rmsnorm_per_group(x * silu(gate)) * weight``, where the RMS is taken over
    consecutive groups of ``group_size`` channels of the last dimension.

    Args:
        x: (..., d) inputs.
        gate: (..., d) gate (SiLU is applied here).
        weight: (d,) scale.
        eps: added to the mean square.
        group_size: channels per normalisation group; must divide d. None = d (one group).

    Returns:
        (..., d) in ``x.dtype``.
    """
    d = x.shape[-1]
    if group_size is None:
        group_size = d
    if group_size <= 0 or d % group_size != 0:
        raise ValueError(f"group_size ({group_size}) must divide the last dimension ({d})")
    dtype = _compute_dtype(x, gate, weight)

    # 1. Gate first (norm_before_gate=False).
    xg = x.to(dtype) * F.silu(gate.to(dtype))
    # 2. Split the last dimension into groups: (..., d) -> (..., d // group_size, group_size).
    xg = xg.reshape(*xg.shape[:-1], d // group_size, group_size)
    # 3. Normalise each group by its root mean square.
    rstd = torch.rsqrt(xg.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (xg * rstd).reshape(*x.shape[:-1], d)
    # 4. Scale by the (full-width) weight.
    return (y * weight.to(dtype)).to(x.dtype)
