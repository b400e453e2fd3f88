"""Process groups for multi-process training (DeepSpeed ZeRO data parallel, or TP x PP x DP).

``torchrun`` and the ``deepspeed`` launcher describe a worker through environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`setup` reads
them, initialises ``torch.distributed`` through DeepSpeed (gloo on CPU, NCCL on GPU) and Megatron's
``parallel_state`` with ``parallel.tp`` and ``parallel.pp``, and returns a :class:`DistContext`.

A plain single process (no launcher variables, ``parallel.zero_stage=0``) never reaches this
module's initialisation: it trains with :class:`~ilm_megatron.train.engines.LocalEngine`.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ilm_megatron.config import Config, check_layout


def env_world_size() -> int:
    """``WORLD_SIZE`` set by a launcher, 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wants_deepspeed(cfg: Config) -> bool:
    """True when the run needs the DeepSpeed engine: ZeRO 1/2 sharding (with TP = PP = 1)."""
    par = cfg.parallel
    return par.tp == 1 and par.pp == 1 and par.zero_stage in (1, 2)


def wants_process_groups(cfg: Config) -> bool:
    """True when the run needs torch.distributed: several processes, TP, PP or ZeRO."""
    par = cfg.parallel
    return env_world_size() > 1 or par.tp > 1 or par.pp > 1 or par.zero_stage > 0


def check_parallel(cfg: Config) -> None:
    """Refuse parallel settings that cannot run with this launch, naming the values.

    The checks of :func:`ilm_megatron.config.check_layout` with the launcher's world size (1
    without a launcher); :func:`~ilm_megatron.config.load_config` has already run them when
    ``WORLD_SIZE > 1`` was set, this catches a config built otherwise and a one-process launch.

    Raises:
        ConfigError: naming the keys, their values and ``WORLD_SIZE``.
    """
    check_layout(cfg, env_world_size())


class MegatronMPU:
    """The ``mpu`` object DeepSpeed asks for, answered by Megatron's ``parallel_state``.

    DeepSpeed's "model parallel" group is where its ZeRO optimizer sums the gradient norm and the
    overflow flag after the data-parallel group: Megatron's model-parallel group, TP x PP (every
    rank holding a different part of one replica). DeepSpeed takes the tensor-parallel rank
    from ``get_tensor_model_parallel_rank`` (a replicated parameter counts on TP rank 0 only).
    The universal-checkpoint loader asks for the Megatron names too.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.ps.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.ps.get_model_parallel_group())

    def get_model_parallel_group(self) -> Any:
        return self.ps.get_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_group(self) -> Any:
        return self.ps.get_tensor_model_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_group(self) -> Any:
        return self.ps.get_data_parallel_group()


@dataclass
class DistContext:
    """Where this process sits: global rank, data-parallel rank/size, device."""

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    device: torch.device
    mpu: MegatronMPU

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over all ranks (one collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def all_reduce_max(self, values: list[float]) -> list[float]:
        """Elementwise maximum of a few floats over all ranks (one collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu().tolist()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _attempt_store() -> dist.Store:
    """The launcher's key-value store, under a prefix unique to this restart attempt.

    After ``torchrun --max-restarts`` restarts the workers, the agent's store still holds the
    dead attempt's keys; Gloo (for the groups Megatron creates) would read the old peers'
    addresses from them and fail to connect. A per-attempt prefix keeps attempts apart.
    """
    from datetime import timedelta

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=not agent and int(os.environ["RANK"]) == 0,
        timeout=timedelta(minutes=30),
        wait_for_workers=False,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"ilm_megatron/attempt_{attempt}/", store)


def setup(cfg: Config) -> DistContext:
    """Initialise torch.distributed (via DeepSpeed) and Megatron's parallel state.

    Without launcher variables (a single process asking for ZeRO), a one-process group on
    localhost is created. Idempotent: a second call reuses the existing groups.
    """
    import deepspeed
    from megatron.core import parallel_state

    check_parallel(cfg)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if "RANK" not in os.environ:  # a plain process: a group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            store=_attempt_store(),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp)
    mpu = MegatronMPU()
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        dp_rank=mpu.get_data_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(),
        device=device,
        mpu=mpu,
    )


def teardown() -> None:
    """Destroy Megatron's groups and the default process group (end of a run)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_config(cfg: Config, ctx: DistContext) -> dict[str, Any]:
    """DeepSpeed config: ZeRO stage, batch split, clipping.

    DeepSpeed's own bf16 mode is never used: it casts every parameter to bf16, so the fp32
    residual stream of the solve meets bf16 weights (and Mamba2's ``A_log``/``dt_bias``/``D``
    lose precision). Under ``train.precision=bf16`` ZeRO keeps fp32 weights, gradients and
    optimizer state and the forward runs under bf16 ``torch.autocast`` like the other engines, on
    CPU and GPU alike, through DeepSpeed's ``torch_autocast`` section (DeepSpeed's forward
    switches off an autocast entered outside it). Gradients are reduced in fp32
    (``lower_precision_safe_modules`` empty).
    """
    from ilm_megatron.train.device import use_bf16

    par, t = cfg.parallel, cfg.train
    bf16 = use_bf16(cfg, ctx.device)
    per_rank = t.batch_size // ctx.dp_size
    if t.batch_size % ctx.dp_size or per_rank % par.microbatches:
        raise ValueError(
            f"train.batch_size={t.batch_size} must be divisible by data-parallel size "
            f"{ctx.dp_size} x parallel.microbatches={par.microbatches}"
        )
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": per_rank // par.microbatches,
        "gradient_accumulation_steps": par.microbatches,
        "zero_optimization": {"stage": par.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": float(t.clip_grad or 0.0),
        "bf16": {"enabled": False},  # fp32 weights; bf16 is autocast in the forward
        "torch_autocast": {
            "enabled": bf16,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
