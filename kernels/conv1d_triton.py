"""Triton causal depthwise conv1d (Mamba2's short convolution), forward and backward.

Semantics are those of :func:`ilm_kernels.conv1d.causal_conv1d_reference`, followed by an
optional SiLU. Shapes: ``b`` batch, ``l`` length, ``c`` channels, ``w`` kernel width::

    z_t[c] = bias[c] + sum_{j<w} weight[c, j] * xfull[t - (w-1) + j, c]
    y_t[c] = z_t[c]              (activation None)   or   silu(z_t[c])   (activation "silu")

where ``xfull`` is ``x`` preceded by the ``w - 1`` inputs of ``initial_window`` (zeros if None).

Everything accumulates in float32; ``y`` and every gradient are returned in the dtype of the
tensor they belong to. Inputs may have any strides (e.g. a channel slice of a projection).

This module imports triton but never CUDA: on CPU tensors the kernels run only in Triton's
interpreter (``TRITON_INTERPRET=1`` set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import launch_warps, triton_interpreter

__all__ = ["DEBUG_POISON", "CausalConv1dFn", "conv1d_backward", "conv1d_forward"]

#: Debug/test switch: fill every freshly allocated output with NaN (or -1 for integers) before
#: the kernels run, so that an element a kernel forgets to write shows up in the results.
DEBUG_POISON: bool = False

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _new(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised output, NaN-filled when :data:`DEBUG_POISON` is set."""
    if DEBUG_POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(seqlen: int, channels: int) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_C): big tiles in the interpreter (fewer programs), GPU-sized otherwise."""
    if triton_interpreter():
        return min(triton.next_power_of_2(max(seqlen, 1)), 256), min(
            triton.next_power_of_2(channels), 256
        )
    return 64, min(triton.next_power_of_2(channels), 128)


@triton.jit
def _base(b, stride_b, pos0, stride_l, col0, stride_c):
    """``b * stride_b + pos0 * stride_l + col0 * stride_c`` in int64: the scalar base offset of
    a tile (a tensor may pass 2**31 elements; the offsets inside a tile stay int32)."""
    i64 = tl.int64
    return (
        tl.cast(b, i64) * stride_b + tl.cast(pos0, i64) * stride_l + tl.cast(col0, i64) * stride_c
    )


@triton.jit
def _load_xfull(
    x_base,
    win_base,
    pos,
    rel,
    rc,
    cmask,
    seqlen,
    stride_xl,
    stride_xc,
    stride_wc,
    stride_wk,
    WIDTH: tl.constexpr,
    HAS_WIN: tl.constexpr,
):
    """xfull[b, pos, cols] as float32, (BLOCK_L, BLOCK_C); pos < 0 reads the window.

    ``x_base`` points at x[b, pos0, col0] and ``win_base`` at window[b, col0, 0]; ``pos`` are
    the absolute positions, ``rel = pos - pos0`` and ``rc`` the columns relative to col0.
    """
    in_x = (pos >= 0) & (pos < seqlen)
    x_off = rel[:, None] * stride_xl + rc[None, :] * stride_xc
    val = tl.load(x_base + x_off, mask=in_x[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    if HAS_WIN:
        in_w = (pos < 0) & (pos >= -(WIDTH - 1))
        k = pos + (WIDTH - 1)
        w_off = rc[None, :] * stride_wc + k[:, None] * stride_wk
        val += tl.load(win_base + w_off, mask=in_w[:, None] & cmask[None, :], other=0.0).to(
            tl.float32
        )
    return val


@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    win_ptr,
    w_ptr,
    bias_ptr,
    dy_ptr,
    out_ptr,
    seqlen,
    channels,
    stride_xb,
    stride_xl,
    stride_xc,
    stride_wb,
    stride_wc,
    stride_wk,
    stride_weight_c,
    stride_weight_k,
    stride_dyb,
    stride_dyl,
    stride_dyc,
    stride_ob,
    stride_ol,
    stride_oc,
    WIDTH: tl.constexpr,
    HAS_WIN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    GRAD_Z: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Forward: out = act(z). With GRAD_Z: out = dy * act'(z) (the gradient w.r.t. z).

    Grid: (b, cdiv(l, BLOCK_L), cdiv(c, BLOCK_C)).
    """
    b = tl.program_id(0)
    pos0 = tl.program_id(1) * BLOCK_L
    col0 = tl.program_id(2) * BLOCK_C
    rel = tl.arange(0, BLOCK_L)
    rc = tl.arange(0, BLOCK_C)
    pos = pos0 + rel
    cols = col0 + rc
    cmask = cols < channels
    mask = (pos < seqlen)[:, None] & cmask[None, :]
    x_base = x_ptr + _base(b, stride_xb, pos0, stride_xl, col0, stride_xc)
    win_base = win_ptr + b.to(tl.int64) * stride_wb + col0.to(tl.int64) * stride_wc

    # 1. z = bias + sum_j weight[:, j] * xfull[t - (w-1) + j]   (BLOCK_L, BLOCK_C) float32
    z = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(WIDTH):
        wj = tl.load(w_ptr + cols * stride_weight_c + j * stride_weight_k, mask=cmask, other=0.0)
        shift = j - (WIDTH - 1)
        xv = _load_xfull(
            x_base, win_base, pos + shift, rel + shift, rc, cmask, seqlen,
            stride_xl, stride_xc, stride_wc, stride_wk, WIDTH, HAS_WIN,
        )  # fmt: skip
        z += wj.to(tl.float32)[None, :] * xv

    # 2. Activation, or its derivative times the incoming gradient.
    if GRAD_Z:
        dy_base = dy_ptr + _base(b, stride_dyb, pos0, stride_dyl, col0, stride_dyc)
        dy_off = rel[:, None] * stride_dyl + rc[None, :] * stride_dyc
        out = tl.load(dy_base + dy_off, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            sig = tl.sigmoid(z)
            out = out * sig * (1.0 + z * (1.0 - sig))
    else:
        out = z
        if SILU:
            out = z * tl.sigmoid(z)
    o_base = out_ptr + _base(b, stride_ob, pos0, stride_ol, col0, stride_oc)
    o_off = rel[:, None] * stride_ol + rc[None, :] * stride_oc
    tl.store(o_base + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_kernel(
    dz_ptr,
    x_ptr,
    win_ptr,
    w_ptr,
    dx_ptr,
    dwin_ptr,
    dw_part_ptr,
    db_part_ptr,
    seqlen,
    channels,
    stride_xb,
    stride_xl,
    stride_xc,
    stride_wb,
    stride_wc,
    stride_wk,
    stride_weight_c,
    stride_weight_k,
    stride_dxb,
    stride_dxl,
    stride_dxc,
    stride_dwinb,
    stride_dwinc,
    stride_dwink,
    WIDTH: tl.constexpr,
    HAS_WIN: tl.constexpr,
    NEED_DWIN: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward from dz (b, l, c) float32 contiguous, over "extended" positions.

    Program ``(b, i, k)`` covers positions ``s = i * BLOCK_L + r - (w-1)`` for ``r < BLOCK_L``;
    the grid spans ``[-(w-1), l)``, so window positions (s < 0) are covered as well:

    * dxfull[s] = sum_j weight[:, j] * dz[s + (w-1) - j]  -> dx (s >= 0) or dwindow (s < 0);
    * partial sums over its positions t = s (0 <= t < l) of dz[t] * xfull[t - (w-1) + j]
      (weight) and dz[t] (bias), written to row ``b * nblocks + i`` of the partial buffers
      (nrows, w, c) and (nrows, c); the host sums them (deterministic, no atomics).
    """
    b = tl.program_id(0)
    blk = tl.program_id(1)
    nblk = tl.num_programs(1)
    s0 = blk * BLOCK_L - (WIDTH - 1)  # first (extended) position of the tile
    col0 = tl.program_id(2) * BLOCK_C
    rel = tl.arange(0, BLOCK_L)
    rc = tl.arange(0, BLOCK_C)
    s = s0 + rel
    cols = col0 + rc
    cmask = cols < channels
    dz_base = dz_ptr + _base(b, seqlen * channels, s0, channels, col0, 1)  # contiguous (b, l, c)

    # 1. Gradient of the inputs (and of the window) at positions s.
    dxf = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        shift = (WIDTH - 1) - j
        t = s + shift
        tmask = (t >= 0) & (t < seqlen)
        dzj = tl.load(
            dz_base + (rel[:, None] + shift) * channels + rc[None, :],
            mask=tmask[:, None] & cmask[None, :],
            other=0.0,
        )
        wj = tl.load(w_ptr + cols * stride_weight_c + j * stride_weight_k, mask=cmask, other=0.0)
        dxf += wj.to(tl.float32)[None, :] * dzj
    xmask = ((s >= 0) & (s < seqlen))[:, None] & cmask[None, :]
    dx_base = dx_ptr + _base(b, stride_dxb, s0, stride_dxl, col0, stride_dxc)
    dx_off = rel[:, None] * stride_dxl + rc[None, :] * stride_dxc
    tl.store(dx_base + dx_off, dxf.to(dx_ptr.dtype.element_ty), mask=xmask)
    if NEED_DWIN:
        k = s + (WIDTH - 1)
        wmask = (s < 0)[:, None] & cmask[None, :]
        dwin_base = dwin_ptr + b.to(tl.int64) * stride_dwinb + col0.to(tl.int64) * stride_dwinc
        dwin_off = rc[None, :] * stride_dwinc + k[:, None] * stride_dwink
        tl.store(dwin_base + dwin_off, dxf.to(dwin_ptr.dtype.element_ty), mask=wmask)

    # 2. Partial sums for the weight and bias gradients over positions t = s in [0, l).
    row = (b * nblk + blk).to(tl.int64)
    if NEED_DW or NEED_DB:
        dz = tl.load(dz_base + rel[:, None] * channels + rc[None, :], mask=xmask, other=0.0)
        if NEED_DB:
            tl.store(db_part_ptr + row * channels + cols, tl.sum(dz, axis=0), mask=cmask)
        if NEED_DW:
            x_base = x_ptr + _base(b, stride_xb, s0, stride_xl, col0, stride_xc)
            win_base = win_ptr + b.to(tl.int64) * stride_wb + col0.to(tl.int64) * stride_wc
            for j in tl.static_range(WIDTH):
                shift = j - (WIDTH - 1)
                xv = _load_xfull(
                    x_base, win_base, s + shift, rel + shift, rc, cmask, seqlen,
                    stride_xl, stride_xc, stride_wc, stride_wk, WIDTH, HAS_WIN,
                )  # fmt: skip
                tl.store(
                    dw_part_ptr + (row * WIDTH + j) * channels + cols,
                    tl.sum(dz * xv, axis=0),
                    mask=cmask,
                )


def _check(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_window: Tensor | None
) -> tuple[int, int, int, int]:
    """Validate shapes/dtypes; return (b, l, c, w)."""
    if x.dim() != 3:
        raise ValueError(f"x must be (b, l, c), got shape {tuple(x.shape)}")
    batch, seqlen, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"weight must be (c={channels}, w), got {tuple(weight.shape)}")
    width = weight.shape[1]
    if width < 1:
        raise ValueError("weight width must be at least 1")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must be ({channels},), got {tuple(bias.shape)}")
    if initial_window is not None and tuple(initial_window.shape) != (batch, channels, width - 1):
        raise ValueError(
            f"initial_window must be (b, c, w-1) = {(batch, channels, width - 1)}, "
            f"got {tuple(initial_window.shape)}"
        )
    for t in (x, weight, bias, initial_window):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"triton conv1d supports {_KERNEL_DTYPES}, got {t.dtype}")
    return batch, seqlen, channels, width


def _final_window(x: Tensor, initial_window: Tensor | None, width: int) -> Tensor:
    """The last w-1 inputs of xfull, (b, c, w-1) in ``x.dtype`` (a small copy)."""
    batch, seqlen, channels = x.shape
    keep = width - 1
    tail = x[:, max(seqlen - keep, 0) :, :].transpose(1, 2)  # (b, c, min(l, w-1))
    if seqlen >= keep:
        return tail.to(x.dtype).contiguous()
    if initial_window is None:
        head = x.new_zeros(batch, channels, keep - seqlen)
    else:
        head = initial_window[..., seqlen:].to(x.dtype)
    return torch.cat([head, tail], dim=-1).contiguous()


def _win_args(initial_window: Tensor | None, x: Tensor) -> tuple[Tensor, int, int, int]:
    if initial_window is None:
        return x, 0, 0, 0
    return initial_window, *initial_window.stride()


def conv1d_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_window: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """Forward kernel launch (no autograd).

    Args:
        x: (b, l, c) inputs, any strides.
        weight: (c, w) filters.
        bias: (c,) or None.
        initial_window: (b, c, w-1) or None.
        activation: None or "silu".

    Returns:
        y: (b, l, c) contiguous, in ``x.dtype``.
    """
    batch, seqlen, channels, width = _check(x, weight, bias, initial_window)
    silu = _silu_flag(activation)
    y = _new((batch, seqlen, channels), x.dtype, x.device)
    if y.numel() == 0:
        return y
    block_l, block_c = _blocks(seqlen, channels)
    win, swb, swc, swk = _win_args(initial_window, x)
    grid = (batch, triton.cdiv(seqlen, block_l), triton.cdiv(channels, block_c))
    _conv_fwd_kernel[grid](
        x,
        win,
        weight,
        x if bias is None else bias,
        x,
        y,
        seqlen,
        channels,
        *x.stride(),
        swb,
        swc,
        swk,
        *weight.stride(),
        0,
        0,
        0,
        *y.stride(),
        WIDTH=width,
        HAS_WIN=initial_window is not None,
        HAS_BIAS=bias is not None,
        SILU=silu,
        GRAD_Z=False,
        BLOCK_L=block_l,
        BLOCK_C=block_c,
        **launch_warps(block_l * block_c),
    )
    return y


def conv1d_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_window: Tensor | None = None,
    activation: str | None = None,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Backward kernel launches (no autograd).

    Args:
        dy: (b, l, c) gradient of ``y``.
        x, weight, bias, initial_window, activation: as in :func:`conv1d_forward`.
        needs: which of (dx, dweight, dbias, dwindow) to return; the others are None.

    Returns:
        dx (b, l, c) in ``x.dtype``; dweight (c, w) in ``weight.dtype``; dbias (c,) in
        ``bias.dtype``; dwindow (b, c, w-1) in ``initial_window.dtype``.
    """
    batch, seqlen, channels, width = _check(x, weight, bias, initial_window)
    silu = _silu_flag(activation)
    need_dx, need_dw, need_db, need_dwin = needs
    need_db = need_db and bias is not None
    need_dwin = need_dwin and initial_window is not None
    dev = x.device
    block_l, block_c = _blocks(seqlen + width - 1, channels)
    win, swb, swc, swk = _win_args(initial_window, x)
    nblk_c = triton.cdiv(channels, block_c)

    # 1. dz = dy * act'(z), float32 contiguous (recomputes z: nothing but inputs was saved).
    dz = _new((batch, seqlen, channels), torch.float32, dev)
    if dz.numel():
        _conv_fwd_kernel[(batch, triton.cdiv(seqlen, block_l), nblk_c)](
            x,
            win,
            weight,
            x if bias is None else bias,
            dy,
            dz,
            seqlen,
            channels,
            *x.stride(),
            swb,
            swc,
            swk,
            *weight.stride(),
            *dy.stride(),
            *dz.stride(),
            WIDTH=width,
            HAS_WIN=initial_window is not None,
            HAS_BIAS=bias is not None,
            SILU=silu,
            GRAD_Z=True,
            BLOCK_L=block_l,
            BLOCK_C=block_c,
            **launch_warps(block_l * block_c),
        )

    # 2. dx / dwindow / partial dweight and dbias over extended positions [-(w-1), l).
    nblk_l = triton.cdiv(seqlen + width - 1, block_l)
    nrows = batch * nblk_l
    dx = _new((batch, seqlen, channels), x.dtype, dev)
    dwin = _new((batch, channels, width - 1), initial_window.dtype, dev) if need_dwin else None
    dw_part = _new((nrows, width, channels), torch.float32, dev) if need_dw else None
    db_part = _new((nrows, channels), torch.float32, dev) if need_db else None
    if batch and channels:
        dwin_t = dx if dwin is None else dwin
        _conv_bwd_kernel[(batch, nblk_l, nblk_c)](
            dz,
            x,
            win,
            weight,
            dx,
            dwin_t,
            dz if dw_part is None else dw_part,
            dz if db_part is None else db_part,
            seqlen,
            channels,
            *x.stride(),
            swb,
            swc,
            swk,
            *weight.stride(),
            *dx.stride(),
            *(dwin.stride() if dwin is not None else (0, 0, 0)),
            WIDTH=width,
            HAS_WIN=initial_window is not None,
            NEED_DWIN=need_dwin,
            NEED_DW=need_dw,
            NEED_DB=need_db,
            BLOCK_L=block_l,
            BLOCK_C=block_c,
            **launch_warps(block_l * block_c),
        )
    dweight = None
    if need_dw:
        dweight = dw_part.sum(dim=0).t().to(weight.dtype) if nrows else torch.zeros_like(weight)
    dbias = None
    if need_db:
        dbias = db_part.sum(dim=0).to(bias.dtype) if nrows else torch.zeros_like(bias)
    return (dx if need_dx else None), dweight, dbias, dwin


def _silu_flag(activation: str | None) -> bool:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return activation is not None


class CausalConv1dFn(torch.autograd.Function):
    """Autograd wrapper: saves only the inputs it needs; recomputes ``z`` in backward.

    ``forward(x (b,l,c), weight (c,w), bias (c,)|None, initial_window (b,c,w-1)|None,
    activation, return_final_window)`` returns ``y`` or ``(y, final_window)``; the final
    window is not differentiable (it is a copy of inputs, used to continue decoding).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        initial_window: Tensor | None,
        activation: str | None,
        return_final_window: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        y = conv1d_forward(x, weight, bias, initial_window, activation)
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.has_win = initial_window is not None
        ctx.save_for_backward(x, weight, bias, initial_window)
        if not return_final_window:
            return y
        final = _final_window(x, initial_window, weight.shape[1])
        ctx.mark_non_differentiable(final)
        return y, final

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: Tensor, *unused: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, weight, bias, initial_window = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        dx, dw, db, dwin = conv1d_backward(
            dy,
            x,
            weight,
            bias,
            initial_window,
            ctx.activation,
            needs,  # type: ignore[arg-type]
        )
        return dx, dw, db, dwin, None, None
