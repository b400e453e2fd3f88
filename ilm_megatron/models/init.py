"""Initialisation by unit name: any rank builds its share of the model without the rest.

The model is cut into *units*, the submodules that own parameters (``embedding``,
``injection_norm``, ``injection``, ``stack.layers.N``, ``stack.final_norm``, ``lm_head``). Each unit
is constructed under its own random seed, derived from one base seed and the unit's name
(:func:`unit_seed`), so its initial weights do not depend on which other units were built, in
which order, or on which rank. A rank that holds pipeline stage ``s`` of TP rank ``r`` builds:

1. the whole model on the ``meta`` device (shapes only, nothing allocated);
2. for every unit it owns, that unit alone at its global (single-process) shapes on the CPU, from
   the unit's seed (every other unit of that twin stays on ``meta``);
3. this TP rank's shard of the twin unit's tensors, copied into the unit on the target device.

Host memory beyond the rank's own share is one unit at global size (one layer, or the embedding
table), freed before the next. Because step 2 is the same code a single process runs, the
gathered weights of every layout equal the single-process model's from the same seed.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_BASE_BITS = 62


@dataclass(frozen=True)
class BuildPlan:
    """What :class:`~ilm_megatron.models.lm.ImplicitLM` materialises while it is constructed.

    ``base_seed``: the seed every unit's seed derives from; ``keep``: the unit names built with
    real storage on the CPU (None: all); the others are built on ``meta``.
    """

    base_seed: int
    keep: frozenset[str] | None = None

    def keeps(self, name: str) -> bool:
        return self.keep is None or name in self.keep


_PLAN: contextvars.ContextVar[BuildPlan | None] = contextvars.ContextVar("ilm_build_plan")


def unit_seed(base_seed: int, name: str) -> int:
    """The seed of unit ``name``: a stable hash of (base seed, name), independent of the layout."""
    digest = hashlib.sha256(f"{base_seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_base_seed() -> int:
    """One draw from the global CPU generator: ``torch.manual_seed(s)`` then a build is
    reproducible, and two builds after the same ``manual_seed`` agree unit by unit."""
    return int(torch.randint(0, 1 << _BASE_BITS, (), dtype=torch.int64, device="cpu"))


@contextlib.contextmanager
def build_plan(plan: BuildPlan) -> Iterator[None]:
    """Construct models under ``plan`` (see :func:`unit`)."""
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def ambient_meta() -> bool:
    """True inside ``with torch.device("meta")`` (nothing built there has values to match)."""
    return torch.get_default_device().type == "meta"


@contextlib.contextmanager
def unit(name: str) -> Iterator[None]:
    """Construct unit ``name``: under a build plan, from its own seed on the CPU if the plan keeps
    it, else on ``meta``; the global generator is left as it was. Without a plan (modules built by
    hand, or inside ``torch.device("meta")``) this does nothing."""
    plan = _PLAN.get(None)
    if plan is None or ambient_meta():
        yield
        return
    device = "cpu" if plan.keeps(name) else "meta"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(unit_seed(plan.base_seed, name))
        yield


def unit_names(n_layers: int, implicit: bool, tied: bool) -> list[str]:
    """Every unit of a model, in construction order."""
    names = ["embedding"]
    names += [f"stack.layers.{i}" for i in range(n_layers)] + ["stack.final_norm"]
    if implicit:
        names += ["injection_norm", "injection"]
    if not tied:
        names.append("lm_head")
    return names


def stage_layer_range(n_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Contiguous layers ``[start, end)`` of stage ``pp_rank`` (remainder spread over the first)."""
    base, rem = divmod(n_layers, pp_size)
    start = pp_rank * base + min(pp_rank, rem)
    return start, start + base + (1 if pp_rank < rem else 0)


def stage_units(
    n_layers: int, implicit: bool, tied: bool, pp_rank: int, pp_size: int
) -> frozenset[str]:
    """The units pipeline stage ``pp_rank`` of ``pp_size`` holds (see ``PipelineStage``):
    its layers; stage 0 the embedding and the injection; the last stage the final norm and the
    head (with tied embeddings, the embedding again)."""
    start, end = stage_layer_range(n_layers, pp_rank, pp_size)
    own = {f"stack.layers.{i}" for i in range(start, end)}
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    if first:
        own.add("embedding")
        if implicit:
            own |= {"injection_norm", "injection"}
    if last:
        own.add("stack.final_norm")
        own.add("embedding" if tied else "lm_head")
    return frozenset(own)


def to_empty(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``module.to_empty(device=device)`` keeping what is marked on each parameter (its TP
    layout, set by ``set_tp_layout``): ``to_empty`` makes new parameters without it."""
    marks = {n: dict(p.__dict__) for n, p in module.named_parameters()}
    module.to_empty(device=device)
    for n, p in module.named_parameters():
        p.__dict__.update(marks[n])
    return module
