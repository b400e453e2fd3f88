"""The engine interface the training loop drives (:class:`Engine`), its per-step record
(:class:`StepOutput`) and validation share (:class:`EvalShare`), and what the distributed
engines share: the base class of the multi-process engines and the checkpoint helpers.
See :mod:`ilm_megatron.train.engines` for the engines and their layouts."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilm_megatron.config import Config, SolverConfig
from ilm_megatron.implicit.solver import SolverStats
from ilm_megatron.models.lm import ImplicitLM
from ilm_megatron.train.carry import CarriedState
from ilm_megatron.train.checkpoint import (
    _step_dir,
    _write_text_atomic,
    already_saved,
    fault_point,
    file_entries,
    prune,
    write_manifest,
)
from ilm_megatron.train.device import use_bf16
from ilm_megatron.train.losses import token_accuracy, token_loss


def merge_stats(stats: Sequence[SolverStats]) -> SolverStats:
    """One :class:`SolverStats` for several micro-batches: samples concatenated, max iterations."""
    if len(stats) == 1:
        return stats[0]
    return SolverStats(
        max(s.iters for s in stats),
        torch.cat([s.residual.detach().cpu() for s in stats]),
        torch.cat([s.sample_iters.detach().cpu() for s in stats]),
        stats[0].tol,
        stats[0].solver,
        stats[0].method,
        None
        if any(s.restarts is None for s in stats)
        else torch.cat([s.restarts.detach().cpu() for s in stats]),
        sum(s.evaluated_rows for s in stats),
    )


@dataclass(frozen=True)
class EvalShare:
    """How one rank takes part in a validation pass (see :meth:`Engine.eval_share`).

    Attributes:
        model: the model this rank evaluates with (a whole replica, or its tensor-parallel shard
            run together with the other ranks of its TP group); None: it only joins the
            reductions.
        part, parts: this rank takes slice ``part`` of ``parts`` equal slices of every batch
            (its data-parallel replica's share).
        reports: whether its sums count (one rank per replica: TP ranks compute the same).
        micro_batch: sequences per forward (``train.eval_micro_batch``, or the per-rank training
            micro-batch).
    """

    model: ImplicitLM | None
    part: int
    parts: int
    reports: bool
    micro_batch: int
    # pipeline parallel: ``forward(xs, ys, max_iter, on_logits, on_stats)`` runs this slice's
    # micro-batches through the ring; the last stage calls ``on_logits(logits, y)`` and
    # ``on_stats(stats)`` per micro-batch
    forward: Callable | None = None


@dataclass
class StepOutput:
    """One optimizer step as seen by the loop (the same on every rank).

    Attributes:
        loss: mean training loss over the global batch (NaN when a loss was non-finite).
        acc: mean token accuracy over the global batch.
        grad_norm: global gradient norm before clipping (NaN when the step was skipped).
        applied: False when the update was skipped (non-finite loss or gradient).
        stats: solver statistics of the step (first data-parallel replica, all micro-batches).
        stop: a SIGTERM/SIGINT was seen on some rank.
    """

    loss: float
    acc: float
    grad_norm: float
    applied: bool
    stats: SolverStats
    stop: bool = False


class Engine:
    """The interface the training loop drives. Collective methods must run on every rank."""

    name = "engine"
    rank, world_size, dp_rank, dp_size = 0, 1, 0, 1
    distributed = False
    # whether the trainer state saved per rank can hold the carried caches (data.carry_state);
    # the sharded TP x PP x DP checkpoint keeps one trainer state per data-parallel rank, while
    # the caches are TP-local shards, so there the state starts empty at a resume
    carries_state_in_checkpoint = True

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.vocab = cfg.model.vocab_size
        # training logits stay split over the TP ranks' vocabulary columns (vocab-parallel loss)
        self.sharded_logits = False
        self.bf16 = use_bf16(cfg, device)

    def _microbatch_loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        hook: Callable,
        losses: list[float],
        accs: list[float],
        stats: list[SolverStats],
        solver: SolverConfig,
        carry: CarriedState | None = None,
        j: int = 0,
    ) -> torch.Tensor:
        """Forward of one micro-batch x, y (b, l) under autocast with the step's ``solver``
        settings -> its loss (scalar, with autograd); appends the loss, the accuracy and the
        solver statistics to the lists. With ``carry`` the window starts from micro-batch
        ``j``'s carried state and leaves its state after the window there."""
        sharded = self.sharded_logits
        with self.autocast():
            out = self.model(  # type: ignore
                x,
                solver=solver,
                gather_logits=not sharded,
                caches=None if carry is None else carry.get(j),
                return_caches=carry is not None,
            )
            loss = hook(token_loss(out.logits, y, self.vocab, sharded))
        if carry is not None:
            carry.put(j, out.caches)
        losses.append(loss.item())
        accs.append(token_accuracy(out.logits, y, self.vocab, sharded))
        stats.append(out.stats)
        return loss

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around a step's forward (fp32 weights, gradients and optimizer)."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """Layout for the start-up line, e.g. ``"4 x cpu (TP=2, PP=2, DP=1)"``."""
        return f"{self.device}"

    def setup(self, data: Any, latest: Path | None) -> dict | None:
        """Finish building (optimizer wrappers) and load ``latest`` when given.

        Returns the trainer state (rng, data, counters) of the checkpoint, or None.
        """
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        """Learning rate of every parameter group for the next step."""
        for group in self.opt.param_groups:  # type: ignore[attr-defined]
            group["lr"] = lr

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        solver: SolverConfig,
        stop: bool,
        hook: Callable,
        carry: CarriedState | None = None,
    ) -> StepOutput:
        """One optimizer step on this rank's share ``x, y`` (b, l) of the global batch.

        ``solver``: the training solve's settings for this step (the curriculum phase's, see
        :func:`~ilm_megatron.train.curriculum.phase_at`); evaluation keeps the model's own.
        ``hook(loss)`` may replace the loss (fault injection in tests). ``carry``: the state of
        this rank's rows after the previous window (``data.carry_state``), updated in place.
        """
        raise NotImplementedError

    @property
    def module(self) -> ImplicitLM:
        """The model this rank trains (whole for one process and DeepSpeed, sharded for TP/PP)."""
        return self.model  # type: ignore[attr-defined]

    def n_params(self) -> int:
        """Parameters of the whole (unsharded) model."""
        return sum(p.numel() for p in self.module.parameters())

    def flops_model(self) -> nn.Module:
        """A module with the whole model's parameter shapes (for the FLOP count)."""
        return self.module

    def eval_micro_batch(self) -> int:
        """Sequences per evaluation forward: ``train.eval_micro_batch`` or, when 0, the training
        micro-batch of one rank (``batch_size / (dp * microbatches)``)."""
        t = self.cfg.train
        return t.eval_micro_batch or max(
            1, t.batch_size // (self.dp_size * self.cfg.parallel.microbatches)
        )

    def eval_share(self) -> EvalShare:
        """This rank's part of a validation pass: each data-parallel replica evaluates its slice
        of every batch with the model it trains (a whole replica, or its TP shard), micro-batched,
        and the sums are all-reduced. Collective."""
        return EvalShare(self.module, self.dp_rank, self.dp_size, True, self.eval_micro_batch())

    def all_reduce_max(self, values: list[float]) -> list[float]:
        return values

    def save(self, ckpt_root: Path, state: dict) -> Path:
        """Write a training checkpoint of step ``state["counters"]["step"]``. Collective."""
        raise NotImplementedError

    def export(self, path: Path) -> None:
        """Write the whole model's weights (safetensors) from rank 0. Collective."""
        raise NotImplementedError

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def barrier(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------


def save_distributed_checkpoint(
    engine: Engine,
    ckpt_root: Path,
    step: int,
    keep_last: int,
    write_all: Callable[[Path], list[Path] | None],
    write_rank0: Callable[[Path], None],
) -> Path:
    """The atomic checkpoint scheme of one process, for many ranks.

    Every rank writes its files into ``checkpoints/.step-N.tmp`` (``write_all(tmp)``, which may
    return the files it wrote: the rank then hashes them for the manifest, so the hashing is
    spread over the ranks), rank 0 adds the shared ones (``write_rank0(tmp)``). After a barrier
    rank 0 renames the folder to ``step-N``, rewrites ``latest`` and prunes beyond
    ``keep_last``; a final barrier keeps the ranks together. A job killed at any moment leaves
    ``latest`` on a complete checkpoint. A step already saved and named by ``latest`` is not
    written again.
    """
    final = _step_dir(ckpt_root, step)
    done = already_saved(ckpt_root, final)
    if engine.all_reduce_sum([float(done)])[0] == engine.world_size:
        return final  # this step is saved and ``latest`` names it (see ``already_saved``)
    tmp = ckpt_root / f".{final.name}.tmp"
    if engine.is_rank0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    engine.barrier()
    written = write_all(tmp)
    write_rank0(tmp)
    known = None
    if written is not None:  # each rank hashes the files it wrote, in parallel
        import torch.distributed as dist

        parts: list[Any] = [None] * engine.world_size
        dist.all_gather_object(parts, file_entries(tmp, written))
        known = {k: v for part in parts for k, v in part.items()}
    engine.barrier()
    if engine.is_rank0:
        fault_point("save_before_manifest")
        write_manifest(tmp, engine.cfg, known)  # every rank's files are in: sizes, hashes, last
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fault_point("save_before_latest")
        _write_text_atomic(ckpt_root / "latest", final.name + "\n")
        prune(ckpt_root, keep_last, final)
    engine.barrier()
    return final


def _refuse_deepspeed_checkpoint(latest: Path) -> None:
    """A DeepSpeed (ZeRO) checkpoint resumes only on the DeepSpeed engine."""
    if (latest / "mp_rank_00_model_states.pt").is_file():
        raise ValueError(
            f"{latest} was written by the DeepSpeed trainer (ZeRO): resume it with "
            "parallel.tp=1 parallel.pp=1 and the same parallel.zero_stage"
        )


def _saved_ranks(latest: Path) -> int:
    """How many ranks wrote the multi-process checkpoint ``latest`` (its ``trainer-rank*.pt``)."""
    return len(list(latest.glob("trainer-rank*.pt")))


class _DistributedBase(Engine):
    """Process-group plumbing shared by the DeepSpeed and the native parallel engines."""

    distributed = True

    def __init__(self, cfg: Config) -> None:
        from ilm_megatron.train import distributed as D

        self.ctx = D.setup(cfg)
        super().__init__(cfg, self.ctx.device)
        self.rank, self.world_size = self.ctx.rank, self.ctx.world_size
        self.dp_rank, self.dp_size = self.ctx.dp_rank, self.ctx.dp_size

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return self.ctx.all_reduce_sum(values)

    def all_reduce_max(self, values: list[float]) -> list[float]:
        return self.ctx.all_reduce_max(values)

    def barrier(self) -> None:
        self.ctx.barrier()


# ---------------------------------------------------------------------------------------------


def _state_of_dp_rank(latest: Path, dp_rank: int, shared: dict) -> dict:
    """The trainer state saved by data-parallel rank ``dp_rank`` (``trainer.pt`` for rank 0)."""
    if dp_rank == 0:
        return shared
    for path in sorted(latest.glob("trainer-rank*.pt")):
        state = torch.load(path, weights_only=True)
        if state.get("dp_rank") == dp_rank:
            return state
    raise ValueError(f"{latest} has no trainer state for data-parallel rank {dp_rank}")
