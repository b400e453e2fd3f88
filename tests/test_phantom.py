"""Phantom gradients of the implicit models, checked against independent computations (float64).

1. With ``k`` fixed, the parameter gradients of a loss on ``model(ids).logits`` in training mode
   equal autograd through ``k`` damped steps written out here, from the fixed point of
   :func:`~ilm_megatron.implicit.solver.solve` run with the model's own settings.
2. As ``k`` grows, the phantom gradient converges to the exact implicit-function-theorem gradient,
   computed here from the full Jacobian ``J = dF/dz`` at a tightly solved fixed point:
   ``grad = dL/dtheta|_direct + (dF/dtheta)^T g`` with ``(I - J)^T g = dL/dz*``. The phantom error
   is the tail of a Neumann series, ``-(dF/dtheta)^T (M^T)^k g`` with ``M = lam J + (1 - lam) I``,
   so it decays like ``rho(M)^k``; that identity is checked too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ilm_megatron.config import load_config
from ilm_megatron.implicit.solver import solve
from ilm_megatron.models.lm import ImplicitLM

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
ARCHS = ("mamba2", "llama")


pytestmark = pytest.mark.usefixtures("one_thread")


def build(
    arch: str, overrides: tuple[str, ...] = (), seed: int = 0, perturb: bool = True
) -> ImplicitLM:
    """The tiny implicit model of ``configs/models`` in float64, training mode.

    ``perturb``: every 1-d parameter (norm gains, biases, ``D``, ``dt_bias``, ``A_log``) is moved
    off its initial value so that no unit gain or zero bias can hide a missing term; the contractive
    initial weights are kept.
    """
    cfg = load_config([ROOT / "configs" / "models" / f"implicit_{arch}_tiny.yaml"], overrides)
    torch.manual_seed(seed)
    model = ImplicitLM(cfg.model, cfg.solver).to(F64).train()
    if perturb:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


def make_batch(model: ImplicitLM, b: int, l: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    v = model.config.vocab_size
    return torch.randint(0, v, (b, l), generator=g), torch.randint(0, v, (b, l), generator=g)


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def param_grads(model: ImplicitLM, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    missing = [n for n, gr in zip(names, grads) if gr is None]
    assert not missing, f"parameters without a gradient: {missing}"
    return dict(zip(names, grads))


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([gr.reshape(-1) for gr in grads.values()])


def injection(model: ImplicitLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``e = Embedding(ids)``, ``u = W_inj RMSNorm_inj(e) + b_inj``, written out."""
    e = model.embedding(ids)
    return e, model.injection(model.injection_norm(e))


def head_by_hand(model: ImplicitLM, z: torch.Tensor) -> torch.Tensor:
    w = model.embedding.weight if model.lm_head is None else model.lm_head.weight
    return z @ w.T


def manual_phantom_logits(model: ImplicitLM, ids: torch.Tensor, k: int, lam: float):
    """Solve with the model's settings, then ``k`` damped steps with autograd, by hand."""
    s = model.solver_config
    e, u = injection(model, ids)

    def f(z):
        return model.stack(z, u)[0]

    z_star, stats = solve(f, torch.zeros_like(e), s.f_max_iter, s.f_tol)
    z = z_star.detach()
    for _ in range(k):
        z = lam * f(z) + (1.0 - lam) * z
    return head_by_hand(model, z), stats


# --------------------------------------------------------------------------------------------
# 1. phantom gradient == autograd through k explicit damped steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "k", "lam", "overrides"),
    [
        ("mamba2", 4, 0.8, ()),
        ("mamba2", 1, 0.8, ()),
        ("mamba2", 3, 1.0, ()),
        ("llama", 4, 0.8, ()),
        ("llama", 2, 0.5, ()),
        ("llama", 3, 1.0, ("model.tie_embeddings=false",)),
    ],
)
def test_phantom_gradient_equals_manual_unroll(arch, k, lam, overrides):
    model = build(arch, ("solver.f_tol=1e-6",) + overrides)
    model.solver_config = dataclasses.replace(
        model.solver_config, phantom_steps=k, phantom_damping=lam
    )
    ids, targets = make_batch(model, b=2, l=6)

    out = model(ids)
    g_pkg = param_grads(model, loss_of(out.logits, targets))

    logits, stats = manual_phantom_logits(model, ids, k, lam)
    g_man = param_grads(model, loss_of(logits, targets))

    assert stats.iters > 1, "the solve did nothing: the test would not see where z* comes from"
    assert out.stats.iters == stats.iters
    torch.testing.assert_close(out.logits, logits, rtol=1e-12, atol=1e-12)
    scale = flat(g_man).abs().max().item()
    assert scale > 1e-6
    for name, gm in g_man.items():
        torch.testing.assert_close(
            g_pkg[name], gm, rtol=1e-10, atol=1e-10 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )

    # The comparison discriminates: one step more (or another damping) changes the gradient.
    other_k, _ = manual_phantom_logits(model, ids, k + 1, lam)
    other_lam, _ = manual_phantom_logits(model, ids, k, 0.5 * lam)
    for other in (other_k, other_lam):
        diff = (flat(param_grads(model, loss_of(other, targets))) - flat(g_pkg)).abs().max()
        assert diff > 1e-6 * scale


# --------------------------------------------------------------------------------------------
# 2. phantom gradient -> exact implicit (IFT) gradient as k grows
# --------------------------------------------------------------------------------------------

KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LAM = 0.8
FLOOR = 1e-9  # float64 error floor: the solve stops at a relative residual ~1e-13


def _vjp_F(model, ids, z_star, g):
    """(dF(z*, u(theta))/dtheta)^T g over every parameter, u built inside the graph."""
    _, u = injection(model, ids)
    fz = model.stack(z_star, u)[0]
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(fz, params, grad_outputs=g.view_as(z_star), allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if gr is None else gr).reshape(-1) for p, gr in zip(params, grads)]
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_phantom_gradient_converges_to_implicit_gradient(arch):
    model = build(
        arch,
        (
            "model.d_model=16",
            "model.n_layers=1",
            "solver.f_tol=1e-13",
            "solver.f_max_iter=3000",
            f"solver.phantom_damping={LAM}",
        ),
        # Initial gains/biases: perturbed unit gains push rho(M) of the llama block to ~0.96.
        perturb=False,
    )
    ids, targets = make_batch(model, b=1, l=4)
    s = model.solver_config

    # Fixed point, solved tightly.
    with torch.no_grad():
        e, u = injection(model, ids)
        z_star, stats = solve(lambda z: model.stack(z, u)[0], torch.zeros_like(e), 3000, 1e-13)
    assert stats.residual.max().item() < 1e-12, stats.residual
    n = z_star.numel()

    # Full Jacobian J = dF/dz at z* (n x n), and M = lam J + (1 - lam) I.
    def f_flat(zf):
        return model.stack(zf.view_as(z_star), u)[0].reshape(-1)

    J = torch.autograd.functional.jacobian(f_flat, z_star.reshape(-1))
    eye = torch.eye(n, dtype=F64)
    M = LAM * J + (1.0 - LAM) * eye
    rho_J = torch.linalg.eigvals(J).abs().max().item()
    rho_M = torch.linalg.eigvals(M).abs().max().item()
    assert rho_J < 1.0 and rho_M < 1.0, (rho_J, rho_M)
    # Error ~ C rho(M)^k: the largest k must be deep into the asymptotic regime.
    assert rho_M ** KS[-1] < 1e-6, f"rho(M)={rho_M:.4f}: k={KS[-1]} is not enough"

    # Exact gradient: direct term (tied head reads the embedding) + implicit term.
    zr = z_star.clone().requires_grad_(True)
    loss = loss_of(head_by_hand(model, zr), targets)
    names, params = zip(*model.named_parameters())
    gd = torch.autograd.grad(loss, (zr,) + params, allow_unused=True)
    v = gd[0].reshape(-1)
    direct = torch.cat(
        [(torch.zeros_like(p) if gr is None else gr).reshape(-1) for p, gr in zip(params, gd[1:])]
    )
    g = torch.linalg.solve((eye - J).T, v)
    exact = direct + _vjp_F(model, ids, z_star, g)
    exact_norm = exact.norm().item()
    assert exact_norm > 1e-6

    errs, tail_errs = [], []
    for k in KS:
        s_k = dataclasses.replace(s, phantom_steps=k)
        phantom = flat(param_grads(model, loss_of(model(ids, solver=s_k).logits, targets)))
        errs.append((phantom - exact).norm().item() / exact_norm)
        # Neumann tail: phantom_k = exact - (dF/dtheta)^T (M^T)^k g.
        tail = _vjp_F(model, ids, z_star, torch.linalg.matrix_power(M.T, k) @ g)
        tail_errs.append((phantom - (exact - tail)).norm().item() / exact_norm)

    table = "\n".join(
        f"  k={k:4d}  rel err {e:.3e}  rho(M)^k {rho_M**k:.3e}  |phantom - (exact - tail)| {t:.1e}"
        for k, e, t in zip(KS, errs, tail_errs)
    )
    msg = f"{arch}: rho(J)={rho_J:.4f} rho(M)={rho_M:.4f}\n{table}"
    print(msg)
    assert errs[0] > 0.05, "k=1 already exact: the comparison would not discriminate\n" + msg
    for i in range(len(KS) - 1):
        if errs[i] > FLOOR:
            assert errs[i + 1] < errs[i], "error not decreasing in k\n" + msg
    assert errs[-1] < 1e-5, msg
    assert max(tail_errs) < 1e-10, msg
