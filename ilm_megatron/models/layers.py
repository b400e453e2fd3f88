"""Local (pure PyTorch) building blocks used by the layer specs.

Each class takes the :class:`~ilm_megatron.config.ModelConfig` as ``config`` so that a spec can swap
it for a tensor-parallel or fused implementation with the same constructor arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ilm_kernels import gated_rms_norm_op, rms_norm_op
from ilm_megatron.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable gain, computed in fp32. x: (..., hidden)."""

    def __init__(self, hidden: int, *, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.kernel_backend = config.kernel_backend
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_op(x, self.weight, self.eps, backend=self.kernel_backend)


class GatedRMSNorm(nn.Module):
    """Mamba2's ``RMSNormGated``: ``norm(x * silu(gate)) * weight`` over groups of channels."""

    def __init__(self, hidden: int, *, config: ModelConfig, group_size: int | None = None) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.group_size = group_size
        self.kernel_backend = config.kernel_backend
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm_op(
            x, gate, self.weight, self.eps, self.group_size, backend=self.kernel_backend
        )


class Linear(nn.Linear):
    """``nn.Linear`` with the spec constructor signature.

    ``init_std > 0`` draws weights from N(0, init_std); ``init_std = 0`` keeps PyTorch's default
    (Kaiming-uniform, as mamba-ssm does). Biases start at zero. ``partition_sizes`` (the packed
    output components) only matters to the tensor-parallel layers and is ignored here.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelConfig,
        bias: bool = False,
        init_std: float = 0.0,
        partition_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__(input_size, output_size, bias=bias)
        if init_std > 0:
            nn.init.normal_(self.weight, std=init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class DepthwiseConv1d(nn.Conv1d):
    """Causal depthwise conv parameters (weight (c, 1, w), bias (c,)); the math lives in kernels."""

    def __init__(self, channels: int, width: int, *, config: ModelConfig) -> None:
        super().__init__(channels, channels, width, groups=channels, padding=width - 1, bias=True)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for integer ``positions`` (l,): returns cos, sin of shape (l, head_dim)."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    )
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: (b, heads, l, head_dim); cos/sin: (l, head_dim)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """``softplus^{-1}(x) = log(expm1(x))`` for x > 0."""
    return x + torch.log(-torch.expm1(-x))


def init_dt_bias(nheads: int, config: ModelConfig, generator: torch.Generator | None = None):
    """Mamba2's dt bias: softplus(dt_bias) ~ log-uniform in [dt_min, dt_max]. Returns (nheads,)."""
    u = torch.rand(nheads, generator=generator)
    dt = torch.exp(
        u * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min)
    )
    dt = dt.clamp(min=config.dt_init_floor)
    return inverse_softplus(dt)
