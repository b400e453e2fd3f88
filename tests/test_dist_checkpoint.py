"""Megatron ``dist_checkpointing`` of ImplicitLM: ``sharded_state_dict()`` reshards over TP / PP.

* Without processes (a fake Megatron parallel state of TP size 2): every rank's ShardedTensors,
  packed tensors split per component, describe global tensors of the single-process shapes and,
  put together by their global offsets (main replicas only), tile exactly the single-process
  tensors (component i of a packed tensor = ``split(full, parts)[i]``); keys do not depend on TP.
* 4 gloo processes (one thread each), Megatron's parallel state re-initialised between phases:
  save at TP=2 (x DP=2), load at TP=1 (x DP=4) into a model built from another seed (eval logits
  against the single-process model < 1e-6), at TP=1 x PP=2 and TP=2 x PP=2 (every stage's
  gathered tensors, tied embedding copies included, equal to the reference); save at TP=2 x PP=2
  and load that at TP=1 (logits again).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config

CASES = [("mamba2", ("model.ngroups=2",)), ("llama", ())]
TOL = 1e-6


def _local(cfg: Any, seed: int) -> torch.nn.Module:
    from ilm_megatron.models.lm import build_model

    torch.manual_seed(seed)
    return build_model(dataclasses.replace(cfg.model, backend="local"), cfg.solver)


# ------------------------------------------------------------------- no processes: fake TP state
class _FakeParallelState:
    """The bits of Megatron's ``parallel_state`` that ``ilm_megatron.core.parallel_state``
    reads."""

    def __init__(self, tp: int, rank: int, pp: int = 1) -> None:
        self.tp, self.rank, self.pp = tp, rank, pp

    def model_parallel_is_initialized(self) -> bool:
        return True

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_rank(self, with_context_parallel: bool = False) -> int:
        return 0


def _fake_tp(monkeypatch: pytest.MonkeyPatch, tp: int, rank: int, pp: int = 1) -> None:
    from ilm_megatron.core import parallel_state as state

    fake = _FakeParallelState(tp, rank, pp)
    monkeypatch.setattr(state, "_ps", lambda: fake)
    monkeypatch.setattr(state, "tp_is_initialized", lambda: True)


def _sharded_tensors(model: torch.nn.Module) -> list[Any]:
    """The model's ShardedTensors with the factories built."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    values = list(nested_values(sd))
    assert all(isinstance(v, ShardedTensor) for v in values), values
    return values


def _expected_globals(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint key -> global tensor: packed tensors split into ``{name}.part{i}``."""
    from ilm_megatron.core.tensor_parallel import get_tp_layout
    from ilm_megatron.parallel.dist_checkpoint import part_key

    out = {}
    for name, t in ref.state_dict(keep_vars=True).items():
        lay = get_tp_layout(t)
        if lay is not None and len(lay[1]) > 1:
            for i, c in enumerate(torch.split(t.detach(), list(lay[1]), dim=lay[0])):
                out[part_key(name, i)] = c
        else:
            out[name] = t.detach()
    return out


@pytest.mark.parametrize("arch, overrides", CASES)
def test_sharded_tensors_tile_single_process_tensors(
    monkeypatch: pytest.MonkeyPatch, arch: str, overrides: tuple[str, ...]
) -> None:
    """Fake TP=2: global shapes are the single-process ones, the main replicas of both ranks tile
    every (component) tensor exactly once with the right values; TP=1 gives the same keys."""
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    from ilm_megatron.models.lm import build_model
    from ilm_megatron.parallel.checkpoint import load_full_state_dict

    cfg = tiny_config(arch, overrides=(*overrides, "parallel.tp=2"))
    ref = _local(cfg, 0)
    expected = _expected_globals(ref)
    assert any(k.endswith(".part1") for k in expected)  # packed tensors exist

    canvas = {k: torch.full_like(v, float("nan")) for k, v in expected.items()}
    writes = {k: torch.zeros_like(v) for k, v in expected.items()}
    replicas = []
    for rank in (0, 1):
        _fake_tp(monkeypatch, 2, rank)
        torch.manual_seed(7)
        model = build_model(cfg.model, cfg.solver)  # tp backend at (fake) TP=2
        assert any(getattr(m, "tp", None) == 2 for m in model.modules())
        load_full_state_dict(model, ref.state_dict())
        for st in _sharded_tensors(model):
            assert st.global_shape == tuple(expected[st.key].shape), st
            replicas.append(st.replica_id)
            if is_main_replica(st.replica_id):
                canvas[st.key][st.global_slice()] = st.data.detach()
                writes[st.key][st.global_slice()] += 1
    for k, v in expected.items():
        assert torch.equal(canvas[k], v), k
        assert bool((writes[k] == 1).all()), f"{k}: some element written {writes[k].unique()}"
    assert (0, 1, 0) in replicas and (0, 0, 0) in replicas  # TP rank 1 keeps replicated copies

    # TP=1 (local model, unsharded): the same keys and global shapes
    _fake_tp(monkeypatch, 1, 0)
    tp1 = {st.key: st.global_shape for st in _sharded_tensors(_local(cfg, 3))}
    assert tp1 == {k: tuple(v.shape) for k, v in expected.items()}


def test_prefix_and_sharded_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    """``prefix`` prefixes every key; ``sharded_offsets`` prepend axes (to components too)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    _fake_tp(monkeypatch, 1, 0)
    model = _local(tiny_config("llama"), 0)
    expected = _expected_globals(model)
    sd = model.sharded_state_dict(prefix="model.", sharded_offsets=((0, 1, 3),))
    assert set(sd) == {f"model.{k}" for k in model.state_dict()}
    apply_factories(sd)
    sts = list(nested_values(sd))
    assert {st.key for st in sts} == {f"model.{k}" for k in expected}
    for st in sts:
        shape = tuple(expected[st.key.removeprefix("model.")].shape)
        assert st.global_shape == (3, *shape) and st.global_offset[0] == 1, st


def test_pipeline_needs_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under PP a rank's full model holds other stages' stale copies: a stage is required."""
    _fake_tp(monkeypatch, 1, 0, pp=2)
    with pytest.raises(ValueError, match="stage"):
        _local(tiny_config("llama"), 0).sharded_state_dict()


# ------------------------------------------------------------------- 4 gloo processes
def _reinit(tp: int, pp: int) -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )


def _eval_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _check_logits_at_tp1(cfg: Any, directory: Path, seed: int, ref_logits, ids, ref_sd) -> None:
    """TP=1 (every rank a DP replica): a model of another seed loads ``directory``."""
    from ilm_megatron.parallel.dist_checkpoint import load_dist_checkpoint

    _reinit(1, 1)
    model = _local(cfg, seed)
    assert any(not torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items())
    names = load_dist_checkpoint(model, directory)
    assert sorted(names) == sorted(ref_sd)
    diff = (_eval_logits(model, ids) - ref_logits).abs().max().item()
    assert diff < TOL, f"{directory.name}: logits differ by {diff:.3g}"


def _check_stage_tensors(model: torch.nn.Module, stage: torch.nn.Module, ref_sd) -> None:
    """Every stage's own tensors (TP-gathered) equal the reference; the whole model too."""
    from ilm_megatron.parallel.checkpoint import (
        gather_tensors,
        pipeline_full_state_dict,
        stage_state_names,
    )

    names = stage_state_names(model, stage)
    mine = gather_tensors(model, {k: v for k, v in model.state_dict().items() if k in names})
    for k, v in mine.items():
        assert torch.equal(v, ref_sd[k]), f"stage {stage.pp_rank}: {k} differs"
    full = pipeline_full_state_dict(model, stage)
    if full is not None:
        assert set(full) == set(ref_sd)
        for k, v in full.items():
            assert torch.equal(v, ref_sd[k]), k


def reshard_worker(rank: int, arch: str, overrides: tuple[str, ...], tmp: str) -> None:
    """One of 4 ranks: the phases of the module docstring."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from ilm_megatron.core.parallel_state import pp_rank
    from ilm_megatron.models.lm import build_model
    from ilm_megatron.parallel.checkpoint import load_full_state_dict
    from ilm_megatron.parallel.dist_checkpoint import load_dist_checkpoint, save_dist_checkpoint
    from ilm_megatron.parallel.pipeline import split_model_into_stages

    root = Path(tmp)
    cfg = tiny_config(arch, overrides=overrides)
    tp_cfg = tiny_config(arch, overrides=(*overrides, "parallel.tp=2"))
    ref = _local(cfg, 1234)
    ref_sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    ids = torch.randint(
        0, cfg.model.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5)
    )
    ref_logits = _eval_logits(ref, ids)

    # TP=2 x DP=2: save (the save itself validates that each shard has exactly one main replica)
    _reinit(2, 1)
    torch.manual_seed(99)
    model = build_model(tp_cfg.model, tp_cfg.solver)
    load_full_state_dict(model, ref_sd)
    save_dist_checkpoint(model, root / "tp2")
    if rank == 0:
        meta = dist_checkpointing.load_tensors_metadata(str(root / "tp2"))
        shapes = {k: tuple(v.shape) for k, v in _expected_globals(ref).items()}
        assert {k: tuple(m.global_shape) for k, m in meta.items()} == shapes
        files = sorted(p.name for p in (root / "tp2").iterdir())
        assert {".metadata", "common.pt", "metadata.json"} <= set(files), files
    _check_logits_at_tp1(cfg, root / "tp2", 7, ref_logits, ids, ref_sd)

    # PP=2 with TP=1 (x DP=2) and TP=2: each stage loads its tensors of the TP=2 checkpoint
    for tp in (1, 2):
        _reinit(tp, 2)
        torch.manual_seed(100 + tp)
        model = build_model((tp_cfg if tp == 2 else cfg).model, cfg.solver)
        stage = split_model_into_stages(model, pp_rank(), 2)
        load_dist_checkpoint(model, root / "tp2", stage=stage)
        _check_stage_tensors(model, stage, ref_sd)

    # save at TP=2 x PP=2 (tied embedding on both stages, one writer), load at TP=1
    save_dist_checkpoint(model, root / "tp2pp2", stage=stage)
    _check_logits_at_tp1(cfg, root / "tp2pp2", 8, ref_logits, ids, ref_sd)
    dist.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("arch, overrides", CASES)
def test_reshard_tp_pp(tmp_path: Path, arch: str, overrides: tuple[str, ...]) -> None:
    """4 gloo processes: TP=2 save -> TP=1, TP=1 x PP=2, TP=2 x PP=2 loads; TP=2 x PP=2 save ->
    TP=1 load (about 25 s each on 2 cores)."""
    from _dist import run_workers

    run_workers(reshard_worker, 4, arch, overrides, str(tmp_path), tp=2, pp=1)
    assert (tmp_path / "tp2pp2" / "metadata.json").exists()
