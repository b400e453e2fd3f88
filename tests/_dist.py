"""Spawn N gloo worker processes for multi-process tests (CPU, one thread each).

Thin wrapper over :func:`ilm_megatron.parallel.state.spawn`: torch.distributed on gloo with a free
localhost port, Megatron's tensor/pipeline groups initialised, ``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)`` in every worker; an exception in a worker fails the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def run_workers(
    fn: Callable[..., Any], world_size: int, *args: Any, tp: int | None = None, pp: int = 1
) -> None:
    """Run ``fn(rank, *args)`` (a module-level function) in ``world_size`` gloo processes."""
    from ilm_megatron.parallel.state import spawn

    spawn(fn, world_size, args=args, tp=tp, pp=pp, backend="gloo", threads=1)
