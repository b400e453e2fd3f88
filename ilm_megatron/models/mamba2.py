"""Implicit Mamba2 mixer (Dao & Gu 2024; implicit form of Schöne et al. 2025, DESIGN §1).

The packed input projection ``zxbcdt = in_proj(h) + u`` is split into the gate ``z``, the
convolution input ``xBC`` and ``dt``; the injection ``u`` (same width as ``in_proj``'s output) is
what makes the layer implicit: gate, x, B, C and dt all depend on both the previous iterate and the
input. ``u = None`` gives the explicit Mamba2 layer.

Shapes: b batch, l length, d d_model, h heads, p headdim, g groups, n d_state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from ilm_kernels import causal_conv1d, causal_conv1d_step_op, ssd_scan, ssd_step_op
from ilm_megatron.config import ModelConfig
from ilm_megatron.core.parallel_state import model_tp_size
from ilm_megatron.core.tensor_parallel import set_tp_layout
from ilm_megatron.models.cache import Mamba2Cache
from ilm_megatron.models.layers import init_dt_bias
from ilm_megatron.models.stack import upcast


@dataclass
class Mamba2MixerSubmodules:
    in_proj: ModuleSpec | type
    conv1d: ModuleSpec | type
    norm: ModuleSpec | type
    out_proj: ModuleSpec | type


class Mamba2Mixer(nn.Module):
    """Mamba2 mixer with an optional injection. See module docstring for the math."""

    def __init__(
        self, config: ModelConfig, submodules: Mamba2MixerSubmodules, layer_number: int = 1
    ) -> None:
        super().__init__()
        c = config
        tp = model_tp_size(c)
        self.tp = tp
        # global sizes (what the single-process model and the checkpoints see)
        self.d_model = c.d_model
        self.d_inner = c.d_inner
        self.headdim = c.headdim
        self.nheads = c.d_inner // c.headdim
        self.ngroups = c.ngroups
        self.d_state = c.d_state
        self.d_conv = c.d_conv
        self.chunk_size = c.chunk_size
        self.kernel_backend = c.kernel_backend
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.d_in_proj = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads
        if self.nheads % tp or self.ngroups % tp:
            raise ValueError(
                f"tensor parallel size {tp} must divide nheads={self.nheads} and "
                f"ngroups={self.ngroups}"
            )
        # TP-local sizes: this rank's heads and groups (equal to the global ones when tp = 1)
        self.nheads_local = self.nheads // tp
        self.ngroups_local = self.ngroups // tp
        self.d_inner_local = self.d_inner // tp
        self.conv_dim_local = self.conv_dim // tp
        gn = self.ngroups * self.d_state
        self.in_proj_parts = (self.d_inner, self.d_inner, gn, gn, self.nheads)

        self.in_proj = build_module(
            submodules.in_proj,
            c.d_model,
            self.d_in_proj,
            config=c,
            partition_sizes=self.in_proj_parts,
        )
        self.conv1d = build_module(submodules.conv1d, self.conv_dim_local, self.d_conv, config=c)
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads_local, c))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads_local).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(self.nheads_local))
        self.norm = build_module(
            submodules.norm,
            self.d_inner_local,
            config=c,
            group_size=self.d_inner_local // self.ngroups_local,
        )
        self.out_proj = build_module(
            submodules.out_proj, self.d_inner, c.d_model, config=c, partition_sizes=(self.d_inner,)
        )
        # mamba-ssm rescales the output projection by depth (GPT-2 style)
        with torch.no_grad():
            self.out_proj.weight.mul_(1.0 / math.sqrt(max(1, c.n_layers)))
        # how each parameter splits over TP ranks (read by parallel.checkpoint)
        set_tp_layout(self.in_proj.weight, 0, self.in_proj_parts)
        set_tp_layout(self.conv1d.weight, 0, (self.d_inner, gn, gn))
        set_tp_layout(self.conv1d.bias, 0, (self.d_inner, gn, gn))
        for p in (self.dt_bias, self.A_log, self.D):
            set_tp_layout(p, 0, (self.nheads,))
        set_tp_layout(self.norm.weight, 0, (self.d_inner,))
        set_tp_layout(self.out_proj.weight, 1, (self.d_inner,))

    @property
    def injection_size(self) -> int:
        """Global width of the injection ``u`` this mixer adds to its packed projection."""
        return self.d_in_proj

    @property
    def injection_parts(self) -> tuple[int, ...]:
        """Global sizes of the injection's packed components ``[z, x, B, C, dt]``."""
        return self.in_proj_parts

    def _split(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.split(
            zxbcdt, [self.d_inner_local, self.conv_dim_local, self.nheads_local], dim=-1
        )

    def _split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gn = self.ngroups_local * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner_local, gn, gn], dim=-1)
        shape = xbc.shape[:-1]
        return (
            x.reshape(*shape, self.nheads_local, self.headdim),
            B.reshape(*shape, self.ngroups_local, self.d_state),
            C.reshape(*shape, self.ngroups_local, self.d_state),
        )

    def forward(
        self,
        h: torch.Tensor,
        u: torch.Tensor | None = None,
        return_cache: bool = False,
        cache: Mamba2Cache | None = None,
    ) -> tuple[torch.Tensor, Mamba2Cache | None]:
        """Whole-sequence (simultaneous) evaluation.

        Args:
            h: (b, l, d) normalised input.
            u: (b, l, d_in_proj / tp) this rank's share of the injection, or None (explicit).
            return_cache: also return the recurrent state after the last position.
            cache: the state before the first position (read only; TP-local shapes as
                :meth:`empty_cache`): its conv window precedes ``xBC`` and its SSM state is the
                scan's initial state. None: the start of a sequence (zeros).

        Returns:
            ``(out (b, l, d), cache or None)``.
        """
        zxbcdt = self.in_proj(h)  # sequence parallel: h holds l / tp positions, zxbcdt all l
        b, l, _ = zxbcdt.shape
        if u is not None:
            zxbcdt = zxbcdt + u
        gate, xbc, dt = self._split(zxbcdt)
        # 1. causal depthwise conv over time + SiLU (fused in the kernel)
        conv = causal_conv1d(
            xbc,
            self.conv1d.weight[:, 0, :],
            self.conv1d.bias,
            initial_window=None if cache is None else cache.conv,
            return_final_window=return_cache,
            activation="silu",
            backend=self.kernel_backend,
        )
        xbc_c, window = conv if return_cache else (conv, None)
        x, B, C = self._split_xbc(xbc_c)
        # 2. discretisation: dt > 0, A < 0 per head
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(upcast(self.A_log))
        # 3. SSD scan with D skip
        scan = ssd_scan(
            x,
            dt,
            A,
            B,
            C,
            self.chunk_size,
            D=self.D,
            initial_states=None if cache is None else cache.ssm,
            return_final_states=return_cache,
            backend=self.kernel_backend,
        )
        y, state = scan if return_cache else (scan, None)
        # 4. gated norm and output projection
        y = self.norm(y.reshape(b, l, self.d_inner_local), gate)
        out = self.out_proj(y)
        cache = Mamba2Cache(conv=window, ssm=upcast(state)) if return_cache else None
        return out, cache

    def step(
        self, h: torch.Tensor, u: torch.Tensor | None, cache: Mamba2Cache
    ) -> tuple[torch.Tensor, Mamba2Cache]:
        """One token of sequential mode; reads ``cache`` without modifying it.

        Args:
            h: (b, d) normalised input of the current token.
            u: (b, d_in_proj / tp) injection share of the current token, or None.
            cache: state after the previous token.

        Returns:
            ``(out (b, d), new_cache)``; the caller commits ``new_cache`` once per token.
        """
        b = h.shape[0]
        zxbcdt = self.in_proj(h)
        if u is not None:
            zxbcdt = zxbcdt + u
        gate, xbc, dt = self._split(zxbcdt)
        xbc_c, window = causal_conv1d_step_op(
            cache.conv,
            xbc,
            self.conv1d.weight[:, 0, :],
            self.conv1d.bias,
            activation="silu",
            backend=self.kernel_backend,
        )
        x, B, C = self._split_xbc(xbc_c)
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(upcast(self.A_log))
        y, state = ssd_step_op(cache.ssm, x, dt, A, B, C, D=self.D, backend=self.kernel_backend)
        y = self.norm(y.reshape(b, self.d_inner_local), gate)
        return self.out_proj(y), Mamba2Cache(conv=window, ssm=state)

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> Mamba2Cache:
        """Zero state before the first token."""
        return Mamba2Cache(
            conv=torch.zeros(
                batch, self.conv_dim_local, self.d_conv - 1, device=device, dtype=dtype
            ),
            ssm=torch.zeros(
                batch,
                self.nheads_local,
                self.headdim,
                self.d_state,
                device=device,
                dtype=torch.promote_types(dtype, torch.float32),
            ),
        )
