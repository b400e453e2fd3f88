"""tools/bench_train.py prints the cost model next to measured step times."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_train_json():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_train.py"), "--json", "--steps", "1",
         "--warmup", "0", "data.seq_len=8", "train.batch_size=8"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    res = json.loads(out.stdout)
    phases = res["phases"]
    assert set(phases) == {"explicit", "pretrain_4+1", "free_24+4"}
    assert phases["pretrain_4+1"]["analytic_over_explicit"] == (4 + 3) / 3
    assert phases["free_24+4"]["analytic_over_explicit"] == (24 + 12) / 3
    assert all(p["tokens_per_s"] > 0 and p["model_tflops"] > 0 for p in phases.values())
    # the conditions of the measurement: schedule, threads, load, machine, date
    assert res["schedule"] == "round-robin" and res["steps"] == 1 and res["warmup"] == 0
    assert isinstance(res["threads"], int) and res["threads"] >= 1
    for key in ("loadavg_before", "loadavg_after"):
        assert len(res[key]) == 3 and all(x >= 0 for x in res[key])
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["cpu_model"]
    assert res["date"][:4].isdigit() and "T" in res["date"]


def test_bench_train_round_robin_order(monkeypatch):
    """Every round runs one step of each phase, in the same order; warmup rounds are dropped."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from bench_train import step_times

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def step(self):
            calls.append(self.name)
            return float(len(calls))

    times = step_times({n: Fake(n) for n in ("a", "b", "c")}, steps=2, warmup=1)
    assert calls == ["a", "b", "c"] * 3
    assert times == {"a": [4.0, 7.0], "b": [5.0, 8.0], "c": [6.0, 9.0]}


def test_bench_train_missing_config():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_train.py"), "--config", "nope.yaml"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "nope.yaml" in out.stderr
