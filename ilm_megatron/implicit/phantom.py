"""Phantom gradients (Geng et al. 2021) at the fixed point (DESIGN §2).

After the no-grad solve, run ``k`` damped steps *with* autograd from the detached fixed point:

    z_0 = stop_grad(z*),   z_j = lam * F(z_{j-1}) + (1 - lam) * z_{j-1},   j = 1..k

and use ``z_k``. Its backward is a truncated, damped Neumann series of the implicit-function-
theorem gradient ``dL/dz* (I - J_F)^{-1} dF/dtheta``: as ``k`` grows it approaches the exact
implicit gradient when ``F`` is contractive. Memory held for backward is that of ``k`` evaluations
of ``F``, whatever the number of solver iterations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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
        z = fz if damping == 1.0 else damping * fz + (1.0 - damping) * z
    return z


class _PhantomRecompute(torch.autograd.Function):
    """``k`` damped steps that keep only the iterates and recompute ``F`` in backward.

    Forward saves ``z_0 .. z_{k-1}`` (k tensors shaped like ``z``), not the activations of the
    ``k`` evaluations; backward walks the steps in reverse, re-evaluates ``F(z_{j-1})`` with
    autograd, and takes its vector-Jacobian product:

        g_{j-1} = lam * J_F(z_{j-1})^T g_j + (1 - lam) * g_j,
        dL/dw  += lam * (dF/dw)(z_{j-1})^T g_j   for every input w of F (injection, parameters).
    """

    @staticmethod
    def forward(ctx, z0, k, damping, f, n_inputs, *inputs):  # noqa: D401
        ctx.f, ctx.k, ctx.damping, ctx.n_inputs = f, k, damping, n_inputs
        iterates = []
        z = z0
        with torch.no_grad():
            for _ in range(k):
                iterates.append(z)
                fz = f(z)
                z = fz if damping == 1.0 else damping * fz + (1.0 - damping) * z
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
        for z_prev in reversed(iterates):
            with torch.enable_grad():
                z_in = z_prev.detach().requires_grad_(True)
                fz = ctx.f(z_in)
                parts = torch.autograd.grad(
                    fz,
                    [z_in] + [inputs[i] for i in want],
                    grad_outputs=lam * g,
                    allow_unused=True,
                )
            g = parts[0] + (1.0 - lam) * g if lam != 1.0 else parts[0]
            for i, gi in zip(want, parts[1:]):
                if gi is not None:
                    grads[i] = gi if grads[i] is None else grads[i] + gi
        # z0 is detached by construction: no gradient flows into the solver
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
        f: the map ``F``; must be a deterministic function of ``z`` and ``inputs``.
        z_star: (b, ...) fixed point (treated as a constant).
        k, damping: as in :func:`phantom_steps`.
        inputs: every tensor ``F`` reads that needs a gradient (the injection, the parameters).

    Returns:
        ``z_k`` (b, ...), differentiable with respect to ``inputs``.
    """
    if k < 1:
        raise ValueError(f"phantom gradient needs k >= 1 steps, got {k}")
    return _PhantomRecompute.apply(z_star.detach(), k, damping, f, len(inputs), *inputs)
