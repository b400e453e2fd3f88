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
    assert all(p["tokens_per_s"] > 0 for p in phases.values())


def test_bench_train_missing_config():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_train.py"), "--config", "nope.yaml"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "nope.yaml" in out.stderr
