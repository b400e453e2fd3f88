"""Tensor-parallel process-group helpers on top of Megatron-Core's ``parallel_state``.

Layers ask this module for the TP group, rank and size. Without an initialised model-parallel state
(a plain single process) the answers are ``None``, 0 and 1, so the ``tp`` backend degrades to the
local one. :func:`spawn` starts N local worker processes with ``torch.distributed`` initialised
(gloo on CPU, NCCL on GPUs) and Megatron's tensor/pipeline groups built; tests and
``tools/check_parallel.py`` use it.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def _ps() -> Any:
    from megatron.core import parallel_state

    return parallel_state


def tp_is_initialized() -> bool:
    """True when torch.distributed and Megatron's model-parallel groups are set up."""
    return dist.is_available() and dist.is_initialized() and _ps().model_parallel_is_initialized()


def tp_group() -> dist.ProcessGroup | None:
    """The tensor-parallel process group, or None in a single process."""
    return _ps().get_tensor_model_parallel_group() if tp_is_initialized() else None


def tp_rank() -> int:
    """This process's rank inside its tensor-parallel group (0 in a single process)."""
    return _ps().get_tensor_model_parallel_rank() if tp_is_initialized() else 0


def tp_world_size() -> int:
    """Size of the tensor-parallel group (1 in a single process)."""
    return _ps().get_tensor_model_parallel_world_size() if tp_is_initialized() else 1


def pp_rank() -> int:
    """This process's stage index in its pipeline-parallel group (0 in a single process)."""
    return _ps().get_pipeline_model_parallel_rank() if tp_is_initialized() else 0


def pp_world_size() -> int:
    """Number of pipeline stages (1 in a single process)."""
    return _ps().get_pipeline_model_parallel_world_size() if tp_is_initialized() else 1


def pp_group() -> dist.ProcessGroup | None:
    """The pipeline-parallel process group of this rank, or None in a single process."""
    return _ps().get_pipeline_model_parallel_group() if tp_is_initialized() else None


def pp_global_ranks() -> list[int]:
    """Global ranks of stages ``0..P-1`` of this rank's pipeline (``pp_ranks`` of the ring).

    With Megatron's layout (TP innermost) these are the ranks holding the same TP rank in every
    stage, e.g. ``[0, 2]`` and ``[1, 3]`` for tp=2, pp=2 on 4 ranks.
    """
    group = pp_group()
    if group is None:
        return [dist.get_rank()] if dist.is_available() and dist.is_initialized() else [0]
    return list(dist.get_process_group_ranks(group))


def model_tp_size(config: Any) -> int:
    """TP degree a layer built from ``config`` (a ``ModelConfig``) must use.

    The ``local`` backend is always unsharded; the ``tp`` backend uses the current TP group.
    """
    return tp_world_size() if getattr(config, "backend", "local") == "tp" else 1


def free_port() -> int:
    """An unused TCP port on localhost for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_worker(
    rank: int, world_size: int, port: int, tp: int = 1, pp: int = 1, backend: str | None = None
) -> None:
    """Initialise torch.distributed and Megatron's parallel state in a spawned worker."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    _ps().initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def shutdown_worker() -> None:
    """Destroy Megatron's groups and the default process group."""
    if dist.is_initialized():
        _ps().destroy_model_parallel()
        dist.destroy_process_group()


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    tp: int,
    pp: int,
    backend: str | None,
    threads: int,
    args: tuple[Any, ...],
) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    init_worker(rank, world_size, port, tp, pp, backend)
    try:
        fn(rank, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        shutdown_worker()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    tp: int | None = None,
    pp: int = 1,
    backend: str | None = None,
    threads: int = 1,
) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` processes with parallel state initialised.

    ``fn`` must be importable by name (module level). An exception in any worker is re-raised here.
    ``tp`` defaults to ``world_size // pp``.
    """
    import torch.multiprocessing as mp

    tp = world_size // pp if tp is None else tp
    os.environ["OMP_NUM_THREADS"] = str(threads)
    mp.spawn(
        _entry,
        args=(fn, world_size, free_port(), tp, pp, backend, threads, args),
        nprocs=world_size,
        join=True,
    )
