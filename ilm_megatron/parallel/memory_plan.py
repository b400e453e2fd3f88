"""Per-rank memory of a training layout, computed from the model without allocating it.

:func:`plan_memory` sets up a *fake* process group of ``tp * pp * dp`` ranks (collectives do
nothing; PyTorch's ``fake`` backend) and Megatron's parallel state over it, then for each pipeline
stage, as that stage's TP rank 0:

* builds the rank's model on the ``meta`` device (its TP shard, the stage's units) and counts the
  parameters it holds (``params_meta_max_rank_bytes`` is the largest);
* runs one micro-batch of the stage's training work on ``meta`` tensors with autograd, as the
  ring does: the embedding and injection on stage 0, ``k`` phantom steps of the stage's layers,
  the head and the loss on the last stage; every tensor autograd saves for backward is counted
  (weights excluded), which gives the activation bytes of one micro-batch in flight exactly as
  this code saves them;
* adds what a micro-batch holds between ticks outside autograd: the injection ``u`` and the solve's
  iterates; with ``solver.phantom_impl=recompute`` the saved graph is one step's (rebuilt in
  backward, one micro-batch at a time) plus each step's input per micro-batch in flight.

The other entries follow from the optimizer in use: fp32 weights and gradients, AdamW's two fp32
moments; ZeRO-1 partitions the moments and a fp32 copy of the weights over the data-parallel
group, ZeRO-2 also the reduced gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ilm_megatron.config import Config

FP32 = 4


class _SavedBytes:
    """Bytes autograd saves for backward inside the block (peak), weights left out by identity
    (on ``meta`` every storage pointer is 0, so storage cannot tell them apart)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = {id(p) for p in params}
        self.live = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _is_param(self, t: torch.Tensor) -> bool:
        base = t._base if t._base is not None else t
        return id(t) in self.params or id(base) in self.params

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not self._is_param(t):
            self.live += t.numel() * t.element_size()
            self.peak = max(self.peak, self.live)
        return t

    def __enter__(self) -> _SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class _FlashLike(torch.autograd.Function):
    """Causal attention on ``meta`` saving what flash-attn saves: q, k, v, o and the
    float32 log-sum-exp (b, a, l), not the (l, l) probabilities of the math path."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def gpu_kernels_on_meta() -> Iterator[None]:
    """Run the GPU path's autograd functions on ``meta``: our Triton kernels' launches are
    replaced by shape-only stand-ins (their autograd functions, and what they save, stay).
    Nothing is launched or compiled."""
    import os

    from ilm_kernels import conv1d_triton, norm_triton, ssd_triton

    def ssd_fwd(x, dt, A, B, C, chunk_size, D=None, initial_states=None):  # noqa: ANN001
        b, _, h, p = x.shape
        return torch.empty_like(x), x.new_empty(b, h, p, B.shape[-1], dtype=torch.float32)

    def norm_fwd(x, gate, weight, eps=1e-5, group_size=None):  # noqa: ANN001
        d = x.shape[-1]
        return torch.empty_like(x), x.new_empty(
            x.numel() // d, d // (group_size or d), dtype=torch.float32
        )

    def conv_fwd(x, weight, bias=None, initial_window=None, activation=None):  # noqa: ANN001
        return torch.empty_like(x)

    saved = (
        ssd_triton.ssd_triton_fwd,
        norm_triton.rms_norm_forward,
        conv1d_triton.conv1d_forward,
        os.environ.get("TRITON_INTERPRET"),
    )
    ssd_triton.ssd_triton_fwd = ssd_fwd
    norm_triton.rms_norm_forward = norm_fwd
    conv1d_triton.conv1d_forward = conv_fwd
    os.environ["TRITON_INTERPRET"] = "1"  # lets the dispatch pick Triton for non-CUDA tensors
    try:
        yield
    finally:
        (
            ssd_triton.ssd_triton_fwd,
            norm_triton.rms_norm_forward,
            conv1d_triton.conv1d_forward,
        ) = saved[:3]
        if saved[3] is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved[3]


@contextlib.contextmanager
def flash_attention_on_meta() -> Iterator[None]:
    """Attention on ``meta`` saves what flash-attn (GPU) and PyTorch's fused CPU attention save,
    not the (l, l) probabilities of the math path that ``meta`` would take."""
    from ilm_megatron.models import llama

    saved = llama.causal_attention
    llama.causal_attention = lambda q, k, v, backend="auto": _FlashLike.apply(q, k, v)
    try:
        yield
    finally:
        llama.causal_attention = saved


@contextlib.contextmanager
def fake_world(tp: int, pp: int, dp: int, rank: int) -> Iterator[None]:
    """A fake process group of ``tp * pp * dp`` ranks as ``rank``, with Megatron's groups."""
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan_memory needs a process without torch.distributed initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp * pp * dp)
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            create_gloo_process_groups=False,
        )
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _stage_rank(tp: int, pp: int, dp: int, stage: int) -> int:
    """Global rank of TP rank 0, DP rank 0 of pipeline stage ``stage`` (Megatron's order)."""
    return stage * tp * dp


def _stage_pieces(model: nn.Module, stage: int, pp: int) -> Any:
    """This stage's module (a PipelineStage, or the whole model's pieces at pp = 1)."""
    if pp > 1:
        from ilm_megatron.parallel.pipeline import split_model_into_stages

        return split_model_into_stages(model, stage, pp)

    class Whole(nn.Module):
        is_first = is_last = True

        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def embed(self, ids: torch.Tensor) -> torch.Tensor:
            e, u = self.m.embed(ids)
            return e if u is None else u

        def forward(self, z: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
            return self.m.stack(z, u)[0]

        def head(self, z: torch.Tensor, gather: bool = True) -> torch.Tensor:
            return self.m.head(z, gather=gather)

    return Whole(model)


def _microbatch_activations(
    cfg: Config, model: nn.Module, part: Any, b: int, length: int, tp: int, steps: int
) -> dict[str, int]:
    """Saved-for-backward bytes of one micro-batch on this stage, plus what it holds outside
    autograd (injection ``u``, the solve's iterates), on ``meta`` tensors."""
    from ilm_megatron.core.tensor_parallel import sequence_parallel_region
    from ilm_megatron.implicit.solver import damped
    from ilm_megatron.train.losses import token_loss

    m, s = cfg.model, cfg.solver
    sp = bool(getattr(model, "sequence_parallel", False))
    l_local = length // tp if sp else length
    d = m.d_model
    meta = torch.device("meta")
    params = list(part.parameters())
    k = steps if m.implicit else 1
    inj = model.stack.injection_size // tp if m.implicit else 0
    with sequence_parallel_region(sp), _SavedBytes(params) as saved:
        if part.is_first:
            ids = torch.zeros(b, length, dtype=torch.long, device=meta)
            u = part.embed(ids)
        else:
            shape = (b, l_local, inj) if m.implicit else (b, l_local, d)
            u = torch.empty(shape, device=meta, requires_grad=True)
        z = torch.empty(b, l_local, d, device=meta)
        if m.implicit:
            for _ in range(k):
                z = damped(part(z, u), z, s.phantom_damping)
        else:
            z = part(u if part.is_first else z.requires_grad_(), None)
        if part.is_last:
            logits = part.head(z, gather=tp == 1)
            targets = torch.zeros(b, length, dtype=torch.long, device=meta)
            token_loss(logits, targets, m.vocab_size, tp > 1)
    held_u = b * l_local * inj * FP32 if m.implicit else 0
    iterates = 3 * b * l_local * d * FP32 if m.implicit else 0  # z, F(z), the best iterate
    return {"saved_for_backward": saved.peak, "injection": held_u, "iterates": iterates}


def plan_memory(
    cfg: Config,
    tp: int,
    pp: int,
    dp: int,
    zero: int = 0,
    microbatches: int = 1,
    in_flight: int | None = None,
    micro_batch_size: int | None = None,
    kernels: str = "gpu",
) -> dict[str, Any]:
    """Bytes per rank of a TP x PP x DP layout (the largest stage; see the module docstring).

    Args:
        cfg: the run config (model, solver, ``train.batch_size``, ``data.seq_len``).
        tp, pp, dp: the layout.
        zero: 0 (plain AdamW), 1 (moments and master weights partitioned) or 2 (gradients too).
        microbatches: micro-batches per step per data-parallel rank.
        in_flight: micro-batches in flight in the ring (default: all, or ``parallel.in_flight``).
        micro_batch_size: sequences per micro-batch (default ``batch_size / dp / microbatches``).
        kernels: ``"gpu"``: what the GPU path saves (our Triton kernels' autograd functions,
            flash-attn-like attention); ``"reference"``: the PyTorch reference path (CPU runs).

    Returns:
        ``{"per_rank": {"params", "grads", "optimizer", "activations", "total"},
        "params_total_bytes", "params_meta_max_rank_bytes", "stages": [...], ...}``.
    """
    from ilm_megatron.config import with_overrides
    from ilm_megatron.models.lm import build_model

    if zero not in (0, 1, 2):
        raise ValueError(f"--zero must be 0, 1 or 2, got {zero}")
    if min(tp, pp, dp, microbatches) < 1:
        raise ValueError("tp, pp, dp and microbatches must be >= 1")
    cfg = with_overrides(cfg, [f"parallel.tp={tp}", f"parallel.pp={pp}"])
    gpu = kernels == "gpu"
    if kernels not in ("gpu", "reference"):
        raise ValueError(f"kernels must be 'gpu' or 'reference', got {kernels!r}")
    backend = "triton" if gpu else "reference"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kernel_backend=backend))
    length = cfg.data.seq_len
    if micro_batch_size is None:
        per_rank = cfg.train.batch_size // dp
        if cfg.train.batch_size % dp or per_rank < microbatches or per_rank % microbatches:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} over dp={dp} gives {per_rank} "
                f"sequences per rank, not divisible into {microbatches} micro-batches"
            )
        micro_batch_size = per_rank // microbatches
    flight = in_flight or cfg.parallel.in_flight or microbatches
    flight = min(flight, microbatches) if pp > 1 else 1
    local = dataclasses.replace(cfg.model, backend="local")
    with torch.device("meta"):
        total = sum(p.numel() for p in build_model(local, cfg.solver).parameters()) * FP32
    stages = []
    for stage in range(pp):
        with fake_world(tp, pp, dp, _stage_rank(tp, pp, dp, stage)):
            with torch.device("meta"):
                model = build_model(cfg.model, cfg.solver)
            model.train()
            part = _stage_pieces(model, stage, pp)
            params = sum(p.numel() for p in part.parameters()) * FP32
            k = cfg.solver.phantom_steps
            recompute = cfg.solver.phantom_impl == "recompute" and cfg.model.implicit
            args = (cfg, model, part, micro_batch_size, length, tp)
            kernels_ctx = gpu_kernels_on_meta() if gpu else contextlib.nullcontext()
            with kernels_ctx, flash_attention_on_meta():
                acts = _microbatch_activations(*args, steps=1 if recompute else k)
        if recompute:  # each step's input is kept; one step's graph is rebuilt at a time
            one_step = acts.pop("saved_for_backward")
            acts["step_inputs"] = k * acts["iterates"] // 3
            per_mb = sum(acts.values())
            activations = per_mb * flight + one_step
            acts["recomputed_step"] = one_step
        else:
            per_mb = sum(acts.values())
            activations = per_mb * flight
        grads = params // dp if zero == 2 else params
        optimizer = 3 * params // dp if zero else 2 * params  # ZeRO: fp32 copy + 2 moments
        stages.append(
            {
                "stage": stage,
                "params": params,
                "grads": grads,
                "optimizer": optimizer,
                "activations": activations,
                "activations_per_microbatch": acts,
                "total": params + grads + optimizer + activations,
            }
        )
    worst = max(stages, key=lambda r: r["total"])
    keys = ("params", "grads", "optimizer", "activations", "total")
    return {
        "layout": {"tp": tp, "pp": pp, "dp": dp, "zero": zero, "world_size": tp * pp * dp},
        "microbatches": microbatches,
        "in_flight": flight,
        "micro_batch_size": micro_batch_size,
        "seq_len": length,
        "phantom_steps": cfg.solver.phantom_steps,
        "kernels": kernels,
        "phantom_impl": cfg.solver.phantom_impl,
        "per_rank": {k: worst[k] for k in keys},
        "per_rank_stage": worst["stage"],
        "params_total_bytes": total,
        "params_meta_max_rank_bytes": max(r["params"] for r in stages),
        "stages": stages,
        "gib": {k: round(worst[k] / 2**30, 3) for k in keys},
        "ideal_params_bytes": math.ceil(total / (tp * pp)),
    }
