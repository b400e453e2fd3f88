"""Implicit Llama attention and SwiGLU MLP (DESIGN §1).

Attention adds the injection to the packed ``[q, k, v]`` projection before RoPE
(``q, k, v = W_{q,k,v} h + chunk(u, 3)``), then causal scaled-dot-product attention. The MLP has no
injection. ``u = None`` gives the explicit Llama layer.

Shapes: b batch, l length, d d_model, a attention heads, e head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from ilm_kernels.backend import optional_import
from ilm_megatron.config import ModelConfig
from ilm_megatron.core.parallel_state import model_tp_size
from ilm_megatron.core.tensor_parallel import set_tp_layout
from ilm_megatron.models.cache import KVCache
from ilm_megatron.models.layers import apply_rope, rope_cos_sin


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_backend: str = "auto"
) -> torch.Tensor:
    """Causal attention, q/k/v (b, a, l, e) -> (b, a, l, e).

    flash-attn on CUDA half-precision tensors (head dim <= 256, a multiple of 8) when it is
    installed and imports, and ``kernel_backend`` is "auto" or "triton"; PyTorch's
    scaled_dot_product_attention everywhere else.
    """
    if (
        kernel_backend in ("auto", "triton")
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
    ):
        # GPU-only dependency, imported once; an installed but broken build warns and falls back.
        flash_attn_func = optional_import("flash_attn", "flash_attn_func")
        if flash_attn_func is not None:
            o = flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True
            )
            return o.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def prefix_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int
) -> torch.Tensor:
    """Causal attention after a cached prefix: q (b, a, l, e), k/v (b, a, prefix + l, e) ->
    (b, a, l, e); query ``i`` sees the ``prefix`` keys and window keys ``<= i``.

    PyTorch's ``is_causal`` aligns the mask top-left when ``l != prefix + l``, so the mask is
    explicit (no flash-attn path: the prefix case is state carried across windows).
    """
    l, s = q.shape[2], k.shape[2]
    mask = torch.ones(l, s, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@dataclass
class SelfAttentionSubmodules:
    qkv_proj: ModuleSpec | type
    out_proj: ModuleSpec | type


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with RoPE and an optional injection."""

    def __init__(
        self, config: ModelConfig, submodules: SelfAttentionSubmodules, layer_number: int = 1
    ) -> None:
        super().__init__()
        tp = model_tp_size(config)
        if config.n_heads % tp:
            raise ValueError(
                f"tensor parallel size {tp} must divide attention heads n_heads={config.n_heads}"
            )
        self.tp = tp
        self.d_model = config.d_model
        self.n_heads = config.n_heads // tp  # this rank's heads (all of them when tp = 1)
        self.head_dim = config.d_model // config.n_heads
        self.d_local = self.n_heads * self.head_dim
        self.theta = config.rope_theta
        self.kernel_backend = config.kernel_backend
        d = self.d_model
        self.qkv_proj = build_module(
            submodules.qkv_proj, d, 3 * d, config=config, partition_sizes=(d, d, d)
        )
        self.out_proj = build_module(submodules.out_proj, d, d, config=config, partition_sizes=(d,))
        set_tp_layout(self.qkv_proj.weight, 0, (d, d, d))
        set_tp_layout(self.out_proj.weight, 1, (d,))

    @property
    def injection_size(self) -> int:
        """Global width of the injection (packed q, k, v)."""
        return 3 * self.d_model

    @property
    def injection_parts(self) -> tuple[int, ...]:
        """Global sizes of the injection's packed components ``[q, k, v]``."""
        return (self.d_model, self.d_model, self.d_model)

    def _qkv(
        self,
        h: torch.Tensor,
        u: torch.Tensor | None,
        positions: torch.Tensor | None,
        offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: (b, l, d), u: (b, l, 3d / tp) -> q, k, v each (b, a/tp, l, e), RoPE on q and k at
        ``positions`` (default ``offset..offset+l-1``; sequence parallel: h holds l / tp
        positions, q all l)."""
        qkv = self.qkv_proj(h)
        b, l, _ = qkv.shape
        if positions is None:
            positions = offset + torch.arange(l, device=qkv.device)
        if u is not None:
            qkv = qkv + u
        q, k, v = (
            t.view(b, l, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, -1)
        )
        cos, sin = rope_cos_sin(positions, self.head_dim, self.theta, q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self,
        h: torch.Tensor,
        u: torch.Tensor | None = None,
        return_cache: bool = False,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """h: (b, l, d), u: (b, l, 3d) or None -> (out (b, l, d), KV cache of all positions).

        ``cache``: keys/values of the positions before this window (read only), an attention
        prefix: the window's positions continue at ``cache.next_position`` and every query also
        sees the whole prefix. The returned cache holds prefix and window.
        """
        q, k, v = self._qkv(h, u, None, 0 if cache is None else cache.next_position)
        b, l = q.shape[0], q.shape[2]
        if cache is not None and cache.length:
            pk, pv = cache.view()
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
            o = prefix_causal_attention(q, k, v, cache.length)
        else:
            o = causal_attention(q, k, v, self.kernel_backend)
        out = self.out_proj(o.transpose(1, 2).reshape(b, l, self.d_local))
        start = 0 if cache is None else cache.start
        return out, (KVCache(k, v, start=start) if return_cache else None)

    def step(
        self, h: torch.Tensor, u: torch.Tensor | None, cache: KVCache
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One token at position ``cache.next_position``; reads ``cache`` without modifying it.

        Args:
            h: (b, d); u: (b, 3d) or None.

        Returns:
            ``(out (b, d), (k_t, v_t))`` with k_t, v_t (b, a, 1, e) to commit.
        """
        b = h.shape[0]
        pos = torch.tensor([cache.next_position], device=h.device)
        q, k_t, v_t = self._qkv(h[:, None], None if u is None else u[:, None], pos)
        k, v = cache.with_candidate(k_t, v_t)  # positions < length stay as committed
        o = F.scaled_dot_product_attention(q, k, v)  # the single query sees every key
        return self.out_proj(o.reshape(b, self.d_local)), (k_t, v_t)

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache.empty(batch, self.n_heads, self.head_dim, device, dtype)


@dataclass
class SwiGLUSubmodules:
    fc1: ModuleSpec | type  # packed [gate, up]
    fc2: ModuleSpec | type


class SwiGLU(nn.Module):
    """``fc2(silu(gate) * up)`` with ``[gate, up] = fc1(h)``. h: (..., d) -> (..., d)."""

    def __init__(self, config: ModelConfig, submodules: SwiGLUSubmodules, layer_number: int = 1):
        super().__init__()
        h = config.ffn_size
        self.hidden = h
        self.fc1 = build_module(
            submodules.fc1, config.d_model, 2 * h, config=config, partition_sizes=(h, h)
        )
        self.fc2 = build_module(
            submodules.fc2, h, config.d_model, config=config, partition_sizes=(h,)
        )
        set_tp_layout(self.fc1.weight, 0, (h, h))
        set_tp_layout(self.fc2.weight, 1, (h,))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., d) -> (..., d); under TP fc1 yields this rank's (gate, up) share."""
        gate, up = self.fc1(h).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * up)
