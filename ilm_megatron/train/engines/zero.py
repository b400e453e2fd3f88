"""ZeRO-1/2 for the tensor x pipeline engine: DeepSpeed's ZeRO optimizer around one rank's module.

:class:`~ilm_megatron.train.engines.ParallelEngine` trains one rank's share of the model (its TP
shard of its pipeline stage). With ``parallel.zero_stage`` 1 or 2 and several data-parallel
replicas, the AdamW state (ZeRO-1) and also the reduced gradients (ZeRO-2) of that share are
partitioned over the data-parallel group by DeepSpeed's ``DeepSpeedZeroOptimizer``, with
Megatron's process groups as DeepSpeed's ``mpu``.

How a step runs (:meth:`DeepSpeedZero.accumulate`, :meth:`DeepSpeedZero.step`):

* The backward passes of the step (one per micro-batch without PP; under PP the ring's many
  partial backward passes, one per phantom step and stage) run inside DeepSpeed's
  ``coalesce_grad_reduction``: gradients accumulate on the parameters, and on leaving the block
  DeepSpeed reduces them once, bucket by bucket (``reduce_bucket_size``), each rank keeping only
  its partition. DeepSpeed's per-hook ZeRO-2 reduction cannot take the ring: it refuses a
  parameter whose gradient is accumulated twice in one step.
* ``engine.step()`` takes the global gradient norm (partitions summed over the data-parallel
  group, then over the TP x PP group, see below), skips the update on every rank when it is not
  finite, clips to ``train.clip_grad`` and runs AdamW on the fp32 partitions, then all-gathers
  the updated weights.

The norm counts every parameter once: DeepSpeed counts a parameter marked
``tensor_model_parallel`` on every TP rank and any other on TP rank 0 only, and skips one marked
``ds_pipe_replicated`` (the last stage's copy of a tied embedding).

Checkpoints stay layout-free: :meth:`DeepSpeedZero.state_by_name` assembles each parameter's
moments from the partitions (DeepSpeed's ``safe_get_full_optimizer_state``) and
:meth:`DeepSpeedZero.load_by_name` writes them back into whatever partitioning this run has.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ilm_megatron.config import Config
from ilm_megatron.core.tensor_parallel import get_tp_layout
from ilm_megatron.train.optim import param_groups

MOMENTS = ("exp_avg", "exp_avg_sq")


def zero_config(cfg: Config, per_rank_batch: int, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed config of :class:`DeepSpeedZero`.

    One accumulation step per optimizer step (the engine accumulates micro-batches itself and
    scales their losses), fp32 weights and reduction (bf16 is the forward's autocast), clipping
    by DeepSpeed's model-parallel-aware norm.
    """
    par = cfg.parallel
    # fp32 elements per bucket, a multiple of 64 (DeepSpeed wants its alignment factor to divide it)
    bucket = max(64, int(par.bucket_mb * 2**20 // 4) // 64 * 64)
    return {
        "train_batch_size": per_rank_batch * dp_size,
        "train_micro_batch_size_per_gpu": per_rank_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": par.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "contiguous_gradients": True,
            "overlap_comm": False,
            # each bucket slice is reduced to the rank that owns it (a reduce-scatter), not
            # all-reduced to everyone: (n-1)/n + 1 of the gradient bytes on the wire, not
            # 2(n-1)/n + 1 with the all-gather (docs/benchmarks/grad_sync_cpu.md)
            "use_multi_rank_bucket_allreduce": False,
        },
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": float(cfg.train.clip_grad or 0.0),
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedZero:
    """DeepSpeed ZeRO-1/2 over the data-parallel group for ``module``'s parameters ``named``.

    Args:
        module: what this rank trains (a pipeline stage or the whole TP-sharded model), already
            on its device with its initial (or resumed) weights.
        named: ``(name, parameter)`` of ``module``'s trained parameters, named as in the
            single-process model (the names of the checkpoint and of the weight-decay groups).
        cfg: the run's config (``train`` lr, betas, weight decay, clipping; ``parallel``).
        per_rank_batch: samples per data-parallel rank per step (DeepSpeed's bookkeeping).
        pipe_replicas: parameters another pipeline stage also holds and trains identically (the
            last stage's tied embedding): left out of the norm here.
    """

    def __init__(
        self,
        module: nn.Module,
        named: Sequence[tuple[str, nn.Parameter]],
        cfg: Config,
        per_rank_batch: int,
        pipe_replicas: Sequence[nn.Parameter] = (),
    ) -> None:
        import deepspeed

        from ilm_megatron.train.distributed import MegatronMPU

        self.named = list(named)
        for _, p in self.named:
            p.tensor_model_parallel = get_tp_layout(p) is not None
        for p in pipe_replicas:
            p.ds_pipe_replicated = True
        t = cfg.train
        opt = torch.optim.AdamW(param_groups(self.named, cfg), lr=t.lr, betas=(t.beta1, t.beta2))
        mpu = MegatronMPU()
        self.engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=opt,
            config=zero_config(cfg, per_rank_batch, mpu.get_data_parallel_world_size()),
            mpu=mpu,
        )
        self.zero = self.engine.optimizer  # DeepSpeedZeroOptimizer

    @property
    def param_groups(self) -> list[dict]:
        return self.zero.param_groups

    def accumulate(self) -> contextlib.AbstractContextManager:
        """The context the step's backward passes run in; on exit the gradients are reduced over
        the data-parallel group once (bucketed), each rank keeping its partition. Collective."""
        return self.engine.coalesce_grad_reduction()

    def step(self) -> tuple[float, bool]:
        """Clip, update and all-gather the weights (collective); returns ``(global gradient norm,
        applied)``: a non-finite norm skips the update on every rank and reads as NaN."""
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        gnorm = float(norm) if norm is not None else float("nan")
        return (gnorm if applied and math.isfinite(gnorm) else float("nan")), applied

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self.named:
            p.grad = None

    def _inner_states(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(group index, this rank's flat fp32 partition)`` of every parameter group."""
        yield from enumerate(self.zero.single_partition_of_fp32_groups)

    def _link(self) -> None:
        """Point every parameter's fragment at its group's AdamW state. DeepSpeed links them once,
        right after stepping the first group, so with several groups (decayed and not) the later
        groups' fragments would stay empty."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for i, flat in self._inner_states():
            lazy_init_hp_params_optimizer_state(
                self.zero.bit16_groups[i], flat, self.zero.optimizer.state
            )

    def state_by_name(self) -> dict[str, dict]:
        """AdamW state by parameter name, each tensor whole (this rank's TP shard of it), like
        :func:`~ilm_megatron.train.optim.adamw_state_by_name`; empty before the first update.
        Collective over the data-parallel group (every partition contributes its fragment)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        out: dict[str, dict] = {"exp_avg": {}, "exp_avg_sq": {}, "step": {}}
        state = self.zero.optimizer.state
        flats = [flat for _, flat in self._inner_states()]
        if not all(flat in state for flat in flats):
            return out
        steps = [float(state[flat]["step"]) for flat in flats]
        self._link()
        group_of = {id(p): i for i, g in enumerate(self.zero.bit16_groups) for p in g}
        for name, p in self.named:
            for key in MOMENTS:
                out[key][name] = safe_get_full_optimizer_state(p, key).detach().cpu()
            out["step"][name] = steps[group_of[id(p)]]
        return out

    def load_by_name(self, local: dict[str, tuple[nn.Parameter, dict[str, torch.Tensor]]]) -> None:
        """Write the moments of :func:`~ilm_megatron.train.optim.local_adamw_state`'s output into
        this rank's partitions (before the first step of a resumed run)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if len(local) != len(self.named):
            missing = sorted({n for n, _ in self.named} - set(local))
            raise ValueError(f"optimizer state has no moments for {missing}")
        state = self.zero.optimizer.state
        first = {i: g[0] for i, g in enumerate(self.zero.bit16_groups) if g}
        names = {id(p): n for n, p in self.named}
        for i, flat in self._inner_states():
            step = local[names[id(first[i])]][1]["step"]
            state[flat] = {
                "step": torch.as_tensor(step, dtype=torch.float32).clone(),
                **{key: torch.zeros_like(flat) for key in MOMENTS},
            }
        self._link()
        for name, p in self.named:
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, local[name][1][key].to(p.device), key)
