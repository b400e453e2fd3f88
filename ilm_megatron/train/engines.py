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

import contextlib
import dataclasses
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ilm_megatron.config import Config, SolverConfig
from ilm_megatron.implicit.solver import SolverStats
from ilm_megatron.models.lm import ImplicitLM, build_model
from ilm_megatron.parallel.tensor_parallel import (
    vocab_parallel_argmax,
    vocab_parallel_cross_entropy,
)
from ilm_megatron.train.checkpoint import (
    _step_dir,
    _write_text_atomic,
    already_saved,
    check_architecture,
    fault_point,
    init_from_checkpoint,
    load_model,
    load_state,
    prune,
    save_model,
    save_state_dict,
    save_training_checkpoint,
    write_manifest,
)
from ilm_megatron.train.data import IGNORE


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, vocab: int, sharded: bool = False
) -> torch.Tensor:
    """Cross-entropy over aligned targets (no shift). logits (b, l, V'), targets (b, l).

    ``sharded``: ``logits`` are this TP rank's vocabulary columns (b, l, V' / tp); the loss is
    the vocab-parallel cross-entropy (no rank gathers the whole logits).
    """
    if sharded:
        return vocab_parallel_cross_entropy(logits, targets, vocab, IGNORE)
    return F.cross_entropy(logits[..., :vocab].flatten(0, 1).float(), targets.flatten())


def token_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, vocab: int, sharded: bool = False
) -> float:
    """Argmax accuracy over the targets that count (``-100`` targets are ignored)."""
    keep = targets != IGNORE
    pred = vocab_parallel_argmax(logits, vocab) if sharded else logits[..., :vocab].argmax(-1)
    hits = (pred == targets) & keep
    return hits.sum().item() / max(1, keep.sum().item())


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
    )


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether ``train.weight_decay`` applies to the parameter ``name``.

    Only weight matrices decay (projections, the MLP, the convolution filters and an untied LM
    head), as in Megatron and Mamba: parameters with fewer than two dimensions (biases, norm
    gains, Mamba2's ``A_log``, ``D`` and ``dt_bias``), the embedding and the magnitudes ``g`` of
    weight-normalised layers (``...parametrizations.weight.original0``) do not.
    """
    if param.ndim < 2 or name.startswith("embedding."):
        return False
    return not name.endswith("parametrizations.weight.original0")


def param_groups(named: Sequence[tuple[str, nn.Parameter]], cfg: Config) -> list[dict[str, Any]]:
    """AdamW parameter groups: decayed weights (``train.weight_decay``), then the rest (0).

    Each group carries ``param_names``, so a saved optimizer state maps back to parameter names.
    Empty groups are left out.
    """
    named = list(named)
    groups = []
    for wd, keep in ((cfg.train.weight_decay, True), (0.0, False)):
        chosen = [(n, p) for n, p in named if decays(n, p) == keep]
        if chosen:
            groups.append(
                {
                    "params": [p for _, p in chosen],
                    "param_names": [n for n, _ in chosen],
                    "weight_decay": wd,
                }
            )
    return groups


def new_optimizer(
    named: Sequence[tuple[str, nn.Parameter]] | Any, cfg: Config
) -> torch.optim.Optimizer:
    """AdamW with the ``train`` section's hyper-parameters over ``named`` (name, parameter)
    pairs, in the no-decay groups of :func:`param_groups`."""
    t = cfg.train
    return torch.optim.AdamW(
        param_groups(named, cfg), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay
    )


def use_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether training steps run in bf16 (``train.precision``; ``auto``: on CUDA only)."""
    p = cfg.train.precision
    return p == "bf16" or (p == "auto" and device.type == "cuda")


OPTIMIZER_FILE = "optimizer.pt"  # AdamW state of the whole model by parameter name


def adamw_state_by_name(
    opt: torch.optim.Optimizer, named: Sequence[tuple[str, nn.Parameter]]
) -> dict[str, dict[str, torch.Tensor | float]]:
    """This rank's AdamW moments keyed by parameter name: ``{"exp_avg": {name: t}, ...}``.

    Parameters without state (never updated) are left out; the tensors are the local shards.
    """
    out: dict[str, dict] = {"exp_avg": {}, "exp_avg_sq": {}, "step": {}}
    for name, p in named:
        st = opt.state.get(p)
        if not st:
            continue
        out["exp_avg"][name] = st["exp_avg"]
        out["exp_avg_sq"][name] = st["exp_avg_sq"]
        out["step"][name] = float(st["step"])
    return out


def load_adamw_state_by_name(
    opt: torch.optim.Optimizer,
    named: Sequence[tuple[str, nn.Parameter]],
    full: dict[str, dict],
    tp_rank: int = 0,
    tp_size: int = 1,
) -> None:
    """Set AdamW's state of ``named`` from a whole-model, by-name state (any layout it came from).

    A TP-sharded parameter takes its shard of each moment (the same split as the weights), a
    replicated one the whole tensor. Raises ValueError naming a parameter whose moment has another
    shape than the whole parameter.
    """
    for p, st in local_adamw_state(named, full, tp_rank, tp_size).values():
        opt.state[p] = st


def local_adamw_state(
    named: Sequence[tuple[str, nn.Parameter]],
    full: dict[str, dict],
    tp_rank: int = 0,
    tp_size: int = 1,
) -> dict[str, tuple[nn.Parameter, dict[str, torch.Tensor]]]:
    """``{name: (parameter, AdamW state)}`` of ``named`` cut from a whole-model by-name state."""
    from ilm_megatron.parallel.checkpoint import shard_tensor
    from ilm_megatron.parallel.tensor_parallel import get_tp_layout

    out = {}
    for name, p in named:
        if name not in full["exp_avg"]:
            continue
        lay = get_tp_layout(p)
        st: dict[str, torch.Tensor] = {}
        for key in ("exp_avg", "exp_avg_sq"):
            t = full[key][name]
            if lay is not None and tp_size > 1:
                t = shard_tensor(t, lay[0], lay[1], tp_rank, tp_size)
            if t.shape != p.shape:
                raise ValueError(
                    f"optimizer state {key} of {name} has shape {tuple(t.shape)}, "
                    f"parameter has {tuple(p.shape)}"
                )
            st[key] = t.to(device=p.device, dtype=p.dtype).clone()
        st["step"] = torch.tensor(full["step"][name], dtype=torch.float32)
        out[name] = (p, st)
    return out


class _FlatShard:
    """One group's parameters flattened; this data-parallel rank owns ``[lo, hi)`` of them."""

    def __init__(self, named: Sequence[tuple[str, nn.Parameter]], dp_rank: int, dp_size: int):
        self.named = list(named)
        self.params = [p for _, p in self.named]
        self.total = sum(p.numel() for p in self.params)
        self.chunk = -(-self.total // dp_size)
        self.lo = min(dp_rank * self.chunk, self.total)
        self.hi = min(self.lo + self.chunk, self.total)
        self.master = nn.Parameter(self.flat_params()[self.lo : self.hi].clone())

    def flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out


class ShardedAdamW:
    """ZeRO-1 over the data-parallel group: each DP rank owns the AdamW state of one contiguous
    slice of the flattened parameters of each group (decayed and not, :func:`param_groups`): its
    fp32 master copy and both moments, 1/DP of the optimizer memory. After each step the updated
    slices are all-gathered into the parameters.

    Gradients must already be averaged over the group (they are whole on every DP rank), so the
    update equals plain AdamW's elementwise. Exposes ``param_groups``, ``step`` and ``zero_grad``.
    """

    def __init__(
        self,
        named: Sequence[tuple[str, nn.Parameter]],
        cfg: Config,
        group: Any,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        self.named = list(named)
        self.group, self.dp_size = group, dp_size
        groups = param_groups(self.named, cfg)
        self.shards = [
            _FlatShard(list(zip(g["param_names"], g["params"])), dp_rank, dp_size) for g in groups
        ]
        t = cfg.train
        self.opt = torch.optim.AdamW(
            [
                {"params": [sh.master], "weight_decay": g["weight_decay"]}
                for sh, g in zip(self.shards, groups)
            ],
            lr=t.lr,
            betas=(t.beta1, t.beta2),
        )

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    def sync_master(self) -> None:
        """Take this rank's slices from the parameters (after loading weights)."""
        for sh in self.shards:
            sh.master.data.copy_(sh.flat_params()[sh.lo : sh.hi])

    def _all_gather(self, sh: _FlatShard, mine: torch.Tensor) -> torch.Tensor:
        """This rank's slice (hi - lo,) -> the group's whole flat tensor (total,) (collective)."""
        padded = torch.zeros(sh.chunk, dtype=mine.dtype, device=mine.device)
        padded[: mine.numel()] = mine
        pieces = [torch.empty_like(padded) for _ in range(self.dp_size)]
        torch.distributed.all_gather(pieces, padded, group=self.group)
        return torch.cat(pieces)[: sh.total]

    def step(self) -> None:
        for sh in self.shards:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in sh.params]
            sh.master.grad = torch.cat([g.reshape(-1) for g in grads])[sh.lo : sh.hi].clone()
        self.opt.step()
        for sh in self.shards:
            whole = sh.unflatten(self._all_gather(sh, sh.master.detach()))
            for p, new in zip(sh.params, whole):
                p.data.copy_(new)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for sh in self.shards:
            for p in sh.params:
                p.grad = None
            sh.master.grad = None

    def state_by_name(self) -> dict[str, dict]:
        """The local (TP-shard) AdamW state by parameter name, like :func:`adamw_state_by_name`.

        Collective over the data-parallel group (the moment slices are all-gathered).
        """
        out: dict[str, dict] = {"exp_avg": {}, "exp_avg_sq": {}, "step": {}}
        for sh in self.shards:
            st = self.opt.state.get(sh.master)
            if not st:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                whole = sh.unflatten(self._all_gather(sh, st[key]))
                out[key].update({name: t for (name, _), t in zip(sh.named, whole)})
            out["step"].update({name: float(st["step"]) for name, _ in sh.named})
        return out

    def load_by_name(self, local: dict[str, tuple[nn.Parameter, dict[str, torch.Tensor]]]) -> None:
        """Set this rank's slices of the moments from :func:`local_adamw_state`'s output."""
        if len(local) != len(self.named):
            missing = sorted({n for n, _ in self.named} - set(local))
            raise ValueError(f"optimizer state has no moments for {missing}")
        for sh in self.shards:
            moments = {}
            for key in ("exp_avg", "exp_avg_sq"):
                flat = torch.cat([local[name][1][key].reshape(-1) for name, _ in sh.named])
                moments[key] = flat[sh.lo : sh.hi].clone()
            step = local[sh.named[0][0]][1]["step"]
            self.opt.state[sh.master] = {"step": step.clone(), **moments}


def adamw_state_from_single_process(model: nn.Module, opt_state: dict) -> dict[str, dict]:
    """Convert a single-process ``AdamW.state_dict()`` (indexed by parameter order) to by-name.

    The groups' ``param_names`` name the indices; a state saved without them (one group over
    ``model.named_parameters()``) is read in the model's parameter order.
    """
    names = [n for n, _ in model.named_parameters()]
    by_index: dict[int, str] = {}
    for g in opt_state["param_groups"]:
        if "param_names" in g:
            by_index.update(zip(g["params"], g["param_names"]))
    out: dict[str, dict] = {"exp_avg": {}, "exp_avg_sq": {}, "step": {}}
    for idx, st in opt_state["state"].items():
        name = by_index.get(int(idx)) or names[int(idx)]
        out["exp_avg"][name] = st["exp_avg"]
        out["exp_avg_sq"][name] = st["exp_avg_sq"]
        out["step"][name] = float(st["step"])
    return out


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
    ) -> torch.Tensor:
        """Forward of one micro-batch x, y (b, l) under autocast with the step's ``solver``
        settings -> its loss (scalar, with autograd); appends the loss, the accuracy and the
        solver statistics to the lists."""
        sharded = self.sharded_logits
        with self.autocast():
            out = self.model(x, solver=solver, gather_logits=not sharded)  # type: ignore
            loss = hook(token_loss(out.logits, y, self.vocab, sharded))
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
        self, x: torch.Tensor, y: torch.Tensor, solver: SolverConfig, stop: bool, hook: Callable
    ) -> StepOutput:
        """One optimizer step on this rank's share ``x, y`` (b, l) of the global batch.

        ``solver``: the training solve's settings for this step (the curriculum phase's, see
        :func:`~ilm_megatron.train.curriculum.phase_at`); evaluation keeps the model's own.
        ``hook(loss)`` may replace the loss (fault injection in tests).
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
class LocalEngine(Engine):
    """One process: AdamW, gradient accumulation over ``parallel.microbatches``, clipping."""

    name = "single process"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, cfg.solver)
        init_from_checkpoint(self.model, cfg)
        self.model = self.model.to(device)
        self.model.train()
        self.opt = new_optimizer(self.model.named_parameters(), cfg)

    def setup(self, data: Any, latest: Path | None) -> dict | None:
        if latest is None:
            return None
        _refuse_deepspeed_checkpoint(latest)
        load_model(latest / "model.safetensors", self.model)
        state = torch.load(latest / "trainer.pt", weights_only=True)
        if "optimizer" in state:
            saved_groups = state["optimizer"]["param_groups"]
            if [g.get("param_names") for g in saved_groups] == [
                g["param_names"] for g in self.opt.param_groups
            ]:
                self.opt.load_state_dict(state["optimizer"])
            else:  # another grouping (e.g. one group, before the no-decay groups): by name
                full = adamw_state_from_single_process(self.model, state["optimizer"])
                load_adamw_state_by_name(self.opt, list(self.model.named_parameters()), full)
            return state
        # written by the TP/PP trainer: whole-model AdamW state by name
        saved = state.get("layout", {})
        if saved.get("dp", 1) != 1 and self.cfg.data.task != "word_problem":
            raise ValueError(
                f"{latest} was written with DP={saved['dp']}: the {self.cfg.data.task} data "
                "position is per data-parallel rank, so it cannot resume in one process"
            )
        full = torch.load(latest / OPTIMIZER_FILE, weights_only=True, mmap=True)
        load_adamw_state_by_name(self.opt, list(self.model.named_parameters()), full)
        was = f"TP={saved.get('tp')}, PP={saved.get('pp')}, DP={saved.get('dp')}"
        return {**state, "resumed_from": f" (written by {was})"}

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, solver: SolverConfig, stop: bool, hook: Callable
    ) -> StepOutput:
        mb = self.cfg.parallel.microbatches
        self.opt.zero_grad(set_to_none=True)
        losses, accs, stats = [], [], []
        finite = True
        for xc, yc in zip(x.chunk(mb), y.chunk(mb)):
            loss = self._microbatch_loss(xc, yc, hook, losses, accs, stats, solver)
            if not bool(torch.isfinite(loss)):
                finite = False  # no backward: the update is skipped
                break
            (loss / mb if mb > 1 else loss).backward()
        gnorm = float("nan")
        if finite:
            clip = self.cfg.train.clip_grad or float("inf")
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
            finite = math.isfinite(gnorm)
        if finite:
            self.opt.step()
        else:
            self.opt.zero_grad(set_to_none=True)
        return StepOutput(
            sum(losses) / len(losses) if finite else float("nan"),
            sum(accs) / len(accs),
            gnorm,
            finite,
            merge_stats(stats),
            stop,
        )

    def save(self, ckpt_root: Path, state: dict) -> Path:
        state = {"optimizer": self.opt.state_dict(), **state}
        return save_training_checkpoint(
            ckpt_root,
            state["counters"]["step"],
            self.model,
            self.cfg,
            state,
            self.cfg.train.keep_last,
        )

    def export(self, path: Path) -> None:
        save_model(self.model, self.cfg, path)


# ---------------------------------------------------------------------------------------------
def save_distributed_checkpoint(
    engine: Engine,
    ckpt_root: Path,
    step: int,
    keep_last: int,
    write_all: Callable[[Path], None],
    write_rank0: Callable[[Path], None],
) -> Path:
    """The atomic checkpoint scheme of one process, for many ranks.

    Every rank writes its files into ``checkpoints/.step-N.tmp`` (``write_all(tmp)``), rank 0
    adds the shared ones (``write_rank0(tmp)``). After a barrier rank 0 renames the folder to
    ``step-N``, rewrites ``latest`` and prunes beyond ``keep_last``; a final barrier keeps the
    ranks together. A job killed at any moment leaves ``latest`` on a complete checkpoint. A
    step already saved and named by ``latest`` is not written again.
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
    write_all(tmp)
    write_rank0(tmp)
    engine.barrier()
    if engine.is_rank0:
        fault_point("save_before_manifest")
        write_manifest(tmp, engine.cfg)  # every rank's files are in: sizes and hashes, last
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
class DeepSpeedEngine(_DistributedBase):
    """Data parallel with DeepSpeed ZeRO 1/2 (``tp = pp = 1``).

    Each data-parallel rank takes its slice of the global batch, split further into
    ``parallel.microbatches``. A non-finite loss on any rank poisons the gradients on every rank
    so that the update is skipped everywhere (lock-step).
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.name = f"DeepSpeed ZeRO-{cfg.parallel.zero_stage}"
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, cfg.solver)
        init_from_checkpoint(self.model, cfg)
        self.model = self.model.to(self.device)
        self.model.train()
        self.opt = new_optimizer(self.model.named_parameters(), cfg)
        self.engine: Any = None

    def describe(self) -> str:
        mb = self.cfg.parallel.microbatches
        return f"{self.world_size} x {self.device} ({self.name}, {mb} microbatch(es))"

    @property
    def module(self) -> ImplicitLM:
        return self.engine.module if self.engine is not None else self.model

    def setup(self, data: Any, latest: Path | None) -> dict | None:
        import deepspeed

        from ilm_megatron.train import distributed as D

        universal = self._prepare_resume(latest, data) if latest is not None else None
        ds_config = D.deepspeed_config(self.cfg, self.ctx)
        if universal is not None:
            ds_config["checkpoint"] = {"load_universal": True}
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.opt, config=ds_config, mpu=self.ctx.mpu
        )
        if latest is None:
            return None
        state = self._load(latest, universal)
        if universal is not None:
            state["resumed_from"] = f" (converted from {_saved_ranks(latest)} ranks)"
        return state

    def _prepare_resume(self, latest: Path, data: Any) -> Path | None:
        """Check ``latest`` before the engine exists; convert it when the world size changed.

        Same number of ranks: returns None (a plain DeepSpeed load). Another number (ZeRO-1/2
        and ``data.task=word_problem`` only): rank 0 converts the checkpoint's DeepSpeed state
        once into DeepSpeed's universal format at ``latest/universal`` (written to
        ``.universal.tmp`` and renamed, so a crash never leaves half a conversion), all ranks
        wait, and the folder is returned: the engine is then built with
        ``checkpoint.load_universal`` and re-partitions the optimizer state over the new ranks.
        """
        cfg = self.cfg
        if not (latest / "mp_rank_00_model_states.pt").is_file():
            raise ValueError(
                f"{latest} was written by the single-process or the TP/PP trainer (no DeepSpeed "
                "state): resume it with the settings it was written with, or start a new run "
                "directory"
            )
        saved = _saved_ranks(latest)
        if saved == self.world_size:
            return None
        where = f"{latest} was written by {saved} process(es), now {self.world_size}"
        if cfg.parallel.zero_stage not in (1, 2) or not list(latest.glob("*optim_states.pt")):
            raise ValueError(
                f"{where}: resuming at another data-parallel size needs ZeRO-1/2 on both sides "
                "(parallel.zero_stage=1 or 2); resume with the same number of processes"
            )
        if cfg.data.task != "word_problem":
            state = torch.load(latest / "trainer.pt", weights_only=True)
            data.load_state_dict(state["data"])  # the shards loader refuses with its own message
            raise ValueError(
                f"{where}: only data.task=word_problem resumes at another data-parallel size "
                f"(the {cfg.data.task} data position is per rank); resume with {saved} process(es)"
            )
        out = latest / "universal"
        if self.is_rank0 and not out.is_dir():
            import argparse
            import contextlib
            import io

            from deepspeed.checkpoint import ds_to_universal

            tmp = latest / ".universal.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            args = argparse.Namespace(
                input_folder=str(latest),
                output_folder=str(tmp),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,  # the model declares no universal-checkpoint info
            )
            quiet = io.StringIO()
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                ds_to_universal.main(args)
            os.replace(tmp, out)
        self.barrier()
        return out

    def _load(self, latest: Path, universal: Path | None) -> dict:
        own = latest / f"trainer-rank{self.rank:05d}.pt"
        if universal is not None:
            own = latest / "trainer.pt"  # every rank takes rank 0's trainer state
        elif not own.is_file():
            raise ValueError(
                f"{latest} has no trainer state for rank {self.rank}: it was written with a "
                f"different number of processes than now ({self.world_size})"
            )
        load_model(latest / "model.safetensors", self.engine.module)  # architecture check
        folder = universal if universal is not None else latest
        path, _ = self.engine.load_checkpoint(
            str(folder.parent),
            tag=folder.name,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load {folder}")
        return torch.load(own, weights_only=True)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, solver: SolverConfig, stop: bool, hook: Callable
    ) -> StepOutput:
        mb = self.cfg.parallel.microbatches
        engine = self.engine
        loss_sum = acc_sum = 0.0
        bad = stop_any = False
        stats = []
        for xc, yc in zip(x.chunk(mb), y.chunk(mb)):
            # bf16 (train.precision): the forward's autocast is DeepSpeed's torch_autocast
            # section (see deepspeed_config), the loss's this one
            with self.autocast():
                out = engine(xc, solver=solver)
                loss = hook(token_loss(out.logits, yc, self.vocab))
            acc = token_accuracy(out.logits, yc, self.vocab)
            ok = bool(torch.isfinite(loss))
            nonfinite, stops, lsum, asum = self.all_reduce_sum(
                [0.0 if ok else 1.0, float(stop), loss.item() if ok else 0.0, acc]
            )
            stop_any |= stops > 0
            loss_sum += lsum
            acc_sum += asum
            if nonfinite > 0:  # NaN gradients on every rank: the update is skipped by all
                bad = True
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()  # applies the update at the last micro-batch (accumulation boundary)
            stats.append(out.stats)
        # a non-finite loss on any rank poisoned every rank's gradients above (``bad``); ZeRO
        # also reports a step it skipped itself
        applied = engine.was_step_applied()
        norm = engine.get_global_grad_norm()
        gnorm = float(norm) if norm is not None else float("nan")
        finite = applied and not bad and math.isfinite(gnorm)
        n = mb * self.dp_size
        return StepOutput(
            loss_sum / n if not bad else float("nan"),
            acc_sum / n,
            gnorm if finite else float("nan"),
            finite,
            merge_stats(stats),
            stop_any,
        )

    def save(self, ckpt_root: Path, state: dict) -> Path:
        state = {**state, "world_size": self.world_size}
        step = state["counters"]["step"]

        def write_all(tmp: Path) -> None:
            # DeepSpeed's model and ZeRO optimizer shards (collective), this rank's trainer state
            self.engine.save_checkpoint(
                str(ckpt_root), tag=tmp.name, client_state={}, save_latest=False
            )
            torch.save(state, tmp / f"trainer-rank{self.rank:05d}.pt")

        def write_rank0(tmp: Path) -> None:
            if self.is_rank0:
                save_model(self.module, self.cfg, tmp / "model.safetensors")
                torch.save(state, tmp / "trainer.pt")

        return save_distributed_checkpoint(
            self, ckpt_root, step, self.cfg.train.keep_last, write_all, write_rank0
        )

    def export(self, path: Path) -> None:
        if self.is_rank0:
            save_model(self.module, self.cfg, path)
        self.barrier()


# ---------------------------------------------------------------------------------------------
class ParallelEngine(_DistributedBase):
    """Tensor x pipeline x data parallelism on Megatron-Core's process groups (no ZeRO).

    Every rank builds the single-process model from ``train.seed`` on the CPU (so a run starts
    from the same weights whatever the layout) and keeps its tensor-parallel shard of the whole
    model; with ``pp > 1`` it trains the parameters of its pipeline stage only. Checkpoints are
    layout-free (``model.safetensors`` and ``optimizer.pt``: the whole model and its AdamW state,
    written by rank 0), plus each rank's data position; a run resumes at any layout.
    """

    def __init__(self, cfg: Config) -> None:
        from megatron.core import parallel_state as ps

        from ilm_megatron.parallel.checkpoint import load_full_state_dict
        from ilm_megatron.parallel.state import pipeline_ring_group, pp_global_ranks

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
        torch.manual_seed(cfg.train.seed)
        full = build_model(self.local_cfg, cfg.solver)
        init_from_checkpoint(full, dataclasses.replace(cfg, model=self.local_cfg))
        self._n_params = sum(p.numel() for p in full.parameters())
        self.model = build_model(cfg.model, cfg.solver)  # on the CPU: this rank's TP shard
        load_full_state_dict(self.model, full.state_dict())
        del full
        self.model.train()
        self.stage = None
        params: list[nn.Parameter] = list(self.model.parameters())
        if self.pp > 1:
            from ilm_megatron.parallel.pipeline import split_model_into_stages

            self.stage = split_model_into_stages(self.model, self.pp_rank, self.pp)
            # only this stage's parameters go to the device (the other stages' copies stay on
            # the CPU, untouched), so device memory holds W / (tp * pp) of the weights
            self.stage.to(self.device)
            params = list(self.stage.parameters())
            self.pp_ranks = pp_global_ranks()
            self.ring_group = pipeline_ring_group()  # gloo, whatever the main backend
        else:
            self.model.to(self.device)
        self.params = params
        owned = {id(p) for p in params}
        self.named = [(n, p) for n, p in self.model.named_parameters() if id(p) in owned]
        # ZeRO-1 (parallel.zero_stage=1): AdamW state sharded over the data-parallel group
        self.zero = cfg.parallel.zero_stage == 1 and self.dp_size > 1
        if self.zero:
            self.opt: Any = ShardedAdamW(
                self.named, cfg, ps.get_data_parallel_group(), self.dp_rank, self.dp_size
            )
        else:
            self.opt = new_optimizer(self.named, cfg)
        self.is_last_stage = self.pp_rank == self.pp - 1
        # parameters whose gradient enters the global norm on this rank: every TP shard, a
        # replicated parameter on TP rank 0 only, the tied embedding on the first stage only
        from ilm_megatron.parallel.tensor_parallel import get_tp_layout

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
        self, x: torch.Tensor, y: torch.Tensor, solver: SolverConfig, stop: bool, hook: Callable
    ) -> StepOutput:
        mb = self.cfg.parallel.microbatches
        self.opt.zero_grad(set_to_none=True)
        xs, ys = list(x.chunk(mb)), list(y.chunk(mb))
        losses: list[float] = []
        accs: list[float] = []
        stats: list[SolverStats] = []
        reports = self.is_last_stage and self.tp_rank == 0  # one reporter per DP replica
        if self.stage is None:
            for xc, yc in zip(xs, ys):
                loss = self._microbatch_loss(xc, yc, hook, losses, accs, stats, solver)
                (loss / mb if mb > 1 else loss).backward()  # a NaN shows in the global norm
        else:
            from ilm_megatron.parallel.pipeline import pipeline_forward_backward

            sharded = self.sharded_logits

            def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
                loss = hook(token_loss(logits, targets, self.vocab, sharded))
                losses.append(loss.item())
                accs.append(token_accuracy(logits, targets, self.vocab, sharded))
                return loss

            _, pstats = pipeline_forward_backward(
                self.stage,
                xs if self.pp_rank == 0 else None,
                ys if self.is_last_stage else None,
                solver,
                n_microbatches=mb,
                in_flight=mb,
                pp_ranks=self.pp_ranks,
                loss_fn=loss_fn,
                loss_scale=1.0 / mb,
                autocast=self.autocast,  # forward compute only, never the backward
                group=self.ring_group,
                gather_logits=not sharded,
            )
            stats = pstats.solver
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

    def _reduce_data_parallel(self) -> None:
        """Average the gradients over the data-parallel group (one flat buffer)."""
        if self.dp_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, group=self.ps.get_data_parallel_group())
        flat /= self.dp_size
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
            offset += g.numel()

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
        pipeline group (:func:`~ilm_megatron.parallel.checkpoint.pipeline_full_state_dict`).
        """
        from ilm_megatron.parallel.checkpoint import pipeline_full_state_dict

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

    def _gather_named(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Whole-model tensors named like parameters, from this stage's local shards, on rank 0.

        Collective: the TP shards are joined inside each stage, then the first data-parallel
        replica's stages send theirs to rank 0 over the pipeline group.
        """
        from ilm_megatron.parallel.checkpoint import gather_tensors

        if self.dp_rank != 0:
            return None
        mine = {k: v.cpu() for k, v in gather_tensors(self.model, tensors).items()}
        if self.pp == 1:
            return mine if self.is_rank0 else None
        if self.tp_rank != 0:
            return None
        parts: list[Any] | None = [None] * self.pp if self.is_rank0 else None
        group = self.ps.get_pipeline_model_parallel_group()
        torch.distributed.gather_object(mine, parts, dst=self.pp_ranks[0], group=group)
        if parts is None:
            return None
        out: dict[str, torch.Tensor] = {}
        for part in parts:  # a tied embedding comes from two stages, identical
            for k, v in part.items():
                out.setdefault(k, v)
        return out

    def save(self, ckpt_root: Path, state: dict) -> Path:
        """``model.safetensors`` and ``optimizer.pt`` hold the whole model (layout-free, rank 0);
        ``trainer-rankRRRRR.pt`` keeps each rank's data position (it differs per DP rank)."""
        state = {**state, "layout": self._layout()}
        sd = self.full_state_dict()
        if self.zero:  # collective over the data-parallel group
            local = self.opt.state_by_name()
        else:
            local = adamw_state_by_name(self.opt, self.named)
        moments = {key: self._gather_named(local[key]) for key in ("exp_avg", "exp_avg_sq")}
        steps: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(steps, local["step"])

        def write_all(tmp: Path) -> None:
            own = {**state, "dp_rank": self.dp_rank}
            torch.save(own, tmp / f"trainer-rank{self.rank:05d}.pt")

        def write_rank0(tmp: Path) -> None:
            if self.is_rank0:
                save_state_dict(sd, self.save_cfg, tmp / "model.safetensors")
                step = {k: v for part in steps for k, v in part.items()}
                torch.save({**moments, "step": step}, tmp / OPTIMIZER_FILE)
                torch.save({**state, "dp_rank": 0}, tmp / "trainer.pt")

        step = state["counters"]["step"]
        return save_distributed_checkpoint(
            self, ckpt_root, step, self.cfg.train.keep_last, write_all, write_rank0
        )

    def setup(self, data: Any, latest: Path | None) -> dict | None:
        """Resume at this or any other TP/PP/DP layout, or from a single-process checkpoint.

        The weights and AdamW moments are stored whole and re-sharded here. The data position:
        at the same data-parallel size each rank takes the state saved by its DP rank (exact
        resume); at another size only the word problem (one global batch stream) can continue.
        """
        from ilm_megatron.parallel.checkpoint import load_full_state_dict

        if latest is None:
            return None
        _refuse_deepspeed_checkpoint(latest)
        shared = torch.load(latest / "trainer.pt", weights_only=True)
        saved = shared.get("layout") or {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}
        was = f"TP={saved['tp']}, PP={saved['pp']}, DP={saved['dp']}"
        if saved["dp"] == self.dp_size:
            state = _state_of_dp_rank(latest, self.dp_rank, shared)
        elif self.cfg.data.task == "word_problem":
            state = shared
        else:
            raise ValueError(
                f"{latest} was written by {was}, now {self.name}: the {self.cfg.data.task} data "
                f"position is per data-parallel rank, so resume with DP={saved['dp']} "
                "(tensor and pipeline sizes may change)"
            )
        check_architecture(latest / "model.safetensors", self.cfg.model)
        load_full_state_dict(self.model, load_state(latest / "model.safetensors"))
        if (latest / OPTIMIZER_FILE).is_file():
            full = torch.load(latest / OPTIMIZER_FILE, weights_only=True, mmap=True)
        else:  # a single-process checkpoint: AdamW state by parameter index
            full = adamw_state_from_single_process(self.model, shared["optimizer"])
        if self.zero:
            self.opt.sync_master()
            self.opt.load_by_name(local_adamw_state(self.named, full, self.tp_rank, self.tp))
        else:
            load_adamw_state_by_name(self.opt, self.named, full, self.tp_rank, self.tp)
        if saved != self._layout():
            state = {**state, "resumed_from": f" (written by {was})"}
        return state


def _state_of_dp_rank(latest: Path, dp_rank: int, shared: dict) -> dict:
    """The trainer state saved by data-parallel rank ``dp_rank`` (``trainer.pt`` for rank 0)."""
    if dp_rank == 0:
        return shared
    for path in sorted(latest.glob("trainer-rank*.pt")):
        state = torch.load(path, weights_only=True)
        if state.get("dp_rank") == dp_rank:
            return state
    raise ValueError(f"{latest} has no trainer state for data-parallel rank {dp_rank}")


def build_engine(cfg: Config) -> Engine:
    """The engine for ``cfg``'s parallel settings and the launcher's world size."""
    from ilm_megatron.train.distributed import (
        check_parallel,
        wants_deepspeed,
        wants_process_groups,
    )
    from ilm_megatron.train.loop import resolve_device

    check_parallel(cfg)
    if wants_deepspeed(cfg):
        return DeepSpeedEngine(cfg)
    if wants_process_groups(cfg):
        return ParallelEngine(cfg)
    return LocalEngine(cfg, resolve_device(cfg.train.device))
