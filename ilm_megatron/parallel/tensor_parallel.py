"""Tensor-parallel layers for the ``tp`` spec backend (Megatron-style, pure torch.distributed).

* :class:`ColumnParallelLinear`: ``y_local = x W_local^T`` where ``W_local`` holds this rank's
  share of *every component* of a packed output (``partition_sizes``, e.g. Mamba2's
  ``[z, x, B, C, dt]``): rank r owns rows ``[r*p/tp, (r+1)*p/tp)`` of each component p. The input is
  replicated; its gradient is all-reduced over the TP group in backward.
* :class:`RowParallelLinear`: the input is sharded along features, the partial products are
  all-reduced (one all-reduce per layer in forward, identity in backward); the bias is replicated.

Every sharded parameter carries a layout (:func:`set_tp_layout`): the dimension it is split along
and the global sizes of its packed components. :mod:`ilm_megatron.parallel.checkpoint` uses it to
gather a sharded model into the single-process state dict and to shard a full one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ilm_megatron.parallel.state import tp_group, tp_rank, tp_world_size


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


def copy_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Replicated activation entering TP-local compute (gradients summed over ranks)."""
    return _CopyToTP.apply(x) if tp_world_size() > 1 else x


def reduce_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of all TP ranks."""
    return _ReduceFromTP.apply(x) if tp_world_size() > 1 else x


def local_parts(parts: Sequence[int], tp: int) -> list[int]:
    """Per-rank sizes of each component; every component must be divisible by ``tp``."""
    for p in parts:
        if p % tp:
            raise ValueError(f"component of size {p} is not divisible by tensor parallel size {tp}")
    return [p // tp for p in parts]


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
        ref = nn.Linear(input_size, self.output_size_local, bias=bias)
        self.weight = ref.weight
        self.bias = ref.bias
        if init_std > 0:
            nn.init.normal_(self.weight, std=init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        set_tp_layout(self.weight, 0, parts)
        if self.bias is not None:
            set_tp_layout(self.bias, 0, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) replicated -> (..., out_local)."""
        return F.linear(copy_to_tp_region(x), self.weight, self.bias)


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
        ref = nn.Linear(self.input_size_local, output_size, bias=bias)
        self.weight = ref.weight
        self.bias = ref.bias
        if init_std > 0:
            nn.init.normal_(self.weight, std=init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        set_tp_layout(self.weight, 1, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_local) -> (..., out) summed over TP ranks."""
        y = reduce_from_tp_region(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


# ---------------------------------------------------------------------- verification
def compare_with_single_process(
    rank: int,
    config: object,
    seed: int,
    result_path: str,
    ckpt_path: str,
    batch: int = 2,
    seq_len: int = 12,
    seq_decode_len: int = 6,
) -> None:
    """One TP worker of the TP-vs-single-process check (run under :func:`state.spawn`).

    Every rank builds the single-process model from ``seed``, shards its weights into a ``tp``
    model, and compares: training-mode logits, loss and every (gathered) parameter gradient;
    solver iteration counts on every rank; eval logits; a checkpoint saved at this TP size and
    loaded into a single-process model; sequential decoding. TP rank 0 writes a JSON dict to
    ``result_path``.

    Args:
        config: a :class:`ilm_megatron.config.Config` with ``parallel.tp`` equal to the world size.
    """
    import dataclasses
    import json

    from ilm_megatron.models.lm import build_model
    from ilm_megatron.parallel.checkpoint import (
        full_grads,
        load_checkpoint,
        load_full_state_dict,
        save_checkpoint,
    )

    cfg = config
    device = torch.device(
        f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    )
    local_cfg = dataclasses.replace(cfg.model, backend="local")  # type: ignore[attr-defined]
    tp_cfg = dataclasses.replace(cfg.model, backend="tp")  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    ref = build_model(local_cfg, cfg.solver).to(device)  # type: ignore[attr-defined]
    tpm = build_model(tp_cfg, cfg.solver).to(device)  # type: ignore[attr-defined]
    load_full_state_dict(tpm, ref.state_dict())

    gen = torch.Generator().manual_seed(seed + 1)
    vocab = cfg.model.vocab_size  # type: ignore[attr-defined]
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen).to(device)
    x, y = ids[:, :-1], ids[:, 1:]

    def train_step(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m.train()
        out = m(x)
        loss = F.cross_entropy(out.logits[..., :vocab].flatten(0, 1), y.flatten())
        loss.backward()
        return out.logits.detach(), loss.detach(), out.stats.sample_iters

    lg_ref, loss_ref, it_ref = train_step(ref)
    lg_tp, loss_tp, it_tp = train_step(tpm)
    g_ref = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    g_tp = full_grads(tpm)
    rel = 0.0
    for k, g in g_ref.items():
        rel = max(rel, ((g_tp[k] - g).abs().max() / (g.abs().max() + 1e-12)).item())
    missing = sorted(set(g_ref) ^ set(g_tp))

    # identical solver decisions on every TP rank (and equal to the single process)
    its = [torch.empty_like(it_tp) for _ in range(tp_world_size())]
    dist.all_gather(its, it_tp.contiguous(), group=tp_group())
    iters_equal = all(torch.equal(i, it_ref) for i in its)

    with torch.no_grad():
        ref.eval()
        tpm.eval()
        ev_ref, ev_tp = ref(x), tpm(x)
        eval_iters_equal = torch.equal(ev_ref.stats.sample_iters, ev_tp.stats.sample_iters)
        eval_diff = (ev_ref.logits - ev_tp.logits).abs().max().item()

        # checkpoint saved at this TP size, loaded into a single-process model
        save_checkpoint(tpm, ckpt_path)
        torch.manual_seed(seed + 7)
        single = build_model(local_cfg, cfg.solver).to(device).eval()  # type: ignore[attr-defined]
        load_checkpoint(single, ckpt_path)
        ckpt_diff = (single(x).logits - ev_tp.logits).abs().max().item()

        # sequential decoding (TP-local caches)
        xs = x[:, :seq_decode_len]
        sq_ref, sq_tp = ref.forward_sequential(xs), tpm.forward_sequential(xs)
        seq_diff = (sq_ref.logits - sq_tp.logits).abs().max().item()
        seq_iters_equal = torch.equal(sq_ref.stats.sample_iters, sq_tp.stats.sample_iters)

    result = {
        "tp": tp_world_size(),
        "max_abs_logit_diff": (lg_ref - lg_tp).abs().max().item(),
        "max_rel_grad_diff": rel,
        "loss_diff": abs(loss_ref.item() - loss_tp.item()),
        "iters_equal": bool(iters_equal and eval_iters_equal and seq_iters_equal),
        "solver_iters": int(it_ref.max()),
        "eval_logit_diff": eval_diff,
        "checkpoint_logit_diff": ckpt_diff,
        "sequential_logit_diff": seq_diff,
        "grad_params": len(g_ref),
        "grad_name_mismatch": missing,
    }
    if tp_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(result, f)
