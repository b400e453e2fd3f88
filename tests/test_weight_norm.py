"""Weight normalisation is computed once per solve, not once per solver iteration.

Checked against the same model with the cache switched off (``cache_parametrizations=False``):
identical logits and gradients, the parametrisation evaluated ``iters + k`` times without the
cache and twice (solve, phantom steps) with it, and one saved weight copy instead of ``k``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ilm_megatron.config import load_config
from ilm_megatron.models.lm import build_model

ITERS, K = 6, 3


def _model():
    cfg = load_config(
        [],
        [
            "model.weight_norm=true",
            f"solver.f_max_iter={ITERS}",
            f"solver.phantom_steps={K}",
            "solver.f_tol=1e-30",  # the solve runs exactly ITERS iterations
            "model.iterate_init_scale=0.5",
        ],
    )
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.solver).double().train()


def _run(model, ids, cached: bool):
    model.cache_parametrizations = cached
    in_proj = model.stack.layers[0].mixer.in_proj
    shape = tuple(in_proj.weight.shape)
    calls = []
    hook = in_proj.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
    copies = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        # a computed weight (saved transposed by the matmul), not the parameter v itself
        if tuple(t.shape) in (shape, shape[::-1]) and ptr not in params:
            copies.append(ptr)
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids)
    (out.logits**2).mean().backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, len(calls), len(set(copies)), grads


def test_weight_norm_is_computed_once_per_solve_with_the_same_gradients():
    model = _model()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1)
    )
    out0, calls0, copies0, g0 = _run(model, ids, cached=False)
    out1, calls1, copies1, g1 = _run(model, ids, cached=True)
    assert out0.stats.iters == out1.stats.iters == ITERS
    assert calls0 == ITERS + K  # every solver iteration and phantom step recomputes the weight
    assert calls1 == 2  # once for the no-grad solve, once for the phantom steps
    # in_proj weight copies saved for backward: one per phantom step without the cache, one with
    # it (+1 in both: the injection's weight has the same shape and is computed once per forward)
    assert copies0 == K + 1 and copies1 == 2
    torch.testing.assert_close(out1.logits, out0.logits, rtol=0, atol=1e-12)
    assert g0.keys() == g1.keys() and any("original0" in n for n in g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("impl", ["recompute"])
def test_weight_norm_recompute_phantom_gets_the_same_gradients(impl):
    model = _model()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2)
    )
    *_, ref = _run(model, ids, cached=True)
    model.solver_config = dataclasses.replace(model.solver_config, phantom_impl=impl)
    *_, got = _run(model, ids, cached=True)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-8, atol=1e-10, msg=n)
