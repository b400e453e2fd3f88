"""The layer stack ``F(z, u)`` that the implicit model iterates to a fixed point (DESIGN §1).

```
F(z, u):  for each block l:  z = z + Mixer_l(Norm_l(z), u)  [+ z = z + MLP_l(Norm2_l(z))]
          return Norm_f(z)
```
The residual stream is kept in fp32. The same blocks with ``u = None`` and ``z = embedding`` are
the explicit model, so explicit and implicit share every line of layer code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from ilm_megatron.config import ModelConfig
from ilm_megatron.models.init import unit


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Residual-stream precision: at least fp32 (fp64 stays fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class BlockSubmodules:
    norm: ModuleSpec | type
    mixer: ModuleSpec | type
    mlp_norm: ModuleSpec | type | None = None
    mlp: ModuleSpec | type | None = None


class Block(nn.Module):
    """Pre-norm residual block: a sequence mixer and an optional MLP."""

    def __init__(self, config: ModelConfig, submodules: BlockSubmodules, layer_number: int = 1):
        super().__init__()
        self.layer_number = layer_number
        self.norm = build_module(submodules.norm, config.d_model, config=config)
        self.mixer = build_module(submodules.mixer, config, layer_number=layer_number)
        self.mlp_norm = self.mlp = None
        if submodules.mlp is not None:
            assert submodules.mlp_norm is not None, "an MLP needs its norm"
            self.mlp_norm = build_module(submodules.mlp_norm, config.d_model, config=config)
            self.mlp = build_module(submodules.mlp, config, layer_number=layer_number)

    @property
    def injection_size(self) -> int:
        return self.mixer.injection_size

    def _mlp(self, z: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            return z
        return z + upcast(self.mlp(self.mlp_norm(z)))

    def forward(
        self,
        z: torch.Tensor,
        u: torch.Tensor | None = None,
        return_cache: bool = False,
        cache: Any = None,
    ) -> tuple[torch.Tensor, Any]:
        """z: (b, l, d) fp32 residual stream -> (z', cache or None); ``cache``: the state
        before the window (read only), or None."""
        out, new_cache = self.mixer(self.norm(z), u, return_cache, cache)
        return self._mlp(z + upcast(out)), new_cache

    def step(self, z: torch.Tensor, u: torch.Tensor | None, cache: Any) -> tuple[torch.Tensor, Any]:
        """z: (b, d) one token -> (z', cache update)."""
        out, update = self.mixer.step(self.norm(z), u, cache)
        return self._mlp(z + upcast(out)), update

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        return self.mixer.empty_cache(batch, device, dtype)


@dataclass
class StackSubmodules:
    layer: ModuleSpec | type
    final_norm: ModuleSpec | type
    # the model's injection projection (built by ImplicitLM with the mixers' packed layout)
    injection: ModuleSpec | type | None = None


class Stack(nn.Module):
    """``n_layers`` blocks and the final norm: one evaluation of ``F``."""

    def __init__(self, config: ModelConfig, submodules: StackSubmodules) -> None:
        super().__init__()
        layers = []
        for i in range(config.n_layers):  # one unit each (ilm_megatron.models.init)
            with unit(f"stack.layers.{i}"):
                layers.append(build_module(submodules.layer, config, layer_number=i + 1))
        self.layers = nn.ModuleList(layers)
        with unit("stack.final_norm"):
            self.final_norm = build_module(submodules.final_norm, config.d_model, config=config)

    @property
    def injection_size(self) -> int:
        """Global width of the injection ``u``."""
        return self.layers[0].injection_size

    @property
    def injection_parts(self) -> tuple[int, ...]:
        """Global sizes of the injection's packed components (TP shards each of them)."""
        return self.layers[0].mixer.injection_parts

    def forward(
        self,
        z: torch.Tensor,
        u: torch.Tensor | None = None,
        return_cache: bool = False,
        caches: list[Any] | None = None,
    ) -> tuple[torch.Tensor, list[Any] | None]:
        """One evaluation of ``F``.

        Args:
            z: (b, l, d) current iterate (fp32).
            u: (b, l, injection_size / tp) this rank's injection share, or None (explicit pass).
            return_cache: also return each layer's inference cache after the last position.
            caches: each layer's state before the first position (read only), or None (empty).

        Returns:
            ``(F(z) (b, l, d) fp32, caches or None)``.
        """
        out = [] if return_cache else None
        prev = caches if caches is not None else [None] * len(self.layers)
        for layer, before in zip(self.layers, prev, strict=True):
            z, cache = layer(z, u, return_cache, before)
            if out is not None:
                out.append(cache)
        return upcast(self.final_norm(z)), out

    def step(
        self, z: torch.Tensor, u: torch.Tensor | None, caches: list[Any]
    ) -> tuple[torch.Tensor, list[Any]]:
        """``F`` for one token given the caches of the previous tokens (read only).

        z: (b, d), u: (b, injection_size) or None -> (F(z) (b, d), per-layer cache updates).
        """
        updates = []
        for layer, cache in zip(self.layers, caches):
            z, update = layer.step(z, u, cache)
            updates.append(update)
        return upcast(self.final_norm(z)), updates

    def empty_caches(self, batch: int, device: torch.device, dtype: torch.dtype) -> list[Any]:
        return [layer.empty_cache(batch, device, dtype) for layer in self.layers]
