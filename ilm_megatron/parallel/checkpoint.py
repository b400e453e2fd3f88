"""Resharding between tensor-parallel shards and the single-process state dict.

Every sharded parameter carries a layout (``tp_dim``, ``tp_parts``; see
:func:`ilm_megatron.core.tensor_parallel.set_tp_layout`). For a packed tensor whose global
components along ``dim`` have sizes ``p_0, ..., p_k`` (e.g. Mamba2 ``in_proj``:
``[d_inner, d_inner, g*n, g*n, nheads]``), rank r of T holds
``cat_i(component_i[r*p_i/T : (r+1)*p_i/T])``. Gathering splits each shard into its components,
concatenates each component over ranks, then packs the components again. Replicated parameters are
taken from the local model.

The checkpoint format is the plain single-process state dict (``torch.save``), so a checkpoint
saved at any TP size loads at any other, and at any PP size (every rank loads the full state dict
into its full model, then splits off its stage). Under TP x PP, :func:`save_checkpoint` with
``stage=`` gathers the TP shards of each stage's tensors inside the stage, then the stages' parts on
stage 0 (TP rank 0), which writes the file atomically (temporary file + rename).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ilm_megatron.core.parallel_state import (
    _ps,
    pp_group,
    pp_rank,
    pp_world_size,
    tp_group,
    tp_is_initialized,
    tp_rank,
    tp_world_size,
)
from ilm_megatron.core.tensor_parallel import get_tp_layout, shard_tensor, unshard_tensors

Layout = dict[str, tuple[int, tuple[int, ...]]]


def tp_layout(model: nn.Module) -> Layout:
    """``{state-dict name: (dim, global component sizes)}`` of every sharded parameter."""
    return {
        name: lay for name, p in model.named_parameters() if (lay := get_tp_layout(p)) is not None
    }


def shard_state_dict(
    full: Mapping[str, torch.Tensor], layout: Layout, rank: int, size: int
) -> dict[str, torch.Tensor]:
    """The state dict of TP rank ``rank`` of ``size`` from a full (single-process) one."""
    out = {}
    for k, v in full.items():
        lay = layout.get(k)
        out[k] = v if lay is None or size == 1 else shard_tensor(v, lay[0], lay[1], rank, size)
    return out


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    size = tp_world_size()
    if size == 1:
        return [t]
    t = t.detach().contiguous()
    bufs = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(bufs, t, group=tp_group())
    return bufs


def gather_tensors(
    model: nn.Module, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Gather TP-local tensors named like ``model``'s parameters (weights or their gradients).

    Collective over the TP group: every rank must call it with the same names in the same order.
    """
    layout = tp_layout(model)
    out = {}
    for k, v in tensors.items():
        lay = layout.get(k)
        if lay is None or tp_world_size() == 1:
            out[k] = v.detach().clone()
        else:
            out[k] = unshard_tensors(_all_gather(v), lay[0], lay[1])
    return out


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict of a TP-sharded model (collective; same on every rank)."""
    return gather_tensors(model, model.state_dict())


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered gradients of every parameter that has one (collective)."""
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return gather_tensors(model, grads)


def load_full_state_dict(
    model: nn.Module, full: Mapping[str, torch.Tensor], names: Collection[str] | None = None
) -> None:
    """Load a full state dict into ``model``, keeping this TP rank's shard of each tensor.

    ``names``: load only these state-dict names (a pipeline stage's; the rest of ``model`` may be
    on ``meta``), each of which ``full`` must hold. None: all of them (strict).
    """
    if names is None:
        sd = shard_state_dict(full, tp_layout(model), tp_rank(), _model_tp(model))
        model.load_state_dict(sd)
        return
    missing = sorted(n for n in names if n not in full)
    if missing:
        raise KeyError(f"the state dict lacks {missing}")
    part = {n: full[n] for n in names}
    sd = shard_state_dict(part, tp_layout(model), tp_rank(), _model_tp(model))
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for n, v in sd.items():
            if own[n].shape != v.shape:
                raise ValueError(
                    f"{n}: shape {tuple(v.shape)} vs the model's {tuple(own[n].shape)}"
                )
            own[n].copy_(v)


def _model_tp(model: nn.Module) -> int:
    """TP degree the model was built with (1 for the local backend)."""
    for m in model.modules():
        tp = getattr(m, "tp", None)
        if isinstance(tp, int):
            return tp
    return 1


def stage_state_names(model: nn.Module, stage: nn.Module) -> list[str]:
    """State-dict names of ``model`` whose tensors belong to ``stage`` (a PipelineStage of it)."""
    owned = {id(t) for t in stage.parameters()} | {id(t) for t in stage.buffers()}
    return [k for k, v in model.state_dict(keep_vars=True).items() if id(v) in owned]


def pipeline_full_state_dict(
    model: nn.Module, stage: nn.Module | None = None
) -> dict[str, torch.Tensor] | None:
    """The single-process state dict of a TP x PP model, on stage 0's TP rank 0 (None elsewhere).

    Each stage gathers its own tensors over its TP group (the rest of the full model a rank holds
    is not its to report: other stages own it), then the stages' parts go to stage 0 over the
    pipeline group as CPU tensors. Collective over the whole model-parallel group. Without a stage
    (or with one stage) this is :func:`full_state_dict` on TP rank 0.
    """
    if stage is None or pp_world_size() == 1:
        sd = full_state_dict(model)
        return sd if tp_rank() == 0 else None
    names = set(stage_state_names(model, stage))
    local = gather_tensors(model, {k: v for k, v in model.state_dict().items() if k in names})
    if tp_rank() != 0:
        return None
    part = {k: v.cpu() for k, v in local.items()}
    parts: list[dict[str, torch.Tensor]] | None = (
        [{} for _ in range(pp_world_size())] if pp_rank() == 0 else None
    )
    group = pp_group()
    dist.gather_object(part, parts, dst=dist.get_global_rank(group, 0), group=group)
    if parts is None:
        return None
    full: dict[str, torch.Tensor] = {}
    for p in parts:  # stage order; a tied embedding is held by two stages (identical copies)
        for k, v in p.items():
            full.setdefault(k, v)
    missing = [k for k in model.state_dict() if k not in full]
    if missing:
        raise RuntimeError(f"no stage holds {missing}")
    return {k: full[k] for k in model.state_dict()}


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file and a rename (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(model: nn.Module, path: str | Path, stage: nn.Module | None = None) -> None:
    """Gather the full state dict and write it atomically (collective).

    Without ``stage`` (or with PP=1): gathered over the TP group, written by TP rank 0. With this
    rank's pipeline ``stage``: see :func:`pipeline_full_state_dict`; written by stage 0's TP rank 0,
    and every rank of the model-parallel group returns once the file is in place.
    """
    sd = pipeline_full_state_dict(model, stage)
    if sd is not None:
        atomic_save(sd, path)
    if not dist.is_initialized():
        return
    if stage is not None and pp_world_size() > 1 and tp_is_initialized():
        dist.barrier(group=_ps().get_model_parallel_group())
    elif tp_world_size() > 1:
        dist.barrier(group=tp_group())


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint written at any TP size into ``model`` (any TP size)."""
    load_full_state_dict(model, torch.load(path, map_location="cpu", weights_only=True))
