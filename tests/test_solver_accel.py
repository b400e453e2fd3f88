"""The solver beyond the reference (:class:`SolveOptions`): Anderson acceleration, its restarts,
divergence detection with a damped fallback, and per-sample early exit.

References: the exact fixed point of a linear map (``torch.linalg.solve``), a per-sample Anderson
written out in plain Python from the closed form of the constrained least squares (not the
bordered system the solver uses), and each sample solved alone by the plain rule.
"""

from __future__ import annotations

import math

import pytest
import torch

from ilm_megatron.implicit.solver import (
    FixedPointTracker,
    SolveOptions,
    relative_residual,
    solve,
)


def _linear(n: int, radius: float, b: int, seed: int = 0, sign: float = 1.0):
    """``F(z) = A z + c`` with symmetric ``A`` of eigenvalues spread over ``[-radius, radius]``
    (``sign=-1`` and ``radius>1``: an oscillating divergence), float64; and its fixed point."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(-radius, radius, n, dtype=torch.float64)
    if sign < 0:
        eig = -torch.full((n,), radius, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    c = torch.randn(b, n, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - a, c.T).T
    return (lambda z: z @ a.T + c), (lambda z, idx: z @ a.T + c[idx]), exact


def test_anderson_converges_where_picard_is_slow() -> None:
    """Spectral radius 0.98: Picard needs hundreds of evaluations, Anderson a fraction, and
    both end at the exact fixed point."""
    f, _, exact = _linear(48, 0.98, 3)
    z0 = torch.zeros_like(exact)
    zp, sp = solve(f, z0, 3000, 1e-9)
    za, sa = solve(f, z0, 3000, 1e-9, opts=SolveOptions(method="anderson", anderson_m=8))
    assert sp.converged.all() and sa.converged.all()
    assert sp.iters > 400
    assert sa.iters < sp.iters / 3, (sa.iters, sp.iters)
    assert (za - exact).abs().max() < 1e-6
    assert (zp - exact).abs().max() < 1e-6
    assert sa.method == "anderson" and sa.restarts is not None


def _naive_anderson(f, z0: torch.Tensor, steps: int, m: int, lam: float) -> list[torch.Tensor]:
    """Per sample: keep the last ``m`` pairs, ``a = K^{-1} 1 / (1^T K^{-1} 1)`` with
    ``K = G G^T + lam * mean(diag(G G^T)) I`` (the constrained least squares in closed form),
    next iterate ``sum a_j F(z_j)``. Returns the iterates after each step."""
    b = z0.shape[0]
    hist: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(b)]
    z, out = z0.clone(), []
    for _ in range(steps):
        fz = f(z)
        nxt = []
        for i in range(b):
            hist[i] = (hist[i] + [(z[i].flatten(), fz[i].flatten())])[-m:]
            g = torch.stack([fx - x for x, fx in hist[i]])
            k = g @ g.T
            k = k + lam * k.diagonal().mean() * torch.eye(len(hist[i]), dtype=k.dtype)
            w = torch.linalg.solve(k, torch.ones(len(hist[i]), dtype=k.dtype))
            a = w / w.sum()
            nxt.append(sum(a[j] * hist[i][j][1] for j in range(len(hist[i]))).view_as(z[i]))
        z = torch.stack(nxt)
        out.append(z.clone())
    return out


def test_anderson_steps_match_a_naive_per_sample_implementation() -> None:
    """A non-linear map (a contraction with a sine term); the ring buffer wraps (m=3, 8
    steps), the regularisation is on; no restart is triggered (checked)."""
    g = torch.Generator().manual_seed(1)
    w = 0.6 * torch.randn(5, 5, generator=g, dtype=torch.float64) / math.sqrt(5)
    c = torch.randn(4, 2, 5, generator=g, dtype=torch.float64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ w.T) + 0.1 * torch.sin(3 * z) + c

    z0 = torch.zeros_like(c)
    opts = SolveOptions(method="anderson", anderson_m=3, anderson_lam=1e-3, anderson_restart=1e9)
    ref = _naive_anderson(f, z0, 8, 3, 1e-3)
    track = FixedPointTracker(z0.clone(), 100, 1e-14, opts=opts)
    for step in range(8):
        track.update(f(track.z))
        assert (track.z - ref[step]).abs().max() < 1e-10, step
    assert int(track.restarts.sum()) == 0


def test_anderson_restarts_on_a_worse_residual() -> None:
    """A step whose residual exceeds ``anderson_restart`` times the best drops the sample's
    history: the next iterate is the plain ``F(z)``, the other sample keeps mixing."""
    opts = SolveOptions(method="anderson", anderson_m=4, anderson_restart=2.0)
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    track = FixedPointTracker(z0, 50, 1e-12, opts=opts)
    track.update(torch.ones(2, 3, dtype=torch.float64))  # residual 1
    track.update(track.z + 0.01)  # residual about 0.01: the best so far
    fz = track.z + torch.tensor([[0.001], [0.0]], dtype=torch.float64)
    fz[1] = -3 * fz[1]  # sample 1: residual about 1.3, over 2x its best
    track.update(fz)
    assert track.restarts.tolist() == [0, 1]
    assert torch.equal(track.z[1], fz[1])  # restarted: plain step
    assert not torch.equal(track.z[0], fz[0])  # still mixing


def test_divergence_falls_back_to_damped_steps() -> None:
    """``F(z) = -1.5 z + c`` diverges under Picard (it oscillates and grows); damped at 0.5
    it is ``z <- -0.25 z + c / 2``, a contraction. With detection on, the solve goes back to
    the best iterate and converges to the exact fixed point ``c / 2.5``."""
    f, _, exact = _linear(6, 1.5, 2, sign=-1.0)
    z0 = torch.zeros_like(exact)
    _, plain = solve(f, z0, 60, 1e-8)
    assert not plain.converged.any()
    opts = SolveOptions(divergence_factor=10.0, fallback_damping=0.5)
    z, st = solve(f, z0, 200, 1e-10, opts=opts)
    assert st.converged.all()
    assert (z - exact).abs().max() < 1e-8
    assert st.restarts.tolist() == [1, 1]
    # Anderson with the same safeguard: restarts first, then the damped fallback
    za, sa = solve(f, z0, 200, 1e-10, opts=SolveOptions(method="anderson", divergence_factor=10))
    assert sa.converged.all() and (za - exact).abs().max() < 1e-8


@pytest.mark.parametrize("method", ["picard", "anderson"])
@pytest.mark.parametrize("rows", [True, False], ids=["shrinking-batch", "masked"])
def test_early_exit_gives_each_sample_its_own_solve(method: str, rows: bool) -> None:
    """Samples with very different contraction rates: with early exit each returns exactly what
    solving it alone gives (plain rule, batch of one), and the shrinking batch evaluates ``F``
    only on the samples still running."""
    g = torch.Generator().manual_seed(3)
    rates = torch.tensor([0.2, 0.9, 0.5, 0.97], dtype=torch.float64)
    target = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)

    def f(z: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        r, t = (rates, target) if idx is None else (rates[idx], target[idx])
        return t + r.view(-1, 1, 1) * (z - t) + 0.05 * torch.sin(z)

    z0 = torch.zeros_like(target)
    opts = SolveOptions(method=method, early_exit=True)
    z, st = solve(f, z0, 500, 1e-7, opts=opts, f_rows=f if rows else None)
    solo_iters = []
    for i in range(4):
        zi, si = solve(
            lambda x, i=i: f(x, torch.tensor([i])),
            z0[i : i + 1],
            500,
            1e-7,
            opts=SolveOptions(method=method),
        )
        assert torch.allclose(z[i : i + 1], zi, rtol=0, atol=1e-12), i
        assert st.sample_iters[i] == si.iters
        solo_iters.append(si.iters)
    assert st.iters == max(solo_iters)
    assert st.evaluated_rows == (sum(solo_iters) if rows else 4 * st.iters)
    # without early exit the batch waits for its slowest sample: same iterations, other iterates
    _, together = solve(f, z0, 500, 1e-7, opts=SolveOptions(method=method))
    assert together.iters == st.iters and together.evaluated_rows == 4 * together.iters


def test_early_exit_in_the_model_keeps_the_logits() -> None:
    """The implicit model's eval solve with early exit (stopped samples leave the batch, their
    injection rows with them) gives every sample the logits it gets when solved alone."""
    import dataclasses

    from conftest import tiny_config

    from ilm_megatron.models.lm import build_model

    cfg = tiny_config("mamba2", overrides=("solver.eval_tol=1e-4",))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver).double().eval()
    ids = torch.randint(0, cfg.model.vocab_size, (3, 12))
    ids[0] = ids[0, :1]  # a constant sequence converges faster than random ones
    model.solver_config = dataclasses.replace(cfg.solver, early_exit=True)
    out = model(ids)
    model.solver_config = cfg.solver
    for i in range(3):
        alone = model(ids[i : i + 1])
        assert (out.logits[i] - alone.logits[0]).abs().max() < 1e-10
        assert out.stats.sample_iters[i] == alone.stats.iters
    assert out.stats.evaluated_rows == int(out.stats.sample_iters.sum())
    assert len(set(out.stats.sample_iters.tolist())) > 1  # the samples did stop apart


def test_residual_is_relative_per_sample() -> None:
    """The early-exit and restart decisions read this per-sample residual."""
    fz = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(relative_residual(fz, z), torch.tensor([1.0, 0.0]), atol=1e-8)


@pytest.mark.parametrize(
    "override, key",
    [
        ("solver.method=newton", "solver.method"),
        ("solver.anderson_m=0", "solver.anderson_m"),
        ("solver.divergence_factor=0.5", "solver.divergence_factor"),
        ("solver.anderson_restart=1", "solver.anderson_restart"),
    ],
)
def test_bad_solver_options_name_the_key(override: str, key: str) -> None:
    from conftest import tiny_config

    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        tiny_config("mamba2", overrides=(override,))


def test_training_run_logs_what_the_solver_did(tmp_path) -> None:
    """A short ilm-train run with Anderson, divergence detection and early exit: TensorBoard
    holds the restarts and the fraction of sample-evaluations made (below 1: early exit left
    samples out of the batch), the stored config the settings in force, and the run learns."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ilm_megatron.config import load_config
    from ilm_megatron.train.loop import train

    overrides = [
        "train.max_steps=30",
        "train.log_interval=10",
        "train.batch_size=16",
        "data.seq_len=8",
        "data.eval_seq_len=0",
        "solver.f_max_iter=30",
        "solver.f_tol=1e-3",
        "solver.method=anderson",
        "solver.divergence_factor=20",
        "solver.early_exit=true",
    ]
    res = train(load_config([], overrides), tmp_path, quiet=True)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    frac = [e.value for e in acc.Scalars("solver/evaluated_frac")]
    restarts = [e.value for e in acc.Scalars("solver/restarts")]
    assert len(frac) == len(restarts) == 3
    assert all(0 < f <= 1 for f in frac) and min(frac) < 1
    assert all(r >= 0 for r in restarts)
    stored = load_config([tmp_path / "config.yaml"], [])
    assert stored.solver.method == "anderson" and stored.solver.early_exit
