"""``tools/bench_data.py`` on a tiny corpus: runs as a subprocess and prints the expected JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_data_json() -> None:
    args = ["--corpus-mb", "0.2", "--loader-seconds", "0.3", "--seq-len", "64", "--json"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_data.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    for key in ("preprocess_byte", "preprocess_bpe"):
        assert res[key]["tokens_per_s_per_worker"] > 0
        assert res[key]["ratio_to_consumption"] > 0
    assert res["preprocess_byte"]["vocab_size"] == 257
    assert 257 < res["preprocess_bpe"]["vocab_size"] <= 2000
    assert [r["num_workers"] for r in res["loader"]] == [0, 2]
    assert all(r["samples_per_s"] > 0 for r in res["loader"])
    assert isinstance(res["meets_target"], bool) and res["machine"] and res["date"]


def test_bench_data_bad_args() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_data.py"), "--loader-workers", "-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "loader-workers" in proc.stderr
