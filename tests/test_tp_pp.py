"""TP x PP (ring schedule with a TP group inside each stage) against the single-process model.

The multi-process tests spawn gloo workers (one thread each) running
:func:`ilm_megatron.parallel.compare.compare_parallel`: every rank builds the single-process
(``local``) model from a seed as an independent reference, loads its weights into the ``tp`` model
(its shard), splits it into its pipeline stage and runs the micro-batches through the ring; logits,
losses, every gathered gradient (per stage, union covering the model) and iteration counts (every
rank) must match within 1e-5, and after one SGD step on both models a checkpoint saved from the
TP x PP run must give a fresh single-process model the same logits. A TP=2 checkpoint must load
at PP=2 and at TP=2 x PP=2. ``tools/check_parallel.py --pp 2`` is run as a subprocess, with its
usage errors.
About 2 min on 2 cores for the slow tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
MB = 2  # micro-batches


def _run(
    tmp_path: Path,
    cfg: Any,
    tp: int,
    pp: int,
    *,
    seed: int = 1234,
    ckpt: str = "ckpt.pt",
    init: str | None = None,
    microbatches: int = MB,
) -> dict[str, Any]:
    from _dist import run_workers

    from ilm_megatron.parallel.compare import compare_parallel

    res = tmp_path / f"res_tp{tp}_pp{pp}.json"
    args = (cfg, seed, str(res), str(tmp_path / ckpt), 2, 12, microbatches, init)
    run_workers(compare_parallel, tp * pp, *args, tp=tp, pp=pp)
    return json.loads(res.read_text())


def _assert_close(r: dict[str, Any], tp: int, pp: int, microbatches: int = MB) -> None:
    assert (r["tp"], r["pp"], r["microbatches"]) == (tp, pp, microbatches), r
    assert r["grad_name_mismatch"] == [], r
    for k in ("max_abs_logit_diff", "max_rel_grad_diff", "loss_diff", "checkpoint_logit_diff"):
        assert r[k] < TOL, (k, r)
    assert r["iters_equal"], r
    assert len(r["solver_iters_per_rank"]) == tp * pp
    assert all(it == r["solver_iters"] for it in r["solver_iters_per_rank"]), r
    assert len(r["solver_iters"]) == microbatches and min(r["solver_iters"]) >= 1, r
    if pp > 1:  # eval / sequential decoding only apply without the ring
        assert r["eval_logit_diff"] is None and r["sequential_logit_diff"] is None
        # each TP rank sends a 1/tp slice of the iterate (or its l/tp positions under SP)
        assert r["ring_comm_bytes_over_ideal"] == pytest.approx(1.0, abs=1e-9), r


@pytest.mark.parametrize(
    "arch, overrides",
    [("mamba2", ("model.ngroups=2",)), ("llama", ())],
)
@pytest.mark.slow
def test_tp2_pp2_matches_single_process(
    tmp_path: Path, arch: str, overrides: tuple[str, ...]
) -> None:
    """4 processes: TP=2 inside each of 2 stages, 2 micro-batches, M=2 in flight."""
    cfg = tiny_config(arch, overrides=(*overrides, "parallel.tp=2"))
    assert cfg.model.backend == "tp"
    r = _run(tmp_path, cfg, 2, 2)
    _assert_close(r, 2, 2)
    local = _local_model(cfg)
    assert r["grad_params"] == len(list(local.parameters()))
    # the checkpoint the TP x PP run wrote is the full single-process state dict
    sd = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    full = local.state_dict()
    assert set(sd) == set(full)
    assert all(sd[k].shape == full[k].shape for k in full)
    assert not list(tmp_path.glob(".ckpt.pt.tmp*")), "temporary checkpoint file left behind"


@pytest.mark.parametrize(
    "arch, overrides",
    [("mamba2", ("model.ngroups=2",)), ("llama", ())],
)
@pytest.mark.slow
def test_tp2_pp2_sequence_parallel_matches_single_process(
    tmp_path: Path, arch: str, overrides: tuple[str, ...]
) -> None:
    """Sequence parallelism around the ring: each TP rank stores and sends 6 of the 12 positions
    of the iterate, the residual is summed over TP; everything matches one process."""
    cfg = tiny_config(
        arch, overrides=(*overrides, "parallel.tp=2", "parallel.sequence_parallel=true")
    )
    r = _run(tmp_path, cfg, 2, 2)
    _assert_close(r, 2, 2)
    assert r["sequence_parallel"] is True and r["iterate_positions_per_rank"] == 6


_FAST_SOLVER = ("solver.method=anderson", "solver.early_exit=true", "solver.f_tol=1e-3")


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.slow
def test_anderson_and_early_exit_under_sequence_parallelism(tmp_path: Path, pp: int) -> None:
    """Anderson's least squares and the early-exit decisions under TP=2 with sequence
    parallelism: each rank holds half of every sample's positions, so the Gram matrix and the
    residuals are summed over TP (without the sums the ranks' mixing weights differ from one
    process). PP=1 runs the shrinking batch (stopped samples leave it), PP=2 the ring's masking;
    both match one process, iteration counts included."""
    cfg = tiny_config(
        "mamba2",
        overrides=("model.ngroups=2", "parallel.tp=2", "parallel.sequence_parallel=true")
        + _FAST_SOLVER,
    )
    r = _run(tmp_path, cfg, 2, pp)
    _assert_close(r, 2, pp)


def _local_model(cfg: Any) -> torch.nn.Module:
    import dataclasses

    from ilm_megatron.models.lm import build_model

    return build_model(dataclasses.replace(cfg.model, backend="local"))


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_pp2(tmp_path: Path) -> None:
    """A checkpoint saved by the TP=2 check loads at PP=2 and at TP=2 x PP=2 (identical logits).

    The later runs use another seed, so their models' own initialisation differs from the file:
    only a correct load (into the reference and into every shard / stage) makes them agree.
    """
    cfg = tiny_config("llama", overrides=("parallel.tp=2",))
    r = _run(tmp_path, cfg, 2, 1, ckpt="tp2.pt", microbatches=1)
    _assert_close(r, 2, 1, microbatches=1)
    tp2 = tmp_path / "tp2.pt"
    saved = torch.load(tp2, weights_only=True)
    torch.manual_seed(99)
    other = _local_model(cfg).state_dict()
    assert any(not torch.equal(saved[k], other[k]) for k in saved), "seed does not change weights"

    for tp, pp in ((1, 2), (2, 2)):
        c = cfg if tp == 2 else tiny_config("llama")
        r = _run(tmp_path, c, tp, pp, seed=99, ckpt=f"out{tp}{pp}.pt", init=str(tp2))
        _assert_close(r, tp, pp)
        assert r["init_checkpoint"] == str(tp2)


def _check_parallel(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_parallel.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["implicit_mamba2_tiny", "explicit_llama_tiny"])
def test_check_parallel_cli_pp2(name: str) -> None:
    """``check_parallel --tp 1 --pp 2 --microbatches 2 --json``: exit 0, diffs in the JSON.

    The explicit model goes round the ring once (no solve, one undamped pass).
    """
    cfg = str(ROOT / "configs" / "models" / f"{name}.yaml")
    proc = _check_parallel(
        "--config", cfg, "--tp", "1", "--pp", "2", "--microbatches", "2", "--json"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["ok"] is True and r["backend"] == "gloo"
    _assert_close(r, 1, 2)


@pytest.mark.slow
def test_check_parallel_cli_sequence_parallel() -> None:
    """``check_parallel --tp 2 --pp 2 --sequence-parallel`` on an explicit Mamba2 (the embedding
    reduce-scattered into the first stage's input)."""
    cfg = str(ROOT / "configs" / "models" / "explicit_mamba2_tiny.yaml")
    proc = _check_parallel(
        "--config", cfg, "--tp", "2", "--pp", "2", "--microbatches", "2", "--sequence-parallel",
        "--json", "model.ngroups=2", "model.n_layers=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["ok"] is True and r["sequence_parallel"] is True
    assert r["iterate_positions_per_rank"] == 6
    _assert_close(r, 2, 2)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--config", "missing.yaml"), "config not found"),
        (("--tp", "3", "--pp", "2"), "tensor parallel size 3 does not divide model n_heads=4"),
        (("--tp", "1", "--pp", "3"), "--pp 3 is larger than model.n_layers=2"),
        (("--pp", "0"), "must be >= 1"),
    ],
)
def test_check_parallel_usage_errors(args: tuple[str, ...], message: str) -> None:
    """Usage errors exit with 2 and a message naming the numbers, before any process starts."""
    base = () if "--config" in args else ("--config", "configs/models/implicit_llama_tiny.yaml")
    proc = _check_parallel(*base, *args, "--json", timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert message in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout == ""
