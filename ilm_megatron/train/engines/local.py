"""The one-process engine: no ``torch.distributed``, gradient accumulation over
``parallel.microbatches``."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ilm_megatron.config import Config, SolverConfig
from ilm_megatron.models.lm import build_model
from ilm_megatron.train.carry import CarriedState
from ilm_megatron.train.checkpoint import (
    init_from_checkpoint,
    load_model,
    save_model,
    save_training_checkpoint,
)
from ilm_megatron.train.data import global_stream
from ilm_megatron.train.engines.base import (
    Engine,
    StepOutput,
    _refuse_deepspeed_checkpoint,
    merge_stats,
)
from ilm_megatron.train.optim import (
    OPTIMIZER_FILE,
    adamw_state_from_single_process,
    load_adamw_state_by_name,
    new_optimizer,
)
from ilm_megatron.train.sharded import is_sharded, process_group


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
        state = torch.load(latest / "trainer.pt", weights_only=True)
        if is_sharded(latest):  # written by the TP/PP/DP trainer, read at one process
            return self._setup_sharded(latest, state)
        load_model(latest / "model.safetensors", self.model)
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
        if saved.get("dp", 1) != 1 and not global_stream(self.cfg.data.task):
            raise ValueError(
                f"{latest} was written with DP={saved['dp']}: the {self.cfg.data.task} data "
                "position is per data-parallel rank, so it cannot resume in one process"
            )
        full = torch.load(latest / OPTIMIZER_FILE, weights_only=True, mmap=True)
        load_adamw_state_by_name(self.opt, list(self.model.named_parameters()), full)
        was = f"TP={saved.get('tp')}, PP={saved.get('pp')}, DP={saved.get('dp')}"
        return {**state, "resumed_from": f" (written by {was})"}

    def _setup_sharded(self, latest: Path, shared: dict) -> dict:
        """Weights, AdamW state and data position of a sharded checkpoint, read in one process."""
        from ilm_megatron.train.sharded import SHARDED_DIR, load_training_shards

        saved = shared.get("layout", {})
        was = f"TP={saved.get('tp')}, PP={saved.get('pp')}, DP={saved.get('dp')}"
        if saved.get("dp", 1) != 1 and not global_stream(self.cfg.data.task):
            raise ValueError(
                f"{latest} was written with DP={saved['dp']}: the {self.cfg.data.task} data "
                "position is per data-parallel rank, so it cannot resume in one process"
            )
        named = list(self.model.named_parameters())
        with process_group():
            full, states = load_training_shards(
                latest / SHARDED_DIR, self.model, None, named, [0], saved.get("dp", 1)
            )
        load_adamw_state_by_name(self.opt, named, full, copy=False)  # fresh buffers
        return {**states[0], "resumed_from": f" (written by {was})"}

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
        losses, accs, stats = [], [], []
        finite = True
        for j, (xc, yc) in enumerate(zip(x.chunk(mb), y.chunk(mb))):
            loss = self._microbatch_loss(xc, yc, hook, losses, accs, stats, solver, carry, j)
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
