"""The memory-lean phantom gradient equals the plain one and keeps far less for backward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config

from ilm_megatron.implicit.phantom import phantom_steps, phantom_steps_recompute
from ilm_megatron.implicit.solver import solve
from ilm_megatron.models.lm import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _models(cfg, dtype=torch.float32):
    """The same model (same weights) once per ``phantom_impl``."""
    models = {}
    for impl in ("autograd", "recompute"):
        solver = dataclasses.replace(cfg.solver, phantom_impl=impl)
        torch.manual_seed(0)
        models[impl] = build_model(cfg.model, solver).to(dtype).train()
    models["recompute"].load_state_dict(models["autograd"].state_dict())
    return models


def _grads(model, ids, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids)
        loss = (out.logits.float() ** 2).mean()
    loss.backward()  # outside autocast, as a training loop calls it
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["mamba2", "llama"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_recompute_matches_autograd(arch, dtype, tol):
    cfg = tiny_config(arch, overrides=("model.weight_norm=true",))
    models = _models(cfg, dtype)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 9))
    la, ga = _grads(models["autograd"], ids)
    lr, gr = _grads(models["recompute"], ids)
    assert torch.equal(la, lr)
    assert ga.keys() == gr.keys()
    for name in ga:
        scale = ga[name].abs().max().clamp_min(1e-30)
        err = ((ga[name] - gr[name]).abs().max() / scale).item()
        assert err < tol, (name, err)


@pytest.mark.parametrize("weight_norm", [False, True])
@pytest.mark.parametrize("arch", ["mamba2", "llama"])
def test_recompute_matches_autograd_under_bf16_autocast(arch, weight_norm):
    """Backward re-evaluates ``F`` under the forward's autocast: bitwise the autograd gradient.

    One phantom step, so both implementations differentiate one evaluation of ``F`` through the
    same graph and no sum of per-step contributions is formed: the gradients agree exactly. (With
    ``k > 1`` the two add the steps' contributions in different orders; see the next test.)
    """
    cfg = tiny_config(
        arch, overrides=(f"model.weight_norm={str(weight_norm).lower()}", "solver.phantom_steps=1")
    )
    models = _models(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 9))
    la, ga = _grads(models["autograd"], ids, autocast=True)
    lr, gr = _grads(models["recompute"], ids, autocast=True)
    assert torch.equal(la, lr)
    assert ga.keys() == gr.keys()
    for name in ga:
        scale = ga[name].abs().max().clamp_min(1e-30)
        err = ((ga[name] - gr[name]).abs().max() / scale).item()
        assert err == 0.0, (name, err)
    # autocast did change the function: the fp32 gradient is a bf16 rounding away (~1e-2)
    _, g32 = _grads(models["autograd"], ids)
    far = max(((g32[n] - ga[n]).abs().max() / ga[n].abs().max()).item() for n in ga)
    assert far > 1e-3, far


@pytest.mark.parametrize("arch", ["mamba2", "llama"])
def test_recompute_matches_autograd_under_bf16_autocast_several_steps(arch):
    """``k = 4`` phantom steps under bf16 autocast agree to fp32 rounding.

    The steps' gradient contributions to a tensor ``F`` reads in every step are summed in a
    different order by the two implementations (the autograd engine as they arrive, recompute one
    step at a time). That is only fp32 rounding when the sums are in fp32, so the injection is
    an fp32 tensor here and the autocast weight cache is off: with the cache on, autocast casts
    each weight to bf16 once for all ``k`` steps and the autograd path sums the steps' weight
    gradients in bf16 (as it does for the bf16 injection the model computes under autocast), which
    leaves a few bf16 ulps (~5e-3 relative) between the two, as large as the error of
    differentiating the fp32 function instead (~1e-2).
    """
    cfg = tiny_config(arch)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver).train()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 9))
    names, params = zip(*model.stack.named_parameters())
    e, u = model.embed(ids)
    u = u.detach().requires_grad_(True)
    f = model.stack_fn(u)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with torch.no_grad():
            z_star, _ = solve(f, torch.zeros_like(e), cfg.solver.f_max_iter, cfg.solver.f_tol)
        za = phantom_steps(f, z_star, 4, 0.8)
        zr = phantom_steps_recompute(f, z_star, 4, 0.8, [u, *params])
    assert torch.equal(za, zr)
    w = torch.randn_like(za)
    ga = torch.autograd.grad(za, [u, *params], w)
    gr = torch.autograd.grad(zr, [u, *params], w)
    for name, a, r in zip(("injection", *names), ga, gr):
        err = ((a - r).abs().max() / a.abs().max().clamp_min(1e-30)).item()
        assert err < 1e-5, (name, err)


class _Noisy(torch.nn.Module):
    """A contractive map that draws random numbers in every evaluation (dropout and a draw)."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, z, x):
        noise = torch.rand_like(z)
        return 0.5 * torch.tanh(self.drop(self.lin(z)) + x) * noise


@pytest.mark.parametrize("damping", [1.0, 0.8])
def test_recompute_repeats_random_draws(damping):
    """Backward sees the random numbers of forward, and leaves the caller's generator alone."""
    torch.manual_seed(0)
    net = _Noisy(6).train()
    x = torch.randn(3, 6, requires_grad=True)
    z_star = torch.randn(3, 6)
    inputs = [x, *net.parameters()]

    def run(recompute: bool):
        torch.manual_seed(1)
        f = lambda z: net(z, x)  # noqa: E731
        if recompute:
            z = phantom_steps_recompute(f, z_star, 3, damping, inputs)
        else:
            z = phantom_steps(f, z_star, 3, damping)
        grads = torch.autograd.grad((z**2).sum(), inputs)
        return z.detach(), grads, torch.rand(4)

    za, ga, after_a = run(False)
    zr, gr, after_r = run(True)
    assert torch.equal(za, zr)
    for a, r in zip(ga, gr):
        torch.testing.assert_close(r, a, rtol=1e-6, atol=1e-7)
    # backward restored the generator it found: the next draw is the one without recompute
    assert torch.equal(after_a, after_r)


def _saved_activation_bytes(model, ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(seen.values())


def test_recompute_keeps_less_for_backward():
    cfg = tiny_config("mamba2", overrides=("solver.phantom_steps=4",))
    models = _models(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 32))
    plain = _saved_activation_bytes(models["autograd"], ids)
    lean = _saved_activation_bytes(models["recompute"], ids)
    # 4 iterates (b, l, d) plus the embedding path, against 4 full stack evaluations
    assert lean * 5 < plain, (lean, plain)
