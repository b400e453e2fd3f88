"""Dispatching public entry points of the kernels: conv1d, (gated) RMS norm, decoding steps.

Each op takes ``backend`` (see :mod:`ilm_kernels.backend`):

* ``"auto"`` -- our Triton kernels for CUDA tensors in float16/bfloat16/float32, the PyTorch
  reference otherwise (CPU tensors, float64). For :func:`causal_conv1d`, ``prefer_package=True``
  makes "auto" use the ``causal_conv1d`` package on CUDA when it is installed.
* ``"reference"`` -- the PyTorch references of :mod:`ilm_kernels.conv1d`, ``.norm``, ``.ssd``.
* ``"triton"`` -- our Triton kernels (CPU tensors only under ``TRITON_INTERPRET=1``).
* ``"mamba_ssm"`` -- the mamba-ssm stack where it has the op (conv1d via its ``causal_conv1d``
  dependency, gated RMS norm, and for decoding ``causal_conv1d_update`` and
  ``selective_state_update``; a step op whose package kernel is missing runs ours, warning).

Optional packages are imported once (:func:`ilm_kernels.backend.optional_import`): one that is
installed but fails to import (an ABI-broken CUDA extension) warns and "auto" falls back to our
kernels. "auto" uses ``causal_conv1d`` only for input it accepts
(:func:`conv1d_package_refuses`: widths 2 to 4, channels a multiple of 8).

Importing this module imports neither triton nor any CUDA package: they load on first use.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import BackendUnavailableError, optional_failure, optional_import, resolve_backend
from .conv1d import causal_conv1d_reference, causal_conv1d_step
from .norm import gated_rms_norm, rms_norm
from .ssd import ssd_step

__all__ = [
    "causal_conv1d",
    "causal_conv1d_step_op",
    "gated_rms_norm_op",
    "rms_norm_op",
    "ssd_step_op",
]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACTIVATIONS = (None, "silu", "swish")


def _backend(backend: str, *tensors: Tensor | None) -> str:
    """resolve_backend, with "auto" falling back to the reference for dtypes Triton lacks."""
    resolved = resolve_backend(backend, *tensors)
    if (
        backend == "auto"
        and resolved == "triton"
        and any(t is not None and t.dtype not in _TRITON_DTYPES for t in tensors)
    ):
        return "reference"
    return resolved


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")


# --------------------------------------------------------------------------------------------
# Causal depthwise conv1d
# --------------------------------------------------------------------------------------------


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_window: Tensor | None = None,
    return_final_window: bool = False,
    activation: str | None = None,
    backend: str = "auto",
    prefer_package: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal depthwise conv1d over a channels-last sequence, optionally followed by SiLU.

    Args:
        x: (b, l, c) inputs, channels last (any strides).
        weight: (c, w) per-channel filters; ``weight[:, -1]`` multiplies the current input.
        bias: (c,) or None.
        initial_window: (b, c, w-1) the w-1 inputs preceding ``x`` (oldest first), or None.
        return_final_window: also return the last w-1 inputs, (b, c, w-1), to continue from.
        activation: None or "silu" (applied after the bias, as in Mamba2).
        backend: "auto" | "reference" | "triton" | "mamba_ssm" (the ``causal_conv1d`` package).
        prefer_package: with backend "auto" on CUDA, use the ``causal_conv1d`` package when it
            is installed (imported lazily, never at import time).

    Returns:
        y: (b, l, c) in ``x.dtype``; and, if ``return_final_window``, final_window
        (b, c, w-1) in ``x.dtype`` (not differentiable on the Triton and package paths).
    """
    _check_activation(activation)
    resolved = _backend(backend, x, weight, bias, initial_window)
    if resolved == "mamba_ssm":
        fn = optional_import("causal_conv1d", "causal_conv1d_fn")
        if fn is None:
            raise BackendUnavailableError(
                f"the causal_conv1d package {optional_failure('causal_conv1d')} "
                "(pip install causal-conv1d)"
            )
        refused = conv1d_package_refuses(x, weight)
        if refused:
            raise BackendUnavailableError(
                f"the causal_conv1d package refuses this input: {refused}"
            )
        return _causal_conv1d_package(
            fn, x, weight, bias, initial_window, return_final_window, activation
        )
    if backend == "auto" and resolved == "triton" and prefer_package:
        fn = (
            None
            if conv1d_package_refuses(x, weight)
            else optional_import("causal_conv1d", "causal_conv1d_fn")
        )
        if fn is not None:
            return _causal_conv1d_package(
                fn, x, weight, bias, initial_window, return_final_window, activation
            )
    if resolved == "reference":
        out = causal_conv1d_reference(x, weight, bias, initial_window, return_final_window)
        if activation is None:
            return out
        if return_final_window:
            return F.silu(out[0]), out[1]
        return F.silu(out)

    from .conv1d_triton import CausalConv1dFn, _final_window, conv1d_forward

    if _needs_grad(x, weight, bias, initial_window):
        return CausalConv1dFn.apply(
            x, weight, bias, initial_window, activation, return_final_window
        )
    y = conv1d_forward(x, weight, bias, initial_window, activation)
    if not return_final_window:
        return y
    return y, _final_window(x, initial_window, weight.shape[1])


def conv1d_package_refuses(x: Tensor, weight: Tensor) -> str | None:
    """Why the ``causal_conv1d`` package cannot take this input, or None when it can.

    It runs CUDA tensors in fp16/bf16/fp32 with filter widths 2 to 4, and its channels-last
    path (our (b, l, c) layout) needs the channel count to be a multiple of 8.
    """
    channels, width = weight.shape
    if not 2 <= width <= 4:
        return f"filter width {width} (it supports 2 to 4)"
    if channels % 8:
        return f"{channels} channels (its channels-last path needs a multiple of 8)"
    if x.dtype not in _TRITON_DTYPES:
        return f"dtype {x.dtype}"
    if not x.is_cuda:
        return "it runs on CUDA tensors only"
    return None


def _causal_conv1d_package(
    causal_conv1d_fn: Any,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    initial_window: Tensor | None,
    return_final_window: bool,
    activation: str | None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The ``causal_conv1d`` package (CUDA): its channels-last layout is our (b, l, c).

    It takes x as (b, c, l) with stride(1) == 1 and initial states as (b, c, w-1) with
    stride(1) == 1, which are transposed views of contiguous (b, l, c) / (b, w-1, c) tensors.
    """
    x_cl = x.contiguous().transpose(1, 2)  # (b, c, l), channels-last memory
    init = None
    if initial_window is not None:
        init = initial_window.transpose(1, 2).contiguous().transpose(1, 2)
    out = causal_conv1d_fn(
        x_cl,
        weight,
        bias,
        initial_states=init,
        return_final_states=return_final_window,
        activation=activation,
    )
    if return_final_window:
        y, final = out
        return y.transpose(1, 2), final.to(x.dtype)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------------------------
# RMS norms
# --------------------------------------------------------------------------------------------


def gated_rms_norm_op(
    x: Tensor,
    gate: Tensor,
    weight: Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Mamba2's gated RMS norm: ``rmsnorm_per_group(x * silu(gate)) * weight``.

    Args:
        x: (..., d) inputs; gate: (..., d); weight: (d,); eps: added to the mean square;
        group_size: channels per normalisation group, dividing d (None = d, one group).
        backend: "auto" | "reference" | "triton" | "mamba_ssm".

    Returns:
        (..., d) in ``x.dtype``.
    """
    resolved = _backend(backend, x, gate, weight)
    if resolved == "reference":
        return gated_rms_norm(x, gate, weight, eps, group_size)
    if resolved == "mamba_ssm":
        module = "mamba_ssm.ops.triton.layernorm_gated"
        rmsnorm_fn = optional_import(module, "rmsnorm_fn")
        if rmsnorm_fn is None:
            raise BackendUnavailableError(f"mamba_ssm's gated RMS norm {optional_failure(module)}")
        return rmsnorm_fn(
            x, weight, None, z=gate, eps=eps, group_size=group_size, norm_before_gate=False
        )
    return _rms_triton(x, gate, weight, eps, group_size)


def rms_norm_op(x: Tensor, weight: Tensor, eps: float = 1e-5, backend: str = "auto") -> Tensor:
    """RMS norm over the last dimension: ``x * rsqrt(mean(x**2) + eps) * weight``.

    Args:
        x: (..., d) inputs; weight: (d,); eps: added to the mean square;
        backend: "auto" | "reference" | "triton" ("mamba_ssm" runs our Triton kernel).

    Returns:
        (..., d) in ``x.dtype``.
    """
    resolved = _backend(backend, x, weight)
    if resolved == "reference":
        return rms_norm(x, weight, eps)
    return _rms_triton(x, None, weight, eps, None)


def _rms_triton(
    x: Tensor, gate: Tensor | None, weight: Tensor, eps: float, group_size: int | None
) -> Tensor:
    from .norm_triton import GatedRMSNormFn, rms_norm_forward

    if _needs_grad(x, gate, weight):
        return GatedRMSNormFn.apply(x, gate, weight, eps, group_size)
    return rms_norm_forward(x, gate, weight, eps, group_size)[0]


# --------------------------------------------------------------------------------------------
# Decoding steps (no autograd on the Triton path)
# --------------------------------------------------------------------------------------------


def _step_backend(backend: str, name: str, *tensors: Tensor | None) -> str:
    resolved = _backend(backend, *tensors)
    if resolved in ("triton", "mamba_ssm") and _needs_grad(*tensors):
        raise RuntimeError(
            f"{name}: the {resolved} step kernel has no autograd; call it under torch.no_grad() "
            "or use backend='reference'"
        )
    return resolved


def _package_step(module: str, attr: str, name: str) -> Any | None:
    """mamba-ssm's (or causal_conv1d's) decoding kernel, or None with a warning: ours run."""
    fn = optional_import(module, attr)
    if fn is None:
        warnings.warn(
            f"{name}: backend 'mamba_ssm' wants {module}.{attr}, which {optional_failure(module)};"
            " running ilm_kernels' Triton step kernel instead",
            RuntimeWarning,
            stacklevel=3,
        )
    return fn


def _conv1d_step_package(
    update: Any, window: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, act: str | None
) -> tuple[Tensor, Tensor]:
    """``causal_conv1d_update(x (b, c), conv_state (b, c, w-1), ...)`` updates the state in
    place and returns y (b, c); ours leaves ``window`` alone, so it works on a copy."""
    new_window = window.clone()
    y = update(x, new_window, weight, bias, activation=act)
    return y, new_window


def _ssd_step_package(
    update: Any,
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """mamba-ssm's ``selective_state_update(state (b, h, p, n), x (b, h, p), dt (b, h, p),
    A (h, p, n), B (b, g, n), C (b, g, n), D (h, p))``, which updates ``state`` in place: on a
    copy, with our per-head dt, A and D broadcast to its per-channel layout (as Mamba2 does)."""
    b, h, p, n = state.shape
    new_state = state.clone()
    dt_e = dt[:, :, None].expand(b, h, p)
    A_e = A[:, None, None].expand(h, p, n)
    D_e = None if D is None else (D[:, None].expand(h, p) if D.dim() == 1 else D)
    y = update(new_state, x, dt_e, A_e, B, C, D=D_e)
    return y, new_state


def causal_conv1d_step_op(
    window: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One token of the causal depthwise conv1d (decoding); does not modify ``window``.

    Args:
        window: (b, c, w-1) previous inputs, oldest first; x: (b, c) current input;
        weight: (c, w); bias: (c,) or None; activation: None or "silu";
        backend: "auto" | "reference" | "triton".

    Returns:
        y (b, c) in ``x.dtype``; new_window (b, c, w-1) in ``window.dtype``.
    """
    _check_activation(activation)
    resolved = _step_backend(backend, "causal_conv1d_step_op", window, x, weight, bias)
    if resolved == "reference":
        y, new_window = causal_conv1d_step(window, x, weight, bias)
        return (y if activation is None else F.silu(y)), new_window
    if resolved == "mamba_ssm" and not conv1d_package_refuses(x[:, None, :], weight):
        update = _package_step("causal_conv1d", "causal_conv1d_update", "causal_conv1d_step_op")
        if update is not None:
            return _conv1d_step_package(update, window, x, weight, bias, activation)
    from .step_triton import conv1d_step_triton

    return conv1d_step_triton(window, x, weight, bias, activation)


def ssd_step_op(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One token of the SSD recurrence: ``S' = exp(dt A) S + dt x B^T``, ``y = S' C + D x``.

    Args:
        state: (b, h, p, n); x: (b, h, p); dt: (b, h) positive; A: (h,) negative;
        B, C: (b, g, n) with h a multiple of g; D: (h,) or (h, p) or None;
        backend: "auto" | "reference" | "triton".

    Returns:
        y (b, h, p) in ``x.dtype``; new_state (b, h, p, n) in ``state.dtype``.
    """
    tensors: tuple[Any, ...] = (state, x, dt, A, B, C, D)
    resolved = _step_backend(backend, "ssd_step_op", *tensors)
    if resolved == "reference":
        return ssd_step(state, x, dt, A, B, C, D)
    if resolved == "mamba_ssm":
        module = "mamba_ssm.ops.triton.selective_state_update"
        update = _package_step(module, "selective_state_update", "ssd_step_op")
        if update is not None:
            return _ssd_step_package(update, state, x, dt, A, B, C, D)
    from .step_triton import ssd_step_triton

    return ssd_step_triton(state, x, dt, A, B, C, D)
