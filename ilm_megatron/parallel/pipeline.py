"""Pipeline-parallel ring schedule for the whole-stack fixed point (DESIGN §4, docs/pipeline.md).

The implicit model iterates ``F`` = all blocks + final norm, so with ``P`` stages the iterate goes
round a ring ``0 -> 1 -> ... -> P-1 -> 0``. This module runs, with torch.distributed point-to-point
messages (gloo on CPU, NCCL on GPU):

1. **Injection**: stage 0 computes ``u`` (b, l, injection_size) of every micro-batch once and sends
   it once to every stage, which caches it (as a leaf that accumulates its gradient).
2. **Forward ring** with up to ``M`` micro-batches in flight: the no-grad solve (undamped
   ``z <- F(z)``); the last stage keeps the previous iterate (its own last output), computes the
   per-sample residual, the best iterate and the stop decision exactly as
   :func:`~ilm_megatron.implicit.solver.solve`, and sends ``(flag, z)`` back to stage 0. A converged
   micro-batch continues in its slot with its ``k`` phantom steps (with autograd; the damping
   ``z_j = lam F(z_{j-1}) + (1 - lam) z_{j-1}`` is applied on the last stage, which holds both
   terms); when those are done the slot takes the next micro-batch.
3. **Backward ring** (reverse direction, driven by the last stage, ``M`` in flight): step ``j`` is
   back-propagated ``P-1 -> ... -> 0``; stage 0's input-gradient is sent to the last stage and added
   to the damping term ``(1 - lam) g_j`` to give ``g_{j-1}``.
4. ``u``'s gradient of every stage goes back to stage 0 and through the injection to the embedding.
   With tied embeddings the last stage uses its own reference to the embedding weight for the head,
   and stage 0 and stage ``P-1`` exchange and sum their embedding gradients (Megatron's
   "embedding group" all-reduce, done with two point-to-point messages).

All message orders are deterministic given the stop decisions, and every message carries a header,
so stages other than 0 simply follow what arrives.

**TP x PP**: with a tensor-parallel group inside each stage (``backend=tp`` model), every TP rank
runs its own ring with the ranks of the same TP rank in the other stages (``pp_ranks``, Megatron's
pipeline group; see :func:`ilm_megatron.core.parallel_state.pp_global_ranks`). The iterate ``z`` is
replicated over the TP group (row-parallel outputs are all-reduced), or under sequence parallelism
this TP rank's l / tp positions (row-parallel outputs reduce-scattered; the messages are 1/tp of
the iterate and the residual is summed over the TP group); the injection ``u`` is this TP
rank's column shard, and the TP collectives of a stage run in the same order on all its TP ranks
because they see the same messages.

Every buffer the ring allocates lives on the stage's device (that of its parameters: CPU for gloo,
the current CUDA device for NCCL); headers are int32 written through a byte view of the buffer, so
they stay exact whatever the iterate's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ilm_megatron.core.parallel_state import tp_world_size
from ilm_megatron.core.tensor_parallel import (
    sequence_parallel_active,
    sequence_parallel_region,
    tp_sum,
)
from ilm_megatron.implicit.solver import EPS, FixedPointTracker, SolverStats, damped
from ilm_megatron.models.stack import upcast

# message tags: one channel per kind of traffic so that their orders do not interfere
TAG_U, TAG_FWD, TAG_RET, TAG_BWD, TAG_BRET, TAG_UGRAD, TAG_EMB = 11, 12, 13, 14, 15, 16, 17
# header kinds
K_SOLVE, K_PHANTOM, K_STOP, K_PAD = 0, 1, 2, 3
_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HEADER = 4  # [kind, micro-batch, step, flag] as int32 (16 bytes at the start of each message)


def stage_layer_range(n_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Contiguous layers ``[start, end)`` of stage ``pp_rank`` (remainder spread over the first)."""
    base, rem = divmod(n_layers, pp_size)
    start = pp_rank * base + min(pp_rank, rem)
    return start, start + base + (1 if pp_rank < rem else 0)


class PipelineStage(nn.Module):
    """One pipeline stage: references to the submodules of a full :class:`ImplicitLM`.

    Stage 0 holds the embedding and the injection; stage ``P-1`` holds the final norm and the head
    (with tied embeddings a reference to the embedding weight). ``forward`` is this stage's share of
    one evaluation of ``F``.
    """

    def __init__(self, model: nn.Module, pp_rank: int, pp_size: int) -> None:
        super().__init__()
        if pp_size < 2:
            raise ValueError(f"the ring schedule needs pp_size >= 2, got {pp_size}")
        if not 0 <= pp_rank < pp_size:
            raise ValueError(f"pp_rank {pp_rank} out of range for pp_size {pp_size}")
        n = len(model.stack.layers)
        if n < pp_size:
            raise ValueError(f"{n} layers cannot be split into {pp_size} stages")
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.config = model.config
        self.solver_config = model.solver_config
        self.layer_range = stage_layer_range(n, pp_rank, pp_size)
        self.layers = nn.ModuleList(model.stack.layers[i] for i in range(*self.layer_range))
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp_size - 1
        self.tied = model.lm_head is None
        keep_embedding = self.is_first or (self.is_last and self.tied)
        self.embedding = model.embedding if keep_embedding else None
        self.injection_norm = model.injection_norm if self.is_first else None
        self.injection = model.injection if self.is_first else None
        self.final_norm = model.stack.final_norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        # sequence parallelism: the iterate travels and is stored as this TP rank's l / tp
        # positions (the ring runs inside sequence_parallel_region)
        self.sequence_parallel = bool(getattr(model, "sequence_parallel", False))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Stage 0: ids (b, l) -> injection u (b, l, injection_size), with autograd.

        Explicit models: the embedding e (b, l, d) fp32, the input of the single pass.
        """
        assert self.is_first
        e = upcast(self.embedding(ids))
        if self.injection is None:
            return e
        return self.injection(self.injection_norm(e))

    def forward(self, z: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """z: (b, l, d) fp32 -> this stage's layers (+ final norm on the last stage) (b, l, d)."""
        for layer in self.layers:
            z, _ = layer(z, u)
        if self.final_norm is not None:
            z = upcast(self.final_norm(z))
        return z

    def head(self, z: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Last stage: z (..., d) -> logits (..., padded_vocab) gathered over TP, or with
        ``gather=False`` this TP rank's columns (..., padded_vocab / tp)."""
        from ilm_megatron.models.lm import lm_logits

        return lm_logits(z, self.embedding, self.lm_head, gather=gather)

    @property
    def device(self) -> torch.device:
        """Device of this stage's parameters (where its ring buffers are allocated)."""
        return next(self.parameters()).device


def split_model_into_stages(model: nn.Module, pp_rank: int, pp_size: int) -> PipelineStage:
    """Stage ``pp_rank`` of ``pp_size`` of a full model (submodules are shared, not copied)."""
    return PipelineStage(model, pp_rank, pp_size)


def default_loss(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Mean token cross-entropy over the real vocabulary. logits (b, l, V'), targets (b, l)."""
    return F.cross_entropy(logits[..., :vocab].flatten(0, 1).float(), targets.flatten())


@dataclass
class PipelineStats:
    """What the schedule did on this rank.

    Attributes:
        iters: per micro-batch solver evaluations (known on every stage).
        solver: per micro-batch :class:`SolverStats` (last stage only; empty elsewhere).
        logits: with ``keep_logits=True``, per micro-batch detached training-mode logits
            (b, l, padded_vocab) of the last phantom step (last stage only; empty elsewhere).
        compute_s / wait_s / total_s: per phase ("forward", "backward") seconds spent computing,
            blocked in receives, and in the whole phase on this rank.
        iterate_shape: (b, l_local, d) of the iterate this rank stores and sends (``l / tp``
            positions under sequence parallelism).
    """

    iters: list[int] = field(default_factory=list)
    solver: list[SolverStats] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    compute_s: dict[str, float] = field(default_factory=dict)
    wait_s: dict[str, float] = field(default_factory=dict)
    total_s: dict[str, float] = field(default_factory=dict)
    iterate_shape: tuple[int, ...] = ()

    def bubble(self, phase: str = "forward") -> float:
        """Idle fraction ``1 - compute / total`` of a phase on this rank."""
        t = self.total_s.get(phase, 0.0)
        return 1.0 - self.compute_s.get(phase, 0.0) / t if t > 0 else 0.0


class _Timer:
    """Accumulates the seconds spent inside ``with timer:`` blocks (compute time)."""

    def __init__(self) -> None:
        self.s = 0.0
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.s += time.perf_counter() - self._t0


class _Comm:
    """Point-to-point helpers: isend everything (no deadlock), time the blocking receives.

    The messages go through ``group``, a gloo group (the ring relies on tags to keep its streams
    apart and on sends and receives to one peer progressing independently, which gloo gives and
    NCCL does not). With the stage on a GPU the transfers are staged through host memory: buffers
    live on the CPU and what is received is copied to ``device``.
    """

    def __init__(
        self,
        ranks: Sequence[int],
        device: torch.device | str = "cpu",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.ranks = list(ranks)
        self.device = torch.device(device)
        self.group = group
        self.host = self.device.type != "cpu"  # stage through host memory (gloo moves CPU data)
        self.buf_device = torch.device("cpu") if self.host else self.device
        self.pending: list[tuple[object, torch.Tensor]] = []
        self.wait = 0.0

    def send(self, t: torch.Tensor, stage: int, tag: int) -> None:
        t = t.detach().to(self.buf_device).contiguous()
        work = dist.isend(t, self.ranks[stage], group=self.group, tag=tag)
        self.pending.append((work, t))
        if len(self.pending) > 64:
            self.pending = [(w, x) for w, x in self.pending if not w.is_completed()]

    def recv(self, shape: Sequence[int], dtype: torch.dtype, stage: int, tag: int) -> torch.Tensor:
        t = torch.empty(tuple(shape), dtype=dtype, device=self.buf_device)
        t0 = time.perf_counter()
        dist.recv(t, self.ranks[stage], group=self.group, tag=tag)
        self.wait += time.perf_counter() - t0
        return t.to(self.device)

    def flush(self) -> None:
        for w, _ in self.pending:
            w.wait()
        self.pending = []

    # ring messages: one flat tensor ``[header, *payload]`` of a fixed size, with ``depth``
    # receives always posted ahead so that transfers overlap the receiver's compute (gloo only
    # moves data once the receive is posted). A stream ends with ``depth`` pads. The header is
    # ``[kind, mb, step, flag]`` as int32 in the first 16 bytes (a dtype view), so it is exact
    # for any payload dtype (bf16 would round integers above 256).
    def setup_ring(self, shape: Sequence[int], dtype: torch.dtype, depth: int) -> None:
        self.shape, self.dtype, self.depth = tuple(shape), dtype, depth
        self.hdr = HEADER * 4 // dtype.itemsize  # header length in payload elements
        self.numel = self.hdr + math.prod(self.shape)
        self.chans: dict[tuple[int, int], deque] = {}

    def _header(self, buf: torch.Tensor) -> torch.Tensor:
        """The int32 header (4,) of a ring buffer (a view)."""
        return buf[: self.hdr].view(torch.int32)

    def _post(self, stage: int, tag: int) -> None:
        buf = torch.empty(self.numel, dtype=self.dtype, device=self.buf_device)
        work = dist.irecv(buf, self.ranks[stage], group=self.group, tag=tag)
        self.chans[(stage, tag)].append((work, buf))

    def open(self, stage: int, tag: int) -> None:
        self.chans[(stage, tag)] = deque()
        for _ in range(self.depth):
            self._post(stage, tag)

    def put(
        self,
        stage: int,
        tag: int,
        kind: int,
        mb: int,
        step: int = 0,
        flag: int = 0,
        payload: torch.Tensor | None = None,
    ) -> None:
        buf = torch.empty(self.numel, dtype=self.dtype, device=self.buf_device)
        self._header(buf).copy_(torch.tensor([kind, mb, step, flag], dtype=torch.int32))
        if payload is not None:
            buf[self.hdr :] = payload.detach().reshape(-1)
        self.send(buf, stage, tag)

    def pad(self, stage: int, tag: int) -> None:
        for _ in range(self.depth):
            self.put(stage, tag, K_PAD, -1)

    def get(self, stage: int, tag: int) -> tuple[int, int, int, int, torch.Tensor]:
        """Next message of a stream: ``(kind, mb, step, flag, payload shaped like z)``."""
        chan = self.chans[(stage, tag)]
        work, buf = chan.popleft()
        t0 = time.perf_counter()
        work.wait()
        self.wait += time.perf_counter() - t0
        self._post(stage, tag)
        kind, mb, step, flag = (int(x) for x in self._header(buf).tolist())
        return kind, mb, step, flag, buf[self.hdr :].view(self.shape).to(self.device)

    def close(self, stage: int, tag: int) -> None:
        """Consume the pads that answer the receives still posted."""
        for work, buf in self.chans.pop((stage, tag)):
            work.wait()
            kind = int(self._header(buf)[0].item())
            assert kind == K_PAD, "stream closed with a message still in flight"


@dataclass
class _MB:
    """Per micro-batch state on one stage."""

    shape: tuple[int, ...]  # z shape (b, l, d)
    zdtype: torch.dtype
    u: torch.Tensor | None  # leaf (b, l, inj) that accumulates this stage's u-gradient
    z0: torch.Tensor | None = None  # explicit models, stage 0: the embedding leaf (b, l, d)
    # last stage: the solve's state (created at the first evaluation)
    track: FixedPointTracker | None = None
    # phantom graph pieces per step j: (stage input leaf, stage output[, damped z_j, z_{j-1} leaf])
    saved: dict[int, tuple] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # detached (b, l, V') with keep_logits


def _in_stage_layout(fn: Callable) -> Callable:
    """Run the ring inside :func:`sequence_parallel_region` when the stage is sequence parallel."""

    @functools.wraps(fn)
    def wrapper(stage: PipelineStage, *args: Any, **kwargs: Any) -> Any:
        with sequence_parallel_region(getattr(stage, "sequence_parallel", False)):
            return fn(stage, *args, **kwargs)

    return wrapper


@_in_stage_layout
def pipeline_forward_backward(
    stage: PipelineStage,
    ids_microbatches: Sequence[torch.Tensor] | None,
    targets_microbatches: Sequence[torch.Tensor] | None,
    cfg: object | None = None,
    *,
    n_microbatches: int | None = None,
    in_flight: int = 2,
    pp_ranks: Sequence[int] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    loss_scale: float = 1.0,
    max_iter: int | None = None,
    backward: bool = True,
    keep_logits: bool = False,
    autocast: Callable[[], AbstractContextManager] | None = None,
    group: dist.ProcessGroup | None = None,
    evaluate: bool = False,
    gather_logits: bool = True,
) -> tuple[list[torch.Tensor], PipelineStats]:
    """Solve, phantom steps and backward of ``N`` micro-batches on a ring of ``P`` stages.

    Every rank of the pipeline calls this with its own stage. Gradients are accumulated into the
    ``.grad`` of the parameters of each stage (``loss_scale * sum`` over micro-batches of each
    micro-batch's loss), exactly as a single process running ``model(ids_i)`` and
    ``(loss_scale * loss_i).backward()`` for each ``i``.

    Args:
        stage: this rank's :class:`PipelineStage`.
        ids_microbatches: stage 0: N tensors (b, l) of token ids; ignored elsewhere (may be None).
        targets_microbatches: last stage: N tensors (b, l) of targets; ignored elsewhere.
        cfg: a :class:`~ilm_megatron.config.SolverConfig` (or a full Config); default: the model's.
        n_microbatches: N, needed on stages that get no ``ids_microbatches``.
        in_flight: M, micro-batches circulating at once (>= 1; >= P keeps every stage busy).
        pp_ranks: global ranks of stages ``0..P-1`` (default ``range(P)``). Under TP x PP: this
            rank's pipeline group, :func:`~ilm_megatron.core.parallel_state.pp_global_ranks`.
        loss_fn: ``(logits (b, l, V'), targets (b, l)) -> scalar``; default mean cross-entropy.
        loss_scale: multiplies each loss before backward (e.g. ``1 / N``).
        max_iter: solver cap override (default ``f_max_iter``).
        backward: False runs the forward ring only (solve + phantom forward, no gradients).
        keep_logits: the last stage keeps each micro-batch's detached training-mode logits
            (b, l, padded_vocab) in ``stats.logits`` (for checks; costs N logits tensors).
        autocast: a context factory (e.g. bf16 ``torch.autocast``) entered around every forward
            computation (embedding, stages, damping, head and loss), never around backward.
        group: a gloo process group holding ``pp_ranks`` for the ring's messages (default: the
            default group, which must then be gloo); with NCCL training use
            :func:`~ilm_megatron.core.parallel_state.pipeline_ring_group`.
        evaluate: the evaluation solve instead of training: the solve only (``cfg``'s cap and
            tolerance: pass the eval ones), then the head on each micro-batch's best iterate, as
            the single-process model's training-rule eval solve; no phantom steps, no backward.
        gather_logits: False hands ``loss_fn`` this TP rank's logits columns (b, l, V' / tp)
            for a vocab-parallel loss (:func:`~ilm_megatron.core.tensor_parallel.
            vocab_parallel_cross_entropy`) instead of the gathered (b, l, V').

    Returns:
        ``(losses, stats)``: on the last stage the N detached, unscaled losses; [] elsewhere.
    """
    s_cfg = getattr(cfg, "solver", cfg) if cfg is not None else stage.solver_config
    cap = s_cfg.f_max_iter if max_iter is None else max_iter
    tol, k, lam = s_cfg.f_tol, s_cfg.phantom_steps, s_cfg.phantom_damping
    explicit = not stage.config.implicit
    if explicit:  # one pass of the stack: no solve, one undamped "phantom" step with autograd
        cap, k, lam = 0, 1, 1.0
    if evaluate:
        backward = False
    P, rank = stage.pp_size, stage.pp_rank
    if ids_microbatches is not None and stage.is_first:
        n_microbatches = len(ids_microbatches)
    if n_microbatches is None:
        raise ValueError("n_microbatches is required on stages without ids_microbatches")
    N, M = n_microbatches, max(1, in_flight)
    if pp_ranks is not None and len(pp_ranks) != P:
        raise ValueError(f"pp_ranks has {len(pp_ranks)} ranks for {P} stages")
    dev = stage.device
    if group is None and dist.get_backend() != "gloo":
        raise ValueError(
            "the ring schedule needs a gloo group for its messages under "
            f"{dist.get_backend()}: pass group=pipeline_ring_group()"
        )
    comm = _Comm(pp_ranks if pp_ranks is not None else range(P), dev, group)
    stats = PipelineStats(iters=[1 if explicit else 0] * N)
    vocab = stage.config.vocab_size
    if loss_fn is None:

        def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return default_loss(logits, targets, vocab)

    timer = _Timer()
    amp = autocast if autocast is not None else contextlib.nullcontext  # forward compute only

    # ---------------------------------------------------------------- 1. injection
    mbs: dict[int, _MB] = {}
    u_graph: list[torch.Tensor] = []
    t_phase = time.perf_counter()
    if stage.is_first:
        assert ids_microbatches is not None
        d = stage.config.d_model
        for i, ids in enumerate(ids_microbatches):
            with torch.enable_grad(), timer, amp():
                u = stage.embed(ids)
            u_graph.append(u)
            zdt = upcast(stage.embedding.weight[:1]).dtype
            shape = (ids.shape[0], _local_positions(ids.shape[1]), d)
            inj = 0 if explicit else u.shape[-1]  # explicit: nothing to inject elsewhere
            meta = torch.tensor(
                [i, *ids.shape, inj, _DTYPES.index(u.dtype), _DTYPES.index(zdt)], device=dev
            )
            for s in range(1, P):
                comm.send(meta, s, TAG_U)
                if not explicit:
                    comm.send(u, s, TAG_U)
            leaf = u.detach().requires_grad_(True)
            mbs[i] = _MB(shape, zdt, None, leaf) if explicit else _MB(shape, zdt, leaf)

    def get_mb(i: int) -> _MB:
        """Stages > 0: the cached injection of micro-batch i (received on first sight, in order)."""
        while i not in mbs:
            meta = comm.recv((6,), torch.long, 0, TAG_U)
            j, b, l_, inj, udt, zdt = (int(x) for x in meta.tolist())
            u = comm.recv((b, l_, inj), _DTYPES[udt], 0, TAG_U) if inj else None
            shape = (b, _local_positions(l_), stage.config.d_model)
            mbs[j] = _MB(shape, _DTYPES[zdt], u.requires_grad_(True) if inj else None)
        return mbs[i]

    # ---------------------------------------------------------------- 2. forward ring
    first = get_mb(0) if not stage.is_first else mbs[0]
    if stage.is_first and any(mbs[i].shape != first.shape for i in range(N)):
        raise ValueError("all micro-batches must have the same shape")
    comm.setup_ring(first.shape, first.zdtype, depth=max(2, M))
    stats.iterate_shape = tuple(first.shape)

    def stage_phantom(mb: _MB, j: int, z: torch.Tensor) -> torch.Tensor:
        # stage 0's input of step 1 is the detached z*; every other input carries a gradient
        # (explicit models: stage 0's input is the embedding leaf, whose gradient goes to e)
        if mb.z0 is not None and z is mb.z0:
            x = z
        else:
            x = z.detach().requires_grad_(j > 1 or not stage.is_first)
        with torch.enable_grad(), timer, amp():
            out = stage(x, mb.u)
        mb.saved[j] = (x, out)
        return out

    if stage.is_first:
        comm.open(P - 1, TAG_RET)
        pending = deque(range(N))
        ring: deque[int] = deque()  # micro-batches in flight, in ring order

        def start(i: int, kind: int, step: int, z: torch.Tensor) -> None:
            mb = mbs[i]
            if kind == K_SOLVE:
                with torch.no_grad(), timer, amp():
                    out = stage(z, mb.u)
            else:
                out = stage_phantom(mb, step, z)
            comm.put(1, TAG_FWD, kind, i, step, 0, out)
            ring.append(i)

        def start_new() -> None:
            i = pending.popleft()
            mb = mbs[i]
            z0 = mb.z0 if mb.z0 is not None else torch.zeros(mb.shape, dtype=mb.zdtype, device=dev)
            start(i, K_SOLVE if cap > 0 else K_PHANTOM, 1, z0)

        while pending and len(ring) < M:
            start_new()
        while ring:
            kind, i, step, flag, z = comm.get(P - 1, TAG_RET)
            assert ring.popleft() == i, "ring order broken"
            if kind == K_SOLVE:
                stats.iters[i] = step
                if flag and evaluate:  # solved; the last stage applied the head
                    if pending:
                        start_new()
                elif flag:  # solved: z is the best iterate, continue with phantom step 1
                    start(i, K_PHANTOM, 1, z)
                else:
                    start(i, K_SOLVE, step + 1, z)
            elif step < k:
                start(i, K_PHANTOM, step + 1, z)
            elif pending:
                start_new()
        comm.put(1, TAG_FWD, K_STOP, -1)
        comm.pad(1, TAG_FWD)
        comm.close(P - 1, TAG_RET)
    else:
        comm.open(rank - 1, TAG_FWD)
        while True:
            kind, i, step, flag, z = comm.get(rank - 1, TAG_FWD)
            if kind == K_STOP:
                if stage.is_last:
                    comm.pad(0, TAG_RET)
                else:
                    comm.put(rank + 1, TAG_FWD, K_STOP, -1)
                    comm.pad(rank + 1, TAG_FWD)
                break
            mb = get_mb(i)
            if kind == K_SOLVE:
                stats.iters[i] = step
                with torch.no_grad(), timer, amp():
                    out = stage(z, mb.u)
            else:
                out = stage_phantom(mb, step, z)
            if not stage.is_last:
                comm.put(rank + 1, TAG_FWD, kind, i, step, 0, out)
                continue
            if kind == K_SOLVE:
                with timer:
                    done = _solver_update(mb, out, step, cap, tol)
                stats.iters[i] = step
                if done and evaluate:
                    with torch.no_grad(), timer, amp():
                        logits = stage.head(mb.track.best, gather=gather_logits)
                        mb.loss = loss_fn(logits, targets_microbatches[i])
                    if keep_logits:
                        mb.logits = logits
                    comm.put(0, TAG_RET, K_SOLVE, i, step, 1)
                    continue
                comm.put(0, TAG_RET, K_SOLVE, i, step, int(done), mb.track.best if done else out)
                continue
            # phantom step on the last stage: damping with z_{j-1} held here
            if step == 1:
                if mb.track is not None:
                    zp = mb.track.best.detach()
                else:  # no solve ran (cap 0): the phantom steps start from zeros
                    zp = torch.zeros(mb.shape, dtype=mb.zdtype, device=dev)
            else:
                zp = mb.saved[step - 1][2].detach().requires_grad_(True)
            with torch.enable_grad(), timer, amp():
                zj = damped(out, zp, lam)
            mb.saved[step] = (*mb.saved[step], zj, zp)
            if step < k:
                comm.put(0, TAG_RET, K_PHANTOM, i, step, 0, zj)
            else:
                tgt = targets_microbatches[i]
                with torch.enable_grad(), timer, amp():
                    logits = stage.head(zj, gather=gather_logits)
                    mb.loss = loss_fn(logits, tgt)
                if keep_logits:
                    mb.logits = logits.detach()
                comm.put(0, TAG_RET, K_PHANTOM, i, step, 1)
        comm.close(rank - 1, TAG_FWD)
    comm.flush()
    stats.total_s["forward"] = time.perf_counter() - t_phase
    stats.compute_s["forward"], stats.wait_s["forward"] = timer.s, comm.wait
    losses: list[torch.Tensor] = []
    if stage.is_last:
        for i in range(N):
            mb = mbs[i]
            b = mb.shape[0]
            if explicit:  # as the single-process model: one evaluation, nothing to converge
                one, zero = torch.ones(b, dtype=torch.long, device=dev), torch.zeros(b, device=dev)
                stats.solver.append(SolverStats(1, zero, one, 1.0, "explicit"))
                losses.append(mb.loss.detach())
                if keep_logits:
                    stats.logits.append(mb.logits)
                continue
            if mb.track is not None:
                stats.solver.append(mb.track.stats())
            else:  # cap 0: nothing evaluated
                nan = torch.full((b,), float("nan"), device=dev)
                zeros = torch.zeros(b, dtype=torch.long, device=dev)
                stats.solver.append(SolverStats(0, nan, zeros, tol, "train"))
            losses.append(mb.loss.detach())
            if keep_logits:
                stats.logits.append(mb.logits)
    if not backward:
        return losses, stats

    # ---------------------------------------------------------------- 3. backward ring
    timer.s, comm.wait = 0.0, 0.0
    t_phase = time.perf_counter()

    def back(out: torch.Tensor, g: torch.Tensor) -> None:
        with timer:
            torch.autograd.backward(out, g)

    if stage.is_last:
        comm.open(0, TAG_BRET)
        pending = deque(range(N))
        ring = deque()

        def bwd_step(i: int, j: int, g: torch.Tensor | None) -> None:
            """Backward of phantom step j on the last stage; g: grad of z_j (None: the loss)."""
            mb = mbs[i]
            x, out, zj, zp = mb.saved[j]
            if g is None:
                with timer:
                    (loss_scale * mb.loss).backward()
            else:
                back(zj, g)
            gx = x.grad if x.grad is not None else torch.zeros_like(x)
            comm.put(P - 2, TAG_BWD, K_PHANTOM, i, j, 0, gx)
            ring.append(i)

        while pending and len(ring) < M:
            bwd_step(pending.popleft(), k, None)
        while ring:
            _, i, j, _, g0 = comm.get(0, TAG_BRET)
            assert ring.popleft() == i, "backward ring order broken"
            mb = mbs[i]
            if j > 1:
                zp = mb.saved[j][3]
                g = g0 if zp.grad is None else g0 + zp.grad
                mb.saved.pop(j)
                bwd_step(i, j - 1, g)
            else:
                mb.saved.clear()
                if pending:
                    bwd_step(pending.popleft(), k, None)
        comm.put(P - 2, TAG_BWD, K_STOP, -1)
        comm.pad(P - 2, TAG_BWD)
        comm.close(0, TAG_BRET)
    else:
        comm.open(rank + 1, TAG_BWD)
        while True:
            kind, i, j, _, g = comm.get(rank + 1, TAG_BWD)
            if kind == K_STOP:
                if rank > 0:
                    comm.put(rank - 1, TAG_BWD, K_STOP, -1)
                    comm.pad(rank - 1, TAG_BWD)
                else:
                    comm.pad(P - 1, TAG_BRET)
                break
            mb = mbs[i]
            x, out = mb.saved.pop(j)
            back(out, g)
            if rank > 0:
                comm.put(rank - 1, TAG_BWD, K_PHANTOM, i, j, 0, x.grad)
            else:  # stage 0's input-gradient goes on to the last stage (z_{j-1} path)
                comm.put(P - 1, TAG_BRET, K_PHANTOM, i, j, 0, x.grad if j > 1 else None)
        comm.close(rank + 1, TAG_BWD)

    # ---------------------------------------------------------------- 4. u and embedding grads
    if stage.is_first:
        for i in range(N):
            mb = mbs[i]
            if explicit:  # the embedding's gradient arrived through stage 0's input
                gz = mb.z0.grad
                back(u_graph[i], gz if gz is not None else torch.zeros_like(mb.z0))
                continue
            gu = mb.u.grad if mb.u.grad is not None else torch.zeros_like(mb.u)
            for s in range(1, P):
                gu = gu + comm.recv(mb.u.shape, mb.u.dtype, s, TAG_UGRAD)
            back(u_graph[i], gu)
    elif not explicit:
        for i in range(N):
            mb = mbs[i]
            comm.send(mb.u.grad if mb.u.grad is not None else torch.zeros_like(mb.u), 0, TAG_UGRAD)
    if stage.tied and (stage.is_first or stage.is_last):
        w = stage.embedding.weight
        mine = w.grad.clone() if w.grad is not None else torch.zeros_like(w)
        other = P - 1 if stage.is_first else 0
        comm.send(mine, other, TAG_EMB)
        theirs = comm.recv(w.shape, w.dtype, other, TAG_EMB)
        # same order of addition on both ends: stage 0's part + last stage's part
        total = mine + theirs if stage.is_first else theirs + mine
        w.grad = total
    comm.flush()
    stats.total_s["backward"] = time.perf_counter() - t_phase
    stats.compute_s["backward"], stats.wait_s["backward"] = timer.s, comm.wait
    return losses, stats


@torch.no_grad()
def _local_positions(length: int) -> int:
    """Positions of a length-``length`` sequence this rank holds (l / tp sequence parallel)."""
    if not sequence_parallel_active():
        return length
    tp = tp_world_size()
    if length % tp:
        raise ValueError(
            f"sequence parallelism needs the sequence length ({length}) to be a multiple of the "
            f"tensor-parallel size {tp}"
        )
    return length // tp


def _solver_update(mb: _MB, fz: torch.Tensor, it: int, cap: int, tol: float) -> bool:
    """Last stage: evaluation ``it`` of the solve of one micro-batch, through the same
    :class:`~ilm_megatron.implicit.solver.FixedPointTracker` as :func:`solve` (the ring starts
    every solve from zeros). ``fz``: (b, l, d) = F(z). Returns True when the micro-batch stops."""
    if it == 1:
        reduce = tp_sum if sequence_parallel_active() else None
        mb.track = FixedPointTracker(torch.zeros_like(fz), cap, tol, reduce)
    assert mb.track is not None and mb.track.it == it - 1, "solver evaluations out of order"
    return mb.track.update(fz)


__all__ = [
    "EPS",
    "PipelineStage",
    "PipelineStats",
    "default_loss",
    "pipeline_forward_backward",
    "split_model_into_stages",
    "stage_layer_range",
]
