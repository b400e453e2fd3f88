"""The model is built from Megatron-Core ModuleSpecs: swapping a spec swaps the layer."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_config
from megatron.core.transformer.spec_utils import ModuleSpec

from ilm_megatron.models.layers import RMSNorm
from ilm_megatron.models.lm import ImplicitLM
from ilm_megatron.models.specs import MODEL_REGISTRY, get_stack_spec


def test_registry_maps_arch_to_spec():
    assert set(MODEL_REGISTRY) == {"mamba2", "llama"}
    for arch in MODEL_REGISTRY:
        assert isinstance(get_stack_spec(arch), ModuleSpec)
    with pytest.raises(ValueError, match="unknown model.arch"):
        get_stack_spec("rwkv")
    with pytest.raises(ValueError, match="unknown layer backend"):
        get_stack_spec("mamba2", "te")


class ScaledNorm(RMSNorm):
    """A stand-in backend layer: RMSNorm times 2."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("arch", ["mamba2", "llama"])
def test_swapping_a_submodule_spec_changes_the_built_layer(arch):
    cfg = tiny_config(arch)
    spec = copy.deepcopy(get_stack_spec(arch))
    spec.submodules.layer.submodules.norm = ScaledNorm
    torch.manual_seed(0)
    model = ImplicitLM(cfg.model, cfg.solver, stack_spec=spec)
    assert all(isinstance(layer.norm, ScaledNorm) for layer in model.stack.layers)
    torch.manual_seed(0)
    ref = ImplicitLM(cfg.model, cfg.solver)
    assert type(ref.stack.layers[0].norm) is RMSNorm
    ref.load_state_dict(model.state_dict())  # same parameters ...
    ids = torch.randint(0, cfg.model.vocab_size, (1, 6))
    e, u = ref.embed(ids)
    with torch.no_grad():
        a, _ = model.stack(e, u)
        b, _ = ref.stack(e, u)
    assert not torch.allclose(a, b)  # ... different function: the spec chose the layer


def test_weight_norm_reparametrises_stack_and_keeps_function():
    cfg = tiny_config("mamba2")
    torch.manual_seed(0)
    plain = ImplicitLM(cfg.model, cfg.solver)
    torch.manual_seed(0)
    wn = ImplicitLM(dataclasses.replace(cfg.model, weight_norm=True), cfg.solver)
    names = [n for n, _ in wn.named_parameters()]
    assert any("parametrizations.weight.original0" in n for n in names)
    assert "embedding.weight" in names  # the embedding is not reparametrised
    # at initialisation g = |v|, so the function is unchanged
    ids = torch.randint(0, cfg.model.vocab_size, (2, 7))
    plain.eval()
    wn.eval()
    assert torch.allclose(plain(ids).logits, wn(ids).logits, atol=1e-5)
