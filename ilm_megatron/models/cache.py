"""Per-layer inference caches for sequential (RNN) mode.

A layer's ``step`` reads its cache without modifying it and returns an *update*; the sequential
solver calls the layer many times per token (the inner fixed-point loop) and commits the update of
the final call only, so a cache is written exactly once per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mamba2Cache:
    """Mamba2 recurrent state.

    Attributes:
        conv: (b, conv_dim, d_conv - 1) the last ``d_conv - 1`` pre-convolution xBC inputs.
        ssm: (b, nheads, headdim, d_state) SSM state, at least fp32.
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    def commit(self, update: Mamba2Cache) -> None:
        self.conv = update.conv
        self.ssm = update.ssm


class KVCache:
    """Attention key/value cache with amortised growth.

    Keys/values are stored as (b, heads, capacity, head_dim); ``length`` positions are valid.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int | None = None) -> None:
        self.k = k
        self.v = v
        self.length = k.shape[2] if length is None else length

    @classmethod
    def empty(
        cls, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        z = torch.zeros(batch, heads, 16, head_dim, device=device, dtype=dtype)
        return cls(z, z.clone(), 0)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid keys and values, each (b, heads, length, head_dim)."""
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def _reserve(self) -> None:
        """Make room for one more position (capacity doubles, amortised O(1))."""
        if self.length == self.k.shape[2]:
            grow = max(16, self.length)
            pad = self.k.new_zeros(*self.k.shape[:2], grow, self.k.shape[3])
            self.k = torch.cat([self.k, pad], dim=2)
            self.v = torch.cat([self.v, pad.clone()], dim=2)

    def with_candidate(
        self, k_t: torch.Tensor, v_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of positions ``0..length`` with the current token's candidate appended.

        The candidate goes into the free slot at ``length``, outside the valid range, so the
        cached positions are untouched and nothing is copied. Returns views (b, heads, length+1, e)
        that are valid until the next call.
        """
        self._reserve()
        self.k[:, :, self.length : self.length + 1] = k_t
        self.v[:, :, self.length : self.length + 1] = v_t
        return self.k[:, :, : self.length + 1], self.v[:, :, : self.length + 1]

    def commit(self, update: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Append one position; ``update`` = (k_t, v_t), each (b, heads, 1, head_dim)."""
        k_t, v_t = update
        self._reserve()
        self.k[:, :, self.length : self.length + 1] = k_t
        self.v[:, :, self.length : self.length + 1] = v_t
        self.length += 1
