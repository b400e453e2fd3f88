"""Sharded training checkpoints (``sharded/``, Megatron ``dist_checkpointing``) under ilm-train.

A TP=2 x PP=2 run writes its checkpoints as shards from every rank; they resume at PP=2, in one
process and at TP=2 x DP=2, each continuing the single-process curve. A save killed midway leaves
the previous checkpoint in use; a missing or truncated shard is named.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist import records, torchrun_train
from conftest import ROOT
from test_catbabi_train import _make_data
from test_parallel_train import BASE as PARALLEL_BASE
from test_parallel_train import _rewind_to_step2

from ilm_megatron.config import load_config
from ilm_megatron.train import checkpoint as ckpt
from ilm_megatron.train.loop import train

pytestmark = pytest.mark.slow

BASE = [*PARALLEL_BASE, "train.save_interval=2", "parallel.microbatches=2"]
REL = 1e-5


def _close(got: Path, ref: Path, steps: list[int]) -> None:
    a = {r["step"]: r for r in records(ref)}
    b = {r["step"]: r for r in records(got)}
    for s in steps:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=REL), (s, b[s], a[s])
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=REL), s
    wa = ckpt.load_state(ref / "model.safetensors")
    wb = ckpt.load_state(got / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one")
    cfg = load_config([], [*BASE, f"run_dir={run}"])
    train(cfg, run, quiet=True)
    return run


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tp2pp2")
    torchrun_train(run, *BASE, "parallel.tp=2", "parallel.pp=2", nproc=4)
    return run


_rewind = _rewind_to_step2  # a copy of a run as if it had died after its step-2 checkpoint


def test_tp2_pp2_writes_shards_from_every_rank(tmp_path: Path, tp2pp2: Path) -> None:
    step = tp2pp2 / "checkpoints" / "step-00000004"
    shards = sorted(f.name for f in (step / "sharded").glob("*.distcp"))
    assert shards == [f"__{r}_0.distcp" for r in range(4)]  # each rank wrote its own file
    sizes = [(step / "sharded" / f).stat().st_size for f in shards]
    assert max(sizes) < 0.6 * sum(sizes), sizes  # no rank holds most of the bytes
    assert not (step / "model.safetensors").exists()
    state = torch.load(step / "trainer.pt", weights_only=True)
    assert state["layout"] == {"tp": 2, "pp": 2, "dp": 1, "world_size": 4}
    # the consolidation tool reads the shards back into the whole model: the run's final weights
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "consolidate_checkpoint.py"), str(tp2pp2),
         "--out", str(tmp_path / "whole.safetensors"), "--optimizer", str(tmp_path / "opt.pt")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["checkpoint"].endswith("step-00000004")
    whole = ckpt.load_state(tmp_path / "whole.safetensors")
    final = ckpt.load_state(tp2pp2 / "model.safetensors")
    assert whole.keys() == final.keys()
    assert all(torch.equal(whole[k], final[k]) for k in final)
    opt = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert set(opt["step"].values()) == {4.0} and opt["exp_avg"].keys() <= final.keys()


@pytest.mark.parametrize(
    "layout",
    [("parallel.pp=2",), (), ("parallel.tp=2",)],
    ids=["pp2", "one-process", "tp2-dp2"],
)
def test_tp2_pp2_shards_resume_at_another_layout(
    tmp_path: Path, tp2pp2: Path, reference: Path, layout: tuple[str, ...]
) -> None:
    run = _rewind(tp2pp2, tmp_path / "run")
    if layout == ():
        cfg = load_config([], [*BASE, f"run_dir={run}"])
        res = train(cfg, run, quiet=True)
        assert [r["step"] for r in res.history] == [3, 4]
    else:
        nproc = 4 if layout == ("parallel.tp=2",) else 2
        torchrun_train(run, *BASE, *layout, nproc=nproc)
    _close(run, reference, [3, 4])
    step4 = run / "checkpoints" / "step-00000004"
    if layout == ("parallel.tp=2",):  # DP=2: the word problem's one stream re-splits
        state = torch.load(step4 / "trainer.pt", weights_only=True)
        assert state["layout"]["dp"] == 2


def test_save_killed_midway_keeps_the_previous_checkpoint(tmp_path: Path, reference: Path) -> None:
    """Rank 1 dies while the ranks write the step-4 shards; torchrun restarts the job, which
    resumes from step 2 and ends where an uninterrupted run ends."""
    run = tmp_path / "run"
    out = torchrun_train(
        run, *BASE, "parallel.pp=2", max_restarts=1,
        ILM_FAULT="save_shards@2", ILM_FAULT_RANK="1",
    )  # fmt: skip
    assert "exitcode: -9" in out and "local_rank: 1" in out, out[-3000:]  # rank 1 was killed
    _close(run, reference, [1, 2, 3, 4])  # the restart resumed from step 2 and caught up
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step-00000004") is None
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_missing_or_truncated_shard_is_named(tmp_path: Path, tp2pp2: Path) -> None:
    from ilm_megatron.parallel.dist_checkpoint import CheckpointShardError, check_shards

    step = tmp_path / "step"
    shutil.copytree(tp2pp2 / "checkpoints" / "step-00000004", step)
    check_shards(step / "sharded")  # complete: nothing to say
    shard = step / "sharded" / "__2_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointShardError, match=r"__2_0\.distcp has \d+ bytes.*truncated"):
        check_shards(step / "sharded")
    shard.unlink()
    with pytest.raises(CheckpointShardError, match=r"__2_0\.distcp is missing"):
        check_shards(step / "sharded")
    # the consolidation tool refuses it through the manifest, naming the file
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "consolidate_checkpoint.py"), str(step)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and "__2_0.distcp" in out.stderr, out.stderr
    # a resume skips the damaged folder for the previous one, naming the file
    run = tmp_path / "run"
    shutil.copytree(tp2pp2, run)
    (run / "checkpoints" / "step-00000004" / "sharded" / "__1_0.distcp").write_bytes(b"x")
    choice = ckpt.choose_resume(run / "checkpoints")
    assert choice.path is not None and choice.path.name == "step-00000002"
    assert any("__1_0.distcp" in n for n in choice.notes), choice.notes


def test_a_sharded_folder_names_the_consolidation_tool(tp2pp2: Path) -> None:
    step = tp2pp2 / "checkpoints" / "step-00000004"
    with pytest.raises(ckpt.CheckpointError, match="consolidate_checkpoint.py"):
        ckpt.weights_file(step)


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory) -> Path:
    """A few byte-tokenised documents preprocessed into 32-token shards."""
    from ilm_megatron.data.preprocess import main as preprocess

    root = tmp_path_factory.mktemp("corpus")
    (root / "raw").mkdir()
    for i in range(6):
        lines = [json.dumps({"text": f"story {i}.{j} " * (20 + 7 * j)}) for j in range(4)]
        (root / "raw" / f"doc{i}.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "shards"
    args = ["--input", str(root / "raw"), "--output", str(out), "--tokenizer", "byte"]
    assert preprocess([*args, "--seq-len", "32", "--samples-per-shard", "16"]) == 0
    return out


def _shard_args(shards: Path) -> list[str]:
    return [
        "data.task=shards", f"data.path={shards}", "data.seq_len=32", "data.val_fraction=0.1",
        "model.vocab_size=257", "model.pad_vocab_multiple=16", "model.d_model=32",
        "model.headdim=8", "model.d_state=8", "solver.f_max_iter=4", "solver.phantom_steps=1",
        "train.batch_size=4", "train.log_interval=1", "train.eval_batches=1",
        "train.tensorboard=false", "train.device=cpu", "train.max_steps=4",
        "train.save_interval=2",
    ]  # fmt: skip


def test_shard_positions_resume_per_data_parallel_rank(tmp_path: Path, text_shards: Path) -> None:
    """DP=2 on text shards: each DP rank's loader position is a ShardedObject of the step; the
    same DP size resumes bitwise, another one is refused naming both layouts (each rank reads
    its own partition of every epoch, which another DP size cuts differently)."""
    shards = text_shards
    full = tmp_path / "full"
    torchrun_train(full, *_shard_args(shards), nproc=2)
    part = _rewind(full, tmp_path / "part")
    torchrun_train(part, *_shard_args(shards), nproc=2)
    a = {r["step"]: r["loss"] for r in records(full)}
    b = {r["step"]: r["loss"] for r in records(part)}
    assert b[3] == a[3] and b[4] == a[4]  # bitwise
    one = _rewind(full, tmp_path / "one")
    cfg = load_config([], [*_shard_args(shards), f"run_dir={one}"])
    with pytest.raises(ValueError, match=r"DP=2.*per data-parallel rank"):
        train(cfg, one, quiet=True)


def test_catbabi_position_resumes_at_another_data_parallel_size(tmp_path: Path) -> None:
    """CatbAbI slices one global window stream over the DP ranks: a DP=2 checkpoint resumes in
    one process, whose next batches are the DP=2 ranks' slices joined. (The losses differ from
    DP=2's: each rank averages over its own answer tokens.)"""
    from ilm_megatron.train.data import CatbabiData
    from ilm_megatron.train.sharded import SHARDED_DIR, load_training_shards, process_group

    data = _make_data(tmp_path)
    args = [
        "--config", str(ROOT / "configs" / "tasks" / "catbabi_implicit_mamba2.yaml"),
        f"data.path={data}", "data.seq_len=32", "model.d_model=32", "model.headdim=8",
        "model.d_state=8", "solver.f_max_iter=4", "train.batch_size=4",
        "train.max_steps=4", "train.save_interval=2", "train.log_interval=1",
        "train.eval_batches=1", "train.tensorboard=false", "train.device=cpu",
    ]  # fmt: skip
    dp2 = tmp_path / "dp2"
    torchrun_train(dp2, *args, nproc=2)
    one = _rewind(dp2, tmp_path / "one")
    cfg = load_config([args[1]], [*args[2:], f"run_dir={one}"])
    res = train(cfg, one, quiet=True)
    assert [r["step"] for r in res.history] == [3, 4]
    # the positions both DP ranks saved, read back; the one-process stream from rank 0's
    # continues with exactly the rows the two ranks would have read
    from ilm_megatron.models.lm import build_model

    model = build_model(cfg.model, cfg.solver)
    step2 = dp2 / "checkpoints" / "step-00000002" / SHARDED_DIR
    with process_group():
        _, states = load_training_shards(step2, model, None, [], [0, 1], 2)
    assert states[0]["data"] == states[1]["data"]  # one global position
    whole = CatbabiData(cfg, 0, 1)
    whole.load_state_dict(states[0]["data"])
    halves = [CatbabiData(cfg, r, 2) for r in (0, 1)]
    for h, s in zip(halves, states):
        h.load_state_dict(s["data"])
    for _ in range(2):
        x, y = whole.next_batch()
        parts = [h.next_batch() for h in halves]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
