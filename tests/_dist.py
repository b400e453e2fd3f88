"""Spawn N gloo worker processes for multi-process tests (CPU, one thread each).

Thin wrapper over :func:`ilm_megatron.core.parallel_state.spawn`: torch.distributed on gloo
with a free localhost port, Megatron's tensor/pipeline groups initialised, ``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)`` in every worker; an exception in a worker fails the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def run_workers(
    fn: Callable[..., Any], world_size: int, *args: Any, tp: int | None = None, pp: int = 1
) -> None:
    """Run ``fn(rank, *args)`` (a module-level function) in ``world_size`` gloo processes."""
    from ilm_megatron.core.parallel_state import spawn

    spawn(fn, world_size, args=args, tp=tp, pp=pp, backend="gloo", threads=1)


# ---------------------------------------------------------------------------------------------
# ``ilm-train`` under torchrun (real launcher, real worker processes)


def free_port() -> int:
    """An unused localhost port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    """The test process's environment, one thread per worker, no leftover fault injection."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ILM_TEST_CRASH_AT_STEP", None)
    env.pop("ILM_TEST_NAN_AT_STEPS", None)
    env.update(extra)
    return env


def torchrun_cmd(run_dir: Any, *overrides: str, nproc: int = 2, max_restarts: int = 0) -> list[str]:
    """``python -m torch.distributed.run ... -m ilm_megatron.train.cli --quiet run_dir=...``."""
    import sys

    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "--max-restarts", str(max_restarts),
        "-m", "ilm_megatron.train.cli", "--quiet", f"run_dir={run_dir}", *overrides,
    ]  # fmt: skip


def torchrun_train(
    run_dir: Any,
    *overrides: str,
    nproc: int = 2,
    max_restarts: int = 0,
    check: bool = True,
    timeout: float = 240,
    **env: str,
) -> str:
    """Run ``ilm-train`` under torchrun; returns stdout + stderr (asserts success if ``check``)."""
    import subprocess

    proc = subprocess.run(
        torchrun_cmd(run_dir, *overrides, nproc=nproc, max_restarts=max_restarts),
        env=worker_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, out[-6000:]
    return out


def records(run_dir: Any) -> list[dict]:
    """The run's metrics.jsonl records."""
    import json
    from pathlib import Path

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x]


def losses(run_dir: Any) -> dict[int, float]:
    """``{step: loss}`` of a run."""
    return {r["step"]: r["loss"] for r in records(run_dir)}
