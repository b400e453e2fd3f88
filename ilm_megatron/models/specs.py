"""Megatron-Core ``ModuleSpec``s for implicit and explicit Mamba2 and Llama.

The specs are the only way the model is constructed: a layer builds its children from the
``*Submodules`` dataclass it is given, so a backend (local PyTorch today, tensor-parallel and fused
GPU layers later) is chosen by picking another spec, never by editing a layer. Implicit and explicit
models share the same spec; whether a pass gets an injection is decided by the model.
"""

from __future__ import annotations

from collections.abc import Callable

from megatron.core.transformer.spec_utils import ModuleSpec

from ilm_megatron.models.layers import DepthwiseConv1d, GatedRMSNorm, Linear, RMSNorm
from ilm_megatron.models.llama import (
    SelfAttention,
    SelfAttentionSubmodules,
    SwiGLU,
    SwiGLUSubmodules,
)
from ilm_megatron.models.mamba2 import Mamba2Mixer, Mamba2MixerSubmodules
from ilm_megatron.models.stack import Block, BlockSubmodules, Stack, StackSubmodules


def mamba2_stack_spec(backend: str = "local") -> ModuleSpec:
    """Stack of Mamba2 blocks (mixer only, no MLP), as in the reference models."""
    _check_backend(backend)
    mixer = ModuleSpec(
        module=Mamba2Mixer,
        submodules=Mamba2MixerSubmodules(
            in_proj=Linear, conv1d=DepthwiseConv1d, norm=GatedRMSNorm, out_proj=Linear
        ),
    )
    layer = ModuleSpec(module=Block, submodules=BlockSubmodules(norm=RMSNorm, mixer=mixer))
    return ModuleSpec(module=Stack, submodules=StackSubmodules(layer=layer, final_norm=RMSNorm))


def llama_stack_spec(backend: str = "local") -> ModuleSpec:
    """Stack of Llama blocks: causal self-attention with RoPE, then a SwiGLU MLP."""
    _check_backend(backend)
    attn = ModuleSpec(
        module=SelfAttention,
        submodules=SelfAttentionSubmodules(qkv_proj=Linear, out_proj=Linear),
    )
    mlp = ModuleSpec(module=SwiGLU, submodules=SwiGLUSubmodules(fc1=Linear, fc2=Linear))
    layer = ModuleSpec(
        module=Block,
        submodules=BlockSubmodules(norm=RMSNorm, mixer=attn, mlp_norm=RMSNorm, mlp=mlp),
    )
    return ModuleSpec(module=Stack, submodules=StackSubmodules(layer=layer, final_norm=RMSNorm))


#: ``model.arch`` -> function(backend) returning the stack spec.
MODEL_REGISTRY: dict[str, Callable[[str], ModuleSpec]] = {
    "mamba2": mamba2_stack_spec,
    "llama": llama_stack_spec,
}

BACKENDS = ("local",)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown layer backend {backend!r}; available: {BACKENDS}")


def get_stack_spec(arch: str, backend: str = "local") -> ModuleSpec:
    """The registered stack spec for ``model.arch``."""
    if arch not in MODEL_REGISTRY:
        raise ValueError(f"unknown model.arch {arch!r}; registered: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[arch](backend)
