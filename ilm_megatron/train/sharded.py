"""Sharded training checkpoints (Megatron-Core ``dist_checkpointing``), written by every rank.

A multi-process step folder holds ``sharded/`` (the ``torch_dist`` files: one ``__R_0.distcp``
per writing rank, the ``.metadata`` index, ``common.pt``, ``metadata.json``) and ``trainer.pt``
(the layout and rank 0's counters). ``sharded/`` holds, under layout-free keys
(:func:`~ilm_megatron.parallel.dist_checkpoint.training_sharded_state_dict`):

* ``model.<name>``: the weights, each TP shard or stage written by the rank that holds it;
* ``optimizer.exp_avg.<name>``, ``optimizer.exp_avg_sq.<name>``, ``optimizer.step.<name>``:
  AdamW's state, sharded like the weights;
* ``data.position``: each data-parallel rank's trainer state (its data position and counters),
  a ShardedObject indexed by the DP rank.

Replicated tensors are written once, spread over the data-parallel ranks (Megatron's fully
parallel save strategy). Loading reads each rank's own pieces at whatever TP / PP layout it runs
with, so the layout may change at a restart; a single process loads the same folder
(:func:`load_training_shards` with ``stage=None`` and no TP). The folder is written inside the
step's temporary folder, so the atomic rename and ``latest`` protect it like any other file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ilm_megatron.train.checkpoint import SHARDED_DIR, CheckpointError, fault_point, is_sharded

FORMAT = "ilm-megatron-sharded/1"


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """A one-process gloo group when torch.distributed is not initialised (``dist_checkpointing``
    needs one); the existing group otherwise."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as d:
        store = dist.FileStore(os.path.join(d, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _moments_and_steps(
    named: Sequence[tuple[str, nn.Parameter]], by_name: dict[str, dict] | None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """AdamW's moments and step counts of ``named`` (``by_name`` as
    :func:`~ilm_megatron.train.optim.adamw_state_by_name`; a parameter without state gets zero
    moments and step 0), or fresh buffers to load into (``by_name=None``)."""
    moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    steps: dict[str, torch.Tensor] = {}
    for name, p in named:
        for key in moments:
            t = None if by_name is None else by_name[key].get(name)
            if by_name is None:  # a buffer the load overwrites
                moments[key][name] = torch.empty_like(p.detach())
            elif t is None:  # no state yet: zero moments, step 0
                moments[key][name] = torch.zeros_like(p.detach())
            else:
                moments[key][name] = t.to(p.device, torch.float32)
        step = 0.0 if by_name is None else float(by_name["step"].get(name, 0.0))
        steps[name] = torch.tensor([step], dtype=torch.float64)
    return moments, steps


def save_training_shards(
    directory: Path,
    model: nn.Module,
    stage: nn.Module | None,
    named: Sequence[tuple[str, nn.Parameter]],
    adamw: dict[str, dict],
    trainer_state: dict[str, Any],
    dp_rank: int,
    dp_size: int,
    dp_group: Any = None,
) -> list[Path]:
    """Write this rank's pieces of a training step into ``directory`` (collective); returns the
    shard files this rank wrote.

    Args:
        directory: the ``sharded`` folder to create (inside the step's temporary folder).
        model, stage: this rank's model and pipeline stage (None without PP).
        named: the ``(name, parameter)`` pairs this rank trains.
        adamw: AdamW's state of ``named`` by name (``{"exp_avg", "exp_avg_sq", "step"}``).
        trainer_state: this data-parallel rank's trainer state (data position, counters).
        dp_rank, dp_size: the data-parallel position the state belongs to.
        dp_group: the data-parallel group: replicated tensors are written spread over it.
    """
    from ilm_megatron.parallel.dist_checkpoint import save_sharded, training_sharded_state_dict

    names = {n for n, _ in named}
    weights = {k: v for k, v in model.state_dict().items() if k in names}
    moments, steps = _moments_and_steps(named, adamw)
    meta = {"dp_cp_group": dp_group} if dp_group is not None else None
    sharded = training_sharded_state_dict(
        model, stage, weights, moments, steps, [(dp_rank, trainer_state)], dp_size, meta
    )
    fault_point("save_shards")  # tests: a rank dies before writing its shards
    save_sharded(sharded, directory, dp_group)
    return sorted(Path(directory).glob(f"__{dist.get_rank()}_*.distcp"))


def load_training_shards(
    directory: Path,
    model: nn.Module,
    stage: nn.Module | None,
    named: Sequence[tuple[str, nn.Parameter]],
    data_ranks: Sequence[int],
    saved_dp: int,
) -> tuple[dict[str, dict], list[dict[str, Any]]]:
    """Read this rank's weights (into ``model``), AdamW state and the trainer states of the data
    ranks ``data_ranks`` (of the ``saved_dp`` that wrote them). Collective; the model is changed
    only once everything has been read.

    Returns:
        ``(adamw, states)``: AdamW's state of ``named`` by name, local TP shards
        (``{"exp_avg", "exp_avg_sq", "step"}``; parameters saved at step 0 are left out), and the
        trainer states in the order of ``data_ranks``.
    """
    from ilm_megatron.parallel.dist_checkpoint import (
        DATA_KEY,
        MODEL_PREFIX,
        load_sharded,
        training_sharded_state_dict,
    )

    names = {n for n, _ in named}
    own = model.state_dict()
    weights = {k: torch.empty_like(v) for k, v in own.items() if k in names}
    moments, steps = _moments_and_steps(named, None)
    data = [(r, None) for r in data_ranks]
    sharded = training_sharded_state_dict(
        model, stage, weights, moments, steps, data, saved_dp, None
    )
    loaded = load_sharded(sharded, directory)
    with torch.no_grad():
        for k in weights:
            own[k].copy_(loaded[MODEL_PREFIX + k])
    adamw: dict[str, dict] = {"exp_avg": {}, "exp_avg_sq": {}, "step": {}}
    for name in names:
        step = float(loaded[f"optimizer.step.{name}"][0])
        if step == 0.0:
            continue
        adamw["step"][name] = step
        for key in ("exp_avg", "exp_avg_sq"):
            adamw[key][name] = loaded[f"optimizer.{key}.{name}"]
    states = [loaded[f"{DATA_KEY}.{i}"] for i in range(len(data_ranks))]
    return adamw, states


def consolidate(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], Any]:
    """The whole model and its AdamW state from a sharded step folder, read in this process.

    Returns:
        ``(weights, adamw, cfg)``: the single-process state dict (CPU), AdamW's state by name
        (``{"exp_avg", "exp_avg_sq", "step"}``) and the run's config (from ``config.yaml``).

    Raises:
        CheckpointError: not a sharded step folder, or its config is missing.
    """
    import dataclasses

    from ilm_megatron.config import load_config
    from ilm_megatron.models.init import to_empty
    from ilm_megatron.models.lm import build_model

    folder = Path(folder)
    if not is_sharded(folder):
        raise CheckpointError(f"{folder}: no {SHARDED_DIR}/ folder (not a sharded checkpoint)")
    if not (folder / "config.yaml").is_file():
        raise CheckpointError(f"{folder / 'config.yaml'} is missing (the save did not finish?)")
    cfg = load_config([folder / "config.yaml"], ["parallel.tp=1", "parallel.pp=1"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend="local"))
    shared = torch.load(folder / "trainer.pt", weights_only=True)
    saved_dp = (shared.get("layout") or {}).get("dp", 1)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.solver)
    to_empty(model, "cpu")  # every tensor is read from the shards
    named = list(model.named_parameters())
    with process_group():
        adamw, _ = load_training_shards(folder / SHARDED_DIR, model, None, named, [0], saved_dp)
    return model.state_dict(), adamw, cfg
