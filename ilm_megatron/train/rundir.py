"""The run directory: one job at a time, writable, and never mixed with an earlier run.

``ilm-train`` takes an exclusive lock on ``run_dir/.ilm-train.lock`` (rank 0, for the whole job)
before it writes anything. A second job on the same folder, a requeued SLURM job that overlaps its
predecessor for instance, is refused with the holder's host, pid and start time. The lock is an
``flock`` on an open file, so the kernel releases it when the holder dies, however it dies: a
crashed run never leaves a stale lock behind (the file's text is only for the message). On
Linux NFS clients ``flock`` is carried by NFS byte-range locks, so a job on another node sees it.

A fresh start over a folder that holds checkpoints is refused unless asked for with
``train.start_over=true``, which moves the earlier run's files to ``run_dir/previous-<time>/``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from ilm_megatron.errors import RunError

LOCK_FILE = ".ilm-train.lock"
# what a run writes into its folder (moved aside together by train.start_over)
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "final.json", "model.safetensors",
             "config.yaml")  # fmt: skip


class RunDirLock:
    """An exclusive, crash-safe lock on a run directory (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunError` naming the holder (host, pid, since)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunError(
                f"{self.path.parent} is in use by another ilm-train job ({holder}); wait for "
                "it to finish or choose another run_dir"
            ) from None
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "job": os.environ.get("SLURM_JOB_ID", ""),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        info = {}
    if not info:
        return "holder unknown"
    job = f", SLURM job {info['job']}" if info.get("job") else ""
    return f"host {info.get('host')}, pid {info.get('pid')}, since {info.get('since')}{job}"


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file in it, or raise :class:`RunError` naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunError(f"{folder} cannot be written: {e.strerror or e}") from None


def move_previous_run(run_dir: Path) -> Path | None:
    """Move an earlier run's files (``RUN_FILES``) to ``run_dir/previous-<time>/``; return that
    folder, or None when there was nothing to move."""
    present = [run_dir / n for n in RUN_FILES if (run_dir / n).exists()]
    if not present:
        return None
    dest = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        dest = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    dest.mkdir()
    for p in present:
        os.replace(p, dest / p.name)
    return dest
