"""Fixed-point solvers for ``z = F(z)`` (DESIGN §2). Model-agnostic: ``f`` is any callable.

Two solvers:

* :func:`solve` — the training rule of the reference code: undamped ``z <- F(z)`` without autograd,
  relative residual per sample ``|F(z) - z| / (|F(z)| + 1e-9)`` over all of a sample's elements,
  stop when the largest residual in the batch is below ``tol`` or after ``max_iter`` evaluations,
  and return for each sample its lowest-residual iterate ``F(z)``.
* :func:`solve_damped_reference` — the reference code's evaluation loop: damped
  ``z <- lam F(z) + (1 - lam) z`` with one residual over the whole batch, then one undamped call.

Both run under ``torch.no_grad()``: nothing is kept for backward, so memory does not depend on the
number of iterations. Gradients come from :mod:`ilm_megatron.implicit.phantom`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

EPS = 1e-9


@dataclass
class SolverStats:
    """What a solve did.

    Attributes:
        iters: evaluations of ``F`` in the no-grad loop.
        residual: (b,) final relative residual of each sample's returned iterate.
        sample_iters: (b,) evaluations after which each sample first met the tolerance
            (``iters`` for samples that never did).
        tol: the tolerance used.
        solver: which solver ran ("train", "reference", "sequential", "explicit").
    """

    iters: int
    residual: torch.Tensor
    sample_iters: torch.Tensor
    tol: float
    solver: str = "train"

    @property
    def converged(self) -> torch.Tensor:
        """(b,) bool: residual below tolerance."""
        return self.residual < self.tol

    @property
    def converged_frac(self) -> float:
        return self.converged.float().mean().item() if self.residual.numel() else 1.0

    def summary(self) -> dict[str, float]:
        r = self.residual.float()
        return {
            "iters": float(self.iters),
            "iters_mean": self.sample_iters.float().mean().item(),
            "iters_max": self.sample_iters.max().item() if self.sample_iters.numel() else 0.0,
            "residual_mean": r.mean().item() if r.numel() else 0.0,
            "residual_max": r.max().item() if r.numel() else 0.0,
            "converged_frac": self.converged_frac,
        }


Reduce = Callable[[torch.Tensor], torch.Tensor]


def relative_residual(
    fz: torch.Tensor, z: torch.Tensor, reduce: Reduce | None = None
) -> torch.Tensor:
    """Per-sample ``|F(z) - z|_2 / (|F(z)|_2 + 1e-9)`` over all but the first dim. -> (b,).

    ``reduce``: when each process holds part of every sample (sequence parallelism), sums the
    (b, 2) squared norms over the processes holding the other parts.
    """
    if reduce is None:
        diff = (fz - z).flatten(1).float().norm(dim=1)
        return diff / (fz.flatten(1).float().norm(dim=1) + EPS)
    sq = torch.stack(
        [(fz - z).flatten(1).float().pow(2).sum(1), fz.flatten(1).float().pow(2).sum(1)], dim=1
    )
    sq = reduce(sq)
    return sq[:, 0].sqrt() / (sq[:, 1].sqrt() + EPS)


def damped(fz: torch.Tensor, z: torch.Tensor, damping: float) -> torch.Tensor:
    """The damped update ``damping * F(z) + (1 - damping) * z`` (``F(z)`` itself at 1): the
    phantom steps, the ring's phantom steps and the reference evaluation loop all take it."""
    return fz if damping == 1.0 else damping * fz + (1.0 - damping) * z


class FixedPointTracker:
    """The training solve's rule, one evaluation at a time (:func:`solve`, and the pipeline
    ring's last stage, which sees ``F(z)`` arrive micro-batch by micro-batch).

    Per sample: the relative residual of ``F(z)`` against ``z`` (:func:`relative_residual`),
    the lowest-residual iterate ``F(z)`` so far, and the evaluation at which it first met
    ``tol``. The solve stops when every sample's best residual is below ``tol`` or after
    ``max_iter`` evaluations; the next iterate is the undamped ``F(z)``.

    Args:
        z0: (b, ...) initial iterate (also the best iterate until an evaluation improves it).
        max_iter: the cap on evaluations.
        tol: per-sample tolerance.
        reduce: see :func:`relative_residual` (sequence parallelism).
    """

    def __init__(
        self, z0: torch.Tensor, max_iter: int, tol: float, reduce: Reduce | None = None
    ) -> None:
        b = z0.shape[0]
        self.max_iter, self.tol, self.reduce = max_iter, tol, reduce
        self.z = z0  # the current iterate
        self.best = z0
        self.best_res = torch.full((b,), float("inf"), device=z0.device)
        self.sample_iters = torch.full((b,), max_iter, device=z0.device, dtype=torch.long)
        self.it = 0

    def update(self, fz: torch.Tensor) -> bool:
        """Take ``F(z)`` (shaped like ``z``) of the current iterate; returns True when the solve
        stops here (a host sync: the batch maximum of the best residuals)."""
        self.it += 1
        res = relative_residual(fz, self.z, self.reduce)
        better = res < self.best_res
        mask = better.view(-1, *([1] * (fz.dim() - 1)))
        self.best = torch.where(mask, fz, self.best)
        self.best_res = torch.where(better, res, self.best_res)
        newly = (res < self.tol) & (self.sample_iters == self.max_iter)
        self.sample_iters = torch.where(
            newly, torch.full_like(self.sample_iters, self.it), self.sample_iters
        )
        self.z = fz
        return bool(self.best_res.max().item() < self.tol) or self.it >= self.max_iter

    def stats(self) -> SolverStats:
        """What the solve did (residual NaN when nothing was evaluated)."""
        if self.it == 0:
            nan = torch.full_like(self.best_res, float("nan"))
            return SolverStats(0, nan, self.sample_iters.clamp(max=0), self.tol, "train")
        return SolverStats(
            self.it, self.best_res, self.sample_iters.clamp(max=self.it), self.tol, "train"
        )


@torch.no_grad()
def solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    max_iter: int,
    tol: float,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, SolverStats]:
    """Undamped fixed-point iteration with per-sample best iterate (:class:`FixedPointTracker`).

    Args:
        f: the map ``F``; called on tensors shaped like ``z0``.
        z0: (b, ...) initial iterate.
        max_iter: at most this many evaluations of ``f`` (0 returns ``z0``).
        tol: stop when every sample's relative residual is below ``tol``.
        reduce: sums per-sample squared norms over the processes that hold the rest of each
            sample (:func:`relative_residual`); None when ``z`` is whole here.

    Returns:
        ``(z_star (b, ...), stats)``; ``z_star`` holds no autograd history.
    """
    track = FixedPointTracker(z0.detach().clone(), max_iter, tol, reduce)
    while track.it < max_iter:
        if track.update(f(track.z)):
            break
    return track.best, track.stats()


@torch.no_grad()
def solve_damped_reference(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    max_iter: int,
    tol: float,
    damping: float = 0.8,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, SolverStats]:
    """The reference code's evaluation loop.

    ``z <- damping * F(z) + (1 - damping) * z`` until the residual of the whole batch (one norm over
    every element) is below ``tol`` or ``max_iter`` evaluations, then one undamped ``z <- F(z)``.

    Returns:
        ``(z (b, ...), stats)``; ``stats.residual`` is the per-sample residual of the last step,
        ``stats.iters`` counts every evaluation including the final undamped one.
    """
    b = z0.shape[0]
    z = z0.detach().clone()
    it = 0
    while it < max_iter:
        fz = f(z)
        it += 1
        if reduce is None:
            batch_res = (fz - z).float().norm() / (fz.float().norm() + EPS)
        else:
            sq = reduce(torch.stack([(fz - z).float().pow(2).sum(), fz.float().pow(2).sum()]))
            batch_res = sq[0].sqrt() / (sq[1].sqrt() + EPS)
        z = damped(fz, z, damping)
        if batch_res.item() < tol:
            break
    fz = f(z)
    it += 1
    res = relative_residual(fz, z, reduce)
    iters = torch.full((b,), it, device=z0.device, dtype=torch.long)
    return fz, SolverStats(it, res, iters, tol, "reference")
