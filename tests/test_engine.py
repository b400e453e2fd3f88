"""Training engine: exact resume, atomic checkpoints, preemption, NaN skips, curriculum, TB."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ilm_megatron.config import load_config
from ilm_megatron.train import checkpoint as ckpt
from ilm_megatron.train.curriculum import phase_at
from ilm_megatron.train.loop import train

BASE = [
    "train.batch_size=16",
    "data.seq_len=8",
    "data.eval_seq_len=0",
    "solver.f_max_iter=6",
    "train.log_interval=1",
    "train.eval_batches=1",
    "train.tensorboard=false",
]


def _cfg(tmp_path, *extra):
    return load_config([], [*BASE, f"run_dir={tmp_path}", *extra])


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {json.loads(x)["step"]: json.loads(x)["loss"] for x in lines}


def test_resume_is_bitwise_identical(tmp_path):
    full = tmp_path / "full"
    train(_cfg(full, "train.max_steps=8"), full, quiet=True)
    part = tmp_path / "part"
    train(_cfg(part, "train.max_steps=8", "train.save_interval=3"), part, quiet=True)
    # throw away everything after the step-6 checkpoint, as if the job had died at step 7
    root = part / "checkpoints"
    for d in root.glob("step-*"):
        if d.name != "step-00000006":
            import shutil

            shutil.rmtree(d)
    (root / "latest").write_text("step-00000006\n")
    kept = [ln for ln in (part / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["step"] <= 6]  # fmt: skip
    (part / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    res = train(_cfg(part, "train.max_steps=8", "train.save_interval=3"), part, quiet=True)
    assert [r["step"] for r in res.history] == [7, 8]
    assert _losses(part) == _losses(full)  # bitwise: floats compared exactly
    a = ckpt.load_model(full / "model.safetensors").state_dict()
    b = ckpt.load_model(part / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_last_and_latest_pointer(tmp_path):
    train(_cfg(tmp_path, "train.max_steps=6", "train.save_interval=1", "train.keep_last=2"),
          tmp_path, quiet=True)  # fmt: skip
    root = tmp_path / "checkpoints"
    assert sorted(d.name for d in root.glob("step-*")) == ["step-00000005", "step-00000006"]
    assert ckpt.latest_checkpoint(root).name == "step-00000006"
    assert not list(root.glob(".*tmp"))


def test_killed_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    train(_cfg(tmp_path, "train.max_steps=2"), tmp_path, quiet=True)
    root = tmp_path / "checkpoints"
    before = ckpt.latest_checkpoint(root)
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, "train.max_steps=4", "train.save_interval=1"), tmp_path, quiet=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.latest_checkpoint(root) == before  # the pointer still names a whole checkpoint
    assert not list(root.glob(".*tmp"))  # no half-written folder survives
    state = ckpt.load_training_checkpoint(before, ckpt.load_model(before / "model.safetensors"))
    assert state["counters"]["step"] == 2


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "ilm_megatron.train.cli", *BASE, f"run_dir={tmp_path}",
           "train.max_steps=100000", "train.log_interval=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and len(_losses(tmp_path)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    state = torch.load(latest / "trainer.pt", weights_only=True)
    assert state["counters"]["step"] >= 2
    assert max(_losses(tmp_path)) == state["counters"]["step"]


def test_nan_steps_are_skipped_then_fatal(tmp_path, monkeypatch):
    from ilm_megatron.train.engines import base as engines  # Engine._microbatch_loss's loss

    real = engines.token_loss
    calls = {"n": 0}

    def flaky(logits, targets, vocab, sharded=False):
        calls["n"] += 1
        loss = real(logits, targets, vocab, sharded)
        return loss * float("nan") if calls["n"] in (2, 3) else loss

    monkeypatch.setattr(engines, "token_loss", flaky)
    res = train(_cfg(tmp_path / "a", "train.max_steps=5"), tmp_path / "a", quiet=True)
    assert res.history[-1]["nan_skipped"] == 2
    calls["n"] = 0
    monkeypatch.setattr(engines, "token_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row"):
        train(_cfg(tmp_path / "b", "train.max_steps=5", "train.max_nan_steps=3"),
              tmp_path / "b", quiet=True)  # fmt: skip


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


CURRICULUM = [
    "train.max_steps=10",
    "train.curriculum=bounded_then_free",
    "train.bounded_fraction=0.5",
    "solver.f_max_iter=9",
    "solver.phantom_steps=3",
    "solver.f_tol=1e-12",  # every solve runs to its cap: the iterations show the cap in force
    "train.tensorboard=true",
]


def test_curriculum_bounded_then_free(tmp_path):
    cfg = _cfg(tmp_path, *CURRICULUM)
    per_step = 16 * 8
    assert (phase_at(0, cfg).f_max_iter, phase_at(0, cfg).phantom_steps) == (4, 1)
    assert phase_at(5 * per_step - 1, cfg).name == "bounded"
    free = phase_at(5 * per_step, cfg)
    assert (free.f_max_iter, free.phantom_steps) == (9, 3)
    res = train(cfg, tmp_path, quiet=True)
    # what the run did, read back from TensorBoard: the bounded cap, then the free cap
    iters = _scalars(tmp_path, "solver/iters_max")
    assert iters == {s: 4.0 if s <= 5 else 9.0 for s in range(1, 11)}
    assert _scalars(tmp_path, "solver/phantom_steps") == {
        s: 1.0 if s <= 5 else 3.0 for s in range(1, 11)
    }
    assert _scalars(tmp_path, "solver/phase") == {s: float(s > 5) for s in range(1, 11)}
    # the final evaluation runs the free phase's eval cap (ceil(4.0 * 9)), not the bounded one's
    assert res.final["eval"][0]["iters_max"] == 36
    # the loaded config is never changed by the run
    assert (cfg.solver.f_max_iter, cfg.solver.phantom_steps) == (9, 3)


def test_curriculum_resume_in_free_phase_is_bitwise(tmp_path):
    """A run killed in the free phase continues exactly where an uninterrupted one goes."""
    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(full, *CURRICULUM), full, quiet=True)
    train(_cfg(part, *CURRICULUM, "train.save_interval=7"), part, quiet=True)
    root = part / "checkpoints"
    import shutil

    shutil.rmtree(root / "step-00000010")  # as if the job had died at step 8
    (root / "latest").write_text("step-00000007\n")
    kept = [ln for ln in (part / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["step"] <= 7]  # fmt: skip
    (part / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    res = train(_cfg(part, *CURRICULUM, "train.save_interval=7"), part, quiet=True)
    assert [r["step"] for r in res.history] == [8, 9, 10]
    assert [r["iters_max"] for r in res.history] == [9, 9, 9]
    assert _losses(part) == _losses(full)  # bitwise: floats compared exactly
    a = ckpt.load_model(full / "model.safetensors").state_dict()
    b = ckpt.load_model(part / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loaded_config_is_immutable():
    import dataclasses

    cfg = load_config([], ["solver.f_max_iter=9"])
    for section, key in (("solver", "f_max_iter"), ("train", "lr"), ("model", "d_model")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(cfg, section), key, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.solver = cfg.solver


def test_tensorboard_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(tmp_path, "train.max_steps=4", "train.tensorboard=true", "train.eval_interval=2"),
          tmp_path, quiet=True)  # fmt: skip
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = (
        "train/loss train/lr train/grad_norm perf/tokens_per_s perf/mem_gb solver/iters_mean "
        "solver/iters_max solver/residual_mean solver/residual_max solver/converged_frac "
        "solver/phase val/loss"
    ).split()
    for tag in expected:
        assert tag in tags, (tag, sorted(tags))
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses)
    assert "solver/iters_per_sample" in acc.Tags()["histograms"]
    assert any("config" in t for t in acc.Tags()["tensors"])


def test_resume_refuses_other_architecture(tmp_path):
    train(_cfg(tmp_path, "train.max_steps=1"), tmp_path, quiet=True)
    with pytest.raises(ValueError, match="d_model: checkpoint 64 vs model 32"):
        train(_cfg(tmp_path, "train.max_steps=2", "model.d_model=32", "model.headdim=8"),
              tmp_path, quiet=True)  # fmt: skip
    assert os.path.isdir(tmp_path / "checkpoints")
