"""Per-layer recurrent caches: sequential (RNN) mode and state carried across windows.

A layer's ``step`` reads its cache without modifying it and returns an *update*; the sequential
solver calls the layer many times per token (the inner fixed-point loop) and commits the update of
the final call only, so a cache is written exactly once per token. The simultaneous forward reads
a cache the same way (the state before its window, for every evaluation of ``F``) and its final
call returns a new one (the state after the window).

Caches become plain dicts of tensors (:func:`caches_to_state` / :func:`caches_from_state`) so a
training checkpoint loads them with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

    def rows(self, idx: torch.Tensor | slice) -> Mamba2Cache:
        """The cache of the samples ``idx`` (per-sample early exit, micro-batches)."""
        return Mamba2Cache(self.conv[idx], self.ssm[idx])

    def detach(self) -> Mamba2Cache:
        return Mamba2Cache(self.conv.detach(), self.ssm.detach())

    def to_state(self) -> dict[str, Any]:
        return {"kind": "mamba2", "conv": self.conv, "ssm": self.ssm}


class KVCache:
    """Attention key/value cache with amortised growth.

    Keys/values are stored as (b, heads, capacity, head_dim); ``length`` positions are valid.
    ``start`` is the absolute position of the first stored key (non-zero once
    :meth:`keep_last` dropped older positions): the next token is at ``start + length``, the
    position RoPE rotates it to, so the kept keys keep their offsets to it.
    """

    def __init__(
        self, k: torch.Tensor, v: torch.Tensor, length: int | None = None, start: int = 0
    ) -> None:
        self.k = k
        self.v = v
        self.length = k.shape[2] if length is None else length
        self.start = start

    @property
    def next_position(self) -> int:
        """Absolute position of the token after the cached ones."""
        return self.start + self.length

    def rows(self, idx: torch.Tensor | slice) -> KVCache:
        """The cache of the samples ``idx`` (valid positions only)."""
        k, v = self.view()
        return KVCache(k[idx], v[idx], self.length, self.start)

    def detach(self) -> KVCache:
        k, v = self.view()
        return KVCache(k.detach(), v.detach(), self.length, self.start)

    def keep_last(self, n: int) -> KVCache:
        """At most the last ``n`` positions (a bounded attention prefix); ``start`` moves on."""
        if self.length <= n:
            return self
        k, v = self.view()
        drop = self.length - n
        return KVCache(k[:, :, drop:].clone(), v[:, :, drop:].clone(), n, self.start + drop)

    def to_state(self) -> dict[str, Any]:
        k, v = self.view()
        return {"kind": "kv", "k": k, "v": v, "start": self.start}

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


Cache = Mamba2Cache | KVCache


def caches_to_state(caches: Sequence[Cache]) -> list[dict[str, Any]]:
    """Per-layer caches as plain dicts of tensors (for a checkpoint)."""
    return [c.to_state() for c in caches]


def caches_from_state(state: Sequence[dict[str, Any]]) -> list[Cache]:
    """Inverse of :func:`caches_to_state`."""
    out: list[Cache] = []
    for s in state:
        if s["kind"] == "mamba2":
            out.append(Mamba2Cache(s["conv"], s["ssm"]))
        elif s["kind"] == "kv":
            out.append(KVCache(s["k"], s["v"], s["k"].shape[2], int(s["start"])))
        else:
            raise ValueError(f"unknown cache kind {s['kind']!r}")
    return out
