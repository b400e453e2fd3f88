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
