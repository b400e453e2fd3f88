"""Fault injection: a run never loses work beyond the steps since its last save, and never mixes
with another run (docs/reliability.md).

Each test breaks a run the way a cluster or a user does (SIGKILL at chosen and random moments,
a SIGTERM during the final evaluation, damaged checkpoint files, a missing ``latest``, two jobs
on one folder) and checks what the run actually did against an uninterrupted run: the loss of
every step read back from TensorBoard, bitwise on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ilm_megatron.config import load_config
from ilm_megatron.train import checkpoint as ckpt
from ilm_megatron.train.loop import train

BASE = [
    "train.batch_size=8",
    "data.seq_len=8",
    "data.eval_seq_len=0",
    "model.d_model=16",
    "model.headdim=8",
    "model.d_state=8",
    "solver.f_max_iter=4",
    "train.log_interval=1",
    "train.eval_batches=1",
    "train.threads=1",
]


def _cfg(run_dir: Path, *extra: str):
    return load_config([], [*BASE, f"run_dir={run_dir}", *extra])


def _tb_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss as TensorBoard shows it (events of dead attempts purged)."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _jsonl_losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 8-step run (save every 2 steps, validate every 4)."""
    run = tmp_path_factory.mktemp("ref")
    train(_cfg(run, "train.max_steps=8", "train.save_interval=2", "train.eval_interval=4"), run,
          quiet=True)  # fmt: skip
    return run


def _cli(run_dir: Path, *extra: str, env: dict | None = None, **kw) -> subprocess.Popen:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("ILM_FAULT", None)
    e.update(env or {})
    cmd = [sys.executable, "-m", "ilm_megatron.train.cli", "--quiet", *BASE,
           f"run_dir={run_dir}", *extra]  # fmt: skip
    return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)  # fmt: skip


def _run_cli(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    p = _cli(run_dir, *extra, env=env)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


REF_ARGS = ("train.max_steps=8", "train.save_interval=2", "train.eval_interval=4")


# ---------------------------------------------------------------------------------------------
# The end of a run


@pytest.mark.slow
def test_kill_in_final_evaluation_keeps_the_checkpoint(tmp_path, reference):
    """save_interval=0: the final checkpoint is written before the final evaluation, so a job
    killed there resumes at the last step and only finishes evaluation and export."""
    args = ("train.max_steps=8", "train.eval_interval=4")
    # evaluations: step 4, step 8 (periodic), then the final one (3rd)
    p = _run_cli(tmp_path, *args, env={"ILM_FAULT": "evaluate@3"})
    assert p.returncode == -9, p.stderr
    assert (tmp_path / "checkpoints" / "step-00000008" / "manifest.json").is_file()
    assert not (tmp_path / "final.json").exists()
    p = _run_cli(tmp_path, *args)
    assert p.returncode == 0, p.stderr
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["eval"] and (tmp_path / "model.safetensors").is_file()
    assert _tb_losses(tmp_path) == _tb_losses(reference)


_SIGTERM_IN_EVAL = """
import os, signal, sys
from ilm_megatron.train import loop
orig = loop.evaluate_pass
calls = []
def hit(*a, **k):
    calls.append(1)
    if len(calls) == 1:  # the first evaluation is the final one (eval_interval=0)
        os.kill(os.getpid(), signal.SIGTERM)
    return orig(*a, **k)
loop.evaluate_pass = hit
from ilm_megatron.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_in_final_evaluation_loses_nothing(tmp_path):
    """A SIGTERM (a scheduler's stop) during the final evaluation: the handler is still active,
    the final checkpoint is already written, and the process exits cleanly."""
    cmd = [sys.executable, "-c", _SIGTERM_IN_EVAL, "--quiet", *BASE, f"run_dir={tmp_path}",
           "train.max_steps=3"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert p.returncode == 0, p.stderr  # not 143
    assert ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step-00000003") is None
    p = _run_cli(tmp_path, "train.max_steps=3")  # the same command finishes the run
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "final.json").is_file() and (tmp_path / "model.safetensors").is_file()


def test_unwritable_checkpoints_folder_is_found_before_training(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(Exception, match="checkpoints cannot be written") as e:
        train(_cfg(tmp_path, "train.max_steps=3"), tmp_path, quiet=True)
    assert type(e.value).__name__ == "RunError"
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()


def test_eval_interval_without_validation_split_is_found_before_training(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": "lorem ipsum dolor sit amet " * 20}) for _ in range(20))
    )
    from ilm_megatron.data.preprocess import main as preprocess

    out = tmp_path / "shards"
    assert preprocess(["--input", str(src), "--output", str(out), "--tokenizer", "byte",
                       "--seq-len", "16", "--samples-per-shard", "16"]) == 0  # fmt: skip
    run = tmp_path / "run"
    cfg = load_config([], [*BASE, f"run_dir={run}", "data.task=shards", f"data.path={out}",
                           "data.seq_len=16", "model.vocab_size=257", "data.val_fraction=0",
                           "train.eval_interval=2", "train.max_steps=4"])  # fmt: skip
    with pytest.raises(Exception, match="data.val_fraction"):
        train(cfg, run, quiet=True)
    assert not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Resume: newest complete step, fallback past damage, no silent restart


def _break_after(run: Path, steps: int) -> None:
    """Drop checkpoints and records after ``steps``, as if the job had died at step steps+1."""
    for d in ckpt.step_folders(run / "checkpoints"):
        if ckpt.step_of(d) > steps:
            shutil.rmtree(d)


def test_missing_latest_resumes_from_the_newest_complete_step(tmp_path, reference, capsys):
    train(_cfg(tmp_path, "train.max_steps=6", "train.save_interval=2", "train.eval_interval=4"),
          tmp_path)  # fmt: skip
    (tmp_path / "checkpoints" / "latest").unlink()
    capsys.readouterr()
    res = train(_cfg(tmp_path, *REF_ARGS), tmp_path)
    out = capsys.readouterr().out
    assert "latest is missing; resuming from step-00000006" in out
    assert [r["step"] for r in res.history] == [7, 8]
    steps = [s for s, _ in _jsonl_losses(tmp_path)]
    assert steps == list(range(1, 9))  # every step logged once
    assert _tb_losses(tmp_path) == _tb_losses(reference)


def test_newer_folder_than_latest_is_used(tmp_path, reference, capsys):
    """Killed between renaming step-6 into place and rewriting ``latest``."""
    p = _run_cli(tmp_path, "train.max_steps=6", "train.save_interval=2", "train.eval_interval=4",
                 env={"ILM_FAULT": "save_before_latest@3"})  # fmt: skip
    assert p.returncode == -9
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    capsys.readouterr()
    train(_cfg(tmp_path, *REF_ARGS), tmp_path)
    assert "names step-00000004; resuming from step-00000006" in capsys.readouterr().out
    assert _tb_losses(tmp_path) == _tb_losses(reference)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {"truncate": _truncate, "delete": Path.unlink, "flip": _flip}


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.pt", "config.yaml",
                                  "manifest.json"])  # fmt: skip
@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back(tmp_path, reference, capsys, name, how):
    train(_cfg(tmp_path, "train.max_steps=6", "train.save_interval=2", "train.eval_interval=4"),
          tmp_path, quiet=True)  # fmt: skip
    newest = tmp_path / "checkpoints" / "step-00000006"
    DAMAGE[how](newest / name)
    capsys.readouterr()
    res = train(_cfg(tmp_path, *REF_ARGS), tmp_path)
    out = capsys.readouterr().out
    assert f"step-00000006 is not usable: {newest / name}" in out, out
    assert "falling back to step-00000004" in out
    assert [r["step"] for r in res.history] == [5, 6, 7, 8]
    assert [s for s, _ in _jsonl_losses(tmp_path)] == list(range(1, 9))
    assert _tb_losses(tmp_path) == _tb_losses(reference)
    moved = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".damaged-" in p.name]
    assert len(moved) == 1 and moved[0].startswith("step-00000006.damaged-")  # kept, not deleted


def test_no_usable_checkpoint_refuses_instead_of_restarting(tmp_path):
    train(_cfg(tmp_path, "train.max_steps=2"), tmp_path, quiet=True)
    _truncate(tmp_path / "checkpoints" / "step-00000002" / "model.safetensors")
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(Exception, match="no usable checkpoint"):
        train(_cfg(tmp_path, "train.max_steps=4"), tmp_path, quiet=True)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_fresh_start_over_checkpoints_is_refused_then_moves_them_aside(tmp_path):
    train(_cfg(tmp_path, "train.max_steps=2"), tmp_path, quiet=True)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(Exception, match="train.resume=false"):
        train(_cfg(tmp_path, "train.max_steps=3", "train.resume=false"), tmp_path, quiet=True)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # metrics not wiped
    train(_cfg(tmp_path, "train.max_steps=3", "train.start_over=true"), tmp_path, quiet=True)
    prev = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert len(prev) == 1
    assert (prev[0] / "metrics.jsonl").read_text() == before
    assert [p.name for p in ckpt.step_folders(prev[0] / "checkpoints")] == ["step-00000002"]
    assert [p.name for p in ckpt.step_folders(tmp_path / "checkpoints")] == ["step-00000003"]
    assert [s for s, _ in _jsonl_losses(tmp_path)] == [1, 2, 3]


def test_torn_metrics_line_does_not_block_resume(tmp_path, reference):
    train(_cfg(tmp_path, "train.max_steps=6", "train.save_interval=2", "train.eval_interval=4"),
          tmp_path, quiet=True)  # fmt: skip
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 7, "lo')  # a crash mid-write
    train(_cfg(tmp_path, *REF_ARGS), tmp_path, quiet=True)
    assert [s for s, _ in _jsonl_losses(tmp_path)] == list(range(1, 9))


def test_resume_with_another_task_names_it(tmp_path):
    train(_cfg(tmp_path, "train.max_steps=2"), tmp_path, quiet=True)
    config = (tmp_path / "config.yaml").read_text()
    cfg = _cfg(tmp_path, "train.max_steps=4", "data.task=catbabi", "model.vocab_size=256")
    with pytest.raises(Exception, match="data.task=word_problem, now data.task=catbabi"):
        train(cfg, tmp_path, quiet=True)
    assert (tmp_path / "config.yaml").read_text() == config  # a refused start writes nothing


def test_refused_resume_keeps_the_config_and_eval_reads_the_checkpoint(tmp_path):
    from ilm_megatron.tasks.state_tracking import resolve_checkpoint, run_config_group

    train(_cfg(tmp_path, "train.max_steps=2", "data.group=S3"), tmp_path, quiet=True)
    config = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError, match="d_model"):  # another architecture
        train(_cfg(tmp_path, "train.max_steps=4", "data.group=Z2", "model.d_model=32"),
              tmp_path, quiet=True)  # fmt: skip
    assert (tmp_path / "config.yaml").read_text() == config
    # even if the run folder's config.yaml is replaced, ilm-eval takes the checkpoint's own
    (tmp_path / "config.yaml").write_text(config.replace("group: S3", "group: S5"))
    for where in (tmp_path, tmp_path / "checkpoints" / "step-00000002"):
        path, run_dir = resolve_checkpoint(where)
        assert run_config_group(run_dir, path) == ("S3", 8)


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        train(_cfg(tmp_path, "train.max_steps=2"), tmp_path, quiet=True)
    finally:
        os.umask(old)
    step = tmp_path / "checkpoints" / "step-00000002"
    assert step.stat().st_mode & 0o777 == 0o755
    for f in [*step.iterdir(), tmp_path / "model.safetensors", tmp_path / "checkpoints/latest",
              tmp_path / "final.json", tmp_path / "config.yaml"]:  # fmt: skip
        assert f.stat().st_mode & 0o777 == 0o644, f


# ---------------------------------------------------------------------------------------------
# One job per run directory


def test_second_job_on_a_run_dir_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from ilm_megatron.train.rundir import RunDirLock; "
         f"RunDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        p = _run_cli(tmp_path, "train.max_steps=2")
        assert p.returncode == 2
        assert f"pid {holder.pid}" in p.stderr and "in use by another ilm-train job" in p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing anything: the lock is not stale
    p = _run_cli(tmp_path, "train.max_steps=2")
    assert p.returncode == 0, p.stderr


def test_two_concurrent_starts_one_is_refused(tmp_path):
    procs = [_cli(tmp_path, "train.max_steps=60") for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    assert [s for s, _ in _jsonl_losses(tmp_path)] == list(range(1, 61))


# ---------------------------------------------------------------------------------------------
# kill -9 at random moments


def _tool():
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("chaos_train", root / "tools/chaos_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# long enough that no attempt between two kills can finish the run (steps take milliseconds)
CHAOS = ("train.max_steps=60", "train.save_interval=2", "train.eval_interval=6")


@pytest.mark.slow
def test_chaos_one_process(tmp_path):
    """Ten SIGKILLs over one run (mid-save, between save and ``latest``, mid-evaluation, at a
    step, at random moments): the resumed run's losses equal an uninterrupted run's, bitwise."""
    tool = _tool()
    ref = tmp_path / "ref"
    train(_cfg(ref, *CHAOS), ref, quiet=True)
    run = tmp_path / "run"
    log = tool.chaos(tool.launcher(run, [*BASE, *CHAOS]), kills=10, seed=0)
    assert log[-1]["rc"] == 0, log
    assert sum(a["rc"] == -9 for a in log[:-1]) >= 8, log
    assert tool.tb_losses(run) == tool.tb_losses(ref), log
    assert [s for s, _ in _jsonl_losses(run)] == list(range(1, 61))
    assert json.loads((run / "final.json").read_text())["eval"]


@pytest.mark.slow
def test_chaos_two_ranks(tmp_path):
    """The same at DP=2 under torchrun (the DeepSpeed ZeRO-1 engine)."""
    tool = _tool()
    args = [*BASE, *CHAOS, "parallel.zero_stage=1"]
    ref = tmp_path / "ref"
    p = tool.launcher(ref, args, nproc=2)({})
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    run = tmp_path / "run"
    log = tool.chaos(tool.launcher(run, args, nproc=2), kills=10, seed=1, delay=(4.0, 10.0))
    assert log[-1]["rc"] == 0, log
    assert sum(a["rc"] != 0 for a in log[:-1]) >= 8, log
    assert tool.tb_losses(run) == tool.tb_losses(ref), log
    assert [s for s, _ in _jsonl_losses(run)] == list(range(1, 61))


# ---------------------------------------------------------------------------------------------
# Errors: one line, once, early


@pytest.mark.slow
def test_parallel_config_error_is_printed_once_within_seconds(tmp_path):
    import time

    from _dist import torchrun_cmd, worker_env

    t0 = time.time()
    p = subprocess.run(torchrun_cmd(tmp_path, *BASE, "parallel.pp=4", "model.n_layers=2"),
                       capture_output=True, text=True, timeout=300, env=worker_env())  # fmt: skip
    elapsed = time.time() - t0
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("ilm-train:")]
    assert len(lines) == 1 and "parallel.pp" in lines[0] and "n_layers" in lines[0], p.stderr
    assert "ilm_megatron/" not in p.stderr  # no traceback of ours (torchrun prints its own)
    assert elapsed < 60, elapsed
    assert not (tmp_path / "metrics.jsonl").exists()
