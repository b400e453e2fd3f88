"""Megatron ``dist_checkpointing`` for :class:`~ilm_megatron.models.lm.ImplicitLM` (TP x PP x DP).

:func:`sharded_state_dict` describes every tensor of ``model.state_dict()`` as a piece of a global
tensor, keyed by its single-process state-dict name (under PP the full model's names: layers keep
their global index ``stack.layers.N``):

* replicated tensors (no TP layout: embedding, norms): a :class:`ShardedTensor` covering the whole
  tensor, with ``replica_id = (pp_copy, tp_rank, dp_rank)``, so only TP rank 0 of DP rank 0 writes;
* TP-sharded tensors with one component (``out_proj``, ``dt_bias``, ...): a ShardedTensor split
  along the layout's ``tp_dim`` (offset ``(dim, tp_rank, tp_size)``),
  ``replica_id = (pp_copy, 0, dp_rank)``;
* packed tensors (layout with several components, e.g. Mamba2 ``in_proj`` ``[z, x, B, C, dt]``,
  ``conv1d``, the injection, Llama ``qkv_proj``, SwiGLU ``fc1``): a :class:`ShardedTensorFactory`
  whose build splits the local tensor (``cat_i(component_i[r*p_i/T:(r+1)*p_i/T])`` on TP rank r of
  T) into one ShardedTensor per component, key ``{name}.part{i}``, global shape ``p_i`` along the
  split dim; its merge concatenates the loaded pieces back into the local packed tensor.

The keys and global shapes depend on neither the TP nor the PP size, so a checkpoint saved at one
layout loads at any other. ``pp_copy`` is 1 for the tied embedding on the last stage (stage 0 holds
the same tensor and writes it), 0 otherwise.

:func:`save_dist_checkpoint` / :func:`load_dist_checkpoint` wrap ``dist_checkpointing.save/load``
with the ``torch_dist`` backend (``torch.distributed.checkpoint`` files; on CPU / gloo through
:class:`CPUTorchDistSaveStrategy`, Megatron's default writer needs CUDA). Both are collective over
the default process group, which must be initialised (a world of one process is fine).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import (
    ReplicaId,
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from torch import nn

from ilm_megatron.core import parallel_state as ps
from ilm_megatron.core.tensor_parallel import get_tp_layout
from ilm_megatron.errors import UserError
from ilm_megatron.parallel.checkpoint import _model_tp, stage_state_names

Offsets = Sequence[tuple[int, int, int]]


def part_key(key: str, index: int) -> str:
    """Checkpoint key of component ``index`` of the packed tensor ``key``."""
    return f"{key}.part{index}"


def _dp_rank(metadata: Mapping[str, Any] | None) -> int:
    """Data-parallel rank (with context parallelism) of this process; 0 in a single process.

    ``metadata["dp_cp_group"]`` (Megatron's convention) wins; without Megatron's parallel state
    but with torch.distributed initialised, every rank is a data-parallel replica.
    """
    group = (metadata or {}).get("dp_cp_group")
    if group is not None:
        return dist.get_rank(group)
    if ps.tp_is_initialized():
        return ps._ps().get_data_parallel_rank(with_context_parallel=True)
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _tp_shard(
    key: str,
    t: torch.Tensor,
    dim: int,
    tp: tuple[int, int],
    offsets: Offsets,
    replica_id: ReplicaId,
) -> ShardedTensor:
    """``t`` is piece ``tp[0]`` of ``tp[1]`` along ``dim`` (a dim of ``t``, prepends excluded)."""
    n = len(offsets)
    return ShardedTensor.from_rank_offsets(
        key,
        t,
        *offsets,
        (dim + n, tp[0], tp[1]),
        replica_id=replica_id,
        prepend_axis_num=n,
    )


def packed_factory(
    key: str,
    t: torch.Tensor,
    dim: int,
    parts: Sequence[int],
    tp: tuple[int, int],
    offsets: Offsets,
    replica_id: ReplicaId,
) -> ShardedTensorFactory:
    """A factory splitting a TP-local packed tensor into one TP-sharded tensor per component.

    Args:
        key: checkpoint key of the packed tensor; component i is saved as ``part_key(key, i)``.
        t: this rank's packed tensor, ``sum(parts) / T`` long along ``dim``.
        dim: split dimension of ``t`` (prepended axes excluded).
        parts: global sizes ``p_i`` of the components along ``dim``.
        tp: ``(rank, T)``; component i of ``t`` is piece ``rank`` of ``T`` of a global ``p_i``.
        offsets: Megatron ``sharded_offsets`` (prepended axes).
        replica_id: replica id of every component.
    """
    tp_rank, tp_size = tp
    local = [p // tp_size for p in parts]
    if any(p % tp_size for p in parts) or sum(local) != t.shape[dim]:
        raise ValueError(f"{key}: shape {tuple(t.shape)} is not parts {list(parts)} / {tp_size}")

    views: list[torch.Tensor] = []

    @torch.no_grad()
    def build(k: str, x: torch.Tensor, rid: ReplicaId, flattened_range: slice | None):
        if flattened_range is not None:
            raise NotImplementedError("flattened ShardedTensors are not supported")
        pieces = torch.split(x, local, dim=dim)  # views of x: a load fills x in place
        views[:] = [x, *pieces]
        return {
            f"part{i}": _tp_shard(part_key(k, i), piece, dim, (tp_rank, tp_size), offsets, rid)
            for i, piece in enumerate(pieces)
        }

    @torch.no_grad()
    def merge(loaded: Mapping[str, torch.Tensor]) -> torch.Tensor:
        got = [loaded[f"part{i}"] for i in range(len(parts))]
        if views and all(a.data_ptr() == b.data_ptr() for a, b in zip(got, views[1:])):
            return views[0]  # read in place into the views: no copy
        return torch.cat(got, dim=dim)

    return ShardedTensorFactory(key, t, build, merge, replica_id)


def _stage_sets(model: nn.Module, stage: nn.Module | None) -> tuple[set[str] | None, set[str]]:
    """(names this stage owns or None for all, names held by an earlier stage too)."""
    if stage is None:
        return None, set()
    own = set(stage_state_names(model, stage))
    pp_rank, pp_size = stage.pp_rank, stage.pp_size  # type: ignore[attr-defined]
    stage_cls = type(stage)  # the pipeline's stage class (not imported: models import this module)
    earlier: set[str] = set()
    for r in range(pp_rank):
        earlier |= set(stage_state_names(model, stage_cls(model, r, pp_size)))
    return own, own & earlier


def sharded_state_dict_of(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    prefix: str = "",
    sharded_offsets: Offsets = (),
    metadata: Mapping[str, Any] | None = None,
    stage: nn.Module | None = None,
) -> ShardedStateDict:
    """:func:`sharded_state_dict` over ``tensors`` (named like ``model.state_dict()``).

    ``model`` supplies the TP layouts and the pipeline ownership; ``tensors`` the data (the model's
    own tensors to save, or fresh buffers of the same local shapes to load into).
    """
    if stage is None and ps.pp_world_size() > 1:
        raise ValueError("under pipeline parallelism pass this rank's stage (PipelineStage)")
    own, copies = _stage_sets(model, stage)
    model_tp = _model_tp(model)
    group_tp, group_rank = ps.tp_world_size(), ps.tp_rank()
    if model_tp not in (1, group_tp):
        raise ValueError(f"model built for TP={model_tp} in a TP group of size {group_tp}")
    dp = _dp_rank(metadata)
    layouts = {k: get_tp_layout(v) for k, v in model.state_dict(keep_vars=True).items()}
    out: ShardedStateDict = {}
    for name, t in tensors.items():
        if own is not None and name not in own:
            continue
        key = f"{prefix}{name}"
        pp_copy = 1 if name in copies else 0
        lay = layouts[name]
        if lay is None or model_tp == 1:
            # replicated over TP (or an unsharded model inside a TP group): one writer
            rid: ReplicaId = (pp_copy, group_rank, dp)
            tp = (0, 1)
        else:
            rid, tp = (pp_copy, 0, dp), (group_rank, group_tp)
        if lay is not None and len(lay[1]) > 1:
            out[key] = packed_factory(key, t, lay[0], lay[1], tp, sharded_offsets, rid)
        else:
            dim = lay[0] if lay is not None else 0
            out[key] = _tp_shard(key, t, dim, tp, sharded_offsets, rid)
    return out


def sharded_state_dict(
    model: nn.Module,
    prefix: str = "",
    sharded_offsets: Offsets = (),
    metadata: Mapping[str, Any] | None = None,
    stage: nn.Module | None = None,
) -> ShardedStateDict:
    """Megatron sharded state dict of ``model`` (a TP-local ImplicitLM; see the module docstring).

    Args:
        model: the (full) model of this rank; the ``tp`` backend built at the current TP size, or
            an unsharded (``local``) model, which is then a replica on every TP rank.
        prefix: prepended to every key.
        sharded_offsets: Megatron's prepended ``(axis, rank, size)`` offsets, passed through.
        metadata: Megatron's metadata dict; ``metadata["dp_cp_group"]`` sets the DP replica rank.
        stage: this rank's :class:`~ilm_megatron.parallel.pipeline.PipelineStage` of ``model``;
            required under PP > 1: only the tensors the stage owns are returned.

    Returns:
        ``{prefix + state-dict name: ShardedTensor | ShardedTensorFactory}``; the data are the
        model's own tensors (``state_dict(keep_vars=True)``, local TP shapes).
    """
    tensors = model.state_dict(keep_vars=True)
    return sharded_state_dict_of(model, tensors, prefix, sharded_offsets, metadata, stage)


class CPUTorchDistSaveStrategy(SaveShardedStrategy):
    """Synchronous ``torch_dist`` save for CPU tensors over gloo (same files, same backend name).

    Megatron-Core 0.16.1's ``TorchDistSaveShardedStrategy`` needs CUDA even for CPU tensors (its
    writer stages tensors with ``torch.cuda.synchronize()`` and broadcasts the write status in a
    CUDA tensor). This strategy translates the ShardedTensors with Megatron's own helpers and
    writes them with PyTorch's ``torch.distributed.checkpoint.save`` (``FileSystemWriter``, one
    file per rank) and Megatron's save planner: ``dist_checkpointing.load`` reads the result with
    its default ``torch_dist`` load strategy.
    """

    def __init__(self) -> None:
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: str | Path) -> None:
        """Write this rank's main replicas (collective over the default process group)."""
        import torch.distributed.checkpoint as dcp
        from megatron.core.dist_checkpointing.strategies.torch import (
            MCoreSavePlanner,
            _replace_state_dict_keys_with_sharded_keys,
            mcore_to_pyt_state_dict,
        )

        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True
        )
        dcp.save(
            mcore_to_pyt_state_dict(flat, False),
            storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
            planner=MCoreSavePlanner(flatten_state_dict=False),
        )

    def can_handle_sharded_objects(self) -> bool:
        return True


def save_strategy() -> SaveShardedStrategy | None:
    """The save strategy for this process group's backend.

    ``None`` (Megatron's default ``torch_dist`` writer, asynchronous-capable) with NCCL, else
    :class:`CPUTorchDistSaveStrategy`.
    """
    return None if dist.get_backend() == "nccl" else CPUTorchDistSaveStrategy()


def _require_dist() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "dist_checkpointing needs torch.distributed initialised (a 1-process group will do)"
        )


def save_dist_checkpoint(
    model: nn.Module, directory: str | Path, stage: nn.Module | None = None
) -> None:
    """Save ``model`` with ``dist_checkpointing.save`` (``torch_dist`` backend; collective).

    Every rank of the default process group must call it (ranks with nothing to write too). The
    directory holds ``__<rank>_<thread>.distcp`` shards, ``.metadata`` (the global index),
    ``common.pt`` and ``metadata.json``.
    """
    from megatron.core import dist_checkpointing

    _require_dist()
    os.makedirs(directory, exist_ok=True)
    sharded = sharded_state_dict(model, stage=stage)
    dist_checkpointing.save(sharded, str(directory), sharded_strategy=save_strategy())


@torch.no_grad()
def load_dist_checkpoint(
    model: nn.Module, directory: str | Path, stage: nn.Module | None = None
) -> list[str]:
    """Load a checkpoint written by :func:`save_dist_checkpoint` at any TP / PP / DP size.

    The tensors are read into fresh buffers (the model is left unchanged if reading fails), the
    packed components concatenated back, then ``model.load_state_dict``: strict without a stage;
    with one, only the stage's tensors (the rest of the full model is other stages' business).
    Collective over the default process group.

    Returns:
        The state-dict names that were loaded.
    """
    from megatron.core import dist_checkpointing

    _require_dist()
    buffers = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    sharded = sharded_state_dict_of(model, buffers, stage=stage)
    loaded = dist_checkpointing.load(sharded, str(directory))  # raises on a missing key
    model.load_state_dict(loaded, strict=stage is None)
    return sorted(loaded)


# ---------------------------------------------------------------------------------------------
# Training checkpoints: weights, AdamW state and data positions, one folder of shards

MODEL_PREFIX = "model."
MOMENTS = ("exp_avg", "exp_avg_sq")
DATA_KEY = "data.position"


def _step_tensors(
    model: nn.Module,
    steps: Mapping[str, torch.Tensor],
    stage: nn.Module | None,
    metadata: Mapping[str, Any] | None,
) -> ShardedStateDict:
    """AdamW's step count of each parameter: a one-element tensor, replicated over TP and DP."""
    own, copies = _stage_sets(model, stage)
    dp, tp = _dp_rank(metadata), ps.tp_rank()
    out: ShardedStateDict = {}
    for name, t in steps.items():
        if own is not None and name not in own:
            continue
        rid = (1 if name in copies else 0, tp, dp)
        key = f"optimizer.step.{name}"
        out[key] = ShardedTensor.from_rank_offsets(key, t, replica_id=rid)
    return out


def training_sharded_state_dict(
    model: nn.Module,
    stage: nn.Module | None,
    weights: Mapping[str, torch.Tensor],
    moments: Mapping[str, Mapping[str, torch.Tensor]],
    steps: Mapping[str, torch.Tensor],
    data: Sequence[tuple[int, Any]],
    dp_size: int,
    metadata: Mapping[str, Any] | None = None,
) -> ShardedStateDict:
    """One sharded state dict of a training step: every key is layout-free.

    Args:
        model: this rank's (TP-sharded, stage-split) model: TP layouts and stage ownership.
        stage: this rank's pipeline stage (None without PP).
        weights: ``{state-dict name: tensor}`` of this rank (its stage's, local TP shapes).
        moments: ``{"exp_avg": {name: t}, "exp_avg_sq": {...}}`` shaped like ``weights``.
        steps: ``{name: one-element float64 tensor}``, AdamW's step count per parameter.
        data: ``[(dp_rank, state)]``: data positions (ShardedObjects ``data.position`` of global
            shape ``(dp_size,)``); the one this rank saves, or the ones it loads.
        dp_size: the data-parallel size the positions are indexed by.
        metadata: Megatron's metadata (``dp_cp_group``).

    Keys: ``model.<name>``, ``optimizer.<moment>.<name>``, ``optimizer.step.<name>``,
    ``data.position``. Only the first stage's TP rank 0 writes a data position (the replica's
    other ranks hold the same one).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out = sharded_state_dict_of(model, weights, MODEL_PREFIX, (), metadata, stage)
    for key in MOMENTS:
        out.update(
            sharded_state_dict_of(model, moments[key], f"optimizer.{key}.", (), metadata, stage)
        )
    out.update(_step_tensors(model, steps, stage, metadata))
    pp_rank = stage.pp_rank if stage is not None else 0  # type: ignore[attr-defined]
    replica = (pp_rank, ps.tp_rank())
    for i, (dp_rank, state) in enumerate(data):
        out[f"{DATA_KEY}.{i}"] = ShardedObject(DATA_KEY, state, (dp_size,), (dp_rank,), replica)
    return out


def save_sharded(
    sharded: ShardedStateDict, directory: str | Path, parallel_group: Any = None
) -> None:
    """``dist_checkpointing.save`` of ``sharded`` into ``directory`` (which must not exist yet).

    Every rank writes its own main replicas in parallel; with ``parallel_group`` (the
    data-parallel group) Megatron's fully parallel strategy also spreads the writing of
    replicated tensors over its ranks instead of leaving it to the first replica. Collective.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    _require_dist()
    base = save_strategy() or TorchDistSaveShardedStrategy("torch_dist", 1)
    strategy = FullyParallelSaveStrategyWrapper(base, parallel_group) if parallel_group else base
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=False)
    dist.barrier()
    dist_checkpointing.save(sharded, str(directory), sharded_strategy=strategy)


def check_shards(directory: str | Path) -> None:
    """Refuse a sharded checkpoint whose files do not cover its index: a missing or truncated
    ``*.distcp`` file is named (the reader would fail with a less helpful message).

    Raises:
        CheckpointShardError: the index is missing or unreadable, or a shard file is absent or
            shorter than the bytes the index places in it.
    """
    import pickle

    directory = Path(directory)
    index = directory / ".metadata"
    if not index.is_file():
        raise CheckpointShardError(f"{index} is missing: not a complete sharded checkpoint")
    try:
        with open(index, "rb") as fh:
            meta = pickle.load(fh)
        storage = meta.storage_data
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged index
        raise CheckpointShardError(f"{index} is unreadable ({type(e).__name__}: {e})") from None
    need: dict[str, int] = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        f = directory / rel
        if not f.is_file():
            raise CheckpointShardError(f"{f} is missing (the index places {size} bytes in it)")
        have = f.stat().st_size
        if have < size:
            raise CheckpointShardError(f"{f} has {have} bytes, the index needs {size} (truncated)")


def load_sharded(sharded: ShardedStateDict, directory: str | Path) -> dict[str, Any]:
    """``dist_checkpointing.load`` with the shard files checked first; a reader failure is
    re-raised naming the checkpoint folder. Collective."""
    from megatron.core import dist_checkpointing

    _require_dist()
    check_shards(directory)
    try:
        # each rank asks for its own pieces only (e.g. one data position of several), so the
        # requests need not cover every saved object; missing keys still raise
        return dist_checkpointing.load(sharded, str(directory), validate_access_integrity=False)
    except Exception as e:  # noqa: BLE001 - torch.distributed.checkpoint raises many kinds
        raise CheckpointShardError(
            f"{directory}: cannot read the sharded checkpoint ({type(e).__name__}: {e})"
        ) from None


class CheckpointShardError(UserError, RuntimeError):
    """A sharded checkpoint that cannot be read; the message names the file."""
