"""Data-parallel training with DeepSpeed ZeRO under ``torchrun --nproc-per-node 2`` on CPU.

Each test starts real worker processes (gloo). The solver tolerance is tiny so that every solve
runs exactly its iteration cap: the stopping rule looks at the batch maximum of the residual,
which differs between one rank's half batch and the whole batch, and would otherwise make the
iteration counts (and so the losses) of DP=2 and DP=1 differ legitimately.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _dist import losses, records, torchrun_train, worker_env
from _dist import torchrun_cmd as _torchrun_cmd
from _hf import assert_export_matches

from ilm_megatron.config import load_config
from ilm_megatron.train import checkpoint as ckpt
from ilm_megatron.train.loop import train

pytestmark = pytest.mark.slow

BASE = [
    "train.batch_size=16",
    "data.seq_len=8",
    "data.eval_seq_len=0",
    "solver.f_max_iter=6",
    "solver.f_tol=1e-12",
    "train.log_interval=1",
    "train.eval_batches=1",
    "train.tensorboard=false",
    "train.device=cpu",
]
REL_TOL = 1e-5  # DP=2 vs DP=1 losses (fp32; only the reduction order differs)


def torchrun_cmd(run_dir: Path, *overrides: str, max_restarts: int = 0) -> list[str]:
    return _torchrun_cmd(run_dir, *BASE, *overrides, max_restarts=max_restarts)


def torchrun(run_dir: Path, *overrides: str, max_restarts: int = 0, **env: str) -> str:
    return torchrun_train(run_dir, *BASE, *overrides, max_restarts=max_restarts, timeout=150, **env)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_state(path)


@pytest.fixture(scope="module")
def dp1_reference(tmp_path_factory) -> Path:
    """The same run in one process without DeepSpeed (global batch 16)."""
    run = tmp_path_factory.mktemp("dp1")
    cfg = load_config([], [*BASE, f"run_dir={run}", "train.max_steps=8"])
    train(cfg, run, quiet=True)
    return run


@pytest.fixture(scope="module")
def dp2_zero2(tmp_path_factory) -> Path:
    """Uninterrupted DP=2 ZeRO-2 run of 8 steps."""
    run = tmp_path_factory.mktemp("dp2z2")
    torchrun(run, "train.max_steps=8", "parallel.zero_stage=2")
    return run


@pytest.mark.parametrize("zero", [1, 2])
def test_dp2_zero_matches_dp1(zero, dp1_reference, dp2_zero2, tmp_path):
    if zero == 2:
        run = dp2_zero2
    else:
        run = tmp_path / "run"
        torchrun(run, "train.max_steps=8", f"parallel.zero_stage={zero}")
    ref, got = losses(dp1_reference), losses(run)
    assert sorted(got) == list(range(1, 9))
    for step, value in ref.items():
        assert got[step] == pytest.approx(value, rel=REL_TOL), (step, got[step], value)
    assert all(r["world_size"] == 2 for r in records(run))
    a, b = weights(dp1_reference / "model.safetensors"), weights(run / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    step8 = run / "checkpoints" / "step-00000008"
    for name in ("model.safetensors", "trainer.pt", "trainer-rank00000.pt",
                 "trainer-rank00001.pt", "mp_rank_00_model_states.pt"):  # fmt: skip
        assert (step8 / name).is_file(), name
    assert len(list(step8.glob("*optim_states.pt"))) == 2  # one ZeRO shard per rank
    assert not list((run / "checkpoints").glob(".*tmp"))
    assert_export_matches(run, tmp_path / "hf")  # Hugging Face export of a ZeRO checkpoint


def test_rank_killed_then_torchrun_restart_resumes_exactly(dp2_zero2, tmp_path):
    """Rank 1 dies before step 6; ``--max-restarts 1`` restarts both from the step-4 checkpoint."""
    run = tmp_path / "run"
    torchrun(
        run,
        "train.max_steps=8",
        "parallel.zero_stage=2",
        "train.save_interval=4",
        max_restarts=1,
        ILM_TEST_CRASH_AT_STEP="5",
    )
    assert (run / ".ilm_test_crashed").is_file()  # the first attempt did die
    state = torch.load(run / "checkpoints" / "step-00000008" / "trainer.pt", weights_only=True)
    assert state["counters"]["step"] == 8
    assert losses(run) == losses(dp2_zero2)  # bitwise: floats compared exactly
    assert [r["step"] for r in records(run)] == list(range(1, 9))  # records after 4 rewritten
    a, b = weights(dp2_zero2 / "model.safetensors"), weights(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_on_one_rank_saves_on_all_and_resumes_exactly(tmp_path):
    steps = "train.max_steps=60"
    full = tmp_path / "full"
    torchrun(full, steps, "parallel.zero_stage=1")
    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun_cmd(run, steps, "parallel.zero_stage=1"),
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 180
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and (not metrics.exists() or len(records(run)) < 2):
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2, children
    os.kill(int(children[-1]), signal.SIGTERM)  # one worker only
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-6000:]
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    stopped = torch.load(latest / "trainer.pt", weights_only=True)["counters"]["step"]
    assert 2 <= stopped < 60
    for r in (0, 1):
        state = torch.load(latest / f"trainer-rank{r:05d}.pt", weights_only=True)
        assert state["counters"]["step"] == stopped  # both ranks stopped at the same step
    assert max(losses(run)) == stopped
    torchrun(run, steps, "parallel.zero_stage=1")
    assert losses(run) == losses(full)


def test_nan_on_one_rank_is_skipped_on_all(tmp_path):
    run = tmp_path / "run"
    torchrun(run, "train.max_steps=5", "parallel.zero_stage=1", ILM_TEST_NAN_AT_STEPS="2,3")
    recs = records(run)
    assert recs[-1]["nan_skipped"] == 2
    assert [r["nan_skipped"] for r in recs] == [0, 1, 2, 2, 2]
    assert recs[1]["loss"] != recs[1]["loss"]  # NaN logged for the skipped step
    state = torch.load(run / "checkpoints" / "step-00000005" / "trainer.pt", weights_only=True)
    assert state["counters"]["nan_streak"] == 0


def test_single_process_zero_stage_and_refusals(tmp_path):
    """ZeRO-1 in one process (a group of one) and the clear refusal of TP/PP."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ilm_megatron.train.cli", "--quiet", *BASE, f"run_dir={run}",
         "train.max_steps=3", "parallel.zero_stage=1", "parallel.microbatches=2"],
        env=worker_env(), capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert [r["step"] for r in records(run)] == [1, 2, 3]
    cfg = load_config([], [*BASE, "parallel.pp=2", "model.n_layers=2"])
    with pytest.raises(ValueError, match="needs a multiple of 2 processes, got WORLD_SIZE=1"):
        train(cfg, tmp_path / "pp", quiet=True)
    shutil.rmtree(tmp_path / "pp", ignore_errors=True)


def single(run_dir: Path, *overrides: str) -> str:
    """One process on the DeepSpeed engine (ZeRO-1: a data-parallel group of one)."""
    proc = subprocess.run(
        [sys.executable, "-m", "ilm_megatron.train.cli", "--quiet", *BASE, f"run_dir={run_dir}",
         "parallel.zero_stage=1", *overrides],
        env=worker_env(), capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def truncate_to(run: Path, step: int) -> None:
    """Keep only the ``step`` checkpoint, as if the job had died right after saving it."""
    root = run / "checkpoints"
    keep = f"step-{step:08d}"
    for p in root.glob("step-*"):
        if p.name != keep:
            shutil.rmtree(p)
    (root / "latest").write_text(keep + "\n")


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_resume_at_another_dp_size_via_universal_checkpoint(first, then, tmp_path):
    """ZeRO-1 checkpoint of step 3 written by ``first`` ranks, resumed by ``then`` ranks."""
    launch = {1: single, 2: lambda run, *o: torchrun(run, "parallel.zero_stage=1", *o)}
    steps = ("train.max_steps=6", "train.save_interval=3")
    full = tmp_path / "full"
    launch[first](full, *steps)
    run = tmp_path / "run"
    launch[first](run, *steps)
    truncate_to(run, 3)
    launch[then](run, *steps)
    step3 = run / "checkpoints" / "step-00000003"
    assert (step3 / "universal" / "zero").is_dir()  # converted once, in the step folder
    assert not list(step3.glob(".*tmp"))
    ref, got = losses(full), losses(run)
    assert sorted(got) == list(range(1, 7))
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(ref[step], rel=REL_TOL), (step, got[step], ref[step])
    assert all(r["world_size"] == then for r in records(run) if r["step"] > 3)
    a, b = weights(full / "model.safetensors"), weights(run / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def dp1_bf16(tmp_path_factory) -> Path:
    """The one-process run of ``dp1_reference`` under bf16 autocast."""
    run = tmp_path_factory.mktemp("dp1bf16")
    cfg = load_config([], [*BASE, f"run_dir={run}", "train.max_steps=8", "train.precision=bf16"])
    train(cfg, run, quiet=True)
    return run


@pytest.mark.parametrize("zero", [1, 2])
def test_dp2_zero_bf16_follows_one_process_bf16(zero, dp1_reference, dp1_bf16, tmp_path):
    """``train.precision=bf16`` on DeepSpeed: fp32 weights in ZeRO, the forward under autocast.

    Step 1 starts from the same weights everywhere, so its loss shows which arithmetic ran: the
    DP=2 loss equals the one-process bf16 loss far more closely than bf16 differs from fp32 (an
    fp32 forward would sit on the fp32 value). Later steps drift apart by bf16 rounding of
    half-batch gradients, of the size by which bf16 differs from fp32, so they are checked to the
    bf16 tolerance; the saved weights stay fp32.
    """
    run = tmp_path / "run"
    torchrun(run, "train.max_steps=8", f"parallel.zero_stage={zero}", "train.precision=bf16")
    fp32, bf16, got = losses(dp1_reference), losses(dp1_bf16), losses(run)
    assert sorted(got) == list(range(1, 9))
    gap = abs(bf16[1] - fp32[1]) / fp32[1]  # what autocast changes at step 1
    assert gap > 1e-5, gap
    assert abs(got[1] - bf16[1]) / bf16[1] < 0.01 * gap, (got[1], bf16[1], fp32[1])
    for step in fp32:
        assert got[step] == pytest.approx(bf16[step], rel=1e-3), (step, got[step], bf16[step])
    w = weights(run / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in w.values())
    ref = weights(dp1_bf16 / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(w[k], ref[k], rtol=1e-2, atol=1e-3)
