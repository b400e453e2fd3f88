"""Pipeline-parallel ring schedule for the whole-stack fixed point (DESIGN §4, docs/pipeline.md).

The implicit model iterates ``F`` = all blocks + final norm, so with ``P`` stages the iterate goes
round a ring ``0 -> 1 -> ... -> P-1 -> 0``. The pieces, in the order a reader follows one
micro-batch:

* :class:`PipelineStage`: this rank's layers (stage 0 the embedding and injection, the last stage
  the final norm and head).
* :class:`_Ring`: the schedule of one stage in ticks. Stage 0 admits a micro-batch (embeds it;
  its ``u`` travels once round the ring with the first message), every stage evaluates its
  layers per solver iteration (no grad) and per phantom step (autograd, or recompute), the last
  stage takes the stop decision with the same
  :class:`~ilm_megatron.implicit.solver.FixedPointTracker` as :func:`solve`, applies the damping
  and the loss, and starts the micro-batch's backward as soon as its loss exists. The backward of
  each phantom step runs ``P-1 -> ... -> 0`` and stage 0's input-gradient comes round to the last
  stage for the damping path; step 1's message carries the summed injection gradient to stage 0.
  Stage 0 admits the next micro-batch when one finishes, so at most ``in_flight`` micro-batches'
  activations are held.
* :class:`~ilm_megatron.parallel.p2p.RingTransport`: one exchange per tick with both neighbours
  (paired, untagged ``batch_isend_irecv``: NCCL or gloo, one code path; headers then payloads;
  1/tp slices under TP; optional bf16 wire; bytes counted).
* After the ring, the tied embedding's two copies sum their gradients over Megatron's embedding
  group.

**TP x PP**: with a tensor-parallel group inside each stage (``backend=tp`` model), every TP rank
runs its own ring with the ranks of the same TP rank in the other stages (``pp_ranks``, Megatron's
pipeline group; see :func:`ilm_megatron.core.parallel_state.pp_global_ranks`). The iterate ``z`` is
replicated over the TP group (row-parallel outputs are all-reduced), and each TP rank sends a 1/tp
slice of it; under sequence parallelism it is this TP rank's l / tp positions (the residual summed
over the TP group). The injection ``u`` is this TP rank's column shard. The TP collectives of a
stage run in the same order on all its TP ranks because they see the same headers.
"""

from __future__ import annotations

import contextlib
import functools
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
from ilm_megatron.implicit.phantom import _rng_state, _set_rng_state
from ilm_megatron.implicit.solver import (
    EPS,
    PICARD,
    FixedPointTracker,
    SolveOptions,
    SolverStats,
    damped,
    solve_options,
)
from ilm_megatron.models.init import stage_layer_range
from ilm_megatron.models.stack import upcast
from ilm_megatron.parallel.p2p import (
    K_BWD,
    K_DONE,
    K_NONE,
    K_PHANTOM,
    K_SOLVE,
    K_STOP,
    NONE,
    Message,
    RingTransport,
)

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


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
        compute_s: seconds of forward ("forward") and backward ("backward") compute.
        wait_s / total_s: ``"ring"``: seconds blocked in exchanges (``wait_s`` also by phase:
            ``"header"``, ``"payload"``, ``"embedding"``), and of the whole call.
        iterate_shape: (b, l_local, d) of the iterate this rank stores and sends (``l / tp``
            positions under sequence parallelism).
        sent_bytes: bytes this rank sent, by kind: ``iterate`` (forward messages), ``grad``
            (backward), ``header``, ``injection``, ``injection_grad``, ``embedding``.
        messages: forward (``iterate``) and backward (``grad``) payload messages sent.
    """

    iters: list[int] = field(default_factory=list)
    solver: list[SolverStats] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    compute_s: dict[str, float] = field(default_factory=dict)
    wait_s: dict[str, float] = field(default_factory=dict)
    total_s: dict[str, float] = field(default_factory=dict)
    iterate_shape: tuple[int, ...] = ()
    sent_bytes: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)

    def bubble(self) -> float:
        """Idle fraction ``1 - (forward + backward compute) / total`` of the call on this rank."""
        t = self.total_s.get("ring", 0.0)
        return 1.0 - sum(self.compute_s.values()) / t if t > 0 else 0.0


class _Timer:
    """Accumulates the seconds spent inside ``with timer:`` blocks (compute time)."""

    def __init__(self) -> None:
        self.s = 0.0
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.s += time.perf_counter() - self._t0


@dataclass
class _Step:
    """What one stage keeps of phantom step ``j`` of one micro-batch for its backward.

    ``x`` is the stage input (a leaf), ``out`` the stage output: with autograd the output with its
    graph; under ``phantom_impl=recompute`` a detached leaf, the graph being rebuilt from ``x``
    in backward (``rng``: the generator state the forward ran from). On the last stage ``zj`` is
    the damped iterate and ``zp`` the leaf ``z_{j-1}`` of the damping term.
    """

    x: torch.Tensor
    out: torch.Tensor
    rng: tuple | None = None
    zj: torch.Tensor | None = None
    zp: torch.Tensor | None = None


@dataclass
class _MB:
    """Per micro-batch state on one stage, from its first message to its last."""

    u: torch.Tensor | None  # leaf (b, l, inj) that accumulates this stage's u-gradient
    z0: torch.Tensor | None = None  # explicit models, stage 0: the embedding leaf (b, l, d)
    u_graph: torch.Tensor | None = None  # stage 0: the embedding/injection output with its graph
    track: FixedPointTracker | None = None  # last stage: the solve's state
    steps: dict[int, _Step] = field(default_factory=dict)
    zj: torch.Tensor | None = None  # last stage: the latest damped iterate (detached)
    loss: torch.Tensor | None = None


def _grad(t: torch.Tensor) -> torch.Tensor:
    return t.grad if t.grad is not None else torch.zeros_like(t)


class _Ring:
    """One stage's part of the ring schedule (see :func:`pipeline_forward_backward`).

    A reader can follow one micro-batch through :meth:`admit` (stage 0), :meth:`forward` (each
    stage in turn, once per solver evaluation and phantom step), :meth:`forward_last` (the stop
    decision, the damping and the loss), then :meth:`backward` / :meth:`backward_last` (each
    phantom step from the last stage back to stage 0), and its end in :meth:`finish_first`.
    :meth:`run` is the schedule: one forward and one backward piece per tick, then one exchange
    with both neighbours (:class:`~ilm_megatron.parallel.p2p.RingTransport`).
    """

    def __init__(self, stage: PipelineStage, opts: dict[str, Any]) -> None:
        self.stage = stage
        self.__dict__.update(opts)
        self.mbs: dict[int, _MB] = {}
        self.t_fwd, self.t_bwd = _Timer(), _Timer()
        self.pending = deque(range(self.N))  # stage 0: micro-batches not yet admitted
        self.live = 0  # stage 0: admitted and not finished
        self.finished = 0  # stage 0
        self.bwd_queue: deque[int] = deque()  # last stage: losses waiting for the backward ring
        self.losses: dict[int, torch.Tensor] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.solver: dict[int, SolverStats] = {}
        self.iters = [1 if self.explicit else 0] * self.N

    # ------------------------------------------------------------------ the stage's F
    def run_stage(self, mb: _MB, kind: int, step: int, z: torch.Tensor) -> torch.Tensor:
        """One evaluation of this stage's layers: no-grad for the solve; for phantom step
        ``step`` with autograd (or, under recompute, no-grad now and again in backward)."""
        if kind == K_SOLVE:
            with torch.no_grad(), self.t_fwd, self.amp():
                return self.stage(z, mb.u)
        # stage 0's input of step 1 is the detached z*; every other input carries a gradient
        # (explicit models: stage 0's input is the embedding leaf, whose gradient goes to e)
        if mb.z0 is not None and z is mb.z0:
            x = z
        else:
            x = z.detach().requires_grad_(self.grads and (step > 1 or not self.stage.is_first))
        keep = self.grads
        if self.recompute and keep:
            rng = _rng_state(x.device)
            with torch.no_grad(), self.t_fwd, self.amp():
                out = self.stage(x, mb.u)
            out = out.requires_grad_(True)  # a leaf: the graph is rebuilt in backward
            mb.steps[step] = _Step(x, out, rng)
            return out
        with torch.enable_grad(), self.t_fwd, self.amp():
            out = self.stage(x, mb.u)
        if keep:
            mb.steps[step] = _Step(x, out)
        return out

    def backward_stage(self, mb: _MB, rec: _Step, g: torch.Tensor | None) -> None:
        """Backward of this stage's layers for one phantom step. ``g``: the gradient of the
        stage output (None: it is already on ``rec.out``, set by the loss or the damping)."""
        with self.t_bwd:
            if rec.rng is None:
                if g is not None:
                    torch.autograd.backward(rec.out, g)
                return
            g = rec.out.grad if g is None else g
            if g is None:
                return
            dev = rec.x.device
            cuda = [dev] if dev.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):
                _set_rng_state(dev, rec.rng)
                with torch.enable_grad(), self.amp():
                    out = self.stage(rec.x, mb.u)
            torch.autograd.backward(out, g)

    # ------------------------------------------------------------------ forward pieces
    def admit(self) -> Message:
        """Stage 0: embed the next micro-batch and send its first evaluation (with ``u``)."""
        i = self.pending.popleft()
        self.live += 1
        if i == 0 and self.first_u is not None:  # embedded before the ring started
            u = self.first_u
        else:
            with torch.enable_grad(), self.t_fwd, self.amp():
                u = self.stage.embed(self.ids[i])
        leaf = u.detach().requires_grad_(self.grads)
        if self.explicit:
            mb = self.mbs[i] = _MB(None, z0=leaf, u_graph=u)
            z = leaf
        else:
            mb = self.mbs[i] = _MB(leaf, u_graph=u)
            z = torch.zeros(self.z_shape, dtype=self.z_dtype, device=self.dev)
        kind = K_SOLVE if self.cap > 0 else K_PHANTOM
        out = self.run_stage(mb, kind, 1, z)
        return Message(kind, i, 1, 0, out, u=None if self.explicit else u)

    def forward(self, msg: Message) -> Message:
        """The forward piece of a tick: what arrived from the previous stage, evaluated."""
        if msg.kind in (K_NONE, K_STOP):
            return NONE
        i, step = msg.mb, msg.step
        if msg.kind == K_SOLVE:
            self.iters[i] = step
        if self.stage.is_first:  # a message back from the last stage
            mb = self.mbs[i]
            if msg.kind == K_SOLVE and msg.flag and self.evaluate:
                self.finish_first(i)
                return NONE
            if msg.kind == K_SOLVE and msg.flag:  # solved: z is the best iterate
                kind, step = K_PHANTOM, 1
            elif msg.kind == K_SOLVE:
                kind, step = K_SOLVE, step + 1
            elif msg.kind == K_PHANTOM:
                kind, step = K_PHANTOM, step + 1
            else:  # K_DONE: the loss is computed
                if not self.grads:
                    self.finish_first(i)
                return NONE
            return Message(kind, i, step, 0, self.run_stage(mb, kind, step, msg.z))
        if i not in self.mbs:  # first sight (implicit models: u comes with it)
            u = msg.u.requires_grad_(self.grads) if msg.u is not None else None
            self.mbs[i] = _MB(u)
        mb = self.mbs[i]
        out = self.run_stage(mb, msg.kind, step, msg.z)
        if not self.stage.is_last:
            if not self.grads and msg.kind == K_PHANTOM and step == self.k:
                del self.mbs[i]  # forward only: nothing more comes for it here
            return Message(msg.kind, i, step, 0, out, u=msg.u)
        return self.forward_last(mb, i, msg.kind, step, out)

    def forward_last(self, mb: _MB, i: int, kind: int, step: int, out: torch.Tensor) -> Message:
        """Last stage: the stop decision of a solver evaluation, or the damping of a phantom step
        (and after the last one the head and the loss)."""
        if kind == K_SOLVE:
            with self.t_fwd:
                done = _solver_update(mb, out, step, self.cap, self.tol, self.solve_opts)
            if done:
                self.solver[i] = mb.track.stats()
            if done and self.evaluate:
                with torch.no_grad(), self.t_fwd, self.amp():
                    logits = self.stage.head(mb.track.best, gather=self.gather_logits)
                    self.losses[i] = self.loss_fn(logits, self.targets[i]).detach()
                if self.keep_logits:
                    self.logits[i] = logits
                del self.mbs[i]
                return Message(K_SOLVE, i, step, 1)
            return Message(K_SOLVE, i, step, int(done), mb.track.best if done else mb.track.z)
        # phantom step: damping with z_{j-1} held here
        if step == 1:
            if mb.track is not None:
                base = mb.track.best
            else:  # no solve ran (cap 0): the phantom steps start from zeros
                base = torch.zeros(self.z_shape, dtype=self.z_dtype, device=self.dev)
        else:
            base = mb.zj
        zp = base.detach().requires_grad_(self.grads and step > 1)
        with torch.enable_grad(), self.t_fwd, self.amp():
            zj = damped(out, zp, self.lam)
        mb.zj = zj.detach()
        if self.grads:
            rec = mb.steps[step]
            rec.zj, rec.zp = zj, zp
        if step < self.k:
            return Message(K_PHANTOM, i, step, 0, zj)
        with torch.enable_grad(), self.t_fwd, self.amp():
            logits = self.stage.head(zj, gather=self.gather_logits)
            mb.loss = self.loss_fn(logits, self.targets[i])
        self.losses[i] = mb.loss.detach()
        if self.keep_logits:
            self.logits[i] = logits.detach()
        if self.grads:
            self.bwd_queue.append(i)
        else:
            del self.mbs[i]
        return Message(K_DONE, i, step)

    # ------------------------------------------------------------------ backward pieces
    def backward(self, msg: Message) -> Message:
        """The backward piece of a tick: the gradient from the next stage through this stage's
        layers (the last stage: a new loss when nothing arrived)."""
        if self.stage.is_last:
            return self.backward_last(msg)
        if msg.kind != K_BWD:
            return NONE
        i, j = msg.mb, msg.step
        mb = self.mbs[i]
        rec = mb.steps.pop(j)
        self.backward_stage(mb, rec, msg.z)
        if self.stage.is_first:
            if j > 1:  # on to the last stage, for the z_{j-1} path
                return Message(K_BWD, i, j, 0, _grad(rec.x))
            self.finish_first(i, msg.gu)
            return NONE
        out = Message(K_BWD, i, j, 0, _grad(rec.x))
        if j == 1:  # this stage is done with mb: pass the injection gradient on
            if mb.u is not None:
                out.gu = _grad(mb.u) if msg.gu is None else msg.gu + _grad(mb.u)
            del self.mbs[i]
        return out

    def backward_last(self, msg: Message) -> Message:
        """Last stage: phantom step ``j - 1`` once stage 0's input-gradient of step ``j`` has come
        round (added to the damping term's gradient), or the loss of a waiting micro-batch."""
        if msg.kind == K_BWD:
            i, j = msg.mb, msg.step
            mb = self.mbs[i]
            zp = mb.steps.pop(j).zp
            g = msg.z if zp.grad is None else msg.z + zp.grad
            j -= 1
        elif self.bwd_queue:
            i, j, g = self.bwd_queue.popleft(), self.k, None
            mb = self.mbs[i]
        else:
            return NONE
        rec = mb.steps[j]
        with self.t_bwd:
            if g is None:
                (self.loss_scale * mb.loss).backward()
                mb.loss = None
            else:
                torch.autograd.backward(rec.zj, g)
        self.backward_stage(mb, rec, None)
        out = Message(K_BWD, i, j, 0, _grad(rec.x))
        if j == 1:
            if mb.u is not None:
                out.gu = _grad(mb.u)
            del self.mbs[i]
        return out

    def finish_first(self, i: int, gu: torch.Tensor | None = None) -> None:
        """Stage 0: micro-batch ``i`` is done; with backward, its injection gradient (summed over
        the stages: ``gu`` from the others plus this stage's) goes through the embedding."""
        mb = self.mbs.pop(i)
        if self.grads:
            with self.t_bwd:
                if self.explicit:  # the embedding's gradient arrived through stage 0's input
                    torch.autograd.backward(mb.u_graph, _grad(mb.z0))
                else:
                    g = _grad(mb.u) if gu is None else gu + _grad(mb.u)
                    torch.autograd.backward(mb.u_graph, g)
        self.live -= 1
        self.finished += 1

    # ------------------------------------------------------------------ schedule
    def run(self, transport: RingTransport) -> None:
        """Ticks until every micro-batch is done: a forward piece, a backward piece, stage 0's
        admission, then one exchange with both neighbours."""
        fwd_in, bwd_in = NONE, NONE
        first = self.stage.is_first
        while transport.open:
            bwd_out = self.backward(bwd_in)
            fwd_out = self.forward(fwd_in)
            if first and fwd_out.kind == K_NONE and self.pending and self.live < self.M:
                fwd_out = self.admit()
            if (first and self.finished == self.N) or not all(transport.live.values()):
                fwd_out = bwd_out = Message(K_STOP)
            fwd_in, bwd_in = transport.exchange(fwd_out, bwd_out)
        if self.evaluate and not self.stage.is_first:  # stages between never see a solve end
            self.mbs.clear()
        assert not self.mbs and not self.bwd_queue, "ring ended with micro-batches in flight"


class _Held:
    """A saved tensor as autograd holds it; gives its bytes back to the counter when freed."""

    __slots__ = ("t", "n", "owner")

    def __init__(self, t: torch.Tensor, n: int, owner: SavedTensorBytes) -> None:
        self.t, self.n, self.owner = t, n, owner

    def __del__(self) -> None:
        self.owner.live -= self.n


class SavedTensorBytes:
    """Context manager: the bytes autograd holds for backward inside the block, live and peak.

    Every tensor saved for backward goes through ``torch.autograd.graph.saved_tensors_hooks``;
    its bytes count from when it is saved until autograd frees it (after its backward, or when
    the graph is dropped). Tensors sharing a parameter's storage (weights saved by matmuls) do not
    count: they are not activations.

    Args:
        params: the parameters to leave out.
    """

    def __init__(self, params: Sequence[torch.Tensor] = ()) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.live = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if t.untyped_storage().data_ptr() in self.params:
            return t
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        return _Held(t, n, self)

    @staticmethod
    def _unpack(h: Any) -> torch.Tensor:
        return h.t if isinstance(h, _Held) else h

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _in_stage_layout(fn: Callable) -> Callable:
    """Run the ring inside :func:`sequence_parallel_region` when the stage is sequence parallel."""

    @functools.wraps(fn)
    def wrapper(stage: PipelineStage, *args: Any, **kwargs: Any) -> Any:
        with sequence_parallel_region(getattr(stage, "sequence_parallel", False)):
            return fn(stage, *args, **kwargs)

    return wrapper


def _embedding_group(stage: PipelineStage, ranks: Sequence[int]) -> dist.ProcessGroup | None:
    """Megatron-Core's embedding group (first and last stage of this pipeline) when it joins
    exactly this ring's first and last ranks; None otherwise (a paired exchange is used)."""
    from ilm_megatron.core.parallel_state import tp_is_initialized

    if not tp_is_initialized():
        return None
    from megatron.core import parallel_state as ps

    try:
        group = ps.get_embedding_group()
    except (AssertionError, RuntimeError):
        return None
    if group is None or not ps.is_rank_in_embedding_group():
        return None
    if sorted(dist.get_process_group_ranks(group)) != sorted({ranks[0], ranks[-1]}):
        return None
    return group


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
    wire_dtype: torch.dtype | None = None,
    sum_tied_embedding: bool = True,
) -> tuple[list[torch.Tensor], PipelineStats]:
    """Solve, phantom steps and backward of ``N`` micro-batches on a ring of ``P`` stages.

    Every rank of the pipeline calls this with its own stage. Gradients are accumulated into the
    ``.grad`` of the parameters of each stage (``loss_scale * sum`` over micro-batches of each
    micro-batch's loss), exactly as a single process running ``model(ids_i)`` and
    ``(loss_scale * loss_i).backward()`` for each ``i``; calling it several times before an
    optimizer step accumulates further (gradient accumulation over ring calls).

    Args:
        stage: this rank's :class:`PipelineStage`.
        ids_microbatches: stage 0: N tensors (b, l) of token ids; ignored elsewhere (may be None).
        targets_microbatches: last stage: N tensors (b, l) of targets; ignored elsewhere.
        cfg: a :class:`~ilm_megatron.config.SolverConfig` (or a full Config); default: the model's.
            Its ``phantom_impl=recompute`` keeps only each phantom step's stage input and
            evaluates the stage again in backward.
        n_microbatches: N, needed on stages that get no ``ids_microbatches``.
        in_flight: M, micro-batches admitted and not finished (their activations are what the
            stages hold); stage 0 admits the next one when one finishes its backward. At most
            ``P`` are in the forward ring at once; the others are in the backward ring.
        pp_ranks: global ranks of stages ``0..P-1`` (default ``range(P)``). Under TP x PP: this
            rank's pipeline group, :func:`~ilm_megatron.core.parallel_state.pp_global_ranks`.
        loss_fn: ``(logits (b, l, V'), targets (b, l)) -> scalar``; default mean cross-entropy.
        loss_scale: multiplies each loss before backward (e.g. ``1 / N``).
        max_iter: solver cap override (default ``f_max_iter``).
        backward: False runs the forward ring only (solve + phantom forward, no gradients).
        keep_logits: the last stage keeps each micro-batch's detached training-mode logits
            (b, l, padded_vocab) in ``stats.logits`` (for checks; costs N logits tensors).
        autocast: a context factory (e.g. bf16 ``torch.autocast``) entered around every forward
            computation (embedding, stages, damping, head and loss, and the recomputation),
            never around backward.
        group: the pipeline process group holding ``pp_ranks`` (default: the default group);
            NCCL or gloo, the same code path.
        evaluate: the evaluation solve instead of training: the solve only (``cfg``'s cap and
            tolerance: pass the eval ones), then the head on each micro-batch's best iterate, as
            the single-process model's training-rule eval solve; no phantom steps, no backward.
        gather_logits: False hands ``loss_fn`` this TP rank's logits columns (b, l, V' / tp)
            for a vocab-parallel loss; True the gathered (b, l, V').
        wire_dtype: dtype of the iterates and gradients between stages (None: the iterate's;
            ``torch.bfloat16`` halves the bytes, see docs/pipeline.md for what it costs).
        sum_tied_embedding: sum the tied embedding's two gradients (stage 0's and the last
            stage's) at the end of this call. With several ring calls per optimizer step pass
            True on the last call only: the sum then covers every call once (as Megatron's
            embedding all-reduce after the last micro-batch).

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
    P = stage.pp_size
    if ids_microbatches is not None and stage.is_first:
        n_microbatches = len(ids_microbatches)
    if n_microbatches is None:
        raise ValueError("n_microbatches is required on stages without ids_microbatches")
    N, M = n_microbatches, max(1, in_flight)
    if pp_ranks is not None and len(pp_ranks) != P:
        raise ValueError(f"pp_ranks has {len(pp_ranks)} ranks for {P} stages")
    ranks = list(pp_ranks) if pp_ranks is not None else list(range(P))
    dev = stage.device
    vocab = stage.config.vocab_size
    if loss_fn is None:

        def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return default_loss(logits, targets, vocab)

    t0 = time.perf_counter()
    amp = amp_ctx(autocast)
    # shapes and dtypes of the iterate and the injection, from stage 0 to every stage (stage 0
    # embeds its first micro-batch now to learn them)
    meta = torch.zeros(8, dtype=torch.long, device=dev)
    first_u = None
    if stage.is_first:
        assert ids_microbatches is not None
        if len({tuple(ids.shape) for ids in ids_microbatches}) != 1:
            raise ValueError("all micro-batches must have the same shape")
        with torch.enable_grad(), amp():
            first_u = stage.embed(ids_microbatches[0])
        zdt = upcast(stage.embedding.weight[:1]).dtype
        ushape = (0, 0, 0) if explicit else tuple(first_u.shape)
        b, length = ids_microbatches[0].shape
        meta.copy_(
            torch.tensor(
                [b, length, stage.config.d_model, *ushape]
                + [_DTYPES.index(first_u.dtype), _DTYPES.index(zdt)]
            )
        )
    dist.broadcast(meta, ranks[0], group=group)
    b, length, d, *ushape, udt, zdt = (int(x) for x in meta.tolist())
    z_shape = (b, _local_positions(length), d)
    u_shape = tuple(ushape) if ushape[0] else None
    transport = RingTransport(
        ranks, stage.pp_rank, dev, group, z_shape, _DTYPES[zdt], u_shape, _DTYPES[udt], wire_dtype
    )
    ring = _Ring(
        stage,
        dict(
            N=N,
            M=M,
            cap=cap,
            tol=tol,
            solve_opts=solve_options(s_cfg),
            k=k,
            lam=lam,
            explicit=explicit,
            evaluate=evaluate,
            grads=backward,
            recompute=getattr(s_cfg, "phantom_impl", "autograd") == "recompute",
            ids=ids_microbatches,
            targets=targets_microbatches,
            loss_fn=loss_fn,
            loss_scale=loss_scale,
            keep_logits=keep_logits,
            gather_logits=gather_logits,
            amp=amp,
            first_u=first_u,
            dev=dev,
            z_shape=z_shape,
            z_dtype=_DTYPES[zdt],
        ),
    )
    ring.run(transport)

    # the tied embedding: stage 0's and the last stage's gradients summed on both
    if backward and sum_tied_embedding and stage.tied and (stage.is_first or stage.is_last):
        w = stage.embedding.weight
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        other = ranks[-1] if stage.is_first else ranks[0]
        transport.all_reduce_pair(w.grad, other, _embedding_group(stage, ranks))

    stats = PipelineStats(iters=ring.iters, iterate_shape=z_shape)
    stats.total_s["ring"] = time.perf_counter() - t0
    stats.compute_s = {"forward": ring.t_fwd.s, "backward": ring.t_bwd.s}
    stats.wait_s = {"ring": transport.wait_s, **{k: v for k, v in transport.wait_by.items()}}
    stats.sent_bytes = dict(transport.sent)
    stats.messages = dict(transport.messages)
    losses: list[torch.Tensor] = []
    if stage.is_last:
        for i in range(N):
            if explicit:  # as the single-process model: one evaluation, nothing to converge
                one, zero = torch.ones(b, dtype=torch.long, device=dev), torch.zeros(b, device=dev)
                stats.solver.append(SolverStats(1, zero, one, 1.0, "explicit"))
            elif i in ring.solver:
                stats.solver.append(ring.solver[i])
            else:  # cap 0: nothing evaluated
                nan = torch.full((b,), float("nan"), device=dev)
                zeros = torch.zeros(b, dtype=torch.long, device=dev)
                stats.solver.append(SolverStats(0, nan, zeros, tol, "train"))
            losses.append(ring.losses[i])
            if keep_logits:
                stats.logits.append(ring.logits[i])
    return losses, stats


def amp_ctx(autocast: Callable[[], AbstractContextManager] | None) -> Callable:
    """The forward-compute context factory (``contextlib.nullcontext`` without autocast)."""
    return autocast if autocast is not None else contextlib.nullcontext


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


def _solver_update(
    mb: _MB, fz: torch.Tensor, it: int, cap: int, tol: float, opts: SolveOptions = PICARD
) -> bool:
    """Last stage: evaluation ``it`` of the solve of one micro-batch, through the same
    :class:`~ilm_megatron.implicit.solver.FixedPointTracker` as :func:`solve` (the ring starts
    every solve from zeros). ``fz``: (b, l, d) = F(z). Returns True when the micro-batch stops;
    the tracker's next iterate (``mb.track.z``: ``F(z)``, Anderson's mix, a damped fallback, or
    with early exit a stopped sample's frozen best iterate) is what goes round the ring."""
    if it == 1:
        reduce = tp_sum if sequence_parallel_active() else None
        mb.track = FixedPointTracker(torch.zeros_like(fz), cap, tol, reduce, opts)
    assert mb.track is not None and mb.track.it == it - 1, "solver evaluations out of order"
    return mb.track.update(fz)


__all__ = [
    "EPS",
    "PipelineStage",
    "PipelineStats",
    "SavedTensorBytes",
    "default_loss",
    "pipeline_forward_backward",
    "split_model_into_stages",
    "stage_layer_range",
]
