"""Sequential (RNN) mode: solve the fixed point one token at a time (DESIGN §2).

For token ``t`` the map is ``F_t(z) = F(z; x_t, cache_{t-1})``: every inner iteration reads the
caches of the previous tokens and never writes them. Once the inner solve has converged, one final
call at the solution produces the output and the cache update, which the caller commits. This is an
RNN step with an inner fixed-point loop; at convergence it gives the same values as the
simultaneous solve of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ilm_megatron.implicit.solver import PICARD, SolveOptions, SolverStats, solve

StepFn = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]


@torch.no_grad()
def solve_token(
    step: StepFn, z0: torch.Tensor, max_iter: int, tol: float, opts: SolveOptions = PICARD
) -> tuple[torch.Tensor, Any, SolverStats]:
    """Solve ``z = F_t(z)`` for one token, then make the final (cache-writing) call.

    Args:
        step: ``z (b, d) -> (F_t(z) (b, d), cache update)``; must not modify any cache.
        z0: (b, d) initial iterate (zeros, or the previous token's solution when warm-starting).
        max_iter: cap on inner evaluations (the final call is not counted).
        tol: per-sample relative residual tolerance (batch maximum decides).
        opts: the iteration (Anderson, safeguards, early exit by masking).

    Returns:
        ``(F_t(z*) (b, d), cache update from the final call, stats)``.
    """
    z_star, stats = solve(lambda z: step(z)[0], z0, max_iter, tol, opts=opts)
    out, update = step(z_star)
    stats.solver = "sequential"
    return out, update, stats
