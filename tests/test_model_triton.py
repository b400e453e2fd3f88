"""The implicit Mamba2 on our Triton kernels (run in the Triton interpreter on CPU) against the
same model on the PyTorch reference kernels: forward, phantom gradients (plain and recompute),
and sequential decoding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config

from ilm_kernels.backend import triton_interpreter
from ilm_megatron.models.lm import build_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not triton_interpreter(),
    reason="needs a GPU or the Triton interpreter (TRITON_INTERPRET=1)",
)

OVERRIDES = ("model.n_layers=1", "solver.f_max_iter=5", "solver.phantom_steps=2")
# Compiled kernels need CUDA tensors; the interpreter runs them on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreter() else "cpu"


def _pair():
    cfg = tiny_config("mamba2", overrides=OVERRIDES)
    torch.manual_seed(0)
    ref = build_model(dataclasses.replace(cfg.model, kernel_backend="reference"), cfg.solver)
    tri = build_model(dataclasses.replace(cfg.model, kernel_backend="triton"), cfg.solver)
    tri.load_state_dict(ref.state_dict())
    return ref.to(DEVICE), tri.to(DEVICE), cfg


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_forward_matches_reference():
    ref, tri, cfg = _pair()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 11), device=DEVICE)
    ref.eval()
    tri.eval()
    a, b = tri(ids), ref(ids)
    assert a.stats.iters == b.stats.iters
    assert _rel(a.logits, b.logits) < 1e-4


@pytest.mark.parametrize("impl", ["autograd", "recompute"])
def test_phantom_gradients_match_reference(impl):
    """The phantom backward through the Triton backward kernels equals autograd through the
    PyTorch reference to 1e-5 (fp32)."""
    ref, tri, cfg = _pair()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 11), device=DEVICE)
    grads = []
    for model in (ref, tri):
        model.train()
        model.solver_config = dataclasses.replace(model.solver_config, phantom_impl=impl)
        (model(ids).logits ** 2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        assert g is not None, name
        assert _rel(g, grads[0][name]) < 1e-5, (name, _rel(g, grads[0][name]))


def test_sequential_decoding_matches_reference():
    ref, tri, cfg = _pair()
    ids = torch.randint(0, cfg.model.vocab_size, (1, 6), device=DEVICE)
    a = tri.eval().forward_sequential(ids, max_iter=5)
    b = ref.eval().forward_sequential(ids, max_iter=5)
    assert _rel(a.logits, b.logits) < 1e-4
