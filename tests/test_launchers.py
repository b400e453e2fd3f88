"""The launch scripts: torchrun.sh and deepspeed.sh start 2 CPU ranks; slurm.sbatch parses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--quiet", "train.batch_size=8", "data.seq_len=8", "data.eval_seq_len=0",
    "solver.f_max_iter=4", "train.log_interval=1", "train.eval_batches=1",
    "train.tensorboard=false", "train.device=cpu", "train.max_steps=3", "parallel.zero_stage=1",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, run_dir: Path, **env: str) -> None:
    # the scripts run $PYTHON (default: python on PATH); use this interpreter and its packages
    full = dict(
        os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), PYTHON=sys.executable
    )
    full.update(env)
    proc = subprocess.run(
        ["bash", str(ROOT / "launchers" / script), *ARGS, f"run_dir={run_dir}"],
        env=full, cwd=ROOT, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["world_size"] == 2 for r in recs)
    step3 = run_dir / "checkpoints" / "step-00000003"
    assert len(list(step3.glob("*optim_states.pt"))) == 2


def test_torchrun_launcher_two_cpu_ranks(tmp_path):
    run_script("torchrun.sh", tmp_path / "run", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1")


def test_deepspeed_launcher_two_cpu_ranks(tmp_path):
    run_script("deepspeed.sh", tmp_path / "run", NUM_GPUS="2")


@pytest.mark.parametrize("script", ["slurm.sbatch", "torchrun.sh", "deepspeed.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "launchers" / script)], check=True)
