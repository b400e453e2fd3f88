"""Triton (gated) RMS norm, forward and backward.

Semantics are those of :func:`ilm_kernels.norm.gated_rms_norm` (Mamba2's ``RMSNormGated``,
``norm_before_gate=False``) and, with no gate, :func:`ilm_kernels.norm.rms_norm`::

    xg = x * silu(gate)                     (xg = x when gate is None)
    y  = xg * rsqrt(mean_group(xg**2) + eps) * weight

Shapes: ``x``, ``gate`` (..., d) are viewed as (r, d) rows; groups are consecutive runs of
``group_size`` channels (``d % group_size == 0``); ``weight`` (d,). One program handles
``BLOCK_R`` rows of one group. Accumulation is in float32; ``y`` and the gradients are returned
in the dtype of the tensor they belong to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import launch_warps, triton_interpreter

__all__ = ["DEBUG_POISON", "GatedRMSNormFn", "rms_norm_backward", "rms_norm_forward"]

#: Debug/test switch: NaN-fill every freshly allocated output before the kernels run.
DEBUG_POISON: bool = False

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _new(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised output, NaN-filled when :data:`DEBUG_POISON` is set."""
    if DEBUG_POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _row_programs(device: torch.device) -> int:
    """Row-block programs of the backward: 4 per SM on CUDA (the dweight partials are then
    (4 * SMs, d), not (rows, d)); 4 in the interpreter; 4 * 132 (H100/H200) elsewhere."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4 if triton_interpreter() else 4 * 132


def _block_r(rows: int, block_n: int) -> int:
    """Rows per program: ~4K elements per tile on GPU, bigger tiles in the interpreter."""
    budget = 1 << 16 if triton_interpreter() else 1 << 12
    return max(1, min(triton.next_power_of_2(max(rows, 1)), budget // block_n))


@triton.jit
def _row_base(row0, width):
    """``row0 * width`` in int64: the scalar base offset of a row block."""
    return tl.cast(row0, tl.int64) * width


@triton.jit
def _rms_fwd_kernel(
    x_ptr,
    g_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    rows,
    d,
    ngroups,
    group_size,
    eps,
    stride_x,
    stride_g,
    HAS_GATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(r, BLOCK_R), ngroups); x, gate (r, d) with row strides ``stride_x``,
    ``stride_g`` (unit column stride); y contiguous (r, d); rstd (r, ngroups) fp32."""
    row0 = tl.program_id(0) * BLOCK_R
    rel = tl.arange(0, BLOCK_R)
    grp = tl.program_id(1)
    k = tl.arange(0, BLOCK_N)
    cols = grp * group_size + k
    kmask = k < group_size
    rmask = rel < rows - row0
    mask = rmask[:, None] & kmask[None, :]
    base = _row_base(row0, d)  # int64: (r, d) may pass 2**31 elements
    off = rel[:, None] * d + cols[None, :]
    x_off = rel[:, None] * stride_x + cols[None, :]

    xg = tl.load(x_ptr + _row_base(row0, stride_x) + x_off, mask=mask, other=0.0)
    xg = xg.to(tl.float32)
    if HAS_GATE:
        g_off = rel[:, None] * stride_g + cols[None, :]
        g = tl.load(g_ptr + _row_base(row0, stride_g) + g_off, mask=mask, other=0.0)
        g = g.to(tl.float32)
        xg = xg * g * tl.sigmoid(g)
    rstd = 1.0 / tl.sqrt(tl.sum(xg * xg, axis=1) / group_size + eps)  # (BLOCK_R,)
    w = tl.load(w_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
    y = xg * rstd[:, None] * w[None, :]
    tl.store(y_ptr + base + off, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + _row_base(row0, ngroups) + rel * ngroups + grp, rstd, mask=rmask)


@triton.jit
def _rms_bwd_kernel(
    dy_ptr,
    x_ptr,
    g_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dg_ptr,
    dw_part_ptr,
    rows,
    d,
    ngroups,
    group_size,
    stride_dy,
    stride_x,
    stride_g,
    HAS_GATE: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (nprog, ngroups), nprog about the SM count: program ``pid`` walks the row blocks
    ``pid, pid + nprog, ...`` of ``BLOCK_R`` rows. With xhat = xg * rstd and u = dy * weight::

    dxg    = rstd * (u - xhat * mean_group(u * xhat))
    dx     = dxg * silu(gate);   dgate = dxg * x * silu'(gate)
    dw_part[pid, cols] = sum over the program's rows of dy * xhat   (nprog, d) float32
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    grp = tl.program_id(1)
    rel = tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_N)
    cols = grp * group_size + k
    kmask = k < group_size
    off = rel[:, None] * d + cols[None, :]
    w = tl.load(w_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row0 in range(pid * BLOCK_R, rows, nprog * BLOCK_R):
        rmask = rel < rows - row0
        mask = rmask[:, None] & kmask[None, :]
        base = _row_base(row0, d)  # int64: (r, d) may pass 2**31 elements
        x_off = rel[:, None] * stride_x + cols[None, :]
        x = tl.load(x_ptr + _row_base(row0, stride_x) + x_off, mask=mask, other=0.0)
        x = x.to(tl.float32)
        xg = x
        if HAS_GATE:
            g_off = rel[:, None] * stride_g + cols[None, :]
            g = tl.load(g_ptr + _row_base(row0, stride_g) + g_off, mask=mask, other=0.0)
            g = g.to(tl.float32)
            sig = tl.sigmoid(g)
            xg = x * g * sig
        rstd = tl.load(
            rstd_ptr + _row_base(row0, ngroups) + rel * ngroups + grp, mask=rmask, other=0.0
        )
        dy_off = rel[:, None] * stride_dy + cols[None, :]
        dy = tl.load(dy_ptr + _row_base(row0, stride_dy) + dy_off, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        xhat = xg * rstd[:, None]
        u = dy * w[None, :]
        c = tl.sum(u * xhat, axis=1) / group_size
        dxg = rstd[:, None] * (u - xhat * c[:, None])
        if HAS_GATE:
            tl.store(dx_ptr + base + off, (dxg * g * sig).to(dx_ptr.dtype.element_ty), mask=mask)
            dg = dxg * x * sig * (1.0 + g * (1.0 - sig))
            tl.store(dg_ptr + base + off, dg.to(dg_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(dx_ptr + base + off, dxg.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += tl.sum(dy * xhat, axis=0)
    if NEED_DW:
        tl.store(dw_part_ptr + pid * d + cols, dw, mask=kmask)


def _prepare(
    x: Tensor, gate: Tensor | None, weight: Tensor, group_size: int | None
) -> tuple[Tensor, Tensor | None, int, int, int]:
    """Validate; return (x2d, gate2d, rows, d, group_size), (r, d) with unit column stride."""
    d = x.shape[-1]
    if group_size is None:
        group_size = d
    if group_size <= 0 or d % group_size != 0:
        raise ValueError(f"group_size ({group_size}) must divide the last dimension ({d})")
    if tuple(weight.shape) != (d,):
        raise ValueError(f"weight must be ({d},), got {tuple(weight.shape)}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate shape {tuple(gate.shape)} != x shape {tuple(x.shape)}")
    for t in (x, gate, weight):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"triton rms norm supports {_KERNEL_DTYPES}, got {t.dtype}")
    x2 = _rows(x, d)
    g2 = None if gate is None else _rows(gate, d)
    return x2, g2, x2.shape[0], d, group_size


def _rows(t: Tensor, d: int) -> Tensor:
    """``t`` as an (r, d) tensor with unit column stride, a view where one exists (e.g. the
    gate slice of Mamba2's in_proj output): the kernels take the row stride, no copy."""
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 or d == 1 else t2.contiguous()


def rms_norm_forward(
    x: Tensor,
    gate: Tensor | None,
    weight: Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward kernel launch (no autograd).

    Args:
        x: (..., d); gate: (..., d) or None; weight: (d,); group_size divides d (None = d).

    Returns:
        y (..., d) in ``x.dtype``; rstd (r, d // group_size) float32, r = x.numel() // d.
    """
    x2, g2, rows, d, gs = _prepare(x, gate, weight, group_size)
    ngroups = d // gs
    y = _new((rows, d), x.dtype, x.device)
    rstd = _new((rows, ngroups), torch.float32, x.device)
    if rows and d:
        block_n = triton.next_power_of_2(gs)
        block_r = _block_r(rows, block_n)
        _rms_fwd_kernel[(triton.cdiv(rows, block_r), ngroups)](
            x2,
            x2 if g2 is None else g2,
            weight,
            y,
            rstd,
            rows,
            d,
            ngroups,
            gs,
            float(eps),
            x2.stride(0),
            x2.stride(0) if g2 is None else g2.stride(0),
            HAS_GATE=g2 is not None,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            **launch_warps(block_r * block_n, per_thread=16),
        )
    return y.reshape(x.shape), rstd


def rms_norm_backward(
    dy: Tensor,
    x: Tensor,
    gate: Tensor | None,
    weight: Tensor,
    rstd: Tensor,
    group_size: int | None = None,
    need_dweight: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Backward kernel launch (no autograd).

    Args:
        dy: (..., d) gradient of ``y``; x, gate, weight, group_size: as in the forward;
        rstd: (r, ngroups) float32 from :func:`rms_norm_forward`.

    Returns:
        dx (..., d) in ``x.dtype``; dgate (..., d) in ``gate.dtype`` or None; dweight (d,) in
        ``weight.dtype`` or None.
    """
    x2, g2, rows, d, gs = _prepare(x, gate, weight, group_size)
    ngroups = d // gs
    dy2 = _rows(dy, d)
    block_n = triton.next_power_of_2(gs)
    block_r = _block_r(rows, block_n)
    nprog = min(triton.cdiv(rows, block_r), _row_programs(x.device))
    dx = _new((rows, d), x.dtype, x.device)
    dg = None if gate is None else _new((rows, d), gate.dtype, x.device)
    dw_part = _new((nprog, d), torch.float32, x.device) if need_dweight else None
    if rows and d:
        _rms_bwd_kernel[(nprog, ngroups)](
            dy2,
            x2,
            x2 if g2 is None else g2,
            weight,
            rstd,
            dx,
            dx if dg is None else dg,
            dx if dw_part is None else dw_part,
            rows,
            d,
            ngroups,
            gs,
            dy2.stride(0),
            x2.stride(0),
            x2.stride(0) if g2 is None else g2.stride(0),
            HAS_GATE=g2 is not None,
            NEED_DW=need_dweight,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            **launch_warps(block_r * block_n, per_thread=16),
        )
    dweight = None
    if need_dweight:
        dweight = dw_part.sum(dim=0).to(weight.dtype) if nprog else torch.zeros_like(weight)
    return dx.reshape(x.shape), (None if dg is None else dg.reshape(x.shape)), dweight


class GatedRMSNormFn(torch.autograd.Function):
    """Autograd wrapper: ``forward(x (...,d), gate (...,d)|None, weight (d,), eps,
    group_size) -> y (...,d)``; saves x, gate, weight and the float32 rstd (r, ngroups)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        gate: Tensor | None,
        weight: Tensor,
        eps: float,
        group_size: int | None,
    ) -> Tensor:
        y, rstd = rms_norm_forward(x, gate, weight, eps, group_size)
        ctx.group_size = group_size
        ctx.save_for_backward(x, gate, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, gate, weight, rstd = ctx.saved_tensors
        dx, dg, dw = rms_norm_backward(
            dy, x, gate, weight, rstd, ctx.group_size, need_dweight=ctx.needs_input_grad[2]
        )
        return dx, dg, dw, None, None
