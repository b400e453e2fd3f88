#!/usr/bin/env python
"""Kill an ``ilm-train`` run again and again, resume it each time, and check it loses nothing.

    python tools/chaos_train.py --run-dir runs/chaos --kills 20 [--nproc 2] [key=value ...]

Each attempt is either killed with SIGKILL at a named fault point (mid-save before the
manifest, between the save and the ``latest`` update, mid-evaluation, at a training step; see
``ILM_FAULT`` in ``ilm_megatron/train/checkpoint.py``) or killed from outside after a random
delay, whole process group (a node failure). The run is restarted after each kill until it
completes. Then an uninterrupted run of the same config is made, and the loss of every step read
back from TensorBoard is compared (bitwise on CPU). Prints one JSON object; exit 1 on a
mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

POINTS = ("save_before_manifest", "save_before_latest", "evaluate", "step")


def launcher(run_dir: Path, overrides: list[str], nproc: int = 1) -> Callable:
    """``launch(env) -> Popen``: one attempt of ``ilm-train`` (``torchrun`` when ``nproc > 1``),
    in its own process group so that a kill takes every rank."""

    def launch(extra_env: dict[str, str]) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("ILM_FAULT", None)
        env.update(extra_env)
        cli = ["-m", "ilm_megatron.train.cli", "--quiet", f"run_dir={run_dir}", *overrides]
        if nproc > 1:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-addr", "127.0.0.1", "--master-port", str(port), *cli]  # fmt: skip
        else:
            cmd = [sys.executable, *cli]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)  # fmt: skip

    return launch


def kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL an attempt and every process below it (torchrun starts its workers in their own
    sessions, so a process-group kill would leave them running)."""
    import psutil

    try:
        procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    p.communicate()


def chaos(launch: Callable, kills: int, seed: int, delay: tuple[float, float] = (1.0, 4.0)):
    """Kill ``kills`` attempts (two in three at fault points, one in three after a random
    delay), then let one finish. Returns a list of what each attempt saw."""
    rng = random.Random(seed)
    log = []
    for i in range(kills):
        if i % 3 == 2:
            p = launch({})
            wait = rng.uniform(*delay)
            try:
                p.communicate(timeout=wait)
            except subprocess.TimeoutExpired:
                kill_tree(p)
            log.append({"kill": f"SIGKILL after {wait:.1f} s", "rc": p.returncode})
        else:
            point = POINTS[rng.randrange(len(POINTS))]
            # evaluate@1: a later validation could let one attempt finish the whole run
            nth = 1 if point == "evaluate" else rng.randint(1, 2)
            p = launch({"ILM_FAULT": f"{point}@{nth}"})
            try:
                p.communicate(timeout=600)
            finally:
                kill_tree(p)  # a rank died: nothing of the attempt may outlive it
            log.append({"kill": f"{point}@{nth}", "rc": p.returncode})
    p = launch({})
    _, err = p.communicate(timeout=1800)
    log.append(
        {"kill": None, "rc": p.returncode, **({"stderr": err[-2000:]} if p.returncode else {})}
    )
    return log


def tb_losses(run_dir: Path) -> dict[int, float]:
    """step -> ``train/loss`` as TensorBoard shows it (events of dead attempts purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="ilm-train key=value overrides")
    args = p.parse_args(argv)
    if args.run_dir.exists():
        print(f"chaos_train: {args.run_dir} exists; choose a new folder", file=sys.stderr)
        return 2
    t0 = time.time()
    log = chaos(launcher(args.run_dir, args.overrides, args.nproc), args.kills, args.seed)
    ref_dir = args.run_dir.with_name(args.run_dir.name + "-reference")
    ref = launcher(ref_dir, [*args.overrides, "train.start_over=true"], args.nproc)({})
    _, err = ref.communicate()
    if ref.returncode:
        print(err, file=sys.stderr)
        return 1
    got, want = tb_losses(args.run_dir), tb_losses(ref_dir)
    ok = log[-1]["rc"] == 0 and got == want
    print(json.dumps({"ok": ok, "attempts": log, "steps": len(want), "seconds": time.time() - t0,
                      "mismatched_steps": sorted(k for k in want if got.get(k) != want[k])},
                     indent=1))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
