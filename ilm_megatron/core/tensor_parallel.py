"""Tensor-parallel layers for the ``tp`` spec backend (Megatron-style, pure torch.distributed).

* :class:`ColumnParallelLinear`: ``y_local = x W_local^T`` where ``W_local`` holds this rank's
  share of *every component* of a packed output (``partition_sizes``, e.g. Mamba2's
  ``[z, x, B, C, dt]``): rank r owns rows ``[r*p/tp, (r+1)*p/tp)`` of each component p. The input is
  replicated; its gradient is all-reduced over the TP group in backward.
* :class:`RowParallelLinear`: the input is sharded along features, the partial products are
  all-reduced (one all-reduce per layer in forward, identity in backward); the bias is replicated.

Sequence parallelism (``parallel.sequence_parallel``, Megatron's): inside
:func:`sequence_parallel_region` the activations between the TP layers (norms, the residual
stream, the fixed-point iterate) are kept split along the sequence, (b, l / tp, d) per rank. A
column layer all-gathers its input along the sequence first (reduce-scatter of the gradient), a
row layer reduce-scatters its output instead of all-reducing it (all-gather of the gradient),
the embedding reduce-scatters its partial lookups. Replicated parameters used there (the norms)
then see only this rank's positions: :func:`reduce_sequence_parallel_grads` sums their gradients
over the TP group after backward.

Every sharded parameter carries a layout (:func:`set_tp_layout`): the dimension it is split along
and the global sizes of its packed components. :mod:`ilm_megatron.parallel.checkpoint` uses it to
gather a sharded model into the single-process state dict and to shard a full one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ilm_megatron.core.parallel_state import tp_group, tp_rank, tp_world_size


def set_tp_layout(param: torch.Tensor, dim: int, parts: Sequence[int]) -> None:
    """Record that ``param`` is split along ``dim`` per component of global sizes ``parts``."""
    param.tp_dim = dim  # type: ignore[attr-defined]
    param.tp_parts = tuple(int(p) for p in parts)  # type: ignore[attr-defined]


def get_tp_layout(param: torch.Tensor) -> tuple[int, tuple[int, ...]] | None:
    """``(dim, global component sizes)`` of a sharded parameter, None for a replicated one."""
    dim = getattr(param, "tp_dim", None)
    return None if dim is None else (dim, param.tp_parts)  # type: ignore[attr-defined]


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_world_size() == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=tp_group())
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient in backward (input of column layers)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _all_reduce(g)


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward (output of row layers)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


_SP = {"active": False}


@contextlib.contextmanager
def sequence_parallel_region(enabled: bool = True) -> Iterator[None]:
    """Inside the block (with ``enabled`` and TP > 1) the TP layers keep activations split along
    the sequence (dim 1): column layers gather, row layers and the embedding reduce-scatter."""
    before = _SP["active"]
    _SP["active"] = bool(enabled) and tp_world_size() > 1
    try:
        yield
    finally:
        _SP["active"] = before


def sequence_parallel_active() -> bool:
    """Whether the TP layers run in the sequence-parallel layout now."""
    return _SP["active"]


def _gather_seq(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp_world_size())]
    dist.all_gather(parts, x, group=tp_group())
    return torch.cat(parts, dim=1)


def _reduce_scatter_seq(x: torch.Tensor) -> torch.Tensor:
    tp = tp_world_size()
    if x.shape[1] % tp:
        raise ValueError(
            f"sequence parallelism needs the sequence length ({x.shape[1]}) to be a multiple of "
            f"the tensor-parallel size {tp}"
        )
    chunks = [c.contiguous() for c in x.chunk(tp, dim=1)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=tp_group())
    return out


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence forward; reduce-scatter of the gradient (column inputs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _gather_seq(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _reduce_scatter_seq(g)


class _ReduceScatterSeq(torch.autograd.Function):
    """Reduce-scatter along the sequence forward; all-gather of the gradient (row outputs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _reduce_scatter_seq(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _gather_seq(g)


def gather_from_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """(b, l / tp, ...) on each rank -> (b, l, ...) on every rank, for a column-parallel
    consumer (the gradient, partial per rank, is reduce-scattered)."""
    return _GatherSeq.apply(x) if tp_world_size() > 1 else x


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Partial (b, l, ...) on each rank -> this rank's (b, l / tp, ...) slice of the sum."""
    return _ReduceScatterSeq.apply(x) if tp_world_size() > 1 else x


def tp_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the TP group (no autograd; a new tensor)."""
    return _all_reduce(x)


def sequence_parallel_grad_params(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The replicated (layout-free) parameters of ``params``: under sequence parallelism each TP
    rank's gradient of them covers only its positions."""
    return [p for p in params if get_tp_layout(p) is None]


def reduce_sequence_parallel_grads(params: Iterable[nn.Parameter]) -> None:
    """Sum the gradients of the replicated parameters over the TP group (after backward under
    sequence parallelism; a parameter without a gradient on every rank is skipped everywhere)."""
    if tp_world_size() == 1:
        return
    for p in sequence_parallel_grad_params(params):
        if p.grad is not None:
            dist.all_reduce(p.grad, group=tp_group())


def copy_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Replicated activation entering TP-local compute (gradients summed over ranks)."""
    return _CopyToTP.apply(x) if tp_world_size() > 1 else x


def reduce_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of all TP ranks."""
    return _ReduceFromTP.apply(x) if tp_world_size() > 1 else x


def _column_input(x: torch.Tensor) -> torch.Tensor:
    """The input of a column-parallel product: gathered along the sequence under sequence
    parallelism, else replicated (its gradient all-reduced)."""
    if sequence_parallel_active():
        return gather_from_sequence_parallel_region(x)
    return copy_to_tp_region(x)


def _row_output(y: torch.Tensor) -> torch.Tensor:
    """The partial sums of a row-parallel product: reduce-scattered along the sequence under
    sequence parallelism, else all-reduced."""
    if sequence_parallel_active():
        return reduce_scatter_to_sequence_parallel_region(y)
    return reduce_from_tp_region(y)


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dimension forward; this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(tp_world_size())]
        dist.all_gather(parts, x, group=tp_group())
        ctx.size = x.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        r = tp_rank()
        return g[..., r * ctx.size : (r + 1) * ctx.size].contiguous()


def gather_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    """(..., n / tp) on each rank -> (..., n) on every rank, ranks' slices in rank order."""
    return _GatherFromTP.apply(x) if tp_world_size() > 1 else x


def shard_tensor(
    full: torch.Tensor, dim: int, parts: Sequence[int], rank: int, size: int
) -> torch.Tensor:
    """This rank's shard of a packed tensor: each component split in ``size`` equal pieces."""
    comps = torch.split(full, list(parts), dim=dim)
    return torch.cat([c.chunk(size, dim=dim)[rank] for c in comps], dim=dim).contiguous()


def unshard_tensors(shards: Sequence[torch.Tensor], dim: int, parts: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: ``shards`` are the pieces of ranks 0..T-1."""
    size = len(shards)
    local = [p // size for p in parts]
    per_rank = [torch.split(s, local, dim=dim) for s in shards]
    comps = [torch.cat([pr[i] for pr in per_rank], dim=dim) for i in range(len(parts))]
    return torch.cat(comps, dim=dim)


def local_parts(parts: Sequence[int], tp: int) -> list[int]:
    """Per-rank sizes of each component; every component must be divisible by ``tp``."""
    for p in parts:
        if p % tp:
            raise ValueError(f"component of size {p} is not divisible by tensor parallel size {tp}")
    return [p // tp for p in parts]


def _init_linear(
    module: nn.Module,
    in_features: int,
    out_features: int,
    bias: bool,
    init_std: float,
    dim: int,
    parts: Sequence[int],
) -> None:
    """Set ``module.weight`` and ``module.bias`` to this rank's shard of the whole linear layer.

    The whole (``out_features``, ``in_features``) weight is drawn as
    :class:`ilm_megatron.models.layers.Linear` draws it (normal ``init_std`` when > 0, else
    PyTorch's Kaiming-uniform with the *global* fan-in; zero bias), consuming the same random
    numbers, and each rank keeps its shard along ``dim`` (Megatron's master-weight init). So the
    gathered weight equals the single-process layer's from the same generator state, at any TP size.
    The bias is sharded with the weight along the output (``dim == 0``), replicated otherwise.
    """
    ref = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        if init_std > 0:
            nn.init.normal_(ref.weight, std=init_std)
        if ref.bias is not None:
            nn.init.zeros_(ref.bias)
    tp, rank = tp_world_size(), tp_rank()
    if tp == 1:
        module.weight, module.bias = ref.weight, ref.bias
        return
    module.weight = nn.Parameter(shard_tensor(ref.weight.detach(), dim, parts, rank, tp))
    b = ref.bias
    if b is not None and dim == 0:
        b = nn.Parameter(shard_tensor(b.detach(), 0, parts, rank, tp))
    module.bias = b


class ColumnParallelLinear(nn.Module):
    """Output-sharded linear layer: (..., in) replicated -> (..., out / tp) local.

    Args mirror :class:`ilm_megatron.models.layers.Linear`; ``partition_sizes`` are the global
    sizes of the packed output components (default: one component of ``output_size``).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: object,
        bias: bool = False,
        init_std: float = 0.0,
        partition_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        parts = list(partition_sizes) if partition_sizes is not None else [output_size]
        assert sum(parts) == output_size, (parts, output_size)
        self.tp = tp_world_size()
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_local = sum(local_parts(parts, self.tp))
        _init_linear(self, input_size, output_size, bias, init_std, 0, parts)
        set_tp_layout(self.weight, 0, parts)
        if self.bias is not None:
            set_tp_layout(self.bias, 0, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) replicated (sequence parallel: (b, l / tp, in)) -> (..., out_local)."""
        return F.linear(_column_input(x), self.weight, self.bias)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by rows (vocabulary) over the TP group: rank r holds ids
    ``[r*V/tp, (r+1)*V/tp)``. ids (b, l) -> (b, l, d), replicated (one all-reduce).

    Its ``weight`` (V / tp, d) is also the tied LM head's shard (:func:`vocab_parallel_logits`).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.tp = tp_world_size()
        (local,) = local_parts([num_embeddings], self.tp)
        self.num_embeddings = num_embeddings
        self.start = tp_rank() * local
        self.end = self.start + local
        # the whole table drawn as the single-process model draws it (nn.Embedding's own init,
        # then normal init_std), and this rank's rows of it: the gathered table equals the
        # single-process one from the same generator state
        full = nn.Embedding(num_embeddings, embedding_dim).weight.detach()
        nn.init.normal_(full, std=init_std)
        self.weight = nn.Parameter(full[self.start : self.end].clone())
        set_tp_layout(self.weight, 0, [num_embeddings])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (b, l) -> embeddings (b, l, d), summed over the ranks that own them."""
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        return _row_output(local.masked_fill(outside.unsqueeze(-1), 0.0))


def vocab_parallel_logits(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """z (..., d) replicated, weight (V / tp, d) this rank's vocabulary rows -> logits (..., V)."""
    return gather_from_tp_region(F.linear(_column_input(z), weight))


def vocab_parallel_logits_local(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """z (..., d) replicated, weight (V / tp, d) -> this rank's logits columns (..., V / tp)."""
    return F.linear(_column_input(z), weight)


def _local_columns(logits: torch.Tensor, vocab: int) -> tuple[torch.Tensor, int]:
    """(a float32 copy of this rank's logits columns (..., V / tp) with the padding columns,
    global ids >= ``vocab``, at -inf; the global id of its first column)."""
    vl = logits.shape[-1]
    start = tp_rank() * vl
    x = logits.detach().to(torch.float32, copy=True)
    if start + vl > vocab:
        x[..., max(0, vocab - start) :] = float("-inf")
    return x, start


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of vocabulary-sharded logits, without gathering them.

    Rank r holds columns ``[r * Vl, (r + 1) * Vl)`` of the padded vocabulary. Three all-reduces
    of (N,) vectors over the TP group (max, sum of exponentials, target logit) replace the
    all-gather of (N, V) logits; backward is local: ``softmax - onehot(target)`` on this rank's
    columns. Columns at or past ``vocab`` (padding) take no probability.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab, ignore_index):  # type: ignore[override]
        vl = logits.shape[-1]
        group = tp_group()
        x, start = _local_columns(logits, vocab)  # the one (N, V / tp) buffer: softmax below
        m = x.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        x.sub_(m[:, None])
        local_t = targets - start
        own = (local_t >= 0) & (local_t < vl)
        idx = local_t.clamp(0, vl - 1)
        t_logit = torch.where(own, x.gather(1, idx[:, None])[:, 0], 0.0)
        x.exp_()  # x now holds exp(logit - max)
        sum_e = x.sum(dim=-1)
        both = torch.stack([sum_e, t_logit])
        dist.all_reduce(both, group=group)
        sum_e, t_logit = both[0], both[1]
        keep = targets != ignore_index
        loss = torch.where(keep, torch.log(sum_e) - t_logit, 0.0)
        x.div_(sum_e[:, None])  # softmax, kept for backward (this rank's columns only)
        ctx.save_for_backward(x, idx, own & keep, keep)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        softmax, idx, own, keep = ctx.saved_tensors
        g = torch.where(keep, g, 0.0)
        grad = softmax.mul_(g[:, None])  # in place: the saved softmax is not needed again
        grad.scatter_add_(1, idx[:, None], torch.where(own, -g, 0.0)[:, None])  # no host sync
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, vocab: int, ignore_index: int = -100
) -> torch.Tensor:
    """Mean token cross-entropy of this rank's logits columns, as ``F.cross_entropy`` on the
    gathered ``logits[..., :vocab]`` with ``ignore_index`` -- no rank builds (..., V) logits.

    Args:
        logits: (..., V / tp) this rank's columns of the padded vocabulary (any float dtype).
        targets: (...) global token ids; ``ignore_index`` entries do not count.
        vocab: the real vocabulary size (columns at or past it are padding).

    Returns:
        The scalar mean over the counted targets (NaN when none count, like F.cross_entropy).
    """
    if tp_world_size() == 1:
        return F.cross_entropy(
            logits[..., :vocab].flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index
        )
    flat = logits.flatten(0, -2)
    t = targets.flatten()
    per_token = _VocabParallelCrossEntropy.apply(flat, t, vocab, ignore_index)
    return per_token.sum() / (t != ignore_index).sum()


def vocab_parallel_argmax(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Global argmax ids (...) of vocabulary-sharded logits (..., V / tp), ties to the lowest
    id as ``torch.argmax`` on the gathered ``logits[..., :vocab]``; (N, tp) values move."""
    if tp_world_size() == 1:
        return logits[..., :vocab].argmax(-1)
    x, start = _local_columns(logits, vocab)
    val, idx = x.max(dim=-1)
    pair = torch.stack([val, (idx + start).to(val.dtype)])
    parts = [torch.empty_like(pair) for _ in range(tp_world_size())]
    dist.all_gather(parts, pair.contiguous(), group=tp_group())
    vals = torch.stack([p[0] for p in parts])  # (tp, ...)
    ids = torch.stack([p[1] for p in parts])
    best = vals.argmax(dim=0, keepdim=True)  # first rank holding the maximum = lowest id
    return ids.gather(0, best)[0].long()


class RowParallelLinear(nn.Module):
    """Input-sharded linear layer: (..., in / tp) local -> (..., out) replicated (1 all-reduce)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: object,
        bias: bool = False,
        init_std: float = 0.0,
        partition_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        parts = list(partition_sizes) if partition_sizes is not None else [input_size]
        assert sum(parts) == input_size, (parts, input_size)
        self.tp = tp_world_size()
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_local = sum(local_parts(parts, self.tp))
        _init_linear(self, input_size, output_size, bias, init_std, 1, parts)
        set_tp_layout(self.weight, 1, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_local) -> (..., out) summed over TP ranks (sequence parallel: this rank's
        (b, l / tp, out) slice of the sum)."""
        y = _row_output(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
