"""PyTorch reference implementation of Mamba2's causal depthwise conv1d.

Notation (shapes): ``b`` batch, ``l`` sequence length, ``c`` channels, ``w`` kernel width.

For every channel ``c`` (no activation inside; the caller applies SiLU)::

    y_t[c] = bias[c] + sum_{j=0}^{w-1} weight[c, j] * x_{t-(w-1)+j}[c]

so ``weight[:, -1]`` multiplies the current input. This is ``torch.nn.Conv1d(c, c, w,
groups=c, padding=w-1)`` with its output truncated to the first ``l`` positions, and
``weight`` has the layout of that module's ``weight[:, 0, :]``.

The "window" is the cache of the previous ``w - 1`` inputs, (b, c, w-1), oldest first.
Computation is in at least float32; ``y`` is returned in the dtype of ``x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dtype import compute_dtype as _compute_dtype

__all__ = ["causal_conv1d_reference", "causal_conv1d_step"]


def causal_conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_window: Tensor | None = None,
    return_final_window: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal depthwise conv1d over a channels-last sequence (differentiable).

    Args:
        x: (b, l, c) inputs, channels last.
        weight: (c, w) per-channel filters; ``weight[:, -1]`` multiplies the current input.
        bias: (c,) or None.
        initial_window: (b, c, w-1) the w-1 inputs preceding ``x`` (oldest first), or None
            (zeros, i.e. the start of a sequence).
        return_final_window: also return the window to continue from after ``x``.

    Returns:
        y: (b, l, c) in ``x.dtype``; and, if ``return_final_window``, final_window
        (b, c, w-1) in ``x.dtype``: the last w-1 inputs, reaching back into
        ``initial_window`` when l < w-1.
    """
    batch, seqlen, channels = x.shape
    width = weight.shape[-1]
    dtype = _compute_dtype(x, weight, bias, initial_window)

    # 1. Channels first, in the compute dtype: (b, l, c) -> (b, c, l).
    xt = x.to(dtype).transpose(1, 2)

    # 2. Prepend the window of previous inputs (zeros = causal left padding).
    if initial_window is None:
        window = xt.new_zeros(batch, channels, width - 1)
    else:
        window = initial_window.to(dtype)
    x_full = torch.cat([window, xt], dim=-1)  # (b, c, w-1+l)

    # 3. Depthwise "valid" convolution (cross-correlation): output length is exactly l.
    y = F.conv1d(
        x_full,
        weight.to(dtype)[:, None, :],
        None if bias is None else bias.to(dtype),
        groups=channels,
    )  # (b, c, l)
    y = y.transpose(1, 2).to(x.dtype)

    if not return_final_window:
        return y
    # 4. The last w-1 inputs (positions l .. l+w-2 of x_full).
    final_window = x_full[..., seqlen:].to(x.dtype)
    return y, final_window


def causal_conv1d_step(
    window: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of the causal depthwise conv1d (decoding). Does not modify ``window``.

    Args:
        window: (b, c, w-1) the previous w-1 inputs, oldest first.
        x: (b, c) the current input.
        weight: (c, w) per-channel filters.
        bias: (c,) or None.

    Returns:
        y: (b, c) in ``x.dtype``; new_window: (b, c, w-1) in ``window.dtype`` (shifted by one,
        ending with ``x``).
    """
    dtype = _compute_dtype(window, x, weight, bias)

    # 1. The full receptive field: previous w-1 inputs then the current one, (b, c, w).
    full = torch.cat([window.to(dtype), x.to(dtype)[..., None]], dim=-1)

    # 2. Dot product with the filter per channel, plus bias.
    y = (full * weight.to(dtype)).sum(dim=-1)
    if bias is not None:
        y = y + bias.to(dtype)

    # 3. Shift the window: drop the oldest input.
    new_window = full[..., 1:].to(window.dtype)
    return y.to(x.dtype), new_window
