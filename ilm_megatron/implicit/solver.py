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

Beyond the reference (:class:`SolveOptions`, all off by default): Anderson acceleration
(regularised least squares over the last ``m`` residuals, history restarted when a step makes the
residual worse), divergence detection with a fallback (a sample whose residual grows past
``divergence_factor`` times its best goes back to its best iterate and continues damped), and
per-sample early exit (a sample stops at its first evaluation below ``tol``; :func:`solve` then
evaluates ``F`` on the unfinished samples only). See ``docs/solver.md``.
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
        method: the iteration ("picard" or "anderson").
        restarts: (b,) Anderson restarts and divergence fallbacks of each sample (None when
            the solve had neither enabled).
        evaluated_rows: sample-evaluations of ``F`` made (with early exit fewer than
            ``iters * b``; 0 when not counted).
    """

    iters: int
    residual: torch.Tensor
    sample_iters: torch.Tensor
    tol: float
    solver: str = "train"
    method: str = "picard"
    restarts: torch.Tensor | None = None
    evaluated_rows: int = 0

    @property
    def converged(self) -> torch.Tensor:
        """(b,) bool: residual below tolerance."""
        return self.residual < self.tol

    @property
    def converged_frac(self) -> float:
        return self.converged.float().mean().item() if self.residual.numel() else 1.0

    def summary(self) -> dict[str, float]:
        """Scalars for logs: iterations, residuals, the converged fraction; with Anderson or
        divergence detection ``restarts`` (summed over samples); with a counted solve
        ``evaluated_frac``, the sample-evaluations made over ``iters * b`` (below 1 when early
        exit left samples out)."""
        r = self.residual.float()
        out = {
            "iters": float(self.iters),
            "iters_mean": self.sample_iters.float().mean().item(),
            "iters_max": self.sample_iters.max().item() if self.sample_iters.numel() else 0.0,
            "residual_mean": r.mean().item() if r.numel() else 0.0,
            "residual_max": r.max().item() if r.numel() else 0.0,
            "converged_frac": self.converged_frac,
        }
        if self.restarts is not None:
            out["restarts"] = float(self.restarts.sum().item())
        if self.evaluated_rows and self.iters:
            out["evaluated_frac"] = self.evaluated_rows / (self.iters * self.residual.numel())
        return out


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


@dataclass(frozen=True)
class SolveOptions:
    """How the fixed-point iteration proceeds (``solver.*`` keys of the config; all defaults
    give the reference rule: undamped Picard iteration, the batch stops together).

    Attributes:
        method: "picard" (``z <- F(z)``) or "anderson" (Anderson acceleration, type II).
        anderson_m: Anderson history: the last ``m`` pairs ``(z, F(z))``.
        anderson_beta: Anderson mixing, ``z <- beta * sum a_j F(z_j) + (1 - beta) * sum a_j z_j``.
        anderson_lam: Tikhonov regularisation of the least squares, relative to the mean
            squared residual in the history.
        anderson_restart: a sample whose residual exceeds this many times its best so far
            drops its Anderson history (the next step is a plain ``F(z)``).
        divergence_factor: a sample whose residual exceeds this many times its best so far (or is
            not finite) has diverged: Anderson drops its history; after ``max_restarts`` (and
            always under Picard) it returns to its best iterate and continues with damped steps.
            0 turns detection off.
        fallback_damping: the damping of those fallback steps.
        max_restarts: Anderson restarts of a sample before it falls back to damped steps.
        early_exit: per-sample early exit: a sample stops at its first evaluation below ``tol``
            (its iterate is frozen there); the solve ends when every sample has stopped.
    """

    method: str = "picard"
    anderson_m: int = 5
    anderson_beta: float = 1.0
    anderson_lam: float = 1e-4
    anderson_restart: float = 2.0
    divergence_factor: float = 0.0
    fallback_damping: float = 0.5
    max_restarts: int = 2
    early_exit: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("picard", "anderson"):
            raise ValueError(f"method must be 'picard' or 'anderson', got {self.method!r}")
        if self.anderson_m < 1:
            raise ValueError(f"anderson_m must be >= 1, got {self.anderson_m}")

    @property
    def tracks_restarts(self) -> bool:
        return self.method == "anderson" or self.divergence_factor > 0


PICARD = SolveOptions()

_OPTION_KEYS = tuple(f for f in SolveOptions.__dataclass_fields__)


def solve_options(cfg: object) -> SolveOptions:
    """The :class:`SolveOptions` of a solver config (``solver.method``, ``solver.anderson_m``,
    ...): every field of the same name that ``cfg`` has."""
    return SolveOptions(**{k: getattr(cfg, k) for k in _OPTION_KEYS if hasattr(cfg, k)})


class _Anderson:
    """Per-sample Anderson history and the mixing step (type II, as in deep equilibrium models).

    Per sample, over the last ``m`` pairs ``(z_j, F(z_j))`` with residuals ``g_j = F(z_j) - z_j``,
    solves ``min_a |sum_j a_j g_j|^2 + lam |a|^2`` subject to ``sum_j a_j = 1`` through the
    bordered system ``[[0, 1^T], [1, G G^T + lam I]] [nu; a] = [1; 0]`` and returns
    ``beta * sum_j a_j F(z_j) + (1 - beta) * sum_j a_j z_j``. The history is a ring buffer of
    ``m`` slots (b, m, n); a slot a sample does not hold (before it is filled, or after the
    sample restarted) is pinned to ``a_j = 0``.
    """

    def __init__(self, opts: SolveOptions, z: torch.Tensor) -> None:
        b, m = z.shape[0], opts.anderson_m
        self.opts = opts
        self.X = z.new_zeros(b, m, z[0].numel())  # iterates z_j, flattened
        self.FX = torch.zeros_like(self.X)  # F(z_j)
        self.valid = torch.zeros(b, m, dtype=torch.bool, device=z.device)
        self.slot = 0  # where the next pair goes

    def restart(self, rows: torch.Tensor) -> None:
        """Forget the history of the samples in the (b,) bool mask ``rows``."""
        self.valid &= ~rows[:, None]

    def step(self, z: torch.Tensor, fz: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
        """Add ``(z, F(z))`` (b, ...) to the history and return the mixed next iterate."""
        o, j = self.opts, self.slot
        self.X[:, j] = z.flatten(1)
        self.FX[:, j] = fz.flatten(1)
        self.valid[:, j] = True
        self.slot = (j + 1) % o.anderson_m
        G = self.FX - self.X  # (b, m, n)
        gram = torch.bmm(G, G.transpose(1, 2)).double()  # (b, m, m)
        if reduce is not None:  # each process holds part of every sample
            gram = reduce(gram)
        b, m = self.valid.shape
        valid = self.valid
        eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
        gram = gram * (valid[:, :, None] & valid[:, None, :])
        scale = gram.diagonal(dim1=1, dim2=2).sum(1) / valid.sum(1)  # mean |g_j|^2 (b,)
        block = gram + (o.anderson_lam * scale.clamp(min=1e-30))[:, None, None] * eye
        # pinned slots: row j is the identity and column j is zero elsewhere, so a_j = 0
        pinned = ~valid
        block = torch.where(
            pinned[:, :, None] | pinned[:, None, :], eye * pinned[:, :, None], block
        )
        H = gram.new_zeros(b, m + 1, m + 1)
        H[:, 1:, 1:] = block
        H[:, 0, 1:] = valid
        H[:, 1:, 0] = valid
        rhs = gram.new_zeros(b, m + 1, 1)
        rhs[:, 0] = 1.0
        sol, info = torch.linalg.solve_ex(H, rhs)
        alpha = sol[:, 1:, 0]  # (b, m)
        ok = (info == 0) & torch.isfinite(alpha).all(1)
        plain = torch.zeros_like(alpha)
        plain[:, j] = 1.0  # a failed least squares: the plain step F(z)
        alpha = torch.where(ok[:, None], alpha, plain).to(self.X.dtype)
        mixed = torch.bmm(alpha[:, None], self.FX)[:, 0]
        if o.anderson_beta != 1.0:
            mixed = (
                o.anderson_beta * mixed
                + (1 - o.anderson_beta) * torch.bmm(alpha[:, None], self.X)[:, 0]
            )
        return mixed.view_as(z)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (b,) mask broadcast against ``like`` (b, ...)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


class FixedPointTracker:
    """The training solve's rule, one evaluation at a time (:func:`solve`, and the pipeline
    ring's last stage, which sees ``F(z)`` arrive micro-batch by micro-batch).

    Per sample: the relative residual of ``F(z)`` against ``z`` (:func:`relative_residual`),
    the lowest-residual iterate ``F(z)`` so far, and the evaluation at which it first met
    ``tol``. The solve stops when every sample's best residual is below ``tol`` or after
    ``max_iter`` evaluations. The next iterate, :attr:`z`, is the undamped ``F(z)`` unless
    ``opts`` asks for Anderson mixing, a damped fallback after a divergence, or (early exit) a
    finished sample's frozen best iterate.

    Args:
        z0: (b, ...) initial iterate (also the best iterate until an evaluation improves it).
        max_iter: the cap on evaluations.
        tol: per-sample tolerance.
        reduce: see :func:`relative_residual` (sequence parallelism).
        opts: the iteration (:class:`SolveOptions`); default plain Picard.
    """

    def __init__(
        self,
        z0: torch.Tensor,
        max_iter: int,
        tol: float,
        reduce: Reduce | None = None,
        opts: SolveOptions = PICARD,
    ) -> None:
        b, dev = z0.shape[0], z0.device
        self.max_iter, self.tol, self.reduce, self.opts = max_iter, tol, reduce, opts
        self.z = z0  # the current iterate
        self.best = z0
        self.best_res = torch.full((b,), float("inf"), device=dev)
        self.sample_iters = torch.full((b,), max_iter, device=dev, dtype=torch.long)
        self.it = 0
        self.done = torch.zeros(b, dtype=torch.bool, device=dev)  # early exit: stopped samples
        self.damped = torch.zeros(b, dtype=torch.bool, device=dev)  # divergence fallback
        self.restarts = torch.zeros(b, dtype=torch.long, device=dev)
        self.evaluated_rows = 0
        self._anderson = _Anderson(opts, z0) if opts.method == "anderson" else None

    @property
    def active(self) -> torch.Tensor:
        """(b,) bool: samples still iterated (all of them unless early exit stopped some)."""
        return ~self.done

    def update(self, fz: torch.Tensor, evaluated: int | None = None) -> bool:
        """Take ``F(z)`` (shaped like ``z``) of the current iterate; returns True when the solve
        stops here (a host sync: the batch maximum of the best residuals).

        Rows of samples that early exit has stopped are ignored (they may hold anything, e.g.
        ``z`` itself when ``F`` was evaluated on the other rows only). ``evaluated``: the rows
        of ``F`` actually computed (default: every row).
        """
        o = self.opts
        self.it += 1
        live = ~self.done
        self.evaluated_rows += fz.shape[0] if evaluated is None else evaluated
        res = relative_residual(fz, self.z, self.reduce)
        better = live & (res < self.best_res)
        self.best = torch.where(_rows(better, fz), fz, self.best)
        self.best_res = torch.where(better, res, self.best_res)
        newly = live & (res < self.tol) & (self.sample_iters == self.max_iter)
        self.sample_iters = torch.where(
            newly, torch.full_like(self.sample_iters, self.it), self.sample_iters
        )
        if o.early_exit:
            self.done = self.done | newly
        if o.tracks_restarts:
            diverged = self._guard(res, live)
        nxt = fz
        if self._anderson is not None:
            nxt = self._anderson.step(self.z, fz, self.reduce)
        if o.tracks_restarts:
            # fallen back: damped steps; just diverged: back to the best iterate, F(z) of the
            # lowest-residual pair
            nxt = torch.where(_rows(self.damped, fz), damped(fz, self.z, o.fallback_damping), nxt)
            nxt = torch.where(_rows(diverged, fz), self.best, nxt)
        if o.early_exit:
            nxt = torch.where(_rows(self.done, fz), self.best, nxt)
        self.z = nxt
        return bool(self.best_res.max().item() < self.tol) or self.it >= self.max_iter

    def _guard(self, res: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """The safeguards, after evaluation ``it`` with residuals ``res`` (b,). Anderson drops
        a sample's history when its residual exceeds ``anderson_restart`` times its best (the
        next step is then a plain one); a residual past ``divergence_factor`` times the best, or
        not finite, is a divergence: the sample returns to its best iterate, and under Picard
        (or after ``max_restarts`` Anderson restarts) continues with damped steps. Returns the
        (b,) mask of samples that diverged now."""
        o = self.opts
        seen = live & (self.it > 1)
        diverged = seen & ~torch.isfinite(res)
        if o.divergence_factor > 0:
            diverged = diverged | (seen & (res > o.divergence_factor * self.best_res))
        if self._anderson is not None:
            worse = seen & ~self.damped & (diverged | (res > o.anderson_restart * self.best_res))
            self._anderson.restart(worse)
            self.restarts = self.restarts + worse.long()
            fall_back = diverged & (self.restarts > o.max_restarts)
        else:
            self.restarts = self.restarts + (diverged & ~self.damped).long()
            fall_back = diverged
        self.damped = self.damped | fall_back
        return diverged

    def stats(self) -> SolverStats:
        """What the solve did (residual NaN when nothing was evaluated)."""
        restarts = self.restarts if self.opts.tracks_restarts else None
        if self.it == 0:
            nan = torch.full_like(self.best_res, float("nan"))
            return SolverStats(
                0, nan, self.sample_iters.clamp(max=0), self.tol, "train", self.opts.method,
                restarts,
            )  # fmt: skip
        return SolverStats(
            self.it,
            self.best_res,
            self.sample_iters.clamp(max=self.it),
            self.tol,
            "train",
            self.opts.method,
            restarts,
            self.evaluated_rows,
        )


RowsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    max_iter: int,
    tol: float,
    reduce: Reduce | None = None,
    opts: SolveOptions = PICARD,
    f_rows: RowsFn | None = None,
) -> tuple[torch.Tensor, SolverStats]:
    """Fixed-point iteration with per-sample best iterate (:class:`FixedPointTracker`).

    Args:
        f: the map ``F``; called on tensors shaped like ``z0``.
        z0: (b, ...) initial iterate.
        max_iter: at most this many evaluations of ``f`` (0 returns ``z0``).
        tol: stop when every sample's relative residual is below ``tol``.
        reduce: sums per-sample squared norms over the processes that hold the rest of each
            sample (:func:`relative_residual`); None when ``z`` is whole here.
        opts: the iteration (:class:`SolveOptions`): plain undamped Picard by default.
        f_rows: ``(z[idx] (n, ...), idx (n,)) -> F(z)[idx]``, ``F`` of some samples only. With
            ``opts.early_exit`` the solve then evaluates only the samples that have not stopped
            (every process of a tensor-parallel group takes the same decisions, so their
            batches shrink together). Without it stopped samples are still evaluated, and
            ignored.

    Returns:
        ``(z_star (b, ...), stats)``; ``z_star`` holds no autograd history.
    """
    track = FixedPointTracker(z0.detach().clone(), max_iter, tol, reduce, opts)
    while track.it < max_iter:
        if opts.early_exit and f_rows is not None and bool(track.done.any()):
            idx = track.active.nonzero()[:, 0]
            fz = track.z.clone()  # stopped rows: F(z) = z, ignored by the tracker
            fz[idx] = f_rows(track.z[idx], idx)
            stop = track.update(fz, evaluated=idx.numel())
        else:
            stop = track.update(f(track.z))
        if stop:
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
