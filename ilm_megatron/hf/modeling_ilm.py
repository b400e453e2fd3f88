"""Implicit Mamba2 / Llama language models for ``transformers`` (exported by ilm-megatron).

This file is copied next to the weights by ``ilm-export`` and loaded with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. It needs only torch and
transformers: the layers below are plain PyTorch, and ``ilm_kernels`` (ilm-megatron's Triton /
mamba-ssm kernels) is used instead when it is installed and ``config.kernel_backend == "auto"``.
Parameter names equal ilm-megatron's single-process state dict, so the export is a copy.

```
e  = Embedding(ids)                      # (b, l, d)
u  = W_inj · RMSNorm_inj(e) + b_inj      # (b, l, injection width), once per forward
z* = F(z*, u)  from z0 = 0 (or e)        # F: the whole stack, iterated to a fixed point
logits = z* · Embedding^T                # tied head (or lm_head)
```
Explicit models (``config.implicit = False``) run ``F`` once on ``e`` without injection.

Modes, as in ilm-megatron's ``ImplicitLM``:

* ``model(ids)`` (no cache): the evaluation solve of the whole sequence (simultaneous mode);
  logits are the head of the best iterate. In ``train()`` mode with gradients enabled, the
  training solve plus ``phantom_steps`` damped steps with autograd (phantom gradient).
* ``model(ids, use_cache=True)``: the prefill of ``ImplicitLM.prefill``: the evaluation solve,
  then one more evaluation of ``F`` at the solution that returns every layer's cache; logits are
  the head of that evaluation.
* ``model(ids[:, -1:], cache=cache)``: sequential (RNN) mode, one token at a time: an inner
  fixed-point solve per token that reads the caches of the previous tokens, then one call at the
  solution that commits them (``ImplicitLM.step``). ``generate()`` uses this path.

Padding: ``attention_mask`` (b, l) with zeros on padded positions (left padding, as
``generate()`` uses). Padded positions are held at zero in the iterate, their inputs to the
Mamba2 convolution and scan are zeroed, and attention never reads their keys, so a real token
sees exactly what it would see without the padding. The solver's stop decision is still taken
over the whole batch (its largest residual), so samples of one batch take the same number of
iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_ilm import IlmConfig

try:  # ilm-megatron's kernels: the same numerics as training, Triton on CUDA
    import ilm_kernels as _kernels
except Exception:  # not installed (or broken): the PyTorch code below
    _kernels = None

EPS = 1e-9


def _use_kernels(config: IlmConfig) -> bool:
    return _kernels is not None and config.kernel_backend == "auto"


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ------------------------------------------------------------------------------------------
# PyTorch kernels (used when ilm_kernels is absent or kernel_backend == "torch")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., d) -> x / sqrt(mean(x²) + eps) * weight, computed in at least fp32."""
    xf = _upcast(x)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(xf.dtype)).to(x.dtype)


def _gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, group):
    """Mamba2's gated norm: rmsnorm over groups of ``group`` channels of x·silu(gate), · weight."""
    d = x.shape[-1]
    xg = _upcast(x) * F.silu(_upcast(gate))
    xg = xg.reshape(*xg.shape[:-1], d // group, group)
    y = (xg * torch.rsqrt(xg.pow(2).mean(dim=-1, keepdim=True) + eps)).reshape(*x.shape[:-1], d)
    return (y * weight.to(y.dtype)).to(x.dtype)


def _conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Causal depthwise conv + SiLU: x (b, l, c), weight (c, w) -> (y (b, l, c), window)."""
    b, l, c = x.shape
    w = weight.shape[-1]
    xt = _upcast(x).transpose(1, 2)
    full = torch.cat([xt.new_zeros(b, c, w - 1), xt], dim=-1)
    y = F.conv1d(full, weight.to(xt.dtype)[:, None, :], bias.to(xt.dtype), groups=c)
    return F.silu(y).transpose(1, 2).to(x.dtype), full[..., l:].to(x.dtype)


def _conv_silu_step(window: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias):
    """One token: window (b, c, w-1), x (b, c) -> (y (b, c), new window)."""
    full = torch.cat([_upcast(window), _upcast(x)[..., None]], dim=-1)
    y = (full * weight.to(full.dtype)).sum(dim=-1) + bias.to(full.dtype)
    return F.silu(y).to(x.dtype), full[..., 1:].to(window.dtype)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) -> (..., T, T): out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above."""
    T = a.shape[-1]
    rep = a[..., :, None].expand(*a.shape, T)
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(rep.masked_fill(~strict, 0.0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


def _ssd(x, dt, A, B, C, D, chunk: int):
    """Chunked SSD scan. x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), D (h,).

    Returns (y (b, l, h, p), final state (b, h, p, n)), computed in at least fp32.
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    out_dtype = x.dtype
    x, dt, A = _upcast(x), _upcast(dt), _upcast(A)
    B = _upcast(B).repeat_interleave(h // B.shape[-2], dim=-2)
    C = _upcast(C).repeat_interleave(h // C.shape[-2], dim=-2)
    chunk = max(1, min(chunk, l))
    pad = (-l) % chunk
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = (l + pad) // chunk
    x = x.reshape(b, c, chunk, h, p)
    dt = dt.reshape(b, c, chunk, h)
    B = B.reshape(b, c, chunk, h, n)
    C = C.reshape(b, c, chunk, h, n)
    dA = (dt * A).permute(0, 3, 1, 2)  # (b, h, c, L)
    cum = torch.cumsum(dA, dim=-1)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * torch.exp(_segsum(dA))
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, x * dt[..., None])
    to_end = torch.exp(cum[..., -1:] - cum)
    states = torch.einsum("bclhn,bhcl,bclh,bclhp->bchpn", B, to_end, dt, x)
    states = torch.cat([x.new_zeros(b, 1, h, p, n), states], dim=1)
    passing = torch.exp(_segsum(F.pad(cum[..., -1], (1, 0))))
    states = torch.einsum("bhzc,bchpn->bzhpn", passing, states)
    states, final = states[:, :-1], states[:, -1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(cum))
    y = (y_diag + y_off).reshape(b, c * chunk, h, p)[:, :l]
    y = y + D.to(y.dtype)[:, None] * x.reshape(b, c * chunk, h, p)[:, :l]
    return y.to(out_dtype), final


def _ssd_step(state, x, dt, A, B, C, D):
    """One token: state (b, h, p, n), x (b, h, p), dt (b, h), B/C (b, g, n) -> (y, new state)."""
    h = x.shape[1]
    s, xc, dtc = _upcast(state), _upcast(x), _upcast(dt)
    Bh = _upcast(B).repeat_interleave(h // B.shape[-2], dim=-2)
    Ch = _upcast(C).repeat_interleave(h // C.shape[-2], dim=-2)
    new = torch.exp(dtc * _upcast(A))[:, :, None, None] * s + torch.einsum(
        "bh,bhp,bhn->bhpn", dtc, xc, Bh
    )
    y = torch.einsum("bhpn,bhn->bhp", new, Ch) + D.to(xc.dtype)[:, None] * xc
    return y.to(x.dtype), new.to(state.dtype)


def _rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Rotary tables for integer positions (b, l): cos, sin (b, 1, l, head_dim)."""
    inv = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim
    )
    ang = positions.to(torch.float64)[..., None] * inv
    ang = torch.cat([ang, ang], dim=-1)[:, None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


# ------------------------------------------------------------------------------------------
# Layers (parameter names match ilm-megatron's)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, config: IlmConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = config.norm_eps
        self.kernels = _use_kernels(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels:
            return _kernels.rms_norm_op(x, self.weight, self.eps)
        return _rms_norm(x, self.weight, self.eps)


@dataclass
class _Mamba2State:
    conv: torch.Tensor  # (b, conv_dim, d_conv - 1)
    ssm: torch.Tensor  # (b, h, p, n), fp32


class Mamba2Mixer(nn.Module):
    """``[gate, xBC, dt] = in_proj(h) + u``; conv + SiLU; SSD scan with D; gated norm; out_proj."""

    def __init__(self, config: IlmConfig) -> None:
        super().__init__()
        c = config
        self.d_inner = c.expand * c.d_model
        self.nheads = self.d_inner // c.headdim
        self.headdim, self.ngroups, self.d_state = c.headdim, c.ngroups, c.d_state
        self.chunk_size, self.eps = c.chunk_size, c.norm_eps
        self.conv_dim = self.d_inner + 2 * c.ngroups * c.d_state
        self.kernels = _use_kernels(c)
        self.in_proj = nn.Linear(c.d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, c.d_conv, groups=self.conv_dim, padding=c.d_conv - 1
        )
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.A_log = nn.Parameter(torch.zeros(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, c.d_model, bias=False)

    @property
    def injection_size(self) -> int:
        return self.in_proj.out_features

    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _split_xbc(self, xbc: torch.Tensor):
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        s = xbc.shape[:-1]
        return (
            x.reshape(*s, self.nheads, self.headdim),
            B.reshape(*s, self.ngroups, self.d_state),
            C.reshape(*s, self.ngroups, self.d_state),
        )

    def _norm_out(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        group = self.d_inner // self.ngroups
        if self.kernels:
            y = _kernels.gated_rms_norm_op(y, gate, self.norm.weight, self.eps, group)
        else:
            y = _gated_rms_norm(y, gate, self.norm.weight, self.eps, group)
        return self.out_proj(y)

    def forward(self, h, u, mask, return_cache: bool):
        """h (b, l, d), u (b, l, in_proj width) or None, mask (b, l) or None."""
        b, l, _ = h.shape
        zxbcdt = self.in_proj(h)
        if u is not None:
            zxbcdt = zxbcdt + u
        gate, xbc, dt = self._split(zxbcdt)
        if mask is not None:  # padded positions feed nothing to the conv or the scan
            xbc = xbc * mask[..., None].to(xbc.dtype)
        w = self.conv1d.weight[:, 0, :]
        if self.kernels:
            out = _kernels.causal_conv1d(
                xbc, w, self.conv1d.bias, return_final_window=return_cache, activation="silu"
            )
            xbc, window = out if return_cache else (out, None)
        else:
            xbc, window = _conv_silu(xbc, w, self.conv1d.bias)
        if mask is not None:
            xbc = xbc * mask[..., None].to(xbc.dtype)
        x, B, C = self._split_xbc(xbc)
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(_upcast(self.A_log))
        if self.kernels:
            out = _kernels.ssd_scan(
                x, dt, A, B, C, self.chunk_size, D=self.D, return_final_states=return_cache
            )
            y, state = out if return_cache else (out, None)
        else:
            y, state = _ssd(x, dt, A, B, C, self.D, self.chunk_size)
        out = self._norm_out(y.reshape(b, l, self.d_inner), gate)
        cache = _Mamba2State(window, _upcast(state)) if return_cache else None
        return out, cache

    def step(self, h, u, cache: _Mamba2State, key_mask):
        """One token: h (b, d), u (b, width) or None -> (out (b, d), new state)."""
        zxbcdt = self.in_proj(h)
        if u is not None:
            zxbcdt = zxbcdt + u
        gate, xbc, dt = self._split(zxbcdt)
        w = self.conv1d.weight[:, 0, :]
        if self.kernels:
            xbc, window = _kernels.causal_conv1d_step_op(
                cache.conv, xbc, w, self.conv1d.bias, activation="silu"
            )
        else:
            xbc, window = _conv_silu_step(cache.conv, xbc, w, self.conv1d.bias)
        x, B, C = self._split_xbc(xbc)
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(_upcast(self.A_log))
        if self.kernels:
            y, state = _kernels.ssd_step_op(cache.ssm, x, dt, A, B, C, D=self.D)
        else:
            y, state = _ssd_step(cache.ssm, x, dt, A, B, C, self.D)
        return self._norm_out(y.reshape(h.shape[0], self.d_inner), gate), _Mamba2State(
            window, state
        )


@dataclass
class _KV:
    k: torch.Tensor  # (b, heads, T, head_dim)
    v: torch.Tensor


class SelfAttention(nn.Module):
    """Causal attention with RoPE; the injection is added to the packed ``[q, k, v]``."""

    def __init__(self, config: IlmConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads, self.head_dim = config.n_heads, d // config.n_heads
        self.theta = config.rope_theta
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    @property
    def injection_size(self) -> int:
        return self.qkv_proj.out_features

    def _qkv(self, h, u, positions):
        b, l, _ = h.shape
        qkv = self.qkv_proj(h)
        if u is not None:
            qkv = qkv + u
        q, k, v = (
            t.view(b, l, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, -1)
        )
        cos, sin = _rope(positions, self.head_dim, self.theta, q.dtype)
        return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v

    def forward(self, h, u, mask, return_cache: bool):
        b, l, _ = h.shape
        if mask is None:
            pos = torch.arange(l, device=h.device).expand(b, l)
            q, k, v = self._qkv(h, u, pos)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
            q, k, v = self._qkv(h, u, pos)
            causal = torch.tril(torch.ones(l, l, dtype=torch.bool, device=h.device))
            eye = torch.eye(l, dtype=torch.bool, device=h.device)  # pads attend to themselves
            allowed = (causal & mask.bool()[:, None, :]) | eye
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        out = self.out_proj(o.transpose(1, 2).reshape(b, l, -1))
        return out, (_KV(k, v) if return_cache else None)

    def step(self, h, u, cache: _KV, key_mask):
        """h (b, d) at per-sample positions; key_mask (b, T + 1) over cached keys + this one."""
        b = h.shape[0]
        pos = key_mask[:, :-1].long().sum(-1, keepdim=True)  # real tokens before this one
        q, k_t, v_t = self._qkv(h[:, None], None if u is None else u[:, None], pos)
        k = torch.cat([cache.k, k_t], dim=2)
        v = torch.cat([cache.v, v_t], dim=2)
        attn_mask = None if bool(key_mask.all()) else key_mask.bool()[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(o.reshape(b, -1)), _KV(k, v)


class SwiGLU(nn.Module):
    def __init__(self, config: IlmConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, 2 * config.ffn_hidden_size, bias=False)
        self.fc2 = nn.Linear(config.ffn_hidden_size, config.d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(h).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: IlmConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.d_model, config)
        if config.arch == "mamba2":
            self.mixer = Mamba2Mixer(config)
            self.mlp_norm = self.mlp = None
        else:
            self.mixer = SelfAttention(config)
            self.mlp_norm = RMSNorm(config.d_model, config)
            self.mlp = SwiGLU(config)

    def _mlp(self, z):
        return z if self.mlp is None else z + _upcast(self.mlp(self.mlp_norm(z)))

    def forward(self, z, u, mask, return_cache):
        out, cache = self.mixer(self.norm(z), u, mask, return_cache)
        return self._mlp(z + _upcast(out)), cache

    def step(self, z, u, cache, key_mask):
        out, update = self.mixer.step(self.norm(z), u, cache, key_mask)
        return self._mlp(z + _upcast(out)), update


class Stack(nn.Module):
    """One evaluation of ``F``: every block, then the final norm; padded positions held at 0."""

    def __init__(self, config: IlmConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config)

    def forward(self, z, u, mask=None, return_cache: bool = False):
        caches = []
        for layer in self.layers:
            z, cache = layer(z, u, mask, return_cache)
            caches.append(cache)
        z = _upcast(self.final_norm(z))
        if mask is not None:
            z = z * mask[..., None].to(z.dtype)
        return z, (caches if return_cache else None)

    def step(self, z, u, caches, key_mask):
        updates = []
        for layer, cache in zip(self.layers, caches):
            z, update = layer.step(z, u, cache, key_mask)
            updates.append(update)
        return _upcast(self.final_norm(z)), updates


# ------------------------------------------------------------------------------------------
# Solver (the rules of ilm-megatron's implicit/solver.py)


def _residual(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    diff = (fz - z).flatten(1).float().norm(dim=1)
    return diff / (fz.flatten(1).float().norm(dim=1) + EPS)


@torch.no_grad()
def solve(f, z0: torch.Tensor, max_iter: int, tol: float):
    """Undamped ``z <- F(z)``; stop when the batch's largest residual < tol; per-sample best."""
    b = z0.shape[0]
    best = z0.detach().clone()
    best_res = torch.full((b,), float("inf"), device=z0.device)
    iters = torch.full((b,), max_iter, device=z0.device, dtype=torch.long)
    z, it = best, 0
    while it < max_iter:
        fz = f(z)
        it += 1
        res = _residual(fz, z)
        better = res < best_res
        best = torch.where(better.view(b, *([1] * (z.dim() - 1))), fz, best)
        best_res = torch.where(better, res, best_res)
        iters = torch.where((res < tol) & (iters == max_iter), torch.full_like(iters, it), iters)
        z = fz
        if best_res.max().item() < tol:
            break
    return best, iters.clamp(max=it), best_res


@torch.no_grad()
def solve_damped_reference(f, z0: torch.Tensor, max_iter: int, tol: float, damping: float):
    """Damped loop with one residual over the whole batch, then one undamped call."""
    z, it = z0.detach().clone(), 0
    while it < max_iter:
        fz = f(z)
        it += 1
        batch_res = (fz - z).float().norm() / (fz.float().norm() + EPS)
        z = damping * fz + (1.0 - damping) * z
        if batch_res.item() < tol:
            break
    fz = f(z)
    it += 1
    iters = torch.full((z0.shape[0],), it, device=z0.device, dtype=torch.long)
    return fz, iters, _residual(fz, z)


# ------------------------------------------------------------------------------------------
# Model


class IlmCache:
    """Sequential-mode state: every layer's cache, the key mask and the tokens seen.

    ``layers``: per layer, Mamba2 (conv window, SSM state) or Llama (keys, values);
    ``key_mask``: (b, T) bool, False on padded positions of the prompt.
    """

    def __init__(self, layers: list[Any], key_mask: torch.Tensor) -> None:
        self.layers = layers
        self.key_mask = key_mask

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key_mask.shape[1]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search)."""
        for layer in self.layers:
            for name in vars(layer):
                setattr(layer, name, getattr(layer, name).index_select(0, beam_idx))
        self.key_mask = self.key_mask.index_select(0, beam_idx)


@dataclass
class IlmOutput(ModelOutput):
    """``logits`` (b, l, vocab); ``cache`` for sequential mode; ``solver_iters`` (b,) or (b, l)
    evaluations of ``F`` per sample (per token in sequential mode); ``residual`` likewise."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: IlmCache | None = None
    solver_iters: torch.Tensor | None = None
    residual: torch.Tensor | None = None


class IlmPreTrainedModel(PreTrainedModel):
    config_class = IlmConfig
    base_model_prefix = "ilm"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear | nn.Conv1d) and module.bias is not None:
            nn.init.zeros_(module.bias)


class IlmForCausalLM(IlmPreTrainedModel, GenerationMixin):
    """Embedding, injection, the stack ``F`` and the LM head, with the solver around ``F``."""

    def __init__(self, config: IlmConfig) -> None:
        super().__init__(config)
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.stack = Stack(c)
        self.injection_norm = self.injection = None
        if c.implicit:
            self.injection_norm = RMSNorm(c.d_model, c)
            width = self.stack.layers[0].mixer.injection_size
            self.injection = nn.Linear(c.d_model, width, bias=True)
        self.lm_head = (
            None if c.tie_word_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        )
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own cache (IlmCache)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embedding = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm_head

    # -------------------------------------------------------------------- pieces
    def _embed(self, ids: torch.Tensor):
        e = _upcast(self.embedding(ids))
        if self.injection is None:
            return e, None
        return e, self.injection(self.injection_norm(e))

    def _head(self, z: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(z, self.embedding.weight)
        return self.lm_head(z)

    def _eval_cap(self) -> int:
        return int(math.ceil(self.config.eval_max_iter_mult * self.config.f_max_iter))

    def _eval_tol(self) -> float:
        return self.config.eval_tol if self.config.eval_tol > 0 else self.config.f_tol

    def _z0(self, e: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.config.iterate_init == "embedding":
            return e if mask is None else e * mask[..., None].to(e.dtype)
        return torch.zeros_like(e)

    def _solve_eval(self, f, z0):
        if self.config.eval_solver == "reference":
            return solve_damped_reference(
                f, z0, self._eval_cap(), self._eval_tol(), self.config.eval_damping
            )
        return solve(f, z0, self._eval_cap(), self._eval_tol())

    # -------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: IlmCache | None = None,
        past_key_values: IlmCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> IlmOutput:
        """input_ids (b, l) -> :class:`IlmOutput` with logits (b, l, vocab).

        ``attention_mask`` (b, past + l): 1 for tokens, 0 for padding. With ``cache``, the
        tokens are run one at a time in sequential mode after the cached ones.
        """
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None:
            out = self._sequential(input_ids, cache)
        else:
            mask = None
            if attention_mask is not None and not bool(attention_mask.all()):
                mask = attention_mask[:, -input_ids.shape[1] :].bool()
            out = self._simultaneous(input_ids, mask, bool(use_cache), attention_mask)
        if labels is not None:
            logits = out.logits[:, :-1].float()
            out.loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return out

    def _simultaneous(self, ids, mask, use_cache: bool, attention_mask) -> IlmOutput:
        e, u = self._embed(ids)
        c = self.config
        if u is not None and mask is not None:
            u = u * mask[..., None].to(u.dtype)
        if not c.implicit:
            z, caches = self.stack(e, None, mask, use_cache)
            iters = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device)
            res = torch.zeros(ids.shape[0], device=ids.device)
        else:

            def f(z):
                return self.stack(z, u, mask)[0]

            z0 = self._z0(e, mask)
            if self.training and torch.is_grad_enabled():
                z, iters, res = solve(f, z0, c.f_max_iter, c.f_tol)
                for _ in range(c.phantom_steps):  # phantom gradient: damped steps with autograd
                    z = c.phantom_damping * f(z) + (1.0 - c.phantom_damping) * z
            else:
                z, iters, res = self._solve_eval(f, z0)
            caches = None
            if use_cache:  # the prefill: one evaluation at the solution returns the caches
                z, caches = self.stack(z, u, mask, True)
        new_cache = None
        if use_cache:
            key_mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            if mask is not None:
                key_mask = mask
            new_cache = IlmCache(caches, key_mask)
        return IlmOutput(logits=self._head(z), cache=new_cache, solver_iters=iters, residual=res)

    @torch.no_grad()
    def _sequential(self, ids, cache: IlmCache) -> IlmOutput:
        logits, iters, residuals = [], [], []
        for t in range(ids.shape[1]):
            e, u = self._embed(ids[:, t : t + 1])
            e = e[:, 0]
            u = None if u is None else u[:, 0]
            key_mask = torch.cat([cache.key_mask, cache.key_mask.new_ones(e.shape[0], 1)], dim=1)

            def f_t(z, u=u, key_mask=key_mask):
                return self.stack.step(z, u, cache.layers, key_mask)

            if self.config.implicit:
                z0 = e if self.config.iterate_init == "embedding" else torch.zeros_like(e)
                z_star, it, res = solve(
                    lambda z, f_t=f_t: f_t(z)[0], z0, self._eval_cap(), self._eval_tol()
                )
                z, updates = f_t(z_star)  # the one call that writes the caches
            else:
                z, updates = f_t(e)
                it = torch.ones(e.shape[0], dtype=torch.long, device=e.device)
                res = torch.zeros(e.shape[0], device=e.device)
            cache.layers = updates
            cache.key_mask = key_mask
            logits.append(self._head(z))
            iters.append(it)
            residuals.append(res)
        return IlmOutput(
            logits=torch.stack(logits, 1),
            cache=cache,
            solver_iters=torch.stack(iters, 1),
            residual=torch.stack(residuals, 1),
        )

    # -------------------------------------------------------------------- generation
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: IlmCache | None = None,
        past_key_values: IlmCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        cache = cache if cache is not None else past_key_values
        if cache is not None:  # sequential mode: the tokens after the cached ones
            input_ids = input_ids[:, cache.get_seq_length() :]
        return {
            "input_ids": input_ids,
            "cache": cache,
            "attention_mask": attention_mask,
            "use_cache": True if use_cache is None else use_cache,
        }

    def _update_model_kwargs_for_generation(
        self, outputs: ModelOutput, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, *args, **kwargs
        )
        model_kwargs["cache"] = outputs.get("cache")
        return model_kwargs

    def _reorder_cache(self, cache: IlmCache, beam_idx: torch.LongTensor) -> IlmCache:
        cache.reorder_cache(beam_idx)
        return cache
