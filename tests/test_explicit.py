"""Explicit and implicit models share their layer code.

The logits of an explicit model, one evaluation ``F(z, u)`` of an implicit stack, and a zero-
iteration implicit forward are each compared with the same composition written out here from the
model's own submodules::

    z = x;  for blk: z = z + blk.mixer(blk.norm(z), u)[0];  [z = z + blk.mlp(blk.mlp_norm(z))]
    F = final_norm(z);  logits = F @ W_emb^T

Every 1-d parameter is perturbed so that unit gains or zero biases cannot hide a skipped module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ilm_megatron.config import SolverConfig, load_config
from ilm_megatron.models.lm import ImplicitLM

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
ARCHS = ("mamba2", "llama")
TOL = {"rtol": 1e-12, "atol": 1e-12}


pytestmark = pytest.mark.usefixtures("one_thread")


def config(arch: str, implicit: bool):
    name = f"{'implicit' if implicit else 'explicit'}_{arch}_tiny.yaml"
    return load_config([ROOT / "configs" / "models" / name])


def build(
    arch: str,
    implicit: bool,
    solver: SolverConfig | None = None,
    seed: int = 0,
    dtype: torch.dtype = F64,
):
    cfg = config(arch, implicit)
    torch.manual_seed(seed)
    return ImplicitLM(cfg.model, solver or cfg.solver).to(dtype)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def make_ids(model: ImplicitLM, b: int = 2, l: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, model.config.vocab_size, (b, l), generator=g)


def compose(model: ImplicitLM, z: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """One pass of the blocks and the final norm, written out from the submodules."""
    for blk in model.stack.layers:
        out, _ = blk.mixer(blk.norm(z)) if u is None else blk.mixer(blk.norm(z), u)
        z = z + out
        if blk.mlp is not None:
            z = z + blk.mlp(blk.mlp_norm(z))
    return model.stack.final_norm(z)


def tied_head(model: ImplicitLM, z: torch.Tensor) -> torch.Tensor:
    assert model.lm_head is None, "tiny configs tie the head to the embedding"
    return z @ model.embedding.weight.T


def has_mlp(model: ImplicitLM) -> bool:
    return any(blk.mlp is not None for blk in model.stack.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_explicit_logits_equal_direct_composition(arch):
    model = build(arch, implicit=False).eval()
    perturb_(model)
    assert not model.implicit
    assert has_mlp(model) == (arch == "llama")
    ids = make_ids(model)
    with torch.no_grad():
        logits = model(ids).logits
        ref = tied_head(model, compose(model, model.embedding(ids), None))
    assert logits.dtype == F64 and logits.shape == (*ids.shape, model.config.padded_vocab_size)
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(logits, ref, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_implicit_stack_is_the_same_composition_with_injection(arch):
    model = build(arch, implicit=True).eval()
    perturb_(model)
    ids = make_ids(model)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(*ids.shape, model.config.d_model, generator=g, dtype=F64)
    with torch.no_grad():
        u = model.injection(model.injection_norm(model.embedding(ids)))
        e, u_model = model.embed(ids)
        fz, caches = model.stack(z, u)
        ref = compose(model, z, u)
        without = compose(model, z, None)
    assert caches is None
    torch.testing.assert_close(e, model.embedding(ids), **TOL)
    torch.testing.assert_close(u_model, u, **TOL)
    torch.testing.assert_close(fz, ref, **TOL)
    # the injection matters: F(z, u) is not F(z, None)
    assert (fz - without).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_explicit_model_has_no_injection_and_shares_stack_parameters(arch):
    # float32 as constructed: the initial scaling is compared bit for bit
    imp = build(arch, implicit=True, seed=11, dtype=torch.float32)
    exp = build(arch, implicit=False, seed=11, dtype=torch.float32)
    assert exp.injection is None and exp.injection_norm is None
    assert imp.injection is not None and imp.injection_norm is not None
    exp_names = {n for n, _ in exp.named_parameters()}
    assert not any(n.startswith("injection") for n in exp_names), sorted(exp_names)
    imp_extra = {n for n, _ in imp.named_parameters()} - exp_names
    assert imp_extra == {"injection_norm.weight", "injection.weight", "injection.bias"}, imp_extra

    imp_stack = dict(imp.stack.named_parameters())
    exp_stack = dict(exp.stack.named_parameters())
    assert list(imp_stack) == list(exp_stack)
    for n, p in exp_stack.items():
        assert imp_stack[n].shape == p.shape, n

    # Same seed, same draws: the stack is initialised identically, except that the implicit
    # model scales the weights that read the iterate by ``iterate_init_scale``.
    scale = imp.config.iterate_init_scale
    assert scale != 1.0 and exp.config.iterate_init_scale == 1.0
    scaled = {
        n
        for n in exp_stack
        if n.endswith(("mixer.in_proj.weight", "mixer.qkv_proj.weight", "mlp.fc1.weight"))
    }
    assert len(scaled) == (2 if arch == "llama" else 1) * imp.config.n_layers, scaled
    for n, p in exp_stack.items():
        expected = scale * p if n in scaled else p
        torch.testing.assert_close(imp_stack[n], expected, rtol=0, atol=0, msg=n)
    torch.testing.assert_close(imp.embedding.weight, exp.embedding.weight, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_iterations_one_undamped_phantom_step_is_F_of_zero(arch):
    solver = SolverConfig(f_max_iter=0, phantom_steps=1, phantom_damping=1.0)
    model = build(arch, implicit=True, solver=solver).train()
    perturb_(model)
    ids = make_ids(model)
    out = model(ids)
    assert out.stats.iters == 0
    assert out.logits.requires_grad

    e = model.embedding(ids)
    u = model.injection(model.injection_norm(e))
    ref = tied_head(model, compose(model, torch.zeros_like(e), u))
    torch.testing.assert_close(out.logits, ref, **TOL)

    # Same gradients too (one undamped step from z0 = 0 is an ordinary forward of F).
    params = [p for _, p in model.named_parameters()]
    t = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    g_model = torch.autograd.grad((out.logits * t).sum(), params)
    g_ref = torch.autograd.grad((ref * t).sum(), params)
    for (n, _), a, b in zip(model.named_parameters(), g_model, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)
