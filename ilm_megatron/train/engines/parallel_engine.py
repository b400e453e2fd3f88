"""Tensor x pipeline x data parallelism over Megatron-Core's process groups."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilm_megatron.config import Config, SolverConfig
from ilm_megatron.implicit.solver import SolverStats
from ilm_megatron.models.init import stage_units
from ilm_megatron.models.lm import ImplicitLM, build_model
from ilm_megatron.parallel.checkpoint import load_full_state_dict, stage_state_names
from ilm_megatron.train.carry import CarriedState
from ilm_megatron.train.checkpoint import (
    CheckpointError,
    check_architecture,
    load_state,
    save_state_dict,
    weights_file,
)
from ilm_megatron.train.data import global_stream
from ilm_megatron.train.engines.base import (
    EvalShare,
    StepOutput,
    _DistributedBase,
    _refuse_deepspeed_checkpoint,
    _state_of_dp_rank,
    merge_stats,
    save_distributed_checkpoint,
)
from ilm_megatron.train.losses import token_accuracy_tensor, token_loss
from ilm_megatron.train.optim import (
    OPTIMIZER_FILE,
    adamw_state_by_name,
    adamw_state_from_single_process,
    load_adamw_state_by_name,
    local_adamw_state,
    new_optimizer,
)


class ParallelEngine(_DistributedBase):
    """Tensor x pipeline x data parallelism on Megatron-Core's process groups.

    Every rank builds only its share: the units of its pipeline stage, its tensor-parallel shard
    of each, initialised by unit name from ``train.seed`` directly on its device (so a run starts
    from the single-process weights whatever the layout); the other stages' units stay on
    ``meta``. Checkpoints are
    layout-free (``model.safetensors`` and ``optimizer.pt``: the whole model and its AdamW state,
    written by rank 0), plus each rank's data position; a run resumes at any layout.

    Gradients are averaged over the data-parallel group in buckets of ``parallel.bucket_mb``
    (:func:`~ilm_megatron.parallel.grad_sync.all_reduce_bucketed`), or, with
    ``parallel.zero_stage`` 1 or 2, reduced and partitioned by DeepSpeed's ZeRO optimizer
    (:class:`~ilm_megatron.train.engines.zero.DeepSpeedZero`), which then owns the norm, the
    clipping and the update.
    """

    carries_state_in_checkpoint = False  # one trainer state per DP rank; caches are TP shards

    def __init__(self, cfg: Config) -> None:
        from megatron.core import parallel_state as ps

        from ilm_megatron.core.parallel_state import pp_global_ranks

        super().__init__(cfg)
        self.ps = ps
        par = cfg.parallel
        self.tp, self.pp = par.tp, par.pp
        self.sharded_logits = self.tp > 1
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.name = f"TP={self.tp}, PP={self.pp}, DP={self.dp_size}" + (
            f", ZeRO-{par.zero_stage}" if par.zero_stage else ""
        )
        self.local_cfg = dataclasses.replace(cfg.model, backend="local")
        self.save_cfg = dataclasses.replace(cfg, model=self.local_cfg)  # files are layout-free
        # only this rank's share is built: its stage's units, its TP shard of each, initialised
        # by unit name (the same weights as one process from train.seed), on the device; the
        # other stages' units stay on meta (ilm_megatron.models.init)
        m = cfg.model
        keep = (
            stage_units(m.n_layers, m.implicit, m.tie_embeddings, self.pp_rank, self.pp)
            if self.pp > 1
            else None
        )
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, cfg.solver, keep=keep, device=self.device)
        self._n_params = sum(p.numel() for p in self.flops_model().parameters())
        self.model.train()
        self.stage = None
        if self.pp > 1:
            from ilm_megatron.parallel.pipeline import split_model_into_stages

            self.stage = split_model_into_stages(self.model, self.pp_rank, self.pp)
            params: list[nn.Parameter] = list(self.stage.parameters())
            self.pp_ranks = pp_global_ranks()
            # the ring's messages: Megatron's pipeline group on the main backend (NCCL or gloo)
            self.ring_group = ps.get_pipeline_model_parallel_group()
        else:
            params = list(self.model.parameters())
        self.owned_names = (
            stage_state_names(self.model, self.stage)
            if self.stage is not None
            else list(self.model.state_dict())
        )
        if cfg.train.init_checkpoint:  # fine-tuning start: only this stage's tensors are read
            f = weights_file(cfg.train.init_checkpoint)
            try:
                check_architecture(f, self.local_cfg)
                load_full_state_dict(self.model, load_state(f, self.owned_names), self.owned_names)
            except (ValueError, KeyError, RuntimeError, OSError) as e:
                msg = f"train.init_checkpoint={cfg.train.init_checkpoint}: {e}"
                raise CheckpointError(msg) from None
        self.params = params
        owned = {id(p) for p in params}
        self.named = [(n, p) for n, p in self.model.named_parameters() if id(p) in owned]
        # ZeRO-1/2 (parallel.zero_stage): DeepSpeed's ZeRO optimizer partitions the AdamW state
        # (and the reduced gradients) over the data-parallel group; it is built in setup(),
        # once the weights are final (its fp32 partitions are copies of them)
        self.zero = cfg.parallel.zero_stage in (1, 2) and self.dp_size > 1
        self.opt: Any = None if self.zero else new_optimizer(self.named, cfg)
        self.is_last_stage = self.pp_rank == self.pp - 1
        # parameters whose gradient enters the global norm on this rank: every TP shard, a
        # replicated parameter on TP rank 0 only, the tied embedding on the first stage only
        from ilm_megatron.core.tensor_parallel import get_tp_layout

        first_ids = set()
        if self.stage is not None and self.stage.tied and self.is_last_stage:
            first_ids = {id(self.model.embedding.weight)}
        self.norm_params = [
            p
            for p in params
            if (get_tp_layout(p) is not None or self.tp_rank == 0) and id(p) not in first_ids
        ]
        self._eval: ImplicitLM | None = None

    def describe(self) -> str:
        mb = self.cfg.parallel.microbatches
        return f"{self.world_size} x {self.device} ({self.name}, {mb} microbatch(es))"

    # ----------------------------------------------------------------- step
    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        solver: SolverConfig,
        stop: bool,
        hook: Callable,
        carry: CarriedState | None = None,
    ) -> StepOutput:
        mb = self.cfg.parallel.microbatches
        self.opt.zero_grad(set_to_none=True)
        xs, ys = list(x.chunk(mb)), list(y.chunk(mb))
        losses: list[float] = []
        accs: list[float] = []
        stats: list[SolverStats] = []
        reports = self.is_last_stage and self.tp_rank == 0  # one reporter per DP replica
        with self.opt.accumulate() if self.zero else contextlib.nullcontext():
            stats = self._forward_backward(xs, ys, solver, hook, losses, accs, stats, carry)
        if self.zero:
            gnorm, applied = self.opt.step()
        else:
            self._reduce_data_parallel()
            gnorm = self._global_grad_norm()
            applied = math.isfinite(gnorm)
            if applied:
                clip = self.cfg.train.clip_grad
                if clip and gnorm > clip:
                    scale = clip / (gnorm + 1e-6)
                    for p in self.params:
                        if p.grad is not None:
                            p.grad.mul_(scale)
                self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        # loss, accuracy and the stop flag summed over every rank (reporters only for the first two)
        n_rep = len(losses) if reports else 0
        lsum, asum, count, stops = self.all_reduce_sum(
            [sum(losses) if reports else 0.0, sum(accs) if reports else 0.0, n_rep, float(stop)]
        )
        merged = self._share_stats(merge_stats(stats) if reports and stats else None, x.shape[0])
        return StepOutput(
            lsum / count if applied else float("nan"),
            asum / count,
            gnorm if applied else float("nan"),
            applied,
            merged,
            stops > 0,
        )

    def _forward_backward(
        self,
        xs: list[torch.Tensor],
        ys: list[torch.Tensor],
        solver: SolverConfig,
        hook: Callable,
        losses: list[float],
        accs: list[float],
        stats: list[SolverStats],
        carry: CarriedState | None = None,
    ) -> list[SolverStats]:
        """Forward and backward of the step's micro-batches ``xs``/``ys`` (each (b, l)): the
        gradients accumulate on the parameters; returns the solver statistics. ``carry``: the
        rows' state across windows (TP-local cache shards; not under PP, refused at load)."""
        mb = self.cfg.parallel.microbatches
        if self.stage is None:
            for j, (xc, yc) in enumerate(zip(xs, ys)):
                loss = self._microbatch_loss(xc, yc, hook, losses, accs, stats, solver, carry, j)
                (loss / mb if mb > 1 else loss).backward()  # a NaN shows in the global norm
        else:
            if carry is not None:
                raise ValueError("data.carry_state is not supported with parallel.pp > 1")
            from ilm_megatron.parallel.pipeline import pipeline_forward_backward

            sharded = self.sharded_logits
            par = self.cfg.parallel
            kept: list[tuple[torch.Tensor, torch.Tensor]] = []

            def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
                loss = hook(token_loss(logits, targets, self.vocab, sharded))
                acc = token_accuracy_tensor(logits.detach(), targets, self.vocab, sharded)
                kept.append((loss.detach(), acc))  # read after the ring: no sync per micro-batch
                return loss

            calls = par.ring_calls
            per_call = mb // calls
            stats = []
            for c in range(calls):  # the gradients accumulate over the ring calls
                part = slice(c * per_call, (c + 1) * per_call)
                _, pstats = pipeline_forward_backward(
                    self.stage,
                    xs[part] if self.pp_rank == 0 else None,
                    ys[part] if self.is_last_stage else None,
                    solver,
                    n_microbatches=per_call,
                    in_flight=par.in_flight or per_call,
                    pp_ranks=self.pp_ranks,
                    loss_fn=loss_fn,
                    loss_scale=1.0 / mb,
                    autocast=self.autocast,  # forward compute only, never the backward
                    group=self.ring_group,
                    gather_logits=not sharded,
                    wire_dtype=torch.bfloat16 if par.p2p_dtype == "bf16" else None,
                    sum_tied_embedding=c == calls - 1,  # once, over every call's gradients
                )
                stats.extend(pstats.solver)
            if kept:
                values = torch.stack([torch.stack([a.double(), b]) for a, b in kept]).tolist()
                losses.extend(v[0] for v in values)
                accs.extend(v[1] for v in values)
        if self.model.sequence_parallel:  # the norms' gradients cover this rank's positions
            from ilm_megatron.core.tensor_parallel import reduce_sequence_parallel_grads

            reduce_sequence_parallel_grads(self.params)
        return stats

    def _reduce_data_parallel(self) -> None:
        """Average the gradients over the data-parallel group, in ``parallel.bucket_mb`` buckets."""
        if self.dp_size == 1:
            return
        from ilm_megatron.parallel.grad_sync import all_reduce_bucketed

        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        bucket = int(self.cfg.parallel.bucket_mb * 2**20)
        all_reduce_bucketed(grads, self.ps.get_data_parallel_group(), bucket)

    def _global_grad_norm(self) -> float:
        """L2 norm of the whole model's gradient (collective over the model-parallel group)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.norm_params:
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum()
        if self.tp * self.pp > 1:
            torch.distributed.all_reduce(sq, group=self.ps.get_model_parallel_group())
        return float(sq.sqrt())

    def _share_stats(self, mine: SolverStats | None, batch: int) -> SolverStats:
        """The solver statistics of the first replica's reporting rank, on every rank.

        ``mine``: that rank's merged stats (None elsewhere); ``batch``: samples per DP rank.
        """
        source = mine is not None and self.dp_rank == 0
        vec = torch.zeros(1 + 2 * batch, dtype=torch.float64)
        if source:
            vec[0] = mine.iters
            vec[1 : 1 + batch] = mine.residual.double().cpu()
            vec[1 + batch :] = mine.sample_iters.double().cpu()
        vec = torch.tensor(self.all_reduce_sum(vec.tolist()), dtype=torch.float64)
        return SolverStats(
            int(vec[0]),
            vec[1 : 1 + batch].float(),
            vec[1 + batch :].long(),
            self.model.solver_config.f_tol,
        )

    # ----------------------------------------------------------------- weights
    def n_params(self) -> int:
        return self._n_params

    def flops_model(self) -> nn.Module:
        with torch.device("meta"):
            return build_model(self.local_cfg, self.cfg.solver)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The single-process state dict on rank 0 (None elsewhere). Collective.

        Within a stage the TP shards are gathered, then the stages' parts are collected over the
        pipeline group (:func:`~ilm_megatron.parallel.checkpoint.pipeline_full_state_dict`),
        by the first data-parallel replica only (its groups; the other replicas hold the same
        weights and assemble nothing).
        """
        from ilm_megatron.parallel.checkpoint import pipeline_full_state_dict

        if self.dp_rank != 0:
            return None
        sd = pipeline_full_state_dict(self.model, self.stage)
        return sd if self.is_rank0 else None

    def eval_share(self) -> EvalShare:
        """Every rank evaluates with the model it trains, so no rank holds the whole model: each
        DP replica takes its slice of every batch, its TP ranks run it together on their shards
        (only TP rank 0's sums count), and under PP the slice's micro-batches go around the ring
        with the evaluation solve (:meth:`_ring_eval`; the last stage's sums count). Only
        ``solver.eval_solver=reference`` under PP, which the ring does not run, gathers the
        weights onto rank 0, which evaluates alone. Collective."""
        mb = self.eval_micro_batch()
        if self.pp == 1:
            return EvalShare(self.model, self.dp_rank, self.dp_size, self.tp_rank == 0, mb)
        if self.cfg.solver.eval_solver == "train":  # the ring runs the training-rule solve
            reports = self.is_last_stage and self.tp_rank == 0
            return EvalShare(None, self.dp_rank, self.dp_size, reports, mb, self._ring_eval)
        sd = self.full_state_dict()
        if not self.is_rank0:
            return EvalShare(None, 0, 1, False, mb)
        if self._eval is None:
            self._eval = build_model(self.local_cfg, self.model.solver_config).to(self.device)
        self._eval.load_state_dict(sd)
        self._eval.train(self.model.training)
        return EvalShare(self._eval, 0, 1, True, mb)

    def _ring_eval(
        self,
        xs: list[torch.Tensor],
        ys: list[torch.Tensor],
        max_iter: int | None,
        on_logits: Callable,
        on_stats: Callable,
    ) -> None:
        """Evaluation solve of micro-batches ``xs``/``ys`` (b, l) around the pipeline ring (the
        eval cap ``max_iter`` or ``ceil(eval_max_iter_mult * f_max_iter)``, the eval tolerance);
        the last stage reports each micro-batch's logits and solver statistics."""
        from ilm_megatron.parallel.pipeline import pipeline_forward_backward

        s = self.cfg.solver
        cap = max_iter if max_iter is not None else math.ceil(s.eval_max_iter_mult * s.f_max_iter)
        solver = dataclasses.replace(s, f_max_iter=cap, f_tol=s.eval_tol or s.f_tol)

        def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            on_logits(logits, targets)
            return logits.new_zeros(())

        _, pstats = pipeline_forward_backward(
            self.stage,
            xs if self.pp_rank == 0 else None,
            ys if self.is_last_stage else None,
            solver,
            n_microbatches=len(xs),
            in_flight=len(xs),
            pp_ranks=self.pp_ranks,
            loss_fn=loss_fn,
            group=self.ring_group,
            evaluate=True,
        )
        for st in pstats.solver:
            on_stats(st)

    def export(self, path: Path) -> None:
        sd = self.full_state_dict()
        if self.is_rank0:
            save_state_dict(sd, self.save_cfg, path)
        self.barrier()

    # ----------------------------------------------------------------- checkpoints
    def _layout(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp_size, "world_size": self.world_size}

    def save(self, ckpt_root: Path, state: dict) -> Path:
        """Every rank writes its own shards (``sharded/``, Megatron ``dist_checkpointing``:
        weights, AdamW state, its data position; replicated tensors spread over the
        data-parallel ranks) and rank 0 adds ``trainer.pt`` (layout, counters). Nothing is
        gathered; see :mod:`ilm_megatron.train.sharded`. Collective."""
        from ilm_megatron.train.sharded import FORMAT, SHARDED_DIR, save_training_shards

        state = {**state, "layout": self._layout()}
        if self.zero:  # collective over the data-parallel group
            adamw = self.opt.state_by_name()
        else:
            adamw = adamw_state_by_name(self.opt, self.named)
        own = {**state, "dp_rank": self.dp_rank}

        def write_all(tmp: Path) -> list[Path]:
            dp_group = self.ps.get_data_parallel_group() if self.dp_size > 1 else None
            return save_training_shards(
                tmp / SHARDED_DIR,
                self.model,
                self.stage,
                self.named,
                adamw,
                own,
                self.dp_rank,
                self.dp_size,
                dp_group,
            )

        def write_rank0(tmp: Path) -> None:
            if self.is_rank0:
                torch.save({**state, "dp_rank": 0, "format": FORMAT}, tmp / "trainer.pt")

        step = state["counters"]["step"]
        return save_distributed_checkpoint(
            self, ckpt_root, step, self.cfg.train.keep_last, write_all, write_rank0
        )

    def setup(self, data: Any, latest: Path | None) -> dict | None:
        """Resume at this or any other TP/PP/DP layout, or from a single-process checkpoint.

        A sharded checkpoint (``sharded/``) is read piece by piece: each rank loads only its
        stage's TP shards of the weights and AdamW moments. An older or single-process one
        (whole ``model.safetensors``) is re-sharded here, each rank reading its stage's tensors.
        The data position: at the same data-parallel size each rank takes the state saved by its
        DP rank (exact resume); at another size only the word problem and CatbAbI (one global
        batch stream each rank slices) can continue.
        """
        from ilm_megatron.train.sharded import SHARDED_DIR, is_sharded, load_training_shards

        if latest is None:
            self._build_zero()
            return None
        _refuse_deepspeed_checkpoint(latest)
        shared = torch.load(latest / "trainer.pt", weights_only=True)
        saved = shared.get("layout") or {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}
        was = f"TP={saved['tp']}, PP={saved['pp']}, DP={saved['dp']}"
        same_dp = saved["dp"] == self.dp_size
        if not same_dp and not global_stream(self.cfg.data.task):
            raise ValueError(
                f"{latest} was written by {was}, now {self.name}: the {self.cfg.data.task} data "
                f"position is per data-parallel rank, so resume with DP={saved['dp']} "
                "(tensor and pipeline sizes may change; docs/training.md says why)"
            )
        if is_sharded(latest):
            ranks = [self.dp_rank if same_dp else 0]
            full, states = load_training_shards(
                latest / SHARDED_DIR, self.model, self.stage, self.named, ranks, saved["dp"]
            )
            state = states[0]
            tp_rank, tp_size = 0, 1  # the moments were read as this rank's shards
            fresh = True  # into buffers of their own: no copy
        else:
            state = _state_of_dp_rank(latest, self.dp_rank, shared) if same_dp else shared
            weights = latest / "model.safetensors"
            check_architecture(weights, self.cfg.model)
            names = self.owned_names  # only this stage's tensors are read
            load_full_state_dict(self.model, load_state(weights, names), names)
            if (latest / OPTIMIZER_FILE).is_file():
                full = torch.load(latest / OPTIMIZER_FILE, weights_only=True, mmap=True)
            else:  # a single-process checkpoint: AdamW state by parameter index
                full = adamw_state_from_single_process(self.model, shared["optimizer"])
            tp_rank, tp_size = self.tp_rank, self.tp
            fresh = False
        self._build_zero()  # after the weights: its fp32 partitions are copies of them
        if self.zero:
            self.opt.load_by_name(local_adamw_state(self.named, full, tp_rank, tp_size))
        else:
            load_adamw_state_by_name(self.opt, self.named, full, tp_rank, tp_size, not fresh)
        if saved != self._layout():
            state = {**state, "resumed_from": f" (written by {was})"}
        return state

    def _build_zero(self) -> None:
        """DeepSpeed's ZeRO optimizer over this rank's parameters (``parallel.zero_stage`` 1/2
        with several data-parallel replicas); collective over the data-parallel group."""
        if not self.zero or self.opt is not None:
            return
        from ilm_megatron.train.engines.zero import DeepSpeedZero

        module = self.stage if self.stage is not None else self.model
        replicas = []
        if self.stage is not None and self.stage.tied and self.is_last_stage:
            replicas = [self.model.embedding.weight]  # stage 0 counts it in the norm
        per_rank = self.cfg.train.batch_size // self.dp_size
        self.opt = DeepSpeedZero(module, self.named, self.cfg, per_rank, replicas)
