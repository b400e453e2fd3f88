"""Toy-size runs of ``tools/bench_solver.py`` and ``tools/bench_state_tracking.py``.

The solver benchmark's numbers are checked against the model run directly with the same solver
settings; the state-tracking grid against :func:`evaluate_length` with ``easy_frac = 1 - p``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_tools import run_json, run_tool

SOLVER_KEYS = {
    "iters_plain",
    "iters_anderson",
    "iters_sequential",
    "iters_warm_start",
    "time_early_exit_over_plain",
    "early_exit_ideal_ratio",
    "quality",
    "cases",
    "machine",
}


def test_bench_solver_quick_reports_what_the_solves_did() -> None:
    r = run_json("bench_solver.py", "--quick", "--tols", "1e-4")
    assert SOLVER_KEYS <= r.keys()
    (case,) = r["cases"]
    assert case["tol"] == 1e-4 and case["task"] == "random tokens"
    # the same inputs and solver settings, run here: the per-sample iterations to the tolerance
    from ilm_megatron.models.lm import build_model

    cfg = tiny_config("mamba2")
    torch.manual_seed(0)  # the tool's --seed
    model = build_model(cfg.model, cfg.solver).double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 8), generator=g)
    ids[1::2] = ids[1::2, :1]
    model.solver_config = dataclasses.replace(cfg.solver, eval_tol=1e-4)
    with torch.no_grad():
        plain = model(ids, max_iter=1000).stats.sample_iters.double().mean().item()
        model.solver_config = dataclasses.replace(model.solver_config, method="anderson")
        anderson = model(ids, max_iter=1000).stats.sample_iters.double().mean().item()
    assert r["iters_plain"] == plain and r["iters_anderson"] == anderson
    assert r["iters_anderson"] < r["iters_plain"]
    q = r["quality"]
    # every variant finds the same fixed point to the tolerance: logits agree closely
    assert all(v < 1e-2 for v in q["max_logit_diff_from_sequential"].values()), q
    assert q["agreement_with_sequential"]["plain"] == 1.0
    ideal = sum(case["iters_per_sample_plain"]) / (4 * max(case["iters_per_sample_plain"]))
    assert r["early_exit_ideal_ratio"] == pytest.approx(ideal, rel=1e-6)


def test_bench_solver_refuses_an_explicit_config() -> None:
    cfg = Path(__file__).resolve().parents[1] / "configs/models/explicit_mamba2_tiny.yaml"
    proc = run_tool("bench_solver.py", "--config", str(cfg), "--quick")
    assert proc.returncode == 2 and "explicit" in proc.stderr


def test_bench_state_tracking_grid(tmp_path: Path) -> None:
    from ilm_megatron.config import load_config
    from ilm_megatron.tasks.state_tracking import EvalSpec, evaluate_length
    from ilm_megatron.train.checkpoint import load_model
    from ilm_megatron.train.loop import train

    run = tmp_path / "run"
    overrides = ["train.max_steps=2", "data.seq_len=8", "data.eval_seq_len=0", "data.easy_frac=0.5"]
    train(load_config([], overrides), run, quiet=True)
    out = tmp_path / "grid.json"
    r = run_json(
        "bench_state_tracking.py",
        *("--run", f"tiny={run}", "--lengths", "8,16", "--hard-fractions", "0.25,1"),
        *(
            "--batches",
            "1",
            "--batch-size",
            "8",
            "--output",
            str(out),
            "--plot",
            str(tmp_path / "g.png"),
        ),
    )
    assert json.loads(out.read_text())["rows"] == r["rows"]
    assert (tmp_path / "g.png").stat().st_size > 0
    assert r["group"] == "S3" and r["train_length"] == 8 and r["train_hard_fraction"] == [0.5]
    assert [(x["length"], x["hard_fraction"]) for x in r["rows"]] == [
        (8, 0.25), (16, 0.25), (8, 1.0), (16, 1.0)
    ]  # fmt: skip
    model = load_model(run / "model.safetensors")
    for row in r["rows"]:
        spec = EvalSpec("S3", batches=1, batch_size=8, easy_frac=1 - row["hard_fraction"])
        direct = evaluate_length(model, spec, row["length"])
        assert (
            row["acc_last10"] == direct["acc_last10"] and row["iters_mean"] == direct["iters_mean"]
        )


def test_bench_state_tracking_names_a_bad_run(tmp_path: Path) -> None:
    proc = run_tool("bench_state_tracking.py", "--run", f"x={tmp_path / 'nothing'}")
    assert proc.returncode == 2 and "--run x=" in proc.stderr


def test_bench_catbabi_rows(tmp_path: Path) -> None:
    """Figure 13 (c, d) rows: per story-length bucket the accuracy and iterations ilm-eval
    catbabi reports, at the mean story length of the bucket's answers, recomputed here from the
    stream."""
    from conftest import CONFIGS, make_catbabi

    from ilm_megatron.config import load_config
    from ilm_megatron.data.catbabi import iter_batches, load_stream
    from ilm_megatron.models.lm import build_model
    from ilm_megatron.train.checkpoint import save_model

    data = make_catbabi(tmp_path / "cb", "--stories", "3", "--tasks", "1,3", "--seed", "0")
    cfg = load_config(
        [CONFIGS / "tasks" / "catbabi_implicit_mamba2.yaml"],
        ["model.d_model=16", "model.headdim=8", "model.d_state=8", "model.n_layers=1"],
    )
    torch.manual_seed(0)
    save_model(build_model(cfg.model, cfg.solver), cfg, tmp_path / "m.safetensors")
    proc = run_tool(
        "bench_catbabi.py",
        *("--run", f"tiny={tmp_path / 'm.safetensors'}", "--data", str(data), "--seq-len", "64"),
        *("--length-bins", "120", "--plot", str(tmp_path / "c.png"), "--plot-tasks", "--json"),
        *("--", "--batch-size", "2"),  # to ilm-eval catbabi
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert (tmp_path / "c.png").stat().st_size > 0
    ev = r["runs"]["tiny"]
    assert [x["bucket"] for x in r["rows"]] == list(ev["per_length"])
    for row in r["rows"]:
        assert row["accuracy"] == ev["per_length"][row["bucket"]]
        assert row["iters_mean"] == ev["iters_per_length"][row["bucket"]]
    lens: dict[str, list[int]] = {}
    for b in iter_batches(load_stream(str(data), "test", 2, 64)):
        for n in b.story_len[b.is_answer.bool()].tolist():
            lens.setdefault("<=120" if n <= 120 else ">120", []).append(n)
    want = {k: sum(v) / len(v) for k, v in lens.items()}
    assert {x["bucket"]: x["story_length"] for x in r["rows"]} == pytest.approx(want)
    assert {x["bucket"]: x["answers"] for x in r["rows"]} == {k: len(v) for k, v in lens.items()}
    # per task: the same buckets split by task, which pool back to the rows
    assert {x["task"] for x in r["task_rows"]} == {1, 3}
    for row in r["rows"]:
        cells = [x for x in r["task_rows"] if x["bucket"] == row["bucket"]]
        n = sum(x["answers"] for x in cells)
        assert n == row["answers"]
        assert sum(x["accuracy"] * x["answers"] for x in cells) / n == pytest.approx(
            row["accuracy"]
        )
        assert sum(x["iters_mean"] * x["answers"] for x in cells) / n == pytest.approx(
            row["iters_mean"]
        )
    for x in r["task_rows"]:
        assert x["accuracy"] == ev["per_task_length"][str(x["task"])][x["bucket"]]["accuracy"]
