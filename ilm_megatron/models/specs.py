"""Megatron-Core ``ModuleSpec``s for implicit and explicit Mamba2 and Llama.

The specs are the only way the model is constructed: a layer builds its children from the
``*Submodules`` dataclass it is given, so a backend (local PyTorch today, tensor-parallel and fused
GPU layers later) is chosen by picking another spec, never by editing a layer. Implicit and explicit
models share the same spec; whether a pass gets an injection is decided by the model.
"""

from __future__ import annotations

from collections.abc import Callable

from megatron.core.transformer.spec_utils import ModuleSpec

from ilm_megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from ilm_megatron.models.layers import DepthwiseConv1d, GatedRMSNorm, Linear, RMSNorm
from ilm_megatron.models.llama import (
    SelfAttention,
    SelfAttentionSubmodules,
    SwiGLU,
    SwiGLUSubmodules,
)
from ilm_megatron.models.mamba2 import Mamba2Mixer, Mamba2MixerSubmodules
from ilm_megatron.models.stack import Block, BlockSubmodules, Stack, StackSubmodules


def _linears(backend: str) -> tuple[type, type]:
    """(column, row) linear classes of a backend: the only place the backends differ.

    ``tp`` shards the packed projections per component (column) and the output projections along
    their input (row, one all-reduce); norms, conv and SSM parameters follow the mixer's TP-local
    sizes. See ``docs/parallelism.md``.
    """
    _check_backend(backend)
    if backend == "tp":
        return ColumnParallelLinear, RowParallelLinear
    return Linear, Linear


def mamba2_stack_spec(backend: str = "local") -> ModuleSpec:
    """Stack of Mamba2 blocks (mixer only, no MLP), as in the reference models."""
    col, row = _linears(backend)
    mixer = ModuleSpec(
        module=Mamba2Mixer,
        submodules=Mamba2MixerSubmodules(
            in_proj=col, conv1d=DepthwiseConv1d, norm=GatedRMSNorm, out_proj=row
        ),
    )
    layer = ModuleSpec(module=Block, submodules=BlockSubmodules(norm=RMSNorm, mixer=mixer))
    return ModuleSpec(
        module=Stack,
        submodules=StackSubmodules(layer=layer, final_norm=RMSNorm, injection=col),
    )


def llama_stack_spec(backend: str = "local") -> ModuleSpec:
    """Stack of Llama blocks: causal self-attention with RoPE, then a SwiGLU MLP."""
    col, row = _linears(backend)
    attn = ModuleSpec(
        module=SelfAttention,
        submodules=SelfAttentionSubmodules(qkv_proj=col, out_proj=row),
    )
    mlp = ModuleSpec(module=SwiGLU, submodules=SwiGLUSubmodules(fc1=col, fc2=row))
    layer = ModuleSpec(
        module=Block,
        submodules=BlockSubmodules(norm=RMSNorm, mixer=attn, mlp_norm=RMSNorm, mlp=mlp),
    )
    return ModuleSpec(
        module=Stack,
        submodules=StackSubmodules(layer=layer, final_norm=RMSNorm, injection=col),
    )


#: ``model.arch`` -> function(backend) returning the stack spec.
MODEL_REGISTRY: dict[str, Callable[[str], ModuleSpec]] = {
    "mamba2": mamba2_stack_spec,
    "llama": llama_stack_spec,
}

BACKENDS = ("local", "tp")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown layer backend {backend!r}; available: {BACKENDS}")


def get_stack_spec(arch: str, backend: str = "local") -> ModuleSpec:
    """The registered stack spec for ``model.arch``."""
    if arch not in MODEL_REGISTRY:
        raise ValueError(f"unknown model.arch {arch!r}; registered: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[arch](backend)
