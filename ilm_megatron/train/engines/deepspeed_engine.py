"""Data parallelism with DeepSpeed ZeRO stage 1/2 (``tp = pp = 1``), launched by ``torchrun`` /
``deepspeed``; resumes at another data-parallel size through DeepSpeed's universal checkpoint."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ilm_megatron.config import Config, SolverConfig
from ilm_megatron.models.lm import ImplicitLM, build_model
from ilm_megatron.train.carry import CarriedState
from ilm_megatron.train.checkpoint import (
    init_from_checkpoint,
    load_model,
    save_model,
)
from ilm_megatron.train.engines.base import (
    StepOutput,
    _DistributedBase,
    _saved_ranks,
    merge_stats,
    save_distributed_checkpoint,
)
from ilm_megatron.train.losses import token_accuracy, token_loss
from ilm_megatron.train.optim import new_optimizer


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
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        solver: SolverConfig,
        stop: bool,
        hook: Callable,
        carry: CarriedState | None = None,
    ) -> StepOutput:
        mb = self.cfg.parallel.microbatches
        engine = self.engine
        loss_sum = acc_sum = 0.0
        bad = stop_any = False
        stats = []
        for j, (xc, yc) in enumerate(zip(x.chunk(mb), y.chunk(mb))):
            # bf16 (train.precision): the forward's autocast is DeepSpeed's torch_autocast
            # section (see deepspeed_config), the loss's this one
            with self.autocast():
                caches = None if carry is None else carry.get(j)
                out = engine(xc, solver=solver, caches=caches, return_caches=carry is not None)
                loss = hook(token_loss(out.logits, yc, self.vocab))
            if carry is not None:  # each rank carries its own rows
                carry.put(j, out.caches)
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
