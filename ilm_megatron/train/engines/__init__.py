"""Training engines: what one optimizer step means in each parallel layout.

The loop in :mod:`ilm_megatron.train.loop` is written once against :class:`Engine`; the engine
owns the model, the optimizer, the process groups and the checkpoint layout:

* :class:`LocalEngine`: one process, no ``torch.distributed``. Gradient accumulation over
  ``parallel.microbatches``.
* :class:`DeepSpeedEngine`: data parallel with DeepSpeed ZeRO stage 1/2 (``tp = pp = 1``),
  launched by ``torchrun`` / ``deepspeed``; resumes at another data-parallel size through
  DeepSpeed's universal checkpoint.
* :class:`ParallelEngine`: tensor x pipeline x data parallel over Megatron-Core's process groups
  (several processes, ``parallel.tp > 1`` or ``parallel.pp > 1``; no ZeRO sharding: plain data
  parallelism is this engine with ``tp = pp = 1``). TP layers come from the ``tp`` spec
  backend; PP runs the ring schedule of :mod:`ilm_megatron.parallel.pipeline`; gradients are
  averaged over the data-parallel group, the gradient norm is taken over the whole model (sharded
  parameters counted once per shard, replicated ones once) and clipping and the non-finite skip
  are decided identically on every rank.

Every engine answers :meth:`Engine.train_step` with a :class:`StepOutput` whose control fields
(loss and accuracy averaged over the global batch, gradient norm, applied, stop) are identical on
all ranks, so the loop's logging and stopping logic never branch on the layout. The solver
statistics are the first data-parallel replica's (TP/PP) or each rank's own (DeepSpeed); only
rank 0's are logged.
"""

from __future__ import annotations

from ilm_megatron.config import Config
from ilm_megatron.train.device import resolve_device, use_bf16
from ilm_megatron.train.engines.base import (
    Engine,
    EvalShare,
    StepOutput,
    merge_stats,
    save_distributed_checkpoint,
)
from ilm_megatron.train.engines.deepspeed_engine import DeepSpeedEngine
from ilm_megatron.train.engines.local import LocalEngine
from ilm_megatron.train.engines.parallel_engine import ParallelEngine
from ilm_megatron.train.losses import token_accuracy, token_loss
from ilm_megatron.train.optim import (
    OPTIMIZER_FILE,
    adamw_state_by_name,
    adamw_state_from_single_process,
    load_adamw_state_by_name,
    local_adamw_state,
    new_optimizer,
    param_groups,
)

__all__ = [
    "OPTIMIZER_FILE",
    "DeepSpeedEngine",
    "Engine",
    "EvalShare",
    "LocalEngine",
    "ParallelEngine",
    "StepOutput",
    "adamw_state_by_name",
    "adamw_state_from_single_process",
    "build_engine",
    "load_adamw_state_by_name",
    "local_adamw_state",
    "merge_stats",
    "new_optimizer",
    "param_groups",
    "save_distributed_checkpoint",
    "token_accuracy",
    "token_loss",
    "use_bf16",
]


def build_engine(cfg: Config) -> Engine:
    """The engine for ``cfg``'s parallel settings and the launcher's world size."""
    from ilm_megatron.train.distributed import (
        check_parallel,
        wants_deepspeed,
        wants_process_groups,
    )

    check_parallel(cfg)
    if wants_deepspeed(cfg):
        return DeepSpeedEngine(cfg)
    if wants_process_groups(cfg):
        return ParallelEngine(cfg)
    return LocalEngine(cfg, resolve_device(cfg.train.device))
