"""``ilm-train`` with tensor and pipeline parallelism under torchrun on CPU, against one process.

The reference is the single-process trainer with the same global batch split into the same
micro-batches. Every parallel layout starts from the same weights (each rank builds the
single-process model from ``train.seed`` and keeps its shard) and draws the same batches, so the
loss and gradient-norm sequences must agree up to the order of floating-point reductions. The
solver tolerance is tiny so that every solve runs its cap (no stop decision near a tie).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _dist import losses, records, torchrun_train
from _hf import assert_export_matches

from ilm_megatron.config import load_config
from ilm_megatron.train import checkpoint as ckpt
from ilm_megatron.train.loop import train

pytestmark = pytest.mark.slow

BASE = [
    "train.batch_size=8",
    "data.seq_len=8",
    "data.eval_seq_len=0",
    "solver.f_max_iter=5",
    "solver.f_tol=1e-12",
    "solver.phantom_steps=2",
    "train.log_interval=1",
    "train.eval_batches=1",
    "train.tensorboard=false",
    "train.device=cpu",
    "train.max_steps=4",
    "model.n_layers=2",
    "model.ngroups=2",
]
REL = 1e-5


def _close(got: Path, ref: Path) -> None:
    """Losses and gradient norms of every step, and the final weights, against the reference."""
    a, b = records(ref), records(got)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=REL), (rb["step"], rb, ra)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=REL), rb["step"]
        assert rb["iters_mean"] == ra["iters_mean"]
    wa = ckpt.load_state(ref / "model.safetensors")
    wb = ckpt.load_state(got / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, two micro-batches of 4 sequences."""
    run = tmp_path_factory.mktemp("single")
    cfg = load_config(
        [], [*BASE, f"run_dir={run}", "parallel.microbatches=2", "train.save_interval=2"]
    )
    train(cfg, run, quiet=True)
    return run


@pytest.fixture(scope="module")
def pp2(tmp_path_factory) -> Path:
    """PP=2, two micro-batches in flight around the ring, a checkpoint every 2 steps."""
    run = tmp_path_factory.mktemp("pp2")
    torchrun_train(run, *BASE, "parallel.pp=2", "parallel.microbatches=2", "train.save_interval=2")
    return run


def test_pp2_matches_single_process(pp2: Path, reference: Path) -> None:
    _close(pp2, reference)
    assert all(r["world_size"] == 2 for r in records(pp2))
    step4 = pp2 / "checkpoints" / "step-00000004"
    state = torch.load(step4 / "trainer.pt", weights_only=True)
    assert state["layout"] == {"tp": 1, "pp": 2, "dp": 1, "world_size": 2}
    # every rank wrote its own shards; nothing whole was gathered into the step folder
    files = {f.name for f in (step4 / "sharded").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= files, files
    assert not (step4 / "model.safetensors").exists() and not (step4 / "optimizer.pt").exists()
    # the final export (run end) loads into a single-process model
    model = ckpt.load_model(pp2 / "model.safetensors")
    assert model.config.backend == "local" and len(model.stack.layers) == 2
    # the shards read back in one process: the whole model's weights (the final ones) and AdamW
    # moments by parameter name, shaped like the parameters
    from ilm_megatron.train.sharded import consolidate

    weights, opt, _ = consolidate(step4)
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v), k
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for key in ("exp_avg", "exp_avg_sq"):
        assert {n: t.shape for n, t in opt[key].items()} == shapes, key
    assert set(opt["step"].values()) == {4.0}
    assert_export_matches(pp2, pp2.parent / "pp2-hf")  # Hugging Face export of a PP checkpoint


def test_pp2_one_in_flight_over_two_ring_calls_matches_single_process(
    tmp_path: Path, reference: Path
) -> None:
    """The step's two micro-batches go through the ring one at a time, in two ring calls whose
    gradients accumulate: the same curve as one process; config.yaml records the settings."""
    run = tmp_path / "pp2-calls"
    torchrun_train(
        run, *BASE, "parallel.pp=2", "parallel.microbatches=2", "train.save_interval=2",
        "parallel.in_flight=1", "parallel.ring_calls=2",
    )  # fmt: skip
    _close(run, reference)
    used = load_config([run / "config.yaml"], [])
    assert (used.parallel.in_flight, used.parallel.ring_calls) == (1, 2)


def test_tp2_pp2_matches_single_process(tmp_path: Path, reference: Path) -> None:
    run = tmp_path / "run"
    torchrun_train(run, *BASE, "parallel.tp=2", "parallel.pp=2", "parallel.microbatches=2", nproc=4)
    _close(run, reference)
    assert all(r["world_size"] == 4 for r in records(run))
    assert_export_matches(run, tmp_path / "hf")


def test_tp2_dp2_matches_single_process(tmp_path: Path, reference: Path) -> None:
    """Each data-parallel replica takes one half of the batch (the reference's micro-batches)."""
    run = tmp_path / "run"
    torchrun_train(run, *BASE, "parallel.tp=2", nproc=4)
    _close(run, reference)


def test_pp2_restart_after_a_crash_resumes_exactly(tmp_path: Path, pp2: Path) -> None:
    """Rank 1 dies before step 4; torchrun restarts both, they resume from the step-2 save."""
    run = tmp_path / "run"
    torchrun_train(
        run, *BASE, "parallel.pp=2", "parallel.microbatches=2", "train.save_interval=2",
        max_restarts=1, ILM_TEST_CRASH_AT_STEP="3",
    )  # fmt: skip
    assert (run / ".ilm_test_crashed").is_file()
    assert losses(run) == losses(pp2)  # bitwise: floats compared exactly
    a, b = ckpt.load_state(pp2 / "model.safetensors"), ckpt.load_state(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _rewind_to_step2(src: Path, dst: Path) -> Path:
    """A copy of run ``src`` as if it had died after its step-2 checkpoint."""
    shutil.copytree(src, dst)
    root = dst / "checkpoints"
    for d in root.glob("step-*"):
        if d.name != "step-00000002":
            shutil.rmtree(d)
    (root / "latest").write_text("step-00000002\n")
    for name in ("model.safetensors", "final.json"):
        (dst / name).unlink()
    return dst


def test_pp2_checkpoint_resumes_at_tp2_and_in_one_process(
    tmp_path: Path, pp2: Path, reference: Path
) -> None:
    """Weights and AdamW moments are stored whole, so the layout may change at a resume."""
    tp2 = _rewind_to_step2(pp2, tmp_path / "tp2")
    torchrun_train(tp2, *BASE, "parallel.tp=2", "parallel.microbatches=2")
    _close(tp2, reference)
    one = _rewind_to_step2(pp2, tmp_path / "one")
    cfg = load_config([], [*BASE, f"run_dir={one}", "parallel.microbatches=2"])
    res = train(cfg, one, quiet=True)
    assert [r["step"] for r in res.history] == [3, 4]
    _close(one, reference)


def test_single_process_checkpoint_resumes_at_tp2_pp2(tmp_path: Path, reference: Path) -> None:
    run = _rewind_to_step2(reference, tmp_path / "run")
    torchrun_train(run, *BASE, "parallel.tp=2", "parallel.pp=2", "parallel.microbatches=2", nproc=4)
    _close(run, reference)
    state = torch.load(run / "checkpoints" / "step-00000004" / "trainer.pt", weights_only=True)
    assert state["layout"] == {"tp": 2, "pp": 2, "dp": 1, "world_size": 4}


def test_explicit_llama_pp2_matches_single_process(tmp_path: Path) -> None:
    """An explicit model goes round the ring once per micro-batch (no solve)."""
    extra = ("model.arch=llama", "model.implicit=false", "parallel.microbatches=2")
    ref = tmp_path / "single"
    train(load_config([], [*BASE, *extra, f"run_dir={ref}"]), ref, quiet=True)
    run = tmp_path / "pp2"
    torchrun_train(run, *BASE, *extra, "parallel.pp=2")
    _close(run, ref)


def test_bf16_autocast_pp2_matches_single_process_bf16(tmp_path: Path, reference: Path) -> None:
    """``train.precision=bf16``: autocast in one process and around the ring alike."""
    extra = ("parallel.microbatches=2", "train.precision=bf16")
    one = tmp_path / "one"
    train(load_config([], [*BASE, *extra, f"run_dir={one}"]), one, quiet=True)
    fp32, bf16 = losses(reference), losses(one)
    assert fp32 != bf16  # autocast did change the arithmetic ...
    assert all(bf16[s] == pytest.approx(fp32[s], rel=1e-3) for s in fp32)  # ... only slightly
    run = tmp_path / "pp2"
    torchrun_train(run, *BASE, *extra, "parallel.pp=2")
    got = records(run)
    # step 1 starts from the same weights: its loss tells which arithmetic the ring ran (an fp32
    # ring would sit on the fp32 value, far from the bf16 one)
    gap = abs(bf16[1] - fp32[1]) / fp32[1]
    assert gap > 1e-5, gap
    assert abs(got[0]["loss"] - bf16[1]) / bf16[1] < 0.01 * gap, (got[0], bf16[1], fp32[1])
    for ra, rb in zip(records(one), got):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-3), (rb["step"], rb, ra)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-2), rb["step"]
    assert len(got) == 4


def test_pp2_nan_loss_on_the_last_stage_is_skipped_on_all_ranks(tmp_path: Path) -> None:
    """A NaN loss on the last stage reaches stage 0 through the backward ring: every rank sees a
    non-finite global norm and skips the update; the run continues with finite weights."""
    run = tmp_path / "run"
    torchrun_train(
        run, *BASE, "parallel.pp=2", "parallel.microbatches=2", ILM_TEST_NAN_AT_STEPS="2,3"
    )
    recs = records(run)
    assert [r["nan_skipped"] for r in recs] == [0, 1, 2, 2]
    assert recs[1]["loss"] != recs[1]["loss"] and recs[3]["loss"] == recs[3]["loss"]
    weights = ckpt.load_state(run / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_tp2_dp2_zero1_matches_single_process_and_resumes_in_one_process(
    tmp_path: Path, reference: Path
) -> None:
    """ZeRO-1 under TP: each DP rank keeps the AdamW state of half the parameters; the curve is
    the single-process one, and its gathered optimizer.pt continues it in one process."""
    run = tmp_path / "zero1"
    torchrun_train(
        run, *BASE, "parallel.tp=2", "parallel.zero_stage=1", "train.save_interval=2", nproc=4
    )
    _close(run, reference)
    one = _rewind_to_step2(run, tmp_path / "one")
    cfg = load_config([], [*BASE, f"run_dir={one}", "parallel.microbatches=2"])
    train(cfg, one, quiet=True)
    _close(one, reference)


@pytest.fixture(scope="module")
def pp2_dp2_zero2(tmp_path_factory) -> Path:
    """PP=2 x DP=2 with DeepSpeed ZeRO-2: each replica takes one reference micro-batch."""
    run = tmp_path_factory.mktemp("pp2-dp2-zero2")
    torchrun_train(
        run, *BASE, "parallel.pp=2", "parallel.zero_stage=2", "train.save_interval=2", nproc=4
    )
    return run


def test_pp2_dp2_zero2_matches_single_process(pp2_dp2_zero2: Path, reference: Path) -> None:
    """ZeRO-2 under PP: the ring's partial backward passes accumulate on the parameters and
    DeepSpeed reduces and partitions them once per step; the norm counts the tied embedding
    once. The curve and the gathered checkpoint are the single-process ones."""
    run = pp2_dp2_zero2
    assert "TP=1, PP=2, DP=2, ZeRO-2" in _engine(run)
    _close(run, reference)
    step4 = run / "checkpoints" / "step-00000004"
    opt = ckpt_moments(step4)
    ref_moments = ckpt_moments(reference / "checkpoints" / "step-00000004")
    assert set(opt["step"].values()) == {4.0}
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt[key].keys() == ref_moments[key].keys()
        for name, t in opt[key].items():
            torch.testing.assert_close(t, ref_moments[key][name], rtol=1e-3, atol=1e-8, msg=name)


def _engine(run: Path) -> str:
    """The engine and layout a run trained with, from its ``final.json``."""
    import json

    return json.loads((run / "final.json").read_text())["engine"]


def ckpt_moments(step_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The AdamW moments by name of a checkpoint, whatever engine wrote it."""
    from ilm_megatron.train.engines import adamw_state_from_single_process

    if (step_dir / "sharded").is_dir():  # written by several ranks: read back in one process
        from ilm_megatron.train.sharded import consolidate

        return consolidate(step_dir)[1]
    if (step_dir / "optimizer.pt").is_file():
        return torch.load(step_dir / "optimizer.pt", weights_only=True)
    shared = torch.load(step_dir / "trainer.pt", weights_only=True)
    model = ckpt.load_model(step_dir / "model.safetensors")
    return adamw_state_from_single_process(model, shared["optimizer"])


def test_pp2_dp2_zero2_resumes_at_tp2_dp2_zero1(
    tmp_path: Path, pp2_dp2_zero2: Path, reference: Path
) -> None:
    """The moments are stored whole by name, so DeepSpeed's partitions are rebuilt for another
    layout and ZeRO stage: the resumed run continues the single-process curve."""
    run = _rewind_to_step2(pp2_dp2_zero2, tmp_path / "tp2")
    torchrun_train(run, *BASE, "parallel.tp=2", "parallel.zero_stage=1", nproc=4)
    assert "TP=2, PP=1, DP=2, ZeRO-1" in _engine(run)
    _close(run, reference)


def test_tp2_pp2_sequence_parallel_matches_single_process(tmp_path: Path, reference: Path) -> None:
    """ilm-train at TP=2 x PP=2 with sequence parallelism: the run records the setting in force
    and follows the single-process curve (the solver's residual summed over the TP group; TP=2
    alone is checked against one process in test_tensor_parallel.py)."""
    pp = 2
    from ilm_megatron.config import load_config as load

    run = tmp_path / "run"
    torchrun_train(
        run, *BASE, "parallel.tp=2", f"parallel.pp={pp}", "parallel.sequence_parallel=true",
        "parallel.microbatches=2", nproc=2 * pp,
    )  # fmt: skip
    saved = load([run / "config.yaml"], [])
    assert saved.parallel.sequence_parallel and saved.model.sequence_parallel
    _close(run, reference)
