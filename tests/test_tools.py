"""The command-line tools ``tools/check_duality.py`` and ``tools/bench_implicit.py``.

Each tool runs as a subprocess (``sys.executable``) on the tiny configs, the way a user runs it;
the JSON it prints is checked. About 30 s on a 2-core CPU, most of it importing Megatron-Core once
per subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
CONFIGS = ROOT / "configs" / "models"

DUALITY_KEYS = {
    "max_abs_logit_diff",
    "token_agreement",
    "mean_iters_simultaneous",
    "mean_iters_sequential",
    "config",
    "seq_len",
    "batch",
    "tol",
    "residual_max_simultaneous",
    "residual_max_sequential",
}
BENCH_KEYS = {
    "saved_bytes",
    "saved_bytes_ratio_32_4",
    "iter_time_over_explicit_forward",
    "seq_token_latency_ratio",
    "config",
    "machine",
    "date",
}


def run_tool(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python tools/<name> args...`` from the repository root (threads left to torch)."""
    return subprocess.run(
        [sys.executable, str(TOOLS / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_json(name: str, *args: str) -> dict[str, Any]:
    proc = run_tool(name, *args, "--json")
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("config", ["implicit_mamba2_tiny.yaml", "implicit_llama_tiny.yaml"])
def test_check_duality(config: str) -> None:
    r = run_json("check_duality.py", "--config", str(CONFIGS / config), "--seq-len", "12")
    assert DUALITY_KEYS <= r.keys()
    assert r["seq_len"] == 12 and r["batch"] == 2 and r["tol"] == pytest.approx(1e-6)
    assert r["config"].endswith(config)
    # both modes converged to the tolerance, so they agree to float32 rounding
    assert r["residual_max_simultaneous"] < r["tol"]
    assert r["residual_max_sequential"] < r["tol"]
    assert r["max_abs_logit_diff"] < 1e-4
    assert r["token_agreement"] == 1.0
    assert r["mean_iters_simultaneous"] >= 1 and r["mean_iters_sequential"] >= 1


def test_check_duality_checkpoint(tmp_path: Path) -> None:
    """A checkpoint's stored model config is used; readable summary; ``--max-diff`` passes."""
    from ilm_megatron.config import load_config
    from ilm_megatron.models.lm import build_model
    from ilm_megatron.train.checkpoint import save_model

    cfg = load_config([CONFIGS / "implicit_llama_tiny.yaml"], ["model.d_model=16"])
    ckpt = tmp_path / "tiny.safetensors"
    save_model(build_model(cfg.model, cfg.solver), cfg, ckpt)
    proc = run_tool(
        "check_duality.py",
        *("--checkpoint", str(ckpt), "--config", str(CONFIGS / "implicit_mamba2_tiny.yaml")),
        *("--seq-len", "6", "--batch", "1", "--max-diff", "1e-4"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny.safetensors (llama" in proc.stdout and "argmax agreement" in proc.stdout


def test_check_duality_missing_config() -> None:
    missing = CONFIGS / "no_such_model.yaml"
    proc = run_tool("check_duality.py", "--config", str(missing), "--json")
    assert proc.returncode == 2
    assert "no_such_model.yaml" in proc.stderr
    assert proc.stdout == ""


def test_check_duality_bad_arguments() -> None:
    missing = ROOT / "no_such_checkpoint.safetensors"
    proc = run_tool("check_duality.py", "--checkpoint", str(missing))
    assert proc.returncode == 2 and "no_such_checkpoint.safetensors" in proc.stderr
    proc = run_tool("check_duality.py", "--config", str(CONFIGS / "x.yaml"), "--seq-len", "0")
    assert proc.returncode == 2 and "--seq-len" in proc.stderr
    proc = run_tool("check_duality.py")
    assert proc.returncode == 2 and "--config" in proc.stderr


def test_bench_implicit_quick() -> None:
    cfg = CONFIGS / "implicit_mamba2_tiny.yaml"
    r = run_json(
        "bench_implicit.py",
        *("--config", str(cfg), "--quick", "--repeats", "1", "--seq-len", "16", "--batch", "2"),
    )
    assert BENCH_KEYS <= r.keys()
    assert r["seq_positions"] == [64, 512]
    assert "seq_token_latency_ratio_512_64" in r
    saved = r["saved_bytes"]
    assert set(saved) == {"4", "8", "16", "32"}
    assert r["solver_iters_run"] == {k: int(k) for k in saved}  # the solves really ran that long
    assert all(v > 0 for v in saved.values())
    # the no-grad solve keeps nothing for backward: memory is that of the phantom steps only
    assert saved["32"] == pytest.approx(saved["4"], rel=0.05)
    assert r["saved_bytes_ratio_32_4"] == pytest.approx(saved["32"] / saved["4"])
    for key in ("iter_time_over_explicit_forward", "seq_token_latency_ratio"):
        assert r[key] > 0
    assert {"torch", "threads", "platform"} <= r["machine"].keys()
