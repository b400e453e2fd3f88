"""Triton single-token kernels for sequential (decoding) mode: conv1d step and SSD step.

No autograd: sequential mode runs under ``torch.no_grad``. Both return new tensors and never
modify their inputs, like the references :func:`ilm_kernels.conv1d.causal_conv1d_step` and
:func:`ilm_kernels.ssd.ssd_step`. Accumulation is in float32.

Shapes: ``b`` batch, ``c`` channels, ``w`` conv width, ``h`` heads, ``p`` head dim, ``g`` groups
of B/C, ``n`` state dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["DEBUG_POISON", "conv1d_step_triton", "ssd_step_triton"]

#: Debug/test switch: NaN-fill every freshly allocated output before the kernels run.
DEBUG_POISON: bool = False

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _new(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised output, NaN-filled when :data:`DEBUG_POISON` is set."""
    if DEBUG_POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check_dtypes(name: str, *tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"triton {name} supports {_KERNEL_DTYPES}, got {t.dtype}")


@triton.jit
def _conv_step_kernel(
    win_ptr,
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    new_win_ptr,
    channels,
    stride_wb,
    stride_wc,
    stride_wk,
    stride_xb,
    stride_xc,
    stride_weight_c,
    stride_weight_k,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (b, cdiv(c, BLOCK_C)). Outputs y (b, c) and new_window (b, c, w-1) contiguous.

    full = [window, x] (BLOCK_C, w); y = act(bias + sum_j weight[:, j] full[:, j]);
    new_window = full[:, 1:].
    """
    b = tl.program_id(0).to(tl.int64)  # offsets in int64: the tensors may pass 2**31 elements
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < channels
    k = tl.arange(0, BLOCK_K)  # window slots 0 .. w-2 (BLOCK_K >= w-1, >= 1)
    kmask = k < WIDTH - 1
    mask2 = cmask[:, None] & kmask[None, :]

    win = tl.load(
        win_ptr + b * stride_wb + cols[:, None] * stride_wc + k[None, :] * stride_wk,
        mask=mask2,
        other=0.0,
    ).to(tl.float32)  # (BLOCK_C, BLOCK_K)
    x = tl.load(x_ptr + b * stride_xb + cols * stride_xc, mask=cmask, other=0.0).to(tl.float32)
    w_win = tl.load(
        w_ptr + cols[:, None] * stride_weight_c + k[None, :] * stride_weight_k,
        mask=mask2,
        other=0.0,
    ).to(tl.float32)
    w_last = tl.load(
        w_ptr + cols * stride_weight_c + (WIDTH - 1) * stride_weight_k, mask=cmask, other=0.0
    ).to(tl.float32)

    y = tl.sum(win * w_win, axis=1) + w_last * x
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + b * channels + cols, y.to(y_ptr.dtype.element_ty), mask=cmask)

    # new_window[:, k] = window[:, k + 1] for k < w-2, and x for k = w-2.
    if WIDTH > 1:
        nxt = tl.load(
            win_ptr + b * stride_wb + cols[:, None] * stride_wc + (k[None, :] + 1) * stride_wk,
            mask=cmask[:, None] & (k < WIDTH - 2)[None, :],
            other=0.0,
        ).to(tl.float32)
        nxt = tl.where((k == WIDTH - 2)[None, :], x[:, None], nxt)
        tl.store(
            new_win_ptr + (b * channels + cols[:, None]) * (WIDTH - 1) + k[None, :],
            nxt.to(new_win_ptr.dtype.element_ty),
            mask=mask2,
        )


@triton.jit
def _ssd_step_kernel(
    s_ptr,
    x_ptr,
    dt_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    y_ptr,
    new_s_ptr,
    nheads,
    headdim,
    dstate,
    heads_per_group,
    stride_sb,
    stride_sh,
    stride_sp,
    stride_sn,
    stride_xb,
    stride_xh,
    stride_xp,
    stride_dtb,
    stride_dth,
    stride_bb,
    stride_bg,
    stride_bn,
    stride_cb,
    stride_cg,
    stride_cn,
    D_MODE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (b, h, cdiv(p, BLOCK_P)). Outputs y (b, h, p) and new_state (b, h, p, n) contiguous.

    S' = exp(dt A) S + dt x (outer) B;  y = S' C + D x.  D_MODE: 0 none, 1 (h,), 2 (h, p).
    """
    b = tl.program_id(0).to(tl.int64)  # offsets in int64: the state may pass 2**31 elements
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pmask = p < headdim
    nmask = n < dstate
    mask = pmask[:, None] & nmask[None, :]
    grp = h // heads_per_group

    dt = tl.load(dt_ptr + b * stride_dtb + h * stride_dth).to(tl.float32)
    a = tl.load(a_ptr + h).to(tl.float32)
    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + p * stride_xp, mask=pmask, other=0.0)
    x = x.to(tl.float32)
    bv = tl.load(b_ptr + b * stride_bb + grp * stride_bg + n * stride_bn, mask=nmask, other=0.0)
    cv = tl.load(c_ptr + b * stride_cb + grp * stride_cg + n * stride_cn, mask=nmask, other=0.0)
    s_off = b * stride_sb + h * stride_sh + p[:, None] * stride_sp + n[None, :] * stride_sn
    s = tl.load(s_ptr + s_off, mask=mask, other=0.0).to(tl.float32)

    s = tl.exp(dt * a) * s + (dt * x)[:, None] * bv.to(tl.float32)[None, :]
    y = tl.sum(s * cv.to(tl.float32)[None, :], axis=1)
    if D_MODE == 1:
        y += tl.load(d_ptr + h).to(tl.float32) * x
    if D_MODE == 2:
        y += tl.load(d_ptr + h * headdim + p, mask=pmask, other=0.0).to(tl.float32) * x

    row = b * nheads + h
    tl.store(y_ptr + row * headdim + p, y.to(y_ptr.dtype.element_ty), mask=pmask)
    new_off = (row * headdim + p[:, None]) * dstate + n[None, :]
    tl.store(new_s_ptr + new_off, s.to(new_s_ptr.dtype.element_ty), mask=mask)


def conv1d_step_triton(
    window: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of the causal depthwise conv1d (optionally followed by SiLU).

    Args:
        window: (b, c, w-1) previous inputs, oldest first; x: (b, c); weight: (c, w);
        bias: (c,) or None; activation: None or "silu".

    Returns:
        y (b, c) in ``x.dtype``; new_window (b, c, w-1) in ``window.dtype``.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    _check_dtypes("conv1d step", window, x, weight, bias)
    batch, channels = x.shape
    width = weight.shape[-1]
    if tuple(weight.shape) != (channels, width) or tuple(window.shape) != (
        batch,
        channels,
        width - 1,
    ):
        raise ValueError(
            f"shapes: window {tuple(window.shape)} must be (b, c, w-1), x {tuple(x.shape)} "
            f"(b, c), weight {tuple(weight.shape)} (c, w)"
        )
    y = _new((batch, channels), x.dtype, x.device)
    new_window = _new((batch, channels, width - 1), window.dtype, x.device)
    if batch and channels:
        block_c = min(triton.next_power_of_2(channels), 256)
        _conv_step_kernel[(batch, triton.cdiv(channels, block_c))](
            window,
            x,
            weight,
            x if bias is None else bias,
            y,
            new_window,
            channels,
            *(window.stride() if width > 1 else (0, 0, 0)),
            *x.stride(),
            *weight.stride(),
            WIDTH=width,
            HAS_BIAS=bias is not None,
            SILU=activation is not None,
            BLOCK_C=block_c,
            BLOCK_K=max(triton.next_power_of_2(width - 1), 1),
        )
    return y, new_window


def ssd_step_triton(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of the SSD recurrence.

    Args:
        state: (b, h, p, n); x: (b, h, p); dt: (b, h) positive; A: (h,); B, C: (b, g, n) with
        ``h % g == 0``; D: (h,) or (h, p) or None.

    Returns:
        y (b, h, p) in ``x.dtype``; new_state (b, h, p, n) in ``state.dtype``.
    """
    _check_dtypes("ssd step", state, x, dt, A, B, C, D)
    batch, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    if ngroups <= 0 or nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    if tuple(state.shape) != (batch, nheads, headdim, dstate) or C.shape != B.shape:
        raise ValueError(
            f"shapes: state {tuple(state.shape)} must be (b, h, p, n) = "
            f"{(batch, nheads, headdim, dstate)}; B {tuple(B.shape)} and C {tuple(C.shape)} "
            "must be equal (b, g, n)"
        )
    if dstate == 0:
        raise ValueError("state dim n must be positive")
    if tuple(dt.shape) != (batch, nheads) or tuple(A.shape) != (nheads,):
        raise ValueError(f"dt must be (b, h), A (h,); got {tuple(dt.shape)}, {tuple(A.shape)}")
    if D is None:
        d_mode, d_arg = 0, x
    elif tuple(D.shape) == (nheads,):
        d_mode, d_arg = 1, D.contiguous()
    elif tuple(D.shape) == (nheads, headdim):
        d_mode, d_arg = 2, D.contiguous()
    else:
        raise ValueError(f"D must be (h,) or (h, p), got {tuple(D.shape)}")
    A = A.contiguous()
    y = _new((batch, nheads, headdim), x.dtype, x.device)
    new_state = _new((batch, nheads, headdim, dstate), state.dtype, x.device)
    if y.numel():
        block_n = triton.next_power_of_2(dstate)
        block_p = max(1, min(triton.next_power_of_2(headdim), 8192 // block_n))
        _ssd_step_kernel[(batch, nheads, triton.cdiv(headdim, block_p))](
            state,
            x,
            dt,
            A,
            B,
            C,
            d_arg,
            y,
            new_state,
            nheads,
            headdim,
            dstate,
            nheads // ngroups,
            *state.stride(),
            *x.stride(),
            *dt.stride(),
            *B.stride(),
            *C.stride(),
            D_MODE=d_mode,
            BLOCK_P=block_p,
            BLOCK_N=block_n,
        )
    return y, new_state
