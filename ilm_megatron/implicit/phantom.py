"""Phantom gradients (Geng et al. 2021) at the fixed point (DESIGN §2).

After the no-grad solve, run ``k`` damped steps *with* autograd from the detached fixed point:

    z_0 = stop_grad(z*),   z_j = lam * F(z_{j-1}) + (1 - lam) * z_{j-1},   j = 1..k

and use ``z_k``. Its backward is a truncated, damped Neumann series of the implicit-function-
theorem gradient ``dL/dz* (I - J_F)^{-1} dF/dtheta``: as ``k`` grows it approaches the exact
implicit gradient when ``F`` is contractive. Memory held for backward is that of ``k`` evaluations
of ``F``, whatever the number of solver iterations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ilm_megatron.implicit.solver import damped


def phantom_steps(
    f: Callable[[torch.Tensor], torch.Tensor], z_star: torch.Tensor, k: int, damping: float
) -> torch.Tensor:
    """``k`` damped steps with autograd from ``stop_grad(z_star)``.

    Args:
        f: the map ``F`` (its parameters and captured inputs receive gradients).
        z_star: (b, ...) fixed point from the solver.
        k: number of steps (>= 1).
        damping: ``lam`` in (0, 1]; 1 is the undamped step.

    Returns:
        ``z_k`` with the same shape as ``z_star``.
    """
    if k < 1:
        raise ValueError(f"phantom gradient needs k >= 1 steps, got {k}")
    z = z_star.detach()
    for _ in range(k):
        fz = f(z)
        z = damped(fz, z, damping)
    return z


def _autocast_state(device_type: str) -> dict[str, dict]:
    """The autocast settings in force now, per device type (``cpu`` and the inputs' device).

    Each entry holds what :class:`torch.autocast` takes back: ``enabled``, ``dtype``,
    ``cache_enabled``. Both are kept because autocast may be on for the CPU and an accelerator at
    once.
    """
    state = {}
    for dev in {"cpu", device_type}:
        if dev == "meta" or not torch.amp.is_autocast_available(dev):
            continue
        state[dev] = {
            "enabled": torch.is_autocast_enabled(dev),
            "dtype": torch.get_autocast_dtype(dev),
            "cache_enabled": torch.is_autocast_cache_enabled(),
        }
    return state


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CPU generator state, CUDA generator state of ``device`` or None)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class _PhantomRecompute(torch.autograd.Function):
    """``k`` damped steps that keep only the iterates and recompute ``F`` in backward.

    Forward saves ``z_0 .. z_{k-1}`` (k tensors shaped like ``z``), not the activations of the
    ``k`` evaluations; backward walks the steps in reverse, re-evaluates step ``j`` with autograd,
    ``z_j = lam * F(z_{j-1}) + (1 - lam) * z_{j-1}``, and takes its vector-Jacobian product:

        g_{j-1} = lam * J_F(z_{j-1})^T g_j + (1 - lam) * g_j,
        dL/dw  += lam * (dF/dw)(z_{j-1})^T g_j   for every input w of F (injection, parameters).

    The re-evaluation must be the function that ran in forward: forward records the autocast
    settings (so a bf16-autocast forward is not differentiated as an fp32 one) and the random
    generator state before each step (so dropout or any other draw repeats), and backward restores
    both around each re-evaluation; the caller's generator state is left as it was.
    """

    @staticmethod
    def forward(ctx, z0, k, damping, f, n_inputs, *inputs):  # noqa: D401
        ctx.f, ctx.k, ctx.damping, ctx.n_inputs = f, k, damping, n_inputs
        ctx.device = z0.device
        ctx.autocast = _autocast_state(z0.device.type)
        ctx.rng = []
        iterates = []
        z = z0
        with torch.no_grad():
            for _ in range(k):
                iterates.append(z)
                ctx.rng.append(_rng_state(z0.device))
                fz = f(z)
                z = damped(fz, z, damping)
        ctx.save_for_backward(*iterates, *inputs)
        return z

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        iterates, inputs = saved[: ctx.k], saved[ctx.k :]
        lam = ctx.damping
        want = [i for i, t in enumerate(inputs) if t.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        g = grad_out
        cuda = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            for j in reversed(range(ctx.k)):
                # z_0 is detached by construction (no gradient flows into the solver): the first
                # step needs the input gradients only
                need_z = j > 0
                if not need_z and not want:
                    break
                _set_rng_state(ctx.device, ctx.rng[j])
                with torch.enable_grad(), contextlib.ExitStack() as stack:
                    for dev, kwargs in ctx.autocast.items():
                        stack.enter_context(torch.autocast(dev, **kwargs))
                    z_in = iterates[j].detach().requires_grad_(need_z)
                    fz = ctx.f(z_in)
                    z_out = fz if lam == 1.0 else lam * fz + (1.0 - lam) * z_in
                    wrt = ([z_in] if need_z else []) + [inputs[i] for i in want]
                    parts = torch.autograd.grad(z_out, wrt, grad_outputs=g, allow_unused=True)
                if need_z:
                    g, parts = parts[0], parts[1:]
                for i, gi in zip(want, parts):
                    if gi is not None:
                        grads[i] = gi if grads[i] is None else grads[i] + gi
        return (None, None, None, None, None, *grads)


def phantom_steps_recompute(
    f: Callable[[torch.Tensor], torch.Tensor],
    z_star: torch.Tensor,
    k: int,
    damping: float,
    inputs: list[torch.Tensor],
) -> torch.Tensor:
    """Memory-lean phantom gradient: same values and gradients as :func:`phantom_steps`.

    Keeps ``k`` iterates instead of the activations of ``k`` evaluations of ``F`` and recomputes
    one evaluation at a time in backward (activation checkpointing per phantom step).

    Args:
        f: the map ``F`` of ``z`` and ``inputs``. It is evaluated again in backward under the
            autocast settings and from the random generator state (CPU, and CUDA for CUDA
            inputs) of forward, so mixed precision and random draws (dropout) repeat.
        z_star: (b, ...) fixed point (treated as a constant).
        k, damping: as in :func:`phantom_steps`.
        inputs: every tensor ``F`` reads that needs a gradient (the injection, the parameters).

    Returns:
        ``z_k`` (b, ...), differentiable with respect to ``inputs``.
    """
    if k < 1:
        raise ValueError(f"phantom gradient needs k >= 1 steps, got {k}")
    return _PhantomRecompute.apply(z_star.detach(), k, damping, f, len(inputs), *inputs)
