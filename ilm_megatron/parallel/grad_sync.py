"""Gradient averaging over the data-parallel group in fixed-size buckets.

Without ZeRO the tensor x pipeline engine averages each rank's gradients over its data-parallel
replicas. :func:`all_reduce_bucketed` does it in buckets of at most ``bucket_bytes``: bucket
``i + 1`` is flattened while bucket ``i``'s all-reduce is in flight, so at most two flat buffers
exist at a time (a whole-model flat copy plus per-parameter clones, three copies of the
gradients, was the cost of one flat all-reduce).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped into consecutive buckets of at most ``bucket_bytes``
    (a tensor larger than that is a bucket of its own), never mixing dtypes or devices."""
    out: list[list[int]] = []
    size, key = 0, None
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        k = (t.dtype, t.device)
        if not out or k != key or size + nbytes > bucket_bytes:
            out.append([])
            size, key = 0, k
        out[-1].append(i)
        size += nbytes
    return [b for b in out if b]


def all_reduce_bucketed(
    tensors: Sequence[torch.Tensor], group: Any, bucket_bytes: int, average: bool = True
) -> dict[str, int]:
    """Sum (``average``: mean) each tensor over ``group`` in place, bucket by bucket. Collective:
    every rank passes tensors of the same shapes in the same order.

    Returns ``{"bytes": payload bytes this rank sent into all-reduces, "buckets": count,
    "max_bucket_bytes": largest flat buffer}``.
    """
    n = dist.get_world_size(group=group)
    plan = buckets(tensors, bucket_bytes)
    sent = biggest = 0
    pending: tuple[Any, torch.Tensor, list[int]] | None = None

    def finish(work: Any, flat: torch.Tensor, idx: list[int]) -> None:
        work.wait()
        if average:
            flat /= n
        offset = 0
        for i in idx:
            t = tensors[i]
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    for idx in plan:
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        work = dist.all_reduce(flat, group=group, async_op=True)
        sent += flat.numel() * flat.element_size()
        biggest = max(biggest, flat.numel() * flat.element_size())
        if pending is not None:
            finish(*pending)
        pending = (work, flat, idx)
    if pending is not None:
        finish(*pending)
    return {"bytes": sent, "buckets": len(plan), "max_bucket_bytes": biggest}
