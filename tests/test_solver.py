"""The training solve's rule (:class:`FixedPointTracker`, :func:`solve`) against a naive loop.

The reference is written out per sample in plain Python (float64): iterate ``z <- F(z)``, keep
each sample's lowest-residual ``F(z)``, note the first evaluation at which it met the tolerance,
stop when every sample has met it or at the cap.
"""

from __future__ import annotations

import math

import pytest
import torch

from ilm_megatron.implicit.solver import (
    FixedPointTracker,
    damped,
    relative_residual,
    solve,
)


def _map(rates: torch.Tensor, target: torch.Tensor, wobble: float = 0.0):
    """Per-sample contraction towards ``target`` at ``rates`` (b,), optionally oscillating."""

    def f(z: torch.Tensor) -> torch.Tensor:
        r = rates.view(-1, *([1] * (z.dim() - 1)))
        out = target + r * (z - target)
        return out + wobble * torch.sin(7.0 * z)

    return f


def _naive(f, z0: torch.Tensor, max_iter: int, tol: float):
    b = z0.shape[0]
    z = z0.clone()
    best = [z0[i].clone() for i in range(b)]
    best_res = [math.inf] * b
    first = [max_iter] * b
    it = 0
    while it < max_iter:
        fz = f(z)
        it += 1
        for i in range(b):
            num = math.sqrt(float(((fz[i] - z[i]) ** 2).sum()))
            den = math.sqrt(float((fz[i] ** 2).sum())) + 1e-9
            res = num / den
            if res < best_res[i]:
                best_res[i], best[i] = res, fz[i].clone()
            if res < tol and first[i] == max_iter:
                first[i] = it
        z = fz
        if max(best_res) < tol:
            break
    return torch.stack(best), torch.tensor(best_res), torch.tensor(first).clamp(max=it), it


@pytest.mark.parametrize("wobble", [0.0, 0.3])
def test_solve_matches_a_naive_per_sample_loop(wobble: float) -> None:
    gen = torch.Generator().manual_seed(0)
    b = 4
    rates = torch.tensor([0.1, 0.5, 0.8, 0.95], dtype=torch.float64)
    target = torch.randn(b, 3, 5, generator=gen, dtype=torch.float64)
    z0 = torch.zeros(b, 3, 5, dtype=torch.float64)
    f = _map(rates, target, wobble)
    for max_iter, tol in ((40, 1e-3), (6, 1e-3), (0, 1e-3), (200, 1e-8)):
        z, st = solve(f, z0, max_iter, tol)
        best, res, first, it = _naive(f, z0, max_iter, tol)
        assert st.iters == it
        torch.testing.assert_close(z, best, rtol=0, atol=0)
        assert torch.equal(st.sample_iters, first)
        if it:
            torch.testing.assert_close(st.residual.double(), res.double(), rtol=1e-5, atol=1e-12)
        else:
            assert torch.isnan(st.residual).all()
    _, st = solve(f, z0, 200, 1e-3)
    if wobble == 0.0:  # a contraction: the samples converge, at different evaluations
        assert len(set(st.sample_iters.tolist())) > 1 and bool(st.converged.all())
    else:  # oscillating residuals: the best iterate is not the last one for some sample
        assert not bool(st.converged.all())


def test_tracker_steps_like_solve_and_stops_at_the_cap() -> None:
    f = _map(torch.tensor([0.5, 0.9]), torch.ones(2, 4))
    z0 = torch.zeros(2, 4)
    track = FixedPointTracker(z0, max_iter=3, tol=1e-12)
    stops = [track.update(f(track.z)) for _ in range(3)]
    assert stops == [False, False, True] and track.it == 3
    z, st = solve(f, z0, 3, 1e-12)
    assert torch.equal(track.best, z) and torch.equal(track.stats().sample_iters, st.sample_iters)


def test_residual_reduced_over_parts_equals_the_whole() -> None:
    """Sequence parallelism: each part's squared norms summed over the parts give the residual
    of the whole sample."""
    gen = torch.Generator().manual_seed(1)
    fz, z = torch.randn(3, 8, 4, generator=gen), torch.randn(3, 8, 4, generator=gen)
    parts = [(fz[:, :4], z[:, :4]), (fz[:, 4:], z[:, 4:])]

    def sq(a, b):
        return torch.stack([(a - b).flatten(1).pow(2).sum(1), a.flatten(1).pow(2).sum(1)], 1)

    total = sq(*parts[0]) + sq(*parts[1])
    got = relative_residual(*parts[0], reduce=lambda _: total)
    torch.testing.assert_close(got, relative_residual(fz, z), rtol=1e-6, atol=0)


def test_damped_step() -> None:
    fz, z = torch.tensor([2.0]), torch.tensor([1.0])
    assert damped(fz, z, 1.0) is fz
    torch.testing.assert_close(damped(fz, z, 0.8), torch.tensor([1.8]))
